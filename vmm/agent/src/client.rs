//! Host-side client of the agent API. The guest is untrusted: every call has a timeout, and every
//! reply is checked (sizes, versions, consistency) before it is handed on.

use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::proto;
use crate::{Error, Result, API_VERSION};

/// Longest string field the client accepts in a reply (versions, releases).
pub const MAX_STRING: usize = 256;
/// Longest captured stream the client asks for and accepts from RunCommand.
pub const MAX_OUTPUT: u32 = 1024 * 1024;

/// Version information of a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    pub agent_version: String,
    pub api_version: u32,
    pub kernel_release: String,
}

/// Result of RunCommand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// Exit code, or `None` when killed by a signal.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub timed_out: bool,
}

/// What to run in the guest.
#[derive(Debug, Clone, Default)]
pub struct Command {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub stdin: Vec<u8>,
    /// Guest-side limit; the RPC timeout is this plus the client's call timeout.
    pub timeout: Duration,
    /// Per stream, at most [`MAX_OUTPUT`].
    pub max_output: u32,
}

/// A guest NIC for [`AgentClient::configure_network`]: found by `mac`, renamed to `name`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetInterface {
    /// aa:bb:cc:dd:ee:ff
    pub mac: String,
    /// Name in the guest (1-15 characters).
    pub name: String,
    /// 0: leave as is.
    pub mtu: u32,
    /// CIDR strings, e.g. "198.18.0.2/24".
    pub addresses: Vec<String>,
}

/// A guest route for [`AgentClient::configure_network`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetRoute {
    /// CIDR, or "default" (IPv4) / "default6" (IPv6).
    pub dest: String,
    /// Empty: on-link.
    pub gateway: String,
    /// Guest interface name; empty: any.
    pub device: String,
}

pub struct AgentClient {
    path: PathBuf,
    inner: proto::AgentClient,
    call_timeout: Duration,
}

fn check_string(path: &Path, call: &'static str, field: &str, s: &str) -> Result<()> {
    if s.is_empty() || s.len() > MAX_STRING || s.chars().any(|c| c.is_control()) {
        return Err(Error::InvalidReply {
            path: path.to_path_buf(),
            call,
            msg: format!(
                "{field} {:?} is empty, longer than {MAX_STRING} or has control characters",
                truncate(s)
            ),
        });
    }
    Ok(())
}

/// Guest-provided text shown in errors is cut to this many characters.
const MAX_SHOWN: usize = 1024;

fn truncate(s: &str) -> String {
    s.chars().take(MAX_SHOWN).collect()
}

