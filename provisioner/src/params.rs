//! StorageClass parameters, secret references, quantities, capabilities and topology.

use crate::error::{Error, Result};
use csi_core::csi::{self, volume_capability as vc};
use k8s_openapi::api::core::v1::{
    NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, SecretReference, VolumeNodeAffinity,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use std::collections::{BTreeMap, HashMap};

/// Prefix of the parameters meant for the provisioner, never passed on as they are.
pub const PREFIX: &str = "csi.storage.k8s.io/";
/// Parameter naming the filesystem type of Filesystem volumes.
pub const FSTYPE: &str = "csi.storage.k8s.io/fstype";
/// Added to CreateVolume parameters: the claim's name.
pub const PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
/// Added to CreateVolume parameters: the claim's namespace.
pub const PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
/// Added to CreateVolume parameters: the volume's name.
pub const PV_NAME: &str = "csi.storage.k8s.io/pv/name";

/// The secrets a StorageClass may name, by their parameter stem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretKind {
    /// CreateVolume and DeleteVolume.
    Provisioner,
    /// ControllerExpandVolume.
    ControllerExpand,
    /// NodeStageVolume.
    NodeStage,
    /// NodePublishVolume.
    NodePublish,
    /// NodeExpandVolume.
    NodeExpand,
    /// CreateSnapshot and DeleteSnapshot (VolumeSnapshotClass parameter).
    Snapshotter,
}

impl SecretKind {
    fn stem(self) -> &'static str {
        match self {
            SecretKind::Provisioner => "provisioner",
            SecretKind::ControllerExpand => "controller-expand",
            SecretKind::NodeStage => "node-stage",
            SecretKind::NodePublish => "node-publish",
            SecretKind::NodeExpand => "node-expand",
            SecretKind::Snapshotter => "snapshotter",
        }
    }
}

/// Values that `${...}` templates in secret references may use.
#[derive(Default)]
pub struct TemplateVars<'a> {
    /// `${pv.name}`
    pub pv_name: Option<&'a str>,
    /// `${pvc.name}`
    pub pvc_name: Option<&'a str>,
    /// `${pvc.namespace}`
    pub pvc_namespace: Option<&'a str>,
    /// `${pvc.annotations['KEY']}`
    pub pvc_annotations: Option<&'a BTreeMap<String, String>>,
    /// `${volumesnapshotcontent.name}`
    pub content_name: Option<&'a str>,
    /// `${volumesnapshot.name}`
    pub snapshot_name: Option<&'a str>,
    /// `${volumesnapshot.namespace}`
    pub snapshot_namespace: Option<&'a str>,
}

impl TemplateVars<'_> {
    fn lookup(&self, var: &str, in_namespace: bool) -> Option<String> {
        let name_only = |v: Option<&str>| {
            if in_namespace {
                None
            } else {
                v.map(str::to_owned)
            }
        };
        match var {
            "pv.name" => self.pv_name.map(str::to_owned),
            "pvc.namespace" => self.pvc_namespace.map(str::to_owned),
            "pvc.name" => name_only(self.pvc_name),
            "volumesnapshotcontent.name" => self.content_name.map(str::to_owned),
            "volumesnapshot.namespace" => self.snapshot_namespace.map(str::to_owned),
            "volumesnapshot.name" => name_only(self.snapshot_name),
            _ => {
                let key = var.strip_prefix("pvc.annotations['")?.strip_suffix("']")?;
                if in_namespace {
                    return None;
                }
                self.pvc_annotations?.get(key).cloned()
            }
        }
    }

    /// Expands every `${...}` in `template`; unknown or unavailable variables are an error.
    pub fn expand(&self, template: &str, in_namespace: bool) -> Result<String> {
        let mut out = String::new();
        let mut rest = template;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| Error::Invalid(format!("unterminated ${{ in {template:?}")))?;
            let var = &after[..end];
            let value = self.lookup(var, in_namespace).ok_or_else(|| {
                Error::Invalid(format!(
                    "${{{var}}} cannot be used in {} {template:?}",
                    if in_namespace {
                        "a secret namespace"
                    } else {
                        "a secret name"
                    }
                ))
            })?;
            out.push_str(&value);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// Resolves the `csi.storage.k8s.io/<kind>-secret-name` / `-namespace` pair in `params`.
