//! ContainerPod: the pod's containers run as namespaced Linux containers on the host, through
//! the tandem-oci engine. Engine calls block, so they run on tokio's blocking threads.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tandem_oci::{Container, CreateRequest, Engine, EngineConfig, LinuxResources, Process, Stats};
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::{
    CreateOpts, Error, ExecOpts, ExitInfo, PidInfo, Pod, PodContext, PodEvent, ProcessState,
    Result, Status,
};
use crate::config::{Userns as UsernsConfig, UsernsMode};
use crate::idmap::{IdAllocator, IdRange};
use crate::io::{self, ProcessIo, StdioPaths};
use crate::reaper::Exit;
use crate::rootfs;
use crate::state::Record;
use crate::userns;

/// How long an exit waits for the terminal output to be copied out.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Other(format!("blocking task: {e}")))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcStatus {
    Created,
    Running,
    Stopped,
}

struct ProcInner {
    pid: i32,
    status: ProcStatus,
    io: ProcessIo,
}

/// One process: a container's init or an exec'd process.
struct Proc {
    exec_id: Option<String>,
    stdio: StdioPaths,
    /// The process spec of an exec, run at its start.
    spec: Option<Process>,
    inner: tokio::sync::Mutex<ProcInner>,
    exit: watch::Sender<Option<ExitInfo>>,
}

impl Proc {
    fn new(exec_id: Option<String>, stdio: StdioPaths, spec: Option<Process>) -> Proc {
        Proc {
            exec_id,
            stdio,
            spec,
            inner: tokio::sync::Mutex::new(ProcInner {
                pid: 0,
                status: ProcStatus::Created,
                io: ProcessIo::default(),
            }),
            exit: watch::channel(None).0,
        }
    }

    fn exited(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit.subscribe();
        let r = rx.wait_for(|e| e.is_some()).await;
        match r {
            Ok(e) => e.expect("waited for Some"),
            // the sender lives as long as self
            Err(_) => unreachable!("exit sender dropped while borrowed"),
        }
    }

    /// Record the exit once the reaper reports it (and the terminal output is out).
    fn watch_exit(self: &Arc<Self>, rx: oneshot::Receiver<Exit>) {
        let p = self.clone();
        tokio::spawn(async move {
            let Ok(exit) = rx.await else { return };
            let waiter = p.inner.lock().await.io.output_waiter();
            io::wait_output(waiter, OUTPUT_DRAIN).await;
            let mut inner = p.inner.lock().await;
            inner.status = ProcStatus::Stopped;
            inner.io.close_stdin();
            drop(inner);
            p.exit.send_replace(Some(ExitInfo {
                pid: exit.pid as u32,
                code: exit.code as u32,
                at: exit.at,
            }));
        });
    }
}

struct Ctr {
    id: String,
    bundle: PathBuf,
    engine: Arc<Container>,
    record: Record,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    paused: AtomicBool,
    oom: Mutex<Option<JoinHandle<()>>>,
    /// The cgroup's OOM kill count already reported (or present at create).
    oom_seen: Arc<AtomicU64>,
}

impl Ctr {
    fn proc(&self, exec_id: Option<&str>) -> Result<Arc<Proc>> {
        match exec_id {
            None => Ok(self.init.clone()),
            Some(e) => self
                .execs
                .lock()
                .expect("execs poisoned")
                .get(e)
                .cloned()
                .ok_or_else(|| {
                    Error::NotFound(format!("container {}: exec {e} not found", self.id))
                }),
        }
    }
}

pub struct ContainerPod {
    engine: Engine,
    ctx: PodContext,
    containers: Mutex<HashMap<String, Arc<Ctr>>>,
    creating: Mutex<HashSet<String>>,
    userns_cfg: UsernsConfig,
    /// The pod's user namespace range when the shim gave it one.
    userns: Mutex<Option<PodUserns>>,
}

/// The user namespace the shim gave the pod: `owner` (the sandbox, or the only container of a
/// plain `ctr run` pod) holds the range `range` under the allocator key `key`.
#[derive(Debug, Clone)]
struct PodUserns {
    key: String,
    owner: String,
    range: IdRange,
}

