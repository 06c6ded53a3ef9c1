//! WebSocket framing at the boundary (RFC 6455, server side), with a hand-written client on a
//! plain TCP socket so every byte on the wire is chosen by the test: masking, reserved bits,
//! control frames, fragments, close codes and their echo, ping/pong, lengths no allocator can
//! serve (the server must survive them, also during its close handshake), many frames in one
//! write (none left unread), and descriptors (one per connection, none left after a close).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// A WebSocket client that writes and reads raw frames.
struct Raw {
    socket: TcpStream,
    /// Bytes read and not yet taken as frames.
    buf: Vec<u8>,
}

/// A masked client frame: `first` is the whole first byte (FIN, RSV, opcode).
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = raw_client_frame(first & 0x0F, payload);
    out[0] = first;
    out
}

/// A masked client frame header that announces `length` (64-bit form) and carries no payload.
fn header_64(first: u8, length: u64) -> Vec<u8> {
    let mut out = vec![first, 0x80 | 127];
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(&[1, 2, 3, 4]);
    out
}

/// A close frame's payload: code and reason.
fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    payload
}

impl Raw {
    fn connect(addr: SocketAddr, user: &str, device: &str) -> Raw {
        let mut socket = TcpStream::connect_timeout(&addr, RECV_TIMEOUT).expect("connect");
        socket.set_read_timeout(Some(RECV_TIMEOUT)).unwrap();
        socket.set_write_timeout(Some(RECV_TIMEOUT)).unwrap();
        socket.set_nodelay(true).unwrap();
        write!(
            socket,
            "GET /v1/ws?user={user}&device={device} HTTP/1.1\r\nHost: {addr}\r\n\
             Upgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .expect("write upgrade request");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        let end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let n = socket.read(&mut chunk).expect("read upgrade answer");
            assert!(n > 0, "EOF during the upgrade");
            buf.extend_from_slice(&chunk[..n]);
        };
        assert!(
            buf.starts_with(b"HTTP/1.1 101"),
            "upgrade refused: {}",
            String::from_utf8_lossy(&buf[..end])
        );
        buf.drain(..end);
        let mut raw = Raw { socket, buf };
        let hello = raw.text();
        assert_eq!(hello["t"], "hello", "{hello}");
        raw
    }

    fn write(&mut self, bytes: &[u8]) {
        self.socket.write_all(bytes).expect("write frames");
    }

