//! What local-path persists: its volume and snapshot records, kept in the
//! core's crash-safe journal ([`csi_core::journal::Log`]).

use crate::meta::{GroupMeta, SnapshotMeta, VolumeMeta};
use csi_core::journal::LogState;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// One metadata change.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// Create or replace a volume record.
    PutVolume(VolumeMeta),
    /// Forget a volume.
    DeleteVolume {
        /// Volume id.
        id: String,
    },
    /// Create or replace a snapshot record.
    PutSnapshot(SnapshotMeta),
    /// Forget a snapshot.
    DeleteSnapshot {
        /// Snapshot id.
        id: String,
    },
    /// Record a group snapshot and all its members at once.
    PutGroup {
        /// The group.
        group: GroupMeta,
        /// Its member snapshots.
        snapshots: Vec<SnapshotMeta>,
    },
    /// Forget a group snapshot and its members.
    DeleteGroup {
        /// Group snapshot id.
        id: String,
    },
    /// Drop the tombstones of deletions whose removal is on disk.
    Settled {
        /// Volume and snapshot ids.
        ids: Vec<String>,
    },
}

/// Everything the driver persists (the snapshot file's format).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    /// Volumes by id.
    pub volumes: BTreeMap<String, VolumeMeta>,
    /// Snapshots by id.
    pub snapshots: BTreeMap<String, SnapshotMeta>,
    /// Group snapshots by id.
    #[serde(default)]
    pub groups: BTreeMap<String, GroupMeta>,
    /// Ids of deleted volumes and snapshots whose removal may not be on disk
    /// yet: start-up recovery removes data left under them.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub deleted: BTreeSet<String>,
}

/// [`State`] plus lookups by name, kept in step by [`LogState::apply`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(from = "State", into = "State")]
pub struct Index {
    /// The persisted records.
    pub state: State,
    /// Volume id by name.
    pub volume_by_name: HashMap<String, String>,
    /// Snapshot id by name.
    pub snapshot_by_name: HashMap<String, String>,
    /// Group snapshot id by name.
    pub group_by_name: HashMap<String, String>,
}

impl From<State> for Index {
    fn from(state: State) -> Self {
        let volume_by_name = state
            .volumes
            .values()
            .map(|v| (v.name.clone(), v.id.clone()))
            .collect();
        let snapshot_by_name = state
            .snapshots
            .values()
            .map(|s| (s.name.clone(), s.id.clone()))
            .collect();
        let group_by_name = state
            .groups
            .values()
            .map(|g| (g.name.clone(), g.id.clone()))
            .collect();
        Self {
            state,
            volume_by_name,
            snapshot_by_name,
            group_by_name,
        }
    }
}

impl From<Index> for State {
    fn from(i: Index) -> Self {
        i.state
    }
}

impl LogState for Index {
    type Change = Change;

    fn apply(&mut self, change: Change) {
        match change {
            Change::PutVolume(v) => {
                self.volume_by_name.insert(v.name.clone(), v.id.clone());
                self.state.volumes.insert(v.id.clone(), v);
            }
            Change::DeleteVolume { id } => {
                if let Some(v) = self.state.volumes.remove(&id) {
                    self.volume_by_name.remove(&v.name);
                    self.state.deleted.insert(id);
                }
            }
            Change::PutSnapshot(s) => {
                self.snapshot_by_name.insert(s.name.clone(), s.id.clone());
                self.state.snapshots.insert(s.id.clone(), s);
            }
            Change::DeleteSnapshot { id } => {
                if let Some(s) = self.state.snapshots.remove(&id) {
                    self.snapshot_by_name.remove(&s.name);
                    self.state.deleted.insert(id);
                }
            }
            Change::PutGroup { group, snapshots } => {
                for s in snapshots {
                    self.apply(Change::PutSnapshot(s));
                }
                self.group_by_name
                    .insert(group.name.clone(), group.id.clone());
                self.state.groups.insert(group.id.clone(), group);
            }
            Change::DeleteGroup { id } => {
                if let Some(g) = self.state.groups.remove(&id) {
                    self.group_by_name.remove(&g.name);
                    for s in g.snapshot_ids {
                        self.apply(Change::DeleteSnapshot { id: s });
                    }
                }
            }
            Change::Settled { ids } => {
                for id in ids {
                    self.state.deleted.remove(&id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::Backing;
    use csi_core::journal::Log;

    fn vol(id: &str) -> VolumeMeta {
        VolumeMeta {
            id: id.into(),
            name: format!("name-{id}"),
            capacity: 1 << 20,
            backing: Backing::Directory,
            parameters: Default::default(),
            source: None,
            created_unix: 0,
            project_id: None,
            sharded: true,
        }
    }

    #[tokio::test]
    async fn metadata_of_the_line_journal_is_read_and_indexed_by_name() {
        let d = tempfile::tempdir().unwrap();
        // The format written before the core journal: a snapshot plus JSON lines.
        let state = State {
            volumes: [("a".to_owned(), vol("a"))].into(),
            snapshots: BTreeMap::new(),
            groups: BTreeMap::new(),
            deleted: BTreeSet::new(),
        };
        std::fs::write(
            d.path().join("state.json"),
            serde_json::to_vec(&state).unwrap(),
        )
        .unwrap();
        let mut lines = Vec::new();
        for c in [
            Change::PutVolume(vol("b")),
            Change::DeleteVolume { id: "a".into() },
        ] {
            serde_json::to_writer(&mut lines, &c).unwrap();
            lines.push(b'\n');
        }
        std::fs::write(d.path().join("journal.log"), lines).unwrap();
        let log = Log::<Index>::open(d.path()).unwrap();
        log.commit(Change::PutVolume(vol("c"))).await.unwrap();
        let idx = log.read();
        assert_eq!(idx.state.volumes.keys().collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(idx.volume_by_name["name-c"], "c");
        assert!(!idx.volume_by_name.contains_key("name-a"));
    }
}
