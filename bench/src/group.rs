//! `group`: the cost of one message to a group of M members (10, 100, 1024 by default). Every
//! member is one user with one connected device; member 0 creates the group and sends.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::conn::{Conn, Incoming, Target};
use crate::fanout::{self, FanoutArgs, FanoutResult};
use crate::report;
use crate::spawn::{Server, ServerArgs};

#[derive(Clone, Debug, clap::Args)]
pub struct GroupArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Group sizes (members, the sender included).
    #[arg(long, value_delimiter = ',', default_value = "10,100,1024")]
    pub sizes: Vec<usize>,
    /// Deliveries per second to aim for (message rate = this / (members - 1)); 0 = max.
    #[arg(long, default_value_t = 20_000.0)]
    pub delivery_rate: f64,
    /// Group messages in flight when `--delivery-rate 0`.
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,
    #[arg(long, default_value_t = 100)]
    pub ack_every: u64,
    #[arg(long, default_value = "g")]
    pub prefix: String,
    #[arg(long)]
    pub json: Option<String>,
    /// SVG path prefix: one plot per size, `PREFIX-M.svg`.
    #[arg(long)]
    pub svg: Option<String>,
}

#[derive(Serialize, Debug, Default)]
pub struct GroupRow {
    pub members: usize,
    pub msgs_per_sec: f64,
    pub server_cpu_us_per_msg: f64,
    pub create_ms: f64,
    pub result: FanoutResult,
}

pub fn run(a: &GroupArgs) -> Result<Vec<GroupRow>, String> {
    let server = Server::courier(&a.server)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let local = tokio::task::LocalSet::new();
    let mut rows = Vec::new();
    let mut first = 0usize;
    for &m in &a.sizes {
        let row = local.block_on(&rt, one_size(a, &server, m, first))?;
        first += m;
        rows.push(row);
    }
    drop(local);
    drop(rt);
    drop(server);
    print(&rows);
    if let Some(p) = &a.json {
        report::write_json(p, &rows);
    }
    Ok(rows)
}

async fn one_size(
    a: &GroupArgs,
    server: &Server,
    m: usize,
    first: usize,
) -> Result<GroupRow, String> {
    let m = m.max(2);
    let prefix = format!("{}{m}m", a.prefix);
    let pairs = (0..m)
        .map(|i| (format!("{prefix}{i}"), "d0".to_string()))
        .collect();
    let mut conns =
        fanout::open_many(Target::Courier, &server.url, pairs, first, 128, "group").await?;
    let mut creator = conns.remove(0);
    let chat = format!("g:{}{m}", a.prefix);
    let members: Vec<String> = (1..m).map(|i| format!("\"{prefix}{i}\"")).collect();
    let t0 = Instant::now();
    creator
        .send_text(format!(
            "{{\"t\":\"group\",\"op\":\"create\",\"chat\":\"{chat}\",\"members\":[{}]}}",
            members.join(",")
        ))
        .await?;
    // The creator and every member see the `created` event in their logs.
    wait_group_event(&mut creator).await?;
    let mut wait = Vec::new();
    for mut c in conns {
        wait.push(tokio::task::spawn_local(async move {
            wait_group_event(&mut c).await.map(|_| c)
        }));
    }
    let mut members_conns = Vec::new();
    for w in wait {
        members_conns.push(w.await.map_err(|e| e.to_string())??);
    }
    let create_ms = t0.elapsed().as_secs_f64() * 1000.0;
    eprintln!("[group] {chat}: {m} members, created and seen by all in {create_ms:.1} ms");
    let rate = if a.delivery_rate > 0.0 {
        a.delivery_rate / (m - 1) as f64
    } else {
        0.0
    };
    let fa = FanoutArgs {
        server: a.server.clone(),
        target: Target::Courier,
        users: m - 1,
        devices: m - 1,
        senders: 1,
        rate,
        window: a.window,
        warmup: a.warmup,
        duration: a.duration,
        body_bytes: a.body_bytes,
        ack_every: a.ack_every,
        concurrency: 128,
        prefix: prefix.clone(),
        json: None,
        svg: a.svg.as_ref().map(|p| format!("{p}-{m}.svg")),
        group_chat: Some(chat),
    };
    let r = fanout::measure(&fa, server, members_conns, vec![creator]).await?;
    let msgs = r.sends_per_sec;
    let cpu_per_msg = if msgs > 0.0 {
        r.server_cpu_secs * 1e6 / (msgs * r.window_secs)
    } else {
        0.0
    };
    Ok(GroupRow {
        members: m,
        msgs_per_sec: msgs,
        server_cpu_us_per_msg: cpu_per_msg,
        create_ms,
        result: r,
    })
}

async fn wait_group_event(c: &mut Conn) -> Result<(), String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), c.recv()).await {
            Ok(Some(Incoming::OtherEvent { kind, .. })) if kind == "group" => return Ok(()),
            Ok(Some(Incoming::Error { code, .. })) => return Err(format!("group create: {code}")),
            Ok(Some(_)) => {}
            Ok(None) => return Err("closed while waiting for the group event".into()),
            Err(_) => return Err("no group event within 30 s".into()),
        }
    }
}

pub fn print(rows: &[GroupRow]) {
    println!();
    println!(
        "group fan-out — {}",
        rows.first().map(|r| r.result.server.as_str()).unwrap_or("")
    );
    println!(
        "  {:>7} {:>9} {:>12} {:>12} {:>11} {:>11} {:>11} {:>12} {:>7}",
        "members",
        "msgs/s",
        "deliveries/s",
        "CPU µs/msg",
        "CPU µs/dlv",
        "p50 dev ms",
        "p99 all ms",
        "p99 sent ms",
        "lost"
    );
    for r in rows {
        let f = &r.result;
        println!(
            "  {:>7} {:>9.1} {:>12.0} {:>12.1} {:>11.2} {:>11} {:>11} {:>12} {:>7}",
            r.members,
            r.msgs_per_sec,
            f.deliveries_per_sec,
            r.server_cpu_us_per_msg,
            f.server_cpu_us_per_delivery,
            report::ms(f.device_latency.p50_us),
            report::ms(f.all_devices_latency.p99_us),
            report::ms(f.sent_latency.p99_us),
            f.expected_deliveries.saturating_sub(f.received_deliveries)
        );
    }
}
