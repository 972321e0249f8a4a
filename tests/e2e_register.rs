//! End to end: Envoy A registers its local application (a `Backend`) in the
//! registry, Envoy B routes to it through the registry. The application dies and
//! comes back, the registry restarts, and A leaves in the documented order
//! (docs/operations.md): mark down, wait two refreshes (Consul: 0.5 s), stop Envoy, stop the app —
//! with B's clients counting every failed request.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use support::{
    lb, wait_until, Backend, ConsulInstance, Envoy, Etcd, EurekaInstance, FakeConsul, FakeEureka,
    FakeNacos, NacosInstance,
};

/// Registration TTL and the readers' refresh interval (B's `refresh_interval`).
const TTL: Duration = Duration::from_secs(3);
const REFRESH: Duration = Duration::from_secs(1);

/// The `"register"` block of A (one line: it goes inside a YAML block scalar) and the `app` cluster it checks the application through.
fn register_block(app: &Backend, targets: &str) -> String {
    format!(
        concat!(
            r#""register": {{ "service": "web", "address": "127.0.0.1", "port": {port}, "#,
            r#""zone": "z1", "metadata": {{ "version": "v1" }}, "ttl": "3s", "heartbeat_interval": "1s", "#,
            r#""health_check": {{ "cluster": "app", "path": "/healthz", "interval": "250ms", "#,
            r#""timeout": "200ms", "healthy_threshold": 2, "unhealthy_threshold": 2 }}, "#,
            r#""targets": [ {targets} ] }}, "services": ["#
        ),
        port = app.port,
        targets = targets
    )
}

fn app_cluster(app: &Backend) -> String {
    format!(
        "  clusters:\n  - name: app\n    type: STATIC\n    connect_timeout: 0.25s\n    load_assignment:\n      cluster_name: app\n      endpoints:\n      - lb_endpoints:\n        - endpoint:\n            address:\n              socket_address: {{ address: 127.0.0.1, port_value: {} }}\n",
        app.port
    )
}

/// Requests at B, one after another every 10 ms, bounded by `limit`; counts answers
/// by backend and the failed ones (anything not a 200).
struct Load {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
    app: Arc<AtomicU64>,
    /// Milliseconds since `t0` of the last answer from the app (or failure).
    last_app_ms: Arc<AtomicU64>,
    t0: Instant,
    handle: Option<thread::JoinHandle<u64>>,
}

impl Load {
    fn start(b: &Envoy, limit: Duration) -> Load {
        let url = format!("http://127.0.0.1:{}/", b.listener_port);
        let (stop, failed, app, last) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let t0 = Instant::now();
        let (s, f, a, l) = (stop.clone(), failed.clone(), app.clone(), last.clone());
        let handle = thread::spawn(move || {
            let mut n = 0;
            while !s.load(Ordering::SeqCst) && t0.elapsed() < limit && n < 20_000 {
                let (code, body, _) = support::http_get(&url, &[]);
                n += 1;
                if code != 200 {
                    f.fetch_add(1, Ordering::SeqCst);
                    eprintln!(
                        "B answered {code}: {body:?} at {} ms",
                        t0.elapsed().as_millis()
                    );
                }
                if code != 200 || body == "app" {
                    a.fetch_add(1, Ordering::SeqCst);
                    l.store(t0.elapsed().as_millis() as u64, Ordering::SeqCst);
                }
                thread::sleep(Duration::from_millis(10));
            }
            n
        });
        Load {
            stop,
            failed,
            app,
            last_app_ms: last,
            t0,
            handle: Some(handle),
        }
    }

    /// Milliseconds since the load started.
    fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    /// Waits until B has not sent to the app (nor failed) for `quiet`; returns the
    /// time of the last such answer, relative to the load's start.
    fn wait_app_gone(&self, quiet: Duration, within: Duration) -> Option<u64> {
        let ok = wait_until(within, Duration::from_millis(20), || {
            self.now_ms() >= self.last_app_ms.load(Ordering::SeqCst) + quiet.as_millis() as u64
        });
        ok.then(|| self.last_app_ms.load(Ordering::SeqCst))
    }

    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        let n = self.handle.take().map(|h| h.join().unwrap()).unwrap_or(0);
        (n, self.failed.load(Ordering::SeqCst))
    }
}

/// The documented leave order (docs/operations.md), with B's clients counting: the
/// app's health check fails until the registry shows it `marked_down`, wait
/// `order.wait`, stop Envoy A, let `after_stop` check the registry's view of the leave
/// (given the load's clock when A was told to stop), stop the app, wait two refreshes.
/// Nothing fails at B, and B sends the app nothing later than `order.bound` after it
/// was marked down.
struct LeaveOrder {
    name: &'static str,
    wait: Duration,
    bound: Duration,
}

