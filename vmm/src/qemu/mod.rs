//! The `qemu` backend of the `Hypervisor` seam: one `qemu-system-x86_64` process per VM (q35,
//! PCI virtio devices), driven over QMP.
//!
//! QEMU runs in its own session (setsid) and is not tied to the caller's life: a restarted shim
//! re-attaches with [`Qemu::attach`] (pid + run dir from its on-disk state) or removes it with
//! [`kill_by_pid`]. Files in the run dir: `qmp.sock` (QMP), `qemu.log` (QEMU's stderr).

mod cmdline;
pub mod hotplug;
mod qmp;
pub mod virtiofs;

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::{validate_nic, AgentChannel, DiskConfig, NicConfig, VcpuConfig, VmConfig};
use crate::error::{Error, Result};
use crate::hypervisor::{
    pidfd_exited, pidfd_open, proc_args, Hypervisor, RunningVm, VcpuThread, VmState,
};

pub use cmdline::{
    cold_disk_args, cold_disk_id, command_line, mac_string, AGENT_PORT, QEMU_LOG, QMP_SOCKET,
};
pub use qmp::Qmp;

/// How long QEMU may take until QMP answers after spawn.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Limit of one QMP call.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `stop` waits after QMP `quit` before SIGKILL, and after SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long hot-remove waits for the guest to release a device.
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(15);

/// Which accelerator QEMU uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// KVM when it can boot a stock guest kernel, else TCG (see [`detect_accel`]).
    #[default]
    Auto,
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
    /// QEMU's binary translator (slow, works everywhere).
    Tcg,
}

/// Backend settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuConfig {
    /// The QEMU binary.
    #[serde(default = "default_binary")]
    pub binary: PathBuf,
    /// Accelerator.
    #[serde(default)]
    pub accel: Accel,
    /// Directory of this VM's QMP socket and QEMU log (one per VM; created if missing).
    pub run_dir: PathBuf,
    /// Free PCIe root ports made at start for hot-added NICs and disks.
    #[serde(default = "default_ports")]
    pub hotplug_ports: u8,
    /// Cgroup directories (one per hierarchy, all existing) QEMU joins between fork and exec,
    /// so that every thread it makes (vCPUs included) and every page it touches is in them
    /// from the start. Empty: QEMU stays in the caller's cgroups.
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
    /// Disks attached at start, each on a hot-plug port of its own (disk `i` on `hp<i>`, id
    /// [`cold_disk_id`]`(i)`): the guest finds them when it boots, without the PCIe hot-plug
    /// after boot, and [`RunningVm::hot_remove_disk`] takes them out like hot-added ones.
    #[serde(default)]
    pub cold_disks: Vec<DiskConfig>,
    /// Guest RAM a vhost-user daemon can map (a shared memfd, hugetlb kept), so that a
    /// virtio-fs device can be hot-added later ([`QemuVm::hot_add_fs`]).
    #[serde(default)]
    pub share_memory: bool,
    /// Most vCPUs the VM may have through hot-plug (`-smp <boot>,maxcpus=<n>`,
    /// [`RunningVm::resize_vcpus`]); not above the boot count (0): no vCPU hot-plug.
    #[serde(default)]
    pub max_vcpus: usize,
    /// Most guest memory in MiB through DIMM hot-plug (`-m <boot>M,slots=..,maxmem=<n>M`,
    /// [`RunningVm::resize_memory`]); not above the boot size (0): no memory hot-plug.
    #[serde(default)]
    pub max_memory_mib: u64,
    /// DIMM slots for memory hot-plug (each resize that adds memory takes one).
    #[serde(default = "default_memory_slots")]
    pub memory_slots: u8,
}

fn default_memory_slots() -> u8 {
    16
}

fn default_binary() -> PathBuf {
    "/usr/bin/qemu-system-x86_64".into()
}

fn default_ports() -> u8 {
    8
}

