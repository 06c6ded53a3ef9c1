//! Durability: a clean stop (SIGTERM → 1001, exit 0) and restart keeps every message and every
//! cursor; a retried `send` is deduplicated across restarts and crashes; and a SIGKILL at a random
//! moment under load loses nothing that got `sent`, duplicates nothing and keeps send order.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn connected(addr: SocketAddr, user: &str, device: &str) -> (Client, Value) {
    let mut c = Client::dev(addr, user, device);
    let hello = c.hello();
    (c, hello)
}

#[test]
fn shutdown_closes_connections_with_1001_and_exits_zero() {
    let mut server = Server::start(ServerOpts::default());
    let (mut c, _) = connected(server.addr(), "alice", "phone");
    std::thread::scope(|s| {
        let reader = s.spawn(move || c.expect_close());
        server.stop();
        let code = reader.join().expect("reader thread");
        assert_eq!(code, 1001, "shutdown closes connections with 1001");
    });
}

#[test]
fn clean_restart_keeps_every_acked_message_and_every_cursor() {
    let mut server = Server::start(ServerOpts::shards(2));
    let addr = server.addr();
    let (mut alice, _) = connected(addr, "alice", "phone");
    let (mut bob_phone, _) = connected(addr, "bob", "phone");
    let (mut bob_tablet, _) = connected(addr, "bob", "tablet");

    const N: usize = 20;
    let sents = alice.send_many("bob", "k", N, 8);
    let mut phone_msgs = Vec::new();
    for _ in 0..N {
        phone_msgs.push(bob_phone.next_msg());
    }
    let mut tablet_msgs = Vec::new();
    for _ in 0..N {
        tablet_msgs.push(bob_tablet.next_msg());
    }
    assert_eq!(phone_msgs, tablet_msgs, "both devices see the same events");
    let phone_cursor = seq_of(&phone_msgs[N - 1]);
    let tablet_cursor = seq_of(&tablet_msgs[N / 2 - 1]);
    bob_phone.ack(phone_cursor);
    bob_tablet.ack(tablet_cursor);
    // alice acks her whole log (her own copies of the 20 messages).
    let mut alice_msgs = Vec::new();
    for _ in 0..N {
        alice_msgs.push(alice.next_msg());
    }
    let alice_cursor = seq_of(&alice_msgs[N - 1]);
    alice.ack(alice_cursor);
    // A round trip on each connection: the server has read the ack before answering this.
    let sync_a = alice.send_and_wait("sync-a", "carol", "sync");
    let sync_p = bob_phone.send_and_wait("sync-p", "carol", "sync");
    let sync_t = bob_tablet.send_and_wait("sync-t", "carol", "sync");
    // What each log holds after the cursors, as seen before the stop. (Other kinds of events,
    // e.g. receipts, may be appended concurrently: only what was seen is compared.)
    let bob_tail: Vec<Value> = events_until_msgs(&mut bob_phone, &[&sync_p, &sync_t])
        .into_iter()
        .filter(|v| seq_of(v) > phone_cursor)
        .collect();
    let bob_syncs: Vec<Value> = msgs(&bob_tail).into_iter().cloned().collect();
    assert_eq!(bob_syncs.len(), 2, "bob's two syncs: {bob_tail:?}");
    let alice_tail: Vec<Value> = events_until_msgs(&mut alice, &[&sync_a])
        .into_iter()
        .filter(|v| seq_of(v) > alice_cursor)
        .collect();
    drop((alice, bob_phone, bob_tablet));

    server.stop();
    server.restart();
    let addr = server.addr();

    let (mut bob_phone, hello) = connected(addr, "bob", "phone");
    assert_eq!(
        hello["cursor"], phone_cursor,
        "the phone's cursor survives: {hello}"
    );
    let bob_head = u64_of(&hello, "head");
    assert_tail_survives(&mut bob_phone, &hello, &bob_tail);

    let (mut bob_tablet, hello) = connected(addr, "bob", "tablet");
    assert_eq!(
        hello["cursor"], tablet_cursor,
        "the tablet's cursor survives: {hello}"
    );
    let replay = bob_tablet.collect_events_until_seq(bob_head);
    let replayed_msgs: Vec<Value> = msgs(&replay).into_iter().cloned().collect();
    assert_eq!(
        &replayed_msgs[..N / 2],
        &tablet_msgs[N / 2..],
        "unacked messages come back identical"
    );

    let (mut alice, hello) = connected(addr, "alice", "phone");
    assert_eq!(
        hello["cursor"], alice_cursor,
        "alice's cursor survives: {hello}"
    );
    assert_tail_survives(&mut alice, &hello, &alice_tail);

    // A fresh device reads bob's whole log: every message, once, in order, same ids.
    let (_, events) = read_whole_log(addr, "bob", "verifier");
    let got: Vec<(String, String)> = msgs(&events)
        .iter()
        .map(|v| (str_of(v, "body").to_string(), str_of(v, "msg").to_string()))
        .collect();
    let mut want: Vec<(String, String)> = sents
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("k{i}"), str_of(s, "msg").to_string()))
        .collect();
    for sync in &bob_syncs {
        want.push(("sync".into(), str_of(sync, "msg").to_string()));
    }
    assert_eq!(got, want, "bob's log after restart");

    // New events continue the sequence: no seq is reused.
    bob_tablet.send_and_wait("after", "alice", "after restart");
    let ev = bob_phone.next_msg();
    assert_eq!(ev["body"], "after restart");
    assert!(seq_of(&ev) > bob_head, "no seq reused after restart: {ev}");
}

