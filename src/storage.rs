//! The per-shard durable store: one LMDB environment per shard, one writer OS thread each.
//!
//! Owns: the on-disk layout (tables and key encodings), the writer thread that folds many
//! batches into one transaction (group commit: one fsync serves them all), and short read-only
//! lookups. The only module that imports heed.
//!
//! Must not: open a write transaction on an executor thread (LMDB commits block); keep a read
//! transaction open across an `.await`; decide what to write (the owner logic does).
//!
//! Tables (keys; ids never contain a NUL byte, so `\0` separates them unambiguously):
//! - `log`:          user \0 seq(u64 BE)            → event record (the event's wire JSON)
//! - `cursors`:      user \0 device                 → acked seq (u64 BE); a key = a linked device
//! - `dedupe`:       user \0 device \0 client id    → msg id (u64 BE) ++ ts ms (u64 BE)
//! - `dedupe_order`: user \0 device \0 order(u64 BE)→ client id (oldest first, for the window)
//! - `msg_seq`:      msg id(u64 BE) user            → seq (u64 BE) of that message in the user's
//!   log. Id first: ids grow with time, so a transaction's inserts land in the rightmost pages
//!   instead of one page per recipient (keyed user-first, as the old `msg_index` was, it cost a
//!   page write per recipient per commit). Point lookups only.
//! - `chat_index`:   user \0 chat \0 seq(u64 BE)   → msg id (u64 BE): a chat in log order
//!   (not id order: ids minted on different shards interleave), for history; pruned with the
//!   log entries it points at
//! - `msg_changes`:  user \0 msg id(u64 BE)         → 'd' (deleted) or 'e' ++ latest body (edited)
//! - `watermarks`:   user \0 kind \0 chat          → u64 BE (receipt/read watermarks, acked max)
//! - `groups`:       group id                       → membership record (JSON, see `groups`)
//! - `pending`:      msg id(u64 BE)                 → a cross-shard delivery not yet confirmed
//! - `meta`:         name                           → value (e.g. `max_msg_id`)

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use futures_channel::mpsc::UnboundedSender;
use heed::types::Bytes as RawBytes;
use heed::{Database, Env, EnvFlags, EnvOpenOptions, PutFlags, WithoutTls};

use crate::config::Durability;
use crate::ids::{DeviceId, MsgId, Seq, ShardId, UserId};
use crate::protocol::decode_stored_msg;

type Table = Database<RawBytes, RawBytes>;

/// With `Durability::ProcessCrashSafe`, the longest a commit stays without an fsync.
const PERIODIC_SYNC: Duration = Duration::from_secs(1);

/// Why a storage operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The LMDB map (or the disk) is full: writes fail until space is freed.
    Full,
    /// The batch was refused because an earlier batch of the same epoch failed: its in-memory
    /// state may be ahead of the disk.
    Poisoned,
    /// Any other LMDB or I/O error.
    Other(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Full => f.write_str("storage is full"),
            StoreError::Poisoned => f.write_str("an earlier commit of this batch's epoch failed"),
            StoreError::Other(e) => write!(f, "storage error: {e}"),
        }
    }
}

impl From<heed::Error> for StoreError {
    fn from(e: heed::Error) -> Self {
        match e {
            heed::Error::Mdb(heed::MdbError::MapFull) => StoreError::Full,
            heed::Error::Io(ref io) if io.raw_os_error() == Some(libc::ENOSPC) => StoreError::Full,
            other => StoreError::Other(other.to_string()),
        }
    }
}

/// One write, applied inside the writer's transaction.
#[derive(Debug)]
pub enum WriteOp {
    /// Store event `seq` of `user`. The key must be new (NO_OVERWRITE): a clash means the
    /// in-memory head diverged from disk, and the batch fails instead of overwriting.
    Append {
        user: UserId,
        seq: Seq,
        record: Bytes,
    },
    /// Remember where message `msg` sits in `user`'s log.
    IndexMsg { user: UserId, msg: MsgId, seq: Seq },
    /// Set a device's cursor (also links the device: a cursor key is a linked device).
    PutCursor {
        user: UserId,
        device: DeviceId,
        seq: Seq,
    },
    /// Remember a `send`'s answer for retries, as number `order` of this device's window, and
    /// forget the entry that falls out of the window (`order - window`), if any.
    PutDedupe {
        user: UserId,
        device: DeviceId,
        client: String,
        msg: MsgId,
        ts_ms: u64,
        order: u64,
        window: u64,
        /// The send was refused for good (e.g. `not_member`): a retry gets this code again.
        refused: Option<&'static str>,
    },
    /// Record a cross-shard delivery that must be re-driven after a crash until confirmed.
    PutPending { msg: MsgId, record: Vec<u8> },
    /// The delivery is confirmed: forget it.
    DeletePending { msg: MsgId },
    /// Store a named value.
    PutMeta { name: &'static str, value: Vec<u8> },
    /// Index message `msg` (at `seq`) under the chat it belongs to in `user`'s log.
    IndexChat {
        user: UserId,
        chat: String,
        msg: MsgId,
        seq: Seq,
    },
    /// Record that `msg` was edited or deleted in `user`'s view.
    PutChange {
        user: UserId,
        msg: MsgId,
        change: MsgChange,
    },
    /// Set a watermark (see `WatermarkKind`).
    PutWatermark {
        user: UserId,
        kind: WatermarkKind,
        chat: String,
        value: u64,
    },
    /// Forget a device: its cursor and its dedupe window.
    UnlinkDevice { user: UserId, device: DeviceId },
    /// Delete `user`'s events with seq ≤ `through` (retention).
    PruneLog { user: UserId, through: Seq },
    /// Forgets where messages older than `before` sit (at most `max` of them per commit): their
    /// events are past retention, so lookups by id answer "unknown" as for any pruned event.
    PruneMsgSeq { before: MsgId, max: usize },
    /// Store a group's membership record.
    PutGroup { group: String, record: Vec<u8> },
    /// The last member left: forget the group.
    DeleteGroup { group: String },
}

/// The remembered answer to a device's `send`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupeEntry {
    pub msg: MsgId,
    pub ts_ms: u64,
    /// The error code the send was refused with, if it was.
    pub refused: Option<String>,
}

