//! ACPI tables for distro kernels (no MP table, no virtio-mmio command-line devices): RSDP, XSDT,
//! FADT (hardware-reduced, sleep control register for power-off), MADT (one local APIC per vCPU,
//! the IOAPIC) and a DSDT with `_S5_`, one `LNRO0005` device per virtio-mmio slot (filled or
//! not) inside a container device, and a Generic Event Device for hotplug notification.

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

/// Where the hotplug registers are and which GSI the GED raises.
#[derive(Clone, Copy, Debug)]
pub struct Hotplug {
    /// Guest physical base of the `PRSN`/`EVNT` registers.
    pub regs: u64,
    /// Length of the register block.
    pub regs_len: u64,
    /// The GED's interrupt.
    pub gsi: u32,
}

/// ACPI path of the container device that holds the virtio-mmio slots.
pub const CONTAINER: &str = "\\_SB_.VMIO";
/// ACPI path of the Generic Event Device.
pub const GED: &str = "\\_SB_.GED_";

/// Name of slot `i` (inside [`CONTAINER`]).
pub fn slot_name(i: usize) -> String {
    format!("V{i:03X}")
}

/// The DSDT: `_S5_`; a container device (`ACPI0004`, [`CONTAINER`]) with the hotplug registers
/// as an OperationRegion (fields `PRSN`, `EVNT`) and one `LNRO0005` device per virtio-mmio slot
/// in `slots`, whose `_STA` reports present from its `PRSN` bit, so that a slot filled later is
/// described in advance; and a Generic Event Device (`ACPI0013`, [`GED`]) whose interrupt runs
/// `_EVT`: read `EVNT`, write it back (acknowledge), and if any slot changed, send a bus check
/// (`Notify(VMIO, 0)`) so the guest rescans the container and enumerates the new device.
pub fn dsdt(slots: &[MmioDevice], hotplug: Hotplug) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&(S5_SLP_TYP as u8)]));
    sdt.append_slice(&bytes(&s5));

    // The container with the registers and the slots.
    let mut slot_aml: Vec<Vec<u8>> = Vec::with_capacity(slots.len());
    for (i, d) in slots.iter().enumerate() {
        let mem = aml::Memory32Fixed::new(true, d.base as u32, d.len as u32);
        let irq = aml::Interrupt::new(true, true, false, false, d.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid_v = i as u32;
        let uid = aml::Name::new("_UID".into(), &uid_v);
        let crs = aml::Name::new("_CRS".into(), &crs);
        let mask: u32 = 1 << i;
        let prsn = aml::Path::new("PRSN");
        let bit = aml::And::new(&aml::ZERO, &prsn, &mask);
        let on = aml::Return::new(&0x0fu8);
        let present = aml::If::new(&bit, vec![&on]);
        let off = aml::Return::new(&aml::ZERO);
        let sta = aml::Method::new("_STA".into(), 0, false, vec![&present, &off]);
        let name = slot_name(i);
        let dev = aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs, &sta]);
        slot_aml.push(bytes(&dev));
    }
    let hid = aml::Name::new("_HID".into(), &"ACPI0004");
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let regs_base = hotplug.regs as u32;
    let regs_len = hotplug.regs_len as u32;
    let region = aml::OpRegion::new(
        "HPRG".into(),
        aml::OpRegionSpace::SystemMemory,
        &regs_base,
        &regs_len,
    );
    let field = aml::Field::new(
        "HPRG".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::Preserve,
        vec![
            aml::FieldEntry::Named(*b"PRSN", 32),
            aml::FieldEntry::Named(*b"EVNT", 32),
        ],
    );
    let raw: Vec<RawAml> = slot_aml.into_iter().map(RawAml).collect();
    let mut children: Vec<&dyn Aml> = vec![&hid, &uid, &region, &field];
    children.extend(raw.iter().map(|r| r as &dyn Aml));
    let container = aml::Device::new(CONTAINER.into(), children);
    sdt.append_slice(&bytes(&container));

    // The GED.
    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let irq = aml::Interrupt::new(true, true, false, false, hotplug.gsi);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&irq]));
    let evnt = aml::Path::new(&format!("{CONTAINER}.EVNT"));
    let read = aml::Store::new(&aml::Local(0), &evnt);
    let ack = aml::Store::new(&evnt, &aml::Local(0));
    let target = aml::Path::new(CONTAINER);
    let bus_check = aml::Notify::new(&target, &aml::ZERO);
    let changed = aml::If::new(&aml::Local(0), vec![&bus_check]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&read, &ack, &changed]);
    let ged = aml::Device::new(GED.into(), vec![&hid, &uid, &crs, &evt]);
    sdt.append_slice(&bytes(&ged));

    sdt.update_checksum();
    sdt.as_slice().to_vec()
}

