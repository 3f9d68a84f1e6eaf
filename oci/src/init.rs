//! The code run in the re-executed, single-threaded init: namespaces, the fork into the new
//! pid namespace, rootfs, the process attributes, the wait for `start` and the exec.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};
use serde::{Deserialize, Serialize};

use crate::rootfs::{self, CgroupMount};
use crate::sync::{Channel, Msg, CONFIG_FD_ENV, SYNC_FD_ENV};

type R<T> = std::result::Result<T, String>;

/// What the engine hands to the init (through a memfd).
#[derive(Debug, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)] // serialized once, never moved around
pub enum InitConfig {
    Create(CreateConfig),
    Exec(ExecConfig),
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CreateConfig {
    pub id: String,
    pub rootfs: PathBuf,
    pub spec: Spec,
    /// The exec fifo in the state dir (opened O_PATH before the namespaces are entered).
    pub fifo: PathBuf,
    pub cgroups: Vec<CgroupMount>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ExecConfig {
    /// Host pid of the container's init, whose namespaces are joined.
    pub pid: i32,
    pub process: Process,
    /// The container's spec (seccomp comes from here).
    pub spec: Spec,
}

pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn env_fd(name: &str) -> R<RawFd> {
    std::env::var(name)
        .map_err(|_| format!("{name} not set: not started by the engine"))?
        .parse()
        .map_err(|e| format!("{name}: {e}"))
}

pub fn main() -> ! {
    let chan = match env_fd(SYNC_FD_ENV) {
        // SAFETY: the engine passed this fd to us for our exclusive use.
        Ok(fd) => Channel::from_fd(unsafe { OwnedFd::from_raw_fd(fd) }),
        Err(e) => {
            eprintln!("tandem init: {e}");
            unsafe { libc::_exit(2) }
        }
    };
    // keep the channel off the fds of exec'd programs
    unsafe { libc::fcntl(chan.raw(), libc::F_SETFD, libc::FD_CLOEXEC) };
    let r = run(&chan);
    let msg = match r {
        Ok(()) => unsafe { libc::_exit(0) },
        Err(m) => m,
    };
    let _ = chan.send(&Msg::Error(msg));
    unsafe { libc::_exit(1) }
}

fn read_config() -> R<InitConfig> {
    let fd = env_fd(CONFIG_FD_ENV)?;
    // SAFETY: the engine passed this memfd to us.
    let mut f = unsafe { fs::File::from_raw_fd(fd) };
    f.rewind().map_err(|e| format!("config memfd: {e}"))?;
    let mut s = String::new();
    f.read_to_string(&mut s)
        .map_err(|e| format!("config memfd: {e}"))?;
    serde_json::from_str(&s).map_err(|e| format!("config: {e}"))
}

fn run(chan: &Channel) -> R<()> {
    let cfg = read_config()?;
    match chan.recv() {
        Ok(Some((Msg::Go, _))) => {}
        Ok(None) => unsafe { libc::_exit(1) },
        other => return Err(format!("expected Go from the engine, got {other:?}")),
    }
    match cfg {
        InitConfig::Create(c) => create(chan, c),
        InitConfig::Exec(e) => exec(chan, e),
    }
}

fn ns_flag(t: LinuxNamespaceType) -> CloneFlags {
    match t {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        LinuxNamespaceType::Time => CloneFlags::from_bits_retain(libc::CLONE_NEWTIME),
    }
}

fn warn(chan: &Channel, msg: String) {
    let _ = chan.send(&Msg::Warn(msg));
}

fn write_oom_score_adj(chan: &Channel, v: i32) -> R<()> {
    match fs::write("/proc/self/oom_score_adj", v.to_string()) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) => {
            warn(
                chan,
                format!(
                    "process.oomScoreAdj {v}: write /proc/self/oom_score_adj: {e} (continuing)"
                ),
            );
            Ok(())
        }
        Err(e) => Err(format!(
            "process.oomScoreAdj {v}: write /proc/self/oom_score_adj: {e}"
        )),
    }
}

/// fork with CLONE_PARENT: the new process is a child of our parent (the engine's caller).
fn clone_parent() -> R<i32> {
    // SAFETY: the init is single-threaded; a raw clone without a new stack acts like fork.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if r < 0 {
        return Err(format!("clone: {}", std::io::Error::last_os_error()));
    }
    Ok(r as i32)
}

