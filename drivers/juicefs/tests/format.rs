//! Formatting on first use, directory quotas and mounts that outlive their starter, against real metadata
//! engines (redis and sqlite3 from `tests/backends/juicefs.sh`) and file
//! storage: idempotent, never a reformat, errors naming the Secret key,
//! secrets only in the environment.

use csi_core::daemon::SystemSpawner;
use csi_core::exec::{Command, Exec, Output, SystemExec};
use csi_core::mount::SystemMounter;
use csi_core::types::Secrets;
use rcsi_juicefs::mounts::Health;
use rcsi_juicefs::{Cli, FsMounts, FsSecret};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Runs commands for real and keeps what each was given.
#[derive(Default)]
struct Watch(Mutex<Vec<Command>>);

#[async_trait::async_trait]
impl Exec for Watch {
    async fn output(&self, cmd: &Command) -> csi_core::Result<Output> {
        self.0.lock().unwrap().push(cmd.clone());
        SystemExec.output(cmd).await
    }
}

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/backends/juicefs.sh")
}

/// The NodePublishVolumeSecret map of a secrets file (`key: "value"` lines).
fn secret_of(file: &str) -> HashMap<String, String> {
    let text = std::fs::read_to_string(file).unwrap();
    text.split("NodePublishVolumeSecret:")
        .nth(1)
        .unwrap()
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.trim().split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

#[tokio::test]
async fn formats_once_and_names_the_failing_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = succeeds(
        std::process::Command::new(script())
            .arg("start")
            .arg(dir.path().join("b")),
    );
    let env: HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let _backend = Backend(dir.path().join("b"));
    {
        let watch = Arc::new(Watch::default());
        let cli = cli_for(&watch);
        for file in ["JUICEFS_SECRETS_FILE", "JUICEFS_SQLITE_SECRETS_FILE"] {
            let mut secret = secret_of(&env[file]);
            secret.insert("secret-key".into(), "never-in-argv".into());
            secret.insert("access-key".into(), "key-id".into());
            let fs = FsSecret::parse(&Secrets(secret.clone())).unwrap();
            assert!(
                cli.ensure_formatted(&fs).await.unwrap(),
                "{file}: first use formats"
            );
            assert!(
                !cli.ensure_formatted(&fs).await.unwrap(),
                "{file}: formatted once"
            );
            // A volume directory with its quota, then raised, with nothing mounted.
            for size in [32u64 << 20, 48 << 20] {
                cli.set_quota(&fs, "/pvc-1", size).await.unwrap();
                let get = ["quota", "get", &fs.metaurl, "--path", "/pvc-1"];
                let got = watch.output(&cli.command(&fs, &get)).await.unwrap();
                let want = format!("| {} MiB |", size >> 20);
                assert!(got.stdout.contains(&want), "{file}: {}", got.stdout);
            }
            mounts_outlive_their_starter(&cli_for(&watch), &fs, &dir.path().join(file)).await;
            // Another name on the same metadata is refused, not reformatted.
            secret.insert("name".into(), "other-fs".into());
            let other = FsSecret::parse(&Secrets(secret)).unwrap();
            let e = cli.ensure_formatted(&other).await.unwrap_err().to_string();
            assert!(
                e.contains("\"name\"") && e.contains("never reformatted"),
                "{e}"
            );
        }
        for cmd in watch.0.lock().unwrap().iter() {
            let argv = cmd.display();
            assert!(
                !argv.contains("never-in-argv") && !argv.contains("key-id"),
                "{argv}"
            );
        }
        let format = watch
            .0
            .lock()
            .unwrap()
            .iter()
            .find(|c| c.args.first().is_some_and(|a| a == "format"))
            .cloned()
            .unwrap();
        assert!(
            format
                .env
                .iter()
                .any(|(k, v)| k == "SECRET_KEY" && v == "never-in-argv")
        );

        // Unreachable metadata names metaurl; an unusable bucket names bucket.
        let mut secret = secret_of(&env["JUICEFS_SECRETS_FILE"]);
        secret.insert("metaurl".into(), "redis://:pw@127.0.0.1:1/1".into());
        let fs = FsSecret::parse(&Secrets(secret)).unwrap();
        let quick = Cli::new(Arc::new(SystemExec), "juicefs", Duration::from_secs(5));
        let e = quick.ensure_formatted(&fs).await.unwrap_err().to_string();
        assert!(e.contains("\"metaurl\"") && !e.contains("pw@"), "{e}");
        let mut secret = secret_of(&env["JUICEFS_SECRETS_FILE"]);
        secret.insert(
            "metaurl".into(),
            format!(
                "{}2",
                &env["JUICEFS_REDIS_URL"][..env["JUICEFS_REDIS_URL"].len() - 1]
            ),
        );
        secret.insert("bucket".into(), "/proc/no-bucket-here/".into());
        let fs = FsSecret::parse(&Secrets(secret)).unwrap();
        let e = cli.ensure_formatted(&fs).await.unwrap_err().to_string();
        assert!(e.contains("\"bucket\""), "{e}");
    }
}

