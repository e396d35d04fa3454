//! The filesystem a Secret describes. Debug shows no secret value, and the
//! metadata URL's password is split off so it can travel in the environment.

use crate::error::JuicefsError;
use csi_core::types::Secrets;
use std::fmt;

/// A JuiceFS filesystem as its Secret describes it.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FsSecret {
    /// Filesystem name (`name`).
    pub name: String,
    /// Metadata URL without its password (`metaurl`).
    pub metaurl: String,
    /// The metadata password, passed as META_PASSWORD.
    pub meta_password: Option<String>,
    /// Object storage type (`storage`), e.g. s3, file.
    pub storage: String,
    /// Bucket URL or directory (`bucket`).
    pub bucket: String,
    /// Object storage access key (`access-key`), passed as ACCESS_KEY.
    pub access_key: Option<String>,
    /// Object storage secret key (`secret-key`), passed as SECRET_KEY.
    pub secret_key: Option<String>,
    /// Extra `juicefs format` options (`format-options`), as `--k=v` arguments.
    pub format_options: Vec<String>,
    /// Extra `juicefs mount` options (`mount-options`), as `--k=v` arguments.
    pub mount_options: Vec<String>,
}

impl fmt::Debug for FsSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FsSecret")
            .field("name", &self.name)
            .field("metaurl", &self.metaurl)
            .field("storage", &self.storage)
            .field("format_options", &self.format_options)
            .field("mount_options", &self.mount_options)
            .finish_non_exhaustive()
    }
}

/// Options that only their own Secret keys may set.
const OWN_KEYS: &[&str] = &["storage", "bucket", "access-key", "secret-key"];

/// `a=1,b` (or space-separated) into `--a=1 --b`, refusing options that
/// belong to their own keys.
pub(crate) fn options(key: &'static str, value: &str) -> Result<Vec<String>, JuicefsError> {
    value
        .split([',', ' ', '\n'])
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(|o| {
            let o = o.trim_start_matches('-');
            let name = o.split('=').next().unwrap_or_default();
            if OWN_KEYS.contains(&name) {
                return Err(JuicefsError::BadKey {
                    key,
                    why: format!("{name} has its own Secret key"),
                });
            }
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return Err(JuicefsError::BadKey {
                    key,
                    why: format!("{name:?} is not an option name"),
                });
            }
            Ok(format!("--{o}"))
        })
        .collect()
}

/// Splits the password out of `scheme://user:password@rest`.
fn split_password(url: &str) -> Result<(String, Option<String>), JuicefsError> {
    let bad = |why: &str| JuicefsError::BadKey {
        key: "metaurl",
        why: why.into(),
    };
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("expected scheme://..., e.g. redis://host:6379/1"))?;
    // The user part ends at the first '@' before the path.
    let path_start = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..path_start].find('@') else {
        return Ok((url.to_owned(), None));
    };
    let (user, password) = match rest[..at].split_once(':') {
        Some((u, p)) => (u, Some(p)),
        None => (&rest[..at], None),
    };
    let host = &rest[at + 1..];
    let url = if user.is_empty() {
        format!("{scheme}://{host}")
    } else {
        format!("{scheme}://{user}:@{host}")
    };
    Ok((url, password.filter(|p| !p.is_empty()).map(String::from)))
}

