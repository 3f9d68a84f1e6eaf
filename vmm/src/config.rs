//! `VmConfig`: everything a backend needs to start one VM. Serialisable (JSON) so that the
//! `microvm` backend can hand it to the `tandem-vmm` process.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Largest vCPU count accepted (xAPIC ids are 8 bit, 0xff is broadcast).
pub const MAX_VCPUS: usize = 254;

/// How the payload in `kernel` is started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum BootMode {
    /// A Linux kernel (ELF vmlinux with PVH note, or bzImage) with initrd and command line.
    #[default]
    Linux,
    /// A flat binary loaded at `load_addr` and entered there in `mode` with every other register
    /// zero (used by tests and the benchmark; small guest programs).
    Flat {
        /// Guest physical load and entry address.
        load_addr: u64,
        /// CPU mode at entry.
        mode: CpuMode,
    },
}

/// CPU mode a flat payload is entered in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuMode {
    /// 16-bit real mode, CS = 0, so `load_addr` must be below 64 KiB.
    Real16,
    /// 32-bit protected mode with flat 4 GiB code and data segments, paging off.
    Protected32,
}

/// One vCPU and the host CPU its thread is pinned to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuConfig {
    /// Host CPU the vCPU thread is pinned to before its first KVM_RUN; `None`: not pinned.
    pub host_cpu: Option<usize>,
}

/// Backing of guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryBacking {
    /// Private anonymous memory.
    #[default]
    Anon,
    /// A memfd (shared mapping).
    Memfd,
    /// A memfd with MFD_HUGETLB and 2 MiB pages.
    Hugetlb2M,
    /// A memfd with MFD_HUGETLB and 1 GiB pages.
    Hugetlb1G,
}

impl MemoryBacking {
    /// Page size of this backing in bytes.
    pub fn page_size(self) -> u64 {
        match self {
            MemoryBacking::Anon | MemoryBacking::Memfd => 4096,
            MemoryBacking::Hugetlb2M => 2 << 20,
            MemoryBacking::Hugetlb1G => 1 << 30,
        }
    }

    /// Name as in the config.
    pub fn name(self) -> &'static str {
        match self {
            MemoryBacking::Anon => "anon",
            MemoryBacking::Memfd => "memfd",
            MemoryBacking::Hugetlb2M => "hugetlb_2m",
            MemoryBacking::Hugetlb1G => "hugetlb_1g",
        }
    }
}

/// Guest memory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Size in MiB.
    pub size_mib: u64,
    /// Backing kind.
    #[serde(default)]
    pub backing: MemoryBacking,
    /// Host NUMA nodes the memory is bound to (mbind MPOL_BIND); empty: no binding.
    #[serde(default)]
    pub numa_nodes: Vec<u32>,
    /// Fault every page in at start.
    #[serde(default)]
    pub prefault: bool,
}

/// A virtio-net NIC on a tap device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicConfig {
    /// Host tap device name.
    pub tap: String,
    /// Guest MAC address.
    pub mac: [u8; 6],
}

/// A virtio-block disk on a raw file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Path of the raw image.
    pub path: PathBuf,
    /// Expose read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// A virtio-vsock device whose host side is a unix socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// Guest context id (>= 3).
    pub cid: u32,
    /// Host unix socket path.
    pub uds_path: PathBuf,
}

/// How the host reaches the guest agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AgentChannel {
    /// A virtio-serial port named `tandem.agent` whose host end is a unix socket the VMM
    /// listens on (QEMU: `server=on,wait=off`); connect to `socket` with the agent client.
    SerialPort {
        /// Host unix socket path (at most 107 bytes).
        socket: PathBuf,
    },
}

/// Everything needed to start one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Kernel image (or flat payload, see `boot`).
    pub kernel: PathBuf,
    /// How `kernel` is booted.
    #[serde(default)]
    pub boot: BootMode,
    /// Initramfs.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// vCPUs, in order of their index.
    pub vcpus: Vec<VcpuConfig>,
    /// Guest memory.
    pub memory: MemoryConfig,
    /// NICs.
    #[serde(default)]
    pub nics: Vec<NicConfig>,
    /// Disks.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// vsock device.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Where the serial console (COM1) output goes; `None`: discarded.
    #[serde(default)]
    pub serial_log: Option<PathBuf>,
    /// The guest agent's channel; `None`: no agent device.
    #[serde(default)]
    pub agent: Option<AgentChannel>,
    /// Network namespace (e.g. `/var/run/netns/cni-…`) the VMM process runs in, so that it finds
    /// the pod's taps by name; `None`: the caller's.
    #[serde(default)]
    pub netns: Option<PathBuf>,
}

