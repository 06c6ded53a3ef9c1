//! One client connection: WebSocket upgrade, credentials, replay, live events, client frames.
//!
//! Owns: the only use of tungstenite in the server (upgrade with credential check inside the
//! handshake, bounded buffers, frame limits, close codes), the per-connection delivery rule (on
//! one connection events go out with contiguous seq, no gap and no duplicate: anything missing
//! is read from the owner's log), and turning client frames into routed shard messages.
//!
//! Must not: hold user state (the owner has it) or decide anything an owner decides; keep a
//! buffer per idle socket; block on a slow socket without a bound (writes time out).
//!
//! Memory of an idle connection: tungstenite and glommio's stream are used only for the
//! upgrade. After it the connection keeps its raw socket, registered edge-triggered in one
//! epoll set per shard (whose poller task marks `ConnShared::readiness` and wakes the
//! connection), and frames WebSocket itself: no read buffer, write buffer, armed io_uring
//! source or waker proxy exists while a socket is quiet.

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::pin;
use std::rc::{Rc, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{Either, select};
use futures_util::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::timer::Timer;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::protocol::WebSocketConfig;

use crate::auth::Credentials;
use crate::ids::{ChatId, ConnId, MsgId, Seq};
use crate::metrics::ShardMetrics;
use crate::protocol::{
    ClientFrame, ErrorCode, FrameError, decode_client_frame, encode_hello, encode_history,
    rewrite_edited,
};
use crate::router::{ConnItem, ShardMsg};
use crate::shard::{ConnShared, Shard};
use crate::storage::{MsgChange, StoreError};

/// Read buffer of the upgrade (tungstenite's default, 128 KiB, would be resident per socket).
/// The buffer lives only while the handshake runs.
const HANDSHAKE_READ_BUFFER_BYTES: usize = 512;
/// Bytes asked of the socket per read once upgraded; the buffer exists only while a frame is
/// incomplete or being handled, never while the socket is quiet.
const READ_CHUNK_BYTES: usize = 4096;
/// Frames are written through as soon as this much is buffered; the rest is flushed once per
/// drained batch of outbound items (several frames per syscall under load). The buffer is
/// freed after each flush.
const WRITE_BUFFER_BYTES: usize = 8192;
/// `ConnShared::readiness` bit: the socket may have bytes (or EOF) to read.
pub const READABLE: u8 = 1;
/// `ConnShared::readiness` bit: the socket may accept bytes.
pub const WRITABLE: u8 = 2;
/// Readiness events taken from the shard's epoll set per `epoll_wait`.
const READINESS_EVENTS_MAX: usize = 256;
/// How long the owner may take to answer `Attach` before the connection gives up (1011).
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a close handshake may take before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A socket that accepts no bytes for this long is dropped (a reader that stopped reading).
/// Most index pages one `history` request reads (pages of `limit` entries).
const HISTORY_PAGES_MAX: usize = 8;
/// Most outbound items written before checking the socket for inbound frames again.
const DRAIN_ITEMS_MAX: usize = 256;

/// Runs `f` with a deadline; `None` when the deadline passed first.
pub async fn with_timeout<T>(limit: Duration, f: impl Future<Output = T>) -> Option<T> {
    match select(pin!(f), Timer::new(limit)).await {
        Either::Left((value, _)) => Some(value),
        Either::Right(_) => None,
    }
}

/// How a session ended, for the log and for the close frame.
#[derive(Debug)]
enum End {
    /// Send this close frame, then finish the close handshake.
    Close(u16, String),
    /// The peer closed or the socket failed: nothing more to send.
    Gone,
}

/// Serves one accepted TCP connection to its end.
pub async fn serve(shard: Rc<Shard>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    let accepted = Instant::now();
    match Box::pin(plain_http(&shard, &stream)).await {
        Err(()) => return,
        Ok(Some(answer)) => {
            Box::pin(serve_asset(stream, answer)).await;
            return;
        }
        Ok(None) => {}
    }
    let Some((fd, creds)) = Box::pin(handshake(&shard, stream, accepted)).await else {
        return;
    };
    ShardMetrics::count(&shard.metrics.handshakes_total);
    let Some(conn) = shard.register_conn(creds.user.clone(), creds.device.clone()) else {
        tracing::warn!(?peer, "connection limit of this shard reached");
        Box::pin(close(
            fd,
            Vec::new(),
            1013,
            "server at its connection limit",
            shard.config.max_frame_bytes,
        ))
        .await;
        return;
    };
    if let Err(error) = watch(&shard, &fd, conn.id) {
        tracing::error!(%error, "cannot watch the socket for readiness");
        shard.unregister_conn(&conn, false);
        return;
    }
    conn.readiness.set(READABLE | WRITABLE);
    tracing::info!(?peer, user = %creds.user, device = %creds.device, shard = shard.id.0, "connected");
    let session = Session {
        shard,
        conn,
        socket: Socket::new(fd),
        next: Seq(1),
        attached: false,
    };
    // The session gets a task of its own: this one's state (the glommio stream it was handed,
    // which an async fn keeps for its whole life) is freed instead of idling with the socket.
    glommio::spawn_local(live(session, creds, peer)).detach();
}

/// Runs an upgraded, registered connection to its end. Its future is what an idle connection
/// costs, so everything but the wait is boxed.
async fn live(mut session: Session, creds: Credentials, peer: Option<std::net::SocketAddr>) {
    let end = session.run().await;
    let Session {
        shard,
        conn,
        socket,
        attached,
        ..
    } = session;
    shard.unregister_conn(&conn, attached);
    let code = match end {
        End::Close(code, reason) => {
            if code == 4009 {
                ShardMetrics::count(&shard.metrics.slow_consumer_closes_total);
            }
            let max_bytes = shard.config.max_frame_bytes;
            Box::pin(close(socket.fd, socket.outbound, code, &reason, max_bytes)).await;
            Some(code)
        }
        End::Gone => None,
    };
    tracing::info!(?peer, user = %creds.user, device = %creds.device, close = ?code, "disconnected");
}

/// Longest request head read for a static file.
const STATIC_REQUEST_MAX_BYTES: usize = 8192;

/// An answer to a plain HTTP request: (status line, content type, body).
type PlainAnswer = (&'static str, &'static str, &'static str);

const NOT_FOUND: PlainAnswer = (
    "404 Not Found",
    "text/plain",
    "not found: the WebSocket endpoint is /v1/ws\n",
);

/// Answers GET requests that are not for the WebSocket endpoint: an embedded file, or 404.
/// Peeks at the request line without consuming it, so the WebSocket handshake sees the request
/// intact otherwise.
/// `Err`: nothing arrived within the handshake timeout (or the socket failed): drop it.
async fn plain_http(shard: &Shard, stream: &TcpStream) -> Result<Option<PlainAnswer>, ()> {
    let mut head = [0u8; 256];
    let peeked = with_timeout(shard.config.handshake_timeout, stream.peek(&mut head))
        .await
        .ok_or(())?
        .map_err(|_| ())?;
    Ok(route_plain(&head[..peeked]))
}

/// Which plain answer a request line asks for; `None` for the WebSocket endpoint (or anything
/// that is not a GET, which the WebSocket handshake then refuses).
fn route_plain(head: &[u8]) -> Option<PlainAnswer> {
    let line = head.strip_prefix(b"GET ")?;
    let end = line.iter().position(|b| *b == b' ' || *b == b'?')?;
    let path = std::str::from_utf8(&line[..end]).ok()?;
    if path == "/v1/ws" {
        return None;
    }
    Some(
        crate::web::CLIENT_ASSETS
            .iter()
            .find(|(p, _, _)| *p == path)
            .map_or(NOT_FOUND, |(_, content_type, body)| {
                ("200 OK", *content_type, *body)
            }),
    )
}

/// Answers a plain HTTP request and closes the connection.
async fn serve_asset(mut stream: TcpStream, answer: PlainAnswer) {
    use futures_util::AsyncWriteExt;
    let (status, content_type, body) = answer;
    // Consume the request head (bounded) so closing does not reset the connection.
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < STATIC_REQUEST_MAX_BYTES {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
        true
    };
    if with_timeout(CLOSE_TIMEOUT, read_head).await != Some(true) {
        return;
    }
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.flush().await
    };
    let _ = with_timeout(CLOSE_TIMEOUT, write).await;
}

/// Upgrades the connection, checking credentials inside the handshake (401 before upgrade).
/// The whole upgrade, peek included, must finish within `handshake_timeout` of `accepted`
/// (a slowloris client trickling its headers is cut off there). Returns the upgraded socket
/// without tungstenite's or glommio's per-stream state: a client sends no frame before it has
/// the server's answer (RFC 6455 4.1), so nothing read ahead is lost with them.
async fn handshake(
    shard: &Shard,
    stream: TcpStream,
    accepted: Instant,
) -> Option<(OwnedFd, Credentials)> {
    let mut creds = None;
    // The error type is tungstenite's (an HTTP response); its size is not ours to choose.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| {
        if request.uri().path() != "/v1/ws" {
            return Err(http_error(
                404,
                "not found: the WebSocket endpoint is /v1/ws",
            ));
        }
        let authorization = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match shard.verifier.verify(request.uri().query(), authorization) {
            Ok(c) => {
                creds = Some(c);
                Ok(response)
            }
            Err(reason) => {
                ShardMetrics::count(&shard.metrics.auth_failures_total);
                tracing::info!(%reason, "credentials refused");
                Err(http_error(401, "unauthorized"))
            }
        }
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(HANDSHAKE_READ_BUFFER_BYTES)
        .write_buffer_size(0);
    let upgrade = async_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config));
    let left =
        (accepted + shard.config.handshake_timeout).saturating_duration_since(Instant::now());
    match with_timeout(left, upgrade).await {
        Some(Ok(ws)) => {
            // Our own descriptor of the socket; dropping `ws` closes glommio's.
            let fd = duplicate(ws.get_ref().as_raw_fd());
            drop(ws);
            match fd {
                Ok(fd) => creds.map(|c| (fd, c)),
                Err(error) => {
                    tracing::error!(%error, "cannot keep the upgraded socket");
                    None
                }
            }
        }
        Some(Err(e)) => {
            tracing::debug!(error = %e, "handshake failed");
            None
        }
        None => {
            tracing::debug!("handshake timed out");
            None
        }
    }
}

