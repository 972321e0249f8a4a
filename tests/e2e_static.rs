//! End to end in a real Envoy with the static source: weighted split, client
//! headers that try to steer, least_request, configuration errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};
use support::{lb, Backend, Envoy, EnvoyConfig};

fn three_backends() -> Vec<Backend> {
    vec![
        Backend::start("a"),
        Backend::start("b"),
        Backend::start("c"),
    ]
}

/// envoy/static.yaml with its instances 8081..8083 moved to the given backends.
fn static_ports(b: &[Backend]) -> Vec<(String, String)> {
    vec![
        ("\"port\": 8081".into(), format!("\"port\": {}", b[0].port)),
        ("\"port\": 8082".into(), format!("\"port\": {}", b[1].port)),
        ("\"port\": 8083".into(), format!("\"port\": {}", b[2].port)),
    ]
}

fn start_static(b: &[Backend], extra: &[(&str, &str)], concurrency: u32) -> Envoy {
    let ports = static_ports(b);
    let mut replace: Vec<(&str, &str)> = ports
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    replace.extend_from_slice(extra);
    lb::start("envoy/static.yaml", &[], &replace, concurrency)
}

fn share(c: &HashMap<String, u32>, k: &str, n: usize) -> f64 {
    f64::from(*c.get(k).unwrap_or(&0)) / n as f64
}

#[test]
fn weighted_split_matches_weights_within_two_percent() {
    let b = three_backends();
    let envoy = start_static(&b, &[], 2);
    lb::wait_version(&envoy, "web", 1);
    let n = 1400;
    let c = lb::tally(&envoy, n);
    println!("weights 5:1:1 over {n} requests: {c:?}");
    for (k, want) in [("a", 5.0 / 7.0), ("b", 1.0 / 7.0), ("c", 1.0 / 7.0)] {
        let got = share(&c, k, n);
        println!(
            "  {k}: {:.4} (want {:.4}, error {:+.4})",
            got,
            want,
            got - want
        );
        assert!(
            (got - want).abs() <= 0.02,
            "backend {k}: share {got:.4}, want {want:.4}: {c:?}"
        );
    }
    assert_eq!(c.len(), 3, "only the three backends answer: {c:?}");
    // Picks are counted per instance in Envoy's stats (added on the workers' next tick).
    let picks = || -> i64 {
        b.iter()
            .map(|x| {
                envoy
                    .stat(&lb::stat(&format!(
                        "web.instance.127_0_0_1_{}.picks",
                        x.port
                    )))
                    .unwrap_or(0)
            })
            .sum()
    };
    assert!(
        support::wait_until(Duration::from_secs(2), Duration::from_millis(20), || picks(
        ) == n
            as i64),
        "picks {}",
        picks()
    );
    let prom = envoy.prometheus();
    assert!(
        prom.contains("registry_lb_instances_healthy{registry_lb_service=\"web\"} 3"),
        "metrics are exported to Prometheus, the service as a label"
    );
}

#[test]
fn client_headers_never_change_the_destination() {
    let b = three_backends();
    let envoy = start_static(&b, &[], 1);
    lb::wait_version(&envoy, "web", 1);
    let admin = format!("127.0.0.1:{}", envoy.admin_port);
    let spoof: [(&str, &str); 4] = [
        ("x-envoy-original-dst-host", admin.as_str()),
        ("x-envoy-upstream-alt-stat-name", "evil"),
        ("x-lb-host", admin.as_str()),
        ("x-envoy-internal", "true"),
    ];
    let mut answered = HashMap::new();
    for _ in 0..70 {
        let (status, body, _) = envoy.get("/", &spoof);
        assert_eq!(status, 200, "{body}");
        *answered.entry(body).or_insert(0) += 1;
    }
    // Only backends answered (the admin port never did), in the configured split.
    assert_eq!(answered.get("a"), Some(&50), "{answered:?}");
    assert_eq!(answered.len(), 3, "{answered:?}");
}

