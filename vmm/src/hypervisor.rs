//! The `Hypervisor` seam VM-mode pods use. `VmPod` never knows which backend it drives.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{DiskConfig, NicConfig, VcpuConfig, VmConfig};
use crate::error::{Error, Result};

/// Lifecycle state of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// vCPUs are running.
    Running,
    /// vCPUs are parked.
    Paused,
    /// The guest powered off or reset, or the VM was shut down.
    Stopped,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
        })
    }
}

/// A vCPU thread on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuThread {
    /// vCPU index.
    pub index: usize,
    /// Host thread id (as in /proc/<pid>/task/<tid>).
    pub tid: i32,
    /// Host CPU the thread is pinned to, if any.
    pub host_cpu: Option<usize>,
}

/// A hypervisor backend (`microvm`, `qemu`).
pub trait Hypervisor: Send + Sync {
    /// Backend name, e.g. "microvm".
    fn name(&self) -> &'static str;

    /// Starts a VM. On error nothing is left behind (no process, no socket).
    fn start(&self, config: &VmConfig) -> Result<Box<dyn RunningVm>>;
}

/// A started VM.
pub trait RunningVm: Send {
    /// Host pid of the VMM process.
    fn pid(&self) -> u32;
    /// Current state.
    fn state(&mut self) -> Result<VmState>;
    /// Host thread ids of the vCPUs.
    fn vcpu_threads(&mut self) -> Result<Vec<VcpuThread>>;
    /// Parks all vCPUs.
    fn pause(&mut self) -> Result<()>;
    /// Resumes parked vCPUs.
    fn resume(&mut self) -> Result<()>;
    /// Adds a NIC to the running VM.
    fn hot_add_nic(&mut self, nic: &NicConfig) -> Result<()>;
    /// Adds a virtio-blk disk to the running VM; returns its id, which is also the disk's serial
    /// as the guest sees it (`/sys/block/vdX/serial`, `/dev/disk/by-id/virtio-<id>`).
    /// Default: unsupported.
    fn hot_add_disk(&mut self, disk: &DiskConfig) -> Result<String> {
        Err(Error::Unsupported {
            backend: "hypervisor",
            feature: format!("hot-add of disk {}", disk.path.display()),
        })
    }
    /// Adds a virtio-fs device exporting `tag`, served by the vhost-user daemon listening on
    /// `socket` (the VM's memory must be shareable with it). Default: unsupported.
    fn hot_add_fs(&mut self, socket: &Path, tag: &str) -> Result<()> {
        Err(Error::Unsupported {
            backend: "hypervisor",
            feature: format!("virtio-fs {tag} on {}", socket.display()),
        })
    }
    /// Removes a disk added with [`RunningVm::hot_add_disk`] (the guest must release it).
    /// Default: unsupported.
    fn hot_remove_disk(&mut self, id: &str) -> Result<()> {
        Err(Error::Unsupported {
            backend: "hypervisor",
            feature: format!("hot-remove of disk {id}"),
        })
    }
    /// Makes the VM have `vcpus.len()` vCPUs (hot-plug): adds vCPUs, each thread pinned to its
    /// entry's `host_cpu` (entry `i` is the `i`-th vCPU), or removes vCPUs added earlier (the
    /// guest must release them; boot vCPUs are never removed). Returns the vCPU count the VMM
    /// has afterwards, read back from it (not the guest's word). Default: unsupported.
    fn resize_vcpus(&mut self, vcpus: &[VcpuConfig]) -> Result<usize> {
        Err(Error::Unsupported {
            backend: "hypervisor",
            feature: format!("vCPU hot-plug (to {})", vcpus.len()),
        })
    }
    /// Grows guest memory towards `size_mib` (hot-plug, in whole guest memory blocks, up to the
    /// maximum fixed at start; never shrinks). Returns the guest memory in MiB afterwards, read
    /// back from the VMM. Default: unsupported.
    fn resize_memory(&mut self, size_mib: u64) -> Result<u64> {
        Err(Error::Unsupported {
            backend: "hypervisor",
            feature: format!("memory hot-plug (to {size_mib} MiB)"),
        })
    }
    /// Stops the VM and waits for the VMM to be gone; idempotent.
    fn stop(&mut self) -> Result<()>;
}

/// How long [`kill_recorded`] waits for a VMM to be gone after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// The arguments of process `pid` (from /proc), or `None` when it is gone.
pub(crate) fn proc_args(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

/// Which backend's VMM these arguments are, when they are one of ours started with files in
/// `run_dir`: the program is QEMU, `tandem-vmm` or a VM's `virtiofsd` (kind "virtiofsd"), and an
/// argument names a path inside `run_dir`.
fn vmm_kind(args: &[String], run_dir: &Path) -> Option<&'static str> {
    let prog = Path::new(args.first()?).file_name()?.to_string_lossy();
    let kind = if prog.starts_with("qemu-system") {
        "qemu"
    } else if prog == "tandem-vmm" {
        "microvm"
    } else if prog == "virtiofsd" {
        // the virtio-fs daemon of a VM (its socket and shared dir are in the run dir)
        "virtiofsd"
    } else {
        return None;
    };
    let dir = run_dir.to_string_lossy();
    let inside = format!("{}/", dir.trim_end_matches('/'));
    args[1..]
        .iter()
        .any(|a| a.contains(&inside))
        .then_some(kind)
}

