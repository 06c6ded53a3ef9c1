//! `compare`: the same connect and fanout workloads against Courier and each available peer
//! server, one after the other, in one table.

use serde::Serialize;

use crate::conn::Target;
use crate::connect::{self, ConnectArgs, ConnectResult};
use crate::fanout::{self, FanoutArgs, FanoutResult};
use crate::report;
use crate::spawn::{Server, ServerArgs};

#[derive(Clone, Debug, clap::Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Idle connections for the density part.
    #[arg(long, default_value_t = 10_000)]
    pub n: usize,
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    #[arg(long, default_value_t = 3)]
    pub devices: usize,
    #[arg(long, default_value_t = 10)]
    pub senders: usize,
    /// Sends in flight per sender in the max-rate run.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    #[arg(long, default_value_t = 8.0)]
    pub duration: f64,
    /// Peers to include when available (nats, ejabberd).
    #[arg(long, value_delimiter = ',', default_value = "nats")]
    pub peers: Vec<String>,
    #[arg(long)]
    pub json: Option<String>,
}

#[derive(Serialize, Debug)]
pub struct Row {
    pub server: String,
    pub connect: Option<ConnectResult>,
    pub fanout_max: Option<FanoutResult>,
    pub fanout_half: Option<FanoutResult>,
}

fn have(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// Starts `t` for one part of the comparison. A peer that does not start is left out of the
/// table (`None`); Courier not starting is an error: there would be nothing to compare against.
fn start_or_skip(t: Target, server: &ServerArgs) -> Result<Option<Server>, String> {
    match fanout::start_server(t, server) {
        Ok(s) => Ok(Some(s)),
        Err(e) if t != Target::Courier => {
            eprintln!("[compare] {} did not start: {e}; skipped", t.name());
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

pub fn run(a: &CompareArgs) -> Result<Vec<Row>, String> {
    let mut targets = vec![Target::Courier];
    for p in &a.peers {
        match p.as_str() {
            "nats" if have("nats-server") => targets.push(Target::Nats),
            "nats" => {
                eprintln!("[compare] nats-server not installed (bench/peers/nats.sh): skipped")
            }
            "ejabberd" if crate::spawn::ejabberd_installed() => targets.push(Target::Ejabberd),
            "ejabberd" => eprintln!(
                "[compare] ejabberd not installed (bench/peers/ejabberd.sh installs it): skipped"
            ),
            other => eprintln!("[compare] peer {other} not supported: skipped"),
        }
    }
    let mut rows = Vec::new();
    for t in targets {
        let ca = ConnectArgs {
            server: a.server.clone(),
            target: t,
            n: a.n,
            workers: None,
            concurrency: 128,
            hold: 1,
            timeout: 300,
            json: None,
            svg: None,
            prefix: "c".into(),
        };
        let Some(srv) = start_or_skip(t, &a.server)? else {
            continue;
        };
        let conn = connect::run_on(&ca, &srv)
            .map_err(|e| eprintln!("[compare] connect: {e}"))
            .ok();
        drop(srv);
        let mut fa = FanoutArgs {
            server: a.server.clone(),
            target: t,
            users: a.users,
            devices: a.devices,
            senders: a.senders,
            rate: 0.0,
            window: a.window,
            warmup: a.warmup,
            duration: a.duration,
            body_bytes: 64,
            ack_every: 100,
            concurrency: 128,
            prefix: "f".into(),
            json: None,
            svg: None,
            group_chat: None,
        };
        let Some(srv) = start_or_skip(t, &a.server)? else {
            continue;
        };
        let max = fanout::run_on(&fa, &srv)
            .map_err(|e| eprintln!("[compare] fanout: {e}"))
            .ok();
        let half = max.as_ref().and_then(|m| {
            fa.rate = (m.sends_per_sec / 2.0).max(1.0);
            fa.prefix = "h".into();
            fanout::run_on(&fa, &srv)
                .map_err(|e| eprintln!("[compare] fanout: {e}"))
                .ok()
        });
        let label = srv.label.clone();
        drop(srv);
        rows.push(Row {
            server: label,
            connect: conn,
            fanout_max: max,
            fanout_half: half,
        });
    }
    print(a, &rows);
    if let Some(p) = &a.json {
        report::write_json(p, &rows);
    }
    Ok(rows)
}

fn print(a: &CompareArgs, rows: &[Row]) {
    println!();
    println!(
        "compare — connect {} idle; fanout {} users × {} devices, {} senders (max rate, then half of it)",
        a.n, a.users, a.devices, a.senders
    );
    println!(
        "  {:<34} {:>9} {:>11} {:>11} {:>12} {:>11} {:>11} {:>12}",
        "server",
        "conn/s",
        "RSS/conn",
        "kernel/conn",
        "max dlv/s",
        "CPU µs/dlv",
        "half dlv/s",
        "half p99 ms"
    );
    for r in rows {
        let c = r.connect.as_ref();
        let m = r.fanout_max.as_ref();
        let h = r.fanout_half.as_ref();
        println!(
            "  {:<34} {:>9} {:>11} {:>11} {:>12} {:>11} {:>11} {:>12}",
            r.server,
            c.map(|c| format!("{:.0}", c.connects_per_sec))
                .unwrap_or("-".into()),
            c.map(|c| report::kib(c.rss_per_conn)).unwrap_or("-".into()),
            c.map(|c| report::kib(c.kernel_tcp_per_conn))
                .unwrap_or("-".into()),
            m.map(|m| format!("{:.0}", m.deliveries_per_sec))
                .unwrap_or("-".into()),
            m.map(|m| format!("{:.2}", m.server_cpu_us_per_delivery))
                .unwrap_or("-".into()),
            h.map(|h| format!("{:.0}", h.deliveries_per_sec))
                .unwrap_or("-".into()),
            h.map(|h| report::ms(h.device_latency.p99_us))
                .unwrap_or("-".into()),
        );
    }
}
