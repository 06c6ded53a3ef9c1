//! Groups (issue 4): membership events, admin rules, `group_full`, one order of the group's
//! messages for every member device (senders spread over shards), membership changes interleaved
//! with sends, offline catch-up, group receipts/typing/edit/delete, and a 1024-member group.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn group_frame(id: &str, op: &str, chat: &str, members: &[&str]) -> Value {
    if op == "leave" {
        json!({"t": "group", "id": id, "op": op, "chat": chat})
    } else {
        json!({"t": "group", "id": id, "op": op, "chat": chat, "members": members})
    }
}

fn is_group_ev(v: &Value, chat: &str, op: &str, members: &[&str]) -> bool {
    v["t"] == "ev"
        && v["kind"] == "group"
        && v["chat"] == chat
        && v["op"] == op
        && v["members"] == json!(members)
}

fn user_of(c: &Client) -> String {
    str_of(c.hello_frame().expect("hello read"), "user").to_string()
}

/// Sends a group operation and waits for its event on this device (panics on an error for it).
fn group_ok(
    c: &mut Client,
    id: &str,
    op: &str,
    chat: &str,
    members: &[&str],
    ev_op: &str,
    ev_members: &[&str],
) -> Value {
    c.send_json(group_frame(id, op, chat, members));
    let what = format!("{ev_op} {ev_members:?} in {chat} (or an error for {id})");
    let v = c.recv_until_described(&what, |v| {
        is_group_ev(v, chat, ev_op, ev_members) || (v["t"] == "error" && v["id"] == id)
    });
    assert_eq!(
        v["t"],
        "ev",
        "[{}] {op} {members:?} on {chat} failed: {v}",
        c.label()
    );
    assert_eq!(v["by"], user_of(c), "{v}");
    v
}

/// Waits for a group event on this device.
fn wait_group(c: &mut Client, chat: &str, op: &str, members: &[&str]) -> Value {
    let what = format!("{op} {members:?} in {chat}");
    c.recv_until_described(&what, |v| is_group_ev(v, chat, op, members))
}

/// The next `n` messages of `chat` on this device.
fn group_msgs(c: &mut Client, chat: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let chat = chat.to_string();
            c.recv_until_described(&format!("group message #{i}"), move |v| {
                is_msg(v) && v["chat"] == chat.as_str()
            })
        })
        .collect()
}

/// Messages and membership events of `chat` in a log, as tokens.
fn chat_story(events: &[Value], chat: &str) -> Vec<String> {
    story_events(events, chat)
        .iter()
        .map(|v| token(v))
        .collect()
}

fn story_events<'a>(events: &'a [Value], chat: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|v| v["chat"] == chat && (v["kind"] == "msg" || v["kind"] == "group"))
        .collect()
}

fn msg_tok(sent: &Value, from: &str, body: &str) -> String {
    format!("msg {} {from} {body}", str_of(sent, "msg"))
}

fn send_frame(id: &str, to: &str, body: &str) -> Value {
    json!({"t": "send", "id": id, "to": to, "body": body})
}

fn names(list: &[String]) -> Vec<&str> {
    list.iter().map(String::as_str).collect()
}

// ---------------------------------------------------------------------------------------------
// Basics
// ---------------------------------------------------------------------------------------------

#[test]
fn a_group_message_reaches_every_device_of_every_member_and_only_members() {
    let server = Server::start(ServerOpts::shards(3));
    let addr = server.addr();
    let mut a_phone = Client::online(addr, "alice", "phone");
    let mut a_laptop = Client::online(addr, "alice", "laptop");
    let mut bob = Client::online(addr, "bob", "phone");
    let mut carol = Client::online(addr, "carol", "phone");
    let mut dave = Client::online(addr, "dave", "phone");
    let dave_linked = dave.own_linked_seq();
    const G: &str = "g:team";

    // The creator is a member; everyone's log gets `created` listing all, creator first.
    let created = group_ok(
        &mut a_phone,
        "c1",
        "create",
        G,
        &["bob", "carol"],
        "created",
        &["alice", "bob", "carol"],
    );
    assert_eq!(
        wait_group(&mut a_laptop, G, "created", &["alice", "bob", "carol"]),
        created,
        "the creator's devices see the same event"
    );
    for c in [&mut bob, &mut carol] {
        let v = wait_group(c, G, "created", &["alice", "bob", "carol"]);
        assert_eq!(v["by"], "alice", "{v}");
    }
    // A group that exists cannot be created again.
    bob.expect_error(group_frame("c2", "create", G, &["dave"]), "forbidden");

    // A message reaches every device of every member, the sender's own devices included.
    let sent = a_phone.send_and_wait("m1", G, "hello team");
    for c in [&mut a_phone, &mut a_laptop, &mut bob, &mut carol] {
        let ev = c.next_msg();
        assert_eq!(ev["chat"], G, "[{}] {ev}", c.label());
        assert_eq!(ev["from"], "alice", "{ev}");
        assert_eq!(ev["dev"], "phone", "{ev}");
        assert_eq!(ev["msg"], sent["msg"], "{ev}");
        assert_eq!(ev["body"], "hello team", "{ev}");
    }
    // `sent` means every member's copy is durable: a new device finds it in its log at once.
    let (_, carol_log) = read_whole_log(addr, "carol", "audit");
    assert!(
        carol_log.iter().any(|v| v["msg"] == sent["msg"]),
        "the message is in carol's log after sent"
    );
    let reply = bob.send_and_wait("r1", G, "hi alice");
    for c in [&mut a_phone, &mut a_laptop, &mut carol, &mut bob] {
        let ev = c.next_msg();
        assert_eq!(ev["msg"], reply["msg"], "[{}] {ev}", c.label());
        assert_eq!(ev["from"], "bob", "{ev}");
    }

    // A non-member cannot send; a retry of the same id gets the same answer.
    let err = dave.expect_error(send_frame("x1", G, "let me in"), "not_member");
    assert_eq!(err["id"], "x1");
    let err = dave.expect_error(send_frame("x1", G, "let me in"), "not_member");
    assert_eq!(err["id"], "x1", "{err}");
    dave.expect_error(send_frame("x2", "g:nowhere", "anyone?"), "not_member");
    // Nothing reached dave's log: his next event is his own note.
    let note = dave.note_to_self("n1");
    assert_eq!(seq_of(&note), dave_linked + 1, "{note}");
    // And nothing reached the members' logs: the next group message follows bob's reply.
    let last = carol.send_and_wait("l1", G, "last");
    for c in [&mut a_phone, &mut bob] {
        let ev = c.next_msg();
        assert_eq!(ev["msg"], last["msg"], "[{}] {ev}", c.label());
    }
}

