//! Redaction of secrets in log output.

use std::collections::HashMap;
use std::fmt;

/// Debug wrapper that prints only the keys of a secrets map, never the values.
pub struct Redacted<'a>(pub &'a HashMap<String, String>);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<&str> = self.0.keys().map(String::as_str).collect();
        keys.sort_unstable();
        f.debug_map()
            .entries(keys.into_iter().map(|k| (k, "<redacted>")))
            .finish()
    }
}