    /// The next server frame (opcode, payload); `None` at EOF or a reset.
    fn next_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                assert_eq!(self.buf[0] & 0x70, 0, "server set reserved bits");
                assert_eq!(self.buf[1] & 0x80, 0, "server frames are never masked");
                assert_ne!(self.buf[0] & 0x80, 0, "server frames are whole (FIN)");
                let (extra, short) = match self.buf[1] & 0x7F {
                    126 => (2, None),
                    127 => (8, None),
                    n => (0, Some(n as usize)),
                };
                if self.buf.len() >= 2 + extra {
                    let len = short.unwrap_or_else(|| {
                        self.buf[2..2 + extra]
                            .iter()
                            .fold(0usize, |n, b| (n << 8) | *b as usize)
                    });
                    if self.buf.len() >= 2 + extra + len {
                        let opcode = self.buf[0] & 0x0F;
                        let payload = self.buf[2 + extra..2 + extra + len].to_vec();
                        self.buf.drain(..2 + extra + len);
                        return Some((opcode, payload));
                    }
                }
            }
            let mut chunk = [0u8; 4096];
            match self.socket.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("reading a server frame: {e}"),
            }
        }
    }

    /// The next text frame as JSON (pings are skipped; anything else fails).
    fn text(&mut self) -> Value {
        loop {
            match self.next_frame() {
                Some((0x1, payload)) => {
                    return serde_json::from_slice(&payload).expect("server text is JSON");
                }
                Some((0x9, _)) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The answer that carries `id` (text frames before it, events among them, are skipped).
    fn reply(&mut self, id: &str) -> Value {
        loop {
            let v = self.text();
            if v["id"] == id {
                return v;
            }
        }
    }

    /// The next frame that is not text (events and answers before it are skipped).
    fn next_control(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            match self.next_frame() {
                Some((0x1, _)) => continue,
                other => return other,
            }
        }
    }

    /// Reads until the server's close frame; returns its payload (text frames before it are
    /// skipped). Panics when the socket ends without one.
    fn close_payload(&mut self) -> Vec<u8> {
        loop {
            match self.next_frame() {
                Some((0x8, payload)) => return payload,
                Some(_) => continue,
                None => panic!("the socket ended without a close frame"),
            }
        }
    }

    /// The server's close code (1005 for an empty close frame).
    fn close_code(&mut self) -> u16 {
        let payload = self.close_payload();
        if payload.len() < 2 {
            return 1005;
        }
        u16::from_be_bytes([payload[0], payload[1]])
    }

    /// Reads until the server ends the TCP connection (bounded by the read timeout).
    fn until_eof(&mut self) {
        let deadline = Instant::now() + RECV_TIMEOUT;
        while Instant::now() < deadline {
            if self.next_frame().is_none() {
                return;
            }
        }
        panic!("the server kept the socket open");
    }
}

/// The server still serves: a new connection gets its hello and an answer.
fn assert_serving(server: &mut Server, what: &str) {
    assert!(server.is_running(), "the server died: {what}");
    let mut c = Client::try_dev(server.addr(), "carol", "phone")
        .unwrap_or_else(|e| panic!("the server no longer accepts ({what}): {e:?}"));
    c.hello();
    c.devices();
    assert!(server.is_running(), "the server died: {what}");
}

#[test]
fn absurd_lengths_in_the_close_handshake_do_not_crash_the_server() {
    let mut server = Server::start(ServerOpts::shards(1));
    // The server closes (1007), then reads the client's frames until its close: frames that
    // announce a terabyte, or a length with the top bit set, must not be allocated or summed.
    for length in [1u64 << 40, u64::MAX, (1u64 << 63) + 7, u64::MAX - 10] {
        let mut c = Raw::connect(server.addr(), "alice", "phone");
        c.write(&frame(0x81, &[0xC3, 0x28]));
        assert_eq!(c.close_code(), 1007, "invalid UTF-8");
        c.write(&header_64(0x81, length));
        c.write(&[0u8; 64]);
        c.until_eof();
        assert_serving(
            &mut server,
            &format!("a frame of length {length:#x} after a close"),
        );
    }
}

#[test]
fn a_64_bit_length_with_the_top_bit_set_is_a_protocol_error() {
    let server = Server::start(ServerOpts::shards(1));
    let mut c = Raw::connect(server.addr(), "alice", "phone");
    c.write(&header_64(0x81, (1u64 << 63) | 5));
    assert_eq!(c.close_code(), 1002);
    let mut c = Raw::connect(server.addr(), "alice", "phone");
    c.write(&header_64(0x81, 1u64 << 40));
    assert_eq!(c.close_code(), 1009, "a valid length over the bound");
}

#[test]
fn malformed_frames_close_with_their_codes() {
    let server = Server::start(ServerOpts::shards(1));
    let addr = server.addr();
    let text = br#"{"t":"devices"}"#;
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked", vec![0x81, 0x02, b'{', b'}'], 1002),
        ("RSV1", frame(0xC1, text), 1002),
        ("RSV3", frame(0x91, text), 1002),
        ("reserved data opcode 3", frame(0x83, text), 1002),
        ("reserved control opcode 0xB", frame(0x8B, b""), 1002),
        ("continuation without a start", frame(0x80, text), 1002),
        (
            "a new text frame inside a fragmented one",
            [frame(0x01, b"{"), frame(0x81, text)].concat(),
            1002,
        ),
        ("a fragmented ping", frame(0x09, b"x"), 1002),
        (
            "a fragmented close",
            frame(0x08, &close_payload(1000, b"")),
            1002,
        ),
        ("a ping of 126 bytes", frame(0x89, &[b'p'; 126]), 1002),
        ("a close of one byte", frame(0x88, &[3]), 1002),
        ("invalid UTF-8", frame(0x81, &[b'"', 0xFF, b'"']), 1007),
        (
            "invalid UTF-8 split over fragments",
            [frame(0x01, &[b'"', 0xE2, 0x82]), frame(0x80, &[0x28, b'"'])].concat(),
            1007,
        ),
        (
            "a frame over 64 KiB",
            frame(0x81, &vec![b' '; 65 * 1024]),
            1009,
        ),
        (
            "a message over 64 KiB in fragments",
            [
                frame(0x01, &vec![b' '; 40 * 1024]),
                frame(0x80, &vec![b' '; 40 * 1024]),
            ]
            .concat(),
            1009,
        ),
    ];
    for (what, bytes, code) in cases {
        let mut c = Raw::connect(addr, "alice", "phone");
        c.write(&bytes);
        assert_eq!(c.close_code(), code, "{what}");
    }
    // A text message in fragments, a ping between them, is one message.
    let mut c = Raw::connect(addr, "alice", "phone");
    let request = br#"{"t":"nope","id":"frag"}"#;
    c.write(
        &[
            frame(0x01, &request[..5]),
            frame(0x89, b"between"),
            frame(0x00, &request[5..12]),
            frame(0x80, &request[12..]),
        ]
        .concat(),
    );
    assert_eq!(c.next_control(), Some((0xA, b"between".to_vec())));
    c.reply("frag");
}

