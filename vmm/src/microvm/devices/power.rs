//! ACPI PM1a control register: a write with SLP_EN set and SLP_TYP 5 (S5) powers the VM off.
//! The FADT points the guest here.

use std::sync::Arc;

use crate::microvm::bus::BusDevice;
use crate::microvm::vcpu::{ExitReason, ExitSignal};

/// PM1a control block port.
pub const PM1A_CNT_PORT: u64 = 0x604;
/// Width of PM1a_CNT.
pub const PM1A_CNT_LEN: u64 = 2;
/// Hardware-reduced ACPI sleep control register (FADT SLEEP_CONTROL_REG), one byte.
pub const SLEEP_CONTROL_PORT: u64 = 0x600;
/// Sleep status register (FADT SLEEP_STATUS_REG), one byte; reads 0.
pub const SLEEP_STATUS_PORT: u64 = 0x601;
/// SLP_TYP value for S5 that our DSDT advertises.
pub const S5_SLP_TYP: u16 = 5;
const SLP_EN: u16 = 1 << 13;

/// Power-off register.
pub struct AcpiPowerOff {
    exit: Arc<ExitSignal>,
    value: u16,
}

impl AcpiPowerOff {
    /// Writes `exit` on power-off.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit, value: 0 }
    }
}

impl BusDevice for AcpiPowerOff {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = self.value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut v = self.value.to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = v.get_mut(offset as usize + i) {
                *slot = *b;
            }
        }
        let value = u16::from_le_bytes(v);
        self.value = value & !SLP_EN;
        if value & SLP_EN != 0 && (value >> 10) & 7 == S5_SLP_TYP {
            self.exit.fire(ExitReason::PowerOff);
        }
    }
}

/// Hardware-reduced sleep control/status registers: a write with SLP_EN (bit 5) and
/// SLP_TYP (bits 2-4) = 5 powers the VM off.
pub struct AcpiSleepControl {
    exit: Arc<ExitSignal>,
}

impl AcpiSleepControl {
    /// Writes `exit` on power-off.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiSleepControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 1 {
            let v = data[0] as u16;
            if v & (1 << 5) != 0 && (v >> 2) & 7 == S5_SLP_TYP {
                self.exit.fire(ExitReason::PowerOff);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_with_slp_en_powers_off_others_do_not() {
        let x = Arc::new(ExitSignal::new().unwrap());
        let e = &x.evt;
        let mut p = AcpiPowerOff::new(x.clone());
        p.write(0, &(S5_SLP_TYP << 10).to_le_bytes()); // no SLP_EN
        assert!(e.read().is_err());
        p.write(0, &((3 << 10) | SLP_EN).to_le_bytes()); // S3
        assert!(e.read().is_err());
        p.write(0, &((S5_SLP_TYP << 10) | SLP_EN).to_le_bytes());
        assert_eq!(e.read().unwrap(), 1);
        assert_eq!(x.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn sleep_control_register_powers_off_on_s5_only() {
        let x = Arc::new(ExitSignal::new().unwrap());
        let mut p = AcpiSleepControl::new(x.clone());
        p.write(0, &[(3 << 2) | (1 << 5)]);
        assert!(x.evt.read().is_err());
        p.write(0, &[(5 << 2) as u8]);
        assert!(x.evt.read().is_err());
        p.write(0, &[(5 << 2) | (1 << 5)]);
        assert_eq!(x.evt.read().unwrap(), 1);
        assert_eq!(x.reason(), Some(ExitReason::PowerOff));
    }
}
