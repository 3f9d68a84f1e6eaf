//! tandem-oci: tandem's Linux container engine.
//!
//! In: an OCI bundle (`config.json` + rootfs) and a state root. Out: a running process.
//! Synchronous, no tokio and no containerd types, so that the guest agent links the same engine.
//!
//! # Process model
//! The engine never forks the (possibly multi-threaded) caller. [`Engine::create`] and
//! [`Container::exec`] spawn `init_exe` (the caller's own binary, normally `/proc/self/exe`) with
//! the single argument [`INIT_ARG`]; that fresh, single-threaded process must call [`init_main`]
//! first thing in `main()`. It sets up namespaces, cgroups, rootfs and the process, reports the
//! container process's pid (and pty master, for a terminal) back over a socketpair, and the
//! container process waits for [`Container::start`] before it execs the user's program.
//!
//! Exit statuses are NOT collected by the engine: the container process is re-parented to the
//! caller, which must be a child subreaper (`PR_SET_CHILD_SUBREAPER`) and reap with
//! `waitpid(-1)`. The engine never relies on `waitpid` of its helper processes (it tolerates
//! `ECHILD` when the caller's reaper got there first); success and errors come over the socket.
//!
//! # The contract (shared with the shim; change both sides together)
//! ```ignore
//! let engine = Engine::new(EngineConfig::new("/run/tandem/default", "/proc/self/exe"));
//! let (container, spawned) = engine.create(CreateRequest { id, bundle, stdio })?; // process waits
//! container.start()?;                                  // the user's program is exec'd now
//! let exec = container.exec("exec-id", &process_spec, stdio)?; // extra process, same namespaces
//! container.kill(libc::SIGTERM, /*all=*/ false)?;
//! container.pause()?; container.resume()?;
//! let stats = container.stats()?; container.update(&resources)?; let pids = container.pids()?;
//! container.delete()?;                                 // kills leftovers, removes cgroups + state
//! // after a crash of the caller: engine.load(id)?.delete()?
//! ```

//!
//! # How it works
//! * `create` validates `config.json` ([`spec`]), writes `<state_root>/<id>/state.json`
//!   ([`state`]) and an exec fifo there, makes the cgroup(s) and applies the resources
//!   ([`cgroups`]), then spawns `init_exe INIT_ARG` with a SOCK_SEQPACKET socketpair and a memfd
//!   holding its configuration. The engine moves the init into the cgroups and lets it go.
//! * The init joins (`setns`) and creates (`unshare`) the namespaces (a new user namespace asks
//!   the engine to write its uid/gid maps), then forks with `CLONE_PARENT`: the container
//!   process is pid 1 of the new pid namespace and a direct child of the caller. The intermediate
//!   reports that pid and exits.
//! * The container process sets up the rootfs ([`rootfs`]: mounts, devices, pivot_root, masked
//!   and read-only paths), the pty, hostname, sysctls, rlimits, no_new_privs, seccomp
//!   ([`seccomp`]), user, capabilities, cwd, resolves the program in `PATH`, reports ready, then
//!   blocks opening the exec fifo for writing. [`Container::start`] (any process) opens it for
//!   reading; the container execs. Errors before that come back as [`Error::Init`].
//! * `exec` spawns the init the same way; it joins `/proc/<pid>/ns/*` of the container's init,
//!   forks into the pid namespace and execs at once; exec errors come back synchronously.
//!
//! # User namespaces and idmapped mounts
//! A container with a new user namespace (`linux.namespaces` has `user` without a path) needs
//! `linux.uidMappings` and `linux.gidMappings`; they are checked at create (size > 0, no
//! overflow past 4294967294, no overlapping container or host ranges, at most 340 lines) and
//! so are the mappings of mounts. Capabilities of the spec then count inside that namespace
//! only: e.g. CAP_NET_ADMIN configures the container's own network namespace, not the host's.
//!
//! Idmapped mounts (`open_tree(OPEN_TREE_CLONE)` + `mount_setattr(MOUNT_ATTR_IDMAP)`, attached
//! with `move_mount`) are made by the init while it is still host root, before it enters any
//! namespace, with a helper user namespace that has the wanted mapping:
//! * **rootfs**, automatic, no API: when the container gets a new user namespace and the
//!   rootfs directory is *not* owned by the host IDs that the container's root maps to (i.e.
//!   it is an ordinary image owned by host root, not a chown'ed copy), the rootfs is idmapped
//!   with the container's mapping: image files owned by host root appear owned by root inside.
//!   overlayfs itself cannot be idmapped, so an overlay rootfs (containerd's snapshot) is
//!   rebuilt as a new overlay on idmapped layers (lower dirs and the upper/work mount, passed
//!   by fd: Linux 6.13+), created with the container root's host IDs as overlay creator so that
//!   new files land in the upper dir owned as without a user namespace (on-disk 0).
//! * **mounts** (bind mounts only): `uidMappings`/`gidMappings` on a mount are honoured as
//!   given (runtime-spec 1.1; no user namespace needed); the option `idmap` (or `ridmap`,
//!   recursive) without mappings uses the container's mapping. This is what Kubernetes does
//!   for `hostUsers: false` volumes: files keep the ownership they have on the host (a host
//!   root file is root's inside; the container's root writes files owned by host root). A
//!   plain bind mount is not idmapped: host IDs outside the mapping appear as the overflow
//!   ID 65534 (a 0600 host-root file is unreadable) and the container's root writes as its
//!   mapped host ID (e.g. 100000).
//! * A filesystem or kernel that cannot idmap fails create with an error naming the path,
//!   the filesystem type and the reason.
//!
//! Cgroups: v1, pure v2 and hybrid (v1 controllers plus `unified` cgroup2 with e.g. hugetlb),
//! cgroupfs-style paths only. On v2 the device rules are an eBPF program
//! ([`cgroups::devices_bpf`]), attached at create (update does not replace it).
//!
//! Not supported (ignored with a warning): hooks, intelRdt, personality, process.scheduler and
//! ioPriority; apparmor and selinux labels are ignored. Rejected with an error: systemd cgroup
//! paths, idmapped mounts of non-bind mounts, `SCMP_ACT_NOTIFY`.
//!
//! The crate ships `tandem-oci-init`, a minimal binary that only calls [`init_main`]; its
//! integration tests use it as `init_exe`.

