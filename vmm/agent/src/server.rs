//! The agent API implementation (guest side).

use std::time::Duration;

use ttrpc::{Code, TtrpcContext};

use crate::command;
use crate::proto::{self, Agent};
use crate::reaper::Reaper;

/// What Shutdown does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// PID 1 in a VM: sync + reboot(RB_POWER_OFF).
    PowerOff,
    /// A process on a host (tests, development): exit(0).
    Exit,
}

/// Delay between replying to Shutdown and acting on it, so that the reply leaves the guest.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(50);

pub struct Service {
    reaper: Reaper,
    shutdown: ShutdownMode,
}

impl Service {
    pub fn new(reaper: Reaper, shutdown: ShutdownMode) -> Self {
        Self { reaper, shutdown }
    }
}

fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn unimplemented<T>(verb: &str) -> ttrpc::Result<T> {
    Err(status(
        Code::UNIMPLEMENTED,
        format!("{verb}: not implemented by this agent yet (container verbs need tandem-oci in the guest)"),
    ))
}

impl Agent for Service {
    fn version(
        &self,
        _: &TtrpcContext,
        _: proto::VersionRequest,
    ) -> ttrpc::Result<proto::VersionResponse> {
        Ok(proto::VersionResponse {
            agent_version: crate::AGENT_VERSION.to_string(),
            api_version: crate::API_VERSION,
            kernel_release: crate::guest::kernel_release(),
            ..Default::default()
        })
    }

    fn ping(
        &self,
        _: &TtrpcContext,
        req: proto::PingRequest,
    ) -> ttrpc::Result<proto::PingResponse> {
        Ok(proto::PingResponse {
            nonce: req.nonce,
            ..Default::default()
        })
    }

    fn run_command(
        &self,
        _: &TtrpcContext,
        req: proto::RunCommandRequest,
    ) -> ttrpc::Result<proto::RunCommandResponse> {
        let spec = command::Spec {
            argv: req.argv,
            env: req.env,
            stdin: req.stdin,
            timeout: (req.timeout_ms > 0).then(|| Duration::from_millis(req.timeout_ms.into())),
            max_output: (req.max_output_bytes > 0).then_some(req.max_output_bytes as usize),
        };
        tracing::info!(argv = ?spec.argv, "RunCommand");
        let o = command::run(&self.reaper, spec)
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("RunCommand: {e}")))?;
        Ok(proto::RunCommandResponse {
            exit_code: o.exit_code,
            signal: o.signal,
            stdout: o.stdout,
            stderr: o.stderr,
            stdout_truncated: o.stdout_truncated,
            stderr_truncated: o.stderr_truncated,
            timed_out: o.timed_out,
            ..Default::default()
        })
    }

    fn create_container(
        &self,
        _: &TtrpcContext,
        _: proto::CreateContainerRequest,
    ) -> ttrpc::Result<proto::CreateContainerResponse> {
        unimplemented("CreateContainer")
    }
    fn start_container(
        &self,
        _: &TtrpcContext,
        _: proto::ContainerRequest,
    ) -> ttrpc::Result<proto::StartContainerResponse> {
        unimplemented("StartContainer")
    }
    fn exec_process(
        &self,
        _: &TtrpcContext,
        _: proto::ExecProcessRequest,
    ) -> ttrpc::Result<proto::ExecProcessResponse> {
        unimplemented("ExecProcess")
    }
    fn signal_process(
        &self,
        _: &TtrpcContext,
        _: proto::SignalProcessRequest,
    ) -> ttrpc::Result<proto::Empty> {
        unimplemented("SignalProcess")
    }
    fn wait_process(
        &self,
        _: &TtrpcContext,
        _: proto::ProcessRequest,
    ) -> ttrpc::Result<proto::WaitProcessResponse> {
        unimplemented("WaitProcess")
    }
    fn read_stdout(
        &self,
        _: &TtrpcContext,
        _: proto::ReadStreamRequest,
    ) -> ttrpc::Result<proto::ReadStreamResponse> {
        unimplemented("ReadStdout")
    }
    fn read_stderr(
        &self,
        _: &TtrpcContext,
        _: proto::ReadStreamRequest,
    ) -> ttrpc::Result<proto::ReadStreamResponse> {
        unimplemented("ReadStderr")
    }
    fn write_stdin(
        &self,
        _: &TtrpcContext,
        _: proto::WriteStdinRequest,
    ) -> ttrpc::Result<proto::WriteStdinResponse> {
        unimplemented("WriteStdin")
    }
    fn close_stdin(
        &self,
        _: &TtrpcContext,
        _: proto::ProcessRequest,
    ) -> ttrpc::Result<proto::Empty> {
        unimplemented("CloseStdin")
    }
    fn resize_pty(
        &self,
        _: &TtrpcContext,
        _: proto::ResizePtyRequest,
    ) -> ttrpc::Result<proto::Empty> {
        unimplemented("ResizePty")
    }
    fn stats(
        &self,
        _: &TtrpcContext,
        _: proto::ContainerRequest,
    ) -> ttrpc::Result<proto::StatsResponse> {
        unimplemented("Stats")
    }
    fn pause_container(
        &self,
        _: &TtrpcContext,
        _: proto::ContainerRequest,
    ) -> ttrpc::Result<proto::Empty> {
        unimplemented("PauseContainer")
    }
    fn resume_container(
        &self,
        _: &TtrpcContext,
        _: proto::ContainerRequest,
    ) -> ttrpc::Result<proto::Empty> {
        unimplemented("ResumeContainer")
    }
    fn remove_container(
        &self,
        _: &TtrpcContext,
        _: proto::ContainerRequest,
    ) -> ttrpc::Result<proto::Empty> {
        unimplemented("RemoveContainer")
    }

    fn shutdown(&self, _: &TtrpcContext, _: proto::ShutdownRequest) -> ttrpc::Result<proto::Empty> {
        tracing::info!("Shutdown requested");
        let mode = self.shutdown;
        std::thread::spawn(move || {
            std::thread::sleep(SHUTDOWN_GRACE);
            match mode {
                ShutdownMode::PowerOff => crate::guest::power_off(),
                ShutdownMode::Exit => std::process::exit(0),
            }
        });
        Ok(proto::Empty::default())
    }
}

/// Start the ttrpc server on the unix socket `path` (removed first if stale).
pub fn start(path: &std::path::Path, service: Service) -> crate::Result<ttrpc::Server> {
    let _ = std::fs::remove_file(path);
    let methods = proto::create_agent(std::sync::Arc::new(service));
    let mut server = ttrpc::Server::new()
        .bind(&format!("unix://{}", path.display()))
        .map_err(|e| crate::Error::Port {
            name: path.display().to_string(),
            msg: format!("ttrpc bind: {e}"),
        })?
        .register_service(methods);
    server.start().map_err(|e| crate::Error::Port {
        name: path.display().to_string(),
        msg: format!("ttrpc start: {e}"),
    })?;
    Ok(server)
}
