//! `/stats/prometheus` read with the Prometheus text-format parser of the official
//! Python client (`prometheus_client.parser`, installed by `./dev setup` into
//! `.tools/py`): it accepts every form Envoy prints, `name{} 1` included.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

/// One sample as the parser reads it. Counters are families without `_total`, their
/// samples with it (the parser's OpenMetrics representation).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Sample {
    pub family: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append({"family": fam.name, "type": fam.type, "name": s.name,
                    "labels": s.labels, "value": s.value})
json.dump(out, sys.stdout)
"#;

/// Every sample of a Prometheus text exposition; panics if the parser is missing or
/// refuses the text.
pub fn samples(text: &str) -> Vec<Sample> {
    let py = super::repo_root().join(".tools/py");
    let mut child = Command::new("python3")
        .args(["-c", PARSE])
        .env("PYTHONPATH", &py)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to the parser");
    let out = child.wait_with_output().expect("parser output");
    assert!(
        out.status.success(),
        "the Prometheus parser failed (prometheus-client in {}? `./dev setup` installs it):\n{}",
        py.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the parser's JSON")
}