/// What `prepare_userns` did to a container's spec.
#[derive(Debug)]
enum UsernsPrep {
    /// Nothing (policy off, mappings given, or not a pod of ours).
    Nothing,
    /// A new user namespace with a freshly allocated range; `old_netns` is the network
    /// namespace CRI made (in the host user namespace) that the container no longer joins.
    Allocated { old_netns: Option<String> },
    /// Joins the sandbox's user namespace.
    Joined,
}

impl ContainerPod {
    pub fn new(ctx: PodContext, userns_cfg: UsernsConfig) -> Result<ContainerPod> {
        let exe = std::env::current_exe()
            .map_err(|e| Error::Other(format!("current executable: {e}")))?;
        let engine = Engine::new(EngineConfig::new(ctx.state.engine_root(), exe));
        Ok(ContainerPod {
            engine,
            ctx,
            containers: Mutex::new(HashMap::new()),
            creating: Mutex::new(HashSet::new()),
            userns_cfg,
            userns: Mutex::new(None),
        })
    }

    /// Give the container its user namespace per the `[userns]` policy, rewriting the bundle's
    /// config.json. The pod's range is allocated (on disk, under the allocator's lock) before
    /// anything else is made for the pod.
    async fn prepare_userns(&self, id: &str, bundle: &std::path::Path) -> Result<UsernsPrep> {
        if self.userns_cfg.mode == UsernsMode::Off {
            return Ok(UsernsPrep::Nothing);
        }
        // a missing or malformed config.json is the engine's to report
        let Ok(mut spec) = userns::read_spec(bundle) else {
            return Ok(UsernsPrep::Nothing);
        };
        if userns::spec_userns(&spec) == userns::SpecUserns::Given {
            tracing::info!(id, "user namespace as given in the spec");
            return Ok(UsernsPrep::Nothing);
        }
        let raw = serde_json::to_vec(&spec).unwrap_or_default();
        let pod_id = crate::bootstrap::grouping_id(id, &raw);
        let bundle = bundle.to_path_buf();
        if pod_id != id {
            // a CRI container: into the sandbox's user namespace
            let owner = self.userns.lock().expect("userns poisoned").clone();
            let sandbox = self
                .containers
                .lock()
                .expect("containers poisoned")
                .get(&pod_id)
                .cloned();
            let (Some(owner), Some(sandbox)) = (owner, sandbox) else {
                return Ok(UsernsPrep::Nothing);
            };
            if owner.owner != pod_id || sandbox.record.pid <= 0 {
                return Ok(UsernsPrep::Nothing);
            }
            let path = PathBuf::from(format!("/proc/{}/ns/user", sandbox.record.pid));
            userns::add_join_userns(&mut spec, &path, owner.range)
                .and_then(|_| userns::open_bundle(&bundle, owner.range.start))
                .and_then(|_| userns::open_cri_dirs(&spec).map(|_| ()))
                .and_then(|_| userns::write_spec(&bundle, &spec))
                .map_err(|e| {
                    Error::InvalidArgument(format!("container {id}: user namespace: {e}"))
                })?;
            tracing::info!(id, pod = pod_id, path = %path.display(), "joins the pod's user namespace");
            return Ok(UsernsPrep::Joined);
        }
        let key = userns::pod_key(&self.ctx.namespace, id);
        let pool = self.userns_cfg.pool();
        let k = key.clone();
        let range = blocking(move || IdAllocator::new(userns::state_dir(), pool)?.allocate(&k))
            .await?
            .map_err(|e| {
                Error::FailedPrecondition(format!("container {id}: user namespace: {e}"))
            })?;
        let release = |e: String| {
            if let Err(re) =
                IdAllocator::new(userns::state_dir(), pool).and_then(|a| a.release(&key))
            {
                tracing::warn!(id, "user namespace range: {re}");
            }
            Error::InvalidArgument(format!("container {id}: user namespace: {e}"))
        };
        let old_netns = userns::add_new_userns(&mut spec, range).map_err(release)?;
        userns::open_bundle(&bundle, range.start)
            .and_then(|_| userns::open_cri_dirs(&spec).map(|_| ()))
            .and_then(|_| userns::write_spec(&bundle, &spec))
            .map_err(release)?;
        tracing::info!(
            id,
            host_start = range.start,
            size = range.size,
            ?old_netns,
            "pod user namespace"
        );
        *self.userns.lock().expect("userns poisoned") = Some(PodUserns {
            key,
            owner: id.to_string(),
            range,
        });
        Ok(UsernsPrep::Allocated { old_netns })
    }