// Module layout (one concern per file): spec (load + validate), state (on disk), cgroups/{mod,
// v1, v2, devices_bpf}, rootfs (mounts, devices, pivot_root), capabilities, seccomp, sync
// (socket protocol), idmap (idmapped mounts), process (engine side of spawn), init (the
// re-executed child: namespaces, tty, rlimits, user, exec), container (Engine and Container
// methods).

mod capabilities;
pub mod cgroups;
mod container;
pub mod idmap;
mod init;
mod process;
pub mod rootfs;
pub mod seccomp;
pub mod spec;
pub mod state;
mod sync;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

pub use oci_spec::runtime::{LinuxResources, Process, Spec};

/// Errors of the engine. Every message names the thing (path, id, field, value).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("container {0}: already exists")]
    Exists(String),
    #[error("container {0}: not found")]
    NotFound(String),
    #[error("bundle {path}: {msg}")]
    Bundle { path: PathBuf, msg: String },
    #[error("config.json: invalid {field}: {msg}")]
    Spec { field: String, msg: String },
    #[error("cgroup {path}: {msg}")]
    Cgroup { path: PathBuf, msg: String },
    #[error("container {id}: {msg}")]
    Container { id: String, msg: String },
    /// An error reported by the container's init before the user's program was exec'd.
    #[error("container init: {0}")]
    Init(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where the engine keeps its state and what it re-executes.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Directory for on-disk container state, e.g. `/run/tandem/<namespace>`; one sub-directory
    /// per container id.
    pub state_root: PathBuf,
    /// Binary re-executed with [`INIT_ARG`] to become the container's init (`/proc/self/exe`).
    pub init_exe: PathBuf,
    /// Root of the cgroup filesystems, normally `/sys/fs/cgroup` (a parameter so that unit tests
    /// run against a fake tree).
    pub cgroup_root: PathBuf,
}

impl EngineConfig {
    pub fn new(state_root: impl Into<PathBuf>, init_exe: impl Into<PathBuf>) -> Self {
        Self {
            state_root: state_root.into(),
            init_exe: init_exe.into(),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        }
    }
}

/// The file descriptors that become fds 0, 1, 2 of a container process. `None` means
/// `/dev/null`. Ignored when the process asks for a terminal (`process.terminal`): then the
/// engine makes a pty inside the container and returns its master in [`Spawned::console`].
#[derive(Debug, Default)]
pub struct Stdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// What a create or exec started.
#[derive(Debug)]
pub struct Spawned {
    /// Host pid of the container process (the one that will exec the user's program).
    pub pid: i32,
    /// The pty master, when the process asked for a terminal.
    pub console: Option<OwnedFd>,
}

/// A request to create a container from a bundle.
#[derive(Debug)]
pub struct CreateRequest<'a> {
    pub id: &'a str,
    /// The bundle directory (holds `config.json`; `root.path` is resolved against it). The caller
    /// has already mounted containerd's rootfs mounts at the root path.
    pub bundle: &'a Path,
    pub stdio: Stdio,
}

/// Status of a container as the engine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Status {
    /// Created, waiting for `start`.
    Created,
    Running,
    Paused,
    Stopped,
}

/// Resource usage read from the container's cgroup(s). Fields the hierarchy does not provide
/// are zero.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub cpu: CpuStats,
    pub memory: MemoryStats,
    pub pids: PidsStats,
    pub hugetlb: Vec<HugetlbStats>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CpuStats {
    pub usage_total_ns: u64,
    pub usage_user_ns: u64,
    pub usage_kernel_ns: u64,
    pub nr_periods: u64,
    pub nr_throttled: u64,
    pub throttled_time_ns: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemoryStats {
    pub usage_bytes: u64,
    pub max_usage_bytes: u64,
    pub limit_bytes: u64,
    pub cache_bytes: u64,
    pub rss_bytes: u64,
    pub failcnt: u64,
    pub oom_kills: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PidsStats {
    pub current: u64,
    pub limit: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct HugetlbStats {
    /// As in OCI `hugepageLimits`: "2MB", "1GB".
    pub page_size: String,
    pub usage_bytes: u64,
    pub max_usage_bytes: u64,
    pub failcnt: u64,
}

/// The container engine of one state root.
#[derive(Debug, Clone)]
pub struct Engine {
    config: EngineConfig,
}

impl Engine {
    pub fn new(config: EngineConfig) -> Self {
        Self { config }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }
}

/// One container: its init process, namespaces, cgroup(s) and on-disk state.
#[derive(Debug)]
pub struct Container {
    state: state::State,
    dir: PathBuf,
    cgroup: Option<cgroups::Cgroup>,
    init_exe: PathBuf,
}

/// The single argument with which `init_exe` is re-executed to become a container's init.
pub const INIT_ARG: &str = "__tandem_init";

/// Entry point of the re-executed binary. Call first thing in `main()` when
/// `std::env::args().nth(1) == Some(INIT_ARG)`. Never returns.
pub fn init_main() -> ! {
    init::main()
}