fn create(chan: &Channel, cfg: CreateConfig) -> R<()> {
    let spec = &cfg.spec;
    let process = spec.process().as_ref().ok_or("process missing")?;
    if let Some(v) = process.oom_score_adj() {
        write_oom_score_adj(chan, v)?;
    }
    let fifo = nix::fcntl::open(
        &cfg.fifo,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("open exec fifo {}: {e}", cfg.fifo.display()))?;
    // still host root in the host's namespaces: make the idmapped mounts now
    let idmapped = prepare_idmaps(spec, &cfg.rootfs)?;

    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    // open every namespace path first: joining the mount namespace changes what paths mean
    let mut join = Vec::new();
    for ns in &namespaces {
        if let Some(p) = ns.path() {
            let f = fs::File::open(p)
                .map_err(|e| format!("linux.namespaces: {} path {}: {e}", ns.typ(), p.display()))?;
            join.push((ns.typ(), f));
        }
    }
    join.sort_by_key(|(t, _)| match t {
        LinuxNamespaceType::User => 0,
        LinuxNamespaceType::Mount => 2,
        _ => 1,
    });
    for (t, f) in &join {
        nix::sched::setns(f, ns_flag(*t))
            .map_err(|e| format!("linux.namespaces: setns {t}: {e}"))?;
    }
    let new: Vec<LinuxNamespaceType> = namespaces
        .iter()
        .filter(|n| n.path().is_none())
        .map(|n| n.typ())
        .collect();
    let in_userns = namespaces
        .iter()
        .any(|n| n.typ() == LinuxNamespaceType::User);
    if new.contains(&LinuxNamespaceType::User) {
        nix::sched::unshare(CloneFlags::CLONE_NEWUSER)
            .map_err(|e| format!("unshare user namespace: {e}"))?;
        chan.send(&Msg::MapIds {
            pid: std::process::id() as i32,
        })
        .map_err(|e| format!("sync: {e}"))?;
        match chan.recv() {
            Ok(Some((Msg::MapsDone, _))) => {}
            Ok(Some((Msg::Error(e), _))) => return Err(e),
            other => return Err(format!("expected MapsDone, got {other:?}")),
        }
        become_root()?;
    } else if join.iter().any(|(t, _)| *t == LinuxNamespaceType::User) {
        become_root()?;
    }
    let mut flags = CloneFlags::empty();
    for t in &new {
        if *t != LinuxNamespaceType::User {
            flags |= ns_flag(*t);
        }
    }
    if !flags.is_empty() {
        nix::sched::unshare(flags).map_err(|e| format!("unshare {flags:?}: {e}"))?;
    }
    let pid = clone_parent()?;
    if pid > 0 {
        chan.send(&Msg::Pid(pid))
            .map_err(|e| format!("sync: {e}"))?;
        unsafe { libc::_exit(0) }
    }
    // the container process (pid 1 of a new pid namespace)
    let r = container(chan, &cfg, fifo, in_userns, idmapped);
    let msg = match r {
        Ok(()) => unsafe { libc::_exit(0) },
        Err(m) => m,
    };
    let _ = chan.send(&Msg::Error(msg));
    unsafe { libc::_exit(1) }
}

