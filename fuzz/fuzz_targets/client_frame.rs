//! Client frame decoder: any bytes a client can send in a text frame.
//!
//! Invariants checked (beyond "never panics"):
//! - every `FrameError::encode()` is a JSON object with `"t":"error"`, the error's code (which
//!   `ErrorCode::parse` maps back), the echoed `id`/`msg` (at most 128 bytes, and only when the
//!   frame had such a string field) and `retry_ms` only for `busy`/`rate_limited`;
//! - on success every id is valid, bodies respect `max_body_bytes`, a `history` limit is in
//!   1..=HISTORY_LIMIT_MAX, and the echoed `id` is the frame's own `id` string;
//! - decoding is deterministic and a larger body bound never turns success into failure.
#![no_main]

use courier::ids::{ChatId, is_valid_id};
use courier::protocol::{
    ClientFrame, Decoded, ErrorCode, FrameError, HISTORY_LIMIT_MAX, decode_client_frame,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The server's default `max_body_bytes` (16 KiB) and a tiny bound that makes `too_large` easy
/// to reach.
const BODY_LIMITS: [usize; 2] = [16 * 1024, 4];

fuzz_target!(|data: &[u8]| {
    let frame_json: Option<Value> = serde_json::from_slice(data).ok();
    for max_body in BODY_LIMITS {
        let result = decode_client_frame(data, max_body);
        if courier_fuzz::verbose() {
            eprintln!(
                "max_body={max_body} {:?} -> {result:?}",
                String::from_utf8_lossy(data)
            );
        }
        assert_eq!(
            result,
            decode_client_frame(data, max_body),
            "not deterministic"
        );
        match &result {
            Ok(decoded) => check_ok(decoded, max_body, frame_json.as_ref()),
            Err(error) => check_err(error, frame_json.as_ref()),
        }
    }
    // A larger bound accepts everything a smaller one does, with the same result.
    if let Ok(small) = decode_client_frame(data, BODY_LIMITS[1]) {
        assert_eq!(Ok(small), decode_client_frame(data, BODY_LIMITS[0]));
    }
});

fn check_chat(chat: &ChatId) {
    match chat {
        ChatId::Direct(user) => assert!(is_valid_id(user.as_str())),
        ChatId::Group(group) => assert!(is_valid_id(group.as_str())),
    }
    assert_eq!(ChatId::parse(&chat.wire_name()).as_ref(), Some(chat));
}

fn check_ok(decoded: &Decoded, max_body: usize, json: Option<&Value>) {
    let object = json
        .and_then(Value::as_object)
        .expect("a decoded frame must be a JSON object");
    assert_eq!(
        decoded.id.as_deref(),
        object
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| id.len() <= 128),
        "the echoed id must be the frame's own id"
    );
    match &decoded.frame {
        ClientFrame::Ack { .. } | ClientFrame::Devices | ClientFrame::DevClock { .. } => {}
        ClientFrame::Send { id, to, body } => {
            assert!(is_valid_id(id.as_str()));
            assert_eq!(decoded.id.as_deref(), Some(id.as_str()));
            check_chat(to);
            assert!(body.len() <= max_body);
        }
        ClientFrame::Read { chat, .. } | ClientFrame::Typing { chat, .. } => check_chat(chat),
        ClientFrame::Edit { body, .. } => assert!(body.len() <= max_body),
        ClientFrame::Delete { .. } => {}
        ClientFrame::Group { group, members, .. } => {
            assert!(is_valid_id(group.as_str()));
            assert!(members.iter().all(|m| is_valid_id(m.as_str())));
        }
        ClientFrame::Unlink { device } => assert!(is_valid_id(device.as_str())),
        ClientFrame::History { chat, limit, .. } => {
            check_chat(chat);
            assert!((1..=HISTORY_LIMIT_MAX).contains(limit), "limit {limit}");
        }
    }
}

fn check_err(error: &FrameError, json: Option<&Value>) {
    let encoded = error.encode();
    let answer: Value =
        serde_json::from_slice(&encoded).expect("an error frame must be valid JSON");
    let answer = answer
        .as_object()
        .expect("an error frame must be an object");
    assert_eq!(answer.get("t").and_then(Value::as_str), Some("error"));
    let code = answer.get("code").and_then(Value::as_str).expect("code");
    assert_eq!(ErrorCode::parse(code), Some(error.code));
    assert_eq!(code, error.code.as_str());
    assert!(answer.get("reason").is_some_and(Value::is_string));
    assert!(
        error.retry_ms.is_none(),
        "a decode error never carries retry_ms"
    );
    // Echoes: only the frame's own short string `id` / `msg`.
    let field = |name: &str| {
        json.and_then(Value::as_object)
            .and_then(|o| o.get(name))
            .and_then(Value::as_str)
            .filter(|s| s.len() <= 128)
    };
    assert_eq!(answer.get("id").and_then(Value::as_str), field("id"));
    assert_eq!(error.id.as_deref(), field("id"));
    assert_eq!(answer.get("msg").and_then(Value::as_str), field("msg"));
    // The reason quotes client input only in bounded pieces.
    assert!(
        error.reason.len() <= 1024,
        "reason of {} bytes",
        error.reason.len()
    );
    match error.code {
        ErrorCode::BadJson => assert!(json.is_none()),
        _ => assert!(
            json.is_some(),
            "{:?} for a frame that is not JSON",
            error.code
        ),
    }
}
