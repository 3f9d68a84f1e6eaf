//! Directory volumes of VM pods (emptyDir, hostPath directories, `ctr run --mount` of a
//! directory), Kata's shared-dir model: one shared directory per pod, `<run dir>/shared`,
//! exported to the guest by one `virtiofsd` (tag [`FS_TAG`]), started and hot-plugged when the
//! pod's first directory volume appears. Each directory bind mount of a container is
//! bind-mounted by the shim at `<shared>/<container id>/<n>` (n: the mount's index in the spec),
//! read-only when the mount is; the guest mounts the tag in the container's bundle and its spec
//! binds `<bundle>/shared/<id>/<n>` where the volume goes.
//!
//! Host safety: the shared dir is a small tmpfs of its own (the guest can write there, it must
//! not fill the host's /run); the binds are made with the new mount API (open_tree clone,
//! mount_setattr, move_mount), so a read-only volume is never visible writable, not even for an
//! instant, and `nodev` (the guest cannot open host device nodes through a volume). Nothing
//! under the run dir is removed before everything mounted below it is unmounted
//! ([`remove_run_dir`]): a recursive remove through a bind mount would delete the host's files.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The tag of the pod's virtio-fs device.
pub use tandem_vmm::qemu::virtiofs::FS_TAG;

/// The shared dir in a VM's run dir.
pub const SHARED_DIR: &str = "shared";
/// Where the agent mounts the tag, relative to a container's bundle in the guest.
pub const GUEST_SHARED: &str = "shared";
/// Size of the shared dir's own tmpfs: it holds only the mount point directories.
const SHARED_TMPFS: &str = "size=1m,nr_inodes=8192,mode=0755";

/// A directory bind mount of a container, served through the pod's shared dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirBind {
    /// The mount's index in the spec's `mounts` (names its place in the shared dir).
    pub index: usize,
    /// Host directory.
    pub source: PathBuf,
    /// Destination in the container (for messages).
    pub dest: String,
    /// `ro` in the options.
    pub readonly: bool,
    /// `rbind` in the options (the host's mounts below the source come along).
    pub recursive: bool,
}

/// The guest path a container's bind `index` is served at.
pub fn guest_source(guest_bundle: &str, id: &str, index: usize) -> String {
    format!("{guest_bundle}/{GUEST_SHARED}/{id}/{index}")
}

/// A container id as one path component: containerd's `[A-Za-z0-9_.-]`, not `.` or `..`.
pub fn check_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 255
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "container id {id:?}: not usable as a directory name"
        ))
    }
}

fn cpath(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("{}: contains NUL", p.display()))
}

