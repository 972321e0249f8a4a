//! Registry refresh at scale (native): a 10,000-instance Consul `/v1/health/service`
//! answer shaped like the recorded Consul 1.21 one (`tests/fixtures/consul`).
//! `leader_answer_to_snapshot` is the poller's whole work on one changed answer
//! (parse, merge, hash, slots, encode) without the host calls; `worker_rebuild` is
//! what every worker then does (decode the snapshot, build its table).
//!
//! `cargo bench --bench refresh`. Inside Envoy the same code runs compiled to wasm;
//! `./dev bench` measures that end to end (phase `refresh`).

#![allow(clippy::expect_used)] // a benchmark, not the filter: a broken fixture should stop it

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use registry_lb::config::PluginConfig;
use registry_lb::picker::{Options, Table};
use registry_lb::poller::ServicePoller;
use registry_lb::registry::{consul, HttpResponse};
use registry_lb::rng::SplitMix64;
use registry_lb::snapshot::{self, Snapshot};
use std::time::Duration;

const N: usize = 10_000;

/// N entries: the recorded first entry, with its addresses, ports and ids varied.
fn body() -> Vec<u8> {
    body_with_weight(1)
}

fn body_with_weight(warning: u32) -> Vec<u8> {
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
                .replace("\"Warning\":1", &format!("\"Warning\":{warning}"))
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
    g.bench_function("scan_only_str", |b| {
        b.iter(|| {
            let text = std::str::from_utf8(black_box(&body)).expect("utf-8");
            black_box(serde_json::from_str::<serde::de::IgnoredAny>(text).expect("scan"))
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
    // The leader: two answers that differ in every weight, alternating, each with a
    // new index, so every iteration parses, merges, hashes, assigns slots (against the
    // previous snapshot) and encodes.
    let cfg = PluginConfig::parse(
        br#"{"services":[{"name":"web","policy":"least_request","sources":[{"consul":{"cluster":"consul","service":"web"}}]}]}"#,
    )
    .expect("config");
    let svc = &cfg.services[0];
    let bodies = [body_with_weight(1), body_with_weight(2)];
    let mut poller = ServicePoller::new(svc);
    let mut rng = SplitMix64(7);
    let mut index = 0u64;
    let mut answer = |poller: &mut ServicePoller, rng: &mut SplitMix64| {
        index += 1;
        let headers = vec![("x-consul-index".to_string(), index.to_string())];
        let _ = poller.due(index);
        let resp = HttpResponse {
            status: 200,
            headers: &headers,
            body: &bodies[(index % 2) as usize],
        };
        let out = poller.on_response(0, &resp, index, rng);
        assert!(
            matches!(out, registry_lb::poller::Outcome::Updated { .. }),
            "{out:?}"
        );
        let snap = poller
            .publication(index)
            .expect("a changed answer publishes");
        let bytes = snap.encode();
        poller.published(snap);
        bytes
    };
    let encoded = answer(&mut poller, &mut rng);
    g.bench_function("leader_answer_to_snapshot", |b| {
        b.iter(|| black_box(answer(&mut poller, &mut rng)))
    });
    g.bench_function("worker_rebuild", |b| {
        b.iter(|| {
            let snap = Snapshot::decode(black_box(&encoded)).expect("decode");
            black_box(Table::build(snap, Options::of(svc), &mut rng))
        })
    });
    g.finish();
    println!(
        "body: {} bytes, {} entries; snapshot {} bytes",
        body.len(),
        N,
        encoded.len()
    );
}

criterion_group!(benches, refresh);
criterion_main!(benches);
