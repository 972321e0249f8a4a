//! `/stats/prometheus` read with the Prometheus text-format parser of the official
//! Python client (`prometheus_client.parser`, installed by `./dev setup` into
//! `.tools/py`): it accepts every form Envoy prints, `name{} 1` included.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: HashMap<String, String>,
    pub value: f64,
}

const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        print(json.dumps([s.name, s.labels, s.value]))
"#;

/// Every sample of a Prometheus text exposition; panics on text the parser rejects.
pub fn samples(text: &str) -> Vec<Sample> {
    let py = super::repo_root().join(".tools/py");
    let mut child = Command::new("python3")
        .args(["-c", PARSE])
        .env("PYTHONPATH", &py)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to the parser");
    let out = child.wait_with_output().expect("parser output");
    assert!(
        out.status.success(),
        "not Prometheus text, or prometheus_client missing from {} (./dev setup installs it): {}",
        py.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (name, labels, value): (String, HashMap<String, String>, f64) =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            Sample {
                name,
                labels,
                value,
            }
        })
        .collect()
}
