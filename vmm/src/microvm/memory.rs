//! Guest memory: anonymous, memfd or hugetlb memfd, bound to NUMA nodes, optionally prefaulted.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::config::{MemoryBacking, MemoryConfig};
use crate::error::{Error, Result};

/// Start of the 32-bit MMIO hole; RAM above it continues at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First address after the hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

const MPOL_BIND: libc::c_int = 2;
const MADV_POPULATE_WRITE: libc::c_int = 23;
const MFD_HUGE_SHIFT: u32 = 26;

/// Guest memory with the file that backs it (kept open for the VM's life).
pub struct GuestRam {
    /// The regions.
    pub mem: GuestMemoryMmap,
    /// Backing memfd, if any.
    pub file: Option<File>,
}

/// Guest physical ranges for `size` bytes of RAM.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut v = vec![(GuestAddress(0), low)];
    if size > low {
        v.push((GuestAddress(HIGH_RAM_START), size - low));
    }
    v
}

fn mem_err(cfg: &MemoryConfig, reason: impl Into<String>) -> Error {
    Error::Memory {
        backing: cfg.backing.name().to_string(),
        size: cfg.size_mib << 20,
        reason: reason.into(),
    }
}

fn memfd(cfg: &MemoryConfig) -> Result<File> {
    let mut flags = libc::MFD_CLOEXEC;
    match cfg.backing {
        MemoryBacking::Hugetlb2M => flags |= libc::MFD_HUGETLB | (21 << MFD_HUGE_SHIFT),
        MemoryBacking::Hugetlb1G => flags |= libc::MFD_HUGETLB | (30 << MFD_HUGE_SHIFT),
        _ => {}
    }
    let name = CString::new("tandem-guest-ram").expect("no NUL");
    // SAFETY: valid C string; the returned fd is owned by the File below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(mem_err(
            cfg,
            format!("memfd_create: {}", std::io::Error::last_os_error()),
        ));
    }
    // SAFETY: fd is a fresh, owned descriptor.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(cfg.size_mib << 20)
        .map_err(|e| mem_err(cfg, format!("ftruncate: {e}")))?;
    Ok(file)
}

fn mbind(cfg: &MemoryConfig, addr: *mut u8, len: u64) -> Result<()> {
    if cfg.numa_nodes.is_empty() {
        return Ok(());
    }
    let mut mask = [0u64; 16];
    for n in &cfg.numa_nodes {
        mask[(*n / 64) as usize] |= 1 << (n % 64);
    }
    // SAFETY: addr/len describe a mapping we own; mask outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr as usize,
            len as usize,
            MPOL_BIND,
            mask.as_ptr(),
            (mask.len() * 64 + 1) as libc::c_ulong,
            0 as libc::c_uint,
        )
    };
    if r != 0 {
        return Err(mem_err(
            cfg,
            format!(
                "mbind to NUMA nodes {:?}: {}",
                cfg.numa_nodes,
                std::io::Error::last_os_error()
            ),
        ));
    }
    Ok(())
}

fn prefault(cfg: &MemoryConfig, addr: *mut u8, len: u64) -> Result<()> {
    // SAFETY: addr/len describe a mapping we own; populating it has no other effect.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, MADV_POPULATE_WRITE) };
    if r != 0 {
        return Err(mem_err(
            cfg,
            format!(
                "prefault (MADV_POPULATE_WRITE): {}",
                std::io::Error::last_os_error()
            ),
        ));
    }
    Ok(())
}

/// sysfs directory of the hugepage pool a hugetlb backing draws from.
fn hugepage_pool(backing: MemoryBacking) -> Option<&'static str> {
    match backing {
        MemoryBacking::Hugetlb2M => Some("/sys/kernel/mm/hugepages/hugepages-2048kB"),
        MemoryBacking::Hugetlb1G => Some("/sys/kernel/mm/hugepages/hugepages-1048576kB"),
        _ => None,
    }
}

