//! `catchup`: a device that was offline while N events were appended reconnects; how fast is
//! `(cursor, head]` replayed?

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::conn::{self, Conn, Incoming, Target};
use crate::report;
use crate::spawn::{Server, ServerArgs};

#[derive(Clone, Debug, clap::Args)]
pub struct CatchupArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Events the device misses while offline.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Runs (a fresh pair of users each); medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,
    /// Sends in flight while filling the log.
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Sender users (one connection each) that fill the log in parallel.
    #[arg(long, default_value_t = 4)]
    pub fill_conns: usize,
    /// Ack every this many replayed events (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub ack_every: u64,
    #[arg(long, default_value = "k")]
    pub prefix: String,
    #[arg(long)]
    pub json: Option<String>,
    #[arg(long)]
    pub svg: Option<String>,
}

#[derive(Serialize, Debug, Default, Clone)]
pub struct CatchupRun {
    pub events: u64,
    pub fill_secs: f64,
    pub fill_sends_per_sec: f64,
    pub hello_ms: f64,
    pub replay_secs: f64,
    pub events_per_sec: f64,
    pub mib_per_sec: f64,
}

#[derive(Serialize, Debug, Default)]
pub struct CatchupResult {
    pub server: String,
    pub runs: Vec<CatchupRun>,
    pub median_events_per_sec: f64,
    pub median_fill_sends_per_sec: f64,
    pub median_hello_ms: f64,
}

pub fn run(a: &CatchupArgs) -> Result<CatchupResult, String> {
    let server = Server::courier(&a.server)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let r = rt.block_on(catchup_main(a, &server));
    drop(rt);
    drop(server);
    let r = r?;
    print(&r);
    if let Some(p) = &a.json {
        report::write_json(p, &r);
    }
    Ok(r)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn catchup_main(a: &CatchupArgs, server: &Server) -> Result<CatchupResult, String> {
    let addr = conn::addr_of(&server.url)?;
    let mut out = CatchupResult {
        server: server.label.clone(),
        ..Default::default()
    };
    let mut curves = Vec::new();
    for run in 0..a.runs {
        let target = format!("{}{run}t", a.prefix);
        let sender = format!("{}{run}s", a.prefix);
        let src = conn::source_addr(0);
        // 1. Link the device and move its cursor to the head, then go offline.
        let (mut t, hello) =
            Conn::open(Target::Courier, &server.url, addr, src, &target, "d0").await?;
        let mut seen = hello.cursor;
        while seen < hello.head {
            match t.recv().await {
                Some(Incoming::Msg { seq, .. }) | Some(Incoming::OtherEvent { seq, .. }) => {
                    seen = seq
                }
                Some(_) => {}
                None => return Err("target closed".into()),
            }
        }
        t.ack(seen).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        t.close().await;
        // 2. Other users send N messages to it (several senders: the server limits the frames
        //    one connection may send per second).
        let mut body = String::from("catchup:");
        while body.len() < a.body_bytes {
            body.push('x');
        }
        let fill = Instant::now();
        let nconn = a.fill_conns.max(1) as u64;
        let mut tasks = Vec::new();
        for j in 0..nconn {
            let count = a.events / nconn + u64::from(j < a.events % nconn);
            let (url, sender, target, body) = (
                server.url.clone(),
                format!("{sender}{j}"),
                target.clone(),
                body.clone(),
            );
            let window = (a.window as u64 / nconn).max(1) as usize;
            tasks.push(tokio::spawn(async move {
                fill_log(&url, addr, src, &sender, &target, &body, count, window).await
            }));
        }
        let (mut busy, mut limited) = (0u64, 0u64);
        for t in tasks {
            let (b, l) = t.await.map_err(|e| e.to_string())??;
            busy += b;
            limited += l;
        }
        eprintln!(
            "[catchup] run {run}: filled {} events ({busy} busy, {limited} rate_limited retries)",
            a.events
        );
        let fill_secs = fill.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_millis(500)).await;
        // 3. The device reconnects and replays.
        let t0 = Instant::now();
        let (mut t, hello) =
            Conn::open(Target::Courier, &server.url, addr, src, &target, "d0").await?;
        let hello_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let (mut seen, mut bytes, mut acked) = (hello.cursor, 0u64, hello.cursor);
        let total = hello.head - hello.cursor;
        let mut curve = vec![(0.0, 0u64)];
        let step = (total / 50).max(1);
        while seen < hello.head {
            match tokio::time::timeout(Duration::from_secs(30), t.recv()).await {
                Ok(Some(Incoming::Msg { seq, body })) => {
                    seen = seq;
                    bytes += body.len() as u64;
                }
                Ok(Some(Incoming::OtherEvent { seq, .. })) => seen = seq,
                Ok(Some(_)) => {}
                Ok(None) => return Err("closed during replay".into()),
                Err(_) => return Err(format!("replay stalled at {seen} of {}", hello.head)),
            }
            if a.ack_every > 0 && seen >= acked + a.ack_every {
                acked = seen;
                t.ack(seen).await?;
            }
            if (seen - hello.cursor) % step == 0 {
                curve.push((t0.elapsed().as_secs_f64(), seen - hello.cursor));
            }
        }
        let replay_secs = t0.elapsed().as_secs_f64();
        t.ack(seen).await?;
        t.close().await;
        let r = CatchupRun {
            events: total,
            fill_secs,
            fill_sends_per_sec: a.events as f64 / fill_secs,
            hello_ms,
            replay_secs,
            events_per_sec: total as f64 / replay_secs,
            mib_per_sec: bytes as f64 / 1048576.0 / replay_secs,
        };
        eprintln!(
            "[catchup] run {run}: {} events replayed in {:.3}s = {:.0} events/s (hello after {:.1} ms); fill {:.0} sends/s",
            r.events, r.replay_secs, r.events_per_sec, r.hello_ms, r.fill_sends_per_sec
        );
        curves.push(curve);
        out.runs.push(r);
    }
    out.median_events_per_sec = median(out.runs.iter().map(|r| r.events_per_sec).collect());
    out.median_fill_sends_per_sec = median(out.runs.iter().map(|r| r.fill_sends_per_sec).collect());
    out.median_hello_ms = median(out.runs.iter().map(|r| r.hello_ms).collect());
    if let Some(p) = &a.svg {
        svg_curves(
            p,
            &format!("catch-up replay, {} events — {}", a.events, server.label),
            &curves,
        );
    }
    Ok(out)
}