// ---------------------------------------------------------------------------------------------
// One order
// ---------------------------------------------------------------------------------------------

#[test]
fn concurrent_senders_on_different_shards_every_member_device_sees_the_same_order() {
    let server = Server::start(ServerOpts::shards(3));
    let addr = server.addr();
    const USERS: usize = 12;
    const PER_SENDER: usize = 25;
    const G: &str = "g:order";
    let users: Vec<String> = (0..USERS).map(|i| format!("u{i:02}")).collect();
    let mut phones: Vec<Client> = users
        .iter()
        .map(|u| Client::online(addr, u, "phone"))
        .collect();
    let mut tablets: Vec<Client> = users[..3]
        .iter()
        .map(|u| Client::online(addr, u, "tablet"))
        .collect();
    group_ok(
        &mut phones[0],
        "c",
        "create",
        G,
        &names(&users[1..]),
        "created",
        &names(&users),
    );
    for c in phones[1..].iter_mut().chain(tablets.iter_mut()) {
        wait_group(c, G, "created", &names(&users));
    }

    let total = USERS * PER_SENDER;
    let barrier = Barrier::new(USERS);
    let seen: Vec<(String, Vec<Value>)> = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for c in phones.iter_mut() {
            let barrier = &barrier;
            handles.push(s.spawn(move || {
                let prefix = format!("{}-", user_of(c));
                barrier.wait();
                c.send_many(G, &prefix, PER_SENDER, 4);
                (c.label().to_string(), group_msgs(c, G, total))
            }));
        }
        for c in tablets.iter_mut() {
            handles.push(s.spawn(move || (c.label().to_string(), group_msgs(c, G, total))));
        }
        handles
            .into_iter()
            .map(|h| h.join().expect("device thread"))
            .collect()
    });

    let (ref_label, reference) = &seen[0];
    let ref_tokens: Vec<String> = reference.iter().map(token).collect();
    for (label, events) in &seen[1..] {
        let tokens: Vec<String> = events.iter().map(token).collect();
        if let Some(i) = (0..total).find(|&i| tokens[i] != ref_tokens[i]) {
            panic!(
                "{label} and {ref_label} disagree at position {i}: {} vs {}",
                tokens[i], ref_tokens[i]
            );
        }
    }
    // Every message once, each sender's in its send order, sent from the phone.
    let distinct: BTreeSet<&str> = reference.iter().map(|v| str_of(v, "msg")).collect();
    assert_eq!(distinct.len(), total, "every message exactly once");
    let mut next: HashMap<String, usize> = HashMap::new();
    for ev in reference {
        let from = str_of(ev, "from").to_string();
        let i = next.entry(from.clone()).or_default();
        assert_eq!(
            ev["body"],
            format!("{from}-{i}"),
            "{from}'s send order: {ev}"
        );
        assert_eq!(ev["dev"], "phone", "{ev}");
        *i += 1;
    }
    // The senders' shards (in the message ids, docs/protocol.md) cover all three shards.
    let shards: BTreeSet<u64> = reference
        .iter()
        .map(|v| (msg_num(v, "msg") >> 16) & 0x7f)
        .collect();
    assert!(
        shards.len() >= 3,
        "senders on at least 3 shards, got {shards:?}"
    );
}

#[test]
fn group_history_pages_follow_the_order_of_the_members_log() {
    // Senders on three shards at once: message ids (minted per shard, ordered across shards only
    // to the millisecond) need not follow the group's one order, but history must: it pages
    // through the caller's log, newest first.
    let server = Server::start(ServerOpts::shards(3));
    let addr = server.addr();
    const USERS: usize = 9;
    const PER_SENDER: usize = 20;
    const G: &str = "g:hist";
    let users: Vec<String> = (0..USERS).map(|i| format!("h{i}")).collect();
    let mut phones: Vec<Client> = users
        .iter()
        .map(|u| Client::online(addr, u, "phone"))
        .collect();
    group_ok(
        &mut phones[0],
        "c",
        "create",
        G,
        &names(&users[1..]),
        "created",
        &names(&users),
    );
    for c in phones[1..].iter_mut() {
        wait_group(c, G, "created", &names(&users));
    }
    let barrier = Barrier::new(USERS);
    std::thread::scope(|s| {
        for c in phones.iter_mut() {
            let barrier = &barrier;
            s.spawn(move || {
                let prefix = format!("{}-", user_of(c));
                barrier.wait();
                c.send_many(G, &prefix, PER_SENDER, 4);
            });
        }
    });
    let total = USERS * PER_SENDER;
    let (_, log) = read_whole_log(addr, &users[0], "audit");
    let mut want: Vec<Value> = log
        .into_iter()
        .filter(|v| is_msg(v) && v["chat"] == G)
        .collect();
    assert_eq!(want.len(), total);
    want.reverse();
    let ids: Vec<u64> = want.iter().map(|v| msg_num(v, "msg")).collect();
    let inversions = ids.windows(2).filter(|w| w[0] < w[1]).count();

    let reader = &mut phones[0];
    let mut got: Vec<Value> = Vec::new();
    let mut before: Option<String> = None;
    for _ in 0..=total {
        let page = reader.history(G, before.as_deref(), Some(25));
        if page.is_empty() {
            break;
        }
        before = Some(str_of(page.last().unwrap(), "msg").to_string());
        got.extend(page);
    }
    let got_ids: BTreeSet<&str> = got.iter().map(|v| str_of(v, "msg")).collect();
    assert_eq!(got.len(), total, "every message once");
    assert_eq!(got_ids.len(), total, "every message once");
    let seqs: Vec<u64> = got.iter().map(seq_of).collect();
    if let Some(i) = seqs.windows(2).position(|w| w[0] <= w[1]) {
        panic!(
            "history is not newest-first in log order: page entry {i} {} comes before entry {} \
             {} ({inversions} places where the log's order and the id order disagree)",
            got[i],
            i + 1,
            got[i + 1]
        );
    }
    assert_eq!(got, want, "history equals the log's messages, newest first");
}

