//! Port-I/O and MMIO buses: address ranges mapped to devices; guest accesses are dispatched here
//! from the vCPU threads.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the device's base address.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Shared device handle.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    dev: SharedDevice,
}

/// A set of non-overlapping ranges.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

/// Overlapping or empty range on insert.
#[derive(Debug, PartialEq, Eq)]
pub struct BusConflict {
    /// Base of the refused range.
    pub base: u64,
    /// Length of the refused range.
    pub len: u64,
}

impl Bus {
    /// Empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `dev` at `[base, base+len)`.
    pub fn insert(&mut self, dev: SharedDevice, base: u64, len: u64) -> Result<(), BusConflict> {
        let conflict = BusConflict { base, len };
        let end = base.checked_add(len).ok_or(BusConflict { base, len })?;
        if len == 0 {
            return Err(conflict);
        }
        if let Some((b, e)) = self.ranges.range(..end).next_back() {
            if b + e.len > base {
                return Err(conflict);
            }
        }
        self.ranges.insert(base, Entry { len, dev });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Entry)> {
        let (base, e) = self.ranges.range(..=addr).next_back()?;
        let off = addr - base;
        if off.checked_add(size as u64)? <= e.len {
            Some((off, e))
        } else {
            None
        }
    }

    /// Dispatches a read; false if nothing is mapped there (the data is then all ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, e)) => {
                e.dev
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; false if nothing is mapped there (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, e)) => {
                e.dev
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Rec(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Rec {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_and_bounds() {
        let a = Arc::new(Mutex::new(Rec::default()));
        let mut bus = Bus::new();
        bus.insert(a.clone(), 0x100, 0x10).unwrap();
        assert!(bus.insert(a.clone(), 0x108, 0x10).is_err());
        assert!(bus.insert(a.clone(), 0xf8, 0x10).is_err());
        assert!(bus.insert(a.clone(), 0, 0).is_err());
        assert!(bus.insert(a.clone(), u64::MAX, 2).is_err());
        bus.insert(a.clone(), 0x110, 0x10).unwrap();
        assert!(bus.write(0x104, &[1, 2]));
        assert!(!bus.write(0x10f + 0x10, &[1, 2])); // crosses the end
        assert!(!bus.write(0x50, &[1]));
        let mut d = [0u8; 2];
        assert!(bus.read(0x103, &mut d));
        assert_eq!(d, [3, 3]);
        assert!(!bus.read(0x200, &mut d));
        assert_eq!(d, [0xff, 0xff]);
        assert_eq!(a.lock().unwrap().0, vec![(4, vec![1, 2])]);
    }
}
