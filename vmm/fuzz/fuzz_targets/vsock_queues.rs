#![no_main]
//! virtio-vsock: guest-controlled TX packets and RX buffers.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tandem_vmm::microvm::fuzzing::vsock_queues(data);
});