/// The idmapped mounts of the container, made while the init is host root and before it
/// enters any namespace (see the crate docs for when the rootfs is idmapped).
fn prepare_idmaps(spec: &Spec, rootfs_path: &Path) -> R<rootfs::Idmapped> {
    use crate::idmap::{idmapped_tree, make_userns, to_host};
    use std::os::unix::fs::MetadataExt;
    let mut out = rootfs::Idmapped::default();
    let linux = spec.linux().as_ref();
    let user = linux.and_then(|l| l.namespaces().as_ref()).and_then(|n| {
        n.iter()
            .find(|n| n.typ() == LinuxNamespaceType::User)
            .cloned()
    });
    let uid = linux
        .and_then(|l| l.uid_mappings().clone())
        .unwrap_or_default();
    let gid = linux
        .and_then(|l| l.gid_mappings().clone())
        .unwrap_or_default();
    // a user namespace with the container's mapping (made at most once)
    let mut container_ns: Option<OwnedFd> = None;
    let mut container_userns = |what: &str| -> R<OwnedFd> {
        if let Some(fd) = &container_ns {
            return fd.try_clone().map_err(|e| format!("dup userns fd: {e}"));
        }
        let fd = match user.as_ref().and_then(|u| u.path().clone()) {
            Some(p) => OwnedFd::from(
                fs::File::open(&p)
                    .map_err(|e| format!("{what}: user namespace {}: {e}", p.display()))?,
            ),
            None if !uid.is_empty() && !gid.is_empty() => make_userns(&uid, &gid)
                .map_err(|e| format!("{what}: user namespace for the container's mapping: {e}"))?,
            None => return Err(format!("{what}: no user namespace mapping to idmap with")),
        };
        let dup = fd.try_clone().map_err(|e| format!("dup userns fd: {e}"))?;
        container_ns = Some(fd);
        Ok(dup)
    };
    // a new user namespace, or one joined by path whose mapping the spec states (a pod's
    // containers joining the sandbox's): the container's root needs the image as its own
    if user.is_some() && !uid.is_empty() && !gid.is_empty() {
        let meta = fs::metadata(rootfs_path)
            .map_err(|e| format!("root.path {}: {e}", rootfs_path.display()))?;
        // an image already owned by the mapped root (a chown'ed copy) is used as it is
        if Some(meta.uid()) != to_host(&uid, 0) || Some(meta.gid()) != to_host(&gid, 0) {
            let ns = container_userns("root.path")?;
            // overlayfs cannot be idmapped itself: rebuild it on idmapped layers
            let tree = match crate::idmap::overlay_at(rootfs_path)? {
                Some(layers) => crate::idmap::idmapped_overlay(
                    rootfs_path,
                    &layers,
                    &ns,
                    to_host(&uid, 0).unwrap_or(0),
                    to_host(&gid, 0).unwrap_or(0),
                ),
                None => idmapped_tree(rootfs_path, &ns, true, true),
            }
            .map_err(|e| format!("root.path: {e}"))?;
            out.rootfs = Some(tree);
        }
    }
    for (i, m) in spec.mounts().iter().flatten().enumerate() {
        let opts = m.options().clone().unwrap_or_default();
        let idmap_opt = opts.iter().any(|o| o == "idmap" || o == "ridmap");
        let maps = match (m.uid_mappings(), m.gid_mappings()) {
            (Some(u), Some(g)) => Some((u, g)),
            _ => None,
        };
        if !idmap_opt && maps.is_none() {
            continue;
        }
        let what = format!("mounts[{i}] ({})", m.destination().display());
        let src = m
            .source()
            .as_ref()
            .ok_or_else(|| format!("{what}: bind mount has no source"))?;
        let ns = match maps {
            Some((u, g)) => make_userns(u, g).map_err(|e| format!("{what}: {e}"))?,
            None => container_userns(&what)?,
        };
        let rec_clone = opts.iter().any(|o| o == "rbind");
        let rec_idmap = opts.iter().any(|o| o == "ridmap");
        let tree =
            idmapped_tree(src, &ns, rec_clone, rec_idmap).map_err(|e| format!("{what}: {e}"))?;
        out.mounts.insert(i, tree);
    }
    Ok(out)
}

fn become_root() -> R<()> {
    nix::unistd::setresgid(0.into(), 0.into(), 0.into())
        .map_err(|e| format!("setresgid 0 in the user namespace: {e}"))?;
    nix::unistd::setresuid(0.into(), 0.into(), 0.into())
        .map_err(|e| format!("setresuid 0 in the user namespace: {e}"))
}

