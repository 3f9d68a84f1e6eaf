//! tandem-agent: the guest agent of tandem's VM mode, and the host-side client of its API.
//!
//! In the guest, the static binary `tandem-agent` is `/init` of the initramfs built by
//! `vmm/guest/build.sh`: it mounts the pseudo filesystems, loads the kernel modules listed in the
//! initramfs (respecting `modules.dep`), finds the virtio-serial port `tandem.agent` and serves the
//! ttrpc API of `proto/agent.proto` over it. On the host, [`client::AgentClient`] talks to it
//! through the unix socket the VMM makes for that port, and distrusts every reply.
//!
//! Modules: `proto` (generated), `client` (host side), `server` (the API implementation),
//! `command` (bounded command runs), `containers` (the pod's containers with tandem-oci), `reaper` (SIGCHLD → exit statuses), `modules`
//! (modules.dep + finit_module), `guest` (PID 1 setup, port discovery), `port` (the
//! virtio-serial ↔ ttrpc socket bridge).

pub mod client;
pub mod command;
pub mod containers;
pub mod guest;
pub mod guest_image;
pub mod hotplug;
pub mod modules;
pub mod network;
pub mod podnet;
pub mod podshare;
pub mod port;
pub mod reaper;
pub mod server;
pub mod userns;
pub mod volumes;

/// Generated protobuf messages and sync ttrpc client/server of `proto/agent.proto`.
#[allow(
    clippy::all,
    clippy::pedantic,
    dead_code,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unknown_lints,
    unused_imports,
    unused_mut,
    unused_results,
    unsafe_code
)]
pub mod proto {
    pub mod agent {
        include!(concat!(env!("OUT_DIR"), "/agent.rs"));
    }
    pub mod agent_ttrpc {
        include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
    }
    pub use agent::*;
    pub use agent_ttrpc::{create_agent, Agent, AgentClient};
}

use std::path::PathBuf;
use std::time::Duration;

/// Version of the agent API this crate speaks.
pub const API_VERSION: u32 = 1;
/// Version of this crate (the agent reports it; the client shows it).
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Name of the virtio-serial port the agent serves on.
pub const PORT_NAME: &str = "tandem.agent";

/// Errors of the agent (guest side) and of its client (host side). Every message names the thing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("agent socket {path}: connect: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent at {path}: {call}: no reply within {timeout:?}")]
    Timeout {
        path: PathBuf,
        call: &'static str,
        timeout: Duration,
    },
    #[error("agent at {path}: {call}: {msg}")]
    Rpc {
        path: PathBuf,
        call: &'static str,
        msg: String,
    },
    #[error("agent at {path}: {call}: invalid reply: {msg}")]
    InvalidReply {
        path: PathBuf,
        call: &'static str,
        msg: String,
    },
    #[error("module {module}: {msg}")]
    Module { module: String, msg: String },
    #[error("modules.dep {path}: line {line}: {msg}")]
    ModulesDep {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("virtio-serial port {name}: {msg}")]
    Port { name: String, msg: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}
