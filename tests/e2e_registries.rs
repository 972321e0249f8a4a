//! End to end in a real Envoy against stand-ins that speak the HTTP APIs of Nacos,
//! Eureka and the Kubernetes API server (EndpointSlices): discovery and change for
//! each, Nacos tokens that expire mid-test, Eureka basic auth and its older answer
//! shapes, a terminating Kubernetes endpoint, and a service moving from Nacos to
//! Consul with no request failing during the switch.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::eureka::Shape;
use support::{
    lb, Backend, ConsulInstance, Envoy, EurekaInstance, FakeConsul, FakeEureka, FakeKubernetes,
    FakeNacos,
};
use support::{K8sEndpoint, K8sSlice, NacosInstance};

const NACOS_SRC: &str = r#"{ "nacos": { "cluster": "nacos", "service": "web", "group": "DEFAULT_GROUP", "api": "v1" } }"#;
const EUREKA_SRC: &str =
    r#"{ "eureka": { "cluster": "eureka", "app": "web", "path_prefix": "/eureka" } }"#;
const K8S_SRC: &str =
    r#"{ "kubernetes": { "cluster": "kubernetes", "namespace": "default", "service": "web" } }"#;

fn registry_stats(envoy: &Envoy) -> Vec<(String, i64)> {
    let mut v: Vec<(String, i64)> = envoy
        .stats()
        .into_iter()
        .filter(|(k, _)| k.contains("registry_lb"))
        .collect();
    v.sort();
    v
}

fn stat(envoy: &Envoy, name: &str) -> i64 {
    envoy.stat(&lb::stat(name)).unwrap_or(0)
}

/// Asserts that no refresh failed, listing registry-lb's stats if one did.
fn assert_no_failed_refresh(envoy: &Envoy) {
    assert_eq!(
        stat(envoy, "web.refresh_failed"),
        0,
        "no refresh failed: {:?}",
        registry_stats(envoy)
    );
}

/// Sends requests until `name` answers; the time it took, or None after `timeout`.
fn first_answer_from(envoy: &Envoy, name: &str, timeout: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if envoy.get("/", &[]).1 == name {
            return Some(t0.elapsed());
        }
    }
    None
}

fn nacos_inst(b: &Backend) -> NacosInstance {
    NacosInstance::new("127.0.0.1", b.port)
}

