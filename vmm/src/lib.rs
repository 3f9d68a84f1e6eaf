//! tandem's hypervisor seam (`Hypervisor`) and its `microvm` backend: a KVM VMM on the rust-vmm
//! crates, run as its own process (binary `tandem-vmm`).

pub mod config;
pub mod error;
pub mod hypervisor;
pub mod microvm;
pub mod qemu;

pub use config::{
    AgentChannel, BootMode, CpuMode, DiskConfig, MemoryBacking, MemoryConfig, NicConfig,
    VcpuConfig, VmConfig, VsockConfig,
};
pub use error::{Error, Result};
pub use hypervisor::{kill_recorded, vmms_in, Hypervisor, RunningVm, VcpuThread, VmState};
pub use qemu::{Accel, Qemu, QemuConfig, QemuVm};
