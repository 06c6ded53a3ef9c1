//! Smoke run of `--target ejabberd`: one tiny fan-out against the ejabberd peer, checking that
//! every device of every recipient got every message exactly once (carbons and multi-resource
//! routing included). Skips when ejabberd is not installed, which is the normal case on CI:
//! the test never installs it (bench/peers/ejabberd.sh does, by hand, as root).

use std::process::Command;

/// The check bench/peers/ejabberd.sh makes: Debian's Erlang plus ejabberd's code dir.
fn ejabberd_installed() -> bool {
    std::path::Path::new("/usr/bin/erl").exists()
        && std::fs::read_dir("/usr/lib").is_ok_and(|d| {
            d.flatten().any(|arch| {
                std::fs::read_dir(arch.path()).is_ok_and(|l| {
                    l.flatten()
                        .any(|e| e.file_name().to_string_lossy().starts_with("ejabberd-"))
                })
            })
        })
}

#[test]
fn ejabberd_fanout_smoke() {
    if !ejabberd_installed() {
        eprintln!("skipped: ejabberd is not installed (bench/peers/ejabberd.sh)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("cb-ejabberd-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("f.json");
    let out = Command::new(env!("CARGO_BIN_EXE_courier-bench"))
        .args([
            "fanout",
            "--target",
            "ejabberd",
            "--users",
            "4",
            "--devices",
            "3",
            "--senders",
            "2",
            "--rate",
            "50",
            "--warmup",
            "0.2",
            "--duration",
            "0.5",
            "--json",
        ])
        .arg(&json)
        .output()
        .expect("run courier-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(v["expected_deliveries"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["expected_deliveries"], v["received_deliveries"], "{v}");
    assert_eq!(v["duplicate_deliveries"], 0, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    let _ = std::fs::remove_dir_all(dir);
}
