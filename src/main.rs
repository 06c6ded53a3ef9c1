//! The `courier` binary: parse the command line, then serve, check a config, or mint a token.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use courier::cli::{Cli, Command, ConfigCommand, ServeArgs, TokenArgs};
use courier::config::LogFormat;
use courier::server::Server;
use courier::settings::{Settings, read_secret};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let Cli { command } = Cli::parse();
    let result = match command {
        Command::Serve(args) => serve(*args),
        Command::Config(ConfigCommand::Check { file }) => check_config(&file),
        Command::Token(args) => token(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("courier: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let config = args.into_config()?;
    init_logging(config.log_format);
    // Registered before the server starts, so a signal right after `listening on` is a clean
    // stop rather than the default termination.
    let mut signals = Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let server = Server::start(config).map_err(|e| format!("refusing to start: {e}"))?;
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
    Ok(())
}

fn check_config(file: &std::path::Path) -> Result<(), String> {
    let settings =
        Settings::from_file(file)?.overlay(Settings::from_env(|v| std::env::var(v).ok())?);
    let config = settings.into_config(|v| std::env::var(v).ok())?;
    print!("{}", Settings::effective(&config).to_toml());
    println!("# {}: ok", file.display());
    Ok(())
}

fn token(args: TokenArgs) -> Result<(), String> {
    let secret = match (&args.auth_secret_file, &args.config) {
        (Some(path), _) => read_secret(path)?.into_bytes(),
        (None, Some(config)) => {
            let settings = Settings::from_file(config)?;
            let config = settings.into_config(|v| std::env::var(v).ok())?;
            config
                .auth_secret
                .ok_or("the configuration names no auth secret")?
        }
        (None, None) => std::env::var("COURIER_AUTH_SECRET")
            .ok()
            .filter(|s| !s.is_empty())
            .ok_or("no secret: pass --auth-secret-file or --config, or set COURIER_AUTH_SECRET")?
            .into_bytes(),
    };
    let token = courier::auth::mint_token(&secret, &args.user, &args.device, args.ttl)?;
    println!("{token}");
    Ok(())
}
