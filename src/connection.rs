//! One client connection: WebSocket upgrade, credentials, replay, live events, client frames.
//!
//! Owns: the only use of tungstenite in the server (upgrade with credential check inside the
//! handshake, bounded buffers, frame limits, close codes), the per-connection delivery rule (on
//! one connection events go out with contiguous seq, no gap and no duplicate: anything missing
//! is read from the owner's log), and turning client frames into routed shard messages.
//!
//! Must not: hold user state (the owner has it) or decide anything an owner decides; keep a
//! large buffer per idle socket; block on a slow socket without a bound (writes time out).

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use bytes::Bytes;
use futures_util::future::{Either, select};
use futures_util::{AsyncReadExt, SinkExt, StreamExt};
use glommio::net::TcpStream;
use glommio::timer::Timer;
use tungstenite::error::ProtocolError;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Error as WsError, Message, Utf8Bytes};

use crate::auth::Credentials;
use crate::ids::{ChatId, MsgId, Seq};
use crate::metrics::ShardMetrics;
use crate::protocol::{
    ClientFrame, ErrorCode, FrameError, decode_client_frame, encode_hello, encode_history,
    rewrite_edited,
};
use crate::router::{ConnItem, ShardMsg};
use crate::shard::{ConnShared, Shard};
use crate::storage::{MsgChange, StoreError};

type Ws = WebSocketStream<TcpStream>;

/// Per-connection read buffer. tungstenite's default (128 KiB, always resident) would dominate
/// the memory of an idle connection.
/// 512 bytes holds any usual client frame (an ack is ~25 bytes, a short send ~100); larger
/// frames are read in 512-byte steps into a buffer that grows for them.
const READ_BUFFER_BYTES: usize = 512;
/// Frames are written through as soon as this much is buffered; the rest is flushed once per
/// drained batch of outbound items (several frames per syscall under load).
const WRITE_BUFFER_BYTES: usize = 8192;
/// How long the owner may take to answer `Attach` before the connection gives up (1011).
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a close handshake may take before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A socket that accepts no bytes for this long is dropped (a reader that stopped reading).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
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
enum End {
    /// Send this close frame, then finish the close handshake.
    Close(u16, String),
    /// The peer closed or the socket failed: nothing more to send.
    Gone,
}

