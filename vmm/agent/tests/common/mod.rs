//! Test support: the guest image from vmm/guest/build.sh and a minimal QEMU (TCG) launcher with
//! a guard that kills QEMU whatever happens.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use tandem_agent::guest_image::GuestImage as Guest;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Build (or reuse the cache of) the guest image; `no_agent` builds the variant without agent.
pub fn guest(no_agent: bool) -> Guest {
    tandem_agent::guest_image::build(&repo_root(), no_agent).unwrap_or_else(|e| panic!("{e}"))
}

/// One QEMU run at a time: TCG is CPU-heavy and the machine small.
pub fn qemu_slot() -> std::sync::MutexGuard<'static, ()> {
    static SLOT: OnceLock<Mutex<()>> = OnceLock::new();
    SLOT.get_or_init(|| Mutex::new(()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// A QEMU process; killed and reaped on drop.
pub struct Qemu {
    child: Option<Child>,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
    pub started: Instant,
}

impl Qemu {
    /// Start QEMU (TCG, q35) with the agent's virtio-serial port on a unix socket.
    pub fn start(kernel: &Path, initrd: &Path) -> Result<Qemu, String> {
        Self::start_with(kernel, initrd, "", &[])
    }

    /// As [`Qemu::start`], with `extra` appended to the kernel command line.
    pub fn start_with(
        kernel: &Path,
        initrd: &Path,
        extra: &str,
        extra_args: &[String],
    ) -> Result<Qemu, String> {
        for (what, p) in [("kernel", kernel), ("initrd", initrd)] {
            if !p.is_file() {
                return Err(format!("{what} {}: no such file", p.display()));
            }
        }
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let socket = dir.path().join("agent.sock");
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-M",
                "q35",
                "-m",
                "512",
                "-smp",
                "1",
                "-nographic",
                "-no-reboot",
                "-nodefaults",
            ])
            .args([
                "-serial",
                &format!("file:{}", dir.path().join("console.log").display()),
            ])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", &format!("console=ttyS0 quiet panic=-1 {extra}")])
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
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn qemu-system-x86_64: {e}"))?;
        let mut q = Qemu {
            child: Some(child),
            socket,
            dir,
            started: Instant::now(),
        };
        // The socket is ready once QEMU listens on it: it binds (the file appears) before it
        // listens, and a connect in between is refused (seen once in CI), so wait for the
        // listening entry in /proc/net/unix, not for the file.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !listening(&q.socket) {
            if let Some(status) = q.try_wait() {
                return Err(format!("qemu exited early ({status}): {}", q.stderr()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "qemu did not listen on {} within 10 s",
                    q.socket.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(q)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Wait for QEMU to exit by itself, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(e) = self.child.as_mut().and_then(|c| c.stderr.as_mut()) {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn pid_alive(pid: u32) -> bool {
    // A reaped pid has no /proc entry (unless reused, unlikely within a test).
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A minimal OCI spec running `args` with busybox in `rootfs` (pid, mount, ipc, uts namespaces).
pub fn busybox_spec(args: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_KILL", "CAP_SETUID", "CAP_SETGID"],
                "effective": ["CAP_KILL", "CAP_SETUID", "CAP_SETGID"],
                "permitted": ["CAP_KILL", "CAP_SETUID", "CAP_SETGID"]
            }
        },
        "root": { "path": "rootfs", "readonly": false },
        "hostname": "tandem-c",
        "mounts": [ { "destination": "/proc", "type": "proc", "source": "proc" } ],
        "linux": {
            "namespaces": [ { "type": "pid" }, { "type": "mount" }, { "type": "ipc" }, { "type": "uts" } ]
        }
    }))
    .unwrap()
}

/// An OCI process object running `args`.
pub fn busybox_process(args: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "terminal": false,
        "user": { "uid": 0, "gid": 0 },
        "args": args,
        "env": ["PATH=/bin"],
        "cwd": "/"
    }))
    .unwrap()
}

