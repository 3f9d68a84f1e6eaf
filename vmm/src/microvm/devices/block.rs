//! virtio-block on a raw file (optionally read-only). Every request is checked against the
//! chain's shape and the disk size; a bad request gets an error status (or, if it has no place
//! for one, is returned with length 0) and never fails the device.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use crate::error::{Error, Result};
use crate::microvm::virtio::{Processed, VirtioDevice};

/// virtio device id of block.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Sector size.
pub const SECTOR: u64 = 512;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
/// Most segments per request we advertise.
pub const SEG_MAX: u32 = 128;
/// Largest segment we advertise.
pub const SIZE_MAX: u32 = 64 * 1024;
/// Largest data part of one request we serve (the advertised limits allow no more).
pub const MAX_REQUEST: usize = (SEG_MAX * SIZE_MAX) as usize;

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// Request status values.
pub const S_OK: u8 = 0;
/// I/O error (also: out of range, write to a read-only disk).
pub const S_IOERR: u8 = 1;
/// Unsupported request type.
pub const S_UNSUPP: u8 = 2;

const CHUNK: usize = 64 * 1024;

/// The block device.
pub struct Block {
    path: PathBuf,
    file: File,
    read_only: bool,
    sectors: u64,
    id: [u8; 20],
    buf: Vec<u8>,
}

