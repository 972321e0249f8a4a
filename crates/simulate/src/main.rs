//! `simulate`: the offline what-if for registry-lb's policies. It runs the filter's
//! own pick code — `picker::Table` with its balancers, `outlier` (consecutive-5xx
//! ejection, half-open trials) and `slow_start` — with a simulated clock and seeded
//! randomness, against a discrete-event model of a fleet, and prints per policy the
//! throughput, latency percentiles and the share each instance got; `--png` draws
//! them, `--json` writes every figure.
//!
//! The model (a discrete-event simulation in the manner of Law & Kelton, *Simulation
//! Modeling and Analysis*): `proxies` Envoys of `workers` workers each. Clients are
//! closed loops like wrk (`connections` per proxy, each sending its next request
//! when the last one is answered; connections are spread over the workers), or an
//! open Poisson stream (`rps` per proxy). A worker is a single FIFO server spending
//! `proxy_cpu_us` per request (its share of Envoy's CPU; this is what bounds
//! throughput in the benchmark), then picks with its own `Table` (its own
//! round-robin cursor and peak-EWMA state, as in Envoy) while in-flight counts and
//! the outlier state are shared by the workers of one proxy (Envoy-wide gauges and
//! shared data). A backend serves `capacity` requests at once (FIFO queue beyond),
//! each taking a log-normal time (median `latency_ms`, shape `spread`), then holds
//! the answer `delay_ms` more without occupying capacity (a fixed fault delay, as the
//! benchmark's slow backends do); `error_rate` answers are 5xx. Instances can join
//! and leave (`join_s`, `leave_s`: a new snapshot, new tables, as a registry change
//! does) and change over time (`events`: a host that degrades or recovers).
//! `stalls` pauses workers now and then (a loaded machine descheduling Envoy): what
//! comes in meanwhile is handled when the worker resumes, so every answer in flight
//! looks slower — the noise a latency estimate has to live with.
//!
//! Left out: the network, connection pools and Envoy's own queueing between the
//! filter and the upstream; active health checks, zones and subsets (the table
//! supports them; the scenario format does not set them); load reports; the hand-off
//! and the host calls (their cost is in `proxy_cpu_us`); retries.