fn documented_leave(
    order: LeaveOrder,
    b: &Envoy,
    mut a: Envoy,
    mut app: Backend,
    marked_down: impl Fn(&Backend) -> bool,
    after_stop: impl FnOnce(&Backend, &Load, u64),
) {
    let load = Load::start(b, Duration::from_secs(60));
    thread::sleep(Duration::from_millis(300));
    app.set_health_status(503);
    assert!(wait_until(
        Duration::from_secs(5),
        Duration::from_millis(10),
        || marked_down(&app)
    ));
    let marked_ms = load.now_ms();
    thread::sleep(order.wait);
    let stop_ms = load.now_ms();
    a.terminate(Duration::from_secs(10));
    after_stop(&app, &load, stop_ms);
    app.stop();
    thread::sleep(REFRESH * 2);
    let last_app = load.last_app_ms.load(Ordering::SeqCst);
    let (n, failed) = load.finish();
    println!(
        "{}: graceful leave: {n} requests at B, {failed} failed; B's last request to the app {} ms after it was marked down",
        order.name,
        last_app.saturating_sub(marked_ms)
    );
    assert_eq!(failed, 0, "the documented leave order loses no request");
    assert!(
        last_app <= marked_ms + order.bound.as_millis() as u64,
        "B sent to the app {} ms after it was marked down (bound: {} ms)",
        last_app.saturating_sub(marked_ms),
        order.bound.as_millis()
    );
}

fn etcd_value(b: &Backend) -> String {
    format!(
        r#"{{"address":"127.0.0.1","port":{},"weight":1,"zone":"z1"}}"#,
        b.port
    )
}

fn key(app: &Backend) -> String {
    format!("/services/web/web-127-0-0-1-{}", app.port)
}

