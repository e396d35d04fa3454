//! StorageClass parameters, the sub-directory template and path rules.

use crate::error::NfsError;
use std::collections::BTreeMap;

/// What happens to a volume's directory when the volume is deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDelete {
    /// Remove the directory and everything in it.
    Delete,
    /// Keep the directory as it is.
    Retain,
    /// Rename it to `archived-<name>` next to where it was.
    Archive,
}

/// Parsed StorageClass parameters of a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// NFS server host name or address.
    pub server: String,
    /// Exported path on the server.
    pub share: String,
    /// The sub-directory template (None: the volume name).
    pub sub_dir: Option<String>,
    /// What DeleteVolume does with the directory.
    pub on_delete: OnDelete,
    /// Mode of the volume's directory (None: 0777).
    pub mount_permissions: Option<u32>,
    /// Mount options for the node, comma-separated.
    pub mount_options: Option<String>,
    /// NFS protocol version for the node (`nfsvers=`).
    pub nfsvers: Option<String>,
}

/// Mode given to a volume directory when `mountPermissions` is not set:
/// pods of any uid share NFS volumes, and fsGroup cannot chown over root-squashed NFS.
pub const DEFAULT_MODE: u32 = 0o777;

fn bad(key: &str, value: &str, why: impl Into<String>) -> NfsError {
    NfsError::BadParameter {
        key: key.into(),
        value: value.into(),
        why: why.into(),
    }
}

impl Params {
    /// Parses parameters; keys match case-insensitively, as csi-driver-nfs's do.
    pub fn parse(params: &BTreeMap<String, String>) -> Result<Self, NfsError> {
        let mut p = Params {
            server: String::new(),
            share: String::new(),
            sub_dir: None,
            on_delete: OnDelete::Delete,
            mount_permissions: None,
            mount_options: None,
            nfsvers: None,
        };
        for (k, v) in params {
            match k.to_ascii_lowercase().as_str() {
                "server" => p.server = check_server(v)?,
                "share" => p.share = check_share(v)?,
                "subdir" => p.sub_dir = Some(v.clone()),
                "ondelete" => {
                    p.on_delete = match v.to_ascii_lowercase().as_str() {
                        "delete" => OnDelete::Delete,
                        "retain" => OnDelete::Retain,
                        "archive" => OnDelete::Archive,
                        _ => return Err(bad(k, v, "expected delete, retain or archive")),
                    }
                }
                "mountpermissions" => p.mount_permissions = Some(parse_mode(k, v)?),
                "mountoptions" => p.mount_options = Some(check_options(k, v)?),
                "nfsvers" | "vers" => {
                    if !matches!(v.as_str(), "3" | "4" | "4.0" | "4.1" | "4.2") {
                        return Err(bad(k, v, "expected 3, 4, 4.0, 4.1 or 4.2"));
                    }
                    p.nfsvers = Some(v.clone());
                }
                _ => return Err(NfsError::UnknownParameter(k.clone())),
            }
        }
        if p.server.is_empty() {
            return Err(NfsError::MissingParameter("server"));
        }
        if p.share.is_empty() {
            return Err(NfsError::MissingParameter("share"));
        }
        Ok(p)
    }

    /// The sub-directory for a volume: the template with `${pvc.metadata.name}`,
    /// `${pvc.metadata.namespace}` and `${pv.metadata.name}` filled from the
    /// request's `csi.storage.k8s.io/*` metadata, or the volume name.
    pub fn sub_dir_for(
        &self,
        name: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<String, NfsError> {
        let Some(template) = &self.sub_dir else {
            return check_sub_dir("subDir", name);
        };
        let out = csi_core::types::fill_template(template, metadata)
            .map_err(|why| bad("subDir", template, why))?;
        check_sub_dir("subDir", &out)
    }

    /// Kernel mount options for the node: `mountOptions` plus `nfsvers`.
    pub fn node_options(&self) -> Vec<String> {
        let mut o: Vec<String> = self
            .mount_options
            .iter()
            .flat_map(|s| s.split(','))
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if let Some(v) = &self.nfsvers {
            o.push(format!("nfsvers={v}"));
        }
        o
    }
}

fn parse_mode(key: &str, value: &str) -> Result<u32, NfsError> {
    let digits = value.strip_prefix("0o").unwrap_or(value);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err(bad(key, value, "expected an octal mode such as 0777")),
    }
}

fn check_options(key: &str, value: &str) -> Result<String, NfsError> {
    if value.contains(['\0', '\n', ' ']) {
        return Err(bad(
            key,
            value,
            "options are comma-separated, without spaces",
        ));
    }
    Ok(value.to_owned())
}

