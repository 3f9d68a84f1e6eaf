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

use crate::config::{AgentChannel, VmConfig};
use crate::error::{Error, Result};

/// Refuses what the microvm cannot do, naming it: an agent channel over a virtio-serial port
/// (the microvm has no virtio-serial device; its guest channel is virtio-vsock).
pub fn check_supported(config: &VmConfig) -> Result<()> {
    match &config.agent {
        None => Ok(()),
        Some(AgentChannel::SerialPort { socket }) => Err(Error::Unsupported {
            backend: "microvm",
            feature: format!(
                "agent channel serial_port (virtio-serial port tandem.agent, socket {}); \
                 the microvm reaches a guest over virtio-vsock only",
                socket.display()
            ),
        }),
    }
}
