//! Idmapped mounts (`open_tree(OPEN_TREE_CLONE)` + `mount_setattr(MOUNT_ATTR_IDMAP)` +
//! `move_mount`), used by the init while it is still root of the host's user namespace.
//!
//! An idmapped mount only needs a user namespace *with the wanted mapping*, not the
//! container's own one: the init forks a helper child that unshares a user namespace, writes
//! the helper's maps, keeps `/proc/<helper>/ns/user` open and lets the helper go. The detached
//! mounts are made before the init enters any namespace (so that sources are host paths and
//! the caller still has CAP_SYS_ADMIN over the filesystems) and attached with `move_mount` by
//! the container process inside its new mount namespace.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxIdMapping;

type R<T> = std::result::Result<T, String>;

// from <linux/mount.h>; defined here so the code does not depend on the libc crate's version
const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `containerID hostID size` lines as written to `uid_map` / `gid_map`.
pub(crate) fn map_text(m: &[LinuxIdMapping]) -> String {
    m.iter()
        .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
        .collect()
}

/// The host ID that `id` inside maps to, if any.
pub(crate) fn to_host(m: &[LinuxIdMapping], id: u32) -> Option<u32> {
    m.iter().find_map(|m| {
        let off = id.checked_sub(m.container_id())?;
        (off < m.size()).then(|| m.host_id() + off)
    })
}

/// A user namespace with the given maps, as an fd. Forks a helper that only makes raw syscalls
/// until it exits, so it is safe in a multi-threaded caller too (the guest agent); needs
/// CAP_SETUID/CAP_SETGID over the IDs mapped.
pub fn make_userns(uid: &[LinuxIdMapping], gid: &[LinuxIdMapping]) -> R<OwnedFd> {
    if uid.is_empty() || gid.is_empty() {
        return Err("a user namespace needs linux.uidMappings and linux.gidMappings".into());
    }
    let (r, w) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    let (r2, w2) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: the init is single-threaded; the child only makes raw syscalls and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // helper: unshare, say so, wait for the parent to close its end, exit
        unsafe {
            libc::close(w2.as_raw_fd());
            libc::close(r.as_raw_fd());
            let ok: u8 = if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                1
            } else {
                0
            };
            libc::write(w.as_raw_fd(), &ok as *const u8 as *const libc::c_void, 1);
            let mut b = 0u8;
            libc::read(r2.as_raw_fd(), &mut b as *mut u8 as *mut libc::c_void, 1);
            libc::_exit(0);
        }
    }
    drop(w);
    drop(r2);
    let result = (|| -> R<OwnedFd> {
        let mut b = [0u8; 1];
        let n = nix::unistd::read(&r, &mut b).map_err(|e| format!("helper pipe: {e}"))?;
        if n != 1 || b[0] != 1 {
            return Err("helper could not unshare a user namespace".into());
        }
        for (file, maps, what) in [
            ("uid_map", uid, "linux.uidMappings"),
            ("gid_map", gid, "linux.gidMappings"),
        ] {
            let p = format!("/proc/{pid}/{file}");
            fs::write(&p, map_text(maps))
                .map_err(|e| format!("{what} {:?}: write {p}: {e}", map_text(maps).trim_end()))?;
        }
        let p = format!("/proc/{pid}/ns/user");
        let f = fs::File::open(&p).map_err(|e| format!("open {p}: {e}"))?;
        Ok(OwnedFd::from(f))
    })();
    drop(w2);
    let mut st = 0;
    // SAFETY: reap our own helper.
    unsafe { libc::waitpid(pid, &mut st, libc::__WALL) };
    result
}

fn fs_name(magic: i64) -> &'static str {
    match magic {
        0xEF53 => "ext2/3/4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x794C_7630 => "overlay",
        0x0102_1994 => "tmpfs",
        0x9FA0 => "proc",
        0x6265_6572 => "sysfs",
        0x6367_7270 => "cgroup2",
        0x0027_e0eb => "cgroup",
        0x1CD1 => "devpts",
        0x6969 => "nfs",
        0x6573_5546 => "fuse",
        0x1937_1111 | 0x0194_2E8B => "mqueue",
        0xE0F5_E1E2 => "erofs",
        0x7364_6673 => "squashfs",
        0x4d44 => "vfat",
        _ => "unknown",
    }
}

