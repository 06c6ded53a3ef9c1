//! Hardening, at the boundary: a stalled reader is cut off (4009) without costing anyone else a
//! message or the server its memory, and catches up afterwards; a flooding connection is
//! rate-limited while everyone else is served; a reader that takes a byte now and then is dropped
//! at the write timeout; a full LMDB map answers `busy` while reads and live
//! delivery go on, and a restart with a bigger map recovers every acknowledged message; a storm of
//! reconnects ends with every device caught up at its log head with its cursor intact, accepted by
//! every shard; half-open sockets and slowloris upgrades are dropped at the handshake timeout.
//!
//! Hostile credentials are covered by `tests/auth.rs`.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, mpsc};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// How long an HTTP request to the admin listener may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// GET on the admin listener: (status, body).
fn http_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let agent = ureq::AgentBuilder::new().timeout(HTTP_TIMEOUT).build();
    let url = format!("http://{admin}{path}");
    match agent.get(&url).call() {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("GET {url}: {e}"),
    }
}

/// One metric's samples by their `shard` label (summed over other labels), from `/metrics`.
fn metric_by_shard(admin: SocketAddr, name: &str) -> BTreeMap<String, f64> {
    let (status, text) = http_get(admin, "/metrics");
    assert_eq!(status, 200, "GET /metrics: {text}");
    let mut by_shard = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let Some(labels_and_value) = rest.strip_prefix('{') else {
            continue;
        };
        let (labels, value) = labels_and_value
            .rsplit_once("} ")
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let value: f64 = value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let shard = labels
            .split(',')
            .find_map(|l| l.strip_prefix("shard=\""))
            .map(|s| s.trim_end_matches('"').to_string())
            .unwrap_or_else(|| panic!("no shard label in {line:?}"));
        *by_shard.entry(shard).or_insert(0.0) += value;
    }
    by_shard
}

fn metric_total(admin: SocketAddr, name: &str) -> f64 {
    metric_by_shard(admin, name).values().sum()
}

/// A dev-mode connection past its `hello`, with every event up to hello's `head` read.
fn settled(addr: SocketAddr, user: &str, device: &str) -> Client {
    let mut c = Client::online(addr, user, device);
    let head = u64_of(c.hello_frame().expect("hello"), "head");
    c.collect_events_until_seq(head);
    c
}

/// The `sent` or the `error` answering the `send` with client id `id` (backlog first).
fn answer_to(c: &mut Client, id: &str) -> Value {
    let id = id.to_string();
    c.recv_until_described(&format!("sent or error for {id}"), move |v| {
        (v["t"] == "sent" || v["t"] == "error") && v["id"] == id.as_str()
    })
}

/// A body of exactly `len` bytes that starts with `tag` and a colon.
fn padded_body(tag: &str, len: usize) -> String {
    let mut body = format!("{tag}:");
    assert!(body.len() <= len, "tag {tag} longer than {len}");
    body.extend(std::iter::repeat_n('x', len - body.len()));
    body
}

