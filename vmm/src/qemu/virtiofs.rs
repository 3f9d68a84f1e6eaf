//! virtio-fs for the `qemu` backend: the host daemon (QEMU 7.2's C `virtiofsd`, from
//! qemu-system-common) and what QEMU needs for a `vhost-user-fs-pci` device: guest RAM the
//! daemon can map (a shared memfd), a socket chardev and the device, hot-plugged over QMP.
//!
//! The guest is untrusted: the daemon serves one directory (`-o source=`), chroots into it
//! (`-o sandbox=chroot`: it stays in the host's mount namespace, so bind mounts made under the
//! directory after it started are served too), runs its own seccomp filter, and joins the pod's
//! cgroups between fork and exec like QEMU.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::hypervisor::{pidfd_exited, pidfd_open};

/// QEMU 7.2's virtio-fs daemon (Debian qemu-system-common).
pub const VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";
/// The tag the guest mounts (`mount -t virtiofs tandem …`).
pub const FS_TAG: &str = "tandem";
/// The daemon's vhost-user socket, in the run dir.
pub const VIRTIOFSD_SOCKET: &str = "virtiofsd.sock";
/// The daemon's stderr, in the run dir.
pub const VIRTIOFSD_LOG: &str = "virtiofsd.log";
/// How long the daemon may take to listen on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a killed daemon may take to be gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// How one `virtiofsd` is started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtiofsdConfig {
    /// The daemon binary.
    pub binary: PathBuf,
    /// The directory served to the guest (absolute, existing).
    pub shared_dir: PathBuf,
    /// The vhost-user socket the daemon listens on (QEMU connects to it).
    pub socket: PathBuf,
    /// Where its stderr goes.
    pub log: PathBuf,
    /// Cgroup directories it joins between fork and exec (the pod's, like QEMU).
    pub cgroups: Vec<PathBuf>,
    /// Worker threads (`--thread-pool-size`).
    pub thread_pool_size: u32,
    /// `-o cache=` (auto, always, none).
    pub cache: String,
}

impl VirtiofsdConfig {
    /// Defaults for a VM's run dir: socket and log in it, 4 workers, cache=auto.
    pub fn new(shared_dir: impl Into<PathBuf>, run_dir: &Path) -> Self {
        Self {
            binary: VIRTIOFSD.into(),
            shared_dir: shared_dir.into(),
            socket: run_dir.join(VIRTIOFSD_SOCKET),
            log: run_dir.join(VIRTIOFSD_LOG),
            cgroups: Vec::new(),
            thread_pool_size: 4,
            cache: "auto".into(),
        }
    }
}

fn utf8<'a>(field: &str, p: &'a Path) -> Result<&'a str> {
    p.to_str()
        .ok_or_else(|| Error::invalid(field, format!("{}: not valid UTF-8", p.display())))
}

/// The daemon's arguments (without the binary). The shared dir must be absolute and free of
/// commas (virtiofsd splits `-o` values at commas, with no escape); the socket path must fit a
/// unix socket address.
pub fn virtiofsd_args(cfg: &VirtiofsdConfig) -> Result<Vec<String>> {
    let dir = utf8("virtiofsd.shared_dir", &cfg.shared_dir)?;
    if !cfg.shared_dir.is_absolute() || dir.contains(',') {
        return Err(Error::invalid(
            "virtiofsd.shared_dir",
            format!("{dir}: must be an absolute path without ','"),
        ));
    }
    let sock = utf8("virtiofsd.socket", &cfg.socket)?;
    if sock.len() > 107 {
        return Err(Error::invalid(
            "virtiofsd.socket",
            format!("{sock}: a unix socket path must be at most 107 bytes"),
        ));
    }
    if !matches!(cfg.cache.as_str(), "auto" | "always" | "none") {
        return Err(Error::invalid(
            "virtiofsd.cache",
            format!("{:?}: one of auto, always, none", cfg.cache),
        ));
    }
    if cfg.thread_pool_size == 0 || cfg.thread_pool_size > 64 {
        return Err(Error::invalid(
            "virtiofsd.thread_pool_size",
            format!("{}: 1-64", cfg.thread_pool_size),
        ));
    }
    Ok(vec![
        "-f".into(),
        format!("--socket-path={sock}"),
        "-o".into(),
        format!("source={dir}"),
        // chroot, not namespace: the daemon must see the binds the shim adds under the shared
        // dir after it started (docs/vm-mode.md, "Directory volumes")
        "-o".into(),
        "sandbox=chroot".into(),
        "-o".into(),
        format!("cache={}", cfg.cache),
        "-o".into(),
        "no_xattr".into(),
        "-o".into(),
        "no_posix_lock".into(),
        "-o".into(),
        "no_flock".into(),
        "-o".into(),
        "log_level=warn".into(),
        format!("--thread-pool-size={}", cfg.thread_pool_size),
    ])
}