/// Everything a process wrote on stdout (or stderr) until EOF, within `timeout`.
pub fn read_all(
    c: &tandem_agent::client::AgentClient,
    id: &str,
    exec_id: &str,
    stderr: bool,
    timeout: Duration,
) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut all = Vec::new();
    loop {
        let (data, eof) = c
            .read_output(id, exec_id, stderr, 64 * 1024, Duration::from_millis(500))
            .unwrap();
        all.extend(data);
        if eof {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "no EOF within {timeout:?}; got {:?}",
            String::from_utf8_lossy(&all)
        );
    }
}

/// The container lifecycle through the agent: create (rootfs bind-mounted from `rootfs_src`, a
/// directory holding bin/busybox), start, stdin, stdout/stderr, exec, stats, pause/resume,
/// kill, wait, remove. Returns after checking each step.
pub fn container_lifecycle(c: &tandem_agent::client::AgentClient, id: &str, rootfs_src: &str) {
    use tandem_agent::client::Mount;
    let t = Duration::from_secs(20);
    let spec = busybox_spec(&[
        "/bin/busybox",
        "sh",
        "-c",
        "read x; echo \"got $x in $(hostname)\"; echo err >&2; exec /bin/busybox sleep 600",
    ]);
    let rootfs = [Mount {
        fstype: "bind".into(),
        source: rootfs_src.into(),
        target: "rootfs".into(),
        options: vec!["rbind".into()],
    }];
    let pid = c
        .create_container(id, &spec, &rootfs, true)
        .expect("CreateContainer");
    assert!(pid > 1);
    // A second create with the same id is refused.
    let err = c
        .create_container(id, &spec, &rootfs, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains(id) && err.contains("exists"), "{err}");
    assert_eq!(c.start_container(id).expect("StartContainer"), pid);
    c.write_stdin(id, "", b"world\n").expect("WriteStdin");
    c.close_stdin(id, "").expect("CloseStdin");
    let mut out = Vec::new();
    let deadline = Instant::now() + t;
    while !out.ends_with(b"\n") {
        let (d, eof) = c
            .read_output(id, "", false, 4096, Duration::from_millis(500))
            .unwrap();
        out.extend(d);
        assert!(
            !eof && Instant::now() < deadline,
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }
    assert_eq!(String::from_utf8_lossy(&out), "got world in tandem-c\n");

    // An exec in the same container: same pid namespace (its init is pid 1 there).
    let p = busybox_process(&[
        "/bin/busybox",
        "sh",
        "-c",
        "echo exec: $(tr '\\0' ' ' < /proc/1/cmdline); exit 3",
    ]);
    c.exec_process(id, "e1", &p, false).expect("ExecProcess");
    assert_eq!(
        c.wait_process(id, "e1", t)
            .expect("WaitProcess exec")
            .status,
        3
    );
    assert_eq!(
        read_all(c, id, "e1", false, t),
        b"exec: /bin/busybox sleep 600\n"
    );

    let s = c.stats(id).expect("Stats");
    assert!(s.pids_current >= 1, "{s:?}");
    c.pause_container(id).expect("PauseContainer");
    c.resume_container(id).expect("ResumeContainer");

    c.signal_process(id, "", 9, false).expect("SignalProcess");
    let exit = c.wait_process(id, "", t).expect("WaitProcess");
    assert_eq!(exit.status, 137);
    assert!(exit.exited_at_unix_ns > 0);
    assert_eq!(read_all(c, id, "", true, t), b"err\n");
    c.remove_container(id).expect("RemoveContainer");
    let err = c.start_container(id).unwrap_err().to_string();
    assert!(err.contains("not found"), "{err}");
}

/// Whether a unix socket is bound at `path` and listening: /proc/net/unix lists it with the
/// `__SO_ACCEPTCON` flag (00010000) once listen() was called.
pub fn listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8
            && f[7] == want
            && u32::from_str_radix(f[3], 16).is_ok_and(|fl| fl & 0x10000 != 0)
    })
}
