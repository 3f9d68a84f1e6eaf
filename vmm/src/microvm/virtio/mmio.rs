//! virtio-mmio transport (version 2): the register block a guest driver programs. Queue
//! notifications only signal an eventfd; the queues are processed from the VMM's event loop with
//! a fixed budget per wake-up.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{status, Processed, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::microvm::bus::BusDevice;

/// Size of one device's MMIO window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// "virt".
pub const MAGIC: u32 = 0x7472_6976;
const VENDOR_ID: u32 = 0x554d_4551; // same value QEMU uses; drivers do not care

/// Interrupt line of a transport: status bits plus an eventfd (an irqfd in a VM).
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl Interrupt {
    /// Interrupt signalled through `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            evt,
        }
    }

    /// Raises "used buffer" (bit 0).
    pub fn signal_used(&self) {
        self.status.fetch_or(1, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::warn!("virtio interrupt: {e}");
        }
    }

    /// Current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The eventfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// One virtio device on virtio-mmio.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    interrupt: Arc<Interrupt>,
    notify: EventFd,
    pending: u64,
}

impl MmioTransport {
    /// Transport for `device`; queue notifications write `notify`, interrupts go to `interrupt`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        notify: EventFd,
    ) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&m| Queue::new(m).expect("device queue sizes are powers of two <= 32768"))
            .collect();
        Self {
            device,
            mem,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            interrupt,
            notify,
            pending: 0,
        }
    }

    /// Device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The eventfd queue notifications signal.
    pub fn notify_event(&self) -> &EventFd {
        &self.notify
    }

    /// The interrupt.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// Whether queue `i` is ready.
    pub fn queue_ready(&self, i: usize) -> bool {
        self.queues.get(i).is_some_and(|q| q.ready())
    }

    /// Queue `i` (for tests and state).
    pub fn queue(&self, i: usize) -> Option<&Queue> {
        self.queues.get(i)
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn active(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.status & status::FAILED == 0
    }

    /// Processes notified queues with `budget` chains per queue; returns true if work is left
    /// (the caller then comes back after serving other events: bounded work per wake-up).
    pub fn process(&mut self, budget: usize) -> bool {
        let _ = self.notify.read();
        if !self.active() {
            self.pending = 0;
            return false;
        }
        let mut pending = std::mem::take(&mut self.pending);
        let mut more = false;
        while pending != 0 {
            let i = pending.trailing_zeros() as usize;
            pending &= pending - 1;
            let Some(q) = self.queues.get_mut(i) else {
                continue;
            };
            if !q.ready() || !q.is_valid(&self.mem) {
                continue;
            }
            let Processed {
                completed,
                more: m,
                kick,
            } = self.device.process_queue(&self.mem, i, q, budget);
            // Queues the device wants served next: later ones in this round, earlier ones (and
            // itself) on the next wake-up.
            let later = kick & !((2u64 << i) - 1);
            let again = kick & ((2u64 << i) - 1);
            pending |= later;
            if again != 0 {
                self.pending |= again;
                more = true;
            }
            if m {
                self.pending |= 1 << i;
                more = true;
            }
            if completed > 0 {
                match q.needs_notification(&self.mem) {
                    Ok(false) => {}
                    Ok(true) | Err(_) => self.interrupt.signal_used(),
                }
            }
        }
        more
    }

    /// The device's host fd became readable: process its queue.
    pub fn process_event(&mut self, queue: usize, budget: usize) -> bool {
        if queue < 64 {
            self.pending |= 1 << queue;
        }
        self.process(budget)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.pending = 0;
        self.interrupt.status.store(0, Ordering::SeqCst);
        self.device.reset();
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // Bits may only be added, in the order the spec gives; anything else is ignored.
        let old = self.status;
        if v & old != old {
            return;
        }
        let added = v & !old;
        let ok = match added {
            status::ACKNOWLEDGE => old == 0,
            status::DRIVER => old == status::ACKNOWLEDGE,
            status::FEATURES_OK => {
                old == status::ACKNOWLEDGE | status::DRIVER
                    && self.driver_features & VIRTIO_F_VERSION_1 != 0
            }
            status::DRIVER_OK => old == status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
            status::FAILED => true,
            _ => false,
        };
        if ok {
            self.status = v;
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        // Queue registers are writable only between FEATURES_OK and DRIVER_OK.
        if self.status & status::FEATURES_OK == 0 || self.status & status::DRIVER_OK != 0 {
            return;
        }
        if let Some(q) = self.queues.get_mut(self.queue_sel as usize) {
            if !q.ready() {
                f(q);
            }
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            0x000 => MAGIC,
            0x004 => 2,
            0x008 => self.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            0x034 => q.map(|q| q.max_size() as u32).unwrap_or(0),
            0x044 => q.map(|q| q.ready() as u32).unwrap_or(0),
            0x060 => self.interrupt.status(),
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            0x014 => self.device_features_sel = v,
            0x020
                if self.status & status::DRIVER != 0 && self.status & status::FEATURES_OK == 0 =>
            {
                let offered = self.offered_features();
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff)
                            | (v as u64 & offered & 0xffff_ffff)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (((v as u64) << 32) & offered)
                    }
                    _ => {}
                }
            }
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => self.with_queue(|q| q.set_size(v.min(u16::MAX as u32) as u16)),
            0x044 => {
                let mem = self.mem.clone();
                self.with_queue(|q| {
                    if v == 1 {
                        // is_valid() also requires the ready flag: set it, check, undo if bad.
                        q.set_ready(true);
                        if !q.is_valid(&mem) {
                            q.set_ready(false);
                        }
                    }
                });
            }
            0x050 if self.active() && (v as usize) < self.queues.len() && v < 64 => {
                self.pending |= 1 << v;
                if let Err(e) = self.notify.write(1) {
                    tracing::warn!("{}: notify: {e}", self.device.name());
                }
            }
            0x064 => {
                self.interrupt.status.fetch_and(!v, Ordering::SeqCst);
            }
            0x070 => self.set_status(v),
            0x080 => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            0x084 => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            0x090 => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            0x094 => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            0x0a0 => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            0x0a4 => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            if offset - 0x100 < MMIO_WINDOW - 0x100 {
                self.device.read_config(offset - 0x100, data);
            } else {
                data.fill(0);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            self.device.write_config(offset - 0x100, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg(offset, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::microvm::devices::block::{Block, S_OK};
    use crate::microvm::virtio::testutil::{TestQueue, AVAIL, DATA, DESC, USED};
    use vm_memory::{Bytes, GuestAddress};

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }
    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn transport(tq: &TestQueue, name: &str) -> (MmioTransport, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("tandem-mmio-{name}-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; 4096]).unwrap();
        let blk = Block::open(&path, false).unwrap();
        let t = MmioTransport::new(
            Box::new(blk),
            tq.mem.clone(),
            Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        );
        (t, path)
    }

    fn setup_queue(t: &mut MmioTransport) {
        w(t, 0x030, 0);
        w(t, 0x038, 16);
        w(t, 0x080, DESC as u32);
        w(t, 0x090, AVAIL as u32);
        w(t, 0x0a0, USED as u32);
        w(t, 0x044, 1);
    }

    #[test]
    fn handshake_queue_setup_notify_and_interrupt() {
        let mut tq = TestQueue::new(16);
        let (mut t, path) = transport(&tq, "ok");
        assert_eq!(r(&mut t, 0x000), MAGIC);
        assert_eq!(r(&mut t, 0x004), 2);
        assert_eq!(r(&mut t, 0x008), 2);
        assert_eq!(r(&mut t, 0x034), 256);
        // Out of order: DRIVER before ACKNOWLEDGE is ignored.
        w(&mut t, 0x070, status::DRIVER);
        assert_eq!(t.status(), 0);
        w(&mut t, 0x070, status::ACKNOWLEDGE);
        w(&mut t, 0x070, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, 0x014, 1);
        assert_eq!(r(&mut t, 0x010), 1); // VERSION_1
                                         // FEATURES_OK without VERSION_1 is refused.
        w(&mut t, 0x070, 0xb);
        assert_eq!(t.status(), 3);
        // Features the device does not offer are dropped.
        w(&mut t, 0x024, 0);
        w(&mut t, 0x020, 0xffff_ffff);
        w(&mut t, 0x024, 1);
        w(&mut t, 0x020, 0xffff_ffff);
        assert_eq!(t.driver_features(), t.offered_features());
        w(&mut t, 0x070, 0xb);
        assert_eq!(t.status(), 0xb);
        setup_queue(&mut t);
        assert_eq!(r(&mut t, 0x044), 1);
        w(&mut t, 0x070, 0xf);
        assert_eq!(t.status(), 0xf);
        // Queue registers are frozen once DRIVER_OK is set.
        w(&mut t, 0x080, 0x5000);
        assert_eq!(t.queue(0).unwrap().desc_table(), DESC);

        // A read request of sector 0.
        tq.mem.write_obj(0u32, GuestAddress(DATA)).unwrap();
        tq.mem.write_obj(0u64, GuestAddress(DATA + 8)).unwrap();
        tq.chain(
            0,
            &[
                (DATA, 16, false),
                (DATA + 0x1000, 512, true),
                (DATA + 0x800, 1, true),
            ],
        );
        assert!(t.notify_event().read().is_err()); // nothing yet
        w(&mut t, 0x050, 0);
        assert_eq!(t.notify_event().read().unwrap(), 1);
        assert!(!t.process(QUEUE_BUDGET_TEST));
        assert_eq!(tq.used_idx(), 1);
        assert_eq!(
            tq.mem.read_obj::<u8>(GuestAddress(DATA + 0x800)).unwrap(),
            S_OK
        );
        assert_eq!(
            tq.mem.read_obj::<u8>(GuestAddress(DATA + 0x1000)).unwrap(),
            7
        );
        assert_eq!(r(&mut t, 0x060), 1);
        assert_eq!(t.interrupt().eventfd().read().unwrap(), 1);
        w(&mut t, 0x064, 1);
        assert_eq!(r(&mut t, 0x060), 0);
        // Config space: capacity 8 sectors.
        let mut cap = [0u8; 8];
        t.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        // Notify of a queue that does not exist, odd widths and offsets: ignored.
        w(&mut t, 0x050, 7);
        w(&mut t, 0x050, u32::MAX);
        t.write(0x051, &[1]);
        t.write(0x070, &[0, 0]);
        assert_eq!(t.status(), 0xf);
        // Reset.
        w(&mut t, 0x070, 0);
        assert_eq!(t.status(), 0);
        assert!(!t.queue(0).unwrap().ready());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn queue_outside_memory_never_becomes_ready() {
        let tq = TestQueue::new(16);
        let (mut t, path) = transport(&tq, "bad");
        w(&mut t, 0x070, 1);
        w(&mut t, 0x070, 3);
        w(&mut t, 0x024, 1);
        w(&mut t, 0x020, 1);
        w(&mut t, 0x070, 0xb);
        w(&mut t, 0x038, 16);
        w(&mut t, 0x080, 0xfff0_0000);
        w(&mut t, 0x090, AVAIL as u32);
        w(&mut t, 0x0a0, USED as u32);
        w(&mut t, 0x044, 1);
        assert_eq!(r(&mut t, 0x044), 0);
        // Notify before DRIVER_OK does nothing.
        w(&mut t, 0x050, 0);
        assert!(t.notify_event().read().is_err());
        std::fs::remove_file(path).unwrap();
    }

    const QUEUE_BUDGET_TEST: usize = 8;
}
