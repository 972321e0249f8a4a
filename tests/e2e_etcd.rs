//! End to end in a real Envoy against a real etcd 3.4: discovery through the JSON
//! gateway, revision-based change detection, bad values, and authentication with
//! tokens that expire.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};
use support::{lb, Backend, Envoy, Etcd};

fn value(b: &Backend, weight: u32) -> String {
    format!(
        r#"{{"address":"127.0.0.1","port":{},"weight":{weight},"zone":"z1","metadata":{{"version":"v1"}}}}"#,
        b.port
    )
}

fn start(etcd: &Etcd, replace: &[(&str, &str)]) -> Envoy {
    lb::start("envoy/etcd.yaml", &[(2379, etcd.client_port)], replace, 2)
}

#[test]
fn discovers_follows_changes_and_skips_unchanged_revisions() {
    let etcd = Etcd::start();
    let b: Vec<Backend> = Backend::start_all(&["a", "b", "c"]);
    etcd.put("/services/web/a", &value(&b[0], 3));
    etcd.put("/services/web/b", &value(&b[1], 1));
    etcd.put("/services/other/x", &value(&b[2], 1)); // another prefix: ignored
    let envoy = start(&etcd, &[]);
    lb::wait_version(&envoy, "web", 1);
    let c = lb::tally(&envoy, 80);
    assert_eq!((c.get("a"), c.get("b")), (Some(&60), Some(&20)), "{c:?}");

    // Nothing changes: polls continue, nothing is re-published. The second poll comes
    // one to two intervals after the first (docs/fleet.md), the third one interval
    // later, so two unchanged answers arrive within three intervals (1 s each).
    assert!(
        lb::wait_stat(
            &envoy,
            &lb::stat("web.refresh_unchanged"),
            Duration::from_millis(4500),
            |v| v >= 2
        ),
        "fewer than two unchanged polls in 4.5 s"
    );
    assert_eq!(envoy.stat(&lb::stat("web.snapshot_version")), Some(1));

    // An unrelated key moves the store revision: parsed, same content, not re-published.
    etcd.put("/services/other/y", &value(&b[2], 1));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(envoy.stat(&lb::stat("web.snapshot_version")), Some(1));

    // Added instance: traffic within one refresh interval (1 s) plus a tick.
    let t0 = Instant::now();
    etcd.put("/services/web/c", &value(&b[2], 1));
    let mut seen = None;
    while t0.elapsed() < Duration::from_secs(5) {
        if envoy.get("/", &[]).1 == "c" {
            seen = Some(t0.elapsed());
            break;
        }
    }
    let seen = seen.expect("added instance never served");
    println!(
        "etcd: added instance served after {} ms (refresh_interval 1 s)",
        seen.as_millis()
    );
    assert!(seen < Duration::from_millis(1300), "{seen:?}");

    // Removed instance: nothing after the next refresh.
    etcd.delete("/services/web/a");
    lb::wait_version(&envoy, "web", 3);
    std::thread::sleep(Duration::from_millis(150));
    let hits = b[0].hits();
    let c = lb::tally(&envoy, 100);
    assert_eq!(b[0].hits(), hits, "{c:?}");
    assert_eq!((c.get("b"), c.get("c")), (Some(&50), Some(&50)), "{c:?}");

    // A bad value is skipped, counted and logged; the rest keeps working.
    etcd.put(
        "/services/web/bad",
        r#"{"address":"db.internal","port":80}"#,
    );
    assert!(lb::wait_stat(
        &envoy,
        &lb::stat("web.instances_rejected"),
        Duration::from_secs(5),
        |v| v >= 1
    ));
    assert!(envoy.wait_for_log(
        "key `/services/web/bad`: address `db.internal` is not an IP literal",
        Duration::from_secs(3)
    ));
    let c = lb::tally(&envoy, 20);
    assert_eq!((c.get("b"), c.get("c")), (Some(&10), Some(&10)), "{c:?}");
}

#[test]
fn authenticates_and_renews_an_expired_token() {
    // Tokens expire after 2 s idle; registry-lb polls every 3 s, so every poll finds
    // its token expired (401) and must log in again without failing the refresh.
    let etcd = Etcd::start_with_args(None, &["--auth-token-ttl", "2"]);
    let b: Vec<Backend> = Backend::start_all(&["a", "b"]);
    etcd.enable_auth("registry-lb", "pw");
    etcd.put("/services/web/a", &value(&b[0], 1));
    let creds = r#"{ "cluster": "etcd", "prefix": "/services/web/", "username": "registry-lb", "password": "pw" }"#;
    let envoy = start(
        &etcd,
        &[
            (
                r#"{ "cluster": "etcd", "prefix": "/services/web/" }"#,
                creds,
            ),
            (
                "\"refresh_interval\": \"1s\"",
                "\"refresh_interval\": \"3s\"",
            ),
        ],
    );
    lb::wait_version(&envoy, "web", 1);
    assert_eq!(envoy.get("/", &[]).1, "a");
    etcd.put("/services/web/b", &value(&b[1], 1));
    lb::wait_version(&envoy, "web", 2);
    let c = lb::tally(&envoy, 20);
    assert_eq!((c.get("a"), c.get("b")), (Some(&10), Some(&10)), "{c:?}");
    let logins = envoy.stat(&lb::stat("web.registry_login")).unwrap_or(0);
    println!("etcd logins so far: {logins}");
    assert!(
        logins >= 2,
        "the expired token was renewed by logging in again ({logins} logins)"
    );
    assert_eq!(
        envoy.stat(&lb::stat("web.refresh_failed")).unwrap_or(0),
        0,
        "no refresh failed"
    );

    // Wrong password: an auth failure of its own, distinct from "registry down".
    let wrong = start(
        &etcd,
        &[(
            r#"{ "cluster": "etcd", "prefix": "/services/web/" }"#,
            &creds.replace("\"pw\"", "\"nope\""),
        )],
    );
    lb::assert_refused(
        &wrong,
        "login as `registry-lb` failed",
        Duration::from_secs(3),
    );
    assert_eq!(
        wrong
            .stat(&lb::stat("web.refresh_failed_unreachable"))
            .unwrap_or(0),
        0
    );
    let (status, body, _) = wrong.get("/", &[]);
    assert_eq!(
        (status, body.as_str()),
        (
            503,
            "registry-lb: no available instance for service `web`\n"
        )
    );
}
