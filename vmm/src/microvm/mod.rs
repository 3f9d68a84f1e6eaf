//! tandem's own microVM: a KVM VMM on the rust-vmm crates.

pub mod arch;
pub mod backend;
pub mod bus;
pub mod control;
pub mod devices;
#[doc(hidden)]
pub mod fuzzing;
pub mod memory;
pub mod seccomp;
pub mod server;
pub mod vcpu;
pub mod virtio;
pub mod vm;

pub use vm::{Vm, VmOptions};
