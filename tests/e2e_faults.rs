//! Fault tests in a real Envoy: what clients see on a backend's or a registry's
//! worst day. Every load loop is bounded in time and count; each test prints its
//! counts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{lb, Backend, ConsulInstance, Envoy, FakeConsul};

fn inst(b: &Backend) -> ConsulInstance {
    ConsulInstance::new(&b.name, "127.0.0.1", b.port)
}

/// One client result: (ms since load start, status, body).
type Sample = (u64, u16, String);

/// Background load: `threads` clients sending GETs one after another until stopped
/// (at most `max` seconds and 200,000 requests in all).
struct Load {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    handles: Vec<std::thread::JoinHandle<()>>,
    start: Instant,
}

impl Load {
    fn start(envoy: &Envoy, threads: usize, max: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        let url = format!("http://127.0.0.1:{}/", envoy.listener_port);
        let handles = (0..threads)
            .map(|_| {
                let (stop, samples, url) = (stop.clone(), samples.clone(), url.clone());
                std::thread::spawn(move || {
                    let agent = support::agent(Duration::from_secs(5));
                    while !stop.load(Ordering::Relaxed) && start.elapsed() < max {
                        let (status, body, _) =
                            support::http_request(&agent, "GET", &url, &[], None);
                        let mut s = samples.lock().unwrap();
                        if s.len() >= 200_000 {
                            break;
                        }
                        s.push((start.elapsed().as_millis() as u64, status, body));
                    }
                })
            })
            .collect();
        Load {
            stop,
            samples,
            handles,
            start,
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            h.join().unwrap();
        }
        let mut s = self.samples.lock().unwrap().clone();
        s.sort_by_key(|x| x.0);
        s
    }
}

/// Two clients load `envoy`; one second in, `backend` is stopped; two seconds
/// later the load ends. Returns the samples and when the kill happened.
fn kill_under_load(envoy: &Envoy, backend: &mut Backend) -> (Vec<Sample>, u64) {
    let load = Load::start(envoy, 2, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(1000));
    let killed_at = load.now_ms();
    backend.stop();
    std::thread::sleep(Duration::from_millis(2000));
    (load.finish(), killed_at)
}

fn failures(s: &[Sample]) -> Vec<&Sample> {
    s.iter().filter(|x| x.1 != 200).collect()
}

const OUTLIER: &str = "\"policy\": \"round_robin\", \"outlier_detection\": { \"consecutive_5xx\": 5, \"base_ejection_time\": \"2s\", \"max_ejection_percent\": 50 },";

fn start_consul_envoy(consul: &FakeConsul, extra: &[(&str, &str)], concurrency: u32) -> Envoy {
    let mut replace = vec![("\"policy\": \"round_robin\",", OUTLIER)];
    replace.extend_from_slice(extra);
    let envoy = lb::start(
        "envoy/consul.yaml",
        &[(8500, consul.port)],
        &replace,
        concurrency,
    );
    lb::wait_version(&envoy, "web", 1);
    envoy
}

