//! VM pod start to container running, next to a bare QEMU boot of the same guest to its agent
//! being ready, on this machine.
//!
//! ```text
//! TANDEM_BIN_DIR=<dir of containerd-shim-tandem-v2> cargo run --release -p tandem-tests \
//!     --example vm_bench -- [runs (default 5)] [accel (default tcg)]
//! ```
//!
//! - VM pod: `ctr run -d --runtime io.containerd.tandem.v2 --runtime-config-path <vm config>
//!   busybox <id> sleep 1000` until it returns (the task is started: VM booted, agent answered,
//!   layer disk attached, container created and started in the guest), then the pod is removed.
//!   One warm-up run first (it makes the layer's erofs image; later runs find it cached).
//! - Bare boot: `qemu-system-x86_64` with the same kernel and initramfs (q35, 1 vCPU, 512 MiB,
//!   the agent's virtio-serial port), from spawn until the agent logs "serving the agent API" on
//!   the serial console, then killed.
//!
//! The two are interleaved (pod start, bare boot, pod start, ...) so that both see the same load.
//! Prints each run, the medians, their ratio and the median of the per-pair ratios. The guest
//! image comes from vmm/guest/build.sh (cached; `TANDEM_GUEST_DIR` picks another image dir).
//!
//! With `VM_BENCH_BREAKDOWN=1`, each pod start also prints the shim's log lines of that start
//! (containerd's log, wall clock) and the guest console (the agent's lines carry guest uptime).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tandem_tests::*;

fn guest_env() -> (PathBuf, PathBuf) {
    let g = tandem_agent::guest_image::build(&workspace_dir(), false)
        .unwrap_or_else(|e| panic!("guest image: {e}"));
    (g.kernel, g.initrd)
}

/// The guest console of the VM whose run dir (under `run_root`) names the pod `id`.
fn console_of(run_root: &Path, id: &str) -> String {
    let short: String = id.chars().take(12).collect();
    std::fs::read_dir(run_root)
        .into_iter()
        .flatten()
        .flatten()
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .ends_with(&format!("-{short}"))
        })
        .and_then(|e| std::fs::read_to_string(e.path().join("console.log")).ok())
        .unwrap_or_default()
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Spawn to "serving the agent API" on the console; with `breakdown`, also prints that line (it
/// carries the guest's uptime, to compare with the pod's).
fn bare_boot(kernel: &Path, initrd: &Path, accel: &str, breakdown: bool) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let socket = dir.path().join("agent.sock");
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", accel, "-M", "q35", "-m", "512", "-smp", "1"])
        .args(["-nographic", "-no-reboot", "-nodefaults"])
        .args(["-serial", &format!("file:{}", console.display())])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .args(["-device", "virtio-serial-pci,id=vser0"])
        .args([
            "-chardev",
            &format!(
                "socket,path={},server=on,wait=off,id=agent",
                socket.display()
            ),
        ])
        .args([
            "-device",
            "virtserialport,bus=vser0.0,chardev=agent,name=tandem.agent",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu-system-x86_64");
    let deadline = started + Duration::from_secs(120);
    let took = loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("serving the agent API") {
            let took = started.elapsed();
            if breakdown {
                for l in text.lines().filter(|l| l.contains("INFO")) {
                    println!("bare boot console: {l}");
                }
            }
            break took;
        }
        assert!(Instant::now() < deadline, "guest not ready: {text}");
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = child.kill();
    let _ = child.wait();
    took
}

fn main() {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let accel = args.next().unwrap_or_else(|| "tcg".into());
    let (kernel, initrd) = guest_env();
    let breakdown = std::env::var("VM_BENCH_BREAKDOWN").is_ok_and(|v| v == "1");
    let cache = tempfile::tempdir().unwrap();
    let run_root = tempfile::tempdir().unwrap();
    let toml = format!(
        "mode = \"vm\"\n[vm]\naccel = \"{accel}\"\nkernel = \"{}\"\ninitrd = \"{}\"\nlayer_cache = \"{}\"\nrun_dir = \"{}\"\n",
        kernel.display(),
        initrd.display(),
        cache.path().display(),
        run_root.path().display()
    );
    let c = Containerd::start(Some(&toml)).expect("start containerd");
    c.import_busybox();
    let cfg = c.runtime_config.clone().unwrap();
    let cfg = cfg.to_str().unwrap();
    let rt = runtime();
    let mut pod = Vec::new();
    let mut bare = Vec::new();
    for i in 0..=runs {
        let id = unique_id("vmbench");
        let log_from = c.log().len();
        let t = Instant::now();
        c.ctr_ok(&[
            "run",
            "-d",
            "--runtime",
            &rt,
            "--runtime-config-path",
            cfg,
            BUSYBOX,
            &id,
            "sleep",
            "1000",
        ]);
        let took = t.elapsed();
        if breakdown {
            println!("--- containerd's log (the shim's lines) of {id}:");
            println!("{}", &c.log()[log_from..]);
            println!(
                "--- guest console of {id}:\n{}",
                console_of(run_root.path(), &id)
            );
        }
        c.remove(&id);
        if i == 0 {
            println!("VM pod start, warm-up (layer image made): {took:?}");
            continue;
        }
        println!("VM pod start to container running, run {i}: {took:?}");
        pod.push(took);
        let took = bare_boot(&kernel, &initrd, &accel, breakdown);
        println!("bare QEMU boot to agent ready, run {i}: {took:?}");
        bare.push(took);
    }
    drop(c);
    // Each pod start and the bare boot right after it saw the same host: the median of those
    // pairs' ratios is less moved by the host's drifts than the ratio of the two medians.
    let mut pairs: Vec<f64> = pod
        .iter()
        .zip(&bare)
        .map(|(p, b)| p.as_secs_f64() / b.as_secs_f64())
        .collect();
    pairs.sort_by(f64::total_cmp);
    let (p, b) = (median(&mut pod), median(&mut bare));
    println!(
        "accelerator {accel}: median VM pod start {p:?}, median bare boot {b:?}, ratio {:.2} \
         (median of the {} paired ratios {:.2})",
        p.as_secs_f64() / b.as_secs_f64(),
        pairs.len(),
        pairs[pairs.len() / 2]
    );
}
