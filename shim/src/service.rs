//! The containerd Task API (ttrpc). The only place containerd's types appear: requests become
//! calls on the pod, answers and events go back in containerd's shapes. Never looks at the mode.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use containerd_shim::api::{
    CreateTaskRequest, CreateTaskResponse, DeleteRequest, Empty, ExecProcessRequest, KillRequest,
    PauseRequest, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest, StartResponse,
    StateRequest, StateResponse, Status as TaskStatus, WaitRequest, WaitResponse,
};
use containerd_shim::protos::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, DeleteResponse, PidsRequest, PidsResponse,
    StatsRequest, StatsResponse, UpdateTaskRequest,
};
use containerd_shim::protos::events::task::TaskIO;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{CodedInputStream, Message};
use containerd_shim::protos::shim::oci::ProcessDetails;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::ttrpc::{self, r#async::TtrpcContext};
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::{ExitSignal, TtrpcResult};
use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, Mode};
use crate::events::{self, timestamp, Publisher};
use crate::io::StdioPaths;
use crate::pod::{self, CreateOpts, ExecOpts, Pod, PodContext, PodEvent, Status};
use crate::state::MountRecord;

/// `ProcessDetails::descriptor().full_name()` (what `ctr task ps` decodes), as a constant.
const PROCESS_DETAILS_TYPE_URL: &str = "containerd.runc.v1.ProcessDetails";

fn status(code: ttrpc::Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// A pod error as containerd reads it: a status code it maps to its errdefs and the message
/// `ctr` prints.
fn to_ttrpc(e: pod::Error) -> ttrpc::Error {
    use pod::Error as E;
    use tandem_oci::Error as O;
    let code = match &e {
        E::NotFound(_) | E::Engine(O::NotFound(_)) => ttrpc::Code::NOT_FOUND,
        E::AlreadyExists(_) | E::Engine(O::Exists(_)) => ttrpc::Code::ALREADY_EXISTS,
        E::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
        E::InvalidArgument(_) | E::Engine(O::Spec { .. }) | E::Engine(O::Bundle { .. }) => {
            ttrpc::Code::INVALID_ARGUMENT
        }
        _ => ttrpc::Code::UNKNOWN,
    };
    status(code, e.to_string())
}

fn opt(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// The config file named by CreateTaskRequest.options: CRI and `ctr --runtime-config-path`
/// send `runtimeoptions.v1.Options { type_url = 1, config_path = 2, config_body = 3 }`.
fn config_path(options: Option<&Any>) -> Result<Option<PathBuf>, String> {
    let Some(any) = options else { return Ok(None) };
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    if name != "runtimeoptions.v1.Options" {
        if !any.type_url.is_empty() {
            tracing::debug!(type_url = any.type_url, "runtime options ignored");
        }
        return Ok(None);
    }
    let mut is = CodedInputStream::from_bytes(&any.value);
    let mut path = None;
    let bad = |e: containerd_shim::protos::protobuf::Error| format!("runtime options: {e}");
    while let Some(tag) = is.read_raw_tag_or_eof().map_err(bad)? {
        if tag >> 3 == 2 && tag & 7 == 2 {
            path = Some(is.read_string().map_err(bad)?);
        } else {
            let wt = containerd_shim::protos::protobuf::rt::WireType::new(tag & 7)
                .ok_or_else(|| format!("runtime options: bad wire type in tag {tag}"))?;
            is.skip_field(wt).map_err(bad)?;
        }
    }
    Ok(path.filter(|p| !p.is_empty()).map(PathBuf::from))
}

/// The pod's `io.tandem.*` annotations (CRI copies the pod's into every container's spec) must
/// be allowed by the handler's config: checked before anything is made for the container.
fn check_annotations(config: &Config, bundle: &str) -> TtrpcResult<()> {
    let path = std::path::Path::new(bundle).join("config.json");
    // A missing or malformed config.json is the engine's to report, with its own message.
    let Ok(text) = std::fs::read(&path) else {
        return Ok(());
    };
    let Ok(spec) = serde_json::from_slice::<serde_json::Value>(&text) else {
        return Ok(());
    };
    let annotations: HashMap<String, String> = spec
        .get("annotations")
        .and_then(|a| serde_json::from_value(a.clone()).ok())
        .unwrap_or_default();
    config
        .check_annotations(&annotations)
        .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))
}

