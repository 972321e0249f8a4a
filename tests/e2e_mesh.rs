//! End to end in a real Envoy with the configuration a mesh control plane would give
//! it for the recipes in deploy/: an Istio sidecar's outbound side
//! (tests/fixtures/mesh/istio-sidecar-outbound.yaml, deploy/istio/) and an Envoy
//! Gateway listener (tests/fixtures/mesh/envoy-gateway.yaml, deploy/envoy-gateway/).
//! No control plane runs here: the fixtures are written after Istio's and Envoy
//! Gateway's own config dumps and golden files (sources at the top of each fixture).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;
use support::{lb, Backend, ConsulInstance, Envoy, EnvoyConfig, FakeConsul};

const ISTIO: &str = "tests/fixtures/mesh/istio-sidecar-outbound.yaml";
const GATEWAY: &str = "tests/fixtures/mesh/envoy-gateway.yaml";

/// The header a client would use to name a destination to an `ORIGINAL_DST` cluster
/// that reads it. Neither cluster here reads it; the tests send it anyway, naming a
/// backend that must never be reached.
const ORIGINAL_DST: &str = "x-envoy-original-dst-host";

fn inst(b: &Backend) -> ConsulInstance {
    ConsulInstance::new(&b.name, "127.0.0.1", b.port)
}

fn counts(pairs: &[(&str, u32)]) -> HashMap<String, u32> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// Sum of two tallies.
fn add(mut a: HashMap<String, u32>, b: HashMap<String, u32>) -> HashMap<String, u32> {
    for (k, v) in b {
        *a.entry(k).or_insert(0) += v;
    }
    a
}

/// The text of the block under `key:` (a line that is exactly `key:` after its
/// indentation) in a deploy/ file: the lines after it that are indented deeper.
fn block_under(file: &str, key: &str) -> String {
    let text = std::fs::read_to_string(support::repo_root().join(file)).unwrap();
    let mut lines = text.lines();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let start = lines
        .by_ref()
        .find(|l| l.trim() == format!("{key}:"))
        .unwrap_or_else(|| panic!("no `{key}:` in {file}"));
    let depth = indent(start);
    lines
        .take_while(|l| l.trim().is_empty() || indent(l) > depth)
        .collect::<Vec<_>>()
        .join("\n")
}

