//! Real containers through the engine (root, real cgroups, busybox-static rootfs).

use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tandem_oci::{Container, CreateRequest, Engine, EngineConfig, Error, Status, Stdio};

const APPLETS: &[&str] = &[
    "sh", "true", "false", "cat", "echo", "id", "hostname", "sleep", "mkdir", "tty", "ls", "grep",
    "head", "dd", "ps", "readlink", "wc", "tr", "seq", "env", "pwd", "stat",
];

fn subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: prctl with constant args.
        let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(r, 0, "PR_SET_CHILD_SUBREAPER");
    });
}

/// A bundle in a temp dir plus a private state root; the container is deleted on drop.
struct Fixture {
    dir: tempfile::TempDir,
    engine: Engine,
    id: String,
    container: Option<Container>,
}

fn base_config(id: &str, args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "tandem-test",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_SETUID", "CAP_SETGID"],
                "effective": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_SETUID", "CAP_SETGID"],
                "permitted": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_SETUID", "CAP_SETGID"],
                "ambient": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]}
        ],
        "linux": {
            // one parent per container so that delete plus the fixture leave nothing behind
            "cgroupsPath": format!("/tandem-test-{id}/{id}"),
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

impl Fixture {
    fn new(name: &str, args: &[&str], patch: impl FnOnce(&mut Value)) -> Fixture {
        subreaper();
        let dir = tempfile::tempdir().unwrap();
        let id = format!("{name}-{}", std::process::id());
        let rootfs = dir.path().join("bundle/rootfs");
        for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
            fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).unwrap();
        }
        let mut cfg = base_config(&id, args);
        patch(&mut cfg);
        fs::write(
            dir.path().join("bundle/config.json"),
            serde_json::to_vec_pretty(&cfg).unwrap(),
        )
        .unwrap();
        let mut ec = EngineConfig::new(
            dir.path().join("state"),
            env!("CARGO_BIN_EXE_tandem-oci-init"),
        );
        ec.cgroup_root = PathBuf::from("/sys/fs/cgroup");
        Fixture {
            engine: Engine::new(ec),
            dir,
            id,
            container: None,
        }
    }

    /// The container's cgroup path relative to a hierarchy.
    fn rel(&self) -> String {
        format!("tandem-test-{0}/{0}", self.id)
    }

    fn bundle(&self) -> PathBuf {
        self.dir.path().join("bundle")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state").join(&self.id)
    }

    /// create with stdout+stderr into a pipe; returns the read end and the container pid.
    fn create_piped(&mut self) -> tandem_oci::Result<(fs::File, i32)> {
        let (r, w) = nix::unistd::pipe().unwrap();
        let w2 = w.try_clone().unwrap();
        let (c, sp) = self.engine.create(CreateRequest {
            id: &self.id,
            bundle: &self.bundle(),
            stdio: Stdio {
                stdin: None,
                stdout: Some(w),
                stderr: Some(w2),
            },
        })?;
        self.container = Some(c);
        Ok((fs::File::from(r), sp.pid))
    }

    fn c(&self) -> &Container {
        self.container.as_ref().unwrap()
    }

    /// create, start, wait; (exit status, output)
    fn run(&mut self) -> (i32, String) {
        let (mut out, pid) = self.create_piped().expect("create");
        assert_eq!(self.c().status().unwrap(), Status::Created);
        self.c().start().expect("start");
        let status = wait(pid);
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        (status, s)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(c) = self.container.take() {
            let pid = c.pid();
            if let Err(e) = c.delete() {
                eprintln!("cleanup of {}: {e}", self.id);
            }
            // reap what we were the parent/subreaper of
            if pid > 0 {
                unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
            }
        }
        // the per-container parent cgroup (pure v2 tests use the cgroup2 mount as root)
        let parent = format!("tandem-test-{}", self.id);
        let roots = [
            Path::new("/sys/fs/cgroup"),
            Path::new("/sys/fs/cgroup/unified"),
        ];
        for d in cgroup_dirs(&parent)
            .into_iter()
            .chain(roots.iter().map(|r| r.join(&parent)))
        {
            let _ = fs::remove_dir(d);
        }
    }
}

/// waitpid a specific pid; the raw status.
fn wait(pid: i32) -> i32 {
    let mut status = 0;
    loop {
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return status;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            panic!("waitpid {pid}: {e}");
        }
    }
}

fn exit_code(status: i32) -> i32 {
    assert!(libc::WIFEXITED(status), "not exited: status {status:#x}");
    libc::WEXITSTATUS(status)
}

fn cgroup_dirs(rel: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return vec![root.join(rel)];
    }
    fs::read_dir(root)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .filter(|e| e.file_name() != "systemd")
        .map(|e| e.path().join(rel))
        .collect()
}

fn assert_gone(f: &Fixture) {
    assert!(
        !f.state_dir().exists(),
        "state dir {:?} left",
        f.state_dir()
    );
    for d in cgroup_dirs(&f.rel()) {
        assert!(!d.exists(), "cgroup {d:?} left");
    }
}

fn proc_spec(args: &[&str]) -> tandem_oci::Process {
    serde_json::from_value(json!({
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin"],
        "cwd": "/",
    }))
    .unwrap()
}

fn exec_output(c: &Container, exec_id: &str, p: &tandem_oci::Process) -> (i32, String) {
    let (r, w) = nix::unistd::pipe().unwrap();
    let sp = c
        .exec(
            exec_id,
            p,
            Stdio {
                stdin: None,
                stdout: Some(w),
                stderr: None,
            },
        )
        .expect("exec");
    let st = wait(sp.pid);
    let mut s = String::new();
    fs::File::from(r).read_to_string(&mut s).unwrap();
    (st, s)
}