use plotters::prelude::*;
use registry_lb::balancer::peak_ewma::Rule;
use registry_lb::config::Policy;
use registry_lb::instance::{Instance, State};
use registry_lb::outlier::{self, Outliers, Result_};
use registry_lb::picker::{Options, Request, Table};
use registry_lb::rng::{Rng, SplitMix64};
use registry_lb::slow_start::SlowStart;
use registry_lb::snapshot::{Entry, Snapshot};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    #[serde(default)]
    name: String,
    #[serde(default = "d_duration")]
    duration_s: f64,
    #[serde(default = "d_warmup")]
    warmup_s: f64,
    #[serde(default = "one")]
    proxies: u32,
    #[serde(default = "one")]
    workers: u32,
    /// Closed-loop clients per proxy (wrk's connections); ignored when `rps` is set.
    #[serde(default = "d_connections")]
    connections: u32,
    /// Open-loop Poisson arrivals per proxy per second.
    #[serde(default)]
    rps: Option<f64>,
    #[serde(default = "d_proxy_cpu")]
    proxy_cpu_us: f64,
    #[serde(default = "one_u64")]
    seed: u64,
    instances: Vec<InstanceSpec>,
    #[serde(default)]
    policies: Vec<String>,
    #[serde(default)]
    slow_start: Option<SlowStartSpec>,
    #[serde(default)]
    outlier: Option<OutlierSpec>,
    /// Pauses of each worker (a loaded machine descheduling Envoy): answers that
    /// come in meanwhile are seen when it resumes, so their latency includes it.
    #[serde(default)]
    stalls: Option<StallSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct StallSpec {
    /// Mean time between a worker's pauses (exponential).
    every_ms: f64,
    /// Mean length of a pause (exponential).
    ms: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceSpec {
    /// This many identical instances.
    #[serde(default = "one")]
    count: u32,
    latency_ms: f64,
    #[serde(default = "d_spread")]
    spread: f64,
    #[serde(default)]
    capacity: Option<u32>,
    #[serde(default)]
    delay_ms: f64,
    #[serde(default)]
    error_rate: f64,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    join_s: Option<f64>,
    #[serde(default)]
    leave_s: Option<f64>,
    #[serde(default)]
    events: Vec<EventSpec>,
}

/// From `at_s` on, the given fields change.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventSpec {
    at_s: f64,
    #[serde(default)]
    latency_ms: Option<f64>,
    #[serde(default)]
    delay_ms: Option<f64>,
    #[serde(default)]
    error_rate: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlowStartSpec {
    window_ms: u64,
    #[serde(default = "d_aggression")]
    aggression: f64,
    #[serde(default = "d_min_weight")]
    min_weight_percent: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutlierSpec {
    consecutive_5xx: u32,
    #[serde(default = "d_base_ejection")]
    base_ejection_ms: u64,
    #[serde(default = "d_max_ejection")]
    max_ejection_ms: u64,
    #[serde(default = "d_max_ejection_percent")]
    max_ejection_percent: u32,
}

fn d_duration() -> f64 {
    30.0
}
fn d_warmup() -> f64 {
    2.0
}
fn one() -> u32 {
    1
}
fn one_u64() -> u64 {
    1
}
fn d_connections() -> u32 {
    32
}
fn d_proxy_cpu() -> f64 {
    80.0
}
fn d_spread() -> f64 {
    0.25
}
fn d_aggression() -> f64 {
    1.0
}
fn d_min_weight() -> u32 {
    10
}
fn d_base_ejection() -> u64 {
    30_000
}
fn d_max_ejection() -> u64 {
    300_000
}
fn d_max_ejection_percent() -> u32 {
    10
}

/// A policy as named on the command line: `round_robin`, `least_request[:choices]`,
/// `random`, `peak_ewma` (the default rule and choices), `peak_ewma:p2c` (Finagle's
/// cost over two choices), `peak_ewma:<hot_cold|cost>:<choices>`.
#[derive(Debug, Clone)]
struct PolicySpec {
    label: String,
    options: Options,
}

fn parse_policy(s: &str) -> Result<PolicySpec, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let num = |p: Option<&&str>, what: &str| -> Result<Option<u32>, String> {
        p.map(|x| {
            x.parse::<u32>()
                .map_err(|e| format!("policy {s}: {what}: {e}"))
        })
        .transpose()
    };
    let mut o;
    match parts.first().copied().unwrap_or("") {
        "round_robin" => o = Options::new(Policy::RoundRobin),
        "random" => o = Options::new(Policy::Random),
        "least_request" => {
            o = Options::new(Policy::LeastRequest);
            if let Some(c) = num(parts.get(1), "choices")? {
                o.choice_count = c.clamp(2, 16);
            }
        }
        "peak_ewma" => {
            o = Options::new(Policy::PeakEwma);
            match parts.get(1).copied() {
                None => {}
                Some("p2c") => {
                    o.peak_ewma_rule = Rule::Cost;
                    o.peak_ewma_choices = 2;
                }
                Some("hot_cold") => o.peak_ewma_rule = Rule::HotCold,
                Some("cost") => o.peak_ewma_rule = Rule::Cost,
                Some(r) => return Err(format!("policy {s}: unknown rule {r}")),
            }
            if let Some(c) = num(parts.get(2), "choices")? {
                if !(2..=8).contains(&c) {
                    return Err(format!("policy {s}: choices must be between 2 and 8"));
                }
                o.peak_ewma_choices = c;
            }
        }
        other => return Err(format!("unknown policy {other:?}")),
    }
    Ok(PolicySpec {
        label: s.to_string(),
        options: o,
    })
}

const DEFAULT_POLICIES: [&str; 4] = ["round_robin", "least_request", "peak_ewma:p2c", "peak_ewma"];

/// Wall-clock origin of simulated time (Unix ms), so registration times look real.
const EPOCH_MS: u64 = 1_700_000_000_000;
const NS: u64 = 1_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// A client connection (or the open stream) sends a request to proxy/worker.
    Send { conn: u32 },
    /// The worker finished its CPU work on a request: pick and forward.
    Forward { req: u32 },
    /// A backend finished serving.
    Served { req: u32 },
    /// The answer (after the fixed delay) reaches the proxy.
    Answer { req: u32 },
    /// Housekeeping once per 100 ms: outlier expiry, slow start, registry changes.
    Tick,
}

#[derive(Debug, Clone)]
struct Req {
    conn: u32,
    proxy: usize,
    worker: usize,
    sent_ns: u64,
    picked_ns: u64,
    backend: usize,
    error: bool,
    trial: bool,
    slow: bool,
}

struct Backend {
    latency_ms: f64,
    spread: f64,
    capacity: u32,
    delay_ms: f64,
    error_rate: f64,
    weight: u32,
    join_ns: Option<u64>,
    leave_ns: Option<u64>,
    events: Vec<EventSpec>,
    next_event: usize,
    busy: u32,
    queue: VecDeque<u32>,
}

impl Backend {
    fn live(&self, t: u64) -> bool {
        !matches!(self.join_ns, Some(j) if t < j) && !matches!(self.leave_ns, Some(l) if t >= l)
    }
}

