//! The pod's containers inside the guest, run with tandem-oci. One [`Containers`] per agent.
//!
//! Layout in the guest: bundles under `/run/tandem/bundles/<id>` (config.json + the rootfs mounts
//! the host asked for), engine state under `/run/tandem/state`. Every process (a container's init
//! or an exec) gets stdout/stderr pipes drained into bounded buffers the host pulls with
//! ReadStdout/ReadStderr (a full buffer stops the reader, so a container that writes faster than
//! the host reads is slowed down, not allowed to fill guest memory), and an optional stdin pipe.
//! Exit statuses come from the agent's reaper (the engine requires its caller to reap).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tandem_oci::{CreateRequest, Engine, EngineConfig, Stdio};

use crate::reaper::{Exit, Reaper};

/// Bytes buffered per stream before the reader stops draining the pipe.
pub const STREAM_BUFFER: usize = 1024 * 1024;
/// Largest single read the host may ask for.
pub const MAX_READ: usize = 1024 * 1024;
/// Largest file of a CreateContainer request (`files`).
pub const MAX_FILE_BYTES: usize = 64 * 1024;
/// Largest sum of the files of one CreateContainer request.
pub const MAX_FILES_TOTAL_BYTES: usize = 256 * 1024;
/// Most files in one CreateContainer request.
pub const MAX_FILES: usize = 64;
/// Largest resources JSON of an UpdateContainer request.
pub const MAX_RESOURCES_JSON: usize = 64 * 1024;
/// Directory of a bundle where the files of CreateContainer are written.
pub const FILES_DIR: &str = "files";

/// An error for the RPC status: a code and a message naming the thing.
#[derive(Debug)]
pub struct VerbError {
    pub code: ttrpc::Code,
    pub msg: String,
}

fn verr(code: ttrpc::Code, msg: impl Into<String>) -> VerbError {
    VerbError {
        code,
        msg: msg.into(),
    }
}

fn engine_err(verb: &str, id: &str, e: tandem_oci::Error) -> VerbError {
    let code = match &e {
        tandem_oci::Error::Exists(_) => ttrpc::Code::ALREADY_EXISTS,
        tandem_oci::Error::NotFound(_) => ttrpc::Code::NOT_FOUND,
        tandem_oci::Error::Spec { .. } | tandem_oci::Error::Bundle { .. } => {
            ttrpc::Code::INVALID_ARGUMENT
        }
        _ => ttrpc::Code::INTERNAL,
    };
    verr(code, format!("{verb} {id}: {e}"))
}

type VResult<T> = Result<T, VerbError>;

/// A bounded byte buffer filled by a reader thread.
#[derive(Default)]
pub struct Stream {
    inner: Mutex<(VecDeque<u8>, bool)>,
    cv: Condvar,
}

impl Stream {
    fn spawn_reader(self: &Arc<Self>, mut pipe: File) {
        let s = Arc::clone(self);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match pipe.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => 0,
                };
                let mut g = s.inner.lock().unwrap_or_else(|p| p.into_inner());
                if n == 0 {
                    g.1 = true;
                    s.cv.notify_all();
                    return;
                }
                while g.0.len() >= STREAM_BUFFER {
                    g = s.cv.wait(g).unwrap_or_else(|p| p.into_inner());
                }
                g.0.extend(&buf[..n]);
                s.cv.notify_all();
            }
        });
    }

    /// Mark the stream as ended with nothing in it (a terminal process has no separate stderr).
    fn close(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.1 = true;
        self.cv.notify_all();
    }

    /// Up to `max` bytes, waiting at most `wait` for some; `(data, eof)`.
    pub fn read(&self, max: usize, wait: Duration) -> (Vec<u8>, bool) {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (mut g, _) = self
            .cv
            .wait_timeout_while(g, wait, |(q, eof)| q.is_empty() && !*eof)
            .unwrap_or_else(|p| p.into_inner());
        let n = max.min(g.0.len());
        let data: Vec<u8> = g.0.drain(..n).collect();
        let eof = g.1 && g.0.is_empty();
        self.cv.notify_all();
        (data, eof)
    }
}

struct Proc {
    pid: i32,
    /// The pty master of a process with a terminal (for ResizePty).
    console: Option<File>,
    stdin: Mutex<Option<File>>,
    stdout: Arc<Stream>,
    stderr: Arc<Stream>,
    exit: Mutex<Option<(Exit, i64)>>,
}

struct Entry {
    container: tandem_oci::Container,
    bundle: PathBuf,
    mounts: Vec<PathBuf>,
    init: Arc<Proc>,
    execs: HashMap<String, Arc<Proc>>,
}

/// A rootfs mount requested by the host.
#[derive(Debug, Clone)]
pub struct MountReq {
    pub fstype: String,
    pub source: String,
    pub target: String,
    pub options: Vec<String>,
}

/// A file the host asks to be written at `<bundle>/files/<path>` before the container is made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileReq {
    pub path: String,
    pub content: Vec<u8>,
    pub mode: u32,
}

