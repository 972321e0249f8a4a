//! registry-lb specific helpers: start an Envoy from one of the repo's configs on
//! free ports, tally which backend answered, wait for stats.

use super::{free_port, wait_until, Envoy, EnvoyConfig};
use std::collections::HashMap;
use std::time::Duration;

/// Loads `envoy/<file>`, moves listener 10000 and admin 9901 to free ports, applies
/// the given port moves and text replacements, and starts Envoy.
pub fn start(
    file: &str,
    ports: &[(u16, u16)],
    replace: &[(&str, &str)],
    concurrency: u32,
) -> Envoy {
    let cfg = config(file, ports, replace);
    start_cfg(cfg, concurrency)
}

pub fn config(file: &str, ports: &[(u16, u16)], replace: &[(&str, &str)]) -> EnvoyConfig {
    let mut cfg = EnvoyConfig::from_file(file);
    for (from, to) in ports {
        cfg = cfg.port(*from, *to);
    }
    for (from, to) in replace {
        cfg = cfg.replace(from, to);
    }
    cfg
}

pub fn start_cfg(cfg: EnvoyConfig, concurrency: u32) -> Envoy {
    // A port picked free can be taken by another process before Envoy binds it
    // (tests run in parallel): then Envoy starts again on other ports.
    let mut last = String::new();
    for _ in 0..3 {
        let (listener, admin) = (free_port(), free_port());
        let c = cfg.clone().port(10000, listener).port(9901, admin);
        match Envoy::try_start_with(&c, admin, listener, concurrency, "info", &[]) {
            Ok(e) => return e,
            Err(e) if e.contains(super::envoy::PORT_TAKEN) => last = e,
            Err(e) => panic!("{e}"),
        }
    }
    panic!("Envoy could not bind its ports three times: {last}")
}

/// Replacements turning a shipped config's filter-state hand-off into the header
/// hand-off: `"handoff": "header"` and `use_http_header` on the ORIGINAL_DST cluster.
pub const HEADER_HANDOFF: [(&str, &str); 2] = [
    (
        "\"services\": [",
        "\"handoff\": \"header\", \"services\": [",
    ),
    (
        "    lb_policy: CLUSTER_PROVIDED\n",
        "    lb_policy: CLUSTER_PROVIDED\n    original_dst_lb_config: { use_http_header: true }\n",
    ),
];

/// Sends `n` GETs one after another and counts the answering backends by body.
/// Non-200 answers are counted under `"<status>"`.
pub fn tally(envoy: &Envoy, n: usize) -> HashMap<String, u32> {
    tally_with(envoy, n, &[])
}

/// `tally` with request headers.
pub fn tally_with(envoy: &Envoy, n: usize, headers: &[(&str, &str)]) -> HashMap<String, u32> {
    let mut c = HashMap::new();
    for _ in 0..n {
        let (status, body, _) = envoy.get("/", headers);
        let key = if status == 200 {
            body
        } else {
            format!("<{status} {}>", body.trim())
        };
        *c.entry(key).or_insert(0) += 1;
    }
    c
}

/// Picks counted for `service` on `backends` (127.0.0.1; once the workers' pick
/// counts are flushed, on their next tick).
pub fn picks(envoy: &Envoy, service: &str, backends: &[super::Backend]) -> i64 {
    backends
        .iter()
        .map(|x| {
            envoy
                .stat(&stat(&format!(
                    "{service}.instance.127_0_0_1_{}.picks",
                    x.port
                )))
                .unwrap_or(0)
        })
        .sum()
}

/// Asserts that the picks of `service` on `backends` reach exactly `want` within 2 s.
pub fn wait_picks(envoy: &Envoy, service: &str, backends: &[super::Backend], want: i64) {
    assert!(
        super::wait_until(Duration::from_secs(2), Duration::from_millis(20), || {
            picks(envoy, service, backends) == want
        }),
        "{service} picks {} (want {want})",
        picks(envoy, service, backends)
    );
}

/// Waits until stat `name` satisfies `pred`.
pub fn wait_stat(envoy: &Envoy, name: &str, timeout: Duration, pred: impl Fn(i64) -> bool) -> bool {
    wait_until(timeout, Duration::from_millis(20), || {
        envoy.stat(name).map(&pred).unwrap_or(false)
    })
}

/// Asserts that the registry refused the credentials: `refresh_failed_auth` is
/// counted within 10 s, and `log` appears in Envoy's log within `log_within`.
pub fn assert_refused(envoy: &Envoy, log: &str, log_within: Duration) {
    assert!(
        wait_stat(
            envoy,
            &stat("web.refresh_failed_auth"),
            Duration::from_secs(10),
            |v| v >= 1
        ),
        "auth failure not counted"
    );
    assert!(envoy.wait_for_log(log, log_within), "not logged: {log}");
}

/// Full name of a registry-lb stat.
pub fn stat(name: &str) -> String {
    format!("wasmcustom.registry_lb.{name}")
}

