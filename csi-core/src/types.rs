//! Validated request types handed to backends, parsed from the CSI protos.

use crate::csi;
use crate::csi::volume_capability::access_mode::Mode;
use crate::{Error, Result, invalid};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Component, Path, PathBuf};

/// Longest name or id accepted, in bytes (the spec's limit for strings).
pub const MAX_ID_BYTES: usize = 128;
/// Longest target or staging path accepted, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;
/// Prefix of the parameters Kubernetes adds (`csi.storage.k8s.io/pvc/name`, ...).
pub const K8S_PARAM_PREFIX: &str = "csi.storage.k8s.io/";

/// A byte or count value for an int64 proto field, saturating at i64::MAX.
pub fn proto_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Secrets from a request; Debug prints only the keys.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets(pub HashMap<String, String>);

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::redact::Redacted(&self.0).fmt(f)
    }
}

/// How the volume is accessed: as a raw block device or a mounted filesystem.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AccessType {
    /// Raw block device.
    Block,
    /// Mounted filesystem.
    Mount {
        /// Requested filesystem type; empty means the driver's default.
        fs_type: String,
        /// Mount options from the StorageClass or PV.
        flags: Vec<String>,
        /// Group that must be able to read and write the volume (fsGroup).
        mount_group: Option<String>,
    },
}

/// CSI access modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessMode {
    /// Read-write on one node.
    SingleNodeWriter,
    /// Read-only on one node.
    SingleNodeReaderOnly,
    /// Read-only on many nodes.
    MultiNodeReaderOnly,
    /// Many nodes, one of them read-write.
    MultiNodeSingleWriter,
    /// Read-write on many nodes.
    MultiNodeMultiWriter,
    /// Read-write by one workload on one node.
    SingleNodeSingleWriter,
    /// Read-write by many workloads on one node.
    SingleNodeMultiWriter,
}

impl AccessMode {
    /// True when the mode allows use from more than one node.
    pub fn is_multi_node(self) -> bool {
        matches!(
            self,
            Self::MultiNodeReaderOnly | Self::MultiNodeSingleWriter | Self::MultiNodeMultiWriter
        )
    }

    /// True when the mode never allows writes.
    pub fn is_read_only(self) -> bool {
        matches!(self, Self::SingleNodeReaderOnly | Self::MultiNodeReaderOnly)
    }

    fn from_proto(mode: i32) -> Result<Self> {
        Ok(match Mode::try_from(mode) {
            Ok(Mode::SingleNodeWriter) => Self::SingleNodeWriter,
            Ok(Mode::SingleNodeReaderOnly) => Self::SingleNodeReaderOnly,
            Ok(Mode::MultiNodeReaderOnly) => Self::MultiNodeReaderOnly,
            Ok(Mode::MultiNodeSingleWriter) => Self::MultiNodeSingleWriter,
            Ok(Mode::MultiNodeMultiWriter) => Self::MultiNodeMultiWriter,
            Ok(Mode::SingleNodeSingleWriter) => Self::SingleNodeSingleWriter,
            Ok(Mode::SingleNodeMultiWriter) => Self::SingleNodeMultiWriter,
            Ok(Mode::Unknown) | Err(_) => {
                return Err(invalid!(
                    "volume capability access_mode.mode is missing or unknown ({mode})"
                ));
            }
        })
    }
}

/// One validated volume capability.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Capability {
    /// Block or mount.
    pub access: AccessType,
    /// Access mode.
    pub mode: AccessMode,
}

