//! `fanout`: U users × D devices each, S sender users sending 1:1 messages at a fixed open-loop
//! rate (latency measured from the scheduled send time, so a stalled server cannot hide its
//! queueing: no coordinated omission) or as fast as a window of in-flight sends allows.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::conn::{self, Conn, Incoming, Target};
use crate::procfs;
use crate::report::{self, Latency};
use crate::spawn::{Server, ServerArgs};

#[derive(Clone, Debug, clap::Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[arg(long, value_enum, default_value = "courier")]
    pub target: Target,
    /// Recipient users.
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    /// Devices per recipient user (each one connection).
    #[arg(long, default_value_t = 3)]
    pub devices: usize,
    /// Sender users (one connection each).
    #[arg(long, default_value_t = 10)]
    pub senders: usize,
    /// Messages per second over all senders (open loop); 0 = as fast as the window allows.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Sends in flight per sender when `--rate 0`.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Seconds of sending before the measurement window.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds of the measurement window.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Message body size in bytes (at least the ~24-byte timestamp header).
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,
    /// Devices ack cumulatively every this many events (0: never).
    #[arg(long, default_value_t = 100)]
    pub ack_every: u64,
    /// Handshakes in flight while connecting.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// User id prefix (lets several runs share one server).
    #[arg(long, default_value = "f")]
    pub prefix: String,
    #[arg(long)]
    pub json: Option<String>,
    #[arg(long)]
    pub svg: Option<String>,
    /// Set by `group`: every sender sends to this chat, `devices` is the member count.
    #[arg(skip)]
    pub group_chat: Option<String>,
}

#[derive(Serialize, Debug, Default, Clone)]
pub struct FanoutResult {
    pub target: Option<Target>,
    pub server: String,
    pub users: usize,
    pub devices: usize,
    pub senders: usize,
    pub rate_target: f64,
    pub window_secs: f64,
    pub sends_per_sec: f64,
    pub deliveries_per_sec: f64,
    pub deliveries_in_window: u64,
    pub expected_deliveries: u64,
    pub received_deliveries: u64,
    /// Copies of a message a device had already received (not counted as deliveries): the
    /// check that a peer (ejabberd: direct delivery plus carbons) sends each message once.
    pub duplicate_deliveries: u64,
    pub errors: u64,
    pub busy: u64,
    pub first_error: Option<String>,
    pub device_latency: Latency,
    pub all_devices_latency: Latency,
    pub sent_latency: Latency,
    pub server_cpu_secs: f64,
    pub server_cpu_us_per_delivery: f64,
    pub server_cpu_util: f64,
    pub bench_cpu_util: f64,
}

struct Shared {
    base: Instant,
    m_start: Instant,
    m_end: Instant,
    dev: Histogram<u64>,
    all: Histogram<u64>,
    sent: Histogram<u64>,
    /// (sender, k) → (devices still to receive, worst latency so far)
    pending: HashMap<(u32, u64), (u32, u64)>,
    sends: u64,
    sends_in_window: u64,
    received: u64,
    duplicates: u64,
    in_window: u64,
    errors: u64,
    busy: u64,
    first_error: Option<String>,
    last_second: u64,
    outstanding_sent: u64,
}

fn body(sender: u32, k: u64, sched_us: u64, len: usize) -> String {
    let mut b = format!("{sender}:{k}:{sched_us}:");
    while b.len() < len {
        b.push('x');
    }
    b
}

fn parse_body(b: &str) -> Option<(u32, u64, u64)> {
    let mut it = b.split(':');
    Some((
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    ))
}

pub fn run(a: &FanoutArgs) -> Result<FanoutResult, String> {
    let server = start_server(a.target, &a.server)?;
    let r = run_on(a, &server);
    drop(server);
    let r = r?;
    print(&r);
    if let Some(p) = &a.json {
        report::write_json(p, &r);
    }
    Ok(r)
}

/// Starts the server for target `t`, or names the one at `--url`.
pub fn start_server(t: Target, s: &ServerArgs) -> Result<Server, String> {
    match (t, &s.url) {
        (Target::Courier, _) => Server::courier(s),
        (_, Some(_)) => Ok(Server::external(s, t.name())),
        (Target::Nats, None) => Server::nats("nats-server", s.server_cpus.as_deref()),
        (Target::Ejabberd, None) => Server::ejabberd(s.server_cpus.as_deref()),
    }
}