impl QemuConfig {
    /// Defaults (binary `/usr/bin/qemu-system-x86_64`, accel auto, 8 hot-plug ports) with
    /// `run_dir`.
    pub fn new(run_dir: impl Into<PathBuf>) -> Self {
        Self {
            binary: default_binary(),
            accel: Accel::Auto,
            run_dir: run_dir.into(),
            hotplug_ports: default_ports(),
            cgroups: Vec::new(),
            cold_disks: Vec::new(),
            share_memory: false,
            max_vcpus: 0,
            max_memory_mib: 0,
            memory_slots: default_memory_slots(),
        }
    }
}

/// Decides between KVM and TCG: KVM only when `dev_kvm` opens read-write and the KVM module is
/// not PVM (`<sys_module>/kvm_pvm` absent: a PVM host runs only PVM-enabled guest kernels, a stock
/// distribution kernel stops with an emulation failure). Returns the choice and why.
pub fn detect_accel(dev_kvm: &Path, sys_module: &Path) -> (Accel, String) {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev_kvm)
    {
        return (Accel::Tcg, format!("{}: {e}", dev_kvm.display()));
    }
    let pvm = sys_module.join("kvm_pvm");
    if pvm.exists() {
        return (
            Accel::Tcg,
            format!(
                "{} exists: KVM here is PVM, which cannot boot a stock guest kernel",
                pvm.display()
            ),
        );
    }
    (
        Accel::Kvm,
        format!("{} opens and KVM is not PVM", dev_kvm.display()),
    )
}

/// The `qemu` backend.
#[derive(Clone, Debug)]
pub struct Qemu {
    config: QemuConfig,
}

impl Qemu {
    /// Backend with `config`.
    pub fn new(config: QemuConfig) -> Self {
        Self { config }
    }

    /// Settings.
    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    /// The accelerator `start` uses (Auto resolved on this host) and why.
    pub fn accel(&self) -> (Accel, String) {
        match self.config.accel {
            Accel::Auto => detect_accel(Path::new("/dev/kvm"), Path::new("/sys/module")),
            a => (a, "configured".into()),
        }
    }