#[test]
fn nacos_discovers_follows_changes_and_renews_expiring_tokens() {
    let nacos = FakeNacos::start();
    // Tokens live 3 s; registry-lb polls every second and must renew them in time.
    nacos.set_auth("registry-lb", "p&ss w=rd%", Duration::from_secs(3));
    let b: Vec<Backend> = Backend::start_all(&["a", "b", "c"]);
    nacos.set_service(
        "web",
        vec![nacos_inst(&b[0]).weight(3.0), nacos_inst(&b[1])],
    );
    let with_auth = NACOS_SRC.replace(
        r#""api": "v1" }"#,
        r#""api": "v1", "username": "registry-lb", "password": "p&ss w=rd%" }"#,
    );
    let envoy = lb::start(
        "envoy/nacos.yaml",
        &[(8848, nacos.port)],
        &[(NACOS_SRC, &with_auth)],
        2,
    );
    let started = Instant::now();
    lb::wait_version(&envoy, "web", 1);
    let c = lb::tally(&envoy, 80);
    assert_eq!(
        (c.get("a"), c.get("b")),
        (Some(&60), Some(&20)),
        "weights 3.0 and 1.0: {c:?}\n{:?}",
        registry_stats(&envoy)
    );

    // What reached Nacos: the list call with its parameters and the token.
    let log = nacos.request_log();
    let list = log
        .iter()
        .rev()
        .find(|r| r.0.starts_with("/nacos/v1/ns/instance/list?"))
        .expect("a list call");
    for p in [
        "serviceName=web",
        "groupName=DEFAULT_GROUP",
        "healthyOnly=false",
        "accessToken=fake-nacos-token-",
    ] {
        assert!(list.0.contains(p), "{p} missing in {}", list.0);
    }

    // An added instance gets traffic within one refresh interval (1 s) plus a tick,
    // once past the start-up window (the second call comes one to two intervals after
    // the first: docs/fleet.md).
    std::thread::sleep(Duration::from_millis(1000));
    nacos.set_service(
        "web",
        vec![
            nacos_inst(&b[0]).weight(3.0),
            nacos_inst(&b[1]),
            nacos_inst(&b[2]),
        ],
    );
    let seen = first_answer_from(&envoy, "c", Duration::from_secs(5))
        .expect("added instance never served");
    println!(
        "nacos: added instance served after {} ms (refresh_interval 1 s)",
        seen.as_millis()
    );
    assert!(seen < Duration::from_millis(1600), "{seen:?}");

    // A removed instance gets nothing after the next refresh.
    nacos.set_service("web", vec![nacos_inst(&b[1]), nacos_inst(&b[2])]);
    lb::wait_version(&envoy, "web", 3);
    std::thread::sleep(Duration::from_millis(150));
    let hits = b[0].hits();
    let c = lb::tally(&envoy, 40);
    assert_eq!(b[0].hits(), hits, "removed instance got traffic: {c:?}");
    assert_eq!((c.get("b"), c.get("c")), (Some(&20), Some(&20)), "{c:?}");

    // Several token lifetimes pass: each token is renewed before it runs out (90 % of
    // its TTL), so Nacos never sees an expired one and no refresh fails.
    assert!(
        lb::wait_stat(
            &envoy,
            &lb::stat("web.registry_login"),
            Duration::from_secs(15),
            |v| v >= 3
        ),
        "tokens not renewed: {:?}",
        registry_stats(&envoy)
    );
    let elapsed = started.elapsed();
    let logins = stat(&envoy, "web.registry_login");
    println!(
        "nacos: {logins} logins in {:.1} s with a 3 s tokenTtl; {} list calls; expired tokens used: {}",
        elapsed.as_secs_f64(),
        nacos.list_requests(),
        nacos.expired_token_uses()
    );
    let seen = nacos.logins() as i64;
    assert!(
        seen >= logins && seen <= logins + 1,
        "the fake saw {seen} logins, registry-lb counted {logins}"
    );
    assert_eq!(
        nacos.expired_token_uses(),
        0,
        "a token was used after its TTL"
    );
    assert_no_failed_refresh(&envoy);
    assert_eq!(stat(&envoy, "web.registry_token_expired"), 0);
    let c = lb::tally(&envoy, 20);
    assert_eq!((c.get("b"), c.get("c")), (Some(&10), Some(&10)), "{c:?}");
}