/// Rewrites the guest RAM object (`-object {…"id":"mem0"…}`) of a QEMU command line so that a
/// vhost-user daemon can map it: a memfd with `share: true` (hugetlb fields kept, so hugepage
/// backed memory is shared too). Errors when the command line has no such object.
pub fn share_guest_memory(args: &mut [String]) -> Result<()> {
    for i in 1..args.len() {
        if args[i - 1] != "-object" {
            continue;
        }
        let Ok(mut v) = serde_json::from_str::<Value>(&args[i]) else {
            continue;
        };
        if v["id"] != "mem0" {
            continue;
        }
        v["qom-type"] = json!("memory-backend-memfd");
        v["share"] = json!(true);
        args[i] = v.to_string();
        return Ok(());
    }
    Err(Error::invalid(
        "memory",
        "no guest RAM object (id mem0) on the QEMU command line",
    ))
}

/// QMP `chardev-add` arguments: a unix socket client chardev `id` connected to `socket`.
pub fn chardev_add_args(id: &str, socket: &Path) -> Value {
    json!({"id": id, "backend": {"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": socket.to_string_lossy()}},
        "server": false}}})
}

/// QMP `device_add` arguments of a `vhost-user-fs-pci` device `id` on chardev `chardev`,
/// exporting `tag`, on PCIe root port `bus`.
pub fn device_add_args(id: &str, chardev: &str, tag: &str, bus: &str) -> Value {
    json!({"driver": "vhost-user-fs-pci", "id": id, "chardev": chardev, "tag": tag,
           "bus": bus})
}

/// Checks a virtio-fs tag: 1-36 bytes (the device's tag field) of `[A-Za-z0-9_.-]`.
pub fn check_tag(tag: &str) -> Result<()> {
    let ok = !tag.is_empty()
        && tag.len() <= 36
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "virtio-fs tag",
            format!("{tag:?}: 1-36 of [A-Za-z0-9_.-]"),
        ))
    }
}

/// A running `virtiofsd`.
#[derive(Debug)]
pub struct Virtiofsd {
    pid: u32,
    pidfd: OwnedFd,
    child: Option<Child>,
    socket: PathBuf,
    stopped: bool,
}

fn derr(reason: impl Into<String>) -> Error {
    Error::Device {
        device: "virtiofsd".into(),
        reason: reason.into(),
    }
}

