//! The `qemu` backend against a real QEMU (TCG here: /dev/kvm is PVM) and the real guest image
//! from vmm/guest/build.sh. Runs as root (hugepages, pinning).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tandem_agent::client::{AgentClient, Command as GuestCommand};
use tandem_vmm::qemu::{kill_by_pid, Accel, Qemu, QemuConfig};
use tandem_vmm::{
    AgentChannel, DiskConfig, Hypervisor, MemoryBacking, MemoryConfig, RunningVm, VcpuConfig,
    VmConfig, VmState,
};

const BOOT_DEADLINE: Duration = Duration::from_secs(90);
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// One QEMU at a time: TCG is CPU-heavy, the machine has 2 cores.
static SLOT: Mutex<()> = Mutex::new(());

fn slot() -> std::sync::MutexGuard<'static, ()> {
    SLOT.lock().unwrap_or_else(|p| p.into_inner())
}

use tandem_agent::guest_image::GuestImage as Guest;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// The guest image (built or reused from the cache by vmm/guest/build.sh).
fn guest() -> Guest {
    tandem_agent::guest_image::build(&repo_root(), false).unwrap_or_else(|e| panic!("{e}"))
}

fn vm_config(g: &Guest, dir: &Path, vcpus: usize) -> VmConfig {
    VmConfig {
        kernel: g.kernel.clone(),
        boot: Default::default(),
        initrd: Some(g.initrd.clone()),
        cmdline: "console=ttyS0 quiet panic=-1".into(),
        vcpus: (0..vcpus).map(|_| VcpuConfig { host_cpu: None }).collect(),
        memory: MemoryConfig {
            size_mib: 256,
            ..Default::default()
        },
        nics: vec![],
        disks: vec![],
        vsock: None,
        serial_log: Some(dir.join("console.log")),
        agent: Some(AgentChannel::SerialPort {
            socket: dir.join("agent.sock"),
        }),
        netns: None,
    }
}

fn backend(run_dir: &Path) -> Qemu {
    let mut c = QemuConfig::new(run_dir);
    c.hotplug_ports = 4;
    Qemu::new(c)
}

fn meminfo(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|r| r.trim_start_matches(':').split_whitespace().next())
        .unwrap_or_else(|| panic!("{key} not in /proc/meminfo"))
        .parse()
        .unwrap()
}

/// Raises nr_hugepages by `extra` (2 MiB pages) and puts the old value back on drop.
struct HugepageReservation(u64);

impl HugepageReservation {
    fn new(extra: u64) -> Self {
        let path = "/proc/sys/vm/nr_hugepages";
        let old: u64 = std::fs::read_to_string(path)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::fs::write(path, (old + extra).to_string()).unwrap();
        let now: u64 = std::fs::read_to_string(path)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(now, old + extra, "could not reserve {extra} hugepages");
        HugepageReservation(old)
    }
}

impl Drop for HugepageReservation {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", self.0.to_string());
    }
}

fn pid_alive(pid: u32) -> bool {
    // A zombie counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            if String::from_utf8_lossy(&c).contains(needle) && pid_alive(pid) {
                out.push(pid);
            }
        }
    }
    out
}

/// Pings with fresh nonces until one answers within the client's (short) timeout; TCG on a busy
/// host can be slow. A reply with a wrong nonce fails at once.
fn retry_ping(client: &AgentClient, tries: u64) {
    for n in 0..tries {
        match client.ping(100 + n) {
            Ok(()) => return,
            Err(tandem_agent::Error::Timeout { .. }) => continue,
            Err(e) => panic!("ping: {e}"),
        }
    }
    panic!("no ping answered in {tries} tries");
}

