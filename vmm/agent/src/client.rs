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

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
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