#[test]
fn runs_with_output_exit_code_and_cleans_up() {
    // containerd's CRI asks for oomScoreAdj -998, which root without CAP_SYS_RESOURCE cannot
    // set: a warning, not a failure
    let mut f = Fixture::new(
        "run",
        &[
            "sh",
            "-c",
            "echo hello from $(hostname); id -u; ulimit -n; exit 3",
        ],
        |c| c["process"]["oomScoreAdj"] = json!(-998),
    );
    let (st, out) = f.run();
    assert_eq!(exit_code(st), 3, "{out}");
    assert_eq!(out, "hello from tandem-test\n0\n1024\n");
    assert_eq!(f.c().status().unwrap(), Status::Stopped);
    // the shim maps this exact error to "process already finished"
    match f.c().kill(libc::SIGTERM, false) {
        Err(Error::Container { msg, .. }) => assert_eq!(msg, "not running"),
        r => panic!("{r:?}"),
    }
    assert!(f.c().start().is_err());
    f.container.take().unwrap().delete().unwrap();
    assert_gone(&f);
}

#[test]
fn container_sees_its_own_pid_namespace_and_mounts() {
    let mut f = Fixture::new(
        "ns",
        &[
            "sh",
            "-c",
            "echo pid=$$; cat /proc/1/cmdline | tr '\\0' ' '; echo; ls /sys/fs/cgroup | wc -l; \
             cat /proc/timer_list | wc -c; ls /proc/acpi | wc -l; echo x > /proc/sys/kernel/hostname || echo ro-ok; \
             ls -l /dev/ptmx /dev/null | wc -l",
        ],
        |_| {},
    );
    let (st, out) = f.run();
    assert_eq!(exit_code(st), 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "pid=1", "{out}");
    assert!(lines[1].starts_with("sh -c"), "{out}");
    assert!(lines[2].trim().parse::<u32>().unwrap() >= 1, "{out}");
    assert_eq!(lines[3].trim(), "0", "masked file /proc/timer_list: {out}");
    assert_eq!(lines[4].trim(), "0", "masked dir /proc/acpi: {out}");
    assert!(out.contains("ro-ok"), "{out}");
    assert_eq!(lines.last().unwrap().trim(), "2", "{out}");
}

#[test]
fn exec_joins_namespaces() {
    let mut f = Fixture::new("exec", &["sleep", "100"], |c| {
        c["linux"]["sysctl"] = json!({"net.ipv4.ip_forward": "1"})
    });
    let (_out, pid) = f.create_piped().unwrap();
    f.c().start().unwrap();
    assert_eq!(f.c().status().unwrap(), Status::Running);
    let (st, out) = exec_output(
        f.c(),
        "e1",
        &proc_spec(&["sh", "-c", "hostname; cat /proc/1/cmdline; echo; echo $$"]),
    );
    assert_eq!(exit_code(st), 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "tandem-test");
    assert_eq!(
        lines[1].trim_end_matches('\0').replace('\0', " "),
        "sleep 100"
    );
    assert_ne!(lines[2], "1");
    // user, groups, cwd and env of the exec'd process
    let p: tandem_oci::Process = serde_json::from_value(json!({
        "user": {"uid": 1000, "gid": 1000, "additionalGids": [10, 20]},
        "args": ["sh", "-c", "id; pwd; echo $FOO; cat /proc/sys/net/ipv4/ip_forward"],
        "env": ["PATH=/bin", "FOO=bar"],
        "cwd": "/tmp",
        "noNewPrivileges": true,
    }))
    .unwrap();
    let (st, out) = exec_output(f.c(), "e-user", &p);
    assert_eq!(exit_code(st), 0, "{out}");
    assert_eq!(out, "uid=1000 gid=1000 groups=10,20\n/tmp\nbar\n1\n");
    // the exec'd process was in the container's cgroup
    let pids = f.c().pids().unwrap();
    assert!(pids.contains(&pid), "{pids:?}");
    // exec of a missing program is reported synchronously
    let e = f
        .c()
        .exec("e2", &proc_spec(&["/bin/nope"]), Stdio::default())
        .unwrap_err();
    assert!(
        matches!(e, Error::Init(ref m) if m.contains("/bin/nope: No such file or directory")),
        "{e}"
    );
    f.c().kill(libc::SIGKILL, false).unwrap();
    assert!(libc::WIFSIGNALED(wait(pid)));
}

#[test]
fn terminal_gives_a_pty() {
    let mut f = Fixture::new(
        "tty",
        &["sh", "-c", "tty; ls -l /dev/console | wc -l"],
        |c| c["process"]["terminal"] = json!(true),
    );
    let (c, sp) = f
        .engine
        .create(CreateRequest {
            id: &f.id,
            bundle: &f.bundle(),
            stdio: Stdio::default(),
        })
        .unwrap();
    f.container = Some(c);
    let master: OwnedFd = sp.console.expect("console");
    f.c().start().unwrap();
    let st = wait(sp.pid);
    assert_eq!(exit_code(st), 0);
    let mut out = Vec::new();
    let mut file = fs::File::from(master);
    let mut buf = [0u8; 4096];
    // reading the master after the slave closed ends with EIO
    while let Ok(n) = file.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("/dev/pts/"), "{out:?}");
    assert!(!out.contains("not a tty"), "{out:?}");
}

#[test]
fn exec_with_terminal() {
    let mut f = Fixture::new("exectty", &["sleep", "100"], |_| {});
    let (_o, pid) = f.create_piped().unwrap();
    f.c().start().unwrap();
    let mut p = proc_spec(&["tty"]);
    p.set_terminal(Some(true));
    let sp = f.c().exec("t", &p, Stdio::default()).unwrap();
    let master = sp.console.expect("console");
    assert_eq!(exit_code(wait(sp.pid)), 0);
    let mut out = Vec::new();
    let mut file = fs::File::from(master);
    let mut buf = [0u8; 1024];
    while let Ok(n) = file.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    assert!(
        String::from_utf8_lossy(&out).starts_with("/dev/pts/"),
        "{out:?}"
    );
    f.c().kill(libc::SIGKILL, true).unwrap();
    wait(pid);
}

