//! The path of the JSON value at a position in a document (`services[0].sources[1].consul`):
//! configuration errors name the field to fix. serde_json reports where an error happened
//! as a line and a column (bytes since the line's start, serde_json's `Position`); this
//! walks the text up to that point with RFC 8259's token rules, keeping for each open
//! object the key last read and for each open array the index of the element last
//! started. The path is written the way `serde_path_to_error` wrote it before (keys joined
//! by `.`, indices as `[n]`, the document itself `.`), without its generic wrapper around
//! every visitor (~60 KB of `.wasm`, docs/benchmark.md "A sidecar's memory").
//!
//! Left out: validation (the text has been rejected already: whatever it is, the walk
//! ends and gives the path its tokens imply), and unescaping of keys (a key with escapes
//! is shown as written; configuration keys are plain words).

/// One open container while walking.
enum Frame {
    /// An object, the key read last in it, if any, and whether a key comes next
    /// (after '{' or ',') rather than a value (after ':').
    Object { key: Option<String>, want_key: bool },
    /// An array and the index of the element started last, if any; `next` once a
    /// comma has been read, so the index moves only when the next element starts
    /// (serde_json may report a position one byte ahead, past that comma).
    Array { index: Option<usize>, next: bool },
}

/// Byte offset of serde_json's (1-based line, column) in `text`, capped at its end.
pub fn offset_of(text: &[u8], line: usize, column: usize) -> usize {
    let mut start = 0;
    let mut remaining = line.saturating_sub(1);
    for (i, &b) in text.iter().enumerate() {
        if remaining == 0 {
            break;
        }
        if b == b'\n' {
            remaining -= 1;
            start = i + 1;
        }
    }
    start.saturating_add(column).min(text.len())
}

/// The path of the value being read once `text[..end]` has been read. If the last thing
/// read closed an object or an array, `inside_closed` says whether the path is that of
/// the value it ended with (serde_json reports an error in an object's last field, or in
/// an array's last element, after the '}' or ']' closing it) or of the container itself
/// (a missing field: reported after the object's '}').
pub fn path_at(text: &[u8], end: usize, inside_closed: bool) -> String {
    let text = text.get(..end).unwrap_or(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut closed: Option<Frame> = None;
    let mut i = 0;
    while let Some(&b) = text.get(i) {
        if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            closed = None;
        }
        match b {
            b'{' => {
                start_value(&mut stack);
                stack.push(Frame::Object {
                    key: None,
                    want_key: true,
                });
                i += 1;
            }
            b'[' => {
                start_value(&mut stack);
                stack.push(Frame::Array {
                    index: None,
                    next: false,
                });
                i += 1;
            }
            b'}' | b']' => {
                closed = stack.pop();
                i += 1;
            }
            b',' | b':' => {
                match stack.last_mut() {
                    Some(Frame::Array { next, .. }) => *next = true,
                    Some(Frame::Object { want_key, .. }) => *want_key = b == b',',
                    None => {}
                }
                i += 1;
            }
            b'"' => {
                let close = string_end(text, i + 1);
                if let Some(Frame::Object {
                    key,
                    want_key: true,
                }) = stack.last_mut()
                {
                    let raw = text.get(i + 1..close).unwrap_or_default();
                    *key = Some(String::from_utf8_lossy(raw).into_owned());
                } else {
                    start_value(&mut stack);
                }
                i = close + 1;
            }
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            _ => {
                // A number, true, false or null: one value to the next delimiter.
                start_value(&mut stack);
                while text.get(i).is_some_and(|c| {
                    !matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
                }) {
                    i += 1;
                }
            }
        }
    }
    if inside_closed {
        stack.extend(closed);
    }
    let mut out = String::new();
    for f in &stack {
        match f {
            Frame::Object { key: Some(k), .. } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Frame::Array { index: Some(n), .. } => {
                out.push('[');
                out.push_str(&n.to_string());
                out.push(']');
            }
            _ => {}
        }
    }
    if out.is_empty() {
        out.push('.');
    }
    out
}