impl AgentClient {
    /// Connect to the unix socket of the agent port. `call_timeout` bounds every call.
    pub fn connect(path: &Path, call_timeout: Duration) -> Result<Self> {
        let stream = UnixStream::connect(path).map_err(|source| Error::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let client = ttrpc::Client::new(stream.into_raw_fd()).map_err(|e| Error::Rpc {
            path: path.to_path_buf(),
            call: "connect",
            msg: e.to_string(),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            inner: proto::AgentClient::new(client),
            call_timeout,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn ctx(timeout: Duration) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(timeout.as_nanos().min(i64::MAX as u128) as i64)
    }

    fn map_err(
        &self,
        call: &'static str,
        timeout: Duration,
        started: Instant,
        e: ttrpc::Error,
    ) -> Error {
        match e {
            ttrpc::Error::RpcStatus(s) => Error::Rpc {
                path: self.path.clone(),
                call,
                msg: format!("{:?}: {}", s.code(), truncate(s.message())),
            },
            _ if started.elapsed() >= timeout => Error::Timeout {
                path: self.path.clone(),
                call,
                timeout,
            },
            other => Error::Rpc {
                path: self.path.clone(),
                call,
                msg: other.to_string(),
            },
        }
    }

    /// Version, with `timeout` instead of the call timeout (use the boot deadline for the first
    /// call: requests sent before the guest opens its port wait in the VMM's socket).
    pub fn version_within(&self, timeout: Duration) -> Result<VersionInfo> {
        let started = Instant::now();
        let r = self
            .inner
            .version(Self::ctx(timeout), &proto::VersionRequest::default())
            .map_err(|e| self.map_err("Version", timeout, started, e))?;
        check_string(&self.path, "Version", "agent_version", &r.agent_version)?;
        check_string(&self.path, "Version", "kernel_release", &r.kernel_release)?;
        if r.api_version != API_VERSION {
            return Err(Error::InvalidReply {
                path: self.path.clone(),
                call: "Version",
                msg: format!(
                    "api_version {} (this host speaks {API_VERSION})",
                    r.api_version
                ),
            });
        }
        Ok(VersionInfo {
            agent_version: r.agent_version,
            api_version: r.api_version,
            kernel_release: r.kernel_release,
        })
    }

    pub fn version(&self) -> Result<VersionInfo> {
        self.version_within(self.call_timeout)
    }

    pub fn ping(&self, nonce: u64) -> Result<()> {
        let started = Instant::now();
        let r = self
            .inner
            .ping(
                Self::ctx(self.call_timeout),
                &proto::PingRequest {
                    nonce,
                    ..Default::default()
                },
            )
            .map_err(|e| self.map_err("Ping", self.call_timeout, started, e))?;
        if r.nonce != nonce {
            return Err(Error::InvalidReply {
                path: self.path.clone(),
                call: "Ping",
                msg: format!("nonce {} instead of {nonce}", r.nonce),
            });
        }
        Ok(())
    }

    /// Run a command in the guest (outside containers).
    pub fn run_command(&self, cmd: &Command) -> Result<CommandOutput> {
        let max = if cmd.max_output == 0 {
            64 * 1024
        } else {
            cmd.max_output.min(MAX_OUTPUT)
        };
        let guest_timeout = if cmd.timeout.is_zero() {
            Duration::from_secs(10)
        } else {
            cmd.timeout
        };
        let rpc_timeout = guest_timeout + self.call_timeout;
        let req = proto::RunCommandRequest {
            argv: cmd.argv.clone(),
            env: cmd.env.clone(),
            stdin: cmd.stdin.clone(),
            timeout_ms: guest_timeout.as_millis().min(u32::MAX as u128) as u32,
            max_output_bytes: max,
            ..Default::default()
        };
        let started = Instant::now();
        let r = self
            .inner
            .run_command(Self::ctx(rpc_timeout), &req)
            .map_err(|e| self.map_err("RunCommand", rpc_timeout, started, e))?;
        let bad = |msg: String| Error::InvalidReply {
            path: self.path.clone(),
            call: "RunCommand",
            msg,
        };
        for (name, data) in [("stdout", &r.stdout), ("stderr", &r.stderr)] {
            if data.len() > max as usize {
                return Err(bad(format!(
                    "{name} of {} bytes, more than the {max} asked for",
                    data.len()
                )));
            }
        }
        let (exit_code, signal) = match (r.exit_code, r.signal) {
            (-1, s) if (1..=64).contains(&s) => (None, Some(s)),
            (c, 0) if (0..=255).contains(&c) => (Some(c), None),
            (c, s) => return Err(bad(format!("exit_code {c} with signal {s}"))),
        };
        Ok(CommandOutput {
            exit_code,
            signal,
            stdout: r.stdout,
            stderr: r.stderr,
            stdout_truncated: r.stdout_truncated,
            stderr_truncated: r.stderr_truncated,
            timed_out: r.timed_out,
        })
    }

    /// Configures the guest's NICs (found by MAC) and routes (ConfigureNetwork). The reply must
    /// name exactly the requested interfaces, in order.
    pub fn configure_network(
        &self,
        interfaces: &[NetInterface],
        routes: &[NetRoute],
    ) -> Result<()> {
        let req = proto::ConfigureNetworkRequest {
            interfaces: interfaces
                .iter()
                .map(|i| proto::Interface {
                    mac: i.mac.clone(),
                    name: i.name.clone(),
                    mtu: i.mtu,
                    addresses: i.addresses.clone(),
                    ..Default::default()
                })
                .collect(),
            routes: routes
                .iter()
                .map(|r| proto::Route {
                    dest: r.dest.clone(),
                    gateway: r.gateway.clone(),
                    device: r.device.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        // Renaming, addresses and routes are a handful of `ip` runs per NIC in the guest.
        let timeout = self.call_timeout + Duration::from_secs(10);
        let started = Instant::now();
        let r = self
            .inner
            .configure_network(Self::ctx(timeout), &req)
            .map_err(|e| self.map_err("ConfigureNetwork", timeout, started, e))?;
        let want: Vec<&str> = interfaces.iter().map(|i| i.name.as_str()).collect();
        if r.configured
            .iter()
            .map(String::as_str)
            .ne(want.iter().copied())
        {
            return Err(Error::InvalidReply {
                path: self.path.clone(),
                call: "ConfigureNetwork",
                msg: format!(
                    "configured {:?}, asked for {want:?}",
                    r.configured
                        .iter()
                        .take(64)
                        .map(|s| truncate(s))
                        .collect::<Vec<_>>()
                ),
            });
        }
        Ok(())
    }

    /// Ask the guest to power off. A reply or the connection closing both count as accepted;
    /// the caller then waits for its VMM process to exit.
    pub fn shutdown(&self) -> Result<()> {
        let started = Instant::now();
        match self.inner.shutdown(
            Self::ctx(self.call_timeout),
            &proto::ShutdownRequest::default(),
        ) {
            Ok(_) => Ok(()),
            Err(e @ ttrpc::Error::RpcStatus(_)) => {
                Err(self.map_err("Shutdown", self.call_timeout, started, e))
            }
            Err(e) if started.elapsed() >= self.call_timeout => {
                Err(self.map_err("Shutdown", self.call_timeout, started, e))
            }
            Err(e) => {
                tracing::debug!("Shutdown: connection ended before the reply: {e}");
                Ok(())
            }
        }
    }
}

/// A rootfs mount for [`AgentClient::create_container`] (performed in the guest, in order).
#[derive(Debug, Clone, Default)]
pub struct Mount {
    pub fstype: String,
    pub source: String,
    /// Relative to the bundle, e.g. "rootfs".
    pub target: String,
    pub options: Vec<String>,
}

/// A file for [`AgentClient::create_container_with_files`]: written by the agent at
/// `<bundle>/files/<path>` before the container is made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct File {
    /// Relative to `<bundle>/files`, no `..`.
    pub path: String,
    pub content: Vec<u8>,
    /// Permission bits (& 0o7777).
    pub mode: u32,
}

/// How a process ended, from WaitProcess.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessExit {
    /// The code, or 128 + signal.
    pub status: i32,
    pub exited_at_unix_ns: i64,
    /// OOM kills in the container's guest cgroup when it exited (the guest's word).
    pub oom_kills: u64,
}

/// Container usage from Stats.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerStats {
    pub cpu_usage_total_ns: u64,
    pub memory_usage_bytes: u64,
    pub memory_limit_bytes: u64,
    pub pids_current: u64,
    /// OOM kills in the container's guest cgroup (the guest's word: only ever an event about
    /// its own pod).
    pub oom_kills: u64,
}

/// Most CPUs a guest reply may name (QEMU's x86 limit is far below).
pub const MAX_GUEST_CPUS: usize = 1024;
/// Most guest memory in MiB a reply may name (16 TiB).
pub const MAX_GUEST_MEMORY_MIB: u64 = 16 << 20;

/// The guest's view of its size after OnlineCpuMem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestSize {
    pub online_cpus: u32,
    pub online_memory_mib: u64,
    pub mem_total_kib: u64,
    /// The counts asked for were not reached within the wait.
    pub timed_out: bool,
}

/// Longest chunk the client asks for and accepts from ReadStdout/ReadStderr.
pub const MAX_READ: u32 = 1024 * 1024;

impl AgentClient {
    fn call<R>(
        &self,
        call: &'static str,
        timeout: Duration,
        f: impl FnOnce(&proto::AgentClient, ttrpc::context::Context) -> ttrpc::Result<R>,
    ) -> Result<R> {
        let started = Instant::now();
        f(&self.inner, Self::ctx(timeout)).map_err(|e| self.map_err(call, timeout, started, e))
    }

    fn check_pid(&self, call: &'static str, pid: u32) -> Result<i32> {
        match i32::try_from(pid) {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(Error::InvalidReply {
                path: self.path.clone(),
                call,
                msg: format!("pid {pid}"),
            }),
        }
    }

    /// Create a container from an OCI spec (config.json bytes) and rootfs mounts; returns the
    /// guest pid of its process, which waits for [`AgentClient::start_container`].
    pub fn create_container(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: &[Mount],
        stdin: bool,
    ) -> Result<i32> {
        self.create_container_with_files(id, spec_json, rootfs, &[], stdin)
    }

    /// [`AgentClient::create_container`] with `files` the agent writes under `<bundle>/files`
    /// first. The limits (count, per file, total, paths) are checked here before anything is
    /// sent, with the agent's own check ([`crate::containers::validate_files`]).
    pub fn create_container_with_files(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: &[Mount],
        files: &[File],
        stdin: bool,
    ) -> Result<i32> {
        self.create_container_with_shared(id, spec_json, rootfs, files, &[], stdin)
    }

    /// [`AgentClient::create_container_with_files`] with the pod's shared tmpfs mounts the
    /// container uses (`pod_shm`, [`crate::podshare`]); names and count are checked here before
    /// anything is sent (the size against the guest's RAM by the agent).
    pub fn create_container_with_shared(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: &[Mount],
        files: &[File],
        shm: &[crate::podshare::ShmReq],
        stdin: bool,
    ) -> Result<i32> {
        crate::podshare::validate_shm(shm, u64::MAX).map_err(|e| Error::Rpc {
            path: self.path.clone(),
            call: "CreateContainer",
            msg: format!("container {id}: not sent: {e}"),
        })?;
        let reqs: Vec<crate::containers::FileReq> = files
            .iter()
            .map(|f| crate::containers::FileReq {
                path: f.path.clone(),
                content: f.content.clone(),
                mode: f.mode,
            })
            .collect();
        crate::containers::validate_files(&reqs).map_err(|e| Error::Rpc {
            path: self.path.clone(),
            call: "CreateContainer",
            msg: format!("container {id}: not sent: {}", e.msg),
        })?;
        let req = proto::CreateContainerRequest {
            files: reqs
                .into_iter()
                .map(|f| proto::File {
                    path: f.path,
                    content: f.content,
                    mode: f.mode,
                    ..Default::default()
                })
                .collect(),
            container_id: id.to_string(),
            oci_spec_json: spec_json.to_vec(),
            rootfs: rootfs
                .iter()
                .map(|m| proto::Mount {
                    type_: m.fstype.clone(),
                    source: m.source.clone(),
                    target: m.target.clone(),
                    options: m.options.clone(),
                    ..Default::default()
                })
                .collect(),
            stdin,
            pod_shm: shm
                .iter()
                .map(|s| proto::PodShm {
                    name: s.name.clone(),
                    size_bytes: s.size_bytes,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let r = self.call("CreateContainer", self.call_timeout, |c, ctx| {
            c.create_container(ctx, &req)
        })?;
        self.check_pid("CreateContainer", r.pid)
    }

    pub fn start_container(&self, id: &str) -> Result<i32> {
        let req = proto::ContainerRequest {
            container_id: id.to_string(),
            ..Default::default()
        };
        let r = self.call("StartContainer", self.call_timeout, |c, ctx| {
            c.start_container(ctx, &req)
        })?;
        self.check_pid("StartContainer", r.pid)
    }

    /// Start another process (an OCI `process` object as JSON) in a running container.
    pub fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdin: bool,
    ) -> Result<i32> {
        let req = proto::ExecProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            oci_process_json: process_json.to_vec(),
            stdin,
            ..Default::default()
        };
        let r = self.call("ExecProcess", self.call_timeout, |c, ctx| {
            c.exec_process(ctx, &req)
        })?;
        self.check_pid("ExecProcess", r.pid)
    }

    /// Signal a process (`exec_id` empty: the container's init; `all`: every process of it).
    pub fn signal_process(&self, id: &str, exec_id: &str, signal: i32, all: bool) -> Result<()> {
        let req = proto::SignalProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            signal: signal as u32,
            all,
            ..Default::default()
        };
        self.call("SignalProcess", self.call_timeout, |c, ctx| {
            c.signal_process(ctx, &req)
        })?;
        Ok(())
    }

    /// Wait at most `timeout` for a process to exit.
    pub fn wait_process(&self, id: &str, exec_id: &str, timeout: Duration) -> Result<ProcessExit> {
        let req = proto::ProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        let r = self.call("WaitProcess", timeout, |c, ctx| c.wait_process(ctx, &req))?;
        if !(0..=255).contains(&r.exit_status) {
            return Err(Error::InvalidReply {
                path: self.path.clone(),
                call: "WaitProcess",
                msg: format!("exit_status {}", r.exit_status),
            });
        }
        Ok(ProcessExit {
            status: r.exit_status,
            exited_at_unix_ns: r.exited_at_unix_ns,
            oom_kills: r.oom_kills,
        })
    }

    /// Up to `max` bytes of a process's stdout (or stderr), waiting at most `wait` for some;
    /// `(data, eof)`.
    pub fn read_output(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
        max: u32,
        wait: Duration,
    ) -> Result<(Vec<u8>, bool)> {
        let max = max.clamp(1, MAX_READ);
        let wait_ms = wait.as_millis().clamp(1, 5000) as u32;
        let req = proto::ReadStreamRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            max_bytes: max,
            wait_ms,
            ..Default::default()
        };
        let timeout = Duration::from_millis(wait_ms.into()) + self.call_timeout;
        let (call, r) = if stderr {
            (
                "ReadStderr",
                self.call("ReadStderr", timeout, |c, ctx| c.read_stderr(ctx, &req))?,
            )
        } else {
            (
                "ReadStdout",
                self.call("ReadStdout", timeout, |c, ctx| c.read_stdout(ctx, &req))?,
            )
        };
        if r.data.len() > max as usize {
            return Err(Error::InvalidReply {
                path: self.path.clone(),
                call,
                msg: format!("{} bytes, more than the {max} asked for", r.data.len()),
            });
        }
        Ok((r.data, r.eof))
    }

    pub fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<()> {
        let req = proto::WriteStdinRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            data: data.to_vec(),
            ..Default::default()
        };
        let r = self.call("WriteStdin", self.call_timeout, |c, ctx| {
            c.write_stdin(ctx, &req)
        })?;
        if r.written as usize != data.len() {
            return Err(Error::InvalidReply {
                path: self.path.clone(),
                call: "WriteStdin",
                msg: format!("wrote {} of {} bytes", r.written, data.len()),
            });
        }
        Ok(())
    }