pub fn secret_ref(
    params: &BTreeMap<String, String>,
    kind: SecretKind,
    vars: &TemplateVars<'_>,
) -> Result<Option<SecretReference>> {
    let name_key = format!("{PREFIX}{}-secret-name", kind.stem());
    let ns_key = format!("{PREFIX}{}-secret-namespace", kind.stem());
    match (params.get(&name_key), params.get(&ns_key)) {
        (None, None) => Ok(None),
        (Some(n), Some(ns)) => {
            let name = vars.expand(n, false)?;
            let namespace = vars.expand(ns, true)?;
            for (what, v) in [("name", &name), ("namespace", &namespace)] {
                if v.is_empty() || v.len() > 253 || v.contains(['/', '\0']) {
                    return Err(Error::Invalid(format!(
                        "{} secret {what} {v:?} (from {n:?}/{ns:?}) is not a valid object name",
                        kind.stem()
                    )));
                }
            }
            Ok(Some(SecretReference {
                name: Some(name),
                namespace: Some(namespace),
            }))
        }
        _ => Err(Error::Invalid(format!(
            "{name_key} and {ns_key} must be given together"
        ))),
    }
}

/// The parameters passed on to the driver: everything except the `csi.storage.k8s.io/` keys.
pub fn driver_params(params: &BTreeMap<String, String>) -> HashMap<String, String> {
    params
        .iter()
        .filter(|(k, _)| !k.starts_with(PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The `storage` entry of a resource map, in bytes.
pub fn storage(resources: Option<&BTreeMap<String, Quantity>>) -> Result<Option<u64>> {
    resources
        .and_then(|m| m.get("storage"))
        .map(parse_quantity)
        .transpose()
}

/// A secret reference recorded in two annotations (name, namespace); empty means none.
pub fn annotated_secret(
    annotations: &BTreeMap<String, String>,
    name_key: &str,
    namespace_key: &str,
) -> Option<SecretReference> {
    match (annotations.get(name_key), annotations.get(namespace_key)) {
        (Some(n), Some(ns)) if !n.is_empty() => Some(SecretReference {
            name: Some(n.clone()),
            namespace: Some(ns.clone()),
        }),
        _ => None,
    }
}

/// Parses a Kubernetes quantity ("10Gi", "500M", "1.5Gi", "1e9") into bytes, rounding up.
pub fn parse_quantity(q: &Quantity) -> Result<u64> {
    let s = q.0.trim();
    let bad = || Error::Invalid(format!("{s:?} is not a valid storage quantity"));
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let (mult_num, mult_den): (u128, u128) = match suffix {
        "" => (1, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        "m" => (1, 1000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "E" => (1_000_000_000_000_000_000, 1),
        e if e.starts_with(['e', 'E']) => {
            let exp: u32 = e[1..].parse().map_err(|_| bad())?;
            (10u128.checked_pow(exp).ok_or_else(bad)?, 1)
        }
        _ => return Err(bad()),
    };
    let num = num.strip_prefix('+').unwrap_or(num);
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() || frac.len() > 18 {
        return Err(bad());
    }
    let digits: u128 = format!("{int}{frac}").parse().map_err(|_| bad())?;
    let den = 10u128.pow(frac.len() as u32) * mult_den;
    let value = digits.checked_mul(mult_num).ok_or_else(bad)?.div_ceil(den);
    u64::try_from(value).map_err(|_| bad())
}

/// Formats bytes as the shortest exact binary quantity ("10Gi", "1536Mi", "1000").
pub fn format_quantity(bytes: u64) -> Quantity {
    for (shift, suffix) in [(40, "Ti"), (30, "Gi"), (20, "Mi"), (10, "Ki")] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return Quantity(format!("{}{suffix}", bytes >> shift));
        }
    }
    Quantity(bytes.to_string())
}

/// The CSI access mode for a Kubernetes access mode.
pub fn access_mode(mode: &str) -> Result<vc::access_mode::Mode> {
    use vc::access_mode::Mode;
    Ok(match mode {
        "ReadWriteOnce" => Mode::SingleNodeWriter,
        "ReadOnlyMany" => Mode::MultiNodeReaderOnly,
        "ReadWriteMany" => Mode::MultiNodeMultiWriter,
        "ReadWriteOncePod" => Mode::SingleNodeSingleWriter,
        other => return Err(Error::Invalid(format!("unknown access mode {other:?}"))),
    })
}

/// One CSI capability per access mode, as a block or a mount volume.
pub fn capabilities(
    access_modes: &[String],
    block: bool,
    fs_type: &str,
    mount_flags: &[String],
) -> Result<Vec<csi::VolumeCapability>> {
    if access_modes.is_empty() {
        return Err(Error::Invalid("the claim has no access modes".into()));
    }
    access_modes
        .iter()
        .map(|m| {
            let access_type = if block {
                vc::AccessType::Block(vc::BlockVolume {})
            } else {
                vc::AccessType::Mount(vc::MountVolume {
                    fs_type: fs_type.to_owned(),
                    mount_flags: mount_flags.to_vec(),
                    volume_mount_group: String::new(),
                })
            };
            Ok(csi::VolumeCapability {
                access_mode: Some(vc::AccessMode {
                    mode: access_mode(m)? as i32,
                }),
                access_type: Some(access_type),
            })
        })
        .collect()
}

/// Node affinity that pins a volume to the topologies the driver reported.
pub fn node_affinity(topologies: &[csi::Topology]) -> Option<VolumeNodeAffinity> {
    let terms: Vec<NodeSelectorTerm> = topologies
        .iter()
        .filter(|t| !t.segments.is_empty())
        .map(|t| {
            let mut segs: Vec<_> = t.segments.iter().collect();
            segs.sort();
            NodeSelectorTerm {
                match_expressions: Some(
                    segs.into_iter()
                        .map(|(k, v)| NodeSelectorRequirement {
                            key: k.clone(),
                            operator: "In".into(),
                            values: Some(vec![v.clone()]),
                        })
                        .collect(),
                ),
                match_fields: None,
            }
        })
        .collect();
    if terms.is_empty() {
        return None;
    }
    Some(VolumeNodeAffinity {
        required: Some(NodeSelector {
            node_selector_terms: terms,
        }),
    })
}

/// True when a node with `labels` satisfies `affinity` (no affinity: every node does).
pub fn affinity_matches(
    affinity: Option<&VolumeNodeAffinity>,
    labels: &BTreeMap<String, String>,
) -> bool {
    let Some(sel) = affinity.and_then(|a| a.required.as_ref()) else {
        return true;
    };
    sel.node_selector_terms.iter().any(|term| {
        term.match_expressions.iter().flatten().all(|e| {
            let value = labels.get(&e.key);
            let values = e.values.as_deref().unwrap_or_default();
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        let q = |s: &str| parse_quantity(&Quantity(s.into()));
        assert_eq!(q("10Gi").unwrap(), 10 << 30);
        assert_eq!(q("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(q("500M").unwrap(), 500_000_000);
        assert_eq!(q("1e9").unwrap(), 1_000_000_000);
        assert_eq!(q("1001m").unwrap(), 2);
        assert_eq!(q("4096").unwrap(), 4096);
        for bad in ["", "Gi", "10Gb", "-1", "1..2", "99999999999Ei"] {
            assert!(q(bad).is_err(), "{bad}");
        }
        assert_eq!(format_quantity(10 << 30).0, "10Gi");
        assert_eq!(format_quantity(1536 << 20).0, "1536Mi");
        assert_eq!(format_quantity(1000).0, "1000");
    }

    #[test]
    fn templates() {
        let ann = BTreeMap::from([("team".to_owned(), "blue".to_owned())]);
        let v = TemplateVars {
            pv_name: Some("pvc-1"),
            pvc_name: Some("data"),
            pvc_namespace: Some("apps"),
            pvc_annotations: Some(&ann),
            ..Default::default()
        };
        assert_eq!(
            v.expand("${pvc.name}-${pvc.annotations['team']}", false)
                .unwrap(),
            "data-blue"
        );
        assert_eq!(v.expand("${pvc.namespace}", true).unwrap(), "apps");
        assert!(v.expand("${pvc.name}", true).is_err());
        assert!(v.expand("${nope}", false).is_err());
        assert!(v.expand("${pv.name", false).is_err());
        let params = BTreeMap::from([(
            "csi.storage.k8s.io/provisioner-secret-name".to_owned(),
            "x".to_owned(),
        )]);
        assert!(secret_ref(&params, SecretKind::Provisioner, &v).is_err());
    }

    #[test]
    fn affinity_round_trip() {
        let topo = csi::Topology {
            segments: [("topology.local.rcsi.io/node".to_owned(), "n1".to_owned())].into(),
        };
        let a = node_affinity(&[topo]).unwrap();
        let n1 = BTreeMap::from([("topology.local.rcsi.io/node".to_owned(), "n1".to_owned())]);
        let n2 = BTreeMap::from([("topology.local.rcsi.io/node".to_owned(), "n2".to_owned())]);
        assert!(affinity_matches(Some(&a), &n1));
        assert!(!affinity_matches(Some(&a), &n2));
        assert!(affinity_matches(None, &n2));
    }
}
