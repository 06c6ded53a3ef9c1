//! Cross-shard messaging: the only way one shard talks to another.
//!
//! Owns: the `ShardMsg` vocabulary, one bounded FIFO per destination shard, and the pump tasks
//! that move those FIFOs into glommio's lock-free shared channels (a full mesh of SPSC rings).
//! Messages to the shard itself go through the same FIFO discipline (a local queue) so a handler
//! never re-enters another handler.
//!
//! Must not: await a channel send in a task that also drains a receiver (glommio #555: two
//! shards each blocked sending to the other would deadlock). Pumps only send; receiver tasks
//! only receive and dispatch synchronously. Must not read or change shard state.
//!
//! Ordering: messages from one shard to another arrive in the order they were routed (one FIFO,
//! one pump, one SPSC ring per pair). The protocol's per-chat order rests on this.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use bytes::Bytes;
use glommio::channels::channel_mesh::Senders;
use glommio::channels::shared_channel::ConnectedReceiver;
use glommio::{GlommioError, ResourceType};

use crate::groups::GroupAppend;
use crate::ids::{
    ChatId, ClientMsgId, ConnId, ConnRef, DeviceId, GroupId, MsgId, Seq, ShardId, UserId,
};
use crate::notify::Notify;
use crate::protocol::{DeleteScope, ErrorCode, FrameError, GroupOp};

/// A message between shards (or from a shard to itself).
#[derive(Debug)]
pub enum ShardMsg {
    /// Connection shard → owner: a device connected.
    Attach {
        user: UserId,
        device: DeviceId,
        conn: ConnRef,
    },
    /// Connection shard → owner: a device's connection ended.
    Detach {
        user: UserId,
        device: DeviceId,
        conn: ConnRef,
    },
    /// Connection shard → owner: cumulative ack.
    Ack {
        user: UserId,
        device: DeviceId,
        conn: ConnRef,
        seq: Seq,
        /// The frame's `id`, echoed in an error answer.
        reply_id: Option<String>,
    },
    /// Connection shard → owner of the sender: a `send` frame.
    Send {
        user: UserId,
        device: DeviceId,
        conn: ConnRef,
        client: ClientMsgId,
        to: ChatId,
        body: String,
    },
    /// Connection shard → owner: list the user's devices.
    Devices {
        user: UserId,
        conn: ConnRef,
        reply_id: Option<String>,
    },
    /// Connection shard → owner: a read mark.
    Read {
        user: UserId,
        conn: ConnRef,
        chat: ChatId,
        up_to: MsgId,
        reply_id: Option<String>,
    },
    /// Connection shard → owner: edit a message (sender only).
    Edit {
        user: UserId,
        conn: ConnRef,
        msg: MsgId,
        body: String,
        reply_id: Option<String>,
    },
    /// Connection shard → owner: delete a message.
    Delete {
        user: UserId,
        conn: ConnRef,
        msg: MsgId,
        scope: DeleteScope,
        reply_id: Option<String>,
    },
    /// Connection shard → owner: unlink one of the user's devices.
    Unlink {
        user: UserId,
        conn: ConnRef,
        device: DeviceId,
        reply_id: Option<String>,
    },
    /// Connection shard → owner of `to`: show a typing indicator on `to`'s online devices.
    Typing {
        to: UserId,
        /// The chat as `to` names it.
        chat: String,
        from: UserId,
        on: bool,
    },
    /// One owner → another: append an event that follows from something in another log.
    Append(ForeignEvent),
    /// Connection shard → the group's owner: a membership operation.
    GroupOp {
        user: UserId,
        conn: ConnRef,
        op: GroupOp,
        group: GroupId,
        members: Vec<UserId>,
        reply_id: Option<String>,
    },
    /// The group's owner → a member owner: append a group event to these members' logs.
    GroupAppend(Box<GroupAppend>),
    /// A member owner → the group's owner: its part of fan-out `id` is durable (or failed).
    GroupAppended { id: MsgId, ok: bool },
    /// Connection shard → the group's owner: relay a typing indicator to the members.
    GroupTyping {
        group: GroupId,
        from: UserId,
        on: bool,
    },
    /// Sender's owner → the group's owner: relay an edit or delete to the other members.
    GroupForeign {
        group: GroupId,
        from: UserId,
        ts_ms: u64,
        kind: ForeignKind,
    },
    /// Sender's owner → recipient's owner: append a message to the recipient's log.
    Deliver(Delivery),
    /// Recipient's owner → sender's owner: the recipient's copy is committed (or failed).
    Delivered {
        msg: MsgId,
        result: Result<(), ErrorCode>,
    },
    /// Any shard → the shard holding a connection.
    ToConn { conn: ConnId, item: ConnItem },
}

/// A message on its way to the recipient's log.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub msg: MsgId,
    pub ts_ms: u64,
    pub from: UserId,
    pub device: DeviceId,
    /// A user (1:1) or a group (delivered through the group's owner, which fans out).
    pub to: ChatId,
    pub body: String,
    /// The shard that owns the sender and waits for the confirmation.
    pub origin: ShardId,
}

/// An event for `to`'s log caused by another user's action.
#[derive(Debug, Clone)]
pub struct ForeignEvent {
    pub to: UserId,
    pub ts_ms: u64,
    pub kind: ForeignKind,
}