    /// Set the window size of a process's terminal (FAILED_PRECONDITION when it has none).
    pub fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let req = proto::ResizePtyRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            width,
            height,
            ..Default::default()
        };
        self.call("ResizePty", self.call_timeout, |c, ctx| {
            c.resize_pty(ctx, &req)
        })?;
        Ok(())
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let req = proto::ProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        self.call("CloseStdin", self.call_timeout, |c, ctx| {
            c.close_stdin(ctx, &req)
        })?;
        Ok(())
    }

    pub fn stats(&self, id: &str) -> Result<ContainerStats> {
        let req = proto::ContainerRequest {
            container_id: id.to_string(),
            ..Default::default()
        };
        let r = self.call("Stats", self.call_timeout, |c, ctx| c.stats(ctx, &req))?;
        Ok(ContainerStats {
            cpu_usage_total_ns: r.cpu_usage_total_ns,
            memory_usage_bytes: r.memory_usage_bytes,
            memory_limit_bytes: r.memory_limit_bytes,
            pids_current: r.pids_current,
            oom_kills: r.oom_kills,
        })
    }

    pub fn pause_container(&self, id: &str) -> Result<()> {
        let req = proto::ContainerRequest {
            container_id: id.to_string(),
            ..Default::default()
        };
        self.call("PauseContainer", self.call_timeout, |c, ctx| {
            c.pause_container(ctx, &req)
        })?;
        Ok(())
    }

    pub fn resume_container(&self, id: &str) -> Result<()> {
        let req = proto::ContainerRequest {
            container_id: id.to_string(),
            ..Default::default()
        };
        self.call("ResumeContainer", self.call_timeout, |c, ctx| {
            c.resume_container(ctx, &req)
        })?;
        Ok(())
    }

    /// Apply new resources (OCI `LinuxResources` as JSON) to the container's guest cgroup. At
    /// most [`crate::containers::MAX_RESOURCES_JSON`] bytes, checked before sending.
    pub fn update_container(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        let max = crate::containers::MAX_RESOURCES_JSON;
        if resources_json.len() > max {
            return Err(Error::Rpc {
                path: self.path.clone(),
                call: "UpdateContainer",
                msg: format!(
                    "container {id}: not sent: resources JSON of {} bytes, more than {max}",
                    resources_json.len()
                ),
            });
        }
        let req = proto::UpdateContainerRequest {
            container_id: id.to_string(),
            resources_json: resources_json.to_vec(),
            ..Default::default()
        };
        self.call("UpdateContainer", self.call_timeout, |c, ctx| {
            c.update_container(ctx, &req)
        })?;
        Ok(())
    }

    /// Onlines hot-plugged vCPUs and memory blocks in the guest (OnlineCpuMem), waiting at
    /// most `wait` (the agent caps it at 30 s) until `cpus` CPUs and `memory_mib` of memory
    /// blocks are online. The reply is the guest's word, checked for plausibility only: the
    /// caller verifies the vCPU count through its VMM.
    pub fn online_cpu_mem(&self, cpus: u32, memory_mib: u64, wait: Duration) -> Result<GuestSize> {
        let req = proto::OnlineCpuMemRequest {
            cpus,
            memory_mib,
            timeout_ms: wait.as_millis().min(u32::MAX as u128) as u32,
            ..Default::default()
        };
        let timeout = self.call_timeout + wait;
        let r = self.call("OnlineCpuMem", timeout, |c, ctx| {
            c.online_cpu_mem(ctx, &req)
        })?;
        let bad = |msg: String| Error::InvalidReply {
            path: self.path.clone(),
            call: "OnlineCpuMem",
            msg,
        };
        if r.online_cpus == 0 || r.online_cpus as usize > MAX_GUEST_CPUS {
            return Err(bad(format!("{} online CPUs", r.online_cpus)));
        }
        if r.cpus_onlined > r.online_cpus {
            return Err(bad(format!(
                "{} CPUs onlined, {} online",
                r.cpus_onlined, r.online_cpus
            )));
        }
        if r.online_memory_mib > MAX_GUEST_MEMORY_MIB
            || r.mem_total_kib / 1024 > MAX_GUEST_MEMORY_MIB
        {
            return Err(bad(format!(
                "{} MiB online, MemTotal {} KiB",
                r.online_memory_mib, r.mem_total_kib
            )));
        }
        Ok(GuestSize {
            online_cpus: r.online_cpus,
            online_memory_mib: r.online_memory_mib,
            mem_total_kib: r.mem_total_kib,
            timed_out: r.timed_out,
        })
    }

    pub fn remove_container(&self, id: &str) -> Result<()> {
        let req = proto::ContainerRequest {
            container_id: id.to_string(),
            ..Default::default()
        };
        self.call("RemoveContainer", self.call_timeout, |c, ctx| {
            c.remove_container(ctx, &req)
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_checked() {
        let p = Path::new("/run/x.sock");
        assert!(check_string(p, "Version", "kernel_release", "6.1.0-56-cloud-amd64").is_ok());
        let e = check_string(p, "Version", "kernel_release", "")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/run/x.sock") && e.contains("kernel_release"),
            "{e}"
        );
        assert!(check_string(p, "Version", "v", &"x".repeat(MAX_STRING + 1)).is_err());
        assert!(check_string(p, "Version", "v", "a\u{1b}[2J").is_err());
    }

    #[test]
    fn missing_socket_is_named() {
        let e = AgentClient::connect(Path::new("/nonexistent/agent.sock"), Duration::from_secs(1))
            .err()
            .expect("connect must fail")
            .to_string();
        assert!(e.contains("/nonexistent/agent.sock"), "{e}");
    }
}
