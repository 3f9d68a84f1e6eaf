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
//! Prints each run and the medians. The guest image comes from vmm/guest/build.sh (guest.env).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tandem_tests::*;

fn guest_env() -> (PathBuf, PathBuf) {
    let env = workspace_dir().join(".tandem-build/guest/guest.env");
    let text = std::fs::read_to_string(&env)
        .unwrap_or_else(|e| panic!("{}: {e} (run vmm/guest/build.sh)", env.display()));
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{}: no {k}=", env.display()))
            .into()
    };
    (get("KERNEL"), get("INITRD"))
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn bare_boot(kernel: &Path, initrd: &Path, accel: &str) -> Duration {
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
            break started.elapsed();
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
    let cache = tempfile::tempdir().unwrap();
    let toml = format!(
        "mode = \"vm\"\n[vm]\naccel = \"{accel}\"\nkernel = \"{}\"\ninitrd = \"{}\"\nlayer_cache = \"{}\"\n",
        kernel.display(),
        initrd.display(),
        cache.path().display()
    );
    let c = Containerd::start(Some(&toml)).expect("start containerd");
    c.import_busybox();
    let cfg = c.runtime_config.clone().unwrap();
    let cfg = cfg.to_str().unwrap();
    let rt = runtime();
    let mut pod = Vec::new();
    for i in 0..=runs {
        let id = unique_id("vmbench");
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
        c.remove(&id);
        if i == 0 {
            println!("VM pod start, warm-up (layer image made): {took:?}");
        } else {
            println!("VM pod start to container running, run {i}: {took:?}");
            pod.push(took);
        }
    }
    drop(c);
    let mut bare = Vec::new();
    for i in 1..=runs {
        let took = bare_boot(&kernel, &initrd, &accel);
        println!("bare QEMU boot to agent ready, run {i}: {took:?}");
        bare.push(took);
    }
    let (p, b) = (median(&mut pod), median(&mut bare));
    println!(
        "accelerator {accel}: median VM pod start {p:?}, median bare boot {b:?}, ratio {:.2}",
        p.as_secs_f64() / b.as_secs_f64()
    );
}