// ---------------------------------------------------------------------------------------------
// Membership
// ---------------------------------------------------------------------------------------------

fn involves(v: &Value, user: &str) -> bool {
    v["members"]
        .as_array()
        .is_some_and(|m| m.iter().any(|x| x == user))
}

fn joins(v: &Value, user: &str) -> bool {
    v["kind"] == "group" && (v["op"] == "created" || v["op"] == "added") && involves(v, user)
}

fn leaves(v: &Value, user: &str) -> bool {
    v["kind"] == "group" && (v["op"] == "removed" || v["op"] == "left") && involves(v, user)
}

/// `mine` (a user's story of the group) must be a series of membership periods, each starting
/// with the event that made the user a member and ending with the one that ended it (or at the
/// end), and each exactly the matching contiguous slice of `reference` (the story of a member
/// who never left): nothing from before joining or after leaving, nothing missing in between.
fn assert_membership_periods(user: &str, mine: &[&Value], reference: &[&Value]) {
    let mine_t: Vec<String> = mine.iter().map(|v| token(v)).collect();
    let ref_t: Vec<String> = reference.iter().map(|v| token(v)).collect();
    let mut pos = 0;
    let mut i = 0;
    while i < mine.len() {
        assert!(
            joins(mine[i], user),
            "[{user}] event #{i} outside a membership period: {}\nstory: {mine_t:#?}",
            mine_t[i]
        );
        let end = (i..mine.len())
            .find(|&j| leaves(mine[j], user))
            .map_or(mine.len(), |j| j + 1);
        let period = &mine_t[i..end];
        let start = (pos..ref_t.len())
            .find(|&k| ref_t[k] == period[0])
            .unwrap_or_else(|| panic!("[{user}] {} is not in the group's story", period[0]));
        let stop = start + period.len();
        assert!(
            stop <= ref_t.len() && ref_t[start..stop] == *period,
            "[{user}] membership period {:?} differs from the group's order {:?}",
            period,
            &ref_t[start..stop.min(ref_t.len())]
        );
        if end == mine.len() && !leaves(mine[end - 1], user) {
            assert_eq!(
                stop,
                ref_t.len(),
                "[{user}] still a member but missed the group's later events"
            );
        }
        pos = stop;
        i = end;
    }
}

type SendResult = (String, Result<String, String>);

/// Sends to `chat` one message at a time until `done` (at least 5, at most 300); returns each
/// (body, Ok(msg id) | Err(error code)).
fn send_until(c: &mut Client, chat: &str, prefix: &str, done: &AtomicBool) -> Vec<SendResult> {
    let mut out = Vec::new();
    for i in 0..300 {
        if i >= 5 && done.load(Ordering::SeqCst) {
            break;
        }
        let id = format!("{prefix}{i}");
        c.send_msg(&id, chat, &id);
        let v = c.recv_until_described(&format!("sent or error for {id}"), |v| {
            (v["t"] == "sent" || v["t"] == "error") && v["id"] == id.as_str()
        });
        let result = if v["t"] == "sent" {
            Ok(str_of(&v, "msg").to_string())
        } else {
            assert_eq!(v["code"], "not_member", "[{}] {v}", c.label());
            Err(str_of(&v, "code").to_string())
        };
        out.push((id, result));
    }
    out
}

#[test]
fn membership_changes_interleaved_with_sends_nobody_gets_a_message_from_outside_their_membership() {
    let server = Server::start(ServerOpts::shards(3));
    let addr = server.addr();
    const G: &str = "g:mix";
    let users = ["ann", "bo", "cy", "di", "ed"];
    let mut ann = Client::online(addr, "ann", "phone");
    group_ok(
        &mut ann,
        "create",
        "create",
        G,
        &["bo", "cy"],
        "created",
        &["ann", "bo", "cy"],
    );
    let mut senders: Vec<Client> = [
        ("ann", "tablet"),
        ("bo", "phone"),
        ("cy", "phone"),
        ("di", "phone"),
        ("ed", "phone"),
    ]
    .iter()
    .map(|(u, d)| Client::online(addr, u, d))
    .collect();

    let ops: [(&str, &str, &[&str]); 7] = [
        ("add", "added", &["di"]),
        ("remove", "removed", &["cy"]),
        ("add", "added", &["ed"]),
        ("remove", "removed", &["di"]),
        ("add", "added", &["cy"]),
        ("remove", "removed", &["bo"]),
        ("add", "added", &["di"]),
    ];
    let done = AtomicBool::new(false);
    let results: Vec<(String, Vec<SendResult>)> = std::thread::scope(|s| {
        let handles: Vec<_> = senders
            .iter_mut()
            .map(|c| {
                let done = &done;
                s.spawn(move || {
                    let user = user_of(c);
                    let prefix =
                        format!("{}-{}-", user, str_of(c.hello_frame().unwrap(), "device"));
                    (user, send_until(c, G, &prefix, done))
                })
            })
            .collect();
        // The admin changes membership, with messages of its own between the changes.
        for (i, (op, ev_op, members)) in ops.iter().enumerate() {
            ann.send_and_wait(&format!("pre{i}a"), G, &format!("pre{i}a"));
            ann.send_and_wait(&format!("pre{i}b"), G, &format!("pre{i}b"));
            group_ok(&mut ann, &format!("op{i}"), op, G, members, ev_op, members);
        }
        ann.send_and_wait("last", G, "last");
        done.store(true, Ordering::SeqCst);
        handles
            .into_iter()
            .map(|h| h.join().expect("sender thread"))
            .collect()
    });

    // Every user's whole log (read by a new device; `sent` of "last" means the group's fan-outs
    // before it are durable).
    let logs: HashMap<&str, Vec<Value>> = users
        .iter()
        .map(|u| (*u, read_whole_log(addr, u, "audit").1))
        .collect();
    let reference = story_events(&logs["ann"], G);
    for u in users {
        let mine = story_events(&logs[u], G);
        assert_membership_periods(u, &mine, &reference);
    }
    // The final members have "last"; bo (removed) does not.
    for u in users {
        let has_last = story_events(&logs[u], G)
            .iter()
            .any(|v| v["body"] == "last");
        assert_eq!(has_last, u != "bo", "[{u}] the last message");
    }
    // Accepted sends are in the group's story exactly once and in the sender's own log; refused
    // ones are nowhere.
    let ref_tokens: Vec<String> = reference.iter().map(|v| token(v)).collect();
    let mut accepted = 0;
    for (user, sends) in &results {
        for (body, result) in sends {
            match result {
                Ok(msg) => {
                    accepted += 1;
                    let tok = format!("msg {msg} {user} {body}");
                    let n = ref_tokens.iter().filter(|t| **t == tok).count();
                    assert_eq!(n, 1, "{tok} in the group's story");
                    assert!(
                        story_events(&logs[user.as_str()], G)
                            .iter()
                            .any(|v| token(v) == tok),
                        "[{user}] own message {tok} missing"
                    );
                }
                Err(_) => {
                    for u in users {
                        assert!(
                            !logs[u].iter().any(|v| v["body"] == body.as_str()),
                            "[{u}] got refused message {body}"
                        );
                    }
                }
            }
        }
    }
    assert!(accepted > 0, "no concurrent send was accepted");
    for (user, sends) in &results {
        let refused = sends.iter().filter(|(_, r)| r.is_err()).count();
        eprintln!("{user}: {} sends, {refused} refused", sends.len());
    }
}

