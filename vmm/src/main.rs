//! `tandem-vmm`: one microVM per process. Started by the shim (through the `microvm` backend)
//! with a JSON `VmConfig` and a control socket path; prints `READY` on stdout once the vCPUs run
//! and the control socket accepts requests.
//!
//! Usage: tandem-vmm (--config FILE | --config-json JSON) --api-socket PATH [--no-seccomp]

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use anyhow::{bail, Context};
use tandem_vmm::microvm::vcpu::ExitReason;
use tandem_vmm::microvm::{seccomp, server, Vm, VmOptions};
use tandem_vmm::VmConfig;

struct Args {
    config: VmConfig,
    api_socket: PathBuf,
    seccomp: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut config = None;
    let mut api_socket = None;
    let mut seccomp = true;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" => {
                let p = it.next().context("--config needs a file")?;
                let s = std::fs::read_to_string(&p).with_context(|| format!("config {p}"))?;
                config = Some(serde_json::from_str(&s).with_context(|| format!("config {p}"))?);
            }
            "--config-json" => {
                let s = it.next().context("--config-json needs a JSON value")?;
                config = Some(serde_json::from_str(&s).context("--config-json")?);
            }
            "--api-socket" => {
                api_socket = Some(PathBuf::from(
                    it.next().context("--api-socket needs a path")?,
                ))
            }
            "--no-seccomp" => seccomp = false,
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(Args {
        config: config.context("--config or --config-json is required")?,
        api_socket: api_socket.context("--api-socket is required")?,
        seccomp,
    })
}

/// Closes every fd above stderr: the VMM holds only what it opens itself.
fn close_inherited_fds() {
    // SAFETY: no Rust object owns an fd above 2 this early in main.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
}

fn run() -> anyhow::Result<ExitReason> {
    close_inherited_fds();
    let args = parse_args()?;
    let mut vm = Vm::create(
        &args.config,
        VmOptions {
            seccomp: args.seccomp,
        },
    )?;
    let listener = UnixListener::bind(&args.api_socket)
        .with_context(|| format!("control socket {}", args.api_socket.display()))?;
    let filter = if args.seccomp {
        Some(seccomp::vmm_filter()?)
    } else {
        None
    };
    if let Err(e) = vm.start() {
        let _ = std::fs::remove_file(&args.api_socket);
        return Err(e.into());
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "READY")?;
        out.flush()?;
    }
    let r = server::serve(vm, listener, filter);
    let _ = std::fs::remove_file(&args.api_socket);
    Ok(r?)
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    match run() {
        Ok(ExitReason::Error(e)) => {
            eprintln!("tandem-vmm: {e}");
            std::process::exit(1);
        }
        Ok(reason) => {
            tracing::info!("exit: {reason:?}");
        }
        Err(e) => {
            eprintln!("tandem-vmm: {e:#}");
            std::process::exit(1);
        }
    }
}
