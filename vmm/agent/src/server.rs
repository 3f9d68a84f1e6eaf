//! The agent API implementation (guest side).

use std::time::Duration;

use ttrpc::{Code, TtrpcContext};

use crate::command;
use crate::containers::{Containers, FileReq, MountReq, VerbError};
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
    containers: Containers,
    shutdown: ShutdownMode,
}

impl Service {
    pub fn new(reaper: Reaper, containers: Containers, shutdown: ShutdownMode) -> Self {
        Self {
            reaper,
            containers,
            shutdown,
        }
    }

    fn read_stream(
        &self,
        req: proto::ReadStreamRequest,
        stderr: bool,
    ) -> ttrpc::Result<proto::ReadStreamResponse> {
        let wait = match req.wait_ms {
            0 => Duration::from_secs(1),
            ms => Duration::from_millis(ms.min(5000).into()),
        };
        let max = if req.max_bytes == 0 {
            64 * 1024
        } else {
            req.max_bytes as usize
        };
        let (data, eof) = self
            .containers
            .read(&req.container_id, &req.exec_id, stderr, max, wait)
            .map_err(rpc)?;
        Ok(proto::ReadStreamResponse {
            data,
            eof,
            ..Default::default()
        })
    }
}

fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn rpc(e: VerbError) -> ttrpc::Error {
    status(e.code, e.msg)
}

/// Longest a WaitProcess call blocks a server thread.
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

