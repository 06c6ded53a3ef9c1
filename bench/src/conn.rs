//! One client connection to the server under test: Courier's protocol v1, NATS, or XMPP
//! (ejabberd, RFC 7395), all over WebSocket, bound to a chosen loopback source address.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;

use futures_util::{SinkExt, StreamExt};

use crate::xmpp;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Courier,
    Nats,
    Ejabberd,
}

impl Target {
    /// The `--target` value.
    pub fn name(self) -> &'static str {
        match self {
            Target::Courier => "courier",
            Target::Nats => "nats",
            Target::Ejabberd => "ejabberd",
        }
    }

    /// Courier confirms each send with `sent`; the peers do not, so their max-rate senders
    /// bound what is in flight with pings (NATS PING/PONG, XMPP ping iq) instead.
    pub fn confirms_sends(self) -> bool {
        self == Target::Courier
    }
}

/// Connections per loopback source address (the ephemeral port range is ~28k per 4-tuple set).
pub const PER_SOURCE_ADDR: usize = 10_000;

/// The source address of connection number `i`: 127.0.0.2, 127.0.0.3, ...
pub fn source_addr(i: usize) -> Ipv4Addr {
    let n = 2 + (i / PER_SOURCE_ADDR) as u32;
    Ipv4Addr::from(0x7f00_0000u32 | n)
}

/// What the bench cares about in an incoming frame.
#[derive(Debug)]
pub enum Incoming {
    /// A `msg` event (Courier), a NATS MSG or an XMPP chat message (a carbon included): the
    /// body, and the seq where there is one.
    Msg {
        seq: u64,
        body: String,
    },
    /// Any other event (receipts, group, device...): only its seq matters (for acks).
    OtherEvent {
        seq: u64,
        kind: String,
    },
    /// `sent` for the client id.
    Sent {
        id: String,
    },
    /// `error` with its code and the id it answers.
    Error {
        code: String,
        id: Option<String>,
    },
    /// NATS PONG or the result of an XMPP ping (answers the sender's ping: everything sent
    /// before it was processed).
    Pong,
    Other,
}

pub struct Hello {
    pub cursor: u64,
    pub head: u64,
}

pub struct Conn {
    ws: WebSocketStream<TcpStream>,
    target: Target,
    queue: VecDeque<Incoming>,
    nats_buf: Vec<u8>,
    /// Numbers the XMPP pings, whose ids tell their results from other iq results.
    pings: u64,
}

#[derive(serde::Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    t: &'a str,
    seq: Option<u64>,
    #[serde(borrow)]
    kind: Option<&'a str>,
    body: Option<String>,
    id: Option<String>,
    code: Option<String>,
    cursor: Option<u64>,
    head: Option<u64>,
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