fn start_a_etcd(etcd: &Etcd, app: &Backend) -> Envoy {
    let reg = register_block(app, r#"{ "etcd": { "cluster": "etcd" } }"#);
    let cluster = app_cluster(app);
    lb::start(
        "envoy/etcd.yaml",
        &[(2379, etcd.client_port)],
        &[("\"services\": [", &reg), ("  clusters:\n", &cluster)],
        2,
    )
}

#[test]
fn etcd_registration_follows_the_app_the_registry_and_a_graceful_leave() {
    let mut etcd = Etcd::start();
    let other = Backend::start("other");
    let mut app = Backend::start("app");
    etcd.put("/services/web/other", &etcd_value(&other));
    let a = start_a_etcd(&etcd, &app);
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || etcd
            .get(&key(&app))
            .is_some()),
        "A never registered the app; A's log:\n{}",
        support::tail(&a.log(), 30)
    );
    println!(
        "etcd: registered {} ms after A started",
        t0.elapsed().as_millis()
    );
    let value = etcd.get(&key(&app)).unwrap();
    assert!(value.contains(r#""state":"healthy""#), "{value}");
    assert!(value.contains(r#""metadata":{"version":"v1"}"#), "{value}");
    // B without passive outlier detection: what stops its traffic to a dead app is
    // its registry view alone (ejections would hold the app out for 30 s after).
    let b = lb::start(
        "envoy/etcd.yaml",
        &[(2379, etcd.client_port)],
        &[(
            "\"refresh_interval\": \"1s\",",
            "\"refresh_interval\": \"1s\", \"outlier_detection\": { \"consecutive_5xx\": 0 },",
        )],
        2,
    );
    lb::wait_version(&b, "web", 1);
    let c = lb::tally(&b, 40);
    assert_eq!(
        (c.get("app"), c.get("other")),
        (Some(&20), Some(&20)),
        "{c:?}"
    );
    // Heartbeats keep the 3 s lease alive well past its TTL.
    thread::sleep(TTL + REFRESH);
    assert!(etcd.get(&key(&app)).is_some(), "the lease was kept alive");
    assert!(a.stat(&lb::stat("register_heartbeat_ok")).unwrap_or(0) >= 3);

    // The app dies: A marks it down, B stops sending to it within TTL + one refresh.
    // B's own outlier detection may stop it sooner; what B's registry view says is
    // measured apart (its instances_healthy gauge, set when it publishes).
    assert_eq!(b.stat(&lb::stat("web.instances_healthy")), Some(2));
    let load = Load::start(&b, Duration::from_secs(60));
    thread::sleep(Duration::from_millis(300));
    let killed_ms = load.now_ms();
    let killed = Instant::now();
    app.stop();
    assert!(
        lb::wait_stat(&b, &lb::stat("web.instances_healthy"), TTL + REFRESH, |v| v
            == 1),
        "B's registry view still had the dead app healthy after TTL + one refresh"
    );
    let view = killed.elapsed();
    let gone = load
        .wait_app_gone(Duration::from_millis(1500), Duration::from_secs(10))
        .expect("B kept sending to the dead app");
    let took = gone.saturating_sub(killed_ms);
    println!(
        "etcd: app killed -> down in B's registry view after {} ms, B's last request to it after {took} ms (bound: TTL {} ms + refresh {} ms)",
        view.as_millis(),
        TTL.as_millis(),
        REFRESH.as_millis()
    );
    assert!(took <= (TTL + REFRESH).as_millis() as u64, "{took} ms");
    let value = etcd.get(&key(&app)).expect("marked down, not deleted");
    assert!(value.contains(r#""state":"unhealthy""#), "{value}");
    assert!(a.stat(&lb::stat("register_marked_down")).unwrap_or(0) >= 1);
    assert_eq!(a.stat(&lb::stat("register_app_healthy")), Some(0));

    // It comes back on its port: marked up, B sends to it again.
    let port = app.port;
    drop(app);
    let app = Backend::start_on("app", port);
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            etcd.get(&key(&app))
                .is_some_and(|v| v.contains(r#""state":"healthy""#))
        }),
        "the recovered app was not marked up"
    );
    let before = load.app.load(Ordering::SeqCst);
    thread::sleep(REFRESH * 2);
    let c = lb::tally(&b, 20);
    assert!(
        c.get("app").is_some_and(|n| *n >= 5),
        "B sends to the recovered app: {c:?}"
    );
    assert!(
        load.app.load(Ordering::SeqCst) > before + 10,
        "B's load reached the recovered app"
    );
    assert!(a.stat(&lb::stat("register_marked_up")).unwrap_or(0) >= 1);
    let (_, failed) = load.finish();
    println!(
        "etcd: {failed} request(s) failed at B while the app was dead (before B's registry view had it down)"
    );

    // etcd restarts with an empty data dir: A finds its lease gone and registers again.
    let port = etcd.client_port;
    etcd.kill();
    drop(etcd);
    let restarted = Instant::now();
    let etcd = Etcd::start_on(port);
    etcd.put("/services/web/other", &etcd_value(&other));
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(20), || etcd
            .get(&key(&app))
            .is_some()),
        "A did not register again after the etcd restart; A's log:\n{}",
        support::tail(&a.log(), 30)
    );
    let again = restarted.elapsed();
    println!(
        "etcd: restarted with an empty data dir; A registered again {} ms after the restart began",
        again.as_millis()
    );
    assert!(a.stat(&lb::stat("register_forgotten")).unwrap_or(0) >= 1);
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            let c = lb::tally(&b, 20);
            c.contains_key("app") && c.contains_key("other")
        }),
        "B does not route to the app again; etcd holds {:?}; B's log:\n{}",
        etcd.range_prefix("/services/web/"),
        support::tail(&b.log(), 20)
    );

    // The documented leave: mark down (the app's health check fails), wait two
    // refreshes, stop Envoy A (deregisters), then stop the app. Nothing fails at B.
    documented_leave(
        LeaveOrder {
            name: "etcd",
            wait: REFRESH * 2,
            bound: REFRESH * 2,
        },
        &b,
        a,
        app,
        |app| {
            etcd.get(&key(app))
                .is_some_and(|v| v.contains(r#""state":"unhealthy""#))
        },
        |app, load, stop_ms| {
            let removed = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
                etcd.get(&key(app)).is_none()
            });
            let removed_ms = load.now_ms() - stop_ms;
            assert!(removed, "the key outlived A by more than 10 s");
            println!(
                "etcd: key removed {removed_ms} ms after Envoy A was told to stop (under TTL {} ms: the revoke sent from on_done arrived; else the lease expired)",
                TTL.as_millis()
            );
            assert!(
                removed_ms <= (TTL + REFRESH).as_millis() as u64,
                "{removed_ms}"
            );
        },
    );

    // A crashes (SIGKILL: no deregistration): the lease runs out, and B's registry
    // view drops the app within TTL + one refresh.
    let app2 = Backend::start("app2");
    let a2 = start_a_etcd(&etcd, &app2);
    assert!(wait_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || etcd.get(&key(&app2)).is_some()
    ));
    assert!(lb::wait_stat(
        &b,
        &lb::stat("web.instances_healthy"),
        Duration::from_secs(3),
        |v| v == 2
    ));
    let pid = a2.pid().expect("A2 runs");
    let killed = Instant::now();
    let st = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    assert!(st.is_ok_and(|s| s.success()));
    assert!(wait_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || etcd.get(&key(&app2)).is_none()
    ));
    let expired = killed.elapsed();
    assert!(
        lb::wait_stat(&b, &lb::stat("web.instances_known"), TTL + REFRESH, |v| v
            == 1),
        "B still lists the crashed sidecar's app"
    );
    let view = killed.elapsed();
    println!(
        "etcd: Envoy A killed -> lease expired after {} ms, gone from B's view after {} ms (bound: TTL + refresh = {} ms)",
        expired.as_millis(),
        view.as_millis(),
        (TTL + REFRESH).as_millis()
    );
    assert!(
        view <= TTL + REFRESH + Duration::from_millis(500),
        "{view:?}"
    );
}

