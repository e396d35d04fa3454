//! Persistent records of volumes and snapshots.

use csi_core::types::ContentSource;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How a volume's data is stored on the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Backing {
    /// A directory on the base filesystem, bind-mounted.
    Directory,
    /// A sparse file on a loop device, handed out as a raw block device.
    Block,
    /// A sparse file on a loop device holding its own filesystem.
    Filesystem {
        /// ext4, xfs, ...
        fs_type: String,
    },
}

impl Backing {
    /// True when the data is an image file rather than a directory.
    pub fn is_image(&self) -> bool {
        !matches!(self, Backing::Directory)
    }

    /// Short human name.
    pub fn describe(&self) -> String {
        match self {
            Backing::Directory => "directory".into(),
            Backing::Block => "block".into(),
            Backing::Filesystem { fs_type } => format!("file ({fs_type})"),
        }
    }
}

/// Where a volume's initial content came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceMeta {
    /// Restored from a snapshot.
    Snapshot(String),
    /// Cloned from a volume.
    Volume(String),
}

impl From<&ContentSource> for SourceMeta {
    fn from(s: &ContentSource) -> Self {
        match s {
            ContentSource::Snapshot(id) => SourceMeta::Snapshot(id.clone()),
            ContentSource::Volume(id) => SourceMeta::Volume(id.clone()),
        }
    }
}

impl From<&SourceMeta> for ContentSource {
    fn from(s: &SourceMeta) -> Self {
        match s {
            SourceMeta::Snapshot(id) => ContentSource::Snapshot(id.clone()),
            SourceMeta::Volume(id) => ContentSource::Volume(id.clone()),
        }
    }
}

/// One volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    /// Plugin-issued id (`lv-<32 hex>`).
    pub id: String,
    /// The CO's idempotency name.
    pub name: String,
    /// Size in bytes.
    pub capacity: u64,
    /// Storage layout.
    pub backing: Backing,
    /// Driver parameters it was created with.
    pub parameters: BTreeMap<String, String>,
    /// Initial content source.
    pub source: Option<SourceMeta>,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
    /// Project quota id, when the size is enforced by a project quota.
    pub project_id: Option<u32>,
    /// Its data is in a shard directory, `volumes/<x>/`; volumes made before
    /// shards keep theirs in `volumes/`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sharded: bool,
}

/// One snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Plugin-issued id (`ls-<32 hex>`).
    pub id: String,
    /// The CO's idempotency name.
    pub name: String,
    /// Volume it was taken from.
    pub source_volume_id: String,
    /// Size of the source volume when taken.
    pub size: u64,
    /// Layout of the copied data (same as the source volume).
    pub backing: Backing,
    /// Creation time, seconds and nanoseconds since the epoch.
    pub created_unix: u64,
    /// Nanosecond part of the creation time.
    pub created_nanos: u32,
    /// The group snapshot it belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
}

/// One volume group snapshot: member snapshots cut at one point in time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMeta {
    /// Plugin-issued id (`lg-<32 hex>`).
    pub id: String,
    /// The CO's idempotency name.
    pub name: String,
    /// Volumes it was taken of, in request order.
    pub source_volume_ids: Vec<String>,
    /// Its member snapshots, in the same order.
    pub snapshot_ids: Vec<String>,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
    /// Nanosecond part of the creation time.
    pub created_nanos: u32,
}