fn container(
    chan: &Channel,
    cfg: &CreateConfig,
    fifo: OwnedFd,
    in_userns: bool,
    idmapped: rootfs::Idmapped,
) -> R<()> {
    let spec = &cfg.spec;
    let process = spec.process().as_ref().ok_or("process missing")?;
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    let has_mntns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|n| n.iter().any(|n| n.typ() == LinuxNamespaceType::Mount));
    if has_mntns {
        rootfs::prepare_idmapped(spec, &cfg.rootfs, &cfg.cgroups, in_userns, &idmapped)?;
        drop(idmapped);
        rootfs::pivot(&cfg.rootfs)?;
    } else {
        return Err("linux.namespaces: a mount namespace is required".into());
    }
    if process.terminal() == Some(true) {
        setup_tty(chan, process, false, true)?;
    }
    let uts = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|n| n.iter().any(|n| n.typ() == LinuxNamespaceType::Uts));
    if let Some(h) = spec.hostname().as_deref().filter(|h| !h.is_empty()) {
        if !uts {
            return Err("hostname set without a uts namespace".into());
        }
        nix::unistd::sethostname(h).map_err(|e| format!("hostname {h:?}: {e}"))?;
    }
    if let Some(d) = spec.domainname().as_deref().filter(|d| !d.is_empty()) {
        let c = CString::new(d).map_err(|_| "domainname has a NUL byte")?;
        if unsafe { libc::setdomainname(c.as_ptr(), d.len()) } != 0 {
            return Err(format!(
                "domainname {d:?}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    rootfs::finalize(spec)?;
    set_rlimits(process)?;
    // the fifo is reopened through /proc: check that it is reachable before reporting ready
    let fifo_path = format!("/proc/self/fd/{}", fifo.as_raw_fd());
    if fs::symlink_metadata(&fifo_path).is_err() {
        return Err(format!(
            "exec fifo: {fifo_path} not reachable (is /proc mounted in the container?)"
        ));
    }
    let prepared = prepare_process(chan, process, spec)?;
    chan.send(&Msg::Ready).map_err(|e| format!("sync: {e}"))?;
    // wait for start: opening the fifo for writing blocks until `start` opens it for reading
    let w = nix::fcntl::open(
        fifo_path.as_str(),
        nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    );
    match w {
        Ok(fd) => {
            let _ = nix::unistd::write(&fd, b"0");
        }
        Err(e) => {
            eprintln!("tandem init: open exec fifo: {e}");
            unsafe { libc::_exit(127) }
        }
    }
    drop(fifo);
    let e = prepared.exec();
    eprintln!("tandem init: {e}");
    unsafe { libc::_exit(127) }
}

fn exec(chan: &Channel, cfg: ExecConfig) -> R<()> {
    let process = &cfg.process;
    if let Some(v) = process.oom_score_adj() {
        write_oom_score_adj(chan, v)?;
    }
    // user first, mount last; only namespaces that differ from ours
    let order = ["user", "ipc", "uts", "net", "pid", "cgroup", "time", "mnt"];
    let mut fds = Vec::new();
    for name in order {
        let theirs = format!("/proc/{}/ns/{name}", cfg.pid);
        let mine = format!("/proc/self/ns/{name}");
        let (a, b) = match (fs::metadata(&theirs), fs::metadata(&mine)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) if name == "time" => {
                let _ = e;
                continue;
            }
            (Err(e), _) => return Err(format!("container init {}: {theirs}: {e}", cfg.pid)),
            (_, Err(e)) => return Err(format!("{mine}: {e}")),
        };
        use std::os::unix::fs::MetadataExt;
        if a.ino() == b.ino() && a.dev() == b.dev() {
            continue;
        }
        let f = fs::File::open(&theirs).map_err(|e| format!("open {theirs}: {e}"))?;
        fds.push((name, f));
    }
    let mut joined_user = false;
    for (name, f) in &fds {
        nix::sched::setns(f, CloneFlags::empty()).map_err(|e| format!("setns {name}: {e}"))?;
        joined_user |= *name == "user";
    }
    if joined_user {
        become_root()?;
    }
    let pid = clone_parent()?;
    if pid > 0 {
        chan.send(&Msg::Pid(pid))
            .map_err(|e| format!("sync: {e}"))?;
        unsafe { libc::_exit(0) }
    }
    let r = (|| -> R<()> {
        nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
        if process.terminal() == Some(true) {
            setup_tty(chan, process, true, false)?;
        }
        set_rlimits(process)?;
        let prepared = prepare_process(chan, process, &cfg.spec)?;
        chan.send(&Msg::Ready).map_err(|e| format!("sync: {e}"))?;
        Err(prepared.exec())
    })();
    let msg = r.err().unwrap_or_default();
    let _ = chan.send(&Msg::Error(msg));
    unsafe { libc::_exit(127) }
}

/// A pty: the slave becomes the controlling terminal and fds 0-2, the master goes to the engine.
fn setup_tty(chan: &Channel, process: &Process, new_session: bool, console: bool) -> R<()> {
    use nix::fcntl::OFlag;
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| format!("terminal: open /dev/ptmx: {e}"))?;
    grantpt(&master).map_err(|e| format!("terminal: grantpt: {e}"))?;
    unlockpt(&master).map_err(|e| format!("terminal: unlockpt: {e}"))?;
    let name = ptsname_r(&master).map_err(|e| format!("terminal: ptsname: {e}"))?;
    if let Some(sz) = process.console_size() {
        let ws = libc::winsize {
            ws_row: sz.height() as u16,
            ws_col: sz.width() as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    }
    let slave = nix::fcntl::open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("terminal: open {name}: {e}"))?;
    if console {
        let c = Path::new("/dev/console");
        if fs::symlink_metadata(c).is_err() {
            fs::File::create(c).map_err(|e| format!("terminal: create /dev/console: {e}"))?;
        }
        nix::mount::mount(
            Some(name.as_str()),
            c,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("terminal: bind {name} on /dev/console: {e}"))?;
    }
    if new_session {
        nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    }
    if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) } != 0 {
        return Err(format!(
            "terminal: TIOCSCTTY: {}",
            std::io::Error::last_os_error()
        ));
    }
    for fd in 0..3 {
        if unsafe { libc::dup2(slave.as_raw_fd(), fd) } < 0 {
            return Err(format!(
                "terminal: dup2: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    drop(slave);
    chan.send_fd(&Msg::Console, Some(master.as_raw_fd()))
        .map_err(|e| format!("terminal: send master: {e}"))?;
    Ok(())
}

fn rlimit_resource(name: &str) -> Option<libc::__rlimit_resource_t> {
    Some(match name {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => return None,
    })
}

fn set_rlimits(process: &Process) -> R<()> {
    for rl in process.rlimits().iter().flatten() {
        let name = crate::seccomp::serde_name(&rl.typ());
        let res =
            rlimit_resource(&name).ok_or_else(|| format!("process.rlimits: unknown {name}"))?;
        let lim = libc::rlimit {
            rlim_cur: rl.soft(),
            rlim_max: rl.hard(),
        };
        if unsafe { libc::setrlimit(res, &lim) } != 0 {
            return Err(format!(
                "process.rlimits: {name} soft {} hard {}: {}",
                rl.soft(),
                rl.hard(),
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Everything resolved and applied except the final execve.
pub(crate) struct Prepared {
    path: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    seccomp_late: Option<libseccomp::ScmpFilterContext>,
    display: String,
}

impl Prepared {
    fn exec(self) -> String {
        if let Some(ctx) = &self.seccomp_late {
            if let Err(e) = ctx.load() {
                return format!("seccomp: load: {e}");
            }
        }
        let e = nix::unistd::execve(&self.path, &self.argv, &self.envp).unwrap_err();
        format!("exec: {}: {}", self.display, e.desc())
    }
}

fn cstr(s: &str, what: &str) -> R<CString> {
    CString::new(s).map_err(|_| format!("{what} {s:?} has a NUL byte"))
}

/// Find the program like runc (and execvp): a name with a slash is used as is, else PATH of
/// the process env is searched.
pub(crate) fn resolve_exe(arg0: &str, env: &[String], cwd: &Path) -> R<PathBuf> {
    let is_exe = |p: &Path| -> bool {
        match fs::metadata(p) {
            Ok(m) => {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            }
            Err(_) => false,
        }
    };
    if arg0.contains('/') {
        let p = if Path::new(arg0).is_absolute() {
            PathBuf::from(arg0)
        } else {
            cwd.join(arg0)
        };
        return match fs::metadata(&p) {
            Err(e) => Err(format!(
                "exec: {arg0}: {}",
                nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::ENOENT)).desc()
            )),
            Ok(m) if m.is_dir() => Err(format!("exec: {arg0}: Is a directory")),
            Ok(_) if !is_exe(&p) => Err(format!("exec: {arg0}: Permission denied")),
            Ok(_) => Ok(PathBuf::from(arg0)),
        };
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let cand = Path::new(dir).join(arg0);
        if is_exe(&cand) {
            return Ok(cand);
        }
    }
    Err(format!(
        "exec: {arg0:?}: executable file not found in $PATH"
    ))
}

/// What the program must not inherit from the engine's caller or from the Rust runtime of the
/// init: ignored signals (Rust ignores SIGPIPE), the signal mask, and fds above 2.
fn clean_inheritance() -> R<()> {
    // the raw syscall: glibc refuses its reserved signals 32 and 33, which may be ignored too
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    let dfl = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: resetting a disposition to default with a valid struct of the kernel's size.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &dfl as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                8usize,
            )
        };
    }
    // SAFETY: an empty set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
    // every fd above stdio closes at exec (the channel and fifo fds already do)
    // SAFETY: plain syscall.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r != 0 {
        let fds: Vec<i32> = fs::read_dir("/proc/self/fd")
            .map_err(|e| format!("/proc/self/fd: {e}"))?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|fd| *fd > 2)
            .collect();
        for fd in fds {
            // SAFETY: setting a flag; a closed fd gives EBADF, ignored.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
    Ok(())
}

/// Apply no_new_privs, seccomp, user, capabilities, umask and cwd; resolve the program.
pub(crate) fn prepare_process(chan: &Channel, process: &Process, spec: &Spec) -> R<Prepared> {
    clean_inheritance()?;
    let args = process.args().clone().unwrap_or_default();
    let arg0 = args.first().ok_or("process.args: empty")?.clone();
    let env = process.env().clone().unwrap_or_default();
    let argv = args
        .iter()
        .map(|a| cstr(a, "process.args"))
        .collect::<R<Vec<_>>>()?;
    let envp = env
        .iter()
        .map(|e| cstr(e, "process.env"))
        .collect::<R<Vec<_>>>()?;
    let nnp = process.no_new_privileges() == Some(true);
    if nnp && unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "process.noNewPrivileges: {}",
            std::io::Error::last_os_error()
        ));
    }
    let seccomp = match spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        Some(sc) => Some(crate::seccomp::build(sc).map_err(|e| format!("seccomp: {e}"))?),
        None => None,
    };
    // without no_new_privs, loading needs CAP_SYS_ADMIN: load before the capabilities drop
    let mut seccomp_late = None;
    if let Some(ctx) = seccomp {
        if nnp {
            seccomp_late = Some(ctx);
        } else {
            ctx.load().map_err(|e| format!("seccomp: load: {e}"))?;
        }
    }
    crate::capabilities::drop_bounding(process)?;
    set_user(process)?;
    crate::capabilities::apply(process, &mut |w| warn(chan, w))?;
    if let Some(m) = process.user().umask() {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(m));
    }
    let cwd = process.cwd();
    nix::unistd::chdir(cwd).map_err(|e| format!("process.cwd {}: {e}", cwd.display()))?;
    let exe = resolve_exe(&arg0, &env, cwd)?;
    let path = CString::new(exe.as_os_str().as_bytes()).map_err(|_| "exe path has a NUL")?;
    // load with no_new_privs as late as possible, but before Ready so that errors reach create
    if let Some(ctx) = seccomp_late.take() {
        ctx.load().map_err(|e| format!("seccomp: load: {e}"))?;
    }
    Ok(Prepared {
        path,
        argv,
        envp,
        seccomp_late,
        display: arg0,
    })
}

