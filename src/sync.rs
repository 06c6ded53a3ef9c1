//! Multi-device state sync on the owner side: receipts, read marks, typing, edit and delete,
//! unlinking devices, and retention.
//!
//! Owns: the rules that keep a user's devices (and a sender's ticks) consistent: watermarks only
//! move forward (so concurrent marks converge on the max without locks), receipts fold per chat
//! and status, edits and deletes are the sender's alone within their windows and reach every
//! participant's log after the message they change, typing is never stored.
//!
//! Must not: touch sockets or another shard's state (foreign events are routed to their owner);
//! scan a log without a bound.

use std::collections::HashMap;
use std::rc::Rc;

use crate::ids::{ChatId, ConnRef, DeviceId, MsgId, Seq, UserId};
use crate::protocol::{
    DeleteScope, ErrorCode, EventBody, FrameError, StoredMsg, decode_stored_msg, encode_event,
    encode_typing,
};
use crate::router::{ConnItem, ForeignEvent, ForeignKind, ShardMsg};
use crate::shard::{AfterCommit, Shard};
use crate::storage::{MsgChange, StoreError, WatermarkKind, WriteOp};

/// How many of a chat's latest messages (log order) are looked at for its largest id.
const NEWEST_SCAN: usize = 64;
/// Most messages a group read mark looks at to find whom to send read receipts.
const READ_SCAN_MAX: usize = 1000;
/// Most users one retention pass looks at.
const PRUNE_USERS_PER_PASS: usize = 1000;

impl Shard {
    /// Stages one event in an owned user's log, with extra writes and actions in the same batch.
    fn stage_event(
        &self,
        user: &UserId,
        ts_ms: u64,
        body: &EventBody<'_>,
        mut ops: Vec<WriteOp>,
        mut actions: Vec<AfterCommit>,
    ) -> Result<Seq, StoreError> {
        let seq = self.with_user(user, |state| state.next_seq())?;
        let record = encode_event(seq, ts_ms, body);
        ops.push(WriteOp::Append {
            user: user.clone(),
            seq,
            record: record.clone(),
        });
        actions.insert(
            0,
            AfterCommit::Publish {
                user: user.clone(),
                events: vec![(seq, record)],
            },
        );
        self.stage(ops, actions);
        Ok(seq)
    }

    fn route_foreign(&self, event: ForeignEvent) {
        let owner = self.owner_of(&event.to);
        self.router.route(owner, ShardMsg::Append(event));
    }

    // -----------------------------------------------------------------------------------------
    // Receipts.

    /// After an ack moved `user`'s highest acked seq: every `msg` from someone else in the newly
    /// acked range produces one folded `delivered` receipt per (sender, chat).
    pub(crate) fn emit_delivered_receipts(&self, user: &UserId, acked: Seq) {
        let scan_max = self.config.receipt_scan_max_events as u64;
        let range = self.with_user(user, |state| {
            let from = state.watermark(WatermarkKind::AckedMax, "");
            if acked.0 <= from {
                return None;
            }
            let to = acked.0.min(from + scan_max);
            state.raise_watermark(WatermarkKind::AckedMax, "", to);
            Some((Seq(from + 1), Seq(to)))
        });
        let Ok(Some((from, to))) = range else {
            return;
        };
        self.lazy_ops.borrow_mut().push(WriteOp::PutWatermark {
            user: user.clone(),
            kind: WatermarkKind::AckedMax,
            chat: String::new(),
            value: to.0,
        });
        let events =
            match self
                .store()
                .read_log(user, from, to, self.config.receipt_scan_max_events)
            {
                Ok(events) => events,
                Err(e) => {
                    tracing::error!(%user, error = %e, "receipt scan failed");
                    return;
                }
            };
        let mut newest: HashMap<(String, String), MsgId> = HashMap::new();
        for (_, record) in events {
            let Some(stored) = decode_stored_msg(&record) else {
                continue;
            };
            if stored.from == user.as_str() {
                continue;
            }
            // The sender names a 1:1 chat by this user; a group chat by the group.
            let chat = if stored.chat.starts_with("g:") {
                stored.chat
            } else {
                user.as_str().to_owned()
            };
            let slot = newest.entry((stored.from, chat)).or_insert(stored.msg);
            *slot = (*slot).max(stored.msg);
        }
        let now = self.clock.now_ms();
        for ((sender, chat), up_to) in newest {
            let Some(sender) = UserId::parse(&sender) else {
                continue;
            };
            self.route_foreign(ForeignEvent {
                to: sender,
                ts_ms: now,
                kind: ForeignKind::Receipt {
                    chat,
                    by: user.clone(),
                    read: false,
                    up_to,
                },
            });
        }
    }

