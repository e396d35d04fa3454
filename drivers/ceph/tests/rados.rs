//! The librados layer against a real single-node Ceph from
//! `tests/backends/ceph.sh`: connecting with the Secret's cephx user (a
//! wrong key is PermissionDenied, a dead monitor fails within the timeout),
//! pools, omap reads, writes and listings, and the name→id journal.

use csi_core::Error;
use csi_core::types::Secrets;
use rcsi_ceph::config::ClusterMap;
use rcsi_ceph::rados::Connection;
use rcsi_ceph::secret::Credentials;
use rcsi_tests::Backend;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn connects_reads_and_writes_omaps_and_keeps_a_journal() {
    let b = Backend::start("ceph").expect("a real Ceph from tests/backends/ceph.sh");
    let map = ClusterMap::load(Path::new(&b.var("CEPH_CONFIG_FILE"))).unwrap();
    let cluster = map.get("rcsi-test").unwrap();
    let secret = b.secrets("CEPH_SECRETS_FILE")["CreateVolumeSecret"].clone();
    let creds = Credentials::parse(&Secrets(secret)).unwrap();
    let conn = Arc::new(
        Connection::connect(&cluster.monitors, &creds, Duration::from_secs(10), true).unwrap(),
    );

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
    let e = Connection::connect(&cluster.monitors, &wrong, Duration::from_secs(10), true)
        .err()
        .unwrap();
    assert!(matches!(e, Error::PermissionDenied(_)), "{e}");
    assert!(!e.to_string().contains(&creds.key));

    journal(Arc::new(conn.ioctx(pool, None).unwrap()), pool).await;
    images(&conn.ioctx(pool, None).unwrap());

    // Pooled: one connection per cluster and user, a clear error for an
    // unknown cluster, and a call abandoned at the deadline.
    let pooled = rcsi_ceph::pool::Pool::new(map.clone(), Duration::from_secs(3));
    let a = pooled.get("rcsi-test", &creds).await.unwrap();
    let b = pooled.get("rcsi-test", &creds).await.unwrap();
    assert!(Arc::ptr_eq(&a, &b), "the connection is reused");
    let id = pooled
        .run(&a, "pool lookup", |c| c.pool_id("rbd"))
        .await
        .unwrap();
    assert_eq!(id, pool);
    let e = pooled.get("elsewhere", &creds).await.err().unwrap();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    let t = Instant::now();
    let e = pooled
        .run(&a, "a stuck call", |_| {
            std::thread::sleep(Duration::from_secs(7));
            Ok(())
        })
        .await
        .unwrap_err();
    assert!(matches!(e, Error::DeadlineExceeded(_)), "{e}");
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());

    let t = Instant::now();
    let dead = ["127.0.0.1:1".to_owned()];
    let e = Connection::connect(&dead, &creds, Duration::from_secs(3), true)
        .err()
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "a dead monitor took {:?}",
        t.elapsed()
    );
    eprintln!("dead monitor: {e} after {:?}", t.elapsed());
}

/// Reservations survive as the core's journal trait promises, and a crash
/// between the directory write and the entry write still finds the id.
async fn journal(io: Arc<rcsi_ceph::rados::IoCtx>, pool: i64) {
    use csi_core::journal::{NameJournal, Reservation};
    use rcsi_ceph::journal::{Kind, OmapJournal};
    let j = OmapJournal::new(
        io.clone(),
        "rcsi-test",
        pool,
        Kind::Volumes,
        Duration::from_secs(10),
    );
    let id = j.id_for("pvc-1").to_string();
    assert_eq!(
        j.id_for("pvc-1").to_string(),
        id,
        "ids derive from the name"
    );
    let r = Reservation {
        name: "pvc-1".into(),
        id: id.clone(),
        attrs: [
            ("image".into(), "csi-vol-1".into()),
            ("size".into(), "1024".into()),
        ]
        .into(),
    };
    assert_eq!(j.reserve(r.clone()).await.unwrap(), r);
    let mut other = r.clone();
    other.attrs.clear();
    assert_eq!(
        j.reserve(other).await.unwrap(),
        r,
        "a second reserve returns the first"
    );
    assert_eq!(j.lookup("pvc-1").await.unwrap(), Some(r.clone()));
    assert_eq!(j.lookup_id(&id).await.unwrap(), Some(r.clone()));
    let mut grown = r.clone();
    grown.attrs.remove("image");
    grown.attrs.insert("size".into(), "2048".into());
    j.update(grown.clone()).await.unwrap();
    assert_eq!(j.lookup("pvc-1").await.unwrap(), Some(grown.clone()));
    assert_eq!(j.list().await.unwrap(), vec![grown]);
    j.release("pvc-1").await.unwrap();
    j.release("pvc-1").await.unwrap();
    assert_eq!(j.lookup("pvc-1").await.unwrap(), None);
    assert_eq!(j.lookup_id(&id).await.unwrap(), None);
    assert!(j.list().await.unwrap().is_empty());
    assert_eq!(
        j.lookup_id("0001-0003-abc-0000000000000001-6a1f3c52-9d0e-4b7a-8e21-5f4c0b9da713")
            .await
            .unwrap(),
        None
    );

    // A crash after the directory write: the name still finds its id.
    let id2 = j.id_for("pvc-2");
    let uuid = id2.uuid.hyphenated().to_string();
    io.omap_update("csi.volumes.rcsi", &[("name.pvc-2", uuid.as_bytes())], &[])
        .unwrap();
    let found = j
        .lookup("pvc-2")
        .await
        .unwrap()
        .expect("the half-written reservation");
    assert_eq!(found.id, id2.to_string());
    assert!(found.attrs.is_empty());
    j.release("pvc-2").await.unwrap();
    assert!(
        io.omap_all("csi.volumes.rcsi").unwrap().is_empty(),
        "nothing left in the directory"
    );
}

/// An RBD image created with features, grown, and deleted through the
/// trash (move, then purge by id).
fn images(io: &rcsi_ceph::rados::IoCtx) {
    use rcsi_ceph::librbd::{self as rbd, Image, ImageSpec};
    let spec = ImageSpec {
        features: 1, // layering
        order: 22,
        ..Default::default()
    };
    rbd::create(io, "csi-vol-test", 64 << 20, &spec).unwrap();
    let e = rbd::create(io, "csi-vol-test", 64 << 20, &spec).unwrap_err();
    assert!(matches!(e, Error::AlreadyExists(_)), "{e}");
    let img = Image::open(io, "csi-vol-test").unwrap();
    assert_eq!(img.size().unwrap(), 64 << 20);
    assert_eq!(img.features().unwrap() & 1, 1);
    img.resize(128 << 20).unwrap();
    assert_eq!(img.size().unwrap(), 128 << 20);
    let id = img.id().unwrap();
    assert!(!id.is_empty());
    drop(img);
    rbd::trash_move(io, "csi-vol-test").unwrap();
    assert!(matches!(
        Image::open(io, "csi-vol-test"),
        Err(Error::NotFound(_))
    ));
    rbd::trash_remove(io, &id).unwrap();
    rbd::trash_remove(io, &id).unwrap();
}