fn start_a_consul(consul: &FakeConsul, app: &Backend) -> Envoy {
    let reg = register_block(
        app,
        r#"{ "consul": { "cluster": "consul", "token": "t0k" } }"#,
    );
    let cluster = app_cluster(app);
    lb::start(
        "envoy/consul.yaml",
        &[(8500, consul.port)],
        &[("\"services\": [", &reg), ("  clusters:\n", &cluster)],
        2,
    )
}

#[test]
fn consul_registration_logs_in_through_an_auth_method_and_again_when_its_token_expires() {
    let consul = FakeConsul::start();
    // Login tokens live 2 s: with a 1 s heartbeat, every other one meets an
    // expired token.
    consul.set_auth_method("kubernetes", "sa-jwt", Duration::from_secs(2));
    let app = Backend::start("app");
    let reg = register_block(
        &app,
        r#"{ "consul": { "cluster": "consul", "auth_method": "kubernetes", "bearer_token": "sa-jwt" } }"#,
    );
    let cluster = app_cluster(&app);
    let auth =
        r#""service": "web", "wait": "1s", "auth_method": "kubernetes", "bearer_token": "sa-jwt""#;
    let a = lb::start(
        "envoy/consul.yaml",
        &[(8500, consul.port)],
        &[
            ("\"services\": [", &reg),
            ("  clusters:\n", &cluster),
            (r#""service": "web", "wait": "30s""#, auth),
        ],
        2,
    );
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            consul_status(&consul, &app).as_deref() == Some("passing")
        }),
        "A never registered the app; A's log:\n{}",
        support::tail(&a.log(), 30)
    );
    let beats = a.stat(&lb::stat("register_heartbeat_ok")).unwrap_or(0);
    let logins = consul.logins();
    thread::sleep(Duration::from_secs(5));
    // Still passing (the TTL is 3 s: a heartbeat lost to an expired token for good
    // would have let it lapse), with new logins and heartbeats all along.
    assert_eq!(consul_status(&consul, &app).as_deref(), Some("passing"));
    let beats = a.stat(&lb::stat("register_heartbeat_ok")).unwrap_or(0) - beats;
    assert!(beats >= 4, "{beats} heartbeats in 5 s");
    assert!(
        consul.logins() - logins >= 2,
        "{} logins in 5 s with 2 s tokens",
        consul.logins() - logins
    );
    assert_eq!(
        a.stat(&lb::stat("register_failed")).unwrap_or(0),
        0,
        "an expired token is not a failed call; A's log:\n{}",
        support::tail(&a.log(), 30)
    );
}

fn app_id(app: &Backend) -> String {
    format!("web-127-0-0-1-{}", app.port)
}

/// The stand-in's status of `app`'s registration, if it is registered.
fn consul_status(consul: &FakeConsul, app: &Backend) -> Option<String> {
    let id = app_id(app);
    consul
        .instances("web")
        .into_iter()
        .find(|(i, _)| *i == id)
        .map(|(_, s)| s)
}