/// Check a request's files against the limits and their paths (relative, no `..`).
pub fn validate_files(files: &[FileReq]) -> VResult<()> {
    let bad = |msg: String| Err(verr(ttrpc::Code::INVALID_ARGUMENT, msg));
    if files.len() > MAX_FILES {
        return bad(format!(
            "files: {} given, at most {MAX_FILES} allowed",
            files.len()
        ));
    }
    let mut total = 0usize;
    let mut seen = std::collections::HashSet::new();
    for f in files {
        inside(Path::new("/"), &f.path).map_err(|_| {
            verr(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("file {:?}: must be a relative path without '..'", f.path),
            )
        })?;
        if f.path.len() > 255 {
            return bad(format!("file {:?}: path longer than 255 bytes", f.path));
        }
        if !seen.insert(Path::new(&f.path).components().collect::<PathBuf>()) {
            return bad(format!("file {:?}: given twice", f.path));
        }
        if f.content.len() > MAX_FILE_BYTES {
            return bad(format!(
                "file {:?}: {} bytes, more than the {MAX_FILE_BYTES} allowed",
                f.path,
                f.content.len()
            ));
        }
        if f.mode & !0o7777 != 0 {
            return bad(format!(
                "file {:?}: mode {:o} has bits beyond 07777",
                f.path, f.mode
            ));
        }
        total += f.content.len();
    }
    if total > MAX_FILES_TOTAL_BYTES {
        return bad(format!(
            "files: {total} bytes in all, more than the {MAX_FILES_TOTAL_BYTES} allowed"
        ));
    }
    Ok(())
}

/// Write `files` under `<bundle>/files` (checked with [`validate_files`] first): new files only,
/// no symlink followed (every directory is made by us, the files with O_EXCL|O_NOFOLLOW).
fn write_files(bundle: &Path, files: &[FileReq]) -> VResult<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let base = bundle.join(FILES_DIR);
    let ierr = |p: &Path, what: &str, e: std::io::Error| {
        verr(
            ttrpc::Code::INTERNAL,
            format!("{what} {}: {e}", p.display()),
        )
    };
    for f in files {
        let path = inside(&base, &f.path)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| ierr(dir, "mkdir", e))?;
        }
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| ierr(&path, "create", e))?;
        out.write_all(&f.content)
            .map_err(|e| ierr(&path, "write", e))?;
        // the mode as given, not filtered by the umask
        out.set_permissions(std::fs::Permissions::from_mode(f.mode & 0o7777))
            .map_err(|e| ierr(&path, "chmod", e))?;
    }
    Ok(())
}

pub struct Containers {
    engine: Engine,
    bundles: PathBuf,
    reaper: Reaper,
    entries: Mutex<HashMap<String, Entry>>,
    pod_userns: crate::userns::PodUserns,
    pod_net: crate::podnet::PodNet,
    /// The pod's shared `/dev/shm` tmpfs mounts (crate::podshare).
    pod_shm: crate::podshare::PodShm,
}

fn validate_id(kind: &str, id: &str) -> VResult<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(verr(
            ttrpc::Code::INVALID_ARGUMENT,
            format!("{kind} {id:?}: must be 1-128 of [A-Za-z0-9_.-], not starting with '.'"),
        ))
    }
}

/// Mount flags and remaining data options of a mount's option list.
fn parse_options(opts: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in opts {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => {}
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            // the agent's own: idmapped with the container's user namespace (crate::userns)
            "idmap" => {}
            other => data.push(other.to_string()),
        }
    }
    (flags, data.join(","))
}

/// How long CreateContainer waits for a hot-added disk to show up in the guest.
pub const DISK_WAIT: Duration = Duration::from_secs(10);

