//! Checks the test fakes themselves, without Envoy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use serde_json::Value;
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};
use support::{agent, header, http_get, http_request, ConsulInstance, FakeConsul};

#[test]
fn backend_answers_its_name() {
    let mut b = support::Backend::start("b1");
    let url = format!("http://{}/x?y=1", b.addr());
    let (code, body, hdrs) = http_get(&url, &[]);
    assert_eq!((code, body.as_str()), (200, "b1"));
    assert_eq!(header(&hdrs, "x-backend"), Some("b1"));
    assert_eq!(b.hits(), 1);
    assert_eq!(b.requests()[0].0, "/x?y=1");

    b.set_status(503);
    let (code, body, hdrs) = http_get(&url, &[]);
    assert_eq!((code, body.as_str()), (503, "b1"));
    assert_eq!(header(&hdrs, "x-backend"), Some("b1"));
    b.set_status(200);

    // A slow backend does not serialize requests.
    b.set_delay(Duration::from_millis(400));
    let t0 = Instant::now();
    let hs: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            thread::spawn(move || http_get(&url, &[]).0)
        })
        .collect();
    for h in hs {
        assert_eq!(h.join().unwrap(), 200);
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(1200),
        "4 parallel 400 ms requests took {took:?}"
    );
    assert_eq!(b.hits(), 6);
    b.set_delay(Duration::ZERO);

    // stop(): a kept-alive connection is closed and the port refuses new connections.
    let ag = agent(Duration::from_secs(3));
    assert_eq!(http_request(&ag, "GET", &url, &[], None).0, 200);
    let port = b.port;
    b.stop();
    let t0 = Instant::now();
    let (code, body, _) = http_request(&ag, "GET", &url, &[], None);
    assert_eq!(code, 0, "after stop: {body}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port still accepting after stop"
    );

    // It can come back on the same port.
    let b2 = support::Backend::start_on("b1-again", port);
    assert_eq!(http_get(&url, &[]).1, "b1-again");
    drop(b2);
}

fn health(
    c: &FakeConsul,
    q: &str,
    headers: &[(&str, &str)],
) -> (u16, String, Vec<(String, String)>) {
    http_get(
        &format!("http://{}/v1/health/service/{q}", c.addr()),
        headers,
    )
}

