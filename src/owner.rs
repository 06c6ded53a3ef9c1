//! Owner-side logic: what a shard does for the users it owns.
//!
//! Owns: each owned user's in-memory state (log head, committed head, linked devices with
//! cursors and where they are online), device linking and replacement, acks, the send path
//! (dedupe, sequencing, the sender's copy, forwarding the recipient's copy, `sent` once every
//! copy is durable) and the recipient side of deliveries.
//!
//! Must not: touch sockets or the wire format beyond encoding events; read or write another
//! shard's state (it routes messages instead); answer `sent` before every copy is committed.
//!
//! The send path for A (device d) → B, owners OA and OB:
//! 1. OA dedupes (A, d, client id), mints the msg id, stages A's copy, the dedupe entry and (if
//!    OB ≠ OA) a `pending` record of the delivery in one batch.
//! 2. After that commit, OA forwards the delivery to OB (FIFO, so one device's messages to one
//!    chat keep their order). If OB = OA, B's copy was in the same batch instead.
//! 3. OB appends B's copy (idempotent by msg id), commits, pushes it to B's online devices and
//!    confirms to OA; OA answers `sent` and forgets the pending record. A crash between 1 and 3
//!    leaves the pending record, which OA re-drives at start-up.

use std::collections::HashMap;

use bytes::Bytes;

use crate::admin::{AdminError, AdminRequest};
use crate::hooks::MessageCommitted;
use crate::ids::{ChatId, ClientMsgId, ConnRef, DeviceId, MsgId, Seq, ShardId, UserId};
use crate::metrics::ShardMetrics;
use crate::protocol::{
    DeviceListing, ErrorCode, EventBody, FrameError, encode_devices, encode_event, encode_sent,
};
use crate::router::{ConnItem, Delivery, ShardMsg};
use crate::shard::{AfterCommit, Shard};
use crate::storage::{StoreError, WatermarkKind, WriteOp};

/// One linked device of an owned user.
#[derive(Debug)]
pub struct DeviceState {
    /// Highest seq the device acknowledged.
    pub cursor: Seq,
    /// Where the device is connected, if it is.
    pub online: Option<ConnRef>,
    /// The `linked` event is staged but not committed yet.
    pub linking: bool,
    /// Highest dedupe order number used (loaded lazily from the store).
    pub dedupe_order: Option<u64>,
}

/// A user's linked devices, sorted by id. A sorted `Vec` rather than a map: there are at most
/// `max_devices_per_user` (5 by default), and a B-tree node would cost ~0.7 KiB per user.
#[derive(Debug, Default)]
pub struct Devices(Vec<(DeviceId, DeviceState)>);

impl Devices {
    fn position(&self, device: &DeviceId) -> Result<usize, usize> {
        self.0.binary_search_by(|(d, _)| d.cmp(device))
    }

    pub fn get(&self, device: &DeviceId) -> Option<&DeviceState> {
        self.position(device).ok().map(|i| &self.0[i].1)
    }

    pub fn get_mut(&mut self, device: &DeviceId) -> Option<&mut DeviceState> {
        self.position(device).ok().map(|i| &mut self.0[i].1)
    }

    pub fn insert(&mut self, device: DeviceId, state: DeviceState) {
        match self.position(&device) {
            Ok(i) => self.0[i].1 = state,
            Err(i) => {
                // Most users have one or two devices: grow one slot at a time rather than
                // `Vec`'s first step of four.
                self.0.reserve_exact(1);
                self.0.insert(i, (device, state))
            }
        }
    }

    pub fn remove(&mut self, device: &DeviceId) -> Option<DeviceState> {
        self.position(device).ok().map(|i| self.0.remove(i).1)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&DeviceId, &DeviceState)> {
        self.0.iter().map(|(d, s)| (d, s))
    }

    pub fn values(&self) -> impl Iterator<Item = &DeviceState> {
        self.0.iter().map(|(_, s)| s)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut DeviceState> {
        self.0.iter_mut().map(|(_, s)| s)
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&DeviceId, &mut DeviceState) -> bool) {
        self.0.retain_mut(|(d, s)| keep(d, s));
    }
}

impl FromIterator<(DeviceId, DeviceState)> for Devices {
    fn from_iter<I: IntoIterator<Item = (DeviceId, DeviceState)>>(iter: I) -> Self {
        let mut list: Vec<_> = iter.into_iter().collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        list.dedup_by(|a, b| a.0 == b.0);
        list.shrink_to_fit();
        Devices(list)
    }
}

/// An owned user's in-memory state, loaded from the store on first touch.
#[derive(Debug)]
pub struct UserState {
    /// Last seq assigned (staged or committed).
    pub head: Seq,
    /// Last seq known to be durable; devices are only ever told about events up to here.
    pub committed: Seq,
    /// Oldest seq still stored.
    pub low: Seq,
    /// Linked devices, bounded by `max_devices_per_user`.
    pub devices: Devices,
    /// Receipt and read watermarks per (kind, chat); one entry per chat the user has marked or
    /// been sent receipts in. Boxed and absent until the first one: most owned users in memory
    /// are idle devices that never set one, and an empty map costs 48 bytes in every user slot.
    pub watermarks: Option<Box<Watermarks>>,
}