/// Reads events until the msg events of all these `sent` frames have arrived; returns every
/// event read on the way (including those).
fn events_until_msgs(c: &mut Client, sents: &[&Value]) -> Vec<Value> {
    let mut missing: HashSet<String> = sents.iter().map(|s| str_of(s, "msg").to_string()).collect();
    let mut events = Vec::new();
    while !missing.is_empty() {
        let ev = c.recv_until_described("an event", |v| v["t"] == "ev");
        if is_msg(&ev) {
            missing.remove(str_of(&ev, "msg"));
        }
        events.push(ev);
    }
    events
}

/// After a restart, the events seen after the cursor before the stop come again first,
/// identical (seq, ts, ids, bodies), and the head did not go back.
fn assert_tail_survives(c: &mut Client, hello: &Value, tail: &[Value]) {
    let head = u64_of(hello, "head");
    let last_seen = tail.last().map(seq_of).unwrap_or(0);
    assert!(
        head >= last_seen,
        "[{}] head went back from {last_seen}: {hello}",
        c.label()
    );
    let replay = c.collect_events_until_seq(head);
    assert!(
        replay.len() >= tail.len(),
        "[{}] replay shorter than before the stop",
        c.label()
    );
    assert_eq!(
        &replay[..tail.len()],
        tail,
        "[{}] events after the cursor come back identical",
        c.label()
    );
}

/// Shared body of the dedupe-after-restart tests.
fn retried_send_after_restart_is_deduplicated(crash: bool) {
    let mut server = Server::start(ServerOpts::default());
    let addr = server.addr();
    let (mut alice, _) = connected(addr, "alice", "phone");
    let first = alice.send_and_wait("d1", "bob", "only once");
    drop(alice);
    if crash {
        server.kill9();
    } else {
        server.stop();
    }
    server.restart();
    let addr = server.addr();

    let (mut alice, _) = connected(addr, "alice", "phone");
    let again = alice.send_and_wait("d1", "bob", "only once");
    assert_eq!(
        again, first,
        "a retry after a restart gets the identical sent"
    );
    let marker = alice.send_and_wait("d2", "bob", "marker");
    drop(alice);

    let (_, events) = read_whole_log(addr, "bob", "verifier");
    let found: Vec<&str> = msgs(&events).iter().map(|v| str_of(v, "msg")).collect();
    assert_eq!(
        found,
        vec![str_of(&first, "msg"), str_of(&marker, "msg")],
        "the retried message is in bob's log once"
    );
    let (_, events) = read_whole_log(addr, "alice", "verifier");
    assert_eq!(
        msgs(&events).len(),
        2,
        "and once in alice's log: {events:?}"
    );
}

#[test]
fn retried_send_after_clean_restart_gets_the_same_sent_and_no_new_event() {
    retried_send_after_restart_is_deduplicated(false);
}

#[test]
fn retried_send_after_crash_gets_the_same_sent_and_no_new_event() {
    retried_send_after_restart_is_deduplicated(true);
}

// ---------------------------------------------------------------------------------------------
// Crash under load
// ---------------------------------------------------------------------------------------------

const CRASH_ROUNDS: usize = 5;
const CRASH_USERS: usize = 4;
/// Unanswered sends a client keeps in flight.
const WINDOW: usize = 64;
/// Upper bound on the messages one client sends in a round.
const MAX_SENDS: usize = 20_000;
/// Upper bound on how long one client sends in a round.
const MAX_SEND_TIME: Duration = Duration::from_secs(8);

struct SenderReport {
    user: usize,
    /// index → msg id, for every send that got its `sent`.
    acked: BTreeMap<usize, String>,
    written: usize,
    errors: Vec<Value>,
    ended_by: String,
}

fn crash_user(i: usize) -> String {
    format!("crash{i}")
}

