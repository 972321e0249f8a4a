//! Consul's `/v1/health/service/<service>` answer, read into instances in one pass.
//!
//! Address is `Service.Address`, or `Node.Address` when empty. Any critical check
//! makes the instance unhealthy, a maintenance check (`_service_maintenance:*`,
//! `_node_maintenance`) makes it draining, and a warning check selects
//! `Service.Weights.Warning` in place of `Weights.Passing`; a weight of 0 means "no
//! traffic": such entries are dropped. Zone: `Service.Meta.zone`, else
//! `Node.Meta.zone`. Metadata: `Service.Meta` plus one `tag:<tag>` key per tag.

use crate::instance::{self, Instance, Rejected, State};
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Reads a `/v1/health/service` body: the instances, and why entries were skipped.
pub fn health_list(text: &str) -> Result<(Vec<Instance>, Rejected), serde_json::Error> {
    let a: Answer = serde_json::from_str(text)?;
    Ok((a.instances, a.rejected))
}

// The answer is read in one pass: each entry becomes an `Instance` as soon as it is
// read (no list of entries in between), checks fold into a state as they are read,
// strings are borrowed from the body where they have no escapes (`Cow`), and of the
// node's metadata only `zone` is kept (`cargo bench --bench refresh`).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry<'a> {
    #[serde(borrow)]
    node: Node<'a>,
    #[serde(borrow)]
    service: Service<'a>,
    #[serde(default)]
    checks: Checks,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Node<'a> {
    #[serde(default, borrow)]
    address: Cow<'a, str>,
    #[serde(default, borrow)]
    meta: Option<NodeMeta<'a>>,
}

#[derive(Deserialize)]
struct NodeMeta<'a> {
    #[serde(default, borrow)]
    zone: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Service<'a> {
    #[serde(default, rename = "ID", borrow)]
    id: Cow<'a, str>,
    #[serde(default, borrow)]
    address: Cow<'a, str>,
    #[serde(default)]
    port: i64,
    #[serde(default, borrow)]
    tags: Option<Vec<Cow<'a, str>>>,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
    #[serde(default)]
    weights: Option<Weights>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Weights {
    #[serde(default = "one")]
    passing: i64,
    #[serde(default = "one")]
    warning: i64,
}

fn one() -> i64 {
    1
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Check<'a> {
    #[serde(default, rename = "CheckID", borrow)]
    check_id: Cow<'a, str>,
    #[serde(default, borrow)]
    status: Cow<'a, str>,
}

/// An entry's checks, folded as they are read: any critical check makes the
/// instance unhealthy, a critical maintenance check draining; a warning selects
/// `Weights.Warning`.
#[derive(Default)]
struct Checks {
    state: Option<State>,
    warning: bool,
}

impl<'de> Deserialize<'de> for Checks {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Checks, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Checks;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of checks")
            }
            fn visit_unit<E>(self) -> Result<Checks, E> {
                Ok(Checks::default())
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Checks, A::Error> {
                let mut out = Checks::default();
                while let Some(c) = seq.next_element::<Check<'_>>()? {
                    let maintenance = c.check_id == "_node_maintenance"
                        || c.check_id.starts_with("_service_maintenance:");
                    match c.status.as_ref() {
                        "critical" | "maintenance" if maintenance => {
                            out.state = Some(State::Draining)
                        }
                        "critical" if out.state.is_none() => out.state = Some(State::Unhealthy),
                        "warning" => out.warning = true,
                        _ => {}
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }
}

/// The whole answer: instances built entry by entry, and the entries skipped.
struct Answer {
    instances: Vec<Instance>,
    rejected: Rejected,
}

impl<'de> Deserialize<'de> for Answer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Answer, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Answer;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of health entries")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Answer, A::Error> {
                let mut out = Answer {
                    instances: Vec::with_capacity(seq.size_hint().unwrap_or(0)),
                    rejected: Rejected::default(),
                };
                while let Some(e) = seq.next_element::<Entry<'de>>()? {
                    match instance_of(e) {
                        Ok(Some(i)) => out.instances.push(i),
                        Ok(None) => {}
                        Err(why) => out.rejected.push(why),
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V)
    }
}

/// One entry as an instance; `None` for a weight of 0 (no traffic).
fn instance_of(e: Entry<'_>) -> Result<Option<Instance>, String> {
    let ip = if e.service.address.is_empty() {
        &e.node.address
    } else {
        &e.service.address
    };
    let addr = instance::socket_addr(ip, e.service.port).map_err(|err| {
        format!(
            "service id `{}`: {err}",
            instance::truncate(&e.service.id, 64)
        )
    })?;
    let w = e
        .service
        .weights
        .as_ref()
        .map(|w| {
            if e.checks.warning {
                w.warning
            } else {
                w.passing
            }
        })
        .unwrap_or(1);
    if w <= 0 {
        return Ok(None);
    }
    let mut inst = Instance::new(addr, u32::try_from(w).unwrap_or(u32::MAX));
    inst.state = e.checks.state.unwrap_or(State::Healthy);
    let smeta = e.service.meta.unwrap_or_default();
    inst.zone = smeta
        .get("zone")
        .cloned()
        .or_else(|| e.node.meta.and_then(|m| m.zone).map(Cow::into_owned))
        .unwrap_or_default();
    let tags = e.service.tags.unwrap_or_default();
    let mut meta: Vec<(String, String)> = Vec::with_capacity(smeta.len() + tags.len());
    meta.extend(smeta);
    for t in tags {
        meta.push((format!("tag:{t}"), String::new()));
    }
    // Sorted by key; a repeated tag is one key (a repeated meta key keeps its last
    // value, as the map already did).
    meta.sort();
    meta.dedup();
    inst.metadata = meta;
    Ok(Some(inst))
}