#[test]
fn header_handoff_strips_client_values() {
    // The header hand-off: ORIGINAL_DST with use_http_header, and "handoff": "header".
    let b = three_backends();
    let envoy = start_static(&b, &lb::HEADER_HANDOFF, 1);
    lb::wait_version(&envoy, "web", 1);
    let admin = format!("127.0.0.1:{}", envoy.admin_port);
    let mut answered = HashMap::new();
    for _ in 0..70 {
        let (status, body, _) = envoy.get("/", &[("x-envoy-original-dst-host", admin.as_str())]);
        assert_eq!(status, 200, "{body}");
        *answered.entry(body).or_insert(0) += 1;
    }
    assert_eq!(answered.get("a"), Some(&50), "{answered:?}");
    // What reached each backend is the filter's choice (itself), never the client's value.
    for x in &b {
        for r in x.requests() {
            let v = support::header(&r.1, "x-envoy-original-dst-host");
            assert_eq!(v, Some(x.addr().as_str()), "backend {} saw {v:?}", x.name);
        }
    }
    assert_eq!(
        envoy.stat(&lb::stat("client_handoff_header_removed")),
        Some(70)
    );
}

/// envoy/static.yaml with `least_request` over `b` (equal weights), instance 0
/// tagged `role=slow` and selectable with header `x-subset` (no header: all).
fn start_least_request(b: &[Backend], concurrency: u32) -> Envoy {
    let list: Vec<String> = b
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let role = if i == 0 { "slow" } else { "fast" };
            format!("{{ \"address\": \"127.0.0.1\", \"port\": {}, \"metadata\": {{ \"role\": \"{role}\" }} }}", x.port)
        })
        .collect();
    let instances = format!("\"instances\": [ {} ] }}", list.join(", "));
    let cfg = lb::config("envoy/static.yaml", &[], &[])
        .replace(
            "\"policy\": \"round_robin\"",
            "\"policy\": \"least_request\", \"subset\": { \"header\": \"x-subset\", \"fallback\": \"any_endpoint\" }",
        );
    // Cut the shipped instance list out and put ours in.
    let text = &cfg.text;
    let from = text.find("\"instances\": [").expect("instances");
    let to = from + text[from..].find("] }").expect("end of instances") + "] }".len();
    let cfg = EnvoyConfig::from_text(&format!("{}{}{}", &text[..from], instances, &text[to..]));
    let envoy = lb::start_cfg(cfg, concurrency);
    lb::wait_version(&envoy, "web", 1);
    envoy
}

/// One request on `agent` (its pooled keep-alive connection).
fn get_on(agent: &ureq::Agent, envoy: &Envoy, headers: &[(&str, &str)]) -> (u16, String) {
    let url = format!("http://127.0.0.1:{}/", envoy.listener_port);
    let (s, b, _) = support::http_request(agent, "GET", &url, headers, None);
    (s, b)
}

