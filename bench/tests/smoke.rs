//! Smoke runs of every mode with tiny numbers: the modes work end to end and stop by
//! themselves. Nothing here is timed or compared: benchmarks are not tests.

use std::path::PathBuf;
use std::process::Command;

fn courier_bin() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    ["target/debug/courier", "target/release/courier"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file())
}

fn bench(args: &[&str]) -> Option<String> {
    let Some(server) = courier_bin() else {
        eprintln!("skipped: build the courier binary first (cargo build)");
        return None;
    };
    let out = Command::new(env!("CARGO_BIN_EXE_courier-bench"))
        .args(args)
        .arg("--server-bin")
        .arg(server)
        .output()
        .expect("run courier-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{args:?} failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(stdout)
}

#[test]
fn connect_smoke() {
    if let Some(out) = bench(&["connect", "--n", "20", "--workers", "2", "--hold", "0"]) {
        assert!(out.contains("connections      20 of 20"), "{out}");
    }
}

#[test]
fn fanout_smoke() {
    let dir = std::env::temp_dir().join(format!("cb-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("f.json");
    let svg = dir.join("f.svg");
    let args = [
        "fanout",
        "--users",
        "4",
        "--devices",
        "2",
        "--senders",
        "2",
        "--rate",
        "50",
        "--warmup",
        "0.2",
        "--duration",
        "0.5",
    ];
    let mut a: Vec<&str> = args.to_vec();
    let (j, s) = (json.to_str().unwrap(), svg.to_str().unwrap());
    a.extend(["--json", j, "--svg", s]);
    if let Some(out) = bench(&a) {
        assert!(out.contains("send → each device"), "{out}");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(v["expected_deliveries"], v["received_deliveries"], "{v}");
        assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn catchup_smoke() {
    if let Some(out) = bench(&["catchup", "--events", "50", "--runs", "1"]) {
        assert!(out.contains("events/s replayed"), "{out}");
    }
}

#[test]
fn group_smoke() {
    if let Some(out) = bench(&[
        "group",
        "--sizes",
        "3",
        "--delivery-rate",
        "20",
        "--warmup",
        "0.2",
        "--duration",
        "0.5",
    ]) {
        assert!(out.contains("group fan-out"), "{out}");
    }
}
