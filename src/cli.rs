//! The command line: `courier serve`, `courier config check`, `courier token`.
//!
//! Owns: flag names and turning flags into `Settings` (which the file and environment layers
//! sit under). Must not start anything (main does, through `server`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::settings::Settings;

#[derive(Parser, Debug)]
#[command(
    name = "courier",
    version,
    about = "Thread-per-core multi-device messaging server"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a client JWT signed with the configured secret.
    Token(TokenArgs),
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Validate a TOML file (with the environment on top) and print the effective settings.
    Check { file: PathBuf },
}

#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    #[arg(long)]
    pub user: String,
    #[arg(long)]
    pub device: String,
    /// Lifetime, e.g. 90s, 30m, 1h, 7d.
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// Configuration file naming the secret (`auth_secret_file`); else COURIER_AUTH_SECRET or
    /// --auth-secret-file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub auth_secret_file: Option<PathBuf>,
}

/// Every flag of `serve`; each one, when given, overrides the file and the environment.
#[derive(clap::Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML configuration file (every key: deploy/courier.example.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Client WebSocket listener address (port 0 picks a free port). Default 127.0.0.1:7070.
    #[arg(long)]
    pub listen: Option<String>,
    /// Directory holding one LMDB environment per shard. Default ./data.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Number of shards (default: what the data dir was created with, else one per core).
    #[arg(long)]
    pub shards: Option<usize>,
    /// Development mode: accept `?user=&device=` without a token (loopback listeners only).
    #[arg(long)]
    pub dev: bool,
    /// Admin listener for /metrics, /healthz, /readyz, /api and /dashboard ("off" disables
    /// it). Default 127.0.0.1:7071.
    #[arg(long)]
    pub admin_listen: Option<String>,
    /// File holding the bearer token of the admin API (or COURIER_ADMIN_TOKEN).
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// File holding the HS256 secret for client JWTs (or COURIER_AUTH_SECRET).
    #[arg(long)]
    pub auth_secret_file: Option<PathBuf>,
    /// fsync (default) or process-crash.
    #[arg(long)]
    pub durability: Option<String>,
    /// human (default) or json.
    #[arg(long)]
    pub log_format: Option<String>,
    /// http:// URL to POST offline-recipient notifications to.
    #[arg(long)]
    pub webhook_url: Option<String>,
    /// Age after which events are pruned, in seconds (default 30 days).
    #[arg(long)]
    pub retention_secs: Option<u64>,
    /// How often expired events are looked for, in milliseconds (default 60 s).
    #[arg(long)]
    pub prune_interval_ms: Option<u64>,
    /// How long the sender may edit a message, in seconds (default 15 min).
    #[arg(long)]
    pub edit_window_secs: Option<u64>,
    /// How long the sender may delete a message for everyone, in seconds (default 48 h).
    #[arg(long)]
    pub delete_window_secs: Option<u64>,
    /// Frames (other than acks) one connection may send per second; burst twice that.
    #[arg(long)]
    pub client_frames_per_second: Option<u32>,
    /// LMDB map size per shard in MiB (address space reserved; writes get `busy` when full).
    #[arg(long)]
    pub map_size_mib: Option<usize>,
    /// Tests only: accept `{"t":"dev_clock","advance_ms":N}` to move the server clock forward.
    /// Requires --dev.
    #[arg(long, hide = true, requires = "dev")]
    pub dev_clock: bool,
}

impl ServeArgs {
    /// The flags that were given, as a settings layer.
    fn settings(&self) -> Settings {
        Settings {
            listen: self.listen.clone(),
            data_dir: self.data_dir.clone(),
            shards: self.shards,
            dev: self.dev.then_some(true),
            admin_listen: self.admin_listen.clone(),
            admin_token_file: self.admin_token_file.clone(),
            auth_secret_file: self.auth_secret_file.clone(),
            durability: self.durability.clone(),
            log_format: self.log_format.clone(),
            webhook_url: self.webhook_url.clone(),
            retention_secs: self.retention_secs,
            prune_interval_ms: self.prune_interval_ms,
            edit_window_secs: self.edit_window_secs,
            delete_window_secs: self.delete_window_secs,
            client_frames_per_second: self.client_frames_per_second,
            map_size_mib: self.map_size_mib,
            dev_clock: self.dev_clock.then_some(true),
            ..Settings::default()
        }
    }

    /// File < environment < flags.
    pub fn into_config(self) -> Result<Config, String> {
        let file = match &self.config {
            Some(path) => Settings::from_file(path)?,
            None => Settings::default(),
        };
        let env = Settings::from_env(|var| std::env::var(var).ok())?;
        file.overlay(env)
            .overlay(self.settings())
            .into_config(|var| std::env::var(var).ok())
    }
}

/// Parses `90s`, `30m`, `1h`, `7d` (or plain seconds).
fn parse_ttl(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |i| text.split_at(i));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s, 30m, 1h or 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("unknown unit {unit:?} in {text:?} (s, m, h, d)")),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse_with_units() {
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_ttl("15"), Ok(Duration::from_secs(15)));
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
    }
}