/// Requests in flight are counted across workers: a backend busy with requests from
/// one worker's connections is avoided by the other worker too. With per-worker
/// counts the other worker would see it idle and give it its full share.
#[test]
fn least_request_counts_in_flight_requests_of_both_workers() {
    let b: Vec<Backend> = Backend::start_all(&["a", "b", "c", "d"]);
    let envoy = start_least_request(&b, 2);
    let slow = [("x-subset", "role=slow")];
    // Keep-alive connections sorted by the worker that accepted them: `held` on the
    // first connection's worker, one `probe` connection on the other (bounded: the
    // kernel spreads connections at random, 60 tries leave one worker out with
    // probability 2^-59).
    let held_n = 4;
    let mut held: Vec<ureq::Agent> = Vec::new();
    let mut probe: Option<ureq::Agent> = None;
    let mut held_worker = None;
    for _ in 0..60 {
        if held.len() == held_n && probe.is_some() {
            break;
        }
        let before = lb::worker_connections(&envoy);
        let agent = support::agent(Duration::from_secs(30));
        let (s, body) = get_on(&agent, &envoy, &slow);
        assert_eq!((s, body.as_str()), (200, "a"));
        let w = lb::new_connection_worker(&envoy, &before);
        let hw = *held_worker.get_or_insert(w);
        if w == hw && held.len() < held_n {
            held.push(agent);
        } else if w != hw && probe.is_none() {
            probe = Some(agent);
        }
    }
    let probe = probe.expect("no connection reached the second worker");
    assert_eq!(held.len(), held_n);
    let conns = lb::worker_connections(&envoy);
    // `a` holds each of the next requests for 8 s: four in flight, all from one worker.
    let hold = Duration::from_secs(8);
    b[0].set_delay(hold);
    let a_before = b[0].hits();
    let held_at = Instant::now();
    let holders: Vec<_> = held
        .into_iter()
        .map(|agent| {
            let url = format!("http://127.0.0.1:{}/", envoy.listener_port);
            std::thread::spawn(move || {
                support::http_request(&agent, "GET", &url, &[("x-subset", "role=slow")], None).0
            })
        })
        .collect();
    assert!(
        support::wait_until(Duration::from_secs(3), Duration::from_millis(5), || {
            b[0].hits() == a_before + held_n as u64
        }),
        "held requests did not all reach a: {}",
        b[0].hits() - a_before
    );
    // Later requests to `a` are answered at once: only the held ones stay in flight.
    b[0].set_delay(Duration::ZERO);
    let in_flight: i64 = envoy
        .stats()
        .into_iter()
        .filter(|(k, _)| k.starts_with(&lb::stat("web.slot_")) && k.ends_with(".rq_active"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(in_flight, held_n as i64, "registry-lb's in-flight gauges");
    // Probes one after another on the other worker's connection.
    let n = 320;
    let mut c: HashMap<String, u32> = HashMap::new();
    for _ in 0..n {
        let (s, body) = get_on(&probe, &envoy, &[]);
        assert_eq!(s, 200, "{body}");
        *c.entry(body).or_insert(0) += 1;
    }
    let probes_took = held_at.elapsed();
    assert_eq!(
        lb::worker_connections(&envoy),
        conns,
        "held requests and probes used only the sorted connections"
    );
    assert!(
        probes_took + Duration::from_millis(500) < hold,
        "probes took {probes_took:?}: the held requests may have ended, no conclusion"
    );
    let a = c.get("a").copied().unwrap_or(0);
    println!(
        "least_request, 4 requests held on a from worker {:?}, {n} probes from the other: {c:?} (shared counts: a ~{}, per-worker counts: a ~{})",
        held_worker,
        n / 16,
        n / 4
    );
    // Two draws among four equal weights. Shared counts: a (4 in flight) loses to
    // any other draw, so it is picked only when both draws are a: p = 1/16, mean 20,
    // sd 4.3. Per-worker counts: the probing worker sees a idle, every candidate
    // ties at 0 and a gets p = 1/4, mean 80, sd 7.7. The bound 45 is 5.8 sd above
    // the first and 4.5 sd below the second; 3 is 3.9 sd below the first.
    assert!(
        (3..=45).contains(&a),
        "a got {a} of {n} probes from the other worker: {c:?}"
    );
    for h in holders {
        assert_eq!(h.join().unwrap(), 200);
    }
}

/// Without load every candidate ties, so the split follows the weights (5:1:1).
#[test]
fn least_request_without_load_splits_by_weight() {
    let b = three_backends();
    let envoy = start_static(
        &b,
        &[(
            "\"policy\": \"round_robin\"",
            "\"policy\": \"least_request\"",
        )],
        2,
    );
    lb::wait_version(&envoy, "web", 1);
    let n = 1400;
    let c = lb::tally(&envoy, n);
    println!("least_request, weights 5:1:1, one request at a time, {n} requests: {c:?}");
    assert_eq!(c.len(), 3, "{c:?}");
    // Binomial sd of a share: sqrt(p(1-p)/n) = 0.0121 for 5/7, 0.0094 for 1/7;
    // allowed 4.5 sd. Ignoring weights (1/3 each) misses by 0.38 and 0.19.
    for (k, p) in [("a", 5.0 / 7.0), ("b", 1.0 / 7.0), ("c", 1.0 / 7.0)] {
        let got = share(&c, k, n);
        let sd = (p * (1.0 - p) / n as f64).sqrt();
        assert!(
            (got - p).abs() <= 4.5 * sd,
            "{k}: share {got:.4}, want {p:.4} ± {:.4}: {c:?}",
            4.5 * sd
        );
    }
}

#[test]
fn bad_plugin_configuration_is_rejected_with_the_field_named() {
    let cases = [
        (
            "\"policy\": \"round_robin\"",
            "\"policy\": \"fastest\"",
            "services[0].policy: unknown variant `fastest`",
        ),
        (
            "\"port\": 8082",
            "\"port\": 0",
            "services[0].sources[0].static.instances[1]: port 0 is out of range",
        ),
        (
            "\"name\": \"web\"",
            "\"name\": \"web\", \"colour\": \"blue\"",
            "services[0].colour: unknown field `colour`",
        ),
    ];
    for (from, to, message) in cases {
        let cfg = EnvoyConfig::from_file("envoy/static.yaml").replace(from, to);
        let cfg = cfg
            .port(10000, support::free_port())
            .port(9901, support::free_port());
        let (failed, log) = Envoy::start_expect_failure(&cfg, 1);
        assert!(failed, "Envoy accepted a bad configuration ({to})");
        assert!(
            log.contains(message),
            "log does not name the problem `{message}`:\n{}",
            support::tail(&log, 30)
        );
    }
}

#[test]
fn every_shipped_envoy_config_validates() {
    for f in [
        "envoy/static.yaml",
        "envoy/consul.yaml",
        "envoy/etcd.yaml",
        "envoy/nacos.yaml",
        "envoy/eureka.yaml",
        "envoy/kubernetes.yaml",
        "envoy/static-matching.yaml",
        "envoy/static-per-route.yaml",
        "compose/envoy.yaml",
    ] {
        let (ok, out) = Envoy::validate(&EnvoyConfig::from_file(f));
        assert!(ok, "{f} does not validate:\n{out}");
    }
}

/// The `memory_allocator_manager` block of envoy/static.yaml.
fn release_block() -> String {
    let text = std::fs::read_to_string("envoy/static.yaml").unwrap();
    let at = text.find("memory_allocator_manager:").unwrap();
    text[at..].lines().take(3).collect::<Vec<_>>().join("\n")
}

/// A figure of admin `/memory` (tcmalloc's, in bytes).
fn tcmalloc_figure(envoy: &Envoy, name: &str) -> u64 {
    let (code, body) = envoy.admin("GET", "/memory");
    assert_eq!(code, 200, "/memory: {body}");
    let key = format!("\"{name}\": \"");
    let at = body
        .find(&key)
        .unwrap_or_else(|| panic!("{name} in {body}"))
        + key.len();
    body[at..].split('"').next().unwrap().parse().unwrap()
}

#[test]
fn shipped_configs_return_free_memory_to_the_system() {
    let block = release_block();
    assert!(block.contains("bytes_to_release: 134217728"), "{block}");
    for f in [
        "envoy/static.yaml",
        "envoy/static-matching.yaml",
        "envoy/static-per-route.yaml",
        "envoy/consul.yaml",
        "envoy/etcd.yaml",
        "envoy/nacos.yaml",
        "envoy/eureka.yaml",
        "envoy/kubernetes.yaml",
        "compose/envoy.yaml",
    ] {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(
            text.contains(&block),
            "{f} lacks envoy/static.yaml's memory_allocator_manager:\n{block}"
        );
    }
    // The shipped config and the same with the release off, side by side: tcmalloc
    // unmaps free pages only with it (without it /memory's pageheap_unmapped stays 0
    // in bench/results/memory.md).
    let b = three_backends();
    let with = start_static(&b, &[], 2);
    let without = start_static(
        &b,
        &[("bytes_to_release: 134217728", "bytes_to_release: 0")],
        2,
    );
    lb::wait_version(&with, "web", 1);
    lb::wait_version(&without, "web", 1);
    let released = support::wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
        tcmalloc_figure(&with, "pageheap_unmapped") > 0
    });
    let (w, wo) = (
        tcmalloc_figure(&with, "pageheap_unmapped"),
        tcmalloc_figure(&without, "pageheap_unmapped"),
    );
    println!("pageheap_unmapped: {w} bytes with the release, {wo} without");
    assert!(
        released,
        "no free memory unmapped in 10 s with the release on"
    );
    assert!(w > wo, "unmapped {w} bytes with the release, {wo} without");
}