pub fn run_on(a: &FanoutArgs, server: &Server) -> Result<FanoutResult, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let local = tokio::task::LocalSet::new();
    let r = local.block_on(&rt, fanout_main(a, server));
    drop(local);
    drop(rt);
    r
}

/// Opens connections for (user, device) pairs, `concurrency` handshakes at a time.
pub async fn open_many(
    target: Target,
    url: &str,
    pairs: Vec<(String, String)>,
    first_index: usize,
    concurrency: usize,
    what: &str,
) -> Result<Vec<Conn>, String> {
    let addr = conn::addr_of(url)?;
    let n = pairs.len();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut handles = Vec::with_capacity(n);
    let start = Instant::now();
    for (i, (u, d)) in pairs.into_iter().enumerate() {
        let permit = sem
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let url = url.to_string();
        handles.push(tokio::task::spawn_local(async move {
            let r = tokio::time::timeout(
                Duration::from_secs(30),
                Conn::open(
                    target,
                    &url,
                    addr,
                    conn::source_addr(first_index + i),
                    &u,
                    &d,
                ),
            )
            .await
            .unwrap_or_else(|_| Err("timeout".into()));
            drop(permit);
            r.map(|(c, _)| c).map_err(|e| format!("{u}/{d}: {e}"))
        }));
    }
    let mut out = Vec::with_capacity(n);
    for h in handles {
        out.push(h.await.map_err(|e| e.to_string())??);
    }
    eprintln!(
        "[{what}] {n} connections open in {:.2}s",
        start.elapsed().as_secs_f64()
    );
    Ok(out)
}

async fn fanout_main(a: &FanoutArgs, server: &Server) -> Result<FanoutResult, String> {
    let (u, d, s) = (a.users, a.devices, a.senders.max(1));
    eprintln!(
        "[fanout] {} at {}: {u} users × {d} devices, {s} senders, rate {}",
        server.label,
        server.url,
        if a.rate > 0.0 {
            format!("{}/s", a.rate)
        } else {
            format!("max (window {})", a.window)
        }
    );
    let mut pairs = Vec::new();
    for i in 0..u {
        for j in 0..d {
            pairs.push((format!("{}u{i}", a.prefix), format!("d{j}")));
        }
    }
    if a.target == Target::Ejabberd {
        // XMPP needs accounts; they are made before any connection and outside the timing.
        let mut users: Vec<String> = (0..u).map(|i| format!("{}u{i}", a.prefix)).collect();
        users.extend((0..s).map(|i| format!("{}s{i}", a.prefix)));
        crate::xmpp::register(conn::addr_of(&server.url)?, &users, 8).await?;
    }
    let devices = open_many(a.target, &server.url, pairs, 0, a.concurrency, "fanout").await?;
    let spairs = (0..s)
        .map(|i| (format!("{}s{i}", a.prefix), "d0".to_string()))
        .collect();
    let senders = open_many(
        a.target,
        &server.url,
        spairs,
        u * d,
        a.concurrency,
        "fanout",
    )
    .await?;
    // Let link commits and hello replays finish before the clock starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    measure(a, server, devices, senders).await
}

