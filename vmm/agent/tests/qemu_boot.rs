//! Boot the real guest (Debian cloud kernel + initramfs with tandem-agent as /init) under QEMU
//! TCG and talk to the agent over the virtio-serial port. Needs root-free QEMU but network access
//! to a Debian mirror on the first run (build.sh downloads the kernel package).

mod common;

use std::time::{Duration, Instant};

use tandem_agent::client::{AgentClient, Command, Mount};
use tandem_agent::Error;

const BOOT_DEADLINE: Duration = Duration::from_secs(60);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn guest_boots_agent_answers_runs_command_and_powers_off() {
    let guest = common::guest(false);
    let _slot = common::qemu_slot();
    let mut qemu = common::Qemu::start(&guest.kernel, &guest.initrd).expect("start qemu");
    let pid = qemu.pid();
    let client = AgentClient::connect(&qemu.socket, CALL_TIMEOUT).expect("connect agent socket");

    let v = client
        .version_within(BOOT_DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nconsole:\n{}", qemu.console()));
    let boot = qemu.started.elapsed();
    eprintln!("agent answered {boot:?} after qemu start: {v:?}");
    assert_eq!(v.kernel_release, guest.release);
    assert!(
        v.kernel_release.starts_with("6.1.") && v.kernel_release.ends_with("-cloud-amd64"),
        "{v:?}"
    );
    let host = nix::sys::utsname::uname()
        .unwrap()
        .release()
        .to_string_lossy()
        .into_owned();
    assert_ne!(
        v.kernel_release, host,
        "the agent must report the guest's kernel, not the host's"
    );
    assert_eq!(v.agent_version, tandem_agent::AGENT_VERSION);
    client.ping(0x7a6e_6465_6d21).expect("ping");

    let out = client
        .run_command(&Command {
            argv: vec![
                "/bin/busybox".into(),
                "cat".into(),
                "/proc/cpuinfo".into(),
                "/proc/modules".into(),
            ],
            timeout: Duration::from_secs(10),
            ..Default::default()
        })
        .expect("run cat in the guest");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.exit_code,
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("processor\t: 0"), "{text}");
    assert!(
        !text.contains("processor\t: 1"),
        "-smp 1 guest shows one CPU: {text}"
    );
    for m in [
        "virtio_console",
        "virtio_pci",
        "overlay",
        "erofs",
        "vmw_vsock_virtio_transport",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{m} "))),
            "module {m} not loaded:\n{text}"
        );
    }

    // Exit status and stderr travel back; output beyond the bound is cut and flagged.
    let out = client
        .run_command(&Command {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo 0123456789; echo oops >&2; exit 7".into(),
            ],
            max_output: 4,
            ..Default::default()
        })
        .expect("run sh in the guest");
    assert_eq!(out.exit_code, Some(7));
    assert_eq!(out.stdout, b"0123");
    assert!(out.stdout_truncated);
    assert_eq!(out.stderr, b"oops");
    assert!(out.stderr_truncated);

    // A container inside the guest, run by tandem-oci through the agent: its rootfs is a
    // directory of the guest holding busybox, bind-mounted into the bundle by CreateContainer.
    let prep = client
        .run_command(&Command {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "mkdir -p /tmp/rootfs/bin /tmp/rootfs/proc && cp /bin/busybox /tmp/rootfs/bin/"
                    .into(),
            ],
            ..Default::default()
        })
        .expect("prepare a rootfs in the guest");
    assert_eq!(
        prep.exit_code,
        Some(0),
        "{}",
        String::from_utf8_lossy(&prep.stderr)
    );
    common::container_lifecycle(&client, "c1", "/tmp/rootfs");
    let left = client
        .run_command(&Command {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "ls /run/tandem/bundles /run/tandem/state; grep -c /run/tandem /proc/mounts".into(),
            ],
            ..Default::default()
        })
        .expect("look for leftovers");
    assert_eq!(
        String::from_utf8_lossy(&left.stdout),
        "/run/tandem/bundles:\n\n/run/tandem/state:\n0\n"
    );

    // The host side may go away and come back (a new session on the same port).
    drop(client);
    let client = AgentClient::connect(&qemu.socket, CALL_TIMEOUT).expect("reconnect");
    client.ping(7).expect("ping after reconnect");
    assert_eq!(
        client
            .version()
            .expect("version after reconnect")
            .kernel_release,
        guest.release
    );

    client.shutdown().expect("shutdown");
    let status = qemu.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| {
        panic!(
            "qemu did not exit after Shutdown\nconsole:\n{}",
            qemu.console()
        )
    });
    assert!(status.success(), "qemu exit status {status}");
    eprintln!("guest console:\n{}", qemu.console());
    drop(qemu);
    assert!(!common::pid_alive(pid));
}

