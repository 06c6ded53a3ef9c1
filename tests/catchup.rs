//! Catch-up: `hello` then every event in `(cursor, head]` in order, then live events with no gap;
//! the cursor moves only with `ack` (forward only); unacked events come again after a reconnect.

mod common;

use common::*;
use serde_json::Value;

fn connected(addr: std::net::SocketAddr, user: &str, device: &str) -> (Client, Value) {
    let mut c = Client::dev(addr, user, device);
    let hello = c.hello();
    (c, hello)
}

/// Waits for this device's own `linked` event and returns its seq.
fn own_linked_seq(c: &mut Client, device: &str) -> u64 {
    let device = device.to_string();
    let ev = c.recv_until_described("own linked event", move |v| {
        v["t"] == "ev"
            && v["kind"] == "device"
            && v["op"] == "linked"
            && v["device"] == device.as_str()
    });
    seq_of(&ev)
}

/// A frame that takes a round trip through the server after everything sent before it on this
/// connection: a message to `to`, answered by `sent`.
fn round_trip(c: &mut Client, id: &str, to: &str) {
    c.send_and_wait(id, to, id);
}

#[test]
fn hello_describes_a_new_device() {
    let server = Server::start(ServerOpts::default());
    let (mut c, hello) = connected(server.addr(), "dora", "phone");
    assert_eq!(hello["user"], "dora", "{hello}");
    assert_eq!(hello["device"], "phone", "{hello}");
    assert_eq!(
        hello["cursor"], 0,
        "a new device starts at cursor 0: {hello}"
    );
    let head = u64_of(&hello, "head");
    let low = u64_of(&hello, "low");
    assert!(low <= 1, "nothing pruned in a fresh log: {hello}");
    assert!(
        hello["gap"].is_null() || hello["gap"] == false,
        "no gap: {hello}"
    );
    // The first device's own `linked` event is in the log (before or after head).
    let seq = own_linked_seq(&mut c, "phone");
    assert_eq!(seq, 1, "the first event of a fresh log is seq 1");
    assert!(
        head <= 1,
        "a fresh log holds at most the linked event: {hello}"
    );
}

#[test]
fn offline_device_catches_up_in_order_then_gets_live_events() {
    let server = Server::start(ServerOpts::default());
    let addr = server.addr();
    let (mut alice, _) = connected(addr, "alice", "phone");
    let (mut bob_phone, _) = connected(addr, "bob", "phone");

    // The tablet links, acks everything it has, and goes offline.
    let (mut tablet, _) = connected(addr, "bob", "tablet");
    let acked = own_linked_seq(&mut tablet, "tablet");
    tablet.ack(acked);
    tablet.close();

    const N: usize = 500;
    let sents = alice.send_many("bob", "c", N, 64);
    // The online device got them live, in order.
    for (i, sent) in sents.iter().enumerate() {
        let ev = bob_phone.next_msg();
        assert_eq!(
            ev["body"],
            format!("c{i}"),
            "[bob/phone] live order at {i}: {ev}"
        );
        assert_eq!(ev["msg"], sent["msg"], "{ev}");
    }
    let head_before = bob_phone.last_seq();

    let (mut tablet, hello) = connected(addr, "bob", "tablet");
    assert_eq!(
        hello["cursor"], acked,
        "the cursor is where the tablet acked: {hello}"
    );
    let head = u64_of(&hello, "head");
    assert_eq!(head, head_before, "head is bob's last event: {hello}");
    // Seq continuity from cursor+1 is checked on every frame by the client.
    let events = tablet.collect_events_until_seq(head);
    assert_eq!(
        events.len() as u64,
        head - acked,
        "every event in (cursor, head]"
    );
    let got = bodies(&events);
    let want: Vec<String> = (0..N).map(|i| format!("c{i}")).collect();
    assert_eq!(
        got, want,
        "the tablet catches up with all 500 in order, each once"
    );
    for (ev, sent) in msgs(&events).iter().zip(&sents) {
        assert_eq!(ev["msg"], sent["msg"], "{ev}");
    }

    // Then live events, continuing the same seq sequence.
    for i in 0..5 {
        alice.send_and_wait(&format!("live{i}"), "bob", &format!("live{i}"));
    }
    for i in 0..5 {
        let ev = tablet.next_msg();
        assert_eq!(
            ev["body"],
            format!("live{i}"),
            "[bob/tablet] live after catch-up: {ev}"
        );
        assert_eq!(
            seq_of(&ev),
            head + 1 + i,
            "no gap between catch-up and live: {ev}"
        );
    }
}