#[test]
fn requests_without_a_service_pass_through_untouched() {
    // A second route with no registry-lb metadata goes to an ordinary cluster.
    let b = three_backends();
    let other = Backend::start("plain");
    let route = "              - match: { prefix: \"/plain\" }\n                route: { cluster: plain }\n              - name: web\n";
    let cluster = format!(
        "  clusters:\n  - name: plain\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: plain\n      endpoints:\n      - lb_endpoints:\n        - endpoint:\n            address:\n              socket_address: {{ address: 127.0.0.1, port_value: {} }}\n",
        other.port
    );
    let envoy = start_static(
        &b,
        &[
            ("              - name: web\n", route),
            ("  clusters:\n", &cluster),
        ],
        1,
    );
    lb::wait_version(&envoy, "web", 1);
    let (status, body, _) = envoy.get("/plain/x", &[]);
    assert_eq!((status, body.as_str()), (200, "plain"));
    assert_eq!(
        envoy.stat(&lb::stat(&format!(
            "web.instance.127_0_0_1_{}.picks",
            b[0].port
        ))),
        None
    );
}

#[test]
fn a_route_naming_an_unconfigured_service_is_a_clear_503() {
    let b = three_backends();
    let route = "              - match: { prefix: \"/x\" }\n                route: { cluster: registry_lb_original_dst }\n                metadata:\n                  filter_metadata:\n                    registry_lb: { service: x }\n              - name: web\n";
    let envoy = start_static(&b, &[("              - name: web\n", route)], 1);
    lb::wait_version(&envoy, "web", 1);
    for _ in 0..3 {
        let (status, body, _) = envoy.get("/x", &[]);
        assert_eq!(
            (status, body.as_str()),
            (503, "registry-lb: service `x` is not configured\n")
        );
    }
    assert_eq!(envoy.stat(&lb::stat("unknown_service")), Some(3));
    assert!(b.iter().all(|x| x.hits() == 0), "no backend was asked");
    // The configured service on the same listener is unaffected.
    let (status, _, _) = envoy.get("/", &[]);
    assert_eq!(status, 200);
}

