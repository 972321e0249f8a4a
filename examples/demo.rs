//! `./dev demo`: the real Envoy with registry-lb, an embedded registry speaking the
//! Consul HTTP API on 127.0.0.1:8500, three backends with weights 5:1:1, traffic, and
//! the per-backend split — then a registry change and the split after it.
//!
//! Envoy runs envoy/consul.yaml unchanged: listener 127.0.0.1:10000, admin :9901.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::{Backend, ConsulInstance, Envoy, EnvoyConfig, FakeConsul};

fn split(envoy: &Envoy, n: usize) -> BTreeMap<String, u32> {
    let mut c = BTreeMap::new();
    for _ in 0..n {
        let (status, body, _) = envoy.get("/", &[]);
        let k = if status == 200 {
            body
        } else {
            format!("HTTP {status}")
        };
        *c.entry(k).or_insert(0) += 1;
    }
    c
}

fn print_split(title: &str, c: &BTreeMap<String, u32>, weights: &BTreeMap<&str, u32>) {
    let n: u32 = c.values().sum();
    let total_w: u32 = weights.values().sum();
    println!("\n{title}");
    println!(
        "  {:<8} {:>8} {:>8} {:>8}",
        "backend", "requests", "share", "weight"
    );
    for (name, w) in weights {
        let got = c.get(*name).copied().unwrap_or(0);
        println!(
            "  {:<8} {:>8} {:>7.1}% {:>7.1}%",
            name,
            got,
            100.0 * f64::from(got) / f64::from(n.max(1)),
            100.0 * f64::from(*w) / f64::from(total_w.max(1))
        );
    }
    for (k, v) in c {
        if !weights.contains_key(k.as_str()) {
            println!("  {k:<8} {v:>8}   (unexpected)");
        }
    }
}

fn main() {
    let consul = FakeConsul::start_on(8500);
    let backends: Vec<Backend> = Backend::start_all(&["web-1", "web-2", "web-3", "web-4"]);
    let reg = |b: &Backend, w: u32| ConsulInstance::new(&b.name, "127.0.0.1", b.port).weights(w, 1);
    consul.set_service(
        "web",
        vec![
            reg(&backends[0], 5),
            reg(&backends[1], 1),
            reg(&backends[2], 1),
        ],
    );
    println!("registry: Consul API on 127.0.0.1:8500, service `web` = web-1 (weight 5), web-2 (1), web-3 (1)");

    let cfg = EnvoyConfig::from_file("envoy/consul.yaml");
    let envoy = Envoy::start(&cfg, 9901, 10000, 2);
    println!(
        "envoy:    envoy/consul.yaml, listener 127.0.0.1:10000, admin 127.0.0.1:9901, 2 workers"
    );
    let ready = support::wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        envoy
            .stat("wasmcustom.registry_lb.web.snapshot_version")
            .unwrap_or(0)
            >= 1
    });
    assert!(
        ready,
        "registry-lb published no snapshot; Envoy log:\n{}",
        support::tail(&envoy.log(), 40)
    );

    let weights: BTreeMap<&str, u32> = [("web-1", 5), ("web-2", 1), ("web-3", 1)].into();
    print_split(
        "700 requests, smooth weighted round robin:",
        &split(&envoy, 700),
        &weights,
    );

    println!("\nregistry change: web-4 registers (weight 1), web-1's health check turns critical");
    let t0 = Instant::now();
    consul.set_service(
        "web",
        vec![
            reg(&backends[0], 5).status("critical"),
            reg(&backends[1], 1),
            reg(&backends[2], 1),
            reg(&backends[3], 1),
        ],
    );
    while t0.elapsed() < Duration::from_secs(5) && envoy.get("/", &[]).1 != "web-4" {}
    println!(
        "  first request to web-4 after {} ms (Consul blocking query)",
        t0.elapsed().as_millis()
    );
    let weights: BTreeMap<&str, u32> = [("web-2", 1), ("web-3", 1), ("web-4", 1)].into();
    print_split(
        "300 requests after the change:",
        &split(&envoy, 300),
        &weights,
    );

    // Workers add their pick counts to Envoy's stats on their next tick.
    std::thread::sleep(Duration::from_millis(150));
    println!("\nregistry-lb stats (curl -s 127.0.0.1:9901/stats | grep registry_lb):");
    let mut stats: Vec<(String, i64)> = envoy
        .stats()
        .into_iter()
        .filter(|(k, _)| k.starts_with("wasmcustom.registry_lb"))
        .collect();
    stats.sort();
    for (k, v) in stats {
        println!("  {k}: {v}");
    }
}
