//! `connect`: N idle authenticated connections held open; connect rate, server memory per
//! connection, kernel socket memory. Connections are opened by worker processes (this binary's
//! hidden `connect-worker` subcommand) because every process is capped at 20,000 open files.

use std::cell::Cell;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::conn::{self, Conn, Target};
use crate::procfs;
use crate::report::{self, Latency};
use crate::spawn::{Server, ServerArgs};
use crate::xmpp;

#[derive(Clone, Debug, clap::Args)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[arg(long, value_enum, default_value = "courier")]
    pub target: Target,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    pub n: usize,
    /// Worker processes (default: one per 15,000 connections).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Handshakes in flight per worker.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// Seconds to hold the connections after the memory readings settle.
    #[arg(long, default_value_t = 2)]
    pub hold: u64,
    /// Give up opening connections after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Write the result as JSON here.
    #[arg(long)]
    pub json: Option<String>,
    /// Write the handshake latency plot here.
    #[arg(long)]
    pub svg: Option<String>,
    /// User id prefix (one user per connection).
    #[arg(long, default_value = "c")]
    pub prefix: String,
}

#[derive(Clone, Debug, clap::Args)]
pub struct WorkerArgs {
    #[arg(long)]
    pub url: String,
    #[arg(long, value_enum)]
    pub target: Target,
    #[arg(long)]
    pub start: usize,
    #[arg(long)]
    pub count: usize,
    #[arg(long)]
    pub concurrency: usize,
    #[arg(long)]
    pub prefix: String,
    #[arg(long)]
    pub timeout: u64,
}

#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "event", rename_all = "lowercase")]
enum WorkerMsg {
    Progress {
        connected: usize,
        failed: usize,
    },
    Ready {
        connected: usize,
        failed: usize,
        secs: f64,
        hist: Vec<(u64, u64)>,
        first_error: Option<String>,
    },
    Done {
        dropped: usize,
    },
}

#[derive(Serialize, Debug, Default)]
pub struct ConnectResult {
    pub target: Option<Target>,
    pub server: String,
    pub n: usize,
    pub workers: usize,
    pub connected: usize,
    pub failed: usize,
    pub dropped_while_held: usize,
    pub connect_secs: f64,
    pub connects_per_sec: f64,
    pub handshake: Latency,
    pub rss_before: u64,
    pub rss_after: u64,
    pub rss_per_conn: f64,
    pub anon_per_conn: f64,
    pub rollup_before: Option<procfs::Rollup>,
    pub rollup_after: Option<procfs::Rollup>,
    pub server_threads: Option<u64>,
    pub tcp_mem_pages_before: u64,
    pub tcp_mem_pages_after: u64,
    /// Kernel TCP memory delta per connection, both ends of the loopback pair included.
    pub kernel_tcp_per_conn: f64,
    /// System-wide slab delta per connection (socket structs, files, epoll items: both ends
    /// of the loopback pair, plus whatever else the machine did meanwhile).
    pub slab_per_conn: f64,
    pub slab_before: u64,
    pub slab_after: u64,
    pub first_error: Option<String>,
    /// Server CPU while the connections sat idle during `--hold` (fraction of one core).
    pub idle_cpu_util: f64,
}

pub fn run(a: &ConnectArgs) -> Result<ConnectResult, String> {
    let server = crate::fanout::start_server(a.target, &a.server)?;
    let r = run_on(a, &server);
    drop(server);
    let r = r?;
    print(&r);
    if let Some(p) = &a.json {
        report::write_json(p, &r);
    }
    Ok(r)
}