impl Capability {
    /// Parses and checks one capability (`field` names it in errors).
    pub fn from_proto(cap: &csi::VolumeCapability, field: &str) -> Result<Self> {
        use csi::volume_capability::AccessType as P;
        let access = match &cap.access_type {
            Some(P::Block(_)) => AccessType::Block,
            Some(P::Mount(m)) => {
                let total: usize = m.mount_flags.iter().map(String::len).sum();
                if total > 4096 {
                    return Err(invalid!("{field}.mount.mount_flags exceed 4 KiB"));
                }
                if m.mount_flags.iter().any(|f| f.contains('\0')) {
                    return Err(invalid!("{field}.mount.mount_flags contain a NUL byte"));
                }
                if m.fs_type.contains(['\0', '/', ',']) {
                    return Err(invalid!(
                        "{field}.mount.fs_type {:?} is not a filesystem name",
                        m.fs_type
                    ));
                }
                AccessType::Mount {
                    fs_type: m.fs_type.clone(),
                    flags: m.mount_flags.clone(),
                    mount_group: (!m.volume_mount_group.is_empty())
                        .then(|| m.volume_mount_group.clone()),
                }
            }
            None => {
                return Err(invalid!(
                    "{field}: access_type (block or mount) is required"
                ));
            }
        };
        let mode = cap
            .access_mode
            .as_ref()
            .ok_or_else(|| invalid!("{field}: access_mode is required"))?;
        Ok(Self {
            access,
            mode: AccessMode::from_proto(mode.mode)?,
        })
    }

    /// Parses a required list of capabilities.
    pub fn list_from_proto(caps: &[csi::VolumeCapability], field: &str) -> Result<Vec<Self>> {
        if caps.is_empty() {
            return Err(invalid!("{field} is required and must not be empty"));
        }
        caps.iter()
            .enumerate()
            .map(|(i, c)| Self::from_proto(c, &format!("{field}[{i}]")))
            .collect()
    }

    /// True for raw block access.
    pub fn is_block(&self) -> bool {
        self.access == AccessType::Block
    }
}

/// Requested capacity in bytes; zero means unspecified.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapacityRange {
    /// Lower bound (0: none).
    pub required: u64,
    /// Upper bound (0: none).
    pub limit: u64,
}

impl CapacityRange {
    /// Parses an optional range, rejecting negative or inverted bounds.
    pub fn from_proto(r: Option<&csi::CapacityRange>) -> Result<Self> {
        let Some(r) = r else {
            return Ok(Self::default());
        };
        if r.required_bytes < 0 || r.limit_bytes < 0 {
            return Err(invalid!(
                "capacity_range must not be negative (required_bytes={}, limit_bytes={})",
                r.required_bytes,
                r.limit_bytes
            ));
        }
        let (required, limit) = (r.required_bytes as u64, r.limit_bytes as u64);
        if limit != 0 && limit < required {
            return Err(Error::OutOfRange(format!(
                "capacity_range.limit_bytes ({limit}) is smaller than required_bytes ({required})"
            )));
        }
        Ok(Self { required, limit })
    }

    /// Picks a size: `required` (or `default`, capped by `limit`, when unset),
    /// at least `min`, rounded up to `granularity`; OutOfRange when no size
    /// within `limit` works.
    pub fn choose(&self, default: u64, min: u64, granularity: u64) -> Result<u64> {
        let g = granularity.max(1);
        let want = match (self.required, self.limit) {
            (0, 0) => default,
            (0, limit) => default.min(limit),
            (required, _) => required,
        }
        .max(min);
        let rounded = want.div_ceil(g).saturating_mul(g);
        if self.limit == 0 || rounded <= self.limit {
            return Ok(rounded);
        }
        // Rounding overshot the limit: take the largest aligned size under
        // it, or the limit itself, as long as it still holds `want`.
        let aligned = self.limit / g * g;
        if aligned >= want {
            Ok(aligned)
        } else if self.limit >= want {
            Ok(self.limit)
        } else {
            Err(Error::OutOfRange(format!(
                "cannot provide {want} bytes within limit_bytes {} (minimum volume size {min})",
                self.limit
            )))
        }
    }

    /// True when `size` satisfies this range.
    pub fn admits(&self, size: u64) -> bool {
        size >= self.required && (self.limit == 0 || size <= self.limit)
    }
}

/// Where a new volume's content comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContentSource {
    /// Restore from this snapshot id.
    Snapshot(String),
    /// Clone this volume id.
    Volume(String),
}