fn set_user(process: &Process) -> R<()> {
    let u = process.user();
    if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "PR_SET_KEEPCAPS: {}",
            std::io::Error::last_os_error()
        ));
    }
    let gids: Vec<nix::unistd::Gid> = u
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    // setgroups is denied in a user namespace with setgroups=deny; only fail when gids are asked
    if let Err(e) = nix::unistd::setgroups(&gids) {
        if !gids.is_empty() {
            return Err(format!(
                "process.user.additionalGids {gids:?}: setgroups: {e}"
            ));
        }
    }
    nix::unistd::setresgid(u.gid().into(), u.gid().into(), u.gid().into())
        .map_err(|e| format!("process.user.gid {}: {e}", u.gid()))?;
    nix::unistd::setresuid(u.uid().into(), u.uid().into(), u.uid().into())
        .map_err(|e| format!("process.user.uid {}: {e}", u.uid()))?;
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exe_resolution() {
        let env = vec!["PATH=/nonexistent:/bin:/usr/bin".to_string()];
        let sh = resolve_exe("sh", &env, Path::new("/")).unwrap();
        assert!(sh.ends_with("sh"), "{sh:?}");
        let e = resolve_exe("no-such-prog-xyz", &env, Path::new("/")).unwrap_err();
        assert!(e.contains("executable file not found in $PATH"), "{e}");
        let e = resolve_exe("/bin/nope", &env, Path::new("/")).unwrap_err();
        assert_eq!(e, "exec: /bin/nope: No such file or directory");
        let e = resolve_exe("/etc", &env, Path::new("/")).unwrap_err();
        assert!(e.contains("Is a directory"), "{e}");
        assert_eq!(
            resolve_exe("/bin/sh", &[], Path::new("/")).unwrap(),
            PathBuf::from("/bin/sh")
        );
    }
}