#[test]
fn only_the_admin_adds_or_removes_and_the_longest_standing_member_takes_over() {
    let server = Server::start(ServerOpts::shards(3));
    let addr = server.addr();
    const G: &str = "g:h";
    let mut zed = Client::online(addr, "zed", "phone");
    let mut yan = Client::online(addr, "yan", "phone");
    let mut xia = Client::online(addr, "xia", "phone");
    let mut wu = Client::online(addr, "wu", "phone");
    let mut vic = Client::online(addr, "vic", "phone");

    let e1 = "group created [zed,yan,xia] by zed";
    group_ok(
        &mut zed,
        "c1",
        "create",
        G,
        &["yan", "xia"],
        "created",
        &["zed", "yan", "xia"],
    );
    wait_group(&mut yan, G, "created", &["zed", "yan", "xia"]);
    wait_group(&mut xia, G, "created", &["zed", "yan", "xia"]);
    yan.expect_error(group_frame("c2", "create", G, &["wu"]), "forbidden");
    // Members who are not the admin: not_admin. Non-members: not_member.
    xia.expect_error(group_frame("a1", "add", G, &["wu"]), "not_admin");
    yan.expect_error(group_frame("r1", "remove", G, &["zed"]), "not_admin");
    wu.expect_error(group_frame("a2", "add", G, &["vic"]), "not_member");
    wu.expect_error(group_frame("r2", "remove", G, &["zed"]), "not_member");
    wu.expect_error(group_frame("l1", "leave", G, &[]), "not_member");
    wu.expect_error(
        group_frame("a3", "add", "g:nothere", &["vic"]),
        "not_member",
    );

    // The admin adds wu: wu's first event from the group is its own `added`.
    let e2 = "group added [wu] by zed";
    group_ok(&mut zed, "a4", "add", G, &["wu"], "added", &["wu"]);
    wait_group(&mut wu, G, "added", &["wu"]);
    // Adding a member again changes nothing and appends nothing.
    zed.send_json(group_frame("a5", "add", G, &["yan"]));
    let m1 = zed.send_and_wait("m1", G, "hello");
    let e3 = "group left [zed] by zed";
    // The admin leaves: yan (longest-standing) becomes admin, not xia (first by name).
    group_ok(&mut zed, "l2", "leave", G, &[], "left", &["zed"]);
    wait_group(&mut yan, G, "left", &["zed"]);
    zed.expect_error(send_frame("z1", G, "still here?"), "not_member");
    zed.expect_error(group_frame("a6", "add", G, &["zed"]), "not_member");
    xia.expect_error(group_frame("a7", "add", G, &["vic"]), "not_admin");
    wu.expect_error(group_frame("a8", "add", G, &["vic"]), "not_admin");
    let e4 = "group added [vic] by yan";
    group_ok(&mut yan, "a9", "add", G, &["vic"], "added", &["vic"]);
    wait_group(&mut vic, G, "added", &["vic"]);
    // yan leaves: xia (joined before wu and vic) becomes admin.
    let e5 = "group left [yan] by yan";
    group_ok(&mut yan, "l3", "leave", G, &[], "left", &["yan"]);
    wait_group(&mut xia, G, "left", &["yan"]);
    wu.expect_error(group_frame("r3", "remove", G, &["xia"]), "not_admin");
    vic.expect_error(group_frame("r4", "remove", G, &["xia"]), "not_admin");
    let e6 = "group removed [wu,vic] by xia";
    group_ok(
        &mut xia,
        "r5",
        "remove",
        G,
        &["wu", "vic"],
        "removed",
        &["wu", "vic"],
    );
    wait_group(&mut wu, G, "removed", &["wu", "vic"]);
    wait_group(&mut vic, G, "removed", &["wu", "vic"]);
    wu.expect_error(send_frame("w1", G, "hello?"), "not_member");
    // Removed members get nothing sent after the removal.
    let m2 = xia.send_and_wait("m2", G, "alone");
    // The last member leaves: the group is gone and can be created again.
    let e7 = "group left [xia] by xia";
    group_ok(&mut xia, "l4", "leave", G, &[], "left", &["xia"]);
    xia.expect_error(send_frame("x1", G, "anyone?"), "not_member");
    let e8 = "group created [wu,vic] by wu";
    group_ok(
        &mut wu,
        "c3",
        "create",
        G,
        &["vic"],
        "created",
        &["wu", "vic"],
    );
    wait_group(&mut vic, G, "created", &["wu", "vic"]);

    let m1 = msg_tok(&m1, "zed", "hello");
    let m2 = msg_tok(&m2, "xia", "alone");
    let want: [(&str, Vec<&str>); 5] = [
        ("zed", vec![e1, e2, &m1, e3]),
        ("yan", vec![e1, e2, &m1, e3, e4, e5]),
        ("xia", vec![e1, e2, &m1, e3, e4, e5, e6, &m2, e7]),
        ("wu", vec![e2, &m1, e3, e4, e5, e6, e8]),
        ("vic", vec![e4, e5, e6, e8]),
    ];
    for (user, story) in want {
        let (_, log) = read_whole_log(addr, user, "audit");
        assert_eq!(chat_story(&log, G), story, "[{user}] story of {G}");
    }
}

