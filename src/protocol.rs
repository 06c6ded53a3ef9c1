//! The wire format of protocol v1 (see docs/protocol.md).
//!
//! Owns: decoding client text frames into typed `ClientFrame`s with the contract's error codes,
//! and encoding every server frame (events are encoded once into `Bytes` and shared by every
//! device). Must not hold state, touch sockets or storage: it is pure functions over bytes.

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::ids::{ChatId, ClientMsgId, DeviceId, GroupId, MsgId, Seq, UserId};

/// The contract's error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    BadJson,
    BadFrame,
    UnknownType,
    MissingField,
    BadId,
    TooLarge,
    RateLimited,
    NotMember,
    NotAdmin,
    Forbidden,
    UnknownMessage,
    BadSeq,
    DeviceLimit,
    GroupFull,
    Busy,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::BadJson,
        ErrorCode::BadFrame,
        ErrorCode::UnknownType,
        ErrorCode::MissingField,
        ErrorCode::BadId,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::NotMember,
        ErrorCode::NotAdmin,
        ErrorCode::Forbidden,
        ErrorCode::UnknownMessage,
        ErrorCode::BadSeq,
        ErrorCode::DeviceLimit,
        ErrorCode::GroupFull,
        ErrorCode::Busy,
        ErrorCode::Internal,
    ];

    /// The code with this wire name.
    pub fn parse(name: &str) -> Option<ErrorCode> {
        Self::ALL.into_iter().find(|code| code.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::BadId => "bad_id",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotMember => "not_member",
            ErrorCode::NotAdmin => "not_admin",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::UnknownMessage => "unknown_message",
            ErrorCode::BadSeq => "bad_seq",
            ErrorCode::DeviceLimit => "device_limit",
            ErrorCode::GroupFull => "group_full",
            ErrorCode::Busy => "busy",
            ErrorCode::Internal => "internal",
        }
    }
}

/// An error answer to one client frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameError {
    pub code: ErrorCode,
    /// The frame's `id`, echoed so the client can match the answer.
    pub id: Option<String>,
    /// The message id the frame named (`msg`), echoed likewise.
    pub msg: Option<String>,
    pub reason: String,
    /// For `busy` and `rate_limited`: when a retry may succeed.
    pub retry_ms: Option<u64>,
}

impl FrameError {
    pub fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        FrameError {
            code,
            id: None,
            msg: None,
            reason: reason.into(),
            retry_ms: None,
        }
    }

    pub fn with_id(mut self, id: Option<&str>) -> Self {
        self.id = id.map(str::to_owned);
        self
    }

    pub fn with_msg(mut self, msg: MsgId) -> Self {
        self.msg = Some(msg.0.to_string());
        self
    }

    pub fn with_retry(mut self, retry_ms: u64) -> Self {
        self.retry_ms = Some(retry_ms);
        self
    }

    pub fn encode(&self) -> Bytes {
        let mut frame = Map::new();
        frame.insert("t".into(), "error".into());
        frame.insert("code".into(), self.code.as_str().into());
        if let Some(id) = &self.id {
            frame.insert("id".into(), id.clone().into());
        }
        if let Some(msg) = &self.msg {
            frame.insert("msg".into(), msg.clone().into());
        }
        frame.insert("reason".into(), self.reason.clone().into());
        if let Some(retry_ms) = self.retry_ms {
            frame.insert("retry_ms".into(), retry_ms.into());
        }
        Bytes::from(Value::Object(frame).to_string())
    }
}

/// `delete` scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteScope {
    Everyone,
    Me,
}

/// `group` operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupOp {
    Create,
    Add,
    Remove,
    Leave,
}

