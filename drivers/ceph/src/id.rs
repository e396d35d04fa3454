//! Volume and snapshot ids in ceph-csi's layout, so operators read them the
//! same way: `0001-LLLL-CLUSTER-PPPPPPPPPPPPPPPP-UUID`, with the version,
//! the cluster id's length (4 hex digits), the cluster id, the pool id (16
//! hex digits) and the uuid of the journal entry; at most 128 bytes, parsed
//! strictly.

use crate::config::MAX_CLUSTER_ID;
use std::fmt;
use uuid::Uuid;

/// An id of an RBD image or a CephFS subvolume (or a snapshot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CephId {
    /// The `clusterID` of the cluster map.
    pub cluster: String,
    /// The pool holding the journal entry (RBD: the image's pool; CephFS:
    /// the metadata pool).
    pub pool: i64,
    /// The journal entry.
    pub uuid: Uuid,
}

impl fmt::Display for CephId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "0001-{:04x}-{}-{:016x}-{}",
            self.cluster.len(),
            self.cluster,
            self.pool,
            self.uuid.hyphenated()
        )
    }
}

impl CephId {
    /// Parses an id this layer made; None for anything else.
    pub fn parse(id: &str) -> Option<Self> {
        let rest = id.strip_prefix("0001-")?;
        let len = usize::from_str_radix(rest.get(..4)?, 16).ok()?;
        if len == 0 || len > MAX_CLUSTER_ID || rest.as_bytes().get(4) != Some(&b'-') {
            return None;
        }
        let rest = &rest[5..];
        let cluster = rest.get(..len)?;
        let rest = rest.get(len..)?.strip_prefix('-')?;
        let (pool, uuid) = (rest.get(..16)?, rest.get(16..)?.strip_prefix('-')?);
        let hex = |s: &str| {
            s.chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        };
        if !hex(pool) || uuid.len() != 36 || uuid.chars().any(|c| c.is_ascii_uppercase()) {
            return None;
        }
        let ok_cluster = cluster
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !ok_cluster {
            return None;
        }
        let pool = i64::from_str_radix(pool, 16).ok()?;
        let uuid = Uuid::try_parse(uuid).ok()?;
        Some(Self {
            cluster: cluster.to_owned(),
            pool,
            uuid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_parse_strictly() {
        let id = CephId {
            cluster: "rook-ceph".into(),
            pool: 2,
            uuid: Uuid::parse_str("6a1f3c52-9d0e-4b7a-8e21-5f4c0b9da713").unwrap(),
        };
        let s = id.to_string();
        assert_eq!(
            s,
            "0001-0009-rook-ceph-0000000000000002-6a1f3c52-9d0e-4b7a-8e21-5f4c0b9da713"
        );
        assert_eq!(CephId::parse(&s), Some(id.clone()));
        let longest = CephId {
            cluster: "c".repeat(MAX_CLUSTER_ID),
            ..id.clone()
        };
        assert!(longest.to_string().len() <= 128);
        assert_eq!(CephId::parse(&longest.to_string()), Some(longest));
        for bad in [
            s.replacen("0001", "0002", 1),
            s.replacen("0009", "0008", 1),
            s.replacen("0009", "000g", 1),
            s.replacen("0000000000000002", "000000000000002", 1),
            s.replacen("6a1f3c52", "6A1F3C52", 1),
            format!("{s}-x"),
            s[..s.len() - 1].to_owned(),
            "0001-0000--0000000000000002-6a1f3c52-9d0e-4b7a-8e21-5f4c0b9da713".into(),
            "0001-0003-a/b-0000000000000002-6a1f3c52-9d0e-4b7a-8e21-5f4c0b9da713".into(),
            "pvc-123".into(),
        ] {
            assert_eq!(CephId::parse(&bad), None, "{bad}");
        }
    }
}