#[test]
fn cpuset_pins_the_process() {
    let mut f = Fixture::new(
        "cpuset",
        &["sh", "-c", "grep Cpus_allowed_list /proc/self/status"],
        |c| c["linux"]["resources"]["cpu"] = json!({"cpus": "1", "mems": "0", "shares": 512}),
    );
    let (st, out) = f.run();
    assert_eq!(exit_code(st), 0, "{out}");
    assert_eq!(out.trim(), "Cpus_allowed_list:\t1");
}

#[test]
fn memory_limit_oom_kills() {
    let mut f = Fixture::new(
        "oom",
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
        |c| c["linux"]["resources"]["memory"] = json!({"limit": 16 << 20, "swap": 16 << 20}),
    );
    let (_out, pid) = f.create_piped().unwrap();
    let notifier = f.c().oom_notifier().unwrap();
    assert_eq!(f.c().oom_kills().unwrap(), 0);
    let st = f.c().stats().unwrap();
    assert_eq!(st.memory.limit_bytes, 16 << 20);
    f.c().start().unwrap();
    let status = wait(pid);
    assert!(libc::WIFSIGNALED(status), "status {status:#x}");
    assert_eq!(libc::WTERMSIG(status), libc::SIGKILL);
    // the notifier fired
    let mut pfd = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&notifier),
        nix::poll::PollFlags::POLLIN,
    )];
    let n = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(2000u16)).unwrap();
    assert_eq!(n, 1, "oom notifier did not fire");
    assert!(f.c().oom_kills().unwrap() >= 1);
    assert!(f.c().stats().unwrap().memory.oom_kills >= 1);
}

#[test]
fn pids_limit_is_enforced() {
    let mut f = Fixture::new(
        "pids",
        &[
            "sh",
            "-c",
            "for i in 1 2 3 4 5 6 7 8; do sleep 1 & done; wait; echo done",
        ],
        |c| c["linux"]["resources"]["pids"] = json!({"limit": 4}),
    );
    let (mut out, pid) = f.create_piped().unwrap();
    assert_eq!(f.c().stats().unwrap().pids.limit, 4);
    f.c().start().unwrap();
    wait(pid);
    let mut s = String::new();
    out.read_to_string(&mut s).unwrap();
    assert!(s.contains("can't fork"), "{s}");
}

#[test]
fn hugetlb_limit_is_written() {
    let mut f = Fixture::new("huge", &["true"], |c| {
        c["linux"]["resources"]["hugepageLimits"] = json!([{"pageSize": "2MB", "limit": 4194304}])
    });
    let (_o, pid) = f.create_piped().unwrap();
    let rel = f.rel();
    let root = Path::new("/sys/fs/cgroup");
    let file = if root.join("cgroup.controllers").exists() {
        root.join(&rel).join("hugetlb.2MB.max")
    } else if root.join("unified/cgroup.controllers").exists()
        && fs::read_to_string(root.join("unified/cgroup.controllers"))
            .unwrap()
            .contains("hugetlb")
    {
        root.join("unified").join(&rel).join("hugetlb.2MB.max")
    } else {
        root.join("hugetlb")
            .join(&rel)
            .join("hugetlb.2MB.limit_in_bytes")
    };
    assert_eq!(
        fs::read_to_string(&file).unwrap().trim(),
        "4194304",
        "{file:?}"
    );
    f.c().start().unwrap();
    wait(pid);
    let c = f.container.take().unwrap();
    c.delete().unwrap();
    assert!(!file.parent().unwrap().exists());
}

#[test]
fn pause_and_resume() {
    let mut f = Fixture::new("pause", &["sleep", "100"], |_| {});
    let (_o, pid) = f.create_piped().unwrap();
    f.c().start().unwrap();
    f.c().pause().unwrap();
    assert_eq!(f.c().status().unwrap(), Status::Paused);
    let e = f
        .c()
        .exec("p", &proc_spec(&["true"]), Stdio::default())
        .unwrap_err();
    assert!(e.to_string().contains("paused"), "{e}");
    let freezer = Path::new("/sys/fs/cgroup/freezer")
        .join(f.rel())
        .join("freezer.state");
    if freezer.exists() {
        assert_eq!(fs::read_to_string(&freezer).unwrap().trim(), "FROZEN");
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let state = stat[stat.rfind(')').unwrap() + 2..].chars().next().unwrap();
    assert!(state == 'D' || state == 'S', "{state}");
    f.c().resume().unwrap();
    assert_eq!(f.c().status().unwrap(), Status::Running);
    // paused then killed: kill thaws so the process dies
    f.c().pause().unwrap();
    f.c().kill(libc::SIGKILL, true).unwrap();
    let st = wait(pid);
    assert!(libc::WIFSIGNALED(st));
}

#[test]
fn seccomp_denies_mkdir() {
    let mut f = Fixture::new("seccomp", &["sh", "-c", "mkdir /tmp/x; echo rc=$?"], |c| {
        c["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [{"names": ["mkdir", "mkdirat", "not_a_syscall"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
        })
    });
    let (st, out) = f.run();
    assert_eq!(exit_code(st), 0, "{out}");
    assert!(out.contains("Operation not permitted"), "{out}");
    assert!(out.contains("rc=1"), "{out}");
}

#[test]
fn containerd_default_seccomp_profile_runs() {
    let profile: Value =
        serde_json::from_str(include_str!("data/seccomp-containerd-1.6.json")).unwrap();
    let mut f = Fixture::new("seccompdef", &["sh", "-c", "echo ok; ls / | wc -l"], |c| {
        c["linux"]["seccomp"] = profile;
    });
    let (st, out) = f.run();
    assert_eq!(exit_code(st), 0, "{out}");
    assert!(out.starts_with("ok\n"), "{out}");
}

