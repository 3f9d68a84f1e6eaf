//! VM mode through a real containerd: each pod is a QEMU VM (TCG on this machine), its containers
//! run inside by the guest agent. The guest image comes from vmm/guest/build.sh (cached). Every
//! VM boot costs seconds under TCG, so assertions are grouped into few VMs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tandem_tests::*;

struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
    release: String,
}

/// The guest image (built once per test binary; build.sh caches across runs).
fn guest() -> &'static Guest {
    static G: OnceLock<Guest> = OnceLock::new();
    G.get_or_init(|| {
        let script = workspace_dir().join("vmm/guest/build.sh");
        let mut cmd = Command::new(&script);
        // Cargo's per-test environment would make the nested cargo build rebuild the agent.
        cmd.env_clear();
        for (k, v) in std::env::vars_os() {
            let ks = k.to_string_lossy();
            if matches!(
                ks.as_ref(),
                "PATH" | "HOME" | "CARGO_HOME" | "RUSTUP_HOME" | "RUSTUP_TOOLCHAIN" | "TMPDIR"
            ) || ks.starts_with("TANDEM_")
            {
                cmd.env(k, v);
            }
        }
        // the agent's own target dir unless the caller chose one
        let target = std::env::var_os("TANDEM_AGENT_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_dir().join("target-agent"));
        cmd.env("CARGO_TARGET_DIR", target);
        let out = cmd
            .stderr(Stdio::inherit())
            .output()
            .expect("run vmm/guest/build.sh");
        assert!(out.status.success(), "{} failed", script.display());
        let text = String::from_utf8(out.stdout).unwrap();
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("build.sh printed no {k}=: {text}"))
                .to_string()
        };
        Guest {
            kernel: get("KERNEL").into(),
            initrd: get("INITRD").into(),
            release: get("KERNEL_RELEASE"),
        }
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
        let cache = tempfile::Builder::new()
            .prefix("tandem-layers-")
            .tempdir_in("/tmp")
            .unwrap();
        let c = Containerd::start(Some(&vm_toml(kernel, initrd, cache.path())))
            .expect("start containerd");
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
