//! VM mode through a real containerd: each pod is a QEMU VM (TCG on this machine), its containers
//! run inside by the guest agent. The guest image comes from vmm/guest/build.sh (cached). Every
//! VM boot costs seconds under TCG, so assertions are grouped into few VMs.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tandem_tests::*;

use tandem_agent::guest_image::GuestImage as Guest;

/// The guest image (built once per test binary; build.sh caches across runs).
fn guest() -> &'static Guest {
    static G: OnceLock<Guest> = OnceLock::new();
    G.get_or_init(|| {
        tandem_agent::guest_image::build(&workspace_dir(), false).unwrap_or_else(|e| panic!("{e}"))
    })
}

/// One VM test at a time: TCG is CPU-heavy and the machine small.
fn vm_slot() -> std::sync::MutexGuard<'static, ()> {
    static SLOT: Mutex<()> = Mutex::new(());
    SLOT.lock().unwrap_or_else(|p| p.into_inner())
}

fn vm_toml(kernel: &Path, initrd: &Path, cache: &Path) -> String {
    format!(
        "mode = \"vm\"\n[vm]\naccel = \"tcg\"\nkernel = \"{}\"\ninitrd = \"{}\"\nlayer_cache = \"{}\"\nboot_timeout_s = 90\n",
        kernel.display(),
        initrd.display(),
        cache.display()
    )
}

/// A private erofs layer cache for one test.
fn layer_cache() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tandem-layers-")
        .tempdir_in("/tmp")
        .unwrap()
}

/// A containerd with CRI whose `tandem-vm` handler (RuntimeClass) runs VM pods, with `extra`
/// appended to its tandem config, beside a container-mode `tandem` handler, as kubelet would see it.
fn cri_vm_env(extra: &str) -> (tandem_tests::cri::CriEnv, tempfile::TempDir) {
    let g = guest();
    let cache = layer_cache();
    let vm = format!("{}{extra}", vm_toml(&g.kernel, &g.initrd, cache.path()));
    let env = tandem_tests::cri::CriEnv::start_with_vm("mode = \"container\"\n", Some(&vm))
        .expect("containerd with CRI");
    (env, cache)
}

/// A pod under the `tandem-vm` handler, its own cgroup parent and log dir.
fn vm_pod_spec(env: &tandem_tests::cri::CriEnv, prefix: &str) -> tandem_tests::cri::PodSpec {
    let name = unique_id(prefix);
    tandem_tests::cri::PodSpec {
        name: name.clone(),
        handler: "tandem-vm".into(),
        log_dir: env.net.dir().join("logs").join(&name),
        cgroup_parent: format!("/tandemtest-{name}"),
        annotations: std::collections::HashMap::new(),
    }
}

/// A containerd whose `--runtime-config-path` file puts tandem in VM mode.
struct Env {
    c: Containerd,
    cfg: String,
    _cache: tempfile::TempDir,
}

impl Env {
    fn start() -> Env {
        let g = guest();
        Self::with(&g.kernel, &g.initrd)
    }

    fn with(kernel: &Path, initrd: &Path) -> Env {
        Self::with_extra(kernel, initrd, "")
    }

    /// VM mode with `extra` appended to the tandem config.
    fn with_extra(kernel: &Path, initrd: &Path, extra: &str) -> Env {
        let cache = layer_cache();
        let toml = format!("{}{extra}", vm_toml(kernel, initrd, cache.path()));
        let c = Containerd::start(Some(&toml)).expect("start containerd");
        c.import_busybox();
        let cfg = c
            .runtime_config
            .as_ref()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        Env {
            c,
            cfg,
            _cache: cache,
        }
    }

    /// `ctr run` args up to the image: runtime config + `extra`.
    fn args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["--runtime-config-path", self.cfg.as_str()];
        a.extend_from_slice(extra);
        a
    }
}

/// QEMU processes whose command line names `needle`.
fn qemus(needle: &str) -> Vec<(i32, String)> {
    processes_matching(needle)
        .into_iter()
        .filter(|(_, c)| c.starts_with("/usr/bin/qemu-system") || c.starts_with("qemu-system"))
        .collect()
}

/// Every QEMU started by tandem (run dirs under /run/tandem-vm).
fn tandem_qemus() -> Vec<(i32, String)> {
    qemus("/run/tandem-vm/")
}

fn wait_no_qemu(pid: i32, within: Duration) {
    let deadline = Instant::now() + within;
    while Path::new(&format!("/proc/{pid}")).exists() && proc_state(pid) != Some('Z') {
        assert!(
            Instant::now() < deadline,
            "QEMU {pid} still there after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The cgroup of `pid` in each hierarchy tandem manages (/proc/<pid>/cgroup without named
/// hierarchies such as name=systemd): (hierarchy, path).
fn proc_cgroups(pid: i32) -> Vec<(String, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, ctrl, path) = (it.next()?, it.next()?, it.next()?);
            (!ctrl.starts_with("name=")).then(|| (ctrl.to_string(), path.to_string()))
        })
        .collect()
}

/// Asserts that the VMM `pid` is in the cgroup `/<rel>` in every hierarchy (v1 controllers and
/// cgroup2) and that each directory exists; returns them.
fn assert_vmm_in_cgroup(pid: i32, rel: &str) -> Vec<std::path::PathBuf> {
    let cgs = proc_cgroups(pid);
    assert!(!cgs.is_empty(), "no /proc/{pid}/cgroup");
    let want = format!("/{}", rel.trim_matches('/'));
    let wrong: Vec<_> = cgs.iter().filter(|(_, p)| *p != want).collect();
    assert!(
        wrong.is_empty(),
        "QEMU {pid} not in {want} in every hierarchy: {cgs:?}"
    );
    let dirs: Vec<_> = cgroup_hierarchies()
        .into_iter()
        .filter(|h| !h.ends_with("systemd"))
        .map(|h| h.join(rel.trim_matches('/')))
        .collect();
    for d in &dirs {
        assert!(d.is_dir(), "{} missing", d.display());
    }
    dirs
}

fn host_release() -> String {
    nix::sys::utsname::uname()
        .unwrap()
        .release()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn ctr_run_in_a_vm_stdio_exit_code_and_guest_kernel() {
    let g = guest();
    let _slot = vm_slot();
    let env = Env::start();
    let id = unique_id("vmrun");
    let rt = runtime();
    let mut args = vec!["run", "--rm", "--runtime", &rt];
    args.extend(env.args(&[]));
    args.extend([
        BUSYBOX,
        id.as_str(),
        "sh",
        "-c",
        "read x; echo got:$x; uname -r; echo to-stderr >&2; exit 3",
    ]);
    let started = Instant::now();
    let mut child = env
        .c
        .ctr_cmd(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello-vm\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    eprintln!("ctr run --rm in a VM: {:?}", started.elapsed());
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        exit_code(&o.status),
        3,
        "stdout: {stdout}\nstderr: {stderr}\n{}",
        env.c.log_tail(30)
    );
    assert_eq!(stdout, format!("got:hello-vm\n{}\n", g.release));
    assert_ne!(g.release, host_release());
    assert!(stderr.contains("to-stderr"), "{stderr}");
    env.c.assert_no_leaks(&[&id]);
    assert!(tandem_qemus().is_empty(), "{:?}", tandem_qemus());
}

#[test]
fn detached_vm_exec_pause_resume_stats_kill() {
    let _slot = vm_slot();
    let env = Env::start();
    let c = &env.c;
    let id = unique_id("vmd");
    let rt = runtime();
    let mut args = vec!["run", "-d", "--runtime", &rt];
    args.extend(env.args(&[]));
    args.extend([BUSYBOX, id.as_str(), "sleep", "1000"]);
    c.ctr_ok(&args);
    c.wait_task_status(&id, "RUNNING", Duration::from_secs(10));
    let pid = c.task_pid(&id);
    let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(cmd.contains("qemu-system"), "task pid {pid} is QEMU: {cmd}");
    assert_eq!(tandem_qemus().len(), 1, "one VM");
    // the first container's layer is on QEMU's command line (attached at boot on hot-plug port
    // hp0, the serial the agent mounts by), not hot-added after the boot
    assert!(
        cmd.contains("virtio-blk-pci,drive=hd0,id=hd0,serial=hd0,bus=hp0"),
        "layer disk cold-plugged: {cmd:?}"
    );

    // exec: output and exit code travel back
    let o = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        &id,
        "sh",
        "-c",
        "echo from-exec; ls /proc | grep -c '^[0-9]'; exit 5",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        exit_code(&o.status),
        5,
        "{out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.starts_with("from-exec\n"), "{out}");

    // a process killed by a signal: 128 + signal
    let o = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e2",
        &id,
        "sh",
        "-c",
        "kill -9 $$",
    ]);
    assert_eq!(
        exit_code(&o.status),
        137,
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    c.ctr_ok(&["task", "pause", &id]);
    c.wait_task_status(&id, "PAUSED", Duration::from_secs(5));
    c.ctr_ok(&["task", "resume", &id]);
    c.wait_task_status(&id, "RUNNING", Duration::from_secs(5));
    let m = c.ctr_ok(&["task", "metrics", &id]);
    assert!(m.contains("memory") || m.contains("METRIC"), "{m}");

    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    c.wait_task_status(&id, "STOPPED", Duration::from_secs(10));
    let ls = c.ctr_ok(&["task", "ls"]);
    assert!(ls.contains(&id), "{ls}");
    let d = c.ctr_ok(&["task", "delete", &id]);
    assert!(d.contains("137") || d.is_empty(), "{d}");
    c.ctr_ok(&["container", "rm", &id]);
    wait_no_qemu(pid, Duration::from_secs(10));
    c.assert_no_leaks(&[&id]);
    assert!(tandem_qemus().is_empty(), "{:?}", tandem_qemus());
}

#[test]
fn missing_kernel_is_a_clear_error_and_leaves_nothing() {
    let g = guest();
    let _slot = vm_slot();
    let env = Env::with(Path::new("/nonexistent/vmlinuz-tandem"), &g.initrd);
    let id = unique_id("vmnok");
    let rt = runtime();
    let mut args = vec!["run", "--rm", "--runtime", &rt];
    args.extend(env.args(&[]));
    args.extend([BUSYBOX, id.as_str(), "true"]);
    let started = Instant::now();
    let o = env.c.ctr(&args);
    assert!(!o.status.success());
    assert!(started.elapsed() < Duration::from_secs(20));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("/nonexistent/vmlinuz-tandem") && err.contains("kernel"),
        "{err}"
    );
    let _ = env.c.ctr(&["container", "rm", &id]);
    env.c.assert_no_leaks(&[&id]);
    assert!(tandem_qemus().is_empty(), "{:?}", tandem_qemus());
}

#[test]
fn vm_killed_under_the_pod_ends_the_task_and_delete_cleans_up() {
    let _slot = vm_slot();
    let env = Env::start();
    let c = &env.c;
    let id = unique_id("vmcrash");
    let rt = runtime();
    let mut args = vec!["run", "-d", "--runtime", &rt];
    args.extend(env.args(&[]));
    args.extend([BUSYBOX, id.as_str(), "sleep", "1000"]);
    c.ctr_ok(&args);
    c.wait_task_status(&id, "RUNNING", Duration::from_secs(10));
    let pid = c.task_pid(&id);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    c.wait_task_status(&id, "STOPPED", Duration::from_secs(15));
    c.ctr_ok(&["task", "delete", &id]);
    c.ctr_ok(&["container", "rm", &id]);
    wait_no_qemu(pid, Duration::from_secs(5));
    c.assert_no_leaks(&[&id]);
    assert!(tandem_qemus().is_empty(), "{:?}", tandem_qemus());
    let left: Vec<_> = std::fs::read_dir("/run/tandem-vm")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "run dirs left: {left:?}");
}

