//! What changed in Envoy's wasm host between 1.36 and 1.40, end to end on the Envoy
//! the tests run (`ENVOY_BIN` / `ENVOY_VERSION`): the three hand-offs, requests held
//! for the first snapshot across workers, `override_host` retries, stats at `/stats`
//! and `/stats/prometheus`, and a clean shutdown with calls and requests in flight.
//! `./dev compat` runs this file (and the lease tests) on every supported version.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};
use support::{lb, Backend, ConsulInstance, Envoy, FakeConsul};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Handoff {
    FilterState,
    Header,
    OverrideHost,
}

const HANDOFFS: [Handoff; 3] = [Handoff::FilterState, Handoff::Header, Handoff::OverrideHost];

fn inst(b: &Backend) -> ConsulInstance {
    ConsulInstance::new(&b.name, "127.0.0.1", b.port)
}

/// `envoy/consul.yaml` with the given hand-off; for `override_host` a STATIC
/// cluster knowing `cluster_hosts`, with retries on connect failures.
fn start(
    consul: &FakeConsul,
    handoff: Handoff,
    cluster_hosts: &[&Backend],
    concurrency: u32,
) -> Envoy {
    let ports: Vec<u16> = cluster_hosts.iter().map(|x| x.port).collect();
    let override_cluster = lb::override_host_cluster(&ports);
    let replace: Vec<(&str, &str)> = match handoff {
        Handoff::FilterState => vec![],
        Handoff::Header => lb::HEADER_HANDOFF.to_vec(),
        Handoff::OverrideHost => vec![
            (
                "\"services\": [",
                "\"handoff\": \"override_host\", \"handoff_header\": \"x-lb-host\", \"services\": [",
            ),
            (
                "route: { cluster: registry_lb_original_dst }",
                "route: { cluster: web_hosts, retry_policy: { retry_on: \"connect-failure,reset\", num_retries: 2 } }",
            ),
            ("  clusters:\n", &override_cluster),
        ],
    };
    lb::start(
        "envoy/consul.yaml",
        &[(8500, consul.port)],
        &replace,
        concurrency,
    )
}

/// Envoy before 1.37 runs foreign functions called from a timer on the root
/// context, so filter state cannot be set on a held request.
fn timer_filter_state_works() -> bool {
    support::envoy_version() >= (1, 37, 0)
}

#[test]
fn every_hand_off_routes_over_all_instances() {
    let consul = FakeConsul::start();
    let b = Backend::start_all(&["a", "b", "c"]);
    consul.set_service("web", b.iter().map(inst).collect());
    for handoff in HANDOFFS {
        let envoy = start(&consul, handoff, &b.iter().collect::<Vec<_>>(), 2);
        lb::wait_version(&envoy, "web", 1);
        let c = lb::tally(&envoy, 30);
        println!(
            "{:?} on Envoy {:?}: {c:?}",
            handoff,
            support::envoy_version()
        );
        for x in &b {
            assert_eq!(
                c.get(&x.name),
                Some(&10),
                "{handoff:?}: round robin over three: {c:?}"
            );
        }
    }
}

#[test]
fn twenty_four_requests_held_at_start_across_workers_with_each_hand_off() {
    let b = Backend::start_all(&["a", "b"]);
    for handoff in HANDOFFS {
        let consul = FakeConsul::start();
        consul.set_service("web", b.iter().map(inst).collect());
        consul.set_delay(Duration::from_millis(1500));
        let envoy = start(&consul, handoff, &b.iter().collect::<Vec<_>>(), 2);
        let t = Instant::now();
        let out = lb::concurrent_gets(&envoy, &vec![Vec::new(); 24]);
        let per_worker = lb::connections_per_worker(&envoy);
        let mut c: HashMap<String, u32> = HashMap::new();
        for (s, body) in &out {
            *c.entry(format!("{s} {}", body.trim())).or_insert(0) += 1;
        }
        println!(
            "{handoff:?} on Envoy {:?}: 24 requests held {} ms: {c:?}, connections per worker {per_worker:?}",
            support::envoy_version(),
            t.elapsed().as_millis()
        );
        assert!(
            per_worker.len() == 2 && per_worker.iter().all(|n| *n >= 1),
            "both workers held some: {per_worker:?}"
        );
        assert_eq!(
            envoy.stat(&lb::stat("web.rq_waited_for_first_snapshot")),
            Some(24)
        );
        if handoff == Handoff::FilterState && !timer_filter_state_works() {
            // Documented: this Envoy refuses the hand-off from a timer; the held
            // requests get a clear 503 and each worker logs the reason once.
            assert_eq!(
                c.get("503 registry-lb: cannot route to service `web`"),
                Some(&24),
                "{c:?}"
            );
            // Envoy writes its log file every 50 ms here: wait for both lines.
            let line = "does not set filter state on a request from a timer";
            support::wait_until(Duration::from_secs(3), Duration::from_millis(50), || {
                envoy.log_count(line) >= 2
            });
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(envoy.log_count(line), 2, "once per worker");
        } else {
            assert_eq!(
                c.get("200 a").copied().unwrap_or(0) + c.get("200 b").copied().unwrap_or(0),
                24,
                "{c:?}"
            );
            assert!(
                c.contains_key("200 a") && c.contains_key("200 b"),
                "both instances: {c:?}"
            );
        }
    }
}

