//! Harness for integration tests against a real containerd.
//!
//! Each [`Containerd`] is a private containerd 1.6 (Debian's `/usr/bin/containerd`) with its own
//! `config.toml`, root, state and sockets under a temporary directory, and its own containerd
//! namespace (so the cgroups `ctr` asks for, `/<namespace>/<id>`, never collide with another
//! test's). The tandem shim's directory (`TANDEM_BIN_DIR`, default `<workspace>/target/release`)
//! comes first on containerd's PATH, so `io.containerd.tandem.v2` resolves to the freshly built
//! `containerd-shim-tandem-v2`.
//!
//! Tests pick the runtime under test with [`runtime()`]: `TANDEM_TEST_RUNTIME` (default
//! `io.containerd.tandem.v2`; `io.containerd.runc.v2` runs the same test bodies against runc).
//!
//! Dropping a [`Containerd`] kills what is left of its tasks, stops containerd by pid (SIGTERM,
//! then SIGKILL), kills shims that still talk to its socket, removes the namespace cgroups,
//! unmounts anything left under the temporary directory and removes it. Leaks are detected
//! explicitly by [`Containerd::assert_no_leaks`] before that cleanup runs.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// runtime_type of tandem's shim.
pub const TANDEM_RUNTIME: &str = "io.containerd.tandem.v2";
/// runtime_type of containerd's own runc shim.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// Name the busybox image gets on import.
pub const BUSYBOX: &str = "docker.io/tandem/busybox:latest";
/// Name of tandem's pod sandbox (pause) image, the CRI `sandbox_image`.
pub const PAUSE: &str = "localhost/tandem/pause:latest";

pub mod cri;

/// The workspace root (parent of this crate).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent")
        .to_path_buf()
}

/// Directory holding `containerd-shim-tandem-v2`.
pub fn shim_bin_dir() -> PathBuf {
    std::env::var_os("TANDEM_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join("target/release"))
}

/// The runtime the tests drive: `TANDEM_TEST_RUNTIME`, default [`TANDEM_RUNTIME`].
pub fn runtime() -> String {
    std::env::var("TANDEM_TEST_RUNTIME").unwrap_or_else(|_| TANDEM_RUNTIME.to_string())
}

/// True when the runtime under test is tandem.
pub fn is_tandem() -> bool {
    runtime() == TANDEM_RUNTIME
}

/// A container id unique in this machine for this run: `<name>-<pid>-<n>`.
pub fn unique_id(name: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Runs an image build script (`deploy/images/<script> OUT REF`, which caches by a hash of its
/// inputs) and returns OUT under `target/tandem-build/`.
fn build_image(script: &str, out: &str, image_ref: &str) -> PathBuf {
    let out = workspace_dir().join("target/tandem-build").join(out);
    let script = workspace_dir().join("deploy/images").join(script);
    let o = Command::new(&script)
        .arg(&out)
        .arg(image_ref)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        o.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// Builds the busybox OCI image tar (once per test binary) and returns its path.
pub fn busybox_tar() -> PathBuf {
    static TAR: OnceLock<PathBuf> = OnceLock::new();
    TAR.get_or_init(|| build_image("build-busybox.sh", "busybox.tar", BUSYBOX))
        .clone()
}

/// Builds the pause image tar (static tandem-pause, once per test binary) and returns its path.
pub fn pause_tar() -> PathBuf {
    static TAR: OnceLock<PathBuf> = OnceLock::new();
    TAR.get_or_init(|| build_image("build-pause.sh", "pause.tar", PAUSE))
        .clone()
}

/// Extracts the busybox image's single layer into `dest` (a plain rootfs for `--rootfs` and for
/// specs given with `--config`).
pub fn unpack_busybox_rootfs(dest: &Path) -> Result<()> {
    let tar = busybox_tar();
    let tmp = tempfile::tempdir()?;
    run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(&tar)
            .arg("-C")
            .arg(tmp.path()),
    )?;
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("index.json"))?)?;
    let blob = |d: &str| {
        tmp.path()
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let mdigest = index["manifests"][0]["digest"]
        .as_str()
        .context("index digest")?;
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(mdigest))?)?;
    let ldigest = manifest["layers"][0]["digest"]
        .as_str()
        .context("layer digest")?;
    std::fs::create_dir_all(dest)?;
    run_ok(
        Command::new("tar")
            .arg("-xzf")
            .arg(blob(ldigest))
            .arg("-C")
            .arg(dest),
    )?;
    Ok(())
}

