//! The CSI conformance suite against `rcsi node --driver local-path`: with
//! directory volumes on the root disk (ext4) and on loop-mounted xfs and
//! btrfs (reflink copies), and with ext4 and xfs image-file volumes.

use rcsi_tests::{CommandDriver, LoopFs, Profile, node_vm_trial, run_suite, run_suite_with};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn local_path(state_root: Option<PathBuf>) -> Arc<CommandDriver> {
    Arc::new(CommandDriver {
        program: env!("CARGO_BIN_EXE_rcsi").into(),
        args: [
            "node",
            "--driver",
            "local-path",
            "--endpoint",
            "unix://{endpoint}",
            "--node-id",
            "conformance-node",
            "--base-path",
            "{state}",
        ]
        .map(String::from)
        .to_vec(),
        break_volume: Some(break_local_volume),
        state_root,
    })
}

/// Removes a local-path volume's data behind the driver's back.
fn break_local_volume(state: &Path, volume_id: &str) -> anyhow::Result<()> {
    let dir = rcsi_local_path::volume_dir(state, volume_id);
    if dir.is_dir() {
        std::fs::rename(&dir, state.join(format!("broken-{volume_id}")))?;
    } else {
        std::fs::rename(
            dir.with_extension("img"),
            state.join(format!("broken-{volume_id}.img")),
        )?;
    }
    Ok(())
}

fn profile(name: &str, params: &[(&str, &str)], fs_type: &str, size: i64) -> Profile {
    Profile {
        name: name.into(),
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        block: true,
        volume_size: size,
        fs_type: fs_type.into(),
        // Growing a mounted ext4 needs CAP_SYS_RESOURCE; CI machines lack it,
        // so ext4 image volumes are grown offline (at NodeStageVolume) here.
        online_expansion: fs_type != "ext4",
        // Image files bound the size; directories need project quotas, which
        // this host kernel lacks (CONFIG_QUOTA off).
        enforces_size: params.iter().any(|(k, v)| *k == "backing" && *v == "file"),
        controller_sees_node: true,
        ..Default::default()
    }
}

/// Directory volumes on loop-mounted xfs and ext4 with project quotas
/// enforced. The host kernel has no quota support, so these profiles run
/// inside the node VM (Debian's kernel).
fn quota_profiles() -> std::process::ExitCode {
    let xfs = LoopFs::new("xfs", 1 << 30, &["-q"], "prjquota").expect("xfs with prjquota");
    let ext4 = LoopFs::new(
        "ext4",
        1 << 30,
        &["-q", "-F", "-O", "quota,project"],
        "prjquota",
    )
    .expect("ext4 with project quotas");
    let quota = |name: &str| Profile {
        enforces_size: true,
        ..profile(name, &[], "", 32 << 20)
    };
    // Two at a time, one per vCPU (the node VM passes --test-threads 1).
    let mut args = libtest_mimic::Arguments::from_args();
    args.test_threads = Some(2);
    let conclusion = run_suite_with(
        args,
        vec![
            (
                local_path(Some(xfs.path())),
                quota("local-path/dir-xfs-prjquota"),
            ),
            (
                local_path(Some(ext4.path())),
                quota("local-path/dir-ext4-prjquota"),
            ),
        ],
        rcsi_tests::cases::all(),
        vec![libtest_mimic::Trial::test(
            "local-path/prjquota::shared-filesystem",
            || {
                tokio::runtime::Runtime::new()
                    .expect("runtime")
                    .block_on(shared_filesystem())
                    .map_err(|e| format!("{e:#}").into())
            },
        )],
    );
    drop((xfs, ext4));
    conclusion.exit_code()
}