fn http_error(status: u16, body: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(body.to_owned()));
    *response.status_mut() = tungstenite::http::StatusCode::from_u16(status)
        .unwrap_or(tungstenite::http::StatusCode::UNAUTHORIZED);
    response
}

/// A descriptor of the same socket, close-on-exec.
fn duplicate(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) returns a new descriptor that we then own alone.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// Sends `pending` frames and a close frame, then waits (bounded) for the peer to finish the
/// close handshake, so the close frame is not lost to a reset. Runs on a glommio stream that
/// takes the descriptor over (no second one: a shard near the descriptor limit closing many
/// connections at once must not need one more each); the connection is out of the shard's map
/// by then, so readiness events for it are ignored. Client frames over `max_bytes` are not
/// gathered: the rest is discarded unframed.
async fn close(fd: OwnedFd, mut pending: Vec<u8>, code: u16, reason: &str, max_bytes: usize) {
    let mut payload = code.to_be_bytes().to_vec();
    // A control frame carries at most 125 bytes; cut the reason on a char boundary.
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode_frame(&mut pending, OPCODE_CLOSE, &payload);
    // SAFETY: `fd` is a socket descriptor owned by nothing else; the stream closes it.
    let mut stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
    let finish = async {
        if stream.write_all(&pending).await.is_err() {
            return;
        }
        // Read until the peer's close or EOF; after a protocol error frames cannot be told
        // apart any more, so discard raw bytes then.
        let mut reader = FrameReader::default();
        let mut framed = true;
        let mut chunk = [0u8; 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) if framed => {
                    reader.inbound.extend_from_slice(&chunk[..n]);
                    loop {
                        match reader.next(max_bytes) {
                            Ok(Some(Inbound::Close(_))) => return,
                            Ok(Some(_)) => continue,
                            Ok(None) => break,
                            Err(_) => {
                                framed = false;
                                break;
                            }
                        }
                    }
                }
                Ok(_) => {}
            }
        }
    };
    let _ = with_timeout(CLOSE_TIMEOUT, finish).await;
}

