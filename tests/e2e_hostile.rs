//! Hostile clients in a real Envoy, in each hand-off (filter state to an ORIGINAL_DST
//! cluster, the header hand-off, `override_host`): huge hash keys and cookies,
//! 100,000 distinct hash keys, subset selectors and authorities, malformed subset
//! headers, every destination header spoofed, and a route naming an unknown service at
//! high rate. Envoy stays up, stat names and memory stay bounded, the destination is
//! always an instance the filter chose, and the log is not flooded.
//!
//! Requests go over raw keep-alive sockets (a client library would refuse the invalid
//! bytes some of them carry). Every load loop is bounded in count and time.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{lb, Backend, Envoy, EnvoyConfig};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    FilterState,
    Header,
    OverrideHost,
}

/// The registry's instances and the backends no registry lists.
struct Fleet {
    /// a (version=v1), b and c (version=v2): the registry's instances.
    listed: Vec<Backend>,
    /// Named only by spoofed headers; reachable through every cluster that could be steered.
    trap: Backend,
    /// Behind the `/pass` route, which the filter does not claim.
    pass: Backend,
}

impl Fleet {
    fn start() -> Fleet {
        Fleet {
            listed: Backend::start_all(&["a", "b", "c"]),
            trap: Backend::start("trap"),
            pass: Backend::start("pass"),
        }
    }
}

/// Services: `hashed` (ring_hash on `x-user`, subset header `x-subset`, claimed by
/// host `web.example`), `cookied` (maglev on cookie `session`), `subsetted` (round
/// robin, subset header `x-subset`, any-endpoint fallback). Routes: `/hash` (no
/// metadata: claimed by its host), `/cookie`, `/subset`, `/ghost` (metadata names a
/// service that is not configured) and `/pass` (not claimed, a static cluster).
fn config(mode: Mode, f: &Fleet, max_headers_kb: Option<u32>) -> EnvoyConfig {
    let inst = |b: &Backend, v: &str| {
        format!(
            r#"{{ "address": "127.0.0.1", "port": {}, "metadata": {{ "version": "{v}" }} }}"#,
            b.port
        )
    };
    let instances = format!(
        "[{}, {}, {}]",
        inst(&f.listed[0], "v1"),
        inst(&f.listed[1], "v2"),
        inst(&f.listed[2], "v2")
    );
    let src = format!(r#""sources": [ {{ "static": {{ "instances": {instances} }} }} ]"#);
    let handoff = match mode {
        Mode::FilterState => "",
        Mode::Header => r#""handoff": "header","#,
        Mode::OverrideHost => r#""handoff": "override_host", "handoff_header": "x-lb-host","#,
    };
    let plugin = format!(
        r#"{{ {handoff} "services": [
  {{ "name": "hashed", "policy": "ring_hash", "hash_on": {{ "header": "x-user" }},
     "hosts": ["web.example"], "subset": {{ "header": "x-subset" }}, {src} }},
  {{ "name": "cookied", "policy": "maglev", "hash_on": {{ "cookie": "session" }}, {src} }},
  {{ "name": "subsetted", "subset": {{ "header": "x-subset" }}, {src} }} ] }}"#
    );
    let plugin: String = plugin
        .lines()
        .map(|l| format!("                    {l}\n"))
        .collect();
    let dest = if mode == Mode::OverrideHost {
        "web_hosts"
    } else {
        "dest"
    };
    let route = |prefix: &str, service: Option<&str>, cluster: &str| {
        let md = service
            .map(|s| {
                format!(", metadata: {{ filter_metadata: {{ registry_lb: {{ service: {s} }} }} }}")
            })
            .unwrap_or_default();
        format!("              - {{ name: r{}, match: {{ prefix: \"{prefix}\" }}, route: {{ cluster: {cluster} }}{md} }}\n", &prefix[1..])
    };
    // A control for the spoofing test: the same cluster with the filter off, where a
    // spoofed header does reach its host (not in the filter-state mode, whose
    // cluster would send it back to this listener).
    let unfiltered = if mode == Mode::FilterState {
        String::new()
    } else {
        format!("              - {{ name: runfiltered, match: {{ prefix: \"/unfiltered\" }}, route: {{ cluster: {dest} }}, typed_per_filter_config: {{ envoy.filters.http.wasm: {{ \"@type\": type.googleapis.com/envoy.config.route.v3.FilterConfig, disabled: true }} }} }}\n")
    };
    let routes = [
        route("/hash", None, dest),
        route("/cookie", Some("cookied"), dest),
        route("/subset", Some("subsetted"), dest),
        route("/ghost", Some("ghost"), dest),
        route("/pass", None, "passthrough"),
        unfiltered,
        // The bulk load: the filter claims (by host) and picks as on `/hash`, and
        // Envoy answers itself, so the load measures the filter, not the backends.
        "              - { name: rbulk, match: { prefix: \"/bulk/\" }, direct_response: { status: 200, body: { inline_string: bulk } } }\n".into(),
        "              - { name: rbulkpass, match: { prefix: \"/bulkpass/\" }, direct_response: { status: 200, body: { inline_string: bulkpass } } }\n".into(),
    ]
    .concat();
    let static_ep = |port: u16| {
        format!("        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}\n")
    };
    // Every cluster a spoofed header could steer can reach the trap.
    let dest_cluster = match mode {
        Mode::FilterState => "  - { name: dest, type: ORIGINAL_DST, lb_policy: CLUSTER_PROVIDED, connect_timeout: 1s }\n".to_string(),
        Mode::Header => "  - { name: dest, type: ORIGINAL_DST, lb_policy: CLUSTER_PROVIDED, connect_timeout: 1s, original_dst_lb_config: { use_http_header: true } }\n".to_string(),
        Mode::OverrideHost => {
            let mut ports: Vec<u16> = f.listed.iter().map(|b| b.port).collect();
            ports.push(f.trap.port);
            lb::override_host_cluster(&ports).replacen("  clusters:\n", "", 1)
        }
    };
    let limit = max_headers_kb
        .map(|kb| format!("          max_request_headers_kb: {kb}\n"))
        .unwrap_or_default();
    let text = format!(
        r#"static_resources:
  listeners:
  - name: ingress
    address:
      socket_address: {{ address: 127.0.0.1, port_value: 10000 }}
    # A port another process took after it was picked must fail the bind (the
    # harness then picks another), not be shared with that process.
    enable_reuse_port: false
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
{limit}          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
{routes}          http_filters:
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: registry_lb
                root_id: registry_lb
                vm_config:
                  vm_id: registry_lb
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: target/wasm32-wasip1/release/registry_lb.wasm }} }}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: |
{plugin}          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
{dest_cluster}  - name: passthrough
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: passthrough
      endpoints:
      - lb_endpoints:
{pass_ep}admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: 9901 }}
"#,
        pass_ep = static_ep(f.pass.port),
    );
    EnvoyConfig::from_text(&text)
}

