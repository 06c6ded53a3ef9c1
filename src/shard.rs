//! One shard: a pinned glommio executor's share of the server.
//!
//! Owns: the shard's state (its connections, the users it owns, in-flight sends), the commit
//! pipeline to its storage writer (stage → batch → commit → after-commit actions, strictly in
//! order), the dispatch of cross-shard messages to handlers, and the periodic sweeps (idle
//! connections, lazy cursor writes). Owner-side handlers live in `owner`.
//!
//! Must not: share state with other shards (only `Send` messages through the router cross
//! cores), block the executor on a write transaction, or hold a `RefCell` borrow across an
//! `.await`.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_channel::mpsc::UnboundedReceiver;
use futures_util::StreamExt;

use crate::admin::AdminCall;
use crate::clock::Clock;
use crate::config::Config;
use crate::groups::{FanOut, FanOutProgress, GroupState};
use crate::hooks::{CredentialVerifier, Hooks};
use crate::ids::{
    ChatId, ClientMsgId, ConnId, ConnRef, DeviceId, GroupId, MsgId, Seq, ShardId, UserId,
    owner_shard,
};
use crate::metrics::ShardMetrics;
use crate::msgid::MsgIdMinter;
use crate::notify::{Notify, yield_now};
use crate::owner::{Inflight, UserState};
use crate::protocol::{ErrorCode, FrameError};
use crate::rate::TokenBucket;
use crate::router::{ConnItem, Delivery, ForeignEvent, Router, ShardMsg};
use crate::storage::{Completion, Store, StoreError, WriteBatch, WriteOp, WriterHandle};

/// Meta key of the highest message id this shard minted.
pub const META_MAX_MSG_ID: &str = "max_msg_id";

/// What to do once a batch is durable (or what to undo when it failed).
#[derive(Debug)]
pub enum AfterCommit {
    /// Events of `user` are durable: advance its committed head, push them to online devices.
    Publish {
        user: UserId,
        events: Vec<(Seq, Bytes)>,
    },
    /// A new device's `linked` event is durable: mark it online and answer `Attached`.
    LinkDone {
        user: UserId,
        device: DeviceId,
        conn: ConnRef,
    },
    /// The sender's copy is durable: hand the recipient's copy to its owner.
    Forward(Delivery),
    /// Every copy of `msg` is durable: answer `sent` to everyone waiting for it.
    SendDone { msg: MsgId },
    /// The recipient's copy of `msg` is durable: tell the sender's owner.
    Confirm {
        origin: ShardId,
        user: UserId,
        msg: MsgId,
    },
    /// The sender's edit or delete is durable: hand the peer's copy to its owner.
    ForwardForeign(ForeignEvent),
    /// Expired events of `user` are gone: `low` rises to `low`.
    Pruned { user: UserId, low: Seq },
    /// The group's owner: hand a group event to the members' owners, in the group's order.
    FanOut(Box<FanOut>),
    /// A member owner: its part of a fan-out is durable; tell the group's owner.
    GroupAppended {
        group_shard: ShardId,
        id: MsgId,
        members: Vec<UserId>,
    },
    /// A recipient's copy of a message is durable: tell the embedder's hooks.
    Committed {
        user: UserId,
        msg: MsgId,
        chat: String,
        from: UserId,
        ts_ms: u64,
    },
    /// Route a message once the batch is durable.
    Route(ShardId, Box<ShardMsg>),
    /// A group send is confirmed (or refused) and its dedupe entry is durable: answer waiters.
    GroupSendDone {
        msg: MsgId,
        refused: Option<ErrorCode>,
    },
}

/// What an embedder plugs into every shard.
#[derive(Clone)]
pub struct Extensions {
    pub verifier: Arc<dyn CredentialVerifier>,
    pub hooks: Arc<[Arc<dyn Hooks>]>,
}

/// A batch the writer has not completed yet.
struct InFlightBatch {
    id: u64,
    submitted: Instant,
    ops: usize,
    actions: Vec<AfterCommit>,
}

/// Work staged for the next batch.
#[derive(Default)]
struct Staged {
    ops: Vec<WriteOp>,
    actions: Vec<AfterCommit>,
}

