//! Harnesses shared by the cargo-fuzz targets (vmm/fuzz) and the unit tests that run them over
//! random inputs: guest-controlled bytes go into descriptor tables, rings, buffers and registers.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::config::VsockConfig;
use crate::microvm::bus::BusDevice;
use crate::microvm::devices::block::Block;
use crate::microvm::devices::net::{self, Net};
use crate::microvm::devices::vsock::{self, Vsock};
use crate::microvm::virtio::mmio::{Interrupt, MmioTransport};
use crate::microvm::virtio::VirtioDevice;

const MEM: u64 = 1 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const DATA: u64 = 0x10000;
const QSIZE: u16 = 16;

fn disk() -> &'static PathBuf {
    static DISK: OnceLock<PathBuf> = OnceLock::new();
    DISK.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("tandem-fuzz-disk-{}", std::process::id()));
        std::fs::write(&p, vec![0x5au8; 64 * 1024]).expect("fuzz disk");
        p
    })
}

/// Removes the scratch disk (call once at the end of a test).
pub fn cleanup() {
    let _ = std::fs::remove_file(disk());
}

fn memory(data: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("memory");
    let desc_len = 16 * QSIZE as usize;
    let (desc, rest) = data.split_at(data.len().min(desc_len));
    mem.write_slice(desc, GuestAddress(DESC)).expect("desc");
    let (avail, rest) = rest.split_at(rest.len().min(4 + 2 * QSIZE as usize));
    mem.write_slice(avail, GuestAddress(AVAIL)).expect("avail");
    let n = rest.len().min((MEM - DATA) as usize);
    mem.write_slice(&rest[..n], GuestAddress(DATA))
        .expect("data");
    mem
}

/// virtio-block queue parsing: `data` is the descriptor table, the avail ring and buffer memory.
pub fn block_queue(data: &[u8]) {
    let mem = memory(data);
    let mut blk = Block::open(disk(), data.first().is_some_and(|b| b & 1 == 1)).expect("disk");
    let mut q = Queue::new(QSIZE).expect("queue");
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    for _ in 0..3 {
        blk.process_queue(&mem, 0, &mut q, 8);
    }
}

/// virtio-vsock: guest-controlled TX descriptor table, ring and packets, then RX delivery into
/// guest-controlled RX buffers (the same table, so TX and RX descriptors may overlap).
pub fn vsock_queues(data: &[u8]) {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let uds = std::env::temp_dir().join(format!("tandem-fuzz-vsock-{}-{n}", std::process::id()));
    let _ = std::fs::remove_file(&uds);
    let mut v = Vsock::open(&VsockConfig {
        cid: 3,
        uds_path: uds,
    })
    .expect("vsock");
    let mem = memory(data);
    let mut q = Queue::new(QSIZE).expect("queue");
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    v.process_queue(&mem, vsock::TX, &mut q, 8);
    let mut rx = Queue::new(QSIZE).expect("queue");
    rx.set_desc_table_address(Some(DESC as u32), Some(0));
    rx.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    rx.set_used_ring_address(Some(USED as u32 + 0x800), Some(0));
    rx.set_ready(true);
    v.process_queue(&mem, vsock::RX, &mut rx, 8);
}

thread_local! {
    static NET: std::cell::RefCell<Option<Net>> = const { std::cell::RefCell::new(None) };
}