/// A decoded, validated client frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientFrame {
    /// Cumulative acknowledgement: the device has every event up to `seq`.
    Ack { seq: Seq },
    /// A message to a user or group; `id` is the idempotency key.
    Send {
        id: ClientMsgId,
        to: ChatId,
        body: String,
    },
    /// Read mark for one chat.
    Read { chat: ChatId, up_to: MsgId },
    /// Ephemeral typing indicator.
    Typing { chat: ChatId, on: bool },
    /// Replace a message's body (sender only).
    Edit { msg: MsgId, body: String },
    /// Delete a message for everyone (sender only) or for the caller.
    Delete { msg: MsgId, scope: DeleteScope },
    /// Group membership change.
    Group {
        op: GroupOp,
        group: GroupId,
        members: Vec<UserId>,
    },
    /// List the user's devices.
    Devices,
    /// Unlink one of the user's devices.
    Unlink { device: DeviceId },
    /// Page backwards through one chat.
    History {
        chat: ChatId,
        before: Option<MsgId>,
        limit: usize,
    },
    /// Tests only (`--dev-clock`): move the server clock forward.
    DevClock { advance_ms: u64 },
}

impl ClientFrame {
    /// The frame's `t`.
    pub fn type_name(&self) -> &'static str {
        match self {
            ClientFrame::Ack { .. } => "ack",
            ClientFrame::Send { .. } => "send",
            ClientFrame::Read { .. } => "read",
            ClientFrame::Typing { .. } => "typing",
            ClientFrame::Edit { .. } => "edit",
            ClientFrame::Delete { .. } => "delete",
            ClientFrame::Group { .. } => "group",
            ClientFrame::Devices => "devices",
            ClientFrame::Unlink { .. } => "unlink",
            ClientFrame::History { .. } => "history",
            ClientFrame::DevClock { .. } => "dev_clock",
        }
    }
}

/// Largest `history` page; a larger `limit` is clamped to this.
pub const HISTORY_LIMIT_MAX: usize = 200;
/// `history` page size when `limit` is absent.
pub const HISTORY_LIMIT_DEFAULT: usize = 50;
/// Longest `id` echoed back in an error (longer ones are not valid ids anyway).
const ECHO_ID_MAX_BYTES: usize = 128;

/// A decoded frame and the `id` its answers must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub frame: ClientFrame,
    /// The frame's `id` field, whatever the type: every error answering it echoes this.
    pub id: Option<String>,
}

/// Decodes one text frame. `max_body_bytes` bounds `body` fields (`too_large` beyond).
pub fn decode_client_frame(text: &[u8], max_body_bytes: usize) -> Result<Decoded, FrameError> {
    let value: Value = serde_json::from_slice(text)
        .map_err(|e| FrameError::new(ErrorCode::BadJson, e.to_string()))?;
    let Value::Object(object) = value else {
        return Err(FrameError::new(
            ErrorCode::BadFrame,
            "a frame must be a JSON object",
        ));
    };
    let fields = Fields(&object);
    let echo_id = match object.get("id") {
        Some(Value::String(id)) if id.len() <= ECHO_ID_MAX_BYTES => Some(id.as_str()),
        _ => None,
    };
    let echo_msg = match object.get("msg") {
        Some(Value::String(msg)) if msg.len() <= ECHO_ID_MAX_BYTES => Some(msg.clone()),
        _ => None,
    };
    match decode_fields(&fields, max_body_bytes) {
        Ok(frame) => Ok(Decoded {
            frame,
            id: echo_id.map(str::to_owned),
        }),
        Err(mut e) => {
            e.id = echo_id.map(str::to_owned);
            e.msg = echo_msg;
            Err(e)
        }
    }
}

