//! ACPI tables for distro kernels (no MP table, no virtio-mmio command-line devices): RSDP, XSDT,
//! FADT (hardware-reduced, sleep control register for power-off), MADT (one local APIC per vCPU,
//! the IOAPIC) and a DSDT with `_S5_` and one `LNRO0005` device per virtio-mmio window.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Result};
use crate::microvm::devices::power::{S5_SLP_TYP, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT};

/// Where the RSDP goes (inside the BIOS area Linux also scans).
pub const RSDP_ADDR: u64 = 0xe_0000;
/// End of the area the tables may use.
pub const ACPI_END: u64 = 0x10_0000;
const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
const OEM_ID: [u8; 6] = *b"TANDEM";
const OEM_TABLE: [u8; 8] = *b"TANDEMVM";

/// A virtio-mmio device as the DSDT describes it.
#[derive(Clone, Copy, Debug)]
pub struct MmioDevice {
    /// MMIO base.
    pub base: u64,
    /// Window length.
    pub len: u64,
    /// GSI.
    pub gsi: u32,
}

fn bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// The DSDT body.
pub fn dsdt(devices: &[MmioDevice]) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&(S5_SLP_TYP as u8)]));
    sdt.append_slice(&bytes(&s5));
    for (i, d) in devices.iter().enumerate() {
        let mem = aml::Memory32Fixed::new(true, d.base as u32, d.len as u32);
        let irq = aml::Interrupt::new(true, true, false, false, d.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid_v = i as u32;
        let uid = aml::Name::new("_UID".into(), &uid_v);
        let crs = aml::Name::new("_CRS".into(), &crs);
        let name = format!("_SB_.V{i:03X}");
        let dev = aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]);
        sdt.append_slice(&bytes(&dev));
    }
    sdt.update_checksum();
    sdt.as_slice().to_vec()
}

/// Writes all tables below 1 MiB; returns the RSDP address.
pub fn write_tables(mem: &GuestMemoryMmap, vcpus: usize, devices: &[MmioDevice]) -> Result<u64> {
    let err = |what: &str, e: &dyn std::fmt::Display| Error::Device {
        device: "ACPI tables".into(),
        reason: format!("{what}: {e}"),
    };
    let mut next = RSDP_ADDR + 0x40; // after the 36-byte RSDP, aligned
    let mut place = |data: &[u8], what: &str| -> Result<u64> {
        let at = next;
        let end = at + data.len() as u64;
        if end > ACPI_END {
            return Err(err(what, &"tables do not fit below 1 MiB"));
        }
        mem.write_slice(data, GuestAddress(at))
            .map_err(|e| err(what, &e))?;
        next = (end + 15) & !15;
        Ok(at)
    };

    let dsdt_addr = place(&dsdt(devices), "DSDT")?;

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton);
    fadt.sleep_control_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        SLEEP_CONTROL_PORT,
    );
    fadt.sleep_status_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        SLEEP_STATUS_PORT,
    );
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"TANDEMVM").into();
    let fadt_addr = place(&bytes(&fadt.finalize()), "FADT")?;

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for i in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(
            i as u8,
            i as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(vcpus as u8, IOAPIC_ADDR, 0));
    let madt_addr = place(&bytes(&madt), "MADT")?;

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(&bytes(&xsdt), "XSDT")?;

    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    mem.write_slice(&bytes(&rsdp), GuestAddress(RSDP_ADDR))
        .map_err(|e| err("RSDP", &e))?;
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn table(mem: &GuestMemoryMmap, at: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        let mut v = vec![0u8; len as usize];
        mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let devs = [
            MmioDevice {
                base: 0xd000_0000,
                len: 0x1000,
                gsi: 5,
            },
            MmioDevice {
                base: 0xd000_1000,
                len: 0x1000,
                gsi: 6,
            },
        ];
        let rsdp_at = write_tables(&mem, 2, &devs).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(rsdp_at)).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        let xsdt_at = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = table(&mem, xsdt_at);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(sum(&xsdt), 0);
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries.len(), 2);
        let fadt = table(&mem, entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(sum(&fadt), 0);
        // X_DSDT at offset 140.
        let dsdt_at = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table(&mem, dsdt_at);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(sum(&dsdt), 0);
        let count = dsdt.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(count, 2);
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        let madt = table(&mem, entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        assert_eq!(sum(&madt), 0);
        // Two local APIC entries (type 0, length 8) and one IOAPIC (type 1, length 12).
        let mut off = 44;
        let mut kinds = vec![];
        while off < madt.len() {
            kinds.push(madt[off]);
            off += madt[off + 1] as usize;
        }
        assert_eq!(kinds, vec![0, 0, 1]);
    }
}