/// A value starts in the innermost container: an array moves to its next element.
fn start_value(stack: &mut [Frame]) {
    if let Some(Frame::Array { index, next }) = stack.last_mut() {
        *index = Some(match *index {
            Some(n) if *next => n + 1,
            Some(n) => n,
            None => 0,
        });
        *next = false;
    }
}

/// Index of the quote closing the string whose contents start at `from` (or the end).
fn string_end(text: &[u8], from: usize) -> usize {
    let mut i = from;
    while let Some(&b) = text.get(i) {
        match b {
            b'\\' => i += 2,
            b'"' => return i,
            _ => i += 1,
        }
    }
    text.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    fn end(text: &str, marker: &str) -> usize {
        text.find(marker).map_or(text.len(), |p| p + marker.len())
    }

    fn at(text: &str, marker: &str) -> String {
        path_at(text.as_bytes(), end(text, marker), false)
    }

    fn inside(text: &str, marker: &str) -> String {
        path_at(text.as_bytes(), end(text, marker), true)
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn keys_and_indices_are_joined_like_serde_path_to_error() {
        let t = r#"{"services":[{"name":"a"},{"name":"b","sources":[{"consul":{"wait":"x"}}]}]}"#;
        assert_eq!(at(t, r#""wait":"x""#), "services[1].sources[0].consul.wait");
        assert_eq!(at(t, r#""name":"b""#), "services[1].name");
        assert_eq!(at(t, "{"), ".");
        assert_eq!(path_at(t.as_bytes(), 0, true), ".");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_closed_value_is_the_container_or_its_last_value() {
        let t = r#"{"a":{"b":[{"x":1},{"y":2}]},"c":3}"#;
        // A missing field: serde_json reports it just after the object's '}'.
        assert_eq!(at(t, r#"{"y":2}"#), "a.b[1]");
        assert_eq!(at(t, r#"{"x":1}"#), "a.b[0]");
        // One byte of lookahead past a comma does not move to the next element.
        assert_eq!(at(t, r#"{"x":1},"#), "a.b[0]");
        // An error in the last value, reported after the '}' or ']' closing it.
        assert_eq!(inside(t, r#"{"y":2}"#), "a.b[1].y");
        assert_eq!(inside(t, r#"{"y":2}]"#), "a.b[1]");
        assert_eq!(inside(t, r#"{"y":2}]}"#), "a.b");
        // Anything read after the closer ends that.
        assert_eq!(inside(t, r#""c":3"#), "c");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_refused_key_is_named() {
        let t = r#"{"a":{"ok":1,"typo":2}}"#;
        assert_eq!(at(t, r#""typo""#), "a.typo");
        assert_eq!(at(t, r#""ok""#), "a.ok");
        // A string value read last is not taken for a key.
        assert_eq!(at(r#"{"a":{"wait":"1.5x""#, "x\""), "a.wait");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn strings_with_brackets_and_escapes_are_values() {
        let t = r#"{"a":["x]}\"{[", "y"],"b":2}"#;
        assert_eq!(at(t, r#""y""#), "a[1]");
        assert_eq!(at(t, r#""b":2"#), "b");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn lines_and_columns_become_offsets() {
        let t = b"{\n  \"a\": [1,\n 2]}";
        assert_eq!(offset_of(t, 1, 1), 1);
        assert_eq!(offset_of(t, 3, 2), t.len() - 2);
        assert_eq!(path_at(t, offset_of(t, 3, 2), false), "a[1]");
        assert_eq!(offset_of(t, 9, 99), t.len());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn broken_text_gives_a_path_without_panicking() {
        for t in ["", "{", "[[[", "{\"a", "\"", "}}]]", "{\"a\":[1,,,", "\\"] {
            for end in 0..=t.len() + 2 {
                for inside in [false, true] {
                    let p = path_at(t.as_bytes(), end, inside);
                    assert!(!p.is_empty(), "{t:?} at {end}");
                }
            }
        }
        // Commas alone start no element.
        assert_eq!(path_at(b"{\"a\":[1,,,", 99, false), "a[0]");
        assert_eq!(path_at(b"}}]]", 99, true), ".");
    }
}