/// Sends `crash{i}:{n}` to the next user as fast as the window allows until the connection dies
/// (or a bound is hit); records every `sent`.
fn crash_sender(addr: SocketAddr, user: usize, started: mpsc::Sender<usize>) -> SenderReport {
    let me = crash_user(user);
    let peer = crash_user((user + 1) % CRASH_USERS);
    let mut c = Client::dev(addr, &me, "d");
    c.hello();
    let mut report = SenderReport {
        user,
        acked: BTreeMap::new(),
        written: 0,
        errors: Vec::new(),
        ended_by: String::new(),
    };
    let mut outstanding = 0usize;
    let mut told = false;
    let start = Instant::now();
    loop {
        let sending = report.written < MAX_SENDS && start.elapsed() < MAX_SEND_TIME;
        if sending && outstanding < WINDOW {
            let mut wrote = false;
            while outstanding < WINDOW && report.written < MAX_SENDS {
                let n = report.written;
                let frame = json!({"t": "send", "id": format!("m{n}"), "to": peer, "body": format!("{me}:{n}")});
                if let Err(e) = c.write_json(frame) {
                    report.ended_by = format!("write: {e}");
                    return report;
                }
                report.written += 1;
                outstanding += 1;
                wrote = true;
            }
            if wrote && let Err(e) = c.flush() {
                report.ended_by = format!("flush: {e}");
                return report;
            }
        }
        if !sending && outstanding == 0 {
            report.ended_by = "bound reached".into();
            return report;
        }
        match c.try_recv_json(RECV_TIMEOUT) {
            Ok(v) if v["t"] == "sent" => {
                let n: usize = v["id"]
                    .as_str()
                    .and_then(|s| s[1..].parse().ok())
                    .expect("sent id");
                let msg = v["msg"].as_str().expect("sent msg").to_string();
                assert!(
                    report.acked.insert(n, msg).is_none(),
                    "[{me}] two sent for m{n}"
                );
                outstanding -= 1;
                if !told {
                    told = true;
                    let _ = started.send(user);
                }
            }
            Ok(v) if v["t"] == "error" => {
                // rate_limited / busy: the send was not stored; it is simply not retried.
                report.errors.push(v);
                outstanding -= 1;
            }
            // Own copies and received messages: checked after the restart instead.
            Ok(_) => {}
            Err(e) => {
                report.ended_by = format!("{e:?}");
                return report;
            }
        }
    }
}

/// Checks one user's whole log after the crash against what the senders were told.
/// Every message in `user`'s log is from `user` or the user before it, once, in send order per
/// sender, with the id its `sent` gave; every message in `acked` (per sender: index → msg id) is
/// there. Returns the log size.
fn verify_log(
    addr: SocketAddr,
    user: usize,
    acked: &[BTreeMap<usize, String>],
    phase: &str,
) -> usize {
    let me = crash_user(user);
    let prev = (user + CRASH_USERS - 1) % CRASH_USERS;
    let (_, events) = read_whole_log(addr, &me, "verifier");
    let mut seen_ids = HashSet::new();
    // (sender index) → indices in log order
    let mut order: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for ev in msgs(&events) {
        let msg = str_of(ev, "msg").to_string();
        assert!(
            seen_ids.insert(msg.clone()),
            "[{phase}] {me}: msg {msg} twice in the log"
        );
        let body = str_of(ev, "body");
        let (sender, n) = body.split_once(':').expect("body sender:n");
        let sender: usize = sender.trim_start_matches("crash").parse().expect("sender");
        let n: usize = n.parse().expect("n");
        assert!(
            sender == user || sender == prev,
            "[{phase}] {me}: foreign message {ev}"
        );
        assert_eq!(ev["from"], crash_user(sender), "{ev}");
        let chat = if sender == user {
            crash_user((user + 1) % CRASH_USERS)
        } else {
            crash_user(sender)
        };
        assert_eq!(ev["chat"], chat, "{ev}");
        if let Some(acked_msg) = acked[sender].get(&n) {
            assert_eq!(
                acked_msg, &msg,
                "[{phase}] {me}: {body} has another id than its sent"
            );
        }
        order.entry(sender).or_default().push(n);
    }
    for sender in [user, prev] {
        let got = order.remove(&sender).unwrap_or_default();
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "[{phase}] {me}: messages of {} out of order or repeated",
            crash_user(sender)
        );
        let present: HashSet<usize> = got.iter().copied().collect();
        let lost: Vec<usize> = acked[sender]
            .keys()
            .filter(|n| !present.contains(n))
            .copied()
            .collect();
        assert!(
            lost.is_empty(),
            "[{phase}] {me}: {} messages of {} that got `sent` are missing, first ones: {:?}",
            lost.len(),
            crash_user(sender),
            &lost[..lost.len().min(10)]
        );
    }
    events.len()
}