impl ContentSource {
    /// Parses an optional content source, checking its id with `ids`.
    pub fn from_proto(
        src: Option<&csi::VolumeContentSource>,
        ids: IdCheck<'_>,
    ) -> Result<Option<Self>> {
        use csi::volume_content_source::Type;
        let Some(src) = src else { return Ok(None) };
        match &src.r#type {
            Some(Type::Snapshot(s)) => {
                let f = "volume_content_source.snapshot.snapshot_id";
                ids(&s.snapshot_id, f)?;
                Ok(Some(Self::Snapshot(s.snapshot_id.clone())))
            }
            Some(Type::Volume(v)) => {
                let f = "volume_content_source.volume.volume_id";
                ids(&v.volume_id, f)?;
                Ok(Some(Self::Volume(v.volume_id.clone())))
            }
            None => Err(invalid!(
                "volume_content_source must name a snapshot or a volume"
            )),
        }
    }

    /// Converts back to the proto form for responses.
    pub fn to_proto(&self) -> csi::VolumeContentSource {
        use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
        csi::VolumeContentSource {
            r#type: Some(match self {
                Self::Snapshot(id) => Type::Snapshot(SnapshotSource {
                    snapshot_id: id.clone(),
                }),
                Self::Volume(id) => Type::Volume(VolumeSource {
                    volume_id: id.clone(),
                }),
            }),
        }
    }
}

/// A validated CreateVolume request.
#[derive(Clone, Debug)]
pub struct CreateVolume {
    /// Idempotency name chosen by the CO.
    pub name: String,
    /// Requested size.
    pub capacity: CapacityRange,
    /// Every capability the volume must support.
    pub capabilities: Vec<Capability>,
    /// Driver parameters (StorageClass parameters without Kubernetes' own keys).
    pub parameters: BTreeMap<String, String>,
    /// `csi.storage.k8s.io/*` metadata such as the PVC name and namespace.
    pub metadata: BTreeMap<String, String>,
    /// Mutable parameters (VolumeAttributesClass).
    pub mutable_parameters: BTreeMap<String, String>,
    /// Secrets for the backend.
    pub secrets: Secrets,
    /// Snapshot or volume to copy from.
    pub source: Option<ContentSource>,
    /// Topology the CO requires or prefers.
    pub accessibility: Option<csi::TopologyRequirement>,
}

impl CreateVolume {
    /// Validates a CreateVolumeRequest; `ids` checks the source's id.
    pub fn from_proto(r: &csi::CreateVolumeRequest, ids: IdCheck<'_>) -> Result<Self> {
        let name = check_name(&r.name, "name")?;
        let capabilities =
            Capability::list_from_proto(&r.volume_capabilities, "volume_capabilities")?;
        let capacity = CapacityRange::from_proto(r.capacity_range.as_ref())?;
        let source = ContentSource::from_proto(r.volume_content_source.as_ref(), ids)?;
        let (metadata, parameters) = r
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .partition(|(k, _)| k.starts_with(K8S_PARAM_PREFIX));
        Ok(Self {
            name,
            capacity,
            capabilities,
            parameters,
            metadata,
            mutable_parameters: r.mutable_parameters.clone().into_iter().collect(),
            secrets: Secrets(r.secrets.clone()),
            source,
            accessibility: r.accessibility_requirements.clone(),
        })
    }
}

/// A validated NodeStageVolume request.
#[derive(Clone, Debug)]
pub struct StageVolume {
    /// Volume id.
    pub volume_id: String,
    /// Global mount point for this volume on the node.
    pub staging_path: PathBuf,
    /// How the volume will be used.
    pub capability: Capability,
    /// From ControllerPublishVolume.
    pub publish_context: HashMap<String, String>,
    /// From CreateVolume.
    pub volume_context: HashMap<String, String>,
    /// Secrets for the backend.
    pub secrets: Secrets,
}

/// A validated ControllerPublishVolume request.
#[derive(Clone, Debug)]
pub struct ControllerPublish {
    /// Volume id.
    pub volume_id: String,
    /// Node to make it available on (a NodeGetInfo node_id).
    pub node_id: String,
    /// How the volume will be used.
    pub capability: Capability,
    /// Publish read-only.
    pub readonly: bool,
    /// From CreateVolume.
    pub volume_context: HashMap<String, String>,
    /// Secrets for the backend.
    pub secrets: Secrets,
}

