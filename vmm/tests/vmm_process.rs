//! The `tandem-vmm` binary through the `microvm` backend of the `Hypervisor` seam: started with
//! an assembled payload, driven and shut down over its control socket, under seccomp.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{in_private_netns, wait_for, TempDir};
use tandem_vmm::microvm::backend::MicroVm;
use tandem_vmm::{BootMode, CpuMode, Hypervisor, NicConfig, VcpuConfig, VmConfig, VmState};

/// A real-mode payload VM (see `common::config`).
fn config(dir: &Path, payload: &[u8], vcpus: Vec<VcpuConfig>) -> VmConfig {
    common::config(dir, payload, CpuMode::Real16, vcpus)
}

fn backend(dir: &Path) -> MicroVm {
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    MicroVm::new(env!("CARGO_BIN_EXE_tandem-vmm"), run)
}

fn status_field(pid: u32, tid: i32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap()
        .trim()
        .to_string()
}

/// "Hi\n" to COM1 from each vCPU, then cli; hlt forever.
const HI_THEN_HALT: &[u8] = &[
    0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'H', 0xee, 0xb0, b'i', 0xee, 0xb0, b'\n', 0xee, // "Hi\n"
    0xfa, 0xf4, 0xeb, 0xfd, // cli; hlt; jmp hlt
];