fn check_exists(path: &Path) -> std::io::Result<bool> {
    match std::fs::metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

impl VmConfig {
    /// Checks the config; every error names the field and the value.
    pub fn validate(&self) -> Result<()> {
        if !check_exists(&self.kernel).map_err(|e| Error::io(&self.kernel, e))? {
            return Err(Error::KernelNotFound(self.kernel.clone()));
        }
        if let Some(initrd) = &self.initrd {
            if !check_exists(initrd).map_err(|e| Error::io(initrd, e))? {
                return Err(Error::InitrdNotFound(initrd.clone()));
            }
        }
        if self.vcpus.is_empty() {
            return Err(Error::invalid("vcpus", "at least one vCPU is needed"));
        }
        if self.vcpus.len() > MAX_VCPUS {
            return Err(Error::invalid(
                "vcpus",
                format!("{} vCPUs, at most {MAX_VCPUS}", self.vcpus.len()),
            ));
        }
        let ncpus = host_cpu_count();
        for (i, v) in self.vcpus.iter().enumerate() {
            if let Some(cpu) = v.host_cpu {
                if cpu >= ncpus {
                    return Err(Error::invalid(
                        format!("vcpus[{i}].host_cpu"),
                        format!("host CPU {cpu} does not exist (host has {ncpus})"),
                    ));
                }
            }
        }
        let m = &self.memory;
        if m.size_mib == 0 {
            return Err(Error::invalid("memory.size_mib", "0: must be > 0"));
        }
        if m.size_mib > (1 << 30) {
            return Err(Error::invalid(
                "memory.size_mib",
                format!("{}: too large", m.size_mib),
            ));
        }
        let page = m.backing.page_size();
        if !(m.size_mib << 20).is_multiple_of(page) {
            return Err(Error::invalid(
                "memory.size_mib",
                format!(
                    "{} MiB is not a multiple of the {} page size ({} bytes)",
                    m.size_mib,
                    m.backing.name(),
                    page
                ),
            ));
        }
        for n in &m.numa_nodes {
            if *n >= 1024 {
                return Err(Error::invalid(
                    "memory.numa_nodes",
                    format!("node {n}: must be < 1024"),
                ));
            }
        }
        if let BootMode::Flat { load_addr, mode } = &self.boot {
            if *mode == CpuMode::Real16 && *load_addr >= 0x1_0000 {
                return Err(Error::invalid(
                    "boot.load_addr",
                    format!("{load_addr:#x}: real-mode entry needs an address below 0x10000"),
                ));
            }
            if *load_addr >= m.size_mib << 20 {
                return Err(Error::invalid(
                    "boot.load_addr",
                    format!("{load_addr:#x}: outside guest memory"),
                ));
            }
        }
        for (i, nic) in self.nics.iter().enumerate() {
            validate_nic(nic).map_err(|reason| Error::invalid(format!("nics[{i}]"), reason))?;
        }
        if let Some(AgentChannel::SerialPort { socket }) = &self.agent {
            let n = socket.as_os_str().len();
            if n == 0 || n > 107 {
                return Err(Error::invalid(
                    "agent.socket",
                    format!(
                        "{}: a unix socket path must be 1 to 107 bytes, this is {n}",
                        socket.display()
                    ),
                ));
            }
        }
        if let Some(v) = &self.vsock {
            if v.cid < 3 {
                return Err(Error::invalid(
                    "vsock.cid",
                    format!("{}: guest CIDs start at 3", v.cid),
                ));
            }
        }
        Ok(())
    }
}

/// Checks one NIC (also used for hot-add).
pub fn validate_nic(nic: &NicConfig) -> std::result::Result<(), String> {
    if nic.tap.is_empty() || nic.tap.len() > 15 || nic.tap.contains('/') {
        return Err(format!(
            "tap name {:?}: 1 to 15 characters, no '/'",
            nic.tap
        ));
    }
    if nic.mac[0] & 1 != 0 {
        return Err(format!("MAC {:02x?}: multicast bit set", nic.mac));
    }
    Ok(())
}

/// Number of host CPUs (configured), for validating pinning.
pub fn host_cpu_count() -> usize {
    // SAFETY: sysconf has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    if n < 1 {
        1
    } else {
        n as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> VmConfig {
        VmConfig {
            kernel: "/proc/self/exe".into(),
            boot: BootMode::Flat {
                load_addr: 0x1000,
                mode: CpuMode::Real16,
            },
            initrd: None,
            cmdline: String::new(),
            vcpus: vec![VcpuConfig { host_cpu: Some(0) }],
            memory: MemoryConfig {
                size_mib: 2,
                ..Default::default()
            },
            nics: vec![],
            disks: vec![],
            vsock: None,
            serial_log: None,
            agent: None,
            netns: None,
        }
    }

    #[test]
    fn valid_config_passes_and_roundtrips_json() {
        let c = base();
        c.validate().unwrap();
        let s = serde_json::to_string(&c).unwrap();
        let back: VmConfig = serde_json::from_str(&s).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn json_without_agent_and_netns_still_parses() {
        let mut v = serde_json::to_value(base()).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("agent");
        o.remove("netns");
        let back: VmConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back, base());
        let mut c = base();
        c.agent = Some(AgentChannel::SerialPort {
            socket: "/run/x/agent.sock".into(),
        });
        let s = serde_json::to_string(&c).unwrap();
        assert!(
            s.contains(r#""agent":{"kind":"serial_port","socket":"/run/x/agent.sock"}"#),
            "{s}"
        );
        c.agent = Some(AgentChannel::SerialPort {
            socket: PathBuf::from(format!("/{}", "a".repeat(120))),
        });
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("agent.socket"));
    }

    #[test]
    fn errors_name_the_thing() {
        let mut c = base();
        c.kernel = "/x/vmlinuz".into();
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "kernel /x/vmlinuz: not found"
        );

        let mut c = base();
        c.vcpus[0].host_cpu = Some(4096);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("vcpus[0].host_cpu") && e.contains("4096"), "{e}");

        let mut c = base();
        c.memory.backing = MemoryBacking::Hugetlb2M;
        c.memory.size_mib = 3;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("memory.size_mib") && e.contains("hugetlb_2m"),
            "{e}"
        );

        let mut c = base();
        c.vcpus.clear();
        assert!(c.validate().unwrap_err().to_string().contains("vcpus"));

        let mut c = base();
        c.nics.push(NicConfig {
            tap: "a/b".into(),
            mac: [2, 0, 0, 0, 0, 1],
        });
        assert!(c.validate().unwrap_err().to_string().contains("nics[0]"));

        let mut c = base();
        c.boot = BootMode::Flat {
            load_addr: 0x20000,
            mode: CpuMode::Real16,
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("boot.load_addr"));
    }
}