#[test]
fn nacos_v2_health_weights_protection_threshold_and_relogin_on_403() {
    let nacos = FakeNacos::start();
    nacos.set_auth("nacos", "nacos", Duration::from_secs(18_000));
    let b: Vec<Backend> = Backend::start_all(&["a", "b", "c", "d", "e"]);
    nacos.set_service(
        "web",
        vec![
            nacos_inst(&b[0])
                .weight(0.5)
                .cluster("z1")
                .meta("version", "v1"),
            nacos_inst(&b[1]).weight(1.5),
            nacos_inst(&b[2]).healthy(false),
            nacos_inst(&b[3]).enabled(false),
            nacos_inst(&b[4]).weight(0.0),
        ],
    );
    let v2 = NACOS_SRC.replace(
        r#""api": "v1" }"#,
        r#""api": "v2", "username": "nacos", "password": "nacos" }"#,
    );
    let envoy = lb::start(
        "envoy/nacos.yaml",
        &[(8848, nacos.port)],
        &[(NACOS_SRC, &v2)],
        1,
    );
    lb::wait_version(&envoy, "web", 1);
    let c = lb::tally(&envoy, 80);
    println!("nacos v2: weights 0.5 / 1.5, unhealthy, disabled, weight 0: {c:?}");
    assert_eq!(
        (c.get("a"), c.get("b"), c.len()),
        (Some(&20), Some(&60), 2),
        "{c:?}"
    );
    assert_eq!(
        stat(&envoy, "web.instances_known"),
        4,
        "weight 0 is left out; unhealthy and disabled are known"
    );
    assert_eq!(stat(&envoy, "web.instances_healthy"), 2);
    assert!(nacos.request_log().iter().any(|r| r
        .0
        .starts_with("/nacos/v2/ns/instance/list?serviceName=web&")));

    // Protect threshold 0.9 with 4 of 5 healthy (Nacos counts disabled and weight-0
    // instances too): Nacos reports every instance healthy and says so. The list is
    // used (c gets traffic), with a warning logged and counted.
    nacos.set_protect_threshold("web", 0.9);
    assert!(
        lb::wait_stat(
            &envoy,
            &lb::stat("web.registry_warning"),
            Duration::from_secs(5),
            |v| v >= 1
        ),
        "protection warning not counted: {:?}",
        registry_stats(&envoy)
    );
    assert!(envoy.wait_for_log(
        "registry warning: nacos reports reachProtectionThreshold for `web`",
        Duration::from_secs(3)
    ));
    lb::wait_version(&envoy, "web", 2);
    let c = lb::tally(&envoy, 60);
    assert_eq!(
        (c.get("a"), c.get("b"), c.get("c"), c.len()),
        (Some(&10), Some(&30), Some(&20), 3),
        "{c:?}"
    );
    // It is reported on every answer while it lasts.
    let w = stat(&envoy, "web.registry_warning");
    assert!(lb::wait_stat(
        &envoy,
        &lb::stat("web.registry_warning"),
        Duration::from_secs(5),
        |v| v > w
    ));
    nacos.set_protect_threshold("web", 0.0);
    lb::wait_version(&envoy, "web", 3);
    let w = stat(&envoy, "web.registry_warning");
    std::thread::sleep(Duration::from_millis(2200));
    assert_eq!(
        stat(&envoy, "web.registry_warning"),
        w,
        "no warning once the threshold is no longer reached"
    );

    // Nacos forgets its tokens (restart with a new key): the next list call gets 403,
    // registry-lb logs in again at once and no refresh fails. Revoke right after a
    // list call was answered, so the token in use is one Nacos had accepted.
    let calls = nacos.list_requests();
    assert!(support::wait_until(
        Duration::from_secs(3),
        Duration::from_millis(5),
        || nacos.list_requests() > calls
    ));
    std::thread::sleep(Duration::from_millis(100));
    let unchanged = stat(&envoy, "web.refresh_unchanged");
    nacos.revoke_tokens();
    assert!(
        lb::wait_stat(
            &envoy,
            &lb::stat("web.registry_token_expired"),
            Duration::from_secs(5),
            |v| v >= 1
        ),
        "{:?}",
        registry_stats(&envoy)
    );
    assert!(lb::wait_stat(
        &envoy,
        &lb::stat("web.refresh_unchanged"),
        Duration::from_secs(5),
        |v| v > unchanged
    ));
    assert_eq!(
        stat(&envoy, "web.registry_login"),
        2,
        "one login at start, one after the 403"
    );
    assert_no_failed_refresh(&envoy);

    // Wrong password: an auth failure of its own; no instance, a clear 503.
    let wrong = NACOS_SRC.replace(
        r#""api": "v1" }"#,
        r#""api": "v2", "username": "nacos", "password": "guess" }"#,
    );
    let refused = lb::start(
        "envoy/nacos.yaml",
        &[(8848, nacos.port)],
        &[(NACOS_SRC, &wrong)],
        1,
    );
    lb::assert_refused(
        &refused,
        "login as `nacos` failed: 403 unknown user!",
        Duration::from_secs(3),
    );
    let (status, body, _) = refused.get("/", &[]);
    assert_eq!(
        (status, body.as_str()),
        (
            503,
            "registry-lb: no available instance for service `web`\n"
        )
    );
}