// -------------------------------------------------------------------------------------------
// Readiness: one epoll set per shard.

/// The shard's epoll set, and the shard whose connections it reports on.
struct Readiness {
    shard: Weak<Shard>,
    epoll: OwnedFd,
}

thread_local! {
    /// This thread's readiness set (a shard thread serves one shard; a new shard on the same
    /// thread gets a new set).
    static READINESS: RefCell<Option<Rc<Readiness>>> = const { RefCell::new(None) };
}

/// Registers an upgraded socket in the shard's epoll set (edge-triggered, both directions),
/// tagged with its connection id. Creates the set and its poller on first use.
fn watch(shard: &Rc<Shard>, fd: &OwnedFd, conn: ConnId) -> io::Result<()> {
    let readiness = READINESS.with(|slot| -> io::Result<Rc<Readiness>> {
        let mut slot = slot.borrow_mut();
        if let Some(existing) = &*slot
            && std::ptr::eq(existing.shard.as_ptr(), Rc::as_ptr(shard))
        {
            return Ok(existing.clone());
        }
        // SAFETY: plain syscall; the descriptor it returns is owned here.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(io::Error::last_os_error());
        }
        let readiness = Rc::new(Readiness {
            shard: Rc::downgrade(shard),
            epoll: unsafe { OwnedFd::from_raw_fd(epoll) },
        });
        glommio::spawn_local(poll_readiness(readiness.clone())).detach();
        *slot = Some(readiness.clone());
        Ok(readiness)
    })?;
    let mut event = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
        u64: conn.0,
    };
    // SAFETY: both descriptors are open; `event` outlives the call.
    let added = unsafe {
        libc::epoll_ctl(
            readiness.epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            fd.as_raw_fd(),
            &mut event,
        )
    };
    if added < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The shard's readiness poller: waits (through io_uring) until the epoll set has events, then
/// marks each connection's readiness and wakes it. One task per shard; it ends with the shard.
async fn poll_readiness(readiness: Rc<Readiness>) {
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; READINESS_EVENTS_MAX];
    loop {
        if let Err(error) = epoll_ready(readiness.epoll.as_raw_fd()).await {
            tracing::error!(%error, "waiting on the readiness set failed");
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        let Some(shard) = readiness.shard.upgrade() else {
            return;
        };
        loop {
            // SAFETY: `events` has room for READINESS_EVENTS_MAX entries; timeout 0 never blocks.
            let n = unsafe {
                libc::epoll_wait(
                    readiness.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    READINESS_EVENTS_MAX as i32,
                    0,
                )
            };
            if n <= 0 {
                break;
            }
            mark_ready(&shard, &events[..n as usize]);
            if (n as usize) < READINESS_EVENTS_MAX {
                break;
            }
            glommio::yield_if_needed().await;
        }
    }
}

/// Marks each reported connection's readiness and wakes it.
fn mark_ready(shard: &Shard, events: &[libc::epoll_event]) {
    let conns = shard.conns.borrow();
    for event in events {
        // A connection that is gone (ids are never reused) needs nothing.
        let Some(conn) = conns.get(&ConnId(event.u64)) else {
            continue;
        };
        let flags = event.events as i32;
        let mut ready = 0;
        if flags & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) != 0 {
            ready |= READABLE;
        }
        if flags & (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) != 0 {
            ready |= WRITABLE;
        }
        conn.readiness.set(conn.readiness.get() | ready);
        conn.notify.notify();
    }
}

/// Resolves once the epoll set `epoll` has events. glommio has no public "wait until this
/// descriptor is readable", but its stream arms exactly that (an io_uring poll) when created;
/// reading an epoll descriptor then fails with ENOTSOCK, which is the signal.
async fn epoll_ready(epoll: RawFd) -> io::Result<()> {
    let dup = duplicate(epoll)?;
    // SAFETY: `dup` is owned by nothing else; the stream closes it.
    let mut probe = unsafe { TcpStream::from_raw_fd(dup.into_raw_fd()) };
    let mut byte = [0u8; 1];
    match probe.read(&mut byte).await {
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => Ok(()),
        Err(e) => Err(e),
        Ok(_) => Err(io::Error::other("an epoll descriptor gave bytes")),
    }
}

// -------------------------------------------------------------------------------------------
// WebSocket framing (RFC 6455, server side, no extensions).

const OPCODE_CONTINUATION: u8 = 0x0;
const OPCODE_TEXT: u8 = 0x1;
const OPCODE_BINARY: u8 = 0x2;
const OPCODE_CLOSE: u8 = 0x8;
const OPCODE_PING: u8 = 0x9;
const OPCODE_PONG: u8 = 0xA;

/// Appends one unmasked, final server frame.
fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.reserve(payload.len() + 10);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// A complete message or control frame from the client.
#[derive(Debug, PartialEq)]
enum Inbound {
    Text(Vec<u8>),
    Binary,
    Ping(Vec<u8>),
    Pong,
    /// The peer's close code (two bytes, echoed in the answer), or nothing when it sent none.
    Close(Vec<u8>),
}

/// Client frames not handled yet. Both buffers are empty and unallocated between frames.
#[derive(Default)]
struct FrameReader {
    /// Bytes received and not yet taken as frames.
    inbound: Vec<u8>,
    /// A fragmented data message so far.
    fragments: Vec<u8>,
    /// The opcode of the fragmented message (`OPCODE_CONTINUATION` when there is none).
    fragmented: u8,
}