async fn tcp(addr: SocketAddr, src: Ipv4Addr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    // Let connect() pick the port per 4-tuple, so each source address has the full range.
    let one: libc::c_int = 1;
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    sock.bind(SocketAddr::V4(SocketAddrV4::new(src, 0)))?;
    let s = sock.connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// `ws://127.0.0.1:PORT` → the socket address.
pub fn addr_of(url: &str) -> Result<SocketAddr, String> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| format!("not a ws:// url: {url}"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let a: SocketAddr = hostport
        .parse()
        .map_err(|e| format!("bad address {hostport}: {e}"))?;
    if !a.ip().is_loopback() {
        return Err(format!(
            "{a} is not a loopback address: the bench only targets loopback"
        ));
    }
    Ok(a)
}

impl Conn {
    /// Connects as (user, device) and waits for `hello` (Courier), for the subscription to be
    /// in place (NATS: SUB then PING, wait for PONG) or for the XMPP session to be ready
    /// (ejabberd: SASL PLAIN as `user`, resource `device` bound, carbons on, presence sent).
    pub async fn open(
        target: Target,
        url: &str,
        addr: SocketAddr,
        src: Ipv4Addr,
        user: &str,
        device: &str,
    ) -> Result<(Conn, Hello), String> {
        let stream = tcp(addr, src).await.map_err(|e| format!("tcp: {e}"))?;
        let req = match target {
            Target::Courier => format!("{url}/v1/ws?user={user}&device={device}"),
            Target::Nats => format!("{url}/"),
            Target::Ejabberd => format!("{url}/ws"),
        };
        let mut req = req
            .into_client_request()
            .map_err(|e| format!("request: {e}"))?;
        if target == Target::Ejabberd {
            // RFC 7395: the `xmpp` subprotocol is what makes ejabberd_http_ws speak framed XMPP.
            req.headers_mut()
                .insert("Sec-WebSocket-Protocol", "xmpp".parse().expect("header"));
        }
        let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config()))
            .await
            .map_err(|e| format!("upgrade: {e}"))?;
        let mut c = Conn {
            ws,
            target,
            queue: VecDeque::new(),
            nats_buf: Vec::new(),
            pings: 0,
        };
        match target {
            Target::Courier => loop {
                let m = c.ws.next().await.ok_or("closed before hello")?;
                let m = m.map_err(|e| format!("before hello: {e}"))?;
                if let Message::Text(t) = m {
                    let f: Frame = serde_json::from_str(&t).map_err(|e| format!("json: {e}"))?;
                    if f.t == "hello" {
                        let hello = Hello {
                            cursor: f.cursor.unwrap_or(0),
                            head: f.head.unwrap_or(0),
                        };
                        return Ok((c, hello));
                    }
                    if f.t == "error" {
                        return Err(format!("error before hello: {t}"));
                    }
                }
            },
            Target::Nats => {
                let sub = format!(
                    "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"name\":\"{user}.{device}\"}}\r\nSUB u.{user} 1\r\nPING\r\n"
                );
                c.ws.send(Message::binary(sub.into_bytes()))
                    .await
                    .map_err(|e| format!("nats connect: {e}"))?;
                loop {
                    match c.recv_raw_nats().await? {
                        NatsCtl::Pong => return Ok((c, Hello { cursor: 0, head: 0 })),
                        NatsCtl::Err(e) => return Err(format!("nats: {e}")),
                        NatsCtl::None => {}
                    }
                }
            }
            Target::Ejabberd => {
                c.xmpp_login(user, device).await?;
                Ok((c, Hello { cursor: 0, head: 0 }))
            }
        }
    }

    /// The client side of RFC 7395 + RFC 6120 up to a ready session. Each step waits for the
    /// server's answer, as a client must (the features decide what comes next); only the last
    /// three requests, which need nothing from each other, go out together.
    async fn xmpp_login(&mut self, user: &str, device: &str) -> Result<(), String> {
        self.send_text(xmpp::open()).await?;
        self.xmpp_until(|e| matches!(e, xmpp::Element::Features))
            .await?;
        self.send_text(xmpp::auth_plain(user)).await?;
        let sasl = self
            .xmpp_until(|e| {
                matches!(
                    e,
                    xmpp::Element::SaslSuccess | xmpp::Element::SaslFailure(_)
                )
            })
            .await?;
        if let xmpp::Element::SaslFailure(c) = sasl {
            return Err(format!("sasl: {c}"));
        }
        // SASL success restarts the stream: a new <open/>, new features (bind).
        self.send_text(xmpp::open()).await?;
        self.xmpp_until(|e| matches!(e, xmpp::Element::Features))
            .await?;
        self.send_text(xmpp::bind("b", device)).await?;
        expect_result(
            self.xmpp_until(|e| matches!(e, xmpp::Element::Iq { id, .. } if id == "b"))
                .await?,
            "bind",
        )?;
        self.send_text(xmpp::enable_carbons("c")).await?;
        self.send_text(xmpp::presence()).await?;
        // The ping's result comes after the presence was processed: the session is available
        // to receive messages sent to the bare JID from then on.
        self.send_text(xmpp::ping("h")).await?;
        expect_result(
            self.xmpp_until(|e| matches!(e, xmpp::Element::Iq { id, .. } if id == "c"))
                .await?,
            "carbons",
        )?;
        expect_result(
            self.xmpp_until(|e| matches!(e, xmpp::Element::Iq { id, .. } if id == "h"))
                .await?,
            "ping",
        )?;
        Ok(())
    }

    /// Reads elements until `want` matches one; messages that arrive meanwhile are kept for
    /// `recv`, a closed stream is an error.
    async fn xmpp_until(
        &mut self,
        want: impl Fn(&xmpp::Element) -> bool,
    ) -> Result<xmpp::Element, String> {
        loop {
            let m = self
                .ws
                .next()
                .await
                .ok_or("closed during login")?
                .map_err(|e| format!("during login: {e}"))?;
            let t = match m {
                Message::Text(t) => t,
                Message::Close(f) => return Err(format!("closed during login: {f:?}")),
                _ => continue,
            };
            let e = xmpp::parse(&t);
            if want(&e) {
                return Ok(e);
            }
            match e {
                xmpp::Element::Closed(why) => return Err(format!("stream closed: {why}")),
                xmpp::Element::Message { .. } => {
                    let i = self.xmpp_incoming(e);
                    self.queue.push_back(i);
                }
                _ => {}
            }
        }
    }

    fn xmpp_incoming(&self, e: xmpp::Element) -> Incoming {
        match e {
            xmpp::Element::Message {
                error: Some(code),
                id,
                ..
            } => Incoming::Error { code, id: Some(id) },
            xmpp::Element::Message {
                body: Some(body), ..
            } => Incoming::Msg { seq: 0, body },
            xmpp::Element::Iq { ty, id } if id.starts_with('p') => {
                if ty == "result" {
                    Incoming::Pong
                } else {
                    Incoming::Error {
                        code: format!("ping iq {ty}"),
                        id: None,
                    }
                }
            }
            _ => Incoming::Other,
        }
    }

    /// The next frame the bench cares about; `None` when the connection is gone.
    pub async fn recv(&mut self) -> Option<Incoming> {
        loop {
            if let Some(i) = self.queue.pop_front() {
                return Some(i);
            }
            match self.target {
                Target::Courier => {
                    let m = self.ws.next().await?.ok()?;
                    match m {
                        Message::Text(t) => return Some(parse_courier(&t)),
                        Message::Close(_) => return None,
                        _ => {}
                    }
                }
                Target::Nats => match self.recv_raw_nats().await {
                    Ok(NatsCtl::Err(_)) | Err(_) => return None,
                    Ok(NatsCtl::Pong) => return Some(Incoming::Pong),
                    Ok(NatsCtl::None) => {}
                },
                Target::Ejabberd => {
                    let m = self.ws.next().await?.ok()?;
                    match m {
                        Message::Text(t) => match xmpp::parse(&t) {
                            xmpp::Element::Closed(_) => return None,
                            e => return Some(self.xmpp_incoming(e)),
                        },
                        Message::Close(_) => return None,
                        _ => {}
                    }
                }
            }
        }
    }

    async fn recv_raw_nats(&mut self) -> Result<NatsCtl, String> {
        let m = self
            .ws
            .next()
            .await
            .ok_or("closed")?
            .map_err(|e| e.to_string())?;
        match m {
            Message::Binary(b) => self.nats_buf.extend_from_slice(&b),
            Message::Text(t) => self.nats_buf.extend_from_slice(t.as_bytes()),
            Message::Close(_) => return Err("closed".into()),
            _ => return Ok(NatsCtl::None),
        }
        let mut ctl = NatsCtl::None;
        let mut pongs = 0;
        while let Some(nl) = find_crlf(&self.nats_buf) {
            let line = String::from_utf8_lossy(&self.nats_buf[..nl]).to_string();
            if let Some(rest) = line.strip_prefix("MSG ") {
                let parts: Vec<&str> = rest.split(' ').collect();
                let len: usize = parts.last().and_then(|l| l.parse().ok()).ok_or("bad MSG")?;
                if self.nats_buf.len() < nl + 2 + len + 2 {
                    break; // payload not complete yet
                }
                let body =
                    String::from_utf8_lossy(&self.nats_buf[nl + 2..nl + 2 + len]).to_string();
                self.nats_buf.drain(..nl + 2 + len + 2);
                self.queue.push_back(Incoming::Msg { seq: 0, body });
                continue;
            }
            self.nats_buf.drain(..nl + 2);
            if line == "PING" {
                pongs += 1;
            } else if line == "PONG" {
                ctl = NatsCtl::Pong;
            } else if let Some(e) = line.strip_prefix("-ERR") {
                ctl = NatsCtl::Err(e.trim().to_string());
            }
        }
        for _ in 0..pongs {
            self.ws
                .send(Message::binary(b"PONG\r\n".to_vec()))
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(ctl)
    }

    /// Sends one message to a user (Courier `send`, NATS `PUB u.<to>`, XMPP `<message
    /// type="chat">` to the bare JID `<to>@localhost`, which reaches every device).
    pub async fn send_msg(&mut self, to: &str, id: &str, body: &str) -> Result<(), String> {
        let m = match self.target {
            Target::Courier => Message::text(format!(
                "{{\"t\":\"send\",\"id\":\"{id}\",\"to\":\"{to}\",\"body\":\"{body}\"}}"
            )),
            Target::Nats => {
                Message::binary(format!("PUB u.{to} {}\r\n{body}\r\n", body.len()).into_bytes())
            }
            Target::Ejabberd => Message::text(xmpp::chat(to, id, body)),
        };
        self.ws.send(m).await.map_err(|e| e.to_string())
    }

    /// Sends a raw text frame (a Courier frame or one XMPP element).
    pub async fn send_text(&mut self, text: String) -> Result<(), String> {
        self.ws
            .send(Message::text(text))
            .await
            .map_err(|e| e.to_string())
    }

    pub async fn ack(&mut self, seq: u64) -> Result<(), String> {
        if self.target == Target::Courier {
            self.send_text(format!("{{\"t\":\"ack\",\"seq\":{seq}}}"))
                .await
        } else {
            Ok(())
        }
    }

    /// NATS PING or XMPP ping iq, answered (`Incoming::Pong`) once everything sent before it
    /// was processed.
    pub async fn ping(&mut self) -> Result<(), String> {
        let m = match self.target {
            Target::Ejabberd => {
                self.pings += 1;
                Message::text(xmpp::ping(&format!("p{}", self.pings)))
            }
            _ => Message::binary(b"PING\r\n".to_vec()),
        };
        self.ws.send(m).await.map_err(|e| e.to_string())
    }

    pub async fn close(mut self) {
        if self.target == Target::Ejabberd {
            // RFC 7395 §3.6: the client ends the XMPP stream before the WebSocket.
            let _ = self.ws.send(Message::text(xmpp::close())).await;
        }
        let _ = self.ws.close(None).await;
    }
}

fn expect_result(e: xmpp::Element, what: &str) -> Result<(), String> {
    match e {
        xmpp::Element::Iq { ty, .. } if ty == "result" => Ok(()),
        e => Err(format!("{what}: {e:?}")),
    }
}

enum NatsCtl {
    None,
    Pong,
    Err(String),
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

fn parse_courier(t: &str) -> Incoming {
    let Ok(f) = serde_json::from_str::<Frame>(t) else {
        return Incoming::Other;
    };
    match f.t {
        "ev" => {
            let seq = f.seq.unwrap_or(0);
            if f.kind == Some("msg") {
                Incoming::Msg {
                    seq,
                    body: f.body.unwrap_or_default(),
                }
            } else {
                Incoming::OtherEvent {
                    seq,
                    kind: f.kind.unwrap_or("").to_string(),
                }
            }
        }
        "sent" => Incoming::Sent {
            id: f.id.unwrap_or_default(),
        },
        "error" => Incoming::Error {
            code: f.code.unwrap_or_default(),
            id: f.id,
        },
        _ => Incoming::Other,
    }
}
