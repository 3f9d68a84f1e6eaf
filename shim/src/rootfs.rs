//! containerd's rootfs mounts (an overlay from the snapshotter, usually one) mounted at
//! `<bundle>/rootfs` before create, unmounted at delete. With `ctr run --rootfs <dir>` there are
//! none and nothing is done. Blocking: call from a blocking thread.

use std::path::{Path, PathBuf};

use crate::state::MountRecord;

#[derive(Debug, thiserror::Error)]
#[error("rootfs {target}: {msg}")]
pub struct Error {
    pub target: PathBuf,
    pub msg: String,
}

/// Mount each of `mounts` at `target`, in order. On failure, whatever was mounted is unmounted
/// again and the error names the mount that failed.
pub fn mount_all(mounts: &[MountRecord], target: &Path) -> Result<(), Error> {
    for (i, m) in mounts.iter().enumerate() {
        let kind = Some(m.kind.as_str()).filter(|s| !s.is_empty());
        let source = Some(m.source.as_str()).filter(|s| !s.is_empty());
        if let Err(e) = containerd_shim::mount::mount_rootfs(kind, source, &m.options, target) {
            if i > 0 {
                let _ = unmount(target);
            }
            return Err(Error {
                target: target.to_path_buf(),
                msg: format!(
                    "mount {} (type {}, options {}): {e}",
                    m.source,
                    m.kind,
                    m.options.join(",")
                ),
            });
        }
    }
    Ok(())
}

/// Unmount everything at or below `target`. Nothing mounted is fine.
pub fn unmount(target: &Path) -> Result<(), Error> {
    let t = target.to_string_lossy();
    containerd_shim::mount::umount_recursive(Some(&t), libc::MNT_DETACH).map_err(|e| Error {
        target: target.to_path_buf(),
        msg: format!("unmount: {e}"),
    })
}
