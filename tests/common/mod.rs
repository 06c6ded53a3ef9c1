//! Test harness: runs the real `courier` binary as a child process and talks to it over real
//! WebSockets (sync `tungstenite` on `std::net::TcpStream`).
//!
//! Owns: starting/stopping/killing/restarting a server on a temporary data dir, a blocking
//! `Client` with bounded waits, JWT minting. Must not: sleep as synchronization, wait without a
//! bound, or know anything about the server's internals (only the wire contract).
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::Message;
use tungstenite::{Error as WsError, WebSocket};

/// How long any single expected frame may take to arrive.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server may take to print `listening on`.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a SIGTERMed server may take to exit.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

/// How to start a server.
#[derive(Clone, Debug)]
pub struct ServerOpts {
    /// `--shards N`; `None` uses the server's default.
    pub shards: Option<usize>,
    /// `COURIER_AUTH_SECRET`; `None` removes it from the child's environment.
    pub secret: Option<String>,
    /// `--dev` (default true).
    pub dev: bool,
    /// Further flags passed as they are (e.g. `--dev-clock`, `--retention-secs 60`).
    pub extra_args: Vec<String>,
}

impl Default for ServerOpts {
    fn default() -> Self {
        ServerOpts {
            shards: None,
            secret: None,
            dev: true,
            extra_args: Vec::new(),
        }
    }
}

impl ServerOpts {
    pub fn shards(n: usize) -> Self {
        ServerOpts {
            shards: Some(n),
            ..Default::default()
        }
    }
    pub fn with_secret(secret: &str) -> Self {
        ServerOpts {
            secret: Some(secret.to_string()),
            ..Default::default()
        }
    }
    /// Adds one flag (or flag value) to the command line.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }
    /// Adds `--flag value`.
    pub fn flag(self, flag: &str, value: impl ToString) -> Self {
        self.arg(flag).arg(value.to_string())
    }
    /// `--dev-clock`: the server accepts `{"t":"dev_clock","advance_ms":N}` (needs `--dev`).
    pub fn dev_clock(self) -> Self {
        self.arg("--dev-clock")
    }
}

/// Most recent output lines of the server (stdout and stderr, every generation) kept for tests.
const LOG_LINES_KEPT: usize = 20_000;

/// A `courier serve` child process on a temporary data dir. Drop kills it.
pub struct Server {
    opts: ServerOpts,
    data_dir: tempfile::TempDir,
    child: Option<Child>,
    addr: SocketAddr,
    /// The admin listener's address, when `--admin-listen` was passed (changes on restart).
    admin: Option<SocketAddr>,
    /// The server's recent output lines (stdout and stderr, all generations).
    log: Arc<Mutex<VecDeque<String>>>,
    /// Number of times a child was started (for log prefixes).
    generation: u32,
}

impl Server {
    /// Starts a server on a fresh temporary data dir and waits for `listening on <addr>`.
    pub fn start(opts: ServerOpts) -> Server {
        let data_dir = tempfile::Builder::new()
            .prefix("courier-test-")
            .tempdir()
            .expect("create temp data dir");
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (child, addr, admin) = spawn_server(&opts, data_dir.path(), 0, &log);
        Server {
            opts,
            data_dir,
            child: Some(child),
            addr,
            admin,
            log,
            generation: 0,
        }
    }