fn decode_fields(f: &Fields<'_>, max_body_bytes: usize) -> Result<ClientFrame, FrameError> {
    let kind = f.str("t")?;
    match kind {
        "ack" => Ok(ClientFrame::Ack {
            seq: Seq(f.u64("seq")?),
        }),
        "send" => {
            let id = f.str("id")?;
            let id = ClientMsgId::parse(id).ok_or_else(|| bad_id("id", id))?;
            let to = f.chat("to")?;
            let body = f.body("body", max_body_bytes)?;
            Ok(ClientFrame::Send { id, to, body })
        }
        "read" => Ok(ClientFrame::Read {
            chat: f.chat("chat")?,
            up_to: f.msg_id("up_to")?,
        }),
        "typing" => Ok(ClientFrame::Typing {
            chat: f.chat("chat")?,
            on: f.bool("on")?,
        }),
        "edit" => Ok(ClientFrame::Edit {
            msg: f.msg_id("msg")?,
            body: f.body("body", max_body_bytes)?,
        }),
        "delete" => {
            let msg = f.msg_id("msg")?;
            let scope = match f.str("scope")? {
                "everyone" => DeleteScope::Everyone,
                "me" => DeleteScope::Me,
                other => {
                    return Err(FrameError::new(
                        ErrorCode::BadFrame,
                        format!("scope must be \"everyone\" or \"me\", not {other:?}"),
                    ));
                }
            };
            Ok(ClientFrame::Delete { msg, scope })
        }
        "group" => {
            let op = match f.str("op")? {
                "create" => GroupOp::Create,
                "add" => GroupOp::Add,
                "remove" => GroupOp::Remove,
                "leave" => GroupOp::Leave,
                other => {
                    return Err(FrameError::new(
                        ErrorCode::BadFrame,
                        format!("op must be create, add, remove or leave, not {other:?}"),
                    ));
                }
            };
            let group = match f.chat("chat")? {
                ChatId::Group(group) => group,
                ChatId::Direct(_) => {
                    return Err(FrameError::new(
                        ErrorCode::BadId,
                        "chat must name a group (g:<id>)",
                    ));
                }
            };
            let members = match op {
                GroupOp::Leave => Vec::new(),
                GroupOp::Create => f.users_or_empty("members")?,
                GroupOp::Add | GroupOp::Remove => f.users("members")?,
            };
            Ok(ClientFrame::Group { op, group, members })
        }
        "devices" => Ok(ClientFrame::Devices),
        "unlink" => {
            let device = f.str("device")?;
            Ok(ClientFrame::Unlink {
                device: DeviceId::parse(device).ok_or_else(|| bad_id("device", device))?,
            })
        }
        "history" => {
            let chat = f.chat("chat")?;
            let before = match f.0.get("before") {
                None | Some(Value::Null) => None,
                Some(_) => Some(f.msg_id("before")?),
            };
            let limit = match f.0.get("limit") {
                None | Some(Value::Null) => HISTORY_LIMIT_DEFAULT,
                Some(_) => {
                    let limit = f.u64("limit")?;
                    if limit == 0 {
                        return Err(FrameError::new(
                            ErrorCode::BadFrame,
                            "limit must be at least 1",
                        ));
                    }
                    (limit as usize).min(HISTORY_LIMIT_MAX)
                }
            };
            Ok(ClientFrame::History {
                chat,
                before,
                limit,
            })
        }
        "dev_clock" => Ok(ClientFrame::DevClock {
            advance_ms: f.u64("advance_ms")?,
        }),
        other => Err(FrameError::new(
            ErrorCode::UnknownType,
            format!("unknown frame type {:?}", truncate(other, 64)),
        )),
    }
}