/// Shim processes of a containerd (they carry its socket in `-address`).
fn shims_of(c: &Containerd) -> Vec<i32> {
    let sock = c.socket.to_string_lossy().into_owned();
    processes_matching(&sock)
        .into_iter()
        .filter(|(_, c)| c.contains("containerd-shim-tandem-v2"))
        .map(|(p, _)| p)
        .collect()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A CRI pod with the `tandem-vm` handler (VM mode config): the sandbox and two containers in one VM, one
/// shim, one QEMU; the containers share the guest's network (localhost) and see the guest
/// kernel; the pod IP answers from the host and is on eth0 in the guest; stats come from the
/// guest; teardown leaves no QEMU and no shim.
#[test]
fn cri_pod_with_two_containers_in_one_vm() {
    use tandem_tests::cri::ContainerSpec;
    let _slot = vm_slot();
    // As kubelet would: the `tandem-vm` handler (RuntimeClass) beside a container-mode `tandem`.
    let g = guest();
    let (mut env, _cache) = cri_vm_env("");
    let spec = vm_pod_spec(&env, "vmpod");
    let t0 = Instant::now();
    let (pod_id, pod_cfg) = env.cri.run_pod(&spec).expect("RunPodSandbox");
    eprintln!("RunPodSandbox (VM boot): {:?}", t0.elapsed());
    let busybox = |name: &str, cmd: &[&str]| ContainerSpec {
        name: name.into(),
        image: BUSYBOX.into(),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let server = env
        .cri
        .create_container(
            &pod_id,
            &pod_cfg,
            &busybox(
                "server",
                &["httpd", "-f", "-p", "127.0.0.1:8080", "-h", "/etc"],
            ),
        )
        .expect("create server");
    env.cri.start_container(&server).expect("start server");
    let client = env
        .cri
        .create_container(&pod_id, &pod_cfg, &busybox("client", &["sleep", "1000"]))
        .expect("create client");
    env.cri.start_container(&client).expect("start client");
    eprintln!("pod + 2 containers running: {:?}", t0.elapsed());

    let r = env
        .cri
        .exec_sync(&client, &["uname", "-r"])
        .expect("ExecSync");
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), g.release);
    let r = env
        .cri
        .exec_sync(&client, &["sh", "-c", "echo out; echo err >&2; exit 4"])
        .expect("ExecSync exit code");
    assert_eq!(r.exit_code, 4);
    assert_eq!(String::from_utf8_lossy(&r.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&r.stderr), "err\n");
    let mut body = String::new();
    wait_for(
        "client fetches from server over the VM's localhost",
        Duration::from_secs(20),
        || {
            let r = env
                .cri
                .exec_sync(&client, &["wget", "-qO-", "http://127.0.0.1:8080/passwd"])
                .expect("ExecSync wget");
            body = String::from_utf8_lossy(&r.stdout).into_owned();
            r.exit_code == 0
        },
    );
    assert!(body.starts_with("root:x:0:0"), "served /etc/passwd: {body}");
    // the pod IP (CNI's, on the pod netns's veth) answers from the host: the guest holds it
    let status = env.cri.pod_status(&pod_id).expect("PodSandboxStatus");
    let ip = status
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    assert!(ip.starts_with("198.19."), "pod IP {ip:?}");
    let r = env
        .cri
        .exec_sync(&client, &["sh", "-c", "ip -o addr; ip route"])
        .expect("ExecSync ip");
    let guest_net = String::from_utf8_lossy(&r.stdout).into_owned();
    assert!(
        guest_net.contains(&format!("eth0    inet {ip}/"))
            || guest_net.contains(&format!("inet {ip}/")),
        "eth0 in the guest holds the pod IP {ip}: {guest_net}"
    );
    let ping = || {
        // busybox-static's ping (iputils-ping is not installed everywhere)
        Command::new("busybox")
            .args(["ping", "-c", "1", "-W", "1", &ip])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ping() {
        if Instant::now() > deadline {
            let netns: Vec<String> = std::fs::read_dir("/var/run/netns")
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            let mut host = String::new();
            for n in &netns {
                for args in [
                    vec!["netns", "exec", n, "ip", "-o", "link"],
                    vec![
                        "netns", "exec", n, "tc", "-s", "filter", "show", "dev", "eth0", "ingress",
                    ],
                ] {
                    let o = Command::new("ip").args(&args).output().unwrap();
                    host.push_str(&String::from_utf8_lossy(&o.stdout));
                }
            }
            for args in [
                vec!["route", "get", ip.as_str()],
                vec!["neigh", "show", ip.as_str()],
                vec!["-s", "link", "show", env.net.bridge.as_str()],
                vec!["-o", "link", "show", "master", env.net.bridge.as_str()],
            ] {
                let o = Command::new("ip").args(&args).output().unwrap();
                host.push_str(&String::from_utf8_lossy(&o.stdout));
                host.push_str(&String::from_utf8_lossy(&o.stderr));
            }
            for n in &netns {
                let o = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        n,
                        "tc",
                        "-s",
                        "filter",
                        "show",
                        "dev",
                        "tap0_eth0",
                        "ingress",
                    ])
                    .output()
                    .unwrap();
                host.push_str(&String::from_utf8_lossy(&o.stdout));
            }
            panic!("the pod IP {ip} does not answer ping from the host\nguest: {guest_net}\nhost netns: {host}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let st = env.cri.container_stats(&client).expect("ContainerStats");
    let mem = st
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref());
    assert!(mem.is_some_and(|m| m.value > 0), "{st:?}");

    let shims = shims_of(&env.containerd);
    assert_eq!(shims.len(), 1, "one shim for the pod: {shims:?}");
    // this pod's QEMUs only: other VM tests may run on the machine at the same time
    let vms = qemus_of(&pod_id);
    assert_eq!(vms.len(), 1, "one VM for the pod: {vms:?}");
    let qemu = vms[0].0;
    let ppid = std::fs::read_to_string(format!("/proc/{qemu}/stat"))
        .unwrap()
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<i32>()
        .unwrap();
    assert_eq!(ppid, shims[0], "QEMU is the pod shim's child");
    // QEMU runs in the sandbox's cgroup (CRI: <cgroup_parent>/<sandbox id>)
    let cg_dirs = assert_vmm_in_cgroup(qemu, &format!("{}/{pod_id}", spec.cgroup_parent));

    env.cri.teardown_pod(&pod_id).expect("teardown");
    wait_for("the pod's shim exits", Duration::from_secs(10), || {
        shims_of(&env.containerd).is_empty()
    });
    wait_no_qemu(qemu, Duration::from_secs(5));
    assert!(qemus_of(&pod_id).is_empty(), "{:?}", qemus_of(&pod_id));
    let left: Vec<_> = cg_dirs.iter().filter(|d| d.exists()).collect();
    assert!(
        left.is_empty(),
        "sandbox cgroup dirs left after teardown: {left:?}"
    );
}

fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{key} in /proc/meminfo"))
}

/// Reserves `pages` more free 2 MiB hugepages while alive; gives them back on drop.
struct HugeReserve {
    before: u64,
}

impl HugeReserve {
    fn new(pages: u64) -> HugeReserve {
        let path = "/proc/sys/vm/nr_hugepages";
        let before: u64 = std::fs::read_to_string(path)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let free = meminfo("HugePages_Free:");
        if free < pages {
            std::fs::write(path, format!("{}", before + pages - free)).unwrap();
        }
        HugeReserve { before }
    }
}

impl Drop for HugeReserve {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", format!("{}", self.before));
    }
}

/// The pod's cpuset "1" gives one vCPU whose thread is pinned to host CPU 1; hugepageLimits
/// put guest memory (limit 64 MiB + 128 MiB overhead, raised to the 256 MiB floor) on 2 MiB
/// hugepages, taken from
/// HugePages_Free while the VM runs and given back after.
#[test]
fn cpuset_pins_the_vcpu_and_hugepages_back_guest_memory() {
    let _slot = vm_slot();
    let env = Env::start();
    let c = &env.c;
    let id = unique_id("vmpin");
    let rootfs = c.dir().join("rootfs-pin");
    unpack_busybox_rootfs(&rootfs).unwrap();
    let mut spec = base_spec(c, &id, &rootfs, &["sleep", "1000"]);
    // kubelet's systemd cgroup driver style: laid out as systemd would on cgroupfs
    spec["linux"]["cgroupsPath"] = serde_json::json!(format!("tandemtest.slice:tandem:{id}"));
    let cg_rel = format!("tandemtest.slice/tandem-{id}.scope");
    spec["linux"]["resources"]["cpu"] = serde_json::json!({"cpus": "1"});
    spec["linux"]["resources"]["memory"] = serde_json::json!({"limit": 64u64 << 20});
    spec["linux"]["resources"]["hugepageLimits"] =
        serde_json::json!([{"pageSize": "2MB", "limit": 256u64 << 20}]);
    let path = c.dir().join(format!("{id}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    let _reserve = HugeReserve::new(130);
    let free_before = meminfo("HugePages_Free:");
    let rt = runtime();
    let mut args = vec!["run", "-d", "--runtime", &rt];
    args.extend(env.args(&["--config", path.to_str().unwrap()]));
    args.push(id.as_str());
    c.ctr_ok(&args);
    c.wait_task_status(&id, "RUNNING", Duration::from_secs(10));
    let pid = c.task_pid(&id);
    let mut vcpus = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.starts_with("CPU ") {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap();
            let allowed = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap()
                .trim()
                .to_string();
            vcpus.push((comm.trim().to_string(), allowed));
        }
    }
    assert_eq!(vcpus.len(), 1, "one vCPU thread: {vcpus:?}");
    assert_eq!(
        vcpus[0].1, "1",
        "vCPU thread pinned to host CPU 1: {vcpus:?}"
    );
    // QEMU (all its threads) runs in the pod's cgroup, confined to the pod's cpuset
    let cg_dirs = assert_vmm_in_cgroup(pid, &cg_rel);
    let cpuset_dir = cg_dirs
        .iter()
        .find(|d| d.starts_with("/sys/fs/cgroup/cpuset"));
    if let Some(d) = cpuset_dir {
        let cpus = std::fs::read_to_string(d.join("cpuset.cpus")).unwrap();
        assert_eq!(cpus.trim(), "1", "{}", d.display());
        let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l.trim() == pid.to_string()),
            "QEMU {pid} in {}: {procs}",
            d.display()
        );
    }
    let main_allowed = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Cpus_allowed_list:")
                .map(|v| v.trim().to_string())
        })
        .unwrap();
    assert_eq!(
        main_allowed, "1",
        "QEMU's main thread confined to the pod cpuset"
    );
    let free_during = meminfo("HugePages_Free:");
    assert!(
        free_before - free_during >= 128,
        "256 MiB of guest memory on 2 MiB pages: HugePages_Free {free_before} -> {free_during}"
    );
    // the guest sees one CPU
    let o = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "n",
        &id,
        "grep",
        "-c",
        "^processor",
        "/proc/cpuinfo",
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "1");
    c.remove(&id);
    wait_no_qemu(pid, Duration::from_secs(10));
    c.assert_no_leaks(&[&id]);
    let left: Vec<_> = cg_dirs.iter().filter(|d| d.exists()).collect();
    for d in &cg_dirs {
        let _ = std::fs::remove_dir(d.parent().unwrap());
    }
    assert!(
        left.is_empty(),
        "pod cgroup dirs left after delete: {left:?}"
    );
    let free_after = meminfo("HugePages_Free:");
    assert_eq!(free_after, free_before, "hugepages given back");
}

/// Tap devices in the host's network namespace (a VM pod without a netns of its own would make
/// its taps here; other tests' veths and netns are not counted: they run beside this one).
fn host_taps() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("tap"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Named network namespaces whose name carries one of `ids`.
fn netns_naming(ids: &[String]) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| ids.iter().any(|id| n.contains(id.as_str())))
                .collect()
        })
        .unwrap_or_default()
}