/// One bounded pass of the retention scan.
pub struct ExpiredScan {
    /// (user, last expired seq) pairs.
    pub expired: Vec<(UserId, Seq)>,
    /// The log key to continue from; `None` when the pass reached the end of the log.
    pub resume: Option<Vec<u8>>,
}

impl ExpiredScan {
    fn done(expired: Vec<(UserId, Seq)>) -> Self {
        ExpiredScan {
            expired,
            resume: None,
        }
    }
}

/// What happened to a message after it was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MsgChange {
    Deleted,
    Edited(String),
}

/// The kinds of per-chat watermark a user has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WatermarkKind {
    /// Highest `delivered` receipt in this user's log for a chat (receipts fold onto it).
    DeliveredReceipt,
    /// Highest `read` receipt in this user's log for a chat.
    ReadReceipt,
    /// This user's own read mark for a chat.
    ReadMark,
    /// Highest seq any of this user's devices acked (chat is empty).
    AckedMax,
}

impl WatermarkKind {
    fn byte(self) -> u8 {
        match self {
            WatermarkKind::DeliveredReceipt => b'd',
            WatermarkKind::ReadReceipt => b'r',
            WatermarkKind::ReadMark => b'm',
            WatermarkKind::AckedMax => b'a',
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            b'd' => WatermarkKind::DeliveredReceipt,
            b'r' => WatermarkKind::ReadReceipt,
            b'm' => WatermarkKind::ReadMark,
            b'a' => WatermarkKind::AckedMax,
            _ => return None,
        })
    }
}

/// A batch of writes from one shard, committed atomically with whatever else is queued.
#[derive(Debug)]
pub struct WriteBatch {
    /// Identifies the batch in its completion.
    pub id: u64,
    /// The shard's storage epoch when the batch was built (see `StoreError::Poisoned`).
    pub epoch: u64,
    pub ops: Vec<WriteOp>,
}

/// The writer's answer for one batch.
#[derive(Debug)]
pub struct Completion {
    pub batch: u64,
    pub epoch: u64,
    pub result: Result<(), StoreError>,
}

fn user_prefix(user: &UserId) -> Vec<u8> {
    let mut key = Vec::with_capacity(user.as_str().len() + 1);
    key.extend_from_slice(user.as_str().as_bytes());
    key.push(0);
    key
}

fn log_key(user: &UserId, seq: Seq) -> Vec<u8> {
    let mut key = user_prefix(user);
    key.extend_from_slice(&seq.0.to_be_bytes());
    key
}

fn cursor_key(user: &UserId, device: &DeviceId) -> Vec<u8> {
    let mut key = user_prefix(user);
    key.extend_from_slice(device.as_str().as_bytes());
    key
}

fn device_prefix(user: &UserId, device: &DeviceId) -> Vec<u8> {
    let mut key = cursor_key(user, device);
    key.push(0);
    key
}

fn dedupe_key(user: &UserId, device: &DeviceId, client: &str) -> Vec<u8> {
    let mut key = device_prefix(user, device);
    key.extend_from_slice(client.as_bytes());
    key
}

fn dedupe_order_key(user: &UserId, device: &DeviceId, order: u64) -> Vec<u8> {
    let mut key = device_prefix(user, device);
    key.extend_from_slice(&order.to_be_bytes());
    key
}

fn msg_seq_key(user: &UserId, msg: MsgId) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + user.as_str().len());
    key.extend_from_slice(&msg.0.to_be_bytes());
    key.extend_from_slice(user.as_str().as_bytes());
    key
}

/// The key of `msg_changes` (user first: a user's changes are read together).
fn msg_index_key(user: &UserId, msg: MsgId) -> Vec<u8> {
    let mut key = user_prefix(user);
    key.extend_from_slice(&msg.0.to_be_bytes());
    key
}

fn chat_prefix(user: &UserId, chat: &str) -> Vec<u8> {
    let mut key = user_prefix(user);
    key.extend_from_slice(chat.as_bytes());
    key.push(0);
    key
}

fn chat_index_key(user: &UserId, chat: &str, seq: Seq) -> Vec<u8> {
    let mut key = chat_prefix(user, chat);
    key.extend_from_slice(&seq.0.to_be_bytes());
    key
}

