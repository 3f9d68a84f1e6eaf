//! ACPI PM1a control register: a write with SLP_EN set and SLP_TYP 5 (S5) powers the VM off.
//! The FADT points the guest here.

use std::sync::Arc;

use crate::microvm::bus::BusDevice;
use crate::microvm::vcpu::{ExitReason, ExitSignal};

/// PM1a control block port.
pub const PM1A_CNT_PORT: u64 = 0x604;
/// Width of PM1a_CNT.
pub const PM1A_CNT_LEN: u64 = 2;
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
}
