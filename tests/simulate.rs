//! The simulator (`crates/simulate`, docs/simulator.md) end to end: the `simulate`
//! binary is built and run on the shipped scenarios, and what it prints and writes
//! (JSON, PNG) is checked against what the policies are known to do.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The release binary, built once per test run.
fn simulate() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--release",
                "--quiet",
                "-p",
                "registry-lb-simulate",
            ])
            .current_dir(root())
            .status()
            .expect("cargo build runs");
        assert!(
            status.success(),
            "cargo build -p registry-lb-simulate failed"
        );
        root().join("target/release/simulate")
    })
}

/// Runs a shipped scenario; returns the parsed `--json` output and stdout.
fn run(scenario: &str, extra: &[&str]) -> (serde_json::Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let out = Command::new(simulate())
        .arg(root().join("crates/simulate/scenarios").join(scenario))
        .arg("--json")
        .arg(&json)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{scenario}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    (v, stdout)
}

fn outcome<'a>(v: &'a serde_json::Value, policy: &str) -> &'a serde_json::Value {
    v["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["policy"] == policy)
        .unwrap_or_else(|| panic!("no outcome for {policy}: {v}"))
}

fn f(o: &serde_json::Value, k: &str) -> f64 {
    o[k].as_f64()
        .unwrap_or_else(|| panic!("{k} missing in {o}"))
}

#[test]
fn slow_hosts_get_less_under_peak_ewma_than_round_robin_and_least_request() {
    let (v, stdout) = run("bench-2-of-6-20ms.json", &["--duration", "12"]);
    let rr = outcome(&v, "round_robin");
    let lr = outcome(&v, "least_request");
    let p2c = outcome(&v, "peak_ewma:p2c");
    let hc = outcome(&v, "peak_ewma");
    // Round robin sends the two slow hosts their third, whatever happens.
    assert!((f(rr, "slow_share") - 1.0 / 3.0).abs() < 0.01, "{stdout}");
    // p2c over two distinct candidates: both slow 2/6 × 1/5 of the time at least.
    assert!(f(p2c, "slow_share") > 0.06, "{stdout}");
    // The hot-cold rule over three candidates: always a fast one among them.
    assert!(f(hc, "slow_share") < 0.01, "{stdout}");
    assert!(f(hc, "slow_share") < f(lr, "slow_share"), "{stdout}");
    // And so its p99 is the fast hosts' (20 ms is the slow ones' floor).
    assert!(f(hc, "p99_ms") < 10.0, "{stdout}");
    assert!(f(p2c, "p99_ms") > 20.0, "{stdout}");
    // Every request is accounted for in the shares (six instances).
    let share: f64 = hc["share"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .sum();
    assert!((share - 1.0).abs() < 1e-9 && hc["share"].as_array().unwrap().len() == 6);
    assert!(stdout.contains("lowest p99: peak_ewma "), "{stdout}");
}

#[test]
fn a_degrading_host_is_avoided_and_a_new_one_ramps_up() {
    let (v, stdout) = run(
        "degrade-recover.json",
        &["--policies", "round_robin,peak_ewma"],
    );
    let rr = outcome(&v, "round_robin");
    let pe = outcome(&v, "peak_ewma");
    // The host slow from 10 s to 20 s: round robin keeps sending it its share.
    assert!(f(rr, "slow_share") > 0.03, "{stdout}");
    assert!(f(pe, "slow_share") < 0.005, "{stdout}");
    // The host that joins at 15 s (12 s into the measured seconds) ramps up under
    // slow start (5 s window) and is then a peer of the six steady ones.
    let series = pe["share_series"].as_array().unwrap();
    let at = |s: usize, i: usize| series[s][i].as_f64().unwrap();
    assert_eq!(at(11, 8), 0.0, "{stdout}");
    assert!(
        at(12, 8) > 0.0 && at(12, 8) < at(14, 8) && at(14, 8) < at(16, 8),
        "{stdout}"
    );
    let steady = (0..6).map(|i| at(24, i)).sum::<f64>() / 6.0;
    assert!((at(24, 8) / steady - 1.0).abs() < 0.15, "{stdout}");
    // The host that failed every request from 12 s to 14 s was ejected: few of its
    // per-second shares in that window are near the others'.
    let failing: Vec<f64> = (9..11).map(|s| at(s, 7)).collect();
    assert!(failing.iter().all(|&x| x < 0.05), "{failing:?}");
    assert_eq!(v["instances"], 9);
}

#[test]
fn the_png_is_drawn_and_bad_input_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("out.png");
    let out = Command::new(simulate())
        .arg(root().join("crates/simulate/scenarios/bench-1-of-4-5ms.json"))
        .args(["--duration", "5", "--png"])
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert!(bytes.len() > 10_000, "{} bytes", bytes.len());
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"instances": [{"latency_ms": -1}]}"#).unwrap();
    let out = Command::new(simulate()).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("latency_ms > 0"));
    let out = Command::new(simulate())
        .arg(root().join("crates/simulate/scenarios/bench-4-fast.json"))
        .args(["--policies", "peak_ewma:fastest"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown rule fastest"));
}