/// The pids of VMM processes (any backend, and virtio-fs daemons) whose command line names a file
/// in `run_dir`: what a VM record's run dir finds when a pid was never written (the owner died
/// mid-start), and the virtio-fs daemon of the VM.
pub fn vmms_in(run_dir: &Path) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if proc_args(pid).is_some_and(|a| vmm_kind(&a, run_dir).is_some()) {
            found.push(pid);
        }
    }
    found
}

/// Kills the VMM recorded as `pid` with run dir `run_dir` after its owner (a shim) died, whichever
/// backend started it, and waits until it is gone. The pid is checked first to be that VMM (a
/// pidfd is opened, then its command line must be QEMU's or `tandem-vmm`'s naming `run_dir`), so a
/// reused pid is never killed. QEMU's sockets and log in `run_dir` are removed too. Returns false
/// when no such VMM was running.
pub fn kill_recorded(pid: u32, run_dir: &Path) -> Result<bool> {
    // the pidfd first: the command line read after it is that process's, or it is gone
    let Ok(fd) = pidfd_open(pid) else {
        return Ok(false);
    };
    let kind = proc_args(pid).and_then(|a| vmm_kind(&a, run_dir));
    match kind {
        None => Ok(false),
        Some("qemu") => crate::qemu::kill_by_pid(pid, run_dir),
        Some(_) => {
            let perr = |reason: String| Error::Process {
                binary: format!("pid {pid}").into(),
                reason,
            };
            // SAFETY: plain syscall on a valid pidfd.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ESRCH) {
                    return Ok(false);
                }
                return Err(perr(format!("SIGKILL: {e}")));
            }
            if !pidfd_exited(&fd, KILL_TIMEOUT) {
                return Err(perr(format!("still alive {KILL_TIMEOUT:?} after SIGKILL")));
            }
            let mut status = 0;
            // SAFETY: reaps `pid` only if it is our child; ECHILD otherwise is fine.
            unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
            Ok(true)
        }
    }
}

pub(crate) fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd returned is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// True when the process behind `fd` exited within `timeout`.
pub(crate) fn pidfd_exited(fd: &OwnedFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n >= 0 {
            return n == 1;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn vmm_kinds_by_program_and_run_dir() {
        let run = Path::new("/run/tandem-vm/12-pod");
        let q = s(&[
            "/usr/bin/qemu-system-x86_64",
            "-qmp",
            "socket,id=qmp,server=on,wait=off,path=/run/tandem-vm/12-pod/qmp.sock",
        ]);
        assert_eq!(vmm_kind(&q, run), Some("qemu"));
        // another VM's run dir that shares a prefix
        assert_eq!(vmm_kind(&q, Path::new("/run/tandem-vm/12-po")), None);
        let m = s(&[
            "/usr/libexec/tandem-vmm",
            "--api-socket",
            "/run/tandem-vm/12-pod/tandem-vmm-1-0.sock",
        ]);
        assert_eq!(
            vmm_kind(&m, Path::new("/run/tandem-vm/12-pod/")),
            Some("microvm")
        );
        let v = s(&[
            "/usr/lib/qemu/virtiofsd",
            "-f",
            "--socket-path=/run/tandem-vm/12-pod/virtiofsd.sock",
            "-o",
            "source=/run/tandem-vm/12-pod/shared",
        ]);
        assert_eq!(vmm_kind(&v, run), Some("virtiofsd"));
        assert_eq!(vmm_kind(&v, Path::new("/run/tandem-vm/12-po")), None);
        // a program that is no VMM, naming the run dir
        let other = s(&["/bin/sleep", "/run/tandem-vm/12-pod/x"]);
        assert_eq!(vmm_kind(&other, run), None);
        assert_eq!(vmm_kind(&[], run), None);
    }

    #[test]
    fn kill_recorded_leaves_a_process_that_is_not_that_vmm() {
        let dir = tempfile::tempdir().unwrap();
        // named like a VMM of this run dir in its arguments, but not a VMM program
        let arg = dir.path().join("qmp.sock");
        // (`read` blocks on the piped stdin: no child process to leave behind)
        let mut child = Command::new("sh")
            .args(["-c", "read x", "sh"])
            .arg(&arg)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        assert!(!kill_recorded(child.id(), dir.path()).unwrap());
        assert!(vmms_in(dir.path()).is_empty());
        assert!(child.try_wait().unwrap().is_none(), "sleep must still run");
        child.kill().unwrap();
        child.wait().unwrap();
        // a pid that does not exist
        assert!(!kill_recorded(child.id(), dir.path()).unwrap());
    }

    #[test]
    fn kill_recorded_kills_a_vmm_of_the_run_dir() {
        // a `tandem-vmm` named program (sh, blocked in `read`) whose argument is in the run dir;
        // a symlink, not a copy: exec of a file just written fails with ETXTBSY while another
        // test thread forks with the copy's fd open
        let dir = tempfile::tempdir().unwrap();
        let prog = dir.path().join("tandem-vmm");
        std::os::unix::fs::symlink("/bin/sh", &prog).unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        let mut child = Command::new(&prog)
            .args(["-c", "read x", "sh"])
            .arg(run.join("ctl.sock"))
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        // the exec may not be visible in /proc yet
        while !vmms_in(&run).contains(&child.id()) {
            assert!(Instant::now() < deadline, "vmms_in never found the child");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!kill_recorded(child.id(), &dir.path().join("other")).unwrap());
        assert!(child.try_wait().unwrap().is_none());
        let pid = child.id();
        assert!(kill_recorded(pid, &run).unwrap());
        // killed and reaped by kill_recorded (it is our child here)
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        assert!(vmms_in(&run).is_empty());
    }
}