/// A printable filesystem type of `path` for errors.
pub(crate) fn fs_type(path: &Path) -> String {
    match nix::sys::statfs::statfs(path) {
        Ok(s) => {
            let m = s.filesystem_type().0;
            format!("{} (magic {m:#x})", fs_name(m))
        }
        Err(e) => format!("unknown ({e})"),
    }
}

/// A detached copy of the mount tree at `src`, idmapped with `userns`. `recursive_clone`
/// copies submounts too (rbind); `recursive_idmap` idmaps them as well (ridmap).
pub fn idmapped_tree(
    src: &Path,
    userns: &OwnedFd,
    recursive_clone: bool,
    recursive_idmap: bool,
) -> R<OwnedFd> {
    let c = CString::new(src.as_os_str().as_bytes())
        .map_err(|_| format!("{}: path has a NUL byte", src.display()))?;
    let mut flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
    if recursive_clone {
        flags |= AT_RECURSIVE;
    }
    // SAFETY: valid C string; the result is a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(format!(
            "idmapped mount of {}: open_tree(OPEN_TREE_CLONE): {}",
            src.display(),
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fresh fd.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let mut aflags = libc::AT_EMPTY_PATH as libc::c_uint;
    if recursive_idmap {
        aflags |= AT_RECURSIVE;
    }
    // SAFETY: attr is a valid mount_attr of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            aflags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        let why = match e.raw_os_error() {
            Some(libc::EINVAL) => {
                "the filesystem (or, recursively, a submount) does not support idmapped mounts, or the kernel lacks MOUNT_ATTR_IDMAP"
            }
            Some(libc::ENOSYS) => "the kernel has no mount_setattr (needs Linux 5.12+)",
            Some(libc::EPERM) => "not permitted (the caller needs CAP_SYS_ADMIN in the user namespace owning the filesystem)",
            Some(libc::EBUSY) => "the mount is already idmapped or attached",
            _ => "mount_setattr failed",
        };
        return Err(format!(
            "idmapped mount of {} (filesystem {}): mount_setattr(MOUNT_ATTR_IDMAP): {e}: {why}",
            src.display(),
            fs_type(src)
        ));
    }
    Ok(tree)
}

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_SET_FD: libc::c_uint = 5;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;

/// Undo the octal escapes of /proc/self/mountinfo (`\040` for a space) and overlay's
/// backslash escapes of `:` and `,`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else if b[i] == b'\\' && i + 1 < b.len() {
            out.push(b[i + 1]);
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The layers of the overlay mounted at `path` (the topmost mount there), if it is one.
pub(crate) struct OverlayLayers {
    pub lower: Vec<PathBuf>,
    pub upper: Option<PathBuf>,
    pub work: Option<PathBuf>,
}

pub(crate) fn overlay_at(path: &Path) -> R<Option<OverlayLayers>> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    parse_overlay(&text, path)
}

/// [`overlay_at`] on the text of a mountinfo file.
fn parse_overlay(text: &str, path: &Path) -> R<Option<OverlayLayers>> {
    let mut found = None;
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        if pre.split(' ').nth(4).map(unescape).as_deref() != Some(&*path.to_string_lossy()) {
            continue;
        }
        let mut post = post.split(' ');
        let fstype = post.next().unwrap_or("");
        let opts = post.nth(1).unwrap_or("");
        found = Some((fstype.to_string(), opts.to_string()));
    }
    let Some((fstype, opts)) = found else {
        return Ok(None);
    };
    if fstype != "overlay" {
        return Ok(None);
    }
    let mut l = OverlayLayers {
        lower: Vec::new(),
        upper: None,
        work: None,
    };
    // split on unescaped commas; lowerdir on unescaped colons
    let split = |s: &str, sep: u8| -> Vec<String> {
        let mut parts = Vec::new();
        let mut cur = String::new();
        let mut esc = false;
        for c in s.chars() {
            if esc {
                cur.push('\\');
                cur.push(c);
                esc = false;
            } else if c == '\\' {
                esc = true;
            } else if c as u32 == sep as u32 {
                parts.push(std::mem::take(&mut cur));
            } else {
                cur.push(c);
            }
        }
        parts.push(cur);
        parts
    };
    for o in split(&opts, b',') {
        if let Some(v) = o.strip_prefix("lowerdir=") {
            l.lower
                .extend(split(v, b':').iter().map(|p| PathBuf::from(unescape(p))));
        } else if let Some(v) = o.strip_prefix("lowerdir+=") {
            l.lower.push(PathBuf::from(unescape(v)));
        } else if let Some(v) = o.strip_prefix("upperdir=") {
            l.upper = Some(PathBuf::from(unescape(v)));
        } else if let Some(v) = o.strip_prefix("workdir=") {
            l.work = Some(PathBuf::from(unescape(v)));
        } else if o.starts_with("datadir+=") {
            return Err(format!(
                "overlay at {}: data-only layers are not supported for idmapping",
                path.display()
            ));
        }
    }
    if l.lower.is_empty() {
        return Err(format!(
            "overlay at {}: no lowerdir in {opts:?}",
            path.display()
        ));
    }
    Ok(Some(l))
}