impl FrameReader {
    /// Takes the next complete message or control frame from `inbound`; `None` when more bytes
    /// are needed. Frames and messages over `max_bytes` end the connection with 1009.
    fn next(&mut self, max_bytes: usize) -> Result<Option<Inbound>, End> {
        loop {
            let buf = &self.inbound;
            if buf.len() < 2 {
                return Ok(None);
            }
            let (fin, rsv, opcode) = (buf[0] & 0x80 != 0, buf[0] & 0x70, buf[0] & 0x0F);
            let (masked, short) = (buf[1] & 0x80 != 0, buf[1] & 0x7F);
            if rsv != 0 {
                return Err(protocol_error("reserved bits are set"));
            }
            if !masked {
                return Err(protocol_error("a client frame is not masked"));
            }
            let (length_bytes, mut length) = match short {
                126 => (2, 0),
                127 => (8, 0),
                n => (0, u64::from(n)),
            };
            let header = 2 + length_bytes + 4;
            if buf.len() < header {
                return Ok(None);
            }
            if length_bytes > 0 {
                length = buf[2..2 + length_bytes]
                    .iter()
                    .fold(0u64, |n, b| (n << 8) | u64::from(*b));
            }
            // RFC 6455 5.2: the most significant bit of a 64-bit length must be 0.
            if length >> 63 != 0 {
                return Err(protocol_error("a 64-bit length with the top bit set"));
            }
            let control = opcode & 0x8 != 0;
            if control && (!fin || length > 125) {
                return Err(protocol_error("a control frame is fragmented or too long"));
            }
            if !matches!(
                opcode,
                OPCODE_CONTINUATION
                    | OPCODE_TEXT
                    | OPCODE_BINARY
                    | OPCODE_CLOSE
                    | OPCODE_PING
                    | OPCODE_PONG
            ) {
                return Err(protocol_error("unknown opcode"));
            }
            let gathered = if control { 0 } else { self.fragments.len() };
            if length > (max_bytes.saturating_sub(gathered)) as u64 {
                return Err(End::Close(
                    1009,
                    format!("frame too large: over {max_bytes} bytes"),
                ));
            }
            // At most `max_bytes` by now; a bound near usize::MAX must not wrap the sum either.
            let Some(total) = usize::try_from(length)
                .ok()
                .and_then(|length| length.checked_add(header))
            else {
                return Err(End::Close(
                    1009,
                    format!("frame too large: over {max_bytes} bytes"),
                ));
            };
            let length = total - header;
            if buf.len() < total {
                // Room for the rest of this frame, asked of the socket in one go.
                self.inbound.reserve(total - buf.len());
                return Ok(None);
            }
            let mask: [u8; 4] = buf[header - 4..header].try_into().expect("four bytes");
            let mut payload: Vec<u8> = buf[header..header + length]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            self.inbound.drain(..header + length);
            if self.inbound.is_empty() {
                self.inbound = Vec::new();
            }
            match opcode {
                OPCODE_CLOSE => {
                    if payload.len() == 1 {
                        return Err(protocol_error("a close frame of one byte"));
                    }
                    if payload.len() >= 2 {
                        if !close_code_allowed(u16::from_be_bytes([payload[0], payload[1]])) {
                            return Err(protocol_error("a close code that may not be sent"));
                        }
                        if std::str::from_utf8(&payload[2..]).is_err() {
                            return Err(End::Close(1007, "close reason is not valid UTF-8".into()));
                        }
                        payload.truncate(2);
                    }
                    return Ok(Some(Inbound::Close(payload)));
                }
                OPCODE_PING => return Ok(Some(Inbound::Ping(payload))),
                OPCODE_PONG => return Ok(Some(Inbound::Pong)),
                OPCODE_CONTINUATION => {
                    if self.fragmented == OPCODE_CONTINUATION {
                        return Err(protocol_error("a continuation without a first fragment"));
                    }
                    self.fragments.append(&mut payload);
                    if !fin {
                        continue;
                    }
                    payload = std::mem::take(&mut self.fragments);
                }
                _ => {
                    if self.fragmented != OPCODE_CONTINUATION {
                        return Err(protocol_error("a new message inside a fragmented one"));
                    }
                    if !fin {
                        self.fragmented = opcode;
                        self.fragments = payload;
                        continue;
                    }
                }
            }
            let kind = if opcode == OPCODE_CONTINUATION {
                std::mem::replace(&mut self.fragmented, OPCODE_CONTINUATION)
            } else {
                opcode
            };
            if kind == OPCODE_BINARY {
                return Ok(Some(Inbound::Binary));
            }
            if std::str::from_utf8(&payload).is_err() {
                return Err(End::Close(1007, "text frame is not valid UTF-8".into()));
            }
            return Ok(Some(Inbound::Text(payload)));
        }
    }
}

/// Whether a peer may send this close code (RFC 6455 7.4: 1004-1006 and 1015 are reserved,
/// 1016-2999 unassigned, 3000-4999 for libraries and applications).
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

fn protocol_error(what: &str) -> End {
    End::Close(1002, format!("protocol error: {what}"))
}

/// An upgraded socket, framed here. Idle, it is a descriptor and empty buffers.
struct Socket {
    fd: OwnedFd,
    reader: FrameReader,
    /// Encoded frames not written yet (freed after each flush).
    outbound: Vec<u8>,
}

impl Socket {
    fn new(fd: OwnedFd) -> Self {
        Socket {
            fd,
            reader: FrameReader::default(),
            outbound: Vec::new(),
        }
    }

