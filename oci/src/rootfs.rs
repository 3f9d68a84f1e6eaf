//! The container's root filesystem: propagation, mounts from the spec, devices, pivot_root,
//! masked and read-only paths. Runs in the container process, in its new mount namespace.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, Mount, Spec};
use serde::{Deserialize, Serialize};

/// A cgroup hierarchy as the container should see it under its cgroup mount.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CgroupMount {
    /// Directory name under the cgroup mount point ("memory", "unified", ...); empty for pure v2.
    pub name: String,
    /// The container's cgroup directory on the host.
    pub host_dir: PathBuf,
    /// cgroup2 (pure v2 or the hybrid unified mount).
    pub v2: bool,
}

type R<T> = std::result::Result<T, String>;

fn nix_mount(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> R<()> {
    mount(src, dst, fstype, flags, data).map_err(|e| {
        format!(
            "mount {} on {} (type {}, flags {:?}, data {:?}): {e}",
            src.map_or("none".into(), |s| s.display().to_string()),
            dst.display(),
            fstype.unwrap_or("none"),
            flags,
            data.unwrap_or("")
        )
    })
}

/// Resolve `unsafe_path` inside `root`, following symlinks as if `root` were `/`.
pub fn secure_join(root: &Path, unsafe_path: &Path) -> PathBuf {
    let mut stack: Vec<OsString> = Vec::new();
    let mut queue: std::collections::VecDeque<OsString> = unsafe_path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut links = 0;
    while let Some(c) = queue.pop_front() {
        if c == ".." {
            stack.pop();
            continue;
        }
        let mut cand = root.to_path_buf();
        cand.extend(&stack);
        cand.push(&c);
        match fs::read_link(&cand) {
            Ok(target) if links < 40 => {
                links += 1;
                if target.is_absolute() {
                    stack.clear();
                }
                let parts: Vec<OsString> = target
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(n) => Some(n.to_os_string()),
                        Component::ParentDir => Some("..".into()),
                        _ => None,
                    })
                    .collect();
                for p in parts.into_iter().rev() {
                    queue.push_front(p);
                }
            }
            _ => stack.push(c),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&stack);
    out
}

/// Mount flags, propagation flags and data from OCI mount options.
pub fn parse_options(opts: &[String]) -> (MsFlags, MsFlags, String, bool) {
    let mut flags = MsFlags::empty();
    let mut prop = MsFlags::empty();
    let mut data = Vec::new();
    let mut rec_bind = false;
    for o in opts {
        let (set, clear) = match o.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => {
                rec_bind = true;
                (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty())
            }
            "private" => {
                prop |= MsFlags::MS_PRIVATE;
                continue;
            }
            "rprivate" => {
                prop |= MsFlags::MS_PRIVATE | MsFlags::MS_REC;
                continue;
            }
            "shared" => {
                prop |= MsFlags::MS_SHARED;
                continue;
            }
            "rshared" => {
                prop |= MsFlags::MS_SHARED | MsFlags::MS_REC;
                continue;
            }
            "slave" => {
                prop |= MsFlags::MS_SLAVE;
                continue;
            }
            "rslave" => {
                prop |= MsFlags::MS_SLAVE | MsFlags::MS_REC;
                continue;
            }
            "unbindable" => {
                prop |= MsFlags::MS_UNBINDABLE;
                continue;
            }
            "runbindable" => {
                prop |= MsFlags::MS_UNBINDABLE | MsFlags::MS_REC;
                continue;
            }
            // runtime-only options that are not mount data
            // idmap/ridmap: done by the init with open_tree + mount_setattr (see idmap)
            "tmpcopyup" | "idmap" | "ridmap" | "defaults" => continue,
            other => {
                data.push(other.to_string());
                continue;
            }
        };
        flags |= set;
        flags &= !clear;
    }
    (flags, prop, data.join(","), rec_bind)
}

