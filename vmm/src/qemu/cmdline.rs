//! The QEMU command line for a [`VmConfig`]: pure, so that it is unit-tested without QEMU.

use std::path::Path;

use serde_json::json;

use crate::config::{AgentChannel, BootMode, MemoryBacking, VmConfig};
use crate::error::{Error, Result};
use crate::qemu::Accel;

/// Name of the agent's virtio-serial port (the agent looks for it).
pub const AGENT_PORT: &str = "tandem.agent";
/// QMP socket name in the run dir.
pub const QMP_SOCKET: &str = "qmp.sock";
/// QEMU's stderr, in the run dir.
pub const QEMU_LOG: &str = "qemu.log";

/// Escapes a value for QEMU's `key=value,...` option syntax (a comma is doubled).
pub fn opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// Undoes [`opt_escape`] for a value that runs to the end of the option string.
pub fn opt_unescape(s: &str) -> String {
    s.replace(",,", ",")
}

fn utf8<'a>(field: &str, p: &'a Path) -> Result<&'a str> {
    p.to_str().ok_or_else(|| {
        Error::invalid(
            field,
            format!("{}: not valid UTF-8 (QEMU takes strings)", p.display()),
        )
    })
}

/// Formats a MAC as QEMU wants it.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Arguments (without the binary) that start `vm` on `accel` (Kvm or Tcg), with QMP on
/// `<run_dir>/qmp.sock` and `hotplug_ports` free PCIe root ports `hp0..` for hot-add. A VM with a
/// pinned vCPU starts stopped (`-S`: [`starts_stopped`]) so that no guest instruction runs before
/// its threads are pinned; one without runs its firmware while the caller connects to QMP.
pub fn command_line(
    vm: &VmConfig,
    accel: Accel,
    run_dir: &Path,
    hotplug_ports: u8,
) -> Result<Vec<String>> {
    if let BootMode::Flat { .. } = vm.boot {
        return Err(Error::Unsupported {
            backend: "qemu",
            feature: "flat payload boot (boot.kind = flat)".into(),
        });
    }
    let mut a: Vec<String> = Vec::new();
    let mut push = |args: &[&str]| a.extend(args.iter().map(|s| s.to_string()));
    let accel_arg = match accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg,thread=multi",
        Accel::Auto => {
            return Err(Error::invalid(
                "accel",
                "auto must be resolved before building the command line",
            ))
        }
    };
    push(&[
        "-name",
        "tandem,debug-threads=on",
        "-machine",
        "q35,memory-backend=mem0",
        "-accel",
        accel_arg,
    ]);
    if accel == Accel::Kvm {
        push(&["-cpu", "host"]);
    }
    push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
    if starts_stopped(vm) {
        push(&["-S"]);
    }
    let qmp = run_dir.join(QMP_SOCKET);
    let qmp_s = utf8("run_dir", &qmp)?;
    if qmp_s.len() > 107 {
        return Err(Error::invalid(
            "run_dir",
            format!("{qmp_s}: a unix socket path must be at most 107 bytes"),
        ));
    }
    push(&[
        "-chardev",
        &format!(
            "socket,id=qmp,server=on,wait=off,path={}",
            opt_escape(qmp_s)
        ),
        "-mon",
        "chardev=qmp,mode=control",
    ]);

    // Boot.
    push(&["-kernel", utf8("kernel", &vm.kernel)?]);
    if let Some(initrd) = &vm.initrd {
        push(&["-initrd", utf8("initrd", initrd)?]);
    }
    if !vm.cmdline.is_empty() {
        push(&["-append", &vm.cmdline]);
    }

    // CPUs and memory.
    push(&["-smp", &vm.vcpus.len().to_string()]);
    let m = &vm.memory;
    let size = m.size_mib << 20;
    let mut mem = match m.backing {
        MemoryBacking::Anon => json!({"qom-type": "memory-backend-ram"}),
        MemoryBacking::Memfd => json!({"qom-type": "memory-backend-memfd", "share": true}),
        MemoryBacking::Hugetlb2M | MemoryBacking::Hugetlb1G => json!({
            "qom-type": "memory-backend-memfd",
            "hugetlb": true,
            "hugetlbsize": m.backing.page_size(),
        }),
    };
    mem["id"] = json!("mem0");
    mem["size"] = json!(size);
    if !m.numa_nodes.is_empty() {
        mem["host-nodes"] = json!(m.numa_nodes);
        mem["policy"] = json!("bind");
    }
    if m.prefault {
        mem["prealloc"] = json!(true);
    }
    push(&[
        "-object",
        &mem.to_string(),
        "-m",
        &format!("{}M", m.size_mib),
    ]);

    // Console.
    match &vm.serial_log {
        Some(p) => push(&[
            "-chardev",
            &format!(
                "file,id=serial0,path={}",
                opt_escape(utf8("serial_log", p)?)
            ),
            "-serial",
            "chardev:serial0",
        ]),
        None => push(&["-serial", "null"]),
    }

    // Hot-plug slots.
    for i in 0..hotplug_ports {
        push(&[
            "-device",
            &format!(
                "pcie-root-port,id=hp{i},bus=pcie.0,chassis={}",
                u32::from(i) + 1
            ),
        ]);
    }

    // The agent's port.
    if let Some(AgentChannel::SerialPort { socket }) = &vm.agent {
        push(&[
            "-device",
            "virtio-serial-pci,id=vser0",
            "-chardev",
            &format!(
                "socket,id=agent,server=on,wait=off,path={}",
                opt_escape(utf8("agent.socket", socket)?)
            ),
            "-device",
            &format!("virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT}"),
        ]);
    }

    for (i, nic) in vm.nics.iter().enumerate() {
        crate::config::validate_nic(nic).map_err(|r| Error::invalid(format!("nics[{i}]"), r))?;
        push(&[
            "-netdev",
            &format!(
                "tap,id=net{i},ifname={},script=no,downscript=no,vhost=off",
                nic.tap
            ),
            "-device",
            &format!(
                "virtio-net-pci,netdev=net{i},id=nic{i},mac={}",
                mac_string(&nic.mac)
            ),
        ]);
    }

    for (i, d) in vm.disks.iter().enumerate() {
        let path = utf8(&format!("disks[{i}].path"), &d.path)?;
        let node = format!("disk{i}");
        let bd = json!({
            "driver": "raw",
            "node-name": node,
            "read-only": d.read_only,
            "file": {"driver": "file", "filename": path, "read-only": d.read_only},
        });
        push(&[
            "-blockdev",
            &bd.to_string(),
            "-device",
            &format!("virtio-blk-pci,drive={node},id={node},serial={node}"),
        ]);
    }

    if let Some(v) = &vm.vsock {
        push(&["-device", &format!("vhost-vsock-pci,guest-cid={}", v.cid)]);
    }
    Ok(a)
}

