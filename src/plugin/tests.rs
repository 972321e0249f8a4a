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

/// Status and details of the local reply request `id` got ((0, "") if none).
fn reply_of(p: &Plugin<FakeEnvoy>, id: u32) -> (u32, String) {
    let (status, details, _) = p.host.request(id).reply.unwrap_or_default();
    (status, details)
}

/// A local 503 reply as the fake records it: (status, details, body).
fn local_503(details: &str, body: &str) -> Option<(u32, String, String)> {
    Some((503, details.to_string(), body.to_string()))
}

/// `(status, details)` to compare with [`reply_of`].
fn reply(status: u32, details: &str) -> (u32, String) {
    (status, details.to_string())
}

/// Sends requests from id `first` on, ending those handed `host` with `code` and
/// `flags` and the others with 200, until `n` failed (at most 100 requests).
fn fail_host(p: &mut Plugin<FakeEnvoy>, first: u32, host: &str, n: u32, code: u64, flags: u64) {
    let mut failed = 0;
    for id in first..first + 100 {
        if failed == n {
            return;
        }
        let (_, routed) = request(p, id, &[]);
        if handed(p, id) == [host] {
            failed += 1;
            end(p, id, routed, code, flags);
        } else {
            end(p, id, routed, 200, 0);
        }
    }
    panic!("{host} was handed only {failed} of {n} times in 100 requests");
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
    assert_eq!(
        p.host.request(1).reply,
        local_503(
            "registry_lb_unknown_service",
            "registry-lb: service `nope` is not configured\n"
        )
    );
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
    assert_eq!(
        p.host.request(1).reply,
        local_503(
            "registry_lb_no_instance",
            "registry-lb: no available instance for service `web`\n"
        )
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
    assert_eq!(
        p.host.request(1).reply,
        local_503(
            "registry_lb_handoff_failed",
            "registry-lb: cannot route to service `web`\n"
        )
    );
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
    fail_host(&mut p, 1, "10.0.0.1:80", 3, 503, 0);
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

/// A Consul health answer at `index` listing `HOSTS` with these passing weights.
fn consul_answer(index: u32, weights: [u32; 4]) -> crate::envoy::CallAnswer {
    let entries: Vec<String> = HOSTS
        .iter()
        .zip(weights)
        .enumerate()
        .map(|(i, (h, w))| {
            let (a, port) = h.split_once(':').unwrap_or((h, "80"));
            format!(
                r#"{{"Node":{{"Node":"n{i}","Address":"{a}"}},"Service":{{"ID":"web-{i}","Service":"web","Address":"{a}","Port":{port},"Weights":{{"Passing":{w},"Warning":1}}}},"Checks":[]}}"#
            )
        })
        .collect();
    crate::envoy::CallAnswer {
        headers: vec![
            (":status".into(), "200".into()),
            ("x-consul-index".into(), index.to_string()),
        ],
        body: format!("[{}]", entries.join(",")).into_bytes(),
    }
}

/// Answers the newest registry call with `a`, then ticks until the worker's table
/// is at snapshot `version`.
fn registry_answers(p: &mut Plugin<FakeEnvoy>, a: crate::envoy::CallAnswer, version: i64) {
    for _ in 0..4 {
        p.host.enter(0);
        p.on_tick();
        p.host.advance_ms(50);
    }
    let token = p.host.dispatched.borrow().len() as u32;
    let (h, b) = (a.headers.len(), a.body.len());
    *p.host.answer.borrow_mut() = Some(a);
    p.host.enter(0);
    p.on_call_answer(token, h, b);
    p.on_tick();
    assert_eq!(p.host.stat("web.snapshot_version"), version);
}

/// The entries `x-lb-host` of request `id` names (`override_host` hand-off).
fn override_list(p: &Plugin<FakeEnvoy>, id: u32) -> Vec<String> {
    p.host
        .request(id)
        .headers
        .iter()
        .filter(|(k, _)| k == "x-lb-host")
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Registry churn between an ejection and its trial: the new snapshot gives the
/// worker a new table (the per-slot hand-off bytes are built again), and the
/// instance on trial is not routable while its trial runs. The trial request
/// must still be handed to it — as the first entry with `override_host`.
fn trial_after_a_new_snapshot(top: &str) {
    let cfg = format!(
        r#"{{ {top} "tick": "50ms", "services": [ {{ "name": "web", "policy": "round_robin",
            "outlier_detection": {{ "consecutive_5xx": 3, "base_ejection_time": "1s" }},
            "sources": [ {{ "consul": {{ "cluster": "consul", "service": "web" }} }} ] }} ] }}"#
    );
    let override_host = top.contains("override_host");
    let mut p = configure(FakeEnvoy::new(), &cfg, 7);
    registry_answers(&mut p, consul_answer(10, [1, 1, 1, 1]), 1);
    let first = |p: &Plugin<FakeEnvoy>, id: u32| -> Vec<String> {
        if override_host {
            override_list(p, id).into_iter().take(1).collect()
        } else {
            handed(p, id)
        }
    };
    let mut failed = 0;
    for id in 1..100 {
        let (_, routed) = request(&mut p, id, &[]);
        let ok = first(&p, id) != ["10.0.0.1:80"];
        failed += u32::from(!ok);
        end(&mut p, id, routed, if ok { 200 } else { 503 }, 0);
        if failed == 3 {
            break;
        }
    }
    assert_eq!(p.host.stat("web.outlier_ejections"), 1);
    // Another instance's weight changes: snapshot 2, a new table on this worker.
    registry_answers(&mut p, consul_answer(11, [1, 2, 1, 1]), 2);
    p.host.advance_ms(1100);
    p.host.enter(0);
    p.on_tick();
    let mut trial = None;
    for id in 2000..2008 {
        let (_, routed) = request(&mut p, id, &[]);
        assert_eq!(
            reply_of(&p, id),
            (0, String::new()),
            "request {id} answered locally"
        );
        if first(&p, id) == ["10.0.0.1:80"] {
            assert!(trial.is_none(), "only one trial at a time");
            trial = Some((id, routed));
        } else {
            end(&mut p, id, routed, 200, 0);
        }
    }
    assert_eq!(p.host.stat("web.handoff_failed"), 0);
    let Some((tid, routed)) = trial else {
        panic!("no request was handed to the instance on trial");
    };
    assert!(routed.as_ref().is_some_and(|r| r.trial));
    end(&mut p, tid, routed, 200, 0);
    assert_eq!(p.host.stat("web.outlier_trial_ok"), 1);
    assert_eq!(p.host.stat("web.instances_ejected"), 0);
}