    /// Reads what the socket has into the frame reader. `Ok(false)`: it would block (the
    /// readable bit is cleared); `Err(End::Gone)`: EOF or a socket error.
    fn fill(&mut self, conn: &ConnShared) -> Result<bool, End> {
        let inbound = &mut self.reader.inbound;
        inbound.reserve(READ_CHUNK_BYTES);
        let spare = inbound.spare_capacity_mut();
        // SAFETY: recv writes at most `spare.len()` bytes into the spare capacity.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            // SAFETY: the kernel initialised `n` bytes past the length.
            unsafe { inbound.set_len(inbound.len() + n as usize) };
            return Ok(true);
        }
        if inbound.is_empty() {
            *inbound = Vec::new();
        }
        if n == 0 {
            return Err(End::Gone);
        }
        match io::Error::last_os_error().kind() {
            io::ErrorKind::WouldBlock => {
                conn.readiness.set(conn.readiness.get() & !READABLE);
                Ok(false)
            }
            io::ErrorKind::Interrupted => Ok(true),
            _ => Err(End::Gone),
        }
    }

    /// Queues a frame; writes through once `WRITE_BUFFER_BYTES` are queued.
    async fn feed(
        &mut self,
        conn: &ConnShared,
        opcode: u8,
        payload: &[u8],
        limit: Duration,
    ) -> Result<(), ()> {
        encode_frame(&mut self.outbound, opcode, payload);
        if self.outbound.len() >= WRITE_BUFFER_BYTES {
            self.flush(conn, limit).await?;
        }
        Ok(())
    }

    /// Writes every queued byte (at most `WRITE_BUFFER_BYTES` plus one frame), waiting for the
    /// socket when it is full. The whole flush must finish within `limit` (`write_timeout`),
    /// progress or not: the kernel reports a full socket writable again only once a third of
    /// its buffer drained, so a flush that needs longer than `limit` belongs to a reader that
    /// stalled or trickles, and the 4009 close queued behind it would wait as long. Frees the
    /// buffer afterwards.
    async fn flush(&mut self, conn: &ConnShared, limit: Duration) -> Result<(), ()> {
        let mut written = 0;
        let deadline = Instant::now() + limit;
        while written < self.outbound.len() {
            if conn.readiness.get() & WRITABLE == 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                // A wake-up may also be an outbound item; the loop looks at the bit again.
                if left.is_zero() || with_timeout(left, conn.notify.wait()).await.is_none() {
                    return Err(());
                }
                continue;
            }
            let rest = &self.outbound[written..];
            // SAFETY: `rest` is valid for `rest.len()` bytes.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                written += n as usize;
                continue;
            }
            match io::Error::last_os_error().kind() {
                io::ErrorKind::WouldBlock => {
                    conn.readiness.set(conn.readiness.get() & !WRITABLE);
                }
                io::ErrorKind::Interrupted => {}
                _ => return Err(()),
            }
        }
        self.outbound = Vec::new();
        Ok(())
    }
}

/// What woke the session.
enum Wake {
    Outbox,
    Inbound(Inbound),
    End(End),
}

struct Session {
    shard: Rc<Shard>,
    conn: Rc<ConnShared>,
    socket: Socket,
    /// The next seq this connection must send: events below it were sent, none above it yet.
    next: Seq,
    /// The owner registered this device (so it must be told when the connection ends).
    attached: bool,
}

impl Session {
    /// The session's steady state. Only small state lives in this future while a connection
    /// idles: the heavier phases (attach and replay, draining the outbox) are boxed, so their
    /// memory exists only while they run.
    async fn run(&mut self) -> End {
        if let Some(end) = Box::pin(self.start()).await {
            return end;
        }
        loop {
            match self.wait().await {
                Wake::Outbox => {
                    if let Some(end) = Box::pin(self.drain_outbox()).await {
                        return end;
                    }
                }
                Wake::End(end) => return end,
                Wake::Inbound(message) => {
                    self.conn.last_rx.set(Instant::now());
                    self.conn.pinged.set(false);
                    match message {
                        Inbound::Text(text) => self.on_text(&text),
                        Inbound::Binary => self.reply_error(FrameError::new(
                            ErrorCode::BadFrame,
                            "binary frames are not accepted; send JSON text frames",
                        )),
                        Inbound::Close(code) => {
                            // Answer the peer's close echoing its code (best effort, bounded
                            // like any close handshake), then drop the socket.
                            let answer =
                                with_timeout(CLOSE_TIMEOUT, self.answer(OPCODE_CLOSE, &code));
                            let _ = Box::pin(answer).await;
                            return End::Gone;
                        }
                        Inbound::Ping(payload) => {
                            if Box::pin(self.answer(OPCODE_PONG, &payload)).await.is_err() {
                                return End::Gone;
                            }
                        }
                        Inbound::Pong => {}
                    }
                    // A client that keeps its socket full would otherwise keep this loop
                    // going without an await that suspends: let the shard's other tasks run
                    // once glommio's time slice is used up.
                    glommio::yield_if_needed().await;
                }
            }
        }
    }

    /// Attaches to the owner, sends `hello` and replays the backlog. `None`: go live.
    async fn start(&mut self) -> Option<End> {
        let owner = self.shard.owner_of(&self.conn.user);
        self.shard.router.route(
            owner,
            ShardMsg::Attach {
                user: self.conn.user.clone(),
                device: self.conn.device.clone(),
                conn: self.shard.conn_ref(self.conn.id),
            },
        );
        // Until the owner answers, the only items that can arrive are its answer or a close.
        // Inbound frames wait in the socket.
        self.attached = true;
        let (cursor, head, low) = loop {
            let conn = self.conn.clone();
            let waited = with_timeout(ATTACH_TIMEOUT, async {
                loop {
                    if let Some(item) = conn.pop() {
                        return item;
                    }
                    conn.notify.wait().await;
                }
            })
            .await;
            match waited {
                None => return Some(End::Close(1011, "no answer from the user's shard".into())),
                Some(ConnItem::Attached { cursor, head, low }) => break (cursor, head, low),
                Some(ConnItem::Refused { error, close_code }) => {
                    self.attached = false;
                    let reason = error.reason.clone();
                    if self.write_frame(error.encode()).await.is_err() {
                        return Some(End::Gone);
                    }
                    return Some(End::Close(close_code, reason));
                }
                Some(ConnItem::Close { code, reason }) => {
                    return Some(End::Close(code, reason.into()));
                }
                Some(_) => debug_assert!(false, "an event reached a connection before Attached"),
            }
        };
        let hello = encode_hello(
            self.conn.user.as_str(),
            self.conn.device.as_str(),
            cursor,
            head,
            low,
        );
        if self.write_frame(hello).await.is_err() {
            return Some(End::Gone);
        }
        self.next = cursor.next().max(low);
        self.conn.catching_up.set(true);
        let caught_up = self.replay(head).await;
        self.conn.catching_up.set(false);
        if caught_up.is_err() || self.flush().await.is_err() {
            return Some(End::Gone);
        }
        None
    }