/// A mount source `serial:<id>` names a virtio-blk disk by its serial (the id the host gave it
/// at hot-add): the `<dev_dir>/vdX` whose `<sys_block>/vdX/serial` is `<id>`, once it has a size
/// and a device node, waited for (a hot-added disk appears asynchronously) at most `wait`. Any
/// other source is used as it is.
fn resolve_source(
    sys_block: &Path,
    dev_dir: &str,
    source: &str,
    wait: Duration,
) -> VResult<String> {
    let Some(serial) = source.strip_prefix("serial:") else {
        return Ok(source.to_string());
    };
    if serial.is_empty() || serial.len() > 20 || serial.contains('/') {
        return Err(verr(
            ttrpc::Code::INVALID_ARGUMENT,
            format!("mount source {source:?}: a disk serial is 1-20 bytes without '/'"),
        ));
    }
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Ok(dir) = std::fs::read_dir(sys_block) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Ok(s) = std::fs::read_to_string(e.path().join("serial")) else {
                    continue;
                };
                // a hot-added disk shows in sysfs before its size is known and its node is made
                let size = std::fs::read_to_string(e.path().join("size")).unwrap_or_default();
                let dev = Path::new(dev_dir).join(&name);
                if s.trim_end() == serial && !matches!(size.trim(), "" | "0") && dev.exists() {
                    tracing::info!(serial, dev = %dev.display(), "disk found");
                    return Ok(dev.to_string_lossy().into_owned());
                }
            }
        }
        if std::time::Instant::now() >= deadline {
            return Err(verr(
                ttrpc::Code::NOT_FOUND,
                format!(
                    "mount source {source:?}: no disk with serial {serial} under {} within {wait:?}",
                    sys_block.display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Overlay needs its upperdir and workdir to exist: make them, when they are inside the bundle
/// (typically on a tmpfs or a writable disk mounted there by an earlier mount of the list).
fn make_overlay_dirs(bundle: &Path, options: &[String]) -> VResult<()> {
    for o in options.iter().flat_map(|o| o.split(',')) {
        let Some(dir) = o
            .strip_prefix("upperdir=")
            .or_else(|| o.strip_prefix("workdir="))
        else {
            continue;
        };
        let rel = Path::new(dir).strip_prefix(bundle).map_err(|_| {
            verr(
                ttrpc::Code::INVALID_ARGUMENT,
                format!(
                    "overlay option {o:?}: must be inside the bundle {}",
                    bundle.display()
                ),
            )
        })?;
        let path = inside(bundle, &rel.to_string_lossy())?;
        std::fs::create_dir_all(&path).map_err(|e| {
            verr(
                ttrpc::Code::INTERNAL,
                format!("mkdir {}: {e}", path.display()),
            )
        })?;
    }
    Ok(())
}

/// `rel` as a path inside `base`: relative, no `..`.
fn inside(base: &Path, rel: &str) -> VResult<PathBuf> {
    let p = Path::new(rel);
    if rel.is_empty()
        || p.is_absolute()
        || p.components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(verr(
            ttrpc::Code::INVALID_ARGUMENT,
            format!("mount target {rel:?}: must be a relative path without '..'"),
        ));
    }
    Ok(base.join(p))
}

/// The container's user namespace as far as its rootfs mounts are concerned: an fd to idmap
/// the mounts marked `idmap` with (when there are any), and the guest IDs of its root.
type RootfsUserns = Option<(Option<OwnedFd>, Option<(u32, u32)>)>;

impl Containers {
    /// Make or check the pod's user namespace when the spec asks for it (crate::userns), and
    /// what the rootfs mounts need of the container's user namespace.
    fn userns_for(
        &self,
        id: &str,
        spec: &tandem_oci::Spec,
        rootfs: &[MountReq],
    ) -> VResult<RootfsUserns> {
        use crate::userns::{of_spec, open, POD_USERNS};
        let idmapped: Vec<&MountReq> = rootfs
            .iter()
            .filter(|m| m.options.iter().any(|o| o == "idmap"))
            .collect();
        let bad = |msg: String| {
            verr(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("container {id}: {msg}"),
            )
        };
        let Some(u) = of_spec(spec) else {
            if let Some(m) = idmapped.first() {
                return Err(bad(format!(
                    "rootfs mount {} on {} has the option idmap, but linux.namespaces has no user namespace",
                    m.source, m.target
                )));
            }
            return Ok(None);
        };
        if u.path.as_deref() == Some(POD_USERNS) {
            self.pod_userns
                .ensure(Path::new(POD_USERNS), &u)
                .map_err(&bad)?;
        }
        let fd = if idmapped.is_empty() {
            None
        } else {
            if u.uid.is_empty() || u.gid.is_empty() {
                return Err(bad(format!(
                    "rootfs mount {} has the option idmap: the user namespace needs linux.uidMappings and linux.gidMappings",
                    idmapped[0].target
                )));
            }
            Some(open(&u).map_err(&bad)?)
        };
        Ok(Some((fd, u.root())))
    }
}

impl Containers {
    /// The pod's network (ConfigureNetwork records its NICs and routes here).
    pub fn pod_net(&self) -> &crate::podnet::PodNet {
        &self.pod_net
    }

    /// Make the pod's network namespace when the spec joins [`crate::podnet::POD_NETNS`]: only
    /// with the pod user namespace, which owns it.
    fn pod_netns_for(&self, id: &str, spec: &tandem_oci::Spec) -> VResult<()> {
        use crate::podnet::{netns_path_of, POD_NETNS};
        use crate::userns::{of_spec, POD_USERNS};
        if netns_path_of(spec).as_deref() != Some(POD_NETNS) {
            return Ok(());
        }
        let bad = |msg: String| {
            verr(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("container {id}: {msg}"),
            )
        };
        if of_spec(spec).and_then(|u| u.path).as_deref() != Some(POD_USERNS) {
            return Err(bad(format!(
                "linux.namespaces: the pod network namespace {POD_NETNS} is only for containers in the pod user namespace {POD_USERNS}"
            )));
        }
        self.pod_net
            .ensure(&self.reaper, Path::new(POD_USERNS), Path::new(POD_NETNS))
            .map_err(|e| {
                verr(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("container {id}: pod network namespace {POD_NETNS}: {e}"),
                )
            })
    }
}

/// Give the files written under `<bundle>/files` to the container's root (guest IDs), so that
/// the pod's root may write the ones bound read-write (kubelet's /etc/hosts), as on the host.
fn own_files(bundle: &Path, files: &[FileReq], (uid, gid): (u32, u32)) -> VResult<()> {
    let base = bundle.join(FILES_DIR);
    for f in files {
        let path = inside(&base, &f.path)?;
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid)).map_err(|e| {
            verr(
                ttrpc::Code::INTERNAL,
                format!("chown {} to {uid}:{gid}: {e}", path.display()),
            )
        })?;
    }
    Ok(())
}

/// Idmap the image layer just mounted at `target` with the container's user namespace, unless
/// its root is already owned by the container's root (a chown'ed copy).
fn idmap_layer(id: &str, target: &Path, ns: &OwnedFd, root: Option<(u32, u32)>) -> VResult<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(target).map_err(|e| {
        verr(
            ttrpc::Code::INTERNAL,
            format!("container {id}: {}: {e}", target.display()),
        )
    })?;
    if root == Some((meta.uid(), meta.gid())) {
        return Ok(());
    }
    crate::userns::idmap_in_place(target, ns).map_err(|e| {
        verr(
            ttrpc::Code::INVALID_ARGUMENT,
            format!("container {id}: {e}"),
        )
    })
}