/// Watermarks by (kind, chat).
pub type Watermarks = HashMap<(WatermarkKind, String), u64>;

impl UserState {
    /// A watermark (0 when never set).
    pub fn watermark(&self, kind: WatermarkKind, chat: &str) -> u64 {
        self.watermarks
            .as_ref()
            .and_then(|marks| marks.get(&(kind, chat.to_owned())))
            .copied()
            .unwrap_or(0)
    }

    /// Raises a watermark; returns whether it moved.
    pub fn raise_watermark(&mut self, kind: WatermarkKind, chat: &str, value: u64) -> bool {
        let slot = self
            .watermarks
            .get_or_insert_with(Box::default)
            .entry((kind, chat.to_owned()))
            .or_insert(0);
        if value > *slot {
            *slot = value;
            true
        } else {
            false
        }
    }

    pub(crate) fn next_seq(&mut self) -> Seq {
        self.head = self.head.next();
        self.head
    }
}

/// A send whose copies are not all durable yet.
#[derive(Debug)]
pub struct Inflight {
    pub user: UserId,
    pub device: DeviceId,
    pub client: ClientMsgId,
    pub ts_ms: u64,
    /// The recipient's copy when it lives on another shard; `None` when every copy was in the
    /// sender's own batch.
    pub delivery: Option<Delivery>,
    /// Connections waiting for `sent` (the original and any retries).
    pub waiters: Vec<ConnRef>,
    /// The recipient's owner failed to commit; a retry re-forwards the delivery.
    pub failed: bool,
}

/// Busy answer for work refused at a bound.
fn busy(reason: &str) -> FrameError {
    FrameError::new(ErrorCode::Busy, reason).with_retry(50)
}

impl Shard {
    /// Runs `f` on an owned user's state, loading it from the store on first touch.
    pub(crate) fn with_user<R>(
        &self,
        user: &UserId,
        f: impl FnOnce(&mut UserState) -> R,
    ) -> Result<R, StoreError> {
        debug_assert_eq!(
            self.owner_of(user),
            self.id,
            "only the owner touches a user"
        );
        let mut users = self.users.borrow_mut();
        if !users.contains_key(user) {
            let snapshot = self.store().load_user(user)?;
            users.insert(
                user.clone(),
                UserState {
                    head: snapshot.head,
                    committed: snapshot.head,
                    low: snapshot.low,
                    devices: snapshot
                        .devices
                        .into_iter()
                        .map(|(device, cursor)| {
                            (
                                device,
                                DeviceState {
                                    cursor,
                                    online: None,
                                    linking: false,
                                    dedupe_order: None,
                                },
                            )
                        })
                        .collect(),
                    watermarks: (!snapshot.watermarks.is_empty()).then(|| {
                        Box::new(
                            snapshot
                                .watermarks
                                .into_iter()
                                .map(|(kind, chat, value)| ((kind, chat), value))
                                .collect(),
                        )
                    }),
                },
            );
        }
        Ok(f(users.get_mut(user).expect("just inserted")))
    }