#[test]
fn bad_spec_leaves_nothing() {
    let mut f = Fixture::new("badcpus", &["true"], |c| {
        c["linux"]["resources"]["cpu"] = json!({"cpus": "abc"})
    });
    let e = f.create_piped().unwrap_err();
    assert!(
        matches!(e, Error::Spec { ref field, .. } if field == "linux.resources.cpu.cpus"),
        "{e}"
    );
    assert_gone(&f);

    let mut f = Fixture::new("badns", &["true"], |c| {
        c["linux"]["namespaces"][0]["type"] = json!("bogus")
    });
    let e = f.create_piped().unwrap_err().to_string();
    assert!(e.contains("linux.namespaces[0].type"), "{e}");
    assert_gone(&f);

    // valid syntax, refused by the kernel (no cpu 63 here): undone after the cgroups were made
    let mut f = Fixture::new("cpu63", &["true"], |c| {
        c["linux"]["resources"]["cpu"] = json!({"cpus": "63"})
    });
    let e = f.create_piped().unwrap_err();
    assert!(
        matches!(e, Error::Cgroup { ref path, .. } if path.ends_with("cpuset.cpus")),
        "{e}"
    );
    assert_gone(&f);

    let mut f = Fixture::new("noroot", &["true"], |c| {
        c["root"]["path"] = json!("missing")
    });
    let e = f.create_piped().unwrap_err();
    assert!(
        matches!(e, Error::Bundle { ref path, .. } if path.ends_with("missing")),
        "{e}"
    );
    assert_gone(&f);
}

#[test]
fn init_errors_come_back_and_leave_nothing() {
    let mut f = Fixture::new("nope", &["/bin/nope"], |_| {});
    let e = f.create_piped().unwrap_err();
    assert!(
        matches!(e, Error::Init(ref m) if m == "exec: /bin/nope: No such file or directory"),
        "{e}"
    );
    assert_gone(&f);

    let mut f = Fixture::new("badcwd", &["true"], |c| {
        c["process"]["cwd"] = json!("/no/such/dir")
    });
    let e = f.create_piped().unwrap_err().to_string();
    assert!(e.contains("process.cwd /no/such/dir"), "{e}");
    assert_gone(&f);

    let mut f = Fixture::new("notinpath", &["nosuchprog"], |_| {});
    let e = f.create_piped().unwrap_err().to_string();
    assert!(e.contains("executable file not found in $PATH"), "{e}");
    assert_gone(&f);
}