fn last_err(what: &str, p: &Path) -> String {
    format!(
        "{what} {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    )
}

/// Makes `<run_dir>/shared` a small tmpfs of its own; returns its path.
pub fn make_shared_dir(run_dir: &Path) -> Result<PathBuf, String> {
    let dir = run_dir.join(SHARED_DIR);
    std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let r = nix::mount::mount(
        Some("tandem-shared"),
        &dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(SHARED_TMPFS),
    );
    if let Err(e) = r {
        let _ = std::fs::remove_dir(&dir);
        return Err(format!("mount tmpfs on {}: {e}", dir.display()));
    }
    Ok(dir)
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Bind `source` on `target` (an existing directory) with the new mount API: the detached
/// copy gets its attributes (read-only, nodev, nosuid) before it is attached.
fn bind_with_attrs(
    source: &Path,
    target: &Path,
    readonly: bool,
    recursive: bool,
) -> Result<(), String> {
    let src = cpath(source)?;
    let mut flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
    if recursive {
        flags |= AT_RECURSIVE;
    }
    // SAFETY: plain syscall with a valid C string; the fd returned is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, src.as_ptr(), flags) };
    if fd < 0 {
        return Err(last_err("open_tree", source));
    }
    // SAFETY: fresh fd.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut attr = MountAttr {
        attr_set: MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID,
        attr_clr: 0,
        propagation: libc::MS_PRIVATE,
        userns_fd: 0,
    };
    if readonly {
        attr.attr_set |= MOUNT_ATTR_RDONLY;
    }
    let mut at = libc::AT_EMPTY_PATH as libc::c_uint;
    if recursive {
        at |= AT_RECURSIVE;
    }
    // SAFETY: valid fd, empty path, attr of the size given.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            at,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(last_err("mount_setattr (ro/nodev/nosuid) of", source));
    }
    let dst = cpath(target)?;
    // SAFETY: valid fd and C string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(format!(
            "move_mount {} to {}: {}",
            source.display(),
            target.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Binds each of `binds` at `<shared>/<id>/<index>`. The sources must be directories. On error
/// what was made is undone and the error names the bind.
pub fn bind_container(shared: &Path, id: &str, binds: &[DirBind]) -> Result<(), String> {
    check_id(id)?;
    let dir = shared.join(id);
    std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    for b in binds {
        let target = dir.join(b.index.to_string());
        let r = std::fs::create_dir(&target)
            .map_err(|e| format!("mkdir {}: {e}", target.display()))
            .and_then(|()| match std::fs::metadata(&b.source) {
                Ok(m) if m.is_dir() => Ok(()),
                Ok(_) => Err(format!("{}: not a directory", b.source.display())),
                Err(e) => Err(format!("{}: {e}", b.source.display())),
            })
            .and_then(|()| bind_with_attrs(&b.source, &target, b.readonly, b.recursive));
        if let Err(e) = r {
            unbind_container(shared, id);
            return Err(format!("volume {} -> {}: {e}", b.source.display(), b.dest));
        }
    }
    Ok(())
}

/// Unmounts the binds of container `id` and removes its directory in the shared dir.
pub fn unbind_container(shared: &Path, id: &str) {
    if check_id(id).is_err() {
        return;
    }
    let dir = shared.join(id);
    if !dir.exists() {
        return;
    }
    let left = unmount_under(&dir);
    if !left.is_empty() {
        tracing::warn!(?left, "volumes of container {id} still mounted");
        return;
    }
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            // only the (now empty) mount point directories: never a recursive remove here
            let _ = std::fs::remove_dir(e.path());
        }
    }
    let _ = std::fs::remove_dir(&dir);
}

/// Mount points at or below `dir` in a mountinfo text, deepest (last mounted) first.
pub fn mounts_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(super::spec::unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.reverse();
    found.dedup();
    found
}

/// Unmounts (lazily: MNT_DETACH) everything mounted at or below `dir`; returns what is still
/// mounted there afterwards.
pub fn unmount_under(dir: &Path) -> Vec<PathBuf> {
    for _ in 0..4 {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let found = mounts_under(&info, dir);
        if found.is_empty() {
            return found;
        }
        for m in &found {
            if let Err(e) = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH) {
                if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
                    tracing::warn!("umount {}: {e}", m.display());
                }
            }
        }
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts_under(&info, dir)
}

