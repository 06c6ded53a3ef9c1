//! The `courier` binary: parse the command line, start the server, stop it on a signal.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use courier::cli::{Cli, Command};
use courier::server::Server;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let Cli { command } = Cli::parse();
    let Command::Serve(args) = command;
    let config = match args.into_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("courier: {e}");
            return ExitCode::from(2);
        }
    };
    // Registered before the server starts, so a signal right after `listening on` is a clean
    // stop rather than the default termination.
    let mut signals = match Signals::new([SIGINT, SIGTERM]) {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("courier: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::start(config) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("courier: refusing to start: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The client address first: tools wait for the first "listening on" line.
    println!("listening on {}", server.local_addr());
    if let Some(admin) = server.admin_addr() {
        println!("admin listening on {admin}");
    }
    let _ = std::io::stdout().flush();
    if let Some(signal) = signals.forever().next() {
        tracing::info!(signal, "stopping");
    }
    server.shutdown();
    ExitCode::SUCCESS
}
