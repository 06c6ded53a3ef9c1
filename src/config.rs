//! The server's configuration: where it listens, where it stores, and every bound.
//!
//! Owns: one `Config` struct holding every limit, with units in the names, and its defaults.
//! Each bound's comment says what happens when it is reached. Must not parse command lines
//! (that is `cli`) or read files (that is `settings`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How durable an acknowledged (`sent`) message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Every commit is fsynced before `sent`: nothing acknowledged is lost, even on power loss.
    Fsync,
    /// Commits reach the OS page cache but are not fsynced: nothing acknowledged is lost when the
    /// process is killed, but a power failure or kernel crash loses the last seconds.
    /// LMDB's NO_SYNC mode: the writer fsyncs once a second.
    ProcessCrashSafe,
}

/// How log lines are written (to stderr).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Client WebSocket listener (every shard accepts on it with SO_REUSEPORT).
    pub listen: SocketAddr,
    /// Root of the per-shard LMDB environments (`shard-N/`).
    pub data_dir: PathBuf,
    /// Number of shards (pinned executor threads). `None`: what the data dir was created with,
    /// or one per online core for a new data dir. Settled by `Server::start`.
    pub shards: Option<usize>,
    /// Accept `?user=&device=` without a token. Refused unless `listen` is loopback.
    pub dev: bool,
    /// Admin listener (metrics, health, admin API, dashboard); `None` turns it off.
    pub admin_listen: Option<SocketAddr>,
    /// Whether `admin_listen` was asked for explicitly (then failing to bind it is fatal).
    pub admin_listen_explicit: bool,
    /// Bearer token for the admin API. Without one the API is closed, except on a `dev` server
    /// whose admin listener is on loopback.
    pub admin_token: Option<String>,
    /// HS256 secret for JWTs; `None` means only dev credentials work.
    pub auth_secret: Option<Vec<u8>>,
    pub durability: Durability,
    pub log_format: LogFormat,
    /// Where to POST a notification when a message is committed for a user with no online
    /// device (for mobile push); `None` turns the hook off.
    pub webhook_url: Option<String>,
    /// Notifications waiting to be posted. At the bound: new notifications are dropped (and
    /// counted); delivery itself never waits for the webhook.
    pub webhook_queue_max: usize,
    /// Attempts per notification (exponential backoff from 100 ms); then it is dropped.
    pub webhook_retries_max: u32,

    /// Largest WebSocket message or frame. At the bound: the connection is closed with 1009.
    pub max_frame_bytes: usize,
    /// Largest message `body`. At the bound: `error` `too_large`, nothing stored.
    pub max_body_bytes: usize,
    /// Devices one user may link. At the bound: a new device gets `device_limit` and close 4003.
    pub max_devices_per_user: usize,
    /// Members per group. At the bound: `create` or `add` beyond it gets `group_full`.
    pub max_group_members: usize,
    /// Bytes queued for one connection's socket. At the bound: the connection is closed with
    /// 4009 (everything it missed is in the log; it resumes from its cursor on reconnect).
    pub outbound_queue_max_bytes: usize,
    /// Open connections per shard. At the bound: a new connection is upgraded and closed at once
    /// with 1013 (try again later); the descriptor limit (RLIMIT_NOFILE) usually comes first.
    pub connections_per_shard_max: usize,
    /// Retried-`send` ids remembered per device. Beyond the window, the oldest id is forgotten
    /// and a retry of it would be stored again.
    pub dedupe_window_per_device: u64,
    /// Time allowed for the TCP connection to complete the WebSocket upgrade. At the bound: the
    /// socket is dropped.
    pub handshake_timeout: Duration,
    /// Time allowed for one flush of frames to a client (at most 8 KiB plus one frame) once
    /// its socket is full. At the bound: the connection is dropped without a close frame (it
    /// resumes from its cursor when it reconnects). Bounds readers that stalled or that take a
    /// byte now and then.
    pub write_timeout: Duration,
    /// A connection that sent nothing for this long gets a ping.
    pub ping_interval: Duration,
    /// A connection that sent nothing (not even a pong) for this long is closed with 4008.
    pub idle_timeout: Duration,
    /// Messages buffered per destination shard before cross-shard sends are refused. At the
    /// bound: new client `send`s get `busy` with `retry_ms`; replies and deliveries already
    /// accepted are still queued (they are bounded by the in-flight work that caused them).
    pub cross_shard_queue_max: usize,
    /// Capacity of each glommio shared channel between two shards (ring slots).
    pub cross_shard_ring_slots: usize,
    /// Commit batches handed to a shard's storage writer and not yet committed. At the bound:
    /// new client `send`s get `busy`.
    pub pending_commits_max: usize,
    /// Most appends the writer folds into one LMDB transaction (one fsync).
    pub commit_batch_max_ops: usize,
    /// Events read from the log per page when a device catches up (bounds memory per catch-up).
    pub catchup_page_events: usize,
    /// Events older than this are pruned in the background; `low` in `hello` rises.
    pub retention: Duration,
    /// How often each shard looks for expired events.
    pub prune_interval: Duration,
    /// Most events one prune pass deletes (bounds the write it adds to the shard's commits).
    pub prune_batch_events: usize,
    /// How long after sending the sender may edit a message. Beyond: `forbidden`.
    pub edit_window: Duration,
    /// How long after sending the sender may delete a message for everyone. Beyond: `forbidden`.
    pub delete_window: Duration,
    /// Typing indicators one connection may send per second (burst: twice that). Beyond:
    /// `rate_limited` with the time until the next token.
    pub typing_per_second: u32,
    /// Frames (other than acks) one connection may send per second (burst: twice that).
    /// Beyond: `rate_limited` with the time until the next token; the frame is not acted on.
    /// The default is a flood guard (one connection can take ~2% of a core), far above what a
    /// person sends; deployments that want fairness per user set it lower.
    pub client_frames_per_second: u32,
    /// Most log events one ack examines for delivered receipts; events beyond are examined by
    /// the device's next ack.
    pub receipt_scan_max_events: usize,
    /// Users whose state a shard keeps in memory. Above it, users with no online device are
    /// evicted (their state is on disk and reloads on next touch) when the shard has no commit
    /// in flight; users with online devices stay (they are bounded by connections).
    pub owned_users_max: usize,
    /// Groups whose membership a shard keeps in memory; above it, they are evicted likewise.
    pub owned_groups_max: usize,
    /// Accept the `dev_clock` frame that moves the server clock (tests only; needs `dev`).
    pub dev_clock: bool,
    /// LMDB map size per shard: address space reserved, not memory used. At the bound: writes
    /// fail and `send` gets `busy` (map full) while reads and live delivery continue.
    pub lmdb_map_bytes: usize,
}