impl Virtiofsd {
    /// Starts the daemon (own session, in `cfg.cgroups`) and waits until it listens on its
    /// socket. On error nothing is left (process killed, socket and log removed).
    pub fn start(cfg: &VirtiofsdConfig) -> Result<Self> {
        let args = virtiofsd_args(cfg)?;
        match std::fs::metadata(&cfg.binary) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(derr(format!(
                    "{}: not a regular file",
                    cfg.binary.display()
                )))
            }
            Err(e) => {
                return Err(derr(format!(
                    "{}: {e} (package qemu-system-common)",
                    cfg.binary.display()
                )))
            }
        }
        if !cfg.shared_dir.is_dir() {
            return Err(derr(format!(
                "shared dir {}: not a directory",
                cfg.shared_dir.display()
            )));
        }
        if std::fs::symlink_metadata(&cfg.socket).is_ok() {
            if std::os::unix::net::UnixStream::connect(&cfg.socket).is_ok() {
                return Err(derr(format!(
                    "{}: in use by a running process",
                    cfg.socket.display()
                )));
            }
            std::fs::remove_file(&cfg.socket).map_err(|e| Error::io(&cfg.socket, e))?;
        }
        let mut procs_files = Vec::new();
        for dir in &cfg.cgroups {
            let p = dir.join("cgroup.procs");
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(|e| Error::io(&p, e))?;
            procs_files.push(f);
        }
        let log = File::create(&cfg.log).map_err(|e| Error::io(&cfg.log, e))?;
        let mut cmd = Command::new(&cfg.binary);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let procs_fds: Vec<i32> = procs_files.iter().map(|f| f.as_raw_fd()).collect();
        // SAFETY: only async-signal-safe calls (setsid, write) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for fd in &procs_fds {
                    if libc::write(*fd, b"0".as_ptr().cast(), 1) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            let _ = std::fs::remove_file(&cfg.log);
            derr(format!(
                "spawn {} (joining cgroups {:?}): {e}",
                cfg.binary.display(),
                cfg.cgroups
            ))
        })?;
        drop(procs_files);
        let pid = child.id();
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                // SAFETY: our own unreaped child.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                let mut child = child;
                let _ = child.wait();
                return Err(derr(format!("pidfd_open({pid}): {e}")));
            }
        };
        let mut d = Virtiofsd {
            pid,
            pidfd,
            child: Some(child),
            socket: cfg.socket.clone(),
            stopped: false,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // never connect to probe: the daemon serves the first connection only and exits
            // when it closes
            if std::fs::symlink_metadata(&cfg.socket).is_ok() {
                break;
            }
            if pidfd_exited(&d.pidfd, Duration::from_millis(5)) {
                let tail = log_tail(&cfg.log);
                let st = d
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "exited".into());
                d.stopped = true;
                let _ = std::fs::remove_file(&cfg.socket);
                let _ = std::fs::remove_file(&cfg.log);
                return Err(derr(format!("exited early ({st}): {tail}")));
            }
            if Instant::now() > deadline {
                let _ = d.stop();
                let _ = std::fs::remove_file(&cfg.log);
                return Err(derr(format!(
                    "socket {} not up within {START_TIMEOUT:?}",
                    cfg.socket.display()
                )));
            }
        }
        Ok(d)
    }

    /// Host pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The vhost-user socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// True when the daemon is gone.
    pub fn exited(&self) -> bool {
        pidfd_exited(&self.pidfd, Duration::ZERO)
    }

    /// Kills the daemon (SIGKILL through the pidfd), waits until it is gone and removes its
    /// socket; idempotent.
    pub fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        if !pidfd_exited(&self.pidfd, Duration::ZERO) {
            // SAFETY: plain syscall on a valid pidfd.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    self.pidfd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ESRCH) {
                    return Err(derr(format!("pid {}: SIGKILL: {e}", self.pid)));
                }
            }
            if !pidfd_exited(&self.pidfd, KILL_TIMEOUT) {
                return Err(derr(format!(
                    "pid {}: still alive {KILL_TIMEOUT:?} after SIGKILL",
                    self.pid
                )));
            }
        }
        if let Some(c) = self.child.as_mut() {
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
        self.stopped = true;
        Ok(())
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!(pid = self.pid, "stopping virtiofsd: {e}");
        }
    }
}