    /// Waits for outbound items or an inbound frame. Cancel-safe by construction: the outbox is
    /// a queue that only `pop` drains, and partial frames stay in the frame reader.
    async fn wait(&mut self) -> Wake {
        let conn = self.conn.clone();
        let socket = &mut self.socket;
        let max_bytes = self.shard.config.max_frame_bytes;
        let next = self.next;
        poll_fn(|cx| {
            loop {
                if !conn.is_empty() || conn.dropped_through.get() >= next {
                    return Poll::Ready(Wake::Outbox);
                }
                match socket.reader.next(max_bytes) {
                    Ok(Some(message)) => return Poll::Ready(Wake::Inbound(message)),
                    Err(end) => return Poll::Ready(Wake::End(end)),
                    Ok(None) => {}
                }
                if conn.readiness.get() & READABLE != 0 {
                    match socket.fill(&conn) {
                        Ok(_) => continue,
                        Err(end) => return Poll::Ready(Wake::End(end)),
                    }
                }
                // Pending means the waker is registered; Ready consumed a notification (an
                // outbound item or readiness), so look again.
                if conn.notify.poll_notified(cx.waker()).is_pending() {
                    return Poll::Pending;
                }
            }
        })
        .await
    }

    /// Writes queued items (up to `DRAIN_ITEMS_MAX`), then flushes once.
    async fn drain_outbox(&mut self) -> Option<End> {
        for _ in 0..DRAIN_ITEMS_MAX {
            let Some(item) = self.conn.pop() else {
                break;
            };
            let written = match item {
                ConnItem::Event { seq, record } => self.send_event(seq, record).await,
                ConnItem::Frame(frame) => self.feed(frame).await,
                ConnItem::Close { code, reason } => return Some(End::Close(code, reason.into())),
                ConnItem::Ping => self.feed_frame(OPCODE_PING, &[]).await,
                ConnItem::Refused { close_code, error } => {
                    return Some(End::Close(close_code, error.reason));
                }
                ConnItem::Attached { .. } => Ok(()),
            };
            if written.is_err() {
                return Some(End::Gone);
            }
        }
        // Events dropped while catching up (beyond the outbound bound) are read from the log.
        let dropped = self.conn.dropped_through.get();
        if dropped >= self.next && self.replay(dropped).await.is_err() {
            return Some(End::Gone);
        }
        if self.flush().await.is_err() {
            return Some(End::Gone);
        }
        None
    }

    /// Sends one live event, first filling any gap before it from the log; skips events this
    /// connection already sent (replay and live pushes overlap by design).
    async fn send_event(&mut self, seq: Seq, record: Bytes) -> Result<(), ()> {
        if seq < self.next {
            return Ok(());
        }
        if seq > self.next {
            self.replay(Seq(seq.0 - 1)).await?;
            if seq < self.next {
                return Ok(());
            }
        }
        self.feed(record).await?;
        self.next = seq.next();
        Ok(())
    }

    /// Sends every stored event from `next` through `to`, a page at a time (bounded memory).
    async fn replay(&mut self, to: Seq) -> Result<(), ()> {
        let owner = self.shard.owner_of(&self.conn.user);
        let store = self.shard.stores[owner.0].clone();
        let page = self.shard.config.catchup_page_events;
        while self.next <= to {
            let events = match store.read_log(&self.conn.user, self.next, to, page) {
                Ok(events) => events,
                Err(e) => {
                    tracing::error!(error = %e, "replay read failed");
                    return Err(());
                }
            };
            let Some((last, _)) = events.last() else {
                // Nothing stored in the range: it was pruned. Skip it rather than loop.
                self.next = to.next();
                break;
            };
            let last = *last;
            for (_, record) in events {
                self.feed(record).await?;
            }
            self.next = last.next();
            self.flush().await?;
            glommio::yield_if_needed().await;
        }
        Ok(())
    }

    async fn feed(&mut self, frame: Bytes) -> Result<(), ()> {
        ShardMetrics::count(&self.shard.metrics.frames_out_total);
        if std::str::from_utf8(&frame).is_err() {
            tracing::error!("refusing to send a frame that is not UTF-8");
            return Err(());
        }
        self.feed_frame(OPCODE_TEXT, &frame).await
    }

    /// Queues one frame of any kind (written through once the buffer is full).
    async fn feed_frame(&mut self, opcode: u8, payload: &[u8]) -> Result<(), ()> {
        let limit = self.shard.config.write_timeout;
        self.socket.feed(&self.conn, opcode, payload, limit).await
    }

    /// Writes everything queued, within `write_timeout`.
    async fn flush(&mut self) -> Result<(), ()> {
        self.socket
            .flush(&self.conn, self.shard.config.write_timeout)
            .await
    }

    /// Writes a control frame now.
    async fn answer(&mut self, opcode: u8, payload: &[u8]) -> Result<(), ()> {
        self.feed_frame(opcode, payload).await?;
        self.flush().await
    }

    async fn write_frame(&mut self, frame: Bytes) -> Result<(), ()> {
        self.feed(frame).await?;
        self.flush().await
    }

    fn reply_error(&self, error: FrameError) {
        self.shard.metrics.error(error.code);
        self.conn.push(ConnItem::Frame(error.encode()), usize::MAX);
    }