/// virtio-net: guest-controlled TX chains (frames written to a tap in a private network
/// namespace of the calling thread) and RX buffers.
pub fn net_queues(data: &[u8]) {
    NET.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            // SAFETY: affects only the calling thread's network namespace.
            assert_eq!(
                unsafe { libc::unshare(libc::CLONE_NEWNET) },
                0,
                "unshare(CLONE_NEWNET)"
            );
            let nic = crate::config::NicConfig {
                tap: "tndfuzz0".into(),
                mac: [2, 0, 0, 0, 0, 1],
            };
            *cell = Some(Net::open(&nic).expect("tap"));
        }
        let dev = cell.as_mut().expect("net");
        let mem = memory(data);
        let mut tx = Queue::new(QSIZE).expect("queue");
        tx.set_desc_table_address(Some(DESC as u32), Some(0));
        tx.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        tx.set_used_ring_address(Some(USED as u32), Some(0));
        tx.set_ready(true);
        dev.process_queue(&mem, net::TX, &mut tx, 8);
        let mut rx = Queue::new(QSIZE).expect("queue");
        rx.set_desc_table_address(Some(DESC as u32), Some(0));
        rx.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        rx.set_used_ring_address(Some(USED as u32 + 0x800), Some(0));
        rx.set_ready(true);
        dev.process_queue(&mem, net::RX, &mut rx, 8);
    });
}

/// virtio-mmio register accesses in any order (6 bytes each: kind, offset le16, value le32),
/// with queue processing after each one. Returns the final device status.
pub fn mmio_transport(data: &[u8]) -> u32 {
    let mem = memory(&[]);
    let split = data.len().min(512);
    mem.write_slice(&data[..split], GuestAddress(DESC))
        .expect("desc");
    let blk = Block::open(disk(), false).expect("disk");
    let mut t = MmioTransport::new(
        Box::new(blk) as Box<dyn VirtioDevice>,
        mem,
        Arc::new(Interrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        )),
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    );
    for op in data[split..].chunks_exact(6) {
        let offset = u16::from_le_bytes([op[1], op[2]]) as u64 % 0x200;
        let width = [1usize, 2, 4, 8][(op[0] >> 1) as usize % 4];
        let mut buf = [op[3], op[4], op[5], 0, 0, 0, 0, 0];
        if op[0] & 1 == 1 {
            t.write(offset, &buf[..width]);
        } else {
            t.read(offset, &mut buf[..width]);
        }
        t.process(8);
    }
    t.status()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_inputs(seed: u64, n: usize, len: usize, f: impl Fn(&[u8])) {
        let mut s = seed;
        for i in 0..n {
            let l = (i * 37) % len;
            let v: Vec<u8> = (0..l)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    s as u8
                })
                .collect();
            f(&v);
        }
    }

    #[test]
    fn fuzz_harnesses_survive_random_inputs() {
        random_inputs(0x1234_5678_9abc_def1, 300, 2048, block_queue);
        random_inputs(0x5555_aaaa_1234_4321, 200, 2048, vsock_queues);
        // On its own thread: the harness moves that thread into a private network namespace.
        std::thread::spawn(|| random_inputs(0x7777_1111_2222_3333, 200, 2048, net_queues))
            .join()
            .unwrap();
        // A well-formed REQUEST to a port nobody listens on, through the harness.
        let mut d = vec![0u8; 16 * QSIZE as usize];
        d[..8].copy_from_slice(&DATA.to_le_bytes());
        d[8..12].copy_from_slice(&44u32.to_le_bytes());
        d.extend([0, 0, 1, 0, 0, 0]); // avail: flags 0, idx 1, ring[0] = 0
        d.resize(16 * QSIZE as usize + 4 + 2 * QSIZE as usize, 0);
        let mut h = vsock::Hdr {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1,
            dst_port: 9,
            type_: 1,
            op: vsock::op::REQUEST,
            ..Default::default()
        }
        .bytes()
        .to_vec();
        d.append(&mut h);
        vsock_queues(&d);
        random_inputs(0x0fed_cba9_8765_4321, 300, 4096, |d| {
            mmio_transport(d);
        });
        // A well-formed handshake sequence reaches DRIVER_OK inside the harness too.
        let mut ops = vec![0u8; 512];
        for (off, v) in [
            (0x70u16, 1u8),
            (0x70, 3),
            (0x24, 1),
            (0x20, 1),
            (0x70, 0xb),
            (0x70, 0xf),
        ] {
            ops.extend([5, off as u8, (off >> 8) as u8, v, 0, 0]);
        }
        assert_eq!(mmio_transport(&ops), 0xf);
        cleanup();
    }
}
