//! StorageClass parameters of `rbd.rcsi.io`, named as ceph-csi names them
//! so an operator's StorageClass carries over.

use crate::error::CephError;
use crate::librbd::{FEATURES, ImageSpec};
use std::collections::BTreeMap;

/// How the node makes an image a block device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mounter {
    /// The kernel client (`rbd map`).
    #[default]
    Krbd,
    /// `rbd-nbd`, a userspace client behind /dev/nbdN.
    Nbd,
    /// `rbd-fuse` exposing the image as a file, attached to a loop device.
    Fuse,
}

impl Mounter {
    /// The parameter value naming this mounter.
    pub fn as_str(self) -> &'static str {
        match self {
            Mounter::Krbd => "krbd",
            Mounter::Nbd => "rbd-nbd",
            Mounter::Fuse => "rbd-fuse",
        }
    }

    /// Parses a `mounter` value ("" is krbd).
    pub fn parse(v: &str) -> Result<Self, CephError> {
        match v {
            "" | "krbd" | "rbd" => Ok(Mounter::Krbd),
            "rbd-nbd" | "nbd" => Ok(Mounter::Nbd),
            "rbd-fuse" | "fuse" => Ok(Mounter::Fuse),
            _ => Err(bad(
                "mounter",
                format!("{v:?} is not krbd, rbd-nbd or rbd-fuse"),
            )),
        }
    }
}

/// Parsed StorageClass parameters.
#[derive(Clone, Debug, Default)]
pub struct Params {
    /// `clusterID`: the cluster map entry.
    pub cluster: String,
    /// `pool`: where images and the journal live.
    pub pool: String,
    /// Layout of new images (`imageFeatures`, `objectSize`, `stripeUnit`,
    /// `stripeCount`, `dataPool`).
    pub spec: ImageSpec,
    /// `imageFeatures` as given (the node's krbd needs them).
    pub features: String,
    /// `csi.storage.k8s.io/fstype` when given as a parameter.
    pub fs_type: Option<String>,
    /// `mkfsOptions`: extra mkfs arguments.
    pub mkfs_options: Option<String>,
    /// `mounter`.
    pub mounter: Mounter,
    /// `mapOptions` for `rbd map` / `rbd-nbd map`.
    pub map_options: Option<String>,
    /// `volumeNamePrefix`: image names are this plus a uuid.
    pub prefix: String,
}

/// Image name prefix when `volumeNamePrefix` is unset (ceph-csi's).
pub const DEFAULT_PREFIX: &str = "csi-vol-";

/// Every parameter this driver reads.
const KNOWN: &str = "clusterID, pool, dataPool, imageFeatures, imageFormat, objectSize, stripeUnit, stripeCount, csi.storage.k8s.io/fstype, mkfsOptions, mounter, mapOptions, volumeNamePrefix";

fn bad(key: &'static str, why: impl Into<String>) -> CephError {
    CephError::BadParameter {
        key,
        why: why.into(),
    }
}

/// A byte size: digits with an optional K/M/G (powers of 1000) or
/// Ki/Mi/Gi (powers of 1024) suffix.
fn bytes(key: &'static str, v: &str) -> Result<u64, CephError> {
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let mult: u64 = match unit {
        "" => 1,
        "K" | "k" => 1000,
        "M" => 1000 * 1000,
        "G" => 1000 * 1000 * 1000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => {
            return Err(bad(
                key,
                format!("{v:?} is not a size such as 4194304 or 4Mi"),
            ));
        }
    };
    n.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| bad(key, format!("{v:?} is not a positive size")))
}

