//! Hotplug controller behind the ACPI Generic Event Device (GED, `ACPI0013`): two 32-bit MMIO
//! registers the DSDT's AML reads, and the GED interrupt.
//!
//! - `PRSN` (offset 0, read-only): bit *i* set = virtio-mmio slot *i* holds a device. Each slot's
//!   `_STA` reports present from its bit.
//! - `EVNT` (offset 4): bit *i* set = slot *i* changed since the guest last looked; writing ones
//!   clears them. The GED's `_EVT` reads it, writes it back and, if anything changed, sends a bus
//!   check to the container device that holds the slots, so the guest's ACPI scan enumerates the
//!   new device.
//!
//! A plug sets both bits and raises the GED interrupt (an irqfd on [`GED_GSI`]).

use vmm_sys_util::eventfd::EventFd;

use crate::microvm::bus::BusDevice;

/// Guest physical base of the register page.
pub const HOTPLUG_BASE: u64 = 0xd010_0000;
/// Length mapped on the MMIO bus.
pub const HOTPLUG_LEN: u64 = 0x1000;
/// Length of the register block (what the DSDT's OperationRegion covers).
pub const HOTPLUG_REGS_LEN: u64 = 8;
/// Offset of the present bitmap.
pub const PRSN: u64 = 0;
/// Offset of the event bitmap (write 1 to clear).
pub const EVNT: u64 = 4;
/// The GED's interrupt (the last IOAPIC pin; virtio-mmio devices take the ones below it).
pub const GED_GSI: u32 = 23;

/// The registers and the interrupt.
pub struct HotplugController {
    present: u32,
    events: u32,
    irq: Option<EventFd>,
}

impl HotplugController {
    /// `irq` is the irqfd of [`GED_GSI`]; `None` without an in-kernel irqchip.
    pub fn new(irq: Option<EventFd>) -> Self {
        Self {
            present: 0,
            events: 0,
            irq,
        }
    }

    /// Marks `slot` present at boot: no event, no interrupt.
    pub fn set_present(&mut self, slot: usize) {
        self.present |= 1 << slot;
    }

    /// A device was plugged into `slot`: sets its present and event bits and raises the GED
    /// interrupt.
    pub fn plug(&mut self, slot: usize) -> std::io::Result<()> {
        self.present |= 1 << slot;
        self.events |= 1 << slot;
        match &self.irq {
            Some(irq) => irq.write(1),
            None => Ok(()),
        }
    }

    /// The present bitmap.
    pub fn present(&self) -> u32 {
        self.present
    }

    /// The pending event bitmap.
    pub fn events(&self) -> u32 {
        self.events
    }
}

impl BusDevice for HotplugController {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match (offset, data.len()) {
            (PRSN, 4) => self.present,
            (EVNT, 4) => self.events,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes()[..data.len().min(4)]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == EVNT && data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.events &= !v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(c: &mut HotplugController, off: u64) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn plug_sets_present_and_event_raises_the_interrupt_and_ack_clears() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut c = HotplugController::new(Some(irq.try_clone().unwrap()));
        c.set_present(0);
        assert_eq!(rd(&mut c, PRSN), 1);
        assert_eq!(rd(&mut c, EVNT), 0);
        assert!(irq.read().is_err(), "boot devices raise no interrupt");
        c.plug(2).unwrap();
        assert_eq!(rd(&mut c, PRSN), 0b101);
        assert_eq!(rd(&mut c, EVNT), 0b100);
        assert_eq!(irq.read().unwrap(), 1);
        // PRSN is read-only; EVNT clears only the bits written as ones.
        c.write(PRSN, &0u32.to_le_bytes());
        c.write(EVNT, &0b001u32.to_le_bytes());
        assert_eq!(rd(&mut c, PRSN), 0b101);
        assert_eq!(rd(&mut c, EVNT), 0b100);
        c.write(EVNT, &0b100u32.to_le_bytes());
        assert_eq!(rd(&mut c, EVNT), 0);
        // Odd sizes and offsets read zero and write nothing.
        let mut b = [0xffu8; 2];
        c.read(PRSN, &mut b);
        assert_eq!(b, [0, 0]);
        c.plug(1).unwrap();
        c.write(EVNT, &[0xff]);
        assert_eq!(rd(&mut c, EVNT), 0b10);
        assert_eq!(rd(&mut c, 0x10), 0);
    }
}