fn bad_id(field: &str, value: &str) -> FrameError {
    FrameError::new(
        ErrorCode::BadId,
        format!(
            "{field} {:?} is not 1-64 bytes of [A-Za-z0-9_.-]",
            truncate(value, 80)
        ),
    )
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Typed access to a frame's fields with the contract's error codes.
struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Result<&'a Value, FrameError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Err(FrameError::new(
                ErrorCode::MissingField,
                format!("missing field {name:?}"),
            )),
            Some(value) => Ok(value),
        }
    }

    fn wrong_type(name: &str, expected: &str) -> FrameError {
        FrameError::new(
            ErrorCode::BadFrame,
            format!("field {name:?} must be {expected}"),
        )
    }

    fn str(&self, name: &str) -> Result<&'a str, FrameError> {
        self.get(name)?
            .as_str()
            .ok_or_else(|| Self::wrong_type(name, "a string"))
    }

    fn u64(&self, name: &str) -> Result<u64, FrameError> {
        self.get(name)?
            .as_u64()
            .ok_or_else(|| Self::wrong_type(name, "a non-negative integer"))
    }

    fn bool(&self, name: &str) -> Result<bool, FrameError> {
        self.get(name)?
            .as_bool()
            .ok_or_else(|| Self::wrong_type(name, "true or false"))
    }

    fn chat(&self, name: &str) -> Result<ChatId, FrameError> {
        let value = self.str(name)?;
        ChatId::parse(value).ok_or_else(|| {
            FrameError::new(
                ErrorCode::BadId,
                format!(
                    "{name} {:?} is not a user id or g:<group id>",
                    truncate(value, 80)
                ),
            )
        })
    }

    fn msg_id(&self, name: &str) -> Result<MsgId, FrameError> {
        let value = self.str(name)?;
        parse_msg_id(value).ok_or_else(|| {
            FrameError::new(
                ErrorCode::BadId,
                format!(
                    "{name} {:?} is not a message id (a decimal u64)",
                    truncate(value, 80)
                ),
            )
        })
    }

    fn body(&self, name: &str, max_bytes: usize) -> Result<String, FrameError> {
        let body = self.str(name)?;
        if body.len() > max_bytes {
            return Err(FrameError::new(
                ErrorCode::TooLarge,
                format!("{name} is {} bytes; the limit is {max_bytes}", body.len()),
            ));
        }
        Ok(body.to_owned())
    }

    fn users(&self, name: &str) -> Result<Vec<UserId>, FrameError> {
        let list = self
            .get(name)?
            .as_array()
            .ok_or_else(|| Self::wrong_type(name, "an array of user ids"))?;
        list.iter()
            .map(|v| {
                let s = v
                    .as_str()
                    .ok_or_else(|| Self::wrong_type(name, "an array of user ids"))?;
                UserId::parse(s).ok_or_else(|| bad_id(name, s))
            })
            .collect()
    }

    fn users_or_empty(&self, name: &str) -> Result<Vec<UserId>, FrameError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(_) => self.users(name),
        }
    }
}

/// Parses a message id: the canonical decimal string of a u64 (no sign, no leading zeros), so
/// one id has exactly one spelling.
pub fn parse_msg_id(s: &str) -> Option<MsgId> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if s.len() > 1 && s.starts_with('0') {
        return None;
    }
    s.parse().ok().map(MsgId)
}

// ---------------------------------------------------------------------------------------------
// Server frames.

/// Appends `s` as a JSON string (quoted and escaped).
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing a str to a Vec cannot fail");
}

fn push_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(n.to_string().as_bytes());
}

/// The kinds of event a user's log holds (the part after `seq` and `ts`).
#[derive(Clone, Debug)]
pub enum EventBody<'a> {
    /// A message in `chat`, as this log's owner names the chat.
    Msg {
        chat: &'a str,
        msg: MsgId,
        from: &'a str,
        dev: &'a str,
        body: &'a str,
    },
    /// A device was linked or unlinked.
    Device { op: &'static str, device: &'a str },
    /// `by` has received (`delivered`) or read (`read`) every message in `chat` up to `up_to`.
    Receipt {
        chat: &'a str,
        by: &'a str,
        status: &'static str,
        up_to: MsgId,
    },
    /// This user read `chat` up to `up_to` on one of their devices.
    Read { chat: &'a str, up_to: MsgId },
    /// Group membership changed.
    Group {
        chat: &'a str,
        op: &'static str,
        members: &'a [UserId],
        by: &'a str,
    },
    /// The sender replaced the body of `msg`.
    Edit {
        chat: &'a str,
        msg: MsgId,
        body: &'a str,
    },
    /// `msg` was deleted for everyone, or (`me`) for this user.
    Delete {
        chat: &'a str,
        msg: MsgId,
        scope: &'static str,
    },
}

fn push_msg_id(out: &mut Vec<u8>, field: &str, msg: MsgId) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(field.as_bytes());
    out.extend_from_slice(b"\":\"");
    push_u64(out, msg.0);
    out.push(b'"');
}

fn push_str_field(out: &mut Vec<u8>, field: &str, value: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(field.as_bytes());
    out.extend_from_slice(b"\":");
    push_json_str(out, value);
}