/// Runs the timed part on open connections: `devices` receive, `senders` send.
pub async fn measure(
    a: &FanoutArgs,
    server: &Server,
    devices: Vec<Conn>,
    senders: Vec<Conn>,
) -> Result<FanoutResult, String> {
    let (u, d, s) = (a.users, a.devices, senders.len());

    let base = Instant::now();
    let t_start = base + Duration::from_millis(100);
    let m_start = t_start + Duration::from_secs_f64(a.warmup);
    let m_end = m_start + Duration::from_secs_f64(a.duration);
    let sh = Rc::new(RefCell::new(Shared {
        base,
        m_start,
        m_end,
        dev: report::hist(),
        all: report::hist(),
        sent: report::hist(),
        pending: HashMap::new(),
        sends: 0,
        sends_in_window: 0,
        received: 0,
        duplicates: 0,
        in_window: 0,
        errors: 0,
        busy: 0,
        first_error: None,
        last_second: 0,
        outstanding_sent: 0,
    }));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    for c in devices {
        let sh = sh.clone();
        let mut stop = stop_rx.clone();
        let ack_every = a.ack_every;
        tokio::task::spawn_local(async move {
            let mut c = c;
            let mut last = 0u64;
            let mut acked = 0u64;
            // What this device already got: a second copy is counted apart, not as delivery.
            let mut seen: std::collections::HashSet<(u32, u64)> = Default::default();
            loop {
                let m = tokio::select! {
                    m = c.recv() => m,
                    _ = stop.changed() => break,
                };
                let Some(m) = m else { break };
                match m {
                    Incoming::Msg { seq, body } => {
                        last = last.max(seq);
                        if let Some((snd, k, sched)) = parse_body(&body) {
                            if seen.insert((snd, k)) {
                                on_delivery(&sh, snd, k, sched);
                            } else {
                                sh.borrow_mut().duplicates += 1;
                            }
                        }
                    }
                    Incoming::OtherEvent { seq, .. } => last = last.max(seq),
                    Incoming::Error { code, .. } => note_error(&sh, code),
                    _ => {}
                }
                if ack_every > 0 && last >= acked + ack_every {
                    acked = last;
                    if c.ack(last).await.is_err() {
                        break;
                    }
                }
            }
            c.close().await;
        });
    }

    let send_end = m_end;
    let mut sender_tasks = Vec::new();
    for (si, c) in senders.into_iter().enumerate() {
        let sh = sh.clone();
        let a = a.clone();
        sender_tasks.push(tokio::task::spawn_local(async move {
            sender(si as u32, c, sh, a, t_start, send_end).await
        }));
    }

    // Server CPU at the window edges, progress once a second.
    let pid = server.proc_pid();
    let self_pid = std::process::id();
    tokio::time::sleep_until(m_start.into()).await;
    let cpu0 = pid.and_then(procfs::cpu_seconds);
    let bcpu0 = procfs::cpu_seconds(self_pid);
    sh.borrow_mut().last_second = 0;
    let mut prev_recv = sh.borrow().received;
    let mut tick = tokio::time::interval_at(
        (m_start + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    loop {
        let now = tick.tick().await.into_std();
        let st = sh.borrow();
        eprintln!(
            "[fanout] t={:>5.1}s sends={} deliveries/s={} p99(dev)={} ms errors={} busy={}",
            now.duration_since(t_start).as_secs_f64(),
            st.sends,
            st.received - prev_recv,
            report::ms(st.dev.value_at_quantile(0.99)),
            st.errors,
            st.busy
        );
        prev_recv = st.received;
        if now >= m_end {
            break;
        }
    }
    tokio::time::sleep_until(m_end.into()).await;
    let cpu1 = pid.and_then(procfs::cpu_seconds);
    let bcpu1 = procfs::cpu_seconds(self_pid);
    for t in sender_tasks {
        let _ = t.await;
    }
    // Drain: wait (bounded) for the deliveries still in flight.
    let drain_end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < drain_end {
        let done = {
            let st = sh.borrow();
            st.received >= st.sends * d as u64 && st.outstanding_sent == 0
        };
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let st = sh.borrow();
    let window = (m_end - m_start).as_secs_f64();
    let cpu = match (cpu0, cpu1) {
        (Some(x), Some(y)) => y - x,
        _ => 0.0,
    };
    let bcpu = match (bcpu0, bcpu1) {
        (Some(x), Some(y)) => y - x,
        _ => 0.0,
    };
    let r = FanoutResult {
        target: Some(a.target),
        server: server.label.clone(),
        users: u,
        devices: d,
        senders: s,
        rate_target: a.rate,
        window_secs: window,
        sends_per_sec: st.sends_in_window as f64 / window,
        deliveries_per_sec: st.in_window as f64 / window,
        deliveries_in_window: st.in_window,
        expected_deliveries: st.sends * d as u64,
        received_deliveries: st.received,
        duplicate_deliveries: st.duplicates,
        errors: st.errors,
        busy: st.busy,
        first_error: st.first_error.clone(),
        device_latency: Latency::of(&st.dev),
        all_devices_latency: Latency::of(&st.all),
        sent_latency: Latency::of(&st.sent),
        server_cpu_secs: cpu,
        server_cpu_us_per_delivery: if st.in_window > 0 {
            cpu * 1e6 / st.in_window as f64
        } else {
            0.0
        },
        server_cpu_util: cpu / window,
        bench_cpu_util: bcpu / window,
    };
    if let Some(p) = &a.svg {
        report::svg_percentiles(
            p,
            &format!(
                "{} {u}×{d} dev, {s} senders, {} — {}",
                a.group_chat.as_deref().unwrap_or("fanout"),
                if a.rate > 0.0 {
                    format!("{} msg/s", a.rate)
                } else {
                    "max rate".into()
                },
                server.label
            ),
            &[
                ("send→device", &st.dev),
                ("send→all devices", &st.all),
                ("send→sent", &st.sent),
            ],
        );
    }
    Ok(r)
}

fn note_error(sh: &Rc<RefCell<Shared>>, code: String) {
    let mut st = sh.borrow_mut();
    if code == "busy" {
        st.busy += 1;
    } else {
        st.errors += 1;
    }
    st.first_error.get_or_insert(code);
}

fn on_delivery(sh: &Rc<RefCell<Shared>>, snd: u32, k: u64, sched_us: u64) {
    let mut st = sh.borrow_mut();
    let now = Instant::now();
    let lat = (now.duration_since(st.base).as_micros() as u64).saturating_sub(sched_us);
    st.received += 1;
    let sched = st.base + Duration::from_micros(sched_us);
    if now >= st.m_start && now < st.m_end {
        st.in_window += 1;
    }
    if sched >= st.m_start && sched < st.m_end {
        let _ = st.dev.record(lat.max(1));
        let done = if let Some(e) = st.pending.get_mut(&(snd, k)) {
            e.0 -= 1;
            e.1 = e.1.max(lat);
            (e.0 == 0).then_some(e.1)
        } else {
            None
        };
        if let Some(worst) = done {
            st.pending.remove(&(snd, k));
            let _ = st.all.record(worst.max(1));
        }
    }
}

async fn sender(
    si: u32,
    mut c: Conn,
    sh: Rc<RefCell<Shared>>,
    a: FanoutArgs,
    t_start: Instant,
    send_end: Instant,
) {
    let (users, devices, s) = (a.users, a.devices as u32, a.senders.max(1) as u64);
    let base = sh.borrow().base;
    let open_loop = a.rate > 0.0;
    let period = if open_loop { s as f64 / a.rate } else { 0.0 };
    let offset = period * si as f64 / s as f64;
    let sched_of = |k: u64| t_start + Duration::from_secs_f64(offset + k as f64 * period);
    let mut k = 0u64;
    let mut in_flight: HashMap<u64, Instant> = HashMap::new();
    let mut last_seq = 0u64;
    let mut acked = 0u64;
    // Peers without `sent` (NATS, XMPP): flow control by ping, see `Target::confirms_sends`.
    let pinged = !a.target.confirms_sends();
    let mut unconfirmed = 0usize;
    let mut final_ping = false;
    let mut pings_out = 0usize;
    const PING_EVERY: usize = 16;
    let drain_limit = send_end + Duration::from_secs(10);
    loop {
        let now = Instant::now();
        let next = if open_loop { sched_of(k) } else { now };
        let over = if open_loop {
            next >= send_end
        } else {
            now >= send_end
        };
        let can_send = !over
            && (open_loop
                || if pinged {
                    pings_out * PING_EVERY < a.window.max(PING_EVERY)
                } else {
                    in_flight.len() < a.window
                });
        if over && ((in_flight.is_empty() && pings_out == 0) || now >= drain_limit) {
            // Without `sent`, only a last pong says the server took every send: closing
            // before it would let a server drop what was still queued on this connection
            // and the bench count it lost.
            if pinged && !final_ping && now < drain_limit {
                final_ping = true;
                pings_out += 1;
                if c.ping().await.is_err() {
                    break;
                }
                continue;
            }
            break;
        }
        tokio::select! {
            biased;
            // Sends first: each send brings two frames back (the sender's own copy and
            // `sent`), so with receiving first a sender with anything to read never filled its
            // window, and "max" measured this loop rather than the server (10 senders kept ~5
            // sends in flight each instead of 64).
            _ = tokio::time::sleep_until(next.into()), if can_send => {
                let sched = next;
                let to = match &a.group_chat {
                    Some(g) => g.clone(),
                    None => format!("{}u{}", a.prefix, (si as u64 + k * s) % users as u64),
                };
                let sched_us = sched.duration_since(base).as_micros() as u64;
                let b = body(si, k, sched_us, a.body_bytes);
                {
                    let mut st = sh.borrow_mut();
                    st.sends += 1;
                    if sched >= st.m_start && sched < st.m_end {
                        st.sends_in_window += 1;
                        st.pending.insert((si, k), (devices, 0));
                    }
                    if !pinged {
                        st.outstanding_sent += 1;
                    }
                }
                if !pinged {
                    in_flight.insert(k, sched);
                }
                if c.send_msg(&to, &k.to_string(), &b).await.is_err() {
                    break;
                }
                k += 1;
                if pinged && !open_loop {
                    unconfirmed += 1;
                    if unconfirmed >= PING_EVERY {
                        unconfirmed = 0;
                        pings_out += 1;
                        if c.ping().await.is_err() {
                            break;
                        }
                    }
                }
            }
            m = c.recv() => {
                let Some(m) = m else { break };
                match m {
                    Incoming::Sent { id } => {
                        if let Ok(kk) = id.parse::<u64>()
                            && let Some(t) = in_flight.remove(&kk)
                        {
                            let mut st = sh.borrow_mut();
                            st.outstanding_sent -= 1;
                            if t >= st.m_start && t < st.m_end {
                                let _ = st.sent.record((t.elapsed().as_micros() as u64).max(1));
                            }
                        }
                    }
                    Incoming::Msg { seq, .. } | Incoming::OtherEvent { seq, .. } => last_seq = last_seq.max(seq),
                    Incoming::Error { code, id } => {
                        if let Some(kk) = id.and_then(|i| i.parse::<u64>().ok())
                            && in_flight.remove(&kk).is_some()
                        {
                            sh.borrow_mut().outstanding_sent -= 1;
                        }
                        note_error(&sh, code);
                    }
                    Incoming::Pong => pings_out = pings_out.saturating_sub(1),
                    Incoming::Other => {}
                }
                if a.ack_every > 0 && last_seq >= acked + a.ack_every {
                    acked = last_seq;
                    if c.ack(last_seq).await.is_err() {
                        break;
                    }
                }
            }
            _ = tokio::time::sleep_until(send_end.into()), if !can_send && !over => {}
            _ = tokio::time::sleep(Duration::from_millis(100)), if over => {}
        }
    }
    c.close().await;
}

pub fn print(r: &FanoutResult) {
    println!();
    println!(
        "fanout — {}: {} users × {} devices, {} senders, rate {}",
        r.server,
        r.users,
        r.devices,
        r.senders,
        if r.rate_target > 0.0 {
            format!("{}/s", r.rate_target)
        } else {
            "max".into()
        }
    );
    println!("  sends/s          {:.0}", r.sends_per_sec);
    println!(
        "  deliveries/s     {:.0}  ({} in {:.1} s window)",
        r.deliveries_per_sec, r.deliveries_in_window, r.window_secs
    );
    println!(
        "  delivered        {} of {} expected; errors {}, busy {}, duplicates {}",
        r.received_deliveries, r.expected_deliveries, r.errors, r.busy, r.duplicate_deliveries
    );
    println!(
        "  server CPU       {:.2} s = {:.0}% of a core; {:.2} µs per delivery (bench process: {:.0}% of a core)",
        r.server_cpu_secs,
        r.server_cpu_util * 100.0,
        r.server_cpu_us_per_delivery,
        r.bench_cpu_util * 100.0
    );
    println!("{}", Latency::header());
    println!("{}", r.device_latency.row("send → each device"));
    println!("{}", r.all_devices_latency.row("send → all devices"));
    println!("{}", r.sent_latency.row("send → sent"));
    if let Some(e) = &r.first_error {
        println!("  first error: {e}");
    }
}