/// After the restart, the sender's device retries every send that got no `sent` (a real
/// client's duty) and a few that did; returns index → msg id for every message it wrote. A retry
/// of an answered send must get the same msg id.
fn retry_unanswered(
    addr: SocketAddr,
    report: &SenderReport,
    phase: &str,
) -> BTreeMap<usize, String> {
    let me = crash_user(report.user);
    let peer = crash_user((report.user + 1) % CRASH_USERS);
    let mut c = Client::dev(addr, &me, "d");
    c.hello();
    let mut retry: Vec<usize> = (0..report.written)
        .filter(|n| !report.acked.contains_key(n))
        .collect();
    retry.extend(report.acked.keys().rev().take(3).copied());
    retry.sort_unstable();
    for &n in &retry {
        let frame =
            json!({"t": "send", "id": format!("m{n}"), "to": peer, "body": format!("{me}:{n}")});
        c.write_json(frame)
            .unwrap_or_else(|e| panic!("[{phase}] {me}: retry write: {e}"));
    }
    c.flush()
        .unwrap_or_else(|e| panic!("[{phase}] {me}: retry flush: {e}"));
    let mut all = report.acked.clone();
    let mut answered = HashSet::new();
    while answered.len() < retry.len() {
        // Skip the replay of the whole log (cursor 0) without keeping it.
        let v = match c.try_recv_json(RECV_TIMEOUT) {
            Ok(v) => v,
            Err(e) => panic!("[{phase}] {me}: waiting for retried sents: {e:?}"),
        };
        match v["t"].as_str() {
            Some("sent") => {
                let n: usize = str_of(&v, "id")[1..].parse().expect("sent id");
                let msg = str_of(&v, "msg").to_string();
                assert!(
                    answered.insert(n),
                    "[{phase}] {me}: two sent for retried m{n}"
                );
                if let Some(before) = report.acked.get(&n) {
                    assert_eq!(
                        before, &msg,
                        "[{phase}] {me}: retried m{n} got a new msg id"
                    );
                }
                all.insert(n, msg);
            }
            Some("error") => panic!("[{phase}] {me}: a retry was refused: {v}"),
            _ => {}
        }
    }
    c.close();
    assert_eq!(all.len(), report.written);
    all
}

#[test]
fn crash_loses_nothing_acked() {
    let (mut rng, seed) = Rng::from_time();
    eprintln!("crash_loses_nothing_acked: seed {seed}");
    let test_start = Instant::now();
    for round in 0..CRASH_ROUNDS {
        let mut server = Server::start(ServerOpts::shards(3));
        let addr = server.addr();
        let (started_tx, started_rx) = mpsc::channel();
        let handles: Vec<_> = (0..CRASH_USERS)
            .map(|user| {
                let tx = started_tx.clone();
                std::thread::spawn(move || crash_sender(addr, user, tx))
            })
            .collect();
        drop(started_tx);
        // Every sender has had at least one `sent`: the load is on.
        for _ in 0..CRASH_USERS {
            started_rx
                .recv_timeout(Duration::from_secs(20))
                .expect("every sender gets a first sent within 20 s");
        }
        // A random moment under load (the sleep picks the moment; it synchronizes nothing).
        let delay = rng.range(0, 1500);
        std::thread::sleep(Duration::from_millis(delay));
        server.kill9();
        let reports: Vec<SenderReport> = handles
            .into_iter()
            .map(|h| h.join().expect("sender thread panicked"))
            .collect();
        let acked: usize = reports.iter().map(|r| r.acked.len()).sum();
        let written: usize = reports.iter().map(|r| r.written).sum();

        server.restart();
        let addr = server.addr();
        let acked_maps: Vec<BTreeMap<usize, String>> =
            reports.iter().map(|r| r.acked.clone()).collect();
        let phase = format!("round {round}, after the crash");
        let mut log_sizes = Vec::new();
        for user in 0..CRASH_USERS {
            log_sizes.push(verify_log(addr, user, &acked_maps, &phase));
        }
        // Clients retry what got no answer: then every written message is in, exactly once.
        let phase = format!("round {round}, after retries");
        let complete: Vec<BTreeMap<usize, String>> = reports
            .iter()
            .map(|r| retry_unanswered(addr, r, &phase))
            .collect();
        for user in 0..CRASH_USERS {
            verify_log(addr, user, &complete, &phase);
        }
        for r in &reports {
            eprintln!(
                "  round {round} {}: written {}, acked {}, errors {}, ended by {}",
                crash_user(r.user),
                r.written,
                r.acked.len(),
                r.errors.len(),
                r.ended_by
            );
        }
        eprintln!(
            "round {round}: killed after {delay} ms; {acked} acked of {written} written; log sizes {log_sizes:?}"
        );
        assert!(acked > 0, "round {round}: the senders got no sent at all");
        server.stop();
        if test_start.elapsed() > Duration::from_secs(90) {
            eprintln!(
                "crash_loses_nothing_acked: stopping after {} rounds (time bound)",
                round + 1
            );
            break;
        }
    }
}