struct Worker {
    table: Table,
    rng: SplitMix64,
    busy_until: u64,
    stall_until: u64,
    next_stall: u64,
}

/// Exponential variate with this mean.
fn exponential(rng: &mut SplitMix64, mean: f64) -> f64 {
    -uniform(rng).max(1e-12).ln() * mean
}

/// Whether `w` is paused at `t` (`Some(resume time)`), moving its pauses along.
fn stalled(w: &mut Worker, t: u64, spec: Option<&StallSpec>, rng: &mut SplitMix64) -> Option<u64> {
    let spec = spec?;
    while w.next_stall <= t {
        let len = (exponential(rng, spec.ms) * 1e6) as u64;
        w.stall_until = w.stall_until.max(w.next_stall + len);
        w.next_stall += ((exponential(rng, spec.every_ms) * 1e6) as u64).max(1);
    }
    (t < w.stall_until).then_some(w.stall_until)
}

struct Proxy {
    workers: Vec<Worker>,
    in_flight: Vec<i64>,
    outliers: Outliers,
    consecutive: Vec<u32>,
    applied_generation: u64,
}

/// What one policy's run measured.
#[derive(Debug, Serialize)]
struct Outcome {
    policy: String,
    requests: u64,
    rps: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    errors: u64,
    /// Requests sent to an instance while it had a fixed delay (`delay_ms` > 0).
    slow_share: f64,
    /// Share of picks per instance.
    share: Vec<f64>,
    /// Per second after the warm-up: share of picks per instance.
    share_series: Vec<Vec<f64>>,
    /// Per second: share of picks to delayed instances.
    slow_series: Vec<f64>,
    /// The largest, over instances that never change (no delay, no events, there
    /// throughout), of the coefficient of variation of the instance's per-second
    /// share: how much shares move over time (herding).
    max_share_cv: Option<f64>,
    /// Latency percentiles for the plot: (percent, ms).
    cdf: Vec<(f64, f64)>,
}

/// Normal variate (Box–Muller) from the model's own generator.
fn normal(rng: &mut SplitMix64) -> f64 {
    let u1 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    (-2.0 * (u1.max(1e-300)).ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn uniform(rng: &mut SplitMix64) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250 + 1) as u8], 8080))
}

fn expand(sc: &Scenario) -> Vec<Backend> {
    let mut out = Vec::new();
    for s in &sc.instances {
        for _ in 0..s.count {
            let mut events = s.events.clone();
            events.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
            out.push(Backend {
                latency_ms: s.latency_ms,
                spread: s.spread,
                capacity: s.capacity.unwrap_or(u32::MAX),
                delay_ms: s.delay_ms,
                error_rate: s.error_rate,
                weight: s.weight.max(1),
                join_ns: s.join_s.map(|x| (x * NS as f64) as u64),
                leave_ns: s.leave_s.map(|x| (x * NS as f64) as u64),
                events,
                next_event: 0,
                busy: 0,
                queue: VecDeque::new(),
            });
        }
    }
    out
}

fn snapshot(backends: &[Backend], t: u64, version: u64) -> Snapshot {
    Snapshot {
        version,
        entries: backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.live(t))
            .map(|(i, b)| {
                let mut inst = Instance::new(addr(i), b.weight);
                inst.state = State::Healthy;
                inst.registered_ms = EPOCH_MS + b.join_ns.unwrap_or(0) / 1_000_000;
                Entry {
                    instance: inst,
                    source: 0,
                    slot: i as u32,
                }
            })
            .collect(),
        ..Default::default()
    }
}