#[test]
fn binary_runs_the_payload_and_obeys_its_control_socket() {
    let dir = TempDir::new("proc-ctl");
    let cfg = config(
        &dir.0,
        HI_THEN_HALT,
        vec![
            VcpuConfig { host_cpu: Some(0) },
            VcpuConfig { host_cpu: Some(1) },
        ],
    );
    let hv = backend(&dir.0);
    assert_eq!(hv.name(), "microvm");
    let mut vm = hv.start(&cfg).unwrap();
    let pid = vm.pid();
    assert_eq!(vm.state().unwrap(), VmState::Running);
    // Both vCPUs print "Hi\n"; their bytes may interleave.
    wait_for("serial output", || {
        let mut b = std::fs::read(dir.0.join("serial.log")).unwrap_or_default();
        b.sort();
        b == b"\n\nHHii"
    });

    // vCPU threads: in the VMM process, pinned, named, under their own seccomp filter.
    let threads = vm.vcpu_threads().unwrap();
    assert_eq!(threads.len(), 2);
    for t in &threads {
        assert_eq!(
            status_field(pid, t.tid, "Cpus_allowed_list:"),
            t.index.to_string()
        );
        assert_eq!(status_field(pid, t.tid, "Seccomp:"), "2");
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{}/comm", t.tid)).unwrap();
        assert_eq!(comm.trim(), format!("vcpu{}", t.index));
    }
    assert_eq!(status_field(pid, pid as i32, "Seccomp:"), "2");
    // Only the fds it needs: stdio, /dev/kvm, VM, 2 vCPUs, serial log, eventfds, socket, epoll.
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    assert!(fds <= 16, "{fds} fds open in tandem-vmm");

    vm.pause().unwrap();
    assert_eq!(vm.state().unwrap(), VmState::Paused);
    let e = vm.pause().unwrap_err().to_string();
    assert!(e.contains("VM is paused: cannot pause"), "{e}");
    vm.resume().unwrap();
    assert_eq!(vm.state().unwrap(), VmState::Running);

    // A bad NIC is refused with a message naming it; the VM keeps running.
    let e = vm
        .hot_add_nic(&NicConfig {
            tap: "tap/x".into(),
            mac: [2, 0, 0, 0, 0, 1],
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("tap/x"), "{e}");
    assert_eq!(vm.state().unwrap(), VmState::Running);

    vm.stop().unwrap();
    assert_eq!(vm.state().unwrap(), VmState::Stopped);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(dir.entries().contains(&"run".to_string()));
    assert!(std::fs::read_dir(dir.0.join("run"))
        .unwrap()
        .next()
        .is_none());
    vm.stop().unwrap(); // idempotent
}

#[test]
fn guest_power_off_ends_the_process() {
    // "Hi\n", then ACPI PM1a_CNT = SLP_TYP 5 | SLP_EN.
    let code = [
        0xba, 0xf8, 0x03, 0xb0, b'H', 0xee, 0xb0, b'i', 0xee, 0xb0, b'\n', 0xee, //
        0xba, 0x04, 0x06, // mov dx, 0x604
        0xb8, 0x00, 0x34, // mov ax, 0x3400
        0xef, // out dx, ax
        0xf4, 0xeb, 0xfd,
    ];
    let dir = TempDir::new("proc-poweroff");
    let cfg = config(&dir.0, &code, vec![VcpuConfig { host_cpu: None }]);
    let mut vm = backend(&dir.0).start(&cfg).unwrap();
    let pid = vm.pid();
    // state() reaps the process once it has exited.
    wait_for("the process to exit", || {
        vm.state().unwrap() == VmState::Stopped && !Path::new(&format!("/proc/{pid}")).exists()
    });
    assert_eq!(
        std::fs::read_to_string(dir.0.join("serial.log")).unwrap(),
        "Hi\n"
    );
    vm.stop().unwrap();
    assert!(std::fs::read_dir(dir.0.join("run"))
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn bad_configs_fail_naming_the_thing_and_leave_nothing_behind() {
    let dir = TempDir::new("proc-bad");
    let hv = backend(&dir.0);
    let mut cfg = config(&dir.0, HI_THEN_HALT, vec![VcpuConfig { host_cpu: None }]);
    cfg.kernel = "/x/vmlinuz".into();
    let e = hv.start(&cfg).err().unwrap().to_string();
    assert_eq!(e, "kernel /x/vmlinuz: not found");

    // Fails inside the process: the message comes back through the backend.
    let mut cfg = config(&dir.0, HI_THEN_HALT, vec![VcpuConfig { host_cpu: None }]);
    cfg.memory.numa_nodes = vec![7];
    let e = hv.start(&cfg).err().unwrap().to_string();
    assert!(
        e.contains("exited before ready") && e.contains("mbind to NUMA nodes [7]"),
        "{e}"
    );
    assert!(std::fs::read_dir(dir.0.join("run"))
        .unwrap()
        .next()
        .is_none());

    let hv = MicroVm::new("/nonexistent/tandem-vmm", dir.0.join("run"));
    let cfg = config(&dir.0, HI_THEN_HALT, vec![VcpuConfig { host_cpu: None }]);
    let e = hv.start(&cfg).err().unwrap().to_string();
    assert!(
        e.starts_with("tandem-vmm process /nonexistent/tandem-vmm: spawn"),
        "{e}"
    );
    assert!(std::fs::read_dir(dir.0.join("run"))
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn guest_reads_a_disk_through_virtio_mmio_served_by_the_event_loop() {
    let dir = TempDir::new("proc-blk");
    let disk = dir.0.join("disk.img");
    let mut img = vec![0u8; 8192];
    img[512..1024].fill(b'Q');
    std::fs::write(&disk, &img).unwrap();
    let mut cfg = config(
        &dir.0,
        &common::virtio_blk_driver(),
        vec![VcpuConfig { host_cpu: None }],
    );
    cfg.boot = BootMode::Flat {
        load_addr: 0x1000,
        mode: CpuMode::Protected32,
    };
    cfg.disks.push(tandem_vmm::DiskConfig {
        path: disk,
        read_only: false,
    });
    let mut vm = backend(&dir.0).start(&cfg).unwrap();
    let pid = vm.pid();
    wait_for("the guest to power off", || {
        vm.state().unwrap() == VmState::Stopped && !Path::new(&format!("/proc/{pid}")).exists()
    });
    assert_eq!(
        std::fs::read_to_string(dir.0.join("serial.log")).unwrap(),
        "v2Q0"
    );
    vm.stop().unwrap();
}

#[test]
fn hot_added_devices_reach_the_guest_through_the_ged_interrupt() {
    // The VMM process inherits this thread's private network namespace: its taps stay there.
    in_private_netns(|| {
        let dir = TempDir::new("proc-hotadd");
        let boot_disk = dir.0.join("boot.img");
        std::fs::write(&boot_disk, vec![0u8; 4096]).unwrap();
        let hot_disk = dir.0.join("hot.img");
        std::fs::write(&hot_disk, vec![0u8; 8192]).unwrap();
        let mut cfg = common::config(
            &dir.0,
            &common::hotplug_guest(),
            CpuMode::Protected32,
            common::one_vcpu(),
        );
        cfg.disks.push(tandem_vmm::DiskConfig {
            path: boot_disk,
            read_only: true,
        });
        let log = dir.0.join("serial.log");
        let mut vm = backend(&dir.0).start(&cfg).unwrap();
        let pid = vm.pid();
        // Before: slot 1 is empty (reads all ones), only slot 0 (the boot disk) is present.
        wait_for("the guest to be ready", || {
            common::read(&log).ends_with('R')
        });
        assert_eq!(std::fs::read(&log).unwrap(), b"\xff1R");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(std::fs::read(&log).unwrap(), b"\xff1R", "no interrupt yet");

        vm.hot_add_nic(&NicConfig {
            tap: "tndhot0".into(),
            mac: [2, 0, 0, 0, 0, b'h'],
        })
        .unwrap();
        // The handler saw slot 1's event bit.
        wait_for("the GED interrupt for the NIC", || {
            std::fs::read(&log).unwrap().len() == 4
        });
        assert_eq!(std::fs::read(&log).unwrap(), b"\xff1R2");

        let id = vm
            .hot_add_disk(&tandem_vmm::DiskConfig {
                path: hot_disk,
                read_only: false,
            })
            .unwrap();
        assert_eq!(id, "tdisk0");
        wait_for("the guest to power off", || {
            vm.state().unwrap() == VmState::Stopped && !Path::new(&format!("/proc/{pid}")).exists()
        });
        // Slot 2's event; then slot 1 answers "virt" as net (1), slot 2 as block (2); PRSN has
        // slots 0-2; EVNT was acknowledged.
        assert_eq!(std::fs::read(&log).unwrap(), b"\xff1R24v1v270");
        // A bad disk is refused naming it, and nothing was added.
        vm.stop().unwrap();
    });
}

#[test]
fn vsock_socket_lives_and_dies_with_the_vm() {
    let dir = TempDir::new("proc-vsock");
    let mut cfg = config(&dir.0, HI_THEN_HALT, vec![VcpuConfig { host_cpu: None }]);
    let uds = dir.0.join("vsock.sock");
    cfg.vsock = Some(tandem_vmm::VsockConfig {
        cid: 3,
        uds_path: uds.clone(),
    });
    let mut vm = backend(&dir.0).start(&cfg).unwrap();
    assert!(uds.exists());
    let mut c = std::os::unix::net::UnixStream::connect(&uds).unwrap();
    std::io::Write::write_all(&mut c, b"CONNECT 52\n").unwrap();
    assert_eq!(vm.state().unwrap(), VmState::Running);
    vm.stop().unwrap();
    assert!(!uds.exists());
    // A second VM on the same path starts again (nothing stale left).
    let mut vm = backend(&dir.0).start(&cfg).unwrap();
    vm.stop().unwrap();
}

#[test]
fn vm_pod_config_fields_agent_refused_and_netns_joined() {
    let dir = TempDir::new("proc-podcfg");
    let hv = backend(&dir.0);
    // The agent over a virtio-serial port: the microvm has none; refused naming it, nothing left.
    let mut cfg = config(&dir.0, HI_THEN_HALT, common::one_vcpu());
    cfg.agent = Some(tandem_vmm::config::AgentChannel::SerialPort {
        socket: dir.0.join("agent.sock"),
    });
    let e = hv.start(&cfg).err().unwrap().to_string();
    assert!(
        e.contains("agent channel serial_port") && e.contains("not supported by the microvm"),
        "{e}"
    );
    assert!(std::fs::read_dir(dir.0.join("run"))
        .unwrap()
        .next()
        .is_none());
    // A missing network namespace is named.
    let mut cfg = config(&dir.0, HI_THEN_HALT, common::one_vcpu());
    cfg.netns = Some("/run/netns/tandem-no-such-ns".into());
    let e = hv.start(&cfg).err().unwrap().to_string();
    assert!(e.contains("/run/netns/tandem-no-such-ns"), "{e}");

    // The VMM joins the given namespace before it opens its taps: a thread's private one here.
    let (tx, rx) = std::sync::mpsc::channel::<std::path::PathBuf>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        // SAFETY: affects only this thread.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        // SAFETY: no arguments.
        let tid = unsafe { libc::gettid() };
        tx.send(format!("/proc/{}/task/{tid}/ns/net", std::process::id()).into())
            .unwrap();
        let _ = done_rx.recv();
    });
    let ns = rx.recv().unwrap();
    let mut cfg = config(&dir.0, HI_THEN_HALT, common::one_vcpu());
    cfg.netns = Some(ns.clone());
    cfg.nics.push(NicConfig {
        tap: "tndns0".into(),
        mac: [2, 0, 0, 0, 0, 9],
    });
    let mut vm = hv.start(&cfg).unwrap();
    let ino = |p: &str| std::fs::metadata(p).unwrap().ino();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        ino(&format!("/proc/{}/ns/net", vm.pid())),
        ino(ns.to_str().unwrap())
    );
    assert_ne!(ino("/proc/self/ns/net"), ino(ns.to_str().unwrap()));
    // The tap is in that namespace, not in the test's.
    let c = std::ffi::CString::new("tndns0").unwrap();
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::if_nametoindex(c.as_ptr()) }, 0);
    assert!(
        std::fs::read_to_string(format!("/proc/{}/net/dev", vm.pid()))
            .unwrap()
            .contains("tndns0:")
    );
    vm.stop().unwrap();
    done_tx.send(()).unwrap();
    holder.join().unwrap();
}