#[test]
fn unacked_events_are_sent_again_after_reconnect() {
    let server = Server::start(ServerOpts::default());
    let addr = server.addr();
    let (mut alice, _) = connected(addr, "alice", "phone");
    let (mut bob, hello) = connected(addr, "bob", "phone");
    let cursor = u64_of(&hello, "cursor");
    for i in 0..10 {
        alice.send_and_wait(&format!("u{i}"), "bob", &format!("u{i}"));
    }
    let mut first_time = Vec::new();
    for _ in 0..10 {
        first_time.push(bob.next_msg());
    }
    bob.close();

    let (mut bob, hello) = connected(addr, "bob", "phone");
    assert_eq!(
        hello["cursor"], cursor,
        "without ack the cursor stays: {hello}"
    );
    let head = u64_of(&hello, "head");
    let events = bob.collect_events_until_seq(head);
    let again: Vec<Value> = msgs(&events).into_iter().cloned().collect();
    assert_eq!(
        again, first_time,
        "the same events (seq, msg, body, ts) come again"
    );
}

#[test]
fn ack_moves_the_cursor_and_reconnect_resumes_after_it() {
    let server = Server::start(ServerOpts::default());
    let addr = server.addr();
    let (mut alice, _) = connected(addr, "alice", "phone");
    let (mut bob, _) = connected(addr, "bob", "phone");
    for i in 0..10 {
        alice.send_and_wait(&format!("a{i}"), "bob", &format!("a{i}"));
    }
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(bob.next_msg());
    }
    let acked = seq_of(&got[4]);
    bob.ack(acked);
    round_trip(&mut bob, "sync", "alice");
    bob.close();

    let (mut bob, hello) = connected(addr, "bob", "phone");
    assert_eq!(
        hello["cursor"], acked,
        "the cursor is the acked seq: {hello}"
    );
    let first = bob.recv_until(|v| v["t"] == "ev");
    assert_eq!(
        seq_of(&first),
        acked + 1,
        "replay starts right after the cursor: {first}"
    );
    assert_eq!(
        first, got[5],
        "the first replayed event is the one after the acked one"
    );
    let head = u64_of(&hello, "head");
    let rest = bob.collect_events_until_seq(head);
    let replayed: Vec<Value> = std::iter::once(first).chain(rest).collect();
    let replayed_msgs: Vec<Value> = msgs(&replayed).into_iter().cloned().collect();
    assert_eq!(
        &replayed_msgs[..5],
        &got[5..],
        "messages after the cursor come again"
    );
    assert_eq!(
        replayed_msgs.len(),
        6,
        "5 unacked messages and bob's own `sync`: {replayed_msgs:?}"
    );
    assert_eq!(replayed_msgs[5]["body"], "sync");
}

#[test]
fn ack_never_moves_the_cursor_back() {
    let server = Server::start(ServerOpts::default());
    let addr = server.addr();
    let (mut alice, _) = connected(addr, "alice", "phone");
    let (mut bob, _) = connected(addr, "bob", "phone");
    for i in 0..6 {
        alice.send_and_wait(&format!("b{i}"), "bob", &format!("b{i}"));
    }
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(bob.next_msg());
    }
    let high = seq_of(&got[4]);
    let low = seq_of(&got[1]);
    bob.ack(high);
    bob.ack(low);
    round_trip(&mut bob, "sync", "alice");
    bob.close();

    let (_bob, hello) = connected(addr, "bob", "phone");
    assert_eq!(
        hello["cursor"], high,
        "a lower ack does not move the cursor back: {hello}"
    );
}

#[test]
fn a_new_device_starts_at_cursor_zero_and_sees_the_whole_log() {
    let server = Server::start(ServerOpts::default());
    let addr = server.addr();
    let (mut alice, _) = connected(addr, "alice", "phone");
    let (mut bob_phone, _) = connected(addr, "bob", "phone");
    let phone_linked = own_linked_seq(&mut bob_phone, "phone");
    let sents = alice.send_many("bob", "w", 5, 5);
    for _ in 0..5 {
        bob_phone.next_msg();
    }
    bob_phone.ack(bob_phone.last_seq());

    let (mut laptop, hello) = connected(addr, "bob", "laptop");
    assert_eq!(
        hello["cursor"], 0,
        "a new device starts at cursor 0 even if others acked: {hello}"
    );
    let laptop_linked = own_linked_seq(&mut laptop, "laptop");
    // Everything before the laptop's own link (which `own_linked_seq` consumed).
    let events = laptop.collect_events_until_seq(laptop_linked - 1);
    assert_eq!(
        events.len() as u64,
        laptop_linked - 1,
        "seq 1..linked, each once"
    );
    assert_eq!(seq_of(&events[0]), 1);
    let linked: Vec<&Value> = events
        .iter()
        .filter(|v| v["kind"] == "device" && v["op"] == "linked" && v["device"] == "phone")
        .collect();
    assert_eq!(linked.len(), 1, "the phone's link is in the log once");
    assert_eq!(seq_of(linked[0]), phone_linked);
    let got: Vec<&str> = msgs(&events).iter().map(|v| str_of(v, "msg")).collect();
    let want: Vec<&str> = sents.iter().map(|v| str_of(v, "msg")).collect();
    assert_eq!(
        got, want,
        "the laptop sees the messages sent before it existed"
    );

    // The phone sees the laptop's link live, with the same seq.
    let seen_by_phone = own_linked_seq(&mut bob_phone, "laptop");
    assert_eq!(
        seen_by_phone, laptop_linked,
        "every device sees the same event at the same seq"
    );
}

