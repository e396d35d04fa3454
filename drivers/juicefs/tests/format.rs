//! Formatting on first use, directory quotas and detached mounts against real metadata
//! engines (redis and sqlite3 from `tests/backends/juicefs.sh`) and file
//! storage: idempotent, never a reformat, errors naming the Secret key,
//! secrets only in the environment.

use csi_core::exec::{Command, Exec, Output, SystemExec};
use csi_core::types::Secrets;
use rcsi_juicefs::{Cli, FsSecret};
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
        let cli = Cli::new(watch.clone(), "juicefs", Duration::from_secs(30));
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
            // The mount daemon runs in its own session, not as our child,
            // so it outlives whoever started it.
            let mnt = dir.path().join(format!("mnt-{file}"));
            std::fs::create_dir_all(&mnt).unwrap();
            let log = dir.path().join(format!("{file}.log"));
            cli.mount(&fs, &mnt, &log, &["--no-bgjob".into()])
                .await
                .unwrap();
            std::fs::write(mnt.join("pvc-1/data"), b"kept").unwrap();
            let daemon = std::process::Command::new("pgrep")
                .args(["-f", &format!("juicefs mount.*{}", mnt.display())])
                .output()
                .unwrap();
            let pid: i32 = String::from_utf8_lossy(&daemon.stdout)
                .lines()
                .next()
                .and_then(|l| l.trim().parse().ok())
                .expect("a juicefs daemon for the mount");
            let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid))).unwrap();
            assert_ne!(
                sid,
                nix::unistd::getsid(None).unwrap(),
                "{file}: the daemon shares our session"
            );
            assert_eq!(std::fs::read(mnt.join("pvc-1/data")).unwrap(), b"kept");
            succeeds(std::process::Command::new("umount").arg(&mnt));
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