    /// The admin listener's address; panics unless the server was started with
    /// `--admin-listen` (e.g. `127.0.0.1:0`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .expect("the server was started without --admin-listen")
    }

    /// Whether any output line of the server so far (stdout or stderr) contains `needle`.
    pub fn log_contains(&self, needle: &str) -> bool {
        self.log
            .lock()
            .expect("server log lock")
            .iter()
            .any(|line| line.contains(needle))
    }

    /// A value from the child's `/proc/<pid>/status` in KiB (e.g. `VmRSS`, `RssAnon`, `VmHWM`).
    pub fn proc_status_kib(&self, field: &str) -> u64 {
        let pid = self.pid().expect("the server is not running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
        status
            .lines()
            .find_map(|line| {
                let rest = line.strip_prefix(field)?.strip_prefix(':')?;
                rest.trim().trim_end_matches("kB").trim().parse().ok()
            })
            .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
    }

    /// The server's resident set size in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        self.proc_status_kib("VmRSS")
    }

    /// The address clients connect to (changes on restart).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL: the process gets no chance to flush anything.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("kill9: server is not running");
        child.kill().expect("SIGKILL the server");
        let _ = child.wait();
    }

    /// SIGTERM, wait (bounded), and assert the exit status is 0.
    pub fn stop(&mut self) {
        let status = self.terminate();
        assert!(
            status.success(),
            "server exited with {status} after SIGTERM, expected 0"
        );
    }

    /// SIGTERM and wait (bounded); returns the exit status without judging it.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("stop: server is not running");
        let pid = child.id() as libc::pid_t;
        // SAFETY: plain syscall on the pid of a child we own and have not reaped yet.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(
            rc,
            0,
            "kill(SIGTERM) failed: {}",
            std::io::Error::last_os_error()
        );
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait().expect("wait for server") {
                Some(status) => return status,
                None if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("server did not exit within {STOP_TIMEOUT:?} after SIGTERM");
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Starts the server again on the same data dir (a clean stop first if it still runs).
    /// The address may change: use `addr()` afterwards.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        self.generation += 1;
        let (child, addr, admin) =
            spawn_server(&self.opts, self.data_dir.path(), self.generation, &self.log);
        self.child = Some(child);
        self.addr = addr;
        self.admin = admin;
    }

    /// Like `restart`, with other options from now on (e.g. a larger `--map-size-mib`).
    pub fn restart_with(&mut self, opts: ServerOpts) {
        if self.child.is_some() {
            self.stop();
        }
        self.opts = opts;
        self.restart();
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn_server(
    opts: &ServerOpts,
    data_dir: &Path,
    generation: u32,
    log: &Arc<Mutex<VecDeque<String>>>,
) -> (Child, SocketAddr, Option<SocketAddr>) {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_courier"));
    let mut cmd = Command::new(&bin);
    cmd.arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(data_dir);
    if opts.dev {
        cmd.arg("--dev");
    }
    if let Some(n) = opts.shards {
        cmd.arg("--shards").arg(n.to_string());
    }
    cmd.args(&opts.extra_args);
    match &opts.secret {
        Some(secret) => {
            cmd.env("COURIER_AUTH_SECRET", secret);
        }
        None => {
            cmd.env_remove("COURIER_AUTH_SECRET");
        }
    }
    cmd.env("MIMALLOC_ALLOW_THP", "0")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let pid = child.id();
    let prefix = format!("[courier#{generation} pid {pid}]");

    let stdout = child.stdout.take().expect("child stdout");
    let stderr = child.stderr.take().expect("child stderr");
    let wants_admin = opts
        .extra_args
        .windows(2)
        .any(|pair| pair[0] == "--admin-listen" && pair[1] != "off");
    let (addr_tx, addr_rx) = mpsc::channel::<SocketAddr>();
    let (admin_tx, admin_rx) = mpsc::channel::<SocketAddr>();
    {
        let prefix = prefix.clone();
        let log = log.clone();
        std::thread::spawn(move || {
            let mut addr_tx = Some(addr_tx);
            let mut admin_tx = Some(admin_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                eprintln!("{prefix} stdout: {line}");
                keep(&log, &line);
                let (rest, tx) = if let Some(rest) = line.split("admin listening on ").nth(1) {
                    (rest, &mut admin_tx)
                } else if let Some(rest) = line.split("listening on ").nth(1) {
                    (rest, &mut addr_tx)
                } else {
                    continue;
                };
                let token = rest.split_whitespace().next().unwrap_or("");
                if let Ok(addr) = token.parse::<SocketAddr>()
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr);
                }
            }
        });
    }
    {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("{prefix} stderr: {line}");
                keep(&log, &line);
            }
        });
    }

    let started = Instant::now();
    let addr = addr_rx.recv_timeout(START_TIMEOUT);
    let admin = match (&addr, wants_admin) {
        (Ok(_), true) => {
            let left = START_TIMEOUT.saturating_sub(started.elapsed());
            match admin_rx.recv_timeout(left) {
                Ok(admin) => Some(admin),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "courier serve did not print `admin listening on <addr>` within \
                         {START_TIMEOUT:?}"
                    );
                }
            }
        }
        _ => None,
    };
    match addr {
        Ok(addr) => (child, addr, admin),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // stdout closed before the line: the process is gone (or closed stdout).
            let status = wait_bounded(&mut child, Duration::from_secs(5));
            panic!(
                "courier serve exited before printing `listening on <addr>` (status: {status:?}); \
                 see its stderr above"
            );
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("courier serve did not print `listening on <addr>` within {START_TIMEOUT:?}");
        }
    }
}

/// Appends one server output line to the kept log (dropping the oldest beyond the bound).
fn keep(log: &Mutex<VecDeque<String>>, line: &str) {
    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
    if log.len() >= LOG_LINES_KEPT {
        log.pop_front();
    }
    log.push_back(line.to_string());
}

fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

/// Why a connection attempt failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The server answered the upgrade request with this HTTP status.
    Http(u16),
    /// Anything else (refused, reset, timeout, bad handshake).
    Other(String),
}

/// Why a receive did not produce a frame.
#[derive(Debug)]
pub enum RecvError {
    /// Nothing arrived before the deadline.
    Timeout,
    /// The server sent a close frame (code; 1005 when it carried none).
    Closed(u16),
    /// The connection ended without a close frame, or failed.
    Broken(String),
}

