//! Operations and embedding, at the boundary: the admin listener (metrics, health, API with its
//! token), the webhook for offline recipients against a real HTTP server, configuration files
//! and precedence, token minting, and the embedding example.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

const WAIT: Duration = Duration::from_secs(10);

/// A server child process; killed on drop.
struct Node {
    child: Child,
    _stdin: Option<ChildStdin>,
    addr: SocketAddr,
    admin: Option<SocketAddr>,
    lines: mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(program: &str, args: &[&str], env: &[(&str, &str)], dir: tempfile::TempDir) -> Node {
    let mut command = Command::new(program);
    command
        .args(args)
        .env("MIMALLOC_ALLOW_THP", "0")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("spawn");
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut addr = None;
    let mut admin = None;
    let wants_admin = args
        .windows(2)
        .any(|pair| pair[0] == "--admin-listen" && pair[1] != "off");
    let deadline = Instant::now() + Duration::from_secs(20);
    while addr.is_none() || (wants_admin && admin.is_none()) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).expect("server start-up line");
        if let Some(a) = line.strip_prefix("listening on ") {
            addr = Some(a.parse().unwrap());
        } else if let Some(a) = line.strip_prefix("admin listening on ") {
            admin = Some(a.parse().unwrap());
        }
    }
    let stdin = child.stdin.take();
    Node {
        child,
        _stdin: stdin,
        addr: addr.unwrap(),
        admin,
        lines,
        _dir: dir,
    }
}

fn courier(args: &[&str], env: &[(&str, &str)]) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut all = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    spawn(env!("CARGO_BIN_EXE_courier"), &all, env, dir)
}

type Ws = WebSocket<MaybeTlsStream<TcpStream>>;

fn connect(addr: SocketAddr, query: &str) -> Result<Ws, u16> {
    match tungstenite::connect(format!("ws://{addr}/v1/ws?{query}")) {
        Ok((ws, _)) => {
            if let MaybeTlsStream::Plain(s) = ws.get_ref() {
                s.set_read_timeout(Some(WAIT)).unwrap();
            }
            Ok(ws)
        }
        Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("connect: {e}"),
    }
}

/// Reads frames until one matches; close frames come back as {"close": code}.
fn recv_until(ws: &mut Ws, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Text(text)) => {
                let v: Value = serde_json::from_str(&text).unwrap();
                if pred(&v) {
                    return v;
                }
            }
            Ok(Message::Close(frame)) => {
                let v = json!({"close": frame.map(|f| u16::from(f.code))});
                if pred(&v) {
                    return v;
                }
                panic!("closed while waiting for {what}: {v}");
            }
            Ok(_) => {}
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    }
    panic!("timed out waiting for {what}");
}

fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).unwrap();
}

fn http(method: &str, url: &str, token: Option<&str>) -> (u16, String) {
    let agent = ureq::AgentBuilder::new().timeout(WAIT).build();
    let mut request = agent.request(method, url);
    if let Some(token) = token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    match request.call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("{method} {url}: {e}"),
    }
}

/// Parses Prometheus text: every sample line is `name{labels} value` with a numeric value.
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("sample has a value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {l:?}"));
            assert!(
                series
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_'),
                "bad metric name in {l:?}"
            );
            (series.to_owned(), value)
        })
        .collect()
}

fn total(samples: &[(String, f64)], name: &str) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| series.split('{').next() == Some(name))
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn metrics_parse_as_prometheus_text_and_counters_move_with_traffic() {
    let node = courier(
        &["--dev", "--admin-listen", "127.0.0.1:0", "--shards", "2"],
        &[],
    );
    let admin = node.admin.unwrap();
    assert_eq!(http("GET", &format!("http://{admin}/healthz"), None).0, 200);
    assert_eq!(http("GET", &format!("http://{admin}/readyz"), None).0, 200);
    let before = samples(&http("GET", &format!("http://{admin}/metrics"), None).1);
    assert_eq!(total(&before, "courier_messages_total"), 0.0);

    let mut alice = connect(node.addr, "user=alice&device=phone").unwrap();
    let mut bob = connect(node.addr, "user=bob&device=phone").unwrap();
    recv_until(&mut bob, "hello", |v| v["t"] == "hello");
    for i in 0..3 {
        send(
            &mut alice,
            json!({"t":"send","id":format!("m{i}"),"to":"bob","body":"hi"}),
        );
        recv_until(&mut alice, "sent", |v| v["t"] == "sent");
    }
    send(&mut alice, json!({"t":"nonsense"}));
    recv_until(&mut alice, "error", |v| v["t"] == "error");

    let after = samples(&http("GET", &format!("http://{admin}/metrics"), None).1);
    assert_eq!(total(&after, "courier_messages_total"), 3.0);
    assert_eq!(total(&after, "courier_connections"), 2.0);
    assert!(total(&after, "courier_commits_total") >= 1.0);
    assert!(total(&after, "courier_events_appended_total") >= 6.0);
    assert!(total(&after, "courier_handshakes_total") >= 2.0);
    let unknown: f64 = after
        .iter()
        .filter(|(s, _)| {
            s.starts_with("courier_errors_total") && s.contains("code=\"unknown_type\"")
        })
        .map(|(_, v)| v)
        .sum();
    assert_eq!(unknown, 1.0);
    assert!(total(&after, "courier_commit_latency_ms_count") >= 1.0);
}