/// Serves one accepted TCP connection to its end.
pub async fn serve(shard: Rc<Shard>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
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
    let Some((ws, creds)) = Box::pin(handshake(&shard, stream, accepted)).await else {
        return;
    };
    ShardMetrics::count(&shard.metrics.handshakes_total);
    let Some(conn) = shard.register_conn(creds.user.clone(), creds.device.clone()) else {
        tracing::warn!(?peer, "connection limit of this shard reached");
        let mut ws = ws;
        Box::pin(close(&mut ws, 1013, "server at its connection limit")).await;
        return;
    };
    tracing::info!(?peer, user = %creds.user, device = %creds.device, shard = shard.id.0, "connected");
    let mut session = Session {
        shard: shard.clone(),
        conn: conn.clone(),
        ws,
        next: Seq(1),
        attached: false,
    };
    let end = session.run().await;
    let Session {
        mut ws, attached, ..
    } = session;
    shard.unregister_conn(&conn, attached);
    let code = match end {
        End::Close(code, reason) => {
            if code == 4009 {
                ShardMetrics::count(&shard.metrics.slow_consumer_closes_total);
            }
            Box::pin(close(&mut ws, code, &reason)).await;
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
/// (a slowloris client trickling its headers is cut off there).
async fn handshake(
    shard: &Shard,
    stream: TcpStream,
    accepted: Instant,
) -> Option<(Ws, Credentials)> {
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
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_write_buffer_size(shard.config.outbound_queue_max_bytes + WRITE_BUFFER_BYTES)
        .max_message_size(Some(shard.config.max_frame_bytes))
        .max_frame_size(Some(shard.config.max_frame_bytes));
    let upgrade = async_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config));
    let left =
        (accepted + shard.config.handshake_timeout).saturating_duration_since(Instant::now());
    match with_timeout(left, upgrade).await {
        Some(Ok(ws)) => creds.map(|c| (ws, c)),
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

/// Sends a close frame and waits (bounded) for the peer to finish the close handshake, so the
/// close frame is not lost to a reset.
async fn close(ws: &mut Ws, code: u16, reason: &str) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: Utf8Bytes::from(reason),
    };
    let finish = async {
        if ws.close(Some(frame)).await.is_err() {
            return;
        }
        // Read until the peer's close or EOF; after a protocol error tungstenite may refuse to
        // read frames, so discard raw bytes then.
        loop {
            match ws.next().await {
                Some(Ok(_)) => continue,
                Some(Err(_)) => break,
                None => return,
            }
        }
        let mut sink = [0u8; 1024];
        while let Ok(n) = ws.get_mut().read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = with_timeout(CLOSE_TIMEOUT, finish).await;
}

/// What woke the session.
enum Wake {
    Outbox,
    Inbound(Option<Result<Message, WsError>>),
}

struct Session {
    shard: Rc<Shard>,
    conn: Rc<ConnShared>,
    ws: Ws,
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
                Wake::Inbound(None) => return End::Gone,
                Wake::Inbound(Some(Ok(message))) => {
                    self.conn.last_rx.set(Instant::now());
                    self.conn.pinged.set(false);
                    match message {
                        Message::Text(text) => self.on_text(text.as_bytes()),
                        Message::Binary(_) => self.reply_error(FrameError::new(
                            ErrorCode::BadFrame,
                            "binary frames are not accepted; send JSON text frames",
                        )),
                        Message::Close(_) => return End::Gone,
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                    }
                }
                Wake::Inbound(Some(Err(error))) => return end_for_error(error),
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
        if caught_up.is_err() || self.ws.flush().await.is_err() {
            return Some(End::Gone);
        }
        None
    }

    /// Waits for outbound items or an inbound frame. Cancel-safe by construction: the outbox is
    /// a queue that only `pop` drains, and the WebSocket keeps partial frames in itself.
    async fn wait(&mut self) -> Wake {
        let conn = self.conn.clone();
        let ws = &mut self.ws;
        poll_fn(|cx| {
            loop {
                if !conn.is_empty() || conn.dropped_through.get() >= self.next {
                    return Poll::Ready(Wake::Outbox);
                }
                // Pending means the waker is registered; Ready consumed a notification, so
                // look at the queue again.
                if conn.notify.poll_notified(cx.waker()).is_pending() {
                    break;
                }
            }
            match ws.poll_next_unpin(cx) {
                Poll::Ready(message) => Poll::Ready(Wake::Inbound(message)),
                Poll::Pending => Poll::Pending,
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
                ConnItem::Ping => self
                    .ws
                    .feed(Message::Ping(Bytes::new()))
                    .await
                    .map_err(|_| ()),
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
        if self.ws.flush().await.is_err() {
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
            self.ws.flush().await.map_err(|_| ())?;
            glommio::yield_if_needed().await;
        }
        Ok(())
    }

    async fn feed(&mut self, frame: Bytes) -> Result<(), ()> {
        ShardMetrics::count(&self.shard.metrics.frames_out_total);
        let text = Utf8Bytes::try_from(frame).map_err(|_| {
            tracing::error!("refusing to send a frame that is not UTF-8");
        })?;
        self.ws.feed(Message::Text(text)).await.map_err(|_| ())
    }

    async fn write_frame(&mut self, frame: Bytes) -> Result<(), ()> {
        self.feed(frame).await?;
        self.ws.flush().await.map_err(|_| ())
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

/// Maps a WebSocket read error to how the session ends.
fn end_for_error(error: WsError) -> End {
    match error {
        WsError::Capacity(e) => End::Close(1009, format!("frame too large: {e}")),
        WsError::Utf8(_) => End::Close(1007, "text frame is not valid UTF-8".into()),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Gone,
        WsError::Protocol(e) => End::Close(1002, format!("protocol error: {e}")),
        _ => End::Gone,
    }
}