/// A server: a host name, IPv4 address or IPv6 address (with or without brackets).
pub fn check_server(v: &str) -> Result<String, NfsError> {
    let bare = v
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(v);
    let ok = !bare.is_empty()
        && bare.len() <= 253
        && bare
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'));
    if !ok {
        return Err(bad("server", v, "expected a host name or IP address"));
    }
    Ok(bare.to_owned())
}

/// A share: an absolute, normalized export path.
pub fn check_share(v: &str) -> Result<String, NfsError> {
    let trimmed = if v.len() > 1 {
        v.trim_end_matches('/')
    } else {
        v
    };
    if !trimmed.starts_with('/') || trimmed.contains(['\0', '#']) {
        return Err(bad(
            "share",
            v,
            "expected an absolute export path without '#'",
        ));
    }
    if trimmed != "/"
        && trimmed[1..]
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad(
            "share",
            v,
            "the path must not contain empty, '.' or '..' parts",
        ));
    }
    Ok(trimmed.to_owned())
}

/// Directory names at the share root that volumes may not use.
pub const RESERVED: &str = ".rcsi";

/// A sub-directory: relative, normalized, never the share root or our own
/// records, every part a valid file name.
pub fn check_sub_dir(key: &str, v: &str) -> Result<String, NfsError> {
    csi_core::types::check_sub_dir(v, &[RESERVED]).map_err(|why| bad(key, v, why))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parameters_parse_and_name_what_is_wrong() {
        let p = Params::parse(&map(&[
            ("server", "nas.example"),
            ("share", "/exports/k8s/"),
            ("onDelete", "archive"),
            ("mountPermissions", "0770"),
            ("mountOptions", "hard,nconnect=4"),
            ("nfsvers", "4.1"),
        ]))
        .unwrap();
        assert_eq!(p.share, "/exports/k8s");
        assert_eq!(p.on_delete, OnDelete::Archive);
        assert_eq!(p.mount_permissions, Some(0o770));
        assert_eq!(p.node_options(), ["hard", "nconnect=4", "nfsvers=4.1"]);
        let e = Params::parse(&map(&[("server", "a"), ("share", "/x"), ("color", "red")]));
        assert!(e.unwrap_err().to_string().contains("\"color\""));
        assert!(Params::parse(&map(&[("share", "/x")])).is_err());
        assert!(Params::parse(&map(&[("server", "a"), ("share", "x")])).is_err());
        assert!(Params::parse(&map(&[("server", "a"), ("share", "/a/../b")])).is_err());
        assert!(Params::parse(&map(&[("server", "a/b"), ("share", "/x")])).is_err());
        assert!(
            Params::parse(&map(&[("server", "a"), ("share", "/x"), ("onDelete", "x")])).is_err()
        );
        assert!(
            Params::parse(&map(&[
                ("server", "a"),
                ("share", "/x"),
                ("mountPermissions", "999")
            ]))
            .is_err()
        );
        assert_eq!(
            Params::parse(&map(&[("server", "[fd00::1]"), ("share", "/")]))
                .unwrap()
                .server,
            "fd00::1"
        );
    }

    #[test]
    fn sub_dir_template_fills_and_stays_inside() {
        let mut p = Params::parse(&map(&[("server", "a"), ("share", "/x")])).unwrap();
        let md = map(&[
            ("csi.storage.k8s.io/pvc/name", "data"),
            ("csi.storage.k8s.io/pvc/namespace", "team-a"),
            ("csi.storage.k8s.io/pv/name", "pvc-123"),
        ]);
        assert_eq!(p.sub_dir_for("pvc-123", &md).unwrap(), "pvc-123");
        p.sub_dir =
            Some("${pvc.metadata.namespace}/${pvc.metadata.name}-${pv.metadata.name}".into());
        assert_eq!(p.sub_dir_for("n", &md).unwrap(), "team-a/data-pvc-123");
        p.sub_dir = Some("${pvc.metadata.name}".into());
        assert!(p.sub_dir_for("n", &BTreeMap::new()).is_err());
        for bad in [
            "${nope}",
            "${pvc.metadata.name",
            "../x",
            "a/../../b",
            ".rcsi/x",
            "/",
            "a#b",
        ] {
            p.sub_dir = Some(bad.into());
            assert!(p.sub_dir_for("n", &md).is_err(), "{bad} accepted");
        }
        let evil = map(&[("csi.storage.k8s.io/pvc/name", "..")]);
        p.sub_dir = Some("${pvc.metadata.name}".into());
        assert!(p.sub_dir_for("n", &evil).is_err());
    }
}
