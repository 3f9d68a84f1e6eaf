#![no_main]
//! virtio-block: guest-controlled descriptor table, avail ring and buffers.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tandem_vmm::microvm::fuzzing::block_queue(data);
});
