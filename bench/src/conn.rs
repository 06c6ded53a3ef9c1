//! One client connection to the server under test: Courier's protocol v1 or NATS, both over
//! WebSocket, bound to a chosen loopback source address.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Courier,
    Nats,
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
    /// A `msg` event (Courier) or a NATS MSG: the body, and the seq where there is one.
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
    /// NATS PONG (answers the sender's PING: everything published before it was processed).
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
    /// Connects as (user, device) and waits for `hello` (Courier) or for the subscription to be
    /// in place (NATS: SUB then PING, wait for PONG).
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
        };
        let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config()))
            .await
            .map_err(|e| format!("upgrade: {e}"))?;
        let mut c = Conn {
            ws,
            target,
            queue: VecDeque::new(),
            nats_buf: Vec::new(),
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

    /// Sends one message to a user (Courier `send`, NATS `PUB u.<to>`).
    pub async fn send_msg(&mut self, to: &str, id: &str, body: &str) -> Result<(), String> {
        let m = match self.target {
            Target::Courier => Message::text(format!(
                "{{\"t\":\"send\",\"id\":\"{id}\",\"to\":\"{to}\",\"body\":\"{body}\"}}"
            )),
            Target::Nats => {
                Message::binary(format!("PUB u.{to} {}\r\n{body}\r\n", body.len()).into_bytes())
            }
        };
        self.ws.send(m).await.map_err(|e| e.to_string())
    }

    /// Sends a raw text frame (Courier only).
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

    /// NATS: PING, answered by PONG once everything sent before it was processed.
    pub async fn ping(&mut self) -> Result<(), String> {
        self.ws
            .send(Message::binary(b"PING\r\n".to_vec()))
            .await
            .map_err(|e| e.to_string())
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
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