#[test]
fn missing_kernel_is_a_clear_error() {
    let guest = common::guest(false);
    let missing = std::path::Path::new("/nonexistent/vmlinuz-tandem");
    let err = common::Qemu::start(missing, &guest.initrd)
        .err()
        .expect("must fail");
    assert!(
        err.contains("/nonexistent/vmlinuz-tandem") && err.contains("kernel"),
        "{err}"
    );
    // QEMU's own check, for a kernel file it cannot load: it exits by itself, with an error
    // naming the file, and the launcher reports it (early exit, or exit right after the socket).
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("vmlinuz-empty");
    std::fs::write(&empty, b"").unwrap();
    let _slot = common::qemu_slot();
    match common::Qemu::start(&empty, &guest.initrd) {
        Err(err) => assert!(
            err.contains("qemu exited early") && err.contains("vmlinuz-empty"),
            "{err}"
        ),
        Ok(mut qemu) => {
            let status = qemu
                .wait_exit(Duration::from_secs(10))
                .expect("qemu must exit by itself");
            assert!(!status.success());
            let stderr = qemu.stderr();
            assert!(stderr.contains("vmlinuz-empty"), "{stderr}");
        }
    }
}

#[test]
fn guest_without_agent_times_out_with_clear_error() {
    let guest = common::guest(true);
    let _slot = common::qemu_slot();
    let qemu = common::Qemu::start(&guest.kernel, &guest.initrd).expect("start qemu");
    let pid = qemu.pid();
    let client = AgentClient::connect(&qemu.socket, CALL_TIMEOUT).expect("connect agent socket");
    let started = Instant::now();
    let wait = Duration::from_secs(8);
    let err = client
        .version_within(wait)
        .expect_err("no agent, no answer");
    let took = started.elapsed();
    assert!(
        matches!(
            err,
            Error::Timeout {
                call: "Version",
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&qemu.socket.display().to_string()) && msg.contains("no reply"),
        "{msg}"
    );
    assert!(
        took >= wait && took < wait + Duration::from_secs(3),
        "took {took:?}"
    );
    drop(qemu);
    assert!(!common::pid_alive(pid), "qemu {pid} left behind");
}

/// The recommended rootfs path (docs/vm-mode.md): an image layer as an erofs image on a
/// read-only virtio-blk disk, stacked in the guest with overlay over a writable tmpfs, all mounted
/// by CreateContainer; writes land in the upper layer and the container sees them.
#[test]
fn container_rootfs_from_erofs_layer_and_overlay() {
    let guest = common::guest(false);
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("layer");
    for d in ["bin", "proc", "etc"] {
        std::fs::create_dir_all(layer.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", layer.join("bin/busybox")).unwrap();
    std::fs::write(layer.join("etc/marker"), b"from-erofs\n").unwrap();
    let image = dir.path().join("layer.erofs");
    let started = Instant::now();
    let st = std::process::Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(&image)
        .arg(&layer)
        .status()
        .expect("run mkfs.erofs (erofs-utils)");
    assert!(st.success(), "mkfs.erofs: {st}");
    eprintln!(
        "mkfs.erofs of a {} byte layer: {:?}",
        std::fs::metadata(layer.join("bin/busybox")).unwrap().len(),
        started.elapsed()
    );

    let _slot = common::qemu_slot();
    let disk = [
        "-drive".to_string(),
        format!(
            "file={},if=none,format=raw,readonly=on,id=layer0",
            image.display()
        ),
        "-device".to_string(),
        "virtio-blk-pci,drive=layer0,serial=layer0".to_string(),
    ];
    let mut qemu =
        common::Qemu::start_with(&guest.kernel, &guest.initrd, "", &disk).expect("start qemu");
    let client = AgentClient::connect(&qemu.socket, CALL_TIMEOUT).expect("connect agent socket");
    client
        .version_within(BOOT_DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nconsole:\n{}", qemu.console()));
    let serial = client
        .run_command(&Command {
            argv: vec![
                "/bin/busybox".into(),
                "cat".into(),
                "/sys/block/vda/serial".into(),
            ],
            ..Default::default()
        })
        .expect("read the disk serial");
    assert_eq!(
        serial.stdout, b"layer0",
        "the layer disk is found by its serial"
    );

    let id = "c2";
    let b = format!("/run/tandem/bundles/{id}");
    let mounts = [
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
    ];
    let spec = common::busybox_spec(&[
        "/bin/busybox",
        "sh",
        "-c",
        "cat /etc/marker; echo changed > /etc/marker; cat /etc/marker",
    ]);
    client
        .create_container(id, &spec, &mounts, false)
        .expect("CreateContainer on erofs + overlay");
    client.start_container(id).expect("StartContainer");
    assert_eq!(
        client
            .wait_process(id, "", Duration::from_secs(20))
            .expect("WaitProcess")
            .status,
        0
    );
    let out = common::read_all(&client, id, "", false, Duration::from_secs(10));
    assert_eq!(String::from_utf8_lossy(&out), "from-erofs\nchanged\n");
    // The write went to the upper layer; the erofs layer is unchanged.
    let check = client
        .run_command(&Command {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("cat {b}/rw/upper/etc/marker {b}/layers/0/etc/marker"),
            ],
            ..Default::default()
        })
        .expect("inspect the layers");
    assert_eq!(
        String::from_utf8_lossy(&check.stdout),
        "changed\nfrom-erofs\n"
    );
    client.remove_container(id).expect("RemoveContainer");
    let left = client
        .run_command(&Command {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "grep -c /run/tandem /proc/mounts; ls /run/tandem/bundles".into(),
            ],
            ..Default::default()
        })
        .expect("look for leftovers");
    assert_eq!(String::from_utf8_lossy(&left.stdout), "0\n");
    client.shutdown().expect("shutdown");
    let status = qemu
        .wait_exit(Duration::from_secs(30))
        .expect("qemu exits after Shutdown");
    assert!(status.success());
}