/// 20 pod cycles (`ctr run --rm`, one VM each, as the issue asks): after them no QEMU, no shim,
/// no tap or netns, no mount, no cgroup (the pod's, which QEMU ran in), no run dir, no private
/// erofs image and no VM record is left; the shared layer cache holds only whole images.
#[test]
fn leak_twenty_vm_pod_cycles() {
    const CYCLES: usize = 20;
    let _slot = vm_slot();
    let env = Env::start();
    let rt = runtime();
    let mut ids = Vec::new();
    let taps_before = host_taps();
    // every 4th pod has a directory volume (virtiofsd + hot-plugged virtio-fs device)
    let vol = tempfile::Builder::new()
        .prefix("tandem-leakvol-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::write(vol.path().join("ok"), "ok\n").unwrap();
    let vol_m = format!(
        "type=bind,src={},dst=/v,options=rbind:ro",
        vol.path().display()
    );
    let t0 = Instant::now();
    for i in 0..CYCLES {
        let id = format!("{}x", unique_id(&format!("vmleak{i}")));
        let mut args = vec!["run", "--rm", "--runtime", rt.as_str()];
        if i % 4 == 0 {
            args.extend(env.args(&["--mount", &vol_m]));
            args.extend([BUSYBOX, id.as_str(), "cat", "/v/ok"]);
        } else {
            args.extend(env.args(&[]));
            args.extend([BUSYBOX, id.as_str(), "sh", "-c", "echo ok"]);
        }
        let o = env.c.ctr(&args);
        assert!(
            o.status.success() && String::from_utf8_lossy(&o.stdout) == "ok\n",
            "cycle {i}: {:?} {} {}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        ids.push(id);
    }
    eprintln!("{CYCLES} VM pod cycles: {:?}", t0.elapsed());
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    // the harness: mounts, /<ns>/<id> cgroups in every hierarchy, processes (shims) naming an
    // id, state dirs, containerd's containers and tasks
    env.c.assert_no_leaks(&refs);
    // QEMUs and run dirs of these pods (run dir `<shim pid>-<first 12 chars of the pod id>`;
    // other test runs on this machine may have VMs of their own meanwhile)
    let ours = |dir: &str| {
        dir.split_once('-')
            .is_some_and(|(_, short)| ids.iter().any(|id| id.starts_with(short)))
    };
    let qemus: Vec<_> = tandem_qemus()
        .into_iter()
        .filter(|(_, cmd)| {
            cmd.split("/run/tandem-vm/")
                .skip(1)
                .any(|rest| ours(rest.split('/').next().unwrap_or("")))
        })
        .collect();
    assert!(qemus.is_empty(), "QEMU of these pods left: {qemus:?}");
    let fsds: Vec<_> = virtiofsds("/run/tandem-vm/")
        .into_iter()
        .filter(|(_, cmd)| {
            cmd.split("/run/tandem-vm/")
                .skip(1)
                .any(|rest| ours(rest.split('/').next().unwrap_or("")))
        })
        .collect();
    assert!(fsds.is_empty(), "virtiofsd of these pods left: {fsds:?}");
    assert!(
        env.c.shim_pids().is_empty(),
        "shims left: {:?}",
        env.c.shim_pids()
    );
    assert_eq!(host_taps(), taps_before, "taps left in the host netns");
    assert!(netns_naming(&ids).is_empty(), "{:?}", netns_naming(&ids));
    let cache = env._cache.path().to_string_lossy().into_owned();
    let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains("/run/tandem-vm") || l.contains(&cache))
        .map(str::to_string)
        .collect();
    assert!(mounts.is_empty(), "VM mounts left: {mounts:?}");
    for id in &ids {
        let cgs: Vec<_> = cgroup_hierarchies()
            .into_iter()
            .map(|h| h.join(&env.c.namespace).join(id))
            .filter(|d| d.exists())
            .collect();
        assert!(cgs.is_empty(), "pod cgroup of {id} left: {cgs:?}");
    }
    let in_cache: Vec<String> = std::fs::read_dir(env._cache.path())
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        in_cache
            .iter()
            .all(|n| n.ends_with(".erofs") && !n.starts_with('.')),
        "layer cache holds only whole cached images: {in_cache:?}"
    );
    let left: Vec<_> = std::fs::read_dir("/run/tandem-vm")
        .map(|d| {
            d.flatten()
                .filter(|e| ours(&e.file_name().to_string_lossy()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "run dirs left: {left:?}");
    let state: Vec<_> = std::fs::read_dir(format!("/run/containerd-tandem/{}", env.c.namespace))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        state.iter().all(|p| !p.to_string_lossy().contains("vm+")),
        "VM records left: {state:?}"
    );
}

/// `ctr run -t` of a VM pod on a pty we own with a known window size: the guest container sees a
/// /dev/pts/N terminal of that size (the agent's pty, pumped to the host), the guest kernel is the
/// VM's, and a resize of our terminal reaches the guest (ResizePty through the agent).
#[test]
fn tty_in_a_vm_has_pts_window_size_and_resize() {
    use std::io::Read;
    use std::os::fd::{AsRawFd, OwnedFd};
    let g = guest();
    let _slot = vm_slot();
    let env = Env::start();
    let id = unique_id("vmtty");
    let rt = runtime();
    let ws = nix::pty::Winsize {
        ws_row: 41,
        ws_col: 101,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&ws), None).unwrap();
    let slave: OwnedFd = pty.slave;
    // ctr sends the initial size right after start: wait (bounded) for it, then for a change.
    let script =
        "tty; uname -r; i=0; while [ \"$(stty size 2>/dev/null)\" = '' ] && [ $i -lt 400 ]; \
                  do sleep 0.05; i=$((i+1)); done; s=$(stty size); echo size=$s; i=0; \
                  while [ \"$(stty size)\" = \"$s\" ] && [ $i -lt 400 ]; do sleep 0.05; \
                  i=$((i+1)); done; echo size=$(stty size); exit 5";
    let mut args = vec!["run", "-t", "--rm", "--runtime", &rt];
    args.extend(env.args(&[]));
    args.extend([BUSYBOX, id.as_str(), "sh", "-c", script]);
    let mut cmd = env.c.ctr_cmd(&args);
    cmd.stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let master = std::fs::File::from(pty.master);
    let master_fd = master.try_clone().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut master = master;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match master.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    let _ = tx.send(String::from_utf8_lossy(&out).into_owned());
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    // Once the first size is printed, resize our terminal (the kernel sends ctr SIGWINCH).
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut first_size = None;
    while let Ok(seen) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if seen.contains("size=") {
            first_size = Some(started.elapsed());
            let ws2 = libc::winsize {
                ws_row: 50,
                ws_col: 120,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let r = unsafe { libc::ioctl(master_fd.as_raw_fd(), libc::TIOCSWINSZ, &ws2) };
            assert_eq!(r, 0, "TIOCSWINSZ");
            break;
        }
    }
    let status = child.wait().unwrap();
    drop(master_fd);
    let out = reader.join().unwrap();
    eprintln!(
        "ctr run -t in a VM: first size after {first_size:?}, exit after {:?}",
        started.elapsed()
    );
    assert_eq!(
        exit_code(&status),
        5,
        "ctr run -t output: {out:?}\n{}",
        env.c.log_tail(30)
    );
    let lines: Vec<&str> = out.lines().map(|l| l.trim_end_matches('\r')).collect();
    assert!(
        lines.iter().any(|l| l.starts_with("/dev/pts/")),
        "tty did not print /dev/pts/N: {out:?}"
    );
    assert!(
        lines.contains(&g.release.as_str()),
        "not the guest kernel {}: {out:?}",
        g.release
    );
    assert!(
        lines.contains(&"size=41 101"),
        "initial stty size not 41 101: {out:?}"
    );
    assert!(
        lines.contains(&"size=50 120"),
        "size after resize not 50 120: {out:?}"
    );
    env.c.assert_no_leaks(&[&id]);
    assert!(tandem_qemus().is_empty(), "{:?}", tandem_qemus());
}

// ---- user namespaces in VM pods (issue 4): docs/userns.md, "VM mode" ----

/// The guest range a VM pod's root maps to with `[userns] mode = "pod"` (shim spec.rs).
const GUEST_USERNS: &str = "0 100000 65536";
const IDMAP_FILE: &str = "/run/containerd-tandem/idmap/idmap.json";

/// `[userns]` of the VM userns tests: a pool no other test uses, so that a range taken for a VM
/// pod would show (none must be).
fn userns_toml() -> String {
    format!(
        "[userns]\nmode = \"pod\"\npool_start = {}\npool_size = {}\n",
        USERNS_POOL,
        4 * 65536
    )
}
const USERNS_POOL: u64 = 1_700_000_000;

/// Host allocations of the idmap pool that name `pod` or lie in the VM tests' pool.
fn host_ranges_of(ns: &str, pod: &str) -> Vec<String> {
    let Ok(text) = std::fs::read(IDMAP_FILE) else {
        return vec![];
    };
    let v: serde_json::Value = serde_json::from_slice(&text).expect("idmap.json is JSON");
    v["allocations"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, r)| {
            let start = r["start"].as_u64().unwrap_or(0);
            *k == &format!("{ns}/{pod}") || (USERNS_POOL..USERNS_POOL + 4 * 65536).contains(&start)
        })
        .map(|(k, r)| format!("{k}: {r}"))
        .collect()
}

/// QEMUs of the pod `id` (run dir `<shim pid>-<first 12 chars of the pod id>`): other VM tests
/// may run on the machine at the same time.
fn qemus_of(id: &str) -> Vec<(i32, String)> {
    let short: String = id.chars().take(12).collect();
    qemus(&format!("-{short}/"))
}

/// A VM-mode containerd with `extra` appended to the tandem config.
fn env_with(extra: &str) -> Env {
    let g = guest();
    Env::with_extra(&g.kernel, &g.initrd, extra)
}

/// What a process in the guest container sees of its user namespace and rootfs.
const USERNS_PROBE: &str = "cat /proc/self/uid_map /proc/self/gid_map; id -u; id -g; \
     stat -c %u:%g /bin/busybox /etc/passwd /; readlink /proc/self/ns/user; \
     touch /made-by-root && stat -c %u:%g /made-by-root; \
     mknod /dev/tandem-null c 1 3 2>&1 && echo mknod-ok; true";

fn probe_lines(out: &str) -> Vec<String> {
    out.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// `[userns] mode = "pod"` with `ctr run`: the container in the guest is root of a user
/// namespace mapped to the guest range (not the identity map), the image's root-owned files are
/// root's (idmapped erofs layers), a file it writes is root's, and creating a device node —
/// which needs CAP_MKNOD in the guest's initial user namespace — is refused; no host range is
/// taken from the pool at any time, and nothing is left after delete.
#[test]
fn vm_pod_userns_maps_root_to_a_guest_range_without_a_host_range() {
    let _slot = vm_slot();
    let env = env_with(&userns_toml());
    let c = &env.c;
    let id = unique_id("vmuserns");
    let rt = runtime();
    let mut args = vec!["run", "-d", "--runtime", &rt];
    args.extend(env.args(&[]));
    args.extend([BUSYBOX, id.as_str(), "sleep", "1000"]);
    let o = c.ctr(&args);
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        c.log_tail(30)
    );
    c.wait_task_status(&id, "RUNNING", Duration::from_secs(10));
    let pid = c.task_pid(&id);
    assert_eq!(host_ranges_of(&c.namespace, &id), Vec::<String>::new());
    let run = |eid: &str| {
        let o = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            eid,
            &id,
            "sh",
            "-c",
            USERNS_PROBE,
        ]);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "{out}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        probe_lines(&out)
    };
    let a = run("p1");
    eprintln!("userns probe in the guest: {a:?}");
    assert_eq!(a[0], GUEST_USERNS, "uid_map");
    assert_eq!(a[1], GUEST_USERNS, "gid_map");
    assert_ne!(a[0], "0 0 4294967295");
    assert_eq!(&a[2..4], ["0", "0"], "id -u, id -g");
    assert_eq!(
        &a[4..7],
        ["0:0", "0:0", "0:0"],
        "/bin/busybox, /etc/passwd and / are root's inside"
    );
    assert!(a[7].starts_with("user:["), "{}", a[7]);
    assert_eq!(a[8], "0:0", "a file root writes is root's");
    assert!(
        a[9].contains("Operation not permitted"),
        "root of the pod is not root of the guest: {}",
        a[9]
    );
    // the init (sleep) is in the same user namespace as the execs
    let o = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "p2",
        &id,
        "readlink",
        "/proc/1/ns/user",
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), a[7]);
    assert_eq!(host_ranges_of(&c.namespace, &id), Vec::<String>::new());
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    c.wait_task_status(&id, "STOPPED", Duration::from_secs(10));
    c.ctr_ok(&["task", "delete", &id]);
    c.ctr_ok(&["container", "rm", &id]);
    wait_no_qemu(pid, Duration::from_secs(10));
    c.assert_no_leaks(&[&id]);
    assert!(qemus_of(&id).is_empty(), "{:?}", qemus_of(&id));
    assert_eq!(host_ranges_of(&c.namespace, &id), Vec::<String>::new());
}

