//! The in-memory user map has a bound: idle users are evicted (their state is on disk) and
//! nothing about them changes when they come back.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::{Client, Server, ServerOpts};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn owned_users(admin: &str) -> f64 {
    let text = ureq::get(&format!("http://{admin}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("courier_owned_users{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn idle_users_evicted_from_memory_come_back_with_cursor_log_and_dedupe_intact() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("courier.toml");
    std::fs::write(&config, "owned_users_max = 4\n").unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let server = Server::start(
        ServerOpts::shards(1)
            .flag("--config", config.display())
            .flag("--admin-listen", &admin),
    );
    let users: Vec<String> = (0..12).map(|i| format!("u{i}")).collect();
    let mut acked = Vec::new();
    let mut sents = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let mut client = Client::dev(server.addr(), user, "phone");
        client.hello();
        let next = &users[(i + 1) % users.len()];
        let sent = client.send_and_wait(&format!("{user}-1"), next, "hello");
        let events = client.collect_events_until_seq(2);
        let head = events.last().unwrap()["seq"].as_u64().unwrap();
        client.ack(head);
        client.sync_point();
        acked.push(head);
        sents.push(sent);
        client.close();
    }
    // The shard keeps at most 4 idle users once its commits are done.
    let deadline = Instant::now() + Duration::from_secs(10);
    while owned_users(&admin) > 4.0 {
        assert!(Instant::now() < deadline, "idle users were never evicted");
        std::thread::sleep(Duration::from_millis(50));
    }
    for (i, user) in users.iter().enumerate() {
        let mut client = Client::dev(server.addr(), user, "phone");
        let hello = client.hello();
        assert_eq!(
            hello["cursor"], acked[i],
            "{user}'s cursor survives eviction: {hello}"
        );
        // The replay after the cursor is contiguous (the harness checks seq) and complete.
        let head = hello["head"].as_u64().unwrap();
        let replay = client.collect_events_until_seq(head);
        if i == 0 {
            // u11's message reached u0 after u0 had gone (and had been evicted).
            assert!(
                replay
                    .iter()
                    .any(|e| e["kind"] == "msg" && e["from"] == "u11"),
                "u0 has u11's message: {replay:?}"
            );
        }
        let again = client.send_and_wait(&format!("{user}-1"), "nobody", "hello");
        assert_eq!(
            again, sents[i],
            "a retried send after eviction gets the same sent"
        );
        client.close();
    }
}