#[test]
fn the_close_handshake_echoes_valid_codes_and_refuses_invalid_ones() {
    let server = Server::start(ServerOpts::shards(1));
    let addr = server.addr();
    for (payload, expect) in [
        (Vec::new(), None),
        (close_payload(1000, b"bye"), Some(1000)),
        (close_payload(1001, b""), Some(1001)),
        (close_payload(3000, b""), Some(3000)),
        (close_payload(4999, b""), Some(4999)),
        (close_payload(999, b""), Some(1002)),
        (close_payload(1004, b""), Some(1002)),
        (close_payload(1005, b""), Some(1002)),
        (close_payload(1006, b""), Some(1002)),
        (close_payload(1015, b""), Some(1002)),
        (close_payload(2000, b""), Some(1002)),
        (close_payload(5000, b""), Some(1002)),
        (close_payload(1000, &[0xFF, 0xFE]), Some(1007)),
    ] {
        let mut c = Raw::connect(addr, "alice", "phone");
        c.write(&frame(0x88, &payload));
        let answer = c.close_payload();
        let code = (answer.len() >= 2).then(|| u16::from_be_bytes([answer[0], answer[1]]));
        assert_eq!(
            code, expect,
            "close payload {payload:?} answered with {answer:?}"
        );
        c.until_eof();
    }
}

#[test]
fn pings_are_answered_with_their_payload_and_pongs_change_nothing() {
    let server = Server::start(ServerOpts::shards(1));
    let mut c = Raw::connect(server.addr(), "alice", "phone");
    let payload = [7u8; 125];
    c.write(&frame(0x89, &payload));
    assert_eq!(c.next_control(), Some((0xA, payload.to_vec())));
    c.write(&frame(0x89, b""));
    assert_eq!(c.next_control(), Some((0xA, Vec::new())));
    c.write(&frame(0x8A, b"unsolicited"));
    c.write(&frame(0x81, br#"{"t":"nope","id":"after-pong"}"#));
    // Nothing answers the pong: the next control frame is the next ping's pong.
    c.reply("after-pong");
    c.write(&frame(0x89, b"last"));
    assert_eq!(c.next_control(), Some((0xA, b"last".to_vec())));
}

#[test]
fn frames_written_in_one_burst_are_all_read() {
    let server = Server::start(ServerOpts::shards(1));
    let mut c = Raw::connect(server.addr(), "alice", "phone");
    // Far more than one read of the server's takes, and more than one outbox drain answers.
    let n = 1500;
    let mut burst = Vec::new();
    for i in 0..n {
        burst.extend(frame(
            0x81,
            json!({"t": "nope", "id": format!("b{i}")})
                .to_string()
                .as_bytes(),
        ));
    }
    c.write(&burst);
    let mut seen = vec![false; n];
    let mut answered = 0;
    while answered < n {
        let reply = c.text();
        let Some(id) = reply["id"].as_str().and_then(|id| id.strip_prefix('b')) else {
            continue;
        };
        let i: usize = id.parse().unwrap();
        assert!(!seen[i], "two answers to b{i}");
        seen[i] = true;
        answered += 1;
    }
}

/// Open descriptors of the server process.
fn open_fds(server: &Server) -> usize {
    let pid = server.pid().expect("server pid");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read the server's fd directory")
        .count()
}

/// Waits (bounded) until the server holds at most `limit` descriptors; returns the last count.
fn fds_settle(server: &Server, limit: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = open_fds(server);
        if now <= limit || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_connection_holds_one_descriptor_and_none_after_it_ends() {
    let server = Server::start(ServerOpts::shards(1));
    let addr = server.addr();
    // Warm up: the shard's readiness set and its poller exist after the first upgrade.
    let mut warm = Raw::connect(addr, "warm", "phone");
    let base = fds_settle(&server, 0);
    let n = 200;
    let mut conns: Vec<Raw> = (0..n)
        .map(|i| Raw::connect(addr, &format!("u{i}"), "phone"))
        .collect();
    for c in &mut conns {
        c.write(&frame(0x81, br#"{"t":"nope","id":"x"}"#));
        c.reply("x");
    }
    let held = open_fds(&server) - base;
    assert!(
        held <= n + n / 20,
        "{n} connections hold {held} descriptors (one each expected)"
    );
    // Every way a connection ends: the peer's close, a protocol error (server's close
    // handshake), the peer vanishing.
    for (i, mut c) in conns.into_iter().enumerate() {
        match i % 3 {
            0 => {
                c.write(&frame(0x88, &close_payload(1000, b"")));
                c.close_payload();
            }
            1 => {
                c.write(&frame(0xC1, b"x"));
                assert_eq!(c.close_code(), 1002);
                c.write(&frame(0x88, &close_payload(1000, b"")));
            }
            _ => {}
        }
    }
    let after = fds_settle(&server, base);
    assert!(
        after <= base,
        "descriptors left after {n} connections ended: {after} (before: {base})"
    );
    warm.write(&frame(0x81, br#"{"t":"nope","id":"w"}"#));
    warm.reply("w");
}
