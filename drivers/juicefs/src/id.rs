//! Volume ids: `v1#FS#UUID`, the filesystem's name and a UUIDv5 of the
//! CO's volume name, so every retry of a CreateVolume finds the same id.

use std::fmt;
use uuid::Uuid;

/// Namespace of the UUIDs derived from CO volume names.
const NAMESPACE: Uuid = Uuid::from_u128(0x6a1f_3c52_9d0e_4b7a_8e21_5f4c_0b9d_a713);

/// A volume id of this driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeId {
    /// The filesystem's name (the Secret's `name`).
    pub fs: String,
    /// The volume's record on that filesystem.
    pub uuid: Uuid,
}

impl VolumeId {
    /// The id of the volume named `name` on filesystem `fs`.
    pub fn for_name(fs: &str, name: &str) -> Self {
        Self {
            fs: fs.to_owned(),
            uuid: Uuid::new_v5(&NAMESPACE, name.as_bytes()),
        }
    }

    /// Parses an id this driver made; None for anything else (a static
    /// volume's free-form handle).
    pub fn parse(id: &str) -> Option<Self> {
        let mut parts = id.split('#');
        let (Some("v1"), Some(fs), Some(uuid), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let fs_ok = (3..=63).contains(&fs.len())
            && fs
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        let simple = uuid.len() == 32
            && uuid
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
        if !fs_ok || !simple {
            return None;
        }
        Some(Self {
            fs: fs.to_owned(),
            uuid: Uuid::parse_str(uuid).ok()?,
        })
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v1#{}#{}", self.fs, self.uuid.simple())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_parse_strictly() {
        let id = VolumeId::for_name("team-fs", "pvc-1");
        assert_eq!(id, VolumeId::for_name("team-fs", "pvc-1"));
        assert_ne!(id.uuid, VolumeId::for_name("team-fs", "pvc-2").uuid);
        let s = id.to_string();
        assert!(s.len() <= 128);
        assert_eq!(VolumeId::parse(&s), Some(id.clone()));
        let u = id.uuid.simple().to_string();
        for bad in [
            format!("v2#team-fs#{u}"),
            format!("v1#Team#{u}"),
            format!("v1#team-fs#{}", u.to_uppercase()),
            format!("v1#team-fs#{u}#x"),
            format!("v1#team-fs#{}", &u[1..]),
            format!("v1##{u}"),
            "my-static-volume".into(),
        ] {
            assert_eq!(VolumeId::parse(&bad), None, "{bad}");
        }
    }
}
