//! Live delivery: every online device of the recipient and of the sender gets each message once,
//! in send order, across shards, and a retried `send` (same id, same device) appends nothing new.

mod common;

use common::*;
use serde_json::{Value, json};

fn msg_id(v: &Value) -> u64 {
    str_of(v, "msg")
        .parse()
        .unwrap_or_else(|_| panic!("msg id is not a decimal u64: {v}"))
}

fn connected(addr: std::net::SocketAddr, user: &str, device: &str) -> Client {
    let mut c = Client::dev(addr, user, device);
    let hello = c.hello();
    assert_eq!(hello["user"], user, "hello names the user: {hello}");
    assert_eq!(hello["device"], device, "hello names the device: {hello}");
    c
}

#[test]
fn every_online_device_gets_a_message_once() {
    let server = Server::start(ServerOpts::default());
    let addr = server.addr();
    let mut alice_phone = connected(addr, "alice", "phone");
    let mut alice_laptop = connected(addr, "alice", "laptop");
    let mut bob: Vec<Client> = ["phone", "tablet", "web"]
        .iter()
        .map(|d| connected(addr, "bob", d))
        .collect();

    let first = alice_phone.send_and_wait("m1", "bob", "hello bob");
    assert!(first["ts"].is_u64(), "sent.ts is unix ms: {first}");
    // A second message: the next msg event after the first must be this one (no duplicate).
    let second = alice_phone.send_and_wait("m2", "bob", "second");
    assert!(
        msg_id(&second) > msg_id(&first),
        "message ids increase: {first} then {second}"
    );

    for device in bob.iter_mut() {
        let ev = device.next_msg();
        assert_eq!(ev["chat"], "alice", "bob names the chat by the peer: {ev}");
        assert_eq!(ev["from"], "alice", "{ev}");
        assert_eq!(ev["dev"], "phone", "{ev}");
        assert_eq!(ev["body"], "hello bob", "{ev}");
        assert_eq!(
            ev["msg"], first["msg"],
            "the event carries the id `sent` gave: {ev}"
        );
        assert!(ev["ts"].is_u64(), "{ev}");
        let ev2 = device.next_msg();
        assert_eq!(
            ev2["body"],
            "second",
            "[{}] first message delivered twice? {ev2}",
            device.label()
        );
        assert_eq!(ev2["msg"], second["msg"], "{ev2}");
    }
    for device in [&mut alice_phone, &mut alice_laptop] {
        let ev = device.next_msg();
        assert_eq!(
            ev["chat"], "bob",
            "the sender's copy names the chat by the peer: {ev}"
        );
        assert_eq!(ev["from"], "alice", "{ev}");
        assert_eq!(ev["dev"], "phone", "{ev}");
        assert_eq!(ev["body"], "hello bob", "{ev}");
        assert_eq!(ev["msg"], first["msg"], "{ev}");
        let ev2 = device.next_msg();
        assert_eq!(
            ev2["body"],
            "second",
            "[{}] first message delivered twice? {ev2}",
            device.label()
        );
    }
}

#[test]
fn note_to_self_appears_once_in_own_log() {
    let server = Server::start(ServerOpts::default());
    let addr = server.addr();
    let mut phone = connected(addr, "carol", "phone");
    let mut laptop = connected(addr, "carol", "laptop");

    let sent = phone.send_and_wait("n1", "carol", "remember the milk");
    phone.send_and_wait("n2", "carol", "marker");
    for device in [&mut phone, &mut laptop] {
        let ev = device.next_msg();
        assert_eq!(ev["chat"], "carol", "{ev}");
        assert_eq!(ev["from"], "carol", "{ev}");
        assert_eq!(ev["dev"], "phone", "{ev}");
        assert_eq!(ev["body"], "remember the milk", "{ev}");
        assert_eq!(ev["msg"], sent["msg"], "{ev}");
        let ev2 = device.next_msg();
        assert_eq!(
            ev2["body"],
            "marker",
            "[{}] note-to-self appended twice? {ev2}",
            device.label()
        );
    }
}

#[test]
fn messages_from_one_device_arrive_in_send_order() {
    let server = Server::start(ServerOpts::default());
    let addr = server.addr();
    let mut alice = connected(addr, "alice", "phone");
    let mut bob_phone = connected(addr, "bob", "phone");
    let mut bob_tablet = connected(addr, "bob", "tablet");

    const N: usize = 300;
    let sents = alice.send_many("bob", "o", N, 32);
    for device in [&mut bob_phone, &mut bob_tablet, &mut alice] {
        let mut last_id = 0u64;
        for (i, sent) in sents.iter().enumerate() {
            let ev = device.next_msg();
            assert_eq!(
                ev["body"],
                format!("o{i}"),
                "[{}] out of order at {i}: {ev}",
                device.label()
            );
            assert_eq!(ev["msg"], sent["msg"], "{ev}");
            let id = msg_id(&ev);
            assert!(
                id > last_id,
                "[{}] ids of one sender's messages increase: {ev}",
                device.label()
            );
            last_id = id;
        }
    }
}