#[test]
fn membership_and_admin_survive_a_crash() {
    let mut server = Server::start(ServerOpts::shards(3));
    let addr = server.addr();
    const G: &str = "g:r";
    let mut zed = Client::online(addr, "zed", "phone");
    group_ok(
        &mut zed,
        "c",
        "create",
        G,
        &["yan", "xia"],
        "created",
        &["zed", "yan", "xia"],
    );
    group_ok(&mut zed, "a", "add", G, &["wu"], "added", &["wu"]);
    group_ok(&mut zed, "r", "remove", G, &["xia"], "removed", &["xia"]);
    group_ok(&mut zed, "l", "leave", G, &[], "left", &["zed"]);

    server.kill9();
    server.restart();
    let addr = server.addr();
    let mut zed = Client::online(addr, "zed", "phone");
    let mut yan = Client::online(addr, "yan", "phone");
    let mut xia = Client::online(addr, "xia", "phone");
    let mut wu = Client::online(addr, "wu", "phone");
    let mut vic = Client::online(addr, "vic", "phone");
    // Still there, with the same members and yan as admin.
    wu.expect_error(group_frame("c2", "create", G, &[]), "forbidden");
    xia.expect_error(send_frame("x", G, "back?"), "not_member");
    zed.expect_error(send_frame("z", G, "back?"), "not_member");
    wu.expect_error(group_frame("a2", "add", G, &["vic"]), "not_admin");
    group_ok(&mut yan, "a3", "add", G, &["vic"], "added", &["vic"]);
    let sent = wu.send_and_wait("m", G, "after the crash");
    let tok = msg_tok(&sent, "wu", "after the crash");
    for c in [&mut yan, &mut wu, &mut vic] {
        let msg = sent["msg"].clone();
        let ev = c.next_ev("the message", move |v| v["msg"] == msg);
        assert_eq!(token(&ev), tok, "[{}]", c.label());
    }
    for user in ["zed", "xia"] {
        let (_, log) = read_whole_log(addr, user, "audit");
        assert!(
            !chat_story(&log, G).contains(&tok),
            "[{user}] a former member got a message after the crash"
        );
    }
}

#[test]
fn groups_hold_at_most_1024_members() {
    let server = Server::start(ServerOpts::shards(3));
    let addr = server.addr();
    const G: &str = "g:big";
    let mut boss = Client::online(addr, "boss", "phone");
    let others: Vec<String> = (0..1024).map(|i| format!("m{i:04}")).collect();

    // 1025 members with the creator: group_full, and nothing was created.
    boss.expect_error(
        group_frame("c1", "create", G, &names(&others)),
        "group_full",
    );
    // Exactly 1024: fine.
    let mut all = vec!["boss"];
    all.extend(names(&others[..1023]));
    let created = group_ok(
        &mut boss,
        "c2",
        "create",
        G,
        &names(&others[..1023]),
        "created",
        &all,
    );
    assert_eq!(created["members"].as_array().unwrap().len(), 1024);
    boss.expect_error(group_frame("a1", "add", G, &["extra"]), "group_full");
    // A removal makes room for exactly one.
    group_ok(
        &mut boss,
        "r1",
        "remove",
        G,
        &["m0000"],
        "removed",
        &["m0000"],
    );
    boss.expect_error(group_frame("a2", "add", G, &["x1", "x2"]), "group_full");
    group_ok(&mut boss, "a3", "add", G, &["extra"], "added", &["extra"]);
    boss.expect_error(group_frame("a4", "add", G, &["x3"]), "group_full");
    // A member far down the list has the whole story; the refused ones have nothing.
    let sent = boss.send_and_wait("m", G, "full house");
    let (_, log) = read_whole_log(addr, "m1022", "audit");
    let story = chat_story(&log, G);
    assert_eq!(story.len(), 4, "{story:?}");
    assert!(
        story[0].starts_with("group created [boss,m0000,"),
        "{story:?}"
    );
    assert_eq!(story[1], "group removed [m0000] by boss");
    assert_eq!(story[2], "group added [extra] by boss");
    assert_eq!(story[3], msg_tok(&sent, "boss", "full house"));
    let (_, log) = read_whole_log(addr, "x1", "audit");
    assert!(chat_story(&log, G).is_empty(), "refused x1 got {log:?}");
}

// ---------------------------------------------------------------------------------------------
// Catch-up
// ---------------------------------------------------------------------------------------------

#[test]
fn a_members_offline_device_catches_up_group_messages_and_membership_events_in_order() {
    let server = Server::start(ServerOpts::shards(3));
    let addr = server.addr();
    const G: &str = "g:club";
    let mut tablet = Client::online(addr, "bob", "tablet");
    let acked = tablet.own_linked_seq();
    tablet.ack(acked);
    tablet.sync_point();
    tablet.close();
    let mut alice = Client::online(addr, "alice", "phone");
    let mut phone = Client::online(addr, "bob", "phone");
    let mut carol = Client::online(addr, "carol", "phone");

    let mut want = vec!["group created [alice,bob] by alice".to_string()];
    group_ok(
        &mut alice,
        "c",
        "create",
        G,
        &["bob"],
        "created",
        &["alice", "bob"],
    );
    for (c, who, prefix) in [(&mut alice, "alice", "a"), (&mut phone, "bob", "b")] {
        for i in 0..5 {
            let body = format!("{prefix}{i}");
            let sent = c.send_and_wait(&body, G, &body);
            want.push(msg_tok(&sent, who, &body));
        }
    }
    group_ok(&mut alice, "a", "add", G, &["carol"], "added", &["carol"]);
    want.push("group added [carol] by alice".to_string());
    wait_group(&mut carol, G, "added", &["carol"]);
    for i in 0..5 {
        let body = format!("c{i}");
        let sent = carol.send_and_wait(&body, G, &body);
        want.push(msg_tok(&sent, "carol", &body));
    }
    group_ok(
        &mut alice,
        "r",
        "remove",
        G,
        &["carol"],
        "removed",
        &["carol"],
    );
    want.push("group removed [carol] by alice".to_string());
    let mut last = Value::Null;
    for i in 0..5 {
        let body = format!("d{i}");
        last = alice.send_and_wait(&body, G, &body);
        want.push(msg_tok(&last, "alice", &body));
    }

    // The online phone saw it all live.
    let last_msg = last["msg"].clone();
    let last_ev = phone.next_ev("the last message", move |v| v["msg"] == last_msg);
    let head = seq_of(&last_ev);
    let mut live = phone.collect_events_until_seq(head);
    live.push(last_ev);
    assert_eq!(chat_story(&live, G), want, "the phone's live story");

    // The tablet catches up with exactly the same events, in the same order.
    let mut tablet = Client::dev(addr, "bob", "tablet");
    let hello = tablet.hello();
    assert_eq!(hello["cursor"], acked, "{hello}");
    let caught_up = tablet.collect_events_until_seq(head);
    let live_after: Vec<Value> = live.into_iter().filter(|v| seq_of(v) > acked).collect();
    assert_eq!(
        caught_up, live_after,
        "catch-up equals what the phone saw live"
    );
    assert_eq!(chat_story(&caught_up, G), want);
}

