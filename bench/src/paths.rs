//! Path ranges: `/data/f[1-4]` names f1 to f4, `/dev/sd[a-c]` sda to sdc,
//! `/d/f[01-10]` keeps the zero padding.

use std::path::PathBuf;

/// Expands every `[a-b]` range in `arg` (at most one per argument).
pub fn expand(arg: &str) -> Result<Vec<PathBuf>, String> {
    let Some(open) = arg.find('[') else {
        return Ok(vec![PathBuf::from(arg)]);
    };
    let close = arg[open..]
        .find(']')
        .map(|c| open + c)
        .ok_or_else(|| format!("path {arg:?} has '[' without ']'"))?;
    let (prefix, range, suffix) = (&arg[..open], &arg[open + 1..close], &arg[close + 1..]);
    if suffix.contains('[') {
        return Err(format!("path {arg:?}: only one [a-b] range per path"));
    }
    let (lo, hi) = range
        .split_once('-')
        .ok_or_else(|| format!("path {arg:?}: expected a range like [1-4] or [a-c]"))?;
    let bad = || format!("path {arg:?}: {range:?} is not a range like 1-4, 01-16 or a-c");
    if let (Ok(a), Ok(b)) = (lo.parse::<u64>(), hi.parse::<u64>()) {
        if a > b || b - a > 1_000_000 {
            return Err(bad());
        }
        let width = if lo.starts_with('0') && lo.len() > 1 {
            lo.len()
        } else {
            0
        };
        return Ok((a..=b)
            .map(|i| PathBuf::from(format!("{prefix}{i:0width$}{suffix}")))
            .collect());
    }
    let (a, b) = (lo.as_bytes(), hi.as_bytes());
    if a.len() == 1
        && b.len() == 1
        && a[0].is_ascii_lowercase()
        && b[0].is_ascii_lowercase()
        && a[0] <= b[0]
    {
        return Ok((a[0]..=b[0])
            .map(|c| PathBuf::from(format!("{prefix}{}{suffix}", c as char)))
            .collect());
    }
    Err(bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(
            expand("/d/f[1-3]").unwrap(),
            ["/d/f1", "/d/f2", "/d/f3"].map(PathBuf::from)
        );
        assert_eq!(
            expand("/dev/sd[a-b]").unwrap(),
            ["/dev/sda", "/dev/sdb"].map(PathBuf::from)
        );
        assert_eq!(
            expand("/d/f[08-10].dat").unwrap()[0],
            PathBuf::from("/d/f08.dat")
        );
        assert_eq!(expand("/plain").unwrap(), [PathBuf::from("/plain")]);
        for bad in ["/d/f[3-1]", "/d/f[1-", "/d/f[x]", "/d/f[1-2][3-4]"] {
            assert!(expand(bad).is_err(), "{bad}");
        }
    }
}
