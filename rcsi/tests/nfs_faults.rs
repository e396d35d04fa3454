//! Faults of a real NFS server under the controller (run as nobody with no
//! capabilities, as the manifests run it): ganesha stopped
//! (SIGSTOP: connections hang) in the middle of a create, a clone and a
//! delete, and killed and restarted. Each call fails within its bound, the
//! plugin keeps answering Probe and calls for other servers, and a retry
//! after the server is back succeeds and leaves nothing half-made.

use anyhow::{Context, Result, bail, ensure};
use csi_core::csi::{self, controller_client::ControllerClient, identity_client::IdentityClient};
use csi_core::server::Endpoint;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::Code;
use tonic::transport::Channel;

/// The per-call timeout given to the controller.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The NFS server, with what the fault tests do to it.
struct Server(rcsi_tests::Backend);

impl Server {
    fn start() -> Result<Self> {
        rcsi_tests::Backend::start("nfs").map(Self)
    }

    fn signal(&self, sig: nix::sys::signal::Signal) -> Result<()> {
        let pid: i32 = self.0.var("NFS_PID").parse()?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)?;
        Ok(())
    }

    fn restart(&mut self) -> Result<()> {
        self.0.run("restart")
    }

    fn export(&self) -> PathBuf {
        PathBuf::from(self.0.var("NFS_EXPORT_DIR"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.signal(nix::sys::signal::Signal::SIGCONT);
    }
}

fn create_req(name: &str, source: Option<&str>) -> csi::CreateVolumeRequest {
    use csi::volume_capability as vc;
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 1 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![csi::VolumeCapability {
            access_type: Some(vc::AccessType::Mount(Default::default())),
            access_mode: Some(vc::AccessMode {
                mode: vc::access_mode::Mode::MultiNodeMultiWriter as i32,
            }),
        }],
        parameters: [("server", "127.0.0.1"), ("share", "/export")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        volume_content_source: source.map(|id| csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Volume(
                csi::volume_content_source::VolumeSource {
                    volume_id: id.into(),
                },
            )),
        }),
        ..Default::default()
    }
}

/// Runs `call` while the server is stopped: it must fail with a timeout
/// code within `bound`, and Probe must answer meanwhile.
async fn fails_in_time<T: std::fmt::Debug>(
    ident: &mut IdentityClient<Channel>,
    bound: Duration,
    what: &str,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<Duration> {
    let start = Instant::now();
    let mut call = std::pin::pin!(call);
    let mut probes = 0;
    let r = loop {
        tokio::select! {
            r = &mut call => break r,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                let t = Instant::now();
                ident.probe(csi::ProbeRequest {}).await.context("Probe while the server is stopped")?;
                ensure!(t.elapsed() < Duration::from_secs(1), "Probe took {:?}", t.elapsed());
                probes += 1;
            }
        }
    };
    let took = start.elapsed();
    match r {
        Err(s) if matches!(s.code(), Code::DeadlineExceeded | Code::Unavailable) => {}
        other => bail!("{what} with the server stopped: expected DeadlineExceeded, got {other:?}"),
    }
    ensure!(took <= bound, "{what} took {took:?}, more than {bound:?}");
    ensure!(
        probes > 0 || took < Duration::from_millis(200),
        "no Probe was tried"
    );
    Ok(took)
}