    /// Give the pod's range back when `id` holds it.
    async fn release_userns(&self, id: &str) {
        let held = {
            let mut g = self.userns.lock().expect("userns poisoned");
            match &*g {
                Some(u) if u.owner == id => g.take(),
                _ => None,
            }
        };
        let Some(u) = held else { return };
        let pool = self.userns_cfg.pool();
        let key = u.key.clone();
        match blocking(move || IdAllocator::new(userns::state_dir(), pool)?.release(&key)).await {
            Ok(Ok(_)) => tracing::info!(
                id,
                host_start = u.range.start,
                "user namespace range released"
            ),
            Ok(Err(e)) => tracing::warn!(id, "user namespace range: {e}"),
            Err(e) => tracing::warn!(id, "user namespace range: {e}"),
        }
    }

    fn ctr(&self, id: &str) -> Result<Arc<Ctr>> {
        self.containers
            .lock()
            .expect("containers poisoned")
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id} not found")))
    }

    /// Undo the shim's part of a create (the engine undoes its own).
    async fn undo(&self, record: &Record) {
        if let Some(target) = record.rootfs_target.clone() {
            match blocking(move || rootfs::unmount(&target)).await {
                Ok(Err(e)) => tracing::warn!("{e}"),
                Err(e) => tracing::warn!("{e}"),
                Ok(Ok(())) => {}
            }
        }
        if let Err(e) = self.ctx.state.remove(&record.id) {
            tracing::warn!("{e}");
        }
    }

    async fn create_inner(&self, opts: CreateOpts) -> Result<u32> {
        let id = opts.id.clone();
        let prep = self.prepare_userns(&id, &opts.bundle).await?;
        let old_netns = match &prep {
            UsernsPrep::Allocated { old_netns } => old_netns.clone(),
            _ => None,
        };
        let r = self.create_made(opts, old_netns).await;
        if r.is_err() {
            self.release_userns(&id).await;
        }
        r
    }

    async fn create_made(&self, opts: CreateOpts, old_netns: Option<String>) -> Result<u32> {
        let id = opts.id.clone();
        let mut record = Record {
            id: id.clone(),
            bundle: opts.bundle.clone(),
            rootfs_target: (!opts.mounts.is_empty()).then(|| opts.bundle.join("rootfs")),
            mounts: opts.mounts.clone(),
            pid: 0,
        };
        self.ctx
            .state
            .save(&record)
            .map_err(|e| Error::Other(e.to_string()))?;
        if let Some(target) = record.rootfs_target.clone() {
            let mounts = record.mounts.clone();
            let r = blocking(move || rootfs::mount_all(&mounts, &target)).await;
            let r = match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(Error::Other(e.to_string())),
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                // mount_all unmounts what it made
                let _ = self.ctx.state.remove(&id);
                return Err(e);
            }
        }
        let mut prepared = match io::prepare(&opts.stdio) {
            Ok(p) => p,
            Err(e) => {
                self.undo(&record).await;
                return Err(Error::Other(format!("container {id}: {e}")));
            }
        };
        let stdio = tandem_oci::Stdio {
            stdin: prepared.stdin.take(),
            stdout: prepared.stdout.take(),
            stderr: prepared.stderr.take(),
        };
        let engine = self.engine.clone();
        let (cid, bundle) = (id.clone(), opts.bundle.clone());
        let created = blocking(move || {
            engine.create(CreateRequest {
                id: &cid,
                bundle: &bundle,
                stdio,
            })
        })
        .await;
        let (container, spawned) = match created {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                self.undo(&record).await;
                return Err(e.into());
            }
            Err(e) => {
                self.undo(&record).await;
                return Err(e);
            }
        };
        let pid = spawned.pid;
        let exit_rx = self.ctx.reaper.subscribe(pid);
        record.pid = pid;
        if let Err(e) = self.ctx.state.save(&record) {
            tracing::warn!("{e}");
        }
        let container = Arc::new(container);
        // A CRI sandbox in a new user namespace has a new network namespace too: CNI's
        // interfaces move over from the one CRI made.
        let moved = match old_netns {
            None => Ok(()),
            Some(old) => {
                let new = PathBuf::from(format!("/proc/{pid}/ns/net"));
                let reaper = self.ctx.reaper.clone();
                let r =
                    blocking(move || userns::move_links(&reaper, std::path::Path::new(&old), &new))
                        .await
                        .and_then(|r| {
                            r.map_err(|e| Error::Other(format!("container {id}: pod network: {e}")))
                        });
                if r.is_ok() {
                    tracing::info!(id, "CNI interfaces moved into the pod's network namespace");
                }
                r
            }
        };
        let pio = match moved.and_then(|_| {
            prepared
                .attach(spawned.console)
                .map_err(|e| Error::Other(format!("container {id}: {e}")))
        }) {
            Ok(pio) => pio,
            Err(e) => {
                self.ctx.reaper.unsubscribe(pid);
                let c = container.clone();
                if let Ok(Err(de)) = blocking(move || c.delete()).await {
                    tracing::warn!("cleanup of {id}: {de}");
                }
                self.undo(&record).await;
                return Err(e);
            }
        };
        let init = Arc::new(Proc::new(None, opts.stdio.clone(), None));
        {
            let mut inner = init.inner.try_lock().expect("fresh process");
            inner.pid = pid;
            inner.io = pio;
        }
        init.watch_exit(exit_rx);
        let ctr = Arc::new(Ctr {
            id: id.clone(),
            bundle: opts.bundle,
            engine: container,
            record,
            init,
            execs: Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
            oom: Mutex::new(None),
            oom_seen: Arc::new(AtomicU64::new(0)),
        });
        // watch from create on: a process may run out of memory right after start
        self.watch_oom(&ctr);
        self.containers
            .lock()
            .expect("containers poisoned")
            .insert(id, ctr);
        Ok(pid as u32)
    }

    fn watch_oom(&self, ctr: &Arc<Ctr>) {
        let c = ctr.engine.clone();
        let id = ctr.id.clone();
        let events = self.ctx.events.clone();
        let seen = ctr.oom_seen.clone();
        seen.store(c.oom_kills().unwrap_or(0), Ordering::SeqCst);
        let task = tokio::spawn(async move {
            let fd = match c.oom_notifier() {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::warn!(id, "no OOM notification: {e}");
                    return;
                }
            };
            if let Err(e) = watch_oom(&fd, &c, &id, &events, &seen).await {
                tracing::debug!(id, "OOM watch ended: {e}");
            }
        });
        *ctr.oom.lock().expect("oom poisoned") = Some(task);
    }
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Wait on the engine's OOM notifier (eventfd or inotify fd) and report each new OOM kill.
async fn watch_oom(
    fd: &OwnedFd,
    c: &Container,
    id: &str,
    events: &tokio::sync::mpsc::UnboundedSender<PodEvent>,
    seen: &AtomicU64,
) -> std::io::Result<()> {
    let fd = fd.try_clone()?;
    set_nonblocking(&fd)?;
    // SAFETY: fd is an OwnedFd the AsyncFd owns and nothing else closes.
    let afd = unsafe { AsyncFd::register(fd)? };
    let mut buf = [0u8; 4096];
    loop {
        let mut guard = afd.readable().await?;
        // drain the notification
        loop {
            match guard
                .try_io(|f| nix::unistd::read(f.get_ref(), &mut buf).map_err(std::io::Error::from))
            {
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => break,
            }
        }
        // the count may be bumped just after the notification: look again briefly
        for delay in [0u64, 20, 100] {
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            let now = match c.oom_kills() {
                Ok(n) => n,
                Err(_) => return Ok(()), // the cgroup is gone
            };
            if report_oom(now, seen, id, events) {
                break;
            }
        }
    }
}