#[test]
fn users_on_different_shards_exchange_messages() {
    // 10 users on 3 shards: with a hash placement, some pairs are on different shards
    // (all ten on one shard has probability 3^-9).
    let server = Server::start(ServerOpts::shards(3));
    let addr = server.addr();
    const USERS: usize = 10;
    const PER_PAIR: usize = 2;
    let names: Vec<String> = (0..USERS).map(|i| format!("user{i}")).collect();
    let mut clients: Vec<Client> = names.iter().map(|n| connected(addr, n, "d")).collect();

    for (i, client) in clients.iter_mut().enumerate() {
        for (j, peer) in names.iter().enumerate() {
            if i == j {
                continue;
            }
            for k in 0..PER_PAIR {
                let id = format!("{i}-{j}-{k}");
                client
                    .write_json(json!({"t": "send", "id": id, "to": peer, "body": id}))
                    .expect("write send");
            }
        }
        client.flush().expect("flush");
    }
    for (i, client) in clients.iter_mut().enumerate() {
        for j in (0..USERS).filter(|&j| j != i) {
            for k in 0..PER_PAIR {
                client.send_and_wait_sent_only(&format!("{i}-{j}-{k}"));
            }
        }
    }
    for (i, client) in clients.iter_mut().enumerate() {
        // Own copies and received copies, 2 * (USERS-1) * PER_PAIR in all.
        let mut received: Vec<Vec<usize>> = vec![Vec::new(); USERS];
        let mut own: Vec<Vec<usize>> = vec![Vec::new(); USERS];
        for _ in 0..2 * (USERS - 1) * PER_PAIR {
            let ev = client.next_msg();
            let body = str_of(&ev, "body");
            let parts: Vec<usize> = body.split('-').map(|p| p.parse().expect("body")).collect();
            let (from, to, k) = (parts[0], parts[1], parts[2]);
            if from == i {
                assert_eq!(ev["chat"], names[to].as_str(), "{ev}");
                assert_eq!(ev["from"], names[i].as_str(), "{ev}");
                own[to].push(k);
            } else {
                assert_eq!(to, i, "[{}] got someone else's message: {ev}", names[i]);
                assert_eq!(ev["chat"], names[from].as_str(), "{ev}");
                assert_eq!(ev["from"], names[from].as_str(), "{ev}");
                received[from].push(k);
            }
        }
        let expected: Vec<usize> = (0..PER_PAIR).collect();
        for j in (0..USERS).filter(|&j| j != i) {
            assert_eq!(
                received[j], expected,
                "{} from {}: each once, in order",
                names[i], names[j]
            );
            assert_eq!(
                own[j], expected,
                "{}'s own copies to {}",
                names[i], names[j]
            );
        }
    }
}

#[test]
fn retried_send_gets_the_same_sent_and_appends_one_event() {
    let server = Server::start(ServerOpts::default());
    let addr = server.addr();
    let mut alice = connected(addr, "alice", "phone");
    let mut bob = connected(addr, "bob", "phone");

    let first = alice.send_and_wait("r1", "bob", "once");
    let again = alice.send_and_wait("r1", "bob", "once");
    assert_eq!(first, again, "a retried send gets the identical sent");
    alice.send_and_wait("r2", "bob", "marker");

    for device in [&mut bob, &mut alice] {
        let ev = device.next_msg();
        assert_eq!(ev["body"], "once", "{ev}");
        assert_eq!(ev["msg"], first["msg"], "{ev}");
        let ev2 = device.next_msg();
        assert_eq!(
            ev2["body"],
            "marker",
            "[{}] the retry appended an event: {ev2}",
            device.label()
        );
    }
}

#[test]
fn retry_while_the_first_send_is_in_flight_appends_one_event() {
    let server = Server::start(ServerOpts::default());
    let addr = server.addr();
    let mut alice = connected(addr, "alice", "phone");
    let mut bob = connected(addr, "bob", "phone");

    // Both frames leave before any answer: the second arrives while the first may be uncommitted.
    alice
        .write_json(json!({"t": "send", "id": "f1", "to": "bob", "body": "fast"}))
        .unwrap();
    alice
        .write_json(json!({"t": "send", "id": "f1", "to": "bob", "body": "fast"}))
        .unwrap();
    alice.flush().unwrap();
    let a = alice.next_sent("f1");
    let b = alice.next_sent("f1");
    assert_eq!(a, b, "both answers to one id are the same sent");
    alice.send_and_wait("f2", "bob", "marker");

    for device in [&mut bob, &mut alice] {
        let ev = device.next_msg();
        assert_eq!(ev["body"], "fast", "{ev}");
        assert_eq!(ev["msg"], a["msg"], "{ev}");
        let ev2 = device.next_msg();
        assert_eq!(
            ev2["body"],
            "marker",
            "[{}] the retry appended an event: {ev2}",
            device.label()
        );
    }
}

#[test]
fn same_client_id_from_another_device_is_a_new_message() {
    let server = Server::start(ServerOpts::default());
    let addr = server.addr();
    let mut phone = connected(addr, "alice", "phone");
    let mut laptop = connected(addr, "alice", "laptop");
    let mut bob = connected(addr, "bob", "phone");

    let from_phone = phone.send_and_wait("x1", "bob", "from phone");
    let from_laptop = laptop.send_and_wait("x1", "bob", "from laptop");
    assert_ne!(
        from_phone["msg"], from_laptop["msg"],
        "dedupe is per device"
    );

    let ev1 = bob.next_msg();
    let ev2 = bob.next_msg();
    assert_eq!(
        (ev1["body"].clone(), ev1["dev"].clone()),
        (json!("from phone"), json!("phone"))
    );
    assert_eq!(
        (ev2["body"].clone(), ev2["dev"].clone()),
        (json!("from laptop"), json!("laptop"))
    );
}