// ---------------------------------------------------------------------------------------------
// Receipts, typing, edit and delete in groups
// ---------------------------------------------------------------------------------------------

fn receipt_tokens(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|v| v["kind"] == "receipt")
        .map(|v| format!("{} {}", str_of(v, "chat"), token(v)))
        .collect()
}

fn next_receipt(c: &mut Client) -> Value {
    c.next_kind("receipt")
}

fn rtok(status: &str, by: &str, msg: &str) -> String {
    format!("g:team receipt {status} {by} {msg}")
}

#[test]
fn group_receipts_reach_the_sender_per_member_and_fold() {
    let server = Server::start(ServerOpts::shards(3));
    let addr = server.addr();
    const G: &str = "g:team";
    let mut alice = Client::online(addr, "alice", "phone");
    let mut bob = Client::online(addr, "bob", "phone");
    let mut carol = Client::online(addr, "carol", "phone");
    group_ok(
        &mut alice,
        "c",
        "create",
        G,
        &["bob", "carol"],
        "created",
        &["alice", "bob", "carol"],
    );
    let m1 = str_of(&alice.send_and_wait("m1", G, "one"), "msg").to_string();
    let m2 = str_of(&alice.send_and_wait("m2", G, "two"), "msg").to_string();
    let b = group_msgs(&mut bob, G, 2);
    let c = group_msgs(&mut carol, G, 2);

    let mut want = Vec::new();
    let mut step = |c: &mut Client, frame: Value, alice: &mut Client, want_tok: String| {
        c.send_json(frame);
        let r = next_receipt(alice);
        assert_eq!(format!("{} {}", str_of(&r, "chat"), token(&r)), want_tok);
        want.push(want_tok);
    };
    step(
        &mut bob,
        json!({"t": "ack", "seq": seq_of(&b[1])}),
        &mut alice,
        rtok("delivered", "bob", &m2),
    );
    step(
        &mut carol,
        json!({"t": "ack", "seq": seq_of(&c[0])}),
        &mut alice,
        rtok("delivered", "carol", &m1),
    );
    step(
        &mut carol,
        json!({"t": "read", "chat": G, "up_to": m2}),
        &mut alice,
        rtok("read", "carol", &m2),
    );
    step(
        &mut bob,
        json!({"t": "read", "chat": G, "up_to": m1}),
        &mut alice,
        rtok("read", "bob", &m1),
    );
    let read = carol.next_kind("read");
    assert_eq!(read["chat"], G, "{read}");
    assert_eq!(read["up_to"], m2.as_str(), "{read}");
    // carol's ack of m2 is covered by her read of m2: nothing new.
    carol.ack(seq_of(&c[1]));
    carol.sync_point();
    let m3 = str_of(&alice.send_and_wait("m3", G, "three"), "msg").to_string();
    let b3 = group_msgs(&mut bob, G, 1);
    step(
        &mut bob,
        json!({"t": "ack", "seq": seq_of(&b3[0])}),
        &mut alice,
        rtok("delivered", "bob", &m3),
    );

    // bob's message: every other member's ack is a receipt of its own for bob.
    let mb = str_of(&bob.send_and_wait("b1", G, "from bob"), "msg").to_string();
    let on_alice = alice.next_ev("bob's message", |v| is_msg(v) && v["from"] == "bob");
    alice.ack(seq_of(&on_alice));
    let r = next_receipt(&mut bob);
    assert_eq!(
        format!("{} {}", str_of(&r, "chat"), token(&r)),
        rtok("delivered", "alice", &mb)
    );
    let on_carol = carol.next_ev("bob's message", |v| is_msg(v) && v["from"] == "bob");
    carol.ack(seq_of(&on_carol));
    let r = next_receipt(&mut bob);
    assert_eq!(
        format!("{} {}", str_of(&r, "chat"), token(&r)),
        rtok("delivered", "carol", &mb)
    );
    let r = next_receipt(&mut alice);
    let tok = rtok("delivered", "carol", &m3);
    assert_eq!(format!("{} {}", str_of(&r, "chat"), token(&r)), tok);
    want.push(tok);

    // One read covering messages of two senders: a read receipt for each of them.
    let top = if m3.parse::<u64>().unwrap() > mb.parse::<u64>().unwrap() {
        m3.clone()
    } else {
        mb.clone()
    };
    carol.send_json(json!({"t": "read", "chat": G, "up_to": top}));
    let tok = rtok("read", "carol", &top);
    for c in [&mut alice, &mut bob] {
        let r = next_receipt(c);
        assert_eq!(
            format!("{} {}", str_of(&r, "chat"), token(&r)),
            tok,
            "[{}]",
            c.label()
        );
    }
    want.push(tok.clone());

    let (_, log) = read_whole_log(addr, "alice", "audit");
    assert_eq!(receipt_tokens(&log), want, "alice's receipts");
    let (_, log) = read_whole_log(addr, "bob", "audit");
    assert_eq!(
        receipt_tokens(&log),
        vec![
            rtok("delivered", "alice", &mb),
            rtok("delivered", "carol", &mb),
            tok,
        ],
        "bob's receipts"
    );
    let (_, log) = read_whole_log(addr, "carol", "audit");
    assert!(receipt_tokens(&log).is_empty(), "carol sent nothing");
}

