//! Engine and Container: create, load, start, exec, signals, freezer, stats, delete.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cgroups::{self, Cgroup, Layout};
use crate::init::{CreateConfig, ExecConfig, InitConfig};
use crate::process::{spawn, SpawnReq};
use crate::rootfs::CgroupMount;
use crate::state::{is_alive, proc_start_time, State, EXEC_FIFO};
use crate::{
    spec, Container, CreateRequest, Engine, Error, LinuxResources, Process, Result, Spawned, Spec,
    Stats, Status, Stdio,
};

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

fn validate_id(id: &str) -> Result<()> {
    let bad = |msg: &str| {
        Err(Error::Container {
            id: id.to_string(),
            msg: msg.to_string(),
        })
    };
    if id.is_empty() {
        return bad("empty id");
    }
    if id == "." || id == ".." || id.contains('/') || id.contains('\0') {
        return bad("id must not contain '/' or NUL, nor be '.' or '..'");
    }
    if id.len() > 1024 {
        return bad("id longer than 1024 bytes");
    }
    Ok(())
}

fn cgroup_mounts(cg: &Cgroup) -> Vec<CgroupMount> {
    match &cg.layout {
        Layout::V2 { mount } => vec![CgroupMount {
            name: String::new(),
            host_dir: mount.join(&cg.rel),
            v2: true,
        }],
        Layout::V1 {
            hierarchies,
            unified,
        } => hierarchies
            .iter()
            .map(|h| (&h.mount, false))
            .chain(unified.iter().map(|u| (u, true)))
            .map(|(m, v2)| CgroupMount {
                name: m
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                host_dir: m.join(&cg.rel),
                v2,
            })
            .collect(),
    }
}

