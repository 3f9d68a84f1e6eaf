//! Guest programs assembled for the tests (32-bit protected mode, flat segments).
#![allow(dead_code)]

/// Base of the first virtio-mmio window.
pub const VIRTIO_BASE: u32 = 0xd000_0000;

/// A tiny 32-bit assembler for the few instructions the tests need.
#[derive(Default)]
pub struct Asm(pub Vec<u8>);

impl Asm {
    /// mov dword [addr], imm
    pub fn store(&mut self, addr: u32, imm: u32) -> &mut Self {
        self.0.extend([0xc7, 0x05]);
        self.0.extend(addr.to_le_bytes());
        self.0.extend(imm.to_le_bytes());
        self
    }
    /// mov eax, [addr]
    pub fn load_eax(&mut self, addr: u32) -> &mut Self {
        self.0.push(0xa1);
        self.0.extend(addr.to_le_bytes());
        self
    }
    /// mov al, [addr]
    pub fn load_al(&mut self, addr: u32) -> &mut Self {
        self.0.push(0xa0);
        self.0.extend(addr.to_le_bytes());
        self
    }
    /// add al, imm8
    pub fn add_al(&mut self, imm: u8) -> &mut Self {
        self.0.extend([0x04, imm]);
        self
    }
    /// mov dx, 0x3f8; out dx, al
    pub fn serial_al(&mut self) -> &mut Self {
        self.0.extend([0x66, 0xba, 0xf8, 0x03, 0xee]);
        self
    }
    /// Spin until (dword [addr] & mask) != 0.
    pub fn wait_bits(&mut self, addr: u32, mask: u8) -> &mut Self {
        self.load_eax(addr); // 5 bytes
        self.0.extend([0xa8, mask]); // test al, mask
        self.0.extend([0x74, 0xf7]); // jz back to the load (-9)
        self
    }
    /// ACPI power-off: PM1a_CNT (0x604) = SLP_TYP 5 | SLP_EN.
    pub fn power_off(&mut self) -> &mut Self {
        self.0
            .extend([0x66, 0xba, 0x04, 0x06, 0x66, 0xb8, 0x00, 0x34, 0x66, 0xef]);
        self.0.extend([0xf4, 0xeb, 0xfd]);
        self
    }
}

/// Queue layout the guest driver uses.
pub const DESC: u32 = 0x10000;
pub const AVAIL: u32 = 0x11000;
pub const USED: u32 = 0x12000;
pub const HDR: u32 = 0x13000;
pub const STATUS: u32 = 0x13800;
pub const DATA: u32 = 0x14000;

/// A guest virtio-blk driver: checks magic and device id, does the status handshake, sets up
/// queue 0, reads sector 1 and prints "v2" + first data byte + status digit to COM1, then
/// powers off.
pub fn virtio_blk_driver() -> Vec<u8> {
    let b = VIRTIO_BASE;
    let mut a = Asm::default();
    a.load_eax(b).serial_al(); // 'v' of "virt"
    a.load_eax(b + 0x008).add_al(b'0').serial_al(); // device id 2
    a.store(b + 0x070, 1).store(b + 0x070, 3);
    a.store(b + 0x024, 1).store(b + 0x020, 1); // VIRTIO_F_VERSION_1
    a.store(b + 0x070, 0xb);
    a.store(b + 0x030, 0).store(b + 0x038, 16);
    a.store(b + 0x080, DESC)
        .store(b + 0x090, AVAIL)
        .store(b + 0x0a0, USED);
    a.store(b + 0x044, 1);
    a.store(b + 0x070, 0xf);
    // Request: header (IN, sector 1), 512 bytes of data, 1 status byte.
    a.store(HDR + 8, 1);
    a.store(DESC, HDR)
        .store(DESC + 8, 16)
        .store(DESC + 12, 0x0001_0001);
    a.store(DESC + 16, DATA)
        .store(DESC + 24, 512)
        .store(DESC + 28, 0x0002_0003);
    a.store(DESC + 32, STATUS)
        .store(DESC + 40, 1)
        .store(DESC + 44, 0x0000_0002);
    a.store(AVAIL, 0x0001_0000); // flags 0, idx 1; ring[0] = 0 (memory is zero)
    a.store(b + 0x050, 0); // notify queue 0
    a.wait_bits(b + 0x060, 1);
    a.store(b + 0x064, 1);
    a.load_al(DATA).serial_al();
    a.load_al(STATUS).add_al(b'0').serial_al();
    a.power_off();
    a.0
}
