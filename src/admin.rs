//! The admin listener: metrics, health, and a small JSON admin API, off the client port.
//!
//! Owns: one plain OS thread serving HTTP/1.1 (tiny_http) on `--admin-listen`: `/metrics`
//! (Prometheus text), `/healthz`, `/readyz`, `/api/...` behind a bearer token, and the dashboard
//! page. Questions about users and groups go to their owner shard over a channel and the answer
//! comes back; the thread never touches shard state itself.
//!
//! Must not: run on an executor thread (it blocks), or answer API calls without the token (only
//! a `--dev` server with no token configured leaves the API open, on loopback).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use futures_channel::mpsc::UnboundedSender;
use tiny_http::{Header, Method, Request, Response, Server as HttpServer};

use crate::ids::{DeviceId, GroupId, UserId, owner_shard};
use crate::metrics::{ShardMetrics, render_prometheus, render_stats};

/// How long the admin thread waits for a shard to answer.
const SHARD_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest admin request body read (the API takes no bodies; this bounds garbage).
const BODY_MAX_BYTES: usize = 4096;

/// A question for a user's or group's owner shard.
#[derive(Debug)]
pub enum AdminRequest {
    /// A user's devices with cursors and online state.
    Devices { user: UserId },
    /// Unlink one device (as the user's `unlink` frame does).
    Unlink { user: UserId, device: DeviceId },
    /// Close every connection of a user.
    Disconnect { user: UserId },
    /// A group's members and admin.
    GroupMembers { group: GroupId },
}

/// An admin question and where its answer goes.
#[derive(Debug)]
pub struct AdminCall {
    pub request: AdminRequest,
    pub reply: mpsc::Sender<Result<serde_json::Value, AdminError>>,
}

/// Why an admin call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminError {
    NotFound(String),
    Internal(String),
}

/// What the admin thread needs from the server.
pub struct AdminContext {
    pub metrics: Vec<Arc<ShardMetrics>>,
    pub shards: Vec<UnboundedSender<AdminCall>>,
    /// `None` with `open_without_token`: the API is open (dev mode on loopback).
    pub token: Option<String>,
    pub open_without_token: bool,
    pub started: Instant,
    /// The dashboard page and its script.
    pub assets: &'static [(&'static str, &'static str, &'static str)],
}

/// The running admin listener.
pub struct AdminServer {
    http: Arc<HttpServer>,
    join: Option<thread::JoinHandle<()>>,
    addr: SocketAddr,
}

impl AdminServer {
    /// Binds `addr` and serves on a thread of its own.
    pub fn start(addr: SocketAddr, context: AdminContext) -> Result<AdminServer, String> {
        let http = HttpServer::http(addr)
            .map_err(|e| format!("cannot bind the admin listener {addr}: {e}"))?;
        let bound = http
            .server_addr()
            .to_ip()
            .ok_or("the admin listener has no IP address")?;
        let http = Arc::new(http);
        let serving = http.clone();
        let join = thread::Builder::new()
            .name("courier-admin".into())
            .spawn(move || {
                for request in serving.incoming_requests() {
                    handle(&context, request);
                }
            })
            .map_err(|e| format!("cannot start the admin thread: {e}"))?;
        Ok(AdminServer {
            http,
            join: Some(join),
            addr: bound,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and joins the thread.
    pub fn stop(mut self) {
        self.http.unblock();
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
    }
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("static header is valid")
}

fn respond(request: Request, status: u16, content_type: &str, body: String) {
    let response = Response::from_string(body)
        .with_status_code(status)
        .with_header(header("Content-Type", content_type))
        .with_header(header("Cache-Control", "no-store"));
    let _ = request.respond(response);
}

fn respond_json(request: Request, status: u16, value: serde_json::Value) {
    respond(request, status, "application/json", value.to_string());
}

fn authorized(context: &AdminContext, request: &Request) -> bool {
    let Some(token) = &context.token else {
        return context.open_without_token;
    };
    request
        .headers()
        .iter()
        .find(|h| h.field.equiv("Authorization"))
        .and_then(|h| h.value.as_str().strip_prefix("Bearer "))
        .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), token.as_bytes()))
}