pub fn run_on(a: &ConnectArgs, server: &Server) -> Result<ConnectResult, String> {
    let pid = server.proc_pid();
    let workers = a.workers.unwrap_or(a.n.div_ceil(15_000)).max(1);
    eprintln!(
        "[connect] {} at {}: {} connections over {} worker process(es)",
        server.label, server.url, a.n, workers
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut r = ConnectResult {
        target: Some(a.target),
        server: server.label.clone(),
        n: a.n,
        workers,
        ..Default::default()
    };
    if a.target == Target::Ejabberd {
        // Accounts are set up before the "before" readings: the connect rate and memory per
        // connection are about logged-in sessions, not about registering users.
        let users: Vec<String> = (0..a.n).map(|i| format!("{}{i}", a.prefix)).collect();
        xmpp::register_blocking(&server.url, &users)?;
    }
    if let Some(pid) = pid {
        r.rss_before =
            procfs::settled_rss(pid, Duration::from_secs(1), Duration::from_secs(10)).unwrap_or(0);
        r.rollup_before = procfs::smaps_rollup(pid);
    }
    r.tcp_mem_pages_before = procfs::tcp_sockstat().map(|s| s.1).unwrap_or(0);
    r.slab_before = procfs::slab_bytes().unwrap_or(0);

    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let per = a.n.div_ceil(workers);
    let mut children = Vec::new();
    let (tx, rx) = std::sync::mpsc::channel::<(usize, WorkerMsg)>();
    let start = Instant::now();
    for w in 0..workers {
        let s = w * per;
        let count = per.min(a.n.saturating_sub(s));
        if count == 0 {
            continue;
        }
        let mut child = Command::new(&exe)
            .args([
                "connect-worker",
                "--url",
                &server.url,
                "--target",
                a.target.name(),
                "--start",
                &s.to_string(),
                "--count",
                &count.to_string(),
                "--concurrency",
                &a.concurrency.to_string(),
                "--prefix",
                &a.prefix,
                "--timeout",
                &a.timeout.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawning worker: {e}"))?;
        let out = child.stdout.take().expect("piped");
        let tx = tx.clone();
        let idx = children.len();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(m) = serde_json::from_str::<WorkerMsg>(&line) {
                    let _ = tx.send((idx, m));
                }
            }
        });
        children.push(child);
    }
    drop(tx);
    let nw = children.len();
    let mut progress = vec![(0usize, 0usize); nw];
    let mut ready = vec![false; nw];
    let mut hist = report::hist();
    let mut last_print = Instant::now();
    while ready.iter().any(|r| !r) {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok((i, WorkerMsg::Progress { connected, failed })) => progress[i] = (connected, failed),
            Ok((
                i,
                WorkerMsg::Ready {
                    connected,
                    failed,
                    secs: _,
                    hist: h,
                    first_error,
                },
            )) => {
                progress[i] = (connected, failed);
                ready[i] = true;
                report::load(&mut hist, &h);
                if r.first_error.is_none() {
                    r.first_error = first_error;
                }
            }
            Ok(_) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            let c: usize = progress.iter().map(|p| p.0).sum();
            let f: usize = progress.iter().map(|p| p.1).sum();
            let rss = pid.and_then(procfs::rss_bytes).unwrap_or(0);
            eprintln!(
                "[connect] t={:>5.1}s connected={c} failed={f} rate={:.0}/s server_rss={:.1} MiB",
                start.elapsed().as_secs_f64(),
                c as f64 / start.elapsed().as_secs_f64(),
                rss as f64 / 1048576.0
            );
        }
    }
    r.connect_secs = start.elapsed().as_secs_f64();
    r.connected = progress.iter().map(|p| p.0).sum();
    r.failed = progress.iter().map(|p| p.1).sum();
    r.connects_per_sec = r.connected as f64 / r.connect_secs;
    r.handshake = Latency::of(&hist);
    eprintln!(
        "[connect] {} connected in {:.2}s; waiting for server memory to settle",
        r.connected, r.connect_secs
    );
    if let Some(pid) = pid {
        r.rss_after =
            procfs::settled_rss(pid, Duration::from_secs(3), Duration::from_secs(30)).unwrap_or(0);
        r.rollup_after = procfs::smaps_rollup(pid);
        r.server_threads = procfs::threads(pid);
    }
    r.tcp_mem_pages_after = procfs::tcp_sockstat().map(|s| s.1).unwrap_or(0);
    r.slab_after = procfs::slab_bytes().unwrap_or(0);
    r.slab_per_conn = (r.slab_after as f64 - r.slab_before as f64) / r.connected.max(1) as f64;
    let n = r.connected.max(1) as f64;
    r.rss_per_conn = (r.rss_after as f64 - r.rss_before as f64) / n;
    if let (Some(b), Some(a2)) = (&r.rollup_before, &r.rollup_after) {
        r.anon_per_conn = (a2.anonymous as f64 - b.anonymous as f64) / n;
    }
    r.kernel_tcp_per_conn = (r.tcp_mem_pages_after as f64 - r.tcp_mem_pages_before as f64)
        * procfs::page_size() as f64
        / n;
    let cpu0 = pid.and_then(procfs::cpu_seconds);
    let t_hold = Instant::now();
    std::thread::sleep(Duration::from_secs(a.hold));
    if let (Some(c0), Some(c1)) = (cpu0, pid.and_then(procfs::cpu_seconds)) {
        r.idle_cpu_util = (c1 - c0) / t_hold.elapsed().as_secs_f64();
    }
    // Stop the workers: closing stdin tells them to report and exit.
    for c in children.iter_mut() {
        drop(c.stdin.take());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut done = 0;
    while done < nw && Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok((_, WorkerMsg::Done { dropped })) => {
                r.dropped_while_held += dropped;
                done += 1;
            }
            Ok(_) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
    }
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    if let Some(p) = &a_svg(a) {
        report::svg_percentiles(
            p,
            &format!(
                "connect: handshake+hello latency, {} conns, {}",
                a.n, server.label
            ),
            &[("handshake", &hist)],
        );
    }
    Ok(r)
}

