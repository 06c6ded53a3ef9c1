//! Server start-up and shutdown: checks, sockets, shard threads.
//!
//! Owns: refusing to start on an unusable machine (io_uring, RLIMIT_MEMLOCK, data dir, dev mode
//! on a non-loopback address, a shard count that does not match the data dir), binding one
//! SO_REUSEPORT listener per shard on one port (port 0 included), starting one pinned glommio
//! executor per shard with its mesh channels and storage writer, and the ordered shutdown.
//!
//! Must not: contain protocol or owner logic; parse command lines (`cli` does).

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use futures_util::future::{Either, select};
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::net::TcpListener;
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};
use socket2::{Domain, Protocol, Socket, Type};

use crate::admin::{AdminCall, AdminContext, AdminServer};
use crate::auth::Authenticator;
use crate::config::Config;
use crate::connection;
use crate::hooks::{CredentialVerifier, Hooks, Webhook};
use crate::ids::{MsgId, ShardId};
use crate::metrics::ShardMetrics;
use crate::msgid::MAX_SHARDS;
use crate::router::{Router, ShardMsg};
use crate::shard::{Extensions, META_MAX_MSG_ID, Shard};
use crate::storage::Store;

/// glommio refuses to start below this soft RLIMIT_MEMLOCK (its io_uring buffers are locked).
const MEMLOCK_MIN_BYTES: u64 = 512 * 1024;
/// Registered I/O memory per shard. Sockets do not use it; it only serves file I/O.
const IO_MEMORY_BYTES: usize = 64 * 1024;
/// Submission queue depth of each shard's io_uring rings. The kernel sizes the ring's cancel
/// hash table from it (8 buckets at glommio's default of 128, 256 from 4096 up), and glommio
/// cancels a timeout on every turn of its event loop: each cancel walks one bucket of the
/// table that also holds every idle connection's armed poll. With 8 buckets that walk was
/// ~4 % of the shard's CPU at 3,000 connections and grows with the connection count.
const RING_DEPTH: usize = 4096;
/// Listen backlog per shard (the kernel caps it at net.core.somaxconn).
const LISTEN_BACKLOG: i32 = 4096;
/// How long shutdown waits for connections to finish their close handshake.
const SHUTDOWN_CLOSE_WAIT: Duration = Duration::from_secs(5);
/// How long shutdown waits for staged commits to reach the disk.
const SHUTDOWN_COMMIT_WAIT: Duration = Duration::from_secs(10);
/// Longest a shard sleeps without looking at wake-ups from other threads.
const HEARTBEAT: Duration = Duration::from_millis(10);
/// File in the data dir recording the layout the data was written with.
const LAYOUT_FILE: &str = "courier-layout.json";

/// Why the server refused to start.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

fn refuse(msg: impl Into<String>) -> StartError {
    StartError(msg.into())
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    admin: Option<AdminServer>,
    stops: Vec<oneshot::Sender<()>>,
    shards: Vec<ExecutorJoinHandle<()>>,
}

/// Builds a server with an embedder's credential verifier and hooks (the gateway-tier API).
///
/// ```no_run
/// use courier::config::Config;
/// use courier::server::ServerBuilder;
/// let config = Config::new("127.0.0.1:0".parse().unwrap(), "./data".into());
/// let server = ServerBuilder::new(config).start().expect("start");
/// println!("listening on {}", server.local_addr());
/// server.shutdown();
/// ```
pub struct ServerBuilder {
    config: Config,
    verifier: Option<Arc<dyn CredentialVerifier>>,
    hooks: Vec<Arc<dyn Hooks>>,
}

impl ServerBuilder {
    pub fn new(config: Config) -> Self {
        ServerBuilder {
            config,
            verifier: None,
            hooks: Vec::new(),
        }
    }

    /// Replaces the built-in JWT/dev credential check.
    pub fn verifier(mut self, verifier: Arc<dyn CredentialVerifier>) -> Self {
        self.verifier = Some(verifier);
        self
    }

    /// Adds a hook (called on shard threads; must not block).
    pub fn hook(mut self, hook: Arc<dyn Hooks>) -> Self {
        self.hooks.push(hook);
        self
    }

