//! Shared by the vmm test files: temporary directories, flat-payload VM configs, waiting, and
//! guest programs assembled here (32-bit protected mode, flat segments).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tandem_vmm::{BootMode, CpuMode, MemoryConfig, VcpuConfig, VmConfig};

/// Base of the first virtio-mmio window.
pub const VIRTIO_BASE: u32 = 0xd000_0000;
/// The hotplug registers behind the ACPI GED (PRSN at +0, EVNT at +4).
pub const HOTPLUG_BASE: u32 = 0xd010_0000;

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `<tmp>/tandem-<name>-<pid>`, empty.
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("tandem-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    /// Names of the entries, sorted.
    pub fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A VM running `payload` (written to `dir/payload.bin`) at 0x1000 in `mode`, 2 MiB of memory,
/// serial output to `dir/serial.log`, no devices.
pub fn config(dir: &Path, payload: &[u8], mode: CpuMode, vcpus: Vec<VcpuConfig>) -> VmConfig {
    let kernel = dir.join("payload.bin");
    std::fs::write(&kernel, payload).unwrap();
    VmConfig {
        kernel,
        boot: BootMode::Flat {
            load_addr: 0x1000,
            mode,
        },
        initrd: None,
        cmdline: String::new(),
        vcpus,
        memory: MemoryConfig {
            size_mib: 2,
            ..Default::default()
        },
        nics: vec![],
        disks: vec![],
        vsock: None,
        serial_log: Some(dir.join("serial.log")),
        agent: None,
        netns: None,
    }
}

/// One unpinned vCPU.
pub fn one_vcpu() -> Vec<VcpuConfig> {
    vec![VcpuConfig { host_cpu: None }]
}

/// The file's bytes as text (empty if it does not exist).
pub fn read(p: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
}

/// Polls `f` every 5 ms until it holds; panics naming `what` after 10 s.
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `f` on a thread in a fresh network namespace (taps made there, and by a VMM process
/// spawned there, never touch the host's) and returns its result.
pub fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: affects only this thread and the processes/threads it starts.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        f()
    })
    .join()
    .unwrap()
}

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
    /// Prints `c` to COM1.
    pub fn serial_char(&mut self, c: u8) -> &mut Self {
        self.0.extend([0xb0, c]); // mov al, c
        self.serial_al()
    }
    /// mov [addr], eax
    pub fn store_eax(&mut self, addr: u32) -> &mut Self {
        self.0.push(0xa3);
        self.0.extend(addr.to_le_bytes());
        self
    }
    /// inc byte [addr]
    pub fn inc_byte(&mut self, addr: u32) -> &mut Self {
        self.0.extend([0xfe, 0x05]);
        self.0.extend(addr.to_le_bytes());
        self
    }
    /// lgdt [addr]
    pub fn lgdt(&mut self, addr: u32) -> &mut Self {
        self.0.extend([0x0f, 0x01, 0x15]);
        self.0.extend(addr.to_le_bytes());
        self
    }
    /// lidt [addr]
    pub fn lidt(&mut self, addr: u32) -> &mut Self {
        self.0.extend([0x0f, 0x01, 0x1d]);
        self.0.extend(addr.to_le_bytes());
        self
    }
    /// Current offset (a jump target).
    pub fn here(&self) -> usize {
        self.0.len()
    }
    /// Spin until byte [addr] >= n: `cli; cmp byte [addr], n; jae out; sti; hlt; jmp back`.
    /// Interrupts are taken only inside `sti; hlt`, so a wake-up between the check and the
    /// halt cannot be lost.
    pub fn halt_until_byte_at_least(&mut self, addr: u32, n: u8) -> &mut Self {
        let top = self.here();
        self.0.push(0xfa); // cli
        self.0.extend([0x80, 0x3d]); // cmp byte [addr], n
        self.0.extend(addr.to_le_bytes());
        self.0.push(n);
        self.0.extend([0x73, 0x04]); // jae over sti; hlt; jmp
        self.0.extend([0xfb, 0xf4]); // sti; hlt
        let rel = top as isize - (self.here() as isize + 2);
        self.0.extend([0xeb, rel as i8 as u8]); // jmp top
        self
    }
    /// Sets a stack below 0x8000, loads a flat GDT (code 0x08, data 0x10) at 0x800 and an IDT at 0x4000 whose gate for
    /// `vector` enters `handler`; enables the local APIC and routes IOAPIC pin `gsi` (edge,
    /// active high, unmasked) to `vector` on APIC 0.
    pub fn interrupts(&mut self, vector: u8, handler: u32, gsi: u32) -> &mut Self {
        self.0.push(0xbc); // mov esp, 0x8000
        self.0.extend(0x8000u32.to_le_bytes());
        self.store(0x800, 0).store(0x804, 0);
        self.store(0x808, 0x0000_ffff).store(0x80c, 0x00cf_9a00);
        self.store(0x810, 0x0000_ffff).store(0x814, 0x00cf_9200);
        self.store(0x7f0, 0x0800_0017).store(0x7f4, 0); // limit 0x17, base 0x800
        self.lgdt(0x7f0);
        let gate = 0x4000 + 8 * vector as u32;
        self.store(gate, 0x0008_0000 | (handler & 0xffff));
        self.store(gate + 4, (handler & 0xffff_0000) | 0x8e00); // present 32-bit interrupt gate
        self.store(0x7e0, 0x4000_07ff).store(0x7e4, 0); // limit 0x7ff, base 0x4000
        self.lidt(0x7e0);
        self.store(0xfee0_00f0, 0x1ff); // LAPIC SVR: enabled, spurious vector 0xff
        self.store(0xfee0_0080, 0); // TPR 0
        let reg = 0x10 + 2 * gsi;
        self.store(0xfec0_0000, reg)
            .store(0xfec0_0010, vector as u32);
        self.store(0xfec0_0000, reg + 1).store(0xfec0_0010, 0);
        self
    }
    /// Pads with `hlt` up to offset `at`.
    pub fn pad_to(&mut self, at: usize) -> &mut Self {
        assert!(self.0.len() <= at, "code overruns offset {at:#x}");
        self.0.resize(at, 0xf4);
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

/// The GED's interrupt vector in the guest program.
pub const GED_VECTOR: u8 = 0x40;
/// Where the guest program keeps its count of GED interrupts.
pub const IRQ_COUNT: u32 = 0x7d0;
/// Offset of the interrupt handler in the payload (loaded at 0x1000).
pub const HANDLER: usize = 0x400;

/// The guest side of hotplug: takes the GED interrupt through the IOAPIC and its local APIC,
/// reads and acknowledges the event register in the handler, and looks at slots 1 and 2 before
/// and after. Prints: the low byte of slot 1's magic register (0xff: nothing mapped), PRSN, 'R' (ready); per
/// interrupt, EVNT; after the second interrupt slot 1's and slot 2's magic ('v') and device id,
/// PRSN, EVNT; then powers off.
///
/// The handler does not IRET: KVM's instruction emulator, which runs this 32-bit code on PVM,
/// has no protected-mode IRET. Interrupts are only taken inside the wait loop's `sti; hlt`, so
/// the handler drops the interrupt frame and jumps back to the loop instead.
pub fn hotplug_guest() -> Vec<u8> {
    let slot = |i: u32| VIRTIO_BASE + 0x1000 * i;
    let mut a = Asm::default();
    a.interrupts(GED_VECTOR, 0x1000 + HANDLER as u32, 23);
    a.load_eax(slot(1)).serial_al();
    a.load_eax(HOTPLUG_BASE).add_al(b'0').serial_al();
    a.serial_char(b'R');
    let wait = a.here();
    a.halt_until_byte_at_least(IRQ_COUNT, 2);
    for i in [1, 2] {
        a.load_eax(slot(i)).serial_al();
        a.load_eax(slot(i) + 8).add_al(b'0').serial_al();
    }
    a.load_eax(HOTPLUG_BASE).add_al(b'0').serial_al();
    a.load_eax(HOTPLUG_BASE + 4).add_al(b'0').serial_al();
    a.power_off();
    a.pad_to(HANDLER);
    // The handler: EVNT -> eax; write it back (ack); print it; EOI; count; drop the frame
    // (EIP, CS, EFLAGS); back to the wait loop.
    a.load_eax(HOTPLUG_BASE + 4).store_eax(HOTPLUG_BASE + 4);
    a.add_al(b'0').serial_al();
    a.store(0xfee0_00b0, 0);
    a.inc_byte(IRQ_COUNT);
    a.0.extend([0x83, 0xc4, 0x0c]); // add esp, 12
    let rel = wait as i32 - (a.here() as i32 + 5);
    a.0.push(0xe9); // jmp wait
    a.0.extend(rel.to_le_bytes());
    a.0
}
