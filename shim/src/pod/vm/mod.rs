//! VmPod: the pod is one VM (QEMU through the `tandem_vmm::Hypervisor` seam); its containers run
//! inside it, created by the guest agent with tandem-oci. The first container created (the CRI
//! sandbox, or the lone container of a `ctr run`) boots the VM, sized from its spec
//! ([`topology`]); the last one deleted stops it.
//!
//! Rootfs: every read-only layer becomes an erofs image (cached per committed snapshot,
//! [`layers`]) hot-added as a read-only virtio-blk disk; the agent stacks them with overlay over a
//! tmpfs in the guest. The guest's spec is rewritten from the host's ([`spec`]).
//!
//! The guest is untrusted: the agent client bounds every call in time and checks every reply;
//! this module bounds the boot (`[vm] boot_timeout_s`) and never waits on the guest without a
//! limit. Long polls (WaitProcess, ReadStdout/ReadStderr) run on threads of their own, never on
//! tokio's few blocking threads.
//!
//! What is made is recorded first, in `<state dir>/vm+<pod>.json` (run dir, QEMU pid once known,
//! containers), so that `containerd-shim-tandem-v2 delete` after a `kill -9` of the shim removes
//! it too ([`delete_after_crash`]). The QEMU pid is reported to containerd as every process's
//! pid (the guest's pids mean nothing on the host).

pub mod cgroup;
pub mod layers;
mod resize;
pub mod spec;
pub mod topology;
pub mod volumes;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tandem_agent::client::{AgentClient, Mount};
use tandem_oci::{LinuxResources, Stats};
use tandem_vmm::config::AgentChannel;
use tandem_vmm::qemu::{Accel as QemuAccel, Qemu, QemuConfig};
use tandem_vmm::{BootMode, Hypervisor, RunningVm, VmConfig};
use tokio::io::unix::AsyncFd;
use tokio::io::AsyncReadExt;
use tokio::sync::{oneshot, watch};

use super::{
    CreateOpts, Error, ExecOpts, ExitInfo, PidInfo, Pod, PodContext, PodEvent, ProcessState,
    Result, Status,
};
use crate::config::{Accel, Config, Hypervisor as HvKind, VmSection};
use crate::io::StdioPaths;
use crate::state::StateDir;

/// Kernel command line of the guest. `memhp_default_state=online`: hot-plugged memory blocks
/// are onlined by the kernel itself (the guest has no udev; the agent's OnlineCpuMem onlines
/// vCPUs and any block left offline). `numa=off`: the guest is one node (the host side binds
/// guest RAM to the pinned CPUs' node); without it the SRAT that `maxmem` brings makes the kernel
/// set memory up per NUMA node, ~5% more boot instructions (measured with `-icount`,
/// docs/vm-mode.md).
const CMDLINE: &str = "console=ttyS0 quiet panic=-1 numa=off memhp_default_state=online";
/// Where the agent keeps bundles (its layout, see vmm/agent/src/containers.rs).
const GUEST_BUNDLES: &str = "/run/tandem/bundles";
/// One WaitProcess long poll.
const WAIT_POLL: Duration = Duration::from_secs(10);
/// One ReadStdout/ReadStderr long poll.
const READ_POLL: Duration = Duration::from_secs(1);
const READ_CHUNK: u32 = 64 * 1024;
/// How long an exit waits for the process's output to be copied out.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// Consecutive failed agent calls after which a poll loop gives up.
const MAX_ERRORS: u32 = 50;
/// Exit status of every process of a VM that died under it (as if SIGKILLed).
pub const VM_GONE_STATUS: u32 = 137;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Other(format!("blocking task: {e}")))
}

fn agent_err(e: tandem_agent::Error) -> Error {
    let msg = e.to_string();
    if msg.contains("NOT_FOUND") {
        Error::NotFound(msg)
    } else if msg.contains("INVALID_ARGUMENT") {
        Error::InvalidArgument(msg)
    } else if msg.contains("ALREADY_EXISTS") {
        Error::AlreadyExists(msg)
    } else {
        Error::Other(msg)
    }
}

/// The resources of an update as the guest gets them: checked as the engine would (on the host,
/// before anything is sent), host-only fields stripped as in the guest spec, at most
/// `MAX_RESOURCES_JSON` bytes.
fn update_json(id: &str, resources: &LinuxResources) -> Result<Vec<u8>> {
    tandem_oci::spec::validate_resources(resources)
        .map_err(|e| Error::InvalidArgument(format!("container {id}: update: {e}")))?;
    let mut v = serde_json::to_value(resources)
        .map_err(|e| Error::InvalidArgument(format!("container {id}: update: {e}")))?;
    let removed = spec::strip_resources(&mut v);
    if !removed.is_empty() {
        tracing::info!(
            id,
            ?removed,
            "update: host-only resources not applied in the guest (the VM's own)"
        );
    }
    let json = serde_json::to_vec(&v).map_err(|e| Error::Other(e.to_string()))?;
    let max = tandem_agent::containers::MAX_RESOURCES_JSON;
    if json.len() > max {
        return Err(Error::InvalidArgument(format!(
            "container {id}: update: resources JSON of {} bytes, more than the {max} a VM container takes",
            json.len()
        )));
    }
    Ok(json)
}

fn is_timeout(e: &tandem_agent::Error) -> bool {
    matches!(e, tandem_agent::Error::Timeout { .. })
}

/// What the pod made, on disk before it is made.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub pod: String,
    pub shim_pid: u32,
    pub run_dir: PathBuf,
    /// QEMU's pid once started (0 before: then QEMU is found by its run dir).
    pub vmm_pid: u32,
    pub containers: Vec<String>,
    /// The pod's network namespace (CRI), written before taps are made in it.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// The taps and tc filters made in it.
    #[serde(default)]
    pub net: Option<crate::net::PodNetwork>,
    /// The pod's host cgroup the VMM runs in (relative to each hierarchy's root), written
    /// before it is made.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// The pod's virtio-fs daemon (directory volumes, [`volumes`]) once started, 0 before; its
    /// shared dir and the volume binds are under the run dir.
    #[serde(default)]
    pub virtiofsd_pid: u32,
    /// The VM's vCPUs and memory (MiB) as its VMM reported them after boot and after each
    /// hot-plug ([`resize`]); 0 before boot.
    #[serde(default)]
    pub vcpus: usize,
    #[serde(default)]
    pub memory_mib: u64,
}

/// Root of the host's cgroup hierarchies.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

fn record_path(state: &StateDir, pod: &str) -> PathBuf {
    // `+` is not allowed in containerd ids: no container's record is named like this
    state.path(&format!("vm+{pod}"))
}

fn save_record(state: &StateDir, r: &VmRecord) -> std::io::Result<()> {
    let path = record_path(state, &r.pod);
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".vm+{}.json.tmp", r.pod));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(r).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)
}

/// Remove what a record names: the VMM process (checked to be that VM's, whichever backend), the
/// taps, the pod cgroup, the run dir.
fn remove_recorded(r: &VmRecord) {
    let mut pids = tandem_vmm::vmms_in(&r.run_dir);
    if r.vmm_pid > 0 && !pids.contains(&r.vmm_pid) {
        pids.push(r.vmm_pid);
    }
    if r.virtiofsd_pid > 0 && !pids.contains(&r.virtiofsd_pid) {
        pids.push(r.virtiofsd_pid);
    }
    for pid in pids {
        match tandem_vmm::kill_recorded(pid, &r.run_dir) {
            Ok(true) => tracing::info!(pid, pod = r.pod, "killed the VM of a dead shim"),
            Ok(false) => {}
            Err(e) => tracing::warn!(pid, pod = r.pod, "kill VM: {e}"),
        }
    }
    if let Some(net) = &r.net {
        if let Err(e) = crate::net::teardown(net) {
            tracing::warn!(pod = r.pod, "{e}");
        }
    }
    if let Some(rel) = &r.cgroup {
        if let Err(e) = cgroup::remove_recorded(Path::new(CGROUP_ROOT), rel) {
            tracing::warn!(pod = r.pod, "{e}");
        }
    }
    // the volume binds and the shared dir's tmpfs first: never a recursive remove through them
    if let Err(e) = volumes::remove_run_dir(&r.run_dir) {
        tracing::warn!("remove {}: {e}", r.run_dir.display());
    }
}