impl Block {
    /// Opens `path` (read-only if asked). The size is rounded down to whole sectors.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut id = [0u8; 20];
        let name = path
            .file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or(b"disk");
        let n = name.len().min(20);
        id[..n].copy_from_slice(&name[..n]);
        Ok(Self {
            path: path.to_path_buf(),
            file,
            read_only,
            sectors: len / SECTOR,
            id,
            buf: vec![0; CHUNK],
        })
    }

    /// Sets the serial the guest reads with GET_ID (truncated to 20 bytes).
    pub fn with_id(mut self, id: &str) -> Self {
        self.id = [0; 20];
        let n = id.len().min(20);
        self.id[..n].copy_from_slice(&id.as_bytes()[..n]);
        self
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Range check: `len` bytes at `sector`.
    fn in_range(&self, sector: u64, len: usize) -> bool {
        if !(len as u64).is_multiple_of(SECTOR) || len > MAX_REQUEST {
            return false;
        }
        match sector.checked_add(len as u64 / SECTOR) {
            Some(end) => end <= self.sectors,
            None => false,
        }
    }

    fn do_in(&mut self, sector: u64, w: &mut Writer<'_>) -> std::io::Result<u8> {
        let len = w.available_bytes();
        if !self.in_range(sector, len) {
            return Ok(S_IOERR);
        }
        let mut off = sector * SECTOR;
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            self.file.read_exact_at(&mut self.buf[..n], off)?;
            w.write_all(&self.buf[..n])?;
            off += n as u64;
            left -= n;
        }
        Ok(S_OK)
    }

    fn do_out(&mut self, sector: u64, r: &mut Reader<'_>) -> std::io::Result<u8> {
        let len = r.available_bytes();
        if self.read_only || !self.in_range(sector, len) {
            return Ok(S_IOERR);
        }
        let mut off = sector * SECTOR;
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            r.read_exact(&mut self.buf[..n])?;
            self.file.write_all_at(&self.buf[..n], off)?;
            off += n as u64;
            left -= n;
        }
        Ok(S_OK)
    }

    /// Serves one chain; returns the number of bytes written to guest memory.
    fn request(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        let (mut r, mut w) = match (Reader::new(mem, chain.clone()), Writer::new(mem, chain)) {
            (Ok(r), Ok(w)) => (r, w),
            _ => return 0, // addresses outside guest memory or a broken chain
        };
        let avail = w.available_bytes();
        if avail == 0 {
            return 0; // no room for a status byte
        }
        let mut status_w = match w.split_at(avail - 1) {
            Ok(s) => s,
            Err(_) => return 0,
        };
        let mut hdr = [0u8; 16];
        let status = if r.read_exact(&mut hdr).is_err() {
            S_IOERR
        } else {
            let t = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
            let mut s8 = [0u8; 8];
            s8.copy_from_slice(&hdr[8..16]);
            let sector = u64::from_le_bytes(s8);
            let res = match t {
                T_IN => self.do_in(sector, &mut w),
                T_OUT => self.do_out(sector, &mut r),
                T_FLUSH if self.read_only => Ok(S_OK),
                T_FLUSH => self.file.sync_data().map(|_| S_OK),
                T_GET_ID => {
                    let n = w.available_bytes().min(self.id.len());
                    w.write_all(&self.id[..n]).map(|_| S_OK)
                }
                _ => Ok(S_UNSUPP),
            };
            res.unwrap_or_else(|e| {
                tracing::warn!(
                    "{}: request type {t} sector {sector}: {e}",
                    self.path.display()
                );
                S_IOERR
            })
        };
        if status_w.write_all(&[status]).is_err() {
            return w.bytes_written() as u32;
        }
        (w.bytes_written() + 1) as u32
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn name(&self) -> String {
        format!("virtio-block {}", self.path.display())
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = F_SIZE_MAX | F_SEG_MAX | F_FLUSH;
        if self.read_only {
            f |= F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (le64) | size_max (le32) | seg_max (le32)
        let mut cfg = [0u8; 16];
        cfg[..8].copy_from_slice(&self.sectors.to_le_bytes());
        cfg[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        cfg[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| cfg.get(o as usize).copied())
                .unwrap_or(0);
        }
    }

    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        _index: usize,
        queue: &mut Queue,
        budget: usize,
    ) -> Processed {
        let mut done = Processed::default();
        while done.completed < budget {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return done;
            };
            let head = chain.head_index();
            let len = self.request(mem, chain);
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!("{}: add_used {head}: {e}", self.name());
            }
            done.completed += 1;
        }
        // Budget spent: is anything left?
        done.more = queue
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .map(|idx| idx.0 != queue.next_avail())
            .unwrap_or(false);
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::microvm::virtio::testutil::{TestQueue, DATA, NEXT, WRITE};
    use vm_memory::{Bytes, GuestAddress};

    struct Disk {
        path: PathBuf,
    }
    impl Drop for Disk {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn disk(name: &str, sectors: u64) -> Disk {
        let path = std::env::temp_dir().join(format!("tandem-blk-{name}-{}", std::process::id()));
        let data: Vec<u8> = (0..sectors * SECTOR)
            .map(|i| (i / SECTOR) as u8 ^ i as u8)
            .collect();
        std::fs::write(&path, data).unwrap();
        Disk { path }
    }

    fn hdr(tq: &TestQueue, at: u64, t: u32, sector: u64) {
        tq.mem.write_obj(t, GuestAddress(at)).unwrap();
        tq.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        tq.mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    fn status(tq: &TestQueue, at: u64) -> u8 {
        tq.mem.read_obj(GuestAddress(at)).unwrap()
    }

    const H: u64 = DATA; // header
    const D: u64 = DATA + 0x1000; // data
    const S: u64 = DATA + 0x800; // status

    #[test]
    fn read_write_flush_get_id() {
        let d = disk("rw", 16);
        let mut blk = Block::open(&d.path, false).unwrap();
        assert_eq!(blk.sectors(), 16);
        let mut tq = TestQueue::new(16);
        let mut q = tq.queue();

        hdr(&tq, H, T_IN, 2);
        tq.chain(0, &[(H, 16, false), (D, 1024, true), (S, 1, true)]);
        let p = blk.process_queue(&tq.mem, 0, &mut q, 64);
        assert_eq!(
            p,
            Processed {
                completed: 1,
                more: false,
                kick: 0
            }
        );
        assert_eq!(tq.used_idx(), 1);
        assert_eq!(tq.used(0), (0, 1025));
        assert_eq!(status(&tq, S), S_OK);
        let mut got = vec![0u8; 1024];
        tq.mem.read_slice(&mut got, GuestAddress(D)).unwrap();
        let file = std::fs::read(&d.path).unwrap();
        assert_eq!(got, file[1024..2048]);

        // Write 512 bytes of 0xab at sector 5, split over two descriptors.
        tq.mem.write_slice(&[0xab; 512], GuestAddress(D)).unwrap();
        hdr(&tq, H, T_OUT, 5);
        tq.chain(
            3,
            &[
                (H, 16, false),
                (D, 256, false),
                (D + 256, 256, false),
                (S, 1, true),
            ],
        );
        blk.process_queue(&tq.mem, 0, &mut q, 64);
        assert_eq!(status(&tq, S), S_OK);
        assert_eq!(tq.used(1), (3, 1));
        assert_eq!(
            std::fs::read(&d.path).unwrap()[5 * 512..6 * 512],
            [0xab; 512]
        );

        hdr(&tq, H, T_FLUSH, 0);
        tq.chain(7, &[(H, 16, false), (S, 1, true)]);
        blk.process_queue(&tq.mem, 0, &mut q, 64);
        assert_eq!(status(&tq, S), S_OK);

        hdr(&tq, H, T_GET_ID, 0);
        tq.chain(9, &[(H, 16, false), (D, 20, true), (S, 1, true)]);
        blk.process_queue(&tq.mem, 0, &mut q, 64);
        assert_eq!(status(&tq, S), S_OK);
        let mut id = [0u8; 20];
        tq.mem.read_slice(&mut id, GuestAddress(D)).unwrap();
        assert!(id.starts_with(b"tandem-blk-rw"));

        hdr(&tq, H, 99, 0);
        tq.chain(12, &[(H, 16, false), (S, 1, true)]);
        blk.process_queue(&tq.mem, 0, &mut q, 64);
        assert_eq!(status(&tq, S), S_UNSUPP);
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let d = disk("ro", 4);
        let before = std::fs::read(&d.path).unwrap();
        let mut blk = Block::open(&d.path, true).unwrap();
        assert_ne!(blk.features() & F_RO, 0);
        let mut tq = TestQueue::new(8);
        let mut q = tq.queue();
        hdr(&tq, H, T_OUT, 0);
        tq.chain(0, &[(H, 16, false), (D, 512, false), (S, 1, true)]);
        blk.process_queue(&tq.mem, 0, &mut q, 8);
        assert_eq!(status(&tq, S), S_IOERR);
        assert_eq!(std::fs::read(&d.path).unwrap(), before);
    }

    #[test]
    fn malformed_requests_fail_alone() {
        let d = disk("bad", 8);
        let before = std::fs::read(&d.path).unwrap();
        let mut blk = Block::open(&d.path, false).unwrap();
        let mut tq = TestQueue::new(32);
        let mut q = tq.queue();
        let mut expect_status = |tq: &mut TestQueue, q: &mut Queue, want: Option<u8>, len: u32| {
            tq.mem.write_obj(0xeeu8, GuestAddress(S)).unwrap();
            let n = tq.used_idx();
            let p = blk.process_queue(&tq.mem, 0, q, 8);
            assert_eq!(p.completed, 1);
            assert_eq!(tq.used_idx(), n.wrapping_add(1));
            assert_eq!(tq.used(n).1, len);
            match want {
                Some(s) => assert_eq!(status(tq, S), s),
                None => assert_eq!(status(tq, S), 0xee, "status written where none fits"),
            }
        };
        // Beyond the end of the disk, and a sector number that overflows.
        hdr(&tq, H, T_IN, 7);
        tq.chain(0, &[(H, 16, false), (D, 1024, true), (S, 1, true)]);
        expect_status(&mut tq, &mut q, Some(S_IOERR), 1);
        hdr(&tq, H, T_OUT, u64::MAX);
        tq.chain(0, &[(H, 16, false), (D, 512, false), (S, 1, true)]);
        expect_status(&mut tq, &mut q, Some(S_IOERR), 1);
        // Data length not a multiple of the sector size.
        hdr(&tq, H, T_IN, 0);
        tq.chain(0, &[(H, 16, false), (D, 100, true), (S, 1, true)]);
        expect_status(&mut tq, &mut q, Some(S_IOERR), 1);
        // Header too short.
        tq.chain(0, &[(H, 8, false), (S, 1, true)]);
        expect_status(&mut tq, &mut q, Some(S_IOERR), 1);
        // No writable descriptor at all: nowhere for a status.
        tq.chain(0, &[(H, 16, false), (S, 1, false)]);
        expect_status(&mut tq, &mut q, None, 0);
        // Buffer outside guest memory.
        hdr(&tq, H, T_IN, 0);
        tq.chain(0, &[(H, 16, false), (0xffff_0000, 512, true), (S, 1, true)]);
        expect_status(&mut tq, &mut q, None, 0);
        // Buffer crossing the end of guest memory.
        tq.chain(
            0,
            &[(H, 16, false), ((1 << 20) - 256, 512, true), (S, 1, true)],
        );
        expect_status(&mut tq, &mut q, None, 0);
        // Huge lengths that overflow when summed.
        tq.chain(
            0,
            &[
                (H, 16, false),
                (D, u32::MAX, true),
                (D, u32::MAX, true),
                (S, 1, true),
            ],
        );
        expect_status(&mut tq, &mut q, None, 0);
        // A descriptor loop: 0 -> 1 -> 0.
        tq.desc(0, H, 16, NEXT, 1);
        tq.desc(1, S, 1, NEXT | WRITE, 0);
        tq.publish(0);
        let n = tq.used_idx();
        blk.process_queue(&tq.mem, 0, &mut q, 8);
        assert_eq!(tq.used_idx(), n.wrapping_add(1));
        // `next` out of the table.
        tq.desc(0, H, 16, NEXT, 500);
        tq.publish(0);
        blk.process_queue(&tq.mem, 0, &mut q, 8);
        // Head index out of the table.
        tq.publish(1000);
        blk.process_queue(&tq.mem, 0, &mut q, 8);
        // Nothing was written to the disk, and a good request still works.
        assert_eq!(std::fs::read(&d.path).unwrap(), before);
        hdr(&tq, H, T_IN, 1);
        tq.chain(0, &[(H, 16, false), (D, 512, true), (S, 1, true)]);
        tq.mem.write_obj(0xeeu8, GuestAddress(S)).unwrap();
        blk.process_queue(&tq.mem, 0, &mut q, 8);
        assert_eq!(status(&tq, S), S_OK);
        let mut got = vec![0u8; 512];
        tq.mem.read_slice(&mut got, GuestAddress(D)).unwrap();
        assert_eq!(got, before[512..1024]);
    }

    #[test]
    fn work_per_call_is_bounded_by_the_budget() {
        let d = disk("budget", 8);
        let mut blk = Block::open(&d.path, false).unwrap();
        let mut tq = TestQueue::new(16);
        let mut q = tq.queue();
        hdr(&tq, H, T_FLUSH, 0);
        for i in 0..10 {
            tq.chain(i, &[(H, 16, false)]);
            tq.desc(i, H, 16, 0, 0);
        }
        // Single-descriptor chains with no status: each completes with length 0.
        let p = blk.process_queue(&tq.mem, 0, &mut q, 4);
        assert_eq!(
            p,
            Processed {
                completed: 4,
                more: true,
                kick: 0
            }
        );
        let p = blk.process_queue(&tq.mem, 0, &mut q, 4);
        assert_eq!(
            p,
            Processed {
                completed: 4,
                more: true,
                kick: 0
            }
        );
        let p = blk.process_queue(&tq.mem, 0, &mut q, 4);
        assert_eq!(
            p,
            Processed {
                completed: 2,
                more: false,
                kick: 0
            }
        );
        assert_eq!(tq.used_idx(), 10);
    }

    /// Random descriptor tables, avail rings and headers: the device must never panic, and must
    /// stay usable.
    #[test]
    fn random_chains_never_break_the_device() {
        let d = disk("fuzz", 8);
        let mut blk = Block::open(&d.path, true).unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..300 {
            let mut tq = TestQueue::new(16);
            let mut q = tq.queue();
            for i in 0..16u16 {
                let r = rnd();
                let addr = match r % 4 {
                    0 => rnd(),
                    1 => (1 << 20) - (rnd() % 4096),
                    _ => DATA + rnd() % 0x8000,
                };
                let len = match (r >> 8) % 4 {
                    0 => rnd() as u32,
                    1 => 16,
                    _ => (rnd() % 4096) as u32,
                };
                tq.desc(i, addr, len, (r >> 16) as u16 & 7, (r >> 32) as u16 % 20);
                tq.mem
                    .write_obj(rnd(), GuestAddress(DATA + 8 * i as u64))
                    .unwrap();
            }
            for _ in 0..(rnd() % 20) {
                tq.publish((rnd() % 18) as u16);
            }
            if rnd() % 8 == 0 {
                tq.set_avail_idx(rnd() as u16);
            }
            for _ in 0..4 {
                blk.process_queue(&tq.mem, 0, &mut q, 8);
            }
        }
    }
}
