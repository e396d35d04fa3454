//! The cluster map: which monitors each `clusterID` names, in the format
//! ceph-csi reads from its ConfigMap (`config.json`), so an operator's map
//! carries over: `[{"clusterID": "...", "monitors": ["host:port", ...],
//! "cephFS": {"subvolumeGroup": "..."}, "rbd": {"radosNamespace": "..."}}]`.
//! Other keys ceph-csi knows are accepted and ignored.

use crate::error::CephError;
use serde::Deserialize;
use std::path::Path;

/// CephFS settings of a cluster.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CephFsSettings {
    /// Subvolume group for volumes (default `csi`).
    #[serde(default)]
    pub subvolume_group: Option<String>,
}

/// RBD settings of a cluster.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RbdSettings {
    /// RADOS namespace for images and the journal.
    #[serde(default)]
    pub rados_namespace: Option<String>,
}

/// One cluster of the map.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Cluster {
    /// The id StorageClasses name.
    #[serde(rename = "clusterID")]
    pub cluster_id: String,
    /// Monitor addresses, `host:port`.
    pub monitors: Vec<String>,
    /// CephFS settings.
    #[serde(default, rename = "cephFS")]
    pub cephfs: CephFsSettings,
    /// RBD settings.
    #[serde(default)]
    pub rbd: RbdSettings,
}

/// Every cluster the driver may use.
#[derive(Clone, Debug, Default)]
pub struct ClusterMap(Vec<Cluster>);

/// Longest `clusterID`: volume ids hold it and stay within 128 bytes.
pub const MAX_CLUSTER_ID: usize = 36;

impl ClusterMap {
    /// Parses a map; every cluster needs an id (at most 36 bytes of
    /// `[A-Za-z0-9._-]`) and at least one monitor, and ids are unique.
    pub fn parse(text: &str, path: &str) -> Result<Self, CephError> {
        let bad = |why: String| CephError::Config {
            path: path.to_owned(),
            why,
        };
        let clusters: Vec<Cluster> =
            serde_json::from_str(text).map_err(|e| bad(format!("not a JSON cluster list: {e}")))?;
        for (i, c) in clusters.iter().enumerate() {
            let id_ok = !c.cluster_id.is_empty()
                && c.cluster_id.len() <= MAX_CLUSTER_ID
                && c.cluster_id
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-'));
            if !id_ok {
                return Err(bad(format!(
                    "entry {i}: clusterID {:?} must be 1 to {MAX_CLUSTER_ID} of A-Z a-z 0-9 . _ -",
                    c.cluster_id
                )));
            }
            if c.monitors.is_empty() || c.monitors.iter().any(|m| m.trim().is_empty()) {
                return Err(bad(format!(
                    "clusterID {:?} lists no monitors",
                    c.cluster_id
                )));
            }
            if clusters[..i].iter().any(|o| o.cluster_id == c.cluster_id) {
                return Err(bad(format!("clusterID {:?} appears twice", c.cluster_id)));
            }
        }
        Ok(Self(clusters))
    }

    /// Reads the map from `path`.
    pub fn load(path: &Path) -> Result<Self, CephError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| CephError::Config {
            path: shown.clone(),
            why: e.to_string(),
        })?;
        Self::parse(&text, &shown)
    }

    /// Every cluster, in the map's order.
    pub fn iter(&self) -> impl Iterator<Item = &Cluster> {
        self.0.iter()
    }

    /// The cluster `id`, or an error listing the known ones.
    pub fn get(&self, id: &str) -> Result<&Cluster, CephError> {
        self.0.iter().find(|c| c.cluster_id == id).ok_or_else(|| {
            let known: Vec<&str> = self.0.iter().map(|c| c.cluster_id.as_str()).collect();
            CephError::UnknownCluster(id.to_owned(), known.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceph_csi_maps_parse_and_bad_ones_say_why() {
        let text = r#"[
          {"clusterID": "rook-ceph", "monitors": ["10.0.0.1:6789", "10.0.0.2:6789"],
           "cephFS": {"subvolumeGroup": "k8s", "kernelMountOptions": "ms_mode=crc"},
           "rbd": {"radosNamespace": "team"}, "readAffinity": {"enabled": false}},
          {"clusterID": "other", "monitors": ["[::1]:3300"]}
        ]"#;
        let m = ClusterMap::parse(text, "config.json").unwrap();
        let c = m.get("rook-ceph").unwrap();
        assert_eq!(c.monitors.len(), 2);
        assert_eq!(c.cephfs.subvolume_group.as_deref(), Some("k8s"));
        assert_eq!(c.rbd.rados_namespace.as_deref(), Some("team"));
        assert_eq!(m.get("other").unwrap().cephfs, CephFsSettings::default());
        let e = m.get("nope").unwrap_err().to_string();
        assert!(e.contains("rook-ceph, other"), "{e}");
        for (bad, why) in [
            ("{}", "not a JSON cluster list"),
            (r#"[{"clusterID": "a", "monitors": []}]"#, "no monitors"),
            (r#"[{"clusterID": "a/b", "monitors": ["m"]}]"#, "must be"),
            (
                r#"[{"clusterID": "a", "monitors": ["m"]}, {"clusterID": "a", "monitors": ["n"]}]"#,
                "twice",
            ),
        ] {
            let e = ClusterMap::parse(bad, "f").unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