fn log_tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_arguments_and_their_checks() {
        let run = Path::new("/run/tandem-vm/1-pod");
        let cfg = VirtiofsdConfig::new(run.join("shared"), run);
        let a = virtiofsd_args(&cfg).unwrap();
        assert_eq!(a[0], "-f");
        assert!(a.contains(&"--socket-path=/run/tandem-vm/1-pod/virtiofsd.sock".to_string()));
        assert!(a.contains(&"source=/run/tandem-vm/1-pod/shared".to_string()));
        assert!(a.contains(&"sandbox=chroot".to_string()));
        assert!(a.contains(&"cache=auto".to_string()));
        assert!(a.contains(&"--thread-pool-size=4".to_string()));
        // every -o has a value
        for (i, x) in a.iter().enumerate() {
            if x == "-o" {
                assert!(!a[i + 1].starts_with('-'), "{a:?}");
            }
        }
        let bad = |f: &dyn Fn(&mut VirtiofsdConfig)| {
            let mut c = cfg.clone();
            f(&mut c);
            virtiofsd_args(&c).unwrap_err().to_string()
        };
        let e = bad(&|c| c.shared_dir = "/run/a,b".into());
        assert!(e.contains("/run/a,b") && e.contains("','"), "{e}");
        let e = bad(&|c| c.shared_dir = "rel/dir".into());
        assert!(e.contains("rel/dir"), "{e}");
        let e = bad(&|c| c.socket = PathBuf::from(format!("/{}", "s".repeat(120))));
        assert!(e.contains("107 bytes"), "{e}");
        let e = bad(&|c| c.cache = "sometimes".into());
        assert!(e.contains("sometimes"), "{e}");
        let e = bad(&|c| c.thread_pool_size = 0);
        assert!(e.contains("thread_pool_size"), "{e}");
    }

    #[test]
    fn guest_memory_becomes_a_shared_memfd() {
        let mut a: Vec<String> = [
            "-object",
            r#"{"qom-type":"memory-backend-ram","id":"mem0","size":536870912}"#,
            "-m",
            "512M",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        share_guest_memory(&mut a).unwrap();
        let v: Value = serde_json::from_str(&a[1]).unwrap();
        assert_eq!(v["qom-type"], "memory-backend-memfd");
        assert_eq!(v["share"], true);
        assert_eq!(v["size"], 536870912u64);
        // hugetlb stays hugetlb, now shared
        let mut h = vec![
            "-object".to_string(),
            r#"{"qom-type":"memory-backend-memfd","hugetlb":true,"hugetlbsize":2097152,"id":"mem0","size":268435456,"prealloc":true}"#.to_string(),
        ];
        share_guest_memory(&mut h).unwrap();
        let v: Value = serde_json::from_str(&h[1]).unwrap();
        assert_eq!(v["hugetlb"], true);
        assert_eq!(v["hugetlbsize"], 2097152);
        assert_eq!(v["share"], true);
        assert_eq!(v["prealloc"], true);
        // another object is left alone; no RAM object is an error
        let mut o = vec![
            "-object".to_string(),
            r#"{"qom-type":"rng-random","id":"rng0"}"#.to_string(),
        ];
        let e = share_guest_memory(&mut o).unwrap_err().to_string();
        assert!(e.contains("mem0"), "{e}");
        assert!(o[1].contains("rng-random") && !o[1].contains("share"));
    }

    #[test]
    fn qmp_arguments_of_the_hot_plug() {
        let c = chardev_add_args("vfs0", Path::new("/run/x/virtiofsd.sock"));
        assert_eq!(c["id"], "vfs0");
        assert_eq!(c["backend"]["type"], "socket");
        assert_eq!(
            c["backend"]["data"]["addr"]["data"]["path"],
            "/run/x/virtiofsd.sock"
        );
        assert_eq!(c["backend"]["data"]["server"], false);
        let d = device_add_args("vfs0-dev", "vfs0", FS_TAG, "hp3");
        assert_eq!(d["driver"], "vhost-user-fs-pci");
        assert_eq!(d["chardev"], "vfs0");
        assert_eq!(d["tag"], "tandem");
        assert_eq!(d["bus"], "hp3");
        check_tag("tandem").unwrap();
        assert!(check_tag("").is_err());
        assert!(check_tag("a b").is_err());
        assert!(check_tag(&"t".repeat(37)).is_err());
    }

    #[test]
    fn a_missing_binary_or_shared_dir_is_named_and_nothing_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = VirtiofsdConfig::new(dir.path().join("shared"), dir.path());
        cfg.binary = dir.path().join("no-virtiofsd");
        let e = Virtiofsd::start(&cfg).unwrap_err().to_string();
        assert!(e.contains("no-virtiofsd"), "{e}");
        cfg.binary = VIRTIOFSD.into();
        let e = Virtiofsd::start(&cfg).unwrap_err().to_string();
        assert!(e.contains("shared"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// The real daemon: listens on its socket, is in the cgroup given, and is killed by stop.
    #[test]
    fn the_daemon_listens_and_stops() {
        assert!(
            Path::new(VIRTIOFSD).is_file(),
            "{VIRTIOFSD} (qemu-system-common) is needed"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("shared")).unwrap();
        let cfg = VirtiofsdConfig::new(dir.path().join("shared"), dir.path());
        let mut d = Virtiofsd::start(&cfg).unwrap();
        assert!(cfg.socket.exists());
        let args = crate::hypervisor::proc_args(d.pid()).unwrap();
        assert!(args[0].ends_with("virtiofsd"), "{args:?}");
        d.stop().unwrap();
        assert!(d.exited());
        assert!(!cfg.socket.exists());
        d.stop().unwrap();
    }
}