#[test]
fn group_typing_reaches_the_other_members_online_devices_only() {
    let server = Server::start(ServerOpts::shards(3));
    let addr = server.addr();
    const G: &str = "g:team";
    let mut tablet = Client::online(addr, "bob", "tablet");
    let acked = tablet.own_linked_seq();
    tablet.ack(acked);
    tablet.sync_point();
    tablet.close();
    let mut alice = Client::online(addr, "alice", "phone");
    let mut bob = Client::online(addr, "bob", "phone");
    let mut carol = Client::online(addr, "carol", "phone");
    let mut dave = Client::online(addr, "dave", "phone");
    group_ok(
        &mut alice,
        "c",
        "create",
        G,
        &["bob", "carol"],
        "created",
        &["alice", "bob", "carol"],
    );

    alice.send_json(json!({"t": "typing", "chat": G, "on": true}));
    let want = json!({"t": "typing", "chat": G, "from": "alice", "on": true});
    for c in [&mut bob, &mut carol] {
        let t = c.recv_until_described("group typing", |v| v["t"] == "typing");
        assert_eq!(t, want, "[{}]", c.label());
    }
    carol.send_json(json!({"t": "typing", "chat": G, "on": false}));
    let want = json!({"t": "typing", "chat": G, "from": "carol", "on": false});
    for c in [&mut bob, &mut alice] {
        let t = c.recv_until_described("group typing", |v| v["t"] == "typing");
        assert_eq!(t, want, "[{}]", c.label());
    }

    // Barriers: a group message, and a direct message to dave; nobody got anything else.
    let sent = alice.send_and_wait("m", G, "typed");
    let d = alice.send_and_wait("d", "dave", "hi dave");
    for c in [&mut alice, &mut bob, &mut carol] {
        let msg = sent["msg"].clone();
        c.next_ev("the group message", move |v| v["msg"] == msg);
    }
    let dm = d["msg"].clone();
    dave.next_ev("the direct message", move |v| v["msg"] == dm);
    for c in [&mut alice, &mut bob, &mut carol, &mut dave] {
        let frames = c.drain_backlog();
        let extra: Vec<&Value> = frames.iter().filter(|v| v["t"] == "typing").collect();
        assert!(
            extra.is_empty(),
            "[{}] unexpected typing: {extra:?}",
            c.label()
        );
    }
    // The offline tablet gets no typing on reconnect.
    let mut tablet = Client::dev(addr, "bob", "tablet");
    let hello = tablet.hello();
    let events = tablet.collect_events_until_seq(u64_of(&hello, "head"));
    assert!(events.iter().all(|v| v["kind"] != "typing"));
    let again = alice.send_and_wait("m2", G, "again");
    let msg = again["msg"].clone();
    tablet.next_ev("the next group message", move |v| v["msg"] == msg);
    let frames = tablet.drain_backlog();
    assert!(
        frames.iter().all(|v| v["t"] != "typing"),
        "typing replayed: {frames:?}"
    );
}

#[test]
fn group_edits_and_deletes_for_everyone_reach_every_member_and_delete_for_me_only_the_caller() {
    let server = Server::start(ServerOpts::shards(3));
    let addr = server.addr();
    const G: &str = "g:team";
    let mut alice = Client::online(addr, "alice", "phone");
    let mut bob = Client::online(addr, "bob", "phone");
    let mut carol = Client::online(addr, "carol", "phone");
    group_ok(
        &mut alice,
        "c",
        "create",
        G,
        &["bob", "carol"],
        "created",
        &["alice", "bob", "carol"],
    );
    let s1 = alice.send_and_wait("m1", G, "orig");
    let m1 = str_of(&s1, "msg").to_string();
    for c in [&mut bob, &mut carol] {
        group_msgs(c, G, 1);
    }

    // Only the sender edits or deletes for everyone.
    for (id, frame) in [
        (
            "e1",
            json!({"t": "edit", "id": "e1", "msg": m1, "body": "not mine"}),
        ),
        (
            "d1",
            json!({"t": "delete", "id": "d1", "msg": m1, "scope": "everyone"}),
        ),
    ] {
        let err = bob.expect_error(frame, "forbidden");
        assert_eq!(err["id"], id);
        assert_eq!(err["msg"], m1.as_str(), "{err}");
    }
    alice.send_json(json!({"t": "edit", "msg": m1, "body": "changed"}));
    for c in [&mut alice, &mut bob, &mut carol] {
        let ev = c.next_kind("edit");
        assert_eq!(
            (&ev["chat"], &ev["msg"], &ev["body"]),
            (&json!(G), &json!(m1), &json!("changed")),
            "[{}] {ev}",
            c.label()
        );
    }
    let s2 = bob.send_and_wait("m2", G, "bob's");
    let m2 = str_of(&s2, "msg").to_string();
    group_msgs(&mut alice, G, 2);
    group_msgs(&mut carol, G, 1);
    carol.send_json(json!({"t": "delete", "msg": m2, "scope": "me"}));
    let ev = carol.next_kind("delete");
    assert_eq!(ev["scope"], "me", "{ev}");
    alice.send_json(json!({"t": "delete", "msg": m1, "scope": "everyone"}));
    for c in [&mut alice, &mut bob, &mut carol] {
        let ev = c.next_ev("delete for everyone", |v| {
            v["kind"] == "delete" && v["scope"] == "everyone"
        });
        assert_eq!(ev["chat"], G, "{ev}");
        assert_eq!(ev["msg"], m1.as_str(), "{ev}");
    }
    let s3 = alice.send_and_wait("m3", G, "after");

    let t1 = msg_tok(&s1, "alice", "orig");
    let t2 = msg_tok(&s2, "bob", "bob's");
    let t3 = msg_tok(&s3, "alice", "after");
    let edit = format!("edit {m1} changed");
    let del = format!("delete {m1} everyone");
    let created = "group created [alice,bob,carol] by alice".to_string();
    for (user, want) in [
        ("alice", vec![&created, &t1, &edit, &t2, &del, &t3]),
        ("bob", vec![&created, &t1, &edit, &t2, &del, &t3]),
        (
            "carol",
            vec![
                &created,
                &t1,
                &edit,
                &t2,
                &format!("delete {m2} me"),
                &del,
                &t3,
            ],
        ),
    ] {
        let (_, log) = read_whole_log(addr, user, "audit");
        let got: Vec<String> = log.iter().filter(|v| v["chat"] == G).map(token).collect();
        let want: Vec<String> = want.into_iter().cloned().collect();
        assert_eq!(got, want, "[{user}] group story with changes");
    }
    let ids = |page: Vec<Value>| -> Vec<String> {
        page.iter().map(|v| str_of(v, "msg").to_string()).collect()
    };
    let m3 = str_of(&s3, "msg").to_string();
    assert_eq!(
        ids(bob.history(G, None, None)),
        vec![m3.clone(), m2.clone()]
    );
    assert_eq!(ids(carol.history(G, None, None)), vec![m3]);
}

