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
//!
//! The cache is bounded ([`gc`], `[vm] layer_cache_max_mb`): every use of a cached image touches
//! its mtime (LRU order) and takes a shared `flock` on it ([`CachedImage::lock`]), held while a
//! VM has the image attached; the collector takes each candidate with `LOCK_EX|LOCK_NB`, so an
//! image any running VM of any shim uses is never removed. A user that opened an image the
//! collector unlinked meanwhile sees the path's inode changed and makes it again.

use std::fs::File;
use std::os::fd::AsRawFd;
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

/// An image ready to attach; a cached one carries the shared lock that keeps [`gc`] off it.
#[derive(Debug)]
pub struct CachedImage {
    pub path: PathBuf,
    /// `LOCK_SH` on the cached image; drop it when no VM of this shim uses the image any more.
    pub lock: Option<File>,
}

fn flock(f: &File, op: i32) -> std::io::Result<()> {
    loop {
        // SAFETY: plain syscall on an open fd.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether `f` is (still) the file at `path`: the collector may have unlinked it after we opened it.
fn same_file(f: &File, path: &Path) -> bool {
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Open the cached image at `out` under a shared lock, making it first when missing; touches its
/// mtime (the LRU order of [`gc`]).
fn cached(dir: &Path, out: &Path) -> Result<CachedImage, Error> {
    for _ in 0..5 {
        if !out.exists() {
            mkfs(dir, out)?;
        }
        let f = match File::open(out) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(err(out.display(), format!("open: {e}"))),
        };
        flock(&f, libc::LOCK_SH).map_err(|e| err(out.display(), format!("flock: {e}")))?;
        if !same_file(&f, out) {
            continue; // collected between open and lock
        }
        if let Err(e) = f.set_modified(std::time::SystemTime::now()) {
            tracing::debug!("touch {}: {e}", out.display());
        }
        return Ok(CachedImage {
            path: out.to_path_buf(),
            lock: Some(f),
        });
    }
    Err(err(
        out.display(),
        "removed by the cache collector again and again while being used",
    ))
}

/// The image of a layer: from the cache (made on first use, locked shared) or a private one at
/// `<private_dir>/<name>`.
pub fn image(layer: &Layer, cache: &Path, private: &Path) -> Result<CachedImage, Error> {
    match layer {
        Layer::Committed(dir) => cached(dir, &cache.join(cache_key(dir)?)),
        Layer::Private(dir) => {
            mkfs(dir, private)?;
            Ok(CachedImage {
                path: private.to_path_buf(),
                lock: None,
            })
        }
    }
}

/// What one [`gc`] pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    /// Images removed, oldest first.
    pub removed: Vec<PathBuf>,
    /// Bytes of images left in the cache.
    pub left_bytes: u64,
    /// Images kept over the bound because a VM uses them.
    pub busy: usize,
}

/// Remove least recently used cached images (`*.erofs`, oldest mtime first) that no VM holds
/// (a shared lock, see [`CachedImage`]) until the cache holds at most `max_bytes`. Images in use
/// are skipped whatever their age. Temp files of a `mkfs` in progress are left alone.
pub fn gc(cache: &Path, max_bytes: u64) -> Result<GcReport, Error> {
    let mut images = Vec::new();
    let rd = match std::fs::read_dir(cache) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(GcReport::default()),
        Err(e) => return Err(err(cache.display(), format!("read dir: {e}"))),
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(".erofs") {
            continue;
        }
        let Ok(md) = e.metadata() else { continue };
        if md.is_file() {
            images.push((md.mtime(), md.mtime_nsec(), md.len(), e.path()));
        }
    }
    images.sort();
    let mut total: u64 = images.iter().map(|i| i.2).sum();
    let mut report = GcReport::default();
    for (_, _, len, path) in images {
        if total <= max_bytes {
            break;
        }
        let Ok(f) = File::open(&path) else { continue };
        if flock(&f, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            report.busy += 1;
            continue;
        }
        if !same_file(&f, &path) {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                total -= len;
                report.removed.push(path);
            }
            Err(e) => tracing::warn!("layer cache: remove {}: {e}", path.display()),
        }
    }
    report.left_bytes = total;
    Ok(report)
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
        .unwrap()
        .path;
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
        assert!(b.lock.is_some(), "a cached image is held");
        let b = b.path;
        assert_eq!(a, b);
        // made once: the same file (a use touches its mtime, the LRU order)
        assert_eq!(std::fs::metadata(&b).unwrap().ino(), md.ino());
        let private = d.path().join("run/c1-0.erofs");
        let p = image(&Layer::Private(layer), &cache, &private).unwrap();
        assert!(p.lock.is_none());
        assert_eq!(p.path, private);
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

    /// The cache is cut down to its bound oldest first; an image a VM (here: another open file
    /// description, as another shim's would be) holds shared stays, however old; temp files stay.
    #[test]
    fn gc_removes_least_recently_used_unlocked_images() {
        let d = tempfile::tempdir().unwrap();
        let cache = d.path().join("cache");
        let mut imgs = Vec::new();
        for i in 0..4 {
            let layer = d.path().join(format!("snapshots/{i}/fs"));
            std::fs::create_dir_all(&layer).unwrap();
            std::fs::write(layer.join("f"), vec![b'x'; 64 << 10]).unwrap();
            imgs.push(image(&Layer::Committed(layer), &cache, Path::new("/unused")).unwrap());
        }
        // LRU order: 0 oldest .. 3 newest (mtimes set apart)
        let now = std::time::SystemTime::now();
        for (i, im) in imgs.iter().enumerate() {
            let t = now - std::time::Duration::from_secs(100 * (4 - i as u64));
            File::options()
                .write(true)
                .open(&im.path)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        let size = std::fs::metadata(&imgs[0].path).unwrap().len();
        std::fs::write(cache.join(".x.erofs.1.2.tmp"), b"in progress").unwrap();
        let paths: Vec<PathBuf> = imgs.iter().map(|i| i.path.clone()).collect();
        // 1 is in use (its lock kept); the others' users are gone
        let mut held = None;
        for (i, im) in imgs.into_iter().enumerate() {
            if i == 1 {
                held = im.lock;
            }
        }
        // unbounded enough: nothing goes
        let r = gc(&cache, 4 * size).unwrap();
        assert!(r.removed.is_empty(), "{r:?}");
        // room for two: 0 goes (oldest), 1 is busy, 2 goes; 3 (newest) stays
        let r = gc(&cache, 2 * size).unwrap();
        assert_eq!(r.removed, vec![paths[0].clone(), paths[2].clone()]);
        assert_eq!(r.busy, 1);
        assert_eq!(r.left_bytes, 2 * size);
        assert!(paths[1].exists() && paths[3].exists());
        assert!(cache.join(".x.erofs.1.2.tmp").exists(), "temp file kept");
        // nothing fits in 0 bytes but the busy one stays
        let r = gc(&cache, 0).unwrap();
        assert_eq!(r.removed, vec![paths[3].clone()]);
        assert!(paths[1].exists());
        drop(held);
        let r = gc(&cache, 0).unwrap();
        assert_eq!(r.removed, vec![paths[1].clone()]);
        assert_eq!(r.left_bytes, 0);
        // a missing cache dir is an empty one
        assert_eq!(gc(&d.path().join("none"), 0).unwrap(), GcReport::default());
    }

    /// A cached image the collector removed while a user had it open but not yet locked is made
    /// again: the user never attaches an unlinked file.
    #[test]
    fn an_image_collected_before_its_lock_is_made_again() {
        let d = tempfile::tempdir().unwrap();
        let cache = d.path().join("cache");
        let layer = d.path().join("snapshots/1/fs");
        std::fs::create_dir_all(&layer).unwrap();
        std::fs::write(layer.join("f"), b"x").unwrap();
        let out = cache.join(cache_key(&layer).unwrap());
        mkfs(&layer, &out).unwrap();
        let old = std::fs::metadata(&out).unwrap().ino();
        // a stale handle on the old file does not count as the cached image
        let stale = File::open(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        assert!(!same_file(&stale, &out));
        let im = image(&Layer::Committed(layer), &cache, Path::new("/unused")).unwrap();
        assert!(same_file(im.lock.as_ref().unwrap(), &im.path));
        assert_ne!(std::fs::metadata(&im.path).unwrap().ino(), old);
    }
}