/// The network namespace path of a spec (CRI gives the pod's; `ctr run` none).
fn netns_of(spec: &Value) -> Option<PathBuf> {
    spec["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// `delete` after the shim died: when a VM record of this namespace names `id` and its shim is
/// gone, stop the VM and remove its run dir; the record goes with its last container.
pub fn delete_after_crash(state: &StateDir, id: &str) {
    let probe = state.path("x");
    let Some(dir) = probe.parent() else { return };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("vm+") && name.ends_with(".json")) {
            continue;
        }
        let Ok(data) = std::fs::read(e.path()) else {
            continue;
        };
        let Ok(mut r) = serde_json::from_slice::<VmRecord>(&data) else {
            tracing::warn!("{}: not a VM record", e.path().display());
            continue;
        };
        if !r.containers.iter().any(|c| c == id) && r.pod != id {
            continue;
        }
        if r.shim_pid > 0 && Path::new(&format!("/proc/{}", r.shim_pid)).exists() {
            let comm =
                std::fs::read_to_string(format!("/proc/{}/comm", r.shim_pid)).unwrap_or_default();
            if comm.trim().starts_with("containerd-shim") {
                // the pod's shim lives: it owns the VM
                continue;
            }
        }
        remove_recorded(&r);
        r.containers.retain(|c| c != id);
        r.vmm_pid = 0;
        r.virtiofsd_pid = 0;
        r.net = None;
        r.cgroup = None;
        let res = if r.containers.is_empty() {
            std::fs::remove_file(e.path())
        } else {
            save_record(state, &r)
        };
        if let Err(err) = res {
            tracing::warn!("{}: {err}", e.path().display());
        }
    }
}

/// The erofs images of a container's layers, top first.
struct Images {
    images: Vec<PathBuf>,
    /// Images of private layers (in the run dir), removed with the container.
    private: Vec<PathBuf>,
    /// Shared locks on the cached images (see [`layers::CachedImage`]).
    locks: Vec<std::fs::File>,
}

/// Make (or find in the cache) the images of `plan`; private ones go to `<run_dir>/<id>-<i>.erofs`.
/// On error nothing private is left.
fn make_images(plan: &[layers::Layer], cache: &Path, run_dir: &Path, id: &str) -> Result<Images> {
    let mut m = Images {
        images: Vec::new(),
        private: Vec::new(),
        locks: Vec::new(),
    };
    for (i, l) in plan.iter().enumerate() {
        let own = run_dir.join(format!("{id}-{i}.erofs"));
        match layers::image(l, cache, &own) {
            Ok(img) => {
                if matches!(l, layers::Layer::Private(_)) {
                    m.private.push(img.path.clone());
                }
                m.locks.extend(img.lock);
                m.images.push(img.path);
            }
            Err(e) => {
                for p in &m.private {
                    let _ = std::fs::remove_file(p);
                }
                return Err(Error::Other(format!("container {id}: {e}")));
            }
        }
    }
    Ok(m)
}

/// `paths` without repeats, in first-seen order.
fn unique(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for p in paths {
        if !out.contains(p) {
            out.push(p.clone());
        }
    }
    out
}

/// The running VM of the pod.
struct Vm {
    agent: Arc<AgentClient>,
    running: Mutex<Option<Box<dyn RunningVm>>>,
    pid: u32,
    run_dir: PathBuf,
    dead: Arc<AtomicBool>,
    /// Attached layer images: image path -> (disk id, users).
    disks: Mutex<HashMap<PathBuf, (String, usize)>>,
    /// The pod network mirrored into the VM.
    net: Option<crate::net::PodNetwork>,
    /// The pod's host cgroup the VMM runs in.
    cgroup: Option<cgroup::PodCgroup>,
    /// The virtio-fs daemon of the pod's shared dir, started with the first directory volume.
    fs: Mutex<Option<tandem_vmm::qemu::virtiofs::Virtiofsd>>,
    /// Hot-plug sizing: the containers' asks and the VM's size ([`resize`]).
    size: Mutex<resize::PodSize>,
    /// Where TaskOOM goes ([`report_oom`]).
    events: tokio::sync::mpsc::UnboundedSender<PodEvent>,
    /// Per container: the guest's OOM kill count already reported.
    ooms: Mutex<HashMap<String, u64>>,
}

impl Vm {
    fn dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    fn console_tail(&self) -> String {
        console_tail(&self.run_dir)
    }

    /// Attach `image` read-only (once per VM); returns its disk id (the guest's serial).
    fn attach(&self, image: &Path) -> Result<String> {
        let mut disks = self.disks.lock().expect("disks poisoned");
        if let Some((id, n)) = disks.get_mut(image) {
            *n += 1;
            return Ok(id.clone());
        }
        let mut r = self.running.lock().expect("vm poisoned");
        let vm = r
            .as_mut()
            .ok_or_else(|| Error::FailedPrecondition("the pod's VM is stopped".into()))?;
        let id = vm
            .hot_add_disk(&tandem_vmm::DiskConfig {
                path: image.to_path_buf(),
                read_only: true,
            })
            .map_err(|e| Error::Other(format!("attach {}: {e}", image.display())))?;
        disks.insert(image.to_path_buf(), (id.clone(), 1));
        Ok(id)
    }

    /// Drop one use of `image`; the last one detaches the disk.
    fn detach(&self, image: &Path) {
        let mut disks = self.disks.lock().expect("disks poisoned");
        let Some((id, n)) = disks.get_mut(image) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        let id = id.clone();
        disks.remove(image);
        drop(disks);
        if self.dead() {
            return;
        }
        if let Some(vm) = self.running.lock().expect("vm poisoned").as_mut() {
            if let Err(e) = vm.hot_remove_disk(&id) {
                tracing::warn!(disk = id, "detach {}: {e}", image.display());
            }
        }
    }

    /// Stop QEMU and remove the run dir (sockets, console log, private images).
    fn teardown(&self) {
        self.dead.store(true, Ordering::SeqCst);
        if let Some(mut vm) = self.running.lock().expect("vm poisoned").take() {
            if let Err(e) = vm.stop() {
                tracing::warn!(pid = self.pid, "stop VM: {e}");
                let _ = tandem_vmm::kill_recorded(self.pid, &self.run_dir);
            }
        }
        if let Some(mut fs) = self.fs.lock().expect("fs poisoned").take() {
            if let Err(e) = fs.stop() {
                tracing::warn!(pid = fs.pid(), "stop virtiofsd: {e}");
            }
        }
        if let Some(net) = &self.net {
            if let Err(e) = crate::net::teardown(net) {
                tracing::warn!("{e}");
            }
        }
        if let Some(cg) = &self.cgroup {
            if let Err(e) = cg.remove() {
                tracing::warn!(pid = self.pid, "{e}");
            }
        }
        // the volume binds and the shared dir's tmpfs first: never a recursive remove through them
        if let Err(e) = volumes::remove_run_dir(&self.run_dir) {
            tracing::warn!("remove {}: {e}", self.run_dir.display());
        }
    }
}

/// The hot-plug sizing of a VM booted as `shape` for `spec`, on this host (its online CPUs and
/// RAM are the defaults of `[vm] max_vcpus` / `max_memory_mib`).
fn host_sizing(
    spec: &Value,
    shape: &topology::Shape,
    cfg: &VmSection,
) -> std::result::Result<topology::Sizing, topology::Error> {
    let cpus = topology::host_online_cpus(Path::new("/sys"))?;
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = topology::meminfo_total_mib(&meminfo).unwrap_or(shape.memory.size_mib);
    Ok(topology::Sizing::new(spec, shape, cfg, cpus, mem))
}