#[test]
fn consul_registration_follows_the_app_the_agent_and_a_graceful_leave() {
    let consul = FakeConsul::start();
    consul.set_token(Some("t0k"));
    let other = Backend::start("other");
    let mut app = Backend::start("app");
    consul.set_service(
        "web",
        vec![ConsulInstance::new("other", "127.0.0.1", other.port)],
    );
    let a = start_a_consul(&consul, &app);
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            consul_status(&consul, &app).as_deref() == Some("passing")
        }),
        "A never registered the app; A's log:\n{}",
        support::tail(&a.log(), 30)
    );
    println!(
        "consul: registered {} ms after A started",
        t0.elapsed().as_millis()
    );
    let log = consul.request_log();
    let reg = log
        .iter()
        .find(|(t, _)| t == "/v1/agent/service/register")
        .expect("a registration");
    assert!(
        support::header(&reg.1, "x-consul-token") == Some("t0k"),
        "{reg:?}"
    );
    // B reads with blocking queries and the same ACL token.
    let b = lb::start(
        "envoy/consul.yaml",
        &[(8500, consul.port)],
        &[(
            "\"wait\": \"30s\" }",
            "\"wait\": \"30s\", \"token\": \"t0k\" }",
        )],
        2,
    );
    lb::wait_version(&b, "web", 1);
    let c = lb::tally(&b, 40);
    assert_eq!(
        (c.get("app"), c.get("other")),
        (Some(&20), Some(&20)),
        "{c:?}"
    );
    // Heartbeats (check/pass every second) keep the 3 s TTL check passing.
    thread::sleep(TTL + REFRESH);
    assert_eq!(consul_status(&consul, &app).as_deref(), Some("passing"));
    assert!(a.stat(&lb::stat("register_heartbeat_ok")).unwrap_or(0) >= 3);

    // The app dies: check/fail, B's blocking query sees it at once. Bound: TTL + 0.5 s.
    assert_eq!(b.stat(&lb::stat("web.instances_healthy")), Some(2));
    let killed = Instant::now();
    app.stop();
    assert!(
        lb::wait_stat(
            &b,
            &lb::stat("web.instances_healthy"),
            TTL + Duration::from_millis(500),
            |v| v == 1
        ),
        "B's registry view still had the dead app healthy after TTL + 0.5 s"
    );
    println!(
        "consul: app killed -> down in B's registry view after {} ms (bound: TTL {} ms + 0.5 s)",
        killed.elapsed().as_millis(),
        TTL.as_millis()
    );
    assert_eq!(
        consul_status(&consul, &app).as_deref(),
        Some("critical"),
        "marked down, not deleted"
    );
    assert!(a.stat(&lb::stat("register_marked_down")).unwrap_or(0) >= 1);

    // It comes back: check/pass, B routes to it again.
    let port = app.port;
    drop(app);
    let app = Backend::start_on("app", port);
    assert!(lb::wait_stat(
        &b,
        &lb::stat("web.instances_healthy"),
        Duration::from_secs(5),
        |v| v == 2
    ));
    // Both serve again (workers pick the snapshot up on their next tick).
    assert!(wait_until(
        Duration::from_secs(3),
        Duration::from_millis(50),
        || {
            let c = lb::tally(&b, 20);
            c.get("app").is_some_and(|n| *n >= 5) && c.contains_key("other")
        }
    ));

    // The agent restarts and forgets the service: the next check/pass gets 404
    // "Unknown check ID", and A registers again at once.
    let restarted = Instant::now();
    consul.restart_agent();
    assert_eq!(consul_status(&consul, &app), None);
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
            consul_status(&consul, &app).as_deref() == Some("passing")
        }),
        "A did not register again; A's log:\n{}",
        support::tail(&a.log(), 30)
    );
    println!(
        "consul: agent restarted -> registered again after {} ms (heartbeat interval 1 s)",
        restarted.elapsed().as_millis()
    );
    assert!(a.stat(&lb::stat("register_forgotten")).unwrap_or(0) >= 1);
    assert!(lb::wait_stat(
        &b,
        &lb::stat("web.instances_healthy"),
        Duration::from_secs(5),
        |v| v == 2
    ));

    // The documented leave: mark down, wait one refresh, stop Envoy A, stop the app.
    documented_leave(
        LeaveOrder {
            name: "consul",
            wait: REFRESH,
            bound: Duration::from_millis(500),
        },
        &b,
        a,
        app,
        |app| consul_status(&consul, app).as_deref() == Some("critical"),
        |app, _, _| {
            // Deregistration is best effort (Envoy may stop before the call leaves):
            // the instance is gone, or still marked down, never up again.
            thread::sleep(Duration::from_millis(500));
            let left = consul_status(&consul, app);
            let dereg = consul
                .request_log()
                .iter()
                .filter(|(t, _)| t.starts_with("/v1/agent/service/deregister/"))
                .count();
            println!(
                "consul: Envoy A stopped: {dereg} deregistration request(s) reached the agent; the instance is {}",
                left.as_deref().unwrap_or("gone")
            );
            assert!(
                left.is_none() || left.as_deref() == Some("critical"),
                "{left:?}"
            );
        },
    );

    // A crashes: no deregistration; the TTL check turns critical, B stops routing.
    let app2 = Backend::start("app2");
    let a2 = start_a_consul(&consul, &app2);
    assert!(wait_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || { consul_status(&consul, &app2).as_deref() == Some("passing") }
    ));
    assert!(lb::wait_stat(
        &b,
        &lb::stat("web.instances_healthy"),
        Duration::from_secs(3),
        |v| v == 2
    ));
    let pid = a2.pid().expect("A2 runs");
    let killed = Instant::now();
    let st = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    assert!(st.is_ok_and(|s| s.success()));
    assert!(
        lb::wait_stat(
            &b,
            &lb::stat("web.instances_healthy"),
            TTL + Duration::from_secs(2),
            |v| v == 1
        ),
        "B still routes to the crashed sidecar's app"
    );
    let view = killed.elapsed();
    println!(
        "consul: Envoy A killed -> TTL check critical, app down in B's view after {} ms (bound: TTL + 0.5 s = {} ms)",
        view.as_millis(),
        (TTL + Duration::from_millis(500)).as_millis()
    );
    assert!(view <= TTL + Duration::from_millis(500), "{view:?}");
}

