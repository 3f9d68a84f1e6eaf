//! The `microvm` backend of the `Hypervisor` seam: runs each VM in its own `tandem-vmm` process
//! and drives it over its control socket.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::{validate_nic, DiskConfig, NicConfig, VmConfig};
use crate::error::{Error, Result};
use crate::hypervisor::{Hypervisor, RunningVm, VcpuThread, VmState};
use crate::microvm::control::{self, Request};

/// How long the process may take to report READY.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of one control request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `stop` waits for the process before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

static NEXT: AtomicU64 = AtomicU64::new(0);

/// The `microvm` backend.
#[derive(Clone, Debug)]
pub struct MicroVm {
    binary: PathBuf,
    runtime_dir: PathBuf,
    seccomp: bool,
}

impl MicroVm {
    /// Backend running `binary` (the `tandem-vmm` executable), with control sockets and process
    /// logs in `runtime_dir`.
    pub fn new(binary: impl Into<PathBuf>, runtime_dir: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            runtime_dir: runtime_dir.into(),
            seccomp: true,
        }
    }

    /// Disables the seccomp filters of the VMM process (debugging only).
    pub fn without_seccomp(mut self) -> Self {
        self.seccomp = false;
        self
    }
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd returned is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until `fd` is readable or `timeout` passes.
fn poll_in(fd: i32, timeout: Duration) -> std::io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis() as i32) };
        if n >= 0 {
            return Ok(n == 1);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string()
}

impl Hypervisor for MicroVm {
    fn name(&self) -> &'static str {
        "microvm"
    }

    fn start(&self, config: &VmConfig) -> Result<Box<dyn RunningVm>> {
        config.validate()?;
        crate::microvm::check_supported(config)?;
        // The process joins the pod's network namespace before exec, so it finds the taps.
        let netns = match &config.netns {
            Some(p) => Some(File::open(p).map_err(|e| Error::io(p, e))?),
            None => None,
        };
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = format!("tandem-vmm-{}-{n}", std::process::id());
        let socket = self.runtime_dir.join(format!("{base}.sock"));
        let log = self.runtime_dir.join(format!("{base}.log"));
        let perr = |reason: String| Error::Process {
            binary: self.binary.clone(),
            reason,
        };
        let json = serde_json::to_string(config).map_err(|e| perr(format!("config: {e}")))?;
        let log_file = File::create(&log).map_err(|e| Error::io(&log, e))?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--config-json")
            .arg(json)
            .arg("--api-socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file);
        if !self.seccomp {
            cmd.arg("--no-seccomp");
        }
        if let Some(ns) = &netns {
            use std::os::unix::process::CommandExt;
            let fd = ns.as_raw_fd();
            // SAFETY: only setns(2) runs between fork and exec; the fd is open in the parent
            // (O_CLOEXEC: the exec closes it).
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&log);
                return Err(match &config.netns {
                    Some(p) => perr(format!("spawn in network namespace {}: {e}", p.display())),
                    None => perr(format!("spawn: {e}")),
                });
            }
        };
        let mut vm = MicroVmProcess {
            child: Some(ChildHandle { pid: child.id() }),
            pid: child.id(),
            socket,
            log,
            binary: self.binary.clone(),
            stopped: false,
            disks: 0,
        };
        match wait_ready(&mut child) {
            Ok(()) => Ok(Box::new(vm)),
            Err(reason) => {
                let last = tail(&vm.log);
                let _ = vm.kill_and_clean();
                let _ = child.wait();
                Err(perr(if last.is_empty() {
                    reason
                } else {
                    format!("{reason}: {last}")
                }))
            }
        }
    }
}