/// Files under `.rcsi/tmp` of the export (half-made copies).
fn leftovers(export: &Path) -> Vec<String> {
    std::fs::read_dir(export.join(".rcsi/tmp"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn faults() -> Result<()> {
    let mut server = Server::start()?;
    let work = tempfile::tempdir()?;
    // The controller runs as nobody, without capabilities: it needs none.
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )?;
    let sock = work.path().join("csi.sock");
    let mut child = tokio::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args([
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_rcsi"))
        .args([
            "controller",
            "--driver",
            "nfs",
            "--nfs-port",
            "2049",
            "--nfs-mount-port",
            "20048",
        ])
        .args(["--nfs-call-timeout", &CALL_TIMEOUT.as_secs().to_string()])
        .arg("--endpoint")
        .arg(format!("unix://{}", sock.display()))
        .kill_on_drop(true)
        .spawn()?;
    let ch = csi_core::client::connect_when_ready(&Endpoint::Unix(sock), Duration::from_secs(20))
        .await?;
    let (mut ctl, mut ident) = (ControllerClient::new(ch.clone()), IdentityClient::new(ch));
    let export = server.export();

    let first = ctl
        .create_volume(create_req("first", None))
        .await?
        .into_inner()
        .volume
        .unwrap();
    // A tree big enough that a clone is still copying when the server stops.
    let big = ctl
        .create_volume(create_req("big", None))
        .await?
        .into_inner()
        .volume
        .unwrap();
    let big_dir = export.join(&big.volume_context["subDir"]);
    for i in 0..200 {
        std::fs::write(big_dir.join(format!("f{i}")), vec![i as u8 | 1; 128 << 10])?;
    }
    // Each stopped call may spend one timeout per NFS call it makes before
    // giving up: creates and deletes make at most a few.
    let bound = CALL_TIMEOUT * 4;

    server.signal(nix::sys::signal::Signal::SIGSTOP)?;
    let t = fails_in_time(
        &mut ident,
        bound,
        "CreateVolume",
        ctl.create_volume(create_req("second", None)),
    )
    .await?;
    eprintln!("create with the server stopped failed after {t:?}");
    let t = fails_in_time(
        &mut ident,
        bound,
        "DeleteVolume",
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: first.volume_id.clone(),
            ..Default::default()
        }),
    )
    .await?;
    eprintln!("delete with the server stopped failed after {t:?}");
    // Another server's calls are not held up: an unreachable one fails on its own.
    let mut other = create_req("elsewhere", None);
    other.parameters.insert("server".into(), "127.0.0.2".into());
    let t = Instant::now();
    let r = ctl.create_volume(other).await;
    ensure!(
        r.is_err() && t.elapsed() <= bound,
        "a call for another server: {r:?} after {:?}",
        t.elapsed()
    );
    server.signal(nix::sys::signal::Signal::SIGCONT)?;

    // Stop the server in the middle of a clone.
    let mut clone_ctl = ctl.clone();
    let big_id = big.volume_id.clone();
    let clone = tokio::spawn(async move {
        clone_ctl
            .create_volume(create_req("clone", Some(&big_id)))
            .await
    });
    // Stop it once the copy has begun (its directory appears in .rcsi/tmp),
    // not after a fixed delay: a fast run finished a 25 MiB copy in 263 ms.
    let tmp = export.join(".rcsi/tmp");
    let begun = Instant::now();
    while std::fs::read_dir(&tmp).map_or(true, |mut d| d.next().is_none()) {
        ensure!(
            begun.elapsed() < Duration::from_secs(10),
            "the clone never started copying"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    server.signal(nix::sys::signal::Signal::SIGSTOP)?;
    let t = Instant::now();
    match clone.await? {
        Err(s) if matches!(s.code(), Code::DeadlineExceeded | Code::Unavailable) => {}
        other => bail!("a clone interrupted by a stopped server: {other:?}"),
    }
    ensure!(
        t.elapsed() <= bound,
        "the clone took {:?} to fail",
        t.elapsed()
    );
    server.signal(nix::sys::signal::Signal::SIGCONT)?;

    // Back: every retry succeeds and nothing is left half-made.
    let second = ctl
        .create_volume(create_req("second", None))
        .await?
        .into_inner()
        .volume
        .unwrap();
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: first.volume_id.clone(),
        ..Default::default()
    })
    .await?;
    ensure!(
        !export.join(&first.volume_context["subDir"]).exists(),
        "the deleted volume's directory is still there"
    );
    let cloned = ctl
        .create_volume(create_req("clone", Some(&big.volume_id)))
        .await?
        .into_inner()
        .volume
        .unwrap();
    let cdir = export.join(&cloned.volume_context["subDir"]);
    for i in 0..200 {
        let got = std::fs::read(cdir.join(format!("f{i}")))?;
        ensure!(
            got == vec![i as u8 | 1; 128 << 10],
            "cloned file f{i} differs"
        );
    }
    ensure!(
        leftovers(&export).is_empty(),
        "left in .rcsi/tmp: {:?}",
        leftovers(&export)
    );

    // A server crash and restart: pooled connections are dead; the next call reconnects.
    server.restart()?;
    let t = Instant::now();
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: second.volume_id.clone(),
        ..Default::default()
    })
    .await
    .context("DeleteVolume after the server restarted")?;
    eprintln!("first call after a server restart took {:?}", t.elapsed());
    for v in [&cloned.volume_id, &big.volume_id] {
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.clone(),
            ..Default::default()
        })
        .await?;
    }
    let left: Vec<_> = std::fs::read_dir(&export)?
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != ".rcsi")
        .collect();
    ensure!(left.is_empty(), "volumes left on the export: {left:?}");
    child.kill().await?;
    Ok(())
}