fn stdio(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> StdioPaths {
    StdioPaths {
        stdin: stdin.into(),
        stdout: stdout.into(),
        stderr: stderr.into(),
        terminal,
    }
}

/// The Task service of one shim (one pod).
pub struct Service {
    ctx: PodContext,
    pod: tokio::sync::Mutex<Option<(Mode, Arc<dyn Pod>)>>,
    publisher: Arc<Publisher>,
    exit: Arc<ExitSignal>,
    /// Per process (id, exec id): opened once its start event is out, so that its TaskExit
    /// never overtakes its TaskStart.
    gates: Mutex<HashMap<(String, String), oneshot::Sender<()>>>,
}

impl Service {
    pub fn new(
        ctx: PodContext,
        mut pod_events: mpsc::UnboundedReceiver<PodEvent>,
        publisher: Arc<Publisher>,
        exit: Arc<ExitSignal>,
    ) -> Service {
        let p = publisher.clone();
        tokio::spawn(async move {
            while let Some(ev) = pod_events.recv().await {
                match ev {
                    PodEvent::Oom { id } => p.publish(events::oom(&id)),
                }
            }
        });
        Service {
            ctx,
            pod: tokio::sync::Mutex::new(None),
            publisher,
            exit,
            gates: Mutex::new(HashMap::new()),
        }
    }

    async fn pod(&self) -> TtrpcResult<Arc<dyn Pod>> {
        match &*self.pod.lock().await {
            Some((_, p)) => Ok(p.clone()),
            None => Err(status(ttrpc::Code::NOT_FOUND, "no container created yet")),
        }
    }

    /// The pod, made on the first create from the configuration.
    async fn pod_for(&self, config: &Config) -> TtrpcResult<Arc<dyn Pod>> {
        let mut slot = self.pod.lock().await;
        if let Some((mode, p)) = &*slot {
            if *mode != config.mode {
                return Err(status(
                    ttrpc::Code::INVALID_ARGUMENT,
                    format!(
                        "config mode {} does not match the pod's mode {mode}",
                        config.mode
                    ),
                ));
            }
            return Ok(p.clone());
        }
        let p = pod::new(config, self.ctx.clone()).map_err(to_ttrpc)?;
        *slot = Some((config.mode, p.clone()));
        Ok(p)
    }

    /// Publish the process's TaskExit once it exits, after its start event.
    fn publish_exit_later(&self, pod: Arc<dyn Pod>, id: &str, exec_id: Option<&str>) {
        let (tx, rx) = oneshot::channel();
        let key = (id.to_string(), exec_id.unwrap_or_default().to_string());
        self.gates.lock().expect("gates poisoned").insert(key, tx);
        let publisher = self.publisher.clone();
        let (id, exec_id) = (id.to_string(), exec_id.map(str::to_string));
        tokio::spawn(async move {
            let Ok(exit) = pod.wait(&id, exec_id.as_deref()).await else {
                return;
            };
            let _ = rx.await;
            // containerd tells the init's exit by its id being the container id
            let pid_id = exec_id.as_deref().unwrap_or(&id);
            publisher.publish(events::exit(&id, pid_id, exit.pid, exit.code, exit.at));
        });
    }

    fn open_gate(&self, id: &str, exec_id: &str) {
        let key = (id.to_string(), exec_id.to_string());
        if let Some(tx) = self.gates.lock().expect("gates poisoned").remove(&key) {
            let _ = tx.send(());
        }
    }
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        tracing::info!(id = req.id, bundle = req.bundle, "create");
        if !req.checkpoint.is_empty() {
            return Err(status(
                ttrpc::Code::UNIMPLEMENTED,
                "restore from a checkpoint is not supported",
            ));
        }
        let path = config_path(req.options.as_ref())
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e))?;
        let config = Config::load(path.as_deref())
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        check_annotations(&config, &req.bundle)?;
        let pod = self.pod_for(&config).await?;
        let opts = CreateOpts {
            id: req.id.clone(),
            bundle: PathBuf::from(&req.bundle),
            mounts: req
                .rootfs
                .iter()
                .map(|m| MountRecord {
                    kind: m.type_.clone(),
                    source: m.source.clone(),
                    options: m.options.clone(),
                })
                .collect(),
            stdio: stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal),
        };
        let pid = pod.create(opts).await.map_err(|e| {
            tracing::warn!(id = req.id, "create failed: {e}");
            to_ttrpc(e)
        })?;
        self.publish_exit_later(pod, &req.id, None);
        self.publisher.publish(events::create(
            &req.id,
            &req.bundle,
            req.rootfs.clone(),
            TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            },
            pid,
        ));
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        tracing::info!(id = req.id, exec_id = req.exec_id, "start");
        let pod = self.pod().await?;
        let r = pod.start(&req.id, opt(&req.exec_id)).await;
        let pid = match r {
            Ok(pid) => pid,
            Err(e) => {
                self.open_gate(&req.id, &req.exec_id);
                return Err(to_ttrpc(e));
            }
        };
        if req.exec_id.is_empty() {
            self.publisher.publish(events::start(&req.id, pid));
        } else {
            self.publisher
                .publish(events::exec_started(&req.id, &req.exec_id, pid));
        }
        self.open_gate(&req.id, &req.exec_id);
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        tracing::info!(id = req.id, exec_id = req.exec_id, "delete");
        let pod = self.pod().await?;
        let exit = pod
            .delete(&req.id, opt(&req.exec_id))
            .await
            .map_err(to_ttrpc)?;
        self.open_gate(&req.id, &req.exec_id);
        if req.exec_id.is_empty() {
            self.publisher
                .publish(events::delete(&req.id, exit.pid, exit.code, exit.at));
        }
        Ok(DeleteResponse {
            pid: exit.pid,
            exit_status: exit.code,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let pids = self.pod().await?.pids(&req.id).await.map_err(to_ttrpc)?;
        let mut processes = Vec::with_capacity(pids.len());
        for p in pids {
            let info = match p.exec_id {
                Some(exec_id) => {
                    let d = ProcessDetails {
                        exec_id,
                        ..Default::default()
                    };
                    Some(Any {
                        type_url: PROCESS_DETAILS_TYPE_URL.to_string(),
                        value: d.write_to_bytes().map_err(|e| {
                            status(ttrpc::Code::INTERNAL, format!("encode pid info: {e}"))
                        })?,
                        ..Default::default()
                    })
                }
                None => None,
            };
            processes.push(ProcessInfo {
                pid: p.pid,
                info: info.into(),
                ..Default::default()
            });
        }
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        tracing::info!(id = req.id, "pause");
        self.pod().await?.pause(&req.id).await.map_err(to_ttrpc)?;
        self.publisher.publish(events::paused(&req.id));
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        tracing::info!(id = req.id, "resume");
        self.pod().await?.resume(&req.id).await.map_err(to_ttrpc)?;
        self.publisher.publish(events::resumed(&req.id));
        Ok(Empty::new())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        tracing::info!(
            id = req.id,
            exec_id = req.exec_id,
            signal = req.signal,
            all = req.all,
            "kill"
        );
        self.pod()
            .await?
            .kill(&req.id, opt(&req.exec_id), req.signal, req.all)
            .await
            .map_err(to_ttrpc)?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        tracing::info!(id = req.id, exec_id = req.exec_id, "exec");
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.as_slice())
            .unwrap_or_default();
        let process: tandem_oci::Process = serde_json::from_slice(spec).map_err(|e| {
            status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("exec {}: process spec: {e}", req.exec_id),
            )
        })?;
        let pod = self.pod().await?;
        pod.exec(ExecOpts {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            process,
            stdio: stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal),
        })
        .await
        .map_err(to_ttrpc)?;
        self.publish_exit_later(pod, &req.id, Some(&req.exec_id));
        self.publisher
            .publish(events::exec_added(&req.id, &req.exec_id));
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        self.pod()
            .await?
            .resize_pty(&req.id, opt(&req.exec_id), req.width, req.height)
            .await
            .map_err(to_ttrpc)?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        if req.stdin {
            self.pod()
                .await?
                .close_io(&req.id, opt(&req.exec_id))
                .await
                .map_err(to_ttrpc)?;
        }
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        tracing::info!(id = req.id, "update");
        let value = req
            .resources
            .as_ref()
            .map(|a| a.value.as_slice())
            .unwrap_or_default();
        let resources =
            crate::update::decode(value).map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e))?;
        self.pod()
            .await?
            .update(&req.id, resources)
            .await
            .map_err(to_ttrpc)?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let exit = self
            .pod()
            .await?
            .wait(&req.id, opt(&req.exec_id))
            .await
            .map_err(to_ttrpc)?;
        Ok(WaitResponse {
            exit_status: exit.code,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let s = self
            .pod()
            .await?
            .state(&req.id, opt(&req.exec_id))
            .await
            .map_err(to_ttrpc)?;
        let st = match s.status {
            Status::Created => TaskStatus::CREATED,
            Status::Running => TaskStatus::RUNNING,
            Status::Paused => TaskStatus::PAUSED,
            Status::Stopped => TaskStatus::STOPPED,
        };
        Ok(StateResponse {
            id: s.exec_id.clone().unwrap_or_else(|| s.id.clone()),
            exec_id: s.exec_id.unwrap_or_default(),
            bundle: s.bundle.to_string_lossy().into_owned(),
            pid: s.pid,
            status: st.into(),
            stdin: s.stdio.stdin,
            stdout: s.stdio.stdout,
            stderr: s.stdio.stderr,
            terminal: s.stdio.terminal,
            exit_status: s.exit.map(|e| e.code).unwrap_or_default(),
            exited_at: s.exit.map(|e| timestamp(e.at)).into(),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let s = self.pod().await?.stats(&req.id).await.map_err(to_ttrpc)?;
        let any = crate::stats::to_any(&s)
            .map_err(|e| status(ttrpc::Code::INTERNAL, format!("encode metrics: {e}")))?;
        Ok(StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let task_pid = match self.pod().await {
            Ok(p) => p.state(&req.id, None).await.map(|s| s.pid).unwrap_or(0),
            Err(_) => 0,
        };
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        let left = match self.pod().await {
            Ok(p) => p.containers().await,
            Err(_) => vec![],
        };
        if left.is_empty() {
            tracing::info!("shutdown: no container left");
            self.exit.signal();
        } else {
            tracing::debug!(?left, "shutdown: containers left, staying");
        }
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime_options(path: &str) -> Any {
        // runtimeoptions.v1.Options { type_url = 1; config_path = 2; }
        let mut v = vec![0x0a, 3, b'a', b'b', b'c', 0x12, path.len() as u8];
        v.extend_from_slice(path.as_bytes());
        Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: v,
            ..Default::default()
        }
    }

    #[test]
    fn config_path_from_runtime_options() {
        let a = runtime_options("/etc/tandem/x.toml");
        assert_eq!(
            config_path(Some(&a)).unwrap(),
            Some(PathBuf::from("/etc/tandem/x.toml"))
        );
        assert_eq!(config_path(None).unwrap(), None);
        let other = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: vec![],
            ..Default::default()
        };
        assert_eq!(config_path(Some(&other)).unwrap(), None);
        let broken = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: vec![0x12, 50, b'x'],
            ..Default::default()
        };
        assert!(config_path(Some(&broken)).is_err());
    }

    #[test]
    fn process_details_type_url() {
        use containerd_shim::protos::protobuf::MessageFull;
        assert_eq!(
            PROCESS_DETAILS_TYPE_URL,
            ProcessDetails::descriptor().full_name()
        );
    }

    #[test]
    fn engine_errors_map_to_containerd_codes() {
        let e = to_ttrpc(pod::Error::NotFound("process already finished".into()));
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), ttrpc::Code::NOT_FOUND);
                assert_eq!(s.message(), "process already finished");
            }
            other => panic!("{other:?}"),
        }
        let e = to_ttrpc(pod::Error::Engine(tandem_oci::Error::Spec {
            field: "process.args".into(),
            msg: "empty".into(),
        }));
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), ttrpc::Code::INVALID_ARGUMENT);
                assert!(s.message().contains("process.args"), "{}", s.message());
            }
            other => panic!("{other:?}"),
        }
    }
}