/// Whether [`command_line`] starts `vm` stopped (`-S`, resumed by QMP `cont`): only when a vCPU
/// is pinned to a host CPU.
pub fn starts_stopped(vm: &VmConfig) -> bool {
    vm.vcpus.iter().any(|v| v.host_cpu.is_some())
}

/// Id of the `index`-th disk attached at start by [`cold_disk_args`]: its block node, its
/// device and the serial the guest sees, named as [`crate::RunningVm::hot_add_disk`] names a
/// hot-added disk (so that `hot_remove_disk` takes it out the same way).
pub fn cold_disk_id(index: usize) -> String {
    format!("hd{index}")
}

/// Arguments that attach `disks` when QEMU starts, disk `i` on the hot-plug root port `hp<i>`
/// with the id [`cold_disk_id`]`(i)` (block node `hd<i>` over the file node `hd<i>-file`):
/// the guest finds them in its boot-time PCI scan instead of through a PCIe hot-plug after boot,
/// and each can still be hot-removed. At most `hotplug_ports` disks.
pub fn cold_disk_args(
    disks: &[crate::config::DiskConfig],
    hotplug_ports: u8,
) -> Result<Vec<String>> {
    if disks.len() > usize::from(hotplug_ports) {
        return Err(Error::invalid(
            "cold_disks",
            format!(
                "{} disks, but only {hotplug_ports} hot-plug ports to put them on",
                disks.len()
            ),
        ));
    }
    let mut a = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let path = utf8(&format!("cold_disks[{i}].path"), &d.path)?;
        let id = cold_disk_id(i);
        let bd = json!({
            "driver": "raw",
            "node-name": id,
            "read-only": d.read_only,
            "file": {"driver": "file", "node-name": format!("{id}-file"), "filename": path,
                     "read-only": d.read_only},
        });
        a.push("-blockdev".to_string());
        a.push(bd.to_string());
        a.push("-device".to_string());
        a.push(format!(
            "virtio-blk-pci,drive={id},id={id},serial={id},bus=hp{i}"
        ));
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DiskConfig, MemoryConfig, NicConfig, VcpuConfig};

    fn vm() -> VmConfig {
        VmConfig {
            kernel: "/k/vmlinuz".into(),
            boot: BootMode::Linux,
            initrd: Some("/k/initrd.gz".into()),
            cmdline: "console=ttyS0 quiet".into(),
            vcpus: vec![
                VcpuConfig { host_cpu: Some(0) },
                VcpuConfig { host_cpu: None },
            ],
            memory: MemoryConfig {
                size_mib: 256,
                ..Default::default()
            },
            nics: vec![],
            disks: vec![],
            vsock: None,
            serial_log: Some("/run/p,1/console.log".into()),
            agent: Some(AgentChannel::SerialPort {
                socket: "/run/p/agent.sock".into(),
            }),
            netns: None,
        }
    }

    fn after<'a>(a: &'a [String], flag: &str) -> Vec<&'a str> {
        a.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn basic_linux_vm() {
        let a = command_line(&vm(), Accel::Tcg, Path::new("/run/p"), 2).unwrap();
        for f in [
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-S",
        ] {
            assert!(a.iter().any(|x| x == f), "{f} missing in {a:?}");
        }
        assert_eq!(after(&a, "-accel"), ["tcg,thread=multi"]);
        assert!(!a.iter().any(|x| x == "-cpu"));
        assert_eq!(after(&a, "-kernel"), ["/k/vmlinuz"]);
        assert_eq!(after(&a, "-initrd"), ["/k/initrd.gz"]);
        assert_eq!(after(&a, "-append"), ["console=ttyS0 quiet"]);
        assert_eq!(after(&a, "-smp"), ["2"]);
        assert_eq!(after(&a, "-m"), ["256M"]);
        let mem: serde_json::Value = serde_json::from_str(after(&a, "-object")[0]).unwrap();
        assert_eq!(
            mem,
            json!({"qom-type": "memory-backend-ram", "id": "mem0", "size": 256u64 << 20})
        );
        let chardevs = after(&a, "-chardev");
        assert_eq!(
            chardevs,
            [
                "socket,id=qmp,server=on,wait=off,path=/run/p/qmp.sock",
                "file,id=serial0,path=/run/p,,1/console.log",
                "socket,id=agent,server=on,wait=off,path=/run/p/agent.sock",
            ]
        );
        let devices = after(&a, "-device");
        assert_eq!(
            devices,
            [
                "pcie-root-port,id=hp0,bus=pcie.0,chassis=1",
                "pcie-root-port,id=hp1,bus=pcie.0,chassis=2",
                "virtio-serial-pci,id=vser0",
                "virtserialport,bus=vser0.0,chardev=agent,name=tandem.agent",
            ]
        );
    }

    #[test]
    fn kvm_hugetlb_numa_prefault_nic_disk() {
        let mut c = vm();
        c.memory = MemoryConfig {
            size_mib: 1024,
            backing: MemoryBacking::Hugetlb2M,
            numa_nodes: vec![0, 1],
            prefault: true,
        };
        c.serial_log = None;
        c.agent = None;
        c.nics.push(NicConfig {
            tap: "tap0_eth0".into(),
            mac: [0x02, 0, 0, 0, 0, 0xab],
        });
        c.disks.push(DiskConfig {
            path: "/img/a,b.raw".into(),
            read_only: true,
        });
        let a = command_line(&c, Accel::Kvm, Path::new("/r"), 0).unwrap();
        assert_eq!(after(&a, "-accel"), ["kvm"]);
        assert_eq!(after(&a, "-cpu"), ["host"]);
        assert_eq!(after(&a, "-serial"), ["null"]);
        let mem: serde_json::Value = serde_json::from_str(after(&a, "-object")[0]).unwrap();
        assert_eq!(
            mem,
            json!({"qom-type": "memory-backend-memfd", "id": "mem0", "size": 1u64 << 30,
                   "hugetlb": true, "hugetlbsize": 2u64 << 20,
                   "host-nodes": [0, 1], "policy": "bind", "prealloc": true})
        );
        assert_eq!(
            after(&a, "-netdev"),
            ["tap,id=net0,ifname=tap0_eth0,script=no,downscript=no,vhost=off"]
        );
        let bd: serde_json::Value = serde_json::from_str(after(&a, "-blockdev")[0]).unwrap();
        assert_eq!(bd["file"]["filename"], "/img/a,b.raw");
        assert_eq!(bd["read-only"], true);
        assert_eq!(
            after(&a, "-device"),
            [
                "virtio-net-pci,netdev=net0,id=nic0,mac=02:00:00:00:00:ab",
                "virtio-blk-pci,drive=disk0,id=disk0,serial=disk0",
            ]
        );
    }

    #[test]
    fn refusals_name_the_field() {
        let mut c = vm();
        c.boot = BootMode::Flat {
            load_addr: 0x1000,
            mode: crate::config::CpuMode::Real16,
        };
        let e = command_line(&c, Accel::Tcg, Path::new("/r"), 0).unwrap_err();
        assert!(e.to_string().contains("flat"), "{e}");
        let long = format!("/{}", "d".repeat(100));
        let e = command_line(&vm(), Accel::Tcg, Path::new(&long), 0).unwrap_err();
        assert!(e.to_string().contains("run_dir"), "{e}");
        let mut c = vm();
        c.nics.push(NicConfig {
            tap: "a-very-long-tap-name".into(),
            mac: [2, 0, 0, 0, 0, 1],
        });
        let e = command_line(&c, Accel::Tcg, Path::new("/r"), 0).unwrap_err();
        assert!(e.to_string().contains("nics[0]"), "{e}");
        assert!(command_line(&vm(), Accel::Auto, Path::new("/r"), 0).is_err());
    }

    #[test]
    fn only_a_vm_with_a_pinned_vcpu_starts_stopped() {
        let pinned = vm();
        assert!(starts_stopped(&pinned));
        let mut free = vm();
        for v in &mut free.vcpus {
            v.host_cpu = None;
        }
        assert!(!starts_stopped(&free));
        let a = command_line(&free, Accel::Tcg, Path::new("/r"), 0).unwrap();
        assert!(!a.iter().any(|x| x == "-S"), "{a:?}");
    }

    #[test]
    fn escape_roundtrip() {
        assert_eq!(opt_escape("/a,b,,c"), "/a,,b,,,,c");
        assert_eq!(opt_unescape(&opt_escape("/a,b,,c")), "/a,b,,c");
    }

    #[test]
    fn cold_disks_go_on_the_hot_plug_ports_with_hot_add_ids() {
        let disks = vec![
            DiskConfig {
                path: "/c/layer,1.erofs".into(),
                read_only: true,
            },
            DiskConfig {
                path: "/c/rw.img".into(),
                read_only: false,
            },
        ];
        let a = cold_disk_args(&disks, 2).unwrap();
        assert_eq!(a.len(), 8);
        assert_eq!(a[0], "-blockdev");
        let bd: serde_json::Value = serde_json::from_str(&a[1]).unwrap();
        assert_eq!(bd["node-name"], "hd0");
        assert_eq!(bd["read-only"], true);
        assert_eq!(bd["file"]["node-name"], "hd0-file");
        // JSON syntax: the comma in the path is not doubled
        assert_eq!(bd["file"]["filename"], "/c/layer,1.erofs");
        assert_eq!(bd["file"]["read-only"], true);
        assert_eq!(a[2], "-device");
        assert_eq!(a[3], "virtio-blk-pci,drive=hd0,id=hd0,serial=hd0,bus=hp0");
        let bd: serde_json::Value = serde_json::from_str(&a[5]).unwrap();
        assert_eq!(bd["node-name"], "hd1");
        assert_eq!(bd["read-only"], false);
        assert_eq!(a[7], "virtio-blk-pci,drive=hd1,id=hd1,serial=hd1,bus=hp1");
        assert_eq!(cold_disk_id(1), "hd1");
        assert!(cold_disk_args(&[], 0).unwrap().is_empty());
        let e = cold_disk_args(&disks, 1).unwrap_err().to_string();
        assert!(e.contains("cold_disks") && e.contains("2 disks"), "{e}");
    }
}