impl Engine {
    /// Load and validate `config.json`, record state on disk (before making any host resource),
    /// make the cgroup(s), spawn the init and return once the container process waits for
    /// `start`. On any error everything made so far is undone and the error names what was wrong.
    pub fn create(&self, req: CreateRequest<'_>) -> Result<(Container, Spawned)> {
        let id = req.id;
        validate_id(id)?;
        let bundle = std::path::absolute(req.bundle)
            .map_err(io(format!("bundle {}", req.bundle.display())))?;
        let (spec, rootfs) = spec::load(&bundle)?;
        let rootfs = fs::canonicalize(&rootfs).map_err(|e| Error::Bundle {
            path: rootfs.clone(),
            msg: format!("root.path: {e}"),
        })?;
        let linux = spec.linux().as_ref();
        let has_mntns = linux
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|n| {
                n.iter()
                    .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Mount)
            });
        if !has_mntns {
            return Err(Error::Spec {
                field: "linux.namespaces".into(),
                msg: "a mount namespace is required".into(),
            });
        }
        let rel = cgroups::rel_path(linux.and_then(|l| l.cgroups_path().as_deref()), id);
        let cgroup = Cgroup::new(&self.config().cgroup_root, &rel)?;
        let process = spec.process().clone().ok_or_else(|| Error::Spec {
            field: "process".into(),
            msg: "missing".into(),
        })?;
        let user_ns_new = linux
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|n| {
                n.iter().any(|n| {
                    n.typ() == oci_spec::runtime::LinuxNamespaceType::User && n.path().is_none()
                })
            });
        let uid_maps = linux
            .and_then(|l| l.uid_mappings().clone())
            .unwrap_or_default();
        let gid_maps = linux
            .and_then(|l| l.gid_mappings().clone())
            .unwrap_or_default();
        if user_ns_new && (uid_maps.is_empty() || gid_maps.is_empty()) {
            return Err(Error::Spec {
                field: "linux.uidMappings".into(),
                msg: "a new user namespace needs uidMappings and gidMappings".into(),
            });
        }

        let root = &self.config().state_root;
        fs::create_dir_all(root).map_err(io(format!("mkdir {}", root.display())))?;
        let dir = root.join(id);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                return Err(Error::Exists(id.to_string()))
            }
            Err(e) => return Err(io(format!("mkdir {}", dir.display()))(e)),
        }
        let state = State {
            id: id.to_string(),
            bundle: bundle.clone(),
            rootfs: rootfs.clone(),
            pid: 0,
            pid_start_time: 0,
            cgroup_root: self.config().cgroup_root.clone(),
            cgroup_rel: rel.clone(),
            cgroup_dirs: cgroup.dirs(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            spec: spec.clone(),
        };
        let mut container = Container {
            state,
            dir: dir.clone(),
            cgroup: Some(cgroup.clone()),
            init_exe: self.config().init_exe.clone(),
        };
        if let Err(e) = container.state.save(&dir) {
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        match self.create_inner(&mut container, req.stdio, process, uid_maps, gid_maps) {
            Ok(spawned) => Ok((container, spawned)),
            Err(e) => {
                if let Err(ce) = container.delete() {
                    tracing::warn!(id, "cleanup after failed create: {ce}");
                }
                Err(e)
            }
        }
    }

    fn create_inner(
        &self,
        c: &mut Container,
        stdio: Stdio,
        process: Process,
        uid_maps: Vec<oci_spec::runtime::LinuxIdMapping>,
        gid_maps: Vec<oci_spec::runtime::LinuxIdMapping>,
    ) -> Result<Spawned> {
        let fifo = c.dir.join(EXEC_FIFO);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o622))
            .map_err(|e| io(format!("mkfifo {}", fifo.display()))(e.into()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&fifo, fs::Permissions::from_mode(0o622))
                .map_err(io(format!("chmod {}", fifo.display())))?;
        }
        let cgroup = c.cgroup.clone().expect("create has a cgroup");
        // the kernel's wait before the init can be moved into its cgroups starts now, beside
        // making and configuring them and spawning the init (cgroups::prime_migration)
        let _ = cgroups::prime_migration(cgroup.layout.clone());
        cgroup.create()?;
        if let Some(res) = c
            .state
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
        {
            cgroup.apply(res, true)?;
        }
        let config = InitConfig::Create(CreateConfig {
            id: c.state.id.clone(),
            rootfs: c.state.rootfs.clone(),
            spec: c.state.spec.clone(),
            fifo,
            cgroups: cgroup_mounts(&cgroup),
        });
        let spawned = spawn(
            SpawnReq {
                init_exe: &self.config().init_exe,
                config: &config,
                stdio,
                terminal: process.terminal() == Some(true),
                cgroup: &cgroup,
                uid_maps,
                gid_maps,
                until_exec: false,
            },
            &mut |_| {},
        )?;
        c.state.pid = spawned.pid;
        c.state.pid_start_time = proc_start_time(spawned.pid)
            .map(|(s, _)| s)
            .ok_or_else(|| Error::Init(format!("container process {} vanished", spawned.pid)))?;
        c.state.save(&c.dir)?;
        Ok(spawned)
    }

    /// A container from its on-disk state (after a restart of the caller).
    pub fn load(&self, id: &str) -> Result<Container> {
        validate_id(id)?;
        let dir = self.config().state_root.join(id);
        let state = State::load(&dir, id)?;
        let cgroup = Cgroup::new(&state.cgroup_root, &state.cgroup_rel).ok();
        Ok(Container {
            state,
            dir,
            cgroup,
            init_exe: self.config().init_exe.clone(),
        })
    }

    /// Ids of the containers with state under the state root.
    pub fn list(&self) -> Result<Vec<String>> {
        let root = &self.config().state_root;
        let rd = match fs::read_dir(root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(io(format!("read dir {}", root.display()))(e)),
        };
        let mut ids: Vec<String> = rd
            .flatten()
            .filter(|e| e.path().join(crate::state::STATE_FILE).exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        ids.sort();
        Ok(ids)
    }
}