/// Encodes one log event. The same bytes are stored in the log and sent to every device.
pub fn encode_event(seq: Seq, ts_ms: u64, body: &EventBody<'_>) -> Bytes {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"{\"t\":\"ev\",\"seq\":");
    push_u64(&mut out, seq.0);
    out.extend_from_slice(b",\"ts\":");
    push_u64(&mut out, ts_ms);
    match body {
        EventBody::Msg {
            chat,
            msg,
            from,
            dev,
            body,
        } => {
            out.extend_from_slice(b",\"kind\":\"msg\",\"chat\":");
            push_json_str(&mut out, chat);
            out.extend_from_slice(b",\"msg\":\"");
            push_u64(&mut out, msg.0);
            out.extend_from_slice(b"\",\"from\":");
            push_json_str(&mut out, from);
            out.extend_from_slice(b",\"dev\":");
            push_json_str(&mut out, dev);
            out.extend_from_slice(b",\"body\":");
            push_json_str(&mut out, body);
        }
        EventBody::Device { op, device } => {
            out.extend_from_slice(b",\"kind\":\"device\"");
            push_str_field(&mut out, "op", op);
            push_str_field(&mut out, "device", device);
        }
        EventBody::Receipt {
            chat,
            by,
            status,
            up_to,
        } => {
            out.extend_from_slice(b",\"kind\":\"receipt\"");
            push_str_field(&mut out, "chat", chat);
            push_str_field(&mut out, "by", by);
            push_str_field(&mut out, "status", status);
            push_msg_id(&mut out, "up_to", *up_to);
        }
        EventBody::Group {
            chat,
            op,
            members,
            by,
        } => {
            out.extend_from_slice(b",\"kind\":\"group\"");
            push_str_field(&mut out, "chat", chat);
            push_str_field(&mut out, "op", op);
            out.extend_from_slice(b",\"members\":[");
            for (i, member) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                push_json_str(&mut out, member.as_str());
            }
            out.push(b']');
            push_str_field(&mut out, "by", by);
        }
        EventBody::Read { chat, up_to } => {
            out.extend_from_slice(b",\"kind\":\"read\"");
            push_str_field(&mut out, "chat", chat);
            push_msg_id(&mut out, "up_to", *up_to);
        }
        EventBody::Edit { chat, msg, body } => {
            out.extend_from_slice(b",\"kind\":\"edit\"");
            push_str_field(&mut out, "chat", chat);
            push_msg_id(&mut out, "msg", *msg);
            push_str_field(&mut out, "body", body);
        }
        EventBody::Delete { chat, msg, scope } => {
            out.extend_from_slice(b",\"kind\":\"delete\"");
            push_str_field(&mut out, "chat", chat);
            push_msg_id(&mut out, "msg", *msg);
            push_str_field(&mut out, "scope", scope);
        }
    }
    out.push(b'}');
    Bytes::from(out)
}

/// `hello`, the first frame after the upgrade.
pub fn encode_hello(user: &str, device: &str, cursor: Seq, head: Seq, low: Seq) -> Bytes {
    let mut frame = serde_json::json!({
        "t": "hello",
        "user": user,
        "device": device,
        "cursor": cursor.0,
        "head": head.0,
        "low": low.0,
    });
    if cursor.0 + 1 < low.0 {
        frame["gap"] = Value::Bool(true);
    }
    Bytes::from(frame.to_string())
}

/// `sent`: the message is durably stored in every log it belongs to.
pub fn encode_sent(id: &str, msg: MsgId, ts_ms: u64) -> Bytes {
    let mut out = Vec::with_capacity(64 + id.len());
    out.extend_from_slice(b"{\"t\":\"sent\",\"id\":");
    push_json_str(&mut out, id);
    out.extend_from_slice(b",\"msg\":\"");
    push_u64(&mut out, msg.0);
    out.extend_from_slice(b"\",\"ts\":");
    push_u64(&mut out, ts_ms);
    out.push(b'}');
    Bytes::from(out)
}