#[test]
fn fake_consul_shape_filters_and_acl() {
    let c = FakeConsul::start();
    let (code, body, hdrs) = health(&c, "nope", &[]);
    assert_eq!((code, body.as_str()), (200, "[]"));
    assert_eq!(header(&hdrs, "x-consul-index"), Some("10"));

    c.set_service(
        "web",
        vec![
            ConsulInstance::new("web-1", "10.0.0.1", 8080)
                .tags(&["primary"])
                .weights(10, 1),
            ConsulInstance::new("web-2", "", 8081).status("warning"),
            ConsulInstance::new("web-3", "10.0.0.3", 8082).status("critical"),
        ],
    );
    let (code, body, hdrs) = health(&c, "web", &[]);
    assert_eq!(code, 200);
    assert_eq!(header(&hdrs, "content-type"), Some("application/json"));
    assert_eq!(header(&hdrs, "x-consul-knownleader"), Some("true"));
    let idx: u64 = header(&hdrs, "x-consul-index").unwrap().parse().unwrap();
    assert_eq!(idx, c.index("web"));
    assert!(idx > 10);
    let v: Value = serde_json::from_str(&body).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 3);
    assert_eq!(arr[0]["Service"]["Address"], "10.0.0.1");
    assert_eq!(arr[0]["Service"]["Port"], 8080);
    assert_eq!(arr[0]["Service"]["Weights"]["Passing"], 10);
    assert_eq!(arr[0]["Service"]["Tags"][0], "primary");
    assert_eq!(arr[1]["Service"]["Address"], "");
    assert_eq!(arr[1]["Node"]["Address"], "127.0.0.1");
    assert_eq!(arr[1]["Checks"][0]["CheckID"], "serfHealth");
    assert_eq!(arr[1]["Checks"][1]["Status"], "warning");

    let ids = |q: &str| -> Vec<String> {
        let (code, body, _) = health(&c, q, &[]);
        assert_eq!(code, 200, "{q}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["Service"]["ID"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids("web?passing"), ["web-1"]);
    assert_eq!(ids("web?passing=true"), ["web-1"]);
    assert_eq!(ids("web?passing=false").len(), 3);
    assert_eq!(ids("web?tag=primary"), ["web-1"]);
    assert_eq!(ids("web?tag=nope").len(), 0);
    assert_eq!(ids("web?dc=dc1").len(), 3);
    let (code, body, _) = health(&c, "web?dc=dc9", &[]);
    assert_eq!((code, body.as_str()), (500, "No path to datacenter"));

    c.set_token(Some("s3cret"));
    let (code, body, _) = health(&c, "web", &[]);
    assert_eq!((code, body.as_str()), (403, "ACL not found"));
    assert_eq!(health(&c, "web", &[("X-Consul-Token", "wrong")]).0, 403);
    assert_eq!(health(&c, "web", &[("X-Consul-Token", "s3cret")]).0, 200);
    assert_eq!(health(&c, "web?token=s3cret", &[]).0, 200);

    let log = c.request_log();
    let (last_path, last_headers) = log.last().unwrap();
    assert_eq!(last_path, "/v1/health/service/web?token=s3cret");
    assert!(header(last_headers, "host").is_some());
    let with_token = &log[log.len() - 2];
    assert_eq!(header(&with_token.1, "x-consul-token"), Some("s3cret"));
    assert_eq!(c.requests(), log.len() as u64);
    assert_eq!(c.requests_for("/v1/health/service/nope"), 1);
}

#[test]
fn fake_consul_blocking_queries() {
    let mut c = FakeConsul::start();
    c.set_service("api", vec![ConsulInstance::new("api-1", "127.0.0.1", 9001)]);
    let idx = c.index("api");

    // No change: returns after `wait` with the same index.
    let t0 = Instant::now();
    let (code, _, hdrs) = health(&c, &format!("api?index={idx}&wait=300ms"), &[]);
    let took = t0.elapsed();
    assert_eq!(code, 200);
    assert_eq!(
        header(&hdrs, "x-consul-index"),
        Some(idx.to_string().as_str())
    );
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_millis(1500),
        "{took:?}"
    );

    // Index ahead of ours (Consul reset): answers at once.
    let t0 = Instant::now();
    assert_eq!(
        health(&c, &format!("api?index={}&wait=5s", idx + 100), &[]).0,
        200
    );
    assert!(t0.elapsed() < Duration::from_millis(500));

    // Change while blocked: returns early with the new index and state.
    let url = format!(
        "http://{}/v1/health/service/api?index={idx}&wait=10s",
        c.addr()
    );
    let t0 = Instant::now();
    let h = thread::spawn(move || http_get(&url, &[]));
    thread::sleep(Duration::from_millis(300));
    c.set_service(
        "api",
        vec![
            ConsulInstance::new("api-1", "127.0.0.1", 9001),
            ConsulInstance::new("api-2", "127.0.0.1", 9002),
        ],
    );
    let (code, body, hdrs) = h.join().unwrap();
    let took = t0.elapsed();
    assert_eq!(code, 200);
    assert!(
        took < Duration::from_secs(2),
        "blocking query did not return early: {took:?}"
    );
    let new_idx: u64 = header(&hdrs, "x-consul-index").unwrap().parse().unwrap();
    assert!(new_idx > idx);
    assert_eq!(
        serde_json::from_str::<Value>(&body)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Bad wait → 400; bad token while blocking → 403 without blocking.
    assert_eq!(
        health(&c, &format!("api?index={new_idx}&wait=10"), &[]).0,
        400
    );
    c.set_token(Some("t"));
    let t0 = Instant::now();
    assert_eq!(
        health(&c, &format!("api?index={new_idx}&wait=10s"), &[]).0,
        403
    );
    assert!(t0.elapsed() < Duration::from_millis(500));

    // stop() ends a blocked query (connection closed, no answer) and closes the port.
    let url = format!(
        "http://{}/v1/health/service/api?index={new_idx}&wait=10s",
        c.addr()
    );
    let h = thread::spawn(move || http_get(&url, &[("X-Consul-Token", "t")]));
    thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let port = c.port;
    c.stop();
    let (code, _, _) = h.join().unwrap();
    assert_eq!(code, 0);
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn etcd_put_get_delete_and_auth() {
    let e = support::Etcd::start();
    let r0 = e.revision();
    e.put("/services/web/a", "{\"address\":\"127.0.0.1\",\"port\":1}");
    e.put("/services/web/b", "x");
    e.put("/services/webx/c", "y");
    assert_eq!(
        e.get("/services/web/a").as_deref(),
        Some("{\"address\":\"127.0.0.1\",\"port\":1}")
    );
    let kvs = e.range_prefix("/services/web/");
    assert_eq!(
        kvs.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["/services/web/a", "/services/web/b"]
    );
    assert_eq!(e.revision(), r0 + 3);
    e.delete("/services/web/a");
    assert_eq!(e.range_prefix("/services/web/").len(), 1);
    assert_eq!(e.get("/services/web/a"), None);
    assert_eq!(e.revision(), r0 + 4);

    e.enable_auth("root", "pw");
    e.put("/services/web/z", "after-auth");
    assert_eq!(e.get("/services/web/z").as_deref(), Some("after-auth"));
    // Without a token the gateway refuses.
    let (code, v) = e.post_raw("/v3/kv/range", &serde_json::json!({"key": "eA=="}), None);
    assert_ne!(code, 200, "{v}");
    let token = e.authenticate("root", "pw");
    let (code, _) = e.post_raw(
        "/v3/kv/range",
        &serde_json::json!({"key": "eA=="}),
        Some(&token),
    );
    assert_eq!(code, 200);
}

#[test]
fn envoy_fallback_path_is_where_dev_installs_envoy() {
    // `./dev` installs Envoy to `$TOOLS/envoy-$ENVOY_VERSION/envoy/_bin/envoy` with
    // `ENVOY_VERSION` defaulting to the version in its `${ENVOY_VERSION:-…}` line.
    let dev = std::fs::read_to_string(support::repo_root().join("dev")).unwrap();
    let default = dev
        .lines()
        .find_map(|l| l.strip_prefix("ENVOY_VERSION=\"${ENVOY_VERSION:-"))
        .and_then(|rest| rest.strip_suffix("}\""))
        .expect("./dev sets ENVOY_VERSION=\"${ENVOY_VERSION:-<version>}\"");
    assert_eq!(default, support::DEFAULT_ENVOY_VERSION);
    assert!(
        dev.contains("ENVOY_BIN:-$TOOLS/envoy-$ENVOY_VERSION/envoy/_bin/envoy}"),
        "./dev installs Envoy somewhere else"
    );
    let tools = support::repo_root().join(".tools");
    assert_eq!(
        support::default_envoy_bin(None),
        tools.join(format!("envoy-{default}/envoy/_bin/envoy"))
    );
    assert_eq!(
        support::default_envoy_bin(Some("")),
        support::default_envoy_bin(None)
    );
    assert_eq!(
        support::default_envoy_bin(Some("1.39.1")),
        tools.join("envoy-1.39.1/envoy/_bin/envoy")
    );
}