/// Waits until the snapshot of `service` reached `version` (published and visible).
pub fn wait_version(envoy: &Envoy, service: &str, version: i64) {
    assert!(
        wait_stat(
            envoy,
            &stat(&format!("{service}.snapshot_version")),
            Duration::from_secs(15),
            |v| v >= version
        ),
        "snapshot version {version} of {service} never published; stats: {:?}",
        envoy
            .stats()
            .into_iter()
            .filter(|(k, _)| k.contains("registry_lb"))
            .collect::<Vec<_>>()
    );
    // Workers pick a new snapshot up on their next tick (50 ms in the shipped configs).
    std::thread::sleep(Duration::from_millis(120));
}

/// Connections each worker of Envoy's listener has accepted so far
/// (`listener.127.0.0.1_<port>.worker_<n>.downstream_cx_total`, index n).
pub fn worker_connections(envoy: &Envoy) -> Vec<i64> {
    let prefix = format!("listener.127.0.0.1_{}.worker_", envoy.listener_port);
    let mut per: Vec<(usize, i64)> = envoy
        .stats()
        .into_iter()
        .filter_map(|(k, v)| {
            let n = k
                .strip_prefix(&prefix)?
                .strip_suffix(".downstream_cx_total")?;
            Some((n.parse().ok()?, v))
        })
        .collect();
    per.sort();
    assert!(
        per.iter().enumerate().all(|(i, (n, _))| i == *n),
        "worker stats {per:?}"
    );
    per.into_iter().map(|(_, v)| v).collect()
}

/// The worker that accepted the one connection opened since `before`
/// (`worker_connections` read then); panics unless exactly one worker accepted
/// exactly one. Only for tests that open connections one at a time.
pub fn new_connection_worker(envoy: &Envoy, before: &[i64]) -> usize {
    let after = worker_connections(envoy);
    let grew: Vec<usize> = (0..after.len())
        .filter(|&i| after[i] != before.get(i).copied().unwrap_or(0))
        .collect();
    assert!(
        grew.len() == 1 && after[grew[0]] == before[grew[0]] + 1,
        "expected one new connection: before {before:?}, after {after:?}"
    );
    grew[0]
}

/// GET `/` on a new connection; returns (status, body, worker that accepted it).
pub fn get_on_new_connection(envoy: &Envoy, headers: &[(&str, &str)]) -> (u16, String, usize) {
    let before = worker_connections(envoy);
    let agent = super::agent(Duration::from_secs(5));
    let (status, body, _) = super::http_request(
        &agent,
        "GET",
        &format!("http://127.0.0.1:{}/", envoy.listener_port),
        headers,
        None,
    );
    (status, body, new_connection_worker(envoy, &before))
}

/// One GET per entry at once, each on its own connection (so every worker gets
/// some), with that entry's headers; (status, body) in order.
pub fn concurrent_gets(envoy: &Envoy, headers: &[Vec<(String, String)>]) -> Vec<(u16, String)> {
    let port = envoy.listener_port;
    let handles: Vec<_> = headers
        .iter()
        .cloned()
        .map(|h| {
            std::thread::spawn(move || {
                let agent = super::agent(Duration::from_secs(10));
                let mut hs: Vec<(&str, &str)> =
                    h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                hs.push(("connection", "close"));
                let (s, b, _) = super::http_request(
                    &agent,
                    "GET",
                    &format!("http://127.0.0.1:{port}/"),
                    &hs,
                    None,
                );
                (s, b)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Connections accepted per worker of the listener
/// (`listener.<addr>.worker_<n>.downstream_cx_total`), by worker.
pub fn connections_per_worker(envoy: &Envoy) -> Vec<i64> {
    let mut v: Vec<(String, i64)> = envoy
        .stats()
        .into_iter()
        .filter(|(k, _)| {
            k.starts_with("listener.127.0.0.1_")
                && k.contains(".worker_")
                && k.ends_with(".downstream_cx_total")
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, n)| n).collect()
}

/// A STATIC cluster `web_hosts` over `ports` (127.0.0.1) with the `override_host` load
/// balancing policy reading `x-lb-host` (round robin when absent), as a `clusters:`
/// list opening to splice into a config.
pub fn override_host_cluster(ports: &[u16]) -> String {
    let endpoints: String = ports
        .iter()
        .map(|p| format!("        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p} }} }} }}\n"))
        .collect();
    format!(
        r#"  clusters:
  # override_host: the cluster knows the same hosts; attempt k goes to entry k of x-lb-host.
  - name: web_hosts
    type: STATIC
    connect_timeout: 0.5s
    load_balancing_policy:
      policies:
      - typed_extension_config:
          name: envoy.load_balancing_policies.override_host
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost
            override_host_sources:
            - header: x-lb-host
            fallback_policy:
              policies:
              - typed_extension_config:
                  name: envoy.load_balancing_policies.round_robin
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin
    load_assignment:
      cluster_name: web_hosts
      endpoints:
      - lb_endpoints:
{endpoints}"#
    )
}
