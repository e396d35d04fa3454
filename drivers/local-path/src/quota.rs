//! Project quotas (xfs `prjquota`, ext4 with the `project` feature): each
//! directory volume gets its own project id, whose hard block limit is the
//! volume size and whose usage gives exact, cheap stats.

use csi_core::{Error, IoContext, Result};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

// Kernel UAPI (linux/quota.h, linux/dqblk_xfs.h, linux/fs.h).
const PRJQUOTA: u32 = 2;
const Q_GETQUOTA: u32 = 0x800007;
const Q_SETQUOTA: u32 = 0x800008;
const Q_XGETQSTATV: u32 = (b'X' as u32) << 8 | 8;
const QIF_BLIMITS: u32 = 1;
const QIF_ILIMITS: u32 = 4;
const FS_QUOTA_PDQ_ENFD: u16 = 1 << 5;
const FS_XFLAG_PROJINHERIT: u32 = 0x200;
const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f;
const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401c_5820;
/// Project ids a claim tries before it gives up.
const CLAIM_TRIES: u32 = 4096;
/// Quota block size used by the generic quota interface.
const QUOTA_BLOCK: u64 = 1024;

#[repr(C)]
#[derive(Default)]
struct IfDqblk {
    bhardlimit: u64,
    bsoftlimit: u64,
    curspace: u64,
    ihardlimit: u64,
    isoftlimit: u64,
    curinodes: u64,
    btime: u64,
    itime: u64,
    valid: u32,
}

#[repr(C)]
#[derive(Default)]
struct FsxAttr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

#[repr(C)]
#[derive(Default)]
struct QFileStatV {
    ino: u64,
    nblks: u64,
    nextents: u32,
    pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct QuotaStatV {
    version: i8,
    pad1: u8,
    flags: u16,
    incoredqs: u32,
    uquota: QFileStatV,
    gquota: QFileStatV,
    pquota: QFileStatV,
    btimelimit: i32,
    itimelimit: i32,
    rtbtimelimit: i32,
    bwarnlimit: u16,
    iwarnlimit: u16,
    rtbwarnlimit: u16,
    pad3: u16,
    pad4: u32,
    pad2: [u64; 7],
}

fn qcmd(cmd: u32, kind: u32) -> libc::c_int {
    ((cmd << 8) | (kind & 0xff)) as libc::c_int
}

/// Project-quota control of one filesystem.
#[derive(Clone, Debug)]
pub struct Quotas {
    base: PathBuf,
}

impl Quotas {
    /// Returns quota control when project quotas are enforced on `base`'s
    /// filesystem, or the reason they are not.
    pub fn probe(base: &Path) -> std::result::Result<Self, String> {
        let q = Self {
            base: base.to_path_buf(),
        };
        let mut st = QuotaStatV {
            version: 1,
            ..Default::default()
        };
        match q.quotactl(Q_XGETQSTATV, 0, &mut st as *mut _ as *mut libc::c_void) {
            Ok(()) if st.flags & FS_QUOTA_PDQ_ENFD != 0 => Ok(q),
            Ok(()) => {
                Err("project quotas are accounted but not enforced (mount with prjquota)".into())
            }
            Err(e) => Err(format!(
                "project quotas are not enabled on this filesystem ({e})"
            )),
        }
    }