impl Config {
    /// The settled shard count.
    pub fn shard_count(&self) -> usize {
        self.shards
            .expect("the shard count is settled by Server::start before shards run")
    }

    /// Defaults for everything but where to listen and store.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Config {
            listen,
            data_dir,
            shards: None,
            dev: false,
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 7071))),
            admin_listen_explicit: false,
            admin_token: None,
            auth_secret: None,
            durability: Durability::Fsync,
            log_format: LogFormat::Human,
            webhook_url: None,
            webhook_queue_max: 10_000,
            webhook_retries_max: 5,
            max_frame_bytes: 64 * 1024,
            max_body_bytes: 16 * 1024,
            max_devices_per_user: 5,
            max_group_members: 1024,
            outbound_queue_max_bytes: 1024 * 1024,
            connections_per_shard_max: 100_000,
            dedupe_window_per_device: 10_000,
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            cross_shard_queue_max: 65_536,
            cross_shard_ring_slots: 4096,
            pending_commits_max: 1024,
            commit_batch_max_ops: 8192,
            catchup_page_events: 256,
            retention: Duration::from_secs(30 * 24 * 3600),
            prune_interval: Duration::from_secs(60),
            prune_batch_events: 10_000,
            edit_window: Duration::from_secs(15 * 60),
            delete_window: Duration::from_secs(48 * 3600),
            typing_per_second: 5,
            client_frames_per_second: 5000,
            receipt_scan_max_events: 10_000,
            owned_users_max: 1_000_000,
            owned_groups_max: 100_000,
            dev_clock: false,
            lmdb_map_bytes: 64 << 30,
        }
    }
}