/// Removes a VM's run dir: first everything mounted below it (the shared dir's tmpfs, the
/// volume binds), then the tree, which is refused when a mount stays (it would recurse into the
/// host's directories).
pub fn remove_run_dir(run_dir: &Path) -> std::io::Result<()> {
    if !run_dir.exists() {
        return Ok(());
    }
    let left = unmount_under(run_dir);
    if !left.is_empty() {
        return Err(std::io::Error::other(format!(
            "{}: not removed, still mounted below it: {left:?}",
            run_dir.display()
        )));
    }
    match std::fs::remove_dir_all(run_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_and_ids() {
        assert_eq!(
            guest_source("/run/tandem/bundles/c1", "c1", 3),
            "/run/tandem/bundles/c1/shared/c1/3"
        );
        check_id("abc-1.2_x").unwrap();
        for bad in ["", ".", "..", "a/b", "a b"] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mountinfo_below_a_dir_deepest_first() {
        let mi = "\
22 1 0:21 / /run rw - tmpfs tmpfs rw
30 22 0:40 / /run/tandem-vm/1-p/shared rw - tmpfs tandem-shared rw
31 30 8:1 /data /run/tandem-vm/1-p/shared/c1/0 rw - ext4 /dev/sda1 rw
32 30 8:1 /my\\040dir /run/tandem-vm/1-p/shared/c1/1 rw - ext4 /dev/sda1 rw
33 22 0:41 / /run/tandem-vm/1-px rw - tmpfs x rw
";
        let m = mounts_under(mi, Path::new("/run/tandem-vm/1-p"));
        assert_eq!(
            m,
            vec![
                PathBuf::from("/run/tandem-vm/1-p/shared/c1/1"),
                PathBuf::from("/run/tandem-vm/1-p/shared/c1/0"),
                PathBuf::from("/run/tandem-vm/1-p/shared"),
            ]
        );
        assert_eq!(
            super::super::spec::unescape_mountinfo("/a\\040b\\011c"),
            "/a b\tc"
        );
    }

    /// Real mounts (root): the shared tmpfs, a rw and a ro bind (ro refuses writes, rw writes
    /// reach the source), a missing source undone and named, unbind, and the run dir removed
    /// without touching the host's directories.
    #[test]
    fn binds_into_the_shared_dir_and_safe_removal() {
        let host = tempfile::tempdir().unwrap();
        let src = host.path().join("vol");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("keep"), b"host data").unwrap();
        let run = host.path().join("run");
        std::fs::create_dir(&run).unwrap();
        let shared = make_shared_dir(&run).unwrap();
        let binds = [
            DirBind {
                index: 0,
                source: src.clone(),
                dest: "/data".into(),
                readonly: false,
                recursive: true,
            },
            DirBind {
                index: 2,
                source: src.clone(),
                dest: "/ro".into(),
                readonly: true,
                recursive: false,
            },
        ];
        bind_container(&shared, "c1", &binds).unwrap();
        std::fs::write(shared.join("c1/0/new"), b"from the pod").unwrap();
        assert_eq!(std::fs::read(src.join("new")).unwrap(), b"from the pod");
        let e = std::fs::write(shared.join("c1/2/x"), b"no").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        assert_eq!(
            std::fs::read(shared.join("c1/2/keep")).unwrap(),
            b"host data"
        );
        // a missing source: named, nothing of that container left
        let missing = [DirBind {
            index: 1,
            source: host.path().join("nope"),
            dest: "/x".into(),
            readonly: false,
            recursive: false,
        }];
        let e = bind_container(&shared, "c2", &[binds[0].clone(), missing[0].clone()]).unwrap_err();
        assert!(e.contains("nope") && e.contains("/x"), "{e}");
        assert!(!shared.join("c2").exists());
        unbind_container(&shared, "c1");
        assert!(!shared.join("c1").exists());
        assert!(src.join("keep").exists());
        bind_container(&shared, "c3", &binds).unwrap();
        remove_run_dir(&run).unwrap();
        assert!(!run.exists());
        // the host's directory and files are untouched
        assert_eq!(std::fs::read(src.join("keep")).unwrap(), b"host data");
        assert!(src.join("new").exists());
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(mounts_under(&info, &run).is_empty());
    }

    /// `delete` after the shim was killed: the record's virtiofsd (a stand-in named so, whose
    /// arguments name the run dir) is killed, the binds and the shared tmpfs unmounted, the run
    /// dir removed, the host's directory untouched.
    #[test]
    fn crash_cleanup_kills_virtiofsd_and_unmounts_the_volumes() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("hostdir");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), b"keep me").unwrap();
        let run = tmp.path().join("run/1-pod1");
        std::fs::create_dir_all(&run).unwrap();
        let shared = make_shared_dir(&run).unwrap();
        let bind = DirBind {
            index: 0,
            source: src.clone(),
            dest: "/v".into(),
            readonly: false,
            recursive: true,
        };
        bind_container(&shared, "c1", &[bind]).unwrap();
        // a symlink, not a copy (ETXTBSY when another test thread forks meanwhile)
        let prog = tmp.path().join("virtiofsd");
        std::os::unix::fs::symlink("/bin/sh", &prog).unwrap();
        let mut child = std::process::Command::new(&prog)
            .args(["-c", "read x", "sh"])
            .arg(format!("--socket-path={}/virtiofsd.sock", run.display()))
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !tandem_vmm::vmms_in(&run).contains(&child.id()) {
            assert!(std::time::Instant::now() < deadline, "exec not visible");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let state = crate::state::StateDir::new(tmp.path(), "ns1");
        let r = super::super::VmRecord {
            pod: "pod1".into(),
            shim_pid: u32::MAX - 1,
            run_dir: run.clone(),
            containers: vec!["pod1".into()],
            virtiofsd_pid: child.id(),
            ..Default::default()
        };
        super::super::save_record(&state, &r).unwrap();
        super::super::delete_after_crash(&state, "pod1");
        // killed, and reaped by the cleanup (it is this process's child here)
        let pid = child.id();
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the stand-in virtiofsd {pid} still runs"
        );
        let _ = child.wait();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(mounts_under(&info, &run).is_empty());
        assert!(!run.exists());
        assert_eq!(std::fs::read(src.join("f")).unwrap(), b"keep me");
    }
}