fn watermark_key(user: &UserId, kind: WatermarkKind, chat: &str) -> Vec<u8> {
    let mut key = user_prefix(user);
    key.push(kind.byte());
    key.push(0);
    key.extend_from_slice(chat.as_bytes());
    key
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

#[derive(Clone, Copy)]
struct Tables {
    log: Table,
    cursors: Table,
    dedupe: Table,
    dedupe_order: Table,
    msg_seq: Table,
    pending: Table,
    meta: Table,
    chat_index: Table,
    msg_changes: Table,
    watermarks: Table,
    groups: Table,
}

/// What the store knows of one user when the owner first touches them.
#[derive(Debug, Default)]
pub struct UserSnapshot {
    /// Highest stored seq (0 when the log is empty).
    pub head: Seq,
    /// Oldest stored seq (`head + 1` when the log is empty).
    pub low: Seq,
    /// Linked devices with their cursors.
    pub devices: Vec<(DeviceId, Seq)>,
    /// Every watermark of the user: (kind, chat, value).
    pub watermarks: Vec<(WatermarkKind, String, u64)>,
}

/// Read access to one shard's store. Cheap to clone; usable from any thread (read
/// transactions are opened without thread-local storage and never held across an await).
#[derive(Clone)]
pub struct Store {
    env: Env<WithoutTls>,
    tables: Tables,
    /// The CPUs the process may run on, read when the store was opened (on the main thread,
    /// before any executor pinned itself). The writer runs on any of them rather than on its
    /// shard's core: its work is blocking syscalls that would otherwise take turns with the
    /// shard's event loop on one core.
    cpus: Option<libc::cpu_set_t>,
}

impl Store {
    /// Opens (creating if needed) the environment in `dir`.
    pub fn open(dir: &Path, map_bytes: usize, durability: Durability) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Other(e.to_string()))?;
        let mut options = EnvOpenOptions::new().read_txn_without_tls();
        options.map_size(map_bytes).max_dbs(16).max_readers(1024);
        if durability == Durability::ProcessCrashSafe {
            // SAFETY: NO_SYNC only trades power-failure durability (documented on Durability);
            // the writer thread fsyncs periodically.
            unsafe {
                options.flags(EnvFlags::NO_SYNC);
            }
        }
        // SAFETY: each shard's directory is opened once per process (the server owns the data
        // dir), which is heed's requirement for a sound mmap.
        let env = unsafe { options.open(dir)? };
        let mut wtxn = env.write_txn()?;
        let tables = Tables {
            log: env.create_database(&mut wtxn, Some("log"))?,
            cursors: env.create_database(&mut wtxn, Some("cursors"))?,
            dedupe: env.create_database(&mut wtxn, Some("dedupe"))?,
            dedupe_order: env.create_database(&mut wtxn, Some("dedupe_order"))?,
            msg_seq: env.create_database(&mut wtxn, Some("msg_seq"))?,
            pending: env.create_database(&mut wtxn, Some("pending"))?,
            meta: env.create_database(&mut wtxn, Some("meta"))?,
            chat_index: env.create_database(&mut wtxn, Some("chat_index"))?,
            msg_changes: env.create_database(&mut wtxn, Some("msg_changes"))?,
            watermarks: env.create_database(&mut wtxn, Some("watermarks"))?,
            groups: env.create_database(&mut wtxn, Some("groups"))?,
        };
        migrate_msg_index(&env, &mut wtxn, tables.msg_seq)?;
        wtxn.commit()?;
        Ok(Store {
            env,
            tables,
            cpus: allowed_cpus(),
        })
    }

    /// Starts this store's writer thread. Batches go in through the returned sender (bounded
    /// by `pending_max`); each batch's completion comes back on `completions`, in order.
    pub fn start_writer(
        &self,
        shard: ShardId,
        pending_max: usize,
        batch_max_ops: usize,
        durability: Durability,
        completions: UnboundedSender<Completion>,
    ) -> std::io::Result<WriterHandle> {
        let (sender, receiver) = crossbeam_channel::bounded(pending_max);
        let store = self.clone();
        let join = thread::Builder::new()
            .name(format!("courier-writer-{}", shard.0))
            .spawn(move || {
                unpin(store.cpus.as_ref(), "storage writer");
                store.writer_loop(receiver, batch_max_ops, durability, completions)
            })?;
        Ok(WriterHandle {
            sender: Some(sender),
            join: Some(join),
        })
    }

    fn writer_loop(
        self,
        batches: Receiver<WriteBatch>,
        batch_max_ops: usize,
        durability: Durability,
        completions: UnboundedSender<Completion>,
    ) {
        let mut poisoned_epoch: Option<u64> = None;
        // Durability::ProcessCrashSafe: commits are not fsynced here; a syncer thread fsyncs
        // at most `PERIODIC_SYNC` after any commit, busy or idle, which bounds what a power
        // failure can lose. It runs beside the writer because an fsync of a second's worth of
        // pages takes hundreds of milliseconds, and commits must not wait for it.
        let syncer = (durability == Durability::ProcessCrashSafe).then(|| Syncer::start(&self));
        loop {
            let first = match batches.recv() {
                Ok(batch) => batch,
                Err(_) => break,
            };
            let mut group = vec![first];
            let mut ops = group[0].ops.len();
            while ops < batch_max_ops {
                match batches.try_recv() {
                    Ok(batch) => {
                        ops += batch.ops.len();
                        group.push(batch);
                    }
                    Err(_) => break,
                }
            }
            let results = self.commit_isolating_failures(&group, &mut poisoned_epoch);
            if let Some(syncer) = &syncer
                && results.iter().any(|r| r.is_ok())
            {
                syncer.dirty.store(true, Ordering::Release);
            }
            // Completions go out in the order the batches came in.
            for (batch, result) in group.iter().zip(results) {
                let completion = Completion {
                    batch: batch.id,
                    epoch: batch.epoch,
                    result,
                };
                if completions.unbounded_send(completion).is_err() {
                    return; // The shard is gone; nobody waits for these.
                }
            }
        }
        if let Some(syncer) = syncer {
            syncer.stop();
        }
        if let Err(e) = self.env.force_sync() {
            tracing::error!(error = %e, "final fsync failed");
        }
    }

    /// Commits `group` in one transaction. If that fails, commits each batch alone so that one
    /// bad batch does not fail its neighbours; the first failure poisons its epoch, and later
    /// batches of that epoch are refused (their in-memory state assumed the failed writes).
    fn commit_isolating_failures(
        &self,
        group: &[WriteBatch],
        poisoned_epoch: &mut Option<u64>,
    ) -> Vec<Result<(), StoreError>> {
        let live: Vec<&WriteBatch> = group
            .iter()
            .filter(|b| Some(b.epoch) != *poisoned_epoch)
            .collect();
        if !live.is_empty() && self.commit(&live).is_ok() {
            return group
                .iter()
                .map(|b| {
                    if Some(b.epoch) == *poisoned_epoch {
                        Err(StoreError::Poisoned)
                    } else {
                        Ok(())
                    }
                })
                .collect();
        }
        group
            .iter()
            .map(|b| {
                if Some(b.epoch) == *poisoned_epoch {
                    return Err(StoreError::Poisoned);
                }
                let result = self.commit(&[b]);
                if let Err(e) = &result {
                    tracing::error!(error = %e, batch = b.id, epoch = b.epoch, "commit failed");
                    *poisoned_epoch = Some(b.epoch);
                }
                result
            })
            .collect()
    }

    fn commit(&self, batches: &[&WriteBatch]) -> Result<(), StoreError> {
        let t = self.tables;
        let mut wtxn = self.env.write_txn()?;
        for op in batches.iter().flat_map(|b| b.ops.iter()) {
            match op {
                WriteOp::Append { user, seq, record } => {
                    t.log.put_with_flags(
                        &mut wtxn,
                        PutFlags::NO_OVERWRITE,
                        &log_key(user, *seq),
                        record,
                    )?;
                }
                WriteOp::IndexMsg { user, msg, seq } => {
                    t.msg_seq
                        .put(&mut wtxn, &msg_seq_key(user, *msg), &seq.0.to_be_bytes())?;
                }
                WriteOp::PutCursor { user, device, seq } => {
                    t.cursors
                        .put(&mut wtxn, &cursor_key(user, device), &seq.0.to_be_bytes())?;
                }
                WriteOp::PutDedupe {
                    user,
                    device,
                    client,
                    msg,
                    ts_ms,
                    order,
                    window,
                    refused,
                } => {
                    // Evict the entry falling out of the window first. A client id can only
                    // be stored again after it fell out (inside the window a retry is answered
                    // from here), so the evicted order entry always owns its dedupe key.
                    if *order > *window {
                        let old_key = dedupe_order_key(user, device, order - window);
                        let old_client = t.dedupe_order.get(&wtxn, &old_key)?.map(<[u8]>::to_vec);
                        if let Some(old_client) = old_client {
                            t.dedupe_order.delete(&mut wtxn, &old_key)?;
                            let old_client = String::from_utf8_lossy(&old_client);
                            t.dedupe
                                .delete(&mut wtxn, &dedupe_key(user, device, &old_client))?;
                        }
                    }
                    let mut value = Vec::with_capacity(24);
                    value.extend_from_slice(&msg.0.to_be_bytes());
                    value.extend_from_slice(&ts_ms.to_be_bytes());
                    value.extend_from_slice(refused.unwrap_or("").as_bytes());
                    t.dedupe
                        .put(&mut wtxn, &dedupe_key(user, device, client), &value)?;
                    t.dedupe_order.put(
                        &mut wtxn,
                        &dedupe_order_key(user, device, *order),
                        client.as_bytes(),
                    )?;
                }
                WriteOp::PutPending { msg, record } => {
                    t.pending.put(&mut wtxn, &msg.0.to_be_bytes(), record)?;
                }
                WriteOp::DeletePending { msg } => {
                    t.pending.delete(&mut wtxn, &msg.0.to_be_bytes())?;
                }
                WriteOp::PutMeta { name, value } => {
                    t.meta.put(&mut wtxn, name.as_bytes(), value)?;
                }
                WriteOp::IndexChat {
                    user,
                    chat,
                    msg,
                    seq,
                } => {
                    t.chat_index.put(
                        &mut wtxn,
                        &chat_index_key(user, chat, *seq),
                        &msg.0.to_be_bytes(),
                    )?;
                }
                WriteOp::PutChange { user, msg, change } => {
                    let value = match change {
                        MsgChange::Deleted => b"d".to_vec(),
                        MsgChange::Edited(body) => [b"e", body.as_bytes()].concat(),
                    };
                    t.msg_changes
                        .put(&mut wtxn, &msg_index_key(user, *msg), &value)?;
                }
                WriteOp::PutWatermark {
                    user,
                    kind,
                    chat,
                    value,
                } => {
                    t.watermarks.put(
                        &mut wtxn,
                        &watermark_key(user, *kind, chat),
                        &value.to_be_bytes(),
                    )?;
                }
                WriteOp::UnlinkDevice { user, device } => {
                    t.cursors.delete(&mut wtxn, &cursor_key(user, device))?;
                    let prefix = device_prefix(user, device);
                    for table in [t.dedupe, t.dedupe_order] {
                        let mut entries = table.prefix_iter_mut(&mut wtxn, &prefix)?;
                        while entries.next().transpose()?.is_some() {
                            // SAFETY: no reference into the database is held across the delete.
                            unsafe { entries.del_current()? };
                        }
                    }
                }
                WriteOp::PutGroup { group, record } => {
                    t.groups.put(&mut wtxn, group.as_bytes(), record)?;
                }
                WriteOp::DeleteGroup { group } => {
                    t.groups.delete(&mut wtxn, group.as_bytes())?;
                }
                WriteOp::PruneMsgSeq { before, max } => {
                    let upper = before.0.to_be_bytes();
                    let mut entries = t.msg_seq.range_mut(
                        &mut wtxn,
                        &(Bound::Unbounded, Bound::Excluded(upper.as_slice())),
                    )?;
                    let mut deleted = 0;
                    while deleted < *max && entries.next().transpose()?.is_some() {
                        // SAFETY: no reference into the database is held across the delete.
                        unsafe { entries.del_current()? };
                        deleted += 1;
                    }
                }
                WriteOp::PruneLog { user, through } => {
                    let start = log_key(user, Seq(0));
                    let end = log_key(user, *through);
                    let range = (
                        Bound::Included(start.as_slice()),
                        Bound::Included(end.as_slice()),
                    );
                    // The pruned messages' chat index entries go with them, or history pages
                    // would point at events that no longer exist (and the index would grow for
                    // ever). Bounded like the prune itself (`prune_batch_events`).
                    let mut indexed = Vec::new();
                    for entry in t.log.range(&wtxn, &range)? {
                        let (key, record) = entry?;
                        let seq = key.len().checked_sub(8).and_then(|at| be_u64(&key[at..]));
                        if let (Some(seq), Some(stored)) = (seq, decode_stored_msg(record)) {
                            indexed.push(chat_index_key(user, &stored.chat, Seq(seq)));
                        }
                    }
                    for key in &indexed {
                        t.chat_index.delete(&mut wtxn, key)?;
                    }
                    t.log.delete_range(&mut wtxn, &range)?;
                }
            }
        }
        wtxn.commit()?;
        Ok(())
    }

    /// Reads what the store holds for `user`: head, low and linked devices.
    pub fn load_user(&self, user: &UserId) -> Result<UserSnapshot, StoreError> {
        let rtxn = self.env.read_txn()?;
        let prefix = user_prefix(user);
        let mut snapshot = UserSnapshot::default();
        if let Some((key, _)) = self
            .tables
            .log
            .rev_prefix_iter(&rtxn, &prefix)?
            .next()
            .transpose()?
        {
            snapshot.head = Seq(be_u64(&key[prefix.len()..]).unwrap_or(0));
        }
        snapshot.low = match self
            .tables
            .log
            .prefix_iter(&rtxn, &prefix)?
            .next()
            .transpose()?
        {
            Some((key, _)) => Seq(be_u64(&key[prefix.len()..]).unwrap_or(0)),
            None => snapshot.head.next(),
        };
        for entry in self.tables.cursors.prefix_iter(&rtxn, &prefix)? {
            let (key, value) = entry?;
            let Ok(device) = std::str::from_utf8(&key[prefix.len()..]) else {
                continue;
            };
            if let Some(device) = DeviceId::parse(device) {
                snapshot
                    .devices
                    .push((device, Seq(be_u64(value).unwrap_or(0))));
            }
        }
        for entry in self.tables.watermarks.prefix_iter(&rtxn, &prefix)? {
            let (key, value) = entry?;
            let rest = &key[prefix.len()..];
            let (Some(kind), Some(0)) = (
                rest.first().copied().and_then(WatermarkKind::from_byte),
                rest.get(1).copied(),
            ) else {
                continue;
            };
            let chat = String::from_utf8_lossy(&rest[2..]).into_owned();
            snapshot
                .watermarks
                .push((kind, chat, be_u64(value).unwrap_or(0)));
        }
        Ok(snapshot)
    }

    /// One page of a chat's messages in log order, newest first: (msg id, seq) with seq below
    /// `before`.
    pub fn chat_page(
        &self,
        user: &UserId,
        chat: &str,
        before: Option<Seq>,
        limit: usize,
    ) -> Result<Vec<(MsgId, Seq)>, StoreError> {
        let rtxn = self.env.read_txn()?;
        let prefix = chat_prefix(user, chat);
        let start = prefix.clone();
        let end = chat_index_key(user, chat, before.unwrap_or(Seq(u64::MAX)));
        let upper = if before.is_some() {
            Bound::Excluded(end.as_slice())
        } else {
            Bound::Included(end.as_slice())
        };
        let mut page = Vec::with_capacity(limit.min(256));
        for entry in self
            .tables
            .chat_index
            .rev_range(&rtxn, &(Bound::Included(start.as_slice()), upper))?
        {
            let (key, value) = entry?;
            let (Some(seq), Some(msg)) = (be_u64(&key[prefix.len()..]), be_u64(value)) else {
                continue;
            };
            page.push((MsgId(msg), Seq(seq)));
            if page.len() >= limit {
                break;
            }
        }
        Ok(page)
    }

    /// One stored event.
    pub fn read_record(&self, user: &UserId, seq: Seq) -> Result<Option<Bytes>, StoreError> {
        let rtxn = self.env.read_txn()?;
        Ok(self
            .tables
            .log
            .get(&rtxn, &log_key(user, seq))?
            .map(Bytes::copy_from_slice))
    }

    /// Whether `msg` was edited or deleted in `user`'s view.
    pub fn msg_change(&self, user: &UserId, msg: MsgId) -> Result<Option<MsgChange>, StoreError> {
        let rtxn = self.env.read_txn()?;
        let value = self
            .tables
            .msg_changes
            .get(&rtxn, &msg_index_key(user, msg))?;
        Ok(value.and_then(|v| match v.first()? {
            b'd' => Some(MsgChange::Deleted),
            b'e' => Some(MsgChange::Edited(
                String::from_utf8_lossy(&v[1..]).into_owned(),
            )),
            _ => None,
        }))
    }

    /// Finds users whose oldest events are older than `cutoff_ms`, scanning the log from key
    /// `from` (inclusive; `None` = the start), looking at no more than `max_users` users and
    /// `max_events` events. Returns (user, last expired seq) pairs and the key to continue from
    /// (`None` when the scan reached the end of the log).
    pub fn expired_events(
        &self,
        from: Option<&[u8]>,
        cutoff_ms: u64,
        max_users: usize,
        max_events: usize,
    ) -> Result<ExpiredScan, StoreError> {
        let rtxn = self.env.read_txn()?;
        let mut found = Vec::new();
        let mut examined = 0;
        let mut next: Option<Vec<u8>> = from.map(<[u8]>::to_vec);
        for _ in 0..max_users {
            let lower = match &next {
                Some(key) => Bound::Included(key.as_slice()),
                None => Bound::Unbounded,
            };
            let mut iter = self
                .tables
                .log
                .range(&rtxn, &(lower, Bound::<&[u8]>::Unbounded))?;
            let Some((first_key, _)) = iter.next().transpose()? else {
                return Ok(ExpiredScan::done(found));
            };
            let Some(nul) = first_key.iter().position(|b| *b == 0) else {
                return Ok(ExpiredScan::done(found));
            };
            let prefix = first_key[..=nul].to_vec();
            // Restart at the user's first key (the range above may have begun mid-user).
            let mut events = self.tables.log.prefix_iter(&rtxn, &prefix)?;
            let mut last_expired = None;
            let mut cut_short = false;
            while let Some((_, value)) = events.next().transpose()? {
                match crate::protocol::decode_record_header(value) {
                    Some(header) if header.ts_ms < cutoff_ms => last_expired = Some(header.seq),
                    _ => break,
                }
                examined += 1;
                if examined >= max_events {
                    cut_short = true;
                    break;
                }
            }
            let user = std::str::from_utf8(&prefix[..nul])
                .ok()
                .and_then(UserId::parse);
            if let (Some(seq), Some(user)) = (last_expired, user) {
                found.push((user, seq));
            }
            if cut_short {
                // Continue at this user: part of its expired range may remain.
                return Ok(ExpiredScan {
                    expired: found,
                    resume: Some(prefix),
                });
            }
            let mut after = prefix;
            after.extend_from_slice(&[0xff; 9]);
            next = Some(after);
        }
        Ok(ExpiredScan {
            expired: found,
            resume: next,
        })
    }

    /// Reads up to `max` events of `user` with seq in `[from, to]`, in order.
    pub fn read_log(
        &self,
        user: &UserId,
        from: Seq,
        to: Seq,
        max: usize,
    ) -> Result<Vec<(Seq, Bytes)>, StoreError> {
        if from > to || max == 0 {
            return Ok(Vec::new());
        }
        let rtxn = self.env.read_txn()?;
        let start = log_key(user, from);
        let end = log_key(user, to);
        let mut events = Vec::new();
        for entry in self.tables.log.range(
            &rtxn,
            &(
                Bound::Included(start.as_slice()),
                Bound::Included(end.as_slice()),
            ),
        )? {
            let (key, value) = entry?;
            let seq = Seq(be_u64(&key[key.len() - 8..]).unwrap_or(0));
            events.push((seq, Bytes::copy_from_slice(value)));
            if events.len() >= max {
                break;
            }
        }
        Ok(events)
    }

    /// The answer stored for a device's `send` with this client id, if still in the window.
    pub fn dedupe_get(
        &self,
        user: &UserId,
        device: &DeviceId,
        client: &str,
    ) -> Result<Option<DedupeEntry>, StoreError> {
        let rtxn = self.env.read_txn()?;
        let value = self
            .tables
            .dedupe
            .get(&rtxn, &dedupe_key(user, device, client))?;
        Ok(value.and_then(|v| {
            Some(DedupeEntry {
                msg: MsgId(be_u64(v)?),
                ts_ms: be_u64(v.get(8..)?)?,
                refused: v
                    .get(16..)
                    .filter(|code| !code.is_empty())
                    .map(|code| String::from_utf8_lossy(code).into_owned()),
            })
        }))
    }

    /// The highest dedupe order number used by a device (0 when none).
    pub fn dedupe_last_order(&self, user: &UserId, device: &DeviceId) -> Result<u64, StoreError> {
        let rtxn = self.env.read_txn()?;
        let prefix = device_prefix(user, device);
        let last = self
            .tables
            .dedupe_order
            .rev_prefix_iter(&rtxn, &prefix)?
            .next()
            .transpose()?;
        Ok(last
            .and_then(|(key, _)| be_u64(&key[prefix.len()..]))
            .unwrap_or(0))
    }

    /// Whether any message position older than `before` is stored (see `PruneMsgSeq`).
    pub fn msg_seq_before(&self, before: MsgId) -> Result<bool, StoreError> {
        let rtxn = self.env.read_txn()?;
        Ok(self
            .tables
            .msg_seq
            .first(&rtxn)?
            .is_some_and(|(key, _)| key < before.0.to_be_bytes().as_slice()))
    }

    /// Where message `msg` sits in `user`'s log, if it was delivered there.
    pub fn msg_index_get(&self, user: &UserId, msg: MsgId) -> Result<Option<Seq>, StoreError> {
        let rtxn = self.env.read_txn()?;
        let value = self.tables.msg_seq.get(&rtxn, &msg_seq_key(user, msg))?;
        Ok(value.and_then(be_u64).map(Seq))
    }

    /// Every cross-shard delivery not yet confirmed (re-driven at start-up).
    pub fn pending_all(&self) -> Result<Vec<(MsgId, Vec<u8>)>, StoreError> {
        let rtxn = self.env.read_txn()?;
        let mut all = Vec::new();
        for entry in self.tables.pending.iter(&rtxn)? {
            let (key, value) = entry?;
            if let Some(msg) = be_u64(key) {
                all.push((MsgId(msg), value.to_vec()));
            }
        }
        Ok(all)
    }

    /// A group's membership record.
    pub fn group_get(&self, group: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let rtxn = self.env.read_txn()?;
        Ok(self
            .tables
            .groups
            .get(&rtxn, group.as_bytes())?
            .map(<[u8]>::to_vec))
    }

    /// A named value.
    pub fn meta_get(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let rtxn = self.env.read_txn()?;
        Ok(self
            .tables
            .meta
            .get(&rtxn, name.as_bytes())?
            .map(<[u8]>::to_vec))
    }
}