    /// Decodes a client frame and routes it to the user's owner.
    fn on_text(&self, text: &[u8]) {
        let shard = &self.shard;
        let decoded = match decode_client_frame(text, shard.config.max_body_bytes) {
            Ok(decoded) => decoded,
            Err(error) => {
                shard.metrics.frame_in("invalid");
                return self.reply_error(error);
            }
        };
        shard.metrics.frame_in(decoded.frame.type_name());
        let reply_id = decoded.id;
        if let ClientFrame::Ack { seq } = decoded.frame {
            // Acks are cumulative: only one that moves past the last routed ack does any work,
            // so acks need no rate limit.
            if seq <= self.conn.acked.get() {
                return;
            }
            // Only acks of events this connection delivered are remembered: a bogus ack beyond
            // them is judged by the owner (bad_seq) and must not hide later valid acks.
            if seq < self.next {
                self.conn.acked.set(seq);
            }
        } else if let Err(retry_ms) = self.conn.frames.take(Instant::now()) {
            return self.reply_error(
                FrameError::new(ErrorCode::RateLimited, "too many frames")
                    .with_retry(retry_ms)
                    .with_id(reply_id.as_deref()),
            );
        }
        let user = self.conn.user.clone();
        let device = self.conn.device.clone();
        let conn = shard.conn_ref(self.conn.id);
        let owner = shard.owner_of(&user);
        let msg = match decoded.frame {
            ClientFrame::Ack { seq } => ShardMsg::Ack {
                user,
                device,
                conn,
                seq,
                reply_id: reply_id.clone(),
            },
            ClientFrame::Send { id, to, body } => ShardMsg::Send {
                user,
                device,
                conn,
                client: id,
                to,
                body,
            },
            ClientFrame::Devices => ShardMsg::Devices {
                user,
                conn,
                reply_id: reply_id.clone(),
            },
            ClientFrame::Read { chat, up_to } => ShardMsg::Read {
                user,
                conn,
                chat,
                up_to,
                reply_id: reply_id.clone(),
            },
            ClientFrame::Edit { msg, body } => ShardMsg::Edit {
                user,
                conn,
                msg,
                body,
                reply_id: reply_id.clone(),
            },
            ClientFrame::Delete { msg, scope } => ShardMsg::Delete {
                user,
                conn,
                msg,
                scope,
                reply_id: reply_id.clone(),
            },
            ClientFrame::Unlink { device } => ShardMsg::Unlink {
                user,
                conn,
                device,
                reply_id: reply_id.clone(),
            },
            ClientFrame::Typing { chat, on } => {
                if let Err(retry_ms) = self.conn.typing.take(Instant::now()) {
                    return self.reply_error(
                        FrameError::new(ErrorCode::RateLimited, "too many typing indicators")
                            .with_retry(retry_ms)
                            .with_id(reply_id.as_deref()),
                    );
                }
                let (to_owner, typing) = match chat {
                    // Typing in one's own notes shows nowhere.
                    ChatId::Direct(peer) if peer == user => return,
                    ChatId::Direct(peer) => (
                        shard.owner_of(&peer),
                        ShardMsg::Typing {
                            to: peer,
                            chat: user.as_str().to_owned(),
                            from: user,
                            on,
                        },
                    ),
                    ChatId::Group(group) => (
                        shard.owner_of_chat(&ChatId::Group(group.clone())),
                        ShardMsg::GroupTyping {
                            group,
                            from: user,
                            on,
                        },
                    ),
                };
                // Ephemeral: at the bound it is dropped, never queued without limit.
                let _ = shard.router.try_route(to_owner, typing);
                return;
            }
            ClientFrame::History {
                chat,
                before,
                limit,
            } => {
                let frame = match self.history(&chat, before, limit) {
                    Ok(Some(frame)) => ConnItem::Frame(frame),
                    Ok(None) => ConnItem::Frame(
                        FrameError::new(
                            ErrorCode::UnknownMessage,
                            "before names no message in your log",
                        )
                        .with_id(reply_id.as_deref())
                        .with_msg(before.expect("only a before can be unknown"))
                        .encode(),
                    ),
                    Err(e) => ConnItem::Frame(
                        Shard::store_error_frame(&e)
                            .with_id(reply_id.as_deref())
                            .encode(),
                    ),
                };
                self.conn.push(frame, usize::MAX);
                return;
            }
            ClientFrame::Group { op, group, members } => {
                let group_owner = shard.owner_of_chat(&ChatId::Group(group.clone()));
                let msg = ShardMsg::GroupOp {
                    user,
                    conn,
                    op,
                    group,
                    members,
                    reply_id: reply_id.clone(),
                };
                if shard.router.try_route(group_owner, msg).is_err() {
                    self.reply_error(
                        FrameError::new(ErrorCode::Busy, "the group's shard is overloaded")
                            .with_retry(50)
                            .with_id(reply_id.as_deref()),
                    );
                }
                return;
            }
            ClientFrame::DevClock { advance_ms } => {
                if !shard.config.dev_clock {
                    return self.reply_error(
                        FrameError::new(ErrorCode::UnknownType, "unknown frame type \"dev_clock\"")
                            .with_id(reply_id.as_deref()),
                    );
                }
                crate::clock::advance_dev_clock(advance_ms);
                return self.conn.push(
                    ConnItem::Frame(Bytes::from(format!(
                        "{{\"t\":\"dev_clock\",\"now\":{}}}",
                        shard.clock.now_ms()
                    ))),
                    usize::MAX,
                );
            }
        };
        if shard.router.try_route(owner, msg).is_err() {
            self.reply_error(
                FrameError::new(ErrorCode::Busy, "the user's shard is overloaded")
                    .with_retry(50)
                    .with_id(reply_id.as_deref()),
            );
        }
    }
}

