//! The bodies of the fuzz targets in `fuzz/` (libFuzzer through `cargo fuzz`), one per
//! parser of outside input, kept here so the same code runs under the fuzzer and in
//! ordinary tests: `tests/fuzz_corpus.rs` replays the saved corpus through [`run`].
//!
//! Each body returns `Err` when a property fails; the fuzz target turns that into a
//! crash. Besides "no panic" the bodies check:
//! - registry answers: what `Source::on_response` returns, merged and made into a
//!   snapshot as the poller does, encodes and decodes back to the same instances;
//!   the same answer read twice is `Unchanged` or the same list;
//! - snapshots (written by another VM, so untrusted): whatever decodes re-encodes to
//!   the very same bytes;
//! - the small parsers: their documented output ranges.
//!
//! [`alloc`] is a counting allocator the fuzz targets and the corpus replay install,
//! to hold every input to [`alloc_bound`].
//!
//! Reference: the Rust Fuzz Book (cargo-fuzz), libFuzzer's documentation. Left out:
//! the host layer (`src/host/`), which parses nothing itself.

use crate::config::PluginConfig;
use crate::hash_key::{self, HashOn, RequestParts};
use crate::http_call::HttpResponse;
use crate::instance::Instance;
use crate::registry::{consul, etcd, eureka, kubernetes, nacos, Source, Step};
use crate::snapshot::{self, Snapshot};

/// A target's body: `Err` names the property the input broke.
pub type Body = fn(&[u8]) -> Result<(), String>;

/// Every fuzz target: its name (the `fuzz/fuzz_targets/<name>.rs` file and the
/// `fuzz/corpus/<name>/` directory) and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("config", config),
    ("duration", duration),
    ("consul", consul_answer),
    ("etcd", etcd_answer),
    ("etcd_value", etcd_value),
    ("nacos_v1", nacos_v1),
    ("nacos_v2", nacos_v2),
    ("eureka", eureka_answer),
    ("kubernetes", kubernetes_answer),
    ("snapshot", snapshot_decode),
    ("load_report", load_report),
    ("hash_key", hash_key),
    ("subset", subset),
];

/// Runs target `name` on `data`; `None` for an unknown name.
pub fn run(name: &str, data: &[u8]) -> Option<Result<(), String>> {
    TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, body)| body(data))
}

/// Heap a target may hold at its peak for an input of `len` bytes: see
/// `docs/fuzzing.md` ("Allocation bound") for why this multiple.
pub fn alloc_bound(len: usize) -> usize {
    ALLOC_FIXED + ALLOC_PER_BYTE * len
}

/// Per input byte: a registry answer becomes `serde_json::Value`s (32 bytes per
/// value, a value can be 2 bytes of JSON) and instances (~100 bytes, from ~20 bytes
/// of JSON at the least).
pub const ALLOC_PER_BYTE: usize = 64;
/// Whatever an empty input costs (configuration of the source, error texts).
pub const ALLOC_FIXED: usize = 64 * 1024;

fn err(what: impl std::fmt::Display) -> String {
    what.to_string()
}

