//! Directory volumes of VM pods in the guest: the host exports one shared directory per pod
//! through virtio-fs (device tag `tandem`, hot-plugged when the pod's first directory volume
//! appears). A container's rootfs mount list then has a `virtiofs` mount of that tag in its
//! bundle (`<bundle>/shared`), and its spec bind-mounts `<bundle>/shared/<id>/<n>` where the
//! volume goes. Mounts of one tag share one superblock (one FUSE session), so every container of
//! the pod sees the same files, and the host's.
//!
//! The modules (`fuse`, `virtiofs`) are in the initramfs but not in `modules.load`: they are
//! loaded here on the first virtio-fs mount, so pods without volumes do not pay for them at boot.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

use crate::modules::{load_module, ModulesDep};

/// How long a virtio-fs mount waits for its device (hot-plugged just before: the guest's PCIe
/// hot-plug handling and the driver's probe take a while under TCG).
pub const VIRTIOFS_WAIT: Duration = Duration::from_secs(10);

/// Whether the modules were loaded (once per boot).
static LOADED: Mutex<bool> = Mutex::new(false);

/// Loads `virtiofs` and its dependencies from `modules_dir` (`modules.dep` there), once. A
/// modules dir without `modules.dep`, or without `virtiofs` in it, loads nothing (a kernel with
/// virtio-fs built in, or the agent on a host).
pub fn load_virtiofs(modules_dir: &Path) -> Result<(), String> {
    let mut done = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return Ok(());
    }
    let dep_path = modules_dir.join("modules.dep");
    if dep_path.exists() {
        let dep = ModulesDep::read(&dep_path).map_err(|e| e.to_string())?;
        if let Ok(order) = dep.load_order(&["virtiofs".to_string()]) {
            let t0 = Instant::now();
            for rel in order {
                load_module(&modules_dir.join(&rel)).map_err(|e| e.to_string())?;
            }
            tracing::info!("virtio-fs modules loaded in {:?}", t0.elapsed());
        }
    }
    *done = true;
    Ok(())
}

/// Checks a virtio-fs tag: 1-36 bytes of `[A-Za-z0-9_.-]`.
pub fn check_tag(tag: &str) -> Result<(), String> {
    let ok = !tag.is_empty()
        && tag.len() <= 36
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("virtio-fs tag {tag:?}: 1-36 of [A-Za-z0-9_.-]"))
    }
}

/// Mounts virtio-fs `tag` on `target`, waiting at most `wait` for the device to show up (an
/// unknown tag is EINVAL, a filesystem type not yet registered ENODEV).
pub fn mount_virtiofs(
    tag: &str,
    target: &Path,
    flags: MsFlags,
    data: &str,
    wait: Duration,
) -> Result<(), String> {
    check_tag(tag)?;
    let deadline = Instant::now() + wait;
    let t0 = Instant::now();
    loop {
        let r = mount(
            Some(tag),
            target,
            Some("virtiofs"),
            flags,
            (!data.is_empty()).then_some(data),
        );
        match r {
            Ok(()) => {
                tracing::info!(tag, target = %target.display(), "virtio-fs mounted after {:?}", t0.elapsed());
                return Ok(());
            }
            Err(Errno::EINVAL | Errno::ENODEV | Errno::ENOENT | Errno::ENXIO)
                if Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                return Err(format!(
                    "mount virtiofs {tag} on {}: {e} (waited {:?} for the device)",
                    target.display(),
                    t0.elapsed()
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_checked() {
        check_tag("tandem").unwrap();
        assert!(check_tag("").is_err());
        assert!(check_tag("../x").is_err());
        assert!(check_tag(&"t".repeat(37)).unwrap_err().contains("1-36"));
    }

    /// A tag no device has: the mount is retried until the wait is over, then named.
    #[test]
    fn an_absent_tag_fails_after_the_wait_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let e = mount_virtiofs(
            "tandem-absent",
            dir.path(),
            MsFlags::empty(),
            "",
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(t0.elapsed() >= Duration::from_millis(300), "{e}");
        assert!(e.contains("tandem-absent") && e.contains("waited"), "{e}");
        let e =
            mount_virtiofs("a b", dir.path(), MsFlags::empty(), "", Duration::ZERO).unwrap_err();
        assert!(e.contains("\"a b\""), "{e}");
    }

    #[test]
    fn a_modules_dir_without_modules_dep_loads_nothing() {
        let dir = tempfile::tempdir().unwrap();
        load_virtiofs(dir.path()).unwrap();
    }
}
