#![no_main]
//! virtio-mmio transport: guest register accesses in any order, with queue processing.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tandem_vmm::microvm::fuzzing::mmio_transport(data);
});
