//! The CSI conformance suite against `rcsi node --driver local-path`: with
//! directory volumes on the root disk (ext4) and on loop-mounted xfs and
//! btrfs (reflink copies), and with ext4 and xfs image-file volumes.

use rcsi_tests::{CommandDriver, LoopFs, Profile, node_vm_trial, run_suite};
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
    let conclusion = run_suite(
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
        vec![],
    );
    drop((xfs, ext4));
    conclusion.exit_code()
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
