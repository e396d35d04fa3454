//! Opaque pagination tokens for ListVolumes and ListSnapshots.

use crate::{Error, Result, invalid};

const PREFIX: &str = "rcsi1.";

/// Encodes "continue after this id" as an opaque token.
pub fn encode(after_id: &str) -> String {
    let mut s = String::from(PREFIX);
    for b in after_id.bytes() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Decodes a token this plugin issued; anything else is Aborted, as the spec asks.
pub fn decode(token: &str) -> Result<Option<String>> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || {
        Error::Aborted(format!(
            "starting_token {token:?} was not issued by this plugin"
        ))
    };
    let hex = token.strip_prefix(PREFIX).ok_or_else(bad)?;
    if hex.is_empty() || hex.len() % 2 != 0 {
        return Err(bad());
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<std::result::Result<Vec<u8>, _>>()
        .map_err(|_| bad())?;
    String::from_utf8(bytes).map(Some).map_err(|_| bad())
}

/// Returns one page of `items` (sorted by `id`) and the next token.
pub fn page<T>(
    items: Vec<T>,
    id: impl Fn(&T) -> &str,
    starting_token: &str,
    max_entries: i32,
) -> Result<(Vec<T>, String)> {
    if max_entries < 0 {
        return Err(invalid!("max_entries must not be negative ({max_entries})"));
    }
    let after = decode(starting_token)?;
    let start = match &after {
        Some(a) => items.partition_point(|x| id(x) <= a.as_str()),
        None => 0,
    };
    let mut rest: Vec<T> = items.into_iter().skip(start).collect();
    let mut next = String::new();
    if max_entries > 0 && rest.len() > max_entries as usize {
        rest.truncate(max_entries as usize);
        next = encode(id(rest.last().expect("non-empty page")));
    }
    Ok((rest, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_aborted() {
        assert_eq!(decode(&encode("vol-1")).unwrap().as_deref(), Some("vol-1"));
        for junk in ["x", "rcsi1.", "rcsi1.zz", "rcsi1.ff", "rcsi1.abc"] {
            assert!(matches!(decode(junk), Err(Error::Aborted(_))), "{junk}");
        }
    }

    #[test]
    fn pages_cover_everything_once() {
        let items: Vec<String> = (0..7).map(|i| format!("v{i}")).collect();
        let mut token = String::new();
        let mut seen = vec![];
        loop {
            let (p, next) = page(items.clone(), |s| s, &token, 3).unwrap();
            seen.extend(p);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, items);
    }
}
