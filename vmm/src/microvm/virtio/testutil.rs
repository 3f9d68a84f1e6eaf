//! Test helpers: a split virtqueue laid out in a GuestMemoryMmap, filled with crafted chains.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// Descriptor flags.
pub const NEXT: u16 = 1;
/// Device-writable.
pub const WRITE: u16 = 2;

/// Queue layout at fixed addresses.
pub struct TestQueue {
    /// Memory (1 MiB at 0).
    pub mem: GuestMemoryMmap,
    /// Queue size.
    pub size: u16,
    avail_idx: u16,
}

/// Descriptor table.
pub const DESC: u64 = 0x1000;
/// Avail ring.
pub const AVAIL: u64 = 0x3000;
/// Used ring.
pub const USED: u64 = 0x4000;
/// Free memory for buffers starts here.
pub const DATA: u64 = 0x10000;

impl TestQueue {
    /// 1 MiB of memory and an empty queue of `size` entries.
    pub fn new(size: u16) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        Self {
            mem,
            size,
            avail_idx: 0,
        }
    }

    /// A virtio-queue `Queue` pointing at this layout, ready.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(&self.mem));
        q
    }

    /// Writes descriptor `index`.
    pub fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = GuestAddress(DESC + 16 * index as u64);
        self.mem.write_obj(addr, a).unwrap();
        self.mem.write_obj(len, a.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, a.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, a.unchecked_add(14)).unwrap();
    }

    /// Writes a chain of (addr, len, write-only) at descriptors `first..`, linked, and makes it
    /// available. Returns the head index.
    pub fn chain(&mut self, first: u16, parts: &[(u64, u32, bool)]) -> u16 {
        for (i, (addr, len, w)) in parts.iter().enumerate() {
            let idx = first + i as u16;
            let last = i + 1 == parts.len();
            let flags = if *w { WRITE } else { 0 } | if last { 0 } else { NEXT };
            self.desc(idx, *addr, *len, flags, idx + 1);
        }
        self.publish(first);
        first
    }

    /// Puts `head` in the avail ring and bumps its index.
    pub fn publish(&mut self, head: u16) {
        let slot = (self.avail_idx % self.size) as u64;
        self.mem
            .write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Sets the avail index directly (to craft bogus ones).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
    }

    /// Used ring index.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Used element `i`: (id, len).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let a = GuestAddress(USED + 4 + 8 * (i % self.size) as u64);
        (
            self.mem.read_obj(a).unwrap(),
            self.mem.read_obj(a.unchecked_add(4)).unwrap(),
        )
    }
}