#[test]
fn admin_api_refuses_without_the_token_and_performs_each_action_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "let-me-in\n").unwrap();
    let node = courier(
        &[
            "--dev",
            "--admin-listen",
            "127.0.0.1:0",
            "--admin-token-file",
            token_file.to_str().unwrap(),
        ],
        &[],
    );
    let api = format!("http://{}/api", node.admin.unwrap());
    assert_eq!(http("GET", &format!("{api}/stats"), None).0, 401);
    assert_eq!(http("GET", &format!("{api}/stats"), Some("wrong")).0, 401);
    let token = Some("let-me-in");
    let (status, body) = http("GET", &format!("{api}/stats"), token);
    assert_eq!(status, 200, "{body}");
    assert!(serde_json::from_str::<Value>(&body).unwrap()["shards"].is_array());

    let mut phone = connect(node.addr, "user=carol&device=phone").unwrap();
    recv_until(&mut phone, "hello", |v| v["t"] == "hello");
    let mut tablet = connect(node.addr, "user=carol&device=tablet").unwrap();
    recv_until(&mut tablet, "hello", |v| v["t"] == "hello");

    let (status, body) = http("GET", &format!("{api}/users/carol/devices"), token);
    assert_eq!(status, 200, "{body}");
    let devices: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(devices["devices"].as_array().unwrap().len(), 2, "{devices}");
    assert_eq!(devices["devices"][0]["online"], true, "{devices}");

    let (status, _) = http(
        "POST",
        &format!("{api}/users/carol/devices/tablet/unlink"),
        token,
    );
    assert_eq!(status, 200);
    let closed = recv_until(&mut tablet, "close 4003", |v| v.get("close").is_some());
    assert_eq!(closed["close"], 4003);
    assert_eq!(
        http(
            "POST",
            &format!("{api}/users/carol/devices/tablet/unlink"),
            token
        )
        .0,
        404
    );

    let (status, body) = http("POST", &format!("{api}/users/carol/disconnect"), token);
    assert_eq!(status, 200, "{body}");
    let closed = recv_until(&mut phone, "close 1008", |v| v.get("close").is_some());
    assert_eq!(closed["close"], 1008);

    let mut creator = connect(node.addr, "user=dan&device=phone").unwrap();
    recv_until(&mut creator, "hello", |v| v["t"] == "hello");
    send(
        &mut creator,
        json!({"t":"group","op":"create","chat":"g:ops","members":["erin"]}),
    );
    recv_until(&mut creator, "created", |v| v["kind"] == "group");
    let (status, body) = http("GET", &format!("{api}/groups/g:ops/members"), token);
    assert_eq!(status, 200, "{body}");
    let group: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(group["admin"], "dan");
    assert_eq!(group["members"], json!(["dan", "erin"]));
    assert_eq!(
        http("GET", &format!("{api}/groups/g:none/members"), token).0,
        404
    );
    assert_eq!(
        http("GET", &format!("{api}/users/bad%20id/devices"), token).0,
        400
    );
}

#[test]
fn webhook_is_called_for_an_offline_recipient_and_retried_after_a_failure() {
    let hook = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let hook_addr = hook.server_addr().to_ip().unwrap();
    let (tx, bodies) = mpsc::channel();
    thread::spawn(move || {
        for (n, mut request) in hook.incoming_requests().enumerate() {
            let mut body = String::new();
            let _ = request.as_reader().read_to_string(&mut body);
            // The first call fails: the server must retry.
            let status = if n == 0 { 500 } else { 200 };
            let _ = tx.send((status, body));
            let _ = request.respond(tiny_http::Response::empty(status));
        }
    });
    let url = format!("http://{hook_addr}/push");
    let node = courier(
        &["--dev", "--admin-listen", "off", "--webhook-url", &url],
        &[],
    );
    let mut alice = connect(node.addr, "user=alice&device=phone").unwrap();
    let mut carol = connect(node.addr, "user=carol&device=phone").unwrap();
    recv_until(&mut carol, "hello", |v| v["t"] == "hello");
    // carol is online: no notification for this one (it would be the first the hook sees).
    send(
        &mut alice,
        json!({"t":"send","id":"online","to":"carol","body":"hi"}),
    );
    recv_until(&mut alice, "sent", |v| v["t"] == "sent");
    recv_until(&mut carol, "message", |v| v["kind"] == "msg");
    // bob has never connected: his copy is committed with no device online.
    send(
        &mut alice,
        json!({"t":"send","id":"offline","to":"bob","body":"are you there?"}),
    );
    let sent = recv_until(&mut alice, "sent", |v| {
        v["t"] == "sent" && v["id"] == "offline"
    });

    let (first_status, first) = bodies.recv_timeout(WAIT).expect("webhook called");
    assert_eq!(first_status, 500);
    let (second_status, second) = bodies.recv_timeout(WAIT).expect("webhook retried");
    assert_eq!(second_status, 200);
    assert_eq!(first, second, "the retry carries the same notification");
    let note: Value = serde_json::from_str(&second).unwrap();
    assert_eq!(note["user"], "bob");
    assert_eq!(note["from"], "alice");
    assert_eq!(note["chat"], "alice");
    assert_eq!(note["msg"], sent["msg"]);
    assert!(
        bodies.recv_timeout(Duration::from_millis(500)).is_err(),
        "one notification, for bob only"
    );
}

