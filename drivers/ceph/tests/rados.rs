//! The librados layer against a real single-node Ceph from
//! `tests/backends/ceph.sh`: connecting with the Secret's cephx user (a
//! wrong key is PermissionDenied, a dead monitor fails within the timeout),
//! pools, and omap reads, writes and listings.

use csi_core::Error;
use csi_core::types::Secrets;
use rcsi_ceph::config::ClusterMap;
use rcsi_ceph::rados::Connection;
use rcsi_ceph::secret::Credentials;
use rcsi_tests::Backend;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn connects_reads_and_writes_omaps() {
    let b = Backend::start("ceph").expect("a real Ceph from tests/backends/ceph.sh");
    let map = ClusterMap::load(Path::new(&b.var("CEPH_CONFIG_FILE"))).unwrap();
    let cluster = map.get("rcsi-test").unwrap();
    let secret = b.secrets("CEPH_SECRETS_FILE")["CreateVolumeSecret"].clone();
    let creds = Credentials::parse(&Secrets(secret)).unwrap();
    let conn =
        Arc::new(Connection::connect(&cluster.monitors, &creds, Duration::from_secs(10)).unwrap());

    let pool = conn.pool_id("rbd").unwrap();
    assert!(pool > 0);
    assert!(matches!(
        conn.pool_id("no-such-pool"),
        Err(Error::NotFound(_))
    ));
    let io = conn.ioctx(pool, None).unwrap();
    assert!(
        io.omap_get("rcsi.test", &["a"]).unwrap().is_empty(),
        "a missing object is empty"
    );
    io.omap_update("rcsi.test", &[("a", b"1"), ("b", b"2")], &[])
        .unwrap();
    let got = io.omap_get("rcsi.test", &["a", "c"]).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got["a"], b"1");
    let many: Vec<(String, Vec<u8>)> = (0..2500).map(|i| (format!("k{i:05}"), vec![1])).collect();
    let refs: Vec<(&str, &[u8])> = many
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    io.omap_update("rcsi.test", &refs, &["b"]).unwrap();
    let all = io.omap_all("rcsi.test").unwrap();
    assert_eq!(all.len(), 2501, "listed past several pages");
    assert!(!all.contains_key("b"), "removed in the same operation");
    io.remove("rcsi.test").unwrap();
    io.remove("rcsi.test").unwrap();
    let (out, _) = conn
        .mon_command(r#"{"prefix": "osd pool ls", "format": "json"}"#)
        .unwrap();
    assert!(out.contains("\"rbd\""), "{out}");

    let wrong = Credentials {
        key: "AQBx2ZxlAAAAABAAk0wE4bRTCx5uTB7f0dfFcg==".into(),
        ..creds.clone()
    };
    let e = Connection::connect(&cluster.monitors, &wrong, Duration::from_secs(10))
        .err()
        .unwrap();
    assert!(matches!(e, Error::PermissionDenied(_)), "{e}");
    assert!(!e.to_string().contains(&creds.key));

    let t = Instant::now();
    let dead = ["127.0.0.1:1".to_owned()];
    let e = Connection::connect(&dead, &creds, Duration::from_secs(3))
        .err()
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "a dead monitor took {:?}",
        t.elapsed()
    );
    eprintln!("dead monitor: {e} after {:?}", t.elapsed());
}
