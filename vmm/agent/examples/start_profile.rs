//! Where a container's start in the guest spends its time, under QEMU TCG (docs/vm-mode.md).
//! Usage: cargo run --release -p tandem-agent --example start_profile -- [runs]
//! (`EXTRA_CMDLINE` is appended to the guest kernel command line.)
//! Per run: boot to the first Version answer, then the time of each agent call of a pod start
//! (ConfigureNetwork with `lo` only, CreateContainer on an erofs layer + overlay, StartContainer,
//! WaitProcess), a second container's create, and a few guest-side probes (exec of a static
//! busybox, exec of the agent binary itself), all timed on the host around the call.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use tandem_agent::client::{AgentClient, Command, Mount};

fn mounts(id: &str) -> Vec<Mount> {
    let b = format!("/run/tandem/bundles/{id}");
    vec![
        Mount {
            fstype: "erofs".into(),
            source: "/dev/vda".into(),
            target: "layers/0".into(),
            options: vec!["ro".into()],
        },
        Mount {
            fstype: "tmpfs".into(),
            source: "tmpfs".into(),
            target: "rw".into(),
            options: vec!["mode=0755".into()],
        },
        Mount {
            fstype: "overlay".into(),
            source: "overlay".into(),
            target: "rootfs".into(),
            options: vec![format!(
                "lowerdir={b}/layers/0,upperdir={b}/rw/upper,workdir={b}/rw/work"
            )],
        },
    ]
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    println!("  {what:<34} {:>8.1} ms", t.elapsed().as_secs_f64() * 1e3);
    r
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let guest = common::guest(false);
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("layer");
    for d in ["bin", "proc", "etc", "dev", "sys", "tmp"] {
        std::fs::create_dir_all(layer.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", layer.join("bin/busybox")).unwrap();
    let image = dir.path().join("layer.erofs");
    let st = std::process::Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(&image)
        .arg(&layer)
        .status()
        .expect("mkfs.erofs");
    assert!(st.success());
    let disk = [
        "-drive".to_string(),
        format!(
            "file={},if=none,format=raw,readonly=on,id=layer0",
            image.display()
        ),
        "-device".to_string(),
        "virtio-blk-pci,drive=layer0,serial=layer0".to_string(),
    ];
    for run in 0..runs {
        println!("run {run}");
        let mut q = common::Qemu::start_with(
            &guest.kernel,
            &guest.initrd,
            &std::env::var("EXTRA_CMDLINE").unwrap_or_default(),
            &disk,
        )
        .expect("qemu");
        let c = AgentClient::connect(&q.socket, Duration::from_secs(30)).expect("connect");
        c.version_within(Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{e}\n{}", q.console()));
        println!(
            "  boot to Version {:>33.1} ms",
            q.started.elapsed().as_secs_f64() * 1e3
        );
        timed("Version (second)", || c.version().unwrap());
        timed("ConfigureNetwork (lo)", || {
            c.configure_network(&[], &[]).unwrap()
        });
        let spec = common::busybox_spec(&["/bin/busybox", "true"]);
        timed("CreateContainer c0", || {
            c.create_container("c0", &spec, &mounts("c0"), false)
                .unwrap_or_else(|e| panic!("{e}\n{}", q.console()))
        });
        timed("StartContainer c0", || c.start_container("c0").unwrap());
        timed("WaitProcess c0", || {
            c.wait_process("c0", "", Duration::from_secs(20)).unwrap()
        });
        let bind = vec![Mount {
            fstype: "bind".into(),
            source: "/run/tandem/bundles/c0/rootfs".into(),
            target: "rootfs".into(),
            options: vec!["rbind".into()],
        }];
        timed("CreateContainer c1 (bind rootfs)", || {
            c.create_container("c1", &spec, &bind, false).unwrap()
        });
        timed("StartContainer c1", || c.start_container("c1").unwrap());
        for (what, argv) in [
            ("exec busybox true", vec!["/bin/busybox", "true"]),
            ("exec agent (usage error)", vec!["/proc/1/exe", "--bogus"]),
        ] {
            timed(what, || {
                c.run_command(&Command {
                    argv: argv.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                })
                .unwrap()
            });
        }
        c.shutdown().ok();
        q.wait_exit(Duration::from_secs(30));
        let console = q.console();
        for l in console.lines().filter(|l| l.contains("INFO")) {
            println!("    {l}");
        }
    }
}
