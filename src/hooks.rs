//! Extension points for embedding Courier as a gateway tier: credential verification and event
//! hooks, and the built-in webhook hook for offline recipients (mobile push).
//!
//! Owns: the `CredentialVerifier` and `Hooks` traits and `Webhook`, which posts notifications
//! from a bounded queue on a thread of its own. Must not block a shard: hooks are called on
//! shard threads, so an implementation only hands work off (as `Webhook` does).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::auth::{Authenticator, Credentials};
use crate::ids::{DeviceId, MsgId, UserId};

/// Decides who connects. Called on the accepting shard inside the WebSocket handshake, with the
/// request's query string and `Authorization` header; an `Err` becomes HTTP 401 (the reason is
/// only logged). Must be quick: it runs on the shard's thread.
pub trait CredentialVerifier: Send + Sync + 'static {
    fn verify(
        &self,
        query: Option<&str>,
        authorization: Option<&str>,
    ) -> Result<Credentials, String>;
}

impl CredentialVerifier for Authenticator {
    fn verify(
        &self,
        query: Option<&str>,
        authorization: Option<&str>,
    ) -> Result<Credentials, String> {
        self.authenticate(query, authorization)
    }
}

/// A message is durable in one user's log (called once per copy, on that user's owner shard).
#[derive(Debug, Clone)]
pub struct MessageCommitted<'a> {
    /// Whose log holds this copy.
    pub user: &'a UserId,
    pub msg: MsgId,
    /// The chat as `user` names it.
    pub chat: &'a str,
    pub from: &'a str,
    pub ts_ms: u64,
    /// How many of `user`'s devices were online when it was committed.
    pub online_devices: usize,
}

/// Callbacks for an embedder. They run on shard threads and must not block; hand work to a
/// queue of your own. Every method has an empty default.
pub trait Hooks: Send + Sync + 'static {
    /// A recipient's copy of a message is committed (not called for the sender's own copy).
    fn message_committed(&self, _event: &MessageCommitted<'_>) {}
    /// A device's first connection linked it (its `linked` event is committed).
    fn device_linked(&self, _user: &UserId, _device: &DeviceId) {}
    /// A device was unlinked.
    fn device_unlinked(&self, _user: &UserId, _device: &DeviceId) {}
}

/// One notification for the webhook.
#[derive(Debug)]
struct Notification {
    body: String,
}

/// Posts `{"user","msg","chat","from","ts"}` to a URL for every message committed to a user with
/// no online device, so an embedder can send a mobile push. Delivery never waits for it: at
/// `queue_max` pending notifications new ones are dropped (and counted); each is tried up to
/// `retries_max` times with exponential backoff from 100 ms, then dropped.
pub struct Webhook {
    queue: Sender<Notification>,
    pub dropped: Arc<AtomicU64>,
    pub posted: Arc<AtomicU64>,
}

impl Webhook {
    /// Starts the posting thread.
    pub fn start(url: String, queue_max: usize, retries_max: u32) -> std::io::Result<Webhook> {
        let (queue, pending) = crossbeam_channel::bounded(queue_max.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let posted = Arc::new(AtomicU64::new(0));
        let (thread_dropped, thread_posted) = (dropped.clone(), posted.clone());
        thread::Builder::new()
            .name("courier-webhook".into())
            .spawn(move || {
                post_loop(&url, &pending, retries_max, &thread_dropped, &thread_posted)
            })?;
        Ok(Webhook {
            queue,
            dropped,
            posted,
        })
    }
}

fn post_loop(
    url: &str,
    pending: &Receiver<Notification>,
    retries_max: u32,
    dropped: &AtomicU64,
    posted: &AtomicU64,
) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(5))
        .build();
    // Ends when every sender is gone (the server stopped).
    for notification in pending.iter() {
        let mut backoff = Duration::from_millis(100);
        let mut delivered = false;
        for attempt in 1..=retries_max.max(1) {
            match agent
                .post(url)
                .set("Content-Type", "application/json")
                .send_string(&notification.body)
            {
                Ok(_) => {
                    delivered = true;
                    break;
                }
                Err(e) => {
                    tracing::debug!(attempt, error = %e, "webhook post failed");
                    if attempt < retries_max {
                        thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
        }
        if delivered {
            posted.fetch_add(1, Ordering::Relaxed);
        } else {
            dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("webhook notification dropped after retries");
        }
    }
}

impl Hooks for Webhook {
    fn message_committed(&self, event: &MessageCommitted<'_>) {
        if event.online_devices > 0 {
            return;
        }
        let body = serde_json::json!({
            "user": event.user.as_str(),
            "msg": event.msg.0.to_string(),
            "chat": event.chat,
            "from": event.from,
            "ts": event.ts_ms,
        })
        .to_string();
        match self.queue.try_send(Notification { body }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
