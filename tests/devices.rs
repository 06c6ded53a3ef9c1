//! Devices: a first connection links the device (a `linked` event every device sees), the sixth
//! device of a user is refused (`device_limit`, close 4003), and a second connection of the same
//! device replaces the first (close 4001).

mod common;

use common::*;
use serde_json::Value;

fn is_linked(v: &Value, device: &str) -> bool {
    v["t"] == "ev" && v["kind"] == "device" && v["op"] == "linked" && v["device"] == device
}

fn wait_linked(c: &mut Client, device: &str) -> Value {
    let device = device.to_string();
    c.recv_until_described(&format!("linked event of {device}"), move |v| {
        is_linked(v, &device)
    })
}

#[test]
fn first_connection_of_a_device_appends_a_linked_event_every_device_sees() {
    let server = Server::start(ServerOpts::default());
    let addr = server.addr();
    let mut phone = Client::dev(addr, "erin", "phone");
    phone.hello();
    let phone_linked = wait_linked(&mut phone, "phone");
    assert_eq!(
        seq_of(&phone_linked),
        1,
        "the first device's link is the first event"
    );

    let mut tablet = Client::dev(addr, "erin", "tablet");
    tablet.hello();
    let on_tablet = wait_linked(&mut tablet, "tablet");
    let on_phone = wait_linked(&mut phone, "tablet");
    assert_eq!(
        on_phone, on_tablet,
        "both devices see the same linked event"
    );
    assert_eq!(seq_of(&on_phone), 2);

    // Reconnecting a known device links nothing: the next event after a reconnect is a message.
    tablet.close();
    let mut tablet = Client::dev(addr, "erin", "tablet");
    tablet.hello();
    phone.send_and_wait("after", "erin", "after reconnect");
    let next = phone.recv_until(|v| v["t"] == "ev");
    assert_eq!(
        next["kind"], "msg",
        "a reconnect appended something: {next}"
    );
    assert_eq!(seq_of(&next), 3, "{next}");
    let on_tablet = tablet.next_msg();
    assert_eq!(on_tablet, next);
}

#[test]
fn sixth_device_is_refused_with_device_limit_and_4003() {
    let server = Server::start(ServerOpts::default());
    let addr = server.addr();
    let mut devices: Vec<Client> = (1..=5)
        .map(|i| {
            let mut c = Client::dev(addr, "fay", &format!("d{i}"));
            c.hello();
            wait_linked(&mut c, &format!("d{i}"));
            c
        })
        .collect();

    let mut sixth = Client::dev(addr, "fay", "d6");
    let err = sixth.next_error();
    assert_eq!(err["code"], "device_limit", "{err}");
    assert_eq!(
        sixth.expect_close(),
        4003,
        "over the limit closes with 4003"
    );

    // The limit counts linked devices, not online ones.
    for c in devices.drain(..) {
        c.close();
    }
    let mut sixth = Client::dev(addr, "fay", "d6");
    let err = sixth.next_error();
    assert_eq!(err["code"], "device_limit", "{err}");
    assert_eq!(sixth.expect_close(), 4003);

    // Known devices still connect, and nothing about d6 was appended to the log.
    let mut d3 = Client::dev(addr, "fay", "d3");
    let hello = d3.hello();
    let head = u64_of(&hello, "head");
    assert_eq!(head, 5, "five linked events and nothing else: {hello}");
    let sent = d3.send_and_wait("ok", "fay", "still works");
    let ev = d3.next_msg();
    assert_eq!(ev["msg"], sent["msg"]);
    assert_eq!(seq_of(&ev), 6, "a refused device appended nothing: {ev}");
}

#[test]
fn second_connection_of_the_same_device_replaces_the_first_with_4001() {
    let server = Server::start(ServerOpts::default());
    let addr = server.addr();
    let mut alice = Client::dev(addr, "alice", "phone");
    alice.hello();
    let mut first = Client::dev(addr, "gus", "phone");
    let hello1 = first.hello();
    wait_linked(&mut first, "phone");

    let mut second = Client::dev(addr, "gus", "phone");
    let hello2 = second.hello();
    assert_eq!(
        hello2["cursor"], hello1["cursor"],
        "same device, same cursor"
    );
    assert_eq!(
        first.expect_close(),
        4001,
        "the replaced connection closes with 4001"
    );

    // The new connection works, and the device was linked only once.
    let head = u64_of(&hello2, "head");
    let events = second.collect_events_until_seq(head);
    let links = events.iter().filter(|v| is_linked(v, "phone")).count();
    assert_eq!(links, 1, "a replacing connection links nothing: {events:?}");
    let sent = alice.send_and_wait("hi", "gus", "to the new connection");
    let ev = second.next_msg();
    assert_eq!(ev["msg"], sent["msg"], "{ev}");
    let sent = second.send_and_wait("back", "alice", "from the new connection");
    let ev = alice.recv_until(|v| is_msg(v) && v["body"] == "from the new connection");
    assert_eq!(ev["msg"], sent["msg"]);
}
