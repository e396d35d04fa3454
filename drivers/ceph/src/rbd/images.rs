//! The multi-step image operations of the controller, each safe to run
//! again after a crash at any step: it looks at what exists and does the
//! rest. All blocking; the controller runs them off the runtime.

use crate::librbd::{self, Image, ImageSpec, Parent};
use crate::rados::{Connection, IoCtx};
use csi_core::{Error, Result};
use std::sync::Arc;

/// Deepest parent chain followed (clones are flattened long before).
const MAX_WALK: u32 = 64;

/// Where a new image's content comes from.
pub enum Origin {
    /// An empty image.
    Empty,
    /// A clone of snapshot `snap` of image `image` in `io`.
    Snapshot {
        /// The snapshot's pool.
        io: Arc<IoCtx>,
        /// The image holding the snapshot.
        image: String,
        /// The snapshot.
        snap: String,
    },
    /// A clone of the current content of image `image` in `io`, through a
    /// temporary snapshot `tmp` that is removed afterwards.
    Image {
        /// The source's pool.
        io: Arc<IoCtx>,
        /// The source image.
        image: String,
        /// The temporary snapshot's name.
        tmp: String,
    },
}

/// Clones `image` through the temporary snapshot `tmp` as `name`, then
/// removes `tmp` (format-2 clones keep it in the trash namespace).
fn clone_current(
    src_io: &IoCtx,
    image: &str,
    tmp: &str,
    io: &IoCtx,
    name: &str,
    spec: &ImageSpec,
) -> Result<()> {
    let src = Image::open(src_io, image)?;
    src.snap_create(tmp)?;
    match librbd::clone(src_io, image, tmp, io, name, spec) {
        Ok(()) | Err(Error::AlreadyExists(_)) => {}
        Err(e) => return Err(e),
    }
    src.snap_remove(tmp)
}