    /// An event caused by another user lands in an owned user's log.
    pub(crate) fn on_foreign_event(&self, event: ForeignEvent) {
        let ForeignEvent { to, ts_ms, kind } = event;
        let result = match kind {
            ForeignKind::Receipt {
                chat,
                by,
                read,
                up_to,
            } => self.apply_receipt(&to, ts_ms, &chat, &by, read, up_to),
            ForeignKind::Edit { chat, msg, body } => {
                self.apply_foreign_change(&to, ts_ms, &chat, msg, Some(body))
            }
            ForeignKind::Delete { chat, msg } => {
                self.apply_foreign_change(&to, ts_ms, &chat, msg, None)
            }
        };
        if let Err(e) = result {
            tracing::error!(user = %to, error = %e, "could not append a foreign event");
        }
    }

    /// Folds a receipt onto the sender's watermark for (chat, status, by); appends an event only
    /// when the watermark moves. A read receipt also raises the delivered watermark (read
    /// implies delivered), so a later, smaller delivered receipt is not emitted.
    fn apply_receipt(
        &self,
        to: &UserId,
        ts_ms: u64,
        chat: &str,
        by: &UserId,
        read: bool,
        up_to: MsgId,
    ) -> Result<(), StoreError> {
        // In a group several members send receipts for one chat: fold per member.
        let key = format!("{chat}\u{0}{by}");
        let (kind, status) = if read {
            (WatermarkKind::ReadReceipt, "read")
        } else {
            (WatermarkKind::DeliveredReceipt, "delivered")
        };
        let moved = self.with_user(to, |state| {
            let moved = state.raise_watermark(kind, &key, up_to.0);
            let delivered_moved =
                read && state.raise_watermark(WatermarkKind::DeliveredReceipt, &key, up_to.0);
            (moved, delivered_moved)
        })?;
        let mut ops = Vec::new();
        for (kind, moved) in [(kind, moved.0), (WatermarkKind::DeliveredReceipt, moved.1)] {
            if moved {
                ops.push(WriteOp::PutWatermark {
                    user: to.clone(),
                    kind,
                    chat: key.clone(),
                    value: up_to.0,
                });
            }
        }
        if !moved.0 {
            if !ops.is_empty() {
                self.stage(ops, Vec::new());
            }
            return Ok(());
        }
        let body = EventBody::Receipt {
            chat,
            by: by.as_str(),
            status,
            up_to,
        };
        self.stage_event(to, ts_ms, &body, ops, Vec::new())?;
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Read marks.

    pub(crate) fn on_read(
        &self,
        user: UserId,
        conn: ConnRef,
        chat: ChatId,
        up_to: MsgId,
        reply_id: Option<String>,
    ) {
        let fail = |e: FrameError| self.to_conn_error(conn, e.with_id(reply_id.as_deref()));
        let chat_name = match &chat {
            ChatId::Direct(peer) => peer.as_str().to_owned(),
            ChatId::Group(group) => format!("g:{group}"),
        };
        // The largest id among the chat's latest messages: ids of different shards interleave
        // by a few milliseconds at most, so the largest id is among the last few in log order.
        let newest = match self.store().chat_page(&user, &chat_name, None, NEWEST_SCAN) {
            Ok(page) => page.iter().map(|(msg, _)| *msg).max(),
            Err(e) => return fail(Self::store_error_frame(&e)),
        };
        if newest.is_none_or(|newest| up_to > newest) {
            return fail(FrameError::new(
                ErrorCode::UnknownMessage,
                format!("no message {} in {chat_name}", up_to.0),
            ));
        }
        let moved = self.with_user(&user, |state| {
            let previous = state.watermark(WatermarkKind::ReadMark, &chat_name);
            state
                .raise_watermark(WatermarkKind::ReadMark, &chat_name, up_to.0)
                .then_some(MsgId(previous))
        });
        let previous = match moved {
            Err(e) => return fail(Self::store_error_frame(&e)),
            // Marks only move forward: an older or equal mark changes nothing.
            Ok(None) => return,
            Ok(Some(previous)) => previous,
        };
        let now = self.clock.now_ms();
        let senders: Vec<UserId> = match &chat {
            ChatId::Direct(peer) if *peer != user => vec![peer.clone()],
            ChatId::Direct(_) => Vec::new(),
            ChatId::Group(_) => self.group_senders(&user, &chat_name, previous, up_to),
        };
        // A 1:1 chat is named by the reader on the sender's side; a group by the group.
        let receipt_chat = match &chat {
            ChatId::Direct(_) => user.as_str().to_owned(),
            ChatId::Group(_) => chat_name.clone(),
        };
        let actions: Vec<AfterCommit> = senders
            .into_iter()
            .map(|sender| {
                AfterCommit::ForwardForeign(ForeignEvent {
                    to: sender,
                    ts_ms: now,
                    kind: ForeignKind::Receipt {
                        chat: receipt_chat.clone(),
                        by: user.clone(),
                        read: true,
                        up_to,
                    },
                })
            })
            .collect();
        let ops = vec![WriteOp::PutWatermark {
            user: user.clone(),
            kind: WatermarkKind::ReadMark,
            chat: chat_name.clone(),
            value: up_to.0,
        }];
        let body = EventBody::Read {
            chat: &chat_name,
            up_to,
        };
        if let Err(e) = self.stage_event(&user, now, &body, ops, actions) {
            fail(Self::store_error_frame(&e));
        }
    }

    /// The other members who sent messages to a group chat with ids in (`after`, `up_to`], from
    /// the reader's chat index (the latest `READ_SCAN_MAX` messages are looked at).
    fn group_senders(&self, user: &UserId, chat: &str, after: MsgId, up_to: MsgId) -> Vec<UserId> {
        let page = match self.store().chat_page(user, chat, None, READ_SCAN_MAX) {
            Ok(page) => page,
            Err(e) => {
                tracing::error!(%user, error = %e, "read receipt scan failed");
                return Vec::new();
            }
        };
        let mut senders: Vec<UserId> = Vec::new();
        for (msg, seq) in page {
            if msg <= after || msg > up_to {
                continue;
            }
            let Ok(Some(record)) = self.store().read_record(user, seq) else {
                continue;
            };
            if let Some(stored) = decode_stored_msg(&record)
                && stored.from != user.as_str()
                && let Some(sender) = UserId::parse(&stored.from)
                && !senders.contains(&sender)
            {
                senders.push(sender);
            }
        }
        senders
    }

    // -----------------------------------------------------------------------------------------
    // Typing.

    /// Shows a typing indicator on an owned user's online devices. Never stored.
    pub(crate) fn on_typing(&self, to: UserId, chat: String, from: UserId, on: bool) {
        let targets = match self.with_user(&to, |state| {
            state
                .devices
                .values()
                .filter_map(|d| d.online)
                .collect::<Vec<_>>()
        }) {
            Ok(targets) => targets,
            Err(_) => return,
        };
        let frame = encode_typing(&chat, from.as_str(), on);
        for conn in targets {
            self.to_conn(conn, ConnItem::Frame(frame.clone()));
        }
    }

    // -----------------------------------------------------------------------------------------
    // Edit and delete.

    /// Finds a message in the caller's log (not deleted there): `unknown_message` otherwise.
    fn find_message(&self, user: &UserId, msg: MsgId) -> Result<StoredMsg, FrameError> {
        let store = self.store();
        let found = (|| -> Result<Option<StoredMsg>, StoreError> {
            let Some(seq) = store.msg_index_get(user, msg)? else {
                return Ok(None);
            };
            if store.msg_change(user, msg)? == Some(MsgChange::Deleted) {
                return Ok(None);
            }
            Ok(store
                .read_record(user, seq)?
                .and_then(|record| decode_stored_msg(&record)))
        })();
        match found {
            Ok(Some(stored)) => Ok(stored),
            Ok(None) => Err(unknown_message(msg)),
            Err(e) => Err(Self::store_error_frame(&e)),
        }
    }

    pub(crate) fn on_edit(
        &self,
        user: UserId,
        conn: ConnRef,
        msg: MsgId,
        body: String,
        reply_id: Option<String>,
    ) {
        let fail = |e: FrameError| {
            self.to_conn_error(conn, e.with_id(reply_id.as_deref()).with_msg(msg));
        };
        let now = self.clock.now_ms();
        let stored = match self
            .find_message(&user, msg)
            .and_then(|stored| senders_own(stored, &user, now, self.config.edit_window, "edit"))
        {
            Ok(stored) => stored,
            Err(e) => return fail(e),
        };
        let actions = self.forward_change(&user, &stored.chat, now, |chat| ForeignKind::Edit {
            chat,
            msg,
            body: body.clone(),
        });
        let change = MsgChange::Edited(body);
        if let Err(e) = self.stage_change(&user, now, &stored.chat, msg, change, "", actions) {
            fail(Self::store_error_frame(&e));
        }
    }

    pub(crate) fn on_delete(
        &self,
        user: UserId,
        conn: ConnRef,
        msg: MsgId,
        scope: DeleteScope,
        reply_id: Option<String>,
    ) {
        let fail = |e: FrameError| {
            self.to_conn_error(conn, e.with_id(reply_id.as_deref()).with_msg(msg));
        };
        let now = self.clock.now_ms();
        let stored = match self
            .find_message(&user, msg)
            .and_then(|stored| match scope {
                DeleteScope::Me => Ok(stored),
                DeleteScope::Everyone => {
                    senders_own(stored, &user, now, self.config.delete_window, "delete")
                }
            }) {
            Ok(stored) => stored,
            Err(e) => return fail(e),
        };
        let mut actions = Vec::new();
        let scope_name = match scope {
            DeleteScope::Me => "me",
            DeleteScope::Everyone => {
                actions = self.forward_change(&user, &stored.chat, now, |chat| {
                    ForeignKind::Delete { chat, msg }
                });
                "everyone"
            }
        };
        let change = MsgChange::Deleted;
        if let Err(e) =
            self.stage_change(&user, now, &stored.chat, msg, change, scope_name, actions)
        {
            fail(Self::store_error_frame(&e));
        }
    }

    /// Stages an edit or delete of `msg` in `user`'s log: the `edit` / `delete` event (with
    /// `scope` for a delete) and the change record that history reads.
    #[allow(clippy::too_many_arguments)]
    fn stage_change(
        &self,
        user: &UserId,
        ts_ms: u64,
        chat: &str,
        msg: MsgId,
        change: MsgChange,
        scope: &'static str,
        actions: Vec<AfterCommit>,
    ) -> Result<Seq, StoreError> {
        let event = match &change {
            MsgChange::Edited(body) => EventBody::Edit { chat, msg, body },
            MsgChange::Deleted => EventBody::Delete { chat, msg, scope },
        };
        let ops = vec![WriteOp::PutChange {
            user: user.clone(),
            msg,
            change: change.clone(),
        }];
        self.stage_event(user, ts_ms, &event, ops, actions)
    }

    /// Where the sender's edit or delete goes once durable: the peer's owner (1:1, the chat
    /// named by the sender), or the group's owner, which relays it to the other members.
    fn forward_change(
        &self,
        user: &UserId,
        chat: &str,
        ts_ms: u64,
        kind: impl FnOnce(String) -> ForeignKind,
    ) -> Vec<AfterCommit> {
        match ChatId::parse(chat) {
            Some(ChatId::Direct(peer)) if peer != *user => {
                vec![AfterCommit::ForwardForeign(ForeignEvent {
                    to: peer,
                    ts_ms,
                    kind: kind(user.as_str().to_owned()),
                })]
            }
            Some(ChatId::Group(group)) => {
                let owner = self.owner_of_chat(&ChatId::Group(group.clone()));
                vec![AfterCommit::Route(
                    owner,
                    Box::new(ShardMsg::GroupForeign {
                        group,
                        from: user.clone(),
                        ts_ms,
                        kind: kind(chat.to_owned()),
                    }),
                )]
            }
            _ => Vec::new(),
        }
    }

    /// The peer's copy of an edit or delete. Appended only if the message is in the peer's log
    /// (and not deleted there); it follows the message because the delivery was routed first.
    fn apply_foreign_change(
        &self,
        to: &UserId,
        ts_ms: u64,
        chat: &str,
        msg: MsgId,
        edit: Option<String>,
    ) -> Result<(), StoreError> {
        if self.store().msg_index_get(to, msg)?.is_none()
            || self.store().msg_change(to, msg)? == Some(MsgChange::Deleted)
        {
            return Ok(());
        }
        let change = match edit {
            Some(body) => MsgChange::Edited(body),
            None => MsgChange::Deleted,
        };
        self.stage_change(to, ts_ms, chat, msg, change, "everyone", Vec::new())?;
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Devices.

    pub(crate) fn on_unlink(
        &self,
        user: UserId,
        conn: ConnRef,
        device: DeviceId,
        reply_id: Option<String>,
    ) {
        if let Err(e) = self.unlink_device(&user, &device) {
            self.to_conn_error(conn, e.with_id(reply_id.as_deref()));
        }
    }

    /// Unlinks a device: closes its connection (4003), forgets its cursor and dedupe window,
    /// frees its slot and appends `device` `unlinked`.
    pub(crate) fn unlink_device(&self, user: &UserId, device: &DeviceId) -> Result<(), FrameError> {
        let removed = self.with_user(user, |state| match state.devices.get(device) {
            Some(d) if !d.linking => state.devices.remove(device),
            _ => None,
        });
        let online = match removed {
            Ok(Some(d)) => d.online,
            Ok(None) => {
                return Err(FrameError::new(
                    ErrorCode::BadId,
                    format!("{device} is not a linked device of {user}"),
                ));
            }
            Err(e) => return Err(Self::store_error_frame(&e)),
        };
        self.cursor_dirty
            .borrow_mut()
            .remove(&(user.clone(), device.clone()));
        if let Some(online) = online {
            self.device_offline();
            self.to_conn(
                online,
                ConnItem::Close {
                    code: 4003,
                    reason: "device unlinked",
                },
            );
        }
        tracing::info!(%user, %device, "device unlinked");
        for hook in self.hooks.iter() {
            hook.device_unlinked(user, device);
        }
        let ops = vec![WriteOp::UnlinkDevice {
            user: user.clone(),
            device: device.clone(),
        }];
        let event = EventBody::Device {
            op: "unlinked",
            device: device.as_str(),
        };
        self.stage_event(user, self.clock.now_ms(), &event, ops, Vec::new())
            .map(|_| ())
            .map_err(|e| Self::store_error_frame(&e))
    }

    // -----------------------------------------------------------------------------------------
    // Retention.

    /// Prunes events older than `retention`, a bounded pass every `prune_interval`. Deletes go
    /// through the ordinary commit pipeline, so they never block live traffic for long.
    pub async fn run_retention(self: Rc<Self>) {
        let mut resume: Option<Vec<u8>> = None;
        loop {
            glommio::timer::sleep(self.config.prune_interval).await;
            let cutoff = self
                .clock
                .now_ms()
                .saturating_sub(self.config.retention.as_millis() as u64);
            let scan = self.store().expired_events(
                resume.as_deref(),
                cutoff,
                PRUNE_USERS_PER_PASS,
                self.config.prune_batch_events,
            );
            let (expired, next) = match scan {
                Ok(scan) => (scan.expired, scan.resume),
                Err(e) => {
                    tracing::error!(shard = self.id.0, error = %e, "retention scan failed");
                    continue;
                }
            };
            resume = next;
            // Message positions older than the cutoff, a bounded slice per pass (ids grow with
            // time, so they are the front of `msg_seq`).
            let before = crate::msgid::first_id_at(cutoff);
            let mut ops = Vec::new();
            if self.store().msg_seq_before(before).unwrap_or(false) {
                ops.push(WriteOp::PruneMsgSeq {
                    before,
                    max: self.config.prune_batch_events,
                });
            }
            if ops.is_empty() && expired.is_empty() {
                continue;
            }
            let mut actions = Vec::with_capacity(expired.len());
            ops.reserve(expired.len());
            for (user, through) in expired {
                ops.push(WriteOp::PruneLog {
                    user: user.clone(),
                    through,
                });
                actions.push(AfterCommit::Pruned {
                    user,
                    low: through.next(),
                });
            }
            tracing::debug!(
                shard = self.id.0,
                users = actions.len(),
                "pruning expired events"
            );
            self.stage(ops, actions);
        }
    }
}

/// Only the sender may `what` a message for everyone, and only within `window` of sending.
fn senders_own(
    stored: StoredMsg,
    user: &UserId,
    now_ms: u64,
    window: std::time::Duration,
    what: &str,
) -> Result<StoredMsg, FrameError> {
    if stored.from != user.as_str() {
        return Err(FrameError::new(
            ErrorCode::Forbidden,
            format!("only the sender may {what} a message for everyone"),
        ));
    }
    if now_ms.saturating_sub(stored.ts_ms) > window.as_millis() as u64 {
        return Err(FrameError::new(
            ErrorCode::Forbidden,
            format!("the {what} window of {} s has passed", window.as_secs()),
        ));
    }
    Ok(stored)
}

fn unknown_message(msg: MsgId) -> FrameError {
    FrameError::new(
        ErrorCode::UnknownMessage,
        format!("no message {} in your log", msg.0),
    )
}
