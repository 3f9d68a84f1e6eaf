//! Linux boot: ELF vmlinux through its PVH entry (32-bit protected mode, start_info in RBX) or
//! bzImage through the 64-bit boot protocol (long mode, zero page in RSI); command line, initramfs
//! and an e820 map describing guest RAM.

use std::fs::File;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Result};
use crate::microvm::memory::{ram_ranges, MMIO_HOLE_START};

/// GDT.
pub const GDT_ADDR: u64 = 0x500;
/// PVH start_info.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH memmap table (after start_info).
pub const PVH_MEMMAP_ADDR: u64 = 0x6040;
/// PVH module list.
pub const PVH_MODLIST_ADDR: u64 = 0x6400;
/// Zero page (boot_params).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Boot stack top.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Page tables: PML4, PDPT, PD.
pub const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
/// Command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line.
pub const CMDLINE_MAX: usize = 4096;
/// End of low RAM (EBDA and BIOS area above are reserved; ACPI tables live there).
pub const EBDA_START: u64 = 0x9fc00;
/// Kernel load address.
pub const HIMEM_START: u64 = 0x10_0000;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// How the vCPUs must be entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// PVH: 32-bit protected mode at `entry`, RBX = start_info.
    Pvh(u64),
    /// 64-bit boot protocol: long mode at `entry`, RSI = zero page.
    Linux64(u64),
}

fn boot_err(what: impl std::fmt::Display) -> Error {
    Error::Device {
        device: "Linux boot".into(),
        reason: what.to_string(),
    }
}

/// The e820 map: (addr, size, type).
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut v = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (gpa, len) in ram_ranges(mem_size) {
        if gpa.0 == 0 {
            if len > HIMEM_START {
                v.push((HIMEM_START, len - HIMEM_START, E820_RAM));
            }
        } else {
            v.push((gpa.0, len, E820_RAM));
        }
    }
    v
}

/// Loads kernel, initramfs and command line and writes the boot structures; returns the entry.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &std::path::Path,
    initrd: Option<&std::path::Path>,
    cmdline: &str,
    rsdp: u64,
) -> Result<Entry> {
    let mut f = File::open(kernel).map_err(|e| Error::io(kernel, e))?;
    let himem = Some(GuestAddress(HIMEM_START));
    // ELF first (PVH), then bzImage.
    let (result, elf) = match Elf::load(mem, None, &mut f, himem) {
        Ok(r) => (r, true),
        Err(elf_err) => {
            let mut f = File::open(kernel).map_err(|e| Error::io(kernel, e))?;
            match BzImage::load(mem, None, &mut f, himem) {
                Ok(r) => (r, false),
                Err(bz_err) => {
                    return Err(boot_err(format!(
                        "kernel {}: neither an ELF vmlinux ({elf_err}) nor a bzImage ({bz_err})",
                        kernel.display()
                    )))
                }
            }
        }
    };
    if cmdline.len() >= CMDLINE_MAX {
        return Err(Error::invalid(
            "cmdline",
            format!("{} bytes, at most {}", cmdline.len(), CMDLINE_MAX - 1),
        ));
    }
    let cl = Cmdline::try_from(cmdline, CMDLINE_MAX)
        .map_err(|e| Error::invalid("cmdline", e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl)
        .map_err(|e| boot_err(format!("command line: {e}")))?;

    // Initramfs: page-aligned, as high as possible in low RAM, above the kernel.
    let initrd_place = match initrd {
        None => None,
        Some(p) => {
            let data = std::fs::read(p).map_err(|e| Error::io(p, e))?;
            let low_end = mem_size.min(MMIO_HOLE_START);
            let size = data.len() as u64;
            let addr = low_end
                .checked_sub(size)
                .map(|a| a & !0xfff)
                .filter(|a| *a >= result.kernel_end)
                .ok_or_else(|| {
                    Error::invalid(
                        "initrd",
                        format!(
                            "{}: {size} bytes do not fit in guest RAM above the kernel",
                            p.display()
                        ),
                    )
                })?;
            mem.write_slice(&data, GuestAddress(addr))
                .map_err(|e| boot_err(format!("initrd {}: {e}", p.display())))?;
            Some((addr, size))
        }
    };
    let e820 = e820_map(mem_size);

    if elf {
        let PvhBootCapability::PvhEntryPresent(entry) = result.pvh_boot_cap else {
            return Err(boot_err(format!(
                "kernel {}: ELF without a PVH entry note ({})",
                kernel.display(),
                result.pvh_boot_cap
            )));
        };
        let mut info = hvm_start_info {
            magic: XEN_HVM_START_MAGIC,
            version: 1,
            cmdline_paddr: CMDLINE_ADDR,
            rsdp_paddr: rsdp,
            memmap_paddr: PVH_MEMMAP_ADDR,
            memmap_entries: e820.len() as u32,
            ..Default::default()
        };
        let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
        let map: Vec<hvm_memmap_table_entry> = e820
            .iter()
            .map(|&(addr, size, type_)| hvm_memmap_table_entry {
                addr,
                size,
                type_,
                reserved: 0,
            })
            .collect();
        params.set_sections(&map, GuestAddress(PVH_MEMMAP_ADDR));
        if let Some((addr, size)) = initrd_place {
            info.nr_modules = 1;
            info.modlist_paddr = PVH_MODLIST_ADDR;
            params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
            params.set_sections(&map, GuestAddress(PVH_MEMMAP_ADDR));
            params.set_modules(
                &[hvm_modlist_entry {
                    paddr: addr,
                    size,
                    ..Default::default()
                }],
                GuestAddress(PVH_MODLIST_ADDR),
            );
        }
        PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
            .map_err(|e| boot_err(format!("PVH start_info: {e}")))?;
        Ok(Entry::Pvh(entry.0))
    } else {
        let hdr = result
            .setup_header
            .ok_or_else(|| boot_err("bzImage without a setup header"))?;
        let mut bp = boot_params {
            hdr,
            ..Default::default()
        };
        bp.hdr.type_of_loader = 0xff;
        bp.hdr.boot_flag = 0xaa55;
        bp.hdr.header = 0x5372_6448; // "HdrS"
        bp.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
        bp.hdr.cmdline_size = cmdline.len() as u32 + 1;
        if let Some((addr, size)) = initrd_place {
            bp.hdr.ramdisk_image = addr as u32;
            bp.hdr.ramdisk_size = size as u32;
        }
        bp.acpi_rsdp_addr = rsdp;
        for (i, &(addr, size, type_)) in e820.iter().enumerate() {
            bp.e820_table[i] = boot_e820_entry {
                addr,
                size,
                r#type: type_,
            };
        }
        bp.e820_entries = e820.len() as u8;
        LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
            &BootParams::new(&bp, GuestAddress(ZERO_PAGE_ADDR)),
            mem,
        )
        .map_err(|e| boot_err(format!("zero page: {e}")))?;
        // The 64-bit entry is 0x200 past the protected-mode kernel's load address.
        Ok(Entry::Linux64(result.kernel_load.0 + 0x200))
    }
}

