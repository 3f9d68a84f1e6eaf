//! virtio plumbing shared by the devices: the device trait and the virtio-mmio transport.

pub mod mmio;
#[cfg(test)]
pub mod testutil;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// VIRTIO_F_VERSION_1.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits.
pub mod status {
    /// Guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// Guest has a driver.
    pub const DRIVER: u32 = 2;
    /// Driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation done.
    pub const FEATURES_OK: u32 = 8;
    /// Device needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// Driver gave up.
    pub const FAILED: u32 = 0x80;
}

/// Outcome of processing one queue with a budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Processed {
    /// Chains completed (added to the used ring).
    pub completed: usize,
    /// The budget ran out with chains still available: process again later.
    pub more: bool,
    /// Other queues (bit mask) that now have work, e.g. replies waiting for RX buffers.
    pub kick: u64,
}

/// A virtio device behind a transport. All guest-provided data is untrusted: a bad chain fails
/// that request, never the device.
pub trait VirtioDevice: Send {
    /// virtio device id (2 = block, 1 = net, 19 = vsock).
    fn device_type(&self) -> u32;
    /// Name for logs and errors.
    fn name(&self) -> String;
    /// Maximum size of each queue; the length is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered feature bits.
    fn features(&self) -> u64;
    /// Reads device config space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Processes at most `budget` chains of queue `index`.
    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        index: usize,
        queue: &mut Queue,
        budget: usize,
    ) -> Processed;
    /// A host fd whose readability means work for queue `.1` (e.g. a tap for RX); the event loop
    /// watches it edge-triggered.
    fn event_fd(&self) -> Option<(std::os::fd::RawFd, usize)> {
        None
    }
    /// Called on device reset (status 0).
    fn reset(&mut self) {}
}
