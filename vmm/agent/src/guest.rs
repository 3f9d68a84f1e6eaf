//! PID 1 duties of the agent in the guest: pseudo filesystems, the console, and finding the
//! virtio-serial port by name. Paths are parameters so that the sysfs scan is unit-tested on a
//! fake tree.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};

use crate::{io_err, Error, Result};

struct MountSpec {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

/// cgroup2 mount option: migrations without waiting for an RCU grace period.
const CGROUP2_FAVOR_DYNMODS: &str = "favordynmods";

/// Mount /proc, /sys, /dev (devtmpfs), /dev/pts, /dev/shm, /run, /tmp and the cgroup2 hierarchy.
pub fn mount_pseudo_filesystems() -> Result<()> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let specs = [
        MountSpec {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: nosuid_nodev_noexec,
            data: None,
        },
        MountSpec {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: nosuid_nodev_noexec,
            data: None,
        },
        MountSpec {
            source: "devtmpfs",
            target: "/dev",
            fstype: "devtmpfs",
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=0755"),
        },
        MountSpec {
            source: "devpts",
            target: "/dev/pts",
            fstype: "devpts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: Some("newinstance,ptmxmode=0666,mode=0620"),
        },
        MountSpec {
            source: "shm",
            target: "/dev/shm",
            fstype: "tmpfs",
            flags: nosuid_nodev_noexec,
            data: Some("mode=1777"),
        },
        MountSpec {
            source: "tmpfs",
            target: "/run",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=0755"),
        },
        MountSpec {
            source: "tmpfs",
            target: "/tmp",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=1777"),
        },
        MountSpec {
            source: "cgroup2",
            target: "/sys/fs/cgroup",
            fstype: "cgroup2",
            flags: nosuid_nodev_noexec,
            // moving a process between cgroups (every container create) then skips an RCU
            // grace period, which is tens of ms under TCG; the cost, a slower fork/exit path,
            // is small in a pod's VM (Linux >= 6.0; without it the mount is retried plain)
            data: Some(CGROUP2_FAVOR_DYNMODS),
        },
    ];
    for m in specs {
        std::fs::create_dir_all(m.target).map_err(io_err(format!("mkdir {}", m.target)))?;
        let mut r = mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data);
        if r == Err(nix::errno::Errno::EINVAL) && m.data == Some(CGROUP2_FAVOR_DYNMODS) {
            r = mount(
                Some(m.source),
                m.target,
                Some(m.fstype),
                m.flags,
                None::<&str>,
            );
        }
        r.map_err(|e| Error::Io {
            context: format!("mount {} on {}", m.fstype, m.target),
            source: e.into(),
        })?;
    }
    Ok(())
}

/// Make fds 0, 1, 2 the console when the kernel could not give us one (the initramfs has no
/// /dev/console node; devtmpfs has).
pub fn attach_console() -> Result<()> {
    let fd_ok = |fd: i32| {
        nix::fcntl::fcntl(
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
            nix::fcntl::FcntlArg::F_GETFD,
        )
        .is_ok()
    };
    if fd_ok(0) && fd_ok(1) && fd_ok(2) {
        return Ok(());
    }
    let console = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
        .map_err(io_err("open /dev/console"))?;
    for fd in 0..3 {
        if unsafe { libc::dup2(console.as_raw_fd(), fd) } < 0 {
            return Err(io_err(format!("dup2 console to fd {fd}"))(
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// Find the device of the virtio-serial port called `name` under `<sys>/class/virtio-ports/*/name`;
/// returns `<dev>/<vportNpM>`.
pub fn find_port_in(sys: &Path, dev: &Path, name: &str) -> Option<PathBuf> {
    let dir = std::fs::read_dir(sys.join("class/virtio-ports")).ok()?;
    for entry in dir.flatten() {
        let Ok(n) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if n.trim_end_matches('\n') == name {
            return Some(dev.join(entry.file_name()));
        }
    }
    None
}

/// Wait (event driven, on kernel uevents) until the port called `name` exists and its device
/// node is there, at most `timeout`.
pub fn wait_for_port(name: &str, timeout: Duration) -> Result<PathBuf> {
    use nix::sys::socket::{
        bind, recv, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
        SockProtocol, SockType,
    };
    let deadline = Instant::now() + timeout;
    // Subscribe before the first scan so that no event is missed between the two.
    let sock = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkKObjectUEvent,
    )
    .map_err(|e| io_err("uevent netlink socket")(e.into()))?;
    bind(sock.as_raw_fd(), &NetlinkAddr::new(0, 1))
        .map_err(|e| io_err("bind uevent socket")(e.into()))?;
    let mut buf = vec![0u8; 8192];
    loop {
        if let Some(p) = find_port_in(Path::new("/sys"), Path::new("/dev"), name) {
            if p.exists() {
                return Ok(p);
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::Port {
                name: name.to_string(),
                msg: format!("not found under /sys/class/virtio-ports within {timeout:?} (is virtio_console loaded, and does the VMM add a virtserialport named {name}?)"),
            });
        }
        let left = deadline - now;
        let tv = nix::sys::time::TimeVal::new(
            left.as_secs() as i64,
            left.subsec_micros().max(1000) as i64,
        );
        setsockopt(&sock, sockopt::ReceiveTimeout, &tv)
            .map_err(|e| io_err("SO_RCVTIMEO on uevent socket")(e.into()))?;
        let _ = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty());
    }
}

/// Power the machine off (PID 1 only): sync, then reboot(RB_POWER_OFF).
pub fn power_off() -> ! {
    nix::unistd::sync();
    let e = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    tracing::error!("reboot(RB_POWER_OFF) failed: {e:?}");
    // As PID 1, exiting panics the kernel; with panic=-1 and QEMU -no-reboot the VM stops.
    std::process::exit(1)
}

/// Kernel release of the running kernel (`uname -r`).
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Env marker set when the agent re-executes itself after leaving the initramfs root.
pub const SWITCHED_ENV: &str = "TANDEM_AGENT_SWITCHED_ROOT";

/// Copy a directory tree (files, directories, symlinks; modes kept) from `src` into `dst`.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(src).map_err(io_err(format!("read dir {}", src.display())))? {
        let entry = entry.map_err(io_err(format!("read dir {}", src.display())))?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let meta =
            std::fs::symlink_metadata(&from).map_err(io_err(format!("stat {}", from.display())))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = std::fs::read_link(&from)
                .map_err(io_err(format!("readlink {}", from.display())))?;
            std::os::unix::fs::symlink(&target, &to)
                .map_err(io_err(format!("symlink {}", to.display())))?;
        } else if ft.is_dir() {
            std::fs::create_dir(&to).map_err(io_err(format!("mkdir {}", to.display())))?;
            copy_tree(&from, &to)?;
            std::fs::set_permissions(
                &to,
                std::fs::Permissions::from_mode(meta.permissions().mode()),
            )
            .map_err(io_err(format!("chmod {}", to.display())))?;
        } else if ft.is_file() {
            std::fs::copy(&from, &to).map_err(io_err(format!(
                "copy {} to {}",
                from.display(),
                to.display()
            )))?;
        }
    }
    Ok(())
}

