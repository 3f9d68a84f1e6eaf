//! COM1: an 8250/16550 UART (vm-superio) whose output goes to a log file; its interrupt is an
//! eventfd (an irqfd for IRQ 4 when the VM has an in-kernel irqchip).

use std::fs::File;
use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::microvm::bus::BusDevice;

/// COM1 base port.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1 IRQ.
pub const COM1_IRQ: u32 = 4;

/// An eventfd used as the UART's interrupt line.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Sink for serial output: a file, or nothing.
pub enum SerialOut {
    /// Append to this file.
    File(File),
    /// Discard.
    Null,
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            SerialOut::File(f) => f.write(buf),
            SerialOut::Null => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            SerialOut::File(f) => f.flush(),
            SerialOut::Null => Ok(()),
        }
    }
}

/// The COM1 device.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, SerialOut>,
}

impl SerialDevice {
    /// UART writing to `out`, interrupting through `irq`.
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger(irq), out),
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.uart.write(offset as u8, data[0]) {
                tracing::warn!("serial write: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn bytes_reach_the_log() {
        let dir = std::env::temp_dir().join(format!("tandem-serial-{}", std::process::id()));
        let f = File::create(&dir).unwrap();
        let mut s = SerialDevice::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            SerialOut::File(f),
        );
        for b in b"ok\n" {
            s.write(0, &[*b]);
        }
        s.write(0, b"xy"); // wrong width: ignored
        let mut out = String::new();
        File::open(&dir).unwrap().read_to_string(&mut out).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(out, "ok\n");
    }
}