#[test]
fn compose_config_differs_from_consul_yaml_only_in_addresses() {
    let strip = |f: &str| -> Vec<String> {
        std::fs::read_to_string(support::repo_root().join(f))
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(str::to_string)
            .collect()
    };
    let (a, b) = (strip("envoy/consul.yaml"), strip("compose/envoy.yaml"));
    assert_eq!(a.len(), b.len(), "same structure");
    let mut differing = 0;
    for (x, y) in a.iter().zip(&b) {
        if x != y {
            differing += 1;
            let norm = |s: &str| {
                s.replace("127.0.0.1", "ADDR")
                    .replace("0.0.0.0", "ADDR")
                    .replace("consul,", "ADDR,")
            };
            assert_eq!(
                norm(x),
                norm(y),
                "lines differ beyond addresses:\n  {x}\n  {y}"
            );
        }
    }
    assert_eq!(differing, 3, "listener, admin and Consul addresses");
}

/// Thread ids (`[%t]` of Envoy's default log format) of the lines containing `needle`.
fn log_threads(envoy: &Envoy, needle: &str) -> Vec<u32> {
    envoy
        .log()
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.split('[').nth(2)?.split(']').next()?.parse().ok())
        .collect()
}

#[test]
fn registry_polling_moves_to_the_main_thread_once_workers_serve() {
    // Envoy's main thread (thread id = process id) runs no request: parsing a large
    // registry answer there stalls nobody, so it takes the lease from a worker with
    // traffic, whichever won it at start.
    let b = three_backends();
    let envoy = start_static(&b, &[], 1);
    lb::wait_version(&envoy, "web", 1);
    let pid = envoy.pid().expect("pid");
    let c = lb::tally(&envoy, 60);
    assert!(
        c.keys().all(|k| !k.starts_with('<')),
        "every request reached a backend: {c:?}"
    );
    let needle = "now polls the registries";
    let on_main = support::wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        log_threads(&envoy, needle).last() == Some(&pid)
    });
    let threads = log_threads(&envoy, needle);
    println!("Envoy pid {pid}; roots that took the lease, in order: {threads:?}");
    assert!(
        on_main,
        "the lease holder is not the main thread: {threads:?}"
    );
    // It stays there while the worker serves, and requests still go out.
    let c = lb::tally(&envoy, 60);
    assert!(
        c.keys().all(|k| !k.starts_with('<')),
        "every request reached a backend: {c:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let after = log_threads(&envoy, needle);
    assert_eq!(after.last(), Some(&pid));
    assert_eq!(after.len(), threads.len(), "no further hand-over");
}
