//! Starting the servers under test as child processes on loopback, and stopping them again.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the server under test runs and how to reach it.
#[derive(Clone, Debug, clap::Args)]
pub struct ServerArgs {
    /// URL of a running server (`ws://127.0.0.1:PORT`). Without it the bench starts its own
    /// server on a free loopback port and stops it (and removes its data dir) at the end.
    #[arg(long)]
    pub url: Option<String>,
    /// PID of the server behind `--url`, for memory and CPU readings.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Courier binary used when the bench starts the server itself.
    #[arg(long, default_value = "target/release/courier")]
    pub server_bin: String,
    /// `--shards` for a server the bench starts.
    #[arg(long)]
    pub shards: Option<usize>,
    /// Pin a server the bench starts to these CPUs (`taskset -c`), e.g. `0`.
    #[arg(long)]
    pub server_cpus: Option<String>,
    /// `--durability` for a server the bench starts (`fsync` or `process-crash`).
    #[arg(long, default_value = "fsync")]
    pub durability: String,
}

/// A server under test: its address and pid, and the child process if the bench started it.
pub struct Server {
    pub url: String,
    pub pid: Option<u32>,
    child: Option<Child>,
    data_dir: Option<PathBuf>,
    pub label: String,
    /// How long a stopping server may take before it is killed (ejabberd closes every session
    /// on the way out).
    stop_grace: Duration,
}

impl Server {
    /// Starts (or names) the Courier server; a start that does not print `listening on` within
    /// 30 s is killed and tried again, up to three times.
    pub fn courier(a: &ServerArgs) -> Result<Server, String> {
        let mut last = String::new();
        for attempt in 1..=3 {
            match Self::courier_once(a) {
                Ok(s) => return Ok(s),
                Err(e) => {
                    eprintln!("[server] start attempt {attempt} failed: {e}");
                    last = e;
                }
            }
        }
        Err(last)
    }

    fn courier_once(a: &ServerArgs) -> Result<Server, String> {
        if let Some(url) = &a.url {
            return Ok(Server {
                url: url.trim_end_matches('/').to_string(),
                pid: a.server_pid,
                child: None,
                data_dir: None,
                label: "courier (external)".into(),
                stop_grace: Duration::from_secs(15),
            });
        }
        let dir =
            std::env::temp_dir().join(format!("courier-bench-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("data dir: {e}"))?;
        let mut args: Vec<String> = vec![
            a.server_bin.clone(),
            "serve".into(),
            "--dev".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--durability".into(),
            a.durability.clone(),
        ];
        if let Some(s) = a.shards {
            args.push("--shards".into());
            args.push(s.to_string());
        }
        let mut label = format!(
            "courier shards={} {}",
            a.shards.map(|s| s.to_string()).unwrap_or("auto".into()),
            a.durability
        );
        if let Some(c) = &a.server_cpus {
            args.splice(0..0, ["taskset".to_string(), "-c".into(), c.clone()]);
            label.push_str(&format!(" cpus={c}"));
        }
        let mut child = Command::new(&args[0])
            .args(&args[1..])
            .env("MIMALLOC_ALLOW_THP", "0")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", args[0]))?;
        let pid = child.id();
        let addr = match read_listening(&mut child) {
            Ok(a) => a,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        Ok(Server {
            url: format!("ws://{addr}"),
            pid: Some(pid),
            child: Some(child),
            data_dir: Some(dir),
            label,
            stop_grace: Duration::from_secs(15),
        })
    }

    /// Starts Debian's nats-server with a WebSocket listener on a free loopback port.
    pub fn nats(bin: &str, cpus: Option<&str>) -> Result<Server, String> {
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!(
            "courier-bench-nats-{}-{}",
            std::process::id(),
            unique()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("nats dir: {e}"))?;
        let conf = dir.join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:-1\nmax_connections: 100000\nmax_pending: 67108864\n\
                 websocket {{\n  listen: \"127.0.0.1:{port}\"\n  no_tls: true\n  compression: false\n}}\n"
            ),
        )
        .map_err(|e| format!("nats conf: {e}"))?;
        let mut args: Vec<String> = vec![bin.into(), "-c".into(), conf.display().to_string()];
        let mut label = "nats-server".to_string();
        if let Some(c) = cpus {
            args.splice(0..0, ["taskset".to_string(), "-c".into(), c.into()]);
            label.push_str(&format!(" cpus={c}"));
        }
        let mut child = Command::new(&args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {bin}: {e}"))?;
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_dir_all(&dir);
                return Err("nats-server did not listen within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Server {
            url: format!("ws://127.0.0.1:{port}"),
            pid: Some(pid),
            child: Some(child),
            data_dir: Some(dir),
            label,
            stop_grace: Duration::from_secs(15),
        })
    }

    /// A server the bench did not start (`--url`, `--server-pid`), of any target.
    pub fn external(a: &ServerArgs, what: &str) -> Server {
        Server {
            url: a
                .url
                .as_deref()
                .unwrap_or("")
                .trim_end_matches('/')
                .to_string(),
            pid: a.server_pid,
            child: None,
            data_dir: None,
            label: format!("{what} (external)"),
            stop_grace: Duration::from_secs(15),
        }
    }

    /// Runs bench/peers/ejabberd.sh (compiled in, so the bench needs no checkout to find it)
    /// with `--no-install`: a benchmark never installs packages, it reports that the peer is
    /// missing. The script prints the pid of the VM (beam.smp, the process /proc is read
    /// from), the version, then `listening on`; SIGTERM to the script stops the VM cleanly
    /// and removes its private config and spool.
    pub fn ejabberd(cpus: Option<&str>) -> Result<Server, String> {
        if !ejabberd_installed() {
            return Err(
                "ejabberd is not installed (run bench/peers/ejabberd.sh as root to install it)"
                    .into(),
            );
        }
        let port = free_port()?;
        let mut child = Command::new("bash")
            .args([
                "-c",
                EJABBERD_SH,
                "ejabberd.sh",
                "--no-install",
                &port.to_string(),
            ])
            .args(cpus)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting bench/peers/ejabberd.sh: {e}"))?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut pid, mut version) = (None, String::from("ejabberd"));
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.starts_with("listening on ") => break,
                Ok(l) => {
                    if let Some(p) = l.strip_prefix("pid ") {
                        pid = p.trim().parse::<u32>().ok();
                    } else if l.starts_with("ejabberd-") {
                        version = l.split_whitespace().next().unwrap_or("ejabberd").into();
                    }
                }
                Err(_) => {
                    // Exited (its stderr says why) or too slow: stop whatever is left of it.
                    stop_child(&mut child, pid, Duration::from_secs(20));
                    return Err("ejabberd did not start (see its output above)".into());
                }
            }
        }
        // The VM keeps a core busy for several seconds after its listener opens (loading
        // modules and mnesia tables); a measurement started then would charge that to the
        // workload. Wait (bounded) until it uses < 10 % of a core over half a second.
        if let Some(p) = pid {
            let t = Instant::now();
            let mut prev = crate::procfs::cpu_seconds(p).unwrap_or(0.0);
            while t.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(500));
                let now = crate::procfs::cpu_seconds(p).unwrap_or(0.0);
                if now - prev < 0.05 {
                    break;
                }
                prev = now;
            }
            eprintln!(
                "[server] ejabberd idle {:.1}s after listening",
                t.elapsed().as_secs_f64()
            );
        }
        let mut label = version;
        if let Some(c) = cpus {
            label.push_str(&format!(" cpus={c}"));
        }
        Ok(Server {
            url: format!("ws://127.0.0.1:{port}"),
            pid,
            child: Some(child),
            data_dir: None,
            label,
            stop_grace: Duration::from_secs(20),
        })
    }

    /// The pid to read /proc from: a `taskset` wrapper execs the server, so the pid is the same.
    pub fn proc_pid(&self) -> Option<u32> {
        self.pid
    }
}