/// Leave the initramfs root: the kernel's rootfs cannot be pivot_root'ed away from, which
/// container creation needs. Copy the initramfs into a tmpfs, free the initramfs, make the tmpfs
/// the root (MS_MOVE + chroot) and re-execute `/init` there. Returns only on error.
pub fn switch_root_and_reexec() -> Result<std::convert::Infallible> {
    let new = Path::new("/newroot");
    std::fs::create_dir_all(new).map_err(io_err("mkdir /newroot"))?;
    mount(
        Some("tmpfs"),
        new,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(|e| io_err("mount tmpfs on /newroot")(e.into()))?;
    for entry in std::fs::read_dir("/")
        .map_err(io_err("read dir /"))?
        .flatten()
    {
        let name = entry.file_name();
        if name == "newroot" {
            continue;
        }
        let from = entry.path();
        let to = new.join(&name);
        let meta =
            std::fs::symlink_metadata(&from).map_err(io_err(format!("stat {}", from.display())))?;
        if meta.is_dir() {
            std::fs::create_dir(&to).map_err(io_err(format!("mkdir {}", to.display())))?;
            copy_tree(&from, &to)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                &to,
                std::fs::Permissions::from_mode(meta.permissions().mode()),
            )
            .map_err(io_err(format!("chmod {}", to.display())))?;
        } else if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&from)
                .map_err(io_err(format!("readlink {}", from.display())))?;
            std::os::unix::fs::symlink(&target, &to)
                .map_err(io_err(format!("symlink {}", to.display())))?;
        } else {
            std::fs::copy(&from, &to).map_err(io_err(format!("copy {}", from.display())))?;
        }
        // Free the initramfs copy (nothing is mounted below it yet).
        let _ = if meta.is_dir() {
            std::fs::remove_dir_all(&from)
        } else {
            std::fs::remove_file(&from)
        };
    }
    std::env::set_current_dir(new).map_err(io_err("chdir /newroot"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| io_err("move /newroot to /")(e.into()))?;
    nix::unistd::chroot(".").map_err(|e| io_err("chroot")(e.into()))?;
    std::env::set_current_dir("/").map_err(io_err("chdir /"))?;
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new("/init")
        .env(SWITCHED_ENV, "1")
        .exec();
    Err(io_err("re-exec /init")(err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_port_by_name() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path().join("sys");
        for (port, name) in [
            ("vport0p0", ""),
            ("vport1p1", "org.qemu.guest_agent.0"),
            ("vport1p2", "tandem.agent"),
        ] {
            let d = sys.join("class/virtio-ports").join(port);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(
            find_port_in(&sys, Path::new("/dev"), "tandem.agent"),
            Some(PathBuf::from("/dev/vport1p2"))
        );
        assert_eq!(find_port_in(&sys, Path::new("/dev"), "other"), None);
        assert_eq!(
            find_port_in(Path::new("/nonexistent"), Path::new("/dev"), "x"),
            None
        );
    }

    #[test]
    fn kernel_release_is_not_empty() {
        assert!(!kernel_release().is_empty());
    }

    #[test]
    fn copy_tree_keeps_files_links_and_modes() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::create_dir_all(src.join("bin")).unwrap();
        std::fs::write(src.join("bin/tool"), b"#!x").unwrap();
        std::fs::set_permissions(src.join("bin/tool"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::os::unix::fs::symlink("tool", src.join("bin/alias")).unwrap();
        let dst = t.path().join("dst");
        std::fs::create_dir(&dst).unwrap();
        copy_tree(&src, &dst).unwrap();
        assert_eq!(std::fs::read(dst.join("bin/tool")).unwrap(), b"#!x");
        let mode = std::fs::metadata(dst.join("bin/tool"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read_link(dst.join("bin/alias")).unwrap(),
            Path::new("tool")
        );
        let err = copy_tree(Path::new("/nonexistent/src"), &dst)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/src"), "{err}");
    }
}