/// Give the overlay's upper directory (its root inode: `/` of the container) to the
/// container's root. Files written later are owned by whoever writes them.
fn own_upper_dir(bundle: &Path, options: &[String], (uid, gid): (u32, u32)) -> VResult<()> {
    for o in options.iter().flat_map(|o| o.split(',')) {
        if let Some(dir) = o.strip_prefix("upperdir=") {
            let p = Path::new(dir);
            if p.starts_with(bundle) {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(|e| {
                    verr(
                        ttrpc::Code::INTERNAL,
                        format!("chown {} to {uid}:{gid}: {e}", p.display()),
                    )
                })?;
            }
        }
    }
    Ok(())
}

fn pipe() -> VResult<(File, File)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| verr(ttrpc::Code::INTERNAL, format!("pipe: {e}")))?;
    Ok((File::from(r), File::from(w)))
}

/// Pipes for a process: the engine's Stdio and our ends.
fn make_stdio(stdin: bool) -> VResult<(Stdio, Option<File>, File, File)> {
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (stdin_fd, stdin_w) = if stdin {
        let (r, w) = pipe()?;
        (Some(OwnedFd::from(r)), Some(w))
    } else {
        (None, None)
    };
    let stdio = Stdio {
        stdin: stdin_fd,
        stdout: Some(OwnedFd::from(out_w)),
        stderr: Some(OwnedFd::from(err_w)),
    };
    Ok((stdio, stdin_w, out_r, err_r))
}

/// A process with a terminal: its output is what the pty master reads (stdout; stderr is empty,
/// at EOF), stdin writes go to the master. A read error (EIO once the last slave closes) is EOF.
fn new_tty_proc(pid: i32, master: OwnedFd, what: &str) -> VResult<Arc<Proc>> {
    let master = File::from(master);
    let dup = |f: &File| {
        f.try_clone().map_err(|e| {
            verr(
                ttrpc::Code::INTERNAL,
                format!("{what}: dup pty master: {e}"),
            )
        })
    };
    let (reader, writer) = (dup(&master)?, dup(&master)?);
    let p = Arc::new(Proc {
        pid,
        console: Some(master),
        stdin: Mutex::new(Some(writer)),
        stdout: Arc::default(),
        stderr: Arc::default(),
        exit: Mutex::new(None),
    });
    p.stdout.spawn_reader(reader);
    p.stderr.close();
    Ok(p)
}

/// The process's stdio: a terminal when the engine made one, else the pipes.
fn proc_for(
    spawned: tandem_oci::Spawned,
    stdin: Option<File>,
    out: File,
    err: File,
    what: &str,
) -> VResult<Arc<Proc>> {
    match spawned.console {
        Some(master) => new_tty_proc(spawned.pid, master, what),
        None => Ok(new_proc(spawned.pid, stdin, out, err)),
    }
}