fn run(sc: &Scenario, pol: &PolicySpec) -> Outcome {
    let mut backends = expand(sc);
    let n = backends.len();
    let end_ns = (sc.duration_s * NS as f64) as u64;
    let warm_ns = (sc.warmup_s * NS as f64) as u64;
    let mut model_rng = SplitMix64(sc.seed ^ 0x5EED);
    let slow_start = sc
        .slow_start
        .as_ref()
        .map(|s| SlowStart::new(s.window_ms, s.aggression, s.min_weight_percent));
    let opol = sc.outlier.as_ref().map(|o| outlier::Policy {
        consecutive_5xx: o.consecutive_5xx,
        base_ejection_ms: o.base_ejection_ms,
        max_ejection_ms: o.max_ejection_ms,
        max_ejection_percent: o.max_ejection_percent,
    });
    let weight_at = |backends: &[Backend], t: u64| {
        let ages: Vec<Option<u64>> = backends
            .iter()
            .map(|b| b.join_ns.map(|j| t.saturating_sub(j) / 1_000_000))
            .collect();
        // As the filter does while weights move: every weight × the ramp factor in
        // thousandths, so a weight-1 instance at 10 % is 100 against 1000.
        move |slot: u32, w: u32| match (&slow_start, ages.get(slot as usize)) {
            (Some(ss), Some(age)) => {
                u32::try_from(u64::from(w) * u64::from(ss.factor_ppm(*age)) / 1_000)
                    .unwrap_or(u32::MAX)
                    .max(1)
            }
            _ => w,
        }
    };
    let mut version = 1;
    let mut was_ramping = false;
    let mut live: Vec<bool> = backends.iter().map(|b| b.live(0)).collect();
    let mut proxies: Vec<Proxy> = (0..sc.proxies as usize)
        .map(|p| Proxy {
            workers: (0..sc.workers as usize)
                .map(|w| {
                    let mut rng =
                        SplitMix64(sc.seed.wrapping_mul(1000 + p as u64) ^ (w as u64 + 1) << 32);
                    let mut table = Table::build(
                        snapshot(&backends, 0, version),
                        pol.options.clone(),
                        &mut rng,
                    );
                    table.apply(
                        &Outliers::default(),
                        &weight_at(&backends, 0),
                        EPOCH_MS,
                        &mut rng,
                    );
                    Worker {
                        table,
                        rng,
                        busy_until: 0,
                        stall_until: 0,
                        next_stall: 0,
                    }
                })
                .collect(),
            in_flight: vec![0; n],
            outliers: Outliers::default(),
            consecutive: vec![0; n],
            applied_generation: 0,
        })
        .collect();
    let mut heap: BinaryHeap<Reverse<(u64, u64, Ev)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |heap: &mut BinaryHeap<Reverse<(u64, u64, Ev)>>, t: u64, e: Ev| {
        seq += 1;
        heap.push(Reverse((t, seq, e)));
    };
    let conns = if sc.rps.is_some() {
        sc.proxies
    } else {
        sc.proxies * sc.connections
    };
    for c in 0..conns {
        push(&mut heap, u64::from(c) * 1_000, Ev::Send { conn: c });
    }
    push(&mut heap, 100_000_000, Ev::Tick);
    let mut reqs: Vec<Req> = Vec::new();
    let mut free: Vec<u32> = Vec::new();
    let mut latencies: Vec<u32> = Vec::new();
    let (mut picks, mut slow_picks, mut errors) = (vec![0u64; n], 0u64, 0u64);
    let seconds = ((end_ns - warm_ns.min(end_ns)) / NS) as usize + 1;
    let mut per_second = vec![vec![0u64; n]; seconds];
    let mut slow_per_second = vec![0u64; seconds];
    let mut rr_worker = vec![0usize; proxies.len()];
    let mut ever_slow = vec![false; n];
    for (i, b) in backends.iter().enumerate() {
        ever_slow[i] = b.delay_ms > 0.0 || !b.events.is_empty();
    }
    while let Some(Reverse((t, _, ev))) = heap.pop() {
        if t >= end_ns {
            break;
        }
        let now_ms = EPOCH_MS + t / 1_000_000;
        match ev {
            Ev::Send { conn } => {
                let proxy = (conn % sc.proxies) as usize;
                let worker = if sc.rps.is_some() {
                    rr_worker[proxy] = (rr_worker[proxy] + 1) % sc.workers as usize;
                    rr_worker[proxy]
                } else {
                    ((conn / sc.proxies) % sc.workers) as usize
                };
                let r = Req {
                    conn,
                    proxy,
                    worker,
                    sent_ns: t,
                    picked_ns: 0,
                    backend: usize::MAX,
                    error: false,
                    trial: false,
                    slow: false,
                };
                let id = match free.pop() {
                    Some(id) => {
                        reqs[id as usize] = r;
                        id
                    }
                    None => {
                        reqs.push(r);
                        (reqs.len() - 1) as u32
                    }
                };
                let w = &mut proxies[proxy].workers[worker];
                let start = w.busy_until.max(t);
                w.busy_until = start + (sc.proxy_cpu_us * 1_000.0) as u64;
                push(&mut heap, w.busy_until, Ev::Forward { req: id });
                if let Some(rps) = sc.rps {
                    let gap = -uniform(&mut model_rng).max(1e-12).ln() / rps;
                    push(&mut heap, t + (gap * NS as f64) as u64, Ev::Send { conn });
                }
            }
            Ev::Forward { req } => {
                let (proxy, worker) = (reqs[req as usize].proxy, reqs[req as usize].worker);
                let w = &mut proxies[proxy].workers[worker];
                if let Some(resume) = stalled(w, t, sc.stalls.as_ref(), &mut model_rng) {
                    push(&mut heap, resume, Ev::Forward { req });
                    continue;
                }
                let p = &mut proxies[proxy];
                let in_flight = &p.in_flight;
                let total: i64 = in_flight.iter().sum();
                let w = &mut p.workers[worker];
                let mut request = Request {
                    rng: &mut w.rng,
                    now_ms,
                    hash: None,
                    subset: None,
                    active: |slot: u32| in_flight.get(slot as usize).copied().unwrap_or(0),
                    total_active: total.max(0) as u64,
                };
                let Some(slot) = w.table.pick(&mut request).map(|e| e.slot) else {
                    // Nothing routable: answered at once as an error.
                    errors += 1;
                    free.push(req);
                    if sc.rps.is_none() {
                        push(
                            &mut heap,
                            t,
                            Ev::Send {
                                conn: reqs[req as usize].conn,
                            },
                        );
                    }
                    continue;
                };
                w.table.peak_start(slot);
                let i = slot as usize;
                p.in_flight[i] += 1;
                let mut trial = false;
                if p.outliers.is_half_open(slot) && p.outliers.start_trial(slot, now_ms) {
                    trial = true;
                }
                let b = &mut backends[i];
                let slow = b.delay_ms > 0.0;
                let r = &mut reqs[req as usize];
                r.picked_ns = t;
                r.backend = i;
                r.trial = trial;
                r.slow = slow;
                if t >= warm_ns {
                    picks[i] += 1;
                    let s = ((t - warm_ns) / NS) as usize;
                    if let Some(row) = per_second.get_mut(s) {
                        row[i] += 1;
                    }
                    if slow {
                        slow_picks += 1;
                        if let Some(x) = slow_per_second.get_mut(s) {
                            *x += 1;
                        }
                    }
                }
                if b.busy < b.capacity {
                    b.busy += 1;
                    let svc = b.latency_ms * (b.spread * normal(&mut model_rng)).exp();
                    push(&mut heap, t + (svc * 1e6) as u64, Ev::Served { req });
                } else {
                    b.queue.push_back(req);
                }
            }
            Ev::Served { req } => {
                let i = reqs[req as usize].backend;
                let b = &mut backends[i];
                b.busy -= 1;
                if let Some(next) = b.queue.pop_front() {
                    b.busy += 1;
                    let svc = b.latency_ms * (b.spread * normal(&mut model_rng)).exp();
                    push(&mut heap, t + (svc * 1e6) as u64, Ev::Served { req: next });
                }
                reqs[req as usize].error = uniform(&mut model_rng) < b.error_rate;
                push(&mut heap, t + (b.delay_ms * 1e6) as u64, Ev::Answer { req });
            }
            Ev::Answer { req } => {
                let r = reqs[req as usize].clone();
                let w = &mut proxies[r.proxy].workers[r.worker];
                if let Some(resume) = stalled(w, t, sc.stalls.as_ref(), &mut model_rng) {
                    push(&mut heap, resume, Ev::Answer { req });
                    continue;
                }
                let slot = r.backend as u32;
                let p = &mut proxies[r.proxy];
                p.in_flight[r.backend] -= 1;
                let rtt = t - r.picked_ns;
                p.workers[r.worker]
                    .table
                    .peak_end(slot, Some(rtt.max(1)), r.error, now_ms);
                if let Some(op) = &opol {
                    let result = if r.error {
                        Result_::Failure
                    } else {
                        Result_::Success
                    };
                    if r.trial {
                        p.outliers.end_trial(slot, result, op, now_ms);
                    } else if r.error {
                        p.consecutive[r.backend] += 1;
                        let known = live.iter().filter(|&&l| l).count();
                        p.outliers
                            .eject(slot, p.consecutive[r.backend], known, op, now_ms);
                    } else {
                        p.consecutive[r.backend] = 0;
                    }
                    if p.outliers.generation != p.applied_generation {
                        p.applied_generation = p.outliers.generation;
                        let wf = weight_at(&backends, t);
                        for w in &mut p.workers {
                            w.table.apply(&p.outliers, &wf, now_ms, &mut w.rng);
                        }
                    }
                }
                if r.sent_ns >= warm_ns {
                    latencies.push(((t - r.sent_ns) / 1_000).min(u64::from(u32::MAX)) as u32);
                    if r.error {
                        errors += 1;
                    }
                }
                free.push(req);
                if sc.rps.is_none() {
                    push(&mut heap, t, Ev::Send { conn: r.conn });
                }
            }
            Ev::Tick => {
                // Backend changes.
                for b in backends.iter_mut() {
                    while let Some(e) = b.events.get(b.next_event) {
                        if (e.at_s * NS as f64) as u64 > t {
                            break;
                        }
                        if let Some(v) = e.latency_ms {
                            b.latency_ms = v;
                        }
                        if let Some(v) = e.delay_ms {
                            b.delay_ms = v;
                        }
                        if let Some(v) = e.error_rate {
                            b.error_rate = v;
                        }
                        b.next_event += 1;
                    }
                }
                let now_live: Vec<bool> = backends.iter().map(|b| b.live(t)).collect();
                let registry_change = now_live != live;
                let ramping = slow_start.as_ref().is_some_and(|ss| {
                    backends.iter().any(|b| {
                        b.live(t) && ss.ramping(b.join_ns.map(|j| t.saturating_sub(j) / 1_000_000))
                    })
                });
                let second = t % NS < 100_000_000;
                // One more apply once the last ramp has ended, at full weight.
                let reweigh = second && (ramping || was_ramping);
                if second {
                    was_ramping = ramping;
                }
                if registry_change {
                    live = now_live;
                    version += 1;
                }
                for p in proxies.iter_mut() {
                    let mut changed = false;
                    if let Some(op) = &opol {
                        changed |= p.outliers.expire(now_ms, op.base_ejection_ms.max(1_000));
                        changed |= p
                            .outliers
                            .retain(|s| live.get(s as usize).copied().unwrap_or(false));
                    }
                    let wf = weight_at(&backends, t);
                    for w in &mut p.workers {
                        if registry_change {
                            let mut table = Table::build(
                                snapshot(&backends, t, version),
                                pol.options.clone(),
                                &mut w.rng,
                            );
                            table.apply(&p.outliers, &wf, now_ms, &mut w.rng);
                            w.table = table;
                        } else if changed || reweigh {
                            w.table.apply(&p.outliers, &wf, now_ms, &mut w.rng);
                        }
                    }
                    p.applied_generation = p.outliers.generation;
                }
                push(&mut heap, t + 100_000_000, Ev::Tick);
            }
        }
    }
    latencies.sort_unstable();
    let pct = |q: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let k = ((q / 100.0) * (latencies.len() - 1) as f64).round() as usize;
        f64::from(latencies[k.min(latencies.len() - 1)]) / 1_000.0
    };
    let total_picks: u64 = picks.iter().sum();
    let share: Vec<f64> = picks
        .iter()
        .map(|&c| c as f64 / total_picks.max(1) as f64)
        .collect();
    let share_series: Vec<Vec<f64>> = per_second
        .iter()
        .filter(|row| row.iter().sum::<u64>() > 0)
        .map(|row| {
            let s: u64 = row.iter().sum();
            row.iter().map(|&c| c as f64 / s as f64).collect()
        })
        .collect();
    let slow_series: Vec<f64> = per_second
        .iter()
        .zip(&slow_per_second)
        .filter(|(row, _)| row.iter().sum::<u64>() > 0)
        .map(|(row, &s)| s as f64 / row.iter().sum::<u64>() as f64)
        .collect();
    let max_share_cv = (0..n)
        .filter(|&i| {
            !ever_slow[i] && backends[i].join_ns.is_none() && backends[i].leave_ns.is_none()
        })
        .filter_map(|i| {
            let v: Vec<f64> = share_series.iter().map(|r| r[i]).collect();
            if v.len() < 2 {
                return None;
            }
            let m = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64;
            (m > 0.0).then(|| var.sqrt() / m)
        })
        .fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.max(x))));
    let cdf = [
        0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 93.0, 95.0, 97.0, 98.0, 99.0,
        99.3, 99.5, 99.7, 99.8, 99.9,
    ]
    .iter()
    .map(|&q| (q, pct(q)))
    .collect();
    let secs = (end_ns.saturating_sub(warm_ns)) as f64 / NS as f64;
    Outcome {
        policy: pol.label.clone(),
        requests: latencies.len() as u64,
        rps: latencies.len() as f64 / secs.max(1e-9),
        p50_ms: pct(50.0),
        p90_ms: pct(90.0),
        p99_ms: pct(99.0),
        p999_ms: pct(99.9),
        errors,
        slow_share: slow_picks as f64 / total_picks.max(1) as f64,
        share,
        share_series,
        slow_series,
        max_share_cv,
        cdf,
    }
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Percentile `q` (0–100) as a number of nines: −log10(1 − q/100).
fn nines(q: f64) -> f64 {
    -(1.0 - q / 100.0).max(1e-9).log10()
}

