//! A container's rootfs for the guest: every read-only layer as an erofs image on a read-only
//! virtio-blk disk, stacked in the guest with overlay over a tmpfs upper layer (docs/vm-mode.md).
//!
//! containerd hands the shim either an overlay mount (`lowerdir=` committed snapshots, top
//! first, plus the container's own `upperdir`), a bind mount of one snapshot (an image with a
//! single layer, or a scratch one), or nothing (`ctr run --rootfs`/`--config`: `root.path` is a
//! host directory). Committed snapshots never change, so their images are made once and cached
//! under `[vm] layer_cache`, keyed by the snapshot directory's path, inode and change time; a
//! directory that may still change (the bind of an active snapshot, a `--rootfs` directory) gets
//! an image of its own in the pod's run directory, removed with the container. Blocking.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::state::MountRecord;

#[derive(Debug, thiserror::Error)]
#[error("rootfs {what}: {msg}")]
pub struct Error {
    pub what: String,
    pub msg: String,
}

fn err(what: impl std::fmt::Display, msg: impl Into<String>) -> Error {
    Error {
        what: what.to_string(),
        msg: msg.into(),
    }
}

/// Where a layer comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layer {
    /// A committed snapshot: its image is cached.
    Committed(PathBuf),
    /// A directory that may change: its image belongs to the container.
    Private(PathBuf),
}

/// The layers of a container, top first, from containerd's mounts or the spec's `root.path`.
pub fn plan(mounts: &[MountRecord], bundle: &Path, root_path: &str) -> Result<Vec<Layer>, Error> {
    match mounts {
        [] => {
            let p = Path::new(root_path);
            let dir = if p.is_absolute() {
                p.to_path_buf()
            } else {
                bundle.join(p)
            };
            if !dir.is_dir() {
                return Err(err(dir.display(), "not a directory (root.path)"));
            }
            Ok(vec![Layer::Private(dir)])
        }
        [m] if m.kind == "overlay" => {
            let lower = m
                .options
                .iter()
                .find_map(|o| o.strip_prefix("lowerdir="))
                .ok_or_else(|| {
                    err(
                        format!("overlay mount {}", m.source),
                        format!("no lowerdir= in options {:?}", m.options),
                    )
                })?;
            let mut layers = Vec::new();
            // an upperdir that already holds files (a container made from a previous
            // container's snapshot) is the top layer
            if let Some(upper) = m.options.iter().find_map(|o| o.strip_prefix("upperdir=")) {
                let upper = Path::new(upper);
                if std::fs::read_dir(upper)
                    .map(|mut d| d.next().is_some())
                    .unwrap_or(false)
                {
                    layers.push(Layer::Private(upper.to_path_buf()));
                }
            }
            for l in lower.split(':').filter(|l| !l.is_empty()) {
                layers.push(Layer::Committed(PathBuf::from(l)));
            }
            Ok(layers)
        }
        [m] if m.kind == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind") => {
            let ro = m.options.iter().any(|o| o == "ro");
            let dir = PathBuf::from(&m.source);
            Ok(vec![if ro {
                Layer::Committed(dir)
            } else {
                Layer::Private(dir)
            }])
        }
        other => Err(err(
            "mounts",
            format!(
                "VM mode takes one overlay or bind mount from the snapshotter, got {:?}",
                other
                    .iter()
                    .map(|m| format!("{} {}", m.kind, m.source))
                    .collect::<Vec<_>>()
            ),
        )),
    }
}