/// Compares secrets without leaking where they differ through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn handle(context: &AdminContext, mut request: Request) {
    // Drain (a bounded amount of) any body so keep-alive clients stay in sync.
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(
        &mut std::io::Read::take(request.as_reader(), BODY_MAX_BYTES as u64),
        &mut sink,
    );
    let url = request.url().to_owned();
    let path = url.split('?').next().unwrap_or("").to_owned();
    let method = request.method().clone();
    let uptime = context.started.elapsed();
    match (&method, path.as_str()) {
        (Method::Get, "/healthz") => respond(request, 200, "text/plain", "ok\n".into()),
        (Method::Get, "/readyz") => {
            let ready = context.metrics.iter().all(|m| {
                ShardMetrics::get(&m.ready) == 1 && ShardMetrics::get(&m.storage_failing) == 0
            });
            if ready {
                respond(request, 200, "text/plain", "ready\n".into());
            } else {
                respond(request, 503, "text/plain", "not ready\n".into());
            }
        }
        (Method::Get, "/metrics") => respond(
            request,
            200,
            "text/plain; version=0.0.4",
            render_prometheus(&context.metrics, uptime),
        ),
        (Method::Get, asset) if context.assets.iter().any(|(p, _, _)| *p == asset) => {
            let (_, content_type, body) = context
                .assets
                .iter()
                .find(|(p, _, _)| *p == asset)
                .expect("just found");
            respond(request, 200, content_type, (*body).to_owned());
        }
        (_, api) if api.starts_with("/api/") => {
            if !authorized(context, &request) {
                return respond_json(
                    request,
                    401,
                    serde_json::json!({"error": "missing or wrong admin bearer token"}),
                );
            }
            api_call(context, request, &method, api, uptime);
        }
        _ => respond(request, 404, "text/plain", "not found\n".into()),
    }
}

fn api_call(
    context: &AdminContext,
    request: Request,
    method: &Method,
    path: &str,
    uptime: Duration,
) {
    let parts: Vec<&str> = path.trim_start_matches("/api/").split('/').collect();
    let shards = context.shards.len();
    let call = match (method, parts.as_slice()) {
        (Method::Get, ["stats"]) => {
            return respond(
                request,
                200,
                "application/json",
                render_stats(&context.metrics, uptime),
            );
        }
        (Method::Get, ["users", user, "devices"]) => UserId::parse(user).map(|user| {
            (
                owner_shard(user.as_str(), shards),
                AdminRequest::Devices { user },
            )
        }),
        (Method::Post, ["users", user, "devices", device, "unlink"]) => {
            match (UserId::parse(user), DeviceId::parse(device)) {
                (Some(user), Some(device)) => Some((
                    owner_shard(user.as_str(), shards),
                    AdminRequest::Unlink { user, device },
                )),
                _ => None,
            }
        }
        (Method::Post, ["users", user, "disconnect"]) => UserId::parse(user).map(|user| {
            (
                owner_shard(user.as_str(), shards),
                AdminRequest::Disconnect { user },
            )
        }),
        (Method::Get, ["groups", group, "members"]) => {
            let group = group.strip_prefix("g:").unwrap_or(group);
            GroupId::parse(group).map(|group| {
                (
                    owner_shard(&format!("g:{group}"), shards),
                    AdminRequest::GroupMembers { group },
                )
            })
        }
        _ => {
            return respond_json(
                request,
                404,
                serde_json::json!({"error": "no such API call"}),
            );
        }
    };
    let Some((shard, admin_request)) = call else {
        return respond_json(
            request,
            400,
            serde_json::json!({"error": "ids are 1-64 bytes of [A-Za-z0-9_.-]"}),
        );
    };
    let (reply, answer) = mpsc::channel();
    let sent = context.shards[shard.0].unbounded_send(AdminCall {
        request: admin_request,
        reply,
    });
    if sent.is_err() {
        return respond_json(request, 503, serde_json::json!({"error": "shard stopped"}));
    }
    match answer.recv_timeout(SHARD_ANSWER_TIMEOUT) {
        Ok(Ok(value)) => respond_json(request, 200, value),
        Ok(Err(AdminError::NotFound(what))) => {
            respond_json(request, 404, serde_json::json!({"error": what}))
        }
        Ok(Err(AdminError::Internal(what))) => {
            respond_json(request, 500, serde_json::json!({"error": what}))
        }
        Err(_) => respond_json(
            request,
            504,
            serde_json::json!({"error": "the shard did not answer"}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_is_exact() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