/// Mappings already in the spec (`ctr run --uidmap/--gidmap`, userns policy off) are the guest
/// user namespace's, as given; ctr's chown'ed snapshot layer is used as it is, the image layers
/// under it idmapped: busybox is root's inside. No host range.
#[test]
fn vm_given_mappings_are_used_in_the_guest() {
    let _slot = vm_slot();
    let env = Env::start();
    let c = &env.c;
    let id = unique_id("vmgiven");
    let rt = runtime();
    let mut args = vec!["run", "--rm", "--runtime", &rt];
    args.extend(env.args(&["--uidmap", "0:300000:65536", "--gidmap", "0:400000:65536"]));
    args.extend([BUSYBOX, id.as_str(), "sh", "-c", USERNS_PROBE]);
    let o = c.ctr(&args);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        c.log_tail(30)
    );
    let a = probe_lines(&out);
    eprintln!("given mappings in the guest: {a:?}");
    assert_eq!(a[0], "0 300000 65536");
    assert_eq!(a[1], "0 400000 65536");
    assert_eq!(&a[2..4], ["0", "0"]);
    assert_eq!(&a[4..7], ["0:0", "0:0", "0:0"]);
    assert_eq!(a[8], "0:0");
    assert!(a[9].contains("Operation not permitted"), "{}", a[9]);
    assert_eq!(host_ranges_of(&c.namespace, &id), Vec::<String>::new());
    c.assert_no_leaks(&[&id]);
    assert!(qemus_of(&id).is_empty(), "{:?}", qemus_of(&id));
}

