//! Test support: the guest image from vmm/guest/build.sh and a minimal QEMU (TCG) launcher with
//! a guard that kills QEMU whatever happens.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub release: String,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Build (or reuse the cache of) the guest image; `no_agent` builds the variant without agent.
pub fn guest(no_agent: bool) -> Guest {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let script = repo_root().join("vmm/guest/build.sh");
    let mut cmd = Command::new(&script);
    if no_agent {
        cmd.env("TANDEM_GUEST_NO_AGENT", "1");
    }
    if std::env::var_os("CARGO_TARGET_DIR").is_none() {
        cmd.env("CARGO_TARGET_DIR", repo_root().join("target-agent"));
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .expect("run vmm/guest/build.sh");
    assert!(
        out.status.success(),
        "{} failed: {:?}",
        script.display(),
        out.status
    );
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
        Self::start_with(kernel, initrd, "")
    }

    /// As [`Qemu::start`], with `extra` appended to the kernel command line.
    pub fn start_with(kernel: &Path, initrd: &Path, extra: &str) -> Result<Qemu, String> {
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
        // The socket exists once QEMU has set up its chardevs.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !q.socket.exists() {
            if let Some(status) = q.try_wait() {
                return Err(format!("qemu exited early ({status}): {}", q.stderr()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "qemu made no socket {} within 10 s",
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
