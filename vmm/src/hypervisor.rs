//! The `Hypervisor` seam VM-mode pods use. `VmPod` never knows which backend it drives.

use serde::{Deserialize, Serialize};

use crate::config::{DiskConfig, NicConfig, VmConfig};
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
    /// Removes a disk added with [`RunningVm::hot_add_disk`] (the guest must release it).
    /// Default: unsupported.
    fn hot_remove_disk(&mut self, id: &str) -> Result<()> {
        Err(Error::Unsupported {
            backend: "hypervisor",
            feature: format!("hot-remove of disk {id}"),
        })
    }
    /// Stops the VM and waits for the VMM to be gone; idempotent.
    fn stop(&mut self) -> Result<()>;
}