#[test]
fn killed_backend_is_ejected_after_a_few_failures_original_dst() {
    let consul = FakeConsul::start();
    let mut b: Vec<Backend> = Backend::start_all(&["a", "b", "c", "d"]);
    consul.set_service("web", b.iter().map(inst).collect());
    // Ejected for 10 s: the whole test runs inside the first ejection (a half-open
    // trial after it would cost one more request per ejection period).
    let envoy = start_consul_envoy(
        &consul,
        &[(
            "\"base_ejection_time\": \"2s\"",
            "\"base_ejection_time\": \"10s\"",
        )],
        2,
    );
    let (samples, killed_at) = kill_under_load(&envoy, &mut b[3]);
    let f = failures(&samples);
    let last = f.last().map(|x| x.0).unwrap_or(killed_at);
    let after = samples
        .iter()
        .filter(|x| x.0 > killed_at && x.2 == "d")
        .count();
    println!(
        "ORIGINAL_DST, backend killed under load: {} requests, {} failed (all within {} ms of the kill), {} answered by the dead backend after the kill; ejections: {:?}",
        samples.len(),
        f.len(),
        last.saturating_sub(killed_at),
        after,
        envoy.stat(&lb::stat("web.outlier_ejections"))
    );
    assert!(!f.is_empty(), "the kill was not noticed at all?");
    assert!(
        f.len() <= 8,
        "{} failures before ejection: {:?}",
        f.len(),
        f
    );
    assert!(
        f.iter().all(|x| x.0 >= killed_at),
        "failures before the kill"
    );
    assert!(
        last - killed_at < 1000,
        "failures went on for {} ms",
        last - killed_at
    );
    assert_eq!(envoy.stat(&lb::stat("web.outlier_ejections")), Some(1));
    assert_eq!(envoy.stat(&lb::stat("web.instances_ejected")), Some(1));
    // Afterwards: every request succeeds.
    let c = lb::tally(&envoy, 60);
    assert_eq!(c.values().sum::<u32>(), 60);
    assert!(
        !c.contains_key("d") && c.keys().all(|k| ["a", "b", "c"].contains(&k.as_str())),
        "{c:?}"
    );
}

/// `override_host`: the filter hands a ranked list; retries go to the next entry.
#[test]
fn killed_backend_with_override_host_and_retries_costs_at_most_three_failures() {
    let consul = FakeConsul::start();
    let mut b: Vec<Backend> = Backend::start_all(&["a", "b", "c", "d"]);
    consul.set_service("web", b.iter().map(inst).collect());
    let envoy = start_override_host_envoy(&consul, &b.iter().collect::<Vec<_>>());
    let (samples, killed_at) = kill_under_load(&envoy, &mut b[3]);
    let f = failures(&samples);
    println!(
        "override_host + retries, backend killed under load: {} requests, {} failed; retries: {:?}; ejections: {:?}",
        samples.len(),
        f.len(),
        envoy.stat("cluster.web_hosts.upstream_rq_retry"),
        envoy.stat(&lb::stat("web.outlier_ejections"))
    );
    assert!(f.len() <= 3, "{} failures: {:?}", f.len(), f);
    let retries = envoy
        .stat("cluster.web_hosts.upstream_rq_retry")
        .unwrap_or(0);
    assert!(retries >= 1, "retries did the work");
    // Failed first attempts count against their host: it is ejected, and no
    // longer costs a retry.
    assert_eq!(envoy.stat(&lb::stat("web.outlier_ejections")), Some(1));
    let c = lb::tally(&envoy, 100);
    assert_eq!(c.values().sum::<u32>(), 100);
    assert_eq!(
        envoy
            .stat("cluster.web_hosts.upstream_rq_retry")
            .unwrap_or(0),
        retries,
        "{c:?}"
    );
    assert!(samples
        .iter()
        .filter(|x| x.0 > killed_at + 500)
        .all(|x| x.2 != "d"));
}

/// Consul-fed registry-lb handing a ranked list to an `override_host` cluster
/// (`web_hosts`) in header `x-lb-host`, with up to 2 retries; the cluster knows
/// `cluster_hosts` as its endpoints.
fn start_override_host_envoy(consul: &FakeConsul, cluster_hosts: &[&Backend]) -> Envoy {
    start_override_host_envoy_on(consul, cluster_hosts, 2)
}

fn start_override_host_envoy_on(
    consul: &FakeConsul,
    cluster_hosts: &[&Backend],
    concurrency: u32,
) -> Envoy {
    let ports: Vec<u16> = cluster_hosts.iter().map(|x| x.port).collect();
    let cluster = lb::override_host_cluster(&ports);
    start_consul_envoy(
        consul,
        &[
            ("\"base_ejection_time\": \"2s\"", "\"base_ejection_time\": \"10s\""),
            ("\"services\": [", "\"handoff\": \"override_host\", \"handoff_header\": \"x-lb-host\", \"services\": ["),
            (
                "route: { cluster: registry_lb_original_dst }",
                "route: { cluster: web_hosts, retry_policy: { retry_on: \"connect-failure,reset,5xx\", num_retries: 2 } }",
            ),
            ("  clusters:\n", &cluster),
        ],
        concurrency,
    )
}