impl Session {
    /// A page of one chat from the caller's log, newest first in log order: deleted messages
    /// are left out, edited ones show their latest body. `None`: `before` is not in the log. Served from the owner's store without a hop (the
    /// index and committed records are immutable or only grow).
    fn history(
        &self,
        chat: &ChatId,
        before: Option<MsgId>,
        limit: usize,
    ) -> Result<Option<Bytes>, StoreError> {
        let chat_name = match chat {
            ChatId::Direct(peer) => peer.as_str().to_owned(),
            ChatId::Group(group) => format!("g:{group}"),
        };
        let user = &self.conn.user;
        let store = &self.shard.stores[self.shard.owner_of(user).0];
        let mut events = Vec::with_capacity(limit);
        // Pages follow the log's order; `before` names a message, so start below its seq.
        let mut cursor = match before {
            None => None,
            Some(msg) => match store.msg_index_get(user, msg)? {
                Some(seq) => Some(seq),
                None => return Ok(None),
            },
        };
        // Bounded: a run of deleted messages cannot make one request scan without end.
        for _ in 0..HISTORY_PAGES_MAX {
            let page = store.chat_page(user, &chat_name, cursor, limit)?;
            for (msg, seq) in &page {
                if events.len() == limit {
                    break;
                }
                let change = store.msg_change(user, *msg)?;
                if change == Some(MsgChange::Deleted) {
                    continue;
                }
                let Some(record) = store.read_record(user, *seq)? else {
                    continue; // Pruned.
                };
                match change {
                    Some(MsgChange::Edited(body)) => {
                        events.push(rewrite_edited(&record, &body).unwrap_or(record));
                    }
                    _ => events.push(record),
                }
            }
            if events.len() == limit || page.len() < limit {
                break;
            }
            cursor = page.last().map(|(_, seq)| *seq);
        }
        Ok(Some(encode_history(&chat_name, &events)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn reader_with(bytes: &[u8]) -> FrameReader {
        FrameReader {
            inbound: bytes.to_vec(),
            ..FrameReader::default()
        }
    }

    fn close_code(result: Result<Option<Inbound>, End>) -> u16 {
        match result {
            Err(End::Close(code, _)) => code,
            other => panic!("expected a close, got {:?}", other.map(|_| ()).is_ok()),
        }
    }

    #[test]
    fn frames_arrive_whole_even_byte_by_byte_and_buffers_are_freed() {
        let mut bytes = client_frame(0x81, b"{\"t\":\"ack\",\"seq\":1}");
        bytes.extend(client_frame(0x89, b"hi"));
        bytes.extend(client_frame(0x81, &[b'x'; 300]));
        let mut reader = FrameReader::default();
        let mut seen = Vec::new();
        for byte in bytes {
            reader.inbound.push(byte);
            while let Some(message) = reader.next(1024).unwrap() {
                seen.push(message);
            }
        }
        assert_eq!(
            seen,
            vec![
                Inbound::Text(b"{\"t\":\"ack\",\"seq\":1}".to_vec()),
                Inbound::Ping(b"hi".to_vec()),
                Inbound::Text(vec![b'x'; 300]),
            ]
        );
        assert_eq!(
            reader.inbound.capacity(),
            0,
            "an idle reader holds no buffer"
        );
        assert_eq!(reader.fragments.capacity(), 0);
    }

    #[test]
    fn fragments_join_and_control_frames_pass_between_them() {
        let mut bytes = client_frame(0x01, b"{\"t\":");
        bytes.extend(client_frame(0x8A, b""));
        bytes.extend(client_frame(0x80, b"\"devices\"}"));
        let mut reader = reader_with(&bytes);
        assert_eq!(reader.next(1024).unwrap(), Some(Inbound::Pong));
        assert_eq!(
            reader.next(1024).unwrap(),
            Some(Inbound::Text(b"{\"t\":\"devices\"}".to_vec()))
        );
        assert_eq!(reader.next(1024).unwrap(), None);
    }

    #[test]
    fn bad_frames_close_with_their_codes() {
        assert_eq!(
            close_code(reader_with(&client_frame(0x81, &[0xC3, 0x28])).next(64)),
            1007
        );
        assert_eq!(
            close_code(reader_with(&client_frame(0x81, &[b'a'; 65])).next(64)),
            1009
        );
        let mut two = client_frame(0x01, &[b'a'; 40]);
        two.extend(client_frame(0x80, &[b'a'; 40]));
        assert_eq!(
            close_code(reader_with(&two).next(64)),
            1009,
            "a message over the bound"
        );
        assert_eq!(
            close_code(reader_with(&client_frame(0xC1, b"x")).next(64)),
            1002
        );
        assert_eq!(
            close_code(reader_with(&client_frame(0x80, b"x")).next(64)),
            1002
        );
        assert_eq!(
            close_code(reader_with(&client_frame(0x09, b"x")).next(64)),
            1002
        );
        assert_eq!(
            close_code(reader_with(&[0x81, 0x01, b'x']).next(64)),
            1002,
            "unmasked"
        );
        assert_eq!(
            reader_with(&client_frame(0x88, &1000u16.to_be_bytes()))
                .next(64)
                .unwrap(),
            Some(Inbound::Close(1000u16.to_be_bytes().to_vec()))
        );
        assert_eq!(
            reader_with(&client_frame(0x88, b"")).next(64).unwrap(),
            Some(Inbound::Close(Vec::new()))
        );
        for code in [
            0u16,
            999,
            1004,
            1005,
            1006,
            1015,
            1016,
            2999,
            5000,
            u16::MAX,
        ] {
            let frame = client_frame(0x88, &code.to_be_bytes());
            assert_eq!(close_code(reader_with(&frame).next(64)), 1002, "{code}");
        }
        let mut bad_reason = 1000u16.to_be_bytes().to_vec();
        bad_reason.push(0xFF);
        assert_eq!(
            close_code(reader_with(&client_frame(0x88, &bad_reason)).next(64)),
            1007
        );
        assert_eq!(
            reader_with(&client_frame(0x82, b"\x00")).next(64).unwrap(),
            Some(Inbound::Binary)
        );
    }

    #[test]
    fn absurd_lengths_are_refused_before_any_allocation_or_sum() {
        let header = |length: u64| {
            let mut bytes = vec![0x81, 0x80 | 127];
            bytes.extend_from_slice(&length.to_be_bytes());
            bytes.extend_from_slice(&[1, 2, 3, 4, 5]);
            bytes
        };
        assert_eq!(close_code(reader_with(&header(1 << 63)).next(64)), 1002);
        assert_eq!(close_code(reader_with(&header(u64::MAX)).next(64)), 1002);
        assert_eq!(
            close_code(reader_with(&header(1 << 40)).next(1 << 16)),
            1009
        );
    }

    #[test]
    fn server_frames_use_the_shortest_length() {
        let mut out = Vec::new();
        encode_frame(&mut out, OPCODE_TEXT, b"hi");
        assert_eq!(out, b"\x81\x02hi");
        out.clear();
        encode_frame(&mut out, OPCODE_TEXT, &[0; 200]);
        assert_eq!(&out[..4], &[0x81, 126, 0, 200]);
        out.clear();
        encode_frame(&mut out, OPCODE_BINARY, &[0; 70000]);
        assert_eq!(&out[..2], &[0x82, 127]);
        assert_eq!(out.len(), 70000 + 10);
    }
}
