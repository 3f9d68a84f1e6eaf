//! The agent's API served on a host unix socket (`tandem-agent --listen`): the same server code
//! as in the guest, without a VM, so it runs fast.

mod common;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tandem_agent::client::{AgentClient, Command};
use tandem_agent::Error;

struct Agent {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent() -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_tandem-agent"))
        .arg("--listen")
        .arg(&socket)
        .arg("--root")
        .arg(dir.path().join("root"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "agent made no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    Agent {
        child,
        socket,
        _dir: dir,
    }
}

/// The socket file exists from bind(), before listen(): a connect in between is refused, so
/// retry (bounded) on a loaded machine.
fn connect(p: &Path) -> AgentClient {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match AgentClient::connect(p, Duration::from_secs(5)) {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect {}: {e}; retrying", p.display());
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("connect {}: {e}", p.display()),
        }
    }
}

#[test]
fn version_ping_and_commands() {
    let agent = start_agent();
    let c = connect(&agent.socket);
    let v = c.version().unwrap();
    let host = nix::sys::utsname::uname()
        .unwrap()
        .release()
        .to_string_lossy()
        .into_owned();
    assert_eq!(v.kernel_release, host);
    assert_eq!(v.api_version, 1);
    c.ping(42).unwrap();

    let out = c
        .run_command(&Command {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "read x; echo \"got $x $FOO\"; echo e >&2; exit 3".into(),
            ],
            env: vec!["FOO=bar".into()],
            stdin: b"hello\n".to_vec(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(out.exit_code, Some(3));
    assert_eq!(out.stdout, b"got hello bar\n");
    assert_eq!(out.stderr, b"e\n");
    assert!(!out.stdout_truncated && !out.timed_out);

    // Output is bounded.
    let out = c
        .run_command(&Command {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "head -c 100000 /dev/zero".into(),
            ],
            max_output: 1000,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(out.stdout.len(), 1000);
    assert!(out.stdout_truncated);

    // A command that outlives its limit is killed, with its children.
    let started = Instant::now();
    let out = c
        .run_command(&Command {
            argv: vec!["/bin/sh".into(), "-c".into(), "sleep 30 & sleep 30".into()],
            timeout: Duration::from_millis(300),
            ..Default::default()
        })
        .unwrap();
    assert!(out.timed_out);
    assert_eq!(out.signal, Some(libc::SIGKILL));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // Bad requests are refused with a message naming the problem.
    let err = c
        .run_command(&Command {
            argv: vec!["sh".into()],
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("RunCommand") && err.contains("\"sh\""),
        "{err}"
    );
    let err = c
        .run_command(&Command {
            argv: vec!["/nonexistent/bin".into()],
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/bin"), "{err}");
}

#[test]
fn bad_container_requests_are_refused_and_leave_nothing() {
    let agent = start_agent();
    let c = connect(&agent.socket);
    let spec = common::busybox_spec(&["/bin/busybox", "true"]);
    let err = c
        .create_container("../x", &spec, &[], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"../x\""), "{err}");
    let err = c
        .create_container("c1", b"{not json", &[], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("c1") && err.contains("config.json"), "{err}");
    let bad_mount = tandem_agent::client::Mount {
        fstype: "bind".into(),
        source: "/nonexistent/rootfs".into(),
        target: "rootfs".into(),
        options: vec!["rbind".into()],
    };
    let err = c
        .create_container("c1", &spec, &[bad_mount], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/rootfs"), "{err}");
    let escaping = tandem_agent::client::Mount {
        target: "../../etc".into(),
        ..Default::default()
    };
    let err = c
        .create_container("c1", &spec, &[escaping], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("../../etc"), "{err}");
    let bundles = agent._dir.path().join("root/bundles");
    let left: Vec<_> = std::fs::read_dir(&bundles)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    let err = c
        .wait_process("nope", "", Duration::from_secs(1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope") && err.contains("not found"), "{err}");
    // The connection still works afterwards.
    c.ping(1).unwrap();
}

#[test]
fn container_lifecycle_on_the_host() {
    let agent = start_agent();
    let c = connect(&agent.socket);
    let rootfs = agent._dir.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::create_dir_all(rootfs.join("proc")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    let id = format!("tandem-agent-test-{}", std::process::id());
    // Should an assertion fail half way, remove the container before the agent is killed, so
    // that no mount, cgroup or process is left on the host.
    struct Cleanup<'a>(&'a AgentClient, &'a str);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let _ = self.0.remove_container(self.1);
            }
        }
    }
    let _cleanup = Cleanup(&c, &id);
    common::container_lifecycle(&c, &id, rootfs.to_str().unwrap());
    let bundle = agent._dir.path().join("root/bundles").join(&id);
    assert!(!bundle.exists(), "bundle {} left behind", bundle.display());
    assert!(!agent._dir.path().join("root/state").join(&id).exists());
}
#[test]
fn shutdown_ends_the_agent() {
    let mut agent = start_agent();
    let c = connect(&agent.socket);
    c.shutdown().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(s) = agent.child.try_wait().unwrap() {
            assert!(s.success(), "{s}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent still running after Shutdown"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn unanswered_socket_times_out_with_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    // Accept and read, never answer: what an agent that hangs looks like.
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut sink);
    });
    let c = AgentClient::connect(&path, Duration::from_millis(500)).unwrap();
    let started = Instant::now();
    let err = c.version().unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
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
    assert!(err.to_string().contains("silent.sock"), "{err}");
}

/// A process with a terminal: the engine's pty master is pumped as stdout (stderr is empty),
/// stdin writes go to the master (the tty echoes them), ResizePty sets the window size the
/// process sees; a process without a terminal refuses ResizePty naming it.
#[test]
fn terminal_exec_output_stdin_and_resize() {
    use tandem_agent::client::Mount;
    let agent = start_agent();
    let c = connect(&agent.socket);
    let rootfs = agent._dir.path().join("rootfs");
    for d in ["bin", "proc", "dev"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    let id = format!("tandem-agent-tty-{}", std::process::id());
    struct Cleanup<'a>(&'a AgentClient, &'a str);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = self.0.signal_process(self.1, "", 9, true);
            let _ = self.0.wait_process(self.1, "", Duration::from_secs(5));
            let _ = self.0.remove_container(self.1);
        }
    }
    let mut spec: serde_json::Value =
        serde_json::from_slice(&common::busybox_spec(&["/bin/busybox", "sleep", "600"])).unwrap();
    spec["mounts"] = serde_json::json!([
        { "destination": "/proc", "type": "proc", "source": "proc" },
        { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"] },
        { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
          "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] }
    ]);
    let rootfs_m = [Mount {
        fstype: "bind".into(),
        source: rootfs.to_str().unwrap().into(),
        target: "rootfs".into(),
        options: vec!["rbind".into()],
    }];
    c.create_container(&id, &serde_json::to_vec(&spec).unwrap(), &rootfs_m, false)
        .expect("CreateContainer");
    let _cleanup = Cleanup(&c, &id);
    c.start_container(&id).expect("StartContainer");
    let err = c.resize_pty(&id, "", 80, 24).unwrap_err().to_string();
    assert!(
        err.contains("FAILED_PRECONDITION") && err.contains("no terminal") && err.contains(&id),
        "{err}"
    );
    let mut p: serde_json::Value = serde_json::from_slice(&common::busybox_process(&[
        "/bin/busybox",
        "sh",
        "-c",
        "/bin/busybox tty; read x; echo got:$x; echo size=$(/bin/busybox stty size); exit 4",
    ]))
    .unwrap();
    p["terminal"] = serde_json::Value::Bool(true);
    c.exec_process(&id, "t1", &serde_json::to_vec(&p).unwrap(), false)
        .expect("ExecProcess with a terminal");
    c.resize_pty(&id, "t1", 100, 30).expect("ResizePty");
    c.write_stdin(&id, "t1", b"hi\n")
        .expect("WriteStdin to the pty");
    let t = Duration::from_secs(20);
    assert_eq!(c.wait_process(&id, "t1", t).expect("WaitProcess").status, 4);
    let out = String::from_utf8(common::read_all(&c, &id, "t1", false, t)).unwrap();
    let lines: Vec<&str> = out.lines().map(|l| l.trim_end_matches('\r')).collect();
    assert!(lines.iter().any(|l| l.starts_with("/dev/pts/")), "{out:?}");
    assert!(lines.contains(&"hi"), "the tty echoes stdin: {out:?}");
    assert!(lines.contains(&"got:hi"), "{out:?}");
    assert!(lines.contains(&"size=30 100"), "{out:?}");
    assert!(common::read_all(&c, &id, "t1", true, t).is_empty());
}

/// CreateContainer with `files`: the agent writes them under `<bundle>/files` (mode as given)
/// and the spec bind-mounts one read-only into the container; bad files are refused naming
/// them, with nothing left. UpdateContainer applies a memory limit to the container's cgroup
/// (the host's here: v1 memory or cgroup2) through the engine; bad JSON is INVALID_ARGUMENT.
#[test]
fn files_into_the_bundle_and_update_of_resources() {
    use tandem_agent::client::{File, Mount};
    let agent = start_agent();
    let c = connect(&agent.socket);
    let rootfs = agent._dir.path().join("rootfs");
    for d in ["bin", "proc", "etc"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    let id = format!("tandem-agent-files-{}", std::process::id());
    let bundles = agent._dir.path().join("root/bundles");
    let bundle = bundles.join(&id);
    struct Cleanup<'a>(&'a AgentClient, &'a str);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = self.0.signal_process(self.1, "", 9, true);
            let _ = self.0.wait_process(self.1, "", Duration::from_secs(5));
            let _ = self.0.remove_container(self.1);
        }
    }
    let cgroup = format!("/tandem-agent-files-{}", std::process::id());
    let mut spec: serde_json::Value =
        serde_json::from_slice(&common::busybox_spec(&["/bin/busybox", "sleep", "600"])).unwrap();
    spec["linux"]["cgroupsPath"] = cgroup.clone().into();
    spec["linux"]["resources"] = serde_json::json!({"memory": {"limit": 67108864}});
    spec["mounts"] = serde_json::json!([
        { "destination": "/proc", "type": "proc", "source": "proc" },
        { "destination": "/etc/hosts", "type": "bind",
          "source": bundle.join("files/0-etc-hosts"), "options": ["rbind", "ro"] }
    ]);
    let spec = serde_json::to_vec(&spec).unwrap();
    let rootfs_m = [Mount {
        fstype: "bind".into(),
        source: rootfs.to_str().unwrap().into(),
        target: "rootfs".into(),
        options: vec!["rbind".into()],
    }];
    let hosts = b"127.0.0.1 localhost\n198.18.0.7 files-test\n".to_vec();
    let files = [
        File {
            path: "0-etc-hosts".into(),
            content: hosts.clone(),
            mode: 0o644,
        },
        File {
            path: "sub/x".into(),
            content: b"x".to_vec(),
            mode: 0o600,
        },
    ];

    // refused before anything is made: an escaping path, a file over the limit
    for (bad, want) in [
        (
            File {
                path: "../escape".into(),
                ..Default::default()
            },
            "\"../escape\"",
        ),
        (
            File {
                path: "big".into(),
                content: vec![0; tandem_agent::containers::MAX_FILE_BYTES + 1],
                mode: 0o644,
            },
            "65537 bytes",
        ),
    ] {
        let e = c
            .create_container_with_files(&id, &spec, &rootfs_m, &[bad], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want) && e.contains(&id), "{e}");
    }
    // files written, then a rootfs mount fails: nothing left (files, bundle)
    let bad_rootfs = [Mount {
        source: "/nonexistent/rootfs".into(),
        ..rootfs_m[0].clone()
    }];
    let e = c
        .create_container_with_files(&id, &spec, &bad_rootfs, &files, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&id) && e.contains("/nonexistent/rootfs"), "{e}");
    assert!(!bundle.exists(), "bundle left after a failed create");
    assert!(!agent._dir.path().join("escape").exists());

    c.create_container_with_files(&id, &spec, &rootfs_m, &files, false)
        .expect("CreateContainer with files");
    let _cleanup = Cleanup(&c, &id);
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&bundle.join("files/0-etc-hosts")), 0o644);
    assert_eq!(mode(&bundle.join("files/sub/x")), 0o600);
    c.start_container(&id).expect("StartContainer");
    let t = Duration::from_secs(20);
    let p = common::busybox_process(&[
        "/bin/busybox",
        "sh",
        "-c",
        "/bin/busybox cat /etc/hosts; echo new >> /etc/hosts && echo writable",
    ]);
    c.exec_process(&id, "cat", &p, false).expect("ExecProcess");
    assert_eq!(c.wait_process(&id, "cat", t).unwrap().status, 1);
    assert_eq!(common::read_all(&c, &id, "cat", false, t), hosts);

    // UpdateContainer: the memory limit lands in the container's cgroup
    let v1 = Path::new("/sys/fs/cgroup/memory").is_dir();
    let limit_file = if v1 {
        format!("/sys/fs/cgroup/memory{cgroup}/memory.limit_in_bytes")
    } else {
        format!("/sys/fs/cgroup{cgroup}/memory.max")
    };
    let read_limit = || {
        std::fs::read_to_string(&limit_file)
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(read_limit(), "67108864");
    c.update_container(&id, br#"{"memory":{"limit":134217728}}"#)
        .expect("UpdateContainer");
    assert_eq!(read_limit(), "134217728");
    let e = c
        .update_container(&id, br#"{"memory":{"limit":"lots"}}"#)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("INVALID_ARGUMENT") && e.contains("LinuxResources") && e.contains(&id),
        "{e}"
    );
    let e = c
        .update_container("nope", br#"{"memory":{"limit":134217728}}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("NOT_FOUND") && e.contains("nope"), "{e}");
    let e = c
        .update_container(
            &id,
            &vec![b' '; tandem_agent::containers::MAX_RESOURCES_JSON + 1],
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("not sent"), "{e}");
    assert_eq!(read_limit(), "134217728");

    c.signal_process(&id, "", 9, true).unwrap();
    c.wait_process(&id, "", t).unwrap();
    c.remove_container(&id).expect("RemoveContainer");
    assert!(!bundle.exists());
    assert!(
        !Path::new(&limit_file).exists(),
        "cgroup left: {limit_file}"
    );
}