fn unique() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    t ^ ((N.fetch_add(1, Ordering::Relaxed) as u128) << 64)
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn read_listening(child: &mut Child) -> Result<String, String> {
    let out = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut line = String::new();
        let mut sent = false;
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if !sent && let Some(a) = line.trim().strip_prefix("listening on ") {
                        let _ = tx.send(a.to_string());
                        sent = true;
                    }
                }
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .map_err(|_| "server did not print `listening on` within 30 s".to_string())
}

/// bench/peers/ejabberd.sh, run by `Server::ejabberd`.
const EJABBERD_SH: &str = include_str!("../peers/ejabberd.sh");

/// What the script looks for: Debian's Erlang and ejabberd's code under /usr/lib/<arch>/.
pub fn ejabberd_installed() -> bool {
    std::path::Path::new("/usr/bin/erl").exists()
        && std::fs::read_dir("/usr/lib")
            .map(|d| {
                d.flatten().any(|arch| {
                    std::fs::read_dir(arch.path())
                        .map(|l| {
                            l.flatten()
                                .any(|e| e.file_name().to_string_lossy().starts_with("ejabberd-"))
                        })
                        .unwrap_or(false)
                })
            })
            .unwrap_or(false)
}

/// SIGTERM, then SIGKILL after `grace`. `also` is a process the child started that must not
/// outlive it (ejabberd's VM, should its script be killed before it could stop the VM).
fn stop_child(c: &mut Child, also: Option<u32>, grace: Duration) {
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    loop {
        match c.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = c.kill();
                let _ = c.wait();
                if let Some(p) = also {
                    unsafe { libc::kill(p as i32, libc::SIGKILL) };
                }
                break;
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Only a child whose pid differs from the server's (ejabberd's script) has a second
            // process to clean up; for a `taskset`-exec'd server they are the same process.
            let also = self.pid.filter(|&p| p != c.id());
            stop_child(&mut c, also, self.stop_grace);
        }
        if let Some(d) = self.data_dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
