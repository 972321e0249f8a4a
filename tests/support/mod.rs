//! End-to-end test support: paths, a real Envoy, a self-describing HTTP backend,
//! a fake Consul agent and a real etcd server. Each integration test does `mod support;`.
#![allow(dead_code)]
#![allow(unused_imports)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod backend;
pub mod consul;
pub mod envoy;
pub mod etcd;
pub mod eureka;
pub mod http;
pub mod kubernetes;
pub mod lb;
pub mod nacos;
pub mod prometheus;

pub use backend::Backend;
pub use consul::{ConsulInstance, FakeConsul};
pub use envoy::{Envoy, EnvoyConfig};
pub use etcd::Etcd;
pub use eureka::{EurekaInstance, FakeEureka};
pub use kubernetes::{FakeKubernetes, K8sEndpoint, K8sSlice};
pub use nacos::{FakeNacos, NacosInstance};

use std::io::Read;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A registry stand-in's state behind a mutex that stays usable after a test thread
/// panicked while holding it (the other tests keep their stand-ins).
pub struct Locked<T>(Mutex<T>);

impl<T> Locked<T> {
    pub fn new(v: T) -> Locked<T> {
        Locked(Mutex::new(v))
    }

    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The repository root (this crate's manifest directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Envoy binary: `$ENVOY_BIN`, else where `./dev setup` installs it:
/// `<repo>/.tools/envoy-$ENVOY_VERSION/envoy/_bin/envoy` (`ENVOY_VERSION` defaults to
/// 1.40.0, as in `./dev`).
pub fn envoy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("ENVOY_BIN") {
        if !p.is_empty() {
            let p = PathBuf::from(p);
            if p.is_file() {
                return p;
            }
            panic!("ENVOY_BIN={} does not exist; unset it or run `./dev test` to install Envoy into .tools/", p.display());
        }
    }
    let p = default_envoy_bin(std::env::var("ENVOY_VERSION").ok().as_deref());
    if p.is_file() {
        return p;
    }
    panic!(
        "Envoy binary not found: set ENVOY_BIN or run `./dev test` (it installs Envoy into {})",
        p.display()
    );
}

/// Version of the Envoy binary the tests run, `(major, minor, patch)`, read once
/// from `envoy --version` (`…/1.40.0/Clean/RELEASE/BoringSSL`).
pub fn envoy_version() -> (u32, u32, u32) {
    static V: std::sync::OnceLock<(u32, u32, u32)> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        let out = std::process::Command::new(envoy_bin())
            .arg("--version")
            .output()
            .expect("envoy --version");
        let text = String::from_utf8_lossy(&out.stdout);
        parse_envoy_version(&text)
            .unwrap_or_else(|| panic!("no version in `envoy --version`: {text}"))
    })
}

/// `(major, minor, patch)` from `envoy --version` output.
pub fn parse_envoy_version(text: &str) -> Option<(u32, u32, u32)> {
    text.split(['/', ' ', '\n']).find_map(|w| {
        let mut it = w.split('.').map(|n| n.parse::<u32>().ok());
        match (it.next(), it.next(), it.next(), it.next()) {
            (Some(Some(a)), Some(Some(b)), Some(Some(c)), None) => Some((a, b, c)),
            _ => None,
        }
    })
}

/// Envoy version `./dev` installs when `ENVOY_VERSION` is unset or empty.
pub const DEFAULT_ENVOY_VERSION: &str = "1.40.0";

/// `<repo>/.tools/envoy-<version>/envoy/_bin/envoy`, the path `./dev setup` installs to.
pub fn default_envoy_bin(version: Option<&str>) -> PathBuf {
    let v = version
        .filter(|v| !v.is_empty())
        .unwrap_or(DEFAULT_ENVOY_VERSION);
    repo_root().join(format!(".tools/envoy-{v}/envoy/_bin/envoy"))
}

/// `<repo>/target/wasm32-wasip1/release/registry_lb.wasm`.
pub fn wasm_path() -> PathBuf {
    let p = repo_root().join("target/wasm32-wasip1/release/registry_lb.wasm");
    if !p.is_file() {
        panic!("{} is missing — build it: ./dev build", p.display());
    }
    p
}

/// A currently free TCP port on 127.0.0.1 (bind :0, read, drop), never one this
/// test process has handed out before: Envoy binds its listeners with SO_REUSEPORT, so
/// two Envoys given the same port would both start and share its connections.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local_addr").port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Poll `cond` every `every` until it is true or `timeout` passes. Returns whether it became true.
pub fn wait_until(timeout: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every.min(deadline.saturating_duration_since(Instant::now())));
    }
}

/// A ureq agent with the given overall timeout, no redirects.
pub fn agent(timeout: Duration) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(timeout.min(Duration::from_secs(5)))
        .timeout(timeout)
        .redirects(0)
        .build()
}

/// Response headers as (lowercase name, value) pairs, repeated headers kept.
pub fn response_headers(resp: &ureq::Response) -> Vec<(String, String)> {
    let mut names = resp.headers_names();
    names.dedup();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for n in names {
        if !seen.insert(n.clone()) {
            continue;
        }
        for v in resp.all(&n) {
            out.push((n.clone(), v.to_string()));
        }
    }
    out
}

const MAX_BODY: u64 = 64 * 1024 * 1024;

/// Send a request; 4xx/5xx are returned like any other status. A transport error
/// (refused, reset, timeout) returns status 0 with the error text as the body.
pub fn http_request(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> (u16, String, Vec<(String, String)>) {
    let mut req = agent.request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let res = match body {
        Some(b) => req.send_bytes(b),
        None => req.call(),
    };
    let resp = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(ureq::Error::Transport(t)) => return (0, format!("transport error: {t}"), Vec::new()),
    };
    let status = resp.status();
    let hdrs = response_headers(&resp);
    // Read what we can: a body read error (e.g. ureq 2 chokes on the chunked trailers the
    // etcd gateway sends with error bodies) keeps the bytes read before it.
    let mut buf = Vec::new();
    let read = resp.into_reader().take(MAX_BODY).read_to_end(&mut buf);
    let mut body = String::from_utf8_lossy(&buf).into_owned();
    if let Err(e) = read {
        if body.is_empty() {
            body = format!("<body read error: {e}>");
        }
    }
    (status, body, hdrs)
}

/// GET `url` with a fresh 5 s agent.
pub fn http_get(url: &str, headers: &[(&str, &str)]) -> (u16, String, Vec<(String, String)>) {
    http_request(&agent(Duration::from_secs(5)), "GET", url, headers, None)
}

/// Case-insensitive lookup in a header list.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    http::header_value(headers, name)
}

/// Last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}
