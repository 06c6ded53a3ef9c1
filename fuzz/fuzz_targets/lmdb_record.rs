//! LMDB record decoders: whatever bytes a log record holds (a torn write, a bit flip, an
//! older format), read back by retention (`decode_record_header`), edits/deletes/receipts
//! (`decode_stored_msg`) and history (`rewrite_edited`).
//!
//! Input: the record; if it contains a 0xFF byte (never part of UTF-8, so never part of a real
//! record), the bytes after the first one are the new body for `rewrite_edited`.
//!
//! Invariants checked (beyond "never panics"):
//! - a header is only read from a record that starts `{"t":"ev","seq":<digits>,"ts":<digits>`;
//!   when the record is also a JSON object with unique keys and integer `seq`/`ts`, those are
//!   the header's numbers;
//! - `decode_stored_msg` only accepts a JSON object of kind `msg` whose fields it returns;
//! - `rewrite_edited` returns JSON carrying the new body and `"edited":true`, keeps every
//!   other field, and the rewritten record still decodes to the same stored message.
#![no_main]

use courier::protocol::{decode_record_header, decode_stored_msg, parse_msg_id, rewrite_edited};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde_json::Value;

/// The fields a header must agree with; serde's derive refuses a duplicate of any of them.
#[derive(Deserialize)]
struct HeaderFields {
    t: Option<Value>,
    seq: Option<Value>,
    ts: Option<Value>,
}

/// JSON equality, except that floats may move by an ulp: serde_json (without its
/// `float_roundtrip` feature) does not parse every float back to the identical f64, so a number
/// beyond u64 in a corrupt record can change in its last bit when `rewrite_edited` re-serialises
/// it (regressions/lmdb_record/float-beyond-u64). Records the server writes hold only u64s.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || (x - y).abs() <= 4.0 * f64::EPSILON * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

fuzz_target!(|data: &[u8]| {
    let (record, body) = match data.iter().position(|b| *b == 0xff) {
        Some(i) => (
            &data[..i],
            String::from_utf8_lossy(&data[i + 1..]).into_owned(),
        ),
        None => (data, "edited body".to_owned()),
    };
    let json: Option<Value> = serde_json::from_slice(record).ok();
    if courier_fuzz::verbose() {
        eprintln!(
            "{:?} -> header {:?}, stored {:?}, rewrite {:?}",
            String::from_utf8_lossy(record),
            decode_record_header(record),
            decode_stored_msg(record),
            rewrite_edited(record, &body).map(|b| String::from_utf8_lossy(&b).into_owned())
        );
    }

    if let Some(header) = decode_record_header(record) {
        let seq = header.seq.0;
        let digits = |rest: &[u8]| rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let rest = record
            .strip_prefix(b"{\"t\":\"ev\",\"seq\":")
            .expect("a header from a record without the event prefix");
        let n = digits(rest);
        assert_eq!(
            std::str::from_utf8(&rest[..n]).unwrap().parse::<u64>(),
            Ok(seq)
        );
        let rest = rest[n..]
            .strip_prefix(b",\"ts\":")
            .expect("no ts after seq");
        let n = digits(rest);
        assert_eq!(
            std::str::from_utf8(&rest[..n]).unwrap().parse::<u64>(),
            Ok(header.ts_ms)
        );
        if json.as_ref().is_some_and(Value::is_object)
            && let Ok(fields) = serde_json::from_slice::<HeaderFields>(record)
            && let (Some(json_seq), Some(json_ts)) = (
                fields.seq.as_ref().and_then(Value::as_u64),
                fields.ts.as_ref().and_then(Value::as_u64),
            )
        {
            assert_eq!(fields.t.as_ref().and_then(Value::as_str), Some("ev"));
            assert_eq!(
                (json_seq, json_ts),
                (seq, header.ts_ms),
                "header disagrees with JSON"
            );
        }
    }

    let stored = decode_stored_msg(record);
    if let Some(stored) = &stored {
        let object = json
            .as_ref()
            .and_then(Value::as_object)
            .expect("not an object");
        assert_eq!(object.get("kind").and_then(Value::as_str), Some("msg"));
        assert_eq!(object.get("ts").and_then(Value::as_u64), Some(stored.ts_ms));
        assert_eq!(
            object.get("chat").and_then(Value::as_str),
            Some(stored.chat.as_str())
        );
        assert_eq!(
            object.get("from").and_then(Value::as_str),
            Some(stored.from.as_str())
        );
        let msg = object.get("msg").and_then(Value::as_str).expect("msg");
        // Not necessarily canonical: `parse_msg_id` accepts leading zeros ("007" is 7), see
        // regressions/lmdb_record/noncanonical-msg-id and docs/fuzzing.md.
        assert_eq!(parse_msg_id(msg), Some(stored.msg));
        assert_eq!(
            msg.trim_start_matches('0').parse::<u64>().unwrap_or(0),
            stored.msg.0
        );
    }

    match rewrite_edited(record, &body) {
        Some(rewritten) => {
            let original = json
                .as_ref()
                .and_then(Value::as_object)
                .expect("rewrote something that is not a JSON object");
            let value: Value =
                serde_json::from_slice(&rewritten).expect("rewritten record is not JSON");
            let object = value
                .as_object()
                .expect("rewritten record is not an object");
            assert_eq!(
                object.get("body").and_then(Value::as_str),
                Some(body.as_str())
            );
            assert_eq!(object.get("edited"), Some(&Value::Bool(true)));
            for (key, value) in original {
                if key != "body" && key != "edited" {
                    let kept = object.get(key).expect("field dropped");
                    assert!(
                        same_json(kept, value),
                        "field {key:?} changed: {value} -> {kept}"
                    );
                }
            }
            assert_eq!(
                object.len(),
                original.len()
                    + usize::from(!original.contains_key("body"))
                    + usize::from(!original.contains_key("edited"))
            );
            assert_eq!(
                decode_stored_msg(&rewritten),
                stored,
                "rewrite changed the message"
            );
        }
        None => assert!(
            !json.as_ref().is_some_and(Value::is_object),
            "refused to rewrite a JSON object"
        ),
    }
});
