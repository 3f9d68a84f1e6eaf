//! The agent's API served on a host unix socket (`tandem-agent --listen`): the same server code
//! as in the guest, without a VM, so it runs fast.

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

fn connect(p: &Path) -> AgentClient {
    AgentClient::connect(p, Duration::from_secs(5)).unwrap()
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
fn container_verbs_are_refused_as_unimplemented() {
    let agent = start_agent();
    let c = connect(&agent.socket);
    let raw = tandem_agent::proto::AgentClient::new(
        ttrpc::Client::connect(&format!("unix://{}", agent.socket.display())).unwrap(),
    );
    let err = raw
        .create_container(
            ttrpc::context::with_timeout(5_000_000_000),
            &Default::default(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("CreateContainer"), "{err}");
    // The connection still works afterwards.
    c.ping(1).unwrap();
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
