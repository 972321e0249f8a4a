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
    let (listener, admin) = (free_port(), free_port());
    let cfg = cfg.port(10000, listener).port(9901, admin);
    Envoy::start(&cfg, admin, listener, concurrency)
}

/// Sends `n` GETs one after another and counts the answering backends by body.
/// Non-200 answers are counted under `"<status>"`.
pub fn tally(envoy: &Envoy, n: usize) -> HashMap<String, u32> {
    let mut c = HashMap::new();
    for _ in 0..n {
        let (status, body, _) = envoy.get("/", &[]);
        let key = if status == 200 {
            body
        } else {
            format!("<{status} {}>", body.trim())
        };
        *c.entry(key).or_insert(0) += 1;
    }
    c
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