impl Container {
    pub fn id(&self) -> &str {
        &self.state.id
    }

    /// Host pid of the container's init process.
    pub fn pid(&self) -> i32 {
        self.state.pid
    }

    pub fn bundle(&self) -> &Path {
        &self.state.bundle
    }

    /// The validated spec the container was created from.
    pub fn spec(&self) -> &Spec {
        &self.state.spec
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Container {
            id: self.state.id.clone(),
            msg: msg.into(),
        }
    }

    fn cg(&self) -> Result<&Cgroup> {
        self.cgroup.as_ref().ok_or_else(|| {
            self.err(format!(
                "no cgroup layout under {}",
                self.state.cgroup_root.display()
            ))
        })
    }

    fn alive(&self) -> bool {
        is_alive(self.state.pid, self.state.pid_start_time)
    }

    pub fn status(&self) -> Result<Status> {
        if !self.alive() {
            return Ok(Status::Stopped);
        }
        if let Ok(cg) = self.cg() {
            if cg.is_frozen().unwrap_or(false) {
                return Ok(Status::Paused);
            }
        }
        if self.dir.join(EXEC_FIFO).exists() {
            Ok(Status::Created)
        } else {
            Ok(Status::Running)
        }
    }

    /// Let the init process exec the user's program.
    pub fn start(&self) -> Result<()> {
        let fifo = self.dir.join(EXEC_FIFO);
        if !fifo.exists() {
            return Err(self.err("not in created state (already started)"));
        }
        if !self.alive() {
            return Err(self.err("init process has exited; cannot start"));
        }
        let fd = nix::fcntl::open(
            &fifo,
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_NONBLOCK
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| io(format!("open {}", fifo.display()))(e.into()))?;
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut pfd = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
            let n = poll(&mut pfd, PollTimeout::from(100u16)).unwrap_or(0);
            if n > 0 {
                let mut b = [0u8; 1];
                match nix::unistd::read(&fd, &mut b) {
                    Ok(1) => break,
                    Ok(_) | Err(nix::errno::Errno::EAGAIN) => {}
                    Err(e) => return Err(io(format!("read {}", fifo.display()))(e.into())),
                }
            }
            if !self.alive() {
                return Err(self.err("init process exited before start"));
            }
            if Instant::now() > deadline {
                return Err(self.err("timed out waiting for the init to take the start signal"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = fs::remove_file(&fifo);
        Ok(())
    }

    /// Start another process in the container's namespaces and cgroup, with its own process
    /// spec (args, env, cwd, user, capabilities, terminal, ...). It runs at once (no start step).
    pub fn exec(&self, exec_id: &str, process: &Process, stdio: Stdio) -> Result<Spawned> {
        spec::validate_process(process, "process")?;
        if !self.alive() {
            return Err(self.err(format!("exec {exec_id}: container is not running")));
        }
        let cg = self.cg()?;
        if cg.is_frozen().unwrap_or(false) {
            return Err(self.err(format!("exec {exec_id}: container is paused")));
        }
        // as at create: the wait before the exec'd process can join the cgroups starts now
        let _ = cgroups::prime_migration(cg.layout.clone());
        let config = InitConfig::Exec(ExecConfig {
            pid: self.state.pid,
            process: process.clone(),
            spec: self.state.spec.clone(),
        });
        spawn(
            SpawnReq {
                init_exe: &self.init_exe,
                config: &config,
                stdio,
                terminal: process.terminal() == Some(true),
                cgroup: cg,
                uid_maps: vec![],
                gid_maps: vec![],
                until_exec: true,
            },
            &mut |_| {},
        )
        .map_err(|e| match e {
            Error::Init(m) => Error::Init(format!("exec {exec_id}: {m}")),
            e => e,
        })
    }

    /// Send `signal` to the init process, or to every process of the container when `all`.
    pub fn kill(&self, signal: i32, all: bool) -> Result<()> {
        let sig =
            Signal::try_from(signal).map_err(|_| self.err(format!("invalid signal {signal}")))?;
        if all {
            let pids = self.pids().unwrap_or_default();
            for p in pids {
                let _ = kill(Pid::from_raw(p), sig);
            }
            if sig == Signal::SIGKILL {
                if let Ok(cg) = self.cg() {
                    if cg.is_frozen().unwrap_or(false) {
                        cg.set_frozen(false)?;
                    }
                }
            }
            return Ok(());
        }
        if !self.alive() {
            return Err(self.err("not running"));
        }
        kill(Pid::from_raw(self.state.pid), sig)
            .map_err(|e| self.err(format!("kill {} with {sig}: {e}", self.state.pid)))?;
        if sig == Signal::SIGKILL {
            if let Ok(cg) = self.cg() {
                if cg.is_frozen().unwrap_or(false) {
                    cg.set_frozen(false)?;
                }
            }
        }
        Ok(())
    }

    /// Freeze every process of the container (freezer cgroup, v1 or v2).
    pub fn pause(&self) -> Result<()> {
        if !self.alive() {
            return Err(self.err("not running"));
        }
        self.cg()?.set_frozen(true)
    }

    pub fn resume(&self) -> Result<()> {
        self.cg()?.set_frozen(false)
    }

    /// Host pids of every process of the container.
    pub fn pids(&self) -> Result<Vec<i32>> {
        procs_of(&self.state.cgroup_dirs)
    }

    pub fn stats(&self) -> Result<Stats> {
        self.cg()?.stats()
    }

    /// Apply new resources (as kubelet's UpdateContainerResources sends them).
    pub fn update(&self, resources: &LinuxResources) -> Result<()> {
        spec::validate_resources(resources)?;
        self.cg()?.apply(resources, false)
    }

    /// An fd that becomes readable when the container's cgroup sees an OOM kill (v1: an
    /// eventfd registered through `cgroup.event_control`; v2: inotify on `memory.events`). After
    /// it fires, [`Container::oom_kills`] tells whether the count went up.
    pub fn oom_notifier(&self) -> Result<std::os::fd::OwnedFd> {
        self.cg()?.oom_notifier()
    }

    /// The OOM kill count of the container's memory cgroup.
    pub fn oom_kills(&self) -> Result<u64> {
        self.cg()?.oom_kills()
    }

    /// SIGKILL whatever is left of the container, remove its cgroup(s) and its state. Idempotent:
    /// works after a crash of the caller (from [`Engine::load`]) and on partly made containers.
    pub fn delete(&self) -> Result<()> {
        if self.alive() {
            let _ = kill(Pid::from_raw(self.state.pid), Signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut thawed = false;
        loop {
            let pids = procs_of(&self.state.cgroup_dirs).unwrap_or_default();
            if pids.is_empty() {
                break;
            }
            for p in &pids {
                let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
            }
            if !thawed {
                if let Ok(cg) = self.cg() {
                    if cg.is_frozen().unwrap_or(false) {
                        let _ = cg.set_frozen(false);
                    }
                }
                thawed = true;
            }
            if Instant::now() > deadline {
                return Err(self.err(format!(
                    "processes {pids:?} still in the cgroup after SIGKILL"
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        cgroups::remove_dirs(&self.state.cgroup_dirs, Duration::from_secs(2))?;
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(format!("remove {}", self.dir.display()))(e)),
        }
    }
}

/// Pids in the cgroup.procs of each existing directory.
fn procs_of(dirs: &[PathBuf]) -> Result<Vec<i32>> {
    let mut pids = Vec::new();
    for d in dirs {
        match fs::read_to_string(d.join("cgroup.procs")) {
            Ok(s) => pids.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok())),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("read {}", d.join("cgroup.procs").display()))(e)),
        }
    }
    pids.sort_unstable();
    pids.dedup();
    Ok(pids)
}
