//! i8042 keyboard controller, for the CPU reset command (0xfe to port 0x64) Linux uses to reboot;
//! a reset ends the VM.

use vm_superio::I8042Device;

use crate::microvm::bus::BusDevice;
use crate::microvm::vcpu::ResetTrigger;

/// Base port (0x60..0x65; command register at 0x64).
pub const I8042_PORT: u64 = 0x60;
/// Length of the port range.
pub const I8042_LEN: u64 = 5;

/// i8042 whose reset writes the VM's exit eventfd.
pub struct I8042(pub I8042Device<ResetTrigger>);

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 {
            data[0] = self.0.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            let Ok(()) = self.0.write(offset as u8, data[0]);
        }
    }
}