/// One entry of a `devices` answer.
pub struct DeviceListing<'a> {
    pub device: &'a str,
    pub online: bool,
    pub cursor: Seq,
}

/// `devices`: the user's linked devices.
pub fn encode_devices(list: &[DeviceListing<'_>]) -> Bytes {
    let list: Vec<Value> = list
        .iter()
        .map(|d| serde_json::json!({"device": d.device, "online": d.online, "cursor": d.cursor.0}))
        .collect();
    Bytes::from(serde_json::json!({"t": "devices", "list": list}).to_string())
}

/// `typing`, as the receiver names the chat.
pub fn encode_typing(chat: &str, from: &str, on: bool) -> Bytes {
    Bytes::from(
        serde_json::json!({"t": "typing", "chat": chat, "from": from, "on": on}).to_string(),
    )
}

/// `history`: a page of one chat, newest first; each entry is a stored event, possibly
/// rewritten to show its latest edit.
pub fn encode_history(chat: &str, events: &[Bytes]) -> Bytes {
    let mut out = Vec::with_capacity(64 + events.iter().map(|e| e.len() + 1).sum::<usize>());
    out.extend_from_slice(b"{\"t\":\"history\",\"chat\":");
    push_json_str(&mut out, chat);
    out.extend_from_slice(b",\"msgs\":[");
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(event);
    }
    out.extend_from_slice(b"]}");
    Bytes::from(out)
}

/// The parts of a stored `msg` event that edits, deletes and receipts need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMsg {
    pub ts_ms: u64,
    pub chat: String,
    pub from: String,
    pub msg: MsgId,
}

/// Decodes a stored record if it is a `msg` event; `None` for other kinds or garbage.
pub fn decode_stored_msg(record: &[u8]) -> Option<StoredMsg> {
    let value: Value = serde_json::from_slice(record).ok()?;
    if value.get("kind")?.as_str()? != "msg" {
        return None;
    }
    Some(StoredMsg {
        ts_ms: value.get("ts")?.as_u64()?,
        chat: value.get("chat")?.as_str()?.to_owned(),
        from: value.get("from")?.as_str()?.to_owned(),
        msg: parse_msg_id(value.get("msg")?.as_str()?)?,
    })
}

/// Rewrites a stored `msg` event to carry its latest body and `"edited":true` (history pages).
pub fn rewrite_edited(record: &[u8], body: &str) -> Option<Bytes> {
    let mut value: Value = serde_json::from_slice(record).ok()?;
    let object = value.as_object_mut()?;
    object.insert("body".into(), Value::String(body.to_owned()));
    object.insert("edited".into(), Value::Bool(true));
    Some(Bytes::from(value.to_string()))
}

/// What a stored log record says about itself; used when reading the log back.
#[derive(Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub seq: Seq,
    pub ts_ms: u64,
}