#[test]
fn eureka_basic_auth_old_shapes_statuses_and_unknown_app() {
    let eureka = FakeEureka::start();
    eureka.set_basic_auth("registry-lb", "s3:cret");
    eureka.set_shape(Shape::Old);
    let b: Vec<Backend> = Backend::start_all(&["a", "b", "c", "d", "e"]);
    let inst = |x: &Backend| EurekaInstance::new(&format!("web-{}", x.name), "127.0.0.1", x.port);
    let apps = |c_status: &str| {
        vec![
            inst(&b[0]).meta("weight", "3").meta("zone", "z1"),
            inst(&b[1]),
            inst(&b[2]).status(c_status),
            inst(&b[3]).status("DOWN"),
            inst(&b[4]).status("STARTING"),
        ]
    };
    eureka.set_app("web", apps("OUT_OF_SERVICE"));
    let creds = EUREKA_SRC.replace(
        r#""/eureka" }"#,
        r#""/eureka", "username": "registry-lb", "password": "s3:cret" }"#,
    );
    let envoy = lb::start(
        "envoy/eureka.yaml",
        &[(8761, eureka.port)],
        &[(EUREKA_SRC, &creds)],
        2,
    );
    lb::wait_version(&envoy, "web", 1);
    let c = lb::tally(&envoy, 80);
    println!("eureka (old shape, $ as string): UP w3, UP, OUT_OF_SERVICE, DOWN, STARTING: {c:?}");
    assert_eq!(
        (c.get("a"), c.get("b"), c.len()),
        (Some(&60), Some(&20), 2),
        "{c:?}"
    );
    assert_eq!(stat(&envoy, "web.instances_known"), 5);
    assert_eq!(stat(&envoy, "web.instances_healthy"), 2);
    let log = eureka.request_log();
    let last = log.last().expect("a request");
    assert_eq!(last.0, "/eureka/apps/WEB");
    assert_eq!(support::header(&last.1, "accept"), Some("application/json"));
    assert_eq!(
        support::header(&last.1, "authorization"),
        Some("Basic cmVnaXN0cnktbGI6czM6Y3JldA==")
    );

    // The current Jackson shape with the same content: parsed, same list, not re-published.
    eureka.set_shape(Shape::Modern);
    // Past the start-up window (the second call comes one to two intervals after the
    // first: docs/fleet.md), polls are one per interval.
    std::thread::sleep(Duration::from_millis(1000));
    let before = eureka.requests();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(eureka.requests() - before >= 2);
    assert_eq!(
        stat(&envoy, "web.snapshot_version"),
        1,
        "{:?}",
        registry_stats(&envoy)
    );
    assert!(stat(&envoy, "web.refresh_unchanged") >= 2);

    // OUT_OF_SERVICE → UP: the instance gets its share.
    eureka.set_app("web", apps("UP"));
    lb::wait_version(&envoy, "web", 2);
    let c = lb::tally(&envoy, 100);
    assert_eq!(
        (c.get("a"), c.get("b"), c.get("c"), c.len()),
        (Some(&60), Some(&20), Some(&20), 3),
        "{c:?}"
    );

    // Old shape with a single instance: `instance` is an object, not a list.
    eureka.set_shape(Shape::Old);
    eureka.set_app("web", vec![inst(&b[1])]);
    lb::wait_version(&envoy, "web", 3);
    let c = lb::tally(&envoy, 10);
    assert_eq!(c.get("b"), Some(&10), "{c:?}");

    // The last instance deregisters: Eureka drops the application and answers 404.
    // That is a failed refresh (counted, logged) and the last good list stays.
    eureka.set_app("web", vec![]);
    assert!(lb::wait_stat(
        &envoy,
        &lb::stat("web.refresh_failed_status"),
        Duration::from_secs(5),
        |v| v >= 1
    ));
    assert!(envoy.wait_for_log(
        "registry answered 404: eureka knows no application `WEB`",
        Duration::from_secs(3)
    ));
    let c = lb::tally(&envoy, 5);
    assert_eq!(c.get("b"), Some(&5), "{c:?}");

    // Wrong password: 401 from the server, an auth failure.
    let wrong = EUREKA_SRC.replace(
        r#""/eureka" }"#,
        r#""/eureka", "username": "registry-lb", "password": "nope" }"#,
    );
    let refused = lb::start(
        "envoy/eureka.yaml",
        &[(8761, eureka.port)],
        &[(EUREKA_SRC, &wrong)],
        1,
    );
    lb::assert_refused(
        &refused,
        "registry refused credentials: 401",
        Duration::from_secs(3),
    );
}