impl Agent for Service {
    fn version(
        &self,
        _: &TtrpcContext,
        _: proto::VersionRequest,
    ) -> ttrpc::Result<proto::VersionResponse> {
        tracing::info!("Version");
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
        req: proto::CreateContainerRequest,
    ) -> ttrpc::Result<proto::CreateContainerResponse> {
        tracing::info!(id = %req.container_id, "CreateContainer");
        let rootfs: Vec<MountReq> = req
            .rootfs
            .iter()
            .map(|m| MountReq {
                fstype: m.type_.clone(),
                source: m.source.clone(),
                target: m.target.clone(),
                options: m.options.clone(),
            })
            .collect();
        let files: Vec<FileReq> = req
            .files
            .iter()
            .map(|f| FileReq {
                path: f.path.clone(),
                content: f.content.clone(),
                mode: f.mode,
            })
            .collect();
        let shm: Vec<crate::podshare::ShmReq> = req
            .pod_shm
            .iter()
            .map(|s| crate::podshare::ShmReq {
                name: s.name.clone(),
                size_bytes: s.size_bytes,
            })
            .collect();
        let pid = self
            .containers
            .create_with_shared(
                &req.container_id,
                &req.oci_spec_json,
                &rootfs,
                &files,
                &shm,
                req.stdin,
            )
            .map_err(rpc)?;
        tracing::info!(id = %req.container_id, pid, "CreateContainer done");
        Ok(proto::CreateContainerResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    fn start_container(
        &self,
        _: &TtrpcContext,
        req: proto::ContainerRequest,
    ) -> ttrpc::Result<proto::StartContainerResponse> {
        tracing::info!(id = %req.container_id, "StartContainer");
        let pid = self.containers.start(&req.container_id).map_err(rpc)?;
        tracing::info!(id = %req.container_id, pid, "StartContainer done");
        Ok(proto::StartContainerResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    fn exec_process(
        &self,
        _: &TtrpcContext,
        req: proto::ExecProcessRequest,
    ) -> ttrpc::Result<proto::ExecProcessResponse> {
        let pid = self
            .containers
            .exec(
                &req.container_id,
                &req.exec_id,
                &req.oci_process_json,
                req.stdin,
            )
            .map_err(rpc)?;
        Ok(proto::ExecProcessResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    fn signal_process(
        &self,
        _: &TtrpcContext,
        req: proto::SignalProcessRequest,
    ) -> ttrpc::Result<proto::Empty> {
        let signal = i32::try_from(req.signal).unwrap_or(i32::MAX);
        self.containers
            .signal(&req.container_id, &req.exec_id, signal, req.all)
            .map_err(rpc)?;
        Ok(proto::Empty::default())
    }

    fn wait_process(
        &self,
        ctx: &TtrpcContext,
        req: proto::ProcessRequest,
    ) -> ttrpc::Result<proto::WaitProcessResponse> {
        let timeout = if ctx.timeout_nano > 0 {
            Duration::from_nanos(ctx.timeout_nano as u64)
        } else {
            MAX_WAIT
        };
        let (status, at) = self
            .containers
            .wait(&req.container_id, &req.exec_id, timeout.min(MAX_WAIT))
            .map_err(rpc)?;
        // the count the shim turns into TaskOOM before this exit (0 if it cannot be read)
        let oom_kills = self
            .containers
            .with("WaitProcess", &req.container_id, |c| c.oom_kills())
            .unwrap_or(0);
        Ok(proto::WaitProcessResponse {
            exit_status: status,
            exited_at_unix_ns: at,
            oom_kills,
            ..Default::default()
        })
    }

    fn read_stdout(
        &self,
        _: &TtrpcContext,
        req: proto::ReadStreamRequest,
    ) -> ttrpc::Result<proto::ReadStreamResponse> {
        self.read_stream(req, false)
    }

    fn read_stderr(
        &self,
        _: &TtrpcContext,
        req: proto::ReadStreamRequest,
    ) -> ttrpc::Result<proto::ReadStreamResponse> {
        self.read_stream(req, true)
    }

    fn write_stdin(
        &self,
        _: &TtrpcContext,
        req: proto::WriteStdinRequest,
    ) -> ttrpc::Result<proto::WriteStdinResponse> {
        let n = self
            .containers
            .write_stdin(&req.container_id, &req.exec_id, &req.data)
            .map_err(rpc)?;
        Ok(proto::WriteStdinResponse {
            written: n as u32,
            ..Default::default()
        })
    }

    fn close_stdin(
        &self,
        _: &TtrpcContext,
        req: proto::ProcessRequest,
    ) -> ttrpc::Result<proto::Empty> {
        self.containers
            .close_stdin(&req.container_id, &req.exec_id)
            .map_err(rpc)?;
        Ok(proto::Empty::default())
    }

    fn resize_pty(
        &self,
        _: &TtrpcContext,
        req: proto::ResizePtyRequest,
    ) -> ttrpc::Result<proto::Empty> {
        self.containers
            .resize_pty(&req.container_id, &req.exec_id, req.width, req.height)
            .map_err(rpc)?;
        Ok(proto::Empty::default())
    }

    fn stats(
        &self,
        _: &TtrpcContext,
        req: proto::ContainerRequest,
    ) -> ttrpc::Result<proto::StatsResponse> {
        let s = self
            .containers
            .with("Stats", &req.container_id, |c| c.stats())
            .map_err(rpc)?;
        Ok(proto::StatsResponse {
            cpu_usage_total_ns: s.cpu.usage_total_ns,
            cpu_usage_user_ns: s.cpu.usage_user_ns,
            cpu_usage_kernel_ns: s.cpu.usage_kernel_ns,
            memory_usage_bytes: s.memory.usage_bytes,
            memory_limit_bytes: s.memory.limit_bytes,
            pids_current: s.pids.current,
            pids_limit: s.pids.limit,
            oom_kills: s.memory.oom_kills,
            ..Default::default()
        })
    }

    fn pause_container(
        &self,
        _: &TtrpcContext,
        req: proto::ContainerRequest,
    ) -> ttrpc::Result<proto::Empty> {
        self.containers
            .with("PauseContainer", &req.container_id, |c| c.pause())
            .map_err(rpc)?;
        Ok(proto::Empty::default())
    }

    fn resume_container(
        &self,
        _: &TtrpcContext,
        req: proto::ContainerRequest,
    ) -> ttrpc::Result<proto::Empty> {
        self.containers
            .with("ResumeContainer", &req.container_id, |c| c.resume())
            .map_err(rpc)?;
        Ok(proto::Empty::default())
    }

    fn remove_container(
        &self,
        _: &TtrpcContext,
        req: proto::ContainerRequest,
    ) -> ttrpc::Result<proto::Empty> {
        tracing::info!(id = %req.container_id, "RemoveContainer");
        self.containers.remove(&req.container_id).map_err(rpc)?;
        Ok(proto::Empty::default())
    }

    fn update_container(
        &self,
        _: &TtrpcContext,
        req: proto::UpdateContainerRequest,
    ) -> ttrpc::Result<proto::Empty> {
        tracing::info!(id = %req.container_id, "UpdateContainer");
        self.containers
            .update(&req.container_id, &req.resources_json)
            .map_err(rpc)?;
        Ok(proto::Empty::default())
    }

    fn configure_network(
        &self,
        _: &TtrpcContext,
        req: proto::ConfigureNetworkRequest,
    ) -> ttrpc::Result<proto::ConfigureNetworkResponse> {
        let ifaces: Vec<crate::network::Iface> = req
            .interfaces
            .iter()
            .map(|i| crate::network::Iface {
                mac: i.mac.clone(),
                name: i.name.clone(),
                mtu: i.mtu,
                addresses: i.addresses.clone(),
            })
            .collect();
        let routes: Vec<crate::network::Route> = req
            .routes
            .iter()
            .map(|r| crate::network::Route {
                dest: r.dest.clone(),
                gateway: r.gateway.clone(),
                device: r.device.clone(),
            })
            .collect();
        tracing::info!(
            interfaces = ifaces.len(),
            routes = routes.len(),
            "ConfigureNetwork"
        );
        if let Err(e) = crate::network::validate(&ifaces, &routes) {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!("ConfigureNetwork: {e}"),
            ));
        }
        let configured = crate::network::configure(&self.reaper, &ifaces, &routes)
            .map_err(|e| status(Code::FAILED_PRECONDITION, format!("ConfigureNetwork: {e}")))?;
        // moved into the pod's network namespace when one is made (crate::podnet)
        self.containers.pod_net().record(&ifaces, &routes);
        tracing::info!("ConfigureNetwork done");
        Ok(proto::ConfigureNetworkResponse {
            configured,
            ..Default::default()
        })
    }

    fn online_cpu_mem(
        &self,
        _: &TtrpcContext,
        req: proto::OnlineCpuMemRequest,
    ) -> ttrpc::Result<proto::OnlineCpuMemResponse> {
        let t0 = std::time::Instant::now();
        let o = crate::hotplug::online(
            std::path::Path::new("/sys"),
            req.cpus,
            req.memory_mib,
            Duration::from_millis(req.timeout_ms.into()),
        );
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        tracing::info!(
            cpus = o.cpus,
            memory_mib = o.memory_mib,
            cpus_onlined = o.cpus_onlined,
            blocks_onlined = o.blocks_onlined,
            timed_out = o.timed_out,
            "OnlineCpuMem done in {:?}",
            t0.elapsed()
        );
        Ok(proto::OnlineCpuMemResponse {
            online_cpus: o.cpus,
            online_memory_mib: o.memory_mib,
            mem_total_kib: crate::hotplug::mem_total_kib(&meminfo),
            cpus_onlined: o.cpus_onlined,
            blocks_onlined: o.blocks_onlined,
            timed_out: o.timed_out,
            ..Default::default()
        })
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
        .register_service(methods)
        // WaitProcess and ReadStdout/ReadStderr block a worker each: allow many, and keep two idle
        // (a worker that leaves fewer than `min` idle starts `default` - idle more); start with
        // three, not more: under TCG every thread a session starts costs the first call time.
        .set_thread_count_min(2)
        .set_thread_count_default(3)
        .set_thread_count_max(256);
    server.start().map_err(|e| crate::Error::Port {
        name: path.display().to_string(),
        msg: format!("ttrpc start: {e}"),
    })?;
    Ok(server)
}