fn seg(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn gdt_entry(s: &kvm_segment) -> u64 {
    let base = s.base;
    let limit = (s.limit >> 12) as u64; // g = 1
    (base & 0xff00_0000) << 32
        | (base & 0x00ff_ffff) << 16
        | (limit & 0x000f_0000) << 32
        | (limit & 0x0000_ffff)
        | (s.g as u64) << 55
        | (s.db as u64) << 54
        | (s.l as u64) << 53
        | (s.present as u64) << 47
        | (s.dpl as u64) << 45
        | (s.s as u64) << 44
        | (s.type_ as u64) << 40
}

/// Writes a GDT (null, code 0x8, data 0x10, TSS 0x18) and, for long mode, identity page tables
/// of the first 1 GiB; sets up `vcpu` for `entry`. BSP only; APs wait for INIT/SIPI.
pub fn setup_boot_vcpu(mem: &GuestMemoryMmap, vcpu: &VcpuFd, entry: Entry) -> Result<()> {
    let werr = |e: vm_memory::GuestMemoryError| boot_err(format!("boot structures: {e}"));
    let verr = |what: &str, e: kvm_ioctls::Error| boot_err(format!("{what}: {e}"));
    let long = matches!(entry, Entry::Linux64(_));
    let code = if long {
        seg(0x8, 0xb, 1, 0)
    } else {
        seg(0x8, 0xb, 0, 1)
    };
    let data = seg(0x10, 0x3, 0, 1);
    let mut tss = seg(0x18, 0xb, 0, 0);
    tss.s = 0;
    tss.g = 0;
    tss.limit = 0x67;
    let gdt = [0u64, gdt_entry(&code), gdt_entry(&data), gdt_entry(&tss)];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(werr)?;
    }
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(|e| verr("KVM_GET_SREGS", e))?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = 0x11; // PE | ET
    let mut regs = kvm_regs {
        rflags: 2,
        ..Default::default()
    };
    match entry {
        Entry::Pvh(ip) => {
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = ip;
            regs.rbx = PVH_INFO_ADDR;
        }
        Entry::Linux64(ip) => {
            // PML4[0] -> PDPT, PDPT[0] -> PD, PD: 512 x 2 MiB identity pages.
            mem.write_obj(PDPT_ADDR | 3, GuestAddress(PML4_ADDR))
                .map_err(werr)?;
            mem.write_obj(PD_ADDR | 3, GuestAddress(PDPT_ADDR))
                .map_err(werr)?;
            for i in 0..512u64 {
                mem.write_obj((i << 21) | 0x83, GuestAddress(PD_ADDR + 8 * i))
                    .map_err(werr)?;
            }
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = 0x20; // PAE
            sregs.cr0 |= 0x8000_0000; // PG
            sregs.efer = 0x500; // LME | LMA
            regs.rip = ip;
            regs.rsi = ZERO_PAGE_ADDR;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| verr("KVM_SET_SREGS", e))?;
    vcpu.set_regs(&regs).map_err(|e| verr("KVM_SET_REGS", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::microvm::memory::HIGH_RAM_START;

    #[test]
    fn e820_describes_ram_around_the_holes() {
        let m = e820_map(256 << 20);
        assert_eq!(m[0], (0, EBDA_START, E820_RAM));
        assert_eq!(m[1].2, E820_RESERVED);
        assert_eq!(m[2], (HIMEM_START, (256 << 20) - HIMEM_START, E820_RAM));
        let m = e820_map(4 << 30);
        assert_eq!(
            m.last().unwrap(),
            &(HIGH_RAM_START, (4 << 30) - MMIO_HOLE_START, E820_RAM)
        );
    }

    #[test]
    fn gdt_entries_encode_flat_segments() {
        assert_eq!(gdt_entry(&seg(0x8, 0xb, 1, 0)), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(&seg(0x10, 0x3, 0, 1)), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(&seg(0x8, 0xb, 0, 1)), 0x00cf_9b00_0000_ffff);
    }
}
