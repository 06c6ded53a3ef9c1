//! Settings from a TOML file, `COURIER_*` environment variables and flags, in that order of
//! precedence (flags win), turned into a `Config`.
//!
//! Owns: the names of every setting (units in the names), their parsing, unknown-key rejection,
//! and printing the effective configuration. Must not start anything.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Config, Durability, LogFormat};

macro_rules! settings {
    ($($(#[$doc:meta])* $name:ident: $ty:ty,)*) => {
        /// Every setting; `None` = not given at this layer. Field names are the TOML keys and,
        /// upper-cased with a `COURIER_` prefix, the environment variables.
        #[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
        #[serde(deny_unknown_fields)]
        pub struct Settings {
            $($(#[$doc])* #[serde(skip_serializing_if = "Option::is_none")] pub $name: Option<$ty>,)*
        }

        impl Settings {
            /// `top` wins field by field.
            pub fn overlay(self, top: Settings) -> Settings {
                Settings { $($name: top.$name.or(self.$name),)* }
            }

            /// Settings from `COURIER_<NAME>` variables (values in TOML syntax; bare strings
            /// are accepted too).
            pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Result<Settings, String> {
                let mut table = toml::Table::new();
                $(
                    let var = format!("COURIER_{}", stringify!($name).to_uppercase());
                    if let Some(raw) = lookup(&var).filter(|v| !v.is_empty()) {
                        let value = format!("v = {raw}")
                            .parse::<toml::Table>()
                            .ok()
                            .and_then(|mut t| t.remove("v"))
                            .unwrap_or(toml::Value::String(raw.clone()));
                        table.insert(stringify!($name).to_owned(), value);
                    }
                )*
                toml::Value::Table(table)
                    .try_into()
                    .map_err(|e| format!("environment: {e}"))
            }
        }
    };
}

settings! {
    /// Client WebSocket listener, e.g. "127.0.0.1:7070".
    listen: String,
    data_dir: PathBuf,
    shards: usize,
    dev: bool,
    /// Admin listener address, or "off".
    admin_listen: String,
    admin_token_file: PathBuf,
    auth_secret_file: PathBuf,
    /// "fsync" or "process-crash".
    durability: String,
    /// "human" or "json".
    log_format: String,
    /// POST target for offline-recipient notifications (http:// only).
    webhook_url: String,
    webhook_queue_max: usize,
    webhook_retries_max: u32,
    max_frame_bytes: usize,
    max_body_bytes: usize,
    max_devices_per_user: usize,
    max_group_members: usize,
    outbound_queue_max_bytes: usize,
    connections_per_shard_max: usize,
    dedupe_window_per_device: u64,
    handshake_timeout_ms: u64,
    write_timeout_ms: u64,
    ping_interval_secs: u64,
    idle_timeout_secs: u64,
    cross_shard_queue_max: usize,
    cross_shard_ring_slots: usize,
    pending_commits_max: usize,
    commit_batch_max_ops: usize,
    catchup_page_events: usize,
    retention_secs: u64,
    prune_interval_ms: u64,
    prune_batch_events: usize,
    edit_window_secs: u64,
    delete_window_secs: u64,
    typing_per_second: u32,
    client_frames_per_second: u32,
    receipt_scan_max_events: usize,
    map_size_mib: usize,
    owned_users_max: usize,
    owned_groups_max: usize,
    dev_clock: bool,
}

impl Settings {
    /// Reads a TOML file; unknown keys are errors.
    pub fn from_file(path: &Path) -> Result<Settings, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Applies these settings over the defaults. Secrets named by file are read here;
    /// `COURIER_AUTH_SECRET` / `COURIER_ADMIN_TOKEN` (the values themselves) come from `env`
    /// when no file is named.
    pub fn into_config(self, env: impl Fn(&str) -> Option<String>) -> Result<Config, String> {
        let listen: SocketAddr = match &self.listen {
            Some(addr) => addr.parse().map_err(|e| format!("listen {addr:?}: {e}"))?,
            None => SocketAddr::from(([127, 0, 0, 1], 7070)),
        };
        let mut c = Config::new(
            listen,
            self.data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("./data")),
        );
        c.shards = self.shards;
        c.dev = self.dev.unwrap_or(false);
        c.dev_clock = self.dev_clock.unwrap_or(false);
        if c.dev_clock && !c.dev {
            return Err("dev_clock needs dev".into());
        }
        match self.admin_listen.as_deref() {
            None => {}
            Some("off") => c.admin_listen = None,
            Some(addr) => {
                c.admin_listen = Some(
                    addr.parse()
                        .map_err(|e| format!("admin_listen {addr:?}: {e}"))?,
                );
                c.admin_listen_explicit = true;
            }
        }
        c.admin_token = match &self.admin_token_file {
            Some(path) => Some(read_secret(path)?),
            None => env("COURIER_ADMIN_TOKEN").filter(|s| !s.is_empty()),
        };
        c.auth_secret = match &self.auth_secret_file {
            Some(path) => Some(read_secret(path)?.into_bytes()),
            None => env("COURIER_AUTH_SECRET")
                .filter(|s| !s.is_empty())
                .map(String::into_bytes),
        };
        c.durability = match self.durability.as_deref() {
            None | Some("fsync") => Durability::Fsync,
            Some("process-crash") => Durability::ProcessCrashSafe,
            Some(other) => {
                return Err(format!(
                    "durability must be \"fsync\" or \"process-crash\", not {other:?}"
                ));
            }
        };
        c.log_format = match self.log_format.as_deref() {
            None | Some("human") => LogFormat::Human,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(format!(
                    "log_format must be \"human\" or \"json\", not {other:?}"
                ));
            }
        };
        if let Some(url) = &self.webhook_url {
            if !url.starts_with("http://") {
                return Err(format!("webhook_url must be an http:// URL, not {url:?}"));
            }
            c.webhook_url = Some(url.clone());
        }
        let positive = |name: &str, v: usize| {
            if v == 0 {
                Err(format!("{name} must be at least 1"))
            } else {
                Ok(v)
            }
        };
        macro_rules! set {
            ($field:ident) => {
                if let Some(v) = self.$field {
                    c.$field = positive(stringify!($field), v as usize)? as _;
                }
            };
            ($field:ident => $target:ident, $convert:expr) => {
                if let Some(v) = self.$field {
                    positive(stringify!($field), v as usize)?;
                    c.$target = $convert(v);
                }
            };
        }
        set!(webhook_queue_max);
        set!(webhook_retries_max);
        set!(max_frame_bytes);
        set!(max_body_bytes);
        set!(max_devices_per_user);
        set!(max_group_members);
        set!(outbound_queue_max_bytes);
        set!(connections_per_shard_max);
        set!(dedupe_window_per_device);
        set!(handshake_timeout_ms => handshake_timeout, Duration::from_millis);
        set!(write_timeout_ms => write_timeout, Duration::from_millis);
        set!(ping_interval_secs => ping_interval, Duration::from_secs);
        set!(idle_timeout_secs => idle_timeout, Duration::from_secs);
        set!(cross_shard_queue_max);
        set!(cross_shard_ring_slots);
        set!(pending_commits_max);
        set!(commit_batch_max_ops);
        set!(catchup_page_events);
        set!(retention_secs => retention, Duration::from_secs);
        set!(prune_interval_ms => prune_interval, Duration::from_millis);
        set!(prune_batch_events);
        set!(edit_window_secs => edit_window, Duration::from_secs);
        set!(delete_window_secs => delete_window, Duration::from_secs);
        set!(typing_per_second);
        set!(client_frames_per_second);
        set!(receipt_scan_max_events);
        set!(owned_users_max);
        set!(owned_groups_max);
        set!(map_size_mib => lmdb_map_bytes, |mib: usize| mib << 20);
        if c.max_body_bytes > c.max_frame_bytes {
            return Err("max_body_bytes cannot exceed max_frame_bytes".into());
        }
        if c.idle_timeout <= c.ping_interval {
            return Err("idle_timeout_secs must be longer than ping_interval_secs".into());
        }
        self.check_paths()?;
        Ok(c)
    }

    fn check_paths(&self) -> Result<(), String> {
        if let Some(dir) = &self.data_dir
            && dir.as_os_str().is_empty()
        {
            return Err("data_dir is empty".into());
        }
        Ok(())
    }

    /// Every setting of `config`, for `courier config check` (secrets are not printed).
    pub fn effective(config: &Config) -> Settings {
        Settings {
            listen: Some(config.listen.to_string()),
            data_dir: Some(config.data_dir.clone()),
            shards: config.shards,
            dev: Some(config.dev),
            admin_listen: Some(
                config
                    .admin_listen
                    .map_or("off".to_owned(), |a| a.to_string()),
            ),
            admin_token_file: None,
            auth_secret_file: None,
            durability: Some(
                match config.durability {
                    Durability::Fsync => "fsync",
                    Durability::ProcessCrashSafe => "process-crash",
                }
                .into(),
            ),
            log_format: Some(
                match config.log_format {
                    LogFormat::Human => "human",
                    LogFormat::Json => "json",
                }
                .into(),
            ),
            webhook_url: config.webhook_url.clone(),
            webhook_queue_max: Some(config.webhook_queue_max),
            webhook_retries_max: Some(config.webhook_retries_max),
            max_frame_bytes: Some(config.max_frame_bytes),
            max_body_bytes: Some(config.max_body_bytes),
            max_devices_per_user: Some(config.max_devices_per_user),
            max_group_members: Some(config.max_group_members),
            outbound_queue_max_bytes: Some(config.outbound_queue_max_bytes),
            connections_per_shard_max: Some(config.connections_per_shard_max),
            dedupe_window_per_device: Some(config.dedupe_window_per_device),
            handshake_timeout_ms: Some(config.handshake_timeout.as_millis() as u64),
            write_timeout_ms: Some(config.write_timeout.as_millis() as u64),
            ping_interval_secs: Some(config.ping_interval.as_secs()),
            idle_timeout_secs: Some(config.idle_timeout.as_secs()),
            cross_shard_queue_max: Some(config.cross_shard_queue_max),
            cross_shard_ring_slots: Some(config.cross_shard_ring_slots),
            pending_commits_max: Some(config.pending_commits_max),
            commit_batch_max_ops: Some(config.commit_batch_max_ops),
            catchup_page_events: Some(config.catchup_page_events),
            retention_secs: Some(config.retention.as_secs()),
            prune_interval_ms: Some(config.prune_interval.as_millis() as u64),
            prune_batch_events: Some(config.prune_batch_events),
            edit_window_secs: Some(config.edit_window.as_secs()),
            delete_window_secs: Some(config.delete_window.as_secs()),
            typing_per_second: Some(config.typing_per_second),
            client_frames_per_second: Some(config.client_frames_per_second),
            receipt_scan_max_events: Some(config.receipt_scan_max_events),
            map_size_mib: Some(config.lmdb_map_bytes >> 20),
            owned_users_max: Some(config.owned_users_max),
            owned_groups_max: Some(config.owned_groups_max),
            dev_clock: Some(config.dev_clock),
        }
    }

    /// TOML text of these settings.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

/// Reads a secret from a file, trimming surrounding white space; an empty file is an error.
pub fn read_secret(path: &Path) -> Result<String, String> {
    let secret = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let trimmed = secret.trim();
    if trimmed.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = toml::from_str::<Settings>("listen = \"127.0.0.1:1\"\nlisten_port = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_port"), "{err}");
    }

    #[test]
    fn file_then_env_then_flags() {
        let file: Settings =
            toml::from_str("max_body_bytes = 100\nretention_secs = 10\nshards = 2\n").unwrap();
        let env = Settings::from_env(|var| match var {
            "COURIER_RETENTION_SECS" => Some("20".into()),
            "COURIER_SHARDS" => Some("3".into()),
            "COURIER_DURABILITY" => Some("process-crash".into()),
            _ => None,
        })
        .unwrap();
        let flags = Settings {
            shards: Some(4),
            ..Settings::default()
        };
        let config = file
            .overlay(env)
            .overlay(flags)
            .into_config(no_env)
            .unwrap();
        assert_eq!(config.max_body_bytes, 100);
        assert_eq!(config.retention, Duration::from_secs(20));
        assert_eq!(config.shards, Some(4));
        assert_eq!(config.durability, Durability::ProcessCrashSafe);
    }

    #[test]
    fn bad_values_are_refused_with_the_key() {
        for (text, key) in [
            ("durability = \"sometimes\"", "durability"),
            ("max_body_bytes = 0", "max_body_bytes"),
            ("listen = \"nowhere\"", "listen"),
            ("webhook_url = \"https://x\"", "webhook_url"),
        ] {
            let settings: Settings = toml::from_str(text).unwrap();
            let err = settings.into_config(no_env).unwrap_err();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn effective_settings_round_trip() {
        let config = Settings::default().into_config(no_env).unwrap();
        let printed = Settings::effective(&config).to_toml();
        let back: Settings = toml::from_str(&printed).unwrap();
        let again = back.into_config(no_env).unwrap();
        assert_eq!(again.max_frame_bytes, config.max_frame_bytes);
        assert_eq!(again.retention, config.retention);
    }
}