/// Report an OOM kill when the cgroup's count `now` went past what was already reported.
/// Shared by the watcher and by delete, which may run before the watcher saw the notification.
fn report_oom(
    now: u64,
    seen: &AtomicU64,
    id: &str,
    events: &tokio::sync::mpsc::UnboundedSender<PodEvent>,
) -> bool {
    if seen.fetch_max(now, Ordering::SeqCst) >= now {
        return false;
    }
    tracing::info!(id, "OOM kill in container");
    let _ = events.send(PodEvent::Oom { id: id.to_string() });
    true
}

fn not_found_finished() -> Error {
    Error::NotFound("process already finished".into())
}

#[async_trait]
impl Pod for ContainerPod {
    async fn create(&self, opts: CreateOpts) -> Result<u32> {
        let id = opts.id.clone();
        {
            let have = self.containers.lock().expect("containers poisoned");
            let mut creating = self.creating.lock().expect("creating poisoned");
            if have.contains_key(&id) || !creating.insert(id.clone()) {
                return Err(Error::AlreadyExists(format!(
                    "container {id}: already exists"
                )));
            }
        }
        let r = self.create_inner(opts).await;
        self.creating.lock().expect("creating poisoned").remove(&id);
        r
    }

    async fn start(&self, id: &str, exec_id: Option<&str>) -> Result<u32> {
        let ctr = self.ctr(id)?;
        let p = ctr.proc(exec_id)?;
        let mut inner = p.inner.lock().await;
        if inner.status != ProcStatus::Created {
            return Err(Error::FailedPrecondition(format!(
                "container {id}{}: already started",
                exec_id.map(|e| format!(" exec {e}")).unwrap_or_default()
            )));
        }
        if p.exited().is_some() {
            return Err(Error::FailedPrecondition(format!(
                "container {id}: process exited before start"
            )));
        }
        match exec_id {
            None => {
                let c = ctr.engine.clone();
                blocking(move || c.start()).await??;
                inner.status = ProcStatus::Running;
                Ok(inner.pid as u32)
            }
            Some(exec_id) => {
                let spec = p.spec.clone().expect("exec has a spec");
                let mut prepared = io::prepare(&p.stdio)
                    .map_err(|e| Error::Other(format!("container {id} exec {exec_id}: {e}")))?;
                let stdio = tandem_oci::Stdio {
                    stdin: prepared.stdin.take(),
                    stdout: prepared.stdout.take(),
                    stderr: prepared.stderr.take(),
                };
                let c = ctr.engine.clone();
                let eid = exec_id.to_string();
                let spawned = blocking(move || c.exec(&eid, &spec, stdio)).await??;
                let exit_rx = self.ctx.reaper.subscribe(spawned.pid);
                inner.pid = spawned.pid;
                inner.status = ProcStatus::Running;
                match prepared.attach(spawned.console) {
                    Ok(pio) => inner.io = pio,
                    Err(e) => {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(spawned.pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                        p.watch_exit(exit_rx);
                        return Err(Error::Other(format!("container {id} exec {exec_id}: {e}")));
                    }
                }
                drop(inner);
                p.watch_exit(exit_rx);
                Ok(spawned.pid as u32)
            }
        }
    }

    async fn exec(&self, opts: ExecOpts) -> Result<()> {
        let ctr = self.ctr(&opts.id)?;
        if ctr.init.exited().is_some() {
            return Err(Error::FailedPrecondition(format!(
                "container {}: not running",
                opts.id
            )));
        }
        let mut execs = ctr.execs.lock().expect("execs poisoned");
        if execs.contains_key(&opts.exec_id) {
            return Err(Error::AlreadyExists(format!(
                "container {}: exec {} already exists",
                opts.id, opts.exec_id
            )));
        }
        let p = Proc::new(Some(opts.exec_id.clone()), opts.stdio, Some(opts.process));
        execs.insert(opts.exec_id, Arc::new(p));
        Ok(())
    }

    async fn kill(&self, id: &str, exec_id: Option<&str>, signal: u32, all: bool) -> Result<()> {
        let ctr = self.ctr(id)?;
        let p = ctr.proc(exec_id)?;
        let (pid, status) = {
            let inner = p.inner.lock().await;
            (inner.pid, inner.status)
        };
        if exec_id.is_some() {
            if pid <= 0 {
                return Err(Error::FailedPrecondition("process not created".into()));
            }
            if status == ProcStatus::Stopped || p.exited().is_some() {
                return Err(not_found_finished());
            }
            let sig = nix::sys::signal::Signal::try_from(signal as i32)
                .map_err(|_| Error::InvalidArgument(format!("invalid signal {signal}")))?;
            return nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).map_err(|e| {
                if e == nix::errno::Errno::ESRCH {
                    not_found_finished()
                } else {
                    Error::Other(format!("kill {pid} with {sig}: {e}"))
                }
            });
        }
        if p.exited().is_some() && !all {
            return Err(not_found_finished());
        }
        let c = ctr.engine.clone();
        let r = blocking(move || {
            if all && c.pids().map(|p| p.is_empty()).unwrap_or(true) {
                return Ok(false);
            }
            c.kill(signal as i32, all).map(|_| true)
        })
        .await?;
        match r {
            Ok(true) => Ok(()),
            Ok(false) => Err(not_found_finished()),
            Err(tandem_oci::Error::Container { msg, .. }) if msg == "not running" => {
                Err(not_found_finished())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn wait(&self, id: &str, exec_id: Option<&str>) -> Result<ExitInfo> {
        let p = self.ctr(id)?.proc(exec_id)?;
        Ok(p.wait().await)
    }

    async fn delete(&self, id: &str, exec_id: Option<&str>) -> Result<ExitInfo> {
        let ctr = self.ctr(id)?;
        if let Some(exec_id) = exec_id {
            let p = ctr.proc(Some(exec_id))?;
            let status = p.inner.lock().await.status;
            if status == ProcStatus::Running && p.exited().is_none() {
                return Err(Error::FailedPrecondition(format!(
                    "container {id} exec {exec_id}: cannot delete a running process"
                )));
            }
            ctr.execs.lock().expect("execs poisoned").remove(exec_id);
            p.inner.lock().await.io.shutdown();
            return Ok(p.exited().unwrap_or(ExitInfo {
                pid: 0,
                code: 0,
                at: SystemTime::now(),
            }));
        }
        let status = ctr.init.inner.lock().await.status;
        if status == ProcStatus::Running && ctr.init.exited().is_none() {
            return Err(Error::FailedPrecondition(format!(
                "container {id}: cannot delete a running container"
            )));
        }
        if let Some(t) = ctr.oom.lock().expect("oom poisoned").take() {
            t.abort();
        }
        // The watcher may not have run since the kill (containerd deletes right after the exit):
        // look at the count once more, before the cgroup goes.
        if let Ok(now) = ctr.engine.oom_kills() {
            report_oom(now, &ctr.oom_seen, &ctr.id, &self.ctx.events);
        }
        let c = ctr.engine.clone();
        blocking(move || c.delete()).await??;
        // a created-but-never-started init was killed by the engine: its exit is due now
        let exit = match ctr.init.exited() {
            Some(e) => e,
            None => tokio::time::timeout(Duration::from_secs(2), ctr.init.wait())
                .await
                .unwrap_or(ExitInfo {
                    pid: ctr.init.inner.lock().await.pid as u32,
                    code: 137,
                    at: SystemTime::now(),
                }),
        };
        let execs: Vec<Arc<Proc>> = ctr
            .execs
            .lock()
            .expect("execs poisoned")
            .drain()
            .map(|(_, p)| p)
            .collect();
        for p in execs.iter().chain(std::iter::once(&ctr.init)) {
            p.inner.lock().await.io.shutdown();
        }
        self.undo(&ctr.record).await;
        self.containers
            .lock()
            .expect("containers poisoned")
            .remove(id);
        // the pod is gone with its owner (the sandbox): its ID range goes back to the pool
        self.release_userns(id).await;
        Ok(exit)
    }

    async fn pause(&self, id: &str) -> Result<()> {
        let ctr = self.ctr(id)?;
        let c = ctr.engine.clone();
        blocking(move || c.pause()).await??;
        ctr.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn resume(&self, id: &str) -> Result<()> {
        let ctr = self.ctr(id)?;
        let c = ctr.engine.clone();
        blocking(move || c.resume()).await??;
        ctr.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    async fn stats(&self, id: &str) -> Result<Stats> {
        let c = self.ctr(id)?.engine.clone();
        Ok(blocking(move || c.stats()).await??)
    }

    async fn update(&self, id: &str, resources: LinuxResources) -> Result<()> {
        let c = self.ctr(id)?.engine.clone();
        Ok(blocking(move || c.update(&resources)).await??)
    }

    async fn pids(&self, id: &str) -> Result<Vec<PidInfo>> {
        let ctr = self.ctr(id)?;
        let c = ctr.engine.clone();
        let pids = blocking(move || c.pids()).await??;
        let execs: Vec<Arc<Proc>> = ctr
            .execs
            .lock()
            .expect("execs poisoned")
            .values()
            .cloned()
            .collect();
        let mut by_pid = HashMap::new();
        for p in execs {
            let pid = p.inner.lock().await.pid;
            if pid > 0 {
                by_pid.insert(pid, p.exec_id.clone());
            }
        }
        Ok(pids
            .into_iter()
            .map(|pid| PidInfo {
                pid: pid as u32,
                exec_id: by_pid.get(&pid).cloned().flatten(),
            })
            .collect())
    }

    async fn state(&self, id: &str, exec_id: Option<&str>) -> Result<ProcessState> {
        let ctr = self.ctr(id)?;
        let p = ctr.proc(exec_id)?;
        let (pid, status) = {
            let inner = p.inner.lock().await;
            (inner.pid, inner.status)
        };
        let exit = p.exited();
        let status = match (exit, status) {
            (Some(_), _) | (_, ProcStatus::Stopped) => Status::Stopped,
            (None, ProcStatus::Created) => Status::Created,
            (None, ProcStatus::Running) if ctr.paused.load(Ordering::SeqCst) => Status::Paused,
            (None, ProcStatus::Running) => Status::Running,
        };
        Ok(ProcessState {
            id: id.to_string(),
            exec_id: p.exec_id.clone(),
            bundle: ctr.bundle.clone(),
            pid: pid.max(0) as u32,
            status,
            stdio: p.stdio.clone(),
            exit,
        })
    }

    async fn close_io(&self, id: &str, exec_id: Option<&str>) -> Result<()> {
        let p = self.ctr(id)?.proc(exec_id)?;
        p.inner.lock().await.io.close_stdin();
        Ok(())
    }

    async fn resize_pty(
        &self,
        id: &str,
        exec_id: Option<&str>,
        width: u32,
        height: u32,
    ) -> Result<()> {
        let p = self.ctr(id)?.proc(exec_id)?;
        let inner = p.inner.lock().await;
        inner
            .io
            .resize(width, height)
            .map_err(|e| Error::FailedPrecondition(format!("container {id}: resize pty: {e}")))
    }

    async fn containers(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .containers
            .lock()
            .expect("containers poisoned")
            .keys()
            .cloned()
            .collect();
        ids.extend(
            self.creating
                .lock()
                .expect("creating poisoned")
                .iter()
                .cloned(),
        );
        ids
    }
}
