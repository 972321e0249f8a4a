//! Log lines carry text from registries, routes and clients: control characters in
//! it (an ESC sequence in an instance id, a newline in a header) are escaped before
//! the line reaches Envoy's log, so nobody outside can forge log lines or drive an
//! operator's terminal.
//!
//! Lines caused by a request (a malformed client header, a route naming an unknown
//! service) are rate-limited with [`LogLimit`]: at most one per kind every
//! [`LOG_INTERVAL_MS`] per VM, the next one saying how many were left out, so a client
//! sending bad requests at any rate cannot flood the log. The counters still count
//! every one.

use std::borrow::Cow;

/// `s` with every control character escaped as Rust does (`\n`, `\t`, `\u{1b}`).
pub fn escape_control(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Least time between two lines of one rate-limited kind, per VM.
pub const LOG_INTERVAL_MS: u64 = 10_000;

/// The rate limit of one kind of per-request log line.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogLimit {
    next_ms: u64,
    suppressed: u64,
}

impl LogLimit {
    /// `Some(lines left out since the last one)` when a line may be written at
    /// `now_ms`; `None` (and one more left out) otherwise.
    pub fn allow(&mut self, now_ms: u64) -> Option<u64> {
        if now_ms < self.next_ms {
            self.suppressed += 1;
            return None;
        }
        self.next_ms = now_ms.saturating_add(LOG_INTERVAL_MS);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The tail of a rate-limited line: how many like it were left out before it.
pub fn suppressed_note(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} more like it since the last one not logged)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(escape_control("web-1 ünïcode"), "web-1 ünïcode");
        assert!(matches!(escape_control("plain"), Cow::Borrowed(_)));
        assert_eq!(
            escape_control("id\u{1b}[31mred\nfake line\t\u{7f}\u{85}"),
            "id\\u{1b}[31mred\\nfake line\\t\\u{7f}\\u{85}"
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn one_line_per_interval_and_the_rest_counted() {
        let mut l = LogLimit::default();
        assert_eq!(l.allow(5_000), Some(0));
        for t in 5_001..5_000 + LOG_INTERVAL_MS {
            assert_eq!(l.allow(t), None);
        }
        assert_eq!(l.allow(5_000 + LOG_INTERVAL_MS), Some(LOG_INTERVAL_MS - 1));
        assert_eq!(l.allow(5_001 + LOG_INTERVAL_MS), None);
        assert_eq!(l.allow(1 << 60), Some(1));
        assert_eq!(l.allow((1 << 60) + 1), None);
        assert_eq!(suppressed_note(0), "");
        assert_eq!(
            suppressed_note(3),
            " (3 more like it since the last one not logged)"
        );
    }
}