#[test]
fn config_file_env_and_flags_layer_and_unknown_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("courier.toml");
    std::fs::write(&file, "max_body_bytes = 1000\nretention_secs = 60\n").unwrap();
    let check = |env: &[(&str, &str)]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_courier"));
        command.args(["config", "check", file.to_str().unwrap()]);
        for (k, v) in env {
            command.env(k, v);
        }
        command.output().unwrap()
    };
    let out = check(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("max_body_bytes = 1000"), "{text}");
    assert!(text.contains("retention_secs = 60"), "{text}");
    let out = check(&[("COURIER_RETENTION_SECS", "90")]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("retention_secs = 90"));

    // The environment beats the file in the running server too.
    let node = courier(
        &[
            "--dev",
            "--config",
            file.to_str().unwrap(),
            "--admin-listen",
            "off",
        ],
        &[("COURIER_MAX_BODY_BYTES", "500")],
    );
    let mut alice = connect(node.addr, "user=alice&device=phone").unwrap();
    send(
        &mut alice,
        json!({"t":"send","id":"big","to":"bob","body":"x".repeat(600)}),
    );
    let err = recv_until(&mut alice, "too_large", |v| v["t"] == "error");
    assert_eq!(err["code"], "too_large", "env (500) beats the file (1000)");

    std::fs::write(&file, "max_body_bytes = 1000\nmax_bodybytes = 3\n").unwrap();
    let out = check(&[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_bodybytes"));
}

#[test]
fn minted_tokens_connect_as_their_subject() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "hunter2-but-longer").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args([
            "token", "--user", "zoe", "--device", "watch", "--ttl", "10m",
        ])
        .args(["--auth-secret-file", secret.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let node = courier(
        &[
            "--auth-secret-file",
            secret.to_str().unwrap(),
            "--admin-listen",
            "off",
        ],
        &[],
    );
    let mut ws = connect(node.addr, &format!("token={token}")).unwrap();
    let hello = recv_until(&mut ws, "hello", |v| v["t"] == "hello");
    assert_eq!(hello["user"], "zoe");
    assert_eq!(hello["device"], "watch");
    assert_eq!(connect(node.addr, "user=zoe&device=watch").err(), Some(401));
}

#[test]
fn the_gateway_example_embeds_courier_with_its_own_credentials_and_hooks() {
    let example = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|deps| deps.parent())
        .map(|debug| debug.join("examples").join("gateway"))
        .unwrap();
    assert!(
        example.exists(),
        "cargo test builds examples: {}",
        example.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut node = spawn(
        example.to_str().unwrap(),
        &["127.0.0.1:0", data.to_str().unwrap()],
        &[],
        dir,
    );
    assert_eq!(connect(node.addr, "key=nope").err(), Some(401));
    let mut alice = connect(node.addr, "key=key-alice-phone").unwrap();
    let hello = recv_until(&mut alice, "hello", |v| v["t"] == "hello");
    assert_eq!(hello["user"], "alice");
    send(
        &mut alice,
        json!({"t":"send","id":"p1","to":"bob","body":"wake up"}),
    );
    recv_until(&mut alice, "sent", |v| v["t"] == "sent");
    let push = node
        .lines
        .recv_timeout(WAIT)
        .and_then(|line| {
            if line.starts_with("push:") {
                Ok(line)
            } else {
                node.lines.recv_timeout(WAIT)
            }
        })
        .expect("hook output");
    assert!(push.contains("bob has a message from alice"), "{push}");
    let mut stdin = node._stdin.take().unwrap();
    writeln!(stdin).unwrap();
    let status = node.child.wait().unwrap();
    assert!(status.success());
}
