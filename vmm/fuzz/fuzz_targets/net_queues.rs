#![no_main]
//! virtio-net: guest-controlled TX chains and RX buffers (tap in a private network namespace).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tandem_vmm::microvm::fuzzing::net_queues(data);
});