    /// Starts a VM and returns the concrete handle (see [`Hypervisor::start`]).
    pub fn start_vm(&self, vm: &VmConfig) -> Result<QemuVm> {
        vm.validate()?;
        let binary = &self.config.binary;
        let qerr = |reason: String| Error::Qemu {
            binary: binary.clone(),
            reason,
        };
        match std::fs::metadata(binary) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(qerr("not a regular file".into())),
            Err(e) => return Err(qerr(format!("cannot use the binary: {e}"))),
        }
        let (accel, why) = self.accel();
        tracing::info!(accel = ?accel, "qemu accelerator: {why}");
        let run_dir = &self.config.run_dir;
        let mut args = command_line(vm, accel, run_dir, self.config.hotplug_ports)?;
        if self.config.share_memory {
            virtiofs::share_guest_memory(&mut args)?;
        }
        hotplug::set_hotplug_limits(
            &mut args,
            self.config.max_vcpus,
            self.config.max_memory_mib,
            self.config.memory_slots,
        )?;
        let (_, max_memory_mib) = hotplug::limits_of(&args);
        let mem_object = hotplug::boot_memory_object(&args);
        for (i, d) in self.config.cold_disks.iter().enumerate() {
            if !d.path.is_file() {
                return Err(Error::invalid(
                    format!("cold_disks[{i}].path"),
                    format!("{}: not a regular file", d.path.display()),
                ));
            }
        }
        args.extend(cold_disk_args(
            &self.config.cold_disks,
            self.config.hotplug_ports,
        )?);
        let created_dir = !run_dir.exists();
        std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
        let qmp_path = run_dir.join(QMP_SOCKET);
        let agent_socket = vm
            .agent
            .as_ref()
            .map(|AgentChannel::SerialPort { socket }| socket.clone());
        // Leftover sockets of a dead QEMU would make the new one fail to bind; a live one is an
        // error (two VMs on one run dir).
        for s in std::iter::once(&qmp_path).chain(agent_socket.as_ref()) {
            clear_stale_socket(s)?;
        }
        let netns = match &vm.netns {
            Some(p) => Some(File::open(p).map_err(|e| Error::io(p, e))?),
            None => None,
        };
        // Opened here, written ("0": the writer itself) by the child before exec.
        let mut procs_files = Vec::new();
        for dir in &self.config.cgroups {
            let p = dir.join("cgroup.procs");
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(|e| Error::io(&p, e))?;
            procs_files.push(f);
        }
        let log_path = run_dir.join(QEMU_LOG);
        let log = File::create(&log_path).map_err(|e| Error::io(&log_path, e))?;
        let mut cmd = Command::new(binary);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
        let procs_fds: Vec<i32> = procs_files.iter().map(|f| f.as_raw_fd()).collect();
        // SAFETY: only async-signal-safe calls (setsid, write, setns) between fork and exec.
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
                if let Some(fd) = netns_fd {
                    if libc::setns(fd, libc::CLONE_NEWNET) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let child = cmd.spawn().map_err(|e| {
            if created_dir {
                let _ = std::fs::remove_dir(run_dir);
            }
            let _ = std::fs::remove_file(&log_path);
            if self.config.cgroups.is_empty() {
                qerr(format!("spawn: {e}"))
            } else {
                qerr(format!(
                    "spawn (joining cgroups {:?}): {e}",
                    self.config.cgroups
                ))
            }
        })?;
        drop(netns);
        drop(procs_files);
        let pid = child.id();
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                // SAFETY: our own unreaped child.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                let mut child = child;
                let _ = child.wait();
                return Err(qerr(format!("pidfd_open({pid}): {e}")));
            }
        };
        let mut q = QemuVm {
            pid,
            pidfd,
            child: Some(child),
            qmp: None,
            label: binary.clone(),
            run_dir: run_dir.clone(),
            qmp_path,
            agent_socket,
            stopped: false,
            mem_object,
            max_memory_mib,
        };
        match q.boot(vm, started) {
            Ok(()) => {
                tracing::info!(
                    pid,
                    "qemu started in {:?} (QMP up, vCPUs pinned, running)",
                    started.elapsed()
                );
                Ok(q)
            }
            Err(e) => {
                let _ = q.kill_and_clean();
                q.stopped = true;
                let _ = std::fs::remove_file(&log_path);
                if created_dir {
                    let _ = std::fs::remove_dir(run_dir);
                }
                Err(e)
            }
        }
    }

    /// Re-attaches to a QEMU started by [`Qemu::start`] (e.g. by a previous shim), given its pid
    /// and run dir: checks that the pid is that QEMU (its command line names the run dir's QMP
    /// socket) and reconnects QMP.
    pub fn attach(pid: u32, run_dir: &Path) -> Result<Box<dyn RunningVm>> {
        Ok(Box::new(QemuVm::attach(pid, run_dir)?))
    }
}

impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn start(&self, config: &VmConfig) -> Result<Box<dyn RunningVm>> {
        Ok(Box::new(self.start_vm(config)?))
    }
}

/// Removes `path` if it is a socket nobody listens on; errors if someone does.
fn clear_stale_socket(path: &Path) -> Result<()> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(Error::invalid(
            "socket",
            format!("{}: in use by a running process", path.display()),
        ));
    }
    std::fs::remove_file(path).map_err(|e| Error::io(path, e))
}