#[test]
fn message_to_a_user_who_never_connected_waits_in_their_log() {
    let server = Server::start(ServerOpts::default());
    let addr = server.addr();
    let (mut alice, _) = connected(addr, "alice", "phone");
    let sent = alice.send_and_wait("z1", "zed", "are you there?");

    let (mut zed, hello) = connected(addr, "zed", "phone");
    assert_eq!(hello["cursor"], 0, "{hello}");
    let ev = zed.next_msg();
    assert_eq!(ev["chat"], "alice", "{ev}");
    assert_eq!(ev["from"], "alice", "{ev}");
    assert_eq!(ev["body"], "are you there?", "{ev}");
    assert_eq!(ev["msg"], sent["msg"], "{ev}");
}

#[test]
fn reconnecting_during_a_burst_sees_no_gap_and_no_duplicate() {
    let server = Server::start(ServerOpts::shards(2));
    let addr = server.addr();
    let (mut alice, _) = connected(addr, "alice", "phone");
    let (mut tablet, _) = connected(addr, "bob", "tablet");
    let linked = own_linked_seq(&mut tablet, "tablet");
    assert_eq!(linked, 1);
    drop(tablet);

    const N: usize = 1500;
    // bob's log will be: his tablet's link, then alice's N messages.
    let final_head = N as u64 + 1;
    let sender = std::thread::spawn(move || alice.send_many("bob", "q", N, 64));

    let (mut rng, seed) = Rng::from_time();
    eprintln!("reconnecting_during_a_burst: seed {seed}");
    let mut seen: std::collections::BTreeMap<u64, Value> = Default::default();
    let mut acked = 0u64;
    let mut last_cursor = 0u64;
    let mut connections = 0;
    loop {
        connections += 1;
        assert!(
            connections <= 200,
            "bounded: too many reconnects without reaching the head"
        );
        let (mut c, hello) = connected(addr, "bob", "tablet");
        let cursor = u64_of(&hello, "cursor");
        assert!(
            cursor <= acked,
            "cursor {cursor} beyond the highest ack {acked}: {hello}"
        );
        assert!(
            cursor >= last_cursor,
            "cursor moved back from {last_cursor}: {hello}"
        );
        last_cursor = cursor;
        // Read a random number of events (never past the final head), contiguous from cursor+1.
        let target = (cursor + rng.range(30, 400)).min(final_head);
        let events = c.collect_events_until_seq(target);
        for ev in events {
            let seq = seq_of(&ev);
            if let Some(before) = seen.get(&seq) {
                assert_eq!(
                    before, &ev,
                    "seq {seq} is not the same event on every connection"
                );
            } else {
                seen.insert(seq, ev);
            }
        }
        if rng.range(0, 2) > 0 {
            c.ack(target);
            acked = acked.max(target);
        }
        if target == final_head {
            break;
        }
        if rng.range(0, 1) == 0 {
            c.close();
        } else {
            drop(c); // abrupt: no close handshake
        }
    }
    let sents = sender.join().expect("sender thread");
    let all: Vec<Value> = seen.into_values().collect();
    assert_eq!(
        all.len() as u64,
        final_head,
        "every seq 1..=head was delivered at least once"
    );
    let got: Vec<&str> = msgs(&all).iter().map(|v| str_of(v, "msg")).collect();
    let want: Vec<&str> = sents.iter().map(|v| str_of(v, "msg")).collect();
    assert_eq!(
        got, want,
        "the log holds alice's messages once each, in send order"
    );
    eprintln!("reconnecting_during_a_burst: {connections} connections");
}
