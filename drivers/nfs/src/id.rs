//! Volume and snapshot ids, and where a node finds a volume.
//!
//! Volume ids are `v1#SERVER#SHARE#SUBDIR#UUID` and snapshot ids
//! `v1#SERVER#SHARE#UUID`. The uuid is derived from the CO's name (UUIDv5),
//! so a retried CreateVolume finds the same id even before its record is
//! written. Parsing is strict: a malformed id never yields a path.

use crate::params::{check_server, check_share, check_sub_dir};
use csi_core::types::MAX_ID_BYTES;
use std::collections::HashMap;
use uuid::Uuid;

const VERSION: &str = "v1";
const VOLUMES: Uuid = Uuid::from_u128(0x6a3c_6f1e_2b8d_4f52_9a77_1d0e_4c5b_9f01);
const SNAPSHOTS: Uuid = Uuid::from_u128(0x0b5e_2c44_71a9_4e3b_8d10_5f6a_7c2e_3d02);

/// A volume of this driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeId {
    /// NFS server.
    pub server: String,
    /// Export path.
    pub share: String,
    /// Directory under the export.
    pub sub_dir: String,
    /// Name-derived uuid; names the volume's record.
    pub uuid: Uuid,
}

impl VolumeId {
    /// The id of the volume named `name`.
    pub fn new(server: &str, share: &str, sub_dir: &str, name: &str) -> Self {
        Self {
            server: server.into(),
            share: share.into(),
            sub_dir: sub_dir.into(),
            uuid: volume_uuid(name),
        }
    }

    /// Parses an id; None when it is not one of ours.
    pub fn parse(id: &str) -> Option<Self> {
        let parts: Vec<&str> = id.split('#').collect();
        let [VERSION, server, share, sub_dir, uuid] = parts[..] else {
            return None;
        };
        Some(Self {
            server: check_server(server).ok().filter(|s| s == server)?,
            share: check_share(share).ok().filter(|s| s == share)?,
            sub_dir: check_sub_dir("subDir", sub_dir)
                .ok()
                .filter(|s| s == sub_dir)?,
            uuid: parse_uuid(uuid)?,
        })
    }

    /// The id's text.
    pub fn encode(&self) -> String {
        format!(
            "{VERSION}#{}#{}#{}#{}",
            self.server,
            self.share,
            self.sub_dir,
            self.uuid.simple()
        )
    }

    /// True when the encoded id fits the CSI limit.
    pub fn fits(&self) -> bool {
        self.encode().len() <= MAX_ID_BYTES
    }

    /// Shortens a sub-directory taken from the volume name until the id
    /// fits: a prefix of the name, `-` and 16 hex digits of its uuid, the
    /// same on every retry. False when even that cannot fit.
    pub fn shorten_sub_dir(&mut self) -> bool {
        let over = self.encode().len().saturating_sub(MAX_ID_BYTES);
        if over == 0 {
            return true;
        }
        let tag = format!("-{}", &self.uuid.simple().to_string()[..16]);
        let Some(mut keep) = self.sub_dir.len().checked_sub(over + tag.len()) else {
            return false;
        };
        while !self.sub_dir.is_char_boundary(keep) {
            keep -= 1;
        }
        if keep == 0 {
            return false;
        }
        self.sub_dir = format!("{}{tag}", &self.sub_dir[..keep]);
        self.fits()
    }
}

/// A snapshot of this driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotId {
    /// NFS server.
    pub server: String,
    /// Export path.
    pub share: String,
    /// Name-derived uuid; names the snapshot's record and data.
    pub uuid: Uuid,
}

impl SnapshotId {
    /// The id of the snapshot named `name` stored on `server:share`.
    pub fn new(server: &str, share: &str, name: &str) -> Self {
        Self {
            server: server.into(),
            share: share.into(),
            uuid: Uuid::new_v5(&SNAPSHOTS, name.as_bytes()),
        }
    }