fn start_a_eureka(eureka: &FakeEureka, app: &Backend) -> Envoy {
    let reg = register_block(
        app,
        r#"{ "eureka": { "cluster": "eureka", "username": "reg", "password": "pw" } }"#,
    );
    let cluster = app_cluster(app);
    lb::start(
        "envoy/eureka.yaml",
        &[(8761, eureka.port)],
        &[("\"services\": [", &reg), ("  clusters:\n", &cluster)],
        2,
    )
}

/// The stand-in's status of `app`'s registration, if it is registered.
fn eureka_status(eureka: &FakeEureka, app: &Backend) -> Option<String> {
    let id = app_id(app);
    eureka
        .instances("web")
        .into_iter()
        .find(|(i, _)| *i == id)
        .map(|(_, s)| s)
}

#[test]
fn eureka_registration_follows_the_app_the_server_and_a_graceful_leave() {
    let eureka = FakeEureka::start();
    eureka.set_basic_auth("reg", "pw");
    let other = Backend::start("other");
    let mut app = Backend::start("app");
    eureka.set_app(
        "web",
        vec![EurekaInstance::new("other", "127.0.0.1", other.port)],
    );
    let a = start_a_eureka(&eureka, &app);
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            eureka_status(&eureka, &app).as_deref() == Some("UP")
        }),
        "A never registered the app; A's log:\n{}",
        support::tail(&a.log(), 30)
    );
    println!(
        "eureka: registered {} ms after A started",
        t0.elapsed().as_millis()
    );
    // B: basic auth, a refresh every second, no outlier detection.
    let b = lb::start(
        "envoy/eureka.yaml",
        &[(8761, eureka.port)],
        &[
            (
                "\"path_prefix\": \"/eureka\" }",
                "\"path_prefix\": \"/eureka\", \"username\": \"reg\", \"password\": \"pw\" }",
            ),
            (
                "\"refresh_interval\": \"1s\",",
                "\"refresh_interval\": \"1s\", \"outlier_detection\": { \"consecutive_5xx\": 0 },",
            ),
        ],
        2,
    );
    lb::wait_version(&b, "web", 1);
    let c = lb::tally(&b, 40);
    assert_eq!(
        (c.get("app"), c.get("other")),
        (Some(&20), Some(&20)),
        "{c:?}"
    );
    // Renewals keep the 3 s lease.
    thread::sleep(TTL + REFRESH);
    assert_eq!(eureka_status(&eureka, &app).as_deref(), Some("UP"));
    assert!(a.stat(&lb::stat("register_heartbeat_ok")).unwrap_or(0) >= 3);

    // The app dies: status DOWN, B stops routing within TTL + one refresh.
    assert_eq!(b.stat(&lb::stat("web.instances_healthy")), Some(2));
    let killed = Instant::now();
    app.stop();
    assert!(
        lb::wait_stat(&b, &lb::stat("web.instances_healthy"), TTL + REFRESH, |v| v
            == 1),
        "B's registry view still had the dead app healthy after TTL + one refresh"
    );
    println!(
        "eureka: app killed -> down in B's registry view after {} ms (bound: TTL {} ms + refresh {} ms)",
        killed.elapsed().as_millis(),
        TTL.as_millis(),
        REFRESH.as_millis()
    );
    assert_eq!(
        eureka_status(&eureka, &app).as_deref(),
        Some("DOWN"),
        "marked down, not deleted"
    );

    // It comes back: status UP, B routes to it again.
    let port = app.port;
    drop(app);
    let app = Backend::start_on("app", port);
    assert!(lb::wait_stat(
        &b,
        &lb::stat("web.instances_healthy"),
        Duration::from_secs(5),
        |v| v == 2
    ));
    assert!(wait_until(
        Duration::from_secs(3),
        Duration::from_millis(50),
        || {
            let c = lb::tally(&b, 20);
            c.get("app").is_some_and(|n| *n >= 5) && c.contains_key("other")
        }
    ));

    // The server restarts without its registry: the next renewal gets 404 and A
    // registers again at once.
    let restarted = Instant::now();
    eureka.restart();
    assert_eq!(eureka_status(&eureka, &app), None);
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
            eureka_status(&eureka, &app).as_deref() == Some("UP")
        }),
        "A did not register again; A's log:\n{}",
        support::tail(&a.log(), 30)
    );
    println!(
        "eureka: server restarted -> registered again after {} ms (heartbeat interval 1 s)",
        restarted.elapsed().as_millis()
    );
    assert!(a.stat(&lb::stat("register_forgotten")).unwrap_or(0) >= 1);
    assert!(lb::wait_stat(
        &b,
        &lb::stat("web.instances_healthy"),
        Duration::from_secs(5),
        |v| v == 2
    ));

    // The documented leave: mark down, wait two refreshes, stop Envoy A, stop the app.
    documented_leave(
        LeaveOrder {
            name: "eureka",
            wait: REFRESH * 2,
            bound: REFRESH * 2,
        },
        &b,
        a,
        app,
        |app| eureka_status(&eureka, app).as_deref() == Some("DOWN"),
        |app, _, _| {
            thread::sleep(Duration::from_millis(500));
            let left = eureka_status(&eureka, app);
            // The lease (3 s) was renewed under a second before: gone now means the
            // DELETE sent from on_done arrived.
            println!(
                "eureka: Envoy A stopped: {}",
                if left.is_none() {
                    "deregistered (the DELETE arrived)"
                } else {
                    "the DELETE did not arrive; the instance stays DOWN until its lease runs out"
                }
            );
            assert!(
                left.is_none() || left.as_deref() == Some("DOWN"),
                "{left:?}"
            );
        },
    );

    // A crashes: no renewals; the lease runs out and B drops the app.
    let app2 = Backend::start("app2");
    let a2 = start_a_eureka(&eureka, &app2);
    assert!(wait_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || { eureka_status(&eureka, &app2).as_deref() == Some("UP") }
    ));
    assert!(lb::wait_stat(
        &b,
        &lb::stat("web.instances_healthy"),
        Duration::from_secs(3),
        |v| v == 2
    ));
    let pid = a2.pid().expect("A2 runs");
    let killed = Instant::now();
    let st = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    assert!(st.is_ok_and(|s| s.success()));
    assert!(
        lb::wait_stat(
            &b,
            &lb::stat("web.instances_known"),
            TTL + Duration::from_secs(2),
            |v| v == 1
        ),
        "B still lists the crashed sidecar's app"
    );
    let view = killed.elapsed();
    println!(
        "eureka: Envoy A killed -> lease ran out, gone from B's view after {} ms (bound: TTL + refresh = {} ms)",
        view.as_millis(),
        (TTL + REFRESH).as_millis()
    );
    assert!(
        view <= TTL + REFRESH + Duration::from_millis(500),
        "{view:?}"
    );
}