/// The plugin configuration as Envoy hands it over; a valid one also builds each
/// service's poller (its sources, static lists included).
pub fn config(data: &[u8]) -> Result<(), String> {
    match PluginConfig::parse(data) {
        Ok(cfg) => {
            for svc in &cfg.services {
                let _ = crate::poller::ServicePoller::new(svc);
                if cfg.service(&svc.name).map(|(_, s)| s.name.as_str()) != Some(&svc.name) {
                    return Err(format!("service `{}` not found by its name", svc.name));
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    Ok(())
}

/// A duration from the configuration; what parses prints back to the same value.
pub fn duration(data: &[u8]) -> Result<(), String> {
    let Ok(text) = std::str::from_utf8(data) else {
        return Ok(());
    };
    if let Ok(ms) = crate::duration::parse(text) {
        if ms.0 > 1_000_000_000_000_000 {
            return Err(format!("`{text}` parsed to {} ms, over 1e15", ms.0));
        }
        let again = crate::duration::parse(&ms.to_string()).map_err(err)?;
        if again != ms {
            return Err(format!("`{text}` -> {ms} -> {again:?}"));
        }
    }
    Ok(())
}

/// One registry answer through its source, as the poller reads it. The same answer
/// is then read a second time.
fn registry_answer(
    source_json: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<(), String> {
    let cfg = PluginConfig::parse(
        format!(r#"{{"services":[{{"name":"web","sources":[{source_json}]}}]}}"#).as_bytes(),
    )
    .map_err(err)?;
    let svc = cfg.services.first().ok_or("no service")?;
    let to = svc.for_registry();
    let mut source = match svc.sources.first() {
        Some(crate::config::SourceConfig::Consul(c)) => Source::Consul(consul::Consul::new(to, c)),
        Some(crate::config::SourceConfig::Etcd(c)) => Source::Etcd(etcd::Etcd::new(to, c)),
        Some(crate::config::SourceConfig::Nacos(c)) => Source::Nacos(nacos::Nacos::new(to, c)),
        Some(crate::config::SourceConfig::Eureka(c)) => Source::Eureka(eureka::Eureka::new(to, c)),
        Some(crate::config::SourceConfig::Kubernetes(c)) => {
            Source::Kubernetes(kubernetes::Kubernetes::new(to, c))
        }
        _ => return Err("not a registry source".into()),
    };
    let resp = HttpResponse {
        status: 200,
        headers,
        body,
    };
    let _ = source.request(0);
    let first = match source.on_response(&resp, svc.max_response_bytes) {
        Ok(Step::Instances { instances, .. }) => instances,
        Ok(_) => return Ok(()),
        Err(e) => {
            let _ = e.to_string();
            return Ok(());
        }
    };
    check_snapshot_round_trip(&first)?;
    // The token carries over to another poller, and the same answer read again is
    // not a different list.
    let token = source.token();
    source.restore_token(&token);
    let _ = source.request(0);
    let mut again = source.on_response(&resp, svc.max_response_bytes);
    // etcd's change check: the whole range given to a check is a change (keys listed
    // as modified), and the full read that follows at once must then agree.
    if matches!(again, Ok(Step::Again("changed"))) {
        let _ = source.request(0);
        again = source.on_response(&resp, svc.max_response_bytes);
    }
    match again {
        Ok(Step::Unchanged) => Ok(()),
        Ok(Step::Instances { instances, .. }) if instances == first => Ok(()),
        other => Err(format!("the same answer read twice gave {other:?}")),
    }
}

/// Instances merged by address (the first wins) as the poller does, made into a
/// snapshot, encoded and decoded: the same instances come back.
pub fn check_snapshot_round_trip(instances: &[Instance]) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    let merged: Vec<(Instance, u8)> = instances
        .iter()
        .filter(|i| seen.insert(i.addr))
        .map(|i| (i.clone(), 0))
        .collect();
    let snap = Snapshot {
        version: 1,
        hash: snapshot::content_hash(merged.iter().map(|(i, _)| i)),
        published_ms: 1,
        tokens: vec!["t".into()],
        answered: vec![true],
        entries: snapshot::assign_slots(&[], merged.clone()),
    };
    let bytes = snap.encode();
    let back = Snapshot::decode(&bytes).map_err(err)?;
    let got: Vec<&Instance> = back.entries.iter().map(|e| &e.instance).collect();
    let want: Vec<&Instance> = merged.iter().map(|(i, _)| i).collect();
    if got != want {
        return Err(format!(
            "snapshot round trip changed the instances: {want:?} -> {got:?}"
        ));
    }
    if snapshot::content_hash(got.into_iter()) != snap.hash {
        return Err("decoded instances hash differently".into());
    }
    Ok(())
}

/// Consul `/v1/health/service` (the wire crate's `consul::health_list`, reached
/// through `registry::consul::parse`), with an `X-Consul-Index`.
pub fn consul_answer(data: &[u8]) -> Result<(), String> {
    let h = [
        ("x-consul-index".to_string(), "7".to_string()),
        ("server".to_string(), "consul".to_string()),
    ];
    registry_answer(r#"{"consul":{"cluster":"consul"}}"#, &h, data)
}

/// An etcd `/v3/kv/range` answer (its `kvs` values are base64 JSON).
pub fn etcd_answer(data: &[u8]) -> Result<(), String> {
    registry_answer(r#"{"etcd":{"cluster":"etcd"}}"#, &[], data)
}

/// One etcd value, as `etcd::parse_value` reads it after base64.
pub fn etcd_value(data: &[u8]) -> Result<(), String> {
    match etcd::parse_value(data) {
        Ok(Some(i)) => check_snapshot_round_trip(&[i]),
        Ok(None) | Err(_) => Ok(()),
    }
}

/// Nacos `/nacos/v1/ns/instance/list`.
pub fn nacos_v1(data: &[u8]) -> Result<(), String> {
    registry_answer(r#"{"nacos":{"cluster":"nacos"}}"#, &[], data)
}

/// Nacos `/nacos/v2/ns/instance/list` (`{code, message, data}`).
pub fn nacos_v2(data: &[u8]) -> Result<(), String> {
    registry_answer(r#"{"nacos":{"cluster":"nacos","api":"v2"}}"#, &[], data)
}

/// Eureka `/eureka/apps/<APP>`, or a whole-registry answer (older shapes: a single
/// instance object in place of a list, `"$"` values as strings).
pub fn eureka_answer(data: &[u8]) -> Result<(), String> {
    registry_answer(r#"{"eureka":{"cluster":"eureka","app":"web"}}"#, &[], data)
}

/// A Kubernetes `EndpointSliceList`.
pub fn kubernetes_answer(data: &[u8]) -> Result<(), String> {
    registry_answer(r#"{"kubernetes":{"cluster":"k8s"}}"#, &[], data)
}

/// A snapshot from shared data. Whatever decodes re-encodes to the same bytes, and
/// its header says the same version.
pub fn snapshot_decode(data: &[u8]) -> Result<(), String> {
    let peeked = Snapshot::peek_version(data);
    let Ok(s) = Snapshot::decode(data) else {
        return Ok(());
    };
    if peeked != Some(s.version) {
        return Err(format!("peek_version {peeked:?}, decoded {}", s.version));
    }
    if s.encode() != data {
        return Err("a decoded snapshot re-encodes to other bytes".into());
    }
    Ok(())
}

/// A load report header: the ORCA `endpoint-load-metrics` form, then the plain one.
pub fn load_report(data: &[u8]) -> Result<(), String> {
    let Ok(text) = std::str::from_utf8(data) else {
        return Ok(());
    };
    let ok = |v: f64| v.is_finite() && v >= 0.0;
    if let Ok(r) = crate::load_report::parse_orca(text) {
        let all = [
            r.cpu_utilization,
            r.mem_utilization,
            r.application_utilization,
            r.rps_fractional,
            r.eps,
        ];
        if !all.iter().flatten().all(|v| ok(*v)) || !r.named_metrics.iter().all(|(_, v)| ok(*v)) {
            return Err(format!("{r:?} has a value that is not finite and >= 0"));
        }
        if let Some(u) = r.utilization() {
            if !ok(u) {
                return Err(format!("utilization {u} of {r:?}"));
            }
        }
    }
    if let Ok(u) = crate::load_report::parse_utilization(text) {
        if !ok(u) {
            return Err(format!("plain utilization {u} from `{text}`"));
        }
    }
    Ok(())
}

/// A request's hash key: the first byte picks where it comes from, the rest is split
/// at NUL into the cookie (or header) name, the header's value, the `Cookie`
/// header, the source address and the path.
pub fn hash_key(data: &[u8]) -> Result<(), String> {
    let (sel, rest) = data.split_first().unwrap_or((&0, &[]));
    let mut parts = rest.split(|b| *b == 0);
    let name = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let header = parts.next();
    let cookie = parts.next().and_then(|b| std::str::from_utf8(b).ok());
    let source = parts.next().and_then(|b| std::str::from_utf8(b).ok());
    let path = parts.next().and_then(|b| std::str::from_utf8(b).ok());
    let on = match sel % 5 {
        0 => HashOn::Header(name.clone()),
        1 => HashOn::Cookie(name.clone()),
        2 => HashOn::SourceIp,
        3 => HashOn::Path { strip_query: true },
        _ => HashOn::Path { strip_query: false },
    };
    let req = RequestParts {
        header,
        cookie_header: cookie,
        source_address: source,
        path,
    };
    let k = hash_key::key(&on, &req);
    if hash_key::key(&on, &req) != k {
        return Err("the same request gave two keys".into());
    }
    if let Some(c) = cookie {
        if let Some(v) = hash_key::cookie_value(c, &name) {
            // The value is a non-empty piece of the header, not a copy or a guess.
            let inside = c.as_ptr() as usize <= v.as_ptr() as usize
                && v.as_ptr() as usize + v.len() <= c.as_ptr() as usize + c.len();
            if v.is_empty() || !inside {
                return Err(format!("cookie value {v:?} is not a piece of {c:?}"));
            }
        }
    }
    Ok(())
}

/// A subset selector header: what parses is sorted by key, has no empty or repeated
/// key, and matches metadata made of its own pairs.
pub fn subset(data: &[u8]) -> Result<(), String> {
    let Ok(text) = std::str::from_utf8(data) else {
        return Ok(());
    };
    if let Ok(pairs) = crate::subset::parse_selector(text) {
        let sorted_unique = pairs.windows(2).all(|w| w[0].0 < w[1].0);
        if !sorted_unique || pairs.iter().any(|(k, _)| k.is_empty()) {
            return Err(format!("selector `{text}` parsed to {pairs:?}"));
        }
        if !crate::subset::matches(&pairs, &pairs) {
            return Err(format!("{pairs:?} does not match itself"));
        }
    }
    Ok(())
}

/// A counting global allocator: live and peak heap bytes of the current thread.
/// Install it with `#[global_allocator] static A: Counting = Counting;`.
pub mod alloc {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static LIVE: Cell<usize> = const { Cell::new(0) };
        static PEAK: Cell<usize> = const { Cell::new(0) };
    }

    pub struct Counting;

    fn grow(n: usize) {
        let _ = LIVE.try_with(|l| {
            let v = l.get().saturating_add(n);
            l.set(v);
            let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
        });
    }

    fn shrink(n: usize) {
        let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(n)));
    }

    // SAFETY: every call is forwarded to the system allocator unchanged; only the
    // counters are added.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            grow(layout.size());
            System.alloc(layout)
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            grow(layout.size());
            System.alloc_zeroed(layout)
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            shrink(layout.size());
            System.dealloc(ptr, layout)
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            grow(new_size);
            shrink(layout.size());
            System.realloc(ptr, layout, new_size)
        }
    }

    /// Runs `f` and returns its result and the most heap it held above what was live
    /// before (bytes, this thread).
    pub fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
        let base = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(base));
        let out = f();
        let peak = PEAK.with(Cell::get);
        (out, peak.saturating_sub(base))
    }
}

/// Runs target `name` on `data` under [`alloc::peak_of`] and checks
/// [`alloc_bound`] (only meaningful where [`alloc::Counting`] is the global allocator).
pub fn run_bounded(name: &str, data: &[u8]) -> Result<(), String> {
    let body = TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, body)| *body)
        .ok_or_else(|| format!("no fuzz target `{name}`"))?;
    bounded(name, body, data)
}

/// Runs `body` on `data` under [`alloc::peak_of`] and checks [`alloc_bound`].
pub fn bounded(name: &str, body: Body, data: &[u8]) -> Result<(), String> {
    let (r, peak) = alloc::peak_of(|| body(data));
    r?;
    if peak > alloc_bound(data.len()) {
        return Err(format!(
            "{name}: {} input bytes held {peak} heap bytes at the peak, over the bound of {}",
            data.len(),
            alloc_bound(data.len())
        ));
    }
    Ok(())
}