/// Refuses a hugetlb backing whose pool has fewer unreserved free pages than the guest needs,
/// naming the pool and its counts (otherwise the failure is a bare EFAULT at prefault, or a
/// SIGBUS when the guest first touches the memory).
fn check_hugepage_pool(cfg: &MemoryConfig) -> Result<()> {
    let Some(pool) = hugepage_pool(cfg.backing) else {
        return Ok(());
    };
    let count = |f: &str| -> Result<u64> {
        let p = format!("{pool}/{f}");
        std::fs::read_to_string(&p)
            .map_err(|e| mem_err(cfg, format!("{p}: {e}")))?
            .trim()
            .parse()
            .map_err(|e| mem_err(cfg, format!("{p}: {e}")))
    };
    let (nr, free, resv) = (
        count("nr_hugepages")?,
        count("free_hugepages")?,
        count("resv_hugepages")?,
    );
    let need = (cfg.size_mib << 20).div_ceil(cfg.backing.page_size());
    let avail = free.saturating_sub(resv);
    if avail < need {
        return Err(mem_err(
            cfg,
            format!(
                "needs {need} free hugepages, {pool} has {avail} \
                 (nr_hugepages {nr}, free_hugepages {free}, resv_hugepages {resv})"
            ),
        ));
    }
    Ok(())
}

/// Maps guest memory as configured: binds it to the NUMA nodes before any page is touched, then
/// prefaults it if asked.
pub fn build(cfg: &MemoryConfig) -> Result<GuestRam> {
    let size = cfg.size_mib << 20;
    check_hugepage_pool(cfg)?;
    let file = match cfg.backing {
        MemoryBacking::Anon => None,
        _ => Some(memfd(cfg)?),
    };
    let hugetlb = matches!(
        cfg.backing,
        MemoryBacking::Hugetlb2M | MemoryBacking::Hugetlb1G
    );
    let mut regions = Vec::new();
    let mut file_off = 0u64;
    for (gpa, len) in ram_ranges(size) {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let builder = MmapRegionBuilder::new(len as usize).with_mmap_prot(prot);
        let builder = match &file {
            None => builder
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE),
            Some(f) => {
                let f = f
                    .try_clone()
                    .map_err(|e| mem_err(cfg, format!("dup memfd: {e}")))?;
                builder
                    .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
                    .with_file_offset(FileOffset::new(f, file_off))
                    .with_hugetlbfs(hugetlb)
            }
        };
        let region = builder
            .build()
            .map_err(|e| mem_err(cfg, format!("mmap {len} bytes at {gpa:?}: {e}")))?;
        mbind(cfg, region.as_ptr(), len)?;
        if cfg.prefault {
            prefault(cfg, region.as_ptr(), len)?;
        }
        let r = GuestRegionMmap::new(region, gpa)
            .ok_or_else(|| mem_err(cfg, format!("region at {gpa:?} overflows")))?;
        regions.push(r);
        file_off += len;
    }
    let mem = GuestMemoryMmap::from_regions(regions)
        .map_err(|e| mem_err(cfg, format!("regions: {e}")))?;
    Ok(GuestRam { mem, file })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn ranges_skip_the_mmio_hole() {
        assert_eq!(ram_ranges(1 << 20), vec![(GuestAddress(0), 1 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START));
        assert_eq!(
            r[1],
            (GuestAddress(HIGH_RAM_START), (4 << 30) - MMIO_HOLE_START)
        );
    }

    #[test]
    fn anon_and_memfd_memory_is_usable_and_bound() {
        for backing in [MemoryBacking::Anon, MemoryBacking::Memfd] {
            let cfg = MemoryConfig {
                size_mib: 4,
                backing,
                numa_nodes: vec![0],
                prefault: true,
            };
            let m = build(&cfg).unwrap();
            assert_eq!(m.mem.num_regions(), 1);
            m.mem
                .write_obj(0xdead_beefu32, GuestAddress(0x3f_fffc))
                .unwrap();
            let v: u32 = m.mem.read_obj(GuestAddress(0x3f_fffc)).unwrap();
            assert_eq!(v, 0xdead_beef);
            assert!(m.mem.write_obj(1u32, GuestAddress(4 << 20)).is_err());
            assert_eq!(m.file.is_some(), backing == MemoryBacking::Memfd);
        }
    }

    #[test]
    fn binding_to_a_missing_node_fails_naming_it() {
        let cfg = MemoryConfig {
            size_mib: 2,
            backing: MemoryBacking::Anon,
            numa_nodes: vec![63],
            prefault: false,
        };
        let e = build(&cfg).err().unwrap().to_string();
        assert!(e.contains("mbind to NUMA nodes [63]"), "{e}");
    }
}