/// A validated NodeExpandVolume request.
#[derive(Clone, Debug)]
pub struct NodeExpand {
    /// Volume id.
    pub volume_id: String,
    /// Where the volume is published (or staged).
    pub path: PathBuf,
    /// Its staging path, when given.
    pub staging_path: Option<PathBuf>,
    /// Requested size.
    pub range: CapacityRange,
    /// How the volume is used, when given.
    pub capability: Option<Capability>,
    /// Secrets for the backend (an encrypted volume needs them).
    pub secrets: Secrets,
}

/// A validated NodePublishVolume request.
#[derive(Clone, Debug)]
pub struct PublishVolume {
    /// Volume id.
    pub volume_id: String,
    /// Staging path when the node stages volumes.
    pub staging_path: Option<PathBuf>,
    /// Where the workload sees the volume.
    pub target_path: PathBuf,
    /// How the volume will be used.
    pub capability: Capability,
    /// Publish read-only.
    pub readonly: bool,
    /// From ControllerPublishVolume.
    pub publish_context: HashMap<String, String>,
    /// From CreateVolume (plus pod info when podInfoOnMount is set).
    pub volume_context: HashMap<String, String>,
    /// Secrets for the backend.
    pub secrets: Secrets,
}

/// Checks a CO-chosen name: non-empty, at most 128 bytes, no control
/// characters, and nothing that could act as a path (`/`, `.`, `..`).
pub fn check_name(value: &str, field: &str) -> Result<String> {
    check_id_basic(value, field)?;
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(invalid!("{field} contains the control character {:?}", c));
    }
    if value.contains('/') || value.contains('\\') || value == "." || value == ".." {
        return Err(invalid!(
            "{field} {value:?} must not contain '/' or be '.' or '..'"
        ));
    }
    Ok(value.to_owned())
}

/// The core's rule for every plugin-issued id (volume or snapshot):
/// non-empty, at most 128 bytes, no NUL. What else an id may hold is the
/// driver's call ([`crate::backend::Plugin::check_id`]).
pub fn check_id_basic(value: &str, field: &str) -> Result<()> {
    if value.is_empty() {
        return Err(invalid!("{field} is required"));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(invalid!(
            "{field} is {} bytes long; the limit is {MAX_ID_BYTES}",
            value.len()
        ));
    }
    if value.contains('\0') {
        return Err(invalid!("{field} contains a NUL byte"));
    }
    Ok(())
}

/// The strict id rule (the default of the driver hook): the rules of names,
/// so an id can never act as a path.
pub fn check_id(value: &str, field: &str) -> Result<String> {
    check_name(value, field)
}

/// Checks ids: the core's rule, then the driver's.
pub type IdCheck<'a> = &'a (dyn Fn(&str, &str) -> Result<()> + Sync);

/// Checks a node path: absolute, normalized, no NUL, at most 4096 bytes.
pub fn check_path(value: &str, field: &str) -> Result<PathBuf> {
    if value.is_empty() {
        return Err(invalid!("{field} is required"));
    }
    if value.len() > MAX_PATH_BYTES {
        return Err(invalid!("{field} is longer than {MAX_PATH_BYTES} bytes"));
    }
    if value.contains('\0') {
        return Err(invalid!("{field} contains a NUL byte"));
    }
    let p = Path::new(value);
    if !p.is_absolute() {
        return Err(invalid!("{field} {value:?} must be an absolute path"));
    }
    if p.components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(invalid!(
            "{field} {value:?} must not contain '.' or '..' components"
        ));
    }
    Ok(p.to_path_buf())
}