/// A blocking WebSocket client with bounded waits.
///
/// Frames read while looking for something else are kept in a backlog, so no frame is lost by
/// `recv_until`. Every `ev` frame read from the socket is checked on arrival: after `hello`,
/// `seq` must be exactly the previous one plus 1 (no gap, no duplicate on one connection).
pub struct Client {
    ws: WebSocket<TcpStream>,
    label: String,
    backlog: VecDeque<Value>,
    /// Highest `seq` seen on this connection (hello's cursor until the first event; `low - 1`
    /// when hello says `"gap":true`, since replay then starts at `low`).
    last_seq: Option<u64>,
    /// The hello frame, once read.
    hello: Option<Value>,
    pub timeout: Duration,
}

impl Client {
    /// Low-level connect: `path_and_query` like `/v1/ws?user=a&device=b`, extra headers.
    pub fn try_connect(
        addr: SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, ConnectError> {
        let url = format!("ws://{addr}{path_and_query}");
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| ConnectError::Other(format!("bad request {url}: {e}")))?;
        for (name, value) in headers {
            let name = tungstenite::http::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| ConnectError::Other(format!("header name {name}: {e}")))?;
            let value = tungstenite::http::header::HeaderValue::from_str(value)
                .map_err(|e| ConnectError::Other(format!("header value {value}: {e}")))?;
            request.headers_mut().insert(name, value);
        }
        let stream = TcpStream::connect_timeout(&addr, RECV_TIMEOUT)
            .map_err(|e| ConnectError::Other(format!("tcp connect {addr}: {e}")))?;
        Client::upgrade(stream, &url, path_and_query, request)
    }

    /// Dev-mode connection whose socket has a fixed kernel receive buffer of `bytes` (set before
    /// connecting, so the kernel does not grow it): a reader that stops reading then pushes back
    /// on the server after a few KiB instead of the megabytes an autotuned loopback buffer holds.
    pub fn try_dev_small_recv_buffer(
        addr: SocketAddr,
        user: &str,
        device: &str,
        bytes: usize,
    ) -> Result<Client, ConnectError> {
        let path_and_query = format!("/v1/ws?user={user}&device={device}");
        let url = format!("ws://{addr}{path_and_query}");
        let request = url
            .as_str()
            .into_client_request()
            .map_err(|e| ConnectError::Other(format!("bad request {url}: {e}")))?;
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .map_err(|e| ConnectError::Other(format!("socket: {e}")))?;
        socket
            .set_recv_buffer_size(bytes)
            .map_err(|e| ConnectError::Other(format!("SO_RCVBUF: {e}")))?;
        socket
            .connect_timeout(&addr.into(), RECV_TIMEOUT)
            .map_err(|e| ConnectError::Other(format!("tcp connect {addr}: {e}")))?;
        Client::upgrade(socket.into(), &url, &path_and_query, request)
            .map(|c| c.labelled(format!("{user}/{device}")))
    }

    /// The WebSocket upgrade on a connected socket.
    fn upgrade(
        stream: TcpStream,
        url: &str,
        path_and_query: &str,
        request: tungstenite::handshake::client::Request,
    ) -> Result<Client, ConnectError> {
        stream
            .set_read_timeout(Some(RECV_TIMEOUT))
            .expect("set_read_timeout");
        stream
            .set_write_timeout(Some(RECV_TIMEOUT))
            .expect("set_write_timeout");
        stream.set_nodelay(true).expect("set_nodelay");
        match tungstenite::client::client(request, stream) {
            Ok((ws, _response)) => Ok(Client {
                ws,
                label: path_and_query.to_string(),
                backlog: VecDeque::new(),
                last_seq: None,
                hello: None,
                timeout: RECV_TIMEOUT,
            }),
            Err(HandshakeError::Failure(WsError::Http(response))) => {
                Err(ConnectError::Http(response.status().as_u16()))
            }
            Err(HandshakeError::Failure(e)) => Err(ConnectError::Other(format!(
                "handshake with {url} failed: {e}"
            ))),
            Err(HandshakeError::Interrupted(_)) => Err(ConnectError::Other(format!(
                "handshake with {url} timed out after {RECV_TIMEOUT:?}"
            ))),
        }
    }

    pub fn try_dev(addr: SocketAddr, user: &str, device: &str) -> Result<Client, ConnectError> {
        Client::try_connect(addr, &format!("/v1/ws?user={user}&device={device}"), &[])
            .map(|c| c.labelled(format!("{user}/{device}")))
    }

    /// Dev-mode connection as `user` on `device`; panics if it is refused.
    pub fn dev(addr: SocketAddr, user: &str, device: &str) -> Client {
        Client::try_dev(addr, user, device)
            .unwrap_or_else(|e| panic!("connect {user}/{device}: {e:?}"))
    }

    pub fn try_with_token(addr: SocketAddr, token: &str) -> Result<Client, ConnectError> {
        Client::try_connect(addr, &format!("/v1/ws?token={token}"), &[])
            .map(|c| c.labelled("token(query)".to_string()))
    }

    /// Connection with `?token=`; panics if it is refused.
    pub fn with_token(addr: SocketAddr, token: &str) -> Client {
        Client::try_with_token(addr, token)
            .unwrap_or_else(|e| panic!("connect with ?token=: {e:?}"))
    }

    pub fn try_with_header_token(addr: SocketAddr, token: &str) -> Result<Client, ConnectError> {
        let bearer = format!("Bearer {token}");
        Client::try_connect(addr, "/v1/ws", &[("Authorization", &bearer)])
            .map(|c| c.labelled("token(header)".to_string()))
    }

    /// Connection with `Authorization: Bearer`; panics if it is refused.
    pub fn with_header_token(addr: SocketAddr, token: &str) -> Client {
        Client::try_with_header_token(addr, token)
            .unwrap_or_else(|e| panic!("connect with Authorization header: {e:?}"))
    }

    fn labelled(mut self, label: String) -> Client {
        self.label = label;
        self
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// The raw socket (for writing hand-made frames).
    pub fn socket(&mut self) -> &mut TcpStream {
        self.ws.get_mut()
    }

    // --- receiving ----------------------------------------------------------------------------

    /// Reads one message from the socket, waiting at most until `deadline`. Answers pings
    /// (tungstenite queues the pong). Checks `ev` seq continuity.
    fn read_socket(&mut self, deadline: Instant) -> Result<Value, RecvError> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(RecvError::Timeout);
            }
            let remaining = (deadline - now).max(Duration::from_millis(1));
            let _ = self.ws.get_mut().set_read_timeout(Some(remaining));
            match self.ws.read() {
                Ok(Message::Text(text)) => {
                    let value: Value = serde_json::from_str(text.as_str()).unwrap_or_else(|e| {
                        panic!(
                            "[{}] server sent a non-JSON text frame ({e}): {text}",
                            self.label
                        )
                    });
                    self.check_event(&value);
                    return Ok(value);
                }
                Ok(Message::Binary(b)) => {
                    panic!(
                        "[{}] server sent a binary frame ({} bytes)",
                        self.label,
                        b.len()
                    )
                }
                Ok(Message::Ping(_)) | Ok(Message::Pong(_)) | Ok(Message::Frame(_)) => continue,
                Ok(Message::Close(frame)) => {
                    let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                    return Err(RecvError::Closed(code));
                }
                Err(WsError::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    continue;
                }
                Err(e) => return Err(RecvError::Broken(e.to_string())),
            }
        }
    }

    fn check_event(&mut self, value: &Value) {
        match value["t"].as_str() {
            Some("hello") => {
                let cursor = value["cursor"].as_u64().unwrap_or_else(|| {
                    panic!("[{}] hello without a u64 cursor: {value}", self.label)
                });
                assert!(
                    self.hello.is_none(),
                    "[{}] a second hello: {value}",
                    self.label
                );
                // With a gap (pruned events the device never acked) replay starts at `low`.
                let mut last = cursor;
                if value["gap"] == true {
                    let low = value["low"].as_u64().unwrap_or_else(|| {
                        panic!("[{}] hello with a gap but no u64 low: {value}", self.label)
                    });
                    assert!(
                        cursor + 1 < low,
                        "[{}] hello says gap but cursor + 1 >= low: {value}",
                        self.label
                    );
                    last = low - 1;
                }
                self.last_seq = Some(last);
                self.hello = Some(value.clone());
            }
            Some("ev") => {
                let seq = value["seq"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("[{}] event without a u64 seq: {value}", self.label));
                let last = self
                    .last_seq
                    .unwrap_or_else(|| panic!("[{}] event before hello: {value}", self.label));
                assert_eq!(
                    seq,
                    last + 1,
                    "[{}] event seq {seq} after {last}: a gap or a duplicate on one connection: {value}",
                    self.label
                );
                self.last_seq = Some(seq);
            }
            _ => {}
        }
    }

    /// Next frame (backlog first), or an error after `timeout`.
    pub fn try_recv_json(&mut self, timeout: Duration) -> Result<Value, RecvError> {
        if let Some(v) = self.backlog.pop_front() {
            return Ok(v);
        }
        self.read_socket(Instant::now() + timeout)
    }

    /// Next JSON frame (backlog first); panics with a clear message on timeout or close.
    pub fn recv_json(&mut self) -> Value {
        let timeout = self.timeout;
        match self.try_recv_json(timeout) {
            Ok(v) => v,
            Err(e) => panic!(
                "[{}] waiting for a frame: {e:?} (timeout {timeout:?})",
                self.label
            ),
        }
    }

    /// First frame matching `pred` (backlog first); frames that do not match stay in the
    /// backlog in order. Panics after the timeout.
    pub fn recv_until(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        self.recv_until_described("a frame matching the predicate", pred)
    }

    pub fn recv_until_described(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        match self.try_recv_until(self.timeout, &pred) {
            Ok(v) => v,
            Err(e) => panic!(
                "[{}] waiting for {what}: {e:?} after {:?}; unmatched frames: {}",
                self.label,
                self.timeout,
                self.backlog_summary()
            ),
        }
    }

    pub fn try_recv_until(
        &mut self,
        timeout: Duration,
        pred: &dyn Fn(&Value) -> bool,
    ) -> Result<Value, RecvError> {
        if let Some(pos) = self.backlog.iter().position(pred) {
            return Ok(self.backlog.remove(pos).expect("position is in range"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.read_socket(deadline)?;
            if pred(&v) {
                return Ok(v);
            }
            self.backlog.push_back(v);
        }
    }

    fn backlog_summary(&self) -> String {
        let n = self.backlog.len();
        let shown: Vec<String> = self
            .backlog
            .iter()
            .rev()
            .take(5)
            .map(|v| v.to_string())
            .collect();
        format!("{n} (last ones: {})", shown.join(" | "))
    }

    /// Drops every buffered, not yet consumed frame.
    pub fn clear_backlog(&mut self) {
        self.backlog.clear();
    }

    pub fn backlog(&self) -> &VecDeque<Value> {
        &self.backlog
    }

    /// Reads the `hello` (must be the first frame) and returns it.
    pub fn hello(&mut self) -> Value {
        let v = self.recv_json();
        assert_eq!(
            v["t"], "hello",
            "[{}] first frame is not hello: {v}",
            self.label
        );
        for field in ["cursor", "head", "low"] {
            assert!(
                v[field].is_u64(),
                "[{}] hello.{field} is not a u64: {v}",
                self.label
            );
        }
        assert!(
            v["user"].is_string(),
            "[{}] hello.user missing: {v}",
            self.label
        );
        assert!(
            v["device"].is_string(),
            "[{}] hello.device missing: {v}",
            self.label
        );
        v
    }

    /// The hello read on this connection, if any.
    pub fn hello_frame(&self) -> Option<&Value> {
        self.hello.as_ref()
    }

    /// Highest `seq` received on this connection (hello's cursor before any event).
    pub fn last_seq(&self) -> u64 {
        self.last_seq.expect("no hello yet")
    }

    /// Every `ev` with seq ≤ `n` not yet consumed, in order, reading until `seq == n` arrived
    /// (returns at once if it already has). Non-event frames stay in the backlog. Each frame
    /// must arrive within the timeout (a long catch-up is fine as long as it progresses).
    pub fn collect_events_until_seq(&mut self, n: u64) -> Vec<Value> {
        let mut events = Vec::new();
        let mut rest = VecDeque::new();
        while let Some(v) = self.backlog.pop_front() {
            if v["t"] == "ev" && v["seq"].as_u64().is_some_and(|s| s <= n) {
                events.push(v);
            } else {
                rest.push_back(v);
            }
        }
        self.backlog = rest;
        while self.last_seq.is_some_and(|s| s < n) {
            let deadline = Instant::now() + self.timeout;
            match self.read_socket(deadline) {
                Ok(v) if v["t"] == "ev" => events.push(v),
                Ok(v) => self.backlog.push_back(v),
                Err(e) => panic!(
                    "[{}] collecting events up to seq {n}: {e:?} at seq {:?} (timeout {:?} per frame)",
                    self.label, self.last_seq, self.timeout
                ),
            }
        }
        assert!(
            self.last_seq.is_some(),
            "[{}] collect_events_until_seq before hello",
            self.label
        );
        events
    }

    /// Next `ev` of kind `msg` (backlog first).
    pub fn next_msg(&mut self) -> Value {
        self.recv_until_described("a msg event", |v| v["t"] == "ev" && v["kind"] == "msg")
    }

    /// Next `error` frame (backlog first).
    pub fn next_error(&mut self) -> Value {
        self.recv_until_described("an error frame", |v| v["t"] == "error")
    }

    /// Next `sent` for client id `id` (backlog first).
    pub fn next_sent(&mut self, id: &str) -> Value {
        let id = id.to_string();
        self.recv_until_described(&format!("sent for {id}"), move |v| {
            v["t"] == "sent" && v["id"] == id.as_str()
        })
    }

    /// Reads until the server closes; returns the close code (1005 if it gave none). Text frames
    /// read on the way go to the backlog. Panics on timeout or a close without a close frame.
    pub fn expect_close(&mut self) -> u16 {
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.read_socket(deadline) {
                Ok(v) => self.backlog.push_back(v),
                Err(RecvError::Closed(code)) => return code,
                Err(e) => panic!(
                    "[{}] expected a close frame, got {e:?}; frames before: {}",
                    self.label,
                    self.backlog_summary()
                ),
            }
        }
    }

    // --- sending ------------------------------------------------------------------------------

    pub fn send_json(&mut self, value: Value) {
        self.send_text(&value.to_string());
    }

    pub fn send_text(&mut self, text: &str) {
        let label = self.label.clone();
        self.ws
            .send(Message::text(text))
            .unwrap_or_else(|e| panic!("[{label}] send text frame: {e}"));
    }

    pub fn send_binary(&mut self, bytes: Vec<u8>) {
        let label = self.label.clone();
        self.ws
            .send(Message::binary(bytes))
            .unwrap_or_else(|e| panic!("[{label}] send binary frame: {e}"));
    }

    /// Writes without flushing (for pipelining); call `flush` after a batch.
    pub fn write_json(&mut self, value: Value) -> Result<(), String> {
        self.ws
            .write(Message::text(value.to_string()))
            .map_err(|e| e.to_string())
    }

    pub fn flush(&mut self) -> Result<(), String> {
        self.ws.flush().map_err(|e| e.to_string())
    }

    /// Writes one masked client frame by hand (FIN set) straight to the socket, bypassing
    /// tungstenite's checks (e.g. invalid UTF-8 in a text frame).
    pub fn send_raw_frame(&mut self, opcode: u8, payload: &[u8]) {
        let _ = self.ws.flush();
        let frame = raw_client_frame(opcode, payload);
        let socket = self.ws.get_mut();
        socket.write_all(&frame).expect("write raw frame");
        socket.flush().expect("flush raw frame");
    }

    /// `send` frame.
    pub fn send_msg(&mut self, id: &str, to: &str, body: &str) {
        self.send_json(json!({"t": "send", "id": id, "to": to, "body": body}));
    }

    /// `send`, then wait for its `sent`; returns the `sent` frame.
    pub fn send_and_wait(&mut self, id: &str, to: &str, body: &str) -> Value {
        self.send_msg(id, to, body);
        let v = self.recv_until_described(&format!("sent or error for {id}"), |v| {
            (v["t"] == "sent" || v["t"] == "error") && v["id"] == id
        });
        assert_eq!(v["t"], "sent", "[{}] send {id} got {v}", self.label);
        assert!(
            v["msg"].is_string(),
            "[{}] sent.msg is not a string: {v}",
            self.label
        );
        v
    }

    /// Waits for the `sent` of an already written `send` with client id `id`; panics on an
    /// `error` for it.
    pub fn send_and_wait_sent_only(&mut self, id: &str) -> Value {
        let v = self.recv_until_described(&format!("sent or error for {id}"), |v| {
            (v["t"] == "sent" || v["t"] == "error") && v["id"] == id
        });
        assert_eq!(v["t"], "sent", "[{}] send {id} got {v}", self.label);
        v
    }

    pub fn ack(&mut self, seq: u64) {
        self.send_json(json!({"t": "ack", "seq": seq}));
    }

    /// Sends `n` messages `{prefix}{i}` (ids `{prefix}{i}`, bodies `{prefix}{i}`) with at most
    /// `window` unanswered at once; returns the `sent` frames in order of i. Other frames stay in
    /// the backlog.
    pub fn send_many(&mut self, to: &str, prefix: &str, n: usize, window: usize) -> Vec<Value> {
        let mut sents: Vec<Option<Value>> = vec![None; n];
        let mut next = 0usize;
        let mut done = 0usize;
        while done < n {
            while next < n && next - done < window {
                let id = format!("{prefix}{next}");
                self.write_json(json!({"t": "send", "id": id, "to": to, "body": id}))
                    .unwrap_or_else(|e| panic!("[{}] write send: {e}", self.label));
                next += 1;
            }
            self.flush()
                .unwrap_or_else(|e| panic!("[{}] flush: {e}", self.label));
            let prefix_owned = prefix.to_string();
            let v = self.recv_until_described("sent or error", move |v| {
                (v["t"] == "sent" || v["t"] == "error")
                    && v["id"]
                        .as_str()
                        .is_some_and(|s| s.starts_with(prefix_owned.as_str()))
            });
            assert_eq!(v["t"], "sent", "[{}] send failed: {v}", self.label);
            let i: usize = v["id"].as_str().unwrap()[prefix.len()..]
                .parse()
                .unwrap_or_else(|_| panic!("unexpected sent id {v}"));
            assert!(
                i < n && sents[i].is_none(),
                "[{}] unexpected or repeated sent {v}",
                self.label
            );
            sents[i] = Some(v);
            done += 1;
        }
        sents.into_iter().map(|s| s.expect("all sent")).collect()
    }

    /// Sends a close frame and waits (bounded) for the server to finish the close handshake.
    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.read_socket(deadline) {
                Ok(_) => continue,
                Err(_) => return,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Requests and state-sync helpers
// ---------------------------------------------------------------------------------------------

impl Client {
    /// Dev-mode connection that has read its `hello`.
    pub fn online(addr: SocketAddr, user: &str, device: &str) -> Client {
        let mut c = Client::dev(addr, user, device);
        c.hello();
        c
    }

    /// Next `ev` (backlog first) matching `pred`.
    pub fn next_ev(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.recv_until_described(what, move |v| v["t"] == "ev" && pred(v))
    }

    /// Next `ev` of `kind` (backlog first).
    pub fn next_kind(&mut self, kind: &str) -> Value {
        let k = kind.to_string();
        self.next_ev(&format!("a {kind} event"), move |v| v["kind"] == k.as_str())
    }

    /// Waits for this device's own `linked` event; returns its seq.
    pub fn own_linked_seq(&mut self) -> u64 {
        let device = self
            .hello_frame()
            .map(|h| h["device"].as_str().unwrap_or("").to_string())
            .expect("own_linked_seq before hello");
        let ev = self.next_ev("own linked event", move |v| {
            v["kind"] == "device" && v["op"] == "linked" && v["device"] == device.as_str()
        });
        seq_of(&ev)
    }

    /// Sends `frame` and returns the first answer of type `reply_t` or an `error` (backlog first).
    /// When the frame has an `id`, only an error carrying that id counts.
    pub fn request(&mut self, frame: Value, reply_t: &str) -> Value {
        let id = frame["id"].as_str().map(str::to_string);
        let reply_t = reply_t.to_string();
        let what = format!("{reply_t} or error answering {frame}");
        self.send_json(frame);
        self.recv_until_described(&what, move |v| {
            v["t"] == reply_t.as_str()
                || (v["t"] == "error" && id.as_deref().is_none_or(|id| v["id"] == id))
        })
    }

    /// Sends `frame` (which must carry an `id`) and waits for the `error` with that id; asserts
    /// its code and returns it.
    pub fn expect_error(&mut self, frame: Value, code: &str) -> Value {
        let id = frame["id"]
            .as_str()
            .unwrap_or_else(|| panic!("expect_error needs a frame with an id: {frame}"))
            .to_string();
        let what = format!("error {code} for {frame}");
        self.send_json(frame);
        let err = self.recv_until_described(&what, |v| v["t"] == "error" && v["id"] == id.as_str());
        assert_eq!(err["code"], code, "[{}] wrong error: {err}", self.label);
        err
    }

    /// `devices` → the list.
    pub fn devices(&mut self) -> Vec<Value> {
        // The id keeps errors answering other frames (which carry no or other ids) apart.
        let v = self.request(
            serde_json::json!({"t": "devices", "id": "devices-request"}),
            "devices",
        );
        assert_eq!(v["t"], "devices", "[{}] devices got {v}", self.label);
        v["list"]
            .as_array()
            .unwrap_or_else(|| panic!("[{}] devices without a list: {v}", self.label))
            .clone()
    }

    /// A round trip through the user's owner after everything this connection sent before it
    /// (a `devices` request): frames sent earlier on this connection have been handled.
    pub fn sync_point(&mut self) {
        self.devices();
    }

    /// `dev_clock` (server started with `--dev-clock`): moves the server clock; returns `now`.
    pub fn advance_clock(&mut self, ms: u64) -> u64 {
        let v = self.request(
            serde_json::json!({"t": "dev_clock", "id": "dev-clock-request", "advance_ms": ms}),
            "dev_clock",
        );
        assert_eq!(v["t"], "dev_clock", "[{}] dev_clock got {v}", self.label);
        u64_of(&v, "now")
    }

    /// `history` → the `msgs` of the page.
    pub fn history(&mut self, chat: &str, before: Option<&str>, limit: Option<u64>) -> Vec<Value> {
        let mut frame = serde_json::json!({"t": "history", "id": "history-request", "chat": chat});
        if let Some(before) = before {
            frame["before"] = before.into();
        }
        if let Some(limit) = limit {
            frame["limit"] = limit.into();
        }
        let v = self.request(frame.clone(), "history");
        assert_eq!(v["t"], "history", "[{}] {frame} got {v}", self.label);
        assert_eq!(
            v["chat"], chat,
            "[{}] history of another chat: {v}",
            self.label
        );
        v["msgs"]
            .as_array()
            .unwrap_or_else(|| panic!("[{}] history without msgs: {v}", self.label))
            .clone()
    }

    /// Note-to-self round trip: sends a message to the own user and waits for its `msg` event
    /// on this device; returns the event. Everything the log had before it was delivered first.
    pub fn note_to_self(&mut self, id: &str) -> Value {
        let user = self
            .hello_frame()
            .map(|h| h["user"].as_str().unwrap_or("").to_string())
            .expect("note_to_self before hello");
        let sent = self.send_and_wait(id, &user, id);
        let msg = sent["msg"].clone();
        self.next_ev(&format!("own note {id}"), move |v| {
            v["kind"] == "msg" && v["msg"] == msg
        })
    }

    /// Every frame buffered so far (not consumed), then clears the backlog.
    pub fn drain_backlog(&mut self) -> Vec<Value> {
        self.backlog.drain(..).collect()
    }
}

/// A short, comparable description of a log event (without seq, ts and chat), e.g.
/// `msg 1784.. alice hi`, `receipt delivered bob 1784..`, `group added [carol] by alice`.
pub fn token(v: &Value) -> String {
    let s = |f: &str| v[f].as_str().unwrap_or("?").to_string();
    match v["kind"].as_str().unwrap_or("?") {
        "msg" => format!("msg {} {} {}", s("msg"), s("from"), s("body")),
        "receipt" => format!("receipt {} {} {}", s("status"), s("by"), s("up_to")),
        "read" => format!("read {}", s("up_to")),
        "edit" => format!("edit {} {}", s("msg"), s("body")),
        "delete" => format!("delete {} {}", s("msg"), s("scope")),
        "group" => {
            let members: Vec<&str> = v["members"]
                .as_array()
                .map(|a| a.iter().map(|m| m.as_str().unwrap_or("?")).collect())
                .unwrap_or_default();
            format!("group {} [{}] by {}", s("op"), members.join(","), s("by"))
        }
        "device" => format!("device {} {}", s("op"), s("device")),
        other => format!("{other} {v}"),
    }
}

/// The message id as a number (ids compare numerically).
pub fn msg_num(v: &Value, field: &str) -> u64 {
    str_of(v, field)
        .parse()
        .unwrap_or_else(|_| panic!("{field} is not a decimal u64 in {v}"))
}

/// Raises this process's open-file soft limit to its hard limit (children inherit it), for tests
/// holding many sockets. Returns the new soft limit.
pub fn raise_fd_limit() -> libc::rlim_t {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            let _ = libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    limit.rlim_cur
}

/// A masked client frame with FIN set.
pub fn raw_client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 14);
    frame.push(0x80 | (opcode & 0x0f));
    let len = payload.len();
    if len < 126 {
        frame.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        frame.push(0x80 | 127);
        frame.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Reads an HTTP status from a connection attempt that must have been refused.
pub fn expect_refused(result: Result<Client, ConnectError>) -> u16 {
    match result {
        Ok(mut c) => {
            let first = c.try_recv_json(Duration::from_secs(2));
            panic!("connection was accepted, expected an HTTP refusal; first frame: {first:?}")
        }
        Err(ConnectError::Http(status)) => status,
        Err(ConnectError::Other(e)) => panic!("expected an HTTP refusal, got: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Event helpers
// ---------------------------------------------------------------------------------------------

pub fn is_msg(v: &Value) -> bool {
    v["t"] == "ev" && v["kind"] == "msg"
}

pub fn seq_of(v: &Value) -> u64 {
    v["seq"].as_u64().unwrap_or_else(|| panic!("no seq in {v}"))
}

pub fn str_of<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("no string field {field} in {v}"))
}

pub fn u64_of(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no u64 field {field} in {v}"))
}

/// The msg events of a list, in order.
pub fn msgs(events: &[Value]) -> Vec<&Value> {
    events.iter().filter(|v| is_msg(v)).collect()
}

/// Bodies of the msg events, in order.
pub fn bodies(events: &[Value]) -> Vec<String> {
    msgs(events)
        .iter()
        .map(|v| str_of(v, "body").to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// An HS256 JWT over arbitrary claims.
pub fn mint_claims(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).expect("HMAC key"),
    )
    .expect("encode JWT")
}

/// An HS256 JWT for `sub`/`dev`, expiring `exp_in_secs` from now (negative: already expired).
pub fn mint_token(secret: &str, sub: &str, dev: &str, exp_in_secs: i64) -> String {
    mint_claims(
        secret,
        &json!({"sub": sub, "dev": dev, "exp": now_secs() + exp_in_secs}),
    )
}

/// An unsigned `alg: none` token.
pub fn alg_none_token(claims: &Value) -> String {
    let header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = base64url(claims.to_string().as_bytes());
    format!("{header}.{payload}.")
}

/// Unpadded base64url.
pub fn base64url(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize] as char);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Misc
// ---------------------------------------------------------------------------------------------

/// A small deterministic PRNG (splitmix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Seeded from the clock; the caller prints the seed.
    pub fn from_time() -> (Rng, u64) {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_nanos() as u64;
        (Rng(seed), seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// Reads everything a fresh device sees: connects `user`/`device`, reads hello, and every event
/// up to hello's head. Returns (hello, events). The device must be new (or never have acked).
pub fn read_whole_log(addr: SocketAddr, user: &str, device: &str) -> (Value, Vec<Value>) {
    let mut c = Client::dev(addr, user, device);
    let hello = c.hello();
    assert_eq!(
        hello["cursor"], 0,
        "[{user}/{device}] expected a device with cursor 0: {hello}"
    );
    let head = u64_of(&hello, "head");
    let events = c.collect_events_until_seq(head);
    assert_eq!(
        events.len() as u64,
        head,
        "[{user}/{device}] log 1..={head} incomplete"
    );
    c.close();
    (hello, events)
}
