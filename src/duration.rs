//! Durations in configuration, written the way Envoy operators write them:
//! `"250ms"`, `"5s"`, `"2m"`, `"1h"`, or a bare number of milliseconds.

use serde::de::{self, Deserializer, Visitor};
use std::fmt;

/// A duration in whole milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Millis(pub u64);

impl Millis {
    pub const fn from_secs(s: u64) -> Self {
        Millis(s * 1000)
    }
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 % 1000 == 0 {
            write!(f, "{}s", self.0 / 1000)
        } else {
            write!(f, "{}ms", self.0)
        }
    }
}

/// Parses `"<number><unit>"` with unit `ms`, `s`, `m` or `h`. Fractions are allowed
/// (`"1.5s"`); the result is rounded down to whole milliseconds.
pub fn parse(text: &str) -> Result<Millis, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "`{text}` is not a duration (write e.g. \"250ms\" or \"5s\")"
        ));
    }
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (write e.g. \"250ms\" or \"5s\")"))?;
    let scale = match unit {
        "ms" => 1.0,
        "s" | "" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        other => {
            return Err(format!(
                "`{text}` has unknown unit `{other}` (use ms, s, m or h)"
            ))
        }
    };
    let ms = value * scale;
    if !ms.is_finite() || !(0.0..=1e15).contains(&ms) {
        return Err(format!("`{text}` is out of range"));
    }
    Ok(Millis(ms as u64))
}

impl<'de> serde::Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Millis;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"250ms\" or \"5s\", or a number of milliseconds")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Millis, E> {
                Ok(Millis(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Millis, E> {
                u64::try_from(v)
                    .map(Millis)
                    .map_err(|_| E::custom("a duration cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Millis, E> {
                parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn parses_units() {
        assert_eq!(parse("250ms"), Ok(Millis(250)));
        assert_eq!(parse("5s"), Ok(Millis(5000)));
        assert_eq!(parse("1.5s"), Ok(Millis(1500)));
        assert_eq!(parse("2m"), Ok(Millis(120_000)));
        assert_eq!(parse("1h"), Ok(Millis(3_600_000)));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn rejects_garbage() {
        assert!(parse("fast").is_err());
        assert!(parse("5 parsecs").is_err());
        assert!(parse("").is_err());
        assert!(parse("5d").unwrap_err().contains("unknown unit"));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn deserializes_number_and_string() {
        let a: Millis = serde_json::from_str("1500").unwrap();
        let b: Millis = serde_json::from_str("\"1.5s\"").unwrap();
        assert_eq!(a, b);
        assert!(serde_json::from_str::<Millis>("-3").is_err());
    }
}