/// Data dirs written before `msg_seq` existed keep their message positions in `msg_index`
/// (user first): moves them over once, in the opening transaction, and drops the old table.
fn migrate_msg_index(
    env: &Env<WithoutTls>,
    wtxn: &mut heed::RwTxn,
    msg_seq: Table,
) -> Result<(), StoreError> {
    let Some(old) = env.open_database::<RawBytes, RawBytes>(wtxn, Some("msg_index"))? else {
        return Ok(());
    };
    let mut moved = Vec::new();
    for entry in old.iter(wtxn)? {
        let (key, seq) = entry?;
        // Old key: user \0 msg id(u64 BE); ids never contain NUL.
        let Some(nul) = key.iter().position(|&b| b == 0) else {
            continue;
        };
        let (user, msg) = (&key[..nul], &key[nul + 1..]);
        if msg.len() != 8 {
            continue;
        }
        let mut new_key = Vec::with_capacity(key.len() - 1);
        new_key.extend_from_slice(msg);
        new_key.extend_from_slice(user);
        moved.push((new_key, seq.to_vec()));
    }
    for (key, seq) in &moved {
        msg_seq.put(wtxn, key, seq)?;
    }
    // SAFETY: no reference into the old table outlives this call (heed's requirement).
    unsafe { old.remove(wtxn)? };
    if !moved.is_empty() {
        tracing::info!(entries = moved.len(), "moved message positions to msg_seq");
    }
    Ok(())
}

