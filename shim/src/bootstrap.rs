//! How containerd drives the binary: `start` (print the ttrpc address of the pod's shim,
//! starting it when needed), `delete` (clean up after a dead shim) and, without an action, the
//! shim server itself.
//!
//! The containerd-shim crate's `asynchronous::run` speaks containerd 2.x only (a JSON reply to
//! `start` and the `containerd.task.v3.Task` service), which containerd 1.6 cannot read. This
//! bootstrap replies with a bare address, which every containerd since 1.5 accepts, and serves
//! the same Task implementation under both the v2 and the v3 service names.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim_async::create_task;
use containerd_shim::protos::ttrpc::r#async::transport::Listener;
use containerd_shim::protos::ttrpc::r#async::Server;
use containerd_shim::{DeleteResponse, ExitSignal, Flags};

use crate::events::{timestamp, Publisher};
use crate::pod::PodContext;
use crate::reaper::Reaper;
use crate::service::Service;
use crate::state::{StateDir, ROOT};

const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
const TASK_V2: &str = "containerd.task.v2.Task";
const TASK_V3: &str = "containerd.task.v3.Task";

pub fn main() -> anyhow::Result<()> {
    let args: Vec<_> = std::env::args_os().collect();
    let flags = containerd_shim::parse(&args[1..]).context("command line")?;
    if flags.version {
        println!("containerd-shim-tandem-v2 {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    match flags.action.as_str() {
        "start" => start(&flags),
        "delete" => delete(&flags),
        "" => serve(flags),
        other => bail!("unknown action {other:?}"),
    }
}

fn bundle_dir(flags: &Flags) -> anyhow::Result<PathBuf> {
    if !flags.bundle.is_empty() {
        return Ok(PathBuf::from(&flags.bundle));
    }
    std::env::current_dir().context("current directory (the bundle)")
}

/// The id whose shim serves `id`: the sandbox's for a CRI container, else its own.
pub fn grouping_id(id: &str, config_json: &[u8]) -> String {
    let v: serde_json::Value = match serde_json::from_slice(config_json) {
        Ok(v) => v,
        Err(_) => return id.to_string(),
    };
    let ann = &v["annotations"];
    let ctype = ann[CONTAINER_TYPE].as_str().unwrap_or_default();
    let sandbox = ann[SANDBOX_ID].as_str().unwrap_or_default();
    if ctype == "container" && !sandbox.is_empty() && sandbox != id {
        sandbox.to_string()
    } else {
        id.to_string()
    }
}

/// The socket address of the shim of `group` (deterministic, as containerd's own shims do).
pub fn socket_address(containerd: &str, namespace: &str, group: &str) -> String {
    containerd_shim::socket_address(containerd, namespace, group)
}

fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

fn alive(address: &str) -> bool {
    UnixStream::connect(socket_path(address)).is_ok()
}

fn reply(address: &str) -> anyhow::Result<()> {
    std::fs::write("address", address).context("write address file")?;
    let mut out = std::io::stdout();
    out.write_all(address.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn start(flags: &Flags) -> anyhow::Result<()> {
    let bundle = bundle_dir(flags)?;
    std::env::set_current_dir(&bundle).with_context(|| format!("chdir {}", bundle.display()))?;
    let config = std::fs::read(bundle.join("config.json")).unwrap_or_default();
    let group = grouping_id(&flags.id, &config);
    let address = socket_address(&flags.address, &flags.namespace, &group);
    if group != flags.id && alive(&address) {
        // the sandbox's shim serves this container too
        return reply(&address);
    }
    let exe = std::env::current_exe().context("current executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.current_dir(&bundle)
        .args(["-namespace", &flags.namespace, "-id", &flags.id])
        .args(["-address", &flags.address, "-socket", &address])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .process_group(0);
    if flags.debug {
        cmd.arg("-debug");
    }
    let mut child = cmd.spawn().context("spawn the shim server")?;
    // the server turns its stdout into its stderr (/dev/null) once it listens: EOF here
    let mut sink = Vec::new();
    let _ = child.stdout.take().expect("piped").read_to_end(&mut sink);
    if let Some(st) = child.try_wait().context("shim server status")? {
        if !st.success() && !alive(&address) {
            bail!("shim server exited with {st} before listening on {address}");
        }
    }
    reply(&address)
}

/// Clean up after a shim that died: the engine's container, the rootfs mounts, the state.
fn delete(flags: &Flags) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .try_init();
    let state = StateDir::new(Path::new(ROOT), &flags.namespace);
    let record = state.load(&flags.id).unwrap_or_else(|e| {
        tracing::warn!("{e}");
        None
    });
    let exe = std::env::current_exe().context("current executable")?;
    let engine = tandem_oci::Engine::new(tandem_oci::EngineConfig::new(state.engine_root(), exe));
    match engine.load(&flags.id) {
        Ok(c) => {
            if let Err(e) = c.delete() {
                tracing::warn!(id = flags.id, "engine delete: {e}");
            }
        }
        Err(tandem_oci::Error::NotFound(_)) => {}
        Err(e) => tracing::warn!(id = flags.id, "engine load: {e}"),
    }
    // a VM-mode pod's VM, when its shim is gone
    crate::pod::vm::delete_after_crash(&state, &flags.id);
    let mut pid = 0;
    if let Some(r) = record {
        pid = r.pid;
        if let Some(target) = &r.rootfs_target {
            crate::rootfs::unmount(target)?;
        }
        state.remove(&flags.id)?;
    }
    // the pod's user namespace range, when this container held it
    crate::userns::release_after_dead_shim(&flags.namespace, &flags.id);
    // the dead shim's socket (unless a live shim of the pod still serves on it)
    if let Ok(address) = std::fs::read_to_string(bundle_dir(flags)?.join("address")) {
        let address = address.trim();
        if !address.is_empty() && !alive(address) {
            let _ = std::fs::remove_file(socket_path(address));
        }
    }
    let resp = DeleteResponse {
        pid: pid.max(0) as u32,
        exit_status: 137,
        exited_at: Some(timestamp(SystemTime::now())).into(),
        ..Default::default()
    };
    std::io::stdout().write_all(&resp.write_to_bytes()?)?;
    Ok(())
}

fn init_logging(debug: bool) {
    let level = if debug {
        tracing::Level::DEBUG
    } else {
        tracing::Level::INFO
    };
    // containerd reads shim logs from the `log` fifo in the bundle directory
    let log = std::fs::OpenOptions::new().write(true).open("log");
    let b = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false);
    let _ = match log {
        Ok(f) => b.with_writer(std::sync::Mutex::new(f)).try_init(),
        Err(_) => b.with_writer(std::io::stderr).try_init(),
    };
}

fn bind(address: &str) -> anyhow::Result<Option<UnixListener>> {
    let path = Path::new(socket_path(address));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    }
    match UnixListener::bind(path) {
        Ok(l) => Ok(Some(l)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if alive(address) {
                return Ok(None);
            }
            std::fs::remove_file(path).with_context(|| format!("remove stale {address}"))?;
            Ok(Some(
                UnixListener::bind(path).with_context(|| format!("listen on {address}"))?,
            ))
        }
        Err(e) => Err(e).with_context(|| format!("listen on {address}")),
    }
}

fn serve(flags: Flags) -> anyhow::Result<()> {
    if flags.socket.is_empty() {
        bail!("no -socket to serve on");
    }
    // one malloc arena: the shim is small and mostly idle
    // SAFETY: mallopt with integer arguments.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    init_logging(flags.debug);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(8)
        .thread_keep_alive(Duration::from_secs(2))
        .build()
        .context("tokio runtime")?;
    let r = rt.block_on(serve_async(flags));
    if let Err(e) = &r {
        tracing::error!("{e:#}");
    }
    // Everything the pod made is gone by now. Dropping the runtime would wait for blocking
    // tasks still parked in a syscall (a fifo open or read that containerd never completes),
    // which kept exited shims alive for seconds: leave them to the process exit instead.
    rt.shutdown_background();
    r
}

async fn serve_async(flags: Flags) -> anyhow::Result<()> {
    let reaper = Reaper::start().context("subreaper")?;
    let Some(listener) = bind(&flags.socket)? else {
        tracing::info!(address = flags.socket, "another shim serves this pod");
        std::fs::write("address", &flags.socket).context("write address file")?;
        signal_started();
        return Ok(());
    };
    listener.set_nonblocking(true)?;
    let listener = Listener::try_from(listener).context("ttrpc listener")?;
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").context("TTRPC_ADDRESS")?;
    let publisher = Arc::new(Publisher::start(ttrpc_address, flags.namespace.clone()));
    let (ev_tx, ev_rx) = tokio::sync::mpsc::unbounded_channel();
    let ctx = PodContext {
        state: StateDir::new(Path::new(ROOT), &flags.namespace),
        namespace: flags.namespace.clone(),
        reaper,
        events: ev_tx,
    };
    let exit = Arc::new(ExitSignal::default());
    let service = Arc::new(Service::new(ctx, ev_rx, publisher.clone(), exit.clone()));
    let mut services = create_task(service.clone());
    if let Some(v3) = create_task(service).remove(TASK_V3) {
        services.insert(TASK_V2.to_string(), v3);
    }
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(services);
    server.start().await.context("start ttrpc server")?;
    signal_started();
    tracing::info!(address = flags.socket, id = flags.id, "shim serving");
    exit.wait().await;
    let t0 = std::time::Instant::now();
    tracing::info!("shim exiting");
    // ttrpc's graceful shutdown waits (up to 5 s per connection) for handler tasks containerd
    // never ends; by now every answer that matters is sent, so bound the wait.
    let stopped = tokio::time::timeout(Duration::from_millis(200), server.shutdown())
        .await
        .is_ok();
    tracing::debug!(elapsed = ?t0.elapsed(), stopped, "ttrpc server shut down");
    // the last TaskExit/TaskDelete must reach containerd: drain the queue (bounded)
    let drained = publisher.close(Duration::from_millis(500)).await;
    tracing::debug!(elapsed = ?t0.elapsed(), drained, "event queue closed");
    let _ = std::fs::remove_file(socket_path(&flags.socket));
    Ok(())
}

/// Tell `start` (reading our stdout) that we listen: stdout becomes stderr, `start` sees EOF.
fn signal_started() {
    // SAFETY: dup2 of the standard fds.
    unsafe {
        libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_container_groups_under_its_sandbox() {
        let cfg = br#"{"annotations":{"io.kubernetes.cri.container-type":"container",
            "io.kubernetes.cri.sandbox-id":"sb1"}}"#;
        assert_eq!(grouping_id("c1", cfg), "sb1");
        let sandbox = br#"{"annotations":{"io.kubernetes.cri.container-type":"sandbox",
            "io.kubernetes.cri.sandbox-id":"sb1"}}"#;
        assert_eq!(grouping_id("sb1", sandbox), "sb1");
        assert_eq!(grouping_id("c2", b"{}"), "c2");
        assert_eq!(grouping_id("c3", b"not json"), "c3");
    }

    #[test]
    fn sandbox_and_its_containers_share_one_address() {
        let sb = socket_address("/run/containerd/containerd.sock", "k8s.io", "sb1");
        let c = socket_address(
            "/run/containerd/containerd.sock",
            "k8s.io",
            &grouping_id(
                "c1",
                br#"{"annotations":{"io.kubernetes.cri.container-type":"container","io.kubernetes.cri.sandbox-id":"sb1"}}"#,
            ),
        );
        assert_eq!(sb, c);
        assert!(sb.starts_with("unix:///run/containerd/s/"), "{sb}");
        // another namespace or containerd gives another shim
        assert_ne!(
            sb,
            socket_address("/run/containerd/containerd.sock", "default", "sb1")
        );
        assert_ne!(sb, socket_address("/tmp/c.sock", "k8s.io", "sb1"));
    }

    #[test]
    fn bind_reclaims_a_stale_socket_and_defers_to_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("unix://{}/s/x", dir.path().display());
        let l = bind(&addr).unwrap().expect("fresh bind");
        // a live listener: defer
        assert!(bind(&addr).unwrap().is_none());
        drop(l);
        // the socket file is left behind by a dead shim: reclaim
        assert!(bind(&addr).unwrap().is_some());
    }
}