fn pidfd_kill(fd: &OwnedFd, sig: i32) -> std::io::Result<()> {
    // SAFETY: plain syscall on a valid pidfd.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// True when the arguments are those of a QEMU whose QMP socket is in `run_dir`.
fn is_our_qemu(args: &[String], run_dir: &Path) -> bool {
    let want = format!(
        "socket,id=qmp,server=on,wait=off,path={}",
        cmdline::opt_escape(&run_dir.join(QMP_SOCKET).to_string_lossy())
    );
    args.contains(&want)
}

/// The agent socket named in a QEMU command line.
fn agent_socket_of(args: &[String]) -> Option<PathBuf> {
    args.iter()
        .find_map(|a| a.strip_prefix("socket,id=agent,server=on,wait=off,path="))
        .map(|p| PathBuf::from(cmdline::opt_unescape(p)))
}

/// Kills the QEMU with `pid` started with run dir `run_dir` (for a shim's `delete` after a
/// restart) and removes its sockets and log. Checks first that `pid` is that QEMU (against pid
/// reuse). Returns false when no such process was running (then only files are removed).
pub fn kill_by_pid(pid: u32, run_dir: &Path) -> Result<bool> {
    let fd = pidfd_open(pid).ok();
    let args = proc_args(pid);
    let ours = matches!((&fd, &args), (Some(_), Some(a)) if is_our_qemu(a, run_dir));
    let mut killed = false;
    let agent = args.as_deref().and_then(agent_socket_of);
    if ours {
        let fd = fd.expect("checked");
        pidfd_kill(&fd, libc::SIGKILL).map_err(|e| Error::Qemu {
            binary: format!("pid {pid}").into(),
            reason: format!("SIGKILL: {e}"),
        })?;
        if !pidfd_exited(&fd, STOP_TIMEOUT) {
            return Err(Error::Qemu {
                binary: format!("pid {pid}").into(),
                reason: format!("still alive {STOP_TIMEOUT:?} after SIGKILL"),
            });
        }
        reap(pid);
        killed = true;
    }
    let _ = std::fs::remove_file(run_dir.join(QMP_SOCKET));
    let _ = std::fs::remove_file(run_dir.join(QEMU_LOG));
    if let Some(a) = agent {
        let _ = std::fs::remove_file(a);
    }
    Ok(killed)
}

/// Reaps `pid` if it is our child (someone else's reaper may have done it: ECHILD is fine).
fn reap(pid: u32) {
    let mut status = 0;
    // SAFETY: plain syscall.
    unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
}

/// A running QEMU.
pub struct QemuVm {
    pid: u32,
    pidfd: OwnedFd,
    child: Option<Child>,
    qmp: Option<Qmp>,
    /// Binary path (or "pid N" when attached), for error messages.
    label: PathBuf,
    run_dir: PathBuf,
    qmp_path: PathBuf,
    agent_socket: Option<PathBuf>,
    stopped: bool,
    /// The boot RAM object (`mem0`), the model of hot-added memory backends.
    mem_object: Option<Value>,
    /// Most guest memory in MiB (`maxmem`, or the boot size without memory hot-plug).
    max_memory_mib: u64,
}

impl std::fmt::Debug for QemuVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuVm")
            .field("pid", &self.pid)
            .field("run_dir", &self.run_dir)
            .finish()
    }
}

impl QemuVm {
    fn qerr(&self, reason: impl Into<String>) -> Error {
        Error::Qemu {
            binary: self.label.clone(),
            reason: reason.into(),
        }
    }

    /// QEMU's stderr so far, last lines (for error messages).
    fn stderr_tail(&self) -> String {
        let s = std::fs::read_to_string(self.run_dir.join(QEMU_LOG)).unwrap_or_default();
        let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
        if tail.len() > 2000 {
            tail[tail.len() - 2000..].to_string()
        } else {
            tail
        }
    }