fn propagation(p: Option<&str>) -> MsFlags {
    match p.unwrap_or("") {
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
        "slave" => MsFlags::MS_SLAVE,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
        _ => MsFlags::MS_SLAVE | MsFlags::MS_REC,
    }
}

/// Flags of the mount at `p` that must be kept on a bind remount (locked in a user namespace).
fn locked_flags(p: &Path) -> MsFlags {
    use nix::sys::statvfs::{statvfs, FsFlags};
    let mut f = MsFlags::empty();
    if let Ok(s) = statvfs(p) {
        let fl = s.flags();
        for (a, b) in [
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
            (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
            (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
        ] {
            if fl.contains(a) {
                f |= b;
            }
        }
    }
    f
}

fn ensure_file(p: &Path) -> R<()> {
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
    }
    if fs::symlink_metadata(p).is_err() {
        fs::File::create(p).map_err(|e| format!("create {}: {e}", p.display()))?;
    }
    Ok(())
}

fn ensure_dir(p: &Path) -> R<()> {
    fs::create_dir_all(p).map_err(|e| format!("mkdir {}: {e}", p.display()))
}

/// Detached idmapped mounts made by the init before it entered the container's namespaces
/// (see `idmap`): the rootfs and bind mounts by their index in `mounts`.
#[derive(Debug, Default)]
pub struct Idmapped {
    pub rootfs: Option<OwnedFd>,
    pub mounts: BTreeMap<usize, OwnedFd>,
}

/// Everything before pivot_root. `rootfs` is absolute.
pub fn prepare(spec: &Spec, rootfs: &Path, cgroups: &[CgroupMount], in_userns: bool) -> R<()> {
    prepare_idmapped(spec, rootfs, cgroups, in_userns, &Idmapped::default())
}

/// [`prepare`] with idmapped mounts: the rootfs and the listed bind mounts are attached from
/// the detached trees in `idmapped` instead of being bind-mounted.
pub fn prepare_idmapped(
    spec: &Spec,
    rootfs: &Path,
    cgroups: &[CgroupMount],
    in_userns: bool,
    idmapped: &Idmapped,
) -> R<()> {
    let linux = spec.linux().as_ref();
    let prop = propagation(linux.and_then(|l| l.rootfs_propagation().as_deref()));
    nix_mount(None, Path::new("/"), None, prop, None)?;
    match &idmapped.rootfs {
        Some(tree) => crate::idmap::attach(tree, rootfs).map_err(|e| format!("root.path: {e}"))?,
        None => nix_mount(
            Some(rootfs),
            rootfs,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?,
    }
    let mut dev_is_bind = false;
    for (i, m) in spec.mounts().iter().flatten().enumerate() {
        mount_one(rootfs, m, cgroups, in_userns, idmapped.mounts.get(&i))
            .map_err(|e| format!("mounts[{i}]: {e}"))?;
        let opts = m.options().clone().unwrap_or_default();
        if m.destination() == Path::new("/dev")
            && (m.typ().as_deref() == Some("bind")
                || opts.iter().any(|o| o == "bind" || o == "rbind"))
        {
            dev_is_bind = true;
        }
    }
    if !dev_is_bind {
        default_devices(rootfs, in_userns)?;
        for d in linux
            .and_then(|l| l.devices().as_ref())
            .into_iter()
            .flatten()
        {
            create_device(rootfs, d, in_userns)?;
        }
        dev_symlinks(rootfs)?;
    }
    Ok(())
}

fn mount_one(
    rootfs: &Path,
    m: &Mount,
    cgroups: &[CgroupMount],
    in_userns: bool,
    idmapped: Option<&OwnedFd>,
) -> R<()> {
    let dest = secure_join(rootfs, m.destination());
    let opts = m.options().clone().unwrap_or_default();
    let (flags, prop, data, _rec) = parse_options(&opts);
    let typ = m.typ().as_deref().unwrap_or("none");
    let is_bind = typ == "bind" || flags.contains(MsFlags::MS_BIND);
    let data_opt = (!data.is_empty()).then_some(data.as_str());
    if is_bind {
        let src = m
            .source()
            .as_ref()
            .ok_or_else(|| format!("bind mount to {} has no source", m.destination().display()))?;
        let meta = fs::metadata(src).map_err(|e| format!("bind source {}: {e}", src.display()))?;
        if meta.is_dir() {
            ensure_dir(&dest)?;
        } else {
            ensure_file(&dest)?;
        }
        match idmapped {
            Some(tree) => crate::idmap::attach(tree, &dest)?,
            None => {
                let bflags = MsFlags::MS_BIND | (flags & MsFlags::MS_REC);
                nix_mount(Some(src), &dest, None, bflags, None)?;
            }
        }
        let extra = flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
        if !extra.is_empty() {
            let keep = if in_userns {
                locked_flags(&dest)
            } else {
                MsFlags::empty()
            };
            nix_mount(
                None,
                &dest,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra | keep,
                None,
            )?;
        }
    } else if typ == "cgroup" || typ == "cgroup2" {
        mount_cgroup(&dest, flags, cgroups)?;
    } else {
        ensure_dir(&dest)?;
        let src = m.source().clone().unwrap_or_else(|| PathBuf::from(typ));
        match nix_mount(Some(&src), &dest, Some(typ), flags, data_opt) {
            Ok(()) => {}
            Err(e) if typ == "sysfs" && in_userns => {
                // sysfs needs the net namespace's owner: fall back to the host's /sys
                tracing::debug!("{e}; binding /sys instead");
                nix_mount(
                    Some(Path::new("/sys")),
                    &dest,
                    None,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None,
                )?;
            }
            Err(e) => return Err(e),
        }
    }
    if !prop.is_empty() {
        nix_mount(None, &dest, None, prop, None)?;
    }
    Ok(())
}

/// The cgroup mount: cgroup2 on pure v2; a tmpfs with one bind mount per hierarchy on v1/hybrid.
fn mount_cgroup(dest: &Path, flags: MsFlags, cgroups: &[CgroupMount]) -> R<()> {
    ensure_dir(dest)?;
    let fl =
        flags & (MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC);
    if let [only] = cgroups {
        if only.v2 && only.name.is_empty() {
            if nix_mount(Some(Path::new("cgroup2")), dest, Some("cgroup2"), fl, None).is_ok() {
                return Ok(());
            }
            nix_mount(Some(&only.host_dir), dest, None, MsFlags::MS_BIND, None)?;
            return nix_mount(
                None,
                dest,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | fl,
                None,
            );
        }
    }
    nix_mount(
        Some(Path::new("tmpfs")),
        dest,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=755"),
    )?;
    for c in cgroups {
        let d = dest.join(&c.name);
        ensure_dir(&d)?;
        // "cpu,cpuacct" is also reachable as "cpu" and "cpuacct"
        if c.name.contains(',') {
            for part in c.name.split(',') {
                let link = dest.join(part);
                if fs::symlink_metadata(&link).is_err() {
                    std::os::unix::fs::symlink(&c.name, &link)
                        .map_err(|e| format!("symlink {}: {e}", link.display()))?;
                }
            }
        }
        nix_mount(Some(&c.host_dir), &d, None, MsFlags::MS_BIND, None)?;
        nix_mount(
            None,
            &d,
            None,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | fl
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            None,
        )?;
    }
    if fl.contains(MsFlags::MS_RDONLY) {
        nix_mount(
            None,
            dest,
            None,
            MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            Some("mode=755"),
        )?;
    }
    Ok(())
}

const DEFAULT_DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

fn default_devices(rootfs: &Path, in_userns: bool) -> R<()> {
    let dev = secure_join(rootfs, Path::new("/dev"));
    ensure_dir(&dev)?;
    for (name, major, minor) in DEFAULT_DEVICES {
        make_dev(
            &dev.join(name),
            &Path::new("/dev").join(name),
            'c',
            *major,
            *minor,
            0o666,
            0,
            0,
            in_userns,
        )?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn make_dev(
    dest: &Path,
    host: &Path,
    typ: char,
    major: u64,
    minor: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    in_userns: bool,
) -> R<()> {
    if let Some(p) = dest.parent() {
        ensure_dir(p)?;
    }
    if in_userns {
        ensure_file(dest)?;
        return nix_mount(Some(host), dest, None, MsFlags::MS_BIND, None);
    }
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    let kind = match typ {
        'b' => SFlag::S_IFBLK,
        'p' => SFlag::S_IFIFO,
        _ => SFlag::S_IFCHR,
    };
    if let Ok(m) = fs::symlink_metadata(dest) {
        let ft = m.file_type();
        if ft.is_char_device()
            || ft.is_block_device()
            || ft.is_fifo()
            || ft.is_file()
            || ft.is_symlink()
        {
            let _ = fs::remove_file(dest);
        }
    }
    mknod(
        dest,
        kind,
        Mode::from_bits_truncate(mode & 0o7777),
        makedev(major, minor),
    )
    .map_err(|e| format!("mknod {}: {e}", dest.display()))?;
    fs::set_permissions(dest, fs::Permissions::from_mode(mode & 0o7777))
        .map_err(|e| format!("chmod {}: {e}", dest.display()))?;
    nix::unistd::chown(dest, Some(uid.into()), Some(gid.into()))
        .map_err(|e| format!("chown {}: {e}", dest.display()))
}

fn create_device(rootfs: &Path, d: &LinuxDevice, in_userns: bool) -> R<()> {
    let dest = secure_join(rootfs, d.path());
    let typ = match d.typ() {
        LinuxDeviceType::B => 'b',
        LinuxDeviceType::P => 'p',
        LinuxDeviceType::C | LinuxDeviceType::U => 'c',
        LinuxDeviceType::A => {
            return Err(format!(
                "linux.devices: {}: type \"a\" is not a device type",
                d.path().display()
            ))
        }
    };
    make_dev(
        &dest,
        d.path(),
        typ,
        d.major() as u64,
        d.minor() as u64,
        d.file_mode().unwrap_or(0o666),
        d.uid().unwrap_or(0),
        d.gid().unwrap_or(0),
        in_userns,
    )
    .map_err(|e| format!("linux.devices: {e}"))
}

fn dev_symlinks(rootfs: &Path) -> R<()> {
    let dev = secure_join(rootfs, Path::new("/dev"));
    for (src, name) in [
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
    ] {
        let p = dev.join(name);
        if fs::symlink_metadata(&p).is_err() {
            std::os::unix::fs::symlink(src, &p)
                .map_err(|e| format!("symlink {}: {e}", p.display()))?;
        }
    }
    let ptmx = dev.join("ptmx");
    if let Ok(m) = fs::symlink_metadata(&ptmx) {
        if !m.is_dir() {
            let _ = fs::remove_file(&ptmx);
        }
    }
    std::os::unix::fs::symlink("pts/ptmx", &ptmx)
        .map_err(|e| format!("symlink {}: {e}", ptmx.display()))
}

/// pivot_root(".", ".") and detach the old root.
pub fn pivot(rootfs: &Path) -> R<()> {
    nix::unistd::chdir(rootfs).map_err(|e| format!("chdir {}: {e}", rootfs.display()))?;
    nix::unistd::pivot_root(".", ".")
        .map_err(|e| format!("pivot_root {}: {e}", rootfs.display()))?;
    nix_mount(
        None,
        Path::new("."),
        None,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None,
    )?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("umount old root: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))
}

/// After pivot_root: sysctls, masked paths, read-only paths, read-only root.
pub fn finalize(spec: &Spec) -> R<()> {
    let linux = spec.linux().as_ref();
    if let Some(sysctl) = linux.and_then(|l| l.sysctl().as_ref()) {
        for (k, v) in sysctl {
            let p = Path::new("/proc/sys").join(k.replace('.', "/"));
            fs::write(&p, v)
                .map_err(|e| format!("linux.sysctl {k}={v}: write {}: {e}", p.display()))?;
        }
    }
    if let Some(prop) = linux.and_then(|l| l.rootfs_propagation().as_deref()) {
        if !prop.is_empty() && prop != "rslave" && prop != "slave" {
            nix_mount(None, Path::new("/"), None, propagation(Some(prop)), None)?;
        }
    }
    for p in linux
        .and_then(|l| l.masked_paths().as_ref())
        .into_iter()
        .flatten()
    {
        let path = Path::new(p);
        match fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("linux.maskedPaths {p}: {e}")),
            Ok(m) if m.is_dir() => nix_mount(
                Some(Path::new("tmpfs")),
                path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None,
            ),
            Ok(_) => nix_mount(
                Some(Path::new("/dev/null")),
                path,
                None,
                MsFlags::MS_BIND,
                None,
            ),
        }
        .map_err(|e| format!("linux.maskedPaths: {e}"))?;
    }
    for p in linux
        .and_then(|l| l.readonly_paths().as_ref())
        .into_iter()
        .flatten()
    {
        let path = Path::new(p);
        if let Err(e) = fs::symlink_metadata(path) {
            if e.kind() == std::io::ErrorKind::NotFound {
                continue;
            }
            return Err(format!("linux.readonlyPaths {p}: {e}"));
        }
        nix_mount(
            Some(path),
            path,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )
        .and_then(|_| {
            nix_mount(
                None,
                path,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | locked_flags(path),
                None,
            )
        })
        .map_err(|e| format!("linux.readonlyPaths: {e}"))?;
    }
    if spec.root().as_ref().and_then(|r| r.readonly()) == Some(true) {
        let root = Path::new("/");
        nix_mount(
            None,
            root,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | locked_flags(root),
            None,
        )
        .map_err(|e| format!("root.readonly: {e}"))?;
    }
    Ok(())
}

/// The type of a spec device for tests and checks.
pub fn device_type_char(t: LinuxDeviceType) -> char {
    match t {
        LinuxDeviceType::B => 'b',
        LinuxDeviceType::P => 'p',
        LinuxDeviceType::A => 'a',
        _ => 'c',
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secure_join_stays_inside() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        fs::create_dir_all(r.join("a/b")).unwrap();
        std::os::unix::fs::symlink("/etc", r.join("a/abs")).unwrap();
        std::os::unix::fs::symlink("../../..", r.join("a/b/up")).unwrap();
        assert_eq!(secure_join(r, Path::new("/a/b")), r.join("a/b"));
        assert_eq!(
            secure_join(r, Path::new("/a/abs/passwd")),
            r.join("etc/passwd")
        );
        assert_eq!(secure_join(r, Path::new("/a/b/up/x")), r.join("x"));
        assert_eq!(secure_join(r, Path::new("/../../x")), r.join("x"));
    }

    #[test]
    fn mount_options() {
        let o: Vec<String> = [
            "nosuid",
            "strictatime",
            "mode=755",
            "size=65536k",
            "rbind",
            "rslave",
            "ro",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (f, p, d, rec) = parse_options(&o);
        assert!(f.contains(
            MsFlags::MS_NOSUID
                | MsFlags::MS_STRICTATIME
                | MsFlags::MS_BIND
                | MsFlags::MS_REC
                | MsFlags::MS_RDONLY
        ));
        assert_eq!(p, MsFlags::MS_SLAVE | MsFlags::MS_REC);
        assert_eq!(d, "mode=755,size=65536k");
        assert!(rec);
        let (f, _, _, _) = parse_options(&["ro".into(), "rw".into()]);
        assert!(!f.contains(MsFlags::MS_RDONLY));
    }
}
