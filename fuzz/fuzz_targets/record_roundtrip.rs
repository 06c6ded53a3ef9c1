//! Structured: builds log events from arbitrary fields with `encode_event` and reads them back
//! with every decoder the server uses on stored records.
//!
//! Invariants checked:
//! - the record is UTF-8 JSON (it is also sent as a WebSocket text frame) whose every field is
//!   exactly the input (escaping of arbitrary UTF-8 bodies, chat names, ids);
//! - `decode_record_header` returns the same seq and ts;
//! - `decode_stored_msg` returns the message's ts/chat/from/msg for `msg` events, `None` for
//!   the other kinds; `rewrite_edited` keeps that and swaps in an arbitrary new body;
//! - the record spliced into a `history` page keeps the page valid JSON.
#![no_main]

use arbitrary::Arbitrary;
use courier::ids::{MsgId, Seq, UserId};
use courier::protocol::{
    EventBody, RecordHeader, StoredMsg, decode_record_header, decode_stored_msg, encode_event,
    encode_history, rewrite_edited,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

const DEVICE_OPS: [&str; 2] = ["linked", "unlinked"];
const STATUSES: [&str; 2] = ["delivered", "read"];
const GROUP_OPS: [&str; 4] = ["created", "added", "removed", "left"];
const SCOPES: [&str; 2] = ["everyone", "me"];

#[derive(Arbitrary, Debug)]
enum Kind {
    Msg {
        chat: String,
        msg: u64,
        from: String,
        dev: String,
        body: String,
    },
    Device {
        op: u8,
        device: String,
    },
    Receipt {
        chat: String,
        by: String,
        status: u8,
        up_to: u64,
    },
    Read {
        chat: String,
        up_to: u64,
    },
    Group {
        chat: String,
        op: u8,
        members: Vec<String>,
        by: String,
    },
    Edit {
        chat: String,
        msg: u64,
        body: String,
    },
    Delete {
        chat: String,
        msg: u64,
        scope: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    seq: u64,
    ts: u64,
    kind: Kind,
    new_body: String,
}

fn pick(options: &[&'static str], i: u8) -> &'static str {
    options[usize::from(i) % options.len()]
}

fuzz_target!(|input: Input| {
    let Input {
        seq,
        ts,
        kind,
        new_body,
    } = input;
    let members: Vec<UserId>;
    let (body, expected) = match &kind {
        Kind::Msg {
            chat,
            msg,
            from,
            dev,
            body,
        } => (
            EventBody::Msg {
                chat,
                msg: MsgId(*msg),
                from,
                dev,
                body,
            },
            json!({"kind":"msg","chat":chat,"msg":msg.to_string(),"from":from,"dev":dev,"body":body}),
        ),
        Kind::Device { op, device } => {
            let op = pick(&DEVICE_OPS, *op);
            (
                EventBody::Device { op, device },
                json!({"kind":"device","op":op,"device":device}),
            )
        }
        Kind::Receipt {
            chat,
            by,
            status,
            up_to,
        } => {
            let status = pick(&STATUSES, *status);
            (
                EventBody::Receipt {
                    chat,
                    by,
                    status,
                    up_to: MsgId(*up_to),
                },
                json!({"kind":"receipt","chat":chat,"by":by,"status":status,"up_to":up_to.to_string()}),
            )
        }
        Kind::Read { chat, up_to } => (
            EventBody::Read {
                chat,
                up_to: MsgId(*up_to),
            },
            json!({"kind":"read","chat":chat,"up_to":up_to.to_string()}),
        ),
        Kind::Group {
            chat,
            op,
            members: names,
            by,
        } => {
            let op = pick(&GROUP_OPS, *op);
            // Members are typed ids; invalid names cannot be built, so they are dropped.
            members = names.iter().filter_map(|m| UserId::parse(m)).collect();
            let listed: Vec<&str> = members.iter().map(UserId::as_str).collect();
            (
                EventBody::Group {
                    chat,
                    op,
                    members: &members,
                    by,
                },
                json!({"kind":"group","chat":chat,"op":op,"members":listed,"by":by}),
            )
        }
        Kind::Edit { chat, msg, body } => (
            EventBody::Edit {
                chat,
                msg: MsgId(*msg),
                body,
            },
            json!({"kind":"edit","chat":chat,"msg":msg.to_string(),"body":body}),
        ),
        Kind::Delete { chat, msg, scope } => {
            let scope = pick(&SCOPES, *scope);
            (
                EventBody::Delete {
                    chat,
                    msg: MsgId(*msg),
                    scope,
                },
                json!({"kind":"delete","chat":chat,"msg":msg.to_string(),"scope":scope}),
            )
        }
    };

    let record = encode_event(Seq(seq), ts, &body);
    if courier_fuzz::verbose() {
        eprintln!("{:?}", String::from_utf8_lossy(&record));
    }
    assert!(std::str::from_utf8(&record).is_ok(), "record is not UTF-8");
    let value: Value = serde_json::from_slice(&record).unwrap_or_else(|e| {
        panic!(
            "record is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&record)
        )
    });
    let mut want = json!({"t":"ev","seq":seq,"ts":ts});
    want.as_object_mut()
        .unwrap()
        .extend(expected.as_object().unwrap().clone());
    assert_eq!(value, want, "fields did not round-trip");

    assert_eq!(
        decode_record_header(&record),
        Some(RecordHeader {
            seq: Seq(seq),
            ts_ms: ts
        }),
        "header did not round-trip"
    );

    let stored = decode_stored_msg(&record);
    match &kind {
        Kind::Msg {
            chat, msg, from, ..
        } => assert_eq!(
            stored,
            Some(StoredMsg {
                ts_ms: ts,
                chat: chat.clone(),
                from: from.clone(),
                msg: MsgId(*msg)
            })
        ),
        _ => assert_eq!(stored, None),
    }

    let rewritten = rewrite_edited(&record, &new_body).expect("an event is a JSON object");
    let rewritten_value: Value = serde_json::from_slice(&rewritten).expect("rewrite is JSON");
    let mut want_rewritten = want.clone();
    want_rewritten["body"] = Value::String(new_body.clone());
    want_rewritten["edited"] = Value::Bool(true);
    assert_eq!(rewritten_value, want_rewritten);
    assert_eq!(decode_stored_msg(&rewritten), stored);

    let chat_name = match &kind {
        Kind::Msg { chat, .. } | Kind::Read { chat, .. } | Kind::Edit { chat, .. } => chat.as_str(),
        _ => "bob",
    };
    let page = encode_history(chat_name, &[record.clone(), rewritten]);
    let page: Value = serde_json::from_slice(&page).expect("history page is not JSON");
    assert_eq!(page["msgs"][0], want);
    assert_eq!(page["chat"], Value::String(chat_name.to_owned()));
});