fn a_svg(a: &ConnectArgs) -> Option<String> {
    a.svg.clone()
}

pub fn print(r: &ConnectResult) {
    println!();
    println!("connect — {} ({} workers)", r.server, r.workers);
    println!(
        "  connections      {} of {} ({} failed, {} dropped while held)",
        r.connected, r.n, r.failed, r.dropped_while_held
    );
    println!(
        "  connect rate     {:.0} /s ({:.2} s)",
        r.connects_per_sec, r.connect_secs
    );
    println!(
        "  server RSS       {:.1} MiB → {:.1} MiB",
        r.rss_before as f64 / 1048576.0,
        r.rss_after as f64 / 1048576.0
    );
    println!(
        "  RSS / conn       {}   (anonymous {})",
        report::kib(r.rss_per_conn),
        report::kib(r.anon_per_conn)
    );
    println!(
        "  kernel TCP / conn {}  (sockstat mem, both ends of loopback)",
        report::kib(r.kernel_tcp_per_conn)
    );
    println!(
        "  kernel slab / conn {} (/proc/meminfo Slab, both ends of loopback, system-wide)",
        report::kib(r.slab_per_conn)
    );
    println!(
        "  idle server CPU  {:.1}% of a core while held",
        r.idle_cpu_util * 100.0
    );
    println!("{}", Latency::header());
    println!("{}", r.handshake.row("handshake → hello"));
    if let Some(e) = &r.first_error {
        println!("  first error: {e}");
    }
}

/// The worker process: opens its share of connections, reports, holds until stdin closes.
pub fn worker(a: WorkerArgs) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move { worker_main(a).await })
}

fn emit(m: &WorkerMsg) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{}", serde_json::to_string(m).unwrap_or_default());
    let _ = o.flush();
}

async fn worker_main(a: WorkerArgs) -> Result<(), String> {
    let addr = conn::addr_of(&a.url)?;
    let connected = Rc::new(Cell::new(0usize));
    let failed = Rc::new(Cell::new(0usize));
    let dropped = Rc::new(Cell::new(0usize));
    let first_error: Rc<std::cell::RefCell<Option<String>>> = Rc::default();
    let hist = Rc::new(std::cell::RefCell::new(report::hist()));
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.timeout);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    for i in a.start..a.start + a.count {
        let permit = sem
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        if Instant::now() > deadline {
            break;
        }
        let url = a.url.clone();
        let user = format!("{}{i}", a.prefix);
        let (c_connected, c_failed, dropped, first_error, hist, done_tx) = (
            connected.clone(),
            failed.clone(),
            dropped.clone(),
            first_error.clone(),
            hist.clone(),
            done_tx.clone(),
        );
        let mut stop_rx = stop_rx.clone();
        let target = a.target;
        tokio::task::spawn_local(async move {
            let t = Instant::now();
            let r = tokio::time::timeout(
                Duration::from_secs(30),
                Conn::open(target, &url, addr, conn::source_addr(i), &user, "d0"),
            )
            .await
            .unwrap_or_else(|_| Err("timeout".into()));
            drop(permit);
            let _ = done_tx.send(());
            match r {
                Ok((mut c, _)) => {
                    let _ = hist.borrow_mut().record(t.elapsed().as_micros() as u64);
                    c_connected.set(c_connected.get() + 1);
                    loop {
                        tokio::select! {
                            m = c.recv() => if m.is_none() {
                                dropped.set(dropped.get() + 1);
                                return;
                            },
                            _ = stop_rx.changed() => return,
                        }
                    }
                }
                Err(e) => {
                    c_failed.set(c_failed.get() + 1);
                    first_error.borrow_mut().get_or_insert(e);
                }
            }
        });
        if i % 500 == 0 {
            emit(&WorkerMsg::Progress {
                connected: connected.get(),
                failed: failed.get(),
            });
        }
    }
    drop(done_tx);
    // Wait for every attempt to finish (success or failure).
    let mut finished = 0;
    let total = a.count;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    while finished < total {
        tokio::select! {
            r = done_rx.recv() => match r { Some(()) => finished += 1, None => break },
            _ = tick.tick() => emit(&WorkerMsg::Progress { connected: connected.get(), failed: failed.get() }),
        }
    }
    emit(&WorkerMsg::Ready {
        connected: connected.get(),
        failed: failed.get(),
        secs: start.elapsed().as_secs_f64(),
        hist: report::dump(&hist.borrow()),
        first_error: first_error.borrow().clone(),
    });
    // Hold until the parent closes stdin.
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let mut line = String::new();
    use tokio::io::AsyncBufReadExt;
    loop {
        line.clear();
        match stdin.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let dropped_now = dropped.get();
    let _ = stop_tx.send(true);
    emit(&WorkerMsg::Done {
        dropped: dropped_now,
    });
    Ok(())
}