/// Reads the `seq` and `ts` of a stored event record, refusing anything that is not one.
pub fn decode_record_header(record: &[u8]) -> Option<RecordHeader> {
    fn number(bytes: &[u8]) -> Option<(u64, &[u8])> {
        let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 20 {
            return None;
        }
        let n = std::str::from_utf8(&bytes[..digits]).ok()?.parse().ok()?;
        Some((n, &bytes[digits..]))
    }
    let rest = record.strip_prefix(b"{\"t\":\"ev\",\"seq\":")?;
    let (seq, rest) = number(rest)?;
    let rest = rest.strip_prefix(b",\"ts\":")?;
    let (ts_ms, _) = number(rest)?;
    Some(RecordHeader {
        seq: Seq(seq),
        ts_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(text: &str) -> ErrorCode {
        decode_client_frame(text.as_bytes(), 16).unwrap_err().code
    }

    #[test]
    fn malformed_frames_get_their_codes() {
        assert_eq!(code_of("{nope"), ErrorCode::BadJson);
        assert_eq!(code_of("[1,2]"), ErrorCode::BadFrame);
        assert_eq!(code_of("{}"), ErrorCode::MissingField);
        assert_eq!(code_of(r#"{"t":5}"#), ErrorCode::BadFrame);
        assert_eq!(code_of(r#"{"t":"fly"}"#), ErrorCode::UnknownType);
        assert_eq!(code_of(r#"{"t":"ack"}"#), ErrorCode::MissingField);
        assert_eq!(code_of(r#"{"t":"ack","seq":-1}"#), ErrorCode::BadFrame);
        assert_eq!(code_of(r#"{"t":"ack","seq":"1"}"#), ErrorCode::BadFrame);
        assert_eq!(
            code_of(r#"{"t":"send","id":"c1","to":"bo b","body":"x"}"#),
            ErrorCode::BadId
        );
        assert_eq!(
            code_of(r#"{"t":"send","id":"","to":"bob","body":"x"}"#),
            ErrorCode::BadId
        );
        assert_eq!(
            code_of(r#"{"t":"send","id":"c1","to":"bob","body":"01234567890123456"}"#),
            ErrorCode::TooLarge
        );
        assert_eq!(
            code_of(r#"{"t":"edit","msg":"12x","body":"a"}"#),
            ErrorCode::BadId
        );
        assert_eq!(
            code_of(r#"{"t":"delete","msg":"12","scope":"all"}"#),
            ErrorCode::BadFrame
        );
    }

    #[test]
    fn errors_echo_the_frames_id() {
        let err = decode_client_frame(br#"{"t":"send","id":"c7","to":"bob"}"#, 16).unwrap_err();
        assert_eq!(err.code, ErrorCode::MissingField);
        assert_eq!(err.id.as_deref(), Some("c7"));
        let json: Value = serde_json::from_slice(&err.encode()).unwrap();
        assert_eq!(json["id"], "c7");
        assert_eq!(json["code"], "missing_field");
    }

    #[test]
    fn send_decodes() {
        let frame = decode_client_frame(br#"{"t":"send","id":"c1","to":"g:team","body":"hi"}"#, 16)
            .unwrap();
        assert_eq!(frame.id.as_deref(), Some("c1"));
        assert_eq!(
            frame.frame,
            ClientFrame::Send {
                id: ClientMsgId::parse("c1").unwrap(),
                to: ChatId::Group(GroupId::parse("team").unwrap()),
                body: "hi".into()
            }
        );
    }

    #[test]
    fn events_encode_as_json_with_escaping_and_decode_their_seq() {
        let bytes = encode_event(
            Seq(7),
            1733150000123,
            &EventBody::Msg {
                chat: "bob",
                msg: MsgId(178431),
                from: "alice",
                dev: "phone",
                body: "hi \"there\"\n",
            },
        );
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["seq"], 7);
        assert_eq!(json["msg"], "178431");
        assert_eq!(json["body"], "hi \"there\"\n");
        assert_eq!(
            decode_record_header(&bytes),
            Some(RecordHeader {
                seq: Seq(7),
                ts_ms: 1733150000123
            })
        );
        assert_eq!(decode_record_header(b"{\"t\":\"ev\",\"seq\":x"), None);
        assert_eq!(decode_record_header(b""), None);
    }

    #[test]
    fn msg_ids_are_plain_decimal_u64() {
        assert_eq!(parse_msg_id("0"), Some(MsgId(0)));
        assert_eq!(parse_msg_id("18446744073709551615"), Some(MsgId(u64::MAX)));
        assert_eq!(parse_msg_id("18446744073709551616"), None);
        assert_eq!(parse_msg_id("+1"), None);
        assert_eq!(parse_msg_id("007"), None);
        assert_eq!(parse_msg_id("00"), None);
        assert_eq!(parse_msg_id(""), None);
    }

    #[test]
    fn hello_flags_a_gap_only_when_events_were_pruned() {
        let hello: Value =
            serde_json::from_slice(&encode_hello("a", "p", Seq(3), Seq(9), Seq(4))).unwrap();
        assert!(hello.get("gap").is_none());
        let hello: Value =
            serde_json::from_slice(&encode_hello("a", "p", Seq(2), Seq(9), Seq(4))).unwrap();
        assert_eq!(hello["gap"], true);
    }
}
