//! Bad input: every malformed frame gets its `error` code (with the frame's `id` when it has
//! one), changes nothing, and leaves the connection usable; frames over 64 KiB close with 1009,
//! invalid UTF-8 closes with 1007.

mod common;

use common::*;
use serde_json::{Value, json};

/// alice/phone and bob/phone, both past hello with their link events read.
struct Pair {
    _server: Server,
    alice: Client,
    bob: Client,
    counter: usize,
}

fn pair() -> Pair {
    let server = Server::start(ServerOpts::default());
    let addr = server.addr();
    let mut alice = Client::dev(addr, "alice", "phone");
    alice.hello();
    let mut bob = Client::dev(addr, "bob", "phone");
    bob.hello();
    // Settle both logs: read each own `linked` event so later events are all messages.
    for (c, user) in [(&mut alice, "alice"), (&mut bob, "bob")] {
        c.recv_until_described(&format!("{user}'s linked event"), |v| {
            v["t"] == "ev" && v["kind"] == "device" && v["device"] == "phone"
        });
    }
    Pair {
        _server: server,
        alice,
        bob,
        counter: 0,
    }
}

impl Pair {
    /// The connection still sends and receives, and the bad frames appended nothing: the next
    /// event in both logs is this message, right after the last one seen.
    fn assert_usable(&mut self) {
        self.counter += 1;
        let id = format!("ok{}", self.counter);
        let alice_last = self.alice.last_seq();
        let bob_last = self.bob.last_seq();
        let sent = self.alice.send_and_wait(&id, "bob", &id);
        for (c, last) in [(&mut self.alice, alice_last), (&mut self.bob, bob_last)] {
            let ev = c.recv_until(|v| v["t"] == "ev");
            assert_eq!(
                ev["kind"],
                "msg",
                "[{}] a bad frame appended an event: {ev}",
                c.label()
            );
            assert_eq!(ev["msg"], sent["msg"], "[{}] {ev}", c.label());
            assert_eq!(seq_of(&ev), last + 1, "[{}] {ev}", c.label());
        }
        assert!(
            !self.alice.backlog().iter().any(|v| v["t"] == "error"),
            "unexpected extra error frames: {:?}",
            self.alice.backlog()
        );
    }
}

fn expect_error(c: &mut Client, code: &str, id: Option<&str>) -> Value {
    let err = c.next_error();
    assert_eq!(err["code"], code, "{err}");
    match id {
        Some(id) => assert_eq!(
            err["id"], id,
            "an error for a frame with an id carries it: {err}"
        ),
        None => assert!(err["id"].is_null(), "no id to echo: {err}"),
    }
    err
}

