//! Container lifecycle through containerd + ctr: output, exit codes, signals, exec, tty, kill,
//! ps. Runtime under test: `TANDEM_TEST_RUNTIME` (default io.containerd.tandem.v2).

use std::io::Read;
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::time::Duration;

use tandem_tests::*;

fn setup() -> Containerd {
    let c = Containerd::start(None).expect("start containerd");
    c.import_busybox();
    c
}

#[test]
fn echo_prints_output() {
    let c = setup();
    let id = unique_id("echo");
    let (code, out, err) = c.run_rm(&[], &id, &["echo", "hello from tandem"]);
    assert_eq!(code, 0, "stderr: {err}\n{}", c.log_tail(30));
    assert_eq!(out, "hello from tandem\n");
    c.assert_no_leaks(&[&id]);
}

#[test]
fn exit_code_is_reported() {
    let c = setup();
    let id = unique_id("exit3");
    let (code, _, err) = c.run_rm(&[], &id, &["sh", "-c", "exit 3"]);
    assert_eq!(code, 3, "stderr: {err}");
    c.assert_no_leaks(&[&id]);
}

#[test]
fn rootfs_flag_runs_plain_directory() {
    let c = setup();
    let id = unique_id("rootfs");
    let rootfs = c.dir().join("bb-rootfs");
    unpack_busybox_rootfs(&rootfs).unwrap();
    let rt = runtime();
    let o = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        &rt,
        "--rootfs",
        rootfs.to_str().unwrap(),
        &id,
        "/bin/cat",
        "/etc/passwd",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("root:x:0:0:"));
    c.assert_no_leaks(&[&id]);
}

