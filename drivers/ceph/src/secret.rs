//! The cephx credentials a call carries in its Secret (`userID`,
//! `userKey`, as ceph-csi's Secrets name them; `adminID`/`adminKey` are
//! accepted as the same). Debug never shows the key.

use crate::error::CephError;
use csi_core::types::Secrets;
use std::fmt;

/// A cephx user and its key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Credentials {
    /// User id without the `client.` prefix.
    pub user: String,
    /// The base64 cephx key.
    pub key: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Reads `userID`/`userKey` (or `adminID`/`adminKey`) from a Secret.
    pub fn parse(secrets: &Secrets) -> Result<Self, CephError> {
        let get = |a: &str, b: &str| {
            secrets
                .0
                .get(a)
                .or_else(|| secrets.0.get(b))
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let user = get("userID", "adminID").ok_or(CephError::MissingKey("userID"))?;
        let key = get("userKey", "adminKey").ok_or(CephError::MissingKey("userKey"))?;
        let user = user.strip_prefix("client.").unwrap_or(&user).to_owned();
        if !user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(CephError::BadKey {
                key: "userID",
                why: format!("{user:?} is not a cephx user name"),
            });
        }
        let b64 = key.len() % 4 == 0
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '='));
        if !b64 {
            return Err(CephError::BadKey {
                key: "userKey",
                why: "not a base64 cephx key".into(),
            });
        }
        Ok(Self { user, key })
    }
}

/// The credentials of a call's Secret; `kind` names the Secret for people.
pub(crate) fn creds_of(
    secrets: &csi_core::types::Secrets,
    call: &'static str,
    kind: &'static str,
) -> csi_core::Result<Credentials> {
    if secrets.0.is_empty() {
        return Err(crate::CephError::NoSecret { call, kind }.into());
    }
    Ok(Credentials::parse(secrets)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(kv: &[(&str, &str)]) -> Secrets {
        Secrets(
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn credentials_parse_and_hide_the_key() {
        let key = "AQBx2ZxlAAAAABAAk0wE4bRTCx5uTB7f0dfFcg==";
        let c =
            Credentials::parse(&secrets(&[("userID", "client.csi"), ("userKey", key)])).unwrap();
        assert_eq!(c.user, "csi");
        assert!(!format!("{c:?}").contains("AQBx"));
        let admin =
            Credentials::parse(&secrets(&[("adminID", "admin"), ("adminKey", key)])).unwrap();
        assert_eq!(admin.user, "admin");
        let e = Credentials::parse(&secrets(&[("userID", "csi")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"userKey\""), "{e}");
        let e = Credentials::parse(&secrets(&[("userID", "csi"), ("userKey", "not base64!")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("userKey") && !e.contains("not base64!"), "{e}");
    }
}
