//! The `Pod` seam: the containers and processes of one pod, whatever runs them. `service`
//! turns containerd's requests into calls on a `Pod` and never knows which mode it drives.
//! Types here are our own (and oci-spec's), never containerd's.

pub mod container;
pub mod vm;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use tandem_oci::{LinuxResources, Process, Stats};
use tokio::sync::mpsc;

use crate::config::{Config, Mode};
use crate::io::StdioPaths;
use crate::reaper::Reaper;
use crate::state::{MountRecord, StateDir};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Engine(#[from] tandem_oci::Error),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a container is made from.
#[derive(Debug, Clone)]
pub struct CreateOpts {
    pub id: String,
    pub bundle: PathBuf,
    /// containerd's rootfs mounts, to be mounted at `<bundle>/rootfs` (none with `--rootfs`).
    pub mounts: Vec<MountRecord>,
    pub stdio: StdioPaths,
}

#[derive(Debug, Clone)]
pub struct ExecOpts {
    pub id: String,
    pub exec_id: String,
    pub process: Process,
    pub stdio: StdioPaths,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub pid: u32,
    /// Exit code, 128 + signal for a signal death.
    pub code: u32,
    pub at: SystemTime,
}

#[derive(Debug, Clone)]
pub struct ProcessState {
    pub id: String,
    pub exec_id: Option<String>,
    pub bundle: PathBuf,
    pub pid: u32,
    pub status: Status,
    pub stdio: StdioPaths,
    pub exit: Option<ExitInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PidInfo {
    pub pid: u32,
    /// The exec id when the pid is an exec'd process the pod started.
    pub exec_id: Option<String>,
}

/// Things that happen to a pod without a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodEvent {
    Oom { id: String },
}

/// The containers and processes of one pod. `exec_id` None addresses a container's init.
#[async_trait]
pub trait Pod: Send + Sync {
    /// Make the container; its process waits for `start`. Returns the init's pid.
    async fn create(&self, opts: CreateOpts) -> Result<u32>;
    /// Start the container's init or a process added by `exec`. Returns its pid.
    async fn start(&self, id: &str, exec_id: Option<&str>) -> Result<u32>;
    /// Add a process to a running container; it runs at `start(id, Some(exec_id))`.
    async fn exec(&self, opts: ExecOpts) -> Result<()>;
    async fn kill(&self, id: &str, exec_id: Option<&str>, signal: u32, all: bool) -> Result<()>;
    /// Wait for the process to exit (at once when it already has).
    async fn wait(&self, id: &str, exec_id: Option<&str>) -> Result<ExitInfo>;
    /// Remove a stopped process, or the container with everything made for it.
    async fn delete(&self, id: &str, exec_id: Option<&str>) -> Result<ExitInfo>;
    async fn pause(&self, id: &str) -> Result<()>;
    async fn resume(&self, id: &str) -> Result<()>;
    async fn stats(&self, id: &str) -> Result<Stats>;
    async fn update(&self, id: &str, resources: LinuxResources) -> Result<()>;
    async fn pids(&self, id: &str) -> Result<Vec<PidInfo>>;
    async fn state(&self, id: &str, exec_id: Option<&str>) -> Result<ProcessState>;
    async fn close_io(&self, id: &str, exec_id: Option<&str>) -> Result<()>;
    async fn resize_pty(
        &self,
        id: &str,
        exec_id: Option<&str>,
        width: u32,
        height: u32,
    ) -> Result<()>;
    /// Ids of the containers the pod holds.
    async fn containers(&self) -> Vec<String>;
}

/// What every pod mode needs from the shim.
#[derive(Clone)]
pub struct PodContext {
    pub state: StateDir,
    /// The containerd namespace the shim serves.
    pub namespace: String,
    pub reaper: Reaper,
    pub events: mpsc::UnboundedSender<PodEvent>,
}

/// The pod for a configuration. The only place that looks at the mode.
pub fn new(config: &Config, ctx: PodContext) -> Result<Arc<dyn Pod>> {
    match config.mode {
        Mode::Container => Ok(Arc::new(container::ContainerPod::new(ctx, config.userns)?)),
        Mode::Vm => Ok(Arc::new(vm::VmPod::new(config, ctx)?)),
    }
}