/// The tag of a `padded_body` (what precedes the first colon).
fn body_tag(v: &Value) -> String {
    str_of(v, "body")
        .split(':')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Every `msg` event this client reads until it has seen `n` of them, as tags.
fn read_msg_tags(c: &mut Client, n: usize) -> Vec<String> {
    (0..n).map(|_| body_tag(&c.next_msg())).collect()
}

// ---------------------------------------------------------------------------------------------
// Slow consumers
// ---------------------------------------------------------------------------------------------

/// Messages in the stalled-reader test and their body size: 2,500 × 16,000 B = 40 MB.
const STALL_MSGS: usize = 2500;
const STALL_BODY_BYTES: usize = 16_000;
/// Allowed growth of the server's RSS (VmRSS) while those 40 MB flow to one reader that reads
/// almost none of them (and to five that read all of them). The stalled connection may hold its
/// 1 MiB outbound queue plus a WebSocket write buffer of about the same; the rest is allocator
/// noise and the LMDB file pages the server maps (measured: 10–13 MiB of VmRSS, of which about
/// 2 MiB anonymous). A queue without a bound would hold the ~37 MB the stalled reader never read,
/// beyond both bounds.
const STALL_RSS_GROWTH_MAX_KIB: u64 = 32 * 1024;
/// The same for anonymous memory alone (the heap, where queued frames live).
const STALL_ANON_GROWTH_MAX_KIB: u64 = 16 * 1024;

#[test]
fn a_reader_that_takes_a_byte_now_and_then_is_dropped_at_the_write_timeout() {
    // A flush to a full socket must finish within `write_timeout_ms`: a client that reads a
    // byte every so often (too little for the kernel to call the socket writable again) is
    // dropped then, and nobody else notices.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("courier.toml");
    std::fs::write(&config, "write_timeout_ms = 1500\n").unwrap();
    let server = Server::start(
        ServerOpts::shards(1)
            .flag("--config", config.display())
            .flag("--admin-listen", "127.0.0.1:0"),
    );
    let (addr, admin) = (server.addr(), server.admin_addr());
    let mut alice = settled(addr, "alice", "phone");
    let mut trickle = Client::try_dev_small_recv_buffer(addr, "bob", "trickle", 4096)
        .unwrap_or_else(|e| panic!("connect bob/trickle: {e:?}"));
    trickle.hello();
    assert_eq!(metric_total(admin, "courier_connections"), 2.0);

    // More than the kernel buffers between server and client hold (loopback send buffers grow
    // to 4 MiB): the server's flush to bob's device blocks.
    for i in 0..500 {
        let id = format!("t{i}");
        alice.send_and_wait(&id, "bob", &padded_body(&id, 16_000));
    }
    let stop = AtomicBool::new(false);
    let dropped_after = std::thread::scope(|s| {
        let socket = trickle.socket();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        s.spawn(|| {
            // One byte every 50 ms: progress, but far too slow to finish a flush in 1.5 s.
            let mut byte = [0u8; 1];
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(30) {
                match socket.read(&mut byte) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => break,
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let started = Instant::now();
        let mut dropped = None;
        while started.elapsed() < Duration::from_secs(20) {
            if metric_total(admin, "courier_connections") == 1.0 {
                dropped = Some(started.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
        dropped
    });
    let dropped_after = dropped_after.expect(
        "the trickling reader still held its connection 20 s after the flood (write timeout 1.5 s)",
    );
    eprintln!("trickling reader dropped {dropped_after:.1?} after the flood");
    // Everyone else is served as before.
    alice.send_and_wait("after", "bob", "still here");
}

#[test]
fn a_stalled_reader_is_closed_with_4009_without_delaying_others_or_growing_memory_and_catches_up() {
    let server = Server::start(ServerOpts::shards(2).flag("--admin-listen", "127.0.0.1:0"));
    let addr = server.addr();
    let admin = server.admin_addr();

    // bob's five devices: one stalls, four read everything; alice's tablet reads her copies.
    let mut alice = settled(addr, "alice", "phone");
    let mut readers: Vec<Client> = ["d0", "d1", "d2", "d3"]
        .iter()
        .map(|d| settled(addr, "bob", d))
        .collect();
    readers.push(settled(addr, "alice", "tablet"));
    // The stalled device: a tiny kernel receive buffer, so the server feels it stop reading.
    let mut stalled = Client::try_dev_small_recv_buffer(addr, "bob", "stalled", 4096)
        .unwrap_or_else(|e| panic!("connect bob/stalled: {e:?}"));
    let hello = stalled.hello();
    let acked = u64_of(&hello, "head");
    stalled.collect_events_until_seq(acked);
    stalled.ack(acked);
    stalled.sync_point();
    // Everyone else has seen every link (the readers' logs are settled up to here).
    for c in readers.iter_mut() {
        c.clear_backlog();
    }
    let stall_started = Instant::now();

    // Warm up (allocator, LMDB pages), then take the baseline.
    for i in 0..20 {
        let id = format!("w{i}");
        alice.send_and_wait(&id, "bob", &padded_body(&id, STALL_BODY_BYTES));
    }
    for c in readers.iter_mut() {
        read_msg_tags(c, 20);
    }
    let baseline_kib = server.rss_kib();
    let baseline_anon_kib = server.proc_status_kib("RssAnon");

    let done = AtomicBool::new(false);
    let peak_kib = AtomicU64::new(baseline_kib);
    let peak_anon_kib = AtomicU64::new(baseline_anon_kib);
    let started = Instant::now();
    let want: Vec<String> = (0..STALL_MSGS).map(|i| format!("m{i}")).collect();
    std::thread::scope(|s| {
        // RSS sampler.
        s.spawn(|| {
            // Bounded: the flood's own waits bound the test; this stops at `done` or after 10 min.
            let deadline = Instant::now() + Duration::from_secs(600);
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                peak_kib.fetch_max(server.rss_kib(), Ordering::Relaxed);
                peak_anon_kib.fetch_max(server.proc_status_kib("RssAnon"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let readers_done: Vec<_> = readers
            .iter_mut()
            .map(|c| {
                let want = &want;
                s.spawn(move || {
                    let got = read_msg_tags(c, STALL_MSGS);
                    assert_eq!(&got, want, "[{}] every message, in order", c.label());
                })
            })
            .collect();
        // The sender: at most 16 sends unanswered at once.
        let window = 16;
        let mut next = 0;
        let mut answered = 0;
        while answered < STALL_MSGS {
            while next < STALL_MSGS && next - answered < window {
                let tag = format!("m{next}");
                alice
                    .write_json(json!({"t": "send", "id": tag, "to": "bob",
                        "body": padded_body(&tag, STALL_BODY_BYTES)}))
                    .expect("write send");
                next += 1;
            }
            alice.flush().expect("flush sends");
            let tag = format!("m{answered}");
            let v = answer_to(&mut alice, &tag);
            assert_eq!(v["t"], "sent", "send {tag} while a reader stalls: {v}");
            answered += 1;
            // alice/phone's own copies pile up in its backlog: drop them as they come.
            alice.clear_backlog();
        }
        for h in readers_done {
            h.join().expect("reader thread");
        }
        done.store(true, Ordering::Relaxed);
    });
    let flood_time = started.elapsed();
    peak_kib.fetch_max(server.rss_kib(), Ordering::Relaxed);
    let peak_kib = peak_kib.into_inner();
    let growth_kib = peak_kib.saturating_sub(baseline_kib);
    let peak_anon_kib = peak_anon_kib.into_inner();
    let anon_growth_kib = peak_anon_kib.saturating_sub(baseline_anon_kib);
    eprintln!(
        "stalled reader: {STALL_MSGS} msgs x {STALL_BODY_BYTES} B in {flood_time:.1?}; server \
         VmRSS baseline {baseline_kib} KiB, peak {peak_kib} KiB, growth {growth_kib} KiB (bound \
         {STALL_RSS_GROWTH_MAX_KIB} KiB); RssAnon baseline {baseline_anon_kib} KiB, peak \
         {peak_anon_kib} KiB, growth {anon_growth_kib} KiB (bound {STALL_ANON_GROWTH_MAX_KIB} KiB)"
    );
    assert!(
        growth_kib < STALL_RSS_GROWTH_MAX_KIB,
        "server RSS grew by {growth_kib} KiB (from {baseline_kib} to {peak_kib}) while \
         {STALL_MSGS} x {STALL_BODY_BYTES} B flowed past a stalled reader; bound \
         {STALL_RSS_GROWTH_MAX_KIB} KiB"
    );
    assert!(
        anon_growth_kib < STALL_ANON_GROWTH_MAX_KIB,
        "server heap (RssAnon) grew by {anon_growth_kib} KiB (from {baseline_anon_kib} to \
         {peak_anon_kib}) while {STALL_MSGS} x {STALL_BODY_BYTES} B flowed past a stalled reader; \
         bound {STALL_ANON_GROWTH_MAX_KIB} KiB"
    );

    // The stalled reader reads again: what was in flight, then the 4009 close. (The server's
    // write to it has been blocked since its socket filled; the queue overflowed behind it and
    // only a close is queued now. Once this write drains the close follows. A stall longer than
    // the server's 30 s write timeout would end in a dropped socket without a close frame
    // instead; the stall here lasts as long as the flood, 6–9 s on a 2-core machine.)
    let stall_time = stall_started.elapsed();
    stalled.timeout = Duration::from_secs(30);
    let close = loop {
        match stalled.try_recv_json(Duration::from_secs(30)) {
            Ok(_) => continue,
            Err(RecvError::Closed(code)) => break code,
            Err(e) => panic!(
                "bob/stalled (stalled for {stall_time:.1?}, last seq {}): expected a 4009 \
                 close frame, got {e:?}",
                stalled.last_seq()
            ),
        }
    };
    assert_eq!(
        close, 4009,
        "a reader that stopped reading is closed with 4009"
    );
    let got_live = stalled.last_seq();
    eprintln!(
        "stalled reader: stalled {stall_time:.1?}, got through seq {got_live} before its 4009"
    );
    assert_eq!(
        metric_total(admin, "courier_slow_consumer_closes_total"),
        1.0,
        "exactly one connection (the stalled one) was closed as too slow"
    );

    // The readers are still connected and served.
    for c in readers.iter_mut() {
        c.sync_point();
    }

    // Reconnect: hello at the acked cursor, then everything missed, in order.
    let mut back = Client::online(addr, "bob", "stalled");
    let hello = back.hello_frame().expect("hello").clone();
    assert_eq!(
        hello["cursor"], acked,
        "the stalled device resumes from its acked cursor: {hello}"
    );
    back.timeout = Duration::from_secs(30);
    let head = u64_of(&hello, "head");
    let events = back.collect_events_until_seq(head);
    let tags: Vec<String> = msgs(&events).iter().map(|v| body_tag(v)).collect();
    let want: Vec<String> = (0..20)
        .map(|i| format!("w{i}"))
        .chain((0..STALL_MSGS).map(|i| format!("m{i}")))
        .collect();
    assert_eq!(tags, want, "bob/stalled catches up on everything it missed");
}

// ---------------------------------------------------------------------------------------------
// Floods
// ---------------------------------------------------------------------------------------------

/// `--client-frames-per-second` in the flood test (burst: twice that).
const FLOOD_RATE: u64 = 50;
/// Frames the flooder writes per round, all at once; an `ack` follows each round.
const FLOOD_ROUND_FRAMES: usize = 100;
/// Most flood rounds (the flood stops earlier once the others are done).
const FLOOD_ROUNDS_MAX: usize = 100;

#[test]
fn a_flooding_connection_is_rate_limited_while_other_connections_are_served() {
    let server =
        Server::start(ServerOpts::shards(2).flag("--client-frames-per-second", FLOOD_RATE));
    let addr = server.addr();
    let mut flooder = settled(addr, "alice", "phone");
    let mut alice_tablet = settled(addr, "alice", "tablet");
    let mut carol = settled(addr, "carol", "phone");
    let mut dave = settled(addr, "dave", "phone");
    flooder.clear_backlog();

    let others_done = AtomicBool::new(false);
    let (limiting_tx, limiting) = mpsc::channel::<()>();
    let started = Instant::now();
    let (accepted, limited, acked) = std::thread::scope(|s| {
        let (others_done, flooder) = (&others_done, &mut flooder);
        let flood = s.spawn(move || {
            let mut accepted: Vec<String> = Vec::new();
            let mut limited: Vec<Value> = Vec::new();
            let mut acked = 0;
            let mut round = 0;
            while round < FLOOD_ROUNDS_MAX && (round < 3 || !others_done.load(Ordering::Relaxed)) {
                for k in 0..FLOOD_ROUND_FRAMES {
                    let id = format!("f{round}-{k}");
                    flooder
                        .write_json(json!({"t": "send", "id": id, "to": "bob", "body": id}))
                        .expect("write flood frame");
                }
                // An ack after the burst, when the bucket is empty: acks are never limited.
                if flooder.last_seq() > acked {
                    acked = flooder.last_seq();
                    flooder
                        .write_json(json!({"t": "ack", "seq": acked}))
                        .expect("write ack");
                }
                flooder.flush().expect("flush flood");
                for k in 0..FLOOD_ROUND_FRAMES {
                    let id = format!("f{round}-{k}");
                    let v = answer_to(flooder, &id);
                    match (v["t"].as_str(), v["code"].as_str()) {
                        (Some("sent"), _) => accepted.push(id),
                        (Some("error"), Some("rate_limited")) => limited.push(v),
                        _ => panic!("flood frame {id} got {v}"),
                    }
                }
                let stray: Vec<&Value> = flooder
                    .backlog()
                    .iter()
                    .filter(|v| v["t"] == "error")
                    .collect();
                assert!(
                    stray.is_empty(),
                    "errors answering no flood frame (the ack?): {stray:?}"
                );
                if !limited.is_empty() {
                    // The flooder is being limited now: the others may start.
                    let _ = limiting_tx.send(());
                }
                round += 1;
            }
            (accepted, limited, acked)
        });

        // Meanwhile (once the flooder is being limited): carol talks to dave, and alice's other
        // connection sends too.
        limiting
            .recv_timeout(Duration::from_secs(60))
            .expect("the flooder was never rate-limited");
        for i in 0..30 {
            let id = format!("c{i}");
            carol.send_and_wait(&id, "dave", &id);
            let ev = dave.next_msg();
            assert_eq!(
                ev["body"],
                id.as_str(),
                "dave gets carol's messages in order"
            );
            if i % 5 == 0 {
                let id = format!("t{i}");
                alice_tablet.send_and_wait(&id, "bob", &id);
            }
        }
        others_done.store(true, Ordering::Relaxed);
        flood.join().expect("flood thread")
    });
    let elapsed = started.elapsed();
    let frames = accepted.len() + limited.len();
    eprintln!(
        "flood: {frames} frames in {elapsed:.1?}: {} accepted, {} rate_limited (rate {FLOOD_RATE}/s, \
         burst {})",
        accepted.len(),
        limited.len(),
        2 * FLOOD_RATE
    );
    assert!(
        !limited.is_empty(),
        "a flood of {frames} frames was never rate-limited"
    );
    for err in &limited {
        let retry = err["retry_ms"].as_u64().unwrap_or(0);
        assert!(
            (1..=1000).contains(&retry),
            "rate_limited carries the time to retry (1..=1000 ms at {FLOOD_RATE}/s): {err}"
        );
    }
    // The bucket: a burst of 2 × rate, then `rate` a second (+1 for rounding).
    let allowed = 2.0 * FLOOD_RATE as f64 + FLOOD_RATE as f64 * elapsed.as_secs_f64() + 1.0;
    assert!(
        (accepted.len() as f64) <= allowed,
        "{} flood frames accepted in {elapsed:.1?}; the bucket allows at most {allowed:.0}",
        accepted.len()
    );

    // A limited frame is not acted on: bob's log holds exactly the accepted flood messages, in
    // order, and alice/tablet's.
    let (_, events) = read_whole_log(addr, "bob", "audit");
    let flood_bodies: Vec<String> = bodies(&events)
        .into_iter()
        .filter(|b| b.starts_with('f'))
        .collect();
    assert_eq!(
        flood_bodies, accepted,
        "bob's log holds exactly the accepted flood frames"
    );
    let tablet_bodies: Vec<String> = bodies(&events)
        .into_iter()
        .filter(|b| b.starts_with('t'))
        .collect();
    assert_eq!(
        tablet_bodies.len(),
        6,
        "alice/tablet's messages: {tablet_bodies:?}"
    );

    // The flooder itself is served again once it waits as told.
    let sent = retrying_rate_limit(
        &mut flooder,
        json!({"t": "send", "id": "after", "to": "bob",
        "body": "after the flood"}),
        "sent",
    );
    assert_eq!(sent["t"], "sent", "{sent}");

    // The acks written into an empty bucket moved the cursor.
    let devices = retrying_rate_limit(
        &mut flooder,
        json!({"t": "devices", "id": "devs"}),
        "devices",
    );
    let list = devices["list"]
        .as_array()
        .unwrap_or_else(|| panic!("{devices}"));
    let phone = list
        .iter()
        .find(|d| d["device"] == "phone")
        .unwrap_or_else(|| panic!("alice/phone not in {list:?}"));
    assert_eq!(
        phone["cursor"], acked,
        "the acks sent mid-flood moved the cursor: {list:?}"
    );
}

/// Sends `frame` (with an `id`) until it is not `rate_limited`, waiting `retry_ms` as told each
/// time (at most 20 tries); returns the answer of type `reply_t` (or another error).
fn retrying_rate_limit(c: &mut Client, frame: Value, reply_t: &str) -> Value {
    for _ in 0..20 {
        let v = c.request(frame.clone(), reply_t);
        if v["code"] != "rate_limited" {
            return v;
        }
        std::thread::sleep(Duration::from_millis(u64_of(&v, "retry_ms")));
    }
    panic!("{frame} still rate-limited after 20 waits of retry_ms");
}

// ---------------------------------------------------------------------------------------------
// Full storage
// ---------------------------------------------------------------------------------------------

/// Body sizes of the messages that fill the 1 MiB map: each size until one is refused.
const FILL_BODY_SIZES: [usize; 4] = [4000, 400, 40, 7];
/// Most sends tried before the map must have filled (1 MiB holds far fewer).
const FILL_SENDS_MAX: usize = 2000;

/// Reads `chat`'s whole history (newest first), page by page; returns the msg ids, oldest first.
fn history_ids(c: &mut Client, chat: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut before: Option<String> = None;
    for _ in 0..100 {
        let page = c.history(chat, before.as_deref(), Some(200));
        if page.is_empty() {
            ids.reverse();
            return ids;
        }
        for v in &page {
            ids.push(str_of(v, "msg").to_string());
        }
        before = Some(str_of(page.last().expect("non-empty page"), "msg").to_string());
    }
    panic!("history of {chat} did not end within 100 pages");
}

/// A device whose link could not be stored: `busy`, then close 1011. The protocol also wants
/// `retry_ms` on every `busy`: a missing one is returned (the caller asserts it at the end, so
/// the recovery checks still run).
fn assert_link_refused(c: &mut Client, first: &Value) -> Option<String> {
    assert_eq!(
        first["t"],
        "error",
        "[{}] a new device gets hello or an error: {first}",
        c.label()
    );
    assert_eq!(first["code"], "busy", "[{}] {first}", c.label());
    assert_eq!(
        c.expect_close(),
        1011,
        "[{}] then 1011: the device link could not be stored",
        c.label()
    );
    if first["retry_ms"].as_u64().is_some_and(|ms| ms > 0) {
        None
    } else {
        Some(format!(
            "[{}] a new device whose link cannot be stored (map full) got {first} then close \
             1011: the busy lacks retry_ms (protocol: `busy` and `rate_limited` carry `retry_ms`)",
            c.label()
        ))
    }
}

#[test]
fn a_full_map_answers_busy_keeps_reads_working_and_a_bigger_map_recovers_every_acked_message() {
    let opts = |map_mib: usize| {
        ServerOpts::shards(1)
            .flag("--map-size-mib", map_mib)
            .flag("--admin-listen", "127.0.0.1:0")
    };
    let mut server = Server::start(opts(1));
    let addr = server.addr();
    let admin = server.admin_addr();
    let mut alice = settled(addr, "alice", "phone");
    let mut bob = settled(addr, "bob", "phone");
    // bob/tablet is linked now and reconnects during the full state (it never acks).
    settled(addr, "bob", "tablet").close();
    bob.clear_backlog();

    // Fill the map: one send at a time until one is refused, then again with smaller bodies, down
    // to bare 7-byte tags: then no message fits (a device link, smaller still, may).
    let assert_full = |v: &Value| {
        assert_eq!(v["t"], "error", "{v}");
        assert_eq!(v["code"], "busy", "a send into a full map gets busy: {v}");
        assert_eq!(
            v["retry_ms"], 1000,
            "busy for full storage says retry in 1000 ms: {v}"
        );
        assert_eq!(v["reason"], "storage is full", "{v}");
    };
    let mut acked: Vec<(String, String)> = Vec::new(); // (client id, msg id)
    let mut refused: Vec<(String, usize)> = Vec::new(); // (client id, body bytes)
    let mut tries = 0;
    for size in FILL_BODY_SIZES {
        loop {
            tries += 1;
            assert!(
                tries < FILL_SENDS_MAX,
                "{FILL_SENDS_MAX} sends fit in a 1 MiB map?"
            );
            let id = format!("k{tries:05}");
            alice.send_msg(&id, "bob", &padded_body(&id, size));
            let v = answer_to(&mut alice, &id);
            if v["t"] != "sent" {
                eprintln!(
                    "map full for {size} B bodies after {} acked sends: {v}",
                    acked.len()
                );
                assert_full(&v);
                refused.push((id, size));
                break;
            }
            acked.push((id, str_of(&v, "msg").to_string()));
        }
    }
    assert!(
        acked.len() > 10,
        "only {} sends fit in the map",
        acked.len()
    );

    // Still full: retries of the refused ids and a new send all get busy.
    for (id, size) in &refused {
        alice.send_msg(id, "bob", &padded_body(id, *size));
        assert_full(&answer_to(&mut alice, id));
    }
    alice.send_msg("k-new", "bob", "");
    assert_full(&answer_to(&mut alice, "k-new"));

    // The condition is visible: metrics, readiness, the log.
    assert_eq!(
        metric_by_shard(admin, "courier_storage_failing").get("0"),
        Some(&1.0),
        "courier_storage_failing{{shard=\"0\"}} is 1 while the map is full"
    );
    let (ready, body) = http_get(admin, "/readyz");
    assert_eq!(ready, 503, "/readyz while storage fails: {body}");
    assert!(
        server.log_contains("storage is full"),
        "the server logs the full map (stderr has no \"storage is full\")"
    );

    // Reads keep working: history, devices, replay to a device that never acked.
    let acked_ids: Vec<String> = acked.iter().map(|(_, m)| m.clone()).collect();
    assert_eq!(
        history_ids(&mut alice, "bob"),
        acked_ids,
        "alice's history of bob while full"
    );
    assert_eq!(
        history_ids(&mut bob, "alice"),
        acked_ids,
        "bob's history of alice while full"
    );
    let listed: Vec<String> = bob
        .devices()
        .iter()
        .map(|d| str_of(d, "device").to_string())
        .collect();
    assert_eq!(listed, ["phone", "tablet"], "devices while full");
    let mut tablet = Client::online(addr, "bob", "tablet");
    let hello = tablet.hello_frame().expect("hello").clone();
    assert_eq!(hello["cursor"], 0, "{hello}");
    let events = tablet.collect_events_until_seq(u64_of(&hello, "head"));
    let replayed: Vec<String> = msgs(&events)
        .iter()
        .map(|v| str_of(v, "msg").to_string())
        .collect();
    assert_eq!(
        replayed, acked_ids,
        "replay to bob/tablet while full: every acked message"
    );

    // Live delivery keeps working (typing is never stored).
    alice.send_json(json!({"t": "typing", "chat": "bob", "on": true}));
    let typing = bob.recv_until_described("typing from alice", |v| v["t"] == "typing");
    assert_eq!(typing["from"], "alice", "{typing}");

    // Protocol violations found on the way (asserted at the end, after the recovery checks).
    let mut violations: Vec<String> = Vec::new();
    // A new device: its `linked` event is small and may still fit; then it is replayed the whole
    // log like any device.
    let mut laptop = Client::dev(addr, "bob", "laptop");
    let first = laptop.recv_json();
    if first["t"] == "hello" {
        let events = laptop.collect_events_until_seq(u64_of(&first, "head"));
        let replayed: Vec<String> = msgs(&events)
            .iter()
            .map(|v| str_of(v, "msg").to_string())
            .collect();
        assert_eq!(replayed, acked_ids, "replay to a new device while full");
        assert!(
            events.iter().any(|v| token(v) == "device linked laptop"),
            "hello's head includes the new device's own linked event"
        );
        eprintln!("a new device linked while the map was full for messages: {first}");
    } else {
        violations.extend(assert_link_refused(&mut laptop, &first));
    }
    drop(laptop);
    // New devices until one link no longer fits: it is told so (busy with retry_ms) and closed
    // with 1011, never left hanging.
    let mut linked_while_full = 0;
    loop {
        assert!(
            linked_while_full < FILL_SENDS_MAX,
            "{FILL_SENDS_MAX} links fit in a 1 MiB map?"
        );
        let user = format!("filler{linked_while_full}");
        let mut c = Client::dev(addr, &user, "phone");
        let first = c.recv_json();
        if first["t"] != "hello" {
            eprintln!("map full for links after {linked_while_full} more: {first}");
            violations.extend(assert_link_refused(&mut c, &first));
            break;
        }
        linked_while_full += 1;
    }
    // Still readable: a device that never acked replays bob's whole log again.
    let mut tablet = Client::online(addr, "bob", "tablet");
    let hello = tablet.hello_frame().expect("hello").clone();
    let events = tablet.collect_events_until_seq(u64_of(&hello, "head"));
    let replayed: Vec<String> = msgs(&events)
        .iter()
        .map(|v| str_of(v, "msg").to_string())
        .collect();
    assert_eq!(
        replayed, acked_ids,
        "replay to bob/tablet with the map full for links too"
    );

    // Recovery: the same data dir with a bigger map.
    drop((alice, bob, tablet));
    // A clean stop (exit 0) with the map full, then the same data dir with a bigger map.
    server.restart_with(opts(64));
    let addr = server.addr();
    let admin = server.admin_addr();
    assert_eq!(http_get(admin, "/readyz").0, 200, "/readyz after recovery");

    // Every acked message is there, in both logs, once and in order.
    for (user, chat) in [("bob", "alice"), ("alice", "bob")] {
        let (_, events) = read_whole_log(addr, user, "verifier");
        let got: Vec<(String, String)> = msgs(&events)
            .iter()
            .map(|v| (body_tag(v), str_of(v, "msg").to_string()))
            .collect();
        assert_eq!(
            got, acked,
            "{user}'s log after recovery holds every acked message"
        );
        assert!(msgs(&events).iter().all(|v| v["chat"] == chat));
    }
    // Sends work again, the refused one included (retrying it is safe: stored once).
    let mut alice = settled(addr, "alice", "phone");
    let mut bob = settled(addr, "bob", "phone");
    let (refused_id, size) = &refused[0];
    let retried = alice.send_and_wait(refused_id, "bob", &padded_body(refused_id, *size));
    let again = alice.send_and_wait(refused_id, "bob", &padded_body(refused_id, *size));
    assert_eq!(retried, again, "a retry after recovery is deduplicated");
    let ev = bob.next_msg();
    assert_eq!(ev["msg"], retried["msg"], "{ev}");
    let fresh = alice.send_and_wait("fresh", "bob", "fresh");
    assert_eq!(bob.next_msg()["body"], "fresh");
    let mut want = acked_ids.clone();
    want.push(str_of(&retried, "msg").to_string());
    want.push(str_of(&fresh, "msg").to_string());
    assert_eq!(
        history_ids(&mut bob, "alice"),
        want,
        "bob's history after recovery"
    );
    // The devices that could not link before link now.
    let mut laptop = Client::online(addr, "bob", "laptop");
    laptop.own_linked_seq();
    let filler = format!("filler{linked_while_full}");
    Client::online(addr, &filler, "phone").own_linked_seq();
    assert_eq!(
        metric_by_shard(admin, "courier_storage_failing").get("0"),
        Some(&0.0),
        "storage no longer failing"
    );
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Handshake timeout
// ---------------------------------------------------------------------------------------------

/// The server's default handshake timeout (`handshake_timeout`).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Slack on top of it for scheduling (the server checks the deadline on a timer).
const HANDSHAKE_SLACK: Duration = Duration::from_secs(5);

/// Whether the server has closed `socket`: a read returns 0 (FIN) or an error (reset) within
/// `wait`. `false` when the wait ended with the socket still open. Any bytes read (e.g. an HTTP
/// error answer) are returned too.
fn closed_by_server(socket: &mut TcpStream, wait: Duration, got: &mut Vec<u8>) -> bool {
    socket
        .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
        .expect("set_read_timeout");
    let mut buf = [0u8; 4096];
    match socket.read(&mut buf) {
        Ok(0) => true,
        Ok(n) => {
            got.extend_from_slice(&buf[..n]);
            false
        }
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            false
        }
        Err(_) => true,
    }
}

/// Waits (bounded by `deadline`) for the server to close `socket`; returns when it did, or
/// `None` if it is still open at the deadline.
fn wait_closed(socket: &mut TcpStream, deadline: Instant) -> Option<Instant> {
    let mut got = Vec::new();
    loop {
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        if closed_by_server(socket, deadline - now, &mut got) {
            return Some(Instant::now());
        }
    }
}

/// Half-open sockets opened at once in the half-open test (spread over every shard).
const HALF_OPEN_SOCKETS: usize = 64;

#[test]
fn a_half_open_socket_is_dropped_at_the_handshake_timeout_and_blocks_nobody_meanwhile() {
    let server = Server::start(ServerOpts::shards(2));
    let addr = server.addr();
    let opened = Instant::now();
    let mut sockets: Vec<TcpStream> = (0..HALF_OPEN_SOCKETS)
        .map(|i| {
            TcpStream::connect_timeout(&addr, RECV_TIMEOUT)
                .unwrap_or_else(|e| panic!("half-open socket {i}: {e}"))
        })
        .collect();

    // Meanwhile the server accepts and serves others on every shard.
    let mut alice = settled(addr, "alice", "phone");
    let mut bob = settled(addr, "bob", "phone");
    alice.send_and_wait("hi", "bob", "hi while sockets hang");
    assert_eq!(bob.next_msg()["body"], "hi while sockets hang");
    assert!(
        opened.elapsed() < HANDSHAKE_TIMEOUT,
        "the round trip itself took the whole handshake timeout"
    );

    // Every half-open socket is closed by the server within the timeout (+ slack).
    let deadline = opened + HANDSHAKE_TIMEOUT + HANDSHAKE_SLACK;
    let mut latest = Duration::ZERO;
    for (i, socket) in sockets.iter_mut().enumerate() {
        let closed = wait_closed(socket, deadline).unwrap_or_else(|| {
            panic!(
                "half-open socket {i} (sent nothing) still open {:.1?} after connecting; \
                 handshake timeout {HANDSHAKE_TIMEOUT:?} + slack {HANDSHAKE_SLACK:?}",
                opened.elapsed()
            )
        });
        latest = latest.max(closed - opened);
    }
    eprintln!(
        "half-open: {HALF_OPEN_SOCKETS} sockets all closed by the server after at most {latest:.1?}"
    );
}

/// A slowloris client: a valid upgrade request whose header block never ends, written `chunk`
/// bytes every `interval`. Returns when the server closed the connection (how long after
/// connecting, bytes written, whatever the server answered); panics if it is still open after
/// the handshake timeout plus slack.
fn slowloris(addr: SocketAddr, chunk: usize, interval: Duration) -> (Duration, usize, String) {
    let mut socket = TcpStream::connect_timeout(&addr, RECV_TIMEOUT).expect("connect");
    socket.set_nodelay(true).expect("nodelay");
    let opened = Instant::now();
    let head = format!(
        "GET /v1/ws?user=slow&device=loris HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    let padding =
        (0..).flat_map(|i: u64| format!("X-Pad-{i}: {}\r\n", "a".repeat(100)).into_bytes());
    let mut bytes = head.into_bytes().into_iter().chain(padding);
    let deadline = opened + HANDSHAKE_TIMEOUT + HANDSHAKE_SLACK;
    let mut sent = 0usize;
    let mut answer = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "slowloris ({chunk} B every {interval:?}): {sent} header bytes over {:.1?} and the \
             server still keeps the connection (handshake timeout {HANDSHAKE_TIMEOUT:?} + slack \
             {HANDSHAKE_SLACK:?})",
            opened.elapsed()
        );
        let piece: Vec<u8> = bytes.by_ref().take(chunk).collect();
        if socket.write_all(&piece).is_err() {
            // Reset by the server: closed.
            break;
        }
        sent += piece.len();
        if closed_by_server(&mut socket, interval, &mut answer) {
            break;
        }
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(
        !answer.contains(" 101 "),
        "the trickled upgrade was never complete, yet the server switched protocols: {answer:?}"
    );
    (opened.elapsed(), sent, answer)
}

#[test]
fn a_slowloris_upgrade_trickling_its_headers_is_cut_off_by_the_handshake_timeout() {
    let server = Server::start(ServerOpts::shards(2));
    let addr = server.addr();
    std::thread::scope(|s| {
        // Byte by byte (tungstenite also refuses a header in that many tiny packets), and in
        // 128-byte pieces, which only the deadline stops.
        let bytes = s.spawn(|| slowloris(addr, 1, Duration::from_millis(100)));
        let lines = s.spawn(|| slowloris(addr, 128, Duration::from_millis(250)));
        for (what, h) in [("1 B / 100 ms", bytes), ("128 B / 250 ms", lines)] {
            let (after, sent, answer) = h.join().expect("slowloris thread");
            eprintln!(
                "slowloris {what}: cut off after {after:.1?} and {sent} header bytes; answer {answer:?}"
            );
        }
    });
    // The server is fine afterwards.
    settled(addr, "alice", "phone").sync_point();
}

// ---------------------------------------------------------------------------------------------
// Reconnect storm
// ---------------------------------------------------------------------------------------------

/// Devices in the default storm (one test process; about 4,000 descriptors on each side).
const STORM_DEVICES: usize = 4000;
/// Devices in the full-size storm (`reconnect_storm_full_size`, run by hand): as many as the
/// server's 20,000-descriptor limit allows with room for its own files, split over
/// `STORM_FULL_WORKERS` worker processes.
const STORM_FULL_DEVICES: usize = 19_000;
const STORM_FULL_WORKERS: usize = 4;
/// Devices per user (below the limit of 5) and users per group (below the limit of 1024).
const STORM_DEVICES_PER_USER: usize = 4;
const STORM_GROUP_USERS: usize = 1000;
/// Messages each group gets while all devices are offline.
const STORM_MSGS: usize = 3;
/// Client threads per process.
const STORM_THREADS: usize = 8;
/// Per-frame wait in the storm (thousands of devices catch up at once on a debug build).
const STORM_RECV_TIMEOUT: Duration = Duration::from_secs(60);
/// Shards of the storm server.
const STORM_SHARDS: usize = 3;
/// Each user's log after the storm's set-up: the group's `created`, one `linked` per device,
/// then the group's messages.
const STORM_HEAD: u64 = (1 + STORM_DEVICES_PER_USER + STORM_MSGS) as u64;

fn storm_user(u: usize) -> String {
    format!("s{u:05}")
}

fn storm_group(u: usize) -> String {
    format!("g:storm{}", u / STORM_GROUP_USERS)
}

/// One device of the storm and the seq it acked before going offline.
struct StormDevice {
    user: String,
    device: String,
    acked: u64,
}

/// Runs `f` on each part in its own thread; returns the results in order.
fn on_threads<T: Send, R: Send>(parts: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = parts.into_iter().map(|p| s.spawn(move || f(p))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("storm thread"))
            .collect()
    })
}

/// Set-up: every device of `users` connects once (its first connection links it), reads its log
/// up to hello's head, acks a known seq (the head, or one less for odd devices) and checks the
/// server holds that cursor, then closes. Returns the devices per thread.
fn storm_link(addr: SocketAddr, users: std::ops::Range<usize>) -> Vec<Vec<StormDevice>> {
    let users: Vec<usize> = users.collect();
    let parts: Vec<Vec<usize>> = users
        .chunks(users.len().div_ceil(STORM_THREADS).max(1))
        .map(<[usize]>::to_vec)
        .collect();
    on_threads(parts, |part| {
        let mut devices = Vec::new();
        for u in part {
            let user = storm_user(u);
            for k in 0..STORM_DEVICES_PER_USER {
                let device = format!("d{k}");
                let mut c = Client::online(addr, &user, &device);
                c.timeout = STORM_RECV_TIMEOUT;
                let head = u64_of(c.hello_frame().expect("hello"), "head");
                c.collect_events_until_seq(head);
                let acked = head - (k as u64 % 2).min(head - 1);
                c.ack(acked);
                let list = c.devices();
                let own = list
                    .iter()
                    .find(|d| d["device"] == device.as_str())
                    .unwrap_or_else(|| panic!("[{user}/{device}] not in its devices: {list:?}"));
                assert_eq!(
                    own["cursor"], acked,
                    "[{user}/{device}] cursor after ack: {list:?}"
                );
                c.close();
                devices.push(StormDevice {
                    user: user.clone(),
                    device,
                    acked,
                });
            }
        }
        devices
    })
}

/// The storm: on every thread at once (after `go`), every device reconnects (all handshakes
/// first, then the reads); each hello carries the acked cursor and the exact log head, the
/// replay is everything after the cursor ending with the group's messages, and the device acks
/// its head. Returns the open connections (closing them is the caller's business).
fn storm_reconnect(
    addr: SocketAddr,
    parts: Vec<Vec<StormDevice>>,
    go: &Barrier,
    boss_msgs: &BTreeMap<String, Vec<String>>,
) -> Vec<Client> {
    on_threads(parts, |part| {
        go.wait();
        let mut clients: Vec<Client> = part
            .iter()
            .map(|d| {
                let mut c = Client::dev(addr, &d.user, &d.device);
                c.timeout = STORM_RECV_TIMEOUT;
                c
            })
            .collect();
        for (c, d) in clients.iter_mut().zip(&part) {
            let label = format!("{}/{}", d.user, d.device);
            let hello = c.hello();
            assert_eq!(
                hello["cursor"], d.acked,
                "[{label}] the cursor it acked before the storm: {hello}"
            );
            assert_eq!(hello["head"], STORM_HEAD, "[{label}] the log head: {hello}");
            let events = c.collect_events_until_seq(STORM_HEAD);
            assert_eq!(
                events.len() as u64,
                STORM_HEAD - d.acked,
                "[{label}] replay is exactly ({}, {STORM_HEAD}]",
                d.acked
            );
            let tail: Vec<String> = events[events.len() - STORM_MSGS..]
                .iter()
                .map(|v| {
                    assert!(is_msg(v) && v["from"] == "boss", "[{label}] {v}");
                    str_of(v, "msg").to_string()
                })
                .collect();
            let group = storm_group(d.user[1..].parse().expect("storm user number"));
            assert_eq!(
                Some(&tail),
                boss_msgs.get(&group),
                "[{label}] the group's messages, in order, end the replay"
            );
            c.ack(STORM_HEAD);
        }
        // Every ack reached the owner: each device's cursor is its head now.
        for (c, d) in clients.iter_mut().zip(&part) {
            let list = c.devices();
            let own = list
                .iter()
                .find(|e| e["device"] == d.device.as_str())
                .unwrap_or_else(|| panic!("[{}/{}] not listed: {list:?}", d.user, d.device));
            assert_eq!(
                own["cursor"], STORM_HEAD,
                "[{}/{}] {list:?}",
                d.user, d.device
            );
        }
        clients
    })
    .into_iter()
    .flatten()
    .collect()
}

/// The boss creates the storm's groups (every `STORM_GROUP_USERS` users of `users` users).
fn storm_groups(boss: &mut Client, users: usize) {
    for g in 0..users.div_ceil(STORM_GROUP_USERS) {
        let chat = format!("g:storm{g}");
        let members: Vec<String> = (g * STORM_GROUP_USERS
            ..((g + 1) * STORM_GROUP_USERS).min(users))
            .map(storm_user)
            .collect();
        boss.send_json(
            json!({"t": "group", "id": format!("create{g}"), "op": "create",
            "chat": chat, "members": members}),
        );
        let chat_ = chat.clone();
        boss.recv_until_described(&format!("{chat} created"), move |v| {
            v["kind"] == "group" && v["chat"] == chat_.as_str() && v["op"] == "created"
        });
    }
}

/// While every device is offline, the boss sends `STORM_MSGS` to each group; returns each
/// group's message ids in order.
fn storm_messages(boss: &mut Client, users: usize) -> BTreeMap<String, Vec<String>> {
    let mut sent = BTreeMap::new();
    for g in 0..users.div_ceil(STORM_GROUP_USERS) {
        let chat = format!("g:storm{g}");
        let ids: Vec<String> = (0..STORM_MSGS)
            .map(|i| {
                let id = format!("storm{g}-{i}");
                str_of(&boss.send_and_wait(&id, &chat, &id), "msg").to_string()
            })
            .collect();
        sent.insert(chat, ids);
    }
    sent
}

/// Per-shard counter deltas.
fn deltas(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(shard, v)| (shard.clone(), v - before.get(shard).copied().unwrap_or(0.0)))
        .collect()
}

/// Every shard accepted a fair part of the storm: at least half of an even share.
fn assert_every_shard_shared(what: &str, per_shard: &BTreeMap<String, f64>, total: usize) {
    assert_eq!(
        per_shard.len(),
        STORM_SHARDS,
        "{what}: one sample per shard: {per_shard:?}"
    );
    let floor = total as f64 / STORM_SHARDS as f64 / 2.0;
    for (shard, n) in per_shard {
        assert!(
            *n >= floor,
            "{what}: shard {shard} took {n} of {total} (fewer than {floor}): {per_shard:?}"
        );
    }
}

fn storm_server() -> Server {
    let fds = raise_fd_limit();
    eprintln!("open-file limit of the test process (and the server): {fds}");
    // No fsync per commit: the set-up links thousands of devices (a commit each), and what the
    // storm tests is catch-up and cursors on a running server, not durability.
    Server::start(
        ServerOpts::shards(STORM_SHARDS)
            .flag("--admin-listen", "127.0.0.1:0")
            .flag("--durability", "process-crash"),
    )
}

#[test]
fn a_reconnect_storm_ends_with_every_device_caught_up_at_its_head_with_its_cursor_intact() {
    let fds = raise_fd_limit();
    assert!(
        fds as usize >= STORM_DEVICES + 512,
        "need {} open files for {STORM_DEVICES} clients, have {fds}",
        STORM_DEVICES + 512
    );
    let server = storm_server();
    let (addr, admin) = (server.addr(), server.admin_addr());
    let users = STORM_DEVICES / STORM_DEVICES_PER_USER;
    let mut boss = settled(addr, "boss", "desk");
    boss.timeout = STORM_RECV_TIMEOUT;

    let started = Instant::now();
    storm_groups(&mut boss, users);
    let parts = storm_link(addr, 0..users);
    let linked = started.elapsed();
    let boss_msgs = storm_messages(&mut boss, users);

    let handshakes = metric_by_shard(admin, "courier_handshakes_total");
    let go = Barrier::new(parts.len());
    let started = Instant::now();
    let clients = storm_reconnect(addr, parts, &go, &boss_msgs);
    let storm = started.elapsed();
    assert_eq!(clients.len(), STORM_DEVICES);

    let accepted = deltas(
        &handshakes,
        &metric_by_shard(admin, "courier_handshakes_total"),
    );
    let connections = metric_by_shard(admin, "courier_connections");
    eprintln!(
        "storm: {STORM_DEVICES} devices linked and acked in {linked:.1?}; reconnected and caught \
         up in {storm:.1?}; handshakes per shard {accepted:?}; connections per shard \
         {connections:?}; server RSS {} KiB",
        server.rss_kib()
    );
    assert_every_shard_shared("storm handshakes", &accepted, STORM_DEVICES);
    assert_every_shard_shared("open connections", &connections, STORM_DEVICES);
    assert_eq!(
        connections.values().sum::<f64>(),
        (STORM_DEVICES + 1) as f64,
        "every storm device and the boss are connected"
    );
}

/// Turns `storm_worker` into a client process of the full-size storm: "addr first_user users".
const STORM_WORKER_ENV: &str = "COURIER_STORM_WORKER";
/// How long a storm worker may take for one phase.
const STORM_PHASE_TIMEOUT: Duration = Duration::from_secs(600);

/// A storm worker process; killed on drop unless it already exited.
struct Worker {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Waits until every worker printed a line starting with `STORM {what}` (or fails when one ends
/// first).
fn await_workers(lines: &mpsc::Receiver<(usize, Option<String>)>, workers: usize, what: &str) {
    let deadline = Instant::now() + STORM_PHASE_TIMEOUT;
    let mut done = HashSet::new();
    while done.len() < workers {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok((w, Some(line))) => {
                if line.contains(&format!("STORM {what}")) {
                    done.insert(w);
                }
            }
            Ok((w, None)) => panic!("storm worker {w} ended before `{what}`; see its output above"),
            Err(_) => {
                panic!("storm workers did not all reach `{what}` within {STORM_PHASE_TIMEOUT:?}")
            }
        }
    }
}

/// The full-size storm: `STORM_FULL_DEVICES` (19,000) devices, as many as the server's
/// 20,000-descriptor limit allows next to its own files, in `STORM_FULL_WORKERS` (4) client
/// processes of 4,750 devices on 8 threads each. Too slow for the default run (the set-up links
/// every device first); run by hand:
///
///     cargo test --test hardening -- --ignored --nocapture reconnect_storm_full_size
#[test]
#[ignore = "full-size storm (19,000 devices in 4 client processes); run by hand"]
fn reconnect_storm_full_size() {
    let server = storm_server();
    let (addr, admin) = (server.addr(), server.admin_addr());
    let users = STORM_FULL_DEVICES / STORM_DEVICES_PER_USER;
    let mut boss = settled(addr, "boss", "desk");
    boss.timeout = STORM_RECV_TIMEOUT;
    storm_groups(&mut boss, users);

    let started = Instant::now();
    let (tx, lines) = mpsc::channel();
    let per_worker = users.div_ceil(STORM_FULL_WORKERS);
    let exe = std::env::current_exe().expect("the test binary");
    let mut workers: Vec<Worker> = (0..STORM_FULL_WORKERS)
        .map(|w| {
            let first = w * per_worker;
            let n = per_worker.min(users - first);
            let mut child = Command::new(&exe)
                .args([
                    "--exact",
                    "storm_worker",
                    "--ignored",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(STORM_WORKER_ENV, format!("{addr} {first} {n}"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn storm worker");
            let stdout = child.stdout.take().expect("worker stdout");
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("[storm worker {w}] {line}");
                    let _ = tx.send((w, Some(line)));
                }
                let _ = tx.send((w, None));
            });
            let stdin = child.stdin.take();
            Worker { child, stdin }
        })
        .collect();
    await_workers(&lines, workers.len(), "linked");
    let linked = started.elapsed();
    let boss_msgs = storm_messages(&mut boss, users);

    let handshakes = metric_by_shard(admin, "courier_handshakes_total");
    let go = format!("GO {}\n", serde_json::to_string(&boss_msgs).expect("json"));
    let started = Instant::now();
    for w in workers.iter_mut() {
        let stdin = w.stdin.as_mut().expect("worker stdin");
        stdin.write_all(go.as_bytes()).expect("GO to worker");
        stdin.flush().expect("flush GO");
    }
    await_workers(&lines, workers.len(), "done");
    let storm = started.elapsed();

    let accepted = deltas(
        &handshakes,
        &metric_by_shard(admin, "courier_handshakes_total"),
    );
    let connections = metric_by_shard(admin, "courier_connections");
    eprintln!(
        "full storm: {STORM_FULL_DEVICES} devices in {STORM_FULL_WORKERS} processes linked and \
         acked in {linked:.1?}; reconnected and caught up in {storm:.1?}; handshakes per shard \
         {accepted:?}; connections per shard {connections:?}; server RSS {} KiB",
        server.rss_kib()
    );
    assert_every_shard_shared("storm handshakes", &accepted, STORM_FULL_DEVICES);
    assert_every_shard_shared("open connections", &connections, STORM_FULL_DEVICES);
    assert_eq!(
        connections.values().sum::<f64>(),
        (STORM_FULL_DEVICES + 1) as f64,
        "every storm device and the boss are connected"
    );
    for (i, w) in workers.iter_mut().enumerate() {
        drop(w.stdin.take()); // EOF: the worker closes its connections and exits.
        let deadline = Instant::now() + STORM_PHASE_TIMEOUT;
        let status = loop {
            if let Some(status) = w.child.try_wait().expect("wait for worker") {
                break status;
            }
            assert!(Instant::now() < deadline, "storm worker {i} did not exit");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "storm worker {i} exited with {status}");
    }
}

/// A client process of `reconnect_storm_full_size` (started by it with `COURIER_STORM_WORKER`);
/// does nothing on its own. Prints `STORM linked` after the set-up, waits for `GO <boss
/// messages>` on stdin, storms, prints `STORM done`, and closes everything at stdin's EOF.
#[test]
#[ignore = "a client process of reconnect_storm_full_size"]
fn storm_worker() {
    let Ok(spec) = std::env::var(STORM_WORKER_ENV) else {
        return;
    };
    let mut words = spec.split_whitespace();
    let mut next = |what: &str| {
        words
            .next()
            .unwrap_or_else(|| panic!("{STORM_WORKER_ENV}={spec:?} lacks {what}"))
            .to_string()
    };
    let addr: SocketAddr = next("addr").parse().expect("worker addr");
    let first: usize = next("first user").parse().expect("worker first user");
    let users: usize = next("user count").parse().expect("worker user count");
    let fds = raise_fd_limit() as usize;
    assert!(
        fds >= users * STORM_DEVICES_PER_USER + 256,
        "worker needs {} open files, has {fds}",
        users * STORM_DEVICES_PER_USER + 256
    );
    let parts = storm_link(addr, first..first + users);
    println!("STORM linked {}", users * STORM_DEVICES_PER_USER);
    let stdin = std::io::stdin();
    let mut line = String::new();
    stdin.lock().read_line(&mut line).expect("read GO");
    let boss_msgs: BTreeMap<String, Vec<String>> = serde_json::from_str(
        line.trim()
            .strip_prefix("GO ")
            .unwrap_or_else(|| panic!("expected GO, got {line:?}")),
    )
    .expect("boss messages");
    let go = Barrier::new(parts.len());
    let clients = storm_reconnect(addr, parts, &go, &boss_msgs);
    println!("STORM done {}", clients.len());
    // Hold the connections until the parent has read the metrics (stdin closes).
    let mut rest = String::new();
    let _ = stdin.lock().read_to_string(&mut rest);
    drop(clients);
}