fn without_space(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

/// The plugin configuration in the deploy/ recipes is the one the fixtures (and so
/// the tests below) run, and it is JSON (what Istio and Envoy Gateway hand the filter).
#[test]
fn the_recipes_carry_the_configuration_the_tests_run() {
    for (deploy, key, fixture) in [
        ("deploy/istio/wasmplugin.yaml", "pluginConfig", ISTIO),
        ("deploy/envoy-gateway/registry-lb.yaml", "config", GATEWAY),
    ] {
        let json = without_space(&block_under(deploy, key));
        assert!(
            json.starts_with("{\"services\":[") && json.ends_with("]}"),
            "{deploy}: {json}"
        );
        let text = without_space(&EnvoyConfig::from_file(fixture).text);
        assert!(
            text.contains(&json),
            "{deploy} `{key}` ({json}) is not the configuration in {fixture}"
        );
    }
}

/// The Istio fixture with Consul answering `web` on `b[0..3]` and `legacy` on
/// `b[3..5]`, one worker.
fn start_istio(consul: &FakeConsul, b: &[Backend]) -> Envoy {
    consul.set_service("web", b[0..3].iter().map(inst).collect());
    consul.set_service("legacy", b[3..5].iter().map(inst).collect());
    let envoy = lb::start(ISTIO, &[(8500, consul.port)], &[], 1);
    lb::wait_version(&envoy, "web", 1);
    lb::wait_version(&envoy, "legacy", 1);
    envoy
}

/// A request for the service `web` is routed by the sidecar's `80` route config to
/// `outbound|80||web.default.svc.cluster.local` (ORIGINAL_DST, as the DestinationRule
/// makes it); registry-lb claims it by that cluster name and balances it over the
/// instances Consul lists, whatever name of the service the client used and whatever
/// destination the client names in `x-envoy-original-dst-host`. The filter's stats
/// pass Istio's default stats inclusion list.
#[test]
fn istio_sidecar_balances_the_service_claimed_by_its_outbound_cluster() {
    let consul = FakeConsul::start();
    let b = Backend::start_all(&["a", "b", "c", "d", "e", "other"]);
    let envoy = start_istio(&consul, &b);
    let other = b[5].addr();
    let mut c = HashMap::new();
    for host in ["web", "web.default.svc.cluster.local:80", "web.default"] {
        c = add(
            c,
            lb::tally_with(&envoy, 10, &[("host", host), (ORIGINAL_DST, &other)]),
        );
    }
    assert_eq!(c, counts(&[("a", 10), ("b", 10), ("c", 10)]));
    assert_eq!(b[5].hits(), 0, "the client-named destination was used");
    lb::wait_picks(&envoy, "web", &b[0..3], 30);
    lb::wait_picks(&envoy, "legacy", &b[3..5], 0);
    // Istio's inclusion list is in effect: Envoy's own per-listener stats are dropped.
    let stats = envoy.stats();
    assert!(
        !stats
            .keys()
            .any(|k| k.starts_with("http.outbound_0.0.0.0_80.")),
        "stats_matcher not applied"
    );
    assert!(stats.contains_key(&lb::stat("web.snapshot_version")));
}

/// A host outside the mesh falls to the sidecar's `allow_any` virtual host and
/// `PassthroughCluster`; registry-lb claims it by its host (any port, any case) and
/// balances it over Consul's `legacy`, never over the client-named destination.
#[test]
fn istio_sidecar_balances_a_host_routed_to_passthrough_cluster() {
    let consul = FakeConsul::start();
    let b = Backend::start_all(&["a", "b", "c", "d", "e", "other"]);
    let envoy = start_istio(&consul, &b);
    let other = b[5].addr();
    let mut c = HashMap::new();
    for host in [
        "legacy.service.consul",
        "legacy.service.consul:8080",
        "LEGACY.Service.Consul",
    ] {
        c = add(
            c,
            lb::tally_with(&envoy, 10, &[("host", host), (ORIGINAL_DST, &other)]),
        );
    }
    assert_eq!(c, counts(&[("d", 15), ("e", 15)]));
    assert_eq!(b[5].hits(), 0, "the client-named destination was used");
    lb::wait_picks(&envoy, "legacy", &b[3..5], 30);
    lb::wait_picks(&envoy, "web", &b[0..3], 0);
}

/// Envoy Gateway's shape: the filter is in the listener disabled and enabled on
/// HTTPRoute web's route only; that route's cluster `httproute/default/web/rule/0`
/// (ORIGINAL_DST after the EnvoyPatchPolicy) claims the requests and they are
/// balanced over Consul's `web`. HTTPRoute other's route never runs the filter.
#[test]
fn envoy_gateway_balances_the_targeted_route_and_leaves_the_other() {
    let consul = FakeConsul::start();
    let b = Backend::start_all(&["a", "b", "c", "direct", "other"]);
    consul.set_service("web", b[0..3].iter().map(inst).collect());
    // Route `other` also names a service that is not configured: had the filter run
    // there, it would answer 503 `registry_lb_unknown_service`.
    let other_route = "- name: httproute/default/other/rule/0/match/0/other_example_com\n";
    let other_named = "- name: httproute/default/other/rule/0/match/0/other_example_com\n                metadata: { filter_metadata: { registry_lb: { service: nope } } }\n";
    let envoy = lb::start(
        GATEWAY,
        &[(8500, consul.port), (8084, b[3].port)],
        &[(other_route, other_named)],
        1,
    );
    lb::wait_version(&envoy, "web", 1);
    let spoof = b[4].addr();
    let c = lb::tally_with(
        &envoy,
        30,
        &[("host", "web.example.com"), (ORIGINAL_DST, &spoof)],
    );
    assert_eq!(c, counts(&[("a", 10), ("b", 10), ("c", 10)]));
    let c = lb::tally_with(&envoy, 20, &[("host", "other.example.com:8080")]);
    assert_eq!(c, counts(&[("direct", 20)]));
    assert_eq!(b[4].hits(), 0, "the client-named destination was used");
    assert_eq!(b[3].hits(), 20);
    lb::wait_picks(&envoy, "web", &b[0..3], 30);
    assert_eq!(envoy.stat(&lb::stat("unknown_service")).unwrap_or(0), 0);
}