fn wait_ready(child: &mut Child) -> std::result::Result<(), String> {
    let mut out = child.stdout.take().ok_or("no stdout pipe")?;
    let mut buf = Vec::new();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match poll_in(out.as_raw_fd(), left) {
            Ok(true) => {}
            Ok(false) => return Err(format!("not ready within {START_TIMEOUT:?}")),
            Err(e) => return Err(format!("poll stdout: {e}")),
        }
        let mut chunk = [0u8; 64];
        let n = out
            .read(&mut chunk)
            .map_err(|e| format!("read stdout: {e}"))?;
        if n == 0 {
            let status = child.wait().map_err(|e| format!("wait: {e}"))?;
            return Err(format!("exited before ready ({status})"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.starts_with(b"READY\n") {
            return Ok(());
        }
        if buf.len() >= 6 {
            return Err(format!(
                "unexpected output {:?}",
                String::from_utf8_lossy(&buf)
            ));
        }
    }
}

struct ChildHandle {
    pid: u32,
}

/// A running `tandem-vmm` process.
pub struct MicroVmProcess {
    child: Option<ChildHandle>,
    pid: u32,
    socket: PathBuf,
    log: PathBuf,
    binary: PathBuf,
    stopped: bool,
    /// Disks hot-added so far (their ids are `tdisk<n>`).
    disks: u64,
}

impl MicroVmProcess {
    fn req(&self, r: Request) -> Result<control::Response> {
        if self.stopped {
            return Err(Error::BadState {
                state: VmState::Stopped.to_string(),
                op: format!("{r:?}"),
            });
        }
        control::request(&self.socket, &r, REQUEST_TIMEOUT)
    }

    /// Path of the control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Waits for the process to exit within `timeout`; true if it did (and is reaped).
    fn wait_exit(&mut self, timeout: Duration) -> Result<bool> {
        let Some(c) = &self.child else {
            return Ok(true);
        };
        let pidfd = match pidfd_open(c.pid) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                self.child = None;
                return Ok(true);
            }
            Err(e) => {
                return Err(Error::Process {
                    binary: self.binary.clone(),
                    reason: format!("pidfd_open {}: {e}", c.pid),
                })
            }
        };
        if poll_in(pidfd.as_raw_fd(), timeout).unwrap_or(false) {
            let mut status = 0;
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(c.pid as i32, &mut status, 0) };
            self.child = None;
            return Ok(true);
        }
        Ok(false)
    }

    fn kill_and_clean(&mut self) -> Result<()> {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own (unreaped) child.
            unsafe { libc::kill(c.pid as i32, libc::SIGKILL) };
            self.wait_exit(STOP_TIMEOUT)?;
        }
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.log);
        Ok(())
    }
}

impl RunningVm for MicroVmProcess {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn state(&mut self) -> Result<VmState> {
        if self.stopped || self.wait_exit(Duration::ZERO)? {
            return Ok(VmState::Stopped);
        }
        match self.req(Request::State) {
            Ok(r) => Ok(r.state.unwrap_or(VmState::Stopped)),
            // The guest may end the VM while we ask: then the process is on its way out.
            Err(e) => {
                if self.wait_exit(Duration::from_secs(1))? {
                    Ok(VmState::Stopped)
                } else {
                    Err(e)
                }
            }
        }
    }

    fn vcpu_threads(&mut self) -> Result<Vec<VcpuThread>> {
        Ok(self.req(Request::VcpuThreads)?.vcpus.unwrap_or_default())
    }

    fn pause(&mut self) -> Result<()> {
        self.req(Request::Pause).map(|_| ())
    }

    fn resume(&mut self) -> Result<()> {
        self.req(Request::Resume).map(|_| ())
    }

    fn hot_add_nic(&mut self, nic: &NicConfig) -> Result<()> {
        validate_nic(nic).map_err(|r| Error::invalid("nic", r))?;
        self.req(Request::AddNic { nic: nic.clone() }).map(|_| ())
    }

    fn hot_add_disk(&mut self, disk: &DiskConfig) -> Result<String> {
        let id = format!("tdisk{}", self.disks);
        self.req(Request::AddDisk {
            disk: disk.clone(),
            id: id.clone(),
        })?;
        self.disks += 1;
        Ok(id)
    }

    /// Not supported: the microvm's slots have no eject path (`_EJ0`) yet.
    fn hot_remove_disk(&mut self, id: &str) -> Result<()> {
        Err(Error::Unsupported {
            backend: "microvm",
            feature: format!("hot-remove of disk {id}"),
        })
    }

    fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        if self.child.is_some() {
            // The guest may have ended the VM already: then the socket is gone.
            let _ = control::request(&self.socket, &Request::Shutdown, REQUEST_TIMEOUT);
            if !self.wait_exit(STOP_TIMEOUT)? {
                tracing::warn!("tandem-vmm {} did not exit; killing it", self.pid);
            }
        }
        self.kill_and_clean()?;
        self.stopped = true;
        Ok(())
    }
}

impl Drop for MicroVmProcess {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!("stopping tandem-vmm {}: {e}", self.pid);
        }
    }
}
