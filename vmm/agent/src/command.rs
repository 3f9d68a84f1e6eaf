//! Run a command in the guest with bounded output and a deadline (RunCommand).

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::reaper::{Exit, Reaper};

/// Default and hard caps.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_MAX_OUTPUT: usize = 64 * 1024;
pub const MAX_OUTPUT: usize = 1024 * 1024;
pub const MAX_STDIN: usize = 1024 * 1024;

#[derive(Debug, Clone, Default)]
pub struct Spec {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub stdin: Vec<u8>,
    pub timeout: Option<Duration>,
    pub max_output: Option<usize>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub exit_code: i32,
    pub signal: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub timed_out: bool,
}

/// Read everything, keep the first `max` bytes.
fn read_bounded(mut r: impl Read, max: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let room = max - kept.len();
                if n > room {
                    truncated = true;
                }
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    (kept, truncated)
}

/// Run `spec`. Errors are strings meant for the RPC status (they name the command).
pub fn run(reaper: &Reaper, spec: Spec) -> Result<Outcome, String> {
    let argv0 = spec.argv.first().ok_or("argv is empty")?;
    if !argv0.starts_with('/') {
        return Err(format!("argv[0] {argv0:?} is not an absolute path"));
    }
    if spec.stdin.len() > MAX_STDIN {
        return Err(format!(
            "stdin of {} bytes exceeds {MAX_STDIN}",
            spec.stdin.len()
        ));
    }
    let timeout = spec.timeout.unwrap_or(DEFAULT_TIMEOUT).min(MAX_TIMEOUT);
    let max = spec
        .max_output
        .unwrap_or(DEFAULT_MAX_OUTPUT)
        .min(MAX_OUTPUT);
    let mut cmd = Command::new(argv0);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for kv in &spec.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("env entry {kv:?} has no '='"))?;
        cmd.env(k, v);
    }
    let mut child = {
        let mut table = reaper.lock();
        let child = cmd.spawn().map_err(|e| format!("spawn {argv0}: {e}"))?;
        table.track(child.id() as i32);
        child
    };
    let pid = child.id() as i32;
    let stdin = child.stdin.take();
    let input = spec.stdin;
    let writer = std::thread::spawn(move || {
        if let Some(mut s) = stdin {
            let _ = s.write_all(&input);
        }
    });
    let out = child
        .stdout
        .take()
        .map(|s| std::thread::spawn(move || read_bounded(s, max)));
    let err = child
        .stderr
        .take()
        .map(|s| std::thread::spawn(move || read_bounded(s, max)));
    let mut timed_out = false;
    let exit = match reaper.wait(pid, timeout) {
        Some(exit) => exit,
        None => {
            timed_out = true;
            // Kill the whole process group, then collect the status.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            reaper.wait(pid, Duration::from_secs(5)).unwrap_or_else(|| {
                reaper.forget(pid);
                Exit::Signal(libc::SIGKILL)
            })
        }
    };
    reaper.forget(pid);
    let _ = writer.join();
    let (stdout, stdout_truncated) = out
        .map(|t| t.join().unwrap_or_default())
        .unwrap_or_default();
    let (stderr, stderr_truncated) = err
        .map(|t| t.join().unwrap_or_default())
        .unwrap_or_default();
    let (exit_code, signal) = match exit {
        Exit::Code(c) => (c, 0),
        Exit::Signal(s) => (-1, s),
    };
    Ok(Outcome {
        exit_code,
        signal,
        stdout,
        stderr,
        stdout_truncated,
        stderr_truncated,
        timed_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_read_truncates() {
        let (kept, trunc) = read_bounded(&b"hello world"[..], 5);
        assert_eq!(kept, b"hello");
        assert!(trunc);
        let (kept, trunc) = read_bounded(&b"hi"[..], 5);
        assert_eq!(kept, b"hi");
        assert!(!trunc);
    }

    #[test]
    fn relative_argv0_is_refused() {
        let reaper = Reaper::default();
        let err = run(
            &reaper,
            Spec {
                argv: vec!["sh".into()],
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.contains("\"sh\""), "{err}");
        let err = run(&reaper, Spec::default()).unwrap_err();
        assert!(err.contains("argv is empty"), "{err}");
    }
}
