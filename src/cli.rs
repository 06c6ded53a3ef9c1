//! The command line: `courier serve` and its flags.
//!
//! Owns: flag names, defaults and environment fallbacks, and turning them into a `Config`.
//! Must not start anything (main does, through `server`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, Durability};

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
    Serve(ServeArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum DurabilityArg {
    /// fsync every commit before `sent` (survives power loss).
    Fsync,
    /// No fsync per commit (survives a process crash; a power loss loses about a second).
    ProcessCrash,
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Client WebSocket listener address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7070", env = "COURIER_LISTEN")]
    pub listen: SocketAddr,
    /// Directory holding one LMDB environment per shard.
    #[arg(long, default_value = "./data", env = "COURIER_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Number of shards (default: what the data dir was created with, else one per core).
    #[arg(long, env = "COURIER_SHARDS")]
    pub shards: Option<usize>,
    /// Development mode: accept `?user=&device=` without a token (loopback listeners only).
    #[arg(long)]
    pub dev: bool,
    /// Admin listener for /metrics, /healthz, /readyz, /api and /dashboard ("off" disables it).
    #[arg(long, env = "COURIER_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// File holding the bearer token of the admin API (or COURIER_ADMIN_TOKEN).
    #[arg(long, env = "COURIER_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// File holding the HS256 secret for client JWTs.
    #[arg(long, env = "COURIER_AUTH_SECRET_FILE")]
    pub auth_secret_file: Option<PathBuf>,
    /// Age after which events are pruned, in seconds (default 30 days).
    #[arg(long, env = "COURIER_RETENTION_SECS")]
    pub retention_secs: Option<u64>,
    /// How often expired events are looked for, in milliseconds (default 60 s).
    #[arg(long, env = "COURIER_PRUNE_INTERVAL_MS")]
    pub prune_interval_ms: Option<u64>,
    /// How long the sender may edit a message, in seconds (default 15 min).
    #[arg(long, env = "COURIER_EDIT_WINDOW_SECS")]
    pub edit_window_secs: Option<u64>,
    /// How long the sender may delete a message for everyone, in seconds (default 48 h).
    #[arg(long, env = "COURIER_DELETE_WINDOW_SECS")]
    pub delete_window_secs: Option<u64>,
    /// Frames (other than acks) one connection may send per second; burst twice that.
    #[arg(long, env = "COURIER_CLIENT_FRAMES_PER_SECOND")]
    pub client_frames_per_second: Option<u32>,
    /// LMDB map size per shard in MiB (address space reserved; writes get `busy` when full).
    #[arg(long, env = "COURIER_MAP_SIZE_MIB")]
    pub map_size_mib: Option<usize>,
    /// Tests only: accept `{"t":"dev_clock","advance_ms":N}` to move the server clock forward.
    /// Requires --dev.
    #[arg(long, hide = true, requires = "dev")]
    pub dev_clock: bool,
    /// Durability of acknowledged messages.
    #[arg(long, value_enum, default_value = "fsync", env = "COURIER_DURABILITY")]
    pub durability: DurabilityArg,
}

impl ServeArgs {
    /// Builds the configuration; reads the secret file or `COURIER_AUTH_SECRET`.
    pub fn into_config(self) -> Result<Config, String> {
        let mut config = Config::new(self.listen, self.data_dir);
        config.shards = self.shards;
        config.dev = self.dev;
        config.dev_clock = self.dev_clock;
        match self.admin_listen.as_deref() {
            None => {}
            Some("off") => config.admin_listen = None,
            Some(addr) => {
                config.admin_listen = Some(
                    addr.parse()
                        .map_err(|e| format!("--admin-listen {addr:?}: {e}"))?,
                );
                config.admin_listen_explicit = true;
            }
        }
        config.admin_token = match self.admin_token_file {
            Some(path) => Some(read_secret(&path)?),
            None => std::env::var("COURIER_ADMIN_TOKEN")
                .ok()
                .filter(|s| !s.is_empty()),
        };
        if let Some(rate) = self.client_frames_per_second {
            config.client_frames_per_second = rate.max(1);
        }
        if let Some(mib) = self.map_size_mib {
            config.lmdb_map_bytes = mib.max(1) << 20;
        }
        if let Some(secs) = self.retention_secs {
            config.retention = Duration::from_secs(secs);
        }
        if let Some(ms) = self.prune_interval_ms {
            config.prune_interval = Duration::from_millis(ms.max(10));
        }
        if let Some(secs) = self.edit_window_secs {
            config.edit_window = Duration::from_secs(secs);
        }
        if let Some(secs) = self.delete_window_secs {
            config.delete_window = Duration::from_secs(secs);
        }
        config.durability = match self.durability {
            DurabilityArg::Fsync => Durability::Fsync,
            DurabilityArg::ProcessCrash => Durability::ProcessCrashSafe,
        };
        config.auth_secret = match self.auth_secret_file {
            Some(path) => Some(read_secret(&path)?.into_bytes()),
            None => std::env::var("COURIER_AUTH_SECRET")
                .ok()
                .filter(|s| !s.is_empty())
                .map(String::into_bytes),
        };
        Ok(config)
    }
}

/// Reads a secret from a file, trimming surrounding white space; an empty file is an error.
fn read_secret(path: &std::path::Path) -> Result<String, String> {
    let secret = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let trimmed = secret.trim();
    if trimmed.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(trimmed.to_owned())
}