/// Fonts tried for the PNG's text (Debian's fonts-dejavu-core), or `--font`.
const FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn draw(
    path: &PathBuf,
    title: &str,
    outs: &[Outcome],
    font: Option<&PathBuf>,
) -> Result<(), String> {
    let candidates: Vec<PathBuf> = font
        .cloned()
        .into_iter()
        .chain(FONTS.iter().map(PathBuf::from))
        .collect();
    let bytes = candidates
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .ok_or("no font found for the PNG (install fonts-dejavu-core or pass --font FILE.ttf)")?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| "the font could not be read".to_string())?;
    let e = |x: &dyn std::fmt::Debug| format!("{x:?}");
    let root = BitMapBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(|x| e(&x))?;
    let (left, right) = root.split_horizontally(600);
    // Left: latency by percentile, both log scales: x is the number of nines,
    // −log10(1 − q), so p90, p99 and p99.9 are evenly spaced.
    let max_ms = outs
        .iter()
        .flat_map(|o| o.cdf.iter().map(|c| c.1))
        .fold(0.1f64, f64::max)
        * 1.3;
    let min_ms = outs
        .iter()
        .flat_map(|o| o.cdf.iter().map(|c| c.1))
        .fold(f64::INFINITY, f64::min)
        .max(0.01)
        * 0.8;
    let mut chart = ChartBuilder::on(&left)
        .margin(12)
        .caption("latency by percentile", ("sans-serif", 16))
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..3f64, (min_ms..max_ms).log_scale())
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ms")
        .x_labels(4)
        .x_label_formatter(&|x| match x.round() as i32 {
            _ if (x - x.round()).abs() > 1e-6 => String::new(),
            0 => "p0".into(),
            1 => "p90".into(),
            2 => "p99".into(),
            _ => "p99.9".into(),
        })
        .draw()
        .map_err(|x| e(&x))?;
    for (k, o) in outs.iter().enumerate() {
        let c = COLORS[k % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                o.cdf.iter().map(|&(q, ms)| (nines(q), ms)),
                c.stroke_width(2),
            ))
            .map_err(|x| e(&x))?
            .label(format!(
                "{}: p50 {:.2} p99 {:.2} ms",
                o.policy, o.p50_ms, o.p99_ms
            ))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    // Right: share of picks to delayed instances, per second.
    let secs = outs
        .iter()
        .map(|o| o.slow_series.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let top = outs
        .iter()
        .flat_map(|o| o.slow_series.iter().copied())
        .fold(0.01f64, f64::max)
        * 110.0;
    let mut chart = ChartBuilder::on(&right)
        .margin(12)
        .caption(
            "share sent to delayed instances, per second",
            ("sans-serif", 16),
        )
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..secs as f64, 0f64..top)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("seconds after warm-up")
        .y_desc("% of requests")
        .draw()
        .map_err(|x| e(&x))?;
    for (k, o) in outs.iter().enumerate() {
        let c = COLORS[k % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                o.slow_series
                    .iter()
                    .enumerate()
                    .map(|(s, &v)| (s as f64 + 0.5, v * 100.0)),
                c.stroke_width(2),
            ))
            .map_err(|x| e(&x))?
            .label(format!("{}: {:.2} %", o.policy, o.slow_share * 100.0))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

