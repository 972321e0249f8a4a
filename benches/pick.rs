//! Pick cost per policy at n = 10, 100 and 10,000 instances (native).
//!
//! `cargo bench --bench pick`. Weights are uneven (1, 2, 3, 1, 2, 3, …) so the
//! weighted paths are measured: round robin uses its precomputed cycle up to 100
//! instances and earliest-deadline-first (O(log n)) at 10,000; random, least_request
//! and peak_ewma draw from the alias table (O(1)); ring_hash binary-searches the ring
//! (O(log n)); maglev reads one table slot (O(1)). Table construction is not timed.
//!
//! peak_ewma has no balancer-level pick in production: it is measured as the request
//! path drives it, through the routing table (`picker::Table::pick`: a distinct
//! weighted pair from the pool's alias table, then `PeakEwma::cheaper`), and with its
//! per-request bookkeeping (`Table::peak_start` when the request is routed,
//! `Table::peak_end` with its latency when it ends).

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use registry_lb::balancer::bounded_load::BoundedLoad;
use registry_lb::balancer::maglev::{self, Maglev};
use registry_lb::balancer::random::Random;
use registry_lb::balancer::ring_hash::{self, RingHash};
use registry_lb::balancer::{LeastRequest, RoundRobin};
use registry_lb::config::Policy;
use registry_lb::instance::{Instance, State};
use registry_lb::picker::{Options, Request, Table};
use registry_lb::rng::{Rng, SplitMix64};
use registry_lb::snapshot::{Entry, Snapshot};
use std::time::Duration;

const SIZES: [usize; 3] = [10, 100, 10_000];

fn weights(n: usize) -> Vec<u32> {
    (0..n).map(|i| 1 + (i % 3) as u32).collect()
}

fn hosts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.{}.{}.{}:8080", i >> 16, (i >> 8) & 255, i & 255))
        .collect()
}

/// A snapshot of `n` healthy instances with the bench's weights, slot i for instance i.
fn snapshot(n: usize) -> Snapshot {
    let entries = weights(n)
        .into_iter()
        .enumerate()
        .filter_map(|(i, w)| {
            let addr = format!("10.{}.{}.{}:8080", i >> 16, (i >> 8) & 255, i & 255);
            let mut instance = Instance::new(addr.parse().ok()?, w);
            instance.state = State::Healthy;
            Some(Entry {
                instance,
                source: 0,
                slot: i as u32,
            })
        })
        .collect();
    Snapshot {
        version: 1,
        entries,
        ..Default::default()
    }
}

/// A request with no hash key, subset or load, as a peak_ewma pick sees it.
fn unkeyed(rng: &mut SplitMix64, now_ms: u64) -> Request<'_, SplitMix64, fn(u32) -> i64> {
    Request {
        rng,
        now_ms,
        hash: None,
        subset: None,
        active: |_| 0,
        total_active: 0,
    }
}

fn pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    for n in SIZES {
        let w = weights(n);
        let keys = hosts(n);
        let mut rng = SplitMix64(1);

        let mut rr = RoundRobin::new(&w, &mut rng);
        g.bench_with_input(BenchmarkId::new("round_robin", n), &n, |b, _| {
            b.iter(|| black_box(rr.pick()))
        });

        let lr = LeastRequest::new(&w, 2);
        let load: Vec<i64> = (0..n).map(|_| rng.below(8) as i64).collect();
        g.bench_with_input(BenchmarkId::new("least_request", n), &n, |b, _| {
            b.iter(|| black_box(lr.pick(&mut rng, |i| load.get(i).copied().unwrap_or(0))))
        });

        let random = Random::new(&w);
        g.bench_with_input(BenchmarkId::new("random", n), &n, |b, _| {
            b.iter(|| black_box(random.pick(&mut rng)))
        });

        let ring = RingHash::new(
            &keys,
            &w,
            ring_hash::DEFAULT_MIN_RING_SIZE,
            ring_hash::DEFAULT_MAX_RING_SIZE,
        );
        g.bench_with_input(BenchmarkId::new("ring_hash", n), &n, |b, _| {
            b.iter(|| black_box(ring.pick(rng.next_u64())))
        });

        let table = Maglev::new(&keys, &w, maglev::DEFAULT_TABLE_SIZE);
        g.bench_with_input(BenchmarkId::new("maglev", n), &n, |b, _| {
            b.iter(|| black_box(table.pick(rng.next_u64())))
        });

        // Every instance answered once, in 1 to 10 ms, within the last second.
        let mut table = Table::build(snapshot(n), Options::new(Policy::PeakEwma), &mut rng);
        for slot in 0..n as u32 {
            table.peak_start(slot);
            let rtt = 1_000_000 + rng.below(9_000_000);
            table.peak_end(slot, Some(rtt), false, rng.below(1_000));
        }
        let mut now = 1_000u64;
        g.bench_with_input(BenchmarkId::new("peak_ewma", n), &n, |b, _| {
            b.iter(|| {
                now += 1;
                let mut req = unkeyed(&mut rng, now);
                black_box(table.pick(&mut req).map(|e| e.slot))
            })
        });
        g.bench_with_input(BenchmarkId::new("peak_ewma+start/end", n), &n, |b, _| {
            b.iter(|| {
                now += 1;
                let mut req = unkeyed(&mut rng, now);
                let slot = table.pick(&mut req).map(|e| e.slot);
                if let Some(slot) = slot {
                    table.peak_start(slot);
                    table.peak_end(slot, Some(5_000_000), false, now);
                }
                black_box(slot)
            })
        });

        // The same, as the policy was before `rule`: p2c over Finagle's cost.
        let mut p2c = Options::new(Policy::PeakEwma);
        p2c.peak_ewma_rule = registry_lb::balancer::peak_ewma::Rule::Cost;
        p2c.peak_ewma_choices = 2;
        let mut table = Table::build(snapshot(n), p2c, &mut rng);
        for slot in 0..n as u32 {
            table.peak_start(slot);
            let rtt = 1_000_000 + rng.below(9_000_000);
            table.peak_end(slot, Some(rtt), false, rng.below(1_000));
        }
        g.bench_with_input(BenchmarkId::new("peak_ewma_p2c", n), &n, |b, _| {
            b.iter(|| {
                now += 1;
                let mut req = unkeyed(&mut rng, now);
                black_box(table.pick(&mut req).map(|e| e.slot))
            })
        });

        // Bounded loads over the ring, every instance at half its cap: the first
        // choice is taken, so this is the walk set-up plus one capacity check.
        let bounded = BoundedLoad::new(&w, 125);
        let total = 4 * n as u64;
        let per: Vec<u64> = (0..n).map(|i| bounded.capacity(i, total) / 2).collect();
        g.bench_with_input(BenchmarkId::new("ring_hash+bounded_load", n), &n, |b, _| {
            b.iter(|| {
                black_box(bounded.pick(ring.walk(rng.next_u64()), total, |i| {
                    per.get(i).copied().unwrap_or(0)
                }))
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1)).sample_size(30);
    targets = pick
}
criterion_main!(benches);