#[test]
fn kubernetes_terminating_endpoint_gets_no_traffic() {
    let k8s = FakeKubernetes::start();
    k8s.allow_token("sa-token");
    k8s.forbid_token("viewer-token");
    let b: Vec<Backend> = Backend::start_all(&["a", "b", "c"]);
    // On loopback every backend has its own port, so each gets its own slice (a slice
    // has one port list for all its endpoints); slice 4 repeats a, as slices can while
    // the controller rebalances them.
    let slice = |name: &str, x: &Backend, ep: K8sEndpoint| {
        K8sSlice::new(name, x.port, vec![ep.pod(&format!("web-{}", x.name))])
            .ports(&[("metrics", 9), ("http", x.port)])
    };
    let slices = |b_endpoint: K8sEndpoint| {
        vec![
            slice("web-1", &b[0], K8sEndpoint::new("127.0.0.1").zone("z1")),
            slice("web-2", &b[1], b_endpoint),
            slice("web-3", &b[2], K8sEndpoint::new("127.0.0.1").zone("z2")),
            slice("web-4", &b[0], K8sEndpoint::new("127.0.0.1").zone("z1")),
        ]
    };
    k8s.set_slices("default", "web", slices(K8sEndpoint::new("127.0.0.1")));
    k8s.set_slices(
        "default",
        "other",
        vec![slice("other-1", &b[1], K8sEndpoint::new("127.0.0.1"))],
    );
    let with_token = K8S_SRC.replace(
        r#""service": "web" }"#,
        r#""service": "web", "port_name": "http", "token": "sa-token" }"#,
    );
    let envoy = lb::start(
        "envoy/kubernetes.yaml",
        &[(6443, k8s.port)],
        &[(K8S_SRC, &with_token)],
        2,
    );
    lb::wait_version(&envoy, "web", 1);
    let c = lb::tally(&envoy, 90);
    assert_eq!(
        (c.get("a"), c.get("b"), c.get("c")),
        (Some(&30), Some(&30), Some(&30)),
        "{c:?}"
    );
    assert_eq!(
        stat(&envoy, "web.instances_known"),
        3,
        "a in two slices counts once"
    );
    // Lists from the watch cache: the first asks any version (0), the next ones
    // not older than the last seen; none reads through to etcd.
    let base = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?labelSelector=kubernetes.io/service-name%3Dweb";
    let t = Instant::now();
    while k8s.request_log().len() < 2 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = k8s.request_log();
    assert!(log.len() >= 2, "{log:?}");
    assert_eq!(
        log[0].0,
        format!("{base}&resourceVersion=0&resourceVersionMatch=NotOlderThan")
    );
    let seen = format!(
        "{base}&resourceVersion={}&resourceVersionMatch=NotOlderThan",
        k8s.revision()
    );
    assert!(log[1..].iter().all(|r| r.0 == seen), "{log:?}");
    assert_eq!(k8s.lists().1, 0, "a list read through to etcd");
    let last = log.last().expect("a request");
    assert_eq!(
        support::header(&last.1, "authorization"),
        Some("Bearer sa-token")
    );

    // Same resourceVersion: unchanged, nothing parsed or published. Another object in
    // the cluster changes (the list's resourceVersion moves): parsed, same content,
    // not published either.
    std::thread::sleep(Duration::from_millis(2200));
    assert!(
        stat(&envoy, "web.refresh_unchanged") >= 2,
        "{:?}",
        registry_stats(&envoy)
    );
    k8s.bump_revision();
    let ok = stat(&envoy, "web.refresh_ok");
    assert!(lb::wait_stat(
        &envoy,
        &lb::stat("web.refresh_ok"),
        Duration::from_secs(3),
        |v| v > ok
    ));
    assert_eq!(stat(&envoy, "web.snapshot_version"), 1);

    // b's Pod starts terminating (ready false, serving true, terminating true):
    // draining, so no new request goes to it although it still serves.
    let t0 = Instant::now();
    k8s.set_slices(
        "default",
        "web",
        slices(K8sEndpoint::new("127.0.0.1").terminating()),
    );
    lb::wait_version(&envoy, "web", 2);
    println!(
        "kubernetes: terminating endpoint drained {} ms after the change (refresh_interval 1 s)",
        t0.elapsed().as_millis()
    );
    std::thread::sleep(Duration::from_millis(150));
    let hits = b[1].hits();
    let c = lb::tally(&envoy, 60);
    assert_eq!(b[1].hits(), hits, "terminating endpoint got traffic: {c:?}");
    assert_eq!(
        (c.get("a"), c.get("c"), c.len()),
        (Some(&30), Some(&30), 2),
        "{c:?}"
    );
    assert_eq!(
        stat(&envoy, "web.instances_known"),
        3,
        "still known, as draining"
    );
    assert_eq!(stat(&envoy, "web.instances_healthy"), 2);

    // Not ready any more (and not serving): unhealthy, still no traffic; ready again: back.
    k8s.set_slices(
        "default",
        "web",
        slices(K8sEndpoint::new("127.0.0.1").not_ready()),
    );
    lb::wait_version(&envoy, "web", 3);
    k8s.set_slices("default", "web", slices(K8sEndpoint::new("127.0.0.1")));
    assert!(
        first_answer_from(&envoy, "b", Duration::from_secs(5)).is_some(),
        "ready endpoint never served again"
    );
    assert_no_failed_refresh(&envoy);

    // An API server replica whose watch cache lags the version last seen answers
    // 504 "Too large resource version": one failed refresh, the last good list kept,
    // and the next list asks for any version again, which the lagging cache serves.
    let rev = k8s.revision();
    let n0 = k8s.request_log().len();
    k8s.set_cache_behind(Some(rev - 1));
    let asked = |v: u64| format!("{base}&resourceVersion={v}&resourceVersionMatch=NotOlderThan");
    let t = Instant::now();
    let after = loop {
        let after: Vec<String> = k8s.request_log()[n0..]
            .iter()
            .map(|r| r.0.clone())
            .collect();
        if after.contains(&asked(0)) || t.elapsed() > Duration::from_secs(8) {
            break after;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let first_zero = after.iter().position(|p| *p == asked(0));
    assert!(
        first_zero.is_some_and(|z| z >= 1 && after[..z].iter().all(|p| *p == asked(rev))),
        "{after:?}"
    );
    assert!(stat(&envoy, "web.refresh_failed") >= 1);
    assert!(envoy.wait_for_log("Too large resource version", Duration::from_secs(1)));
    let c = lb::tally(&envoy, 30);
    assert_eq!(c.len(), 3, "last good list kept: {c:?}");
    k8s.set_cache_behind(None);
    assert_eq!(k8s.lists().1, 0, "a list read through to etcd");

    // A token without the permission: 403 Status, its message in the log.
    let viewer = K8S_SRC.replace(
        r#""service": "web" }"#,
        r#""service": "web", "token": "viewer-token" }"#,
    );
    let refused = lb::start(
        "envoy/kubernetes.yaml",
        &[(6443, k8s.port)],
        &[(K8S_SRC, &viewer)],
        1,
    );
    lb::assert_refused(
        &refused,
        "registry refused credentials: 403 endpointslices.discovery.k8s.io is forbidden: User \"system:serviceaccount:default:default\" cannot list resource \"endpointslices\"",
        Duration::from_secs(3),
    );
}

#[test]
fn a_service_moves_from_nacos_to_consul_without_a_failed_request() {
    let nacos = FakeNacos::start();
    let consul = FakeConsul::start();
    let b: Vec<Backend> = Backend::start_all(&["a", "b", "c", "d"]);
    nacos.set_service("web", vec![nacos_inst(&b[0]), nacos_inst(&b[1])]);
    consul.set_service("web", vec![]);
    // Two sources, Nacos first; the Consul agent's cluster added next to Nacos'.
    let two = format!(
        r#"{NACOS_SRC},
                            {{ "consul": {{ "cluster": "consul", "service": "web", "wait": "30s" }} }}"#
    );
    let consul_cluster = format!(
        "  clusters:\n  - name: consul\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: consul\n      endpoints:\n      - lb_endpoints:\n        - endpoint:\n            address:\n              socket_address: {{ address: 127.0.0.1, port_value: {} }}\n",
        consul.port
    );
    let envoy = Arc::new(lb::start(
        "envoy/nacos.yaml",
        &[(8848, nacos.port)],
        &[(NACOS_SRC, &two), ("  clusters:\n", &consul_cluster)],
        2,
    ));
    lb::wait_version(&envoy, "web", 1);
    let c = lb::tally(&envoy, 20);
    assert_eq!((c.get("a"), c.get("b")), (Some(&10), Some(&10)), "{c:?}");

    // A bounded request loop (≤ 5000 requests, ≤ 30 s) runs through the whole switch.
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let client = {
        let (envoy, stop) = (Arc::clone(&envoy), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut answers: Vec<(Duration, u16, String)> = Vec::new();
            while !stop.load(Ordering::SeqCst)
                && answers.len() < 5000
                && t0.elapsed() < Duration::from_secs(30)
            {
                let (status, body, _) = envoy.get("/", &[]);
                answers.push((t0.elapsed(), status, body));
            }
            answers
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // 1. The new instances register in Consul: the service is on both registries.
    consul.set_service(
        "web",
        vec![
            ConsulInstance::new("c", "127.0.0.1", b[2].port),
            ConsulInstance::new("d", "127.0.0.1", b[3].port),
        ],
    );
    assert!(lb::wait_stat(
        &envoy,
        &lb::stat("web.instances_known"),
        Duration::from_secs(5),
        |v| v == 4
    ));
    let both = t0.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    // 2. The old instances deregister from Nacos.
    nacos.set_service("web", vec![]);
    assert!(lb::wait_stat(
        &envoy,
        &lb::stat("web.instances_known"),
        Duration::from_secs(5),
        |v| v == 2
    ));
    let moved = t0.elapsed();
    // 3. Workers pick the snapshot up on their next tick; then the old instances stop.
    std::thread::sleep(Duration::from_millis(200));
    let mut b = b;
    b[0].stop();
    b[1].stop();
    let stopped = t0.elapsed();
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::SeqCst);
    let answers = client.join().expect("client thread");

    let mut by: HashMap<String, u32> = HashMap::new();
    for (_, status, body) in &answers {
        let k = if *status == 200 {
            body.clone()
        } else {
            format!("<{status} {}>", body.trim())
        };
        *by.entry(k).or_insert(0) += 1;
    }
    println!(
        "switch nacos → consul: {} requests, {by:?}; both registries at {} ms, moved at {} ms, old stopped at {} ms",
        answers.len(),
        both.as_millis(),
        moved.as_millis(),
        stopped.as_millis()
    );
    let failed: Vec<_> = answers
        .iter()
        .filter(|(_, s, _)| *s != 200)
        .take(5)
        .collect();
    assert!(
        failed.is_empty(),
        "requests failed during the switch: {failed:?} ({by:?})"
    );
    assert!(
        answers.len() >= 100,
        "the loop ran: {} requests",
        answers.len()
    );
    for k in ["a", "b", "c", "d"] {
        assert!(
            by.get(k).copied().unwrap_or(0) > 0,
            "{k} never answered: {by:?}"
        );
    }
    // Before Consul had them, only the Nacos instances answered; after the move, only Consul's.
    assert!(answers
        .iter()
        .filter(|(t, _, _)| *t < Duration::from_millis(300))
        .all(|(_, _, b)| b == "a" || b == "b"));
    assert!(answers
        .iter()
        .filter(|(t, _, _)| *t > stopped)
        .all(|(_, _, b)| b == "c" || b == "d"));
    assert_no_failed_refresh(&envoy);
}