fn fsconfig(
    fs: &OwnedFd,
    cmd: libc::c_uint,
    key: Option<&str>,
    value: Option<&CString>,
    aux: i32,
) -> std::io::Result<()> {
    let key = key.map(|k| CString::new(k).expect("static key"));
    // SAFETY: valid C strings or NULL.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            cmd,
            key.as_ref().map_or(std::ptr::null(), |k| k.as_ptr()),
            value.map_or(std::ptr::null(), |v| v.as_ptr()),
            aux,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The overlay at `rootfs` rebuilt on idmapped layers: every lower dir and the mount holding
/// upper and work dir are idmapped with `userns` and handed to a new overlay by fd
/// (`fsconfig(FSCONFIG_SET_FD, "lowerdir+")`, Linux 6.13+). The result is a detached mount;
/// overlayfs itself cannot be idmapped, its layers can.
///
/// overlayfs works in its layers with the credentials of whoever created it: that is the
/// container's root (`root_uid`/`root_gid` on the host, which the idmapped layers map to
/// on-disk 0) with the capabilities of host root, so that new files and copy-ups in the upper
/// dir get the ownership they would have without a user namespace.
pub(crate) fn idmapped_overlay(
    rootfs: &Path,
    l: &OverlayLayers,
    userns: &OwnedFd,
    root_uid: u32,
    root_gid: u32,
) -> R<OwnedFd> {
    let err = |what: String| format!("idmapped overlay at {}: {what}", rootfs.display());
    // SAFETY: static C string.
    let fd = unsafe { libc::syscall(libc::SYS_fsopen, c"overlay".as_ptr(), FSOPEN_CLOEXEC) };
    if fd < 0 {
        return Err(err(format!(
            "fsopen(overlay): {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: fresh fd.
    let ctx = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut keep = Vec::new();
    for lower in &l.lower {
        let t = idmapped_tree(lower, userns, false, false).map_err(&err)?;
        fsconfig(
            &ctx,
            FSCONFIG_SET_FD,
            Some("lowerdir+"),
            None,
            t.as_raw_fd(),
        )
        .map_err(|e| {
            err(format!(
                "lowerdir+ {} by fd: {e} (needs Linux 6.13+)",
                lower.display()
            ))
        })?;
        keep.push(t);
    }
    if let (Some(upper), Some(work)) = (&l.upper, &l.work) {
        // upper and work must be on one mount: idmap their common parent
        let common: PathBuf = upper
            .components()
            .zip(work.components())
            .take_while(|(a, b)| a == b)
            .map(|(a, _)| a)
            .collect();
        let t = idmapped_tree(&common, userns, false, false).map_err(&err)?;
        for (key, dir) in [("upperdir", upper), ("workdir", work)] {
            let rel = dir.strip_prefix(&common).unwrap_or(dir);
            let rel = if rel.as_os_str().is_empty() {
                Path::new(".")
            } else {
                rel
            };
            let c = CString::new(rel.as_os_str().as_bytes())
                .map_err(|_| err(format!("{key} has a NUL")))?;
            // SAFETY: valid fd and C string.
            let d = unsafe {
                libc::openat(
                    t.as_raw_fd(),
                    c.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            if d < 0 {
                return Err(err(format!(
                    "{key} {}: {}",
                    dir.display(),
                    std::io::Error::last_os_error()
                )));
            }
            // SAFETY: fresh fd.
            let d = unsafe { OwnedFd::from_raw_fd(d) };
            fsconfig(&ctx, FSCONFIG_SET_FD, Some(key), None, d.as_raw_fd())
                .map_err(|e| err(format!("{key} {} by fd: {e}", dir.display())))?;
            keep.push(d);
        }
        keep.push(t);
    }
    let created = as_fs_ids(root_uid, root_gid, || {
        fsconfig(&ctx, FSCONFIG_CMD_CREATE, None, None, 0)
            .map_err(|e| format!("create: {e} (see dmesg for overlayfs' reason)"))
    });
    created.map_err(err)?;
    // SAFETY: plain syscall on a configured context.
    let m = unsafe { libc::syscall(libc::SYS_fsmount, ctx.as_raw_fd(), FSMOUNT_CLOEXEC, 0) };
    if m < 0 {
        return Err(err(format!("fsmount: {}", std::io::Error::last_os_error())));
    }
    let _ = FSCONFIG_SET_STRING;
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(m as i32) })
}

/// Run `f` with fsuid/fsgid set to the given host ids and the effective capabilities kept
/// (setfsuid clears the file-system ones; they are raised again from the permitted set).
fn as_fs_ids<T>(uid: u32, gid: u32, f: impl FnOnce() -> R<T>) -> R<T> {
    use caps::CapSet;
    let eff = caps::read(None, CapSet::Effective).map_err(|e| format!("read capabilities: {e}"))?;
    // SAFETY: plain syscalls; restored below.
    unsafe {
        libc::setfsgid(gid);
        libc::setfsuid(uid);
    }
    let r = caps::set(None, CapSet::Effective, &eff)
        .map_err(|e| format!("raise capabilities with fsuid {uid}: {e}"))
        .and_then(|_| f());
    // SAFETY: back to host root (the init runs as 0).
    unsafe {
        libc::setfsuid(0);
        libc::setfsgid(0);
    }
    let _ = caps::set(None, CapSet::Effective, &eff);
    r
}

/// Attach a detached mount at `dest` (in the caller's mount namespace).
pub fn attach(tree: &OwnedFd, dest: &Path) -> R<()> {
    let c = CString::new(dest.as_os_str().as_bytes())
        .map_err(|_| format!("{}: path has a NUL byte", dest.display()))?;
    // SAFETY: valid fds and C strings.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(format!(
            "move_mount of the idmapped mount to {}: {}",
            dest.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(c: u32, h: u32, s: u32) -> LinuxIdMapping {
        serde_json::from_value(serde_json::json!({"containerID": c, "hostID": h, "size": s}))
            .unwrap()
    }

    #[test]
    fn overlay_layers_from_mountinfo() {
        let text = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
63 22 0:57 / /run/b\\040x/rootfs rw,relatime - overlay overlay rw,lowerdir=/s/2/fs:/s/1/fs,upperdir=/s/3/fs,workdir=/s/3/work,uuid=on
64 22 0:58 / /other rw - overlay overlay rw,lowerdir+=/a\\:b,lowerdir+=/c,upperdir=/u,workdir=/w
65 22 0:59 / /plain rw - tmpfs tmpfs rw
";
        let l = parse_overlay(text, Path::new("/run/b x/rootfs"))
            .unwrap()
            .unwrap();
        assert_eq!(
            l.lower,
            [PathBuf::from("/s/2/fs"), PathBuf::from("/s/1/fs")]
        );
        assert_eq!(l.upper.as_deref(), Some(Path::new("/s/3/fs")));
        assert_eq!(l.work.as_deref(), Some(Path::new("/s/3/work")));
        let l = parse_overlay(text, Path::new("/other")).unwrap().unwrap();
        assert_eq!(l.lower, [PathBuf::from("/a:b"), PathBuf::from("/c")]);
        assert!(parse_overlay(text, Path::new("/plain")).unwrap().is_none());
        assert!(parse_overlay(text, Path::new("/nowhere"))
            .unwrap()
            .is_none());
    }

    #[test]
    fn host_id_lookup() {
        let maps = [m(0, 100000, 1000), m(1000, 5000, 10)];
        assert_eq!(to_host(&maps, 0), Some(100000));
        assert_eq!(to_host(&maps, 999), Some(100999));
        assert_eq!(to_host(&maps, 1005), Some(5005));
        assert_eq!(to_host(&maps, 1010), None);
        assert_eq!(map_text(&maps), "0 100000 1000\n1000 5000 10\n");
    }
}