    /// After a failed commit: heads go back to what the disk holds; devices whose link never
    /// reached the disk are dropped (their connections are closed).
    pub(crate) fn reload_users(&self) {
        let users: Vec<UserId> = self.users.borrow().keys().cloned().collect();
        for user in users {
            let snapshot = match self.store().load_user(&user) {
                Ok(snapshot) => snapshot,
                Err(e) => {
                    tracing::error!(%user, error = %e, "reload failed; forgetting user state");
                    self.users.borrow_mut().remove(&user);
                    continue;
                }
            };
            let mut users = self.users.borrow_mut();
            let Some(state) = users.get_mut(&user) else {
                continue;
            };
            state.head = snapshot.head;
            state.committed = snapshot.head;
            state.low = snapshot.low;
            let on_disk: std::collections::HashSet<&DeviceId> =
                snapshot.devices.iter().map(|(d, _)| d).collect();
            let mut lost = Vec::new();
            state.devices.retain(|device, d| {
                let keep = on_disk.contains(device);
                if !keep && let Some(conn) = d.online {
                    lost.push(conn);
                }
                keep
            });
            for device in state.devices.values_mut() {
                device.dedupe_order = None;
            }
            drop(users);
            for conn in lost {
                self.device_offline();
                self.to_conn(
                    conn,
                    ConnItem::Close {
                        code: 1011,
                        reason: "device link was not stored",
                    },
                );
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Devices.

    pub(crate) fn on_attach(&self, user: UserId, device: DeviceId, conn: ConnRef) {
        if !self.accepting.get() {
            self.to_conn(
                conn,
                ConnItem::Refused {
                    error: FrameError::new(ErrorCode::Busy, "server shutting down")
                        .with_retry(1000),
                    close_code: 1001,
                },
            );
            return;
        }
        let max_devices = self.config.max_devices_per_user;
        let now = self.clock.now_ms();
        let outcome = self.with_user(&user, |state| {
            if let Some(d) = state.devices.get_mut(&device) {
                if d.linking {
                    return Attach::Refused(
                        FrameError::new(
                            ErrorCode::Busy,
                            "this device is being linked by another connection",
                        )
                        .with_retry(100),
                        1013,
                    );
                }
                let previous = d.online.replace(conn);
                return Attach::Known {
                    cursor: d.cursor,
                    head: state.committed,
                    low: state.low,
                    came_online: previous.is_none(),
                    replaced: previous.filter(|old| *old != conn),
                };
            }
            if state.devices.len() >= max_devices {
                return Attach::Refused(
                    FrameError::new(
                        ErrorCode::DeviceLimit,
                        format!("this user already has {max_devices} devices"),
                    ),
                    4003,
                );
            }
            state.devices.insert(
                device.clone(),
                DeviceState {
                    cursor: Seq::ZERO,
                    online: None,
                    linking: true,
                    dedupe_order: Some(0),
                },
            );
            let seq = state.next_seq();
            let record = encode_event(
                seq,
                now,
                &EventBody::Device {
                    op: "linked",
                    device: device.as_str(),
                },
            );
            Attach::Linking { seq, record }
        });
        match outcome {
            Err(e) => self.to_conn(
                conn,
                ConnItem::Refused {
                    error: Self::store_error_frame(&e),
                    close_code: 1011,
                },
            ),
            Ok(Attach::Refused(error, close_code)) => {
                self.to_conn(conn, ConnItem::Refused { error, close_code })
            }
            Ok(Attach::Known {
                cursor,
                head,
                low,
                came_online,
                replaced,
            }) => {
                if came_online {
                    self.device_online();
                }
                if let Some(old) = replaced {
                    self.to_conn(
                        old,
                        ConnItem::Close {
                            code: 4001,
                            reason: "replaced by a newer connection of this device",
                        },
                    );
                }
                self.to_conn(conn, ConnItem::Attached { cursor, head, low });
            }
            Ok(Attach::Linking { seq, record }) => {
                tracing::info!(%user, %device, "device linked");
                self.stage(
                    vec![
                        WriteOp::PutCursor {
                            user: user.clone(),
                            device: device.clone(),
                            seq: Seq::ZERO,
                        },
                        WriteOp::Append {
                            user: user.clone(),
                            seq,
                            record: record.clone(),
                        },
                    ],
                    vec![
                        AfterCommit::Publish {
                            user: user.clone(),
                            events: vec![(seq, record)],
                        },
                        AfterCommit::LinkDone { user, device, conn },
                    ],
                );
            }
        }
    }

    pub(crate) fn on_detach(&self, user: UserId, device: DeviceId, conn: ConnRef) {
        let mut users = self.users.borrow_mut();
        if let Some(d) = users
            .get_mut(&user)
            .and_then(|state| state.devices.get_mut(&device))
            && d.online == Some(conn)
        {
            d.online = None;
            drop(users);
            self.device_offline();
        }
    }

    pub(crate) fn on_ack(
        &self,
        user: UserId,
        device: DeviceId,
        conn: ConnRef,
        seq: Seq,
        reply_id: Option<String>,
    ) {
        let outcome = self.with_user(&user, |state| {
            if seq > state.committed {
                return Err(state.committed);
            }
            if let Some(d) = state.devices.get_mut(&device)
                && seq > d.cursor
            {
                d.cursor = seq;
                return Ok(true);
            }
            Ok(false)
        });
        match outcome {
            Ok(Ok(true)) => {
                self.cursor_dirty
                    .borrow_mut()
                    .insert((user.clone(), device));
                self.emit_delivered_receipts(&user, seq);
            }
            Ok(Ok(false)) => {}
            Ok(Err(head)) => self.to_conn_error(
                conn,
                FrameError::new(
                    ErrorCode::BadSeq,
                    format!("ack {} is beyond the head {}", seq.0, head.0),
                )
                .with_id(reply_id.as_deref()),
            ),
            Err(e) => self.to_conn_error(
                conn,
                Self::store_error_frame(&e).with_id(reply_id.as_deref()),
            ),
        }
    }

    pub(crate) fn on_devices(&self, user: UserId, conn: ConnRef, reply_id: Option<String>) {
        let frame = self.with_user(&user, |state| {
            let list: Vec<DeviceListing<'_>> = state
                .devices
                .iter()
                .filter(|(_, d)| !d.linking)
                .map(|(device, d)| DeviceListing {
                    device: device.as_str(),
                    online: d.online.is_some(),
                    cursor: d.cursor,
                })
                .collect();
            encode_devices(&list)
        });
        match frame {
            Ok(frame) => self.to_conn(conn, ConnItem::Frame(frame)),
            Err(e) => self.to_conn_error(
                conn,
                Self::store_error_frame(&e).with_id(reply_id.as_deref()),
            ),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Sending.

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn on_send(
        &self,
        user: UserId,
        device: DeviceId,
        conn: ConnRef,
        client: ClientMsgId,
        to: ChatId,
        body: String,
    ) {
        let error = |e: FrameError| self.to_conn_error(conn, e.with_id(Some(client.as_str())));
        // A retry of a send still in flight waits for the same answer.
        let key = (user.clone(), device.clone(), client.clone());
        let inflight_msg = self.inflight_by_client.borrow().get(&key).copied();
        if let Some(msg) = inflight_msg {
            self.wait_for_send(msg, conn);
            return;
        }
        // A retry of a send already answered gets the same answer again.
        match self.store().dedupe_get(&user, &device, client.as_str()) {
            Ok(Some(entry)) => {
                return match entry.refused {
                    None => self.to_conn(
                        conn,
                        ConnItem::Frame(encode_sent(client.as_str(), entry.msg, entry.ts_ms)),
                    ),
                    Some(code) => error(FrameError::new(
                        ErrorCode::parse(&code).unwrap_or(ErrorCode::Forbidden),
                        "this send was refused",
                    )),
                };
            }
            Ok(None) => {}
            Err(e) => return error(Self::store_error_frame(&e)),
        }
        if !self.accepting.get() {
            return error(
                FrameError::new(ErrorCode::Busy, "server shutting down").with_retry(1000),
            );
        }
        if self.commits_saturated() {
            return error(busy("too many commits pending"));
        }
        let recipient_owner = self.owner_of_chat(&to);
        if recipient_owner != self.id
            && self.router.depth(recipient_owner) >= self.config.cross_shard_queue_max
        {
            return error(busy("cross-shard queue full"));
        }

        let msg = self.minter.mint(&self.clock);
        self.minted.set(Some(msg));
        let ts_ms = self.clock.now_ms();
        let recipient = match to {
            ChatId::Direct(recipient) => recipient,
            ChatId::Group(_) => {
                // The group's owner orders the message and appends every member's copy (the
                // sender's included); this shard only remembers it until that is confirmed.
                let delivery = Delivery {
                    msg,
                    ts_ms,
                    from: user.clone(),
                    device: device.clone(),
                    to,
                    body,
                    origin: self.id,
                };
                let ops = vec![WriteOp::PutPending {
                    msg,
                    record: encode_pending(&delivery, &client),
                }];
                let actions = vec![AfterCommit::Forward(delivery.clone())];
                self.track_send(key, msg, ts_ms, Some(delivery), conn);
                self.stage(ops, actions);
                return;
            }
        };
        let mut ops = Vec::with_capacity(6);
        let mut actions = Vec::with_capacity(3);

        // The sender's copy (also the only copy of a note-to-self).
        let store = self.store().clone();
        let sender_copy = self.with_user(&user, |state| {
            let d = state.devices.get_mut(&device)?;
            let order = match d.dedupe_order {
                Some(order) => order + 1,
                None => store.dedupe_last_order(&user, &device).unwrap_or(0) + 1,
            };
            d.dedupe_order = Some(order);
            Some((state.next_seq(), order))
        });
        let (seq, order) = match sender_copy {
            Ok(Some(found)) => found,
            Ok(None) => {
                // Only a connection whose device is linked can send; this one was unlinked.
                return error(FrameError::new(
                    ErrorCode::Forbidden,
                    "device is not linked",
                ));
            }
            Err(e) => return error(Self::store_error_frame(&e)),
        };
        let record = encode_event(
            seq,
            ts_ms,
            &EventBody::Msg {
                chat: recipient.as_str(),
                msg,
                from: user.as_str(),
                dev: device.as_str(),
                body: &body,
            },
        );
        ops.push(WriteOp::Append {
            user: user.clone(),
            seq,
            record: record.clone(),
        });
        ops.push(WriteOp::IndexMsg {
            user: user.clone(),
            msg,
            seq,
        });
        ops.push(WriteOp::IndexChat {
            user: user.clone(),
            chat: recipient.as_str().to_owned(),
            msg,
            seq,
        });
        ops.push(WriteOp::PutDedupe {
            user: user.clone(),
            device: device.clone(),
            client: client.as_str().to_owned(),
            msg,
            ts_ms,
            order,
            window: self.config.dedupe_window_per_device,
            refused: None,
        });
        actions.push(AfterCommit::Publish {
            user: user.clone(),
            events: vec![(seq, record)],
        });

        let delivery = Delivery {
            msg,
            ts_ms,
            from: user.clone(),
            device: device.clone(),
            to: ChatId::Direct(recipient.clone()),
            body,
            origin: self.id,
        };
        let mut remote = None;
        if recipient == user {
            actions.push(AfterCommit::SendDone { msg });
        } else if recipient_owner == self.id {
            match self.stage_recipient_copy(&delivery, &recipient) {
                Ok((mut more_ops, more_actions)) => {
                    ops.append(&mut more_ops);
                    actions.extend(more_actions);
                    actions.push(AfterCommit::SendDone { msg });
                }
                Err(e) => {
                    // Undo the sender's seq: nothing was staged yet.
                    let _ = self.with_user(&user, |state| state.head = Seq(state.head.0 - 1));
                    return error(Self::store_error_frame(&e));
                }
            }
        } else {
            ops.push(WriteOp::PutPending {
                msg,
                record: encode_pending(&delivery, &client),
            });
            actions.push(AfterCommit::Forward(delivery.clone()));
            remote = Some(delivery);
        }
        self.track_send(key, msg, ts_ms, remote, conn);
        self.stage(ops, actions);
    }

    /// Remembers a send until every copy is durable.
    fn track_send(
        &self,
        key: (UserId, DeviceId, ClientMsgId),
        msg: MsgId,
        ts_ms: u64,
        delivery: Option<Delivery>,
        conn: ConnRef,
    ) {
        ShardMetrics::count(&self.metrics.messages_total);
        let (user, device, client) = key.clone();
        self.inflight_by_client.borrow_mut().insert(key, msg);
        self.inflight_by_msg.borrow_mut().insert(
            msg,
            Inflight {
                user,
                device,
                client,
                ts_ms,
                delivery,
                waiters: vec![conn],
                failed: false,
            },
        );
    }

    /// Adds a waiter to an in-flight send; re-forwards its delivery if the last try failed.
    fn wait_for_send(&self, msg: MsgId, conn: ConnRef) {
        let mut inflight = self.inflight_by_msg.borrow_mut();
        let Some(entry) = inflight.get_mut(&msg) else {
            return;
        };
        entry.waiters.push(conn);
        if entry.failed
            && let Some(delivery) = entry.delivery.clone()
        {
            entry.failed = false;
            drop(inflight);
            let owner = self.owner_of_chat(&delivery.to);
            self.router.route(owner, ShardMsg::Deliver(delivery));
        }
    }

    /// Re-creates the in-flight entry of a stored, unconfirmed delivery and re-drives it.
    pub(crate) fn resume_delivery(&self, msg: MsgId, delivery: Delivery, client: ClientMsgId) {
        let key = (
            delivery.from.clone(),
            delivery.device.clone(),
            client.clone(),
        );
        self.inflight_by_client.borrow_mut().insert(key, msg);
        self.inflight_by_msg.borrow_mut().insert(
            msg,
            Inflight {
                user: delivery.from.clone(),
                device: delivery.device.clone(),
                client,
                ts_ms: delivery.ts_ms,
                delivery: Some(delivery.clone()),
                waiters: Vec::new(),
                failed: false,
            },
        );
        let owner = self.owner_of_chat(&delivery.to);
        self.router.route(owner, ShardMsg::Deliver(delivery));
    }

    /// Stages the recipient's copy of a message on its owner (this shard).
    fn stage_recipient_copy(
        &self,
        delivery: &Delivery,
        to: &UserId,
    ) -> Result<(Vec<WriteOp>, Vec<AfterCommit>), StoreError> {
        let seq = self.with_user(to, UserState::next_seq)?;
        let record = encode_event(
            seq,
            delivery.ts_ms,
            &EventBody::Msg {
                chat: delivery.from.as_str(),
                msg: delivery.msg,
                from: delivery.from.as_str(),
                dev: delivery.device.as_str(),
                body: &delivery.body,
            },
        );
        let ops = vec![
            WriteOp::Append {
                user: to.clone(),
                seq,
                record: record.clone(),
            },
            WriteOp::IndexMsg {
                user: to.clone(),
                msg: delivery.msg,
                seq,
            },
            WriteOp::IndexChat {
                user: to.clone(),
                chat: delivery.from.as_str().to_owned(),
                msg: delivery.msg,
                seq,
            },
        ];
        let publish = AfterCommit::Publish {
            user: to.clone(),
            events: vec![(seq, record)],
        };
        let mut actions = vec![publish];
        if !self.hooks.is_empty() {
            actions.push(AfterCommit::Committed {
                user: to.clone(),
                msg: delivery.msg,
                chat: delivery.from.as_str().to_owned(),
                from: delivery.from.clone(),
                ts_ms: delivery.ts_ms,
            });
        }
        Ok((ops, actions))
    }

    /// A delivery reaches the owner of its chat.
    pub(crate) fn on_deliver(&self, delivery: Delivery) {
        match delivery.to.clone() {
            ChatId::Direct(to) => self.deliver_direct(delivery, to),
            ChatId::Group(group) => self.on_group_send(delivery, group),
        }
    }

    /// The recipient's owner: append (once) and confirm.
    fn deliver_direct(&self, delivery: Delivery, to: UserId) {
        let key = (to.clone(), delivery.msg);
        let confirm = AfterCommit::Confirm {
            origin: delivery.origin,
            user: to.clone(),
            msg: delivery.msg,
        };
        if self.delivering.borrow().contains(&key) {
            // Already staged by an earlier try: confirm after that commit.
            self.stage(Vec::new(), vec![confirm]);
            return;
        }
        match self.store().msg_index_get(&to, delivery.msg) {
            Ok(Some(_)) => {
                // Already durable (a re-driven delivery after a crash).
                self.confirm(delivery.origin, delivery.msg, Ok(()));
                return;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "delivery lookup failed");
                self.confirm(delivery.origin, delivery.msg, Err(ErrorCode::Busy));
                return;
            }
        }
        match self.stage_recipient_copy(&delivery, &to) {
            Ok((ops, mut actions)) => {
                self.delivering.borrow_mut().insert(key);
                actions.push(confirm);
                self.stage(ops, actions);
            }
            Err(e) => {
                tracing::error!(error = %e, "delivery failed");
                self.confirm(delivery.origin, delivery.msg, Err(ErrorCode::Busy));
            }
        }
    }

    fn confirm(&self, origin: ShardId, msg: MsgId, result: Result<(), ErrorCode>) {
        if origin == self.id {
            self.on_delivered(msg, result);
        } else {
            self.router
                .route(origin, ShardMsg::Delivered { msg, result });
        }
    }

    /// The sender's owner: the recipient's copy is durable (or failed).
    pub(crate) fn on_delivered(&self, msg: MsgId, result: Result<(), ErrorCode>) {
        let group_send = self
            .inflight_by_msg
            .borrow()
            .get(&msg)
            .is_some_and(|entry| {
                matches!(
                    entry.delivery.as_ref().map(|d| &d.to),
                    Some(ChatId::Group(_))
                )
            });
        match (group_send, result) {
            (true, Ok(())) => return self.finish_group_send(msg, None),
            (true, Err(ErrorCode::NotMember)) => {
                return self.finish_group_send(msg, Some(ErrorCode::NotMember));
            }
            _ => {}
        }
        match result {
            Ok(()) => {
                self.lazy_ops
                    .borrow_mut()
                    .push(WriteOp::DeletePending { msg });
                self.finish_send(msg);
            }
            Err(code) => {
                self.stall_send(
                    msg,
                    &FrameError::new(code, "the recipient's copy could not be stored yet")
                        .with_retry(1000),
                );
            }
        }
    }

    /// A group send is settled: store its dedupe answer (and forget the pending record) in one
    /// batch, then answer the waiters. Until then the in-flight entry answers retries.
    fn finish_group_send(&self, msg: MsgId, refused: Option<ErrorCode>) {
        let Some((user, device, client, ts_ms)) =
            self.inflight_by_msg.borrow().get(&msg).map(|entry| {
                (
                    entry.user.clone(),
                    entry.device.clone(),
                    entry.client.clone(),
                    entry.ts_ms,
                )
            })
        else {
            return;
        };
        let store = self.store().clone();
        let order = self.with_user(&user, |state| {
            let d = state.devices.get_mut(&device)?;
            let order = match d.dedupe_order {
                Some(order) => order + 1,
                None => store.dedupe_last_order(&user, &device).unwrap_or(0) + 1,
            };
            d.dedupe_order = Some(order);
            Some(order)
        });
        let mut ops = vec![WriteOp::DeletePending { msg }];
        // An unlinked device has no dedupe window any more: nothing to remember.
        if let Ok(Some(order)) = order {
            ops.push(WriteOp::PutDedupe {
                user,
                device,
                client: client.as_str().to_owned(),
                msg,
                ts_ms,
                order,
                window: self.config.dedupe_window_per_device,
                refused: refused.map(ErrorCode::as_str),
            });
        }
        self.stage(ops, vec![AfterCommit::GroupSendDone { msg, refused }]);
    }

    /// Forgets a send (it will not complete) and answers its waiters with `error`.
    fn abandon_send(&self, msg: MsgId, error: &FrameError) {
        let Some(entry) = self.take_send(msg) else {
            return;
        };
        for conn in entry.waiters {
            self.to_conn_error(conn, error.clone().with_id(Some(entry.client.as_str())));
        }
    }

    /// Keeps a send in flight for a retry to re-drive, and answers its current waiters with
    /// `error`.
    fn stall_send(&self, msg: MsgId, error: &FrameError) {
        let waiters = {
            let mut inflight = self.inflight_by_msg.borrow_mut();
            let Some(entry) = inflight.get_mut(&msg) else {
                return;
            };
            entry.failed = true;
            std::mem::take(&mut entry.waiters)
                .into_iter()
                .map(|w| (w, entry.client.clone()))
                .collect::<Vec<_>>()
        };
        for (conn, client) in waiters {
            self.to_conn_error(conn, error.clone().with_id(Some(client.as_str())));
        }
    }

    /// Removes a send's in-flight entries.
    fn take_send(&self, msg: MsgId) -> Option<Inflight> {
        let entry = self.inflight_by_msg.borrow_mut().remove(&msg)?;
        self.inflight_by_client.borrow_mut().remove(&(
            entry.user.clone(),
            entry.device.clone(),
            entry.client.clone(),
        ));
        Some(entry)
    }

    /// Every copy is durable: answer `sent` to every waiter.
    fn finish_send(&self, msg: MsgId) {
        let Some(entry) = self.take_send(msg) else {
            return;
        };
        let frame = encode_sent(entry.client.as_str(), msg, entry.ts_ms);
        for conn in entry.waiters {
            self.to_conn(conn, ConnItem::Frame(frame.clone()));
        }
    }

    // -----------------------------------------------------------------------------------------
    // After commit.

    pub(crate) fn after_commit(&self, action: AfterCommit) {
        match action {
            AfterCommit::Publish { user, events } => self.publish(&user, events),
            AfterCommit::LinkDone { user, device, conn } => {
                let attached = self.with_user(&user, |state| {
                    let d = state.devices.get_mut(&device)?;
                    d.linking = false;
                    d.online = Some(conn);
                    Some((d.cursor, state.committed, state.low))
                });
                if let Ok(Some((cursor, head, low))) = attached {
                    self.device_online();
                    for hook in self.hooks.iter() {
                        hook.device_linked(&user, &device);
                    }
                    self.to_conn(conn, ConnItem::Attached { cursor, head, low });
                }
            }
            AfterCommit::Forward(delivery) => {
                let owner = self.owner_of_chat(&delivery.to);
                self.router.route(owner, ShardMsg::Deliver(delivery));
            }
            AfterCommit::SendDone { msg } => self.finish_send(msg),
            AfterCommit::Confirm { origin, user, msg } => {
                self.delivering.borrow_mut().remove(&(user, msg));
                self.confirm(origin, msg, Ok(()));
            }
            AfterCommit::ForwardForeign(event) => {
                let owner = self.owner_of(&event.to);
                self.router.route(owner, ShardMsg::Append(event));
            }
            AfterCommit::Pruned { user, low } => {
                if let Some(state) = self.users.borrow_mut().get_mut(&user) {
                    state.low = state.low.max(low);
                }
            }
            AfterCommit::FanOut(fan_out) => self.fan_out(*fan_out),
            AfterCommit::GroupAppended {
                group_shard,
                id,
                members,
            } => self.group_appended(group_shard, id, members, true),
            AfterCommit::Route(shard, msg) => self.router.route(shard, *msg),
            AfterCommit::Committed {
                user,
                msg,
                chat,
                from,
                ts_ms,
            } => {
                let online_devices = self.users.borrow().get(&user).map_or(0, |state| {
                    state
                        .devices
                        .values()
                        .filter(|d| d.online.is_some())
                        .count()
                });
                let event = MessageCommitted {
                    user: &user,
                    msg,
                    chat: &chat,
                    from: from.as_str(),
                    ts_ms,
                    online_devices,
                };
                for hook in self.hooks.iter() {
                    hook.message_committed(&event);
                }
            }
            AfterCommit::GroupSendDone { msg, refused } => match refused {
                None => self.finish_send(msg),
                Some(code) => self.abandon_send(
                    msg,
                    &FrameError::new(code, "you are not a member of this group"),
                ),
            },
        }
    }

    pub(crate) fn after_commit_failed(&self, action: AfterCommit, error: &StoreError) {
        match action {
            // Heads were reloaded from disk; nobody was told about these events.
            AfterCommit::Publish { .. } => {}
            AfterCommit::LinkDone { user, device, conn } => {
                let _ = self.with_user(&user, |state| {
                    if state.devices.get(&device).is_some_and(|d| d.linking) {
                        state.devices.remove(&device);
                    }
                });
                self.to_conn(
                    conn,
                    ConnItem::Refused {
                        error: Self::store_error_frame(error),
                        close_code: 1011,
                    },
                );
            }
            // The sender's copy is not stored: the send never happened; answer the waiters.
            AfterCommit::Forward(Delivery { msg, .. }) | AfterCommit::SendDone { msg } => {
                self.abandon_send(msg, &Self::store_error_frame(error));
            }
            AfterCommit::Confirm { origin, user, msg } => {
                self.delivering.borrow_mut().remove(&(user, msg));
                self.confirm(origin, msg, Err(Self::store_error_frame(error).code));
            }
            // The edit or delete never reached the sender's log: the peer needs nothing.
            AfterCommit::ForwardForeign(_) => {}
            // The prune is retried by the next pass.
            AfterCommit::Pruned { .. } => {}
            AfterCommit::FanOut(fan_out) => {
                if let Some(origin) = fan_out.origin {
                    self.route_delivered(
                        origin,
                        fan_out.id,
                        Err(Self::store_error_frame(error).code),
                    );
                } else {
                    tracing::error!(id = fan_out.id.0, "a membership change could not be stored");
                }
            }
            AfterCommit::GroupAppended {
                group_shard,
                id,
                members,
            } => self.group_appended(group_shard, id, members, false),
            // What was to be routed depended on the failed writes.
            AfterCommit::Route(..) => {}
            // Nothing was committed: nothing to tell.
            AfterCommit::Committed { .. } => {}
            // Every copy is stored but the dedupe entry is not: keep the send in flight and let
            // a retry fan it out again (member owners skip what they have).
            AfterCommit::GroupSendDone { msg, .. } => {
                self.stall_send(msg, &Self::store_error_frame(error));
            }
        }
    }

    /// Events are durable: advance the committed head and push them to online devices. Every
    /// device gets the same `Bytes` (one serialization per user's copy).
    pub(crate) fn publish(&self, user: &UserId, events: Vec<(Seq, Bytes)>) {
        let targets = {
            let mut users = self.users.borrow_mut();
            let Some(state) = users.get_mut(user) else {
                return;
            };
            if let Some((last, _)) = events.last() {
                state.committed = state.committed.max(*last);
            }
            state
                .devices
                .values()
                .filter_map(|d| d.online)
                .collect::<Vec<_>>()
        };
        ShardMetrics::add(&self.metrics.events_appended_total, events.len() as u64);
        ShardMetrics::add(
            &self.metrics.deliveries_total,
            (events.len() * targets.len()) as u64,
        );
        for conn in targets {
            for (seq, record) in &events {
                self.to_conn(
                    conn,
                    ConnItem::Event {
                        seq: *seq,
                        record: record.clone(),
                    },
                );
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Admin.

    /// Answers an admin question about an owned user or group.
    pub(crate) fn on_admin(&self, request: AdminRequest) -> Result<serde_json::Value, AdminError> {
        let internal = |e: StoreError| AdminError::Internal(e.to_string());
        match request {
            AdminRequest::Devices { user } => self
                .with_user(&user, |state| {
                    let devices: Vec<serde_json::Value> = state
                        .devices
                        .iter()
                        .filter(|(_, d)| !d.linking)
                        .map(|(device, d)| {
                            serde_json::json!({
                                "device": device.as_str(),
                                "online": d.online.is_some(),
                                "cursor": d.cursor.0,
                            })
                        })
                        .collect();
                    serde_json::json!({
                        "user": user.as_str(),
                        "head": state.committed.0,
                        "low": state.low.0,
                        "devices": devices,
                    })
                })
                .map_err(internal),
            AdminRequest::Unlink { user, device } => self
                .unlink_device(&user, &device)
                .map(|()| serde_json::json!({"unlinked": device.as_str()}))
                .map_err(|e| match e.code {
                    ErrorCode::BadId => AdminError::NotFound(e.reason),
                    _ => AdminError::Internal(e.reason),
                }),
            AdminRequest::Disconnect { user } => {
                let online = self
                    .with_user(&user, |state| {
                        state
                            .devices
                            .values()
                            .filter_map(|d| d.online)
                            .collect::<Vec<_>>()
                    })
                    .map_err(internal)?;
                for conn in &online {
                    self.to_conn(
                        *conn,
                        ConnItem::Close {
                            code: 1008,
                            reason: "disconnected by an administrator",
                        },
                    );
                }
                Ok(serde_json::json!({"disconnected": online.len()}))
            }
            AdminRequest::GroupMembers { group } => match self.group_snapshot(&group) {
                Ok(Some((admin, members))) => Ok(serde_json::json!({
                    "group": format!("g:{group}"),
                    "admin": admin.as_str(),
                    "members": members.iter().map(UserId::as_str).collect::<Vec<_>>(),
                })),
                Ok(None) => Err(AdminError::NotFound(format!("no group g:{group}"))),
                Err(e) => Err(internal(e)),
            },
        }
    }
}

enum Attach {
    Known {
        cursor: Seq,
        head: Seq,
        low: Seq,
        came_online: bool,
        replaced: Option<ConnRef>,
    },
    Linking {
        seq: Seq,
        record: Bytes,
    },
    /// The error to send and the close code to close with.
    Refused(FrameError, u16),
}

/// Encodes a delivery (and the sender's client id) for the `pending` table.
pub(crate) fn encode_pending(delivery: &Delivery, client: &ClientMsgId) -> Vec<u8> {
    serde_json::json!({
        "v": 1,
        "msg": delivery.msg.0,
        "ts": delivery.ts_ms,
        "from": delivery.from.as_str(),
        "dev": delivery.device.as_str(),
        "to": delivery.to.wire_name(),
        "body": delivery.body,
        "origin": delivery.origin.0,
        "client": client.as_str(),
    })
    .to_string()
    .into_bytes()
}

/// Decodes a `pending` record; `None` for anything malformed.
pub(crate) fn decode_pending(record: &[u8]) -> Option<(Delivery, ClientMsgId)> {
    let v: serde_json::Value = serde_json::from_slice(record).ok()?;
    let delivery = Delivery {
        msg: MsgId(v["msg"].as_u64()?),
        ts_ms: v["ts"].as_u64()?,
        from: UserId::parse(v["from"].as_str()?)?,
        device: DeviceId::parse(v["dev"].as_str()?)?,
        to: ChatId::parse(v["to"].as_str()?)?,
        body: v["body"].as_str()?.to_owned(),
        origin: ShardId(v["origin"].as_u64()? as usize),
    };
    Some((delivery, ClientMsgId::parse(v["client"].as_str()?)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_records_round_trip_and_refuse_garbage() {
        let delivery = Delivery {
            msg: MsgId(42),
            ts_ms: 7,
            from: UserId::parse("alice").unwrap(),
            device: DeviceId::parse("phone").unwrap(),
            to: ChatId::parse("g:team").unwrap(),
            body: "hi \"you\"".into(),
            origin: ShardId(1),
        };
        let client = ClientMsgId::parse("c1").unwrap();
        let (back, back_client) = decode_pending(&encode_pending(&delivery, &client)).unwrap();
        assert_eq!(back.msg, delivery.msg);
        assert_eq!(back.body, delivery.body);
        assert_eq!(back.origin, delivery.origin);
        assert_eq!(back_client, client);
        assert!(decode_pending(b"{}").is_none());
        assert!(decode_pending(b"\xff").is_none());
    }
}