impl FsSecret {
    /// Reads a Secret; unknown keys and missing required ones are refused by name.
    pub fn parse(secrets: &Secrets) -> Result<Self, JuicefsError> {
        let mut s = FsSecret {
            name: String::new(),
            metaurl: String::new(),
            meta_password: None,
            storage: String::new(),
            bucket: String::new(),
            access_key: None,
            secret_key: None,
            format_options: vec![],
            mount_options: vec![],
        };
        for (k, v) in &secrets.0 {
            let some = || Some(v.clone()).filter(|v| !v.is_empty());
            match k.as_str() {
                "name" => s.name = v.clone(),
                "metaurl" => (s.metaurl, s.meta_password) = split_password(v)?,
                "storage" => s.storage = v.clone(),
                "bucket" => s.bucket = v.clone(),
                "access-key" => s.access_key = some(),
                "secret-key" => s.secret_key = some(),
                "format-options" => s.format_options = options("format-options", v)?,
                "mount-options" => s.mount_options = options("mount-options", v)?,
                _ => return Err(JuicefsError::UnknownKey(k.clone())),
            }
        }
        for (key, value) in [
            ("name", &s.name),
            ("metaurl", &s.metaurl),
            ("storage", &s.storage),
            ("bucket", &s.bucket),
        ] {
            if value.is_empty() {
                return Err(JuicefsError::MissingKey(key));
            }
        }
        let name_ok = (3..=63).contains(&s.name.len())
            && s.name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !name_ok {
            return Err(JuicefsError::BadKey {
                key: "name",
                why: format!(
                    "{:?} must be 3 to 63 lowercase letters, digits or '-'",
                    s.name
                ),
            });
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(kv: &[(&str, &str)]) -> Secrets {
        Secrets(
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    const BASE: &[(&str, &str)] = &[
        ("name", "team-fs"),
        ("metaurl", "redis://:s3cr3t@10.0.0.1:6379/1"),
        ("storage", "s3"),
        ("bucket", "https://b.s3.example/x"),
        ("access-key", "AK"),
        ("secret-key", "SK-very-secret"),
        ("format-options", "trash-days=0,block-size=4096"),
        ("mount-options", "--cache-size=1024 writeback"),
    ];

    #[test]
    fn secrets_parse_and_passwords_leave_the_url() {
        let s = FsSecret::parse(&secrets(BASE)).unwrap();
        assert_eq!(s.metaurl, "redis://10.0.0.1:6379/1");
        assert_eq!(s.meta_password.as_deref(), Some("s3cr3t"));
        assert_eq!(s.format_options, ["--trash-days=0", "--block-size=4096"]);
        assert_eq!(s.mount_options, ["--cache-size=1024", "--writeback"]);
        let shown = format!("{s:?}");
        assert!(!shown.contains("s3cr3t") && !shown.contains("SK-very") && !shown.contains("AK"));
        let (url, pw) = split_password("mysql://jfs:pw@(127.0.0.1:3306)/juicefs").unwrap();
        assert_eq!(
            (url.as_str(), pw.as_deref()),
            ("mysql://jfs:@(127.0.0.1:3306)/juicefs", Some("pw"))
        );
        let (url, pw) = split_password("sqlite3:///var/lib/x@y/meta.db").unwrap();
        assert_eq!((url.as_str(), pw), ("sqlite3:///var/lib/x@y/meta.db", None));
    }

    #[test]
    fn bad_secrets_name_the_key() {
        let without = |key: &str| {
            let kv: Vec<_> = BASE.iter().copied().filter(|(k, _)| *k != key).collect();
            FsSecret::parse(&secrets(&kv)).unwrap_err().to_string()
        };
        for key in ["name", "metaurl", "storage", "bucket"] {
            assert!(
                without(key).contains(&format!("{key:?}")),
                "{}",
                without(key)
            );
        }
        let with = |k: &str, v: &str| {
            let mut kv: Vec<_> = BASE.iter().copied().filter(|(key, _)| *key != k).collect();
            kv.push((k, v));
            FsSecret::parse(&secrets(&kv)).unwrap_err().to_string()
        };
        assert!(with("colour", "x").contains("\"colour\""));
        assert!(with("format-options", "bucket=/elsewhere").contains("format-options"));
        assert!(with("name", "Bad_Name").contains("\"name\""));
        assert!(with("metaurl", "no-scheme").contains("metaurl"));
        assert!(!with("metaurl", "no-scheme").contains("s3cr3t"));
    }
}
