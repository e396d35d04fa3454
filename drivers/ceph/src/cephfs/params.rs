//! StorageClass parameters of `cephfs.rcsi.io`, named as ceph-csi names
//! them so an operator's StorageClass carries over.

use crate::CephError;
use std::collections::BTreeMap;

/// Every parameter this driver reads.
const KNOWN: &str = "clusterID, fsName, subvolumeGroup, pool, mounter, kernelMountOptions, fuseMountOptions, volumeNamePrefix";

/// How the node mounts a volume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mounter {
    /// The kernel's CephFS client (`mount -t ceph`).
    #[default]
    Kernel,
    /// `ceph-fuse`.
    Fuse,
}

impl Mounter {
    /// Reads a `mounter` value (empty: kernel).
    pub fn parse(v: &str) -> Result<Self, CephError> {
        match v.trim() {
            "" | "kernel" => Ok(Mounter::Kernel),
            "fuse" | "ceph-fuse" => Ok(Mounter::Fuse),
            v => Err(bad("mounter", format!("{v:?} is not kernel or fuse"))),
        }
    }

    /// The parameter value naming this mounter.
    pub fn as_str(self) -> &'static str {
        match self {
            Mounter::Kernel => "kernel",
            Mounter::Fuse => "fuse",
        }
    }
}

/// Parsed StorageClass parameters.
#[derive(Clone, Debug, Default)]
pub struct Params {
    /// `clusterID`: the cluster map entry.
    pub cluster: String,
    /// `fsName`: the CephFS filesystem.
    pub fs_name: String,
    /// `subvolumeGroup`, when given (else the cluster map's, else `csi`).
    pub group: Option<String>,
    /// `pool`: the data pool new subvolumes are laid out in.
    pub pool: Option<String>,
    /// `mounter`.
    pub mounter: Mounter,
    /// `kernelMountOptions`.
    pub kernel_options: Option<String>,
    /// `fuseMountOptions`.
    pub fuse_options: Option<String>,
    /// `volumeNamePrefix` of subvolume names (default `csi-vol-`).
    pub prefix: String,
}

fn bad(key: &'static str, why: impl Into<String>) -> CephError {
    CephError::BadParameter {
        key,
        why: why.into(),
    }
}

/// Whether `v` is a name Ceph takes for a filesystem, group, pool or
/// subvolume prefix: 1 to 64 of `A-Z a-z 0-9 - _ .`, not starting with `.`.
fn plain_name(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && !v.starts_with('.')
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Params {
    /// Reads the parameters; unknown keys are refused by name, and so are
    /// ceph-csi features this driver does not have (`encrypted: "true"`).
    pub fn parse(params: &BTreeMap<String, String>) -> Result<Self, CephError> {
        let mut p = Params {
            prefix: "csi-vol-".into(),
            ..Default::default()
        };
        let opt = |v: &str| Some(v.to_owned()).filter(|v| !v.is_empty());
        for (k, v) in params {
            let v = v.trim();
            match k.as_str() {
                "clusterID" => p.cluster = v.to_owned(),
                "fsName" => p.fs_name = v.to_owned(),
                "subvolumeGroup" => p.group = opt(v),
                "pool" => p.pool = opt(v),
                "mounter" => p.mounter = Mounter::parse(v)?,
                "kernelMountOptions" => p.kernel_options = opt(v),
                "fuseMountOptions" => p.fuse_options = opt(v),
                "volumeNamePrefix" => p.prefix = v.to_owned(),
                "encrypted" | "backingSnapshot" if v == "false" || v.is_empty() => {}
                "encrypted" | "backingSnapshot" => {
                    return Err(CephError::UnsupportedParameter(k.clone()));
                }
                _ => {
                    return Err(CephError::UnknownParameter {
                        key: k.clone(),
                        known: KNOWN,
                    });
                }
            }
        }
        if p.cluster.is_empty() {
            return Err(bad("clusterID", "required: a clusterID of the cluster map"));
        }
        if p.fs_name.is_empty() {
            return Err(bad(
                "fsName",
                "required: the CephFS filesystem of the volumes",
            ));
        }
        for (key, v) in [
            ("fsName", Some(&p.fs_name)),
            ("subvolumeGroup", p.group.as_ref()),
            ("pool", p.pool.as_ref()),
            ("volumeNamePrefix", Some(&p.prefix)),
        ] {
            if let Some(v) = v
                && !plain_name(v)
            {
                return Err(bad(
                    key,
                    format!("{v:?}: 1 to 64 of A-Z a-z 0-9 - _ . are allowed"),
                ));
            }
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(kv: &[(&str, &str)]) -> Result<Params, CephError> {
        Params::parse(
            &kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn required_and_defaults() {
        let p = parse(&[("clusterID", "c"), ("fsName", "cephfs")]).unwrap();
        assert_eq!(
            (p.mounter, p.group, p.prefix.as_str()),
            (Mounter::Kernel, None, "csi-vol-")
        );
        let p = parse(&[
            ("clusterID", "c"),
            ("fsName", "cephfs"),
            ("mounter", "fuse"),
            ("subvolumeGroup", "team-a"),
            ("pool", "cephfs_data"),
        ])
        .unwrap();
        assert_eq!(p.mounter, Mounter::Fuse);
        assert_eq!(p.group.as_deref(), Some("team-a"));
        assert!(parse(&[("fsName", "cephfs")]).is_err());
        assert!(parse(&[("clusterID", "c")]).is_err());
    }

    #[test]
    fn refuses_unknown_unsupported_and_escaping_names() {
        let base = [("clusterID", "c"), ("fsName", "cephfs")];
        let with = |k: &'static str, v: &'static str| {
            let mut kv = base.to_vec();
            kv.push((k, v));
            parse(&kv)
        };
        assert!(matches!(
            with("imageFeatures", "layering"),
            Err(CephError::UnknownParameter { .. })
        ));
        assert!(matches!(
            with("encrypted", "true"),
            Err(CephError::UnsupportedParameter(_))
        ));
        assert!(with("encrypted", "false").is_ok());
        for bad in ["../x", "a/b", "", ".hidden", "x\0y"] {
            assert!(
                with("subvolumeGroup", bad).is_err() || bad.is_empty(),
                "{bad:?}"
            );
        }
        assert!(with("mounter", "nfs").is_err());
        assert!(with("fsName", "a b").is_err());
    }
}