    /// Parses an id; None when it is not one of ours.
    pub fn parse(id: &str) -> Option<Self> {
        let parts: Vec<&str> = id.split('#').collect();
        let [VERSION, server, share, uuid] = parts[..] else {
            return None;
        };
        Some(Self {
            server: check_server(server).ok().filter(|s| s == server)?,
            share: check_share(share).ok().filter(|s| s == share)?,
            uuid: parse_uuid(uuid)?,
        })
    }

    /// The id's text.
    pub fn encode(&self) -> String {
        format!(
            "{VERSION}#{}#{}#{}",
            self.server,
            self.share,
            self.uuid.simple()
        )
    }
}

/// The uuid of volume `name`.
pub fn volume_uuid(name: &str) -> Uuid {
    Uuid::new_v5(&VOLUMES, name.as_bytes())
}

/// The uuid of snapshot `name`.
pub fn snapshot_uuid(name: &str) -> Uuid {
    Uuid::new_v5(&SNAPSHOTS, name.as_bytes())
}

fn parse_uuid(s: &str) -> Option<Uuid> {
    // Only the 32-digit form we write, so each uuid has one spelling.
    (s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then(|| Uuid::try_parse(s).ok())
    .flatten()
}

/// Where the node mounts a volume from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// NFS server.
    pub server: String,
    /// Path on the server (share plus sub-directory).
    pub path: String,
}

impl Source {
    /// The `server:/path` argument of mount(8).
    pub fn device(&self) -> String {
        if self.server.contains(':') {
            format!("[{}]:{}", self.server, self.path)
        } else {
            format!("{}:{}", self.server, self.path)
        }
    }

    /// Finds the source of a volume: `server` and `share` (and `subDir`) in
    /// the volume context win (static PVs, inline volumes); else our id, or
    /// a hand-written handle `server:/path`.
    pub fn find(volume_id: &str, context: &HashMap<String, String>) -> Result<Self, String> {
        let get = |k: &str| {
            context
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.as_str())
        };
        if let (Some(server), Some(share)) = (get("server"), get("share")) {
            let server = check_server(server).map_err(|e| e.to_string())?;
            let share = check_share(share).map_err(|e| e.to_string())?;
            let path = match get("subDir").filter(|s| !s.is_empty()) {
                Some(sub) => {
                    let sub = check_sub_dir("subDir", sub).map_err(|e| e.to_string())?;
                    join(&share, &sub)
                }
                None => share,
            };
            return Ok(Self { server, path });
        }
        if let Some(v) = VolumeId::parse(volume_id) {
            return Ok(Self {
                path: join(&v.share, &v.sub_dir),
                server: v.server,
            });
        }
        if let Some((server, path)) = split_handle(volume_id) {
            let server = check_server(server).map_err(|e| e.to_string())?;
            let path = check_share(path).map_err(|e| e.to_string())?;
            return Ok(Self { server, path });
        }
        Err(format!(
            "volume {volume_id:?} is neither an nfs.rcsi.io id nor server:/path, and its volume attributes name no server and share"
        ))
    }
}

/// Splits `server:/path` or `[v6addr]:/path`.
fn split_handle(h: &str) -> Option<(&str, &str)> {
    if let Some(rest) = h.strip_prefix('[') {
        let (addr, path) = rest.split_once("]:")?;
        return Some((addr, path));
    }
    let i = h.find(":/")?;
    Some((&h[..i], &h[i + 1..]))
}