#[derive(Debug, Clone)]
pub enum ForeignKind {
    /// `by` received (`read` = false) or read (`read` = true) `chat` up to `up_to`.
    Receipt {
        chat: String,
        by: UserId,
        read: bool,
        up_to: MsgId,
    },
    /// The sender edited `msg` in `chat` (as `to` names it).
    Edit {
        chat: String,
        msg: MsgId,
        body: String,
    },
    /// The sender deleted `msg` for everyone.
    Delete { chat: String, msg: MsgId },
}

/// What a connection receives from the shards.
#[derive(Debug, Clone)]
pub enum ConnItem {
    /// The owner registered this device; replay `(cursor, head]` from the log, then go live.
    Attached { cursor: Seq, head: Seq, low: Seq },
    /// The owner refused the device: send `error`, then close with `close_code`.
    Refused { error: FrameError, close_code: u16 },
    /// A committed event of the connection's user.
    Event { seq: Seq, record: Bytes },
    /// Any other frame (`sent`, `error`, `devices`, ...).
    Frame(Bytes),
    /// Close the connection with this code.
    Close { code: u16, reason: &'static str },
    /// The connection has been quiet: send a WebSocket ping.
    Ping,
}

impl ConnItem {
    /// Bytes this item holds in a connection's outbound queue.
    pub fn queued_bytes(&self) -> usize {
        match self {
            ConnItem::Event { record, .. } => record.len(),
            ConnItem::Frame(frame) => frame.len(),
            _ => 0,
        }
    }
}

/// Why a message was not routed.
#[derive(Debug, PartialEq, Eq)]
pub struct QueueFull;

struct Destination {
    queue: RefCell<VecDeque<ShardMsg>>,
    ready: Notify,
}

/// One shard's outgoing side of the mesh.
pub struct Router {
    me: ShardId,
    destinations: Vec<Destination>,
    /// Soft bound per destination for client-initiated work (see `try_route`).
    queue_max: usize,
    closed: Cell<bool>,
}

impl Router {
    pub fn new(me: ShardId, shards: usize, queue_max: usize) -> Rc<Router> {
        Rc::new(Router {
            me,
            destinations: (0..shards)
                .map(|_| Destination {
                    queue: RefCell::new(VecDeque::new()),
                    ready: Notify::default(),
                })
                .collect(),
            queue_max,
            closed: Cell::new(false),
        })
    }

    /// Routes a message that must not be dropped: replies, confirmations and deliveries whose
    /// cause was already accepted. Their number is bounded by the work admitted through
    /// `try_route` and the commit bound, so the queue cannot grow without bound.
    pub fn route(&self, to: ShardId, msg: ShardMsg) {
        let destination = &self.destinations[to.0];
        destination.queue.borrow_mut().push_back(msg);
        destination.ready.notify();
    }

    /// Routes client-initiated work. At the bound (`cross_shard_queue_max` messages waiting for
    /// that shard) the message is refused; the caller answers `busy`.
    pub fn try_route(&self, to: ShardId, msg: ShardMsg) -> Result<(), QueueFull> {
        if self.destinations[to.0].queue.borrow().len() >= self.queue_max {
            return Err(QueueFull);
        }
        self.route(to, msg);
        Ok(())
    }

    /// Messages waiting for `to`.
    pub fn depth(&self, to: ShardId) -> usize {
        self.destinations[to.0].queue.borrow().len()
    }

    /// Stops the pumps once their queues are empty.
    pub fn close(&self) {
        self.closed.set(true);
        for destination in &self.destinations {
            destination.ready.notify();
        }
    }

    /// Moves messages for shard `to` into the mesh. One task per peer; it only sends.
    pub async fn pump_remote(self: Rc<Self>, to: ShardId, senders: Rc<Senders<ShardMsg>>) {
        let destination = &self.destinations[to.0];
        loop {
            let next = destination.queue.borrow_mut().pop_front();
            match next {
                Some(msg) => {
                    // Fast path without a suspension point; when the ring is full, wait for
                    // room (this task drains no receiver, so waiting cannot deadlock).
                    let sent = match senders.try_send_to(to.0, msg) {
                        Ok(()) => Ok(()),
                        Err(GlommioError::WouldBlock(ResourceType::Channel(msg))) => {
                            senders.send_to(to.0, msg).await.map_err(|e| e.to_string())
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    if let Err(e) = sent {
                        // Only at shutdown, when the peer has gone.
                        tracing::debug!(shard = to.0, error = %e, "cross-shard channel closed");
                        return;
                    }
                }
                None if self.closed.get() => return,
                None => destination.ready.wait().await,
            }
        }
    }

    /// Hands messages addressed to this shard to `dispatch`, one at a time, in order.
    pub async fn pump_local(self: Rc<Self>, dispatch: impl Fn(ShardMsg)) {
        let destination = &self.destinations[self.me.0];
        loop {
            let next = destination.queue.borrow_mut().pop_front();
            match next {
                Some(msg) => {
                    dispatch(msg);
                    glommio::yield_if_needed().await;
                }
                None if self.closed.get() => return,
                None => destination.ready.wait().await,
            }
        }
    }

    /// Drains one peer's ring into `dispatch`, in order. Only receives: never sends.
    pub async fn receive_from(receiver: ConnectedReceiver<ShardMsg>, dispatch: impl Fn(ShardMsg)) {
        while let Some(msg) = receiver.recv().await {
            dispatch(msg);
            glommio::yield_if_needed().await;
        }
    }
}