#[test]
fn binary_frame_gets_bad_frame_and_connection_stays_usable() {
    let mut p = pair();
    p.alice
        .send_binary(br#"{"t":"send","id":"bin","to":"bob","body":"x"}"#.to_vec());
    let err = p.alice.next_error();
    assert_eq!(err["code"], "bad_frame", "{err}");
    p.assert_usable();
}

#[test]
fn non_json_gets_bad_json_and_connection_stays_usable() {
    let mut p = pair();
    p.alice.send_text("this is not json");
    let err = expect_error(&mut p.alice, "bad_json", None);
    assert!(err["reason"].is_string(), "errors carry a reason: {err}");
    p.alice.send_text(r#"{"t":"send","id":"trunc","to":"bob""#);
    expect_error(&mut p.alice, "bad_json", None);
    p.assert_usable();
}

#[test]
fn unknown_type_gets_unknown_type_with_its_id() {
    let mut p = pair();
    p.alice.send_json(json!({"t": "frobnicate", "id": "u1"}));
    expect_error(&mut p.alice, "unknown_type", Some("u1"));
    p.alice.send_json(json!({"t": "frobnicate"}));
    expect_error(&mut p.alice, "unknown_type", None);
    p.assert_usable();
}

#[test]
fn missing_field_gets_missing_field_with_its_id() {
    let mut p = pair();
    p.alice
        .send_json(json!({"t": "send", "id": "m1", "to": "bob"}));
    expect_error(&mut p.alice, "missing_field", Some("m1"));
    p.alice
        .send_json(json!({"t": "send", "id": "m2", "body": "no recipient"}));
    expect_error(&mut p.alice, "missing_field", Some("m2"));
    p.alice.send_json(json!({"t": "ack"}));
    expect_error(&mut p.alice, "missing_field", None);
    p.assert_usable();
    // A refused send stored nothing: sending the same id properly now is a new message.
    let sent = p.alice.send_and_wait("m1", "bob", "now complete");
    let ev = p.bob.next_msg();
    assert_eq!(ev["msg"], sent["msg"]);
    assert_eq!(ev["body"], "now complete");
}

#[test]
fn bad_ids_get_bad_id_with_the_frame_id() {
    let mut p = pair();
    let too_long = "x".repeat(65);
    for (n, to) in ["bob smith", "", "bob/../etc", "émile", too_long.as_str()]
        .iter()
        .enumerate()
    {
        let id = format!("b{n}");
        p.alice
            .send_json(json!({"t": "send", "id": id, "to": to, "body": "x"}));
        expect_error(&mut p.alice, "bad_id", Some(&id));
    }
    // The client id itself must be 1–64 bytes.
    p.alice
        .send_json(json!({"t": "send", "id": "", "to": "bob", "body": "x"}));
    let err = p.alice.next_error();
    assert_eq!(err["code"], "bad_id", "empty client id: {err}");
    p.alice
        .send_json(json!({"t": "send", "id": "i".repeat(65), "to": "bob", "body": "x"}));
    let err = p.alice.next_error();
    assert_eq!(err["code"], "bad_id", "65-byte client id: {err}");
    p.assert_usable();
}

#[test]
fn body_over_the_limit_gets_too_large_with_its_id() {
    let mut p = pair();
    // 20 KiB body: over the 16 KiB body limit, the frame well under 64 KiB.
    let body = "y".repeat(20 * 1024);
    p.alice
        .send_json(json!({"t": "send", "id": "big", "to": "bob", "body": body}));
    expect_error(&mut p.alice, "too_large", Some("big"));
    p.assert_usable();
}

#[test]
fn ack_beyond_head_gets_bad_seq_and_keeps_the_cursor() {
    let mut p = pair();
    let head = p.bob.last_seq();
    p.bob.send_json(json!({"t": "ack", "seq": head + 1000}));
    expect_error(&mut p.bob, "bad_seq", None);
    p.bob
        .send_json(json!({"t": "ack", "seq": head + 1, "id": "a1"}));
    expect_error(&mut p.bob, "bad_seq", Some("a1"));
    p.assert_usable();

    // The refused acks moved nothing: bob has never acked, so the cursor is still 0.
    let addr = p._server.addr();
    let mut bob = Client::dev(addr, "bob", "phone");
    let hello = bob.hello();
    assert_eq!(
        hello["cursor"], 0,
        "a refused ack changes no cursor: {hello}"
    );
}

#[test]
fn bad_frames_in_a_row_each_get_their_error_in_order() {
    let mut p = pair();
    p.alice.send_text("nope");
    p.alice.send_binary(vec![1, 2, 3]);
    p.alice.send_json(json!({"t": "frobnicate", "id": "r1"}));
    p.alice
        .send_json(json!({"t": "send", "id": "r2", "to": "bob"}));
    p.alice
        .send_json(json!({"t": "send", "id": "r3", "to": "no way", "body": "x"}));
    p.alice
        .send_json(json!({"t": "send", "id": "r4", "to": "bob", "body": "z".repeat(20 * 1024)}));
    p.alice.send_json(json!({"t": "ack", "seq": 1_000_000}));
    let want = [
        ("bad_json", None),
        ("bad_frame", None),
        ("unknown_type", Some("r1")),
        ("missing_field", Some("r2")),
        ("bad_id", Some("r3")),
        ("too_large", Some("r4")),
        ("bad_seq", None),
    ];
    for (code, id) in want {
        expect_error(&mut p.alice, code, id);
    }
    p.assert_usable();
}

#[test]
fn frame_over_64_kib_closes_with_1009() {
    let mut p = pair();
    // One text frame of ~70 KiB (valid JSON).
    let body = "w".repeat(70 * 1024);
    p.alice
        .send_json(json!({"t": "send", "id": "huge", "to": "bob", "body": body}));
    assert_eq!(
        p.alice.expect_close(),
        1009,
        "a frame over max_frame_bytes closes with 1009"
    );

    // Nothing was stored, and the device reconnects and works.
    let addr = p._server.addr();
    let mut alice = Client::dev(addr, "alice", "phone");
    alice.hello();
    p.alice = alice;
    p.alice
        .recv_until(|v| v["t"] == "ev" && v["kind"] == "device");
    p.assert_usable();
}

#[test]
fn invalid_utf8_text_frame_closes_with_1007() {
    let mut p = pair();
    let mut payload = br#"{"t":"send","id":"u8","to":"bob","body":""#.to_vec();
    payload.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    payload.extend_from_slice(br#""}"#);
    p.alice.send_raw_frame(0x1, &payload);
    assert_eq!(
        p.alice.expect_close(),
        1007,
        "invalid UTF-8 in a text frame closes with 1007"
    );

    let addr = p._server.addr();
    let mut alice = Client::dev(addr, "alice", "phone");
    alice.hello();
    p.alice = alice;
    p.alice
        .recv_until(|v| v["t"] == "ev" && v["kind"] == "device");
    p.assert_usable();
}
