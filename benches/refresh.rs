//! Registry refresh at scale (native): a 10,000-instance Consul `/v1/health/service`
//! answer shaped like the recorded Consul 1.21 one (`tests/fixtures/consul`), parsed,
//! hashed, given slots and encoded as the shared-data snapshot — the main-thread work
//! of one refresh that changed something, without the host calls.
//!
//! `cargo bench --bench refresh`. Inside Envoy the same code runs compiled to wasm;
//! `./dev bench` measures that end to end (phase `refresh`).

#![allow(clippy::expect_used)] // a benchmark, not the filter: a broken fixture should stop it

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use registry_lb::registry::consul;
use registry_lb::snapshot::{self, Snapshot};
use std::time::Duration;

const N: usize = 10_000;

/// N entries: the recorded first entry, with its addresses, ports and ids varied.
fn body() -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/consul/health_service_modern_shape.json"
    );
    let text = std::fs::read_to_string(path).expect("fixture");
    let all: Vec<serde_json::Value> = serde_json::from_str(&text).expect("fixture json");
    let tpl = serde_json::to_string(&all[0]).expect("template");
    let entries: Vec<String> = (0..N)
        .map(|i| {
            let ip = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
            tpl.replace("10.1.10.12", &ip)
                .replace("\"Port\":8000", &format!("\"Port\":{}", 8000 + i % 100))
        })
        .collect();
    format!("[{}]", entries.join(",")).into_bytes()
}

fn refresh(c: &mut Criterion) {
    let body = body();
    let mut g = c.benchmark_group("refresh_consul_10000");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.measurement_time(Duration::from_secs(5)).sample_size(20);
    // The floor of any serde_json parse: scanning the document, keeping nothing.
    g.bench_function("scan_only", |b| {
        b.iter(|| {
            black_box(
                serde_json::from_slice::<serde::de::IgnoredAny>(black_box(&body)).expect("scan"),
            )
        })
    });
    g.bench_function("parse", |b| {
        b.iter(|| black_box(consul::parse(black_box(&body)).expect("parse")))
    });
    g.bench_function("parse_hash_slots_encode", |b| {
        b.iter(|| {
            let (instances, _) = consul::parse(&body).expect("parse");
            let hash = snapshot::content_hash(instances.iter());
            let entries =
                snapshot::assign_slots(&[], instances.into_iter().map(|i| (i, 0)).collect());
            let snap = Snapshot {
                version: 1,
                hash,
                published_ms: 0,
                tokens: vec![String::new()],
                answered: vec![true],
                entries,
            };
            black_box(snap.encode())
        })
    });
    g.finish();
    println!("body: {} bytes, {} entries", body.len(), N);
}

criterion_group!(benches, refresh);
criterion_main!(benches);