const USAGE: &str = "usage: simulate SCENARIO.json [--policies P,P,...] [--duration S] [--seed N] \
[--png FILE] [--json FILE] [--font FILE.ttf]

policies: round_robin, random, least_request[:choices], peak_ewma (hot_cold, 3 choices),
peak_ewma:p2c (Finagle's cost, 2 choices), peak_ewma:<hot_cold|cost>:<choices>";

fn main() {
    if let Err(e) = real_main() {
        eprintln!("simulate: {e}");
        std::process::exit(2);
    }
}

fn real_main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (mut file, mut policies, mut png, mut json, mut font) = (None, None, None, None, None);
    let (mut duration, mut seed) = (None, None);
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().ok_or(format!("{name} needs a value\n{USAGE}"));
        match a.as_str() {
            "--policies" => policies = Some(val("--policies")?),
            "--png" => png = Some(PathBuf::from(val("--png")?)),
            "--json" => json = Some(PathBuf::from(val("--json")?)),
            "--font" => font = Some(PathBuf::from(val("--font")?)),
            "--duration" => {
                duration = Some(
                    val("--duration")?
                        .parse::<f64>()
                        .map_err(|e| format!("--duration: {e}"))?,
                )
            }
            "--seed" => {
                seed = Some(
                    val("--seed")?
                        .parse::<u64>()
                        .map_err(|e| format!("--seed: {e}"))?,
                )
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            f if !f.starts_with('-') && file.is_none() => file = Some(PathBuf::from(f)),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    let file = file.ok_or(USAGE)?;
    let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut sc: Scenario =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    if let Some(d) = duration {
        sc.duration_s = d;
    }
    if let Some(s) = seed {
        sc.seed = s;
    }
    validate(&sc)?;
    let names: Vec<String> = match policies {
        Some(p) => p
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        None if !sc.policies.is_empty() => sc.policies.clone(),
        None => DEFAULT_POLICIES.iter().map(|s| s.to_string()).collect(),
    };
    let pols: Vec<PolicySpec> = names
        .iter()
        .map(|s| parse_policy(s))
        .collect::<Result<_, _>>()?;
    let n: u32 = sc.instances.iter().map(|i| i.count).sum();
    let title = if sc.name.is_empty() {
        file.display().to_string()
    } else {
        sc.name.clone()
    };
    println!(
        "{title}: {n} instances, {} proxies x {} workers, {}, {} s ({} s warm-up), seed {}",
        sc.proxies,
        sc.workers,
        match sc.rps {
            Some(r) => format!("{r} req/s per proxy (Poisson)"),
            None => format!("{} connections per proxy", sc.connections),
        },
        sc.duration_s,
        sc.warmup_s,
        sc.seed
    );
    println!(
        "{:<22} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}  share per instance (%)",
        "policy", "req/s", "p50 ms", "p90 ms", "p99 ms", "p99.9", "slow %", "share CV"
    );
    let mut outs = Vec::new();
    for p in &pols {
        let o = run(&sc, p);
        println!(
            "{:<22} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9}  {}",
            o.policy,
            o.rps,
            o.p50_ms,
            o.p90_ms,
            o.p99_ms,
            o.p999_ms,
            o.slow_share * 100.0,
            o.max_share_cv.map_or("-".into(), |c| format!("{c:.3}")),
            o.share
                .iter()
                .map(|s| format!("{:.1}", s * 100.0))
                .collect::<Vec<_>>()
                .join(" ")
        );
        outs.push(o);
    }
    if let Some(best) = outs.iter().min_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms)) {
        println!("lowest p99: {} ({:.2} ms)", best.policy, best.p99_ms);
    }
    if let Some(path) = &json {
        let v = serde_json::json!({"scenario": title, "instances": n, "proxies": sc.proxies,
            "workers": sc.workers, "duration_s": sc.duration_s, "seed": sc.seed, "outcomes": outs});
        std::fs::write(
            path,
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())? + "\n",
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(path) = &png {
        draw(path, &title, &outs, font.as_ref())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn validate(sc: &Scenario) -> Result<(), String> {
    let bad = |m: &str| Err(m.to_string());
    if !(sc.duration_s > sc.warmup_s && sc.warmup_s >= 0.0 && sc.duration_s <= 3_600.0) {
        return bad("duration_s must be above warmup_s (and at most 3600)");
    }
    if sc.proxies == 0 || sc.workers == 0 || sc.proxies > 64 || sc.workers > 64 {
        return bad("proxies and workers: 1 to 64");
    }
    if sc.rps.is_none() && (sc.connections == 0 || sc.connections > 100_000) {
        return bad("connections: 1 to 100000");
    }
    if sc.rps.is_some_and(|r| !(r > 0.0 && r <= 1e7)) {
        return bad("rps must be above 0");
    }
    if !(sc.proxy_cpu_us >= 0.0 && sc.proxy_cpu_us.is_finite()) {
        return bad("proxy_cpu_us must be 0 or more");
    }
    if let Some(st) = &sc.stalls {
        if !(st.every_ms >= 1.0 && st.every_ms.is_finite() && st.ms >= 0.0 && st.ms.is_finite()) {
            return bad("stalls: every_ms >= 1 and ms >= 0");
        }
    }
    let n: u32 = sc.instances.iter().map(|i| i.count).sum();
    if n == 0 || n > 10_000 {
        return bad("instances: 1 to 10000 in all");
    }
    for (k, i) in sc.instances.iter().enumerate() {
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        if !(i.latency_ms > 0.0
            && i.latency_ms.is_finite()
            && ok(i.spread)
            && ok(i.delay_ms)
            && (0.0..=1.0).contains(&i.error_rate))
            || i.capacity == Some(0)
            || i.events.iter().any(|e| {
                !ok(e.at_s)
                    || e.latency_ms.is_some_and(|x| !(x > 0.0 && x.is_finite()))
                    || e.delay_ms.is_some_and(|x| !ok(x))
                    || e.error_rate.is_some_and(|x| !(0.0..=1.0).contains(&x))
            })
        {
            return Err(format!(
                "instances[{k}]: latency_ms > 0, spread and delay_ms >= 0, error_rate in 0..1, capacity >= 1"
            ));
        }
    }
    Ok(())
}