#[test]
fn group_edits_reach_only_members_who_got_the_message() {
    let server = Server::start(ServerOpts::shards(3));
    let addr = server.addr();
    const G: &str = "g:late";
    let mut alice = Client::online(addr, "alice", "phone");
    let mut bob = Client::online(addr, "bob", "phone");
    group_ok(
        &mut alice,
        "c",
        "create",
        G,
        &["bob", "carol"],
        "created",
        &["alice", "bob", "carol"],
    );
    let s1 = alice.send_and_wait("m1", G, "before");
    let m1 = str_of(&s1, "msg").to_string();
    // carol leaves the group, dave joins it: neither may hear of m1's edit.
    group_ok(
        &mut alice,
        "r",
        "remove",
        G,
        &["carol"],
        "removed",
        &["carol"],
    );
    group_ok(&mut alice, "a", "add", G, &["dave"], "added", &["dave"]);
    alice.send_json(json!({"t": "edit", "msg": m1, "body": "after"}));
    for c in [&mut alice, &mut bob] {
        let ev = c.next_kind("edit");
        assert_eq!(token(&ev), format!("edit {m1} after"), "[{}]", c.label());
    }
    // Barrier: a later message every current member gets.
    let s2 = alice.send_and_wait("m2", G, "later");
    let t1 = msg_tok(&s1, "alice", "before");
    let t2 = msg_tok(&s2, "alice", "later");
    let created = "group created [alice,bob,carol] by alice";
    let removed = "group removed [carol] by alice";
    let added = "group added [dave] by alice";
    let edit = format!("edit {m1} after");
    for (user, want) in [
        ("bob", vec![created, &t1, removed, added, &edit, &t2]),
        ("carol", vec![created, &t1, removed]),
        ("dave", vec![added, &t2]),
    ] {
        let (_, log) = read_whole_log(addr, user, "audit");
        let got: Vec<String> = log.iter().filter(|v| v["chat"] == G).map(token).collect();
        assert_eq!(got, want, "[{user}] story of {G}");
    }
}

#[test]
fn an_admin_removing_themselves_hands_admin_to_the_longest_standing_member() {
    let server = Server::start(ServerOpts::shards(3));
    let addr = server.addr();
    const G: &str = "g:self";
    let mut kim = Client::online(addr, "kim", "phone");
    let mut lou = Client::online(addr, "lou", "phone");
    let mut abe = Client::online(addr, "abe", "phone");
    group_ok(
        &mut kim,
        "c",
        "create",
        G,
        &["lou", "abe"],
        "created",
        &["kim", "lou", "abe"],
    );
    group_ok(&mut kim, "r", "remove", G, &["kim"], "removed", &["kim"]);
    wait_group(&mut lou, G, "removed", &["kim"]);
    abe.expect_error(group_frame("a1", "add", G, &["kim"]), "not_admin");
    kim.expect_error(group_frame("a2", "add", G, &["kim"]), "not_member");
    group_ok(&mut lou, "a3", "add", G, &["kim"], "added", &["kim"]);
    wait_group(&mut kim, G, "added", &["kim"]);
    // kim is back, but as the newest member: lou stays admin.
    kim.expect_error(group_frame("a4", "add", G, &["zoe"]), "not_admin");
}

// ---------------------------------------------------------------------------------------------
// Scale
// ---------------------------------------------------------------------------------------------

#[test]
fn a_1024_member_group_delivers_to_all_members() {
    let fds = raise_fd_limit();
    assert!(
        fds >= 2 * 1024 + 256,
        "need about 2300 open files for 1024 clients and the server's sockets, have {fds}"
    );
    let server = Server::start(ServerOpts::shards(3));
    let addr = server.addr();
    const N: usize = 1024;
    const THREADS: usize = 8;
    const G: &str = "g:all";
    let users: Vec<String> = (0..N).map(|i| format!("p{i:04}")).collect();

    // Every member online with one device (connected in a few threads).
    let chunk = N.div_ceil(THREADS);
    let mut clients: Vec<Client> = std::thread::scope(|s| {
        let handles: Vec<_> = users
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|u| {
                            let mut c = Client::online(addr, u, "phone");
                            c.own_linked_seq();
                            c
                        })
                        .collect::<Vec<Client>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("connect thread"))
            .collect()
    });
    assert_eq!(clients.len(), N);

    group_ok(
        &mut clients[0],
        "c",
        "create",
        G,
        &names(&users[1..]),
        "created",
        &names(&users),
    );
    // Three senders, one after the other: that is the group's order.
    let mut want = Vec::new();
    for s in [0, N / 2, N - 1] {
        for i in 0..3 {
            let body = format!("{}-{i}", users[s]);
            let sent = clients[s].send_and_wait(&body, G, &body);
            want.push(msg_tok(&sent, &users[s], &body));
        }
    }

    let all = names(&users);
    std::thread::scope(|s| {
        for part in clients.chunks_mut(chunk) {
            let (all, want) = (&all, &want);
            s.spawn(move || {
                for c in part {
                    if user_of(c) != all[0] {
                        wait_group(c, G, "created", all);
                    }
                    let got: Vec<String> = group_msgs(c, G, want.len()).iter().map(token).collect();
                    assert_eq!(&got, want, "[{}] the group's messages", c.label());
                }
            });
        }
    });
}