/// Sends `count` messages from `sender` to `target` with `window` in flight; a `busy` or
/// `rate_limited` send is retried with the same id. Returns (busy, rate_limited) counts.
#[allow(clippy::too_many_arguments)]
async fn fill_log(
    url: &str,
    addr: std::net::SocketAddr,
    src: std::net::Ipv4Addr,
    sender: &str,
    target: &str,
    body: &str,
    count: u64,
    window: usize,
) -> Result<(u64, u64), String> {
    let (mut s, _) = Conn::open(Target::Courier, url, addr, src, sender, "d0").await?;
    let (mut next, mut done, mut in_flight) = (0u64, 0u64, 0usize);
    let (mut busy, mut limited) = (0u64, 0u64);
    while done < count {
        while in_flight < window && next < count {
            s.send_msg(target, &next.to_string(), body).await?;
            next += 1;
            in_flight += 1;
        }
        match tokio::time::timeout(Duration::from_secs(30), s.recv()).await {
            Ok(Some(Incoming::Sent { .. })) => {
                done += 1;
                in_flight -= 1;
            }
            Ok(Some(Incoming::Error { code, id })) if code == "busy" || code == "rate_limited" => {
                if code == "busy" {
                    busy += 1;
                } else {
                    limited += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                if let Some(id) = id {
                    s.send_msg(target, &id, body).await?;
                }
            }
            Ok(Some(Incoming::Error { code, .. })) => return Err(format!("filling: error {code}")),
            Ok(Some(_)) => {}
            Ok(None) => return Err("sender closed".into()),
            Err(_) => return Err("filling: no `sent` within 30 s".into()),
        }
    }
    s.close().await;
    Ok((busy, limited))
}

fn svg_curves(path: &str, title: &str, curves: &[Vec<(f64, u64)>]) {
    let (w, h, l, r, t, b) = (760.0, 420.0, 80.0, 20.0, 40.0, 50.0);
    let (pw, ph) = (w - l - r, h - t - b);
    let xmax = curves
        .iter()
        .flatten()
        .map(|p| p.0)
        .fold(0.0f64, f64::max)
        .max(1e-3);
    let ymax = curves
        .iter()
        .flatten()
        .map(|p| p.1)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{title}</text>\n",
        w / 2.0
    );
    for i in 0..=5 {
        let f = i as f64 / 5.0;
        let x = l + f * pw;
        let y = t + ph - f * ph;
        s += &format!(
            "<line x1=\"{x}\" y1=\"{t}\" x2=\"{x}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{:.0} ms</text>\
             <line x1=\"{l}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0}</text>\n",
            t + ph,
            t + ph + 16.0,
            f * xmax * 1000.0,
            l + pw,
            l - 6.0,
            y + 4.0,
            f * ymax
        );
    }
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"];
    for (i, c) in curves.iter().enumerate() {
        let pts: Vec<String> = c
            .iter()
            .map(|&(x, y)| {
                format!(
                    "{:.1},{:.1}",
                    l + x / xmax * pw,
                    t + ph - y as f64 / ymax * ph
                )
            })
            .collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>\n",
            colors[i % colors.len()],
            pts.join(" ")
        );
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">time since reconnect (one line per run)</text>\
         <text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">events replayed</text>\
         <rect x=\"{l}\" y=\"{t}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#333\"/></svg>\n",
        l + pw / 2.0,
        h - 8.0,
        t + ph / 2.0,
        t + ph / 2.0
    );
    match std::fs::write(path, s) {
        Ok(()) => eprintln!("wrote {path}"),
        Err(e) => eprintln!("writing {path}: {e}"),
    }
}

pub fn print(r: &CatchupResult) {
    println!();
    println!("catchup — {}", r.server);
    println!(
        "  {:>4} {:>9} {:>12} {:>10} {:>11} {:>12} {:>9}",
        "run", "events", "fill sends/s", "hello ms", "replay s", "events/s", "MiB/s"
    );
    for (i, x) in r.runs.iter().enumerate() {
        println!(
            "  {:>4} {:>9} {:>12.0} {:>10.1} {:>11.3} {:>12.0} {:>9.1}",
            i,
            x.events,
            x.fill_sends_per_sec,
            x.hello_ms,
            x.replay_secs,
            x.events_per_sec,
            x.mib_per_sec
        );
    }
    println!(
        "  median: {:.0} events/s replayed, {:.0} sends/s to fill, hello after {:.1} ms",
        r.median_events_per_sec, r.median_fill_sends_per_sec, r.median_hello_ms
    );
}