    fn exit_status(&mut self) -> String {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(st))) => st.to_string(),
            _ => "exited".into(),
        }
    }

    fn early_exit(&mut self) -> Error {
        let st = self.exit_status();
        let tail = self.stderr_tail();
        self.qerr(format!("exited early ({st}): {tail}"))
    }

    /// Connects QMP (QEMU was started with -S), pins vCPUs, lets them run.
    fn boot(&mut self, vm: &VmConfig, started: Instant) -> Result<()> {
        let deadline = started + START_TIMEOUT;
        loop {
            if pidfd_exited(&self.pidfd, Duration::ZERO) {
                return Err(self.early_exit());
            }
            if self.qmp_path.exists() {
                match Qmp::connect(&self.qmp_path, QMP_TIMEOUT) {
                    Ok(q) => {
                        self.qmp = Some(q);
                        break;
                    }
                    Err(e) => {
                        if pidfd_exited(&self.pidfd, Duration::from_millis(200)) {
                            return Err(self.early_exit());
                        }
                        if Instant::now() > deadline {
                            return Err(e);
                        }
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(self.qerr(format!(
                    "QMP socket {} not up within {START_TIMEOUT:?}",
                    self.qmp_path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let threads = self.vcpu_threads()?;
        if threads.len() != vm.vcpus.len() {
            return Err(self.qerr(format!(
                "{} vCPU threads, {} configured",
                threads.len(),
                vm.vcpus.len()
            )));
        }
        for t in &threads {
            if let Some(cpu) = vm.vcpus.get(t.index).and_then(|v| v.host_cpu) {
                pin(t.tid, cpu).map_err(|e| Error::Vcpu {
                    index: t.index,
                    reason: format!("pin thread {} to host CPU {cpu}: {e}", t.tid),
                })?;
            }
        }
        if cmdline::starts_stopped(vm) {
            self.qmp()?.execute("cont", None)?;
        }
        Ok(())
    }

    fn attach(pid: u32, run_dir: &Path) -> Result<Self> {
        let label = PathBuf::from(format!("pid {pid}"));
        let err = |reason: String| Error::Qemu {
            binary: label.clone(),
            reason,
        };
        let pidfd = pidfd_open(pid).map_err(|e| err(format!("pidfd_open: {e}")))?;
        let args = proc_args(pid).ok_or_else(|| err("no such process".into()))?;
        if !is_our_qemu(&args, run_dir) {
            return Err(err(format!(
                "not the QEMU of run dir {} (pid reused?)",
                run_dir.display()
            )));
        }
        let qmp_path = run_dir.join(QMP_SOCKET);
        let qmp = Qmp::connect(&qmp_path, QMP_TIMEOUT)?;
        Ok(QemuVm {
            pid,
            pidfd,
            child: None,
            qmp: Some(qmp),
            label,
            run_dir: run_dir.to_path_buf(),
            qmp_path,
            agent_socket: agent_socket_of(&args),
            stopped: false,
            mem_object: hotplug::boot_memory_object(&args),
            max_memory_mib: hotplug::limits_of(&args).1,
        })
    }

    fn qmp(&mut self) -> Result<&mut Qmp> {
        if self.stopped {
            return Err(Error::BadState {
                state: "stopped".into(),
                op: "use QMP".into(),
            });
        }
        if self.qmp.is_none() {
            self.qmp = Some(Qmp::connect(&self.qmp_path, QMP_TIMEOUT)?);
        }
        Ok(self.qmp.as_mut().expect("just set"))
    }

    /// Runs a QMP command (for callers that need more than the trait offers).
    pub fn qmp_execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.qmp()?.execute(command, arguments)
    }

    /// Lets go of the VM without stopping it (closes QMP; QEMU runs on). Returns the pid; a later
    /// [`Qemu::attach`] with it and the run dir takes the VM back.
    pub fn detach(mut self) -> u32 {
        self.qmp = None;
        self.stopped = true;
        self.pid
    }

    /// The run dir.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Hot-adds a `vhost-user-fs-pci` device exporting `tag`, served by the vhost-user daemon
    /// listening on `socket` (e.g. [`virtiofs::Virtiofsd`]); the VM must have been started with
    /// [`QemuConfig::share_memory`]. Chardev `vfsN` + device `vfsN-dev`, on a free root port.
    pub fn hot_add_fs(&mut self, socket: &Path, tag: &str) -> Result<()> {
        virtiofs::check_tag(tag)?;
        let chardevs = self.qmp()?.execute("query-chardev", None)?;
        let taken: Vec<String> = chardevs
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["label"].as_str().map(str::to_string))
            .collect();
        let id = (0..)
            .map(|n| format!("vfs{n}"))
            .find(|id| !taken.contains(id))
            .expect("a free name");
        let bus = self.free_port()?;
        let q = self.qmp()?;
        let mut r = q.execute("chardev-add", Some(virtiofs::chardev_add_args(&id, socket)));
        if r.is_err() {
            // the daemon binds its socket just before it listens
            std::thread::sleep(Duration::from_millis(100));
            r = q.execute("chardev-add", Some(virtiofs::chardev_add_args(&id, socket)));
        }
        r?;
        if let Err(e) = q.execute(
            "device_add",
            Some(virtiofs::device_add_args(
                &format!("{id}-dev"),
                &id,
                tag,
                &bus,
            )),
        ) {
            let _ = q.execute("chardev-remove", Some(json!({ "id": id })));
            return Err(e);
        }
        Ok(())
    }

    /// IDs of the root ports `hp<N>` that have no device.
    fn free_port(&mut self) -> Result<String> {
        let buses = self.qmp()?.execute("query-pci", None)?;
        let mut free = Vec::new();
        for bus in buses.as_array().into_iter().flatten() {
            for dev in bus["devices"].as_array().into_iter().flatten() {
                let id = dev["qdev_id"].as_str().unwrap_or("");
                if !id.starts_with("hp") {
                    continue;
                }
                let empty = dev["pci_bridge"]["devices"]
                    .as_array()
                    .is_none_or(|d| d.is_empty());
                if empty {
                    free.push(id.to_string());
                }
            }
        }
        free.sort_by_key(|id| id[2..].parse::<u32>().unwrap_or(u32::MAX));
        free.into_iter()
            .next()
            .ok_or_else(|| self.qerr("no free hot-plug port left (QemuConfig.hotplug_ports)"))
    }

    fn wait_gone(&mut self, timeout: Duration) -> bool {
        if pidfd_exited(&self.pidfd, timeout) {
            if let Some(c) = self.child.as_mut() {
                let _ = c.try_wait();
            } else {
                reap(self.pid);
            }
            true
        } else {
            false
        }
    }

    fn kill_and_clean(&mut self) -> Result<()> {
        self.qmp = None;
        if !self.wait_gone(Duration::ZERO) {
            pidfd_kill(&self.pidfd, libc::SIGKILL)
                .map_err(|e| self.qerr(format!("SIGKILL: {e}")))?;
            if !self.wait_gone(STOP_TIMEOUT) {
                return Err(self.qerr(format!("still alive {STOP_TIMEOUT:?} after SIGKILL")));
            }
        }
        let _ = std::fs::remove_file(&self.qmp_path);
        if let Some(a) = &self.agent_socket {
            let _ = std::fs::remove_file(a);
        }
        Ok(())
    }
}

/// Pins thread `tid` to host CPU `cpu`.
fn pin(tid: i32, cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET bounds-checks.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: valid set of the given size.
    if unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The single CPU `tid` is pinned to, if it is pinned to exactly one.
fn pinned_cpu(tid: i32) -> Option<usize> {
    // SAFETY: zeroed set filled by the kernel.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } < 0
    {
        return None;
    }
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        .filter(|c| unsafe { libc::CPU_ISSET(*c, &set) })
        .collect();
    (cpus.len() == 1).then(|| cpus[0])
}

impl RunningVm for QemuVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn state(&mut self) -> Result<VmState> {
        if self.stopped || self.wait_gone(Duration::ZERO) {
            return Ok(VmState::Stopped);
        }
        match self.qmp().and_then(|q| q.execute("query-status", None)) {
            Ok(v) => Ok(match v["status"].as_str().unwrap_or("") {
                "running" => VmState::Running,
                "shutdown" | "guest-panicked" | "internal-error" | "io-error" => VmState::Stopped,
                _ => VmState::Paused,
            }),
            Err(e) => {
                self.qmp = None;
                if self.wait_gone(Duration::from_secs(1)) {
                    Ok(VmState::Stopped)
                } else {
                    Err(e)
                }
            }
        }
    }

    fn vcpu_threads(&mut self) -> Result<Vec<VcpuThread>> {
        let v = self.qmp()?.execute("query-cpus-fast", None)?;
        let mut out = Vec::new();
        for c in v.as_array().into_iter().flatten() {
            let (Some(index), Some(tid)) = (c["cpu-index"].as_u64(), c["thread-id"].as_i64())
            else {
                return Err(self.qerr(format!("query-cpus-fast: unexpected entry {c}")));
            };
            out.push(VcpuThread {
                index: index as usize,
                tid: tid as i32,
                host_cpu: pinned_cpu(tid as i32),
            });
        }
        out.sort_by_key(|t| t.index);
        Ok(out)
    }

    fn pause(&mut self) -> Result<()> {
        self.qmp()?.execute("stop", None).map(|_| ())
    }

    fn resume(&mut self) -> Result<()> {
        self.qmp()?.execute("cont", None).map(|_| ())
    }

    fn hot_add_nic(&mut self, nic: &NicConfig) -> Result<()> {
        validate_nic(nic).map_err(|r| Error::invalid("nic", r))?;
        let id = format!("hn-{}", nic.tap);
        let bus = self.free_port()?;
        let q = self.qmp()?;
        q.execute(
            "netdev_add",
            Some(json!({"type": "tap", "id": id, "ifname": nic.tap,
                        "script": "no", "downscript": "no", "vhost": false})),
        )?;
        if let Err(e) = q.execute(
            "device_add",
            Some(
                json!({"driver": "virtio-net-pci", "id": format!("{id}-dev"), "netdev": id,
                        "mac": mac_string(&nic.mac), "bus": bus}),
            ),
        ) {
            let _ = q.execute("netdev_del", Some(json!({ "id": id })));
            return Err(e);
        }
        Ok(())
    }

    fn hot_add_disk(&mut self, disk: &DiskConfig) -> Result<String> {
        let path = disk.path.to_str().ok_or_else(|| {
            Error::invalid("disk.path", format!("{}: not UTF-8", disk.path.display()))
        })?;
        if !disk.path.is_file() {
            return Err(Error::invalid(
                "disk.path",
                format!("{path}: not a regular file"),
            ));
        }
        let nodes = self.qmp()?.execute("query-named-block-nodes", None)?;
        let taken: Vec<&str> = nodes
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["node-name"].as_str())
            .collect();
        let id = (0..)
            .map(|n| format!("hd{n}"))
            .find(|id| {
                !taken.contains(&id.as_str()) && !taken.contains(&format!("{id}-file").as_str())
            })
            .expect("a free name");
        let bus = self.free_port()?;
        let q = self.qmp()?;
        q.execute(
            "blockdev-add",
            Some(
                json!({"driver": "raw", "node-name": id, "read-only": disk.read_only,
                        "file": {"driver": "file", "node-name": format!("{id}-file"),
                                 "filename": path, "read-only": disk.read_only}}),
            ),
        )?;
        if let Err(e) = q.execute(
            "device_add",
            Some(
                json!({"driver": "virtio-blk-pci", "id": id, "drive": id, "serial": id,
                        "bus": bus}),
            ),
        ) {
            let _ = q.execute("blockdev-del", Some(json!({ "node-name": id })));
            return Err(e);
        }
        Ok(id)
    }

    fn hot_add_fs(&mut self, socket: &Path, tag: &str) -> Result<()> {
        QemuVm::hot_add_fs(self, socket, tag)
    }

    fn resize_vcpus(&mut self, vcpus: &[VcpuConfig]) -> Result<usize> {
        self.hotplug_vcpus(vcpus)
    }

    fn resize_memory(&mut self, size_mib: u64) -> Result<u64> {
        self.hotplug_memory(size_mib)
    }

    fn hot_remove_disk(&mut self, id: &str) -> Result<()> {
        if !id.starts_with("hd") || id.len() > 20 || !id[2..].bytes().all(|b| b.is_ascii_digit()) {
            return Err(Error::invalid(
                "disk id",
                format!("{id:?}: not a hot-added disk id (hdN)"),
            ));
        }
        let q = self.qmp()?;
        q.execute("device_del", Some(json!({ "id": id })))?;
        q.wait_event("DEVICE_DELETED", UNPLUG_TIMEOUT, |d| {
            d["device"].as_str() == Some(id)
        })?;
        q.execute("blockdev-del", Some(json!({ "node-name": id })))?;
        Ok(())
    }

    fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        if !self.wait_gone(Duration::ZERO) {
            if let Ok(q) = self.qmp() {
                // QEMU may exit before it replies.
                let _ = q.execute("quit", None);
            }
            if !self.wait_gone(STOP_TIMEOUT) {
                tracing::warn!(pid = self.pid, "qemu did not quit; killing it");
            }
        }
        self.kill_and_clean()?;
        let _ = std::fs::remove_file(self.run_dir.join(QEMU_LOG));
        self.stopped = true;
        Ok(())
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!(pid = self.pid, "stopping qemu: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accel_detection_on_fake_trees() {
        let dir = tempfile::tempdir().unwrap();
        let kvm = dir.path().join("kvm");
        let modules = dir.path().join("module");
        std::fs::create_dir(&modules).unwrap();

        let (a, why) = detect_accel(&kvm, &modules);
        assert_eq!(a, Accel::Tcg);
        assert!(why.contains("kvm") && why.contains("No such file"), "{why}");

        std::fs::write(&kvm, b"").unwrap();
        let (a, why) = detect_accel(&kvm, &modules);
        assert_eq!(a, Accel::Kvm, "{why}");

        std::fs::create_dir(modules.join("kvm_pvm")).unwrap();
        let (a, why) = detect_accel(&kvm, &modules);
        assert_eq!(a, Accel::Tcg);
        assert!(why.contains("PVM"), "{why}");
    }

    #[test]
    fn auto_picks_tcg_on_this_pvm_host() {
        // This machine's /dev/kvm is PVM (docs field notes); a host without kvm_pvm may differ.
        if Path::new("/sys/module/kvm_pvm").exists() {
            let q = Qemu::new(QemuConfig::new("/tmp/x"));
            assert_eq!(q.accel().0, Accel::Tcg);
        }
    }

    #[test]
    fn our_qemu_is_recognised_by_its_qmp_socket() {
        let run = Path::new("/run/tandem/p,1");
        let args = command_line(
            &VmConfig {
                kernel: "/k".into(),
                boot: Default::default(),
                initrd: None,
                cmdline: String::new(),
                vcpus: vec![crate::config::VcpuConfig { host_cpu: None }],
                memory: crate::config::MemoryConfig {
                    size_mib: 64,
                    ..Default::default()
                },
                nics: vec![],
                disks: vec![],
                vsock: None,
                serial_log: None,
                agent: Some(AgentChannel::SerialPort {
                    socket: "/run/a,b/agent.sock".into(),
                }),
                netns: None,
            },
            Accel::Tcg,
            run,
            0,
        )
        .unwrap();
        assert!(is_our_qemu(&args, run));
        assert!(!is_our_qemu(&args, Path::new("/run/tandem/p")));
        assert_eq!(
            agent_socket_of(&args),
            Some(PathBuf::from("/run/a,b/agent.sock"))
        );
    }

    #[test]
    fn kill_by_pid_refuses_a_foreign_process() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let killed = kill_by_pid(child.id(), dir.path()).unwrap();
        assert!(!killed);
        assert!(child.try_wait().unwrap().is_none(), "sleep must still run");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn pin_and_read_back() {
        // SAFETY: gettid has no effects.
        let tid = unsafe { libc::gettid() };
        pin(tid, 0).unwrap();
        assert_eq!(pinned_cpu(tid), Some(0));
    }
}