/// Already encoded AML.
struct RawAml(Vec<u8>);
impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// Writes all tables below 1 MiB; returns the RSDP address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    vcpus: usize,
    slots: &[MmioDevice],
    hotplug: Hotplug,
) -> Result<u64> {
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

    let dsdt_addr = place(&dsdt(slots, hotplug), "DSDT")?;

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

    const HP: Hotplug = Hotplug {
        regs: 0xd010_0000,
        regs_len: 8,
        gsi: 23,
    };

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
        let rsdp_at = write_tables(&mem, 2, &devs, HP).unwrap();
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
        assert_eq!(dsdt.windows(8).filter(|w| w == b"ACPI0013").count(), 1);
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

    // A small AML reader for what the DSDT uses: every object must end exactly where its
    // PkgLength says, every opcode must be known, and the methods can be evaluated.
    #[derive(Clone, Debug, PartialEq)]
    enum Node {
        Int(u64),
        Str(String),
        NameRef(String),
        Local(u8),
        Buffer(Vec<u8>),
        Package(Vec<Node>),
        Name(String, Box<Node>),
        Device(String, Vec<Node>),
        Method(String, u8, bool, Vec<Node>),
        OpRegion(String, u8, Box<Node>, Box<Node>),
        Field(String, u8, Vec<(String, usize)>),
        If(Box<Node>, Vec<Node>),
        Op(&'static str, Vec<Node>),
    }

    struct Reader<'a> {
        b: &'a [u8],
        i: usize,
    }

    impl Reader<'_> {
        fn byte(&mut self) -> u8 {
            let v = *self.b.get(self.i).expect("AML ends inside an object");
            self.i += 1;
            v
        }
        fn le(&mut self, n: usize) -> u64 {
            (0..n).fold(0, |a, k| a | (self.byte() as u64) << (8 * k))
        }
        /// PkgLength value (not adjusted).
        fn pkg_value(&mut self) -> usize {
            let lead = self.byte();
            let n = (lead >> 6) as usize;
            if n == 0 {
                return (lead & 0x3f) as usize;
            }
            assert_eq!(lead & 0x30, 0, "reserved PkgLength bits set");
            (0..n).fold((lead & 0xf) as usize, |a, k| {
                a | (self.byte() as usize) << (4 + 8 * k)
            })
        }
        /// End offset of an object whose PkgLength starts here.
        fn pkg_end(&mut self) -> usize {
            let start = self.i;
            let end = start + self.pkg_value();
            assert!(end <= self.b.len(), "PkgLength at {start} beyond the table");
            end
        }
        fn seg(&mut self) -> String {
            let s: String = (0..4).map(|_| self.byte() as char).collect();
            assert!(
                s.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'),
                "bad NameSeg {s:?}"
            );
            assert!(!s.starts_with(|c: char| c.is_ascii_digit()), "{s:?}");
            s
        }
        fn name(&mut self) -> String {
            let mut out = String::new();
            while matches!(self.b[self.i], b'\\' | b'^') {
                out.push(self.byte() as char);
            }
            let segs = match self.b[self.i] {
                0x2e => {
                    self.i += 1;
                    2
                }
                0x2f => {
                    self.i += 1;
                    self.byte() as usize
                }
                0 => {
                    self.i += 1;
                    0
                }
                _ => 1,
            };
            let parts: Vec<String> = (0..segs).map(|_| self.seg()).collect();
            out + &parts.join(".")
        }
        fn terms(&mut self, end: usize) -> Vec<Node> {
            let mut v = Vec::new();
            while self.i < end {
                v.push(self.term());
            }
            assert_eq!(self.i, end, "an object overruns its PkgLength");
            v
        }
        fn term(&mut self) -> Node {
            let at = self.i;
            let op = self.byte();
            match op {
                0x00 => Node::Int(0),
                0x01 => Node::Int(1),
                0xff => Node::Int(u64::MAX),
                0x0a => Node::Int(self.le(1)),
                0x0b => Node::Int(self.le(2)),
                0x0c => Node::Int(self.le(4)),
                0x0e => Node::Int(self.le(8)),
                0x0d => {
                    let mut s = String::new();
                    loop {
                        match self.byte() {
                            0 => break Node::Str(s),
                            c => s.push(c as char),
                        }
                    }
                }
                0x08 => {
                    let n = self.name();
                    Node::Name(n, Box::new(self.term()))
                }
                0x11 => {
                    let end = self.pkg_end();
                    let Node::Int(size) = self.term() else {
                        panic!("buffer size at {at} is not an integer")
                    };
                    let data = self.b[self.i..end].to_vec();
                    assert_eq!(size as usize, data.len(), "buffer at {at}");
                    self.i = end;
                    Node::Buffer(data)
                }
                0x12 => {
                    let end = self.pkg_end();
                    let count = self.byte() as usize;
                    let items = self.terms(end);
                    assert_eq!(count, items.len(), "package at {at}");
                    Node::Package(items)
                }
                0x14 => {
                    let end = self.pkg_end();
                    let n = self.name();
                    let flags = self.byte();
                    Node::Method(n, flags & 7, flags & 8 != 0, self.terms(end))
                }
                0x60..=0x67 => Node::Local(op - 0x60),
                0x70 => Node::Op("Store", vec![self.term(), self.term()]),
                0x7b => Node::Op("And", vec![self.term(), self.term(), self.term()]),
                0x86 => Node::Op("Notify", vec![self.term(), self.term()]),
                0xa4 => Node::Op("Return", vec![self.term()]),
                0xa0 => {
                    let end = self.pkg_end();
                    let pred = self.term();
                    Node::If(Box::new(pred), self.terms(end))
                }
                0x5b => match self.byte() {
                    0x82 => {
                        let end = self.pkg_end();
                        let n = self.name();
                        Node::Device(n, self.terms(end))
                    }
                    0x80 => {
                        let n = self.name();
                        let space = self.byte();
                        let off = self.term();
                        let len = self.term();
                        Node::OpRegion(n, space, Box::new(off), Box::new(len))
                    }
                    0x81 => {
                        let end = self.pkg_end();
                        let region = self.name();
                        let flags = self.byte();
                        let mut fields = Vec::new();
                        while self.i < end {
                            let n = if self.b[self.i] == 0 {
                                self.i += 1;
                                String::new()
                            } else {
                                self.seg()
                            };
                            fields.push((n, self.pkg_value()));
                        }
                        assert_eq!(self.i, end, "field list at {at}");
                        Node::Field(region, flags, fields)
                    }
                    x => panic!("unknown extended AML opcode 0x5b {x:#x} at {at}"),
                },
                b'\\' | b'^' | b'_' | b'A'..=b'Z' | 0x2e | 0x2f => {
                    self.i = at;
                    Node::NameRef(self.name())
                }
                x => panic!("unknown AML opcode {x:#x} at {at}"),
            }
        }
    }

    fn find<'a>(nodes: &'a [Node], name: &str) -> &'a Node {
        nodes
            .iter()
            .find(|n| match n {
                Node::Name(x, _) | Node::Device(x, _) | Node::Method(x, ..) => x == name,
                _ => false,
            })
            .unwrap_or_else(|| panic!("{name} not found in {nodes:?}"))
    }

    fn children<'a>(nodes: &'a [Node], name: &str) -> &'a [Node] {
        match find(nodes, name) {
            Node::Device(_, c) => c,
            n => panic!("{name} is not a device: {n:?}"),
        }
    }

    fn value<'a>(nodes: &'a [Node], name: &str) -> &'a Node {
        match find(nodes, name) {
            Node::Name(_, v) => v,
            n => panic!("{name} is not a Name: {n:?}"),
        }
    }

    /// Resource descriptors of a `_CRS` buffer: (tag, body).
    fn resources(buf: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut v = Vec::new();
        let mut i = 0;
        loop {
            let tag = buf[i];
            if tag == 0x79 {
                assert_eq!(i + 2, buf.len(), "end tag is not last");
                return v;
            }
            assert!(tag & 0x80 != 0, "small descriptor {tag:#x}");
            let len = u16::from_le_bytes([buf[i + 1], buf[i + 2]]) as usize;
            v.push((tag, buf[i + 3..i + 3 + len].to_vec()));
            i += 3 + len;
        }
    }

    /// The registers the AML sees, and what it did.
    #[derive(Default)]
    struct Machine {
        prsn: u64,
        evnt: u64,
        evnt_writes: Vec<u64>,
        notified: Vec<(String, u64)>,
    }

    impl Machine {
        fn read(&self, name: &str) -> u64 {
            match name {
                "PRSN" | "\\_SB_.VMIO.PRSN" => self.prsn,
                "EVNT" | "\\_SB_.VMIO.EVNT" => self.evnt,
                _ => panic!("read of unknown {name}"),
            }
        }
        fn eval(&mut self, n: &Node, locals: &mut [u64; 8]) -> u64 {
            match n {
                Node::Int(v) => *v,
                Node::Local(l) => locals[*l as usize],
                Node::NameRef(x) => self.read(x),
                Node::Op("And", a) => {
                    let v = self.eval(&a[0], locals) & self.eval(&a[1], locals);
                    assert_eq!(a[2], Node::Int(0), "And stores only into NullName here");
                    v
                }
                n => panic!("cannot evaluate {n:?}"),
            }
        }
        /// Runs a method body; returns its Return value.
        fn run(&mut self, body: &[Node], locals: &mut [u64; 8]) -> Option<u64> {
            for n in body {
                match n {
                    Node::Op("Store", a) => {
                        let v = self.eval(&a[0], locals);
                        match &a[1] {
                            Node::Local(l) => locals[*l as usize] = v,
                            Node::NameRef(x) if x.ends_with("EVNT") => {
                                self.evnt_writes.push(v);
                                self.evnt &= !v;
                            }
                            t => panic!("store to {t:?}"),
                        }
                    }
                    Node::Op("Return", a) => return Some(self.eval(&a[0], locals)),
                    Node::Op("Notify", a) => {
                        let Node::NameRef(t) = &a[0] else {
                            panic!("notify target {:?}", a[0])
                        };
                        let v = self.eval(&a[1], locals);
                        self.notified.push((t.clone(), v));
                    }
                    Node::If(p, b) => {
                        if self.eval(p, locals) != 0 {
                            if let Some(r) = self.run(b, locals) {
                                return Some(r);
                            }
                        }
                    }
                    n => panic!("cannot run {n:?}"),
                }
            }
            None
        }
    }

    fn method(nodes: &[Node], name: &str) -> (u8, bool, Vec<Node>) {
        match find(nodes, name) {
            Node::Method(_, args, ser, body) => (*args, *ser, body.clone()),
            n => panic!("{name} is not a method: {n:?}"),
        }
    }

    #[test]
    fn dsdt_describes_the_slots_the_hotplug_registers_and_the_ged() {
        let slots: Vec<MmioDevice> = (0..18u32)
            .map(|i| MmioDevice {
                base: 0xd000_0000 + 0x1000 * i as u64,
                len: 0x1000,
                gsi: 5 + i,
            })
            .collect();
        let t = dsdt(&slots, HP);
        assert_eq!(&t[..4], b"DSDT");
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
            t.len()
        );
        assert_eq!(sum(&t), 0);
        let mut r = Reader { b: &t, i: 36 };
        let root = r.terms(t.len());

        assert_eq!(*value(&root, "_S5_"), Node::Package(vec![Node::Int(5)]));
        assert_eq!(root.len(), 3, "{root:?}");

        // The container, its registers and 18 slots.
        let vmio = children(&root, "\\_SB_.VMIO");
        assert_eq!(*value(vmio, "_HID"), Node::Str("ACPI0004".into()));
        assert!(vmio.contains(&Node::OpRegion(
            "HPRG".into(),
            0, // SystemMemory
            Box::new(Node::Int(0xd010_0000)),
            Box::new(Node::Int(8)),
        )));
        assert!(vmio.contains(&Node::Field(
            "HPRG".into(),
            3, // DWordAcc, NoLock, Preserve
            vec![("PRSN".into(), 32), ("EVNT".into(), 32)],
        )));
        let devices: Vec<&str> = vmio
            .iter()
            .filter_map(|n| match n {
                Node::Device(x, _) => Some(x.as_str()),
                _ => None,
            })
            .collect();
        let want: Vec<String> = (0..18).map(slot_name).collect();
        assert_eq!(devices, want);
        for (i, s) in slots.iter().enumerate() {
            let dev = children(vmio, &slot_name(i));
            assert_eq!(*value(dev, "_HID"), Node::Str("LNRO0005".into()));
            assert_eq!(*value(dev, "_UID"), Node::Int(i as u64));
            let Node::Buffer(crs) = value(dev, "_CRS") else {
                panic!("slot {i}: _CRS is not a buffer")
            };
            let res = resources(crs);
            assert_eq!(res.len(), 2);
            // Memory32Fixed: read-write, base, length.
            assert_eq!(res[0].0, 0x86);
            assert_eq!(res[0].1[0], 1);
            assert_eq!(
                u32::from_le_bytes(res[0].1[1..5].try_into().unwrap()) as u64,
                s.base
            );
            assert_eq!(
                u32::from_le_bytes(res[0].1[5..9].try_into().unwrap()),
                0x1000
            );
            // Extended interrupt: consumer, edge, active high, exclusive; one GSI.
            assert_eq!(res[1].0, 0x89);
            assert_eq!(res[1].1[..2], [0b0011, 1]);
            assert_eq!(
                u32::from_le_bytes(res[1].1[2..6].try_into().unwrap()),
                s.gsi
            );
            // _STA follows the slot's PRSN bit.
            let (args, _, body) = method(dev, "_STA");
            assert_eq!(args, 0);
            for prsn in [0u64, 1 << i, !(1u64 << i) & 0x3ffff, 0x3ffff] {
                let mut m = Machine {
                    prsn,
                    ..Default::default()
                };
                let want = if prsn & (1 << i) != 0 { 0xf } else { 0 };
                assert_eq!(
                    m.run(&body, &mut [0; 8]),
                    Some(want),
                    "slot {i}, PRSN {prsn:#x}"
                );
            }
        }

        // The GED: ACPI0013, its interrupt, and _EVT acknowledging and notifying the container.
        let ged = children(&root, "\\_SB_.GED_");
        assert_eq!(*value(ged, "_HID"), Node::Str("ACPI0013".into()));
        let Node::Buffer(crs) = value(ged, "_CRS") else {
            panic!("GED _CRS is not a buffer")
        };
        let res = resources(crs);
        assert_eq!(res.len(), 1);
        assert_eq!(res[0].0, 0x89);
        assert_eq!(res[0].1[..2], [0b0011, 1]);
        assert_eq!(u32::from_le_bytes(res[0].1[2..6].try_into().unwrap()), 23);
        let (args, serialized, body) = method(ged, "_EVT");
        assert_eq!((args, serialized), (1, true));
        let mut m = Machine {
            prsn: 0b101,
            evnt: 0b100,
            ..Default::default()
        };
        m.run(&body, &mut [0; 8]);
        assert_eq!(m.evnt_writes, vec![0b100], "_EVT acknowledges what it read");
        assert_eq!(m.evnt, 0);
        assert_eq!(
            m.notified,
            vec![("\\_SB_.VMIO".to_string(), 0)],
            "bus check"
        );
        // A spurious interrupt (no event) notifies nobody.
        let mut m = Machine::default();
        m.run(&body, &mut [0; 8]);
        assert!(m.notified.is_empty());
    }
}