/// StorageClass parameters as operators write them: the subDir template,
/// mountPermissions, each onDelete mode, and refusals naming the key.
async fn parameters() -> Result<()> {
    let server = Server::start()?;
    let work = tempfile::tempdir()?;
    let sock = work.path().join("csi.sock");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rcsi"))
        .args(["controller", "--driver", "nfs", "--nfs-port", "2049"])
        .args(["--nfs-mount-port", "20048", "--endpoint"])
        .arg(format!("unix://{}", sock.display()))
        .kill_on_drop(true)
        .spawn()?;
    let ch = csi_core::client::connect_when_ready(&Endpoint::Unix(sock), Duration::from_secs(20))
        .await?;
    let mut ctl = ControllerClient::new(ch);
    let export = server.export();
    let req = |name: &str, extra: &[(&str, &str)]| {
        let mut r = create_req(name, None);
        for (k, v) in extra {
            r.parameters.insert(k.to_string(), v.to_string());
        }
        r.parameters
            .insert("csi.storage.k8s.io/pvc/name".into(), "data".into());
        r.parameters
            .insert("csi.storage.k8s.io/pvc/namespace".into(), "team-a".into());
        r.parameters
            .insert("csi.storage.k8s.io/pv/name".into(), name.into());
        r
    };
    let template = (
        "subDir",
        "${pvc.metadata.namespace}/${pvc.metadata.name}-${pv.metadata.name}",
    );
    let deleter = ctl.clone();
    let delete = |id: String| {
        let mut ctl = deleter.clone();
        async move {
            ctl.delete_volume(csi::DeleteVolumeRequest {
                volume_id: id,
                ..Default::default()
            })
            .await
        }
    };

    let v = ctl
        .create_volume(req("pv-1", &[template, ("mountPermissions", "0750")]))
        .await?
        .into_inner()
        .volume
        .unwrap();
    let dir = export.join("team-a/data-pv-1");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&dir)?.permissions());
    ensure!(mode & 0o7777 == 0o750, "mode {mode:o}, not 0750");
    ensure!(v.volume_context.get("mountPermissions").map(String::as_str) == Some("750"));
    delete(v.volume_id).await?;
    ensure!(!dir.exists(), "onDelete=delete left {}", dir.display());

    let v = ctl
        .create_volume(req("pv-2", &[template, ("onDelete", "retain")]))
        .await?
        .into_inner()
        .volume
        .unwrap();
    let dir = export.join("team-a/data-pv-2");
    std::fs::write(dir.join("keep"), b"x")?;
    delete(v.volume_id.clone()).await?;
    ensure!(
        dir.join("keep").exists(),
        "onDelete=retain removed the data"
    );
    ensure!(
        !export.join(".rcsi/volumes").read_dir()?.any(|_| true),
        "a retained volume's record is left"
    );

    for round in 0..2 {
        let v = ctl
            .create_volume(req(
                "pv-3",
                &[("subDir", "shared/x"), ("onDelete", "archive")],
            ))
            .await?
            .into_inner()
            .volume
            .unwrap();
        std::fs::write(export.join("shared/x/data"), format!("round {round}"))?;
        delete(v.volume_id).await?;
        ensure!(
            !export.join("shared/x").exists(),
            "archive left the directory"
        );
    }
    ensure!(
        std::fs::read_to_string(export.join("shared/archived-x/data"))? == "round 0",
        "first archive"
    );
    let second: Vec<_> = std::fs::read_dir(export.join("shared"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("archived-x-"))
        .collect();
    ensure!(second.len() == 1, "second archive: {second:?}");

    for (extra, key) in [
        (("colour", "blue"), "colour"),
        (("onDelete", "shred"), "onDelete"),
        (("subDir", "../../etc"), "subDir"),
        (("subDir", "${pvc.metadata.uid}"), "subDir"),
        (("mountPermissions", "rwx"), "mountPermissions"),
    ] {
        let r = ctl.create_volume(req("bad", &[extra])).await;
        match r {
            Err(s) if s.code() == Code::InvalidArgument && s.message().contains(key) => {}
            other => bail!("{extra:?}: expected InvalidArgument naming {key}, got {other:?}"),
        }
    }
    let long = "d".repeat(100);
    match ctl.create_volume(req("long", &[("subDir", &long)])).await {
        Err(s) if s.code() == Code::InvalidArgument && s.message().contains("128 bytes") => {}
        other => bail!("a 100-byte subDir: expected InvalidArgument about the id, got {other:?}"),
    }
    child.kill().await?;
    Ok(())
}

/// A trial's body.
type Trial = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>>>>;

fn main() -> std::process::ExitCode {
    let args = libtest_mimic::Arguments::from_args();
    let run = |f: fn() -> Trial| {
        move || {
            tokio::runtime::Runtime::new()
                .expect("runtime")
                .block_on(f())
                .map_err(|e| format!("{e:#}").into())
        }
    };
    // Each trial starts its own server on the fixed ports: one at a time.
    let trials = vec![
        libtest_mimic::Trial::test("nfs/controller::server-faults", run(|| Box::pin(faults()))),
        libtest_mimic::Trial::test("nfs/controller::parameters", run(|| Box::pin(parameters()))),
    ];
    let mut args = args;
    args.test_threads = Some(1);
    libtest_mimic::run(&args, trials).exit_code()
}
