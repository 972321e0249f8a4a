//! The request path and the roots' duties through a fake Envoy: what is handed to
//! Envoy, replied, held, counted and shared, for each callback.

use super::*;
use crate::envoy::fake::FakeEnvoy;
use crate::envoy::HostError;
use wasm_bindgen_test::wasm_bindgen_test;

const HOSTS: [&str; 4] = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"];

/// Configuration of one service ("web", static instances `HOSTS`) with `top`
/// spliced into the top-level object and `service` into the service object.
fn config(top: &str, service: &str) -> String {
    let instances: Vec<String> = HOSTS
        .iter()
        .map(|h| {
            let (a, p) = h.split_once(':').unwrap_or((h, "80"));
            format!(r#"{{ "address": "{a}", "port": {p} }}"#)
        })
        .collect();
    format!(
        r#"{{ {top} "tick": "50ms", "services": [ {{ "name": "web", {service} "sources": [ {{ "static": {{ "instances": [{}] }} }} ] }} ] }}"#,
        instances.join(",")
    )
}

fn configure(host: FakeEnvoy, cfg: &str, seed: u64) -> Plugin<FakeEnvoy> {
    match Plugin::configure(host, cfg.as_bytes(), seed) {
        Ok(p) => p,
        Err(e) => panic!("config {cfg}: {e}"),
    }
}

fn plugin_with(top: &str, service: &str) -> Plugin<FakeEnvoy> {
    configure(FakeEnvoy::new(), &config(top, service), 7)
}

fn plugin(service: &str) -> Plugin<FakeEnvoy> {
    plugin_with("", service)
}

/// Ticks until this root leads and has published (static sources answer at once).
fn publish(p: &mut Plugin<FakeEnvoy>) {
    for _ in 0..4 {
        p.host.enter(0);
        p.on_tick();
        p.host.advance_ms(50);
    }
    assert!(p.is_leader());
    assert_eq!(p.host.stat("web.snapshot_version"), 1);
}

/// Starts request `id` on route "web" whose metadata names `service`.
fn begin(p: &Plugin<FakeEnvoy>, id: u32, service: &str, headers: &[(&str, &str)]) {
    p.host.begin(id, headers);
    p.host.set_property(id, &["xds", "route_name"], b"web");
    p.host.set_property(
        id,
        &[
            "xds",
            "route_metadata",
            "filter_metadata",
            "registry_lb",
            "service",
        ],
        service.as_bytes(),
    );
}

/// Sends request `id` through `on_request_headers`.
fn request(
    p: &mut Plugin<FakeEnvoy>,
    id: u32,
    headers: &[(&str, &str)],
) -> (Action, Option<Routed>) {
    begin(p, id, "web", headers);
    p.on_request_headers(id)
}

/// Ends request `id` with `code` (and response flags), as `on_log` does.
fn end(p: &mut Plugin<FakeEnvoy>, id: u32, routed: Option<Routed>, code: u64, flags: u64) {
    p.host
        .set_property(id, &["response", "code"], &code.to_le_bytes());
    p.host
        .set_property(id, &["response", "flags"], &flags.to_le_bytes());
    p.host.enter(id);
    p.on_log(id, routed);
}

fn handed(p: &Plugin<FakeEnvoy>, id: u32) -> Vec<String> {
    p.host.request(id).filter_state
}

#[wasm_bindgen_test(unsupported = test)]
fn a_request_gets_one_instance_through_filter_state_and_is_counted() {
    let mut p = plugin(r#""policy": "round_robin","#);
    publish(&mut p);
    let mut seen = std::collections::HashSet::new();
    for id in 1..=8 {
        let (a, routed) = request(&mut p, id, &[]);
        assert_eq!(a, Action::Continue);
        assert!(routed.is_some());
        let h = handed(&p, id);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(HOSTS.contains(&h[0].as_str()), "{h:?}");
        seen.insert(h[0].clone());
        end(&mut p, id, routed, 200, 0);
    }
    assert_eq!(seen.len(), 4, "round robin over four: {seen:?}");
    p.on_tick();
    assert_eq!(p.host.stat("web.instance.10_0_0_1_80.picks"), 2);
}

#[wasm_bindgen_test(unsupported = test)]
fn requests_of_routes_without_metadata_are_not_touched() {
    let mut p = plugin("");
    publish(&mut p);
    p.host.begin(1, &[]);
    assert_eq!(p.on_request_headers(1), (Action::Continue, None));
    assert!(handed(&p, 1).is_empty());
    assert!(p.host.request(1).reply.is_none());
}

#[wasm_bindgen_test(unsupported = test)]
fn a_route_naming_an_unknown_service_gets_a_503_naming_it() {
    let mut p = plugin("");
    publish(&mut p);
    begin(&p, 1, "nope", &[]);
    assert_eq!(p.on_request_headers(1), (Action::Pause, None));
    let (status, details, body) = p.host.request(1).reply.unwrap_or_default();
    assert_eq!(
        (status, details.as_str()),
        (503, "registry_lb_unknown_service")
    );
    assert_eq!(body, "registry-lb: service `nope` is not configured\n");
    assert_eq!(p.host.stat("unknown_service"), 1);
}

#[wasm_bindgen_test(unsupported = test)]
fn requests_before_the_first_snapshot_are_held_then_routed_on_their_own_request() {
    let mut p = plugin("");
    for id in 1..=3 {
        assert_eq!(request(&mut p, id, &[]), (Action::Pause, None));
    }
    assert_eq!(p.host.stat("web.rq_waited_for_first_snapshot"), 3);
    // Request 2 ends (client gone) while held: it is forgotten, never resumed.
    end(&mut p, 2, None, 0, 0);
    publish(&mut p);
    for id in [1, 3] {
        let r = p.host.request(id);
        assert_eq!(r.filter_state.len(), 1, "request {id}: {r:?}");
        assert_eq!(r.continued, 1, "request {id} resumed once");
    }
    assert_eq!(p.host.request(2).continued, 0);
    assert!(p.host.request(2).filter_state.is_empty());
    assert_eq!(p.host.filter_state_on_root.get(), 0);
}

#[wasm_bindgen_test(unsupported = test)]
fn held_requests_keep_their_hash_key_and_subset() {
    let mut p = plugin(r#""policy": "ring_hash", "hash_on": { "header": "x-user" },"#);
    let users: Vec<String> = (0..12).map(|u| format!("user-{u}")).collect();
    for (i, u) in users.iter().enumerate() {
        request(&mut p, 100 + i as u32, &[("x-user", u)]);
    }
    // One held request without the key: counted when it arrives.
    request(&mut p, 99, &[]);
    assert_eq!(p.host.stat("web.rq_hash_key_missing"), 1);
    publish(&mut p);
    for (i, u) in users.iter().enumerate() {
        let held = handed(&p, 100 + i as u32);
        let (_, routed) = request(&mut p, 200 + i as u32, &[("x-user", u)]);
        assert!(routed.is_some());
        assert_eq!(
            held,
            handed(&p, 200 + i as u32),
            "{u}: held and fresh requests differ"
        );
    }
    let spread: std::collections::HashSet<Vec<String>> =
        (0..12).map(|i| handed(&p, 100 + i)).collect();
    assert!(spread.len() >= 2, "keys spread: {spread:?}");
}

#[wasm_bindgen_test(unsupported = test)]
fn held_requests_get_a_503_when_the_first_snapshot_never_comes() {
    // A Consul source that never answers (calls dispatched, no answer).
    let cfg = r#"{ "services": [ { "name": "web", "initial_fetch_timeout": "200ms",
        "sources": [ { "consul": { "cluster": "consul", "service": "web" } } ] } ] }"#;
    let mut p = match Plugin::configure(FakeEnvoy::new(), cfg.as_bytes(), 7) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(request(&mut p, 1, &[]), (Action::Pause, None));
    for _ in 0..3 {
        p.host.enter(0);
        p.on_tick();
        p.host.advance_ms(50);
    }
    assert!(
        p.host.request(1).reply.is_none(),
        "still held within 200 ms"
    );
    p.host.advance_ms(100);
    p.host.enter(0);
    p.on_tick();
    let (status, details, body) = p.host.request(1).reply.unwrap_or_default();
    assert_eq!((status, details.as_str()), (503, "registry_lb_no_instance"));
    assert_eq!(
        body,
        "registry-lb: no available instance for service `web`\n"
    );
    assert!(
        !p.host.dispatched.borrow().is_empty(),
        "the registry was called"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn a_failed_hand_off_is_a_503_counted_not_a_request_sent_anywhere() {
    let mut p = plugin("");
    publish(&mut p);
    p.host.filter_state_error.set(Some(HostError::BadArgument));
    let (a, routed) = request(&mut p, 1, &[]);
    assert_eq!((a, routed), (Action::Pause, None));
    let (status, details, body) = p.host.request(1).reply.unwrap_or_default();
    assert_eq!(
        (status, details.as_str()),
        (503, "registry_lb_handoff_failed")
    );
    assert_eq!(body, "registry-lb: cannot route to service `web`\n");
    assert_eq!(p.host.stat("web.handoff_failed"), 1);
}

#[wasm_bindgen_test(unsupported = test)]
fn header_hand_off_replaces_whatever_the_client_sent() {
    let mut p = plugin_with(r#""handoff": "header","#, "");
    publish(&mut p);
    let (_, routed) = request(&mut p, 1, &[("x-envoy-original-dst-host", "6.6.6.6:22")]);
    assert!(routed.is_some());
    let r = p.host.request(1);
    let sent: Vec<_> = r
        .headers
        .iter()
        .filter(|(k, _)| k == "x-envoy-original-dst-host")
        .map(|(_, v)| String::from_utf8_lossy(v).to_string())
        .collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(HOSTS.contains(&sent[0].as_str()), "{sent:?}");
    assert_eq!(p.host.stat("client_handoff_header_removed"), 1);
    // Not ours (no route metadata): the spoofed header is still removed.
    p.host
        .begin(2, &[("x-envoy-original-dst-host", "6.6.6.6:22")]);
    p.on_request_headers(2);
    assert!(p.host.request(2).headers.is_empty());
}

#[wasm_bindgen_test(unsupported = test)]
fn override_host_lists_distinct_ranked_instances() {
    let mut p = plugin_with(
        r#""handoff": "override_host", "handoff_header": "x-lb-host","#,
        r#""policy": "least_request", "override_host_count": 3,"#,
    );
    publish(&mut p);
    let (_, routed) = request(&mut p, 1, &[("x-lb-host", "6.6.6.6:22")]);
    let routed = routed.unwrap_or_default();
    assert_eq!(routed.fallbacks.len(), 2);
    let r = p.host.request(1);
    let list: Vec<String> = r
        .headers
        .iter()
        .filter(|(k, _)| k == "x-lb-host")
        .map(|(_, v)| String::from_utf8_lossy(v).to_string())
        .collect();
    assert_eq!(list.len(), 1);
    let hosts: Vec<&str> = list[0].split(',').collect();
    let distinct: std::collections::HashSet<&&str> = hosts.iter().collect();
    assert_eq!((hosts.len(), distinct.len()), (3, 3), "{hosts:?}");
    assert!(hosts.iter().all(|h| HOSTS.contains(h)), "{hosts:?}");
}

#[wasm_bindgen_test(unsupported = test)]
fn least_request_counts_in_flight_requests_in_shared_stats() {
    let mut p = plugin(r#""policy": "least_request","#);
    publish(&mut p);
    let mut open = Vec::new();
    for id in 1..=8 {
        let (_, routed) = request(&mut p, id, &[]);
        open.push((id, routed));
    }
    let active: i64 = (0..4)
        .map(|s| p.host.stat(&format!("web.slot_{s}.rq_active")))
        .sum();
    assert_eq!(active, 8);
    // Another worker has 100 in flight on slot 0: this worker sees it and picks it
    // only when both of its two draws (with replacement) are slot 0 — 1/16 of
    // picks, against 1/4 if it counted only its own requests.
    let id = p
        .stats
        .slot_id(&p.host, "web", 0, crate::stats::SlotStat::RqActive);
    p.host.metric_add(id.unwrap_or(u32::MAX), 100);
    let busy = p.host_of(0, 0).unwrap_or_default();
    assert!(HOSTS.contains(&busy.as_str()));
    let mut busy_picks = 0;
    for n in 0..200 {
        let (_, routed) = request(&mut p, 100 + n, &[]);
        if handed(&p, 100 + n) == [busy.clone()] {
            busy_picks += 1;
        }
        end(&mut p, 100 + n, routed, 200, 0);
    }
    // Binomial(200, 1/16): 12.5 ± 3.4; with per-worker counts 50 ± 6.1.
    assert!(
        busy_picks < 30,
        "{busy_picks} of 200 picks went to the busy instance"
    );
    p.host.metric_add(id.unwrap_or(u32::MAX), -100);
    for (id, routed) in open {
        end(&mut p, id, routed, 200, 0);
    }
    let active: i64 = (0..4)
        .map(|s| p.host.stat(&format!("web.slot_{s}.rq_active")))
        .sum();
    assert_eq!(active, 0);
}

#[wasm_bindgen_test(unsupported = test)]
fn consecutive_failures_eject_an_instance_and_a_trial_brings_it_back() {
    let mut p = plugin(
        r#""policy": "round_robin", "outlier_detection": { "consecutive_5xx": 3, "base_ejection_time": "1s" },"#,
    );
    publish(&mut p);
    // Fail every request to 10.0.0.1 until it is ejected.
    let mut id = 1;
    let mut bad_failures = 0;
    while bad_failures < 3 && id < 100 {
        let (_, routed) = request(&mut p, id, &[]);
        let bad = handed(&p, id) == ["10.0.0.1:80"];
        if bad {
            bad_failures += 1;
        }
        end(&mut p, id, routed, if bad { 503 } else { 200 }, 0);
        id += 1;
    }
    assert_eq!(p.host.stat("web.outlier_ejections"), 1);
    assert_eq!(p.host.stat("web.instances_ejected"), 1);
    for n in 0..20 {
        request(&mut p, 1000 + n, &[]);
        assert_ne!(
            handed(&p, 1000 + n),
            ["10.0.0.1:80"],
            "ejected instance picked"
        );
    }
    // After the ejection time the leader makes it half-open: one trial request.
    p.host.advance_ms(1100);
    p.host.enter(0);
    p.on_tick();
    let mut trial = None;
    for n in 0..8 {
        let (_, routed) = request(&mut p, 2000 + n, &[]);
        if handed(&p, 2000 + n) == ["10.0.0.1:80"] {
            assert!(trial.is_none(), "only one trial at a time");
            trial = Some((2000 + n, routed));
        }
    }
    let Some((tid, routed)) = trial else {
        panic!("no trial request");
    };
    assert!(routed.as_ref().is_some_and(|r| r.trial));
    end(&mut p, tid, routed, 200, 0);
    assert_eq!(p.host.stat("web.outlier_trial_ok"), 1);
    assert_eq!(p.host.stat("web.instances_ejected"), 0);
}

#[wasm_bindgen_test(unsupported = test)]
fn connect_failures_count_without_a_response_code() {
    let mut p =
        plugin(r#""policy": "round_robin", "outlier_detection": { "consecutive_5xx": 2 },"#);
    publish(&mut p);
    let mut id = 1;
    let mut fails = 0;
    while fails < 2 && id < 50 {
        let (_, routed) = request(&mut p, id, &[]);
        let bad = handed(&p, id) == ["10.0.0.2:80"];
        if bad {
            fails += 1;
        }
        // UF (upstream connection failure, 0x20) with no response code.
        end(
            &mut p,
            id,
            routed,
            if bad { 0 } else { 200 },
            if bad { 0x20 } else { 0 },
        );
        id += 1;
    }
    assert_eq!(p.host.stat("web.outlier_ejections"), 1);
}

#[wasm_bindgen_test(unsupported = test)]
fn stale_registry_data_is_refused_after_max_stale() {
    let mut p = plugin(r#""max_stale": "1s","#);
    publish(&mut p);
    assert!(request(&mut p, 1, &[]).1.is_some());
    // The leader's age gauge says the registry has not confirmed for 2 s.
    let id = p
        .stats
        .id(&p.host, "web", crate::stats::Stat::SnapshotAgeMs);
    p.host.metric_record(id.unwrap_or(u32::MAX), 2000);
    p.refresh_all(p.host.now_ms());
    let (a, routed) = request(&mut p, 2, &[]);
    assert_eq!((a, routed), (Action::Pause, None));
    let (status, details, _) = p.host.request(2).reply.unwrap_or_default();
    assert_eq!((status, details.as_str()), (503, "registry_lb_stale"));
    assert_eq!(p.host.stat("web.rq_stale"), 1);
}

#[wasm_bindgen_test(unsupported = test)]
fn load_reports_are_read_from_the_routed_response() {
    let mut p = plugin(r#""policy": "round_robin", "load_report": {},"#);
    publish(&mut p);
    let (_, routed) = request(&mut p, 1, &[]);
    p.host
        .requests
        .borrow_mut()
        .entry(1)
        .or_default()
        .response_headers = vec![("endpoint-load-metrics".into(), b"garbage".to_vec())];
    p.on_response_headers(routed.as_ref());
    assert_eq!(p.host.stat("web.load_report_invalid"), 1);
}

#[wasm_bindgen_test(unsupported = test)]
fn only_one_root_polls_and_a_second_adopts_the_published_snapshot() {
    let mut a = plugin("");
    publish(&mut a);
    // A second VM of the same Envoy shares the store: move a's store into b's host.
    let b_host = FakeEnvoy::new();
    *b_host.shared.borrow_mut() = a.host.shared.borrow().clone();
    *b_host.metrics.borrow_mut() = a.host.metrics.borrow().clone();
    b_host.now_us.set(a.host.now_us.get());
    let mut b = configure(b_host, &config("", ""), 99);
    for _ in 0..3 {
        b.on_tick();
    }
    assert!(!b.is_leader(), "the lease is a's");
    assert!(b.host.dispatched.borrow().is_empty());
    assert!(
        request(&mut b, 1, &[]).1.is_some(),
        "b routes from a's snapshot"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn abandoned_requests_and_local_replies_do_not_count_against_an_instance() {
    use crate::outlier::flags;
    let mut p =
        plugin(r#""policy": "round_robin", "outlier_detection": { "consecutive_5xx": 2 },"#);
    publish(&mut p);
    // Many requests to every instance end without saying anything about it: the
    // client left (DC, no code), or Envoy answered itself (UO 503, LH 503).
    let quiet = [
        (0, flags::DOWNSTREAM_CONNECTION_TERMINATION),
        (503, flags::UPSTREAM_OVERFLOW),
        (503, flags::FAILED_LOCAL_HEALTH_CHECK),
        (0, 0),
    ];
    for id in 1..=40u32 {
        let (_, routed) = request(&mut p, id, &[]);
        let (code, f) = quiet[id as usize % quiet.len()];
        end(&mut p, id, routed, code, f);
    }
    assert_eq!(p.host.stat("web.outlier_ejections"), 0);
    // ... and they do not reset a run of real failures either: 503, DC, 503 ejects.
    let mut run = Vec::new();
    let mut id = 100;
    while run.len() < 3 && id < 200 {
        let (_, routed) = request(&mut p, id, &[]);
        if handed(&p, id) == ["10.0.0.3:80"] {
            run.push(id);
            let (code, f) = match run.len() {
                2 => (0, flags::DOWNSTREAM_CONNECTION_TERMINATION),
                _ => (503, 0),
            };
            end(&mut p, id, routed, code, f);
        } else {
            end(&mut p, id, routed, 200, 0);
        }
        id += 1;
    }
    assert_eq!(p.host.stat("web.outlier_ejections"), 1);
}

#[wasm_bindgen_test(unsupported = test)]
fn a_registry_answer_over_max_response_bytes_is_counted_as_too_large() {
    let cfg = r#"{ "tick": "50ms", "services": [ { "name": "web", "max_response_bytes": 2000,
        "sources": [ { "consul": { "cluster": "consul", "service": "web" } } ] } ] }"#;
    let mut p = configure(FakeEnvoy::new(), cfg, 7);
    for _ in 0..3 {
        p.on_tick();
        p.host.advance_ms(50);
    }
    let token = p.host.dispatched.borrow().len() as u32;
    assert_eq!(token, 1, "one registry call");
    *p.host.answer.borrow_mut() = Some(crate::envoy::CallAnswer {
        headers: vec![(":status".into(), "200".into())],
        body: Vec::new(),
    });
    p.on_call_answer(token, 3, 5000);
    assert_eq!(p.host.stat("web.refresh_failed_too_large"), 1);
    assert_eq!(p.host.stat("web.refresh_failed"), 1);
    assert_eq!(p.host.stat("web.refresh_failed_unreachable"), 0);
}

#[wasm_bindgen_test(unsupported = test)]
fn an_envoy_that_refuses_filter_state_from_a_timer_stops_holding_requests() {
    // Envoy before 1.37: set_envoy_filter_state from a root callback acts on the
    // root, which has no filter state (NotFound), while the request path works.
    let mut p = plugin("");
    request(&mut p, 1, &[]);
    request(&mut p, 2, &[]);
    p.host.filter_state_error.set(Some(HostError::NotFound));
    publish(&mut p);
    for id in [1, 2] {
        let (status, details, _) = p.host.request(id).reply.unwrap_or_default();
        assert_eq!(
            (status, details.as_str()),
            (503, "registry_lb_handoff_failed")
        );
        assert_eq!(
            p.host.request(id).continued,
            0,
            "not sent on without a host"
        );
    }
    assert_eq!(p.host.stat("web.handoff_failed"), 2);
    assert!(p.requests.timer_filter_state_refused);
    // The request path itself still hands over.
    p.host.filter_state_error.set(None);
    let (a, routed) = request(&mut p, 3, &[]);
    assert_eq!(a, Action::Continue);
    assert!(routed.is_some());
}