    fn quotactl(&self, cmd: u32, id: u32, addr: *mut libc::c_void) -> std::io::Result<()> {
        let f = std::fs::File::open(&self.base)?;
        // SAFETY: quotactl_fd reads or writes `addr`, which points to a live
        // struct of the layout this command expects.
        let r = unsafe {
            libc::syscall(
                libc::SYS_quotactl_fd,
                f.as_raw_fd(),
                qcmd(cmd, PRJQUOTA),
                id as libc::c_uint,
                addr,
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Tags an empty directory with `project` (inherited by everything
    /// created inside) and limits the project to `bytes`.
    pub fn assign(&self, dir: &Path, project: u32, bytes: u64) -> Result<()> {
        tag(dir, project)?;
        self.set_limit(project, bytes)
    }

    /// Tags an empty directory with the first project id from `first` on
    /// that nothing else on the filesystem uses, limits it to `bytes`, and
    /// returns it. Ids are shared by everything on the filesystem (another
    /// plugin's base path, the kubelet's emptyDir quotas), so an id with
    /// usage or limits is skipped, and one that another process tagged at
    /// the same moment (more than this directory's inode) is given up.
    pub fn claim(&self, dir: &Path, first: u32, bytes: u64) -> Result<u32> {
        let mut id = first;
        for _ in 0..CLAIM_TRIES {
            if !self.in_use(id)? {
                tag(dir, id)?;
                if self.usage(id)?.1 == 1 {
                    self.set_limit(id, bytes)?;
                    return Ok(id);
                }
                // Both taggers back off; a random step keeps them apart.
                id = id.wrapping_add(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.subsec_nanos() % 16),
                );
            }
            id = id.wrapping_add(1).max(first);
        }
        Err(Error::ResourceExhausted(format!(
            "no free project id among {CLAIM_TRIES} tried from {first} on the filesystem of {}",
            self.base.display()
        )))
    }

    /// Whether a project has usage or limits on the filesystem.
    fn in_use(&self, project: u32) -> Result<bool> {
        match self.get(project) {
            Ok(q) => Ok(q.curspace > 0
                || q.curinodes > 0
                || q.bhardlimit > 0
                || q.bsoftlimit > 0
                || q.ihardlimit > 0
                || q.isoftlimit > 0),
            // xfs has no record of an id never used.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(Error::io(
                format!("reading the quota of project {project}"),
                e,
            )),
        }
    }

    /// Sets the hard byte limit of a project (0 removes it).
    pub fn set_limit(&self, project: u32, bytes: u64) -> Result<()> {
        let mut q = IfDqblk {
            bhardlimit: bytes.div_ceil(QUOTA_BLOCK),
            bsoftlimit: 0,
            ihardlimit: 0,
            isoftlimit: 0,
            valid: QIF_BLIMITS | QIF_ILIMITS,
            ..Default::default()
        };
        self.quotactl(Q_SETQUOTA, project, &mut q as *mut _ as *mut libc::c_void)
            .ctx(|| format!("setting the quota of project {project}"))
    }

    /// Bytes and inodes used by a project.
    pub fn usage(&self, project: u32) -> Result<(u64, u64)> {
        let q = self
            .get(project)
            .ctx(|| format!("reading the quota of project {project}"))?;
        Ok((q.curspace, q.curinodes))
    }

    /// A project's usage and limits.
    fn get(&self, project: u32) -> std::io::Result<IfDqblk> {
        let mut q = IfDqblk::default();
        self.quotactl(Q_GETQUOTA, project, &mut q as *mut _ as *mut libc::c_void)?;
        Ok(q)
    }
}

/// Sets `dir`'s project id, inherited by everything created inside.
fn tag(dir: &Path, project: u32) -> Result<()> {
    let f = std::fs::File::open(dir).ctx(|| format!("opening {}", dir.display()))?;
    let mut attr = FsxAttr::default();
    // SAFETY: FS_IOC_FSGETXATTR fills a struct fsxattr, which `attr` is.
    if unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FSGETXATTR, &mut attr) } < 0 {
        return Err(Error::io(
            format!("reading project of {}", dir.display()),
            std::io::Error::last_os_error(),
        ));
    }
    attr.projid = project;
    attr.xflags |= FS_XFLAG_PROJINHERIT;
    // SAFETY: FS_IOC_FSSETXATTR reads a struct fsxattr, which `attr` is.
    if unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FSSETXATTR, &attr) } < 0 {
        return Err(Error::io(
            format!("setting project {project} on {}", dir.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<IfDqblk>(), 72);
        assert_eq!(std::mem::size_of::<FsxAttr>(), 28);
        assert_eq!(std::mem::size_of::<QuotaStatV>(), 160);
        assert_eq!(qcmd(Q_SETQUOTA, PRJQUOTA) as u32, 0x8000_0802);
    }

    #[test]
    fn filesystems_without_project_quotas_are_reported() {
        let d = tempfile::tempdir().unwrap();
        // tmp on the CI root disk has no project quotas; whatever the reason, it must say so.
        if let Err(why) = Quotas::probe(d.path()) {
            assert!(why.contains("project quotas"), "{why}");
        }
    }
}