/// With the `override_host` hand-off the first entry of the ranked list is the
/// policy's pick: round robin over two instances alternates, as it does with the
/// filter-state hand-off.
#[test]
fn override_host_first_entries_follow_round_robin() {
    let consul = FakeConsul::start();
    let b: Vec<Backend> = Backend::start_all(&["a", "b"]);
    consul.set_service("web", b.iter().map(inst).collect());
    // One worker: one round-robin cursor.
    let envoy = start_override_host_envoy_on(&consul, &[&b[0], &b[1]], 1);
    let c = lb::tally(&envoy, 40);
    println!("override_host, round robin over two instances: {c:?}");
    assert_eq!((c.get("a"), c.get("b")), (Some(&20), Some(&20)), "{c:?}");
}

/// A client's own `x-lb-host` never steers an `override_host` cluster: the spoofed
/// value names a live host the cluster knows but the registry does not list, so
/// had it passed through, that host would have answered.
#[test]
fn spoofed_override_host_header_never_reaches_a_live_host_outside_the_registry() {
    let consul = FakeConsul::start();
    let b: Vec<Backend> = Backend::start_all(&["a", "b"]);
    let outsider = Backend::start("outsider");
    consul.set_service("web", b.iter().map(inst).collect());
    let envoy = start_override_host_envoy(&consul, &[&b[0], &b[1], &outsider]);
    // The outsider is reachable through the cluster: a request with no registry-lb
    // route would go there by the fallback policy, so only registry-lb keeps it out.
    let n = 40;
    let mut served: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    for _ in 0..n {
        let (status, body, _) = envoy.get("/", &[("x-lb-host", &outsider.addr())]);
        assert_eq!(status, 200, "{body}");
        *served.entry(body).or_insert(0) += 1;
    }
    println!(
        "{n} requests with x-lb-host = a live host outside the registry: {served:?}; outsider hits {}",
        outsider.hits()
    );
    assert_eq!(outsider.hits(), 0, "a spoofed x-lb-host reached its host");
    // Every request succeeded through the registry's instances.
    assert!(served.keys().all(|k| k == "a" || k == "b"), "{served:?}");
    assert_eq!(
        envoy.stat(&lb::stat("client_handoff_header_removed")),
        Some(i64::from(n))
    );
}

