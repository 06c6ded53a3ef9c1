//! Embedding Courier as a gateway tier: the host program brings its own credential check (here,
//! API keys it already issues) and hooks (here, counting messages for offline users, where a
//! real host would queue a push notification).
//!
//! Run: `cargo run --example gateway -- 127.0.0.1:7070 ./gateway-data`, then connect with
//! `ws://127.0.0.1:7070/v1/ws?key=key-alice-phone`. It prints `listening on <addr>` and stops on
//! a line on stdin (or EOF).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use courier::auth::Credentials;
use courier::config::Config;
use courier::hooks::{CredentialVerifier, Hooks, MessageCommitted};
use courier::ids::{DeviceId, UserId};
use courier::server::ServerBuilder;

/// The host's own credentials: API keys mapped to (user, device).
struct ApiKeys(HashMap<String, (String, String)>);

impl CredentialVerifier for ApiKeys {
    fn verify(
        &self,
        query: Option<&str>,
        _authorization: Option<&str>,
    ) -> Result<Credentials, String> {
        let key = query
            .unwrap_or("")
            .split('&')
            .find_map(|pair| pair.strip_prefix("key="))
            .ok_or("no key")?;
        let (user, device) = self.0.get(key).ok_or("unknown key")?;
        Ok(Credentials {
            user: UserId::parse(user).ok_or("bad user")?,
            device: DeviceId::parse(device).ok_or("bad device")?,
        })
    }
}

/// Counts what a push service would be asked to send. Hooks run on shard threads: only quick,
/// non-blocking work here.
#[derive(Default)]
struct PushCounter {
    offline_messages: AtomicU64,
    linked: AtomicU64,
}

impl Hooks for PushCounter {
    fn message_committed(&self, event: &MessageCommitted<'_>) {
        if event.online_devices == 0 {
            self.offline_messages.fetch_add(1, Ordering::Relaxed);
            println!("push: {} has a message from {}", event.user, event.from);
        }
    }

    fn device_linked(&self, user: &UserId, device: &DeviceId) {
        self.linked.fetch_add(1, Ordering::Relaxed);
        println!("linked: {user}/{device}");
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:7070".into());
    let data_dir = args.next().unwrap_or_else(|| "./gateway-data".into());
    let mut config = Config::new(listen.parse()?, data_dir.into());
    config.admin_listen = None;

    let keys = ApiKeys(HashMap::from([
        (
            "key-alice-phone".to_owned(),
            ("alice".to_owned(), "phone".to_owned()),
        ),
        (
            "key-bob-laptop".to_owned(),
            ("bob".to_owned(), "laptop".to_owned()),
        ),
    ]));
    let counter = Arc::new(PushCounter::default());
    let server = ServerBuilder::new(config)
        .verifier(Arc::new(keys))
        .hook(counter.clone())
        .start()?;
    println!("listening on {}", server.local_addr());

    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    server.shutdown();
    println!(
        "stopped: {} offline messages, {} devices linked",
        counter.offline_messages.load(Ordering::Relaxed),
        counter.linked.load(Ordering::Relaxed)
    );
    Ok(())
}