#[test]
fn load_after_restart_and_delete_is_idempotent() {
    let mut f = Fixture::new("load", &["sleep", "100"], |_| {});
    let (_o, pid) = f.create_piped().unwrap();
    assert!(f
        .engine
        .create(CreateRequest {
            id: &f.id,
            bundle: &f.bundle(),
            stdio: Stdio::default()
        })
        .is_err_and(|e| matches!(e, Error::Exists(_))));
    let engine2 = Engine::new(f.engine.config().clone());
    assert_eq!(engine2.list().unwrap(), vec![f.id.clone()]);
    let c = engine2.load(&f.id).unwrap();
    assert_eq!(c.pid(), pid);
    assert_eq!(c.status().unwrap(), Status::Created);
    c.start().unwrap();
    assert_eq!(f.c().status().unwrap(), Status::Running);
    let stats = c.stats().unwrap();
    assert!(stats.pids.current >= 1);
    assert!(stats.memory.usage_bytes > 0);
    c.delete().unwrap();
    let st = wait(pid);
    assert!(libc::WIFSIGNALED(st));
    c.delete().unwrap();
    assert!(matches!(engine2.load(&f.id), Err(Error::NotFound(_))));
    assert_gone(&f);
    f.container = None;
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline && Path::new(&format!("/proc/{pid}")).exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn update_changes_resources() {
    let mut f = Fixture::new("update", &["sleep", "100"], |c| {
        c["linux"]["resources"]["pids"] = json!({"limit": 50})
    });
    let (_o, pid) = f.create_piped().unwrap();
    let res: tandem_oci::LinuxResources =
        serde_json::from_value(json!({"pids": {"limit": 20}, "memory": {"limit": 64 << 20}}))
            .unwrap();
    f.c().update(&res).unwrap();
    let st = f.c().stats().unwrap();
    assert_eq!(st.pids.limit, 20);
    assert_eq!(st.memory.limit_bytes, 64 << 20);
    let bad: tandem_oci::LinuxResources =
        serde_json::from_value(json!({"cpu": {"cpus": "1-"}})).unwrap();
    assert!(f
        .c()
        .update(&bad)
        .unwrap_err()
        .to_string()
        .contains("cpu.cpus"));
    f.c().kill(libc::SIGKILL, true).unwrap();
    let _ = AsRawFd::as_raw_fd(&_o);
    wait(pid);
}

#[test]
fn user_namespace_maps_ids() {
    let mut f = Fixture::new(
        "userns",
        &[
            "sh",
            "-c",
            "id -u; cat /proc/self/uid_map; cat /proc/self/gid_map; hostname; ls /proc | wc -l",
        ],
        |c| {
            let ns = c["linux"]["namespaces"].as_array_mut().unwrap();
            ns.push(json!({"type": "user"}));
            c["linux"]["uidMappings"] =
                json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
            c["linux"]["gidMappings"] =
                json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        },
    );
    // the container's root (host uid 100000) must reach the rootfs and the exec fifo
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(f.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let (st, out) = f.run();
    assert_eq!(exit_code(st), 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "0", "{out}");
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["0", "100000", "65536"],
        "{out}"
    );
    assert_eq!(
        lines[2].split_whitespace().collect::<Vec<_>>(),
        ["0", "100000", "65536"],
        "{out}"
    );
    assert_eq!(lines[3], "tandem-test");
    // host view: the container process ran as host uid 100000
    f.container.take().unwrap().delete().unwrap();
    assert_gone(&f);
}

#[test]
fn user_namespace_needs_mappings() {
    let mut f = Fixture::new("usernomap", &["true"], |c| {
        c["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "user"}));
    });
    let e = f.create_piped().unwrap_err().to_string();
    assert!(e.contains("uidMappings"), "{e}");
    assert_gone(&f);
}

#[test]
fn exec_into_user_namespace() {
    let mut f = Fixture::new("userexec", &["sleep", "100"], |c| {
        c["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "user"}));
        c["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 200000, "size": 65536}]);
        c["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 200000, "size": 65536}]);
    });
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(f.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let (_o, pid) = f.create_piped().unwrap();
    f.c().start().unwrap();
    let (st, out) = exec_output(
        f.c(),
        "u",
        &proc_spec(&[
            "sh",
            "-c",
            "id -u; cat /proc/self/uid_map; cat /proc/1/cmdline",
        ]),
    );
    assert_eq!(exit_code(st), 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "0", "{out}");
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["0", "200000", "65536"]
    );
    assert!(lines[2].starts_with("sleep"), "{out}");
    // the host sees the exec'd process's uid as 200000
    f.c().kill(libc::SIGKILL, true).unwrap();
    assert!(libc::WIFSIGNALED(wait(pid)));
}

#[test]
fn bind_mounts_devices_readonly_root_and_process_attributes() {
    let data = tempfile::tempdir().unwrap();
    fs::write(data.path().join("hello.txt"), "from the host\n").unwrap();
    let src = data.path().to_str().unwrap().to_string();
    let mut f = Fixture::new(
        "binds",
        &[
            "sh",
            "-c",
            "cat /data/hello.txt; echo x > /data/new || echo data-ro; \
             echo x > /newfile || echo root-ro; echo x > /tmp/ok && echo tmp-rw; \
             echo hi > /dev/mydev && echo dev-ok; ls -l /dev/mydev | cut -c1-10; \
             grep -E '^(NoNewPrivs|CapBnd|CapEff)' /proc/self/status; \
             hostname; cat /proc/sys/kernel/domainname; \
             grep -E '^(SigIgn|SigBlk)' /proc/self/status; ls /proc/self/fd | wc -l",
        ],
        |c| {
            c["root"]["readonly"] = json!(true);
            c["domainname"] = json!("example.test");
            c["mounts"].as_array_mut().unwrap().push(json!({
                "destination": "/data", "type": "bind", "source": src,
                "options": ["rbind", "ro", "nosuid", "nodev"]
            }));
            c["linux"]["devices"] = json!([{"path": "/dev/mydev", "type": "c", "major": 1, "minor": 3, "fileMode": 438, "uid": 0, "gid": 0}]);
        },
    );
    fs::create_dir_all(f.bundle().join("rootfs/data")).unwrap();
    std::os::unix::fs::symlink("busybox", f.bundle().join("rootfs/bin/cut")).unwrap();
    // an fd of the caller without CLOEXEC must not reach the container
    let leak = std::ffi::CString::new("/dev/null").unwrap();
    // SAFETY: plain open without O_CLOEXEC, closed below.
    let leaked = unsafe { libc::open(leak.as_ptr(), libc::O_RDONLY) };
    assert!(leaked > 2);
    let r = f.create_piped();
    unsafe { libc::close(leaked) };
    let (mut pipe, pid) = r.unwrap();
    f.c().start().unwrap();
    let st = wait(pid);
    let mut out = String::new();
    pipe.read_to_string(&mut out).unwrap();
    assert_eq!(exit_code(st), 0, "{out}");
    let expect = [
        "from the host",
        "data-ro",
        "root-ro",
        "tmp-rw",
        "dev-ok",
        "crw-rw-rw-",
        "NoNewPrivs:\t1",
        "CapEff:\t00000000200004eb",
        "CapBnd:\t00000000200004eb",
        "tandem-test",
        "example.test",
        "SigIgn:\t0000000000000000",
        "SigBlk:\t0000000000000000",
        // 0, 1, 2 and the directory ls reads: nothing leaked from the engine's caller
        "4",
    ];
    for e in expect {
        assert!(out.lines().any(|l| l == e), "missing {e:?} in:\n{out}");
    }
    // the bind source on the host is untouched
    assert!(!data.path().join("new").exists());
}

#[test]
fn create_start_exit_latency() {
    let mut times = Vec::new();
    for i in 0..7 {
        let mut f = Fixture::new(&format!("lat{i}"), &["true"], |_| {});
        let t = Instant::now();
        let (st, _) = f.run();
        times.push(t.elapsed());
        assert_eq!(exit_code(st), 0);
        f.container.take().unwrap().delete().unwrap();
        assert_gone(&f);
    }
    times.sort();
    let median = times[times.len() / 2];
    eprintln!(
        "create+start+exit of /bin/true: median {median:?}, min {:?}, max {:?}",
        times[0],
        times[times.len() - 1]
    );
    assert!(median < Duration::from_millis(500), "median {median:?}");
}

/// The pure cgroup v2 code path on the real kernel: the hybrid layout's cgroup2 mount used as the
/// cgroup root (on a pure v2 host, the root itself). Freezer through cgroup.freeze, device rules
/// through the eBPF filter, the cgroup2 mount inside the container.
#[test]
fn pure_v2_code_path() {
    let root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.controllers").exists())
        .expect("a cgroup2 mount");
    let mut f = Fixture::new(
        "v2",
        &[
            "sh",
            "-c",
            "head -c 1 /dev/null && echo null-ok; cat /dev/kmsg || echo kmsg-denied; \
                        cat /sys/fs/cgroup/cgroup.controllers >/dev/null && echo cg2; sleep 100",
        ],
        |c| {
            c["linux"]["devices"] = json!([{"path": "/dev/kmsg", "type": "c", "major": 1, "minor": 11, "fileMode": 420}]);
            c["linux"]["resources"] = json!({"devices": [{"allow": false, "access": "rwm"}]});
        },
    );
    let mut ec = f.engine.config().clone();
    ec.cgroup_root = root.clone();
    f.engine = Engine::new(ec);
    let (mut out, pid) = f.create_piped().unwrap();
    let dir = root.join(f.rel());
    assert!(fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap()
        .contains(&pid.to_string()));
    f.c().start().unwrap();
    // wait for the script to reach sleep
    let deadline = Instant::now() + Duration::from_secs(5);
    let sleeping = |c: &Container| {
        c.pids().unwrap().iter().any(|p| {
            fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|s| s.trim() == "sleep")
        })
    };
    while !sleeping(f.c()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(sleeping(f.c()), "script did not reach sleep");
    f.c().pause().unwrap();
    assert_eq!(f.c().status().unwrap(), Status::Paused);
    assert!(fs::read_to_string(dir.join("cgroup.events"))
        .unwrap()
        .contains("frozen 1"));
    f.c().resume().unwrap();
    assert_eq!(f.c().status().unwrap(), Status::Running);
    f.c().kill(libc::SIGKILL, true).unwrap();
    assert!(libc::WIFSIGNALED(wait(pid)));
    let mut s = String::new();
    out.read_to_string(&mut s).unwrap();
    assert_eq!(
        s.lines()
            .filter(|l| !l.starts_with("cat:"))
            .collect::<Vec<_>>(),
        ["null-ok", "kmsg-denied", "cg2"],
        "{s}"
    );
    assert!(s.contains("Operation not permitted"), "{s}");
    f.container.take().unwrap().delete().unwrap();
    assert!(!dir.exists());
}

/// The default spec of containerd 1.6.20 (`ctr oci spec`, saved as test data) with only args,
/// cgroupsPath and a seccomp profile added, as `ctr run --seccomp` would.
#[test]
fn containerd_default_spec_runs() {
    let base: Value = serde_json::from_str(include_str!("data/ctr-oci-spec-1.6.20.json")).unwrap();
    let profile: Value =
        serde_json::from_str(include_str!("data/seccomp-containerd-1.6.json")).unwrap();
    let mut f = Fixture::new(
        "ctrspec",
        &["sh", "-c", "echo ok; id; cat /proc/self/cgroup | wc -l"],
        |c| {
            let id = c["linux"]["cgroupsPath"].clone();
            let args = c["process"]["args"].clone();
            *c = base;
            c["process"]["args"] = args;
            c["process"]["env"] = json!(["PATH=/bin"]);
            c["linux"]["cgroupsPath"] = id;
            c["linux"]["seccomp"] = profile;
        },
    );
    let (st, out) = f.run();
    assert_eq!(exit_code(st), 0, "{out}");
    assert!(
        out.starts_with("ok\nuid=0(root) gid=0(root)") || out.starts_with("ok\nuid=0 gid=0"),
        "{out}"
    );
}

// ---- user namespaces: idmapped rootfs and volumes, namespaced capabilities ----

const MAP_HOST: u32 = 100000;

fn with_userns(c: &mut Value, host: u32) {
    c["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "user"}));
    c["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": host, "size": 65536}]);
    c["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": host, "size": 65536}]);
}

/// The container's root (a host uid > 0) must reach the bundle and the exec fifo.
fn open_up(f: &Fixture) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(f.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
}

fn owner(p: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid())
}

fn write_mode(p: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::write(p, text).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn link_applets(f: &Fixture, names: &[&str]) {
    for a in names {
        let p = f.bundle().join("rootfs/bin").join(a);
        if fs::symlink_metadata(&p).is_err() {
            std::os::unix::fs::symlink("busybox", p).unwrap();
        }
    }
}

/// An overlay mount (like containerd's snapshotter) at the bundle's rootfs, unmounted on drop.
struct Overlay {
    target: PathBuf,
}

impl Overlay {
    /// Turn `<bundle>/rootfs` into the lower dir of an overlay mounted at `<bundle>/rootfs`.
    fn over_bundle(f: &Fixture) -> (Overlay, PathBuf) {
        let b = f.bundle();
        let lower = f.dir.path().join("lower");
        fs::rename(b.join("rootfs"), &lower).unwrap();
        let (upper, work) = (f.dir.path().join("upper"), f.dir.path().join("work"));
        for d in [&upper, &work, &b.join("rootfs")] {
            fs::create_dir_all(d).unwrap();
        }
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        nix::mount::mount(
            Some("overlay"),
            &b.join("rootfs"),
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(data.as_str()),
        )
        .expect("mount overlay");
        (
            Overlay {
                target: b.join("rootfs"),
            },
            upper,
        )
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn mountinfo_line<'a>(out: &'a str, mount_point: &str) -> &'a str {
    out.lines()
        .find(|l| l.split_whitespace().nth(4) == Some(mount_point))
        .unwrap_or_else(|| panic!("no mountinfo line for {mount_point} in:\n{out}"))
}

#[test]
fn idmapped_overlay_rootfs_shows_real_ownership() {
    let mut f = Fixture::new(
        "idmroot",
        &[
            "sh",
            "-c",
            "id -u; stat -c '%u %g' /bin/busybox /etc/secret; cat /etc/secret; \
             touch /created && echo created; echo more >> /etc/secret && echo appended; \
             cat /proc/self/uid_map; \
             cat /proc/self/mountinfo",
        ],
        |c| with_userns(c, MAP_HOST),
    );
    link_applets(&f, &["touch"]);
    write_mode(&f.bundle().join("rootfs/etc/secret"), "root-only\n", 0o600);
    open_up(&f);
    let (_ov, upper) = Overlay::over_bundle(&f);
    let (st, out) = f.run();
    assert_eq!(exit_code(st), 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "0", "{out}");
    // image files owned by host root appear owned by the container's root (no chown copy)
    assert_eq!(lines[1], "0 0", "{out}");
    assert_eq!(lines[2], "0 0", "{out}");
    assert_eq!(lines[3], "root-only", "{out}");
    assert_eq!(lines[4], "created", "{out}");
    assert_eq!(lines[5], "appended", "{out}");
    assert_eq!(
        lines[6].split_whitespace().collect::<Vec<_>>(),
        ["0", "100000", "65536"]
    );
    // the root is an overlay rebuilt on idmapped layers (overlayfs itself cannot be idmapped)
    let root = mountinfo_line(&out, "/");
    assert!(
        root.contains(" - overlay ") && root.contains("lowerdir+=") && root.contains(" rw,"),
        "{root}"
    );
    // a file the container's root created lands in the upper dir owned by host root, as it
    // would without a user namespace
    assert_eq!(owner(&upper.join("created")), (0, 0));
    // a copy-up keeps the lower file's owner and mode
    assert_eq!(owner(&upper.join("etc/secret")), (0, 0));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(upper.join("etc/secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o600);
    }
    assert_eq!(
        fs::read_to_string(upper.join("etc/secret")).unwrap(),
        "root-only\nmore\n"
    );
    f.container.take().unwrap().delete().unwrap();
    assert_gone(&f);
}

#[test]
fn rootfs_owned_by_the_mapped_root_is_not_idmapped() {
    let mut f = Fixture::new(
        "chownroot",
        &[
            "sh",
            "-c",
            "stat -c '%u' / /bin/busybox /etc/secret; cat /etc/secret 2>/dev/null || echo denied; \
             cat /proc/self/mountinfo",
        ],
        |c| with_userns(c, MAP_HOST),
    );
    let root = f.bundle().join("rootfs");
    // a chown'ed copy of the image (what runtimes without idmapped mounts do)
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &d,
            Some(MAP_HOST.into()),
            Some(MAP_HOST.into()),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
        if fs::symlink_metadata(&d).unwrap().is_dir() {
            stack.extend(fs::read_dir(&d).unwrap().map(|e| e.unwrap().path()));
        }
    }
    // ... with one file that belongs to host root: the container must not read it
    write_mode(&root.join("etc/secret"), "root-only\n", 0o600);
    open_up(&f);
    let (st, out) = f.run();
    assert_eq!(exit_code(st), 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..3], ["0", "0", "65534"], "{out}");
    assert!(!out.contains("root-only"), "{out}");
    assert_eq!(lines[3], "denied", "{out}");
    assert!(!mountinfo_line(&out, "/").contains("idmapped"), "{out}");
}

#[test]
fn volumes_idmapped_keep_host_ownership_plain_ones_do_not() {
    let idm = tempfile::tempdir().unwrap();
    let plain = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(plain.path(), fs::Permissions::from_mode(0o777)).unwrap();
    for d in [idm.path(), plain.path()] {
        write_mode(&d.join("secret"), "host-root-only\n", 0o600);
    }
    let file = idm.path().join("secret");
    let (si, sp, sf) = (
        idm.path().to_str().unwrap().to_string(),
        plain.path().to_str().unwrap().to_string(),
        file.to_str().unwrap().to_string(),
    );
    let mut f = Fixture::new(
        "idmvol",
        &[
            "sh",
            "-c",
            "echo idm=$(cat /idm/secret) plain=$(cat /plain/secret) \
               file=$(cat /file-plain) fileidm=$(cat /file-idm); \
             stat -c 'owner %n %u' /idm/secret /plain/secret /file-plain /file-idm; \
             touch /idm/new /plain/new && echo touched; grep -E ' /(idm|plain) ' /proc/self/mountinfo",
        ],
        |c| {
            with_userns(c, MAP_HOST);
            let m = c["mounts"].as_array_mut().unwrap();
            m.push(json!({"destination": "/idm", "type": "bind", "source": si, "options": ["rbind", "idmap"]}));
            m.push(json!({"destination": "/plain", "type": "bind", "source": sp, "options": ["rbind"]}));
            m.push(json!({"destination": "/file-plain", "type": "bind", "source": sf, "options": ["bind", "ro"]}));
            m.push(json!({"destination": "/file-idm", "type": "bind", "source": sf, "options": ["bind", "ro", "idmap"]}));
        },
    );
    link_applets(&f, &["touch"]);
    open_up(&f);
    let (st, out) = f.run();
    assert_eq!(exit_code(st), 0, "{out}");
    // a 0600 host-root file is readable through the idmapped volume only
    assert!(
        out.lines()
            .any(|l| l == "idm=host-root-only plain= file= fileidm=host-root-only"),
        "{out}"
    );
    for (p, uid) in [
        ("/idm/secret", 0),
        ("/plain/secret", 65534),
        ("/file-plain", 65534),
        ("/file-idm", 0),
    ] {
        assert!(
            out.lines().any(|l| l == format!("owner {p} {uid}")),
            "{p}: {out}"
        );
    }
    assert!(out.contains("touched"), "{out}");
    assert!(mountinfo_line(&out, "/idm").contains("idmapped"), "{out}");
    assert!(
        !mountinfo_line(&out, "/plain").contains("idmapped"),
        "{out}"
    );
    // Kubernetes hostUsers:false semantics: through an idmapped volume the container's root
    // writes as host root; through a plain one as its mapped host uid
    assert_eq!(owner(&idm.path().join("new")), (0, 0));
    assert_eq!(owner(&plain.path().join("new")), (MAP_HOST, MAP_HOST));
}

#[test]
fn mount_with_its_own_mappings_without_a_user_namespace() {
    let vol = tempfile::tempdir().unwrap();
    fs::write(vol.path().join("a"), "x").unwrap();
    fs::write(vol.path().join("b"), "x").unwrap();
    nix::unistd::chown(&vol.path().join("b"), Some(5.into()), Some(5.into())).unwrap();
    let src = vol.path().to_str().unwrap().to_string();
    let mut f = Fixture::new(
        "mntmaps",
        &["sh", "-c", "stat -c '%n %u %g' /v/a /v/b"],
        |c| {
            c["mounts"].as_array_mut().unwrap().push(json!({
                "destination": "/v", "type": "bind", "source": src, "options": ["rbind"],
                "uidMappings": [{"containerID": 0, "hostID": 1234, "size": 1}],
                "gidMappings": [{"containerID": 0, "hostID": 4321, "size": 1}]
            }));
        },
    );
    let (st, out) = f.run();
    assert_eq!(exit_code(st), 0, "{out}");
    // on-disk 0 shows as 1234/4321 as the mount's mapping says; 5 is unmapped
    assert!(out.lines().any(|l| l == "/v/a 1234 4321"), "{out}");
    assert!(out.lines().any(|l| l == "/v/b 65534 65534"), "{out}");
}

#[test]
fn idmap_on_a_filesystem_that_cannot_is_a_clear_error() {
    let mut f = Fixture::new("idmsysfs", &["true"], |c| {
        with_userns(c, MAP_HOST);
        c["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/k", "type": "bind", "source": "/sys/kernel", "options": ["rbind", "idmap"]
        }));
    });
    open_up(&f);
    let e = f.create_piped().unwrap_err().to_string();
    assert!(
        e.contains("/sys/kernel")
            && e.contains("sysfs")
            && e.contains("does not support idmapped mounts"),
        "{e}"
    );
    assert_gone(&f);
}

