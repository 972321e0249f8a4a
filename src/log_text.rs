//! Log lines carry text from registries, routes and clients: control characters in
//! it (an ESC sequence in an instance id, a newline in a header) are escaped before
//! the line reaches Envoy's log, so nobody outside can forge log lines or drive an
//! operator's terminal.

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
}