    /// Checks the machine, binds, starts every shard, and returns once all of them accept.
    pub fn start(self) -> Result<Server, StartError> {
        let ServerBuilder {
            config,
            verifier,
            mut hooks,
        } = self;
        if verifier.is_none() {
            check_auth(&config)?;
        }
        if let Some(url) = &config.webhook_url {
            let webhook = Webhook::start(
                url.clone(),
                config.webhook_queue_max,
                config.webhook_retries_max,
            )
            .map_err(|e| refuse(format!("cannot start the webhook thread: {e}")))?;
            hooks.push(Arc::new(webhook));
        }
        let verifier = verifier.unwrap_or_else(|| {
            Arc::new(Authenticator::new(
                config.auth_secret.as_deref(),
                config.dev,
            ))
        });
        Server::start_with(
            config,
            Extensions {
                verifier,
                hooks: hooks.into(),
            },
        )
    }
}

impl Server {
    /// Starts a server with the built-in credential check (JWT, or dev credentials).
    pub fn start(config: Config) -> Result<Server, StartError> {
        ServerBuilder::new(config).start()
    }

    fn start_with(mut config: Config, extensions: Extensions) -> Result<Server, StartError> {
        check_dev_mode(&config)?;
        check_io_uring()?;
        check_memlock()?;
        check_data_dir(&config.data_dir)?;
        config.shards = Some(settle_shard_count(&config.data_dir, config.shards)?);
        log_nofile();

        let config = Arc::new(config);
        let shards = config.shard_count();
        let stores: Arc<[Store]> = (0..shards)
            .map(|i| {
                Store::open(
                    &config.data_dir.join(format!("shard-{i}")),
                    config.lmdb_map_bytes,
                    config.durability,
                )
                .map_err(|e| refuse(format!("cannot open the store of shard {i}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?
            .into();
        let (addr, fds) = bind_listeners(config.listen, shards)?;

        let mesh = MeshBuilder::<ShardMsg, _>::full(shards, config.cross_shard_ring_slots);
        let metrics: Vec<Arc<ShardMetrics>> = (0..shards).map(ShardMetrics::new).collect();
        let (admin_senders, mut admin_receivers): (Vec<_>, Vec<_>) = (0..shards)
            .map(|_| futures_channel::mpsc::unbounded::<AdminCall>())
            .unzip();
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let mut stops = Vec::with_capacity(shards);
        let mut handles = Vec::with_capacity(shards);
        for (index, fd) in fds.into_iter().enumerate() {
            let (stop_tx, stop_rx) = oneshot::channel();
            stops.push(stop_tx);
            let config = config.clone();
            let stores = stores.clone();
            let mesh = mesh.clone();
            let ready = ready_tx.clone();
            let extensions = extensions.clone();
            let shard_io = ShardIo {
                metrics: metrics[index].clone(),
                admin: admin_receivers.remove(0),
                listener: fd,
                ready,
                stop: stop_rx,
            };
            let handle = LocalExecutorBuilder::new(Placement::Fixed(index % cpus))
                .name(&format!("courier-shard-{index}"))
                .io_memory(IO_MEMORY_BYTES)
                .ring_depth(RING_DEPTH)
                .spawn(move || async move {
                    run_shard(ShardId(index), config, stores, mesh, shard_io, extensions).await
                })
                .map_err(|e| refuse(format!("cannot start shard {index}: {e}")))?;
            handles.push(handle);
        }
        drop(ready_tx);
        for _ in 0..shards {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(refuse(e)),
                Err(_) => return Err(refuse("a shard stopped during start-up")),
            }
        }
        tracing::info!(%addr, shards, "accepting connections");
        let admin = start_admin(&config, metrics, admin_senders)?;
        Ok(Server {
            addr,
            admin,
            stops,
            shards: handles,
        })
    }

    /// The client listener's address (the real port when started on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes every connection with 1001, commits what is staged, stops the
    /// writers, and waits for every shard to finish.
    /// The admin listener's address, if it runs.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminServer::local_addr)
    }

    pub fn shutdown(self) {
        if let Some(admin) = self.admin {
            admin.stop();
        }
        for stop in self.stops {
            let _ = stop.send(());
        }
        for handle in self.shards {
            if let Err(e) = handle.join() {
                tracing::error!(error = %e, "shard ended with an error");
            }
        }
    }
}

/// What a shard thread gets from the starting thread besides config and stores.
struct ShardIo {
    metrics: Arc<ShardMetrics>,
    admin: futures_channel::mpsc::UnboundedReceiver<AdminCall>,
    /// A bound, listening socket owned by this shard.
    listener: RawFd,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
    stop: oneshot::Receiver<()>,
}

async fn run_shard(
    id: ShardId,
    config: Arc<Config>,
    stores: Arc<[Store]>,
    mesh: MeshBuilder<ShardMsg, glommio::channels::channel_mesh::Full>,
    io: ShardIo,
    extensions: Extensions,
) {
    let ShardIo {
        metrics,
        admin,
        listener,
        ready,
        stop,
    } = io;
    // SAFETY: `listener` is a bound, listening TCP socket whose ownership was handed to us.
    let listener = unsafe { TcpListener::from_raw_fd(listener) };
    // A wake-up from another thread that lands while this executor goes to sleep can wait
    // until the next event (seen as a start-up that never finished joining the mesh under
    // load). A short heartbeat bounds that wait; it costs ~100 wake-ups a second.
    glommio::spawn_local(async {
        loop {
            glommio::timer::sleep(HEARTBEAT).await;
        }
    })
    .detach();
    let shard = match start_shard(id, config, stores, mesh, metrics, extensions).await {
        Ok(shard) => shard,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    glommio::spawn_local(shard.clone().run_admin(admin)).detach();
    ShardMetrics::set(&shard.metrics.ready, 1);
    let _ = ready.send(Ok(()));

    let accept_loop = {
        let shard = shard.clone();
        async move {
            loop {
                match listener.accept().await {
                    Ok(stream) => {
                        glommio::spawn_local(connection::serve(shard.clone(), stream)).detach();
                    }
                    Err(e) => {
                        // Typically EMFILE at the descriptor limit: back off instead of spinning.
                        tracing::warn!(shard = id.0, error = %e, "accept failed");
                        glommio::timer::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }
    };
    // Cancel-safe: dropping the accept loop drops the listener; accepted connections run in
    // their own tasks.
    match select(Box::pin(accept_loop), stop).await {
        Either::Left(((), _)) | Either::Right(_) => {}
    }

    shard.accepting.set(false);
    ShardMetrics::set(&shard.metrics.ready, 0);
    shard.close_all_connections();
    let deadline = Instant::now() + SHUTDOWN_CLOSE_WAIT;
    while shard.connection_count() > 0 && Instant::now() < deadline {
        let _ =
            connection::with_timeout(Duration::from_millis(50), shard.conns_changed.wait()).await;
    }
    shard
        .drain_commits(Instant::now() + SHUTDOWN_COMMIT_WAIT)
        .await;
    shard.router.close();
    shard.finish_writer();
    tracing::info!(shard = id.0, "shard stopped");
}

async fn start_shard(
    id: ShardId,
    config: Arc<Config>,
    stores: Arc<[Store]>,
    mesh: MeshBuilder<ShardMsg, glommio::channels::channel_mesh::Full>,
    metrics: Arc<ShardMetrics>,
    extensions: Extensions,
) -> Result<Rc<Shard>, String> {
    let (senders, mut receivers) = mesh
        .join()
        .await
        .map_err(|_| format!("shard {} could not join the mesh", id.0))?;
    // The mesh orders peers by executor id, which follows spawn order: peer i is shard i.
    assert_eq!(
        senders.peer_id(),
        id.0,
        "mesh peer order differs from shard order"
    );
    let store = &stores[id.0];
    let floor = store
        .meta_get(META_MAX_MSG_ID)
        .map_err(|e| format!("shard {}: {e}", id.0))?
        .and_then(|v| Some(MsgId(u64::from_be_bytes(v.get(..8)?.try_into().ok()?))));
    let (completions_tx, completions_rx) = futures_channel::mpsc::unbounded();
    let writer = store
        .start_writer(
            id,
            config.pending_commits_max,
            config.commit_batch_max_ops,
            config.durability,
            completions_tx,
        )
        .map_err(|e| format!("shard {}: cannot start the writer: {e}", id.0))?;
    let router = Router::new(id, config.shard_count(), config.cross_shard_queue_max);
    let shard = Shard::new(
        id,
        config.clone(),
        stores.clone(),
        router.clone(),
        writer,
        floor,
        metrics,
        extensions,
    );

    glommio::spawn_local(shard.clone().run_flusher()).detach();
    glommio::spawn_local(shard.clone().run_completions(completions_rx)).detach();
    glommio::spawn_local(shard.clone().sweep_idle_connections()).detach();
    glommio::spawn_local(shard.clone().run_lazy_flush()).detach();
    glommio::spawn_local(shard.clone().run_retention()).detach();
    let senders = Rc::new(senders);
    for peer in (0..config.shard_count()).filter(|p| *p != id.0) {
        glommio::spawn_local(router.clone().pump_remote(ShardId(peer), senders.clone())).detach();
    }
    let local = shard.clone();
    glommio::spawn_local(router.clone().pump_local(move |msg| local.dispatch(msg))).detach();
    for (_, receiver) in receivers.streams() {
        let local = shard.clone();
        glommio::spawn_local(Router::receive_from(receiver, move |msg| {
            local.dispatch(msg)
        }))
        .detach();
    }
    let recovered = shard
        .recover_pending()
        .map_err(|e| format!("shard {}: cannot read pending deliveries: {e}", id.0))?;
    if recovered > 0 {
        tracing::info!(shard = id.0, recovered, "re-driving unconfirmed deliveries");
    }
    Ok(shard)
}

/// Starts the admin listener. A default address that is taken only costs the admin listener
/// (logged), so several servers can run side by side; an address asked for explicitly must bind.
fn start_admin(
    config: &Config,
    metrics: Vec<Arc<ShardMetrics>>,
    shards: Vec<futures_channel::mpsc::UnboundedSender<AdminCall>>,
) -> Result<Option<AdminServer>, StartError> {
    let Some(addr) = config.admin_listen else {
        return Ok(None);
    };
    let context = AdminContext {
        metrics,
        shards,
        token: config.admin_token.clone(),
        open_without_token: config.dev && addr.ip().is_loopback(),
        started: Instant::now(),
        assets: crate::web::ADMIN_ASSETS,
    };
    match AdminServer::start(addr, context) {
        Ok(admin) => {
            tracing::info!(addr = %admin.local_addr(), "admin listener up");
            Ok(Some(admin))
        }
        Err(e) if !config.admin_listen_explicit => {
            tracing::warn!(error = %e, "no admin listener (the default address is taken)");
            Ok(None)
        }
        Err(e) => Err(refuse(e)),
    }
}

fn check_dev_mode(config: &Config) -> Result<(), StartError> {
    if config.dev && !config.listen.ip().is_loopback() {
        return Err(refuse(format!(
            "--dev accepts unauthenticated users and is only allowed on a loopback address, not {}",
            config.listen
        )));
    }
    Ok(())
}

/// The built-in credential check needs a secret unless dev credentials are on.
fn check_auth(config: &Config) -> Result<(), StartError> {
    if !config.dev && config.auth_secret.is_none() {
        return Err(refuse(
            "no auth secret: pass --auth-secret-file FILE or set COURIER_AUTH_SECRET (or use --dev on loopback)",
        ));
    }
    Ok(())
}

fn check_io_uring() -> Result<(), StartError> {
    io_uring::IoUring::new(8).map(drop).map_err(|e| {
        refuse(format!(
            "io_uring is not usable here ({e}); Courier needs Linux 5.8+ with io_uring enabled \
             (check /proc/sys/kernel/io_uring_disabled and seccomp profiles)"
        ))
    })
}

/// The soft limit of a resource (`None` when it cannot be read).
fn soft_limit(resource: libc::__rlimit_resource_t) -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    (unsafe { libc::getrlimit(resource, &mut limit) } == 0).then_some(limit.rlim_cur)
}

fn check_memlock() -> Result<(), StartError> {
    match soft_limit(libc::RLIMIT_MEMLOCK) {
        Some(soft) if soft != libc::RLIM_INFINITY && soft < MEMLOCK_MIN_BYTES => {
            Err(refuse(format!(
                "RLIMIT_MEMLOCK is {} KiB; io_uring needs at least {} KiB locked memory \
                 (raise it: `ulimit -l 1024`, or LimitMEMLOCK= in the systemd unit)",
                soft / 1024,
                MEMLOCK_MIN_BYTES / 1024
            )))
        }
        _ => Ok(()),
    }
}

fn check_data_dir(dir: &Path) -> Result<(), StartError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| refuse(format!("cannot create data dir {}: {e}", dir.display())))?;
    let probe = dir.join(".write-probe");
    std::fs::write(&probe, b"probe")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| refuse(format!("data dir {} is not writable: {e}", dir.display())))
}

/// The data dir remembers its shard count: users are placed by `hash % shards`, so another
/// count would separate users from their logs. `None` means: the recorded count, or one per
/// core for a new data dir.
fn settle_shard_count(dir: &Path, asked: Option<usize>) -> Result<usize, StartError> {
    let path = dir.join(LAYOUT_FILE);
    let recorded = match std::fs::read(&path) {
        Ok(bytes) => {
            let layout: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| refuse(format!("{} is unreadable: {e}", path.display())))?;
            Some(
                layout["shards"]
                    .as_u64()
                    .ok_or_else(|| refuse(format!("{} has no shard count", path.display())))?
                    as usize,
            )
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(refuse(format!("cannot read {}: {e}", path.display()))),
    };
    let shards = match (recorded, asked) {
        (Some(recorded), Some(asked)) if recorded != asked => {
            return Err(refuse(format!(
                "the data dir was written with --shards {recorded}; starting it with --shards {asked} \
                 would separate users from their logs"
            )));
        }
        (Some(recorded), _) => recorded,
        (None, Some(asked)) => asked,
        (None, None) => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    };
    if shards == 0 || shards > MAX_SHARDS {
        return Err(refuse(format!(
            "--shards must be 1..={MAX_SHARDS}, not {shards}"
        )));
    }
    if recorded.is_none() {
        let layout = serde_json::json!({"format": 1, "shards": shards}).to_string();
        std::fs::write(&path, layout)
            .map_err(|e| refuse(format!("cannot write {}: {e}", path.display())))?;
    }
    Ok(shards)
}

fn log_nofile() {
    if let Some(nofile) = soft_limit(libc::RLIMIT_NOFILE) {
        tracing::info!(
            nofile,
            connections = nofile.saturating_sub(100),
            "RLIMIT_NOFILE allows about this many connections (one descriptor each)"
        );
    }
}

/// Binds one SO_REUSEPORT listener per shard on one address. With port 0 the first socket
/// picks the port and the others join it.
fn bind_listeners(addr: SocketAddr, shards: usize) -> Result<(SocketAddr, Vec<RawFd>), StartError> {
    let mut bound = addr;
    let mut fds = Vec::with_capacity(shards);
    for _ in 0..shards {
        let socket = Socket::new(
            Domain::for_address(bound),
            Type::STREAM,
            Some(Protocol::TCP),
        )
        .map_err(|e| refuse(format!("socket: {e}")))?;
        socket
            .set_reuse_port(true)
            .and_then(|()| socket.set_reuse_address(true))
            .map_err(|e| refuse(format!("SO_REUSEPORT: {e}")))?;
        socket
            .bind(&bound.into())
            .map_err(|e| refuse(format!("cannot bind {bound}: {e}")))?;
        socket
            .listen(LISTEN_BACKLOG)
            .map_err(|e| refuse(format!("cannot listen on {bound}: {e}")))?;
        bound = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| refuse("listener has no address"))?;
        fds.push(socket.into_raw_fd());
    }
    Ok((bound, fds))
}