fn run_ok(cmd: &mut Command) -> Result<Output> {
    let o = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !o.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(o)
}

/// Exit code as a shell reports it: the code, or 128 + signal.
pub fn exit_code(status: &ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Options of a private containerd.
#[derive(Debug, Clone, Default)]
pub struct ContainerdBuilder {
    cri: bool,
    cri_toml: String,
    extra_toml: String,
    runtime_config: Option<String>,
}

impl ContainerdBuilder {
    /// Enable the CRI plugin (disabled by default). `cri_toml` is appended verbatim after the
    /// `[plugins."io.containerd.grpc.v1.cri"]` header (e.g. runtimes, `sandbox_image`).
    pub fn cri(mut self, cri_toml: &str) -> Self {
        self.cri = true;
        self.cri_toml = cri_toml.to_string();
        self
    }

    /// Extra TOML appended to config.toml (other plugin sections).
    pub fn extra_toml(mut self, toml: &str) -> Self {
        self.extra_toml.push_str(toml);
        self.extra_toml.push('\n');
        self
    }

    /// A runtime config file for the shim (passed by tests to `ctr run --runtime-config-path`).
    pub fn runtime_config(mut self, contents: &str) -> Self {
        self.runtime_config = Some(contents.to_string());
        self
    }

    pub fn start(self) -> Result<Containerd> {
        Containerd::start_with(self)
    }
}

/// A private containerd, stopped and cleaned up on drop.
pub struct Containerd {
    dir: Option<tempfile::TempDir>,
    child: Option<Child>,
    /// Path of the gRPC socket.
    pub socket: PathBuf,
    /// containerd namespace used by [`Containerd::ctr`].
    pub namespace: String,
    /// Runtime config file written from the builder, if any.
    pub runtime_config: Option<PathBuf>,
}

impl Containerd {
    pub fn builder() -> ContainerdBuilder {
        ContainerdBuilder::default()
    }

    /// Start with default options (no CRI) and, if given, a runtime config file for the shim.
    pub fn start(runtime_config: Option<&str>) -> Result<Self> {
        let mut b = ContainerdBuilder::default();
        if let Some(rc) = runtime_config {
            b = b.runtime_config(rc);
        }
        b.start()
    }

    fn start_with(b: ContainerdBuilder) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tandem-ctd-")
            .tempdir_in("/tmp")?;
        let d = dir.path();
        let socket = d.join("c.sock");
        let mut cfg = String::new();
        writeln!(cfg, "version = 2")?;
        writeln!(cfg, "root = \"{}\"", d.join("root").display())?;
        writeln!(cfg, "state = \"{}\"", d.join("state").display())?;
        if !b.cri {
            writeln!(cfg, "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]")?;
        }
        writeln!(cfg, "[grpc]\n  address = \"{}\"", socket.display())?;
        writeln!(cfg, "[ttrpc]\n  address = \"{}.ttrpc\"", socket.display())?;
        writeln!(
            cfg,
            "[debug]\n  address = \"{}\"",
            d.join("debug.sock").display()
        )?;
        writeln!(cfg, "  level = \"debug\"")?;
        if b.cri {
            writeln!(cfg, "[plugins.\"io.containerd.grpc.v1.cri\"]")?;
            writeln!(cfg, "{}", b.cri_toml)?;
        }
        cfg.push_str(&b.extra_toml);
        std::fs::write(d.join("config.toml"), &cfg)?;
        let runtime_config = match &b.runtime_config {
            Some(rc) => {
                let p = d.join("runtime-config.toml");
                std::fs::write(&p, rc)?;
                Some(p)
            }
            None => None,
        };

        let child = spawn_containerd(d)?;
        let mut c = Containerd {
            dir: Some(dir),
            child: Some(child),
            socket,
            namespace: unique_id("tdm"),
            runtime_config,
        };
        c.wait_ready()?;
        Ok(c)
    }

    /// Stops containerd by pid (SIGTERM, bounded wait, then SIGKILL) and starts it again on the
    /// same config, root and state: shims and their containers keep running meanwhile, as on a
    /// node where containerd is restarted.
    pub fn restart(&mut self) -> Result<()> {
        if let Some(child) = self.child.take() {
            stop_child(child);
        }
        self.child = Some(spawn_containerd(self.dir())?);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut delay = Duration::from_millis(5);
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait()? {
                bail!("containerd exited ({st}) before serving: {}", self.log());
            }
            if self.socket.exists() {
                let o = self.ctr(&["version"]);
                if o.status.success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd not serving on {} after 20 s: {}",
                    self.socket.display(),
                    self.log()
                );
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    }

    /// The private temporary directory (root, state, sockets, logs).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    /// containerd's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("containerd.log")).unwrap_or_default()
    }

    /// Copies containerd's log to `<workspace>/target/tandem-test-logs/<namespace>.log` (it
    /// would go with the temp dir) and returns that path.
    pub fn keep_log(&self) -> PathBuf {
        let dir = workspace_dir().join("target/tandem-test-logs");
        let _ = std::fs::create_dir_all(&dir);
        let dest = dir.join(format!("{}.log", self.namespace));
        let _ = std::fs::copy(self.dir().join("containerd.log"), &dest);
        dest
    }

    /// The last `n` lines of containerd's log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// A `ctr` command with `-a <socket> -n <namespace>` already set.
    pub fn ctr_cmd<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("-a")
            .arg(&self.socket)
            .arg("-n")
            .arg(&self.namespace);
        cmd.args(args);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs `ctr` to completion.
    pub fn ctr<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        self.ctr_cmd(args).output().expect("spawning ctr")
    }

    /// Runs `ctr` and fails with its stderr (and the tail of containerd's log) if it fails.
    pub fn ctr_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let o = self.ctr(args);
        assert!(
            o.status.success(),
            "ctr {:?} failed ({}):\nstdout: {}\nstderr: {}\ncontainerd log tail:\n{}",
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect::<Vec<_>>(),
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            self.log_tail(30)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Imports the busybox image as [`BUSYBOX`].
    pub fn import_busybox(&self) {
        let tar = busybox_tar();
        self.ctr_ok(&[OsStr::new("images"), OsStr::new("import"), tar.as_os_str()]);
    }

    /// `ctr run --runtime <runtime()> [extra...] <image> <id> <cmd...>`, to completion.
    pub fn run(&self, extra: &[&str], image: &str, id: &str, cmd: &[&str]) -> Output {
        let rt = runtime();
        let mut args: Vec<&str> = vec!["run", "--runtime", &rt];
        args.extend_from_slice(extra);
        args.push(image);
        args.push(id);
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    /// `ctr run --rm` on busybox; returns (exit code, stdout, stderr).
    pub fn run_rm(&self, extra: &[&str], id: &str, cmd: &[&str]) -> (i32, String, String) {
        let mut e = vec!["--rm"];
        e.extend_from_slice(extra);
        let o = self.run(&e, BUSYBOX, id, cmd);
        (
            exit_code(&o.status),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// Starts a detached busybox container running `cmd` and waits until its task is RUNNING.
    pub fn run_detached(&self, extra: &[&str], id: &str, cmd: &[&str]) {
        let mut e = vec!["-d"];
        e.extend_from_slice(extra);
        let o = self.run(&e, BUSYBOX, id, cmd);
        assert!(
            o.status.success(),
            "ctr run -d {id} failed ({}): {}\ncontainerd log tail:\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr),
            self.log_tail(30)
        );
        self.wait_task_status(id, "RUNNING", Duration::from_secs(10));
    }

    /// Status column of `ctr task ls` for `id` (RUNNING, STOPPED, PAUSED, ...), None if absent.
    pub fn task_status(&self, id: &str) -> Option<String> {
        let out = String::from_utf8_lossy(&self.ctr(&["task", "ls"]).stdout).into_owned();
        out.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id)).then(|| f.last().unwrap_or(&"").to_string())
        })
    }

    /// Host pid of the task's init (`ctr task ls` PID column).
    pub fn task_pid(&self, id: &str) -> i32 {
        let out = self.ctr_ok(&["task", "ls"]);
        out.lines()
            .skip(1)
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&id)).then(|| f[1].parse().expect("pid column"))
            })
            .unwrap_or_else(|| panic!("task {id} not in `ctr task ls`:\n{out}"))
    }

    /// Waits (bounded) until `ctr task ls` shows `status` for `id`.
    pub fn wait_task_status(&self, id: &str, status: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.task_status(id);
            if s.as_deref() == Some(status) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "task {id} status {s:?}, wanted {status} within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills (SIGKILL), waits and removes a detached container (best effort, then checks).
    pub fn remove(&self, id: &str) {
        let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", "--all", id]);
        let _ = self.ctr(&["task", "delete", "-f", id]);
        self.ctr_ok(&["container", "rm", id]);
    }

    /// Everything `id` may have left behind; empty means clean.
    pub fn leaks(&self, id: &str) -> Vec<String> {
        let mut found = Vec::new();
        // Mounts under our temp dir or naming the id.
        let dir = self.dir().to_string_lossy().into_owned();
        if let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") {
            for l in mi.lines() {
                let mp = l.split_whitespace().nth(4).unwrap_or("");
                if names_id(mp, id) || (mp.starts_with(&dir) && mp.contains("/rootfs")) {
                    found.push(format!("mount {mp}"));
                }
            }
        }
        // Cgroups /<ns>/<id> in every hierarchy (v1 controllers, unified, or pure v2).
        for c in cgroup_dirs_for(&self.namespace, id) {
            found.push(format!("cgroup {}", c.display()));
        }
        // Processes naming the id (container processes with the id in their args, shims).
        for (pid, cmd) in processes_matching(id)
            .into_iter()
            .filter(|(_, cmd)| names_id(cmd, id))
        {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let state: Vec<&str> = status
                .lines()
                .filter(|l| {
                    l.starts_with("State:") || l.starts_with("PPid:") || l.starts_with("Threads:")
                })
                .collect();
            found.push(format!("process {pid} ({}): {cmd}", state.join(", ")));
        }
        // State directories.
        let state = self
            .dir()
            .join("state/io.containerd.runtime.v2.task")
            .join(&self.namespace)
            .join(id);
        for p in [
            state,
            PathBuf::from("/run/tandem").join(&self.namespace).join(id),
            PathBuf::from("/run/containerd/runc")
                .join(&self.namespace)
                .join(id),
        ] {
            if p.exists() {
                found.push(format!("state dir {}", p.display()));
            }
        }
        // containerd still knows the container or task.
        let containers =
            String::from_utf8_lossy(&self.ctr(&["containers", "ls", "-q"]).stdout).into_owned();
        if containers.lines().any(|l| l.trim() == id) {
            found.push(format!("containerd container {id}"));
        }
        if self.task_status(id).is_some() {
            found.push(format!("containerd task {id}"));
        }
        found
    }

    /// Asserts that none of `ids` left anything behind, giving asynchronous teardown (shim
    /// exit after delete) up to `TANDEM_LEAK_GRACE_SECS` (default 5 s).
    pub fn assert_no_leaks(&self, ids: &[&str]) {
        let grace = std::env::var("TANDEM_LEAK_GRACE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5);
        self.assert_no_leaks_within(ids, Duration::from_secs(grace));
    }

    /// [`Containerd::assert_no_leaks`] with an explicit grace for asynchronous teardown.
    pub fn assert_no_leaks_within(&self, ids: &[&str], grace: Duration) {
        let t0 = Instant::now();
        let deadline = t0 + grace;
        loop {
            let leaks: Vec<String> = ids.iter().flat_map(|id| self.leaks(id)).collect();
            if leaks.is_empty() {
                if t0.elapsed() > Duration::from_secs(1) {
                    eprintln!("leak check: clean only after {:?}", t0.elapsed());
                }
                return;
            }
            if Instant::now() > deadline {
                let shown = if ids.len() > 5 {
                    format!(
                        "{} containers ({} .. {})",
                        ids.len(),
                        ids[0],
                        ids[ids.len() - 1]
                    )
                } else {
                    format!("{ids:?}")
                };
                let kept = self.keep_log();
                panic!(
                    "leaks after {shown}:\n  {}\ncontainerd log (whole: {}) tail:\n{}",
                    leaks.join("\n  "),
                    kept.display(),
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Pids of shim processes serving this containerd (they carry `-address <socket>`).
    pub fn shim_pids(&self) -> Vec<i32> {
        let sock = self.socket.to_string_lossy().into_owned();
        processes_matching(&sock)
            .into_iter()
            .filter(|(_, c)| c.contains("containerd-shim"))
            .map(|(p, _)| p)
            .collect()
    }

    fn cleanup(&mut self) {
        // Kill and delete what tests left (their leak checks already ran).
        let tasks = String::from_utf8_lossy(&self.ctr(&["task", "ls", "-q"]).stdout).into_owned();
        for t in tasks.lines().map(str::trim).filter(|t| !t.is_empty()) {
            let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", "--all", t]);
            let _ = self.ctr(&["task", "delete", "-f", t]);
        }
        let cs =
            String::from_utf8_lossy(&self.ctr(&["containers", "ls", "-q"]).stdout).into_owned();
        for c in cs.lines().map(str::trim).filter(|c| !c.is_empty()) {
            let _ = self.ctr(&["containers", "rm", c]);
        }
        let shims = self.shim_pids();
        if let Some(child) = self.child.take() {
            stop_child(child);
        }
        for p in shims.into_iter().chain(self.shim_pids()) {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        // Namespace cgroups: children first, then /<ns>.
        for root in cgroup_hierarchies() {
            let ns = root.join(&self.namespace);
            if let Ok(rd) = std::fs::read_dir(&ns) {
                for e in rd.flatten() {
                    if e.path().is_dir() {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(&ns);
        }
        if let Some(dir) = self.dir.take() {
            unmount_under(dir.path());
            let _ = dir.close();
        }
    }
}

/// Starts containerd on `<dir>/config.toml`, logging (appending) to `<dir>/containerd.log`, with
/// the shim's directory first on its PATH.
fn spawn_containerd(dir: &Path) -> Result<Child> {
    let path = format!(
        "{}:{}",
        shim_bin_dir().display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    );
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("containerd.log"))?;
    Command::new("containerd")
        .arg("--config")
        .arg(dir.join("config.toml"))
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("spawning containerd")
}

/// SIGTERM, up to 5 s to exit, then SIGKILL; always reaped.
fn stop_child(mut child: Child) {
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Every cgroup hierarchy root: /sys/fs/cgroup/<controller> (v1), /sys/fs/cgroup/unified
/// (hybrid), or /sys/fs/cgroup itself (pure v2).
pub fn cgroup_hierarchies() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return vec![base.to_path_buf()];
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(base)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir() && !p.is_symlink())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Existing cgroup directories `/<ns>/<id>` in all hierarchies.
pub fn cgroup_dirs_for(ns: &str, id: &str) -> Vec<PathBuf> {
    cgroup_hierarchies()
        .into_iter()
        .map(|h| h.join(ns).join(id))
        .filter(|p| p.exists())
        .collect()
}

/// Path of the memory controller's cgroup dir for `/<ns>/<id>` (v1 memory or v2).
pub fn memory_cgroup(ns: &str, id: &str) -> PathBuf {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        base.join(ns).join(id)
    } else {
        base.join("memory").join(ns).join(id)
    }
}

/// (pid, cmdline) of processes other than this one whose cmdline contains `needle`.
pub fn processes_matching(needle: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let mut buf = Vec::new();
        if std::fs::File::open(e.path().join("cmdline"))
            .and_then(|mut f| f.read_to_end(&mut buf))
            .is_err()
        {
            continue;
        }
        let cmd = String::from_utf8_lossy(&buf).replace('\0', " ");
        // `ctr` processes of this test name ids in their args too; only count the others.
        if cmd.contains(needle) && !cmd.starts_with("ctr ") {
            v.push((pid, cmd.trim_end().to_string()));
        }
    }
    v
}

/// True when `hay` names `id` as a whole: an occurrence not run into by more id characters
/// (`cycle-1` is not named by `cycle-12`), so one test's ids never count another's leftovers.
pub fn names_id(hay: &str, id: &str) -> bool {
    if id.is_empty() {
        return false;
    }
    let is_id_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    hay.match_indices(id).any(|(at, _)| {
        let before = hay[..at].chars().next_back();
        let after = hay[at + id.len()..].chars().next();
        !before.is_some_and(is_id_char) && !after.is_some_and(is_id_char)
    })
}

/// Unmounts (lazily, deepest first) every mount point under `dir`.
pub fn unmount_under(dir: &Path) {
    let d = dir.to_string_lossy().into_owned();
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mps: BTreeSet<String> = BTreeSet::new();
    for l in mi.lines() {
        if let Some(mp) = l.split_whitespace().nth(4) {
            if mp == d || mp.starts_with(&format!("{d}/")) {
                mps.insert(mp.to_string());
            }
        }
    }
    for mp in mps.iter().rev() {
        let _ = nix::mount::umount2(mp.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// State of a process from /proc/<pid>/stat (R, S, D, T, Z...).
pub fn proc_state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = s.rsplit_once(") ")?.1;
    after.chars().next()
}

/// Cumulative user+system ticks of a process.
pub fn proc_cpu_ticks(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = s.rsplit_once(") ")?.1.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Default OCI spec from `ctr oci spec`, adapted to a plain rootfs at `rootfs`, `args`, and
/// cgroupsPath `/<ns>/<id>` (what `ctr run` would set).
pub fn base_spec(c: &Containerd, id: &str, rootfs: &Path, args: &[&str]) -> serde_json::Value {
    let out = c.ctr_ok(&["oci", "spec"]);
    let mut spec: serde_json::Value = serde_json::from_str(&out).expect("ctr oci spec is JSON");
    spec["root"] = serde_json::json!({"path": rootfs, "readonly": false});
    spec["process"]["args"] = serde_json::json!(args);
    spec["process"]["env"] =
        serde_json::json!(["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]);
    spec["linux"]["cgroupsPath"] = serde_json::json!(format!("/{}/{}", c.namespace, id));
    spec
}

/// Writes a spec to `<containerd dir>/<id>.json` and runs it with `ctr run --rm --config`.
/// Returns (exit code, stdout, stderr).
pub fn run_spec(c: &Containerd, id: &str, spec: &serde_json::Value) -> (i32, String, String) {
    let path = c.dir().join(format!("{id}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(spec).unwrap()).unwrap();
    let rt = runtime();
    let o = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        &rt,
        "--config",
        path.to_str().unwrap(),
        id,
    ]);
    (
        exit_code(&o.status),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[cfg(test)]
mod names_id_tests {
    use super::names_id;

    #[test]
    fn whole_ids_only() {
        assert!(names_id("shim -id cycle-7-1x start", "cycle-7-1x"));
        assert!(names_id("/run/x/cycle-7-1x/rootfs", "cycle-7-1x"));
        assert!(!names_id("shim -id cycle-7-12x start", "cycle-7-1"));
        assert!(!names_id("shim -id cycle-7-199", "cycle-7-19"));
        assert!(!names_id("anything", ""));
    }
}
