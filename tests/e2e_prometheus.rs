//! registry-lb's stats at `/stats/prometheus`: service, slot and instance are labels
//! (the `stats_config.stats_tags` block of every shipped Envoy config), read back with
//! the Prometheus text-format parser of PyPI `prometheus-client` (installed into
//! `.tools/py` by `./dev test`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;
use support::prometheus::Sample;
use support::{lb, repo_root, Backend};

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A second service whose name has `-` and `_` (on one backend, least_request so it
/// has slot stats), a route to it (header `x-svc: pay`) and one to an unconfigured
/// service (`x-svc: nope`), added to envoy/static.yaml.
const PAY_SERVICE: &str = r#""services": [
                        {
                          "name": "pay-v2_eu",
                          "policy": "least_request",
                          "sources": [
                            { "static": { "instances": [
                              { "address": "127.0.0.1", "port": 8083 }
                            ] } }
                          ]
                        },"#;

const ROUTES: &str = "              - name: pay
                match: { prefix: \"/\", headers: [{ name: x-svc, string_match: { exact: pay } }] }
                route: { cluster: registry_lb_original_dst }
                metadata:
                  filter_metadata:
                    registry_lb: { service: pay-v2_eu }
              - name: nope
                match: { prefix: \"/\", headers: [{ name: x-svc, string_match: { exact: nope } }] }
                route: { cluster: registry_lb_original_dst }
                metadata:
                  filter_metadata:
                    registry_lb: { service: nope }
              - name: web
";

#[test]
fn service_slot_and_instance_are_prometheus_labels() {
    let b = Backend::start_all(&["a", "b", "c"]);
    let ports: Vec<(String, String)> = [8081, 8082, 8083]
        .iter()
        .zip(&b)
        .map(|(from, x)| (format!("\"port\": {from}"), format!("\"port\": {}", x.port)))
        .collect();
    let mut replace: Vec<(&str, &str)> = vec![
        ("\"services\": [", PAY_SERVICE),
        ("              - name: web\n", ROUTES),
    ];
    replace.extend(ports.iter().map(|(a, b)| (a.as_str(), b.as_str())));
    let envoy = lb::start("envoy/static.yaml", &[], &replace, 1);
    lb::wait_version(&envoy, "web", 1);
    lb::wait_version(&envoy, "pay-v2_eu", 1);

    let (web, pay, nope) = (70, 9, 3);
    let answered = lb::tally(&envoy, web);
    for _ in 0..pay {
        let (status, body, _) = envoy.get("/", &[("x-svc", "pay")]);
        assert_eq!((status, body.as_str()), (200, "c"));
    }
    for _ in 0..nope {
        let (status, _, _) = envoy.get("/", &[("x-svc", "nope")]);
        assert_eq!(status, 503);
    }
    assert_eq!(
        answered.values().sum::<u32>() as usize,
        web,
        "web: {answered:?}"
    );
    assert!(
        answered
            .keys()
            .all(|k| ["a", "b", "c"].contains(&k.as_str())),
        "web: {answered:?}"
    );
    // Picks reach Envoy's counters on the workers' next tick.
    let picks_in_stats = || -> i64 {
        envoy
            .stats()
            .iter()
            .filter(|(k, _)| k.starts_with("wasmcustom.registry_lb.") && k.ends_with(".picks"))
            .map(|(_, v)| v)
            .sum()
    };
    assert!(
        support::wait_until(Duration::from_secs(3), Duration::from_millis(20), || {
            picks_in_stats() == (web + pay) as i64
        }),
        "picks {}",
        picks_in_stats()
    );

    let text = envoy.prometheus();
    let samples = support::prometheus::samples(&text);
    let ours: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.family.starts_with("registry_lb_"))
        .collect();
    let families =
        |f: &str| -> Vec<&Sample> { ours.iter().copied().filter(|s| s.family == f).collect() };

    // Picks: one counter, service and instance as labels, one sample per backend.
    let picks = families("registry_lb_instance_picks");
    assert!(picks.iter().all(|s| s.kind == "counter"), "{picks:?}");
    let mut want = BTreeMap::new();
    for (x, name) in b.iter().zip(["a", "b", "c"]) {
        let n = *answered.get(name).unwrap_or(&0);
        if n > 0 {
            want.insert(
                labels(&[
                    ("registry_lb_service", "web"),
                    ("registry_lb_instance", &format!("127_0_0_1_{}", x.port)),
                ]),
                f64::from(n),
            );
        }
    }
    want.insert(
        labels(&[
            ("registry_lb_service", "pay-v2_eu"),
            ("registry_lb_instance", &format!("127_0_0_1_{}", b[2].port)),
        ]),
        pay as f64,
    );
    let got: BTreeMap<_, _> = picks.iter().map(|s| (s.labels.clone(), s.value)).collect();
    assert_eq!(got, want, "picks per instance = answers per backend");
    let web_sum: f64 = picks
        .iter()
        .filter(|s| s.labels["registry_lb_service"] == "web")
        .map(|s| s.value)
        .sum();
    assert_eq!(web_sum, web as f64);

    // Per-service stats: the service label only.
    let versions: BTreeMap<_, _> = families("registry_lb_snapshot_version")
        .iter()
        .map(|s| (s.labels.clone(), (s.kind.as_str(), s.value)))
        .collect();
    assert_eq!(
        versions,
        BTreeMap::from([
            (
                labels(&[("registry_lb_service", "pay-v2_eu")]),
                ("gauge", 1.0)
            ),
            (labels(&[("registry_lb_service", "web")]), ("gauge", 1.0)),
        ])
    );

    // Per-slot stats: service and slot; `slot` stays in the name.
    let slots: Vec<_> = families("registry_lb_slot_rq_active")
        .iter()
        .map(|s| (s.labels.clone(), s.value))
        .collect();
    assert_eq!(
        slots,
        vec![(
            labels(&[
                ("registry_lb_service", "pay-v2_eu"),
                ("registry_lb_slot", "0")
            ]),
            0.0
        )],
        "least_request's per-slot gauge"
    );
    let active: Vec<_> = families("registry_lb_rq_active")
        .iter()
        .map(|s| s.labels.clone())
        .collect();
    assert!(
        active.iter().all(|l| !l.contains_key("registry_lb_slot")),
        "the per-service gauge is not mixed with the per-slot one: {active:?}"
    );

    // Global stats: no labels.
    let unknown: Vec<_> = families("registry_lb_unknown_service")
        .iter()
        .map(|s| (s.kind.as_str(), s.labels.clone(), s.value))
        .collect();
    assert_eq!(unknown, vec![("counter", BTreeMap::new(), nope as f64)]);

    // No registry-lb metric name carries a service, a slot number or an address;
    // every one that is not global has the service label.
    let global = [
        "registry_lb_unknown_service",
        "registry_lb_client_handoff_header_removed",
    ];
    for s in &ours {
        for bad in ["web", "pay", "127_0_0_1", "slot_0", "overflow"] {
            assert!(!s.name.contains(bad), "{bad} in the name of {s:?}");
        }
        for x in &b {
            assert!(!s.name.contains(&x.port.to_string()), "a port in {s:?}");
        }
        assert_eq!(
            s.labels.contains_key("registry_lb_service"),
            !global.contains(&s.family.as_str()),
            "{s:?}"
        );
    }
    let names: BTreeSet<&str> = ours.iter().map(|s| s.family.as_str()).collect();
    assert!(names.len() >= 10, "registry-lb families: {names:?}");

    // Envoy's own stats keep their names and labels, and get none of ours.
    let upstream: Vec<_> = samples
        .iter()
        .filter(|s| s.name == "envoy_cluster_upstream_rq_total")
        .map(|s| (s.labels.clone(), s.value))
        .collect();
    assert!(
        upstream.contains(&(
            labels(&[
                ("envoy_cluster_name", "registry_lb_original_dst"),
                ("envoy_response_code", "200"),
            ]),
            (web + pay) as f64
        )),
        "{upstream:?}"
    );
    for s in samples
        .iter()
        .filter(|s| !s.family.starts_with("registry_lb_"))
    {
        assert!(
            s.labels.keys().all(|k| !k.starts_with("registry_lb")),
            "{s:?}"
        );
    }
}

/// The `stats_config` block documented in docs/metrics.md: the fenced yaml block
/// holding `stats_config:`.
fn documented_block() -> String {
    let doc = std::fs::read_to_string(repo_root().join("docs/metrics.md")).unwrap();
    let blocks: Vec<&str> = doc
        .split("```yaml\n")
        .skip(1)
        .filter_map(|b| b.split("\n```").next())
        .filter(|b| b.lines().any(|l| l == "stats_config:"))
        .collect();
    assert_eq!(blocks.len(), 1, "one stats_config block in docs/metrics.md");
    format!("{}\n", blocks[0])
}

/// Every Envoy config of the repo (a YAML file with a top-level `static_resources:`),
/// outside target/, .tools/ and tests/.
fn shipped_envoy_configs(dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let rel = p
            .strip_prefix(repo_root())
            .unwrap()
            .to_string_lossy()
            .to_string();
        let skip = [".git", "target", ".tools", "tests", "node_modules"];
        if p.is_dir() {
            if !skip.contains(&rel.as_str()) {
                shipped_envoy_configs(&p, out);
            }
        } else if (rel.ends_with(".yaml") || rel.ends_with(".yml"))
            && std::fs::read_to_string(&p)
                .map(|t| t.lines().any(|l| l == "static_resources:"))
                .unwrap_or(false)
        {
            out.push(rel);
        }
    }
}

#[test]
fn every_shipped_envoy_config_carries_the_documented_stats_tags() {
    let block = documented_block();
    assert!(block.contains("tag_name: registry_lb_service"), "{block}");
    let mut files = Vec::new();
    shipped_envoy_configs(&repo_root(), &mut files);
    files.sort();
    for f in [
        "envoy/static.yaml",
        "envoy/consul.yaml",
        "compose/envoy.yaml",
    ] {
        assert!(files.contains(&f.to_string()), "{f} not found: {files:?}");
    }
    for f in &files {
        let text = std::fs::read_to_string(repo_root().join(f)).unwrap();
        assert!(
            text.contains(&block),
            "{f} lacks the stats_config block of docs/metrics.md (or differs from it):\n{block}"
        );
        assert_eq!(
            text.matches("stats_config:").count(),
            1,
            "{f}: one stats_config"
        );
    }
}