impl Params {
    /// Reads the parameters; unknown keys are refused by name, and so are
    /// ceph-csi features this driver does not have (`encrypted: "true"`).
    pub fn parse(params: &BTreeMap<String, String>) -> Result<Self, CephError> {
        let mut p = Params {
            prefix: DEFAULT_PREFIX.into(),
            features: "layering".into(),
            ..Default::default()
        };
        let (mut object_size, mut unit, mut count) = (None, None, None);
        for (k, v) in params {
            let v = v.trim();
            match k.as_str() {
                "clusterID" => p.cluster = v.to_owned(),
                "pool" => p.pool = v.to_owned(),
                "dataPool" => p.spec.data_pool = Some(v.to_owned()).filter(|v| !v.is_empty()),
                "imageFeatures" => p.features = v.to_owned(),
                "imageFormat" if v == "2" => {}
                "imageFormat" => return Err(bad("imageFormat", "only format 2 images exist")),
                "objectSize" => object_size = Some(bytes("objectSize", v)?),
                "stripeUnit" => unit = Some(bytes("stripeUnit", v)?),
                "stripeCount" => {
                    count = Some(
                        v.parse::<u64>()
                            .ok()
                            .filter(|c| *c > 0)
                            .ok_or_else(|| bad("stripeCount", format!("{v:?} is not a count")))?,
                    )
                }
                "csi.storage.k8s.io/fstype" | "fsType" => {
                    p.fs_type = Some(v.to_owned()).filter(|v| !v.is_empty())
                }
                "mkfsOptions" => p.mkfs_options = Some(v.to_owned()).filter(|v| !v.is_empty()),
                "mounter" => p.mounter = Mounter::parse(v)?,
                "mapOptions" => p.map_options = Some(v.to_owned()).filter(|v| !v.is_empty()),
                "volumeNamePrefix" => p.prefix = v.to_owned(),
                "encrypted" | "thickProvision" if v == "false" || v.is_empty() => {}
                "encrypted" | "thickProvision" => {
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
        if p.pool.is_empty() {
            return Err(bad("pool", "required: the pool for images"));
        }
        let prefix_ok = !p.prefix.is_empty()
            && p.prefix.len() <= 64
            && p.prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !prefix_ok {
            return Err(bad(
                "volumeNamePrefix",
                "1 to 64 of A-Z a-z 0-9 - _ . are allowed",
            ));
        }
        for name in p
            .features
            .split(',')
            .map(str::trim)
            .filter(|f| !f.is_empty())
        {
            let bit = FEATURES
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, b)| *b)
                .ok_or_else(|| {
                    let known: Vec<&str> = FEATURES.iter().map(|(n, _)| *n).collect();
                    bad(
                        "imageFeatures",
                        format!("unknown feature {name:?}; known: {}", known.join(", ")),
                    )
                })?;
            p.spec.features |= bit;
        }
        // Features that depend on others, as `rbd create` checks them.
        let has = |n: &str| p.features.split(',').any(|f| f.trim() == n);
        for (f, needs) in [
            ("object-map", "exclusive-lock"),
            ("fast-diff", "object-map"),
            ("journaling", "exclusive-lock"),
        ] {
            if has(f) && !has(needs) {
                return Err(bad("imageFeatures", format!("{f} needs {needs}")));
            }
        }
        if let Some(size) = object_size {
            if !size.is_power_of_two() || !(4096..=(32 << 20)).contains(&size) {
                return Err(bad("objectSize", "must be a power of two from 4Ki to 32Mi"));
            }
            p.spec.order = size.trailing_zeros();
        }
        match (unit, count) {
            (None, None) => {}
            (Some(u), Some(c)) => {
                let object = 1u64 << if p.spec.order > 0 { p.spec.order } else { 22 };
                if !object.is_multiple_of(u) {
                    return Err(bad(
                        "stripeUnit",
                        format!("{u} does not divide the object size {object}"),
                    ));
                }
                p.spec.stripe = Some((u, c));
            }
            _ => {
                return Err(bad("stripeUnit", "stripeUnit and stripeCount go together"));
            }
        }
        if p.mounter == Mounter::Krbd && has("journaling") {
            return Err(bad(
                "imageFeatures",
                "the kernel client (mounter krbd) cannot map images with journaling; use rbd-nbd",
            ));
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
    fn ceph_csi_parameters_parse_and_mistakes_name_the_key() {
        let p = parse(&[
            ("clusterID", "c"),
            ("pool", "rbd"),
            (
                "imageFeatures",
                "layering,exclusive-lock,object-map,fast-diff",
            ),
            ("objectSize", "8Mi"),
            ("stripeUnit", "1Mi"),
            ("stripeCount", "4"),
            ("dataPool", "ec"),
            ("mounter", "rbd-nbd"),
            ("encrypted", "false"),
        ])
        .unwrap();
        assert_eq!(p.spec.features, 1 | 4 | 8 | 16);
        assert_eq!(p.spec.order, 23);
        assert_eq!(p.spec.stripe, Some((1 << 20, 4)));
        assert_eq!(p.spec.data_pool.as_deref(), Some("ec"));
        assert_eq!(p.mounter, Mounter::Nbd);
        assert_eq!(p.prefix, DEFAULT_PREFIX);
        let plain = parse(&[("clusterID", "c"), ("pool", "rbd")]).unwrap();
        assert_eq!(plain.spec.features, 1, "layering by default");
        let e = parse(&[("pool", "rbd")]).unwrap_err().to_string();
        assert!(e.contains("clusterID"), "{e}");
        let e = parse(&[("clusterID", "c")]).unwrap_err().to_string();
        assert!(e.contains("pool"), "{e}");
        for (kv, key) in [
            (vec![("imageFeatures", "layering,turbo")], "imageFeatures"),
            (vec![("imageFeatures", "fast-diff")], "imageFeatures"),
            (
                vec![("imageFeatures", "exclusive-lock,journaling")],
                "imageFeatures",
            ),
            (vec![("objectSize", "3Mi")], "objectSize"),
            (vec![("objectSize", "lots")], "objectSize"),
            (vec![("stripeUnit", "1Mi")], "stripeUnit"),
            (
                vec![("stripeUnit", "3Mi"), ("stripeCount", "2")],
                "stripeUnit",
            ),
            (vec![("mounter", "iscsi")], "mounter"),
            (vec![("volumeNamePrefix", "a/b")], "volumeNamePrefix"),
            (vec![("encrypted", "true")], "encrypted"),
            (vec![("colour", "blue")], "colour"),
        ] {
            let mut all = vec![("clusterID", "c"), ("pool", "rbd")];
            all.extend(kv);
            let e = parse(&all).unwrap_err().to_string();
            assert!(e.contains(key), "{all:?}: {e}");
        }
    }
}
