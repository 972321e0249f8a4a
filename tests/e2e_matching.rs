//! End to end in a real Envoy: services that claim requests without route metadata
//! (by the route's cluster, by the request's host), and the filter switched on per
//! route as Envoy Gateway does.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;
use support::{lb, Backend, Envoy};

/// Stand-in for a connection's original destination (restored by iptables and the
/// original_dst listener filter in a sidecar): the client names it in this header.
const ORIGINAL_DST: &str = "x-envoy-original-dst-host";

/// Replacements moving the config's instance ports 8081, 8082, … to `b`'s.
fn port_moves(b: &[Backend]) -> Vec<(String, String)> {
    b.iter()
        .enumerate()
        .map(|(i, x)| {
            (
                format!("\"port\": {}", 8081 + i),
                format!("\"port\": {}", x.port),
            )
        })
        .collect()
}

/// envoy/static-matching.yaml on one worker, "web" on `b[0..2]`, "legacy" on
/// `b[2..4]`, `PassthroughCluster` reading the destination of untouched requests
/// from `ORIGINAL_DST`.
fn start_matching(b: &[Backend]) -> Envoy {
    let ports = port_moves(&b[..4]);
    let mut replace: Vec<(&str, &str)> = ports
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let passthrough =
        "  - name: PassthroughCluster\n    type: ORIGINAL_DST\n    lb_policy: CLUSTER_PROVIDED\n";
    let with_header =
        format!("{passthrough}    original_dst_lb_config: {{ use_http_header: true }}\n");
    replace.push((passthrough, &with_header));
    let envoy = lb::start("envoy/static-matching.yaml", &[], &replace, 1);
    lb::wait_version(&envoy, "web", 1);
    lb::wait_version(&envoy, "legacy", 1);
    envoy
}

fn counts(pairs: &[(&str, u32)]) -> HashMap<String, u32> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// "web" is named by no route metadata: its route's cluster
/// `outbound|80||web.default.svc.cluster.local` claims the requests. "legacy" is
/// claimed by the host `legacy.service.consul` on the `PassthroughCluster` route,
/// at any port and in any case, even when the client names another destination.
#[test]
fn the_route_cluster_and_the_host_each_claim_their_service() {
    let b = Backend::start_all(&["a", "b", "c", "d", "other"]);
    let envoy = start_matching(&b);
    for host in ["web", "web.default.svc.cluster.local:80"] {
        let c = lb::tally_with(&envoy, 20, &[("host", host)]);
        assert_eq!(c, counts(&[("a", 10), ("b", 10)]), "Host: {host}");
    }
    let other = b[4].addr();
    for host in [
        "legacy.service.consul:8080",
        "LEGACY.Service.Consul",
        "legacy.service.consul:80",
    ] {
        let c = lb::tally_with(&envoy, 20, &[("host", host), (ORIGINAL_DST, &other)]);
        assert_eq!(c, counts(&[("c", 10), ("d", 10)]), "Host: {host}");
    }
    assert_eq!(b[4].hits(), 0, "the client's destination was not used");
    lb::wait_picks(&envoy, "web", &b[0..2], 40);
    lb::wait_picks(&envoy, "legacy", &b[2..4], 60);
}

/// A request whose host no service claims reaches the destination it would have
/// without registry-lb, and nothing is counted for it.
#[test]
fn a_request_for_an_unclaimed_host_passes_untouched() {
    let b = Backend::start_all(&["a", "b", "c", "d", "other"]);
    let envoy = start_matching(&b);
    let other = b[4].addr();
    for host in [
        "example.com",
        "legacy.service.consul.example.com:8080",
        "consul",
    ] {
        let c = lb::tally_with(&envoy, 10, &[("host", host), (ORIGINAL_DST, &other)]);
        assert_eq!(c, counts(&[("other", 10)]), "Host: {host}");
    }
    // Without a destination it fails as Envoy's own ORIGINAL_DST does, not as
    // registry-lb would.
    let (status, body, _) = envoy.get("/", &[("host", "example.com")]);
    assert_eq!(status, 503, "{body}");
    assert!(!body.contains("registry-lb"), "{body}");
    // What reached the destination is what the client sent.
    for r in b[4].requests() {
        assert_eq!(support::header(&r.1, ORIGINAL_DST), Some(other.as_str()));
    }
    // A claimed host is still balanced; only its picks are counted.
    let c = lb::tally_with(&envoy, 4, &[("host", "legacy.service.consul")]);
    assert_eq!(c, counts(&[("c", 2), ("d", 2)]));
    lb::wait_picks(&envoy, "legacy", &b[2..4], 4);
    assert_eq!(lb::picks(&envoy, "web", &b[0..2]), 0);
}

/// envoy/static-per-route.yaml: the filter is `disabled: true` in the connection
/// manager and enabled on route "web" (`/web/`) only; route "direct" (`/`) goes to
/// cluster `direct` on `b[3]`.
#[test]
fn only_the_route_that_enables_the_filter_is_balanced() {
    let b = Backend::start_all(&["a", "b", "c", "direct"]);
    let ports = port_moves(&b[..3]);
    let mut replace: Vec<(&str, &str)> = ports
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    // Route "direct" also names a service that is not configured: had the filter
    // run there, it would answer 503 `registry_lb_unknown_service`.
    let direct = "                route: { cluster: direct }\n";
    let direct_named = format!("{direct}                metadata: {{ filter_metadata: {{ registry_lb: {{ service: nope }} }} }}\n");
    replace.push((direct, &direct_named));
    let envoy = lb::start(
        "envoy/static-per-route.yaml",
        &[(8084, b[3].port)],
        &replace,
        1,
    );
    lb::wait_version(&envoy, "web", 1);
    let mut web = HashMap::new();
    for _ in 0..30 {
        let (status, body, _) = envoy.get("/web/x", &[]);
        assert_eq!(status, 200, "{body}");
        *web.entry(body).or_insert(0) += 1;
    }
    assert_eq!(web, counts(&[("a", 10), ("b", 10), ("c", 10)]));
    for _ in 0..20 {
        let (status, body, _) = envoy.get("/other", &[]);
        assert_eq!((status, body.as_str()), (200, "direct"));
    }
    lb::wait_picks(&envoy, "web", &b[0..3], 30);
    assert_eq!(envoy.stat(&lb::stat("unknown_service")).unwrap_or(0), 0);
    assert_eq!(b[3].hits(), 20);
}