fn sh(client: &AgentClient, script: &str) -> String {
    let out = client
        .run_command(&GuestCommand {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            // Above the longest wait loop below (20 s): TCG on a loaded host is slow.
            timeout: Duration::from_secs(30),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("guest `{script}`: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One boot exercises: Auto → TCG, pinned vCPUs, hugetlb + NUMA bind + prefault, the agent
/// through the serial-port socket, pause/resume, disk hot-add/remove, detach/attach, stop.
#[test]
fn boot_pin_hugetlb_pause_hotplug_attach_stop() {
    let g = guest();
    let _slot = slot();
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let mut cfg = vm_config(&g, dir.path(), 2);
    cfg.vcpus[0].host_cpu = Some(0);
    cfg.vcpus[1].host_cpu = Some(1);
    cfg.memory = MemoryConfig {
        size_mib: 256,
        backing: MemoryBacking::Hugetlb2M,
        numa_nodes: vec![0],
        prefault: true,
    };
    let pages = 256 / 2;
    let _reserved = HugepageReservation::new(pages);
    let free_before = meminfo("HugePages_Free");

    let q = backend(&run_dir);
    assert_eq!(q.name(), "qemu");
    assert_eq!(
        q.accel().0,
        if Path::new("/sys/module/kvm_pvm").exists() {
            Accel::Tcg
        } else {
            q.accel().0
        }
    );
    let started = Instant::now();
    let mut vm = q.start_vm(&cfg).expect("start qemu");
    let spawned = started.elapsed();
    let pid = vm.pid();
    assert!(pid_alive(pid));
    assert!(run_dir.join("qmp.sock").exists());

    let socket = dir.path().join("agent.sock");
    let client = AgentClient::connect(&socket, CALL_TIMEOUT).expect("connect agent socket");
    let v = client.version_within(BOOT_DEADLINE).unwrap_or_else(|e| {
        panic!(
            "{e}\nconsole:\n{}",
            std::fs::read_to_string(dir.path().join("console.log")).unwrap_or_default()
        )
    });
    let to_agent = started.elapsed();
    eprintln!(
        "qemu start() returned after {spawned:?}; agent answered Version after {to_agent:?} (TCG)"
    );
    assert_eq!(v.kernel_release, g.release);
    assert_eq!(vm.state().unwrap(), VmState::Running);

    // Pinning: each vCPU thread is allowed exactly its CPU.
    let threads = vm.vcpu_threads().unwrap();
    assert_eq!(threads.len(), 2);
    for (i, t) in threads.iter().enumerate() {
        assert_eq!(t.index, i);
        assert_eq!(t.host_cpu, Some(i));
        let status = std::fs::read_to_string(format!("/proc/{pid}/task/{}/status", t.tid)).unwrap();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim();
        assert_eq!(allowed, i.to_string(), "vCPU {i} thread {}", t.tid);
    }
    assert_eq!(sh(&client, "grep -c ^processor /proc/cpuinfo"), "2\n");

    // Hugetlb: the whole guest is in 2 MiB pages (prealloc), taken from the pool.
    let free_running = meminfo("HugePages_Free");
    assert_eq!(
        free_before - free_running,
        pages,
        "HugePages_Free {free_before} -> {free_running}"
    );

    // Pause: QMP says paused and the agent cannot answer; resume: it does. QEMU's socket takes
    // one host connection at a time, and the unanswered call's late reply must not reach a later
    // connection: one connection throughout, whose ttrpc stream ids keep the replies apart.
    drop(client);
    let quick = AgentClient::connect(&socket, Duration::from_millis(500)).expect("connect");
    retry_ping(&quick, 10);
    vm.pause().unwrap();
    assert_eq!(vm.state().unwrap(), VmState::Paused);
    let t0 = Instant::now();
    let e = quick.ping(2).expect_err("a paused guest must not answer");
    assert!(t0.elapsed() >= Duration::from_millis(450), "{e}");
    vm.resume().unwrap();
    assert_eq!(vm.state().unwrap(), VmState::Running);
    retry_ping(&quick, 20);
    drop(quick);
    let client = AgentClient::connect(&socket, CALL_TIMEOUT).expect("reconnect");
    client.ping(3).expect("ping on a new connection");

    // Disk hot-add: a raw file with known bytes, found by its serial.
    let img = dir.path().join("disk.raw");
    let mut bytes = b"tandem-hotplug-disk\n".to_vec();
    bytes.resize(1 << 20, 0);
    std::fs::write(&img, &bytes).unwrap();
    let id = vm
        .hot_add_disk(&DiskConfig {
            path: img.clone(),
            read_only: true,
        })
        .expect("hot-add disk");
    assert_eq!(id, "hd0");
    let find = format!(
        "for i in $(seq 200); do for d in /sys/block/vd*; do \
         [ \"$(cat $d/serial 2>/dev/null)\" = {id} ] && [ -b /dev/${{d##*/}} ] && \
         [ \"$(cat $d/size 2>/dev/null)\" -gt 0 ] && \
         out=$(dd if=/dev/${{d##*/}} bs=20 count=1 2>/dev/null) && [ -n \"$out\" ] && \
         {{ echo \"$out\"; exit 0; }}; done; sleep 0.1; done; exit 1"
    );
    let t0 = Instant::now();
    // A fresh hot-added disk can fail its first reads (ENXIO while the guest sets it up): the
    // loop retries until the bytes come.
    assert_eq!(sh(&client, &find), "tandem-hotplug-disk\n");
    eprintln!(
        "hot-added disk visible in the guest after {:?}",
        t0.elapsed()
    );
    // A second one gets the next id.
    let id1 = vm
        .hot_add_disk(&DiskConfig {
            path: img.clone(),
            read_only: true,
        })
        .unwrap();
    assert_eq!(id1, "hd1");
    let t0 = Instant::now();
    vm.hot_remove_disk(&id).expect("hot-remove disk");
    eprintln!("hot-remove took {:?}", t0.elapsed());
    let serials = sh(&client, "cat /sys/block/vd*/serial; echo");
    assert!(
        !serials.contains("hd0") && serials.contains("hd1"),
        "{serials:?}"
    );
    let e = vm.hot_remove_disk("../x").unwrap_err().to_string();
    assert!(e.contains("../x"), "{e}");

    // Re-attach as a restarted shim would: same pid, same run dir.
    drop(client);
    let pid2 = vm.detach();
    assert_eq!(pid2, pid);
    assert!(pid_alive(pid), "detach must leave QEMU running");
    let mut vm = Qemu::attach(pid, &run_dir).expect("attach");
    assert_eq!(vm.pid(), pid);
    assert_eq!(vm.state().unwrap(), VmState::Running);
    assert_eq!(vm.vcpu_threads().unwrap()[1].host_cpu, Some(1));
    let client = AgentClient::connect(&socket, CALL_TIMEOUT).expect("connect after attach");
    client.ping(4).expect("ping after attach");
    // Attach refuses a pid that is not this run dir's QEMU.
    let e = Qemu::attach(pid, &dir.path().join("other"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not the QEMU of run dir"), "{e}");

    // Stop: QEMU gone, sockets gone, hugepages back; idempotent.
    let t0 = Instant::now();
    vm.stop().expect("stop");
    eprintln!("stop took {:?}", t0.elapsed());
    assert!(!pid_alive(pid), "qemu {pid} still alive");
    assert!(!run_dir.join("qmp.sock").exists());
    assert!(!socket.exists());
    assert_eq!(vm.state().unwrap(), VmState::Stopped);
    vm.stop().expect("second stop");
    assert_eq!(meminfo("HugePages_Free"), free_before);
}

/// Bad inputs: a clear error naming the thing, and nothing left (no process, no socket).
#[test]
fn bad_binary_missing_kernel_and_unloadable_kernel_leave_nothing() {
    let g = guest();
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let needle = run_dir.to_string_lossy().into_owned();

    let mut c = QemuConfig::new(&run_dir);
    c.binary = "/nonexistent/qemu-system-x86_64".into();
    let e = Qemu::new(c)
        .start(&vm_config(&g, dir.path(), 1))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("/nonexistent/qemu-system-x86_64"), "{e}");
    assert!(!run_dir.exists());

    let mut cfg = vm_config(&g, dir.path(), 1);
    cfg.kernel = "/nonexistent/vmlinuz-tandem".into();
    let e = backend(&run_dir).start(&cfg).err().unwrap().to_string();
    assert!(
        e.contains("/nonexistent/vmlinuz-tandem") && e.contains("kernel"),
        "{e}"
    );
    assert!(!run_dir.exists());

    // A kernel file QEMU cannot load: QEMU exits by itself; its stderr is in the error.
    let empty = dir.path().join("vmlinuz-empty");
    std::fs::write(&empty, b"").unwrap();
    let mut cfg = vm_config(&g, dir.path(), 1);
    cfg.kernel = empty;
    let _slot = slot();
    let e = backend(&run_dir).start(&cfg).err().unwrap().to_string();
    assert!(
        e.contains("exited early") && e.contains("vmlinuz-empty"),
        "{e}"
    );
    assert!(processes_mentioning(&needle).is_empty());
    assert!(!run_dir.exists(), "run dir left behind");
    assert!(!dir.path().join("agent.sock").exists());

    // A NUMA node that does not exist: QEMU refuses the memory backend.
    let mut cfg = vm_config(&g, dir.path(), 1);
    cfg.memory.numa_nodes = vec![7];
    let e = backend(&run_dir).start(&cfg).err().unwrap().to_string();
    assert!(e.contains("exited early") && e.contains("NUMA"), "{e}");
    assert!(processes_mentioning(&needle).is_empty());
    assert!(!run_dir.exists());
}

/// kill_by_pid, as the shim's `delete` uses it with on-disk state after a restart.
#[test]
fn kill_by_pid_removes_a_detached_qemu() {
    let g = guest();
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let _slot = slot();
    let vm = backend(&run_dir)
        .start_vm(&vm_config(&g, dir.path(), 1))
        .expect("start");
    let pid = vm.detach();
    assert!(pid_alive(pid));
    // The wrong run dir: refused, QEMU untouched.
    assert!(!kill_by_pid(pid, &dir.path().join("elsewhere")).unwrap());
    assert!(pid_alive(pid));
    assert!(kill_by_pid(pid, &run_dir).unwrap());
    assert!(!pid_alive(pid));
    assert!(!run_dir.join("qmp.sock").exists());
    assert!(!dir.path().join("agent.sock").exists());
    // Again: nothing to do.
    assert!(!kill_by_pid(pid, &run_dir).unwrap());
}

/// QEMU runs in a network namespace (`VmConfig.netns`) and a NIC on a tap there is hot-added:
/// the guest sees a NIC with that MAC.
#[test]
fn hot_add_nic_on_a_tap_in_the_vm_netns() {
    let g = guest();
    let ns = format!("tnd-qnic-{}", std::process::id());
    let ip = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ip(&["netns", "add", &ns]);
    struct Del(String);
    impl Drop for Del {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _del = Del(ns.clone());
    ip(&["-n", &ns, "tuntap", "add", "dev", "tap0_t", "mode", "tap"]);
    ip(&["-n", &ns, "link", "set", "tap0_t", "up"]);

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = vm_config(&g, dir.path(), 1);
    cfg.netns = Some(PathBuf::from(format!("/var/run/netns/{ns}")));
    let _slot = slot();
    let mut vm = backend(&dir.path().join("run"))
        .start(&cfg)
        .expect("start in the netns");
    let client = AgentClient::connect(&dir.path().join("agent.sock"), CALL_TIMEOUT).unwrap();
    client.version_within(BOOT_DEADLINE).expect("agent");
    vm.hot_add_nic(&tandem_vmm::NicConfig {
        tap: "tap0_t".into(),
        mac: [0x02, 0x54, 0, 0x12, 0x34, 0x56],
    })
    .expect("hot-add NIC");
    let out = sh(
        &client,
        "for i in $(seq 100); do grep -l 02:54:00:12:34:56 /sys/class/net/*/address && exit 0; \
         sleep 0.1; done; exit 1",
    );
    assert!(out.contains("/sys/class/net/"), "{out:?}");
    // A bad tap name is refused before QEMU is asked, naming it. (A tap that does not exist
    // is made by QEMU itself, as root, and goes with it.)
    let e = vm
        .hot_add_nic(&tandem_vmm::NicConfig {
            tap: "a/b".into(),
            mac: [0x02, 0, 0, 0, 0, 9],
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"a/b\""), "{e}");
    drop(client);
    vm.stop().unwrap();
}