/// A CRI pod on the `tandem-vm` handler with `[userns] mode = "pod"`: the sandbox and two
/// containers in one VM share one guest user namespace (same inode, same map), root inside is
/// root of the image; the host pool has no range for the pod before or after teardown.
#[test]
fn cri_vm_pod_containers_share_one_guest_user_namespace() {
    use tandem_tests::cri::ContainerSpec;
    let _slot = vm_slot();
    let (mut env, _cache) = cri_vm_env(&userns_toml());
    let spec = vm_pod_spec(&env, "vmuspod");
    let (pod_id, pod_cfg) = env.cri.run_pod(&spec).expect("RunPodSandbox");
    let mut ids = Vec::new();
    for n in ["one", "two"] {
        let c = env
            .cri
            .create_container(
                &pod_id,
                &pod_cfg,
                &ContainerSpec {
                    name: n.into(),
                    image: BUSYBOX.into(),
                    command: vec!["sleep".into(), "1000".into()],
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("create {n}: {e}"));
        env.cri.start_container(&c).expect("start");
        ids.push(c);
    }
    let ns = "k8s.io";
    assert_eq!(host_ranges_of(ns, &pod_id), Vec::<String>::new());
    let mut seen = Vec::new();
    for c in &ids {
        let r = env
            .cri
            .exec_sync(c, &["sh", "-c", USERNS_PROBE])
            .expect("ExecSync");
        let out = String::from_utf8_lossy(&r.stdout).into_owned();
        assert_eq!(
            r.exit_code,
            0,
            "{out}\n{}",
            String::from_utf8_lossy(&r.stderr)
        );
        let a = probe_lines(&out);
        eprintln!("container {c}: {a:?}");
        assert_eq!(a[0], GUEST_USERNS);
        assert_eq!(&a[2..4], ["0", "0"]);
        assert_eq!(&a[4..7], ["0:0", "0:0", "0:0"]);
        assert!(a[9].contains("Operation not permitted"), "{}", a[9]);
        seen.push((a[0].clone(), a[7].clone()));
    }
    assert_eq!(seen[0], seen[1], "both containers in one user namespace");
    let vms = qemus_of(&pod_id);
    assert_eq!(vms.len(), 1, "one VM for the pod: {vms:?}");
    let qemu = vms[0].0;
    env.cri.teardown_pod(&pod_id).expect("teardown");
    wait_for("the pod's shim exits", Duration::from_secs(10), || {
        shims_of(&env.containerd).is_empty()
    });
    wait_no_qemu(qemu, Duration::from_secs(5));
    assert!(qemus_of(&pod_id).is_empty(), "{:?}", qemus_of(&pod_id));
    assert_eq!(host_ranges_of(ns, &pod_id), Vec::<String>::new());
}

/// Mount sources of a CRI container's spec as containerd wrote it (destination -> source).
fn cri_mount_sources(c: &Containerd, id: &str) -> std::collections::HashMap<String, String> {
    let o = Command::new("ctr")
        .arg("-a")
        .arg(&c.socket)
        .args(["-n", "k8s.io", "containers", "info", id])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    info["Spec"]["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["destination"].as_str().unwrap_or_default().to_string(),
                m["source"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// A CRI pod under the `tandem-vm` handler with a DNS config: the container's /etc/hosts,
/// /etc/resolv.conf and /etc/hostname in the guest are what containerd wrote on the host (the
/// files its spec bind-mounts), the hostname is the pod's, /dev/shm is a tmpfs of the sandbox
/// shm's size; UpdateContainerResources reaches the container's guest cgroup (memory.max,
/// cpu.max), a cpuset in it (host-only in VM mode) is left out without failing the update.
#[test]
fn cri_vm_pod_has_host_files_and_updates_resources() {
    use tandem_tests::cri::{ContainerSpec, Cri, DnsConfig, LinuxContainerResources};
    let _slot = vm_slot();
    let g = guest();
    let (mut env, _cache) = cri_vm_env("");
    let spec = vm_pod_spec(&env, "vmfiles");
    let name = spec.name.clone();
    let mut pod_cfg = Cri::pod_config(&spec);
    pod_cfg.dns_config = Some(DnsConfig {
        servers: vec!["198.18.0.53".into()],
        searches: vec!["tandem.test".into()],
        options: vec!["ndots:2".into()],
    });
    let pod_id = env
        .cri
        .run_pod_with_config(&spec, pod_cfg.clone())
        .expect("RunPodSandbox");
    let cid = env
        .cri
        .create_container(
            &pod_id,
            &pod_cfg,
            &ContainerSpec {
                name: "app".into(),
                image: BUSYBOX.into(),
                command: vec!["sleep".into(), "1000".into()],
                memory_limit: 64 << 20,
                ..Default::default()
            },
        )
        .expect("CreateContainer");
    env.cri.start_container(&cid).expect("StartContainer");
    let sh = |cri: &mut Cri, cmd: &str| {
        let r = cri.exec_sync(&cid, &["sh", "-c", cmd]).expect("ExecSync");
        assert_eq!(
            r.exit_code,
            0,
            "{cmd}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        String::from_utf8_lossy(&r.stdout).into_owned()
    };
    assert_eq!(
        sh(&mut env.cri, "uname -r").trim(),
        g.release,
        "runs in the guest"
    );

    let sources = cri_mount_sources(&env.containerd, &cid);
    for dest in ["/etc/hosts", "/etc/resolv.conf", "/etc/hostname"] {
        let src = sources
            .get(dest)
            .unwrap_or_else(|| panic!("no {dest} mount in the spec: {sources:?}"));
        let host = std::fs::read_to_string(src).unwrap();
        assert!(!host.is_empty(), "{src} is empty");
        assert_eq!(
            sh(&mut env.cri, &format!("cat {dest}")),
            host,
            "{dest} in the guest vs {src}"
        );
    }
    let resolv = sh(&mut env.cri, "cat /etc/resolv.conf");
    for want in [
        "nameserver 198.18.0.53",
        "search tandem.test",
        "options ndots:2",
    ] {
        assert!(resolv.contains(want), "{want} in {resolv:?}");
    }
    assert_eq!(sh(&mut env.cri, "hostname").trim(), name);
    assert_eq!(sh(&mut env.cri, "cat /etc/hostname").trim(), name);
    let shm = sh(&mut env.cri, "grep ' /dev/shm ' /proc/mounts");
    assert!(
        shm.starts_with("shm /dev/shm tmpfs ") && shm.contains("size=65536k"),
        "{shm}"
    );

    // the container's cgroup in the guest (cgroup2 there)
    let cg = "/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup)";
    assert_eq!(
        sh(&mut env.cri, &format!("cat {cg}/memory.max")).trim(),
        "67108864"
    );
    env.cri
        .update_resources(
            &cid,
            LinuxContainerResources {
                memory_limit_in_bytes: 128 << 20,
                cpu_quota: 50000,
                cpu_period: 100000,
                cpu_shares: 512,
                cpuset_cpus: "0".into(),
                ..Default::default()
            },
        )
        .expect("UpdateContainerResources");
    assert_eq!(
        sh(&mut env.cri, &format!("cat {cg}/memory.max")).trim(),
        "134217728"
    );
    assert_eq!(
        sh(&mut env.cri, &format!("cat {cg}/cpu.max")).trim(),
        "50000 100000"
    );
    let st = env.cri.container_stats(&cid).expect("ContainerStats");
    assert!(st.memory.is_some(), "{st:?}");

    // this pod's VM (its run dir names the pod id's first 12 characters; other test processes
    // may run VMs of their own at the same time)
    let pod_vms = || qemus(&format!("-{}/", &pod_id[..12]));
    let qemu = pod_vms();
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    env.cri.teardown_pod(&pod_id).expect("teardown");
    wait_for("the pod's shim exits", Duration::from_secs(10), || {
        shims_of(&env.containerd).is_empty()
    });
    wait_no_qemu(qemu[0].0, Duration::from_secs(5));
    assert!(pod_vms().is_empty(), "{:?}", pod_vms());
}

/// `ctr run --mount type=bind,src=<file>,...` in a VM: the file's bytes are in the guest,
/// read-only as asked; a directory bind is there (virtio-fs, see the volume tests); a file over the copy limit fails
/// create at once, naming it, before any VM is booted, and leaves nothing.
#[test]
fn ctr_run_mount_of_a_host_file_in_a_vm() {
    let _slot = vm_slot();
    let env = Env::start();
    let c = &env.c;
    let dir = tempfile::Builder::new()
        .prefix("tandem-vmmount-")
        .tempdir_in("/tmp")
        .unwrap();
    let file = dir.path().join("greeting.conf");
    std::fs::write(&file, "hello from the host\nline 2\n").unwrap();
    let sub = dir.path().join("data");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("inside"), "x").unwrap();
    let big = dir.path().join("big.bin");
    std::fs::write(&big, vec![b'b'; 64 * 1024 + 1]).unwrap();
    let rt = runtime();
    let mnt = |src: &Path, dst: &str, opts: &str| {
        format!("type=bind,src={},dst={dst},options={opts}", src.display())
    };

    let id = unique_id("vmbig");
    let big_m = mnt(&big, "/big", "rbind:ro");
    let mut args = vec!["run", "--rm", "--runtime", &rt];
    args.extend(env.args(&["--mount", &big_m]));
    args.extend([BUSYBOX, id.as_str(), "true"]);
    let started = Instant::now();
    let o = c.ctr(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains(&big.display().to_string())
            && err.contains("/big")
            && err.contains("65537 bytes"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "refused before booting: {:?}",
        started.elapsed()
    );
    let _ = c.ctr(&["container", "rm", &id]);
    c.assert_no_leaks(&[&id]);
    // no VM of this container (run dirs name the first 12 characters of the pod id)
    let vms_of = |id: &str| qemus(&format!("-{}", &id[..id.len().min(12)]));
    assert!(vms_of(&id).is_empty(), "{:?}", vms_of(&id));

    let id = unique_id("vmmount");
    let file_m = mnt(&file, "/etc/greeting.conf", "rbind:ro");
    let dir_m = mnt(&sub, "/data", "rbind");
    let mut args = vec!["run", "--rm", "--runtime", &rt];
    args.extend(env.args(&["--mount", &file_m, "--mount", &dir_m]));
    args.extend([
        BUSYBOX,
        id.as_str(),
        "sh",
        "-c",
        "cat /etc/greeting.conf; (echo more >> /etc/greeting.conf) 2>/dev/null && echo writable || echo read-only; \
         ls /data/inside 2>/dev/null || echo no-dir; uname -r",
    ]);
    let o = c.ctr(&args);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        out,
        format!(
            "hello from the host\nline 2\nread-only\n/data/inside\n{}\n",
            guest().release
        )
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "hello from the host\nline 2\n",
        "host file unchanged"
    );
    c.assert_no_leaks(&[&id]);
    assert!(vms_of(&id).is_empty(), "{:?}", vms_of(&id));
}

/// A spec that joins a host user namespace by path without stating its mappings cannot be carried
/// into the guest: `ctr run` fails before any VM boots, naming the path and the missing
/// mappings; nothing is left, no QEMU, no host range.
#[test]
fn vm_host_userns_path_without_mappings_is_refused_before_boot() {
    let _slot = vm_slot();
    let env = env_with(&userns_toml());
    let c = &env.c;
    let id = unique_id("vmusbad");
    let rootfs = c.dir().join(format!("rootfs-{id}"));
    unpack_busybox_rootfs(&rootfs).unwrap();
    let mut spec = base_spec(c, &id, &rootfs, &["true"]);
    spec["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "user", "path": "/proc/1/ns/user"}));
    let path = c.dir().join(format!("{id}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    let rt = runtime();
    let mut args = vec!["run", "--rm", "--runtime", &rt];
    args.extend(env.args(&["--config", path.to_str().unwrap()]));
    args.push(id.as_str());
    let started = Instant::now();
    let o = c.ctr(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("/proc/1/ns/user") && err.contains("linux.uidMappings"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "refused before a VM boots"
    );
    let _ = c.ctr(&["container", "rm", &id]);
    c.assert_no_leaks(&[&id]);
    assert!(qemus_of(&id).is_empty(), "{:?}", qemus_of(&id));
    assert_eq!(host_ranges_of(&c.namespace, &id), Vec::<String>::new());
}

/// Issue 4, "capabilities are namespaced", in VM mode: a CRI pod with `[userns] mode = "pod"`
/// runs in a network namespace of the guest owned by the pod's user namespace, with the pod's NIC
/// moved in (addresses, routes kept: the pod IP answers ping from the host). A container given
/// CAP_NET_ADMIN (not privileged) makes a VLAN and a macvlan link on eth0 and sets its MTU; a
/// container without it is refused (EPERM) and sees the same links (one netns for the pod). The
/// host files bound in (/etc/hosts, /etc/resolv.conf) belong to the pod's root, which can write
/// them as on the host. Nothing of this shows in the host's network namespace.
#[test]
fn cri_vm_pod_userns_root_with_net_admin_owns_the_pod_network() {
    use tandem_tests::cri::{ContainerSpec, Cri};
    let _slot = vm_slot();
    let (mut env, _cache) = cri_vm_env(&userns_toml());
    let spec = vm_pod_spec(&env, "vmnetadm");
    let (pod_id, pod_cfg) = env.cri.run_pod(&spec).expect("RunPodSandbox");
    let mut make = |name: &str, caps: &[&str]| {
        let c = env
            .cri
            .create_container(
                &pod_id,
                &pod_cfg,
                &ContainerSpec {
                    name: name.into(),
                    image: BUSYBOX.into(),
                    command: vec!["sleep".into(), "1000".into()],
                    add_capabilities: caps.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
        env.cri.start_container(&c).expect("start");
        c
    };
    let admin = make("netadmin", &["NET_ADMIN"]);
    let plain = make("plain", &[]);
    let sh = |cri: &mut Cri, id: &str, cmd: &str| {
        let r = cri.exec_sync(id, &["sh", "-c", cmd]).expect("ExecSync");
        (
            r.exit_code,
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        )
    };
    let ok = |cri: &mut Cri, id: &str, cmd: &str| {
        let (code, out, err) = sh(cri, id, cmd);
        assert_eq!(code, 0, "{cmd}: {out}{err}");
        out
    };
    // the pod's user namespace, and the pod IP on eth0 in the pod's netns
    assert_eq!(
        probe_lines(&ok(&mut env.cri, &admin, "cat /proc/self/uid_map"))[0],
        GUEST_USERNS
    );
    let status = env.cri.pod_status(&pod_id).expect("PodSandboxStatus");
    let ip = status
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    assert!(ip.starts_with("198.19."), "pod IP {ip:?}");
    let net = ok(&mut env.cri, &admin, "ip -o addr show eth0; ip route");
    assert!(net.contains(&format!("inet {ip}/")), "{net}");
    assert!(
        net.contains("default via"),
        "the default route came along: {net}"
    );
    // without CAP_NET_ADMIN: refused
    for cmd in [
        "ip link set eth0 mtu 1300",
        "ip link add link eth0 name eth0.200 type vlan id 200",
    ] {
        let (code, out, err) = sh(&mut env.cri, &plain, cmd);
        assert_ne!(code, 0, "{cmd} without CAP_NET_ADMIN: {out}{err}");
        assert!(
            err.contains("Operation not permitted"),
            "{cmd} without CAP_NET_ADMIN: {err}"
        );
    }
    // with it: VLAN, macvlan, MTU
    for cmd in [
        "ip link add link eth0 name eth0.100 type vlan id 100",
        "ip link add link eth0 name mv0 type macvlan",
        "ip link set eth0 mtu 1400",
        "ip link set eth0.100 up",
        "ip addr add 198.18.100.2/24 dev eth0.100",
    ] {
        ok(&mut env.cri, &admin, cmd);
    }
    // busybox ip has no -d: the kernel's VLAN table names the VLAN's id and parent
    let links = ok(
        &mut env.cri,
        &admin,
        "ip -o link; cat /proc/net/vlan/config",
    );
    eprintln!("links of the pod netns: {links}");
    assert!(links.contains("eth0.100@eth0"), "{links}");
    assert!(
        probe_lines(&links)
            .iter()
            .any(|l| l == "eth0.100 | 100 | eth0"),
        "a VLAN with id 100 on eth0: {links}"
    );
    assert!(links.contains("mv0@eth0"), "{links}");
    let eth0 = ok(
        &mut env.cri,
        &plain,
        "ip -o link show eth0; ip -o link; ip -o addr",
    );
    assert!(eth0.contains("mtu 1400"), "{eth0}");
    assert!(
        eth0.contains("eth0.100@eth0") && eth0.contains("mv0@eth0"),
        "the other container is in the same netns: {eth0}"
    );
    assert!(eth0.contains("inet 198.18.100.2/24"), "{eth0}");
    // the NIC kept its address and routes through the move: the pod IP answers from the host
    wait_for(
        "the pod IP answers ping from the host",
        Duration::from_secs(20),
        || {
            Command::new("busybox")
                .args(["ping", "-c", "1", "-W", "1", &ip])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        },
    );
    let host_links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let host_links = String::from_utf8_lossy(&host_links.stdout);
    assert!(
        !host_links.contains("eth0.100") && !host_links.contains(" mv0"),
        "{host_links}"
    );
    // host files belong to the pod's root, which writes them as on the host (kubelet binds
    // /etc/hosts read-write; each container of a VM pod has its own copy)
    let st = ok(
        &mut env.cri,
        &plain,
        "stat -c %u:%g /etc/hosts /etc/resolv.conf",
    );
    assert_eq!(probe_lines(&st), ["0:0", "0:0"], "{st}");
    ok(
        &mut env.cri,
        &plain,
        "echo '198.18.100.9 written-by-pod-root' >> /etc/hosts",
    );
    let hosts = ok(&mut env.cri, &plain, "cat /etc/hosts");
    assert!(
        hosts.contains("198.18.100.9 written-by-pod-root"),
        "{hosts}"
    );

    let vms = qemus_of(&pod_id);
    assert_eq!(vms.len(), 1, "one VM for the pod: {vms:?}");
    env.cri.teardown_pod(&pod_id).expect("teardown");
    wait_for("the pod's shim exits", Duration::from_secs(10), || {
        shims_of(&env.containerd).is_empty()
    });
    wait_no_qemu(vms[0].0, Duration::from_secs(5));
    assert!(qemus_of(&pod_id).is_empty(), "{:?}", qemus_of(&pod_id));
}

/// virtio-fs daemons (QEMU 7.2's virtiofsd) whose command line names `needle`.
fn virtiofsds(needle: &str) -> Vec<(i32, String)> {
    processes_matching(needle)
        .into_iter()
        .filter(|(_, c)| c.contains("virtiofsd"))
        .collect()
}

/// The run dir of a QEMU from its command line (`path=<run dir>/qmp.sock`).
fn run_dir_of(cmdline: &str) -> std::path::PathBuf {
    let i = cmdline.find("path=/run/tandem-vm/").expect("a run dir") + 5;
    let rest = &cmdline[i..];
    let end = rest.find("/qmp.sock").expect("qmp.sock");
    std::path::PathBuf::from(&rest[..end])
}

/// Mount points at or below `dir` on the host.
fn host_mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect()
}

/// Directory volumes in a VM (`ctr run --mount` of directories, served by virtio-fs): a missing
/// source fails at once naming it and leaves nothing; then in one VM: a host file is read in the
/// guest, a file written in the guest is on the host with its content, the read-only volume
/// refuses writes with EROFS (guest and host bind), symlinks made in the guest to `/` and to a
/// host directory outside the volume resolve in the guest, never to the host's files; one
/// virtiofsd per pod, in QEMU's cgroup; after delete no virtiofsd, no mount under the run dir,
/// no run dir, no leaks; the host's directories are untouched.
#[test]
fn vm_directory_volumes_rw_ro_symlink_escape_and_cleanup() {
    let _slot = vm_slot();
    let env = Env::start();
    let c = &env.c;
    let rt = runtime();
    let dir = tempfile::Builder::new()
        .prefix("tandem-vmvol-")
        .tempdir_in("/tmp")
        .unwrap();
    let rw = dir.path().join("rw");
    let ro = dir.path().join("ro");
    let secret_dir = dir.path().join("outside");
    for d in [&rw, &ro, &secret_dir] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::write(rw.join("from-host"), "written on the host\n").unwrap();
    std::fs::write(ro.join("keep"), "read-only data\n").unwrap();
    std::fs::write(secret_dir.join("secret"), "HOST-SECRET\n").unwrap();
    let mnt = |src: &Path, dst: &str, opts: &str| {
        format!("type=bind,src={},dst={dst},options={opts}", src.display())
    };

    // a missing source: refused before any VM boots, naming it
    let id = unique_id("vmvolbad");
    let missing = dir.path().join("no-such-dir");
    let bad_m = mnt(&missing, "/data", "rbind:rw");
    let mut args = vec!["run", "--rm", "--runtime", &rt];
    args.extend(env.args(&["--mount", &bad_m]));
    args.extend([BUSYBOX, id.as_str(), "true"]);
    let started = Instant::now();
    let o = c.ctr(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    let _ = c.ctr(&["container", "rm", &id]);
    c.assert_no_leaks(&[&id]);
    assert!(qemus_of(&id).is_empty() && virtiofsds(&id[..12]).is_empty());

    let id = unique_id("vmvol");
    let rw_m = mnt(&rw, "/data", "rbind:rw");
    let ro_m = mnt(&ro, "/ro", "rbind:ro");
    let mut args = vec!["run", "-d", "--runtime", &rt];
    args.extend(env.args(&["--mount", &rw_m, "--mount", &ro_m]));
    args.extend([BUSYBOX, id.as_str(), "sleep", "1000"]);
    let started = Instant::now();
    c.ctr_ok(&args);
    c.wait_task_status(&id, "RUNNING", Duration::from_secs(30));
    eprintln!(
        "VM container with two volumes running after {:?}",
        started.elapsed()
    );
    let secret = secret_dir.join("secret");
    let script = format!(
        "cat /data/from-host; printf 'from the guest\\n' > /data/from-guest && echo wrote; \
         cat /ro/keep; (echo x > /ro/new) 2>/tmp/err; echo ro-exit=$?; cat /tmp/err; \
         grep -E ' /(data|ro) ' /proc/mounts; \
         ln -s / /data/esc && ln -s {outside} /data/esc2 && echo links; \
         cat /data/esc{secret} 2>&1 || echo no-escape-1; \
         cat /data/esc2/secret 2>&1 || echo no-escape-2; \
         ls /data/esc/bin/busybox; cat /data/../../..{secret} 2>&1 || echo no-escape-3",
        outside = secret_dir.display(),
        secret = secret.display(),
    );
    let o = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "probe",
        &id,
        "sh",
        "-c",
        &script,
    ]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    eprintln!("{out}");
    assert!(
        o.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "written on the host");
    assert_eq!(lines[1], "wrote");
    assert_eq!(lines[2], "read-only data");
    assert_eq!(lines[3], "ro-exit=1");
    assert!(lines[4].contains("Read-only file system"), "{}", lines[4]);
    let data = lines
        .iter()
        .find(|l| l.contains(" /data "))
        .expect("/data mounted");
    let rom = lines
        .iter()
        .find(|l| l.contains(" /ro "))
        .expect("/ro mounted");
    assert!(data.starts_with("tandem /data virtiofs rw"), "{data}");
    assert!(rom.starts_with("tandem /ro virtiofs ro"), "{rom}");
    assert!(lines.contains(&"links"));
    assert!(lines.contains(&"no-escape-1"), "{out}");
    assert!(lines.contains(&"no-escape-2"), "{out}");
    assert!(lines.contains(&"no-escape-3"), "{out}");
    assert!(
        lines.contains(&"/data/esc/bin/busybox"),
        "the guest's own root: {out}"
    );
    assert!(!out.contains("HOST-SECRET"), "{out}");
    // on the host
    assert_eq!(
        std::fs::read_to_string(rw.join("from-guest")).unwrap(),
        "from the guest\n"
    );
    assert_eq!(std::fs::read_link(rw.join("esc")).unwrap(), Path::new("/"));
    assert!(!ro.join("new").exists());
    let vms = qemus_of(&id);
    assert_eq!(vms.len(), 1, "{vms:?}");
    let run_dir = run_dir_of(&vms[0].1);
    let fsd = virtiofsds(&format!("{}/", run_dir.display()));
    assert_eq!(fsd.len(), 1, "one virtiofsd for the pod: {fsd:?}");
    assert_eq!(
        proc_cgroups(fsd[0].0),
        proc_cgroups(vms[0].0),
        "virtiofsd in QEMU's cgroups"
    );
    let mounts = host_mounts_under(&run_dir);
    assert_eq!(mounts.len(), 3, "shared tmpfs + 2 binds: {mounts:?}");
    // figures: the shim's daemon start + hot-plug, the guest's module load and mount wait
    let log = c.log();
    let hot: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("virtiofsd started and its device hot-added"))
        .collect();
    for l in &hot {
        eprintln!("shim: {l}");
    }
    let console = std::fs::read_to_string(run_dir.join("console.log")).unwrap_or_default();
    for l in console.lines().filter(|l| l.contains("virtio-fs")) {
        eprintln!("guest: {l}");
    }

    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    c.wait_task_status(&id, "STOPPED", Duration::from_secs(15));
    c.ctr_ok(&["task", "delete", &id]);
    c.ctr_ok(&["container", "rm", &id]);
    wait_no_qemu(vms[0].0, Duration::from_secs(5));
    wait_for("virtiofsd gone", Duration::from_secs(5), || {
        virtiofsds(&format!("{}/", run_dir.display())).is_empty()
    });
    assert!(
        host_mounts_under(&run_dir).is_empty(),
        "{:?}",
        host_mounts_under(&run_dir)
    );
    assert!(!run_dir.exists(), "{} left", run_dir.display());
    c.assert_no_leaks(&[&id]);
    // the host's directories are intact
    assert_eq!(
        std::fs::read_to_string(rw.join("from-host")).unwrap(),
        "written on the host\n"
    );
    assert_eq!(
        std::fs::read_to_string(ro.join("keep")).unwrap(),
        "read-only data\n"
    );
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "HOST-SECRET\n");
}

/// Two CRI containers of one VM pod share an emptyDir-style host directory (one read-write,
/// one read-only): what one writes the other reads, and the host sees it; the read-only one
/// cannot write; teardown leaves no virtiofsd, no mount, no run dir.
#[test]
fn cri_vm_pod_containers_share_a_directory_volume() {
    use tandem_tests::cri::ContainerSpec;
    let _slot = vm_slot();
    let (mut env, _cache) = cri_vm_env("");
    let vol = tempfile::Builder::new()
        .prefix("tandem-emptydir-")
        .tempdir_in("/tmp")
        .unwrap();
    let spec = vm_pod_spec(&env, "vmvolpod");
    let (pod_id, pod_cfg) = env.cri.run_pod(&spec).expect("RunPodSandbox");
    let mut ids = Vec::new();
    for (n, ro) in [("writer", false), ("reader", true)] {
        let c = env
            .cri
            .create_container(
                &pod_id,
                &pod_cfg,
                &ContainerSpec {
                    name: n.into(),
                    image: BUSYBOX.into(),
                    command: vec!["sleep".into(), "1000".into()],
                    mounts: vec![(vol.path().to_path_buf(), "/cache".into(), ro)],
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("create {n}: {e}"));
        env.cri.start_container(&c).expect("start");
        ids.push(c);
    }
    let run = |env: &mut tandem_tests::cri::CriEnv, c: &str, script: &str| {
        let r = env
            .cri
            .exec_sync(c, &["sh", "-c", script])
            .expect("ExecSync");
        (
            r.exit_code,
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(
        &mut env,
        &ids[0],
        "echo shared-by-writer > /cache/note && cat /cache/note",
    );
    assert_eq!((code, out.as_str()), (0, "shared-by-writer\n"), "{err}");
    let (code, out, err) = run(&mut env, &ids[1], "cat /cache/note; echo no > /cache/x");
    assert_eq!(out, "shared-by-writer\n", "{err}");
    assert_ne!(code, 0);
    assert!(err.contains("Read-only file system"), "{err}");
    std::fs::write(vol.path().join("from-host"), "host line\n").unwrap();
    let (code, out, _) = run(&mut env, &ids[1], "cat /cache/from-host");
    assert_eq!((code, out.as_str()), (0, "host line\n"));
    assert_eq!(
        std::fs::read_to_string(vol.path().join("note")).unwrap(),
        "shared-by-writer\n"
    );
    assert!(!vol.path().join("x").exists());
    let vms = qemus_of(&pod_id);
    assert_eq!(vms.len(), 1, "{vms:?}");
    let run_dir = run_dir_of(&vms[0].1);
    let fsd = virtiofsds(&format!("{}/", run_dir.display()));
    assert_eq!(fsd.len(), 1, "{fsd:?}");
    assert_eq!(
        host_mounts_under(&run_dir).len(),
        3,
        "{:?}",
        host_mounts_under(&run_dir)
    );
    env.cri.teardown_pod(&pod_id).expect("teardown");
    wait_for("the pod's shim exits", Duration::from_secs(10), || {
        shims_of(&env.containerd).is_empty()
    });
    wait_no_qemu(vms[0].0, Duration::from_secs(5));
    assert!(virtiofsds(&format!("{}/", run_dir.display())).is_empty());
    assert!(
        host_mounts_under(&run_dir).is_empty(),
        "{:?}",
        host_mounts_under(&run_dir)
    );
    assert!(!run_dir.exists());
    assert_eq!(
        std::fs::read_to_string(vol.path().join("note")).unwrap(),
        "shared-by-writer\n"
    );
}

/// A static x86-64 program (raw syscalls, ~9 KiB: small enough to be copied into the guest as a
/// file bind) on the SysV shared memory segment with key 0x74616e64: it prints `created` when it
/// had to make it (and writes a message in it), `found:<message>` when it was there already.
/// Built with the host's C compiler (the one cargo links with).
fn sysv_probe(dir: &Path) -> std::path::PathBuf {
    const SRC: &str = r#"
#define KEY 0x74616e64L
static long sc(long n, long a, long b, long c) {
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}
static void out(const char *s) { long n = 0; while (s[n]) n++; sc(1, 1, (long)s, n); }
__attribute__((force_align_arg_pointer)) void _start(void) {
    long id = sc(29, KEY, 4096, 0);                       /* shmget */
    if (id < 0) {
        id = sc(29, KEY, 4096, 01000 | 0666);             /* IPC_CREAT */
        if (id < 0) { out("shmget failed\n"); sc(60, 1, 0, 0); }
        volatile char *p = (volatile char *)sc(30, id, 0, 0);   /* shmat */
        if ((unsigned long)p > -4096UL) { out("shmat failed\n"); sc(60, 1, 0, 0); }
        const char *m = "sysv-shared-by-pod";
        long i = 0;
        for (; m[i]; i++) p[i] = m[i];
        p[i] = 0;
        out("created\n");
    } else {
        char *p = (char *)sc(30, id, 0, 0);
        if ((unsigned long)p > -4096UL) { out("shmat failed\n"); sc(60, 1, 0, 0); }
        out("found:"); out(p); out("\n");
    }
    sc(60, 0, 0, 0);                                      /* exit */
}
"#;
    let src = dir.join("sysv.c");
    let bin = dir.join("sysv");
    std::fs::write(&src, SRC).unwrap();
    let o = Command::new("cc")
        .args([
            "-static",
            "-nostdlib",
            "-no-pie",
            "-Os",
            "-fno-builtin",
            "-fno-tree-loop-distribute-patterns",
            "-fno-stack-protector",
            "-o",
        ])
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("run cc");
    assert!(
        o.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(std::fs::metadata(&bin).unwrap().len() < 64 * 1024);
    bin
}

/// What a container sees of its pod: namespaces (ipc, uts, pid, user), hostname, /dev/shm.
const POD_NS_PROBE: &str = "for n in ipc uts pid user; do readlink /proc/self/ns/$n; done; \
     hostname; grep ' /dev/shm ' /proc/mounts | cut -d' ' -f1,3; \
     grep ' /dev/shm ' /proc/mounts | tr ',' '\\n' | grep '^size='";

#[derive(Debug, PartialEq, Eq)]
struct PodNs {
    ipc: String,
    uts: String,
    pid: String,
    user: String,
    hostname: String,
    shm: String,
    shm_size: String,
}

fn pod_ns(cri: &mut tandem_tests::cri::Cri, id: &str) -> PodNs {
    let r = cri
        .exec_sync(id, &["sh", "-c", POD_NS_PROBE])
        .expect("ExecSync");
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    assert_eq!(
        r.exit_code,
        0,
        "{out}{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let l = probe_lines(&out);
    assert_eq!(l.len(), 7, "{out}");
    PodNs {
        ipc: l[0].clone(),
        uts: l[1].clone(),
        pid: l[2].clone(),
        user: l[3].clone(),
        hostname: l[4].clone(),
        shm: l[5].clone(),
        shm_size: l[6].clone(),
    }
}

fn sh_ok(cri: &mut tandem_tests::cri::Cri, id: &str, cmd: &str) -> String {
    let r = cri.exec_sync(id, &["sh", "-c", cmd]).expect("ExecSync");
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    assert_eq!(
        r.exit_code,
        0,
        "{cmd}: {out}{}",
        String::from_utf8_lossy(&r.stderr)
    );
    out
}

/// Two containers `one` (`sleep 1000`) and `two` (`sleep 1001`) in a pod, started, with the SysV
/// probe bound at /sysv; `share_pid`: kubelet's shareProcessNamespace (pod and containers).
fn pod_of_two(
    env: &mut tandem_tests::cri::CriEnv,
    prefix: &str,
    probe: &Path,
    share_pid: bool,
) -> (String, Vec<String>) {
    use tandem_tests::cri::{ContainerSpec, Cri, NamespaceMode};
    let spec = vm_pod_spec(env, prefix);
    let mut pod_cfg = Cri::pod_config(&spec);
    if share_pid {
        let ns = pod_cfg
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .and_then(|s| s.namespace_options.as_mut())
            .expect("namespace options");
        ns.pid = NamespaceMode::Pod as i32;
    }
    let pod_id = env
        .cri
        .run_pod_with_config(&spec, pod_cfg.clone())
        .expect("RunPodSandbox");
    let mut ids = Vec::new();
    for (n, secs) in [("one", "1000"), ("two", "1001")] {
        let c = env
            .cri
            .create_container(
                &pod_id,
                &pod_cfg,
                &ContainerSpec {
                    name: n.into(),
                    image: BUSYBOX.into(),
                    command: vec!["sleep".into(), secs.into()],
                    mounts: vec![(probe.to_path_buf(), "/sysv".into(), true)],
                    share_pid,
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("create {n}: {e}"));
        env.cri.start_container(&c).expect("start");
        ids.push(c);
    }
    (pod_id, ids)
}

/// Remove the pods; their shims and QEMUs must be gone.
fn teardown_pods(env: &mut tandem_tests::cri::CriEnv, pods: &[String]) {
    let vms: Vec<i32> = pods
        .iter()
        .flat_map(|p| qemus_of(p).into_iter().map(|(pid, _)| pid))
        .collect();
    for p in pods {
        env.cri.teardown_pod(p).expect("teardown");
    }
    wait_for("the pods' shims exit", Duration::from_secs(15), || {
        shims_of(&env.containerd).is_empty()
    });
    for pid in vms {
        wait_no_qemu(pid, Duration::from_secs(5));
    }
    for p in pods {
        assert!(qemus_of(p).is_empty(), "{:?}", qemus_of(p));
    }
}

/// A CRI VM pod's containers share the sandbox's IPC namespace (a SysV segment made in one is
/// found in the other), its /dev/shm (a file written in one is read in the other, a 64 MiB
/// tmpfs as the host's sandbox shm; it outlives the removal of one of them), its UTS namespace
/// (the pod's hostname); each has a PID namespace of its own (neither sees the other's
/// processes). A second pod with shareProcessNamespace: one PID namespace, the sandbox's
/// (pause is pid 1, each sees the other's `sleep`).
#[test]
fn cri_vm_pod_containers_share_ipc_shm_uts_and_pid_when_asked() {
    let _slot = vm_slot();
    let (mut env, _cache) = cri_vm_env("");
    let tools = tempfile::tempdir().unwrap();
    let probe = sysv_probe(tools.path());

    let (pod, ids) = pod_of_two(&mut env, "vmipc", &probe, false);
    let (one, two) = (&ids[0], &ids[1]);
    assert_eq!(
        sh_ok(&mut env.cri, one, "echo from-one > /dev/shm/f && /sysv"),
        "created\n"
    );
    assert_eq!(
        sh_ok(&mut env.cri, two, "cat /dev/shm/f && /sysv"),
        "from-one\nfound:sysv-shared-by-pod\n"
    );
    let (a, b) = (pod_ns(&mut env.cri, one), pod_ns(&mut env.cri, two));
    eprintln!("one: {a:?}\ntwo: {b:?}");
    assert_eq!(a.ipc, b.ipc);
    assert_eq!(a.uts, b.uts);
    assert_ne!(
        a.pid, b.pid,
        "a PID namespace each without shareProcessNamespace"
    );
    let status = env.cri.pod_status(&pod).expect("PodSandboxStatus");
    let pod_name = status.metadata.as_ref().unwrap().name.clone();
    assert_eq!(a.hostname, pod_name);
    assert_eq!(b.hostname, pod_name);
    assert_eq!(a.shm, "shm tmpfs");
    assert_eq!(a.shm_size, "size=65536k", "the host sandbox shm's size");
    assert_eq!(
        (b.shm.as_str(), b.shm_size.as_str()),
        ("shm tmpfs", "size=65536k")
    );
    let ps = sh_ok(&mut env.cri, one, "ps -o pid,args");
    assert!(
        !ps.contains("sleep 1001") && !ps.contains("pause"),
        "one sees only its own processes: {ps}"
    );
    // one of the two removed: the pod's /dev/shm and IPC stay for the other
    env.cri.stop_container(two, 0).expect("stop two");
    env.cri.remove_container(two).expect("remove two");
    assert_eq!(
        sh_ok(&mut env.cri, one, "cat /dev/shm/f && /sysv"),
        "from-one\nfound:sysv-shared-by-pod\n"
    );

    let (pod2, ids2) = pod_of_two(&mut env, "vmpidns", &probe, true);
    let (one2, two2) = (&ids2[0], &ids2[1]);
    let (a2, b2) = (pod_ns(&mut env.cri, one2), pod_ns(&mut env.cri, two2));
    eprintln!("shared pid, one: {a2:?}\ntwo: {b2:?}");
    assert_eq!(
        a2.pid, b2.pid,
        "one PID namespace with shareProcessNamespace"
    );
    assert_eq!((a2.ipc == b2.ipc, a2.uts == b2.uts), (true, true));
    // (namespace inode numbers of two identically booted VMs can be equal: the isolation of
    // the other pod shows below, its SysV segment is not found but created anew)
    let ps = sh_ok(
        &mut env.cri,
        one2,
        "ps -o pid,args; tr '\\0' '\\n' < /proc/1/cmdline",
    );
    eprintln!("{ps}");
    assert!(ps.contains("sleep 1001"), "one sees two's process: {ps}");
    assert!(
        ps.trim_end().ends_with("/pause"),
        "pid 1 is the sandbox's pause: {ps}"
    );
    assert_eq!(
        sh_ok(&mut env.cri, two2, "/sysv; echo x > /dev/shm/g"),
        "created\n",
        "another pod's IPC namespace"
    );
    assert_eq!(
        sh_ok(&mut env.cri, one2, "/sysv; cat /dev/shm/g"),
        "found:sysv-shared-by-pod\nx\n"
    );

    teardown_pods(&mut env, &[pod, pod2]);
}

/// With `[userns] mode = "pod"`: the containers of a shareProcessNamespace pod are in the pod's
/// user namespace and share the sandbox's IPC, UTS and PID namespaces (made by the sandbox in
/// that user namespace, which owns them: the engine joins the user namespace first) and /dev/shm.
#[test]
fn cri_vm_pod_userns_containers_share_ipc_shm_uts_and_pid() {
    let _slot = vm_slot();
    let (mut env, _cache) = cri_vm_env(&userns_toml());
    let tools = tempfile::tempdir().unwrap();
    let probe = sysv_probe(tools.path());
    let (pod, ids) = pod_of_two(&mut env, "vmuspidns", &probe, true);
    let (one, two) = (&ids[0], &ids[1]);
    for c in &ids {
        assert_eq!(
            probe_lines(&sh_ok(&mut env.cri, c, "cat /proc/self/uid_map"))[0],
            GUEST_USERNS
        );
    }
    assert_eq!(
        sh_ok(&mut env.cri, one, "echo from-one > /dev/shm/f && /sysv"),
        "created\n"
    );
    assert_eq!(
        sh_ok(
            &mut env.cri,
            two,
            "cat /dev/shm/f && stat -c %u:%g /dev/shm/f && /sysv"
        ),
        "from-one\n0:0\nfound:sysv-shared-by-pod\n"
    );
    let (a, b) = (pod_ns(&mut env.cri, one), pod_ns(&mut env.cri, two));
    eprintln!("one: {a:?}\ntwo: {b:?}");
    assert_eq!(a, b, "the same namespaces, hostname and /dev/shm");
    let status = env.cri.pod_status(&pod).expect("PodSandboxStatus");
    assert_eq!(a.hostname, status.metadata.as_ref().unwrap().name);
    assert_eq!(
        (a.shm.as_str(), a.shm_size.as_str()),
        ("shm tmpfs", "size=65536k")
    );
    let ps = sh_ok(
        &mut env.cri,
        one,
        "ps -o pid,args; tr '\\0' '\\n' < /proc/1/cmdline",
    );
    assert!(ps.contains("sleep 1001"), "one sees two's process: {ps}");
    assert!(
        ps.trim_end().ends_with("/pause"),
        "pid 1 is the sandbox's pause: {ps}"
    );
    assert_eq!(host_ranges_of("k8s.io", &pod), Vec::<String>::new());
    teardown_pods(&mut env, &[pod]);
}

// ---- vCPU and memory hot-plug (the VM follows its containers' resources) ----

/// The vCPU threads of QEMU `pid` (named `CPU <n>/TCG|KVM` with debug-threads=on): (name,
/// Cpus_allowed_list), sorted by name.
fn vcpu_threads(pid: i32) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.starts_with("CPU ") {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            let allowed = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap_or_default()
                .trim()
                .to_string();
            v.push((comm.trim().to_string(), allowed));
        }
    }
    v.sort();
    v
}

/// QEMU's arguments (NUL separated in /proc).
fn qemu_args(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn arg_after(args: &[String], flag: &str) -> String {
    args.windows(2)
        .find(|w| w[0] == flag)
        .map(|w| w[1].clone())
        .unwrap_or_default()
}

/// `UpdateTask` of containerd's Task API (what `ctr task update` of newer containerd and
/// CRI's UpdateContainerResources send through containerd), on the container's shim: ctr
/// 1.6 has no `task update` command.
fn task_update(c: &Containerd, id: &str, resources: serde_json::Value) {
    use containerd_shim_protos::api::UpdateTaskRequest;
    use containerd_shim_protos::protobuf::well_known_types::any::Any;
    let state = c.socket.parent().unwrap().join("state");
    let addr_file = state
        .join("io.containerd.runtime.v2.task")
        .join(&c.namespace)
        .join(id)
        .join("address");
    let addr = std::fs::read_to_string(&addr_file)
        .unwrap_or_else(|e| panic!("{}: {e}", addr_file.display()));
    let client = containerd_shim_protos::Client::connect(addr.trim()).expect("shim ttrpc");
    let task = containerd_shim_protos::TaskClient::new(client);
    let req = UpdateTaskRequest {
        id: id.to_string(),
        resources: Some(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
            value: serde_json::to_vec(&resources).unwrap(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let ctx = containerd_shim_protos::ttrpc::context::with_timeout(120_000_000_000);
    task.update(ctx, &req)
        .unwrap_or_else(|e| panic!("UpdateTask {id} {resources}: {e}"));
}

/// CRI: a pod boots with 1 vCPU / 512 MiB (the sandbox asks for nothing); a container with
/// `limits: cpu: 2, memory: 768Mi` makes the VM 3 vCPUs / 1280 MiB before it is created (hot-plug,
/// onlined in the guest); UpdateContainerResources to 3 CPUs adds a vCPU; removing the container
/// unplugs them (memory stays). Host side: QEMU's vCPU threads follow.
#[test]
fn cri_vm_pod_grows_with_its_containers_vcpu_and_memory_hot_plug() {
    use tandem_tests::cri::{ContainerSpec, Cri, LinuxContainerResources};
    let _slot = vm_slot();
    let (mut env, _cache) = cri_vm_env("max_vcpus = 4\n");
    let spec = vm_pod_spec(&env, "vmhp");
    let pod_cfg = Cri::pod_config(&spec);
    let pod_id = env
        .cri
        .run_pod_with_config(&spec, pod_cfg.clone())
        .expect("RunPodSandbox");
    let pod_vms = || qemus(&format!("-{}/", &pod_id[..12]));
    let qemu = pod_vms();
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    let qpid = qemu[0].0;
    let args = qemu_args(qpid);
    assert_eq!(arg_after(&args, "-smp"), "1,maxcpus=4", "{args:?}");
    let m = arg_after(&args, "-m");
    assert!(m.starts_with("512M,slots=16,maxmem="), "{m}");
    assert_eq!(vcpu_threads(qpid).len(), 1, "{:?}", vcpu_threads(qpid));

    // a probe without limits (asks for nothing: no hot-plug) to look from inside
    let busybox = |name: &str, quota: i64, mem: i64| ContainerSpec {
        name: name.into(),
        image: BUSYBOX.into(),
        command: vec!["sleep".into(), "1000".into()],
        cpu_quota: quota,
        cpu_period: if quota > 0 { 100_000 } else { 0 },
        memory_limit: mem,
        ..Default::default()
    };
    let probe = env
        .cri
        .create_container(&pod_id, &pod_cfg, &busybox("probe", 0, 0))
        .expect("CreateContainer probe");
    env.cri.start_container(&probe).expect("StartContainer");
    let sh = |cri: &mut Cri, cmd: &str| {
        let r = cri.exec_sync(&probe, &["sh", "-c", cmd]).expect("ExecSync");
        assert_eq!(
            r.exit_code,
            0,
            "{cmd}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        String::from_utf8_lossy(&r.stdout).trim().to_string()
    };
    let mem_total = |cri: &mut Cri| -> u64 {
        sh(
            cri,
            "sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo",
        )
        .parse()
        .unwrap()
    };
    assert_eq!(sh(&mut env.cri, "nproc"), "1");
    assert_eq!(sh(&mut env.cri, "cat /sys/devices/system/cpu/online"), "0");
    let mem0 = mem_total(&mut env.cri);
    assert_eq!(vcpu_threads(qpid).len(), 1);

    // limits: cpu 2 (200000/100000), memory 768 MiB: the VM grows before the container is made
    let t0 = Instant::now();
    let app = env
        .cri
        .create_container(&pod_id, &pod_cfg, &busybox("app", 200_000, 768 << 20))
        .expect("CreateContainer app");
    let create_time = t0.elapsed();
    env.cri.start_container(&app).expect("StartContainer app");
    assert_eq!(sh(&mut env.cri, "nproc"), "3", "1 + 2 vCPUs online");
    assert_eq!(
        sh(&mut env.cri, "cat /sys/devices/system/cpu/online"),
        "0-2"
    );
    let mem1 = mem_total(&mut env.cri);
    let grown_mib = (mem1 - mem0) / 1024;
    assert!(
        (760..=772).contains(&grown_mib),
        "MemTotal {mem0} -> {mem1} kB: +{grown_mib} MiB, want ~768"
    );
    let threads = vcpu_threads(qpid);
    assert_eq!(
        threads.len(),
        3,
        "QEMU has the new vCPU threads: {threads:?}"
    );
    // the app's own cgroup limit is there in the guest
    let r = env
        .cri
        .exec_sync(
            &app,
            &[
                "sh",
                "-c",
                "cat /sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup)/cpu.max; nproc",
            ],
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "200000 100000\n3\n");

    // UpdateContainerResources to 3 CPUs: one more vCPU (1 + 3 = 4, the max)
    let t1 = Instant::now();
    env.cri
        .update_resources(
            &app,
            LinuxContainerResources {
                cpu_quota: 300_000,
                cpu_period: 100_000,
                cpu_shares: 2,
                memory_limit_in_bytes: 768 << 20,
                ..Default::default()
            },
        )
        .expect("UpdateContainerResources");
    let update_time = t1.elapsed();
    assert_eq!(sh(&mut env.cri, "nproc"), "4");
    assert_eq!(vcpu_threads(qpid).len(), 4, "{:?}", vcpu_threads(qpid));
    // asking beyond max_vcpus = 4 is capped (Kata's behaviour), not refused
    env.cri
        .update_resources(
            &app,
            LinuxContainerResources {
                cpu_quota: 800_000,
                cpu_period: 100_000,
                cpu_shares: 2,
                memory_limit_in_bytes: 768 << 20,
                ..Default::default()
            },
        )
        .expect("UpdateContainerResources above the cap");
    assert_eq!(sh(&mut env.cri, "nproc"), "4");

    // the container goes: its vCPUs are unplugged, memory stays
    let t2 = Instant::now();
    env.cri.stop_container(&app, 0).expect("StopContainer");
    env.cri.remove_container(&app).expect("RemoveContainer");
    let remove_time = t2.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    while vcpu_threads(qpid).len() != 1 {
        if Instant::now() > deadline {
            let log = env.containerd.log_tail(300);
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| {
                    l.contains("resize")
                        || l.contains("vCPU")
                        || l.contains("hot-plug")
                        || l.contains("unplug")
                })
                .collect();
            panic!(
                "vCPUs not unplugged within 30 s: {:?}\n{}",
                vcpu_threads(qpid),
                lines.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(sh(&mut env.cri, "nproc"), "1");
    assert_eq!(sh(&mut env.cri, "cat /sys/devices/system/cpu/online"), "0");
    assert_eq!(mem_total(&mut env.cri), mem1, "memory is not shrunk");
    eprintln!(
        "hot-plug figures (TCG): create with +2 vCPUs +768 MiB {create_time:?}, update +1 vCPU \
         {update_time:?}, stop+remove with 3 vCPUs unplugged {remove_time:?}; load {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let log = env.containerd.log_tail(400);
    for l in log
        .lines()
        .filter(|l| l.contains("VM resized") || l.contains("hot-plug done"))
    {
        eprintln!("{l}");
    }

    env.cri.teardown_pod(&pod_id).expect("teardown");
    wait_for("the pod's shim exits", Duration::from_secs(10), || {
        shims_of(&env.containerd).is_empty()
    });
    wait_no_qemu(qpid, Duration::from_secs(5));
    assert!(pod_vms().is_empty(), "{:?}", pod_vms());
}

/// `ctr run` of a pinned container (cpuset 0-1, quota 1 CPU: 1 vCPU pinned to CPU 0 at boot),
/// then the Task API's Update raising the quota to 2 CPUs: a second vCPU is hot-added, its
/// thread pinned to CPU 1 like a boot vCPU would be, online in the guest; lowering the quota
/// again unplugs it; nothing left after delete.
#[test]
fn ctr_task_update_hot_plugs_a_pinned_vcpu_and_unplugs_it() {
    let _slot = vm_slot();
    let env = Env::start();
    let c = &env.c;
    let id = unique_id("vmhpin");
    let rootfs = c.dir().join("rootfs-hp");
    unpack_busybox_rootfs(&rootfs).unwrap();
    let mut spec = base_spec(c, &id, &rootfs, &["sleep", "1000"]);
    spec["linux"]["resources"]["cpu"] =
        serde_json::json!({"cpus": "0-1", "quota": 100000, "period": 100000});
    let path = c.dir().join(format!("{id}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    let rt = runtime();
    let mut args = vec!["run", "-d", "--runtime", &rt];
    args.extend(env.args(&["--config", path.to_str().unwrap()]));
    args.push(id.as_str());
    c.ctr_ok(&args);
    c.wait_task_status(&id, "RUNNING", Duration::from_secs(10));
    let pid = c.task_pid(&id);
    assert_eq!(arg_after(&qemu_args(pid), "-smp"), "1,maxcpus=2");
    assert_eq!(
        vcpu_threads(pid),
        vec![("CPU 0/TCG".to_string(), "0".to_string())]
    );
    let nproc = || {
        let o = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            &unique_id("np"),
            &id,
            "sh",
            "-c",
            "nproc; cat /sys/devices/system/cpu/online",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(nproc(), "1\n0\n");

    let t0 = Instant::now();
    task_update(
        c,
        &id,
        serde_json::json!({"cpu": {"quota": 200000, "period": 100000}}),
    );
    let add_time = t0.elapsed();
    assert_eq!(
        vcpu_threads(pid),
        vec![
            ("CPU 0/TCG".to_string(), "0".to_string()),
            ("CPU 1/TCG".to_string(), "1".to_string())
        ],
        "the hot-added vCPU's thread is pinned to the cpuset's second CPU"
    );
    assert_eq!(nproc(), "2\n0-1\n");

    let t1 = Instant::now();
    task_update(
        c,
        &id,
        serde_json::json!({"cpu": {"quota": 100000, "period": 100000}}),
    );
    let remove_time = t1.elapsed();
    assert_eq!(vcpu_threads(pid).len(), 1, "{:?}", vcpu_threads(pid));
    assert_eq!(nproc(), "1\n0\n");
    eprintln!(
        "pinned vCPU hot-add {add_time:?}, unplug {remove_time:?} (TCG; load {})",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    c.wait_task_status(&id, "STOPPED", Duration::from_secs(10));
    c.ctr_ok(&["task", "delete", &id]);
    c.ctr_ok(&["container", "rm", &id]);
    wait_no_qemu(pid, Duration::from_secs(10));
    c.assert_no_leaks(&[&id]);
    assert!(qemus_of(&id).is_empty(), "{:?}", qemus_of(&id));
}

/// containerd restarts (an upgrade, a crash) while a VM pod runs: the pod's shim and VM keep
/// running, containerd reconnects to the shim, and the pod is driven as before: status, exec,
/// the container's log (its stdout, which the shim keeps forwarding from the guest) goes on,
/// teardown removes the VM.
#[test]
fn cri_vm_pod_keeps_running_across_a_containerd_restart() {
    use tandem_tests::cri::ContainerSpec;
    let _slot = vm_slot();
    let (mut env, _cache) = cri_vm_env("");
    let spec = vm_pod_spec(&env, "vmrestart");
    let (pod_id, pod_cfg) = env.cri.run_pod(&spec).expect("RunPodSandbox");
    let cid = env
        .cri
        .create_container(
            &pod_id,
            &pod_cfg,
            &ContainerSpec {
                name: "ticker".into(),
                image: BUSYBOX.into(),
                command: [
                    "sh",
                    "-c",
                    "i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect(),
                ..Default::default()
            },
        )
        .expect("CreateContainer");
    env.cri.start_container(&cid).expect("StartContainer");
    let log = spec.log_dir.join("ticker.log");
    let ticks = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("tick "))
            .count()
    };
    wait_for("the container logs ticks", Duration::from_secs(30), || {
        ticks() >= 2
    });
    let vms = qemus_of(&pod_id);
    assert_eq!(vms.len(), 1, "one VM for the pod: {vms:?}");
    let qemu = vms[0].0;
    let sock = env.containerd.socket.to_string_lossy().into_owned();
    let shims = || -> Vec<i32> {
        processes_matching(&sock)
            .into_iter()
            .filter(|(_, c)| c.contains("containerd-shim-tandem-v2"))
            .map(|(p, _)| p)
            .collect()
    };
    let before = shims();
    assert_eq!(before.len(), 1, "one shim for the pod: {before:?}");

    env.restart_containerd().expect("restart containerd");

    assert_eq!(shims(), before, "the same shim survived the restart");
    assert_eq!(
        qemus_of(&pod_id)
            .iter()
            .map(|(p, _)| *p)
            .collect::<Vec<_>>(),
        vec![qemu],
        "the same VM survived the restart"
    );
    let cs = env
        .cri
        .container_status(&cid)
        .expect("ContainerStatus after restart");
    assert_eq!(cs.state, 1, "still running after the restart: {cs:?}");
    let r = env
        .cri
        .exec_sync(&cid, &["sh", "-c", "echo again; uname -r"])
        .expect("ExecSync after restart");
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        format!("again\n{}\n", guest().release)
    );
    let n = ticks();
    wait_for(
        "the container's log goes on after the restart",
        Duration::from_secs(30),
        || ticks() >= n + 2,
    );
    env.cri.teardown_pod(&pod_id).expect("teardown");
    wait_no_qemu(qemu, Duration::from_secs(20));
    wait_for("the pod's shim exits", Duration::from_secs(10), || {
        shims().is_empty()
    });
}

/// A container of a VM pod killed by the guest's OOM killer (its memory limit is its cgroup's
/// in the guest) ends as kubelet expects: exit code 137 and the reason `OOMKilled` (the shim's
/// TaskOOM event, from the guest cgroup's OOM kill count); a container that dies of SIGKILL
/// without an OOM kill has the same exit code and the reason `Error`.
#[test]
fn cri_vm_container_killed_by_the_guest_oom_killer_is_oomkilled() {
    use tandem_tests::cri::ContainerSpec;
    let _slot = vm_slot();
    let (mut env, _cache) = cri_vm_env("");
    let spec = vm_pod_spec(&env, "vmoom");
    let (pod_id, pod_cfg) = env.cri.run_pod(&spec).expect("RunPodSandbox");
    let run = |env: &mut tandem_tests::cri::CriEnv, name: &str, limit: i64, script: &str| {
        let cid = env
            .cri
            .create_container(
                &pod_id,
                &pod_cfg,
                &ContainerSpec {
                    name: name.into(),
                    image: BUSYBOX.into(),
                    command: ["sh", "-c", script].iter().map(|s| s.to_string()).collect(),
                    memory_limit: limit,
                    ..Default::default()
                },
            )
            .expect("CreateContainer");
        env.cri.start_container(&cid).expect("StartContainer");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let cs = env.cri.container_status(&cid).expect("ContainerStatus");
            if cs.state == 2 {
                break cs;
            }
            assert!(Instant::now() < deadline, "{name} still running: {cs:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // busybox tail keeps a line without a newline whole: 64 MiB against a 32 MiB limit
    let cs = run(
        &mut env,
        "hog",
        32 << 20,
        "head -c 67108864 /dev/zero | tail",
    );
    assert_eq!(
        (cs.exit_code, cs.reason.as_str()),
        (137, "OOMKilled"),
        "{cs:?}"
    );
    // (pid 1 of its PID namespace ignores its own SIGKILL: a child shell kills itself; not the
    // last command, or busybox sh would exec it as pid 1)
    let cs = run(&mut env, "killed", 0, "sh -c 'kill -9 $$'; exit $?");
    assert_eq!((cs.exit_code, cs.reason.as_str()), (137, "Error"), "{cs:?}");
    let qemu = qemus_of(&pod_id)[0].0;
    env.cri.teardown_pod(&pod_id).expect("teardown");
    wait_no_qemu(qemu, Duration::from_secs(20));
}