/// A connection's mailbox on its shard: what the shards want written to its socket.
pub struct ConnShared {
    pub id: ConnId,
    pub user: UserId,
    pub device: DeviceId,
    outbox: RefCell<VecDeque<ConnItem>>,
    queued_bytes: Cell<usize>,
    /// The outbound bound was hit: everything queued was dropped and a 4009 close is queued.
    overflowed: Cell<bool>,
    /// While replaying from the log, live events beyond the bound are dropped instead of
    /// closing the connection: the log has them, and `dropped_through` says how far to read.
    pub catching_up: Cell<bool>,
    pub dropped_through: Cell<Seq>,
    pub notify: Notify,
    pub last_rx: Cell<Instant>,
    pub pinged: Cell<bool>,
    /// Typing indicators this connection may still send (`typing_per_second`).
    pub typing: TokenBucket,
    /// Client frames this connection may still send (`client_frames_per_second`; acks free).
    pub frames: TokenBucket,
    /// Highest ack routed to the owner: a repeated or lower ack is not routed again.
    pub acked: Cell<Seq>,
    /// What the socket may be ready for (`connection::READABLE`, `connection::WRITABLE`), as
    /// the shard's readiness poller last reported it; the connection clears a bit when the
    /// socket answers "would block". Set by the poller, which then wakes `notify`.
    pub readiness: Cell<u8>,
}

impl ConnShared {
    fn new(id: ConnId, user: UserId, device: DeviceId, limits: (u32, u32)) -> Self {
        ConnShared {
            id,
            user,
            device,
            outbox: RefCell::new(VecDeque::new()),
            queued_bytes: Cell::new(0),
            overflowed: Cell::new(false),
            catching_up: Cell::new(false),
            dropped_through: Cell::new(Seq::ZERO),
            notify: Notify::default(),
            last_rx: Cell::new(Instant::now()),
            pinged: Cell::new(false),
            typing: TokenBucket::new(limits.0),
            frames: TokenBucket::new(limits.1),
            acked: Cell::new(Seq::ZERO),
            readiness: Cell::new(0),
        }
    }

    /// Queues an item for the socket. At `max_bytes` queued: during catch-up, events are
    /// dropped (remembered in `dropped_through`, re-read from the log); otherwise the queue is
    /// cleared and the connection is closed with 4009 (the device resumes from its cursor).
    pub fn push(&self, item: ConnItem, max_bytes: usize) {
        if self.overflowed.get() {
            return;
        }
        let size = item.queued_bytes();
        if self.queued_bytes.get() + size > max_bytes {
            if let (true, ConnItem::Event { seq, .. }) = (self.catching_up.get(), &item) {
                self.dropped_through
                    .set(self.dropped_through.get().max(*seq));
                self.notify.notify();
                return;
            }
            self.overflowed.set(true);
            self.outbox.borrow_mut().clear();
            self.queued_bytes.set(0);
            self.outbox.borrow_mut().push_back(ConnItem::Close {
                code: 4009,
                reason: "too slow: outbound queue full",
            });
            self.notify.notify();
            return;
        }
        self.queued_bytes.set(self.queued_bytes.get() + size);
        self.outbox.borrow_mut().push_back(item);
        self.notify.notify();
    }

    pub fn pop(&self) -> Option<ConnItem> {
        let mut outbox = self.outbox.borrow_mut();
        let item = outbox.pop_front()?;
        // An idle connection keeps no queue memory: the emptied queue gives its buffer back
        // (a few hundred bytes per connection otherwise, for every idle socket).
        if outbox.is_empty() {
            *outbox = VecDeque::new();
        }
        drop(outbox);
        self.queued_bytes
            .set(self.queued_bytes.get() - item.queued_bytes());
        Some(item)
    }

    pub fn is_empty(&self) -> bool {
        self.outbox.borrow().is_empty()
    }
}

