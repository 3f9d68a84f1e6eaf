//! tandem-agent: /init of a tandem guest, or (with `--listen <socket>`) the same API served on a
//! unix socket of the host, for tests and development.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use tandem_agent::{containers, guest, modules, port, reaper, server, PORT_NAME};

/// Where the ttrpc server listens inside the guest; the port bridge connects to it.
const GUEST_SOCKET: &str = "/run/tandem-agent.sock";
/// Bundles and engine state of the pod's containers inside the guest.
const GUEST_ROOT: &str = "/run/tandem";
const MODULES_ROOT: &str = "/lib/modules";
const PORT_TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    // Re-executed by tandem-oci to become a container's init: nothing else may run first.
    if std::env::args().nth(1).as_deref() == Some(tandem_oci::INIT_ARG) {
        tandem_oci::init_main();
    }
    let pid1 = std::process::id() == 1;
    if let Err(e) = run(pid1) {
        eprintln!("tandem-agent: fatal: {e:#}");
        if pid1 {
            // Exiting PID 1 panics the kernel: power off cleanly instead.
            guest::power_off();
        }
        std::process::exit(1);
    }
}

/// Seconds since boot, from /proc/uptime (for the boot-time breakdown on the console).
fn uptime() -> String {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

fn init_logging() {
    let level = std::env::var("TANDEM_AGENT_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_timer(Uptime)
        .with_ansi(false)
        .init();
}

/// Log timestamps as seconds since the guest booted (CLOCK_BOOTTIME), so that the console shows
/// where a VM's boot and its first calls spend their time.
struct Uptime;

impl tracing_subscriber::fmt::time::FormatTime for Uptime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
            .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
            .unwrap_or_default();
        write!(w, "[{t:9.3}]")
    }
}

fn run(pid1: bool) -> anyhow::Result<()> {
    reaper::block_signals()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    if pid1 && std::env::var_os(guest::SWITCHED_ENV).is_none() {
        guest::switch_root_and_reexec().context("leave the initramfs root")?;
    }
    if pid1 {
        guest::mount_pseudo_filesystems().context("mount pseudo filesystems")?;
        guest::attach_console().context("console")?;
        init_logging();
        let release = guest::kernel_release();
        let dir = PathBuf::from(MODULES_ROOT).join(&release);
        let t0 = uptime();
        let loaded = modules::load_all(&dir)
            .with_context(|| format!("load modules of {}", dir.display()))?;
        tracing::info!(
            kernel = %release,
            modules = loaded.len(),
            uptime_at_init = %t0,
            uptime_after_modules = %uptime(),
            "tandem-agent {} up",
            tandem_agent::AGENT_VERSION
        );
        let reaper = reaper::Reaper::start()?;
        let port_path = guest::wait_for_port(PORT_NAME, PORT_TIMEOUT)?;
        let socket = PathBuf::from(GUEST_SOCKET);
        let _server = server::start(
            &socket,
            server::Service::new(
                reaper.clone(),
                containers::Containers::new(
                    Path::new(GUEST_ROOT),
                    Path::new("/proc/self/exe"),
                    Path::new("/sys/fs/cgroup"),
                    reaper,
                ),
                server::ShutdownMode::PowerOff,
            ),
        )?;
        tracing::info!(port = %port_path.display(), uptime = %uptime(), "serving the agent API");
        port::bridge(&port_path, &socket)?;
        bail!("port bridge ended")
    }
    match args.as_slice() {
        [flag, socket, root_flag, root] if flag == "--listen" && root_flag == "--root" => {
            init_logging();
            // Collect orphans of commands we run, as PID 1 would.
            nix::sys::prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER")?;
            let reaper = reaper::Reaper::start()?;
            let socket = PathBuf::from(socket);
            let _server = server::start(
                &socket,
                server::Service::new(
                    reaper.clone(),
                    containers::Containers::new(
                        Path::new(root),
                        Path::new("/proc/self/exe"),
                        Path::new("/sys/fs/cgroup"),
                        reaper,
                    ),
                    server::ShutdownMode::Exit,
                ),
            )?;
            tracing::info!(socket = %socket.display(), "serving the agent API");
            loop {
                std::thread::park();
            }
        }
        _ => bail!(
            "usage: tandem-agent --listen <unix socket path>   (as PID 1 it takes no arguments)"
        ),
    }
}