#[test]
fn bad_user_namespace_mappings_fail_create_and_leave_nothing() {
    for (name, maps) in [
        (
            "mapoverlap",
            json!([{"containerID": 0, "hostID": 100000, "size": 100}, {"containerID": 50, "hostID": 300000, "size": 10}]),
        ),
        (
            "mapzero",
            json!([{"containerID": 0, "hostID": 100000, "size": 0}]),
        ),
    ] {
        let mut f = Fixture::new(name, &["true"], |c| {
            with_userns(c, MAP_HOST);
            c["linux"]["uidMappings"] = maps.clone();
        });
        let e = f.create_piped().unwrap_err().to_string();
        assert!(e.contains("linux.uidMappings["), "{name}: {e}");
        assert_gone(&f);
    }

    // a user namespace to join that does not exist: named, nothing left
    let mut f = Fixture::new("mapjoin", &["true"], |c| {
        c["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "user", "path": "/proc/self/ns/nonexistent"}));
    });
    let e = f.create_piped().unwrap_err().to_string();
    assert!(e.contains("/proc/self/ns/nonexistent"), "{e}");
    assert_gone(&f);
}

/// Runs `ip` on the host; panics with its output on failure.
fn host_ip(args: &[&str]) -> String {
    let o = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[test]
fn net_admin_in_a_user_namespace_is_confined_to_its_network_namespace() {
    // a network namespace owned by the host's user namespace, standing in for "the host's":
    // the container gets its file but must not be able to use it
    let ns = Netns(format!("tandem-test-{}", std::process::id()));
    host_ip(&["netns", "add", &ns.0]);
    let ns_file = format!("/run/netns/{}", ns.0);
    // does this kernel have 802.1q at all? (it may be built without CONFIG_VLAN_8021Q)
    host_ip(&[
        "-n", &ns.0, "link", "add", "p0", "type", "veth", "peer", "name", "p1",
    ]);
    let vlan_ok = std::process::Command::new("ip")
        .args([
            "-n", &ns.0, "link", "add", "link", "p0", "name", "p0.100", "type", "vlan", "id", "100",
        ])
        .status()
        .unwrap()
        .success();
    let vlan = if vlan_ok {
        "ip link add link v0 name v0.100 type vlan id 100 && echo vlan-ok; "
    } else {
        ""
    };
    let script = format!(
        "grep CapEff /proc/self/status; \
         ip link add v0 type veth peer v1 && echo veth-ok; \
         ip link add link v0 name mv0 type macvlan && echo macvlan-ok; \
         ip link add br0 type bridge && echo bridge-ok; \
         {vlan}\
         ip link set v0 mtu 1400 && ip link show v0 | grep -o 'mtu [0-9]*'; \
         nsenter --net=/hostnet ip link set lo mtu 1300 2>&1 && echo ESCAPED || echo setns-denied; \
         ip link set lo netns 1 2>/dev/null; ip link show"
    );
    let caps = json!([
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_KILL",
        "CAP_SETUID",
        "CAP_SETGID"
    ]);
    let mut f = Fixture::new("netadmin", &["sh", "-c", &script], |c| {
        with_userns(c, MAP_HOST);
        for k in ["bounding", "effective", "permitted"] {
            c["process"]["capabilities"][k] = caps.clone();
        }
        c["process"]["capabilities"]["ambient"] = json!([]);
        c["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/hostnet", "type": "bind", "source": ns_file, "options": ["bind"]
        }));
    });
    link_applets(&f, &["ip", "nsenter"]);
    open_up(&f);
    let mtu_before = host_ip(&["-n", &ns.0, "link", "show", "lo"]);
    let host_links_before = host_ip(&["-o", "link", "show"]);
    let (st, out) = f.run();
    assert_eq!(exit_code(st), 0, "{out}");
    // CAP_NET_ADMIN (bit 12), CAP_NET_RAW (13), no CAP_SYS_ADMIN (21)
    let eff = out
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:\t"))
        .unwrap();
    let eff = u64::from_str_radix(eff, 16).unwrap();
    assert!(eff & (1 << 12) != 0 && eff & (1 << 21) == 0, "{eff:#x}");
    for want in [
        "veth-ok",
        "macvlan-ok",
        "bridge-ok",
        "mtu 1400",
        "setns-denied",
    ] {
        assert!(out.lines().any(|l| l == want), "missing {want:?}:\n{out}");
    }
    if vlan_ok {
        assert!(out.lines().any(|l| l == "vlan-ok"), "{out}");
    }
    assert!(!out.contains("ESCAPED"), "{out}");
    assert!(out.contains("mv0@v0"), "{out}");
    // nothing changed outside: the other namespace's lo and the host's links
    assert_eq!(host_ip(&["-n", &ns.0, "link", "show", "lo"]), mtu_before);
    assert_eq!(host_ip(&["-o", "link", "show"]), host_links_before);
    f.container.take().unwrap().delete().unwrap();
    assert_gone(&f);
}