#[wasm_bindgen_test(unsupported = test)]
fn a_trial_after_a_new_snapshot_is_handed_to_its_instance_filter_state() {
    trial_after_a_new_snapshot("");
}

#[wasm_bindgen_test(unsupported = test)]
fn a_trial_after_a_new_snapshot_is_handed_to_its_instance_override_host() {
    trial_after_a_new_snapshot(r#""handoff": "override_host", "handoff_header": "x-lb-host","#);
}

/// A trial whose hand-off fails never reached its instance: the slot is half-open
/// again at once, not out (and counted against `max_ejection_percent`) until the
/// trial times out 30 s later.
#[wasm_bindgen_test(unsupported = test)]
fn a_trial_whose_handoff_failed_is_offered_to_the_next_request() {
    let mut p = plugin(
        r#""policy": "round_robin", "outlier_detection": { "consecutive_5xx": 3, "base_ejection_time": "1s" },"#,
    );
    publish(&mut p);
    fail_host(&mut p, 1, "10.0.0.1:80", 3, 503, 0);
    assert_eq!(p.host.stat("web.outlier_ejections"), 1);
    p.host.advance_ms(1100);
    p.host.enter(0);
    p.on_tick();
    // Envoy refuses every hand-off for a moment: four requests, one of them the
    // trial's (round robin over four instances).
    p.host.filter_state_error.set(Some(HostError::Other(10)));
    for id in 100..104 {
        request(&mut p, id, &[]);
        assert_eq!(reply_of(&p, id), reply(503, "registry_lb_handoff_failed"));
    }
    assert_eq!(p.host.stat("web.instances_ejected"), 0, "trial still held");
    p.host.filter_state_error.set(None);
    let mut trial = None;
    for id in 200..204 {
        let (_, routed) = request(&mut p, id, &[]);
        if handed(&p, id) == ["10.0.0.1:80"] {
            trial = Some((id, routed));
        }
    }
    let Some((tid, routed)) = trial else {
        panic!("the instance got no trial after a failed hand-off");
    };
    assert!(routed.as_ref().is_some_and(|r| r.trial));
    end(&mut p, tid, routed, 200, 0);
    assert_eq!(p.host.stat("web.outlier_trial_ok"), 1);
}

#[wasm_bindgen_test(unsupported = test)]
fn connect_failures_count_without_a_response_code() {
    let mut p =
        plugin(r#""policy": "round_robin", "outlier_detection": { "consecutive_5xx": 2 },"#);
    publish(&mut p);
    // UF (upstream connection failure, 0x20) with no response code.
    fail_host(&mut p, 1, "10.0.0.2:80", 2, 0, 0x20);
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
    assert_eq!(reply_of(&p, 2), reply(503, "registry_lb_stale"));
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
    p.on_response_headers(1, routed.as_ref());
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
        assert_eq!(reply_of(&p, id), reply(503, "registry_lb_handoff_failed"));
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

// ---- Which service a request belongs to without route metadata ----

const WEB_CLUSTER: &str = "outbound|80||web.default.svc.cluster.local";
const LEGACY: [&str; 2] = ["10.0.1.1:8080", "10.0.1.2:8080"];

/// Services "web" (instances `HOSTS`) and "legacy" (instances `LEGACY`), with
/// `web` and `legacy` spliced into their service objects.
fn two_services(web: &str, legacy: &str) -> String {
    let list = |hosts: &[&str]| -> String {
        hosts
            .iter()
            .map(|h| {
                let (a, p) = h.split_once(':').unwrap_or((h, "80"));
                format!(r#"{{ "address": "{a}", "port": {p} }}"#)
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    format!(
        r#"{{ "services": [
            {{ "name": "web", {web} "sources": [ {{ "static": {{ "instances": [{}] }} }} ] }},
            {{ "name": "legacy", {legacy} "sources": [ {{ "static": {{ "instances": [{}] }} }} ] }} ] }}"#,
        list(&HOSTS),
        list(&LEGACY)
    )
}

/// "web" claims `WEB_CLUSTER`, "legacy" claims host `legacy.service.consul`.
fn claiming() -> Plugin<FakeEnvoy> {
    let mut p = configure(
        FakeEnvoy::new(),
        &two_services(
            &format!(r#""upstream_clusters": ["{WEB_CLUSTER}"],"#),
            r#""hosts": ["legacy.service.consul"],"#,
        ),
        7,
    );
    publish(&mut p);
    assert_eq!(p.host.stat("legacy.snapshot_version"), 1);
    p
}

/// Starts request `id` on route `route` (no metadata) to `cluster`, with `authority`.
fn begin_on(p: &Plugin<FakeEnvoy>, id: u32, route: &str, cluster: &str, authority: &str) {
    p.host.begin(id, &[(":authority", authority)]);
    p.host
        .set_property(id, &["xds", "route_name"], route.as_bytes());
    p.host
        .set_property(id, &["xds", "cluster_name"], cluster.as_bytes());
}

/// The service request `id` was routed to (by what was handed to Envoy), or None
/// when it was not touched.
fn routed_to(p: &mut Plugin<FakeEnvoy>, id: u32) -> Option<&'static str> {
    let (action, routed) = p.on_request_headers(id);
    let r = p.host.request(id);
    let Some(routed) = routed else {
        assert_eq!(action, Action::Continue, "request {id}");
        assert!(r.filter_state.is_empty() && r.reply.is_none(), "{r:?}");
        return None;
    };
    assert_eq!(r.filter_state.len(), 1, "{r:?}");
    let to = r.filter_state[0].as_str();
    let service = if HOSTS.contains(&to) {
        "web"
    } else if LEGACY.contains(&to) {
        "legacy"
    } else {
        panic!("handed {to}")
    };
    assert_eq!(p.cfg.services[routed.service].name, service);
    end(p, id, Some(routed), 200, 0);
    Some(service)
}

#[wasm_bindgen_test(unsupported = test)]
fn a_service_claims_the_requests_of_its_upstream_clusters() {
    let mut p = claiming();
    let mut seen = std::collections::HashSet::new();
    for id in 1..=8 {
        begin_on(&p, id, "outbound|80||web", WEB_CLUSTER, "web:80");
        assert_eq!(routed_to(&mut p, id), Some("web"));
        seen.extend(handed(&p, id));
    }
    assert_eq!(seen.len(), 4, "balanced over web's four: {seen:?}");
    // Another cluster, or the name in another case, is not web's.
    begin_on(
        &p,
        9,
        "r",
        "outbound|80||api.default.svc.cluster.local",
        "api",
    );
    assert_eq!(routed_to(&mut p, 9), None);
    begin_on(&p, 10, "r", &WEB_CLUSTER.to_uppercase(), "web");
    assert_eq!(routed_to(&mut p, 10), None);
}

#[wasm_bindgen_test(unsupported = test)]
fn a_service_claims_its_hosts_in_any_case_with_any_port() {
    let mut p = claiming();
    let mut seen = std::collections::HashSet::new();
    for (id, authority) in [
        "legacy.service.consul",
        "legacy.service.consul:8080",
        "LEGACY.Service.Consul:80",
        "Legacy.service.consul",
    ]
    .into_iter()
    .enumerate()
    {
        let id = id as u32 + 1;
        begin_on(&p, id, "allow_any", "PassthroughCluster", authority);
        assert_eq!(routed_to(&mut p, id), Some("legacy"), "{authority}");
        seen.extend(handed(&p, id));
    }
    assert_eq!(seen.len(), 2, "balanced over legacy's two: {seen:?}");
    for (id, authority) in [
        (11, "legacy.service.consul.evil"),
        (12, "x.legacy.service.consul"),
        (13, "legacy.service.consul:http"),
        (14, "legacy.service.consul:8080:80"),
        (15, ""),
    ] {
        begin_on(&p, id, "allow_any", "PassthroughCluster", authority);
        assert_eq!(routed_to(&mut p, id), None, "{authority:?}");
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn route_metadata_wins_over_clusters_and_clusters_over_hosts() {
    let mut p = claiming();
    // Metadata names legacy on a route to web's cluster with web's… and legacy's host.
    begin_on(&p, 1, "r1", WEB_CLUSTER, "legacy.service.consul");
    p.host.set_property(
        1,
        &[
            "xds",
            "route_metadata",
            "filter_metadata",
            "registry_lb",
            "service",
        ],
        b"legacy",
    );
    assert_eq!(routed_to(&mut p, 1), Some("legacy"));
    // Metadata naming web on a PassthroughCluster route with legacy's host.
    begin_on(&p, 2, "r2", "PassthroughCluster", "legacy.service.consul");
    p.host.set_property(
        2,
        &[
            "xds",
            "route_metadata",
            "filter_metadata",
            "registry_lb",
            "service",
        ],
        b"web",
    );
    assert_eq!(routed_to(&mut p, 2), Some("web"));
    // No metadata: web's cluster wins over legacy's host.
    begin_on(&p, 3, "r3", WEB_CLUSTER, "legacy.service.consul:8080");
    assert_eq!(routed_to(&mut p, 3), Some("web"));
    // Neither metadata nor a claimed cluster: the host decides.
    begin_on(
        &p,
        4,
        "r4",
        "PassthroughCluster",
        "legacy.service.consul:8080",
    );
    assert_eq!(routed_to(&mut p, 4), Some("legacy"));
    // Metadata naming an unknown service still answers 503, whatever else matches.
    begin_on(&p, 5, "r5", WEB_CLUSTER, "legacy.service.consul");
    p.host.set_property(
        5,
        &[
            "xds",
            "route_metadata",
            "filter_metadata",
            "registry_lb",
            "service",
        ],
        b"nope",
    );
    assert_eq!(p.on_request_headers(5), (Action::Pause, None));
    assert_eq!(
        p.host.request(5).reply.map(|r| r.1),
        Some("registry_lb_unknown_service".to_string())
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn a_request_claimed_by_nothing_is_not_touched() {
    let mut p = claiming();
    let stats = p.host.stat_names().len();
    begin_on(&p, 1, "allow_any", "PassthroughCluster", "example.com:443");
    p.host.set_property(
        1,
        &[
            "xds",
            "route_metadata",
            "filter_metadata",
            "other",
            "service",
        ],
        b"web",
    );
    assert_eq!(p.on_request_headers(1), (Action::Continue, None));
    let r = p.host.request(1);
    assert!(r.filter_state.is_empty(), "{r:?}");
    assert!(r.reply.is_none() && r.continued == 0, "{r:?}");
    assert_eq!(r.headers.len(), 1, "headers unchanged: {:?}", r.headers);
    end(&mut p, 1, None, 200, 0);
    p.on_tick();
    assert_eq!(p.host.stat_names().len(), stats, "no stat for it");
}

#[wasm_bindgen_test(unsupported = test)]
fn distinct_authorities_keep_the_caches_and_stats_bounded() {
    let mut p = claiming();
    let stats = p.host.stat_names();
    // One request context reused: the fake keeps one request, the plugin its caches.
    for n in 0..100_000u32 {
        begin_on(
            &p,
            1,
            "allow_any",
            "PassthroughCluster",
            &format!("h{n}.example:8080"),
        );
        assert_eq!(p.on_request_headers(1), (Action::Continue, None), "h{n}");
        if n % 9_973 == 0 {
            // Legacy's host resolves at any fill of the cache.
            begin_on(
                &p,
                2,
                "allow_any",
                "PassthroughCluster",
                "legacy.service.consul:8080",
            );
            assert_eq!(routed_to(&mut p, 2), Some("legacy"));
        }
    }
    let (routes, authorities) = p.requests.cache_sizes();
    assert_eq!(routes, 1, "one route name");
    assert_eq!(authorities, 1024, "authority cache at its bound");
    // Long authorities are resolved but never cached.
    p.host.advance_ms(10_000);
    p.on_tick();
    assert_eq!(p.requests.cache_sizes(), (0, 0), "cleared every 10 s");
    let long = format!("{}.legacy", "a".repeat(300));
    begin_on(&p, 3, "allow_any", "PassthroughCluster", &long);
    assert_eq!(routed_to(&mut p, 3), None);
    assert_eq!(p.requests.cache_sizes().1, 0, "not cached");
    begin_on(
        &p,
        4,
        "allow_any",
        "PassthroughCluster",
        "legacy.service.consul",
    );
    assert_eq!(routed_to(&mut p, 4), Some("legacy"));
    assert_eq!(p.requests.cache_sizes().1, 1);
    p.on_tick();
    // New stats: legacy's two instances (picks, failure runs) only.
    let names = p.host.stat_names();
    let new: Vec<&String> = names.iter().filter(|n| !stats.contains(n)).collect();
    assert!(
        new.len() <= 4 && new.iter().all(|n| n.starts_with("registry_lb.legacy.")),
        "no stat per authority: {new:?}"
    );
}

/// The fake Envoy, recording which properties and request headers are read.
struct Reads {
    fake: FakeEnvoy,
    read: std::cell::RefCell<Vec<String>>,
}

impl crate::envoy::Envoy for Reads {
    fn now_us(&self) -> u64 {
        self.fake.now_us()
    }
    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        self.fake.shared_get(key)
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError> {
        self.fake.shared_set(key, value, cas)
    }
    fn define_metric(&self, kind: crate::envoy::MetricKind, name: &str) -> Result<u32, HostError> {
        self.fake.define_metric(kind, name)
    }
    fn metric_get(&self, id: u32) -> i64 {
        self.fake.metric_get(id)
    }
    fn metric_record(&self, id: u32, value: u64) {
        self.fake.metric_record(id, value)
    }
    fn metric_add(&self, id: u32, by: i64) {
        self.fake.metric_add(id, by)
    }
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        self.read.borrow_mut().push(name.to_string());
        self.fake.request_header(name)
    }
    fn set_request_header(&self, name: &str, value: Option<&[u8]>) -> Result<(), HostError> {
        self.fake.set_request_header(name, value)
    }
    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        self.fake.response_header(name)
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.read.borrow_mut().push(path.join("."));
        self.fake.property(path)
    }
    fn set_filter_state(&self, args: &[u8]) -> Result<(), HostError> {
        self.fake.set_filter_state(args)
    }
    fn local_reply_as(&self, status: u32, details: &str, body: &str, content_type: &str) {
        self.fake
            .local_reply_as(status, details, body, content_type)
    }
    fn set_response_header(&self, name: &str, value: Option<&[u8]>) -> Result<(), HostError> {
        self.fake.set_response_header(name, value)
    }
    fn set_property(&self, path: &[&str], value: &[u8]) -> Result<(), HostError> {
        crate::envoy::Envoy::set_property(&self.fake, path, value)
    }
    fn continue_request(&self) {
        self.fake.continue_request()
    }
    fn set_effective_context(&self, context: u32) -> Result<(), HostError> {
        self.fake.set_effective_context(context)
    }
    fn dispatch(&self, req: &crate::http_call::HttpRequest) -> Result<u32, HostError> {
        self.fake.dispatch(req)
    }
    fn call_answer(&self, h: usize, b: usize, max: usize) -> crate::envoy::CallAnswer {
        self.fake.call_answer(h, b, max)
    }
}

/// What one request on a route without metadata reads from Envoy, with `web` and
/// `legacy` spliced into the two services.
fn reads_of_one_request(web: &str, legacy: &str) -> Vec<String> {
    let host = Reads {
        fake: FakeEnvoy::new(),
        read: Default::default(),
    };
    let mut p = match Plugin::configure(host, two_services(web, legacy).as_bytes(), 7) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    for _ in 0..4 {
        p.host.fake.enter(0);
        p.on_tick();
        p.host.fake.advance_ms(50);
    }
    // The route's name is cached after its first request: read the second.
    let mut reads = Vec::new();
    for id in 1..=2 {
        p.host.fake.begin(id, &[(":authority", "example.com")]);
        p.host
            .fake
            .set_property(id, &["xds", "route_name"], b"allow_any");
        p.host
            .fake
            .set_property(id, &["xds", "cluster_name"], b"PassthroughCluster");
        p.host.read.borrow_mut().clear();
        assert_eq!(p.on_request_headers(id), (Action::Continue, None));
        reads = p.host.read.borrow().clone();
    }
    reads
}

#[wasm_bindgen_test(unsupported = test)]
fn the_cluster_and_authority_are_read_only_when_a_service_claims_them() {
    assert_eq!(reads_of_one_request("", ""), ["xds.route_name"]);
    assert_eq!(
        reads_of_one_request(r#""upstream_clusters": ["c"],"#, ""),
        ["xds.route_name", "xds.cluster_name"]
    );
    assert_eq!(
        reads_of_one_request("", r#""hosts": ["h"],"#),
        ["xds.route_name", ":authority"]
    );
    assert_eq!(
        reads_of_one_request(r#""upstream_clusters": ["c"],"#, r#""hosts": ["h"],"#),
        ["xds.route_name", "xds.cluster_name", ":authority"]
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn services_on_one_eureka_share_one_apps_call_per_interval() {
    let src = r#"{ "eureka": { "cluster": "eureka", "app": "APPNAME" } }"#;
    let svc = |name: &str, app: &str| {
        format!(
            r#"{{ "name": "{name}", "refresh_interval": "1s", "sources": [ {} ] }}"#,
            src.replace("APPNAME", app)
        )
    };
    let cfg = format!(
        r#"{{ "tick": "50ms", "services": [ {}, {}, {} ] }}"#,
        svc("web", "web"),
        svc("api", "api"),
        svc("pay", "pay")
    );
    let mut p = configure(FakeEnvoy::new(), &cfg, 7);
    let instance = |ip: &str| {
        format!(
            r#"{{"instanceId":"{ip}","ipAddr":"{ip}","status":"UP","port":{{"$":8080,"@enabled":"true"}}}}"#
        )
    };
    let body = format!(
        r#"{{"applications":{{"versions__delta":"1","apps__hashcode":"UP_3_","application":[
            {{"name":"WEB","instance":[{}]}},{{"name":"API","instance":[{}]}},{{"name":"PAY","instance":[{}]}}]}}}}"#,
        instance("10.0.0.1"),
        instance("10.0.0.2"),
        instance("10.0.0.3")
    );
    // 5 s of ticks, every call answered at once.
    let mut answered = 0;
    for _ in 0..100 {
        p.on_tick();
        let n = p.host.dispatched.borrow().len() as u32;
        while answered < n {
            answered += 1;
            *p.host.answer.borrow_mut() = Some(crate::envoy::CallAnswer {
                headers: vec![
                    (":status".into(), "200".into()),
                    ("content-type".into(), "application/json".into()),
                ],
                body: body.clone().into_bytes(),
            });
            p.on_call_answer(answered, 2, body.len());
        }
        p.host.advance_ms(50);
    }
    let calls = p.host.dispatched.borrow().clone();
    assert!(calls.iter().all(|c| c.path == "/eureka/apps"), "{calls:?}");
    // One call per interval for the three services (the first at once, then on the
    // grid): 5 or 6 in 5 s, not 15.
    assert!((5..=6).contains(&calls.len()), "{} calls", calls.len());
    for (i, (name, ip)) in [
        ("web", "10.0.0.1"),
        ("api", "10.0.0.2"),
        ("pay", "10.0.0.3"),
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(
            p.host.stat(&format!("{name}.snapshot_version")),
            1,
            "{name}"
        );
        assert_eq!(
            p.host.stat(&format!("{name}.instances_healthy")),
            1,
            "{name}"
        );
        assert_eq!(
            p.host.stat(&format!("{name}.refresh_unchanged")),
            calls.len() as i64 - 1,
            "{name}: every answer read for it"
        );
        let (bytes, _) = p.host.shared_get(&p.keys.snapshot[i]);
        let snap = crate::snapshot::Snapshot::decode(&bytes.unwrap()).unwrap();
        let addrs: Vec<String> = snap
            .entries
            .iter()
            .map(|e| e.instance.addr.to_string())
            .collect();
        assert_eq!(
            addrs,
            [format!("{ip}:8080")],
            "{name} got its own application"
        );
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn a_lone_eureka_service_reads_its_own_application() {
    let cfg = r#"{ "tick": "50ms", "services": [ { "name": "web",
        "sources": [ { "eureka": { "cluster": "eureka" } } ] } ] }"#;
    let mut p = configure(FakeEnvoy::new(), cfg, 7);
    for _ in 0..3 {
        p.on_tick();
        p.host.advance_ms(50);
    }
    let calls = p.host.dispatched.borrow().clone();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].path, "/eureka/apps/WEB");
}

/// Sets header `name` of request `id` to raw bytes (not necessarily UTF-8).
fn set_raw_header(p: &Plugin<FakeEnvoy>, id: u32, name: &str, value: &[u8]) {
    if let Some(r) = p.host.requests.borrow_mut().get_mut(&id) {
        r.headers.push((name.to_string(), value.to_vec()));
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn malformed_subset_headers_are_served_by_the_fallback_counted_and_logged_once_per_interval() {
    let mut p = plugin(r#""subset": { "header": "x-subset", "fallback": "any_endpoint" },"#);
    publish(&mut p);
    let bad: [&[u8]; 6] = [
        b"version=\xff\xfe",
        b"=\tinjected",
        b"a=1,a=2",
        b"k0,k1,k2,k3,k4,k5,k6,k7,k8,k9,k10,k11,k12,k13,k14,k15,k16",
        &[b'x'; 2000],
        b"\xc3",
    ];
    let mut id = 1;
    for round in 0..100 {
        for value in bad {
            begin(&p, id, "web", &[]);
            set_raw_header(&p, id, "x-subset", value);
            let (action, routed) = p.on_request_headers(id);
            assert_eq!(action, Action::Continue, "{value:?}");
            assert!(routed.is_some(), "{value:?}");
            assert_eq!(handed(&p, id).len(), 1, "{value:?}");
            id += 1;
            if round == 0 {
                // Each is counted as it comes.
                assert_eq!(p.host.stat("web.subset_header_invalid"), i64::from(id - 1));
            }
        }
        p.host.advance_ms(10);
    }
    assert_eq!(p.host.stat("web.subset_header_invalid"), 600);
    // 600 in one second: one line, naming the first (its bytes shown lossily).
    assert_eq!(
        p.requests.logged,
        ["registry-lb: service web: ignoring a malformed subset header `x-subset` (selector is not UTF-8): `version=\u{fffd}\u{fffd}`"]
    );
    // Well-formed selectors are neither counted nor logged.
    request(&mut p, id, &[("x-subset", "version=v1")]);
    request(&mut p, id + 1, &[("x-subset", "")]);
    assert_eq!(p.host.stat("web.subset_header_invalid"), 600);
    // Ten seconds after the first line, the next says how many were left out.
    p.host.advance_ms(crate::log_text::LOG_INTERVAL_MS);
    begin(&p, id + 2, "web", &[]);
    set_raw_header(&p, id + 2, "x-subset", b"=\tinjected");
    p.on_request_headers(id + 2);
    assert_eq!(p.requests.logged.len(), 2);
    assert_eq!(
        p.requests.logged[1],
        "registry-lb: service web: ignoring a malformed subset header `x-subset` (selector has an empty key): `=\tinjected` (599 more like it since the last one not logged)"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn a_route_naming_an_unknown_service_at_a_high_rate_logs_once_per_interval() {
    let mut p = plugin("");
    publish(&mut p);
    for id in 1..=5000 {
        begin(&p, id, "ghost", &[]);
        assert_eq!(p.on_request_headers(id), (Action::Pause, None));
        if id % 50 == 0 {
            p.host.advance_ms(1);
        }
    }
    assert_eq!(p.host.stat("unknown_service"), 5000);
    assert_eq!(
        p.requests.logged,
        ["registry-lb: a route names service `ghost`, which is not configured: answering 503"]
    );
    assert_eq!(
        p.host.request(5000).reply,
        local_503(
            "registry_lb_unknown_service",
            "registry-lb: service `ghost` is not configured\n"
        )
    );
    // No stat per name: a thousand names cost no stat.
    let names_before = p.host.stat_names().len();
    for id in 5001..=6000 {
        begin(&p, id, &format!("ghost-{id}"), &[]);
        p.on_request_headers(id);
    }
    assert_eq!(p.host.stat_names().len(), names_before);
    assert_eq!(p.requests.logged.len(), 1);
    p.host.advance_ms(crate::log_text::LOG_INTERVAL_MS);
    begin(&p, 6001, "ghost", &[]);
    p.on_request_headers(6001);
    assert_eq!(
        p.requests.logged[1],
        "registry-lb: a route names service `ghost`, which is not configured: answering 503 (5999 more like it since the last one not logged)"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn made_up_subset_selectors_cost_one_shared_fallback_not_a_ring_per_ranked_entry() {
    let mut p = plugin_with(
        r#""handoff": "override_host", "handoff_header": "x-lb-host","#,
        r#""policy": "ring_hash", "hash_on": { "header": "x-user" },
           "subset": { "header": "x-subset" }, "override_host_count": 3,"#,
    );
    publish(&mut p);
    let built = |p: &Plugin<FakeEnvoy>| {
        p.tables.services[0]
            .table
            .as_ref()
            .map_or(0, |t| t.groups_built.get())
    };
    let at_start = built(&p);
    let mut lists = std::collections::BTreeSet::new();
    for id in 1..=2000u32 {
        let sel = format!("version=made-up-{id}");
        let (_, routed) = request(&mut p, id, &[("x-user", "u1"), ("x-subset", &sel)]);
        assert_eq!(routed.map(|r| r.fallbacks.len()), Some(2), "{sel}");
        let r = p.host.request(id);
        let list = r.headers.iter().find(|(k, _)| k == "x-lb-host");
        lists.insert(list.map(|(_, v)| v.clone()).unwrap_or_default());
    }
    // The first 32 selectors get a group each in the table's subset cache; the
    // other 1,968 share one fallback group: not one ring per ranked entry each.
    assert_eq!(built(&p) - at_start, 33);
    // One hash key, one ranked list, whatever the made-up selector.
    assert_eq!(lists.len(), 1, "{lists:?}");
    assert_eq!(p.host.stat("web.subset_header_invalid"), 0);
}

/// Answers the last dispatched call with `status` and `body`.
fn answer_last(
    p: &mut Plugin<FakeEnvoy>,
    status: u16,
    body: &str,
) -> crate::http_call::HttpRequest {
    let (token, req) = {
        let d = p.host.dispatched.borrow();
        (d.len() as u32, d[d.len() - 1].clone())
    };
    *p.host.answer.borrow_mut() = Some(crate::envoy::CallAnswer {
        headers: vec![(":status".into(), status.to_string())],
        body: body.as_bytes().to_vec(),
    });
    p.on_call_answer(token, 1, body.len());
    req
}

#[wasm_bindgen_test(unsupported = test)]
fn the_leader_registers_the_local_instance_and_deregisters_when_done() {
    let register = r#""register": { "service": "web", "address": "10.0.0.9", "port": 80, "ttl": "3s",
        "health_check": { "cluster": "app", "path": "/healthz", "interval": "1s", "timeout": "500ms" },
        "targets": [ { "etcd": { "cluster": "etcd" } } ] },"#;
    let mut p = plugin_with(register, "");
    publish(&mut p);
    let check = answer_last(&mut p, 200, "");
    assert_eq!(
        (check.cluster.as_str(), check.path.as_str()),
        ("app", "/healthz")
    );
    assert_eq!(p.host.stat("register_app_healthy"), 1);
    p.on_tick();
    let grant = answer_last(&mut p, 200, r#"{"ID":"42","TTL":"3"}"#);
    assert_eq!(
        (grant.cluster.as_str(), grant.path.as_str()),
        ("etcd", "/v3/lease/grant")
    );
    p.on_tick();
    let put = answer_last(&mut p, 200, "{}");
    assert_eq!(put.path, "/v3/kv/put");
    assert_eq!(p.host.stat("register_registered"), 1);
    // A second root of the same Envoy, without the lease, registers nothing.
    let b_host = FakeEnvoy::new();
    *b_host.shared.borrow_mut() = p.host.shared.borrow().clone();
    b_host.now_us.set(p.host.now_us.get());
    let mut b = configure(b_host, &config(register, ""), 99);
    for _ in 0..3 {
        b.on_tick();
    }
    assert!(!b.is_leader());
    assert!(b.host.dispatched.borrow().is_empty());
    // Stopping: one revoke of the lease, and done once it is answered.
    let before = p.host.dispatched.borrow().len();
    assert!(!p.on_done(), "a deregistration is awaited");
    assert!(!p.leaving_done());
    assert_eq!(p.host.dispatched.borrow().len(), before + 1);
    let revoke = answer_last(&mut p, 200, "{}");
    assert_eq!(revoke.path, "/v3/lease/revoke");
    assert!(p.leaving_done());
    assert_eq!(p.host.stat("register_deregistered"), 1);
}

/// `status` on `/lb/status` and `explain` with their default (loopback) sources.
const OBSERVE: &str = r#""status": { "path": "/lb/status" }, "explain": {}, "#;

#[wasm_bindgen_test(unsupported = test)]
fn status_view_is_answered_to_loopback_only_and_never_routed() {
    let mut p = plugin_with(OBSERVE, r#""policy": "least_request","#);
    publish(&mut p);
    begin(&p, 1, "web", &[(":path", "/lb/status")]);
    p.host
        .set_property(1, &["source", "address"], b"127.0.0.1:40000");
    let (action, routed) = p.on_request_headers(1);
    assert_eq!(action, Action::Pause);
    assert!(routed.is_none());
    assert!(p.host.request(1).filter_state.is_empty(), "not routed");
    let (status, details, body) = p.host.request(1).reply.unwrap_or_default();
    assert_eq!((status, details.as_str()), (200, "registry_lb_status"));
    assert_eq!(
        p.host.request(1).reply_type.as_deref(),
        Some("application/json")
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let web = &v["services"][0];
    assert_eq!(web["name"], "web");
    assert_eq!(web["policy"], "least_request");
    assert_eq!(web["snapshot"]["version"], 1);
    let addrs: Vec<&str> = web["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["address"].as_str().unwrap())
        .collect();
    assert_eq!(addrs, HOSTS);
    for i in web["instances"].as_array().unwrap() {
        assert_eq!(i["registry_health"], "healthy");
        assert_eq!(i["active_health"], "off");
        assert_eq!(i["ejection"], "none");
        assert_eq!(i["routable"], true);
        assert_eq!(i["in_flight"], 0);
        assert_eq!(i["weight"]["registry"], 1);
    }
    assert_eq!(p.host.stat("status_served"), 1);

    // The text form, asked by query.
    begin(&p, 2, "web", &[(":path", "/lb/status?x=1&format=text")]);
    p.host
        .set_property(2, &["source", "address"], b"[::1]:40000");
    p.on_request_headers(2);
    let (status, _, text) = p.host.request(2).reply.unwrap_or_default();
    assert_eq!(status, 200);
    assert!(
        text.starts_with("service web  policy least_request"),
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.contains("10.0.0.")).count(),
        4,
        "{text}"
    );

    // Another source: 403, and nothing routed.
    begin(&p, 3, "web", &[(":path", "/lb/status")]);
    p.host
        .set_property(3, &["source", "address"], b"10.1.2.3:40000");
    let (action, routed) = p.on_request_headers(3);
    assert_eq!((action, routed.is_none()), (Action::Pause, true));
    assert_eq!(reply_of(&p, 3), reply(403, "registry_lb_status_forbidden"));
    assert_eq!(p.host.stat("status_forbidden"), 1);
    // Another path is routed as usual.
    begin(&p, 4, "web", &[(":path", "/lb/status/x")]);
    let (action, routed) = p.on_request_headers(4);
    assert_eq!((action, routed.is_some()), (Action::Continue, true));
}

#[wasm_bindgen_test(unsupported = test)]
fn status_view_shows_the_last_refresh_error_escaped() {
    let mut p = plugin_with(OBSERVE, "");
    publish(&mut p);
    let key = p.keys.error[0].clone();
    p.host
        .shared_set(&key, b"1000 source 0: bad \x1b[31m answer\n", None)
        .unwrap();
    begin(&p, 1, "web", &[(":path", "/lb/status?format=text")]);
    p.host
        .set_property(1, &["source", "address"], b"127.0.0.1:1");
    p.on_request_headers(1);
    let (_, _, text) = p.host.request(1).reply.unwrap_or_default();
    assert!(
        text.contains("last refresh error") && text.contains(r"bad \u{1b}[31m answer\n"),
        "{text}"
    );
    assert!(!text.contains('\x1b'));
    begin(&p, 2, "web", &[(":path", "/lb/status")]);
    p.host
        .set_property(2, &["source", "address"], b"127.0.0.1:1");
    p.on_request_headers(2);
    let (_, _, body) = p.host.request(2).reply.unwrap_or_default();
    assert!(
        !body.contains('\x1b') && body.contains(r"\u001b[31m"),
        "{body}"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn decision_header_only_for_allowed_sources_that_ask() {
    let mut p = plugin_with(OBSERVE, r#""policy": "least_request", "choice_count": 3,"#);
    publish(&mut p);
    // Asked from loopback: the header names the chosen instance and the candidates.
    begin(&p, 1, "web", &[("x-registry-lb-explain", "1")]);
    p.host
        .set_property(1, &["source", "address"], b"127.0.0.1:5");
    let (_, routed) = p.on_request_headers(1);
    assert!(
        p.host
            .request(1)
            .headers
            .iter()
            .all(|(k, _)| k != "x-registry-lb-explain"),
        "the ask is not forwarded"
    );
    p.on_response_headers(1, routed.as_ref());
    let h = p.host.response_header("x-registry-lb-decision").unwrap();
    let h = String::from_utf8(h).unwrap();
    let chosen = handed(&p, 1)[0].clone();
    assert!(
        h.starts_with(&format!(
            "policy=least_request; chosen={chosen}; cost=in_flight; candidates="
        )),
        "{h}"
    );
    assert!(h.contains(&format!("{chosen}=0")), "{h}");
    assert_eq!(p.host.stat("explain_served"), 1);
    // Asked from elsewhere: routed, no header, and an upstream's is removed.
    begin(&p, 2, "web", &[("x-registry-lb-explain", "1")]);
    p.host
        .set_property(2, &["source", "address"], b"192.0.2.1:5");
    let (_, routed) = p.on_request_headers(2);
    assert!(routed.is_some());
    p.host
        .set_response_header("x-registry-lb-decision", Some(b"forged"))
        .unwrap();
    p.on_response_headers(2, routed.as_ref());
    assert!(p.host.response_header("x-registry-lb-decision").is_none());
    assert_eq!(p.host.stat("explain_refused"), 1);
    // Not asked: nothing.
    begin(&p, 3, "web", &[]);
    p.host
        .set_property(3, &["source", "address"], b"127.0.0.1:5");
    let (_, routed) = p.on_request_headers(3);
    p.on_response_headers(3, routed.as_ref());
    assert!(p.host.response_header("x-registry-lb-decision").is_none());
}

#[wasm_bindgen_test(unsupported = test)]
fn decision_header_explains_every_policy() {
    const P2C: &str = r#""peak_ewma": { "choices": 2, "rule": "cost" },"#;
    for (policy, extra, cost, want) in [
        ("round_robin", "", "weight", 1),
        ("random", "", "weight", 1),
        ("least_request", "", "in_flight", 2),
        ("peak_ewma", "", "hot_cold(latency_ns/in_flight)", 3),
        ("peak_ewma", P2C, "latency_ns_x_pending_per_weight", 2),
        ("ring_hash", "", "weight", 1),
        ("maglev", "", "weight", 1),
    ] {
        let mut p = plugin_with(OBSERVE, &format!(r#""policy": "{policy}", {extra}"#));
        publish(&mut p);
        begin(&p, 1, "web", &[("x-registry-lb-explain", "1")]);
        p.host
            .set_property(1, &["source", "address"], b"127.0.0.1:5");
        let (_, routed) = p.on_request_headers(1);
        let h = routed.and_then(|r| r.decision).unwrap_or_default();
        let chosen = handed(&p, 1)[0].clone();
        assert!(
            h.starts_with(&format!(
                "policy={policy}; chosen={chosen}; cost={cost}; candidates="
            )),
            "{policy}: {h}"
        );
        let candidates = h
            .split("candidates=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap();
        let n = candidates.split(',').count();
        assert_eq!(n, want, "{policy}: {h}");
        if cost.starts_with("hot_cold") {
            // Before any answer every candidate is new, none in flight, all in the band.
            assert!(
                candidates.split(',').all(|c| c.ends_with("=new/0:band")),
                "{h}"
            );
        }
        assert!(candidates.contains(&chosen), "{policy}: {h}");
        if policy == "ring_hash" || policy == "maglev" {
            assert!(h.contains("; hash="), "{policy}: {h}");
        }
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn access_log_property_names_the_chosen_instance() {
    let mut p = plugin_with(r#""access_log_instance": true,"#, "");
    publish(&mut p);
    for id in 1..=4 {
        request(&mut p, id, &[]);
        let set = p.host.request(id).set_properties;
        assert_eq!(
            set,
            vec![(
                "registry_lb_instance".to_string(),
                handed(&p, id)[0].as_bytes().to_vec()
            )]
        );
    }
    let mut q = plugin("");
    publish(&mut q);
    request(&mut q, 1, &[]);
    assert!(
        q.host.request(1).set_properties.is_empty(),
        "off by default"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn shadow_policy_is_counted_and_never_changes_routing() {
    // The same seed with and without a shadow: the same instances, in order.
    let routed_by = |service: &str| -> (Vec<String>, Plugin<FakeEnvoy>) {
        let mut p = plugin(service);
        publish(&mut p);
        let mut out = Vec::new();
        for id in 1..=200 {
            let (_, routed) = request(&mut p, id, &[]);
            out.push(handed(&p, id)[0].clone());
            p.host.set_property(
                id,
                &["response", "backend_latency"],
                &(1_000_000u64 * u64::from(id % 4 + 1)).to_le_bytes(),
            );
            end(&mut p, id, routed, 200, 0);
        }
        p.host.enter(0);
        p.on_tick();
        (out, p)
    };
    let (plain, _) = routed_by(r#""policy": "random","#);
    let (shadowed, p) = routed_by(r#""policy": "random", "shadow_policy": "round_robin","#);
    assert_eq!(plain, shadowed, "the shadow changed routing");
    assert_eq!(p.host.stat("web.shadow_picks"), 200);
    let d = p.host.stat("web.shadow_disagreements");
    // Random against round robin over 4 instances: they agree about a quarter of the time.
    assert!((100..=190).contains(&d), "disagreements {d}");
    let compared = p.host.stat("web.shadow_compared");
    assert!(compared > 0 && compared <= d, "compared {compared} of {d}");
    let (lower, higher) = (
        p.host.stat("web.shadow_latency_lower_us"),
        p.host.stat("web.shadow_latency_higher_us"),
    );
    assert!(lower > 0 && higher > 0, "lower {lower} higher {higher}");
}

#[wasm_bindgen_test(unsupported = test)]
fn a_held_request_that_asked_gets_its_decision_when_routed_from_the_timer() {
    let mut p = plugin_with(OBSERVE, "");
    begin(&p, 1, "web", &[("x-registry-lb-explain", "1")]);
    p.host
        .set_property(1, &["source", "address"], b"127.0.0.1:5");
    assert_eq!(p.on_request_headers(1), (Action::Pause, None));
    publish(&mut p);
    assert_eq!(p.host.request(1).continued, 1);
    p.host.enter(1);
    p.on_response_headers(1, None);
    let h = String::from_utf8(p.host.response_header("x-registry-lb-decision").unwrap()).unwrap();
    let chosen = handed(&p, 1)[0].clone();
    assert!(
        h.starts_with(&format!("policy=round_robin; chosen={chosen}; ")),
        "{h}"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn peak_ewma_hot_cold_keeps_a_slow_instance_out_and_counts_in_flight_requests() {
    let mut p = plugin(r#""policy": "peak_ewma","#);
    publish(&mut p);
    // Every instance answers once: one of them in 50 ms, the others in 1 ms.
    let slow = p.host_of(0, 0).unwrap_or_default();
    let ms_of = |p: &Plugin<FakeEnvoy>, id: u32| -> u64 {
        if handed(p, id) == [slow.clone()] {
            50
        } else {
            1
        }
    };
    let mut got = std::collections::HashMap::<String, u32>::new();
    let mut open: std::collections::VecDeque<(u32, Option<Routed>, u64)> = Default::default();
    for (id, step) in (1..).zip(0..4_000u64) {
        // One request per 0.25 ms (4 per ms), each answered after its instance's time.
        if step % 4 == 0 {
            p.host.advance_ms(1);
        }
        let (_, routed) = request(&mut p, id, &[]);
        let h = handed(&p, id).first().cloned().unwrap_or_default();
        if step >= 400 {
            *got.entry(h).or_insert(0) += 1;
        }
        let due = p.host.now_ms() + ms_of(&p, id);
        open.push_back((id, routed, due));
        let now = p.host.now_ms();
        let mut keep = std::collections::VecDeque::new();
        while let Some((rid, r, due)) = open.pop_front() {
            if due <= now {
                let ns = (ms_of(&p, rid) * 1_000_000).to_le_bytes();
                p.host
                    .set_property(rid, &["response", "backend_latency"], &ns);
                end(&mut p, rid, r, 200, 0);
            } else {
                keep.push_back((rid, r, due));
            }
        }
        open = keep;
    }
    let total: u32 = got.values().sum();
    let to_slow = got.get(&slow).copied().unwrap_or(0);
    // Without the shared in-flight counts and the latency band it would get a quarter
    // at first and ~1/16 (both of a pair) with the old p2c cost once loaded.
    assert!(
        to_slow * 100 < total,
        "{to_slow} of {total} to the 50 ms instance: {got:?}"
    );
    // The in-flight gauges are kept for peak_ewma (its hot-cold rule reads them).
    let active: i64 = (0..4)
        .map(|s| p.host.stat(&format!("web.slot_{s}.rq_active")))
        .sum();
    assert_eq!(active, open.len() as i64);
    assert!(active > 0);
    // And the service's, the hot threshold's reference.
    assert_eq!(p.host.stat("web.rq_active"), active);
}

#[wasm_bindgen_test(unsupported = test)]
fn the_explain_ask_never_reaches_the_upstream_of_a_request_no_service_routes() {
    let mut p = plugin_with(OBSERVE, "");
    publish(&mut p);
    // A route with no service: not routed by the filter, the ask still removed.
    p.host.begin(
        2,
        &[
            (":authority", "example.test"),
            ("x-registry-lb-explain", "1"),
        ],
    );
    p.host.set_property(2, &["xds", "route_name"], b"other");
    let (action, routed) = p.on_request_headers(2);
    assert_eq!((action, routed.is_none()), (Action::Continue, true));
    let r = p.host.request(2);
    assert!(
        !r.headers.iter().any(|(k, _)| k == "x-registry-lb-explain"),
        "{:?}",
        r.headers
    );
    assert_eq!(
        r.headers
            .iter()
            .find(|(k, _)| k == ":authority")
            .map(|(_, v)| v.as_slice()),
        Some(&b"example.test"[..]),
        "other headers untouched"
    );
}