/// The cache file name of a committed layer: the path made safe, its inode and change time.
pub fn cache_key(dir: &Path) -> Result<String, Error> {
    let md = std::fs::metadata(dir).map_err(|e| err(dir.display(), e.to_string()))?;
    let mut name: String = dir
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    // long paths keep their distinctive end (…/snapshots/<n>/fs)
    if name.len() > 120 {
        name = name[name.len() - 120..].to_string();
    }
    Ok(format!(
        "{name}-{}-{}.{}.erofs",
        md.ino(),
        md.ctime(),
        md.ctime_nsec()
    ))
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Make an erofs image of `dir` at `out` (written beside it, then renamed into place).
pub fn mkfs(dir: &Path, out: &Path) -> Result<(), Error> {
    let parent = out.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent).map_err(|e| err(parent.display(), e.to_string()))?;
    let tmp = parent.join(format!(
        ".{}.{}.{}.tmp",
        out.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let o = super::output(Command::new("mkfs.erofs").arg("--quiet").arg(&tmp).arg(dir))
        .map_err(|e| err(dir.display(), format!("run mkfs.erofs (erofs-utils): {e}")))?;
    if !o.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(
            dir.display(),
            format!(
                "mkfs.erofs {}: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        ));
    }
    std::fs::rename(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(out.display(), format!("rename: {e}"))
    })
}

/// The image of a layer: from the cache (made on first use) or a private one at
/// `<private_dir>/<name>`.
pub fn image(layer: &Layer, cache: &Path, private: &Path) -> Result<PathBuf, Error> {
    match layer {
        Layer::Committed(dir) => {
            let out = cache.join(cache_key(dir)?);
            if !out.exists() {
                mkfs(dir, &out)?;
            }
            Ok(out)
        }
        Layer::Private(dir) => {
            mkfs(dir, private)?;
            Ok(private.to_path_buf())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mr(kind: &str, source: &str, options: &[&str]) -> MountRecord {
        MountRecord {
            kind: kind.into(),
            source: source.into(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn plans_from_containerd_mounts() {
        let d = tempfile::tempdir().unwrap();
        let upper = d.path().join("u");
        std::fs::create_dir(&upper).unwrap();
        let lower = "lowerdir=/s/3/fs:/s/1/fs".to_string();
        let o = mr(
            "overlay",
            "overlay",
            &[
                "index=off",
                &format!("workdir={}/w", d.path().display()),
                &format!("upperdir={}", upper.display()),
                &lower,
            ],
        );
        assert_eq!(
            plan(std::slice::from_ref(&o), d.path(), "rootfs").unwrap(),
            vec![
                Layer::Committed("/s/3/fs".into()),
                Layer::Committed("/s/1/fs".into())
            ]
        );
        // files in the upper dir: it becomes the top layer
        std::fs::write(upper.join("f"), b"x").unwrap();
        assert_eq!(
            plan(&[o], d.path(), "rootfs").unwrap()[0],
            Layer::Private(upper)
        );
        assert_eq!(
            plan(
                &[mr("bind", "/s/2/fs", &["ro", "rbind"])],
                d.path(),
                "rootfs"
            )
            .unwrap(),
            vec![Layer::Committed("/s/2/fs".into())]
        );
        assert_eq!(
            plan(
                &[mr("bind", "/s/2/fs", &["rw", "rbind"])],
                d.path(),
                "rootfs"
            )
            .unwrap(),
            vec![Layer::Private("/s/2/fs".into())]
        );
        std::fs::create_dir(d.path().join("rootfs")).unwrap();
        assert_eq!(
            plan(&[], d.path(), "rootfs").unwrap(),
            vec![Layer::Private(d.path().join("rootfs"))]
        );
        let e = plan(&[], d.path(), "/nonexistent/r")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/r"), "{e}");
        let e = plan(
            &[mr("overlay", "overlay", &["upperdir=/x"])],
            d.path(),
            "rootfs",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("lowerdir"), "{e}");
        let e = plan(&[mr("ext4", "/dev/sda", &[])], d.path(), "rootfs")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ext4 /dev/sda"), "{e}");
    }

    #[test]
    fn committed_layers_are_cached_private_ones_are_not() {
        let d = tempfile::tempdir().unwrap();
        let layer = d.path().join("snapshots/7/fs");
        std::fs::create_dir_all(layer.join("etc")).unwrap();
        std::fs::write(layer.join("etc/marker"), b"hi").unwrap();
        let cache = d.path().join("cache");
        let a = image(
            &Layer::Committed(layer.clone()),
            &cache,
            Path::new("/unused"),
        )
        .unwrap();
        assert!(a.starts_with(&cache));
        assert!(
            a.to_string_lossy().contains("snapshots_7_fs"),
            "{}",
            a.display()
        );
        let md = std::fs::metadata(&a).unwrap();
        // erofs superblock magic at offset 1024
        let bytes = std::fs::read(&a).unwrap();
        assert_eq!(&bytes[1024..1028], &0xE0F5_E1E2u32.to_le_bytes());
        let b = image(
            &Layer::Committed(layer.clone()),
            &cache,
            Path::new("/unused"),
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(std::fs::metadata(&b).unwrap().mtime(), md.mtime());
        let private = d.path().join("run/c1-0.erofs");
        let p = image(&Layer::Private(layer), &cache, &private).unwrap();
        assert_eq!(p, private);
        assert!(private.exists());
        // no temp files left
        for dir in [&cache, &d.path().join("run")] {
            for e in std::fs::read_dir(dir).unwrap() {
                let n = e.unwrap().file_name().to_string_lossy().into_owned();
                assert!(!n.ends_with(".tmp"), "{n}");
            }
        }
        let e = image(
            &Layer::Committed("/nonexistent/layer".into()),
            &cache,
            Path::new("/unused"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/layer"), "{e}");
    }
}