/// Removes the temporary snapshot a crash may have left on a source.
fn drop_tmp(src_io: &IoCtx, image: &str, tmp: &str) -> Result<()> {
    match Image::inspect(src_io, image) {
        Ok(src) if src.snap_exists(tmp)? => Image::open(src_io, image)?.snap_remove(tmp),
        Ok(_) | Err(Error::NotFound(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes sure image `name` exists in `io` with at least `size` bytes and
/// the content of `origin`; returns its internal id.
pub fn ensure_image(
    io: &IoCtx,
    name: &str,
    size: u64,
    spec: &ImageSpec,
    origin: &Origin,
) -> Result<String> {
    let make = || {
        let made = match origin {
            Origin::Empty => librbd::create(io, name, size, spec),
            Origin::Snapshot {
                io: sio,
                image,
                snap,
            } => librbd::clone(sio, image, snap, io, name, spec),
            Origin::Image {
                io: sio,
                image,
                tmp,
            } => clone_current(sio, image, tmp, io, name, spec),
        };
        match made {
            Ok(()) | Err(Error::AlreadyExists(_)) => Ok(()),
            Err(e) => Err(e),
        }
    };
    let exists = match Image::inspect(io, name) {
        Ok(_) => true,
        Err(Error::NotFound(_)) => false,
        Err(e) => return Err(e),
    };
    if !exists {
        make()?;
        if let Err(Error::NotFound(_)) = Image::inspect(io, name) {
            // A crash in the middle of librbd's create left the name taken
            // but no image: remove what is there and make it again.
            librbd::remove(io, name)?;
            make()?;
        }
    }
    if let Origin::Image {
        io: sio,
        image,
        tmp,
    } = origin
    {
        drop_tmp(sio, image, tmp)?;
    }
    let img = Image::inspect(io, name)?;
    if img.size()? < size {
        Image::open(io, name)?.resize(size)?;
    }
    img.id()
}

/// How many clones deep image `img` is (0: not a clone).
pub fn depth(conn: &Arc<Connection>, img: &Image<'_>) -> Result<u32> {
    let mut next = img.parent()?;
    let mut n = 0;
    while let Some(p) = next {
        n += 1;
        if n >= MAX_WALK {
            break;
        }
        let io = conn.ioctx(p.pool_id, Some(&p.namespace))?;
        next = Image::inspect_by_id(&io, &p.image_id)?.parent()?;
    }
    Ok(n)
}

/// Flattens image `name` when it is more than `max` clones deep, so chains
/// stay short; returns whether it did.
pub fn flatten_if_deep(conn: &Arc<Connection>, io: &IoCtx, name: &str, max: u32) -> Result<bool> {
    if depth(conn, &Image::inspect(io, name)?)? <= max {
        return Ok(false);
    }
    let img = Image::open(io, name)?;
    let parent = img.parent()?;
    img.flatten()?;
    drop(img);
    purge_trashed(conn, parent)?;
    Ok(true)
}

/// Makes sure snapshot image `name` (a clone of `src_image`'s current
/// content, through the temporary snapshot `tmp`) exists in `io` with its
/// own snapshot `name`, flattened first when deeper than `max`; returns
/// the snapshot's size.
pub fn ensure_snapshot(
    conn: &Arc<Connection>,
    src: (&IoCtx, &str),
    tmp: &str,
    io: &IoCtx,
    name: &str,
    max: u32,
) -> Result<u64> {
    let (src_io, src_image) = src;
    let exists = match Image::inspect(io, name) {
        Ok(_) => true,
        Err(Error::NotFound(_)) => false,
        Err(e) => return Err(e),
    };
    if !exists {
        let src = Image::inspect(src_io, src_image)?;
        let spec = ImageSpec {
            features: src.features()?,
            ..Default::default()
        };
        drop(src);
        clone_current(src_io, src_image, tmp, io, name, &spec)?;
        if let Err(Error::NotFound(_)) = Image::inspect(io, name) {
            // Half made by a crash inside librbd: start over.
            librbd::remove(io, name)?;
            clone_current(src_io, src_image, tmp, io, name, &spec)?;
        }
    }
    drop_tmp(src_io, src_image, tmp)?;
    let img = Image::inspect(io, name)?;
    if !img.snap_exists(name)? {
        // Snapshots pin a clone to its parent: flatten before taking one.
        drop(img);
        flatten_if_deep(conn, io, name, max)?;
        Image::open(io, name)?.snap_create(name)?;
        return Image::inspect(io, name)?.size();
    }
    img.size()
}

/// Removes image `name` (internal id `id` when known): trash first, then
/// purge. An image with clones stays in the trash until its last clone
/// goes; its trashed parents are purged once they have no clones left.
/// FailedPrecondition while a client has the image open (mapped).
pub fn remove_image(
    conn: &Arc<Connection>,
    io: &IoCtx,
    name: &str,
    id: Option<&str>,
) -> Result<()> {
    let id = match id.filter(|i| !i.is_empty()) {
        Some(id) => id.to_owned(),
        None => match Image::inspect(io, name) {
            Ok(img) => img.id()?,
            // Nothing, or what a crash inside librbd's create left.
            Err(Error::NotFound(_)) => return librbd::remove(io, name),
            Err(e) => return Err(e),
        },
    };
    let (parent, watchers) = match Image::inspect_by_id(io, &id) {
        Ok(img) => (img.parent()?, img.watchers()?),
        Err(Error::NotFound(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    if !watchers.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "image {name} is in use by {} (mapped on a node); unstage it first",
            watchers.join(", ")
        )));
    }
    // Our own snapshots go with the image (a snapshot image's one, a
    // temporary one a crash left); anyone else's stop the delete.
    match Image::inspect_by_id(io, &id) {
        Ok(img) => {
            let snaps = img.snapshots()?;
            let (ours, theirs): (Vec<String>, Vec<String>) =
                snaps.into_iter().partition(|s| s.starts_with("csi-"));
            if !theirs.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "image {name} has snapshots rbd.rcsi.io did not make ({}); remove them first",
                    theirs.join(", ")
                )));
            }
            if !ours.is_empty() {
                let img = Image::open_by_id(io, &id)?;
                for s in ours {
                    img.snap_remove(&s)?;
                }
            }
        }
        Err(Error::NotFound(_)) => return Ok(()),
        Err(e) => return Err(e),
    }
    match librbd::trash_move(io, name) {
        Ok(()) | Err(Error::NotFound(_)) => {}
        Err(Error::FailedPrecondition(m)) => {
            return Err(Error::FailedPrecondition(format!(
                "{m}: image {name} is in use (mapped on a node)"
            )));
        }
        Err(e) => return Err(e),
    }
    match librbd::trash_remove(io, &id) {
        Ok(()) => purge_trashed(conn, parent),
        // Clones still depend on it: it stays in the trash until they go.
        Err(Error::FailedPrecondition(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Purges `parent` and its ancestors while they are in the trash and no
/// longer have clones.
pub fn purge_trashed(conn: &Arc<Connection>, mut parent: Option<Parent>) -> Result<()> {
    for _ in 0..MAX_WALK {
        let Some(p) = parent.take().filter(|p| p.trash) else {
            return Ok(());
        };
        let io = conn.ioctx(p.pool_id, Some(&p.namespace))?;
        let up = match Image::inspect_by_id(&io, &p.image_id) {
            Ok(img) => img.parent()?,
            Err(Error::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        match librbd::trash_remove(&io, &p.image_id) {
            Ok(()) => parent = up,
            Err(Error::FailedPrecondition(_)) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