#[test]
fn override_host_retries_reach_the_next_ranked_instance() {
    let consul = FakeConsul::start();
    let live = Backend::start_all(&["a", "b"]);
    // A registered instance nothing listens on: the cluster knows it too.
    let dead_port = support::free_port();
    let dead = ConsulInstance::new("dead", "127.0.0.1", dead_port);
    let mut instances: Vec<ConsulInstance> = live.iter().map(inst).collect();
    instances.push(dead);
    consul.set_service("web", instances);
    let ghost = Backend::start_on("ghost", dead_port);
    let cluster: Vec<&Backend> = live.iter().chain(std::iter::once(&ghost)).collect();
    let envoy = start(&consul, Handoff::OverrideHost, &cluster, 1);
    drop(cluster);
    drop(ghost);
    lb::wait_version(&envoy, "web", 1);
    let c = lb::tally(&envoy, 30);
    println!(
        "override_host with a dead instance on Envoy {:?}: {c:?}",
        support::envoy_version()
    );
    assert_eq!(
        c.get("a").copied().unwrap_or(0) + c.get("b").copied().unwrap_or(0),
        30,
        "every request answered by a live instance: {c:?}"
    );
    let retries = envoy
        .stat("cluster.web_hosts.upstream_rq_retry")
        .unwrap_or(0);
    assert!(
        retries >= 1,
        "the dead first entries were retried on the next: {retries}"
    );
}

#[test]
fn stats_reach_admin_and_prometheus() {
    let consul = FakeConsul::start();
    let b = Backend::start_all(&["a"]);
    consul.set_service("web", b.iter().map(inst).collect());
    let envoy = start(&consul, Handoff::FilterState, &[], 2);
    lb::wait_version(&envoy, "web", 1);
    assert_eq!(lb::tally(&envoy, 5).get("a"), Some(&5));
    // Picks are flushed to Envoy's counters on the next tick.
    assert!(lb::wait_stat(
        &envoy,
        &lb::stat(&format!("web.instance.127_0_0_1_{}.picks", b[0].port)),
        Duration::from_secs(2),
        |v| v == 5
    ));
    assert_eq!(envoy.stat(&lb::stat("web.instances_known")), Some(1));
    let prom = envoy.prometheus();
    let samples = support::prometheus::samples(&prom);
    // The shipped configs' stats_tags make the service a label.
    let version = samples
        .iter()
        .find(|s| {
            s.name == "registry_lb_snapshot_version"
                && s.labels.get("registry_lb_service").map(String::as_str) == Some("web")
        })
        .map(|s| s.value);
    let names: Vec<&str> = samples
        .iter()
        .map(|s| s.name.as_str())
        .filter(|n| n.contains("snapshot_version"))
        .collect();
    println!(
        "Envoy {:?}: {} samples at /stats/prometheus; {names:?}",
        support::envoy_version(),
        samples.len()
    );
    assert_eq!(version, Some(1.0), "snapshot_version at /stats/prometheus");
}

#[test]
fn shutdown_is_clean_with_registry_calls_and_requests_in_flight() {
    let consul = FakeConsul::start();
    let slow = Backend::start("slow");
    slow.set_delay(Duration::from_secs(3));
    consul.set_service("web", vec![inst(&slow)]);
    let mut outcomes = Vec::new();
    for round in 0..20 {
        let mut envoy = start(&consul, Handoff::FilterState, &[], 2);
        lb::wait_version(&envoy, "web", 1);
        // A blocking registry query is in flight (wait 30s) and so are requests.
        let port = envoy.listener_port;
        let inflight: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    let agent = support::agent(Duration::from_secs(6));
                    support::http_request(
                        &agent,
                        "GET",
                        &format!("http://127.0.0.1:{port}/"),
                        &[],
                        None,
                    )
                    .0
                })
            })
            .collect();
        assert!(lb::wait_stat(
            &envoy,
            "cluster.registry_lb_original_dst.upstream_rq_active",
            Duration::from_secs(3),
            |v| v >= 1
        ));
        let by_quit = round % 2 == 1;
        let status = if by_quit {
            let _ = envoy.admin("POST", "/quitquitquit");
            envoy.wait_exit(Duration::from_secs(15))
        } else {
            envoy.terminate(Duration::from_secs(15))
        };
        for h in inflight {
            let _ = h.join();
        }
        let log = envoy.log();
        let bad: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("[critical]")
                    || l.contains("[error]")
                    || l.contains("Caught ")
                    || l.contains("panic")
            })
            .collect();
        outcomes.push((
            if by_quit { "quitquitquit" } else { "SIGTERM" },
            status.map(|s| s.code()),
            bad.len(),
        ));
        assert!(
            matches!(status, Some(s) if s.success()),
            "round {round} ({}): exit {status:?}; log:\n{}",
            if by_quit { "/quitquitquit" } else { "SIGTERM" },
            bad.join("\n")
        );
        assert!(
            bad.is_empty(),
            "round {round}: errors in the log:\n{}",
            bad.join("\n")
        );
    }
    println!(
        "Envoy {:?}: 20 shutdowns with calls and requests in flight: {outcomes:?}",
        support::envoy_version()
    );
}