#[test]
fn sigkill_of_init_reports_137() {
    let c = setup();
    let id = unique_id("kill9");
    let rt = runtime();
    let child = c
        .ctr_cmd(&[
            "run",
            "--rm",
            "--runtime",
            &rt,
            BUSYBOX,
            &id,
            "sleep",
            "1000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.wait_task_status(&id, "RUNNING", Duration::from_secs(10));
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        exit_code(&o.status),
        137,
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    c.assert_no_leaks(&[&id]);
}

#[test]
fn exec_output_exit_code_and_sigterm_143() {
    let c = setup();
    let id = unique_id("exec");
    c.run_detached(&[], &id, &["sleep", "1000"]);
    let o = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        &id,
        "sh",
        "-c",
        "echo in-exec $$; exit 7",
    ]);
    assert_eq!(
        exit_code(&o.status),
        7,
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("in-exec "), "exec stdout: {out:?}");
    assert_ne!(
        out.trim(),
        "in-exec 1",
        "exec must not be the container's pid 1"
    );

    // A non-init process killed by SIGTERM reports 128 + 15.
    let child = c
        .ctr_cmd(&["task", "exec", "--exec-id", "e2", &id, "sleep", "1001"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_ps_count(&c, &id, 2);
    c.ctr_ok(&["task", "kill", "--exec-id", "e2", "-s", "SIGTERM", &id]);
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        exit_code(&o.status),
        143,
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The init is still running.
    assert_eq!(c.task_status(&id).as_deref(), Some("RUNNING"));
    c.remove(&id);
    c.assert_no_leaks(&[&id]);
}

fn ps_pids(c: &Containerd, id: &str) -> Vec<i32> {
    c.ctr_ok(&["task", "ps", id])
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

fn wait_for_ps_count(c: &Containerd, id: &str, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let p = ps_pids(c, id);
        if p.len() == n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "task ps {id}: {p:?}, wanted {n} pids"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ps_lists_pids_and_kill_one_then_all() {
    let c = setup();
    let id = unique_id("ps");
    c.run_detached(&[], &id, &["sleep", "1000"]);
    let init = c.task_pid(&id);
    assert_eq!(ps_pids(&c, &id), vec![init]);
    c.ctr_ok(&["task", "exec", "-d", "--exec-id", "a", &id, "sleep", "1001"]);
    c.ctr_ok(&["task", "exec", "-d", "--exec-id", "b", &id, "sleep", "1002"]);
    wait_for_ps_count(&c, &id, 3);
    let pids = ps_pids(&c, &id);
    assert!(pids.contains(&init), "{pids:?} lacks init {init}");
    for p in &pids {
        let cmd = std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap();
        assert!(
            cmd.starts_with("sleep\u{0}100"),
            "pid {p} of task ps is {cmd:?}"
        );
    }

    // Kill one exec process.
    c.ctr_ok(&["task", "kill", "--exec-id", "a", "-s", "SIGKILL", &id]);
    wait_for_ps_count(&c, &id, 2);
    assert_eq!(c.task_status(&id).as_deref(), Some("RUNNING"));

    // Kill all.
    c.ctr_ok(&["task", "kill", "--all", "-s", "SIGKILL", &id]);
    c.wait_task_status(&id, "STOPPED", Duration::from_secs(10));
    for p in &pids {
        assert!(
            proc_state(*p).is_none() || proc_state(*p) == Some('Z'),
            "pid {p} survived kill --all"
        );
    }
    c.ctr_ok(&["task", "delete", &id]);
    c.ctr_ok(&["container", "rm", &id]);
    c.assert_no_leaks(&[&id]);
}

/// Runs `ctr run -t` on a pty we own with a known window size; the container sees a
/// /dev/pts/N terminal of that size, and a resize of our terminal reaches it.
#[test]
fn tty_has_pts_and_window_size() {
    let c = setup();
    let id = unique_id("tty");
    let ws = nix::pty::Winsize {
        ws_row: 41,
        ws_col: 101,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&ws), None).unwrap();
    let slave: OwnedFd = pty.slave;
    let rt = runtime();
    // ctr sends the initial size right after start: wait (bounded) for it, then for a change.
    let script = "tty; i=0; while [ \"$(stty size 2>/dev/null)\" = '' ] && [ $i -lt 200 ]; do \
                  sleep 0.05; i=$((i+1)); done; s=$(stty size); echo size=$s; i=0; \
                  while [ \"$(stty size)\" = \"$s\" ] && [ $i -lt 200 ]; do sleep 0.05; \
                  i=$((i+1)); done; echo size=$(stty size); exit 5";
    let mut cmd = c.ctr_cmd(&[
        "run",
        "-t",
        "--rm",
        "--runtime",
        &rt,
        BUSYBOX,
        &id,
        "sh",
        "-c",
        script,
    ]);
    cmd.stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let master = std::fs::File::from(pty.master);
    let master_fd = master.try_clone().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut master = master;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match master.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    let _ = tx.send(String::from_utf8_lossy(&out).into_owned());
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    // Once the first size is printed, resize our terminal (the kernel sends ctr SIGWINCH).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while let Ok(seen) =
        rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        if seen.contains("size=") {
            let ws2 = libc::winsize {
                ws_row: 50,
                ws_col: 120,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let r = unsafe {
                libc::ioctl(
                    std::os::fd::AsRawFd::as_raw_fd(&master_fd),
                    libc::TIOCSWINSZ,
                    &ws2,
                )
            };
            assert_eq!(r, 0, "TIOCSWINSZ");
            break;
        }
    }
    let status = child.wait().unwrap();
    drop(master_fd);
    let out = reader.join().unwrap();
    assert_eq!(exit_code(&status), 5, "ctr run -t output: {out:?}");
    let lines: Vec<&str> = out.lines().map(|l| l.trim_end_matches('\r')).collect();
    assert!(
        lines.iter().any(|l| l.starts_with("/dev/pts/")),
        "tty did not print /dev/pts/N: {out:?}"
    );
    assert!(
        lines.contains(&"size=41 101"),
        "initial stty size not 41 101: {out:?}"
    );
    assert!(
        lines.contains(&"size=50 120"),
        "size after resize not 50 120: {out:?}"
    );
    c.assert_no_leaks(&[&id]);
}