/// Two plugins whose base paths share one filesystem, beside a project that
/// is neither's (as the kubelet's emptyDir quotas are): each volume gets a
/// project of its own, and deleting one plugin's volumes keeps the other's
/// limits.
async fn shared_filesystem() -> anyhow::Result<()> {
    use anyhow::{Context, ensure};
    use csi_core::csi::controller_client::ControllerClient;
    use rcsi_tests::Driver;
    let fs = LoopFs::new(
        "ext4",
        512 << 20,
        &["-q", "-F", "-O", "quota,project"],
        "prjquota",
    )?;
    let project_of = |dir: &Path| -> anyhow::Result<u32> {
        let out = std::process::Command::new("lsattr")
            .args(["-p", "-d"])
            .arg(dir)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("lsattr -p {}: {text}", dir.display()))
    };
    // Someone else's project, with local-path's first id (1 << 20).
    let foreign = fs.path().join("foreign");
    std::fs::create_dir(&foreign)?;
    let tagged = std::process::Command::new("chattr")
        .args(["-p", "1048576", "+P"])
        .arg(&foreign)
        .status()?;
    ensure!(tagged.success(), "chattr -p failed");
    std::fs::write(foreign.join("data"), vec![7u8; 1 << 20])?;

    let driver = local_path(Some(fs.path().to_path_buf()));
    let profile = profile("shared", &[], "", 32 << 20);
    let mut plugins = Vec::new();
    for _ in 0..2 {
        let inst = driver.start().await?;
        let ctl = ControllerClient::new(csi_core::client::connect(&inst.endpoint()).await?);
        plugins.push((inst, ctl));
    }
    // Both plugins create at once.
    let mut creates = tokio::task::JoinSet::new();
    for (p, (_, ctl)) in plugins.iter().enumerate() {
        for i in 0..3 {
            let (mut ctl, profile) = (ctl.clone(), profile.clone());
            creates.spawn(async move {
                let v =
                    rcsi_tests::flows::create_in(&mut ctl, &profile, &format!("v{p}-{i}")).await;
                (p, v)
            });
        }
    }
    let mut vols = [Vec::new(), Vec::new()];
    while let Some(done) = creates.join_next().await {
        let (p, v) = done?;
        vols[p].push(v?);
    }
    let dir_of = |id: &str| -> anyhow::Result<PathBuf> {
        std::fs::read_dir(fs.path())?
            .flatten()
            .map(|e| rcsi_local_path::volume_dir(&e.path().join("state"), id))
            .find(|d| d.is_dir())
            .with_context(|| format!("no directory for {id}"))
    };
    let mut seen = vec![(project_of(&foreign)?, foreign.clone())];
    for v in vols.iter().flatten() {
        let dir = dir_of(&v.volume_id)?;
        let id = project_of(&dir)?;
        if let Some((_, other)) = seen.iter().find(|(p, _)| *p == id) {
            anyhow::bail!(
                "{} and {} share project {id}",
                dir.display(),
                other.display()
            );
        }
        seen.push((id, dir));
    }

    // The first plugin's volumes go; the second's stay limited.
    let (_, ctl) = &mut plugins[0];
    for v in &vols[0] {
        ctl.delete_volume(csi_core::csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await?;
    }
    for v in &vols[1] {
        // Unprivileged, as a pod: root with CAP_SYS_RESOURCE passes quotas.
        use std::os::unix::{fs::PermissionsExt, process::CommandExt};
        let dir = dir_of(&v.volume_id)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
        let out = std::process::Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", dir.join("fill").display()))
            .args(["bs=1M", "count=80", "conv=fsync"])
            .uid(65534)
            .gid(65534)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("quota"),
            "80 MiB into a 64 MiB volume of the second plugin: {err}"
        );
    }
    for (inst, _) in &mut plugins {
        inst.stop().await?;
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    if std::env::var_os("RCSI_VM_PROFILES").is_some() {
        return quota_profiles();
    }
    let xfs = LoopFs::new("xfs", 2 << 30, &["-q"], "").expect("loop-mounted xfs");
    let btrfs = LoopFs::new("btrfs", 2 << 30, &["-q"], "").expect("loop-mounted btrfs");
    let conclusion = run_suite(
        vec![
            (
                local_path(None),
                profile("local-path/dir", &[], "", 32 << 20),
            ),
            (
                local_path(Some(xfs.path())),
                profile("local-path/dir-on-xfs", &[], "", 32 << 20),
            ),
            (
                local_path(Some(btrfs.path())),
                profile("local-path/dir-on-btrfs", &[], "", 32 << 20),
            ),
            (
                local_path(None),
                profile(
                    "local-path/file-ext4",
                    &[("backing", "file")],
                    "ext4",
                    32 << 20,
                ),
            ),
            (
                local_path(None),
                profile(
                    "local-path/file-xfs",
                    &[("backing", "file")],
                    "xfs",
                    320 << 20,
                ),
            ),
        ],
        rcsi_tests::cases::all(),
        vec![node_vm_trial(
            "local-path/prjquota::in-node-vm",
            &[("RCSI_VM_PROFILES", "quota")],
        )],
    );
    drop((xfs, btrfs));
    conclusion.exit_code()
}
