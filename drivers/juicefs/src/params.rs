//! StorageClass parameters of `juicefs.rcsi.io`.

use crate::error::JuicefsError;
use std::collections::BTreeMap;

/// Names at the filesystem root that volumes may not use: our records and
/// JuiceFS's own virtual files.
pub const RESERVED: &[&str] = &[".rcsi", ".trash", ".config", ".stats", ".accesslog"];

/// What DeleteVolume does with the directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDelete {
    /// Remove it (into the filesystem's trash when trash is enabled).
    #[default]
    Delete,
    /// Keep it and its data; only the volume is forgotten.
    Retain,
}

/// Parsed StorageClass parameters.
#[derive(Clone, Debug, Default)]
pub struct Params {
    /// Directory template (`pathPattern`); the volume name when unset.
    pub path_pattern: Option<String>,
    /// `onDelete`: delete (default) or retain.
    pub on_delete: OnDelete,
    /// `mountOptions`: extra `juicefs mount` options for the node.
    pub mount_options: Vec<String>,
}

fn bad(key: &'static str, why: impl Into<String>) -> JuicefsError {
    JuicefsError::BadParameter {
        key,
        why: why.into(),
    }
}

impl Params {
    /// Reads the parameters (keys case-insensitive); unknown keys are refused by name.
    pub fn parse(params: &BTreeMap<String, String>) -> Result<Self, JuicefsError> {
        let mut p = Params::default();
        for (k, v) in params {
            match k.to_ascii_lowercase().as_str() {
                "pathpattern" => p.path_pattern = Some(v.clone()).filter(|v| !v.is_empty()),
                "ondelete" => {
                    p.on_delete = match v.to_ascii_lowercase().as_str() {
                        "" | "delete" => OnDelete::Delete,
                        "retain" => OnDelete::Retain,
                        _ => return Err(bad("onDelete", format!("{v:?} is not delete or retain"))),
                    }
                }
                "mountoptions" => {
                    p.mount_options = crate::secret::options("mountOptions", v)
                        .map_err(|e| bad("mountOptions", e.to_string()))?
                }
                _ => return Err(JuicefsError::UnknownParameter(k.clone())),
            }
        }
        Ok(p)
    }

    /// The volume's directory (relative to the filesystem root): the
    /// template filled from the request's metadata, or the volume name.
    pub fn dir_for(
        &self,
        name: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<String, JuicefsError> {
        let (key, dir) = match &self.path_pattern {
            Some(t) => (
                "pathPattern",
                csi_core::types::fill_template(t, metadata)
                    .map_err(|why| bad("pathPattern", why))?,
            ),
            None => ("name", name.to_owned()),
        };
        csi_core::types::check_sub_dir(&dir, RESERVED).map_err(|why| JuicefsError::BadPath {
            from: key,
            path: dir,
            why,
        })
    }
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
    fn parameters_parse_and_paths_stay_inside() {
        let p = Params::parse(&map(&[
            (
                "pathPattern",
                "${pvc.metadata.namespace}/${pvc.metadata.name}",
            ),
            ("ondelete", "Retain"),
            ("mountOptions", "cache-size=0,writeback"),
        ]))
        .unwrap();
        assert_eq!(p.on_delete, OnDelete::Retain);
        assert_eq!(p.mount_options, ["--cache-size=0", "--writeback"]);
        let md = map(&[
            ("csi.storage.k8s.io/pvc/name", "data"),
            ("csi.storage.k8s.io/pvc/namespace", "team"),
        ]);
        assert_eq!(p.dir_for("pvc-1", &md).unwrap(), "team/data");
        let e = p
            .dir_for("pvc-1", &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--extra-create-metadata"), "{e}");
        let plain = Params::default();
        assert_eq!(plain.dir_for("pvc-1", &md).unwrap(), "pvc-1");
        for name in ["..", ".rcsi", ".trash", "a/../b", "x#y"] {
            assert!(plain.dir_for(name, &md).is_err(), "{name}");
        }
        let e = Params::parse(&map(&[("subDir", "x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"subDir\""), "{e}");
        let e = Params::parse(&map(&[("onDelete", "archive")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("onDelete"), "{e}");
    }
}