/// Set the window size of a pty master.
fn set_winsize(master: &File, width: u32, height: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
    let ws = libc::winsize {
        ws_row: clamp(height),
        ws_col: clamp(width),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, valid for the call.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn new_proc(pid: i32, stdin: Option<File>, out: File, err: File) -> Arc<Proc> {
    let p = Arc::new(Proc {
        pid,
        console: None,
        stdin: Mutex::new(stdin),
        stdout: Arc::default(),
        stderr: Arc::default(),
        exit: Mutex::new(None),
    });
    p.stdout.spawn_reader(out);
    p.stderr.spawn_reader(err);
    p
}

impl Containers {
    /// `root` is normally `/run/tandem`; `init_exe` the agent itself (`/proc/self/exe`).
    pub fn new(root: &Path, init_exe: &Path, cgroup_root: &Path, reaper: Reaper) -> Self {
        let mut cfg = EngineConfig::new(root.join("state"), init_exe);
        cfg.cgroup_root = cgroup_root.to_path_buf();
        Self {
            engine: Engine::new(cfg),
            bundles: root.join("bundles"),
            reaper,
            entries: Mutex::new(HashMap::new()),
            pod_userns: Default::default(),
            pod_net: Default::default(),
            pod_shm: Default::default(),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `pid` is the init of a container of this agent that has not exited (a namespace
    /// path `/proc/<pid>/ns/…` may name it, crate::podshare).
    fn live_init(&self, pid: i32) -> bool {
        self.entries().values().any(|e| e.init.pid == pid)
            && self.reaper.wait(pid, Duration::ZERO).is_none()
    }

    fn proc_of(&self, id: &str, exec_id: &str) -> VResult<Arc<Proc>> {
        let entries = self.entries();
        let e = entries
            .get(id)
            .ok_or_else(|| verr(ttrpc::Code::NOT_FOUND, format!("container {id}: not found")))?;
        if exec_id.is_empty() {
            return Ok(Arc::clone(&e.init));
        }
        e.execs.get(exec_id).cloned().ok_or_else(|| {
            verr(
                ttrpc::Code::NOT_FOUND,
                format!("container {id}: exec {exec_id}: not found"),
            )
        })
    }

    /// Make the bundle (rootfs mounts + config.json) and create the container; its process
    /// waits for StartContainer. On error nothing is left (mounts, bundle dir, engine state).
    pub fn create(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: &[MountReq],
        stdin: bool,
    ) -> VResult<i32> {
        self.create_with_files(id, spec_json, rootfs, &[], stdin)
    }

    /// [`Containers::create`], with `files` written under `<bundle>/files` first.
    pub fn create_with_files(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: &[MountReq],
        files: &[FileReq],
        stdin: bool,
    ) -> VResult<i32> {
        self.create_with_shared(id, spec_json, rootfs, files, &[], stdin)
    }

    /// [`Containers::create_with_files`], with the pod's shared tmpfs mounts `shm` made (or
    /// joined) first (crate::podshare; the spec binds them from their guest paths).
    pub fn create_with_shared(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: &[MountReq],
        files: &[FileReq],
        shm: &[crate::podshare::ShmReq],
        stdin: bool,
    ) -> VResult<i32> {
        validate_id("container", id)?;
        validate_files(files).map_err(|e| verr(e.code, format!("container {id}: {}", e.msg)))?;
        crate::podshare::validate_shm(shm, crate::podshare::guest_ram()).map_err(|e| {
            verr(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("container {id}: {e}"),
            )
        })?;
        if self.entries().contains_key(id) {
            return Err(verr(
                ttrpc::Code::ALREADY_EXISTS,
                format!("container {id}: already exists"),
            ));
        }
        let spec: tandem_oci::Spec = serde_json::from_slice(spec_json).map_err(|e| {
            verr(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("container {id}: config.json: {e}"),
            )
        })?;
        crate::podshare::check_ns_paths(&spec, |pid| self.live_init(pid)).map_err(|e| {
            verr(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("container {id}: {e}"),
            )
        })?;
        let userns = self.userns_for(id, &spec, rootfs)?;
        self.pod_netns_for(id, &spec)?;
        let bundle = self.bundles.join(id);
        std::fs::create_dir_all(&self.bundles).map_err(|e| {
            verr(
                ttrpc::Code::INTERNAL,
                format!("mkdir {}: {e}", self.bundles.display()),
            )
        })?;
        std::fs::create_dir(&bundle).map_err(|e| {
            verr(
                ttrpc::Code::ALREADY_EXISTS,
                format!("bundle {}: {e}", bundle.display()),
            )
        })?;
        let mut mounts = Vec::new();
        let result = (|| {
            self.pod_shm.acquire(id, shm).map_err(|e| {
                verr(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("container {id}: {e}"),
                )
            })?;
            write_files(&bundle, files)
                .map_err(|e| verr(e.code, format!("container {id}: {}", e.msg)))?;
            if let Some((_, Some(root))) = &userns {
                own_files(&bundle, files, *root)
                    .map_err(|e| verr(e.code, format!("container {id}: {}", e.msg)))?;
            }
            for m in rootfs {
                let target = inside(&bundle, &m.target)?;
                std::fs::create_dir_all(&target).map_err(|e| {
                    verr(
                        ttrpc::Code::INTERNAL,
                        format!("mkdir {}: {e}", target.display()),
                    )
                })?;
                if m.fstype == "overlay" {
                    make_overlay_dirs(&bundle, &m.options)?;
                    if let Some((_, Some(root))) = &userns {
                        own_upper_dir(&bundle, &m.options, *root)?;
                    }
                }
                let (flags, data) = parse_options(&m.options);
                let fstype = (m.fstype != "bind").then_some(m.fstype.as_str());
                if m.fstype == "virtiofs" {
                    // the pod's shared dir (crate::volumes), its device maybe just hot-added
                    let modules = Path::new("/lib/modules").join(crate::guest::kernel_release());
                    crate::volumes::load_virtiofs(&modules)
                        .and_then(|()| {
                            crate::volumes::mount_virtiofs(
                                &m.source,
                                &target,
                                flags,
                                &data,
                                crate::volumes::VIRTIOFS_WAIT,
                            )
                        })
                        .map_err(|e| {
                            verr(
                                ttrpc::Code::INVALID_ARGUMENT,
                                format!("container {id}: {e}"),
                            )
                        })?;
                    mounts.push(target);
                    continue;
                }
                let source = resolve_source(Path::new("/sys/block"), "/dev", &m.source, DISK_WAIT)?;
                let deadline = std::time::Instant::now() + DISK_WAIT;
                let do_mount = || {
                    mount(
                        Some(source.as_str()),
                        &target,
                        fstype,
                        flags,
                        (!data.is_empty()).then_some(data.as_str()),
                    )
                };
                let mut r = do_mount();
                // a just-attached disk may not open yet (ENXIO until the driver's probe ends)
                while matches!(r, Err(nix::errno::Errno::ENXIO | nix::errno::Errno::ENODEV))
                    && m.source.starts_with("serial:")
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(20));
                    r = do_mount();
                }
                r.map_err(|e| {
                    verr(
                        ttrpc::Code::INVALID_ARGUMENT,
                        format!(
                            "container {id}: mount {} {} on {}: {e}",
                            m.fstype,
                            m.source,
                            target.display()
                        ),
                    )
                })?;
                mounts.push(target);
                if let (true, Some((Some(ns), root))) =
                    (m.options.iter().any(|o| o == "idmap"), &userns)
                {
                    idmap_layer(id, mounts.last().expect("just pushed"), ns, *root)?;
                }
            }
            let config = serde_json::to_vec(&spec).map_err(|e| {
                verr(
                    ttrpc::Code::INTERNAL,
                    format!("container {id}: serialize spec: {e}"),
                )
            })?;
            std::fs::write(bundle.join("config.json"), config).map_err(|e| {
                verr(
                    ttrpc::Code::INTERNAL,
                    format!("write {}/config.json: {e}", bundle.display()),
                )
            })?;
            tracing::info!(id, mounts = mounts.len(), "rootfs mounted");
            let (stdio, stdin_w, out_r, err_r) = make_stdio(stdin)?;
            let (container, spawned) = {
                let mut table = self.reaper.lock();
                let (c, s) = self
                    .engine
                    .create(CreateRequest {
                        id,
                        bundle: &bundle,
                        stdio,
                    })
                    .map_err(|e| engine_err("CreateContainer", id, e))?;
                table.track(s.pid);
                (c, s)
            };
            let pid = spawned.pid;
            let init = proc_for(spawned, stdin_w, out_r, err_r, &format!("container {id}"))?;
            Ok((container, pid, init))
        })();
        match result {
            Ok((container, pid, init)) => {
                self.entries().insert(
                    id.to_string(),
                    Entry {
                        container,
                        bundle,
                        mounts,
                        init,
                        execs: HashMap::new(),
                    },
                );
                Ok(pid)
            }
            Err(e) => {
                unmount_all(&mounts);
                let _ = std::fs::remove_dir_all(&bundle);
                self.pod_shm.release(id);
                Err(e)
            }
        }
    }

    pub fn start(&self, id: &str) -> VResult<i32> {
        let entries = self.entries();
        let e = entries
            .get(id)
            .ok_or_else(|| verr(ttrpc::Code::NOT_FOUND, format!("container {id}: not found")))?;
        e.container
            .start()
            .map_err(|err| engine_err("StartContainer", id, err))?;
        Ok(e.init.pid)
    }

    pub fn exec(&self, id: &str, exec_id: &str, process_json: &[u8], stdin: bool) -> VResult<i32> {
        validate_id("exec", exec_id)?;
        let process: tandem_oci::Process = serde_json::from_slice(process_json).map_err(|e| {
            verr(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("container {id}: exec {exec_id}: process: {e}"),
            )
        })?;
        let mut entries = self.entries();
        let e = entries
            .get_mut(id)
            .ok_or_else(|| verr(ttrpc::Code::NOT_FOUND, format!("container {id}: not found")))?;
        if e.execs.contains_key(exec_id) {
            return Err(verr(
                ttrpc::Code::ALREADY_EXISTS,
                format!("container {id}: exec {exec_id}: already exists"),
            ));
        }
        let (stdio, stdin_w, out_r, err_r) = make_stdio(stdin)?;
        let spawned = {
            let mut table = self.reaper.lock();
            let s = e
                .container
                .exec(exec_id, &process, stdio)
                .map_err(|err| engine_err("ExecProcess", id, err))?;
            table.track(s.pid);
            s
        };
        let pid = spawned.pid;
        let what = format!("container {id}: exec {exec_id}");
        e.execs.insert(
            exec_id.to_string(),
            proc_for(spawned, stdin_w, out_r, err_r, &what)?,
        );
        Ok(pid)
    }

    pub fn signal(&self, id: &str, exec_id: &str, signal: i32, all: bool) -> VResult<()> {
        if !(1..=64).contains(&signal) {
            return Err(verr(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("signal {signal}: out of range"),
            ));
        }
        if exec_id.is_empty() {
            let entries = self.entries();
            let e = entries.get(id).ok_or_else(|| {
                verr(ttrpc::Code::NOT_FOUND, format!("container {id}: not found"))
            })?;
            return e
                .container
                .kill(signal, all)
                .map_err(|err| engine_err("SignalProcess", id, err));
        }
        let p = self.proc_of(id, exec_id)?;
        if p.exit.lock().unwrap_or_else(|x| x.into_inner()).is_some() {
            return Err(verr(
                ttrpc::Code::NOT_FOUND,
                format!("container {id}: exec {exec_id}: already exited"),
            ));
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.pid),
            nix::sys::signal::Signal::try_from(signal).map_err(|e| {
                verr(
                    ttrpc::Code::INVALID_ARGUMENT,
                    format!("signal {signal}: {e}"),
                )
            })?,
        )
        .map_err(|e| {
            verr(
                ttrpc::Code::INTERNAL,
                format!("container {id}: exec {exec_id}: kill: {e}"),
            )
        })
    }

    /// Exit status (code or 128+signal) and time; waits at most `timeout`.
    pub fn wait(&self, id: &str, exec_id: &str, timeout: Duration) -> VResult<(i32, i64)> {
        let p = self.proc_of(id, exec_id)?;
        if let Some((exit, at)) = *p.exit.lock().unwrap_or_else(|x| x.into_inner()) {
            return Ok((exit.status(), at));
        }
        let exit = self.reaper.wait(p.pid, timeout).ok_or_else(|| {
            verr(
                ttrpc::Code::DEADLINE_EXCEEDED,
                format!(
                    "container {id}: process {} still running after {timeout:?}",
                    p.pid
                ),
            )
        })?;
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let mut slot = p.exit.lock().unwrap_or_else(|x| x.into_inner());
        let (exit, at) = *slot.get_or_insert((exit, at));
        Ok((exit.status(), at))
    }

    pub fn read(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
        max: usize,
        wait: Duration,
    ) -> VResult<(Vec<u8>, bool)> {
        let p = self.proc_of(id, exec_id)?;
        let s = if stderr { &p.stderr } else { &p.stdout };
        Ok(s.read(max.clamp(1, MAX_READ), wait))
    }

    pub fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> VResult<usize> {
        let p = self.proc_of(id, exec_id)?;
        let mut g = p.stdin.lock().unwrap_or_else(|x| x.into_inner());
        let w = g.as_mut().ok_or_else(|| {
            verr(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("container {id}: no stdin open"),
            )
        })?;
        w.write_all(data).map_err(|e| {
            verr(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("container {id}: write stdin: {e}"),
            )
        })?;
        Ok(data.len())
    }

    /// Set the window size of the process's terminal.
    pub fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> VResult<()> {
        let p = self.proc_of(id, exec_id)?;
        let what = if exec_id.is_empty() {
            format!("container {id}")
        } else {
            format!("container {id}: exec {exec_id}")
        };
        let master = p.console.as_ref().ok_or_else(|| {
            verr(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("{what}: the process has no terminal"),
            )
        })?;
        set_winsize(master, width, height).map_err(|e| {
            verr(
                ttrpc::Code::INTERNAL,
                format!("{what}: resize pty to {width}x{height}: {e}"),
            )
        })
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> VResult<()> {
        let p = self.proc_of(id, exec_id)?;
        p.stdin.lock().unwrap_or_else(|x| x.into_inner()).take();
        Ok(())
    }

    pub fn with<T>(
        &self,
        verb: &str,
        id: &str,
        f: impl FnOnce(&tandem_oci::Container) -> tandem_oci::Result<T>,
    ) -> VResult<T> {
        let entries = self.entries();
        let e = entries
            .get(id)
            .ok_or_else(|| verr(ttrpc::Code::NOT_FOUND, format!("container {id}: not found")))?;
        f(&e.container).map_err(|err| engine_err(verb, id, err))
    }

    /// Apply new resources (OCI LinuxResources JSON, at most [`MAX_RESOURCES_JSON`] bytes) to
    /// the container's cgroup through the engine.
    pub fn update(&self, id: &str, resources_json: &[u8]) -> VResult<()> {
        if resources_json.len() > MAX_RESOURCES_JSON {
            return Err(verr(
                ttrpc::Code::INVALID_ARGUMENT,
                format!(
                    "container {id}: resources: {} bytes, more than the {MAX_RESOURCES_JSON} allowed",
                    resources_json.len()
                ),
            ));
        }
        let res: tandem_oci::LinuxResources =
            serde_json::from_slice(resources_json).map_err(|e| {
                verr(
                    ttrpc::Code::INVALID_ARGUMENT,
                    format!("container {id}: resources (LinuxResources JSON): {e}"),
                )
            })?;
        self.with("UpdateContainer", id, |c| c.update(&res))
    }

    /// Delete the container (the engine kills what is left), unmount its rootfs, remove the bundle.
    pub fn remove(&self, id: &str) -> VResult<()> {
        let mut entries = self.entries();
        let e = entries
            .get(id)
            .ok_or_else(|| verr(ttrpc::Code::NOT_FOUND, format!("container {id}: not found")))?;
        e.container
            .delete()
            .map_err(|err| engine_err("RemoveContainer", id, err))?;
        let e = entries.remove(id).expect("present above");
        self.reaper.forget(e.init.pid);
        for p in e.execs.values() {
            self.reaper.forget(p.pid);
        }
        unmount_all(&e.mounts);
        self.pod_shm.release(id);
        std::fs::remove_dir_all(&e.bundle).map_err(|err| {
            verr(
                ttrpc::Code::INTERNAL,
                format!("remove {}: {err}", e.bundle.display()),
            )
        })
    }
}

fn unmount_all(mounts: &[PathBuf]) {
    for m in mounts.iter().rev() {
        if let Err(e) = umount2(m, MntFlags::MNT_DETACH) {
            tracing::warn!("umount {}: {e}", m.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_serial_sources_resolve_through_sysfs() {
        let sys = tempfile::tempdir().unwrap();
        let devs = tempfile::tempdir().unwrap();
        let d = devs.path().to_str().unwrap();
        for (dev, serial, size) in [
            ("vda", "layer0\n", "4096\n"),
            ("vdb", "c1-rw", "8"),
            ("vdc", "late", "0"),
        ] {
            std::fs::create_dir_all(sys.path().join(dev)).unwrap();
            std::fs::write(sys.path().join(dev).join("serial"), serial).unwrap();
            std::fs::write(sys.path().join(dev).join("size"), size).unwrap();
            std::fs::write(devs.path().join(dev), b"").unwrap();
        }
        let w = Duration::from_millis(50);
        let r = |src: &str| resolve_source(sys.path(), d, src, w);
        assert_eq!(r("serial:layer0").unwrap(), format!("{d}/vda"));
        assert_eq!(r("serial:c1-rw").unwrap(), format!("{d}/vdb"));
        assert_eq!(r("tmpfs").unwrap(), "tmpfs");
        let e = r("serial:nope").unwrap_err();
        assert_eq!(e.code, ttrpc::Code::NOT_FOUND);
        assert!(e.msg.contains("nope"), "{}", e.msg);
        // no size yet, or no device node yet: not ready
        assert!(r("serial:late").is_err());
        std::fs::remove_file(devs.path().join("vda")).unwrap();
        assert!(r("serial:layer0").is_err());
        let e = r("serial:../x").unwrap_err();
        assert_eq!(e.code, ttrpc::Code::INVALID_ARGUMENT);
    }

    #[test]
    fn files_are_checked_and_written_inside_the_bundle() {
        let f = |path: &str, n: usize, mode: u32| FileReq {
            path: path.into(),
            content: vec![b'x'; n],
            mode,
        };
        let ok = [f("0-etc-hosts", 10, 0o644), f("sub/resolv.conf", 3, 0o600)];
        validate_files(&ok).unwrap();
        let cases: Vec<(Vec<FileReq>, &str)> = vec![
            (vec![f("../x", 1, 0o644)], "\"../x\""),
            (vec![f("/etc/passwd", 1, 0o644)], "/etc/passwd"),
            (vec![f("", 1, 0o644)], "\"\""),
            (vec![f("a", MAX_FILE_BYTES + 1, 0o644)], "65537 bytes"),
            (vec![f("a", 1, 0o10644)], "10644"),
            (vec![f("a", 1, 0o644), f("a", 2, 0o600)], "given twice"),
            (vec![f("./a", 1, 0o644)], "\"./a\""),
            (
                (0..5)
                    .map(|i| f(&i.to_string(), MAX_FILE_BYTES, 0o644))
                    .collect(),
                "in all",
            ),
            (
                (0..=MAX_FILES)
                    .map(|i| f(&i.to_string(), 1, 0o644))
                    .collect(),
                "at most 64",
            ),
        ];
        for (files, want) in cases {
            let e = validate_files(&files).unwrap_err();
            assert_eq!(e.code, ttrpc::Code::INVALID_ARGUMENT);
            assert!(e.msg.contains(want), "{want}: {}", e.msg);
        }
        let t = tempfile::tempdir().unwrap();
        write_files(t.path(), &ok).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let hosts = t.path().join("files/0-etc-hosts");
        assert_eq!(std::fs::read(&hosts).unwrap(), b"xxxxxxxxxx");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&hosts), 0o644);
        assert_eq!(mode(&t.path().join("files/sub/resolv.conf")), 0o600);
        // never over an existing file (nor through a symlink)
        let e = write_files(t.path(), &ok[..1]).unwrap_err();
        assert!(e.msg.contains("0-etc-hosts"), "{}", e.msg);
    }

    #[test]
    fn ids_are_checked() {
        assert!(validate_id("container", "abc-1_2.x").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            let e = validate_id("container", bad).unwrap_err();
            assert_eq!(e.code, ttrpc::Code::INVALID_ARGUMENT);
        }
    }

    #[test]
    fn mount_targets_stay_inside() {
        let b = Path::new("/run/tandem/bundles/c1");
        assert_eq!(inside(b, "rootfs").unwrap(), b.join("rootfs"));
        for bad in ["", "/etc", "../x", "rootfs/../../x", "./rootfs"] {
            assert!(inside(b, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn overlay_dirs_are_made_inside_the_bundle_only() {
        let t = tempfile::tempdir().unwrap();
        let b = t.path().join("bundle");
        let up = format!("upperdir={}/rw/upper", b.display());
        let work = format!("workdir={}/rw/work", b.display());
        make_overlay_dirs(&b, &["lowerdir=/x".into(), up, work]).unwrap();
        assert!(b.join("rw/upper").is_dir() && b.join("rw/work").is_dir());
        for bad in [
            "upperdir=/etc/x".to_string(),
            format!("workdir={}/../escape", b.display()),
        ] {
            let e = make_overlay_dirs(&b, std::slice::from_ref(&bad)).unwrap_err();
            assert_eq!(e.code, ttrpc::Code::INVALID_ARGUMENT, "{bad}");
        }
        assert!(!t.path().join("escape").exists());
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let (f, d) = parse_options(&[
            "ro".into(),
            "lowerdir=/a:/b".into(),
            "nodev".into(),
            "upperdir=/u".into(),
        ]);
        assert!(f.contains(MsFlags::MS_RDONLY | MsFlags::MS_NODEV));
        assert_eq!(d, "lowerdir=/a:/b,upperdir=/u");
    }

    #[test]
    fn stream_is_bounded_and_reports_eof() {
        let (r, mut w) = pipe().unwrap();
        let s: Arc<Stream> = Arc::default();
        s.spawn_reader(r);
        w.write_all(b"hello world").unwrap();
        drop(w);
        let (d, _) = s.read(5, Duration::from_secs(5));
        assert_eq!(d, b"hello");
        let mut rest = Vec::new();
        loop {
            let (d, eof) = s.read(100, Duration::from_secs(5));
            rest.extend(d);
            if eof {
                break;
            }
        }
        assert_eq!(rest, b" world");
    }
}