/// Nodes and the controller meeting a new filesystem at once all succeed:
/// juicefs writes its uuid object before the metadata, so a second
/// formatter finds the bucket "not empty" while the first is mid-format.
#[tokio::test]
async fn concurrent_first_uses_all_succeed() {
    for round in 0..4 {
        let dir = tempfile::tempdir().unwrap();
        let secret = HashMap::from([
            ("name".to_owned(), format!("race-{round}")),
            (
                "metaurl".to_owned(),
                format!("sqlite3://{}/meta.db", dir.path().display()),
            ),
            ("storage".to_owned(), "file".to_owned()),
            (
                "bucket".to_owned(),
                format!("{}/bucket/", dir.path().display()),
            ),
        ]);
        let fs = Arc::new(FsSecret::parse(&Secrets(secret)).unwrap());
        let tasks: Vec<_> = (0..6)
            .map(|_| {
                let fs = fs.clone();
                tokio::spawn(async move {
                    let cli = Cli::new(Arc::new(SystemExec), "juicefs", Duration::from_secs(30));
                    cli.ensure_formatted(&fs).await
                })
            })
            .collect();
        let mut formatted = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(now) => formatted += usize::from(now),
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        assert!(formatted >= 1, "round {round}: nobody formatted");
        let cli = Cli::new(Arc::new(SystemExec), "juicefs", Duration::from_secs(30));
        assert!(!cli.ensure_formatted(&fs).await.unwrap(), "round {round}");
    }
}

fn cli_for(watch: &Arc<Watch>) -> Arc<Cli> {
    Arc::new(Cli::new(watch.clone(), "juicefs", Duration::from_secs(30)))
}

/// A mount daemon runs in its own session, not as our child; a second
/// manager (a restarted plugin) finds the live mount and keeps it; after
/// the daemon is killed the mount is dead, and `ensure` mounts it again.
async fn mounts_outlive_their_starter(cli: &Arc<Cli>, fs: &FsSecret, root: &Path) {
    let manager = || {
        let exec: Arc<dyn Exec> = Arc::new(SystemExec);
        FsMounts::new(
            root,
            cli.clone(),
            Arc::new(SystemSpawner::default()),
            Arc::new(SystemMounter::new(exec, Duration::from_secs(30))),
            Duration::from_secs(30),
        )
    };
    let options = ["--no-bgjob".to_owned()];
    let key = FsMounts::key(fs, &options);
    let first = manager();
    assert!(
        first.ensure(&key, fs, &options).await.unwrap(),
        "mounted now"
    );
    let mnt = first.mountpoint(&key);
    std::fs::write(mnt.join("pvc-1/data"), b"kept").unwrap();
    let pids = daemons_of(&mnt);
    let sid = nix::unistd::getsid(Some(pids[0])).unwrap();
    assert_ne!(
        sid,
        nix::unistd::getsid(None).unwrap(),
        "the daemon shares our session"
    );

    let second = manager();
    assert_eq!(second.health(&key).await.unwrap(), Health::Up);
    assert!(
        !second.ensure(&key, fs, &options).await.unwrap(),
        "a live mount is kept"
    );
    assert_eq!(daemons_of(&mnt), pids, "the same daemons serve it");

    // Both processes: juicefs restarts a lone dead child itself.
    for pid in pids {
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    }
    let dead = async {
        loop {
            if matches!(second.health(&key).await.unwrap(), Health::Dead(_)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), dead)
        .await
        .expect("the mount dies");
    assert!(
        second.ensure(&key, fs, &options).await.unwrap(),
        "mounted again"
    );
    assert_eq!(std::fs::read(mnt.join("pvc-1/data")).unwrap(), b"kept");
    second.unmount(&key).await.unwrap();
    assert_eq!(second.health(&key).await.unwrap(), Health::Absent);
    assert!(!mnt.exists(), "mountpoint removed");
}

/// The juicefs processes serving `mnt` (a supervisor and the child it
/// restarts when the child dies).
fn daemons_of(mnt: &Path) -> Vec<nix::unistd::Pid> {
    let out = std::process::Command::new("pgrep")
        .args(["-f", &format!("juicefs mount.*{}", mnt.display())])
        .output()
        .unwrap();
    let pids: Vec<_> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .map(nix::unistd::Pid::from_raw)
        .collect();
    assert!(!pids.is_empty(), "no juicefs daemon for the mount");
    pids
}

/// Runs a command that must succeed; its output.
fn succeeds(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Stops the backend when the test ends, passed or failed.
struct Backend(std::path::PathBuf);

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = std::process::Command::new(script())
            .arg("stop")
            .arg(&self.0)
            .status();
    }
}