/// The CPUs this thread may run on (`None` if the kernel would not say).
fn allowed_cpus() -> Option<libc::cpu_set_t> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set; the kernel fills it in.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a writable cpu_set_t of the size passed; pid 0 is this thread.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    (rc == 0).then_some(set)
}

/// Lets the calling thread run on every CPU in `cpus` (the process's, see `Store::cpus`)
/// instead of the core of the shard that started it. On failure it stays there, which only
/// costs speed.
fn unpin(cpus: Option<&libc::cpu_set_t>, thread: &str) {
    let Some(cpus) = cpus else {
        return;
    };
    // SAFETY: `cpus` is a valid cpu_set_t of the size passed; pid 0 is this thread.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), cpus) };
    if rc != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            thread,
            "the thread stays on its shard's core"
        );
    }
}

/// `Durability::ProcessCrashSafe`'s fsync thread: syncs the environment at most
/// `PERIODIC_SYNC` after the writer marked it dirty. fdatasync runs beside LMDB's page writes
/// (it only flushes the file), so commits go on while a sync is in progress.
struct Syncer {
    dirty: Arc<AtomicBool>,
    stop: Option<Sender<()>>,
    join: Option<thread::JoinHandle<()>>,
}

impl Syncer {
    fn start(store: &Store) -> Syncer {
        let dirty = Arc::new(AtomicBool::new(false));
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let env = store.env.clone();
        let flag = dirty.clone();
        let cpus = store.cpus;
        let join = thread::Builder::new()
            .name("courier-syncer".into())
            .spawn(move || {
                unpin(cpus.as_ref(), "fsync thread");
                // A disconnected stop channel (the writer is done) ends the loop.
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                    stop_rx.recv_timeout(PERIODIC_SYNC)
                {
                    if flag.swap(false, Ordering::AcqRel)
                        && let Err(e) = env.force_sync()
                    {
                        tracing::error!(error = %e, "periodic fsync failed");
                    }
                }
            })
            .ok();
        if join.is_none() {
            tracing::error!("cannot start the periodic fsync thread: commits sync only at exit");
        }
        Syncer {
            dirty,
            stop: Some(stop_tx),
            join,
        }
    }