fn start(mode: Mode, f: &Fleet) -> Envoy {
    // 64 KiB keys must reach the filter: Envoy's default limit is 60 KiB of headers.
    let envoy = lb::start_cfg(config(mode, f, Some(256)), 2);
    for svc in ["hashed", "cookied", "subsetted"] {
        lb::wait_version(&envoy, svc, 1);
    }
    envoy
}

/// A response: status, lower-case headers, body.
#[derive(Debug, Default)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        support::header(&self.headers, name)
    }
}

/// A keep-alive HTTP/1.1 connection writing requests byte for byte.
struct Conn {
    port: u16,
    r: Option<BufReader<TcpStream>>,
}

impl Conn {
    fn new(port: u16) -> Conn {
        Conn { port, r: None }
    }

    /// `GET path` with `headers` as given (names and raw value bytes). A transport
    /// error is status 0; the connection is then opened again on the next request.
    fn get(&mut self, path: &str, headers: &[(&str, &[u8])]) -> Resp {
        let mut req = format!("GET {path} HTTP/1.1\r\n").into_bytes();
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req.extend_from_slice(b"host: web\r\n");
        }
        for (k, v) in headers {
            req.extend_from_slice(k.as_bytes());
            req.extend_from_slice(b": ");
            req.extend_from_slice(v);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"\r\n");
        match self.exchange(&req) {
            Ok(r) => {
                if r.header("connection") == Some("close") {
                    self.r = None;
                }
                r
            }
            Err(e) => {
                self.r = None;
                Resp {
                    status: 0,
                    body: format!("transport error: {e}"),
                    ..Resp::default()
                }
            }
        }
    }

    fn exchange(&mut self, req: &[u8]) -> std::io::Result<Resp> {
        if self.r.is_none() {
            let s = TcpStream::connect(("127.0.0.1", self.port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.set_nodelay(true)?;
            self.r = Some(BufReader::new(s));
        }
        let Some(r) = self.r.as_mut() else {
            unreachable!()
        };
        r.get_mut().write_all(req)?;
        let mut line = String::new();
        r.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Err(std::io::Error::other("eof in headers"));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let len: usize = support::header(&headers, "content-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| std::io::Error::other("no content-length"))?;
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        Ok(Resp {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// `(status, body)` counts, as `"200 a"` / `"503 registry-lb: ..."`.
type Tally = HashMap<String, u64>;

fn key_of(r: &Resp) -> String {
    format!("{} {}", r.status, r.body.trim())
}

/// `threads` clients on keep-alive connections send `make(i)` for i in `range`
/// until all are sent or `limit` passes. Returns the tally and how many were sent.
fn blast<F>(
    envoy: &Envoy,
    threads: usize,
    range: std::ops::Range<usize>,
    limit: Duration,
    make: F,
) -> (Tally, usize)
where
    F: Fn(usize) -> (String, Vec<(String, Vec<u8>)>) + Send + Sync + 'static,
{
    let next = Arc::new(AtomicUsize::new(range.start));
    let make = Arc::new(make);
    let deadline = Instant::now() + limit;
    let end = range.end;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (next, make, port) = (next.clone(), make.clone(), envoy.listener_port);
            std::thread::spawn(move || {
                let mut c = Conn::new(port);
                let mut t = Tally::new();
                let mut sent = 0;
                while Instant::now() < deadline {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= end {
                        break;
                    }
                    let (path, hs) = make(i);
                    let hs: Vec<(&str, &[u8])> =
                        hs.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
                    *t.entry(key_of(&c.get(&path, &hs))).or_insert(0) += 1;
                    sent += 1;
                }
                (t, sent)
            })
        })
        .collect();
    let mut all = Tally::new();
    let mut sent = 0;
    for h in handles {
        let (t, n) = h.join().expect("client thread");
        sent += n;
        for (k, v) in t {
            *all.entry(k).or_insert(0) += v;
        }
    }
    (all, sent)
}

/// Stat names Envoy has (`/stats`, counters, gauges and histograms).
fn stat_names(envoy: &Envoy) -> BTreeSet<String> {
    let (code, body) = envoy.admin("GET", "/stats");
    assert_eq!(code, 200, "{body}");
    body.lines()
        .filter_map(|l| l.split_once(':').map(|(k, _)| k.to_string()))
        .collect()
}

/// Envoy's resident set (VmRSS) and its allocator's `allocated` bytes (`/memory`).
fn memory(envoy: &Envoy) -> (u64, u64) {
    let pid = envoy.pid().expect("envoy pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    let (code, body) = envoy.admin("GET", "/memory");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("memory json");
    let allocated = v["allocated"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("allocated");
    (rss_kb * 1024, allocated)
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

/// Lines of Envoy's log that show a wasm VM failing or the filter panicking.
fn vm_failures(envoy: &Envoy) -> Vec<String> {
    envoy
        .log()
        .lines()
        .filter(|l| {
            l.contains("registry-lb: panic")
                || l.contains("Function: proxy_on_")
                || l.contains("wasm trap")
                // Envoy's own wasm messages (a VM that failed), not the filter's lines.
                || (l.contains("wasm") && l.contains("failed") && !l.contains("wasm log "))
                || l.contains("[critical]")
        })
        .map(str::to_string)
        .collect()
}

fn names(f: &Fleet) -> Vec<&str> {
    f.listed.iter().map(|b| b.name.as_str()).collect()
}

fn get(envoy: &Envoy, path: &str, headers: &[(&str, &[u8])]) -> Resp {
    Conn::new(envoy.listener_port).get(path, headers)
}

// ---------------------------------------------------------------------------------
// 64 KiB hash keys and cookies with thousands of pairs.

/// Envoy's own limit, for the record: with the default `max_request_headers_kb`
/// (60 KiB) a 64 KiB header is answered 431 by Envoy before any filter runs, and
/// Envoy serves the next request.
#[test]
fn a_64_kib_header_over_envoys_default_limit_is_answered_431_and_envoy_serves_on() {
    let f = Fleet::start();
    let envoy = lb::start_cfg(config(Mode::FilterState, &f, None), 1);
    lb::wait_version(&envoy, "hashed", 1);
    let key = "k".repeat(64 * 1024);
    let r = get(
        &envoy,
        "/hash",
        &[("host", b"web.example"), ("x-user", key.as_bytes())],
    );
    println!(
        "64 KiB x-user at Envoy's default header limit: {} {:?}",
        r.status, r.body
    );
    assert_eq!(r.status, 431, "{r:?}");
    let r = get(
        &envoy,
        "/hash",
        &[("host", b"web.example"), ("x-user", b"u1")],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(names(&f).contains(&r.body.as_str()), "{r:?}");
    assert_eq!(f.trap.hits() + f.pass.hits(), 0);
}

fn huge_keys_and_cookies(mode: Mode, envoy: &Envoy, f: &Fleet) {
    let big = |c: char| c.to_string().repeat(64 * 1024);
    // A 64 KiB key lands on one instance, every time, on every connection (worker).
    let mut seen: HashMap<String, BTreeSet<String>> = HashMap::new();
    for (i, key) in [big('x'), big('y'), format!("{}-tail", big('x'))]
        .iter()
        .enumerate()
    {
        for _ in 0..6 {
            let r = get(
                envoy,
                "/hash",
                &[("host", b"web.example"), ("x-user", key.as_bytes())],
            );
            assert_eq!(
                r.status, 200,
                "{mode:?} 64 KiB key {i}: {} {}",
                r.status, r.body
            );
            seen.entry(format!("key {i}")).or_default().insert(r.body);
        }
    }
    // Cookies: 5,000 junk pairs (~60 KiB) around `session` route as `session` alone.
    let junk = |n: usize, tag: &str| -> String {
        (0..n)
            .map(|j| format!("{tag}{j}=v{j}"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    for s in 0..4 {
        let plain = format!("session=s-{s}");
        let before = format!("{}; session=s-{s}", junk(5000, "a"));
        let after = format!("session=s-{s}; {}", junk(5000, "b"));
        for cookie in [&plain, &before, &after, &plain] {
            let r = get(envoy, "/cookie", &[("cookie", cookie.as_bytes())]);
            assert_eq!(
                r.status,
                200,
                "{mode:?} cookie of {} bytes: {} {}",
                cookie.len(),
                r.status,
                r.body
            );
            seen.entry(format!("session {s}"))
                .or_default()
                .insert(r.body);
        }
    }
    // 10,000 pairs without the cookie: no key (counted), still routed.
    let missing_before = envoy
        .stat(&lb::stat("cookied.rq_hash_key_missing"))
        .unwrap_or(0);
    let r = get(
        envoy,
        "/cookie",
        &[("cookie", junk(10_000, "c").as_bytes())],
    );
    assert_eq!(r.status, 200, "{mode:?}: {} {}", r.status, r.body);
    assert!(lb::wait_stat(
        envoy,
        &lb::stat("cookied.rq_hash_key_missing"),
        Duration::from_secs(2),
        |v| v == missing_before + 1
    ));
    println!("{mode:?}: 64 KiB keys and 5,000-pair cookies land on {seen:?}");
    for (k, hosts) in &seen {
        assert_eq!(hosts.len(), 1, "{mode:?}: {k} went to {hosts:?}");
        assert!(
            hosts.iter().all(|h| names(f).contains(&h.as_str())),
            "{mode:?}: {k} {hosts:?}"
        );
    }
    assert_eq!(f.trap.hits() + f.pass.hits(), 0);
    let failures = vm_failures(envoy);
    assert!(failures.is_empty(), "{mode:?}: {failures:?}");
}

// ---------------------------------------------------------------------------------
// 100,000 distinct inputs: hash keys, subset selectors, authorities.

/// Request `i` of the distinct-input load. Six in eight go to `/bulk/` with a
/// distinct 200-byte hash key, a distinct 200-byte subset selector (no instance has
/// it: the fallback serves) and a distinct authority naming `web.example` (port and
/// letter case vary: service `hashed` claims it and picks); one in eight goes to
/// `/bulkpass/` with a distinct 200-byte authority no service claims (untouched); one
/// in eight to `/ghost`, whose route names a service that is not configured. Envoy
/// answers the first two itself (`direct_response`).
fn distinct_request(i: usize) -> (String, Vec<(String, Vec<u8>)>) {
    let pad = "p".repeat(180);
    match i % 8 {
        6 => {
            let host = format!("svc-{i:09}-{pad}.unknown");
            return (
                "/bulkpass/".into(),
                vec![("host".into(), host.into_bytes())],
            );
        }
        7 => return ("/ghost".into(), vec![]),
        _ => {}
    }
    let (port, case) = (1 + i % 65535, i / 65535);
    let host: String = "webexample"
        .chars()
        .enumerate()
        .map(|(k, c)| {
            if case >> k & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    let host = format!("{}.{}:{port}", &host[..3], &host[3..]);
    (
        "/bulk/".into(),
        vec![
            ("host".into(), host.into_bytes()),
            ("x-user".into(), format!("user-{i:09}-{pad}").into_bytes()),
            (
                "x-subset".into(),
                format!("version=v-{i:09}-{pad}").into_bytes(),
            ),
        ],
    )
}

/// How many of requests `range` go to `/hash`, `/pass`, `/ghost`.
fn distinct_split(range: std::ops::Range<usize>) -> (usize, usize, usize) {
    let (mut h, mut p, mut g) = (0, 0, 0);
    for i in range {
        match i % 8 {
            6 => p += 1,
            7 => g += 1,
            _ => h += 1,
        }
    }
    (h, p, g)
}

/// Least bytes one more entry costs in any per-input cache (a 64-bit hash of the input
/// and an 8-byte value at a hash map's load of at most one half): memory growing by
/// less than this times the number of new distinct inputs holds no cache per input.
const BYTES_PER_CACHED_INPUT: u64 = 32;

/// Requests `0..n` of `distinct_request` (three client threads on keep-alive
/// connections, at most `limit` per phase); stat names and memory at 10,000 requests
/// and at `n`.
fn distinct_inputs(mode: Mode, envoy: &Envoy, f: &Fleet, n: usize, limit: Duration) {
    std::thread::sleep(Duration::from_millis(200)); // earlier picks flushed on a tick
    let picks_before = lb::picks(envoy, "hashed", &f.listed);
    let warm = 10_000;
    let t0 = Instant::now();
    let (t1, sent1) = blast(envoy, 3, 0..warm, limit, distinct_request);
    let took1 = t0.elapsed();
    assert_eq!(sent1, warm, "{mode:?}: load cut by the time limit: {t1:?}");
    std::thread::sleep(Duration::from_millis(200)); // pick counters flushed on a tick
    let names_warm = stat_names(envoy);
    let mem_warm = memory(envoy);
    let t0 = Instant::now();
    let (t2, sent2) = blast(envoy, 3, warm..n, limit, distinct_request);
    let took2 = t0.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let names_n = stat_names(envoy);
    let mem_n = memory(envoy);
    let (hash2, pass2, _) = distinct_split(warm..n);
    let inputs2 = (3 * hash2 + pass2) as u64;
    let bound = inputs2 * BYTES_PER_CACHED_INPUT;
    let ghost_lines = envoy.log_count("which is not configured");
    println!(
        "{mode:?}: {warm} + {sent2} requests in {took1:.1?} + {took2:.1?} ({:.0}/s); answers {t1:?} then {t2:?}",
        sent2 as f64 / took2.as_secs_f64()
    );
    println!(
        "{mode:?}: stat names {} at {warm} requests, {} at {n}; VmRSS {:.1} -> {:.1} MiB, allocated {:.1} -> {:.1} MiB \
         ({inputs2} new distinct inputs: bound {:.1} MiB); log lines about the unknown service: {ghost_lines} for {} requests",
        names_warm.len(),
        names_n.len(),
        mib(mem_warm.0),
        mib(mem_n.0),
        mib(mem_warm.1),
        mib(mem_n.1),
        mib(bound),
        distinct_split(0..n).2,
    );
    assert_eq!(sent2, n - warm, "{mode:?}: load cut by the time limit");
    let mut all = t1.clone();
    for (k, v) in t2 {
        *all.entry(k).or_insert(0) += v;
    }
    let (hash, pass, ghost) = distinct_split(0..n);
    assert_eq!(
        all.remove("200 bulkpass").unwrap_or(0) as usize,
        pass,
        "{mode:?}: {all:?}"
    );
    assert_eq!(
        all.remove("200 bulk").unwrap_or(0) as usize,
        hash,
        "{mode:?}: {all:?}"
    );
    // Every claimed request was picked for (a listed instance).
    lb::wait_picks(envoy, "hashed", &f.listed, picks_before + hash as i64);
    let ghost_reply = "503 registry-lb: service `ghost` is not configured";
    assert_eq!(
        all.remove(ghost_reply).unwrap_or(0) as usize,
        ghost,
        "{mode:?}: {all:?}"
    );
    assert!(all.is_empty(), "{mode:?}: {all:?}");
    assert_eq!(f.trap.hits() + f.pass.hits(), 0);
    assert_eq!(
        envoy.stat(&lb::stat("unknown_service")),
        Some(ghost as i64),
        "{mode:?}"
    );
    let grew: Vec<&String> = names_n.difference(&names_warm).collect();
    assert!(grew.is_empty(), "{mode:?}: new stat names {grew:?}");
    let rss_growth = mem_n.0.saturating_sub(mem_warm.0);
    let heap_growth = mem_n.1.saturating_sub(mem_warm.1);
    assert!(
        rss_growth < bound,
        "{mode:?}: VmRSS grew {rss_growth} bytes over {inputs2} inputs"
    );
    assert!(
        heap_growth < bound,
        "{mode:?}: allocated grew {heap_growth} bytes over {inputs2} inputs"
    );
    // Two workers log at most one line per 10 s each (plus the one each writes at once).
    let secs = (took1 + took2).as_secs() + 1;
    assert!(
        ghost_lines as u64 <= 2 * (secs / 10 + 1),
        "{mode:?}: {ghost_lines} log lines in {secs} s for {ghost} requests naming an unknown service"
    );
    assert!(
        ghost_lines >= 1,
        "{mode:?}: the unknown service was never logged"
    );
    let failures = vm_failures(envoy);
    assert!(failures.is_empty(), "{mode:?}: {failures:?}");
}

// ---------------------------------------------------------------------------------
// Malformed subset headers.

fn malformed_subset_headers(mode: Mode, envoy: &Envoy, f: &Fleet) {
    let started = Instant::now();
    let pairs = |n: usize| {
        (0..n)
            .map(|j| format!("k{j}=v{j}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    // (what, value, malformed: counted and logged). The first malformed one is the
    // one each worker logs first: its tab must come out escaped.
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("tab, empty key", b"=\tinjected".to_vec(), true),
        ("empty", b"".to_vec(), false),
        ("no `=` (a bare key)", b"justakey".to_vec(), false),
        ("17 pairs", pairs(17).into_bytes(), true),
        ("5,000 pairs", pairs(5000).into_bytes(), true),
        ("duplicate key", b"version=v1,version=v2".to_vec(), true),
        ("invalid UTF-8", b"version=\xff\xfe\xc3".to_vec(), true),
        ("60 KiB", "v".repeat(60 * 1024).into_bytes(), true),
        ("control character 0x01", b"=\x01".to_vec(), true),
        ("DEL", b"=\x7f".to_vec(), true),
        ("ESC", b"=\x1b[31m".to_vec(), true),
    ];
    let invalid = lb::stat("subsetted.subset_header_invalid");
    let mut counted = 0;
    for (what, value, malformed) in &cases {
        let before = envoy.stat(&invalid).unwrap_or(0);
        let r = get(envoy, "/subset", &[("x-subset", value)]);
        println!(
            "{mode:?}: subset header {what}: {} {:?}",
            r.status,
            r.body.trim()
        );
        if r.status == 400 {
            // Envoy's codec refused the bytes: the filter never saw them.
            assert!(
                !value
                    .iter()
                    .all(|c| *c == b'\t' || (0x20..0x7f).contains(c) || *c >= 0x80),
                "{what}"
            );
            continue;
        }
        assert_eq!(r.status, 200, "{mode:?} {what}: {r:?}");
        assert!(
            names(f).contains(&r.body.as_str()),
            "{mode:?} {what}: {r:?}"
        );
        let want = before + i64::from(*malformed);
        assert!(
            lb::wait_stat(envoy, &invalid, Duration::from_secs(2), |v| v == want),
            "{mode:?} {what}: subset_header_invalid {:?}, want {want}",
            envoy.stat(&invalid)
        );
        counted += i64::from(*malformed);
    }
    // A well-formed selector still selects.
    for _ in 0..5 {
        let r = get(envoy, "/subset", &[("x-subset", b"version=v1")]);
        assert_eq!((r.status, r.body.as_str()), (200, "a"), "{mode:?}");
    }
    assert!(
        counted >= 6,
        "{mode:?}: only {counted} malformed headers reached the filter"
    );
    assert!(
        envoy.wait_for_log("malformed subset header", Duration::from_secs(3)),
        "{mode:?}: no log line for a malformed subset header"
    );
    let log = envoy.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("malformed subset header"))
        .collect();
    println!("{mode:?}: {lines:#?}");
    assert!(
        lines.iter().any(|l| l.contains("`=\\tinjected`")),
        "{mode:?}: {lines:?}"
    );
    assert!(log
        .lines()
        .filter(|l| l.contains("registry-lb"))
        .all(|l| !l.contains('\u{1b}') && !l.contains('\u{1}')));
    // Rate-limited: each of the two workers writes one line, and one more per 10 s.
    let secs = started.elapsed().as_secs();
    assert!(
        lines.len() as u64 <= 2 * (secs / 10 + 1),
        "{mode:?}: {} lines in {secs} s",
        lines.len()
    );
    assert_eq!(f.trap.hits() + f.pass.hits(), 0);
    let failures = vm_failures(envoy);
    assert!(failures.is_empty(), "{mode:?}: {failures:?}");
}

// ---------------------------------------------------------------------------------
// Every destination header spoofed.

/// Raw request headers: name, value bytes.
type Headers = Vec<(String, Vec<u8>)>;

/// (path, authority, headers besides the spoofs, the body that must answer: `None`
/// for any listed instance, `registry-lb…` for a 503).
type SpoofCase = (String, String, Headers, Option<String>);

/// Headers a client could hope to steer the destination with, each naming `target`.
fn spoofs(target: &str) -> Vec<(String, Vec<u8>)> {
    let t = target.as_bytes().to_vec();
    vec![
        ("x-envoy-original-dst-host".into(), t.clone()),
        ("X-Envoy-Original-Dst-Host".into(), t.clone()),
        ("x-lb-host".into(), t.clone()),
        (
            "x-lb-host".into(),
            format!("{target},{target}").into_bytes(),
        ),
        ("x-envoy-original-host".into(), t.clone()),
        (
            "x-envoy-original-url".into(),
            format!("http://{target}/").into_bytes(),
        ),
        ("x-forwarded-host".into(), t.clone()),
        ("x-envoy-upstream-alt-stat-name".into(), t.clone()),
        ("x-envoy-upstream-rq-timeout-ms".into(), b"5000".to_vec()),
        ("x-envoy-internal".into(), b"true".to_vec()),
        ("x-envoy-retry-on".into(), b"5xx,connect-failure".to_vec()),
        ("x-envoy-max-retries".into(), b"2".to_vec()),
    ]
}

fn spoofed_destinations(mode: Mode, envoy: &Envoy, f: &Fleet) {
    let trap = f.trap.addr();
    let b = f.listed[1].addr();
    let removed = lb::stat("client_handoff_header_removed");
    let removed_before = envoy.stat(&removed).unwrap_or(0);
    // (path, authority, extra headers, what must answer). The subset pins `a`, the
    // cookie a fixed instance: spoofing even a listed instance (`b`) moves nothing.
    let session = |n: &str| ("cookie".to_string(), format!("session={n}").into_bytes());
    let mut fixed: HashMap<String, String> = HashMap::new();
    for s in ["s1", "s2", "s3", "s4"] {
        let r = get(
            envoy,
            "/cookie",
            &[("cookie", format!("session={s}").as_bytes())],
        );
        assert_eq!(r.status, 200);
        fixed.insert(s.to_string(), r.body);
    }
    let mut sent = 0u64;
    let mut with_handoff_header = 0i64;
    for target in [trap.as_str(), b.as_str()] {
        let trap_port = target.rsplit(':').next().unwrap_or("1");
        let cases: Vec<SpoofCase> = vec![
            (
                "/subset".into(),
                target.into(),
                vec![("x-subset".into(), b"version=v1".to_vec())],
                Some("a".into()),
            ),
            (
                format!("http://{target}/subset"),
                target.into(),
                vec![("x-subset".into(), b"version=v1".to_vec())],
                Some("a".into()),
            ),
            (
                "/cookie".into(),
                target.into(),
                vec![session("s1")],
                fixed.get("s1").cloned(),
            ),
            (
                "/cookie".into(),
                "web".into(),
                vec![session("s2")],
                fixed.get("s2").cloned(),
            ),
            (
                "/cookie".into(),
                target.into(),
                vec![session("s3")],
                fixed.get("s3").cloned(),
            ),
            (
                "/hash".to_string(),
                format!("web.example:{trap_port}"),
                vec![("x-user".into(), b"u1".to_vec())],
                None,
            ),
            (
                "/ghost".into(),
                target.into(),
                vec![],
                Some("registry-lb: service `ghost` is not configured".into()),
            ),
            ("/pass".into(), target.into(), vec![], Some("pass".into())),
        ];
        for (path, authority, extra, want) in cases {
            // Each spoof alone, then all of them at once.
            let all = spoofs(target);
            let mut sets: Vec<Vec<(String, Vec<u8>)>> =
                all.iter().map(|h| vec![h.clone()]).collect();
            sets.push(all);
            for set in sets {
                let mut hs: Vec<(String, Vec<u8>)> =
                    vec![("host".into(), authority.clone().into_bytes())];
                hs.extend(extra.iter().cloned());
                hs.extend(set.iter().cloned());
                let carries = set.iter().any(|(k, _)| {
                    let k = k.to_ascii_lowercase();
                    (mode == Mode::Header && k == "x-envoy-original-dst-host")
                        || (mode == Mode::OverrideHost && k == "x-lb-host")
                });
                with_handoff_header += i64::from(carries);
                let hs: Vec<(&str, &[u8])> =
                    hs.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
                let r = get(envoy, &path, &hs);
                sent += 1;
                let what = format!(
                    "{mode:?} {path} host {authority} spoofing {:?}",
                    set.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>()
                );
                match &want {
                    Some(w) if w.starts_with("registry-lb") => {
                        assert_eq!((r.status, r.body.trim()), (503, w.as_str()), "{what}")
                    }
                    Some(w) => assert_eq!((r.status, r.body.as_str()), (200, w.as_str()), "{what}"),
                    None => {
                        assert_eq!(r.status, 200, "{what}: {r:?}");
                        assert!(names(f).contains(&r.body.as_str()), "{what}: {r:?}");
                    }
                }
            }
        }
    }
    assert_eq!(
        f.trap.hits(),
        0,
        "{mode:?}: a spoofed header reached the trap"
    );
    // The control: with the filter off on a route to the same cluster, the header
    // the cluster reads does choose the host (the trap above was reachable).
    let control = match mode {
        Mode::FilterState => None,
        Mode::Header => Some("x-envoy-original-dst-host"),
        Mode::OverrideHost => Some("x-lb-host"),
    };
    if let Some(h) = control {
        let r = get(envoy, "/unfiltered", &[(h, trap.as_bytes())]);
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "trap"),
            "{mode:?} control"
        );
        assert_eq!(f.trap.hits(), 1);
    }
    println!(
        "{mode:?}: {sent} spoofing requests; trap hits {} (control included); client_handoff_header_removed {:?}",
        f.trap.hits(),
        envoy.stat(&removed)
    );
    let want_removed = if mode == Mode::FilterState {
        0
    } else {
        with_handoff_header
    };
    assert!(
        lb::wait_stat(envoy, &removed, Duration::from_secs(2), |v| v
            - removed_before
            == want_removed)
            || (want_removed == 0 && envoy.stat(&removed).is_none()),
        "{mode:?}: client_handoff_header_removed {:?}, want {want_removed}",
        envoy.stat(&removed)
    );
    let failures = vm_failures(envoy);
    assert!(failures.is_empty(), "{mode:?}: {failures:?}");
}

// ---------------------------------------------------------------------------------
// All of it, in each hand-off: one Envoy each (a wasm Envoy takes seconds to start on
// a loaded machine). The spoofing runs last: its control request reaches the trap.

fn hostile_clients(mode: Mode, n: usize) {
    let f = Fleet::start();
    let envoy = start(mode, &f);
    huge_keys_and_cookies(mode, &envoy, &f);
    malformed_subset_headers(mode, &envoy, &f);
    distinct_inputs(mode, &envoy, &f, n, Duration::from_secs(60));
    spoofed_destinations(mode, &envoy, &f);
}

#[test]
fn hostile_clients_never_choose_the_host_nor_grow_stats_or_memory_filter_state() {
    // 100,500 distinct hash keys and subset selectors (and authorities).
    hostile_clients(Mode::FilterState, 134_000);
}

#[test]
fn hostile_clients_never_choose_the_host_nor_grow_stats_or_memory_header() {
    hostile_clients(Mode::Header, 40_000);
}

#[test]
fn hostile_clients_never_choose_the_host_nor_grow_stats_or_memory_override_host() {
    hostile_clients(Mode::OverrideHost, 40_000);
}
