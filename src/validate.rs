//! Configuration errors and the value rules shared by the plugin's configuration
//! (`config`) and each registry's section of it. A leaf, so a registry
//! checks its own section without depending on `config`.

/// A configuration error, already phrased for Envoy's log.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid configuration: {}", self.0)
    }
}

/// The error `<at>.<field>: <msg>`.
pub fn field_err(at: &str, field: &str, msg: &str) -> Result<(), ConfigError> {
    Err(ConfigError(format!("{at}.{field}: {msg}")))
}

/// A value that goes into a URL, a header or a form: no control characters.
pub fn printable(s: &str) -> bool {
    !s.chars().any(char::is_control)
}