fn join(share: &str, sub: &str) -> String {
    if share == "/" {
        format!("/{sub}")
    } else {
        format!("{share}/{sub}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_name_gets_a_shorter_directory_and_an_id_that_fits() {
        let name = format!("pvc-é{}", "a".repeat(122));
        assert_eq!(name.len(), 128);
        let mut v = VolumeId::new("nfs.example.com", "/exports/k8s", &name, &name);
        assert!(!v.fits());
        assert!(v.shorten_sub_dir());
        assert_eq!(v.encode().len(), MAX_ID_BYTES);
        assert!(name.starts_with(&v.sub_dir[..v.sub_dir.len() - 17]));
        assert!(v.sub_dir.ends_with(&v.uuid.simple().to_string()[..16]));
        assert_eq!(VolumeId::parse(&v.encode()), Some(v.clone()));
        // The same on a retry; another long name with the same start differs.
        let mut again = VolumeId::new("nfs.example.com", "/exports/k8s", &name, &name);
        assert!(again.shorten_sub_dir());
        assert_eq!(again, v);
        let other = format!("pvc-é{}b", "a".repeat(121));
        let mut o = VolumeId::new("nfs.example.com", "/exports/k8s", &other, &other);
        assert!(o.shorten_sub_dir());
        assert_ne!(o.sub_dir, v.sub_dir);
        // A short id is left alone; a server name too long for any id fails.
        let mut short = VolumeId::new("s", "/e", "pvc-1", "pvc-1");
        assert!(short.shorten_sub_dir());
        assert_eq!(short.sub_dir, "pvc-1");
        let mut hopeless = VolumeId::new(&"s".repeat(100), "/e", "pvc-1", "pvc-1");
        assert!(!hopeless.shorten_sub_dir());
    }

    #[test]
    fn ids_round_trip_and_reject_anything_else() {
        let v = VolumeId::new("10.0.0.5", "/exports/k8s", "team/pvc-1", "pvc-1");
        let id = v.encode();
        assert!(v.fits());
        assert_eq!(VolumeId::parse(&id), Some(v.clone()));
        assert_eq!(
            VolumeId::new("10.0.0.5", "/exports/k8s", "x", "pvc-1").uuid,
            v.uuid
        );
        for bad in [
            "",
            "v1",
            "v2#a#/s#d#00000000000000000000000000000000",
            "v1#a#/s#../d#6a3c6f1e2b8d4f529a771d0e4c5b9f01",
            "v1#a#/s#/d#6a3c6f1e2b8d4f529a771d0e4c5b9f01",
            "v1#a#s#d#6a3c6f1e2b8d4f529a771d0e4c5b9f01",
            "v1#a#/s#d#6A3C6F1E2B8D4F529A771D0E4C5B9F01",
            "v1#a#/s#d#6a3c6f1e-2b8d-4f52-9a77-1d0e4c5b9f01",
            "v1#a#/s#d#x",
            "v1#a/b#/s#d#6a3c6f1e2b8d4f529a771d0e4c5b9f01",
            "v1#a#/s#.rcsi#6a3c6f1e2b8d4f529a771d0e4c5b9f01",
            "v1#a#/s#d#6a3c6f1e2b8d4f529a771d0e4c5b9f01#x",
            "v1#a#/s/#d#6a3c6f1e2b8d4f529a771d0e4c5b9f01",
        ] {
            assert_eq!(VolumeId::parse(bad), None, "{bad} parsed");
        }
        let s = SnapshotId::new("a", "/s", "snap");
        assert_eq!(SnapshotId::parse(&s.encode()), Some(s));
        assert_eq!(SnapshotId::parse(&id), None);
        assert_eq!(
            VolumeId::parse(&SnapshotId::new("a", "/s", "x").encode()),
            None
        );
    }

    #[test]
    fn node_sources() {
        let none = HashMap::new();
        let v = VolumeId::new("nas", "/e", "a/b", "n").encode();
        assert_eq!(Source::find(&v, &none).unwrap().device(), "nas:/e/a/b");
        assert_eq!(
            Source::find("nas:/exports/x", &none).unwrap().device(),
            "nas:/exports/x"
        );
        assert_eq!(
            Source::find("[fd00::1]:/x", &none).unwrap().device(),
            "[fd00::1]:/x"
        );
        assert!(Source::find("nas:/a/../etc", &none).is_err());
        assert!(Source::find("junk", &none).is_err());
        let ctx: HashMap<String, String> =
            [("server", "10.1.1.1"), ("share", "/"), ("subdir", "x")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        assert_eq!(
            Source::find("csi-abc", &ctx).unwrap().device(),
            "10.1.1.1:/x"
        );
    }
}
