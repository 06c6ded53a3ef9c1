//! `courier-bench`: the load generator of Courier. Connection density, 1:1 fan-out to
//! multi-device users, catch-up replay, group fan-out, and the same workloads against peer
//! servers. Only ever targets loopback.

mod catchup;
mod compare;
mod conn;
mod connect;
mod fanout;
mod group;
mod procfs;
mod report;
mod spawn;
mod xmpp;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "courier-bench",
    version,
    about = "Load generator for Courier (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Open N idle authenticated connections, hold them, report connect rate and memory.
    Connect(connect::ConnectArgs),
    /// U users × D devices, S senders at an open-loop rate (or max): deliveries/s, latency, CPU.
    Fanout(fanout::FanoutArgs),
    /// A device offline for N events reconnects: events/s replayed.
    Catchup(catchup::CatchupArgs),
    /// One message to groups of 10, 100, 1024 members.
    Group(group::GroupArgs),
    /// Courier and each available peer server, connect and fanout, one table.
    Compare(compare::CompareArgs),
    /// (internal) one worker process of `connect`.
    #[command(hide = true)]
    ConnectWorker(connect::WorkerArgs),
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Connect(a) => connect::run(&a).map(|_| ()),
        Cmd::Fanout(a) => fanout::run(&a).map(|_| ()),
        Cmd::Catchup(a) => catchup::run(&a).map(|_| ()),
        Cmd::Group(a) => group::run(&a).map(|_| ()),
        Cmd::Compare(a) => compare::run(&a).map(|_| ()),
        Cmd::ConnectWorker(a) => connect::worker(a),
    };
    if let Err(e) = r {
        eprintln!("courier-bench: {e}");
        std::process::exit(1);
    }
}