pub struct Shard {
    pub id: ShardId,
    pub shards: usize,
    pub config: Arc<Config>,
    /// Every shard's store, for reads (a connection replays its user's log from the owner's
    /// store; committed records are immutable, so reading them from here is safe).
    pub stores: Arc<[Store]>,
    pub router: Rc<Router>,
    pub metrics: Arc<ShardMetrics>,
    pub clock: Clock,
    pub verifier: Arc<dyn CredentialVerifier>,
    /// Embedder callbacks (the webhook among them); empty in most deployments.
    pub hooks: Arc<[Arc<dyn Hooks>]>,
    pub minter: MsgIdMinter,
    pub(crate) minted: Cell<Option<MsgId>>,

    // Owner state (users whose owner is this shard).
    pub(crate) users: RefCell<HashMap<UserId, UserState>>,
    pub(crate) inflight_by_msg: RefCell<HashMap<MsgId, Inflight>>,
    pub(crate) inflight_by_client: RefCell<HashMap<(UserId, DeviceId, ClientMsgId), MsgId>>,
    /// Recipient copies staged and not yet committed, so a re-driven delivery is not stored twice.
    pub(crate) delivering: RefCell<HashSet<(UserId, MsgId)>>,
    pub(crate) cursor_dirty: RefCell<HashSet<(UserId, DeviceId)>>,
    /// Groups owned by this shard (loaded on first touch).
    pub(crate) groups: RefCell<HashMap<GroupId, GroupState>>,
    /// Group fan-outs waiting for their destination shards.
    pub(crate) fan_outs: RefCell<HashMap<MsgId, FanOutProgress>>,
    /// Writes that need no answer and may ride along with the next batch.
    pub(crate) lazy_ops: RefCell<Vec<WriteOp>>,

    // Connections accepted by this shard.
    pub(crate) conns: RefCell<HashMap<ConnId, Rc<ConnShared>>>,
    next_conn: Cell<u64>,
    pub accepting: Cell<bool>,
    pub conns_changed: Notify,

    // Commit pipeline.
    writer: RefCell<WriterHandle>,
    staged: RefCell<Staged>,
    /// Batches handed to the writer: id, when, how many writes, and what to do after.
    in_flight: RefCell<VecDeque<InFlightBatch>>,
    next_batch: Cell<u64>,
    pub(crate) epoch: Cell<u64>,
    flush_wanted: Notify,
    pub commits_idle: Notify,
}