#[test]
fn registry_down_for_a_minute_costs_no_request() {
    let outage = Duration::from_secs(
        std::env::var("REGISTRY_OUTAGE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60),
    );
    let mut consul = FakeConsul::start();
    let port = consul.port;
    let b: Vec<Backend> = Backend::start_all(&["a", "b", "c"]);
    consul.set_service("web", b.iter().map(inst).collect());
    let envoy = start_consul_envoy(&consul, &[("\"wait\": \"30s\"", "\"wait\": \"5s\"")], 2);
    let load = Load::start(&envoy, 1, outage + Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    consul.stop();
    std::thread::sleep(outage);
    let age = envoy.stat(&lb::stat("web.snapshot_age_ms")).unwrap_or(0);
    let failed_refreshes = envoy.stat(&lb::stat("web.refresh_failed")).unwrap_or(0);
    let consul = FakeConsul::start_on(port);
    consul.set_service("web", b.iter().map(inst).collect());
    let recovered = lb::wait_stat(
        &envoy,
        &lb::stat("web.snapshot_age_ms"),
        Duration::from_secs(40),
        |v| v < 2000,
    );
    let samples = load.finish();
    let f = failures(&samples);
    println!(
        "registry down for {} s under load: {} requests, {} failed; snapshot_age_ms at the end of the outage {age}; failed refreshes {failed_refreshes}; recovered: {recovered}",
        outage.as_secs(),
        samples.len(),
        f.len()
    );
    assert!(
        f.is_empty(),
        "{} failed requests: {:?}",
        f.len(),
        &f[..f.len().min(5)]
    );
    assert!(
        age as u64 >= outage.as_millis() as u64 - 6000,
        "snapshot age {age} ms did not rise with the outage"
    );
    // Retries back off as configured (defaults: base 500 ms, max 30 s): between
    // that many failures and the outage's end fit at least the slowest and at most
    // the fastest schedule allows.
    let (lo, hi) = failures_within(outage, 500, 30_000);
    assert!(
        (lo..=hi).contains(&(failed_refreshes as u32)),
        "{failed_refreshes} failed refreshes in {} s; with backoff: {lo}..={hi}",
        outage.as_secs()
    );
    assert!(
        recovered,
        "age never came back down after the registry returned"
    );
}

/// Ceiling of the retry delay after `k` failures (k ≥ 1): `base·2^(k-1)`, at most
/// `max`; the delay itself is drawn from [ceiling/2, ceiling] ("equal jitter").
fn backoff_ceiling(k: u32, base_ms: u64, max_ms: u64) -> u64 {
    base_ms.saturating_mul(1u64 << (k - 1).min(32)).min(max_ms)
}

/// Poll granularity and delivery: a due retry waits for the next 50 ms tick, plus
/// the call itself and scheduling on a loaded machine.
const RETRY_SLACK_MS: u64 = 150;

/// The fewest and the most failed refreshes in `window` for a registry failing
/// every call at once: failure 1 comes within RETRY_SLACK_MS of the window's start,
/// failure k+1 after delay k (in [ceiling/2, ceiling]) plus up to RETRY_SLACK_MS.
fn failures_within(window: Duration, base_ms: u64, max_ms: u64) -> (u32, u32) {
    let w = window.as_millis() as u64;
    let count = |first: u64, delay: &dyn Fn(u64) -> u64| {
        let (mut n, mut t) = (0u32, first);
        while t <= w {
            n += 1;
            t += delay(backoff_ceiling(n, base_ms, max_ms));
        }
        n
    };
    (
        count(RETRY_SLACK_MS, &|c| c + RETRY_SLACK_MS),
        count(0, &|c| c / 2),
    )
}

/// Retries after failed refreshes are spaced by the configured backoff: each gap
/// between the registry's requests is within [ceiling/2, ceiling] of its retry
/// (plus tick slack), the ceiling doubling from `backoff_base` up to `backoff_max`.
#[test]
fn failed_refreshes_are_retried_with_exponential_backoff() {
    let consul = FakeConsul::start();
    let b = Backend::start("a");
    consul.set_service("web", vec![inst(&b)]);
    // Every call fails at once from the start: every request the registry sees is a
    // retry after a failure.
    consul.set_error(Some((500, "rpc error: No cluster leader")));
    let (base, max) = (200u64, 1600u64);
    let envoy = lb::start(
        "envoy/consul.yaml",
        &[(8500, consul.port)],
        &[(
            "\"policy\": \"round_robin\",",
            "\"policy\": \"round_robin\", \"backoff_base\": \"200ms\", \"backoff_max\": \"1600ms\",",
        )],
        2,
    );
    // Arrival times of the registry's requests, polled every 2 ms for 9 s.
    let t0 = Instant::now();
    let mut arrivals: Vec<u64> = Vec::new();
    let mut seen = consul.requests();
    while t0.elapsed() < Duration::from_secs(9) {
        let now = consul.requests();
        for _ in seen..now {
            arrivals.push(t0.elapsed().as_millis() as u64);
        }
        seen = now;
        std::thread::sleep(Duration::from_millis(2));
    }
    let gaps: Vec<u64> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    let failed = envoy
        .stat(&lb::stat("web.refresh_failed_status"))
        .unwrap_or(0);
    println!(
        "registry answering 500, backoff {base}..{max} ms: {} requests in 9 s, gaps {gaps:?} ms; refresh_failed_status {failed}",
        arrivals.len()
    );
    // Ceilings 200, 400, 800, 1600, 1600, …: at least 6 gaps fit in 9 s even at
    // the slowest (≤ 200+400+800+1600·3 + slack = 6.95 s).
    assert!(gaps.len() >= 6, "retries stopped: {arrivals:?}");
    for (i, g) in gaps.iter().enumerate() {
        let c = backoff_ceiling(i as u32 + 1, base, max);
        // 10 ms below for the 2 ms polling of both arrivals and send-time jitter.
        assert!(
            *g + 10 >= c / 2 && *g <= c + RETRY_SLACK_MS,
            "gap {} is {g} ms, want {}..={} ms: {gaps:?}",
            i + 1,
            c / 2,
            c + RETRY_SLACK_MS
        );
    }
    // Jitter: the delays are not all their ceilings (or all halves).
    assert!(
        gaps.iter().enumerate().any(|(i, g)| {
            let c = backoff_ceiling(i as u32 + 1, base, max);
            *g > c / 2 + 30 && *g + 30 < c
        }),
        "no jitter: {gaps:?}"
    );
    assert!(
        failed as usize + 1 >= arrivals.len(),
        "every request failed: {failed} of {}",
        arrivals.len()
    );
}

#[test]
fn registry_answering_empty_or_a_quarter_for_one_refresh_costs_no_request() {
    let consul = FakeConsul::start();
    let b: Vec<Backend> = Backend::start_all(&["a", "b", "c", "d"]);
    consul.set_service("web", b.iter().map(inst).collect());
    let envoy = start_consul_envoy(
        &consul,
        &[("\"wait\": \"30s\"", "\"wait\": \"30s\", \"blocking\": true")],
        2,
    );
    let load = Load::start(&envoy, 2, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    for (label, list) in [("[]", vec![]), ("a quarter", vec![inst(&b[0])])] {
        consul.set_service("web", list);
        std::thread::sleep(Duration::from_millis(400));
        consul.set_service("web", b.iter().map(inst).collect());
        std::thread::sleep(Duration::from_millis(1500));
        println!("registry answered {label} for one refresh");
    }
    let samples = load.finish();
    let f = failures(&samples);
    let held = envoy.stat(&lb::stat("web.guard_held")).unwrap_or(0);
    let served: std::collections::HashSet<&str> = samples.iter().map(|x| x.2.as_str()).collect();
    println!(
        "{} requests, {} failed; guard held {held} refresh(es); version {:?}",
        samples.len(),
        f.len(),
        envoy.stat(&lb::stat("web.snapshot_version"))
    );
    assert!(f.is_empty(), "{:?}", &f[..f.len().min(5)]);
    assert!(held >= 2, "both sudden drops were held back");
    assert_eq!(
        envoy.stat(&lb::stat("web.snapshot_version")),
        Some(1),
        "nothing was published"
    );
    assert_eq!(
        served.len(),
        4,
        "all four kept receiving traffic: {served:?}"
    );
}

#[test]
fn all_backends_failing_engages_panic_mode_then_recovers() {
    let consul = FakeConsul::start();
    let b: Vec<Backend> = Backend::start_all(&["a", "b", "c", "d"]);
    consul.set_service("web", b.iter().map(inst).collect());
    let envoy = start_consul_envoy(
        &consul,
        &[(
            "\"max_ejection_percent\": 50",
            "\"max_ejection_percent\": 100",
        )],
        2,
    );
    let load = Load::start(&envoy, 2, Duration::from_secs(15));
    std::thread::sleep(Duration::from_millis(500));
    for x in &b {
        x.set_status(503);
    }
    let panicked = lb::wait_stat(
        &envoy,
        &lb::stat("web.rq_panic"),
        Duration::from_secs(5),
        |v| v > 0,
    );
    std::thread::sleep(Duration::from_millis(500));
    for x in &b {
        x.set_status(200);
    }
    let t0 = load.now_ms();
    // Ejections last 2 s; then one trial each closes the breakers.
    let closed = lb::wait_stat(
        &envoy,
        &lb::stat("web.instances_ejected"),
        Duration::from_secs(10),
        |v| v == 0,
    );
    std::thread::sleep(Duration::from_millis(4000));
    let samples = load.finish();
    let late_failures = samples
        .iter()
        .filter(|x| x.0 > t0 + 200 && x.1 != 200)
        .count();
    let ok_after: std::collections::HashSet<&str> = samples
        .iter()
        .filter(|x| x.0 > t0 + 3000 && x.1 == 200)
        .map(|x| x.2.as_str())
        .collect();
    println!(
        "all backends 503: panic mode {panicked} (rq_panic {:?}, ejections {:?}); after recovery: {late_failures} failures, breakers closed {closed}, serving {ok_after:?}",
        envoy.stat(&lb::stat("web.rq_panic")),
        envoy.stat(&lb::stat("web.outlier_ejections"))
    );
    assert!(panicked, "panic mode never engaged");
    assert!(closed, "ejections never ended");
    assert_eq!(ok_after.len(), 4, "all four back in rotation: {ok_after:?}");
    assert_eq!(
        late_failures, 0,
        "panic mode keeps serving from all instances, so recovered backends answer at once"
    );
}

#[test]
fn a_backend_that_comes_back_gets_traffic_within_one_ejection_period() {
    let consul = FakeConsul::start();
    let mut b: Vec<Backend> = Backend::start_all(&["a", "b", "c", "d"]);
    consul.set_service("web", b.iter().map(inst).collect());
    let envoy = start_consul_envoy(&consul, &[], 2);
    let load = Load::start(&envoy, 2, Duration::from_secs(12));
    std::thread::sleep(Duration::from_millis(500));
    let port = b[3].port;
    b[3].stop();
    assert!(lb::wait_stat(
        &envoy,
        &lb::stat("web.instances_ejected"),
        Duration::from_secs(5),
        |v| v == 1
    ));
    let ejected_at = load.now_ms();
    b[3] = Backend::start_on("d", port);
    std::thread::sleep(Duration::from_millis(4000));
    let samples = load.finish();
    let back = samples
        .iter()
        .find(|x| x.0 > ejected_at && x.2 == "d")
        .map(|x| x.0 - ejected_at);
    let f = failures(&samples);
    println!(
        "backend back after ejection (base_ejection_time 2 s): first request to it {back:?} ms after the ejection; {} failures in all; trials ok {:?}",
        f.len(),
        envoy.stat(&lb::stat("web.outlier_trial_ok"))
    );
    let back = back.expect("the backend never got traffic again");
    assert!(back <= 2000 + 300, "{back} ms");
    assert_eq!(envoy.stat(&lb::stat("web.outlier_trial_ok")), Some(1));
    assert!(f.len() <= 8, "{:?}", f);
}

#[test]
fn active_health_checks_take_a_failing_instance_out_and_back() {
    let consul = FakeConsul::start();
    let b: Vec<Backend> = Backend::start_all(&["a", "b", "c"]);
    consul.set_service("web", b.iter().map(inst).collect());
    let hc = "\"health_check\": { \"path\": \"/healthz\", \"interval\": \"300ms\", \"timeout\": \"200ms\", \"unhealthy_threshold\": 2, \"healthy_threshold\": 2 },";
    let cluster = "  clusters:\n  # Health checks only: no route targets it, so clients cannot reach it.\n  - name: registry_lb_health\n    type: ORIGINAL_DST\n    lb_policy: CLUSTER_PROVIDED\n    connect_timeout: 0.5s\n    original_dst_lb_config: { use_http_header: true }\n";
    let envoy = lb::start(
        "envoy/consul.yaml",
        &[(8500, consul.port)],
        &[
            ("\"policy\": \"round_robin\",", &format!("\"policy\": \"round_robin\", \"outlier_detection\": {{ \"consecutive_5xx\": 0 }}, {hc}")),
            ("  clusters:\n", cluster),
        ],
        2,
    );
    lb::wait_version(&envoy, "web", 1);
    let t0 = Instant::now();
    b[1].set_status(503);
    let down = lb::wait_stat(
        &envoy,
        &lb::stat("web.instances_hc_failed"),
        Duration::from_secs(5),
        |v| v == 1,
    );
    let down_after = t0.elapsed();
    std::thread::sleep(Duration::from_millis(150));
    let c = lb::tally(&envoy, 60);
    let checks = b[1]
        .requests()
        .iter()
        .filter(|r| r.0.starts_with("/healthz"))
        .count();
    println!("active health check: failing instance out after {} ms; then {c:?}; {checks} checks reached it", down_after.as_millis());
    assert!(down, "health checks never marked b down");
    assert_eq!(
        (c.get("a"), c.get("c"), c.get("b")),
        (Some(&30), Some(&30), None),
        "{c:?}"
    );
    assert!(checks >= 2);
    b[1].set_status(200);
    assert!(lb::wait_stat(
        &envoy,
        &lb::stat("web.instances_hc_failed"),
        Duration::from_secs(5),
        |v| v == 0
    ));
    std::thread::sleep(Duration::from_millis(150));
    let c = lb::tally(&envoy, 60);
    assert_eq!(c.get("b"), Some(&20), "back in rotation: {c:?}");
}

/// `max_stale`: while the registry answers errors, the last good list serves until
/// it is `max_stale` old; then requests get 503 with the stale body (counted in
/// `rq_stale`); the first confirmation serves again.
#[test]
fn max_stale_answers_503_once_the_registry_stops_confirming_then_serves_again() {
    let consul = FakeConsul::start();
    let b: Vec<Backend> = Backend::start_all(&["a", "b"]);
    consul.set_service("web", b.iter().map(inst).collect());
    // Blocking queries of 1 s: a query in flight counts as confirmation, so the
    // age starts rising at most ~1 s after the errors begin. Retries every 0.5-1 s.
    let max_stale_ms: i64 = 2000;
    let envoy = start_consul_envoy(
        &consul,
        &[
            ("\"wait\": \"30s\"", "\"wait\": \"1s\""),
            (
                "\"policy\": \"round_robin\",",
                "\"policy\": \"round_robin\", \"max_stale\": \"2s\", \"backoff_base\": \"500ms\", \"backoff_max\": \"1s\",",
            ),
        ],
        1,
    );
    let stale_body = "registry-lb: registry data for service `web` is too old\n";
    let age = || envoy.stat(&lb::stat("web.snapshot_age_ms")).unwrap_or(0);
    consul.set_error(Some((500, "rpc error: No cluster leader")));
    // The age gauge is set on the root's tick and the stale flag on the worker's
    // (50 ms each), so the gauge trails the true age by at most one tick. The gauge
    // is read before and after each request: if it is under max_stale - 150 ms
    // after, the age at the pick was under max_stale (served); if it was over
    // max_stale + 300 ms before, the flag was set at least a few ticks earlier (503).
    let t0 = Instant::now();
    let (mut fresh_ok, mut stale_503) = (0, 0);
    let mut log = Vec::new();
    while t0.elapsed() < Duration::from_secs(10) && stale_503 < 10 {
        let before = age();
        let (status, body, _) = envoy.get("/", &[]);
        let after = age();
        log.push((t0.elapsed().as_millis(), before, after, status));
        if after < max_stale_ms - 150 {
            assert_eq!(status, 200, "age {before}..{after} ms: {body}");
            fresh_ok += 1;
        } else if before > max_stale_ms + 300 {
            assert_eq!(
                (status, body.as_str()),
                (503, stale_body),
                "age {before}..{after} ms"
            );
            stale_503 += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let rq_stale = envoy.stat(&lb::stat("web.rq_stale")).unwrap_or(0);
    let total_503 = log.iter().filter(|x| x.3 == 503).count() as i64;
    println!(
        "registry answering 500 (max_stale 2 s): {fresh_ok} served while fresh, {stale_503} stale 503s past max_stale, rq_stale {rq_stale}; (ms, age before, age after, status) first/last: {:?} {:?}",
        log.first(),
        log.last()
    );
    assert!(fresh_ok >= 5, "served before max_stale: {log:?}");
    assert_eq!(stale_503, 10, "503 after max_stale: {log:?}");
    assert_eq!(rq_stale, total_503, "every stale 503 counted");
    assert!(
        envoy
            .stat(&lb::stat("web.refresh_failed_status"))
            .unwrap_or(0)
            >= 1
    );
    // The registry confirms again: the next retry (≤ backoff_max 1 s) is a blocking
    // query answered after its 1 s wait, which refreshes the age; the worker's next
    // tick serves. Allowed: 2 s plus 1 s of slack.
    consul.set_error(None);
    let t1 = Instant::now();
    let back = support::wait_until(Duration::from_secs(3), Duration::from_millis(20), || {
        envoy.get("/", &[]).0 == 200
    });
    let back_after = t1.elapsed();
    println!(
        "confirmed again: served after {} ms",
        back_after.as_millis()
    );
    assert!(back, "never served again after the registry confirmed");
    let c = lb::tally(&envoy, 20);
    assert_eq!((c.get("a"), c.get("b")), (Some(&10), Some(&10)), "{c:?}");
}

/// The size of Consul's health answer for `web` right now.
fn consul_answer_bytes(consul: &FakeConsul) -> usize {
    let (status, body, _) = support::http_get(
        &format!("http://{}/v1/health/service/web", consul.addr()),
        &[],
    );
    assert_eq!(status, 200, "{body}");
    body.len()
}

/// `max_response_bytes`: an answer over the limit is a failed refresh
/// (`refresh_failed_too_large`) and the last good list keeps serving.
#[test]
fn registry_answer_over_max_response_bytes_is_refused_and_the_last_good_list_serves() {
    let consul = FakeConsul::start();
    let b: Vec<Backend> = Backend::start_all(&["a", "b", "c", "d", "e", "f", "g", "h"]);
    consul.set_service("web", b[..1].iter().map(inst).collect());
    let small = consul_answer_bytes(&consul);
    consul.set_service("web", b.iter().map(inst).collect());
    let large = consul_answer_bytes(&consul);
    consul.set_service("web", b[..1].iter().map(inst).collect());
    // The limit halfway: the one-instance answer fits, the eight-instance one does not.
    let limit = (small + large) / 2;
    println!(
        "answers: 1 instance {small} bytes, 8 instances {large} bytes; max_response_bytes {limit}"
    );
    assert!(limit >= 1024 && small < limit && large > limit);
    let envoy = start_consul_envoy(
        &consul,
        &[(
            "\"policy\": \"round_robin\",",
            &format!("\"policy\": \"round_robin\", \"max_response_bytes\": {limit},"),
        )],
        2,
    );
    let c = lb::tally(&envoy, 10);
    assert_eq!(c.get("a"), Some(&10), "{c:?}");
    consul.set_service("web", b.iter().map(inst).collect());
    let refused = lb::wait_stat(
        &envoy,
        &lb::stat("web.refresh_failed_too_large"),
        Duration::from_secs(5),
        |v| v >= 1,
    );
    let failures: Vec<(String, i64)> = envoy
        .stats()
        .into_iter()
        .filter(|(k, _)| k.contains("web.refresh_failed"))
        .collect();
    println!("after the large answer: {failures:?}");
    assert!(refused, "no refresh_failed_too_large: {failures:?}");
    std::thread::sleep(Duration::from_millis(150));
    let c = lb::tally(&envoy, 30);
    assert_eq!(c.get("a"), Some(&30), "the last good list serves: {c:?}");
    assert_eq!(
        envoy.stat(&lb::stat("web.snapshot_version")),
        Some(1),
        "nothing was published"
    );
}