    fn stop(mut self) {
        self.stop.take();
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
    }
}

/// The shard's end of its writer thread.
pub struct WriterHandle {
    sender: Option<Sender<WriteBatch>>,
    join: Option<thread::JoinHandle<()>>,
}

impl WriterHandle {
    /// Hands a batch to the writer. At the bound (`pending_commits_max` batches queued) the
    /// batch comes back: the caller refuses new work with `busy` and retries the batch later.
    pub fn try_submit(&self, batch: WriteBatch) -> Result<(), WriteBatch> {
        let sender = self.sender.as_ref().expect("writer used after shutdown");
        match sender.try_send(batch) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(batch)) | Err(TrySendError::Disconnected(batch)) => Err(batch),
        }
    }

    /// Batches queued and not yet taken by the writer.
    pub fn queued(&self) -> usize {
        self.sender.as_ref().map_or(0, Sender::len)
    }

    /// Closes the queue and waits (blocking) until the writer has committed everything queued.
    pub fn finish(&mut self) {
        self.sender.take();
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    #[test]
    fn keys_of_one_user_never_mix_with_a_longer_id() {
        // "bob\0..." sorts before "bobby\0..." so prefix scans stay within one user.
        assert!(log_key(&user("bob"), Seq(u64::MAX)) < log_key(&user("bobby"), Seq(0)));
    }

    #[test]
    fn message_positions_of_an_old_data_dir_move_to_msg_seq_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            // A data dir as written before `msg_seq`: positions keyed user \0 msg id.
            let mut options = EnvOpenOptions::new().read_txn_without_tls();
            options.map_size(1 << 24).max_dbs(16);
            // SAFETY: the directory is opened once, here, and closed before the store opens it.
            let env = unsafe { options.open(dir.path()).unwrap() };
            let mut wtxn = env.write_txn().unwrap();
            let old: Table = env.create_database(&mut wtxn, Some("msg_index")).unwrap();
            let mut key = b"alice\0".to_vec();
            key.extend_from_slice(&42u64.to_be_bytes());
            old.put(&mut wtxn, &key, &7u64.to_be_bytes()).unwrap();
            wtxn.commit().unwrap();
            env.prepare_for_closing().wait();
        }
        let store = Store::open(dir.path(), 1 << 24, Durability::Fsync).unwrap();
        assert_eq!(
            store.msg_index_get(&user("alice"), MsgId(42)).unwrap(),
            Some(Seq(7))
        );
        assert_eq!(store.msg_index_get(&user("bob"), MsgId(42)).unwrap(), None);
        let rtxn = store.env.read_txn().unwrap();
        let old = store
            .env
            .open_database::<RawBytes, RawBytes>(&rtxn, Some("msg_index"))
            .unwrap();
        assert!(old.is_none(), "the old table is dropped after the move");
    }

    #[test]
    fn message_positions_before_an_id_are_pruned_a_bounded_slice_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 24, Durability::Fsync).unwrap();
        let (alice, bob) = (user("alice"), user("bob"));
        let index = (1..=5u64)
            .flat_map(|i| {
                [&alice, &bob].map(|u| WriteOp::IndexMsg {
                    user: u.clone(),
                    msg: MsgId(i),
                    seq: Seq(i),
                })
            })
            .collect();
        let batch = |ops| WriteBatch {
            id: 1,
            epoch: 0,
            ops,
        };
        store.commit(&[&batch(index)]).unwrap();
        let prune = || {
            batch(vec![WriteOp::PruneMsgSeq {
                before: MsgId(4),
                max: 3,
            }])
        };
        store.commit(&[&prune()]).unwrap();
        // Oldest first: ids 1 (both users) and 2 (alice) went; the bound kept the rest.
        assert_eq!(store.msg_index_get(&bob, MsgId(1)).unwrap(), None);
        assert_eq!(store.msg_index_get(&alice, MsgId(2)).unwrap(), None);
        assert_eq!(store.msg_index_get(&bob, MsgId(2)).unwrap(), Some(Seq(2)));
        assert!(store.msg_seq_before(MsgId(4)).unwrap());
        store.commit(&[&prune()]).unwrap();
        assert!(!store.msg_seq_before(MsgId(4)).unwrap());
        assert_eq!(store.msg_index_get(&alice, MsgId(4)).unwrap(), Some(Seq(4)));
    }

    #[test]
    fn pruning_a_log_removes_the_chat_index_entries_of_its_messages() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 24, Durability::Fsync).unwrap();
        let alice = user("alice");
        let mut ops = Vec::new();
        for i in 1..=4u64 {
            let chat = if i % 2 == 0 { "bob" } else { "carol" };
            let record = crate::protocol::encode_event(
                Seq(i),
                1_000 + i,
                &crate::protocol::EventBody::Msg {
                    chat,
                    msg: MsgId(100 + i),
                    from: "alice",
                    dev: "phone",
                    body: "hi",
                },
            );
            ops.push(WriteOp::Append {
                user: alice.clone(),
                seq: Seq(i),
                record,
            });
            ops.push(WriteOp::IndexChat {
                user: alice.clone(),
                chat: chat.to_owned(),
                msg: MsgId(100 + i),
                seq: Seq(i),
            });
        }
        let batch = |ops| WriteBatch {
            id: 1,
            epoch: 0,
            ops,
        };
        store.commit(&[&batch(ops)]).unwrap();
        assert_eq!(store.chat_page(&alice, "bob", None, 10).unwrap().len(), 2);
        store
            .commit(&[&batch(vec![WriteOp::PruneLog {
                user: alice.clone(),
                through: Seq(2),
            }])])
            .unwrap();
        assert_eq!(
            store.chat_page(&alice, "bob", None, 10).unwrap(),
            [(MsgId(104), Seq(4))]
        );
        assert_eq!(
            store.chat_page(&alice, "carol", None, 10).unwrap(),
            [(MsgId(103), Seq(3))]
        );
    }

    #[test]
    fn group_commit_appends_and_reads_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 24, Durability::Fsync).unwrap();
        let (tx, mut rx) = futures_channel::mpsc::unbounded();
        let mut writer = store
            .start_writer(ShardId(0), 16, 1000, Durability::Fsync, tx)
            .unwrap();
        let alice = user("alice");
        for i in 1..=3u64 {
            let batch = WriteBatch {
                id: i,
                epoch: 0,
                ops: vec![WriteOp::Append {
                    user: alice.clone(),
                    seq: Seq(i),
                    record: Bytes::from(format!("e{i}")),
                }],
            };
            writer.try_submit(batch).unwrap();
        }
        // A clash with an existing seq fails the batch and poisons its epoch.
        writer
            .try_submit(WriteBatch {
                id: 4,
                epoch: 0,
                ops: vec![WriteOp::Append {
                    user: alice.clone(),
                    seq: Seq(2),
                    record: Bytes::from_static(b"clash"),
                }],
            })
            .unwrap();
        let mut results: Vec<Completion> = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while results.len() < 4 && std::time::Instant::now() < deadline {
            match rx.try_recv() {
                Ok(completion) => results.push(completion),
                _ => thread::sleep(Duration::from_millis(5)),
            }
        }
        assert_eq!(
            results.iter().map(|c| c.batch).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert!(results[3].result.is_err());
        writer.finish();
        let events = store.read_log(&alice, Seq(1), Seq(10), 100).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[1], (Seq(2), Bytes::from_static(b"e2")));
        let snapshot = store.load_user(&alice).unwrap();
        assert_eq!((snapshot.head, snapshot.low), (Seq(3), Seq(1)));
        let nobody = store.load_user(&user("nobody")).unwrap();
        assert_eq!((nobody.head, nobody.low), (Seq(0), Seq(1)));
    }
}