impl Shard {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: ShardId,
        config: Arc<Config>,
        stores: Arc<[Store]>,
        router: Rc<Router>,
        writer: WriterHandle,
        minted_floor: Option<MsgId>,
        metrics: Arc<ShardMetrics>,
        extensions: Extensions,
    ) -> Rc<Shard> {
        let shards = config.shard_count();
        Rc::new(Shard {
            id,
            shards,
            verifier: extensions.verifier,
            hooks: extensions.hooks,
            config,
            stores,
            router,
            metrics,
            clock: Clock::system(),
            minter: MsgIdMinter::new(id, minted_floor),
            minted: Cell::new(None),
            users: RefCell::new(HashMap::new()),
            inflight_by_msg: RefCell::new(HashMap::new()),
            inflight_by_client: RefCell::new(HashMap::new()),
            delivering: RefCell::new(HashSet::new()),
            cursor_dirty: RefCell::new(HashSet::new()),
            lazy_ops: RefCell::new(Vec::new()),
            groups: RefCell::new(HashMap::new()),
            fan_outs: RefCell::new(HashMap::new()),
            conns: RefCell::new(HashMap::new()),
            next_conn: Cell::new(1),
            accepting: Cell::new(true),
            conns_changed: Notify::default(),
            writer: RefCell::new(writer),
            staged: RefCell::new(Staged::default()),
            in_flight: RefCell::new(VecDeque::new()),
            next_batch: Cell::new(1),
            epoch: Cell::new(0),
            flush_wanted: Notify::default(),
            commits_idle: Notify::default(),
        })
    }

    /// This shard's own store.
    pub fn store(&self) -> &Store {
        &self.stores[self.id.0]
    }

    pub fn owner_of(&self, user: &UserId) -> ShardId {
        owner_shard(user.as_str(), self.shards)
    }

    /// The owner of a chat: the user's owner for 1:1, `owner("g:<id>")` for a group.
    pub fn owner_of_chat(&self, chat: &ChatId) -> ShardId {
        match chat {
            ChatId::Direct(user) => self.owner_of(user),
            ChatId::Group(group) => owner_shard(&format!("g:{group}"), self.shards),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Connections.

    /// Registers a new connection; `None` at `connections_per_shard_max`.
    pub fn register_conn(&self, user: UserId, device: DeviceId) -> Option<Rc<ConnShared>> {
        let mut conns = self.conns.borrow_mut();
        if conns.len() >= self.config.connections_per_shard_max {
            return None;
        }
        let id = ConnId(self.next_conn.get());
        self.next_conn.set(id.0 + 1);
        let limits = (
            self.config.typing_per_second,
            self.config.client_frames_per_second,
        );
        let conn = Rc::new(ConnShared::new(id, user, device, limits));
        conns.insert(id, conn.clone());
        ShardMetrics::set(&self.metrics.connections, conns.len() as u64);
        Some(conn)
    }

    /// Forgets a connection and tells the owner its device went offline.
    pub fn unregister_conn(&self, conn: &ConnShared, attached: bool) {
        let mut conns = self.conns.borrow_mut();
        conns.remove(&conn.id);
        ShardMetrics::set(&self.metrics.connections, conns.len() as u64);
        drop(conns);
        if attached {
            let owner = self.owner_of(&conn.user);
            self.router.route(
                owner,
                ShardMsg::Detach {
                    user: conn.user.clone(),
                    device: conn.device.clone(),
                    conn: self.conn_ref(conn.id),
                },
            );
        }
        self.conns_changed.notify();
    }

    pub fn conn_ref(&self, conn: ConnId) -> ConnRef {
        ConnRef {
            shard: self.id,
            conn,
        }
    }

    /// Sends an item to a connection on any shard.
    pub fn to_conn(&self, conn: ConnRef, item: ConnItem) {
        if conn.shard == self.id {
            self.deliver_local(conn.conn, item);
        } else {
            self.router.route(
                conn.shard,
                ShardMsg::ToConn {
                    conn: conn.conn,
                    item,
                },
            );
        }
    }

    /// Sends an error frame to a connection on any shard.
    pub fn to_conn_error(&self, conn: ConnRef, error: FrameError) {
        self.metrics.error(error.code);
        self.to_conn(conn, ConnItem::Frame(error.encode()));
    }

    fn deliver_local(&self, conn: ConnId, item: ConnItem) {
        let target = self.conns.borrow().get(&conn).cloned();
        // A connection that is gone needs nothing: its events are in the log.
        if let Some(target) = target {
            target.push(item, self.config.outbound_queue_max_bytes);
        }
    }

    /// Asks every connection to close with 1001 (server shutting down).
    pub fn close_all_connections(&self) {
        let conns: Vec<Rc<ConnShared>> = self.conns.borrow().values().cloned().collect();
        for conn in conns {
            conn.push(
                ConnItem::Close {
                    code: 1001,
                    reason: "server shutting down",
                },
                usize::MAX,
            );
        }
    }

    pub fn connection_count(&self) -> usize {
        self.conns.borrow().len()
    }

    /// Pings connections that have been quiet, closes those quiet past the idle timeout.
    pub async fn sweep_idle_connections(self: Rc<Self>) {
        let period = (self.config.ping_interval / 3).max(Duration::from_millis(100));
        loop {
            glommio::timer::sleep(period).await;
            let now = Instant::now();
            let conns: Vec<Rc<ConnShared>> = self.conns.borrow().values().cloned().collect();
            for conn in conns {
                let quiet = now.duration_since(conn.last_rx.get());
                if quiet >= self.config.idle_timeout {
                    conn.push(
                        ConnItem::Close {
                            code: 4008,
                            reason: "idle: no pong within the timeout",
                        },
                        usize::MAX,
                    );
                } else if quiet >= self.config.ping_interval && !conn.pinged.get() {
                    conn.pinged.set(true);
                    conn.push(ConnItem::Ping, usize::MAX);
                }
            }
        }
    }

    /// An owned device came online.
    pub(crate) fn device_online(&self) {
        ShardMetrics::add(&self.metrics.online_devices, 1);
    }

    /// An owned device went offline (or was unlinked while online).
    pub(crate) fn device_offline(&self) {
        let _ = self.metrics.online_devices.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |n| Some(n.saturating_sub(1)),
        );
    }

    /// Answers admin questions about owned users and groups, one at a time.
    pub async fn run_admin(self: Rc<Self>, mut calls: UnboundedReceiver<AdminCall>) {
        while let Some(call) = calls.next().await {
            let answer = self.on_admin(call.request);
            let _ = call.reply.send(answer);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Cross-shard dispatch.

    /// Handles one message from any shard (including this one). Never awaits.
    pub fn dispatch(&self, msg: ShardMsg) {
        match msg {
            ShardMsg::ToConn { conn, item } => self.deliver_local(conn, item),
            ShardMsg::Attach { user, device, conn } => self.on_attach(user, device, conn),
            ShardMsg::Detach { user, device, conn } => self.on_detach(user, device, conn),
            ShardMsg::Ack {
                user,
                device,
                conn,
                seq,
                reply_id,
            } => self.on_ack(user, device, conn, seq, reply_id),
            ShardMsg::Send {
                user,
                device,
                conn,
                client,
                to,
                body,
            } => self.on_send(user, device, conn, client, to, body),
            ShardMsg::Devices {
                user,
                conn,
                reply_id,
            } => self.on_devices(user, conn, reply_id),
            ShardMsg::Deliver(delivery) => self.on_deliver(delivery),
            ShardMsg::Read {
                user,
                conn,
                chat,
                up_to,
                reply_id,
            } => self.on_read(user, conn, chat, up_to, reply_id),
            ShardMsg::Edit {
                user,
                conn,
                msg,
                body,
                reply_id,
            } => self.on_edit(user, conn, msg, body, reply_id),
            ShardMsg::Delete {
                user,
                conn,
                msg,
                scope,
                reply_id,
            } => self.on_delete(user, conn, msg, scope, reply_id),
            ShardMsg::Unlink {
                user,
                conn,
                device,
                reply_id,
            } => self.on_unlink(user, conn, device, reply_id),
            ShardMsg::Typing { to, chat, from, on } => self.on_typing(to, chat, from, on),
            ShardMsg::Append(event) => self.on_foreign_event(event),
            ShardMsg::GroupOp {
                user,
                conn,
                op,
                group,
                members,
                reply_id,
            } => self.on_group_op(user, conn, op, group, members, reply_id),
            ShardMsg::GroupAppend(append) => self.on_group_append(*append),
            ShardMsg::GroupAppended { id, ok } => self.on_group_appended(id, ok),
            ShardMsg::GroupTyping { group, from, on } => self.on_group_typing(group, from, on),
            ShardMsg::GroupForeign {
                group,
                from,
                ts_ms,
                kind,
            } => self.on_group_foreign(group, from, ts_ms, kind),
            ShardMsg::Delivered { msg, result } => self.on_delivered(msg, result),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Commit pipeline.

    /// Adds writes and their after-commit actions to the next batch.
    pub fn stage(&self, ops: Vec<WriteOp>, actions: Vec<AfterCommit>) {
        let mut staged = self.staged.borrow_mut();
        staged.ops.extend(ops);
        staged.actions.extend(actions);
        drop(staged);
        self.flush_wanted.notify();
    }

    /// Asks for a flush of lazy writes (cursors, confirmations) even if nothing else is staged.
    pub fn want_flush(&self) {
        self.flush_wanted.notify();
    }

    /// Whether new client work may be admitted: at `pending_commits_max` batches queued for the
    /// writer, new sends are answered `busy`.
    pub fn commits_saturated(&self) -> bool {
        self.in_flight.borrow().len() >= self.config.pending_commits_max
    }

    pub fn commits_pending(&self) -> bool {
        !self.in_flight.borrow().is_empty()
            || !self.staged.borrow().ops.is_empty()
            || !self.staged.borrow().actions.is_empty()
    }

    fn take_batch(&self) -> Option<(WriteBatch, Vec<AfterCommit>)> {
        let mut staged = std::mem::take(&mut *self.staged.borrow_mut());
        staged.ops.append(&mut self.lazy_ops.borrow_mut());
        for (user, device) in self.cursor_dirty.borrow_mut().drain() {
            let users = self.users.borrow();
            if let Some(cursor) = users
                .get(&user)
                .and_then(|u| u.devices.get(&device))
                .map(|d| d.cursor)
            {
                staged.ops.push(WriteOp::PutCursor {
                    user: user.clone(),
                    device,
                    seq: cursor,
                });
            }
        }
        if let Some(max) = self.minted.take() {
            staged.ops.push(WriteOp::PutMeta {
                name: META_MAX_MSG_ID,
                value: max.0.to_be_bytes().to_vec(),
            });
        }
        if staged.ops.is_empty() && staged.actions.is_empty() {
            return None;
        }
        let id = self.next_batch.get();
        self.next_batch.set(id + 1);
        let batch = WriteBatch {
            id,
            epoch: self.epoch.get(),
            ops: staged.ops,
        };
        Some((batch, staged.actions))
    }

    /// Cuts staged work into batches and hands them to the writer. One task per shard.
    pub async fn run_flusher(self: Rc<Self>) {
        loop {
            self.flush_wanted.wait().await;
            // Let every handler that is already runnable stage its work first: one batch (one
            // fsync) then serves all of them.
            yield_now().await;
            while let Some((mut batch, actions)) = self.take_batch() {
                let id = batch.id;
                let ops = batch.ops.len();
                loop {
                    let refused = self.writer.borrow().try_submit(batch);
                    match refused {
                        Ok(()) => break,
                        Err(back) => {
                            // The writer's queue is at its bound: wait for room. New client
                            // work is refused meanwhile (`commits_saturated`).
                            batch = back;
                            glommio::timer::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
                self.in_flight.borrow_mut().push_back(InFlightBatch {
                    id,
                    submitted: Instant::now(),
                    ops,
                    actions,
                });
            }
        }
    }

    /// Applies completions from the writer, in batch order. One task per shard.
    pub async fn run_completions(self: Rc<Self>, mut completions: UnboundedReceiver<Completion>) {
        while let Some(completion) = completions.next().await {
            let batch = self
                .in_flight
                .borrow_mut()
                .pop_front()
                .expect("a completion without a batch in flight");
            assert_eq!(
                batch.id, completion.batch,
                "completions arrive in batch order"
            );
            match completion.result {
                Ok(()) => {
                    self.metrics.commit(batch.submitted.elapsed(), batch.ops);
                    ShardMetrics::set(&self.metrics.storage_failing, 0);
                    for action in batch.actions {
                        self.after_commit(action);
                    }
                }
                Err(error) => {
                    ShardMetrics::count(&self.metrics.commit_failures_total);
                    ShardMetrics::set(&self.metrics.storage_failing, 1);
                    self.commit_failed(completion.epoch, &error, batch.actions)
                }
            }
            if self.in_flight.borrow().is_empty() {
                self.commits_idle.notify();
            }
            glommio::yield_if_needed().await;
        }
    }

    /// A batch failed: its writes are not on disk. The first failure of an epoch starts a new
    /// epoch (later batches of the old one are refused by the writer) and reloads every owned
    /// user's heads from disk; then every waiter of the failed work gets an error.
    fn commit_failed(&self, epoch: u64, error: &StoreError, actions: Vec<AfterCommit>) {
        if epoch == self.epoch.get() {
            self.epoch.set(epoch + 1);
            tracing::error!(shard = self.id.0, %error, "commit failed; reloading owned users from disk");
            let stale = std::mem::take(&mut *self.staged.borrow_mut());
            self.reload_users();
            // Group membership is reloaded from disk on next touch.
            self.groups.borrow_mut().clear();
            for action in stale.actions {
                self.after_commit_failed(action, error);
            }
        }
        for action in actions {
            self.after_commit_failed(action, error);
        }
    }

    /// The error a client sees for work lost to a failed commit.
    pub fn store_error_frame(error: &StoreError) -> FrameError {
        match error {
            StoreError::Full => {
                FrameError::new(ErrorCode::Busy, "storage is full").with_retry(1000)
            }
            StoreError::Poisoned => {
                FrameError::new(ErrorCode::Busy, "storage is recovering").with_retry(100)
            }
            StoreError::Other(_) => FrameError::new(ErrorCode::Internal, "storage error"),
        }
    }

    /// Re-drives cross-shard deliveries that were stored but never confirmed (after a crash).
    pub fn recover_pending(&self) -> Result<usize, StoreError> {
        let pending = self.store().pending_all()?;
        let count = pending.len();
        for (msg, record) in pending {
            if let Some(fan_out) = crate::groups::decode_fan_out(&record) {
                self.resume_fan_out(fan_out);
                continue;
            }
            match crate::owner::decode_pending(&record) {
                Some((delivery, client)) => self.resume_delivery(msg, delivery, client),
                None => tracing::error!(msg = msg.0, "unreadable pending delivery record"),
            }
        }
        Ok(count)
    }

    /// Routes lazy writes at a fixed pace so cursors reach the disk without a batch per ack.
    pub async fn run_lazy_flush(self: Rc<Self>) {
        loop {
            glommio::timer::sleep(Duration::from_millis(200)).await;
            if !self.cursor_dirty.borrow().is_empty() || !self.lazy_ops.borrow().is_empty() {
                self.want_flush();
            }
            let depth: usize = (0..self.shards)
                .filter(|s| *s != self.id.0)
                .map(|s| self.router.depth(ShardId(s)))
                .sum();
            ShardMetrics::set(&self.metrics.cross_shard_queue_depth, depth as u64);
            ShardMetrics::set(
                &self.metrics.pending_commits,
                self.in_flight.borrow().len() as u64,
            );
            self.evict_idle_state();
            ShardMetrics::set(&self.metrics.owned_users, self.users.borrow().len() as u64);
        }
    }

    /// Keeps the in-memory user and group maps under their bounds. Runs only when nothing is
    /// staged or in flight, so everything evicted is exactly what the disk holds; users with an
    /// online device are kept. Evicts down to 90% of the bound.
    fn evict_idle_state(&self) {
        let over_users = self.users.borrow().len() > self.config.owned_users_max;
        let over_groups = self.groups.borrow().len() > self.config.owned_groups_max;
        if !(over_users || over_groups)
            || self.commits_pending()
            || !self.cursor_dirty.borrow().is_empty()
            || !self.lazy_ops.borrow().is_empty()
            || !self.delivering.borrow().is_empty()
        {
            return;
        }
        if over_users {
            let target = self.config.owned_users_max / 10 * 9;
            let mut users = self.users.borrow_mut();
            let inflight = self.inflight_by_msg.borrow();
            let busy: HashSet<&UserId> = inflight.values().map(|entry| &entry.user).collect();
            let idle: Vec<UserId> = users
                .iter()
                .filter(|(user, state)| {
                    state
                        .devices
                        .values()
                        .all(|d| d.online.is_none() && !d.linking)
                        && state.head == state.committed
                        && !busy.contains(user)
                })
                .map(|(user, _)| user.clone())
                .take(users.len().saturating_sub(target))
                .collect();
            for user in &idle {
                users.remove(user);
            }
            tracing::debug!(
                shard = self.id.0,
                evicted = idle.len(),
                "evicted idle users"
            );
        }
        if over_groups {
            self.groups.borrow_mut().clear();
        }
    }

    /// Hands everything staged to the writer and waits until it is committed (shutdown).
    pub async fn drain_commits(&self, deadline: Instant) {
        self.want_flush();
        while Instant::now() < deadline {
            yield_now().await;
            let lazy_left =
                !self.cursor_dirty.borrow().is_empty() || !self.lazy_ops.borrow().is_empty();
            if lazy_left {
                self.want_flush();
            }
            if !self.commits_pending() && !lazy_left {
                return;
            }
            glommio::timer::sleep(Duration::from_millis(2)).await;
        }
        tracing::warn!(
            shard = self.id.0,
            "shutdown: commits still pending at the deadline"
        );
    }

    /// Stops the writer thread once everything queued is committed (blocks briefly).
    pub fn finish_writer(&self) {
        self.writer.borrow_mut().finish();
    }
}
