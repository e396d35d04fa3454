//! Whole-tree work over the userspace client: removal and copying, one
//! directory page at a time, so memory stays bounded however large the tree.

use crate::client::{Attr, Kind, Result, Share};
use crate::error::NfsError;
use nfs3_client::nfs3_types::nfs3::{Nfs3Option, nfs_fh3, nfstime3, sattr3, set_mtime};

/// Bytes read or written per call when copying files.
const CHUNK: u32 = 256 << 10;
/// How often a file that changes while it is copied is copied again.
const COPY_TRIES: usize = 3;

/// Removes `name` in `parent` and everything below it; success when it is gone.
pub async fn remove_tree(share: &Share, parent: &nfs_fh3, name: &[u8]) -> Result<()> {
    let Some((fh, attr)) = share.lookup(parent, name).await? else {
        return Ok(());
    };
    if attr.kind != Kind::Dir {
        return share.remove(parent, name).await;
    }
    // Depth first; a directory is read again from its start after its
    // subdirectories are gone, so no listing is ever held whole.
    let mut stack = vec![(parent.clone(), name.to_vec(), fh)];
    while let Some((pfh, pname, fh)) = stack.last().cloned() {
        let (entries, _, _, eof) = share.readdir_page(&fh, 0, [0; 8]).await?;
        if entries.is_empty() && eof {
            share.rmdir(&pfh, &pname).await?;
            stack.pop();
            continue;
        }
        for e in entries {
            if e.attr.kind == Kind::Dir {
                stack.push((fh.clone(), e.name, e.fh));
            } else {
                share.remove(&fh, &e.name).await?;
            }
        }
    }
    Ok(())
}

/// What a copy did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// Bytes of file data.
    pub bytes: u64,
    /// Files, directories and links created.
    pub entries: u64,
    /// Files copied again because they changed during their copy.
    pub recopied: u64,
}

struct Frame {
    src: nfs_fh3,
    dst: nfs_fh3,
    attr: Attr,
    cookie: u64,
    verf: [u8; 8],
    eof: bool,
}

/// Copies the contents of directory `src` (on `from`) into the existing
/// directory `dst` (on `to`), keeping modes, owners and modification times.
/// Each file is copied until it did not change while being read (at most
/// [`COPY_TRIES`] times; then the copy fails, as it would not be consistent).
pub async fn copy_tree(from: &Share, src: &nfs_fh3, to: &Share, dst: &nfs_fh3) -> Result<Copied> {
    let mut done = Copied::default();
    let mut stack = vec![Frame {
        attr: from.getattr(src).await?,
        src: src.clone(),
        dst: dst.clone(),
        cookie: 0,
        verf: [0; 8],
        eof: false,
    }];
    while let Some(top) = stack.last_mut() {
        if top.eof {
            let f = stack.pop().expect("the stack is not empty");
            to.setattr(&f.dst, keep(&f.attr)).await?;
            continue;
        }
        let (entries, next, verf, eof) = from.readdir_page(&top.src, top.cookie, top.verf).await?;
        (top.cookie, top.verf, top.eof) = (next, verf, eof);
        let dir = top.dst.clone();
        let mut children = Vec::new();
        for e in entries {
            done.entries += 1;
            match e.attr.kind {
                Kind::Dir => {
                    let d = to.mkdir(&dir, &e.name, 0o700).await?;
                    children.push(Frame {
                        src: e.fh,
                        dst: d,
                        attr: e.attr,
                        cookie: 0,
                        verf: [0; 8],
                        eof: false,
                    });
                }
                Kind::File => {
                    let (bytes, tries) = copy_file(from, &e.fh, &e.attr, to, &dir, &e.name).await?;
                    done.bytes += bytes;
                    done.recopied += tries as u64 - 1;
                }
                Kind::Symlink => {
                    let target = from.readlink(&e.fh).await?;
                    to.symlink(&dir, &e.name, &target).await?;
                }
                _ => to.mknod(&dir, &e.name, &e.attr).await?,
            }
        }
        stack.extend(children);
    }
    Ok(done)
}

/// Copies one file; returns its size and how many reads it took.
async fn copy_file(
    from: &Share,
    src: &nfs_fh3,
    listed: &Attr,
    to: &Share,
    dir: &nfs_fh3,
    name: &[u8],
) -> Result<(u64, usize)> {
    let mut before = listed.clone();
    for attempt in 1..=COPY_TRIES {
        let out = to.create(dir, name, 0o600).await?;
        let mut offset = 0u64;
        loop {
            let (data, eof) = from.read(src, offset, CHUNK).await?;
            // Runs of zeros stay holes: the final size is set below.
            if data.iter().any(|b| *b != 0) {
                to.write(&out, offset, &data).await?;
            }
            offset += data.len() as u64;
            if eof || data.is_empty() {
                break;
            }
        }
        let after = from.getattr(src).await?;
        if after.mtime == before.mtime && after.ctime == before.ctime && after.size == offset {
            let mut attrs = keep(&after);
            attrs.size = Nfs3Option::Some(offset);
            to.setattr(&out, attrs).await?;
            return Ok((offset, attempt));
        }
        before = after;
    }
    Err(NfsError::Status {
        what: format!(
            "copying {}: it kept changing while it was read ({COPY_TRIES} tries); stop its writers or retry",
            String::from_utf8_lossy(name)
        ),
        status: "busy".into(),
        code: crate::error::nfsstat::JUKEBOX,
    })
}

/// Attributes that make a copy look like its source.
fn keep(a: &Attr) -> sattr3 {
    sattr3 {
        mode: Nfs3Option::Some(a.mode),
        uid: Nfs3Option::Some(a.uid),
        gid: Nfs3Option::Some(a.gid),
        mtime: set_mtime::SET_TO_CLIENT_TIME(nfstime3 {
            seconds: a.mtime.0,
            nseconds: a.mtime.1,
        }),
        ..Default::default()
    }
}
