//! `static`: a fixed list of instances from the configuration. No calls: the list
//! is published once, as it is.

use crate::instance::{self, Instance, State};
use crate::validate::{field_err, ConfigError};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticConfig {
    pub instances: Vec<StaticInstance>,
}

/// One instance; its address is checked as it is read.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(try_from = "StaticInstanceSpec")]
pub struct StaticInstance {
    pub addr: SocketAddr,
    pub weight: u32,
    pub zone: String,
    pub metadata: BTreeMap<String, String>,
}

/// An instance as written: an IP literal `address` and a `port`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StaticInstanceSpec {
    address: String,
    port: i64,
    #[serde(default = "default_weight")]
    weight: u32,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

impl TryFrom<StaticInstanceSpec> for StaticInstance {
    type Error = instance::AddrError;
    fn try_from(spec: StaticInstanceSpec) -> Result<StaticInstance, Self::Error> {
        Ok(StaticInstance {
            addr: instance::socket_addr(&spec.address, spec.port)?,
            weight: spec.weight,
            zone: spec.zone,
            metadata: spec.metadata,
        })
    }
}

fn default_weight() -> u32 {
    1
}

impl StaticConfig {
    /// The instances, all healthy.
    pub fn instances(&self) -> Vec<Instance> {
        self.instances
            .iter()
            .map(|s| {
                let mut i = Instance::new(s.addr, s.weight);
                i.state = State::Healthy;
                i.zone = s.zone.clone();
                i.metadata = s
                    .metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                i
            })
            .collect()
    }

    /// Checks what the types cannot; `at` names this source in errors
    /// (`services[0].sources[1].static`).
    pub fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if self.instances.is_empty() {
            return field_err(at, "instances", "at least one instance is required");
        }
        for (k, inst) in self.instances.iter().enumerate() {
            if inst.weight == 0 {
                return field_err(at, &format!("instances[{k}].weight"), "must be at least 1");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SourceConfig;
    use crate::registry::test_util::one_source;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn instances_carry_weight_zone_and_metadata() {
        let c = one_source(
            r#"{"static":{"instances":[{"address":"10.0.0.1","port":80},
                {"address":"::1","port":8080,"weight":7,"zone":"b","metadata":{"version":"v2"}}]}}"#,
        )
        .unwrap();
        let SourceConfig::Static(st) = &c.services[0].sources[0] else {
            panic!()
        };
        let list = st.instances();
        assert_eq!(list.len(), 2);
        assert_eq!(
            (
                list[0].addr.to_string(),
                list[0].weight,
                list[0].zone.as_str()
            ),
            ("10.0.0.1:80".to_string(), 1, "")
        );
        assert_eq!(
            (
                list[1].addr.to_string(),
                list[1].weight,
                list[1].zone.as_str()
            ),
            ("[::1]:8080".to_string(), 7, "b")
        );
        assert_eq!(
            list[1].metadata,
            [("version".to_string(), "v2".to_string())]
        );
        assert!(list.iter().all(|i| i.state == State::Healthy));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn errors_name_the_instance() {
        for (src, want) in [
            (
                r#"{"static":{"instances":[]}}"#,
                "services[0].sources[0].static.instances: at least one instance is required",
            ),
            (
                r#"{"static":{"instances":[{"address":"10.0.0.1","port":80},{"address":"10.0.0.2","port":80,"weight":0}]}}"#,
                "services[0].sources[0].static.instances[1].weight: must be at least 1",
            ),
            (
                r#"{"static":{"instances":[{"address":"web.local","port":80}]}}"#,
                "services[0].sources[0].static.instances[0]: address `web.local` is not an IP literal at line 1 column 96",
            ),
        ] {
            let e = one_source(src).unwrap_err();
            assert_eq!(e.0, want, "{src}");
        }
        let e = one_source(r#"{"static":{"instances":[{"address":"10.0.0.1","port":70000}]}}"#)
            .unwrap_err();
        assert_eq!(
            e.0,
            "services[0].sources[0].static.instances[0]: port 70000 is out of range 1..65535 at line 1 column 98"
        );
    }
}