/// Fills a directory template from CreateVolume's `csi.storage.k8s.io/*`
/// metadata: `${pvc.metadata.name}`, `${pvc.metadata.namespace}`,
/// `${pv.metadata.name}`. The error says what is wrong with the template.
pub fn fill_template(
    template: &str,
    metadata: &BTreeMap<String, String>,
) -> std::result::Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(len) = rest[start..].find('}') else {
            return Err("an unclosed ${".into());
        };
        let var = &rest[start + 2..start + len];
        let key = match var {
            "pvc.metadata.name" => "csi.storage.k8s.io/pvc/name",
            "pvc.metadata.namespace" => "csi.storage.k8s.io/pvc/namespace",
            "pv.metadata.name" => "csi.storage.k8s.io/pv/name",
            _ => {
                return Err(format!(
                    "unknown variable ${{{var}}}; use ${{pvc.metadata.name}}, ${{pvc.metadata.namespace}} or ${{pv.metadata.name}}"
                ));
            }
        };
        let value = metadata.get(key).ok_or_else(|| {
            format!(
                "${{{var}}} needs the {key} parameter; run the provisioner with --extra-create-metadata"
            )
        })?;
        out.push_str(value);
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A sub-directory of a volume's base (an export, a filesystem): relative,
/// normalized, never the base itself, no part `.`, `..` or longer than 255
/// bytes, no `#` (ids use it), NUL or newline, and its first part none of
/// `reserved`. The error says what is wrong.
pub fn check_sub_dir(v: &str, reserved: &[&str]) -> std::result::Result<String, String> {
    let v = v.trim_matches('/');
    if v.is_empty() {
        return Err("the volume would be the whole filesystem".into());
    }
    if v.contains(['\0', '#', '\n']) {
        return Err("must not contain '#', NUL or newlines".into());
    }
    for part in v.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Err(
                "must not contain empty, '.' or '..' parts (it must stay inside its filesystem)"
                    .into(),
            );
        }
        if part.len() > 255 {
            return Err("a path part is longer than 255 bytes".into());
        }
    }
    let first = v.split('/').next().unwrap_or_default();
    if reserved.contains(&first) {
        return Err(format!("{first} is reserved"));
    }
    Ok(v.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_are_rejected() {
        for bad in [
            "",
            "..",
            ".",
            "a/b",
            "../x",
            "a\0b",
            "a\nb",
            &"x".repeat(129),
        ] {
            assert!(check_name(bad, "name").is_err(), "{bad:?} accepted");
        }
        for good in ["pvc-1", "My Volume ü", "a..b", &"x".repeat(128)] {
            assert_eq!(check_name(good, "name").unwrap(), good);
        }
    }

    #[test]
    fn paths_must_be_absolute_and_normal() {
        assert!(check_path("relative/x", "p").is_err());
        assert!(check_path("/a/../b", "p").is_err());
        assert!(check_path("/a/./b", "p").is_ok_and(|p| p == Path::new("/a/b")));
        assert!(check_path("/a\0", "p").is_err());
        assert!(check_path("/var/lib/kubelet/pods/x/volumes", "p").is_ok());
    }

    #[test]
    fn capacity_choice() {
        let r = CapacityRange {
            required: 1000,
            limit: 0,
        };
        assert_eq!(r.choose(5, 0, 4096).unwrap(), 4096);
        let r = CapacityRange {
            required: 1000,
            limit: 2000,
        };
        assert_eq!(r.choose(5, 0, 4096).unwrap(), 2000);
        let r = CapacityRange {
            required: 0,
            limit: 100,
        };
        assert!(matches!(r.choose(0, 1 << 20, 1), Err(Error::OutOfRange(_))));
        let only_limit = CapacityRange {
            required: 0,
            limit: 100 << 20,
        };
        assert_eq!(only_limit.choose(1 << 30, 0, 4096).unwrap(), 100 << 20);
        let unaligned = CapacityRange {
            required: 10_000,
            limit: 12_000,
        };
        assert_eq!(unaligned.choose(0, 0, 4096).unwrap(), 12_000);
        let bad = csi::CapacityRange {
            required_bytes: -1,
            limit_bytes: 0,
        };
        assert!(matches!(
            CapacityRange::from_proto(Some(&bad)),
            Err(Error::InvalidArgument(_))
        ));
    }
}