/// Nacos: with the reader's and the registrar's login (auth on).
const NACOS_AUTH: (&str, &str) = (
    "\"api\": \"v1\" }",
    "\"api\": \"v1\", \"username\": \"reg\", \"password\": \"pw\" }",
);

fn start_a_nacos(nacos: &FakeNacos, app: &Backend) -> Envoy {
    let reg = register_block(
        app,
        r#"{ "nacos": { "cluster": "nacos", "username": "reg", "password": "pw", "delete_after": "6s" } }"#,
    );
    let cluster = app_cluster(app);
    lb::start(
        "envoy/nacos.yaml",
        &[(8848, nacos.port)],
        &[
            ("\"services\": [", &reg),
            ("  clusters:\n", &cluster),
            NACOS_AUTH,
        ],
        2,
    )
}

/// The stand-in's view of `app`'s registration: (enabled, healthy), if registered.
fn nacos_status(nacos: &FakeNacos, app: &Backend) -> Option<(bool, bool)> {
    nacos
        .registered("web")
        .into_iter()
        .find(|(ip, port, _, _)| ip == "127.0.0.1" && *port == app.port)
        .map(|(_, _, enabled, healthy)| (enabled, healthy))
}

#[test]
fn nacos_registration_follows_the_app_the_server_and_a_graceful_leave() {
    let nacos = FakeNacos::start();
    nacos.set_auth("reg", "pw", Duration::from_secs(3600));
    let other = Backend::start("other");
    let mut app = Backend::start("app");
    nacos.set_service("web", vec![NacosInstance::new("127.0.0.1", other.port)]);
    let a = start_a_nacos(&nacos, &app);
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            nacos_status(&nacos, &app) == Some((true, true))
        }),
        "A never registered the app; A's log:\n{}",
        support::tail(&a.log(), 30)
    );
    println!(
        "nacos: registered {} ms after A started",
        t0.elapsed().as_millis()
    );
    // B: a refresh every second, no outlier detection.
    let b = lb::start(
        "envoy/nacos.yaml",
        &[(8848, nacos.port)],
        &[
            NACOS_AUTH,
            (
                "\"refresh_interval\": \"1s\",",
                "\"refresh_interval\": \"1s\", \"outlier_detection\": { \"consecutive_5xx\": 0 },",
            ),
        ],
        2,
    );
    lb::wait_version(&b, "web", 1);
    let c = lb::tally(&b, 40);
    assert_eq!(
        (c.get("app"), c.get("other")),
        (Some(&20), Some(&20)),
        "{c:?}"
    );
    // Beats keep the 3 s heartbeat timeout from running out.
    let beats = nacos.beats();
    thread::sleep(TTL + REFRESH);
    assert_eq!(nacos_status(&nacos, &app), Some((true, true)));
    assert!(
        nacos.beats() - beats >= 3,
        "{} beats in 4 s",
        nacos.beats() - beats
    );
    assert!(a.stat(&lb::stat("register_heartbeat_ok")).unwrap_or(0) >= 3);

    // The app dies: disabled (B sees it draining) within TTL + one refresh.
    assert_eq!(b.stat(&lb::stat("web.instances_healthy")), Some(2));
    let killed = Instant::now();
    app.stop();
    assert!(
        lb::wait_stat(&b, &lb::stat("web.instances_healthy"), TTL + REFRESH, |v| v
            == 1),
        "B's registry view still had the dead app healthy after TTL + one refresh"
    );
    println!(
        "nacos: app killed -> down in B's registry view after {} ms (bound: TTL {} ms + refresh {} ms)",
        killed.elapsed().as_millis(),
        TTL.as_millis(),
        REFRESH.as_millis()
    );
    assert_eq!(
        nacos_status(&nacos, &app),
        Some((false, true)),
        "marked down (disabled), not deleted, and still beating"
    );

    // It comes back: enabled, B routes to it again.
    let port = app.port;
    drop(app);
    let app = Backend::start_on("app", port);
    assert!(lb::wait_stat(
        &b,
        &lb::stat("web.instances_healthy"),
        Duration::from_secs(5),
        |v| v == 2
    ));
    assert!(wait_until(
        Duration::from_secs(3),
        Duration::from_millis(50),
        || {
            let c = lb::tally(&b, 20);
            c.get("app").is_some_and(|n| *n >= 5) && c.contains_key("other")
        }
    ));

    // The server restarts without its ephemeral instances: the next beat gets
    // 20404 and A registers again at once.
    let restarted = Instant::now();
    nacos.restart();
    assert_eq!(nacos_status(&nacos, &app), None);
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
            nacos_status(&nacos, &app) == Some((true, true))
        }),
        "A did not register again; A's log:\n{}",
        support::tail(&a.log(), 30)
    );
    println!(
        "nacos: server restarted -> registered again after {} ms (heartbeat interval 1 s)",
        restarted.elapsed().as_millis()
    );
    assert!(a.stat(&lb::stat("register_forgotten")).unwrap_or(0) >= 1);
    assert!(lb::wait_stat(
        &b,
        &lb::stat("web.instances_healthy"),
        Duration::from_secs(5),
        |v| v == 2
    ));

    // The documented leave: mark down, wait two refreshes, stop Envoy A, stop the app.
    documented_leave(
        LeaveOrder {
            name: "nacos",
            wait: REFRESH * 2,
            bound: REFRESH * 2,
        },
        &b,
        a,
        app,
        |app| nacos_status(&nacos, app).is_some_and(|(enabled, _)| !enabled),
        |app, _, _| {
            thread::sleep(Duration::from_millis(500));
            let left = nacos_status(&nacos, app);
            // The last beat was under a second before (timeout 3 s): gone now means
            // the DELETE sent from on_done arrived.
            println!(
                "nacos: Envoy A stopped: {}",
                if left.is_none() {
                    "deregistered (the DELETE arrived)"
                } else {
                    "the DELETE did not arrive; the instance stays disabled until its heartbeat timeout"
                }
            );
            assert!(left.map_or(true, |(enabled, _)| !enabled), "{left:?}");
        },
    );

    // A crashes: no beats; the instance turns unhealthy after the 3 s heartbeat
    // timeout, and is deleted after `delete_after` (6 s).
    let app2 = Backend::start("app2");
    let a2 = start_a_nacos(&nacos, &app2);
    assert!(wait_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || nacos_status(&nacos, &app2) == Some((true, true))
    ));
    assert!(lb::wait_stat(
        &b,
        &lb::stat("web.instances_healthy"),
        Duration::from_secs(3),
        |v| v == 2
    ));
    let pid = a2.pid().expect("A2 runs");
    let killed = Instant::now();
    let st = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    assert!(st.is_ok_and(|s| s.success()));
    assert!(
        lb::wait_stat(
            &b,
            &lb::stat("web.instances_healthy"),
            TTL + Duration::from_secs(2),
            |v| v == 1
        ),
        "B still routes to the crashed sidecar's app"
    );
    let view = killed.elapsed();
    println!(
        "nacos: Envoy A killed -> unhealthy in B's view after {} ms (bound: TTL + refresh = {} ms)",
        view.as_millis(),
        (TTL + REFRESH).as_millis()
    );
    assert!(
        view <= TTL + REFRESH + Duration::from_millis(500),
        "{view:?}"
    );
    assert!(
        lb::wait_stat(
            &b,
            &lb::stat("web.instances_known"),
            Duration::from_secs(6),
            |v| v == 1
        ),
        "the crashed sidecar's app was not deleted after delete_after"
    );
    println!(
        "nacos: ... and deleted from B's view after {} ms (delete_after 6 s)",
        killed.elapsed().as_millis()
    );
}