fn console_tail(run_dir: &Path) -> String {
    let text = std::fs::read_to_string(run_dir.join("console.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcStatus {
    Created,
    Running,
    Stopped,
}

struct ProcSt {
    guest_pid: i32,
    status: ProcStatus,
    stdin_close: Option<oneshot::Sender<()>>,
}

/// A container's init or an exec'd process.
struct Proc {
    ctr: String,
    exec_id: Option<String>,
    stdio: StdioPaths,
    /// The guest process spec (JSON) of an exec.
    spec: Option<Vec<u8>>,
    st: Mutex<ProcSt>,
    exit: watch::Sender<Option<ExitInfo>>,
}

impl Proc {
    fn new(ctr: &str, exec_id: Option<String>, stdio: StdioPaths, spec: Option<Vec<u8>>) -> Self {
        Proc {
            ctr: ctr.to_string(),
            exec_id,
            stdio,
            spec,
            st: Mutex::new(ProcSt {
                guest_pid: 0,
                status: ProcStatus::Created,
                stdin_close: None,
            }),
            exit: watch::channel(None).0,
        }
    }

    fn eid(&self) -> &str {
        self.exec_id.as_deref().unwrap_or_default()
    }

    fn exited(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    fn status(&self) -> ProcStatus {
        self.st.lock().expect("proc poisoned").status
    }

    /// Record the exit (the first one wins).
    fn set_exit(&self, pid: u32, code: u32) {
        self.st.lock().expect("proc poisoned").status = ProcStatus::Stopped;
        self.exit.send_if_modified(|e| {
            if e.is_some() {
                return false;
            }
            *e = Some(ExitInfo {
                pid,
                code,
                at: SystemTime::now(),
            });
            true
        });
    }

    async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit.subscribe();
        let r = rx.wait_for(|e| e.is_some()).await;
        match r {
            Ok(e) => e.expect("waited for Some"),
            Err(_) => unreachable!("exit sender dropped while borrowed"),
        }
    }

    fn close_stdin(&self) {
        if let Some(tx) = self.st.lock().expect("proc poisoned").stdin_close.take() {
            let _ = tx.send(());
        }
    }
}

/// Copy one output stream of a guest process into its fifo until EOF (or the process is gone).
fn pump_output(vm: Arc<Vm>, p: Arc<Proc>, stderr: bool, done: std_mpsc::Sender<()>) {
    let path = if stderr {
        &p.stdio.stderr
    } else {
        &p.stdio.stdout
    };
    let mut out = if path.is_empty() {
        None
    } else {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
        {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(id = p.ctr, "open {path}: {e}");
                None
            }
        }
    };
    let mut errors = 0;
    loop {
        match vm
            .agent
            .read_output(&p.ctr, p.eid(), stderr, READ_CHUNK, READ_POLL)
        {
            Ok((data, eof)) => {
                errors = 0;
                if let Some(f) = out.as_mut() {
                    if !data.is_empty() && f.write_all(&data).is_err() {
                        out = None;
                    }
                }
                if eof {
                    break;
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => {
                if vm.dead() || e.to_string().contains("NOT_FOUND") {
                    break;
                }
                errors += 1;
                if errors >= MAX_ERRORS {
                    tracing::warn!(id = p.ctr, "output of {:?}: {e}", p.exec_id);
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    let _ = done.send(());
}

/// After a process of container `ctr` exited with the container's guest cgroup at `kills` OOM
/// kills (WaitProcess's answer): a TaskOOM event (before its TaskExit) when that is more than
/// already reported, as runc's shim sends one for every OOM kill in a container's cgroup; CRI
/// then gives the container the reason `OOMKilled`. The count is the guest's word; a lying
/// guest can only mislabel its own pod's containers.
fn report_oom(vm: &Vm, ctr: &str, kills: u64) {
    let mut seen = vm.ooms.lock().expect("ooms poisoned");
    let before = seen.entry(ctr.to_string()).or_insert(0);
    if kills > *before {
        *before = kills;
        tracing::info!(id = ctr, kills, "OOM kill in the guest");
        let _ = vm.events.send(PodEvent::Oom {
            id: ctr.to_string(),
        });
    }
}

/// Wait for the guest process to exit, let its output drain, record the exit.
fn wait_exit(vm: Arc<Vm>, p: Arc<Proc>, outputs: std_mpsc::Receiver<()>, n_outputs: usize) {
    let mut errors = 0;
    let code = loop {
        if p.exited().is_some() {
            return;
        }
        match vm.agent.wait_process(&p.ctr, p.eid(), WAIT_POLL) {
            Ok(e) => {
                report_oom(&vm, &p.ctr, e.oom_kills);
                break e.status as u32;
            }
            Err(e) if is_timeout(&e) && !vm.dead() => {}
            Err(e) => {
                if vm.dead() {
                    break VM_GONE_STATUS;
                }
                errors += 1;
                if errors >= MAX_ERRORS {
                    tracing::warn!(id = p.ctr, exec = p.eid(), "wait: {e}; reported as 255");
                    break 255;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    let deadline = Instant::now() + OUTPUT_DRAIN;
    for _ in 0..n_outputs {
        let left = deadline.saturating_duration_since(Instant::now());
        if outputs.recv_timeout(left).is_err() {
            break;
        }
    }
    p.set_exit(vm.pid, code);
}

/// Start the output pumps, the stdin copy and the exit waiter of a process that exists in the
/// guest.
fn attach_io(vm: &Arc<Vm>, p: &Arc<Proc>) {
    let (tx, rx) = std_mpsc::channel();
    for stderr in [false, true] {
        let (vm, p, tx) = (vm.clone(), p.clone(), tx.clone());
        std::thread::spawn(move || pump_output(vm, p, stderr, tx));
    }
    drop(tx);
    {
        let (vm, p) = (vm.clone(), p.clone());
        std::thread::spawn(move || wait_exit(vm, p, rx, 2));
    }
    if !p.stdio.stdin.is_empty() {
        let (close_tx, close_rx) = oneshot::channel();
        p.st.lock().expect("proc poisoned").stdin_close = Some(close_tx);
        tokio::spawn(copy_stdin(vm.clone(), p.clone(), close_rx));
    }
}

/// stdin fifo -> agent, until EOF or CloseIO; then the guest process gets EOF.
async fn copy_stdin(vm: Arc<Vm>, p: Arc<Proc>, mut close: oneshot::Receiver<()>) {
    let src = tokio::net::unix::pipe::OpenOptions::new().open_receiver(&p.stdio.stdin);
    let mut src = match src {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(id = p.ctr, "open {}: {e}", p.stdio.stdin);
            return;
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    let write = |data: Vec<u8>| {
        let (vm, p) = (vm.clone(), p.clone());
        async move {
            blocking(move || vm.agent.write_stdin(&p.ctr, p.eid(), &data))
                .await
                .map(|r| r.is_ok())
                .unwrap_or(false)
        }
    };
    loop {
        tokio::select! {
            r = src.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !write(buf[..n].to_vec()).await {
                        return;
                    }
                }
            },
            _ = &mut close => {
                while let Ok(n) = src.try_read(&mut buf) {
                    if n == 0 || !write(buf[..n].to_vec()).await {
                        break;
                    }
                }
                break;
            }
        }
    }
    let (vm2, p2) = (vm.clone(), p.clone());
    let _ = blocking(move || vm2.agent.close_stdin(&p2.ctr, p2.eid())).await;
}

/// The shim's reaper, once a VmPod exists (the server process only).
static REAPER: std::sync::OnceLock<crate::reaper::Reaper> = std::sync::OnceLock::new();

/// `cmd.output()` that works in the shim server: its reaper collects every child with
/// `waitpid(-1)`, so a command's own wait may find nothing (ECHILD); then the exit is taken from
/// the reaper. Blocking (never call it on an async task). Outside the server it is `output()`.
pub fn output(cmd: &mut std::process::Command) -> std::io::Result<std::process::Output> {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let Some(reaper) = REAPER.get() else {
        return cmd.output();
    };
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    let pid = child.id() as i32;
    let rx = reaper.subscribe(pid);
    let err_pipe = child.stderr.take();
    let errs = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(mut e) = err_pipe {
            let _ = e.read_to_end(&mut v);
        }
        v
    });
    let mut stdout = Vec::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_end(&mut stdout);
    }
    let stderr = errs.join().unwrap_or_default();
    let status = match child.wait() {
        Ok(st) => {
            reaper.unsubscribe(pid);
            st
        }
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
            let exit = rx
                .blocking_recv()
                .map_err(|_| std::io::Error::other(format!("exit of pid {pid} lost")))?;
            if exit.code >= 128 {
                std::process::ExitStatus::from_raw(exit.code - 128)
            } else {
                std::process::ExitStatus::from_raw(exit.code << 8)
            }
        }
        Err(e) => {
            reaper.unsubscribe(pid);
            return Err(e);
        }
    };
    Ok(std::process::Output {
        status,
        stdout,
        stderr,
    })
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd returned is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

struct Ctr {
    id: String,
    bundle: PathBuf,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    paused: AtomicBool,
    /// Layer images attached for it (detached at delete).
    images: Vec<PathBuf>,
    /// Its private images (removed at delete).
    private: Vec<PathBuf>,
    /// Shared locks on its cached images: the layer cache's collector (of any shim) leaves them.
    _image_locks: Vec<std::fs::File>,
    /// It has directory volumes bound in the pod's shared dir (unbound at delete).
    volumes: bool,
}

impl Ctr {
    fn proc(&self, exec_id: Option<&str>) -> Result<Arc<Proc>> {
        match exec_id {
            None => Ok(self.init.clone()),
            Some(e) => self
                .execs
                .lock()
                .expect("execs poisoned")
                .get(e)
                .cloned()
                .ok_or_else(|| {
                    Error::NotFound(format!("container {}: exec {e} not found", self.id))
                }),
        }
    }

    fn procs(&self) -> Vec<Arc<Proc>> {
        let mut v: Vec<_> = self
            .execs
            .lock()
            .expect("execs poisoned")
            .values()
            .cloned()
            .collect();
        v.push(self.init.clone());
        v
    }
}

pub struct VmPod {
    ctx: PodContext,
    cfg: VmSection,
    config_source: String,
    vm: tokio::sync::Mutex<Option<Arc<Vm>>>,
    record: Mutex<Option<VmRecord>>,
    containers: Arc<Mutex<HashMap<String, Arc<Ctr>>>>,
    creating: Mutex<HashSet<String>>,
    /// `[userns] mode = "pod"`: the containers run in the pod's user namespace in the guest
    /// (spec::guest_userns); no host ID range is taken.
    userns_pod: bool,
    /// The pod's sandbox: the first container created in its VM, whose IPC/UTS/PID namespaces
    /// the others join by path (spec::pod_namespaces).
    sandbox: Mutex<Option<String>>,
}

fn not_found_finished() -> Error {
    Error::NotFound("process already finished".into())
}

impl VmPod {
    pub fn new(config: &Config, ctx: PodContext) -> Result<VmPod> {
        match config.vm.hypervisor {
            HvKind::Qemu => {}
        }
        let _ = REAPER.set(ctx.reaper.clone());
        Ok(VmPod {
            ctx,
            cfg: config.vm.clone(),
            config_source: config
                .source
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(defaults: no config file)".into()),
            vm: tokio::sync::Mutex::new(None),
            record: Mutex::new(None),
            containers: Arc::new(Mutex::new(HashMap::new())),
            creating: Mutex::new(HashSet::new()),
            userns_pod: config.userns.mode == crate::config::UsernsMode::Pod,
            sandbox: Mutex::new(None),
        })
    }

    fn ctr(&self, id: &str) -> Result<Arc<Ctr>> {
        self.containers
            .lock()
            .expect("containers poisoned")
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id} not found")))
    }

    /// Change the on-disk record and write it.
    fn update_record(&self, f: impl FnOnce(&mut VmRecord)) {
        let mut slot = self.record.lock().expect("record poisoned");
        if let Some(r) = slot.as_mut() {
            f(r);
            if let Err(e) = save_record(&self.ctx.state, r) {
                tracing::warn!("save VM record: {e}");
            }
        }
    }

    fn drop_record(&self) {
        if let Some(r) = self.record.lock().expect("record poisoned").take() {
            let _ = std::fs::remove_file(record_path(&self.ctx.state, &r.pod));
        }
    }

    /// The pod's VM, booted on first use from the spec of the first container. When it boots,
    /// the images `cold` (the first container's layers) are attached from the start, so that
    /// the guest finds them at boot instead of through a PCIe hot-plug after it.
    async fn ensure_vm(&self, spec: &Value, pod: &str, cold: &[PathBuf]) -> Result<Arc<Vm>> {
        let mut slot = self.vm.lock().await;
        if let Some(vm) = &*slot {
            if vm.dead() {
                return Err(Error::FailedPrecondition(format!(
                    "the pod's VM (QEMU pid {}) is gone",
                    vm.pid
                )));
            }
            return Ok(vm.clone());
        }
        let cfg = &self.cfg;
        for (what, p) in [("kernel", &cfg.kernel), ("initrd", &cfg.initrd)] {
            if !p.is_file() {
                return Err(Error::InvalidArgument(format!(
                    "VM {what} {}: no such file ([vm] {what} in {})",
                    p.display(),
                    self.config_source
                )));
            }
        }
        let shape = topology::shape(spec, cfg, Path::new("/sys"))
            .map_err(|e| Error::InvalidArgument(format!("VM of pod {pod}: {e}")))?;
        let sizing = host_sizing(spec, &shape, cfg)
            .map_err(|e| Error::Other(format!("VM of pod {pod}: {e}")))?;
        let cgroup_rel = cgroup::rel_path(
            spec["linux"]["cgroupsPath"].as_str(),
            &self.ctx.namespace,
            pod,
        )
        .map_err(|e| Error::InvalidArgument(format!("VM of pod {pod}: linux.cgroupsPath: {e}")))?;
        let short: String = pod.chars().take(12).collect();
        let run_dir = cfg.run_dir.join(format!("{}-{short}", std::process::id()));
        let record = VmRecord {
            pod: pod.to_string(),
            shim_pid: std::process::id(),
            run_dir: run_dir.clone(),
            vmm_pid: 0,
            containers: vec![],
            netns: netns_of(spec),
            net: None,
            cgroup: Some(cgroup_rel.clone()),
            virtiofsd_pid: 0,
            vcpus: sizing.boot_vcpus,
            memory_mib: sizing.boot_memory_mib,
        };
        save_record(&self.ctx.state, &record)
            .map_err(|e| Error::Other(format!("VM record of pod {pod}: {e}")))?;
        *self.record.lock().expect("record poisoned") = Some(record.clone());
        let qemu = QemuConfig {
            binary: cfg.qemu.clone(),
            accel: match cfg.accel {
                Accel::Auto => QemuAccel::Auto,
                Accel::Kvm => QemuAccel::Kvm,
                Accel::Tcg => QemuAccel::Tcg,
            },
            cold_disks: cold
                .iter()
                .map(|p| tandem_vmm::DiskConfig {
                    path: p.clone(),
                    read_only: true,
                })
                .collect(),
            // a virtio-fs device may be hot-added later (directory volumes, [`volumes`])
            share_memory: true,
            // vCPUs and memory follow the containers ([`resize`])
            max_vcpus: sizing.max_vcpus,
            max_memory_mib: sizing.max_memory_mib,
            ..QemuConfig::new(run_dir.clone())
        };
        let socket = run_dir.join("agent.sock");
        let vmcfg = VmConfig {
            kernel: cfg.kernel.clone(),
            boot: BootMode::Linux,
            initrd: Some(cfg.initrd.clone()),
            cmdline: CMDLINE.to_string(),
            vcpus: shape.vcpus,
            memory: shape.memory,
            nics: vec![],
            disks: vec![],
            vsock: None,
            serial_log: Some(run_dir.join("console.log")),
            agent: Some(AgentChannel::SerialPort {
                socket: socket.clone(),
            }),
            netns: None,
        };
        let boot_timeout = Duration::from_secs(cfg.boot_timeout_s);
        let call_timeout = Duration::from_secs(cfg.call_timeout_s);
        let state = self.ctx.state.clone();
        let pod_id = pod.to_string();
        let net_slot: Arc<Mutex<Option<crate::net::PodNetwork>>> = Arc::new(Mutex::new(None));
        let net_made = net_slot.clone();
        let cg_slot: Arc<Mutex<Option<cgroup::PodCgroup>>> = Arc::new(Mutex::new(None));
        let cg_made = cg_slot.clone();
        let cg_spec = spec.clone();
        let booted = blocking(move || -> Result<(Box<dyn RunningVm>, AgentClient)> {
            let mut vmcfg = vmcfg;
            let mut qemu = qemu;
            let mut rec = record;
            std::fs::create_dir_all(&run_dir)
                .map_err(|e| Error::Other(format!("mkdir {}: {e}", run_dir.display())))?;
            let started = Instant::now();
            if let Some(ns) = rec.netns.clone() {
                let net = crate::net::setup(&ns)
                    .map_err(|e| Error::Other(format!("network of pod {pod_id}: {e}")))?;
                rec.net = Some(net.clone());
                if let Err(e) = save_record(&state, &rec) {
                    tracing::warn!("save VM record: {e}");
                }
                vmcfg.nics = net.nics();
                vmcfg.netns = Some(ns);
                *net_made.lock().expect("net poisoned") = Some(net);
            }
            let cg = cgroup::PodCgroup::create(Path::new(CGROUP_ROOT), &cgroup_rel, &cg_spec)
                .map_err(|e| Error::Other(format!("VM of pod {pod_id}: {e}")))?;
            qemu.cgroups = cg.dirs();
            *cg_made.lock().expect("cgroup poisoned") = Some(cg);
            let mut running = Qemu::new(qemu)
                .start(&vmcfg)
                .map_err(|e| Error::Other(format!("VM of pod {pod_id}: {e}")))?;
            rec.vmm_pid = running.pid();
            if let Err(e) = save_record(&state, &rec) {
                tracing::warn!("save VM record: {e}");
            }
            let net = net_made.lock().expect("net poisoned").clone();
            let answer = AgentClient::connect(&socket, call_timeout).and_then(|c| {
                let v = c.version_within(boot_timeout)?;
                // lo up always; the pod's interfaces, addresses and routes when it has a netns
                let (ifs, routes) = net
                    .as_ref()
                    .map(|n| (n.agent_interfaces(), n.agent_routes()))
                    .unwrap_or_default();
                c.configure_network(&ifs, &routes)?;
                Ok((c, v))
            });
            match answer {
                Ok((client, v)) => {
                    tracing::info!(
                        pod = pod_id,
                        pid = running.pid(),
                        kernel = v.kernel_release,
                        "VM booted, agent answered after {:?}",
                        started.elapsed()
                    );
                    Ok((running, client))
                }
                Err(e) => {
                    let tail = console_tail(&run_dir);
                    let _ = running.stop();
                    Err(Error::Other(format!(
                        "VM of pod {pod_id}: the guest agent did not answer within {boot_timeout:?}: {e}; console tail:\n{tail}"
                    )))
                }
            }
        })
        .await
        .and_then(|r| r);
        let (running, client) = match booted {
            Ok(b) => b,
            Err(e) => {
                let rec = self.record.lock().expect("record poisoned").clone();
                if let Some(mut r) = rec {
                    r.net = net_slot.lock().expect("net poisoned").clone();
                    let _ = blocking(move || remove_recorded(&r)).await;
                }
                self.drop_record();
                return Err(e);
            }
        };
        let pid = running.pid();
        let net = net_slot.lock().expect("net poisoned").clone();
        let n2 = net.clone();
        self.update_record(|r| {
            r.vmm_pid = pid;
            r.net = n2;
        });
        let vm = Arc::new(Vm {
            agent: Arc::new(client),
            running: Mutex::new(Some(running)),
            pid,
            run_dir: self
                .record
                .lock()
                .expect("record poisoned")
                .as_ref()
                .map(|r| r.run_dir.clone())
                .unwrap_or_default(),
            dead: Arc::new(AtomicBool::new(false)),
            // attached at boot, not used yet: each use of the container's attach counts
            disks: Mutex::new(
                cold.iter()
                    .enumerate()
                    .map(|(i, p)| (p.clone(), (tandem_vmm::qemu::cold_disk_id(i), 0)))
                    .collect(),
            ),
            net,
            cgroup: cg_slot.lock().expect("cgroup poisoned").take(),
            fs: Mutex::new(None),
            size: Mutex::new(resize::PodSize::new(sizing)),
            events: self.ctx.events.clone(),
            ooms: Mutex::new(HashMap::new()),
        });
        self.watch_vm(&vm);
        *slot = Some(vm.clone());
        Ok(vm)
    }

    /// When QEMU exits under the pod, every process still running reports an exit.
    fn watch_vm(&self, vm: &Arc<Vm>) {
        let vm = vm.clone();
        let containers = self.containers.clone();
        tokio::spawn(async move {
            let fd = match pidfd_open(vm.pid) {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::warn!(pid = vm.pid, "pidfd of QEMU: {e}");
                    return;
                }
            };
            // SAFETY: the pidfd is an OwnedFd the AsyncFd owns and nothing else closes.
            let Ok(afd) =
                (unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) })
            else {
                return;
            };
            let _ = afd.readable().await;
            let _ = afd.get_ref().as_raw_fd();
            if vm.dead.swap(true, Ordering::SeqCst) {
                return; // stopped by us
            }
            tracing::warn!(pid = vm.pid, "the pod's VM exited:\n{}", vm.console_tail());
            let ctrs: Vec<Arc<Ctr>> = containers
                .lock()
                .expect("containers poisoned")
                .values()
                .cloned()
                .collect();
            for c in ctrs {
                for p in c.procs() {
                    if p.status() != ProcStatus::Created || p.exec_id.is_none() {
                        p.set_exit(vm.pid, VM_GONE_STATUS);
                    }
                }
            }
        });
    }

    /// Undo a container's disks and images. When other containers remain, the disks are
    /// detached on a thread of their own (the guest takes seconds to release a PCIe device);
    /// when none does, the VM stops and takes them along.
    fn release(&self, vm: &Arc<Vm>, images: Vec<PathBuf>, private: Vec<PathBuf>) {
        let last = self
            .containers
            .lock()
            .expect("containers poisoned")
            .is_empty()
            && self.creating.lock().expect("creating poisoned").is_empty();
        if last {
            return;
        }
        let vm = vm.clone();
        std::thread::spawn(move || {
            for i in &images {
                vm.detach(i);
            }
            for p in &private {
                let _ = std::fs::remove_file(p);
            }
        });
    }

    /// Stop the VM when no container is left.
    async fn stop_if_empty(&self) {
        let empty = self
            .containers
            .lock()
            .expect("containers poisoned")
            .is_empty()
            && self.creating.lock().expect("creating poisoned").is_empty();
        if !empty {
            return;
        }
        let vm = self.vm.lock().await.take();
        if let Some(vm) = vm {
            let _ = blocking(move || vm.teardown()).await;
        }
        self.drop_record();
        self.collect_layer_cache().await;
    }

    /// Bound the layer cache (`[vm] layer_cache_max_mb`): least recently used images no VM holds.
    async fn collect_layer_cache(&self) {
        let max_mb = self.cfg.layer_cache_max_mb;
        if max_mb == 0 {
            return;
        }
        let cache = self.cfg.layer_cache.clone();
        let r = blocking(move || layers::gc(&cache, max_mb.saturating_mul(1 << 20))).await;
        match r {
            Ok(Ok(r)) if !r.removed.is_empty() || r.busy > 0 => tracing::info!(
                removed = r.removed.len(),
                busy = r.busy,
                left_bytes = r.left_bytes,
                "layer cache collected"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("layer cache: {e}"),
            Err(e) => tracing::warn!("layer cache: {e}"),
        }
    }

    async fn create_inner(&self, opts: CreateOpts) -> Result<u32> {
        let id = opts.id.clone();
        let cfg_path = opts.bundle.join("config.json");
        let text = std::fs::read(&cfg_path)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", cfg_path.display())))?;
        let host_spec: Value = serde_json::from_slice(&text)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", cfg_path.display())))?;
        if host_spec["process"]["args"]
            .as_array()
            .is_none_or(|a| a.is_empty())
        {
            return Err(Error::InvalidArgument(format!(
                "container {id}: process.args is empty"
            )));
        }
        // host files for the guest read and checked before anything is made
        let guest_bundle = format!("{GUEST_BUNDLES}/{id}");
        let (hs, hb, gid) = (host_spec.clone(), opts.bundle.clone(), id.clone());
        let mut guest = blocking(move || spec::guest_spec_with_files(hs, &gid, &hb, &guest_bundle))
            .await?
            .map_err(|e| Error::InvalidArgument(format!("container {id}: {e}")))?;
        spec::guest_userns(&host_spec, &mut guest.spec, self.userns_pod)
            .map_err(|e| Error::InvalidArgument(format!("container {id}: {e}")))?;
        let sandbox = self.pod_sandbox().await;
        let joined = spec::pod_namespaces(&host_spec, &mut guest.spec, sandbox)
            .map_err(|e| Error::InvalidArgument(format!("container {id}: {e}")))?;
        if !joined.is_empty() {
            tracing::info!(id, ?joined, ?sandbox, "joins the pod sandbox's namespaces");
        }
        let pod = self
            .record
            .lock()
            .expect("record poisoned")
            .as_ref()
            .map(|r| r.pod.clone())
            .unwrap_or_else(|| id.clone());
        let root_path = host_spec["root"]["path"]
            .as_str()
            .unwrap_or("rootfs")
            .to_string();
        let plan = layers::plan(&opts.mounts, &opts.bundle, &root_path)
            .map_err(|e| Error::InvalidArgument(format!("container {id}: {e}")))?;
        let early = self.images_before_boot(&id, &plan).await?;
        // on the hot-plug ports, one each; more than there are: all hot-added as before
        let ports = usize::from(QemuConfig::new(PathBuf::new()).hotplug_ports);
        let cold = early
            .as_ref()
            .map(|m| unique(&m.images))
            .filter(|c| c.len() <= ports)
            .unwrap_or_default();
        let vm = self.ensure_vm(&host_spec, &pod, &cold).await?;
        // the VM grows to the pod's size with this container before it is made (hot-plug)
        let demand = topology::demand_of(&host_spec["linux"]["resources"]);
        self.resize(&vm, &id, Some(demand), "create").await?;
        self.update_record(|r| r.containers.push(id.clone()));
        let r = self.make_container(&vm, &opts, guest, plan, early).await;
        match r {
            Ok(pid) => Ok(pid),
            Err(e) => {
                self.update_record(|r| r.containers.retain(|c| c != &id));
                if !self
                    .containers
                    .lock()
                    .expect("containers poisoned")
                    .is_empty()
                {
                    let _ = self.resize(&vm, &id, None, "create failed").await;
                }
                Err(e)
            }
        }
    }

    /// The first container's layer images, made before the VM boots so that they are attached
    /// from the start: only when the pod has no VM yet and every layer is a cached one (a
    /// private image lives in the VM's run dir, made after boot).
    async fn images_before_boot(&self, id: &str, plan: &[layers::Layer]) -> Result<Option<Images>> {
        let booted = self.vm.lock().await.is_some();
        if booted || plan.is_empty() || plan.iter().any(|l| matches!(l, layers::Layer::Private(_)))
        {
            return Ok(None);
        }
        let (plan, cache, cid) = (plan.to_vec(), self.cfg.layer_cache.clone(), id.to_string());
        // no private layer: the run dir is not used
        let m =
            blocking(move || make_images(&plan, &cache, Path::new("/nonexistent"), &cid)).await??;
        tracing::info!(
            id,
            images = m.images.len(),
            "layer images ready before boot"
        );
        Ok(Some(m))
    }

    async fn make_container(
        &self,
        vm: &Arc<Vm>,
        opts: &CreateOpts,
        guest: spec::GuestSpec,
        plan: Vec<layers::Layer>,
        early: Option<Images>,
    ) -> Result<u32> {
        let id = opts.id.clone();
        let made = match early {
            Some(m) => m,
            None => {
                let (cache, run_dir, cid) =
                    (self.cfg.layer_cache.clone(), vm.run_dir.clone(), id.clone());
                blocking(move || make_images(&plan, &cache, &run_dir, &cid)).await??
            }
        };
        let Images {
            images,
            private,
            locks: image_locks,
        } = made;
        tracing::info!(id, images = images.len(), "layer images ready");
        let v = vm.clone();
        let imgs = images.clone();
        let attached = blocking(move || {
            let mut serials = Vec::new();
            for (n, i) in imgs.iter().enumerate() {
                match v.attach(i) {
                    Ok(s) => serials.push(s),
                    Err(e) => {
                        for j in &imgs[..n] {
                            v.detach(j);
                        }
                        return Err(e);
                    }
                }
            }
            Ok(serials)
        })
        .await?;
        let serials = match attached {
            Ok(s) => {
                tracing::info!(id, ?s, "layer disks attached");
                s
            }
            Err(e) => {
                for p in &private {
                    let _ = std::fs::remove_file(p);
                }
                return Err(e);
            }
        };
        let b = format!("{GUEST_BUNDLES}/{id}");
        let mut mounts: Vec<Mount> = serials
            .iter()
            .enumerate()
            .map(|(i, s)| Mount {
                fstype: "erofs".into(),
                source: format!("serial:{s}"),
                target: format!("layers/{i}"),
                // idmapped in the guest with the container's user namespace (the agent's option)
                options: if spec::in_pod_userns(&guest.spec) {
                    vec!["ro".into(), "idmap".into()]
                } else {
                    vec!["ro".into()]
                },
            })
            .collect();
        let lower: Vec<String> = (0..serials.len())
            .map(|i| format!("{b}/layers/{i}"))
            .collect();
        mounts.push(Mount {
            fstype: "tmpfs".into(),
            source: "tmpfs".into(),
            target: "rw".into(),
            options: vec!["mode=0755".into()],
        });
        mounts.push(Mount {
            fstype: "overlay".into(),
            source: "overlay".into(),
            target: "rootfs".into(),
            options: vec![format!(
                "lowerdir={},upperdir={b}/rw/upper,workdir={b}/rw/work",
                lower.join(":")
            )],
        });
        let spec::GuestSpec {
            spec: gspec,
            files,
            dropped,
            dirs,
            shm,
        } = guest;
        let has_volumes = !dirs.is_empty();
        if has_volumes {
            if let Err(e) = self.bind_volumes(vm, &id, dirs).await {
                self.release(vm, images, private);
                return Err(e);
            }
            mounts.push(Mount {
                fstype: "virtiofs".into(),
                source: volumes::FS_TAG.into(),
                target: volumes::GUEST_SHARED.into(),
                options: vec![],
            });
        }
        if !dropped.is_empty() {
            tracing::warn!(
                id,
                ?dropped,
                "host bind mounts not given to the guest (VM mode copies small regular files only)"
            );
        }
        let gspec = serde_json::to_vec(&gspec).map_err(|e| Error::Other(e.to_string()))?;
        let stdin = !opts.stdio.stdin.is_empty();
        let (v, cid) = (vm.clone(), id.clone());
        let created = blocking(move || {
            v.agent
                .create_container_with_shared(&cid, &gspec, &mounts, &files, &shm, stdin)
        })
        .await?;
        let guest_pid = match created {
            Ok(p) => {
                tracing::info!(id, "container created in the guest");
                p
            }
            Err(e) => {
                if has_volumes {
                    self.unbind_volumes(vm, &id).await;
                }
                self.release(vm, images, private);
                return Err(agent_err(e));
            }
        };
        let init = Arc::new(Proc::new(&id, None, opts.stdio.clone(), None));
        init.st.lock().expect("proc poisoned").guest_pid = guest_pid;
        attach_io(vm, &init);
        let ctr = Arc::new(Ctr {
            id: id.clone(),
            bundle: opts.bundle.clone(),
            init,
            execs: Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
            images,
            private,
            _image_locks: image_locks,
            volumes: has_volumes,
        });
        self.containers
            .lock()
            .expect("containers poisoned")
            .insert(id.clone(), ctr);
        self.sandbox
            .lock()
            .expect("sandbox poisoned")
            .get_or_insert(id);
        Ok(vm.pid)
    }

    /// The pod's shared dir, its virtio-fs daemon started and the device hot-added on first
    /// use; then binds `dirs` of container `id` in it. Errors name the volume; on error the
    /// container's binds are undone (the daemon stays for the pod).
    async fn bind_volumes(
        &self,
        vm: &Arc<Vm>,
        id: &str,
        dirs: Vec<volumes::DirBind>,
    ) -> Result<()> {
        let (v, cid) = (vm.clone(), id.to_string());
        let started = blocking(move || -> Result<(PathBuf, Option<u32>)> {
            let shared = v.run_dir.join(volumes::SHARED_DIR);
            let mut fs = v.fs.lock().expect("fs poisoned");
            let mut new_pid = None;
            if fs.is_none() {
                let t0 = Instant::now();
                let err =
                    |e: String| Error::Other(format!("container {cid}: directory volumes: {e}"));
                let shared = volumes::make_shared_dir(&v.run_dir).map_err(err)?;
                let mut cfg = tandem_vmm::qemu::virtiofs::VirtiofsdConfig::new(&shared, &v.run_dir);
                cfg.cgroups = v.cgroup.as_ref().map(|c| c.dirs()).unwrap_or_default();
                let undo = || {
                    let _ = volumes::unmount_under(&shared);
                    let _ = std::fs::remove_dir(&shared);
                };
                let mut d = match tandem_vmm::qemu::virtiofs::Virtiofsd::start(&cfg) {
                    Ok(d) => d,
                    Err(e) => {
                        undo();
                        return Err(err(e.to_string()));
                    }
                };
                let added = {
                    let mut r = v.running.lock().expect("vm poisoned");
                    match r.as_mut() {
                        Some(vm) => vm.hot_add_fs(d.socket(), volumes::FS_TAG),
                        None => Err(tandem_vmm::Error::BadState {
                            state: "stopped".into(),
                            op: "add a virtio-fs device".into(),
                        }),
                    }
                };
                if let Err(e) = added {
                    let _ = d.stop();
                    undo();
                    return Err(err(format!("hot-add of the virtio-fs device: {e}")));
                }
                tracing::info!(
                    pid = d.pid(),
                    "virtiofsd started and its device hot-added in {:?}",
                    t0.elapsed()
                );
                new_pid = Some(d.pid());
                *fs = Some(d);
            }
            drop(fs);
            volumes::bind_container(&shared, &cid, &dirs)
                .map_err(|e| Error::InvalidArgument(format!("container {cid}: {e}")))?;
            Ok((shared, new_pid))
        })
        .await??;
        if let (_, Some(pid)) = started {
            self.update_record(|r| r.virtiofsd_pid = pid);
        }
        Ok(())
    }

    /// Undo the volume binds of container `id` on the host.
    async fn unbind_volumes(&self, vm: &Arc<Vm>, id: &str) {
        let shared = vm.run_dir.join(volumes::SHARED_DIR);
        let cid = id.to_string();
        let _ = blocking(move || volumes::unbind_container(&shared, &cid)).await;
    }

    /// The pod's sandbox in its VM (for spec::pod_namespaces): QEMU's pid and the guest pid of
    /// the sandbox container's init, while the VM runs and that init has not exited.
    async fn pod_sandbox(&self) -> Option<spec::PodSandbox> {
        let vm = self.vm.lock().await.clone()?;
        if vm.dead() {
            return None;
        }
        let id = self.sandbox.lock().expect("sandbox poisoned").clone()?;
        let ctr = self.ctr(&id).ok()?;
        if ctr.init.exited().is_some() {
            return None;
        }
        let guest_pid = ctr.init.st.lock().expect("proc poisoned").guest_pid;
        (guest_pid > 0).then_some(spec::PodSandbox {
            vmm_pid: vm.pid,
            guest_pid,
        })
    }

    /// Sets container `id`'s ask (`None`: gone) and resizes the VM to the pod's target
    /// ([`resize`]); the record gets the size the VMM reports.
    async fn resize(
        &self,
        vm: &Arc<Vm>,
        id: &str,
        demand: Option<topology::Demand>,
        why: &'static str,
    ) -> Result<()> {
        let (v, cid) = (vm.clone(), id.to_string());
        let r = blocking(move || v.resize_for(&cid, demand, why)).await?;
        if let Some((vcpus, memory_mib)) = r.size {
            self.update_record(|rec| {
                rec.vcpus = vcpus;
                rec.memory_mib = memory_mib;
            });
        }
        r.result
    }

    async fn vm(&self) -> Result<Arc<Vm>> {
        self.vm
            .lock()
            .await
            .clone()
            .ok_or_else(|| Error::FailedPrecondition("the pod has no VM".into()))
    }
}

#[async_trait]
impl Pod for VmPod {
    async fn create(&self, opts: CreateOpts) -> Result<u32> {
        let id = opts.id.clone();
        {
            let have = self.containers.lock().expect("containers poisoned");
            let mut creating = self.creating.lock().expect("creating poisoned");
            if have.contains_key(&id) || !creating.insert(id.clone()) {
                return Err(Error::AlreadyExists(format!(
                    "container {id}: already exists"
                )));
            }
        }
        let r = self.create_inner(opts).await;
        self.creating.lock().expect("creating poisoned").remove(&id);
        if r.is_err() {
            self.stop_if_empty().await;
        }
        r
    }

    async fn start(&self, id: &str, exec_id: Option<&str>) -> Result<u32> {
        let ctr = self.ctr(id)?;
        let p = ctr.proc(exec_id)?;
        let vm = self.vm().await?;
        if p.status() != ProcStatus::Created {
            return Err(Error::FailedPrecondition(format!(
                "container {id}{}: already started",
                exec_id.map(|e| format!(" exec {e}")).unwrap_or_default()
            )));
        }
        if p.exited().is_some() {
            return Err(Error::FailedPrecondition(format!(
                "container {id}: process exited before start"
            )));
        }
        let (v, cid) = (vm.clone(), id.to_string());
        match exec_id {
            None => {
                blocking(move || v.agent.start_container(&cid))
                    .await?
                    .map_err(agent_err)?;
            }
            Some(eid) => {
                let spec = p.spec.clone().expect("an exec has a spec");
                let stdin = !p.stdio.stdin.is_empty();
                let e = eid.to_string();
                let gpid = blocking(move || v.agent.exec_process(&cid, &e, &spec, stdin))
                    .await?
                    .map_err(agent_err)?;
                p.st.lock().expect("proc poisoned").guest_pid = gpid;
                attach_io(&vm, &p);
            }
        }
        let mut st = p.st.lock().expect("proc poisoned");
        if st.status == ProcStatus::Created {
            st.status = ProcStatus::Running;
        }
        Ok(vm.pid)
    }

    async fn exec(&self, opts: ExecOpts) -> Result<()> {
        let ctr = self.ctr(&opts.id)?;
        let terminal = opts.process.terminal().unwrap_or(false);
        if opts.stdio.terminal != terminal {
            return Err(Error::InvalidArgument(format!(
                "container {} exec {}: stdio terminal={} but process.terminal={terminal}",
                opts.id, opts.exec_id, opts.stdio.terminal
            )));
        }
        if ctr.init.exited().is_some() {
            return Err(Error::FailedPrecondition(format!(
                "container {}: not running",
                opts.id
            )));
        }
        let process = serde_json::to_value(&opts.process)
            .map_err(|e| Error::InvalidArgument(format!("exec {}: {e}", opts.exec_id)))?;
        let json = serde_json::to_vec(&spec::guest_process(process))
            .map_err(|e| Error::Other(e.to_string()))?;
        let mut execs = ctr.execs.lock().expect("execs poisoned");
        if execs.contains_key(&opts.exec_id) {
            return Err(Error::AlreadyExists(format!(
                "container {}: exec {} already exists",
                opts.id, opts.exec_id
            )));
        }
        let p = Proc::new(&opts.id, Some(opts.exec_id.clone()), opts.stdio, Some(json));
        execs.insert(opts.exec_id, Arc::new(p));
        Ok(())
    }

    async fn kill(&self, id: &str, exec_id: Option<&str>, signal: u32, all: bool) -> Result<()> {
        let ctr = self.ctr(id)?;
        let p = ctr.proc(exec_id)?;
        let vm = self.vm().await?;
        if p.exited().is_some() && !(all && exec_id.is_none()) {
            return Err(not_found_finished());
        }
        if exec_id.is_some() && p.status() == ProcStatus::Created {
            return Err(Error::FailedPrecondition("process not created".into()));
        }
        if vm.dead() {
            return Err(not_found_finished());
        }
        let (cid, eid) = (id.to_string(), exec_id.unwrap_or_default().to_string());
        let r = blocking(move || vm.agent.signal_process(&cid, &eid, signal as i32, all)).await?;
        match r {
            Ok(()) => Ok(()),
            Err(e) => match agent_err(e) {
                Error::NotFound(_) => Err(not_found_finished()),
                other => Err(other),
            },
        }
    }

    async fn wait(&self, id: &str, exec_id: Option<&str>) -> Result<ExitInfo> {
        let p = self.ctr(id)?.proc(exec_id)?;
        Ok(p.wait().await)
    }

    async fn delete(&self, id: &str, exec_id: Option<&str>) -> Result<ExitInfo> {
        let ctr = self.ctr(id)?;
        let vm = self.vm().await?;
        if let Some(eid) = exec_id {
            let p = ctr.proc(Some(eid))?;
            if p.status() == ProcStatus::Running && p.exited().is_none() {
                return Err(Error::FailedPrecondition(format!(
                    "container {id} exec {eid}: cannot delete a running process"
                )));
            }
            ctr.execs.lock().expect("execs poisoned").remove(eid);
            p.close_stdin();
            return Ok(p.exited().unwrap_or(ExitInfo {
                pid: 0,
                code: 0,
                at: SystemTime::now(),
            }));
        }
        if ctr.init.status() == ProcStatus::Running && ctr.init.exited().is_none() {
            return Err(Error::FailedPrecondition(format!(
                "container {id}: cannot delete a running container"
            )));
        }
        vm.ooms.lock().expect("ooms poisoned").remove(id);
        if !vm.dead() {
            let (v, cid) = (vm.clone(), id.to_string());
            let r = blocking(move || v.agent.remove_container(&cid)).await?;
            if let Err(e) = r {
                if !vm.dead() {
                    tracing::warn!(id, "RemoveContainer: {e}");
                }
            }
        }
        let exit = match ctr.init.exited() {
            Some(e) => e,
            None => tokio::time::timeout(Duration::from_secs(2), ctr.init.wait())
                .await
                .unwrap_or(ExitInfo {
                    pid: vm.pid,
                    code: VM_GONE_STATUS,
                    at: SystemTime::now(),
                }),
        };
        if ctr.volumes {
            self.unbind_volumes(&vm, id).await;
        }
        for p in ctr.procs() {
            p.close_stdin();
            // a process never started has no waiter
            if p.exited().is_none() {
                p.set_exit(vm.pid, exit.code);
            }
        }
        self.containers
            .lock()
            .expect("containers poisoned")
            .remove(id);
        {
            let mut sb = self.sandbox.lock().expect("sandbox poisoned");
            if sb.as_deref() == Some(id) {
                *sb = None;
            }
        }
        self.release(&vm, ctr.images.clone(), ctr.private.clone());
        self.update_record(|r| r.containers.retain(|c| c != id));
        // its vCPUs go while other containers remain (with the last one the VM goes)
        if !self
            .containers
            .lock()
            .expect("containers poisoned")
            .is_empty()
            && !vm.dead()
        {
            if let Err(e) = self.resize(&vm, id, None, "delete").await {
                tracing::warn!(id, "{e}");
            }
        }
        // its image locks go now: the layer cache collector of stop_if_empty may take them
        drop(ctr);
        self.stop_if_empty().await;
        Ok(exit)
    }

    async fn pause(&self, id: &str) -> Result<()> {
        let ctr = self.ctr(id)?;
        let vm = self.vm().await?;
        let cid = id.to_string();
        blocking(move || vm.agent.pause_container(&cid))
            .await?
            .map_err(agent_err)?;
        ctr.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn resume(&self, id: &str) -> Result<()> {
        let ctr = self.ctr(id)?;
        let vm = self.vm().await?;
        let cid = id.to_string();
        blocking(move || vm.agent.resume_container(&cid))
            .await?
            .map_err(agent_err)?;
        ctr.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    async fn stats(&self, id: &str) -> Result<Stats> {
        self.ctr(id)?;
        let vm = self.vm().await?;
        let cid = id.to_string();
        let s = blocking(move || vm.agent.stats(&cid))
            .await?
            .map_err(agent_err)?;
        let mut out = Stats::default();
        out.cpu.usage_total_ns = s.cpu_usage_total_ns;
        out.memory.usage_bytes = s.memory_usage_bytes;
        out.memory.limit_bytes = s.memory_limit_bytes;
        out.pids.current = s.pids_current;
        out.memory.oom_kills = s.oom_kills;
        Ok(out)
    }

    async fn update(&self, id: &str, resources: LinuxResources) -> Result<()> {
        let ctr = self.ctr(id)?;
        if ctr.init.exited().is_some() {
            return Err(Error::FailedPrecondition(format!(
                "container {id}: not running"
            )));
        }
        let json = update_json(id, &resources)?;
        let vm = self.vm().await?;
        // the VM follows the new ask before the guest cgroup gets it (hot-plug)
        let asked = serde_json::to_value(&resources).unwrap_or_default();
        let old = vm
            .size
            .lock()
            .expect("size poisoned")
            .demands
            .get(id)
            .copied()
            .unwrap_or_default();
        self.resize(
            &vm,
            id,
            Some(topology::updated_demand(old, &asked)),
            "update",
        )
        .await?;
        let cid = id.to_string();
        blocking(move || vm.agent.update_container(&cid, &json))
            .await?
            .map_err(agent_err)
    }

    async fn pids(&self, id: &str) -> Result<Vec<PidInfo>> {
        let ctr = self.ctr(id)?;
        let mut out = Vec::new();
        for p in ctr.procs() {
            let gpid = p.st.lock().expect("proc poisoned").guest_pid;
            if gpid > 0 && p.exited().is_none() {
                out.push(PidInfo {
                    pid: gpid as u32,
                    exec_id: p.exec_id.clone(),
                });
            }
        }
        Ok(out)
    }

    async fn state(&self, id: &str, exec_id: Option<&str>) -> Result<ProcessState> {
        let ctr = self.ctr(id)?;
        let p = ctr.proc(exec_id)?;
        let pid = self.vm.lock().await.as_ref().map(|v| v.pid).unwrap_or(0);
        let exit = p.exited();
        let status = match (exit, p.status()) {
            (Some(_), _) | (_, ProcStatus::Stopped) => Status::Stopped,
            (None, ProcStatus::Created) => Status::Created,
            (None, ProcStatus::Running) if ctr.paused.load(Ordering::SeqCst) => Status::Paused,
            (None, ProcStatus::Running) => Status::Running,
        };
        Ok(ProcessState {
            id: id.to_string(),
            exec_id: p.exec_id.clone(),
            bundle: ctr.bundle.clone(),
            pid,
            status,
            stdio: p.stdio.clone(),
            exit,
        })
    }

    async fn close_io(&self, id: &str, exec_id: Option<&str>) -> Result<()> {
        let p = self.ctr(id)?.proc(exec_id)?;
        p.close_stdin();
        Ok(())
    }

    async fn resize_pty(
        &self,
        id: &str,
        exec_id: Option<&str>,
        width: u32,
        height: u32,
    ) -> Result<()> {
        let p = self.ctr(id)?.proc(exec_id)?;
        if !p.stdio.terminal {
            return Err(Error::FailedPrecondition(format!(
                "container {id}{}: resize pty: the process has no terminal",
                exec_id.map(|e| format!(" exec {e}")).unwrap_or_default()
            )));
        }
        if p.exited().is_some() {
            return Ok(());
        }
        let vm = self.vm().await?;
        let (cid, eid) = (id.to_string(), p.eid().to_string());
        blocking(move || vm.agent.resize_pty(&cid, &eid, width, height))
            .await?
            .map_err(agent_err)
    }

    async fn containers(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .containers
            .lock()
            .expect("containers poisoned")
            .keys()
            .cloned()
            .collect();
        ids.extend(
            self.creating
                .lock()
                .expect("creating poisoned")
                .iter()
                .cloned(),
        );
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_json_strips_host_fields_and_checks_on_the_host() {
        let r: LinuxResources = serde_json::from_str(
            r#"{"cpu":{"shares":512,"quota":50000,"period":100000,"cpus":"0-1","mems":"0"},
                "memory":{"limit":134217728},"hugepageLimits":[{"pageSize":"2MB","limit":0}],
                "blockIO":{"weight":100}}"#,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&update_json("c1", &r).unwrap()).unwrap();
        assert_eq!(v["memory"]["limit"], 134217728);
        assert_eq!(v["cpu"]["quota"], 50000);
        assert!(v["cpu"].get("cpus").is_none() && v["cpu"].get("mems").is_none());
        assert!(v.get("hugepageLimits").is_none() && v.get("blockIO").is_none());
        // the engine's checks run on the host: a bad cpuset is refused naming the field
        let bad: LinuxResources =
            serde_json::from_str(r#"{"cpu":{"cpus":"3-1"},"memory":{"limit":1}}"#).unwrap();
        let e = update_json("c1", &bad).unwrap_err().to_string();
        assert!(
            e.contains("c1") && e.contains("cpu.cpus") && e.contains("3-1"),
            "{e}"
        );
        // too much to send
        let devices: Vec<Value> = (0..2000)
            .map(|i| serde_json::json!({"allow": true, "type": "c", "major": i, "minor": i, "access": "rwm"}))
            .collect();
        let big: LinuxResources =
            serde_json::from_value(serde_json::json!({"devices": devices})).unwrap();
        let e = update_json("c1", &big).unwrap_err().to_string();
        assert!(e.contains("c1") && e.contains("more than the 65536"), "{e}");
    }

    #[test]
    fn record_round_trip_and_crash_cleanup_of_a_dead_shim() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path(), "ns1");
        let run_dir = tmp.path().join("run/123-pod");
        std::fs::create_dir_all(&run_dir).unwrap();
        std::fs::write(run_dir.join("console.log"), b"x").unwrap();
        let r = VmRecord {
            pod: "pod1".into(),
            // a pid that is not a shim
            shim_pid: u32::MAX - 1,
            run_dir: run_dir.clone(),
            vmm_pid: 0,
            containers: vec!["pod1".into(), "c2".into()],
            netns: None,
            net: None,
            cgroup: None,
            virtiofsd_pid: 0,
            vcpus: 1,
            memory_mib: 512,
        };
        save_record(&state, &r).unwrap();
        let path = record_path(&state, "pod1");
        assert_eq!(path, tmp.path().join("ns1/vm+pod1.json"));
        // an id the record does not name: nothing happens
        delete_after_crash(&state, "other");
        assert!(run_dir.exists() && path.exists());
        delete_after_crash(&state, "c2");
        assert!(!run_dir.exists(), "run dir removed");
        let back: VmRecord = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back.containers, vec!["pod1".to_string()]);
        delete_after_crash(&state, "pod1");
        assert!(!path.exists(), "record removed with its last container");
    }

    /// A dead shim's VM record names a real pod cgroup (every hierarchy of this host):
    /// `delete` after the crash removes it.
    #[test]
    fn crash_cleanup_removes_the_pod_cgroup() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path(), "ns1");
        let rel = format!("tandem-unit-{}/pod1", std::process::id());
        let cg = cgroup::PodCgroup::create(Path::new(CGROUP_ROOT), &rel, &serde_json::json!({}))
            .unwrap();
        let dirs = cg.dirs();
        assert!(
            !dirs.is_empty() && dirs.iter().all(|d| d.is_dir()),
            "{dirs:?}"
        );
        let r = VmRecord {
            pod: "pod1".into(),
            shim_pid: u32::MAX - 1,
            run_dir: tmp.path().join("run/1-pod1"),
            containers: vec!["pod1".into()],
            cgroup: Some(rel.clone()),
            ..Default::default()
        };
        save_record(&state, &r).unwrap();
        delete_after_crash(&state, "pod1");
        let left: Vec<_> = dirs.iter().filter(|d| d.exists()).collect();
        for d in &dirs {
            let _ = std::fs::remove_dir(d.parent().unwrap());
        }
        assert!(left.is_empty(), "cgroup dirs left: {left:?}");
        assert!(!record_path(&state, "pod1").exists());
    }
}
