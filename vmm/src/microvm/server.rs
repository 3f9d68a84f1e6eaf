//! The `tandem-vmm` process's event loop: the VM's exit event and the control socket.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::config::validate_nic;
use crate::error::{Error, Result};
use crate::microvm::control::{read_line, Request, Response};
use crate::microvm::vcpu::ExitReason;
use crate::microvm::vm::VirtioSlot;
use crate::microvm::Vm;

const EXIT_TOKEN: u64 = 1;
const LISTEN_TOKEN: u64 = 2;
const VIRTIO_TOKEN: u64 = 100;
const DEVICE_FD_TOKEN: u64 = 1000;
/// Chains one queue may complete per wake-up before other events get their turn.
pub const QUEUE_BUDGET: usize = 32;
/// How long one control client may take to send its request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

fn handle(vm: &mut Vm, req: Request, added: &mut Option<VirtioSlot>) -> Response {
    let mut resp = Response::default();
    let r: Result<()> = match req {
        Request::State => Ok(()),
        Request::VcpuThreads => {
            resp.vcpus = Some(vm.vcpu_threads());
            Ok(())
        }
        Request::Pause => vm.pause(),
        Request::Resume => vm.resume(),
        Request::Shutdown => {
            vm.shutdown();
            Ok(())
        }
        Request::AddNic { nic } => match validate_nic(&nic) {
            Err(reason) => Err(Error::invalid("nic", reason)),
            Ok(()) => vm.hot_add_nic(&nic).map(|slot| {
                *added = Some(slot);
            }),
        },
        Request::AddDisk { disk, id } => vm.hot_add_disk(&disk, &id).map(|slot| {
            *added = Some(slot);
        }),
    };
    if let Err(e) = r {
        resp.error = Some(e.to_string());
    }
    resp.state = Some(vm.state());
    resp
}

fn serve_client(
    vm: &mut Vm,
    mut s: UnixStream,
    added: &mut Option<VirtioSlot>,
) -> std::io::Result<bool> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    s.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let resp = match read_line(&s)
        .map_err(|e| e.to_string())
        .and_then(|l| serde_json::from_str::<Request>(&l).map_err(|e| format!("bad request: {e}")))
    {
        Ok(req) => {
            let shutdown = req == Request::Shutdown;
            let r = handle(vm, req, added);
            let mut line = serde_json::to_vec(&r).unwrap_or_default();
            line.push(b'\n');
            s.write_all(&line)?;
            return Ok(shutdown);
        }
        Err(e) => Response {
            error: Some(e),
            state: Some(vm.state()),
            vcpus: None,
        },
    };
    let mut line = serde_json::to_vec(&resp).unwrap_or_default();
    line.push(b'\n');
    s.write_all(&line)?;
    Ok(false)
}

/// Watches a virtio device's notify eventfd (and its host fd, edge-triggered).
fn register(epoll: &Epoll, devices: &mut Vec<VirtioSlot>, d: VirtioSlot) -> Result<()> {
    let ioerr = |what: String, e: std::io::Error| Error::Device {
        device: "event loop".into(),
        reason: format!("{what}: {e}"),
    };
    let i = devices.len() as u64;
    {
        let t = d.transport.lock().unwrap_or_else(|p| p.into_inner());
        epoll
            .ctl(
                ControlOperation::Add,
                t.notify_event().as_raw_fd(),
                EpollEvent::new(EventSet::IN, VIRTIO_TOKEN + i),
            )
            .map_err(|e| ioerr(format!("epoll add {}", d.name), e))?;
        if let Some((fd, _)) = t.device().event_fd() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, DEVICE_FD_TOKEN + i),
                )
                .map_err(|e| ioerr(format!("epoll add {} host fd", d.name), e))?;
        }
    }
    devices.push(d);
    Ok(())
}

/// Runs the loop until the guest ends the VM or a client asks for shutdown. If `filter` is given
/// it is installed on this thread first (after everything is open). Returns why the VM ended.
pub fn serve(
    mut vm: Vm,
    listener: UnixListener,
    filter: Option<seccompiler::BpfProgram>,
) -> Result<ExitReason> {
    let ioerr = |what: &str, e: std::io::Error| Error::Device {
        device: "event loop".into(),
        reason: format!("{what}: {e}"),
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| ioerr("listener", e))?;
    let epoll = Epoll::new().map_err(|e| ioerr("epoll_create1", e))?;
    epoll
        .ctl(
            ControlOperation::Add,
            vm.exit_event().as_raw_fd(),
            EpollEvent::new(EventSet::IN, EXIT_TOKEN),
        )
        .map_err(|e| ioerr("epoll add exit event", e))?;
    epoll
        .ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTEN_TOKEN),
        )
        .map_err(|e| ioerr("epoll add control socket", e))?;
    let mut devices: Vec<VirtioSlot> = Vec::new();
    for d in vm.virtio_devices().to_vec() {
        register(&epoll, &mut devices, d)?;
    }
    if let Some(f) = filter {
        seccompiler::apply_filter(&f).map_err(|e| Error::Device {
            device: "seccomp filter (vmm)".into(),
            reason: e.to_string(),
        })?;
    }
    let mut events = vec![EpollEvent::default(); 16];
    let mut added = None;
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ioerr("epoll_wait", e)),
        };
        for ev in &events[..n] {
            match ev.data() {
                EXIT_TOKEN => {
                    let reason = vm.exit_reason().unwrap_or(ExitReason::Shutdown);
                    tracing::info!("VM ended: {reason:?}");
                    vm.shutdown();
                    return Ok(reason);
                }
                LISTEN_TOKEN => loop {
                    match listener.accept() {
                        Ok((s, _)) => match serve_client(&mut vm, s, &mut added) {
                            Ok(true) => {
                                let reason = vm.exit_reason().unwrap_or(ExitReason::Shutdown);
                                return Ok(reason);
                            }
                            Ok(false) => {
                                if let Some(d) = added.take() {
                                    register(&epoll, &mut devices, d)?;
                                }
                            }
                            Err(e) => tracing::warn!("control client: {e}"),
                        },
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            tracing::warn!("accept: {e}");
                            break;
                        }
                    }
                },
                t if t >= DEVICE_FD_TOKEN => {
                    if let Some(d) = devices.get((t - DEVICE_FD_TOKEN) as usize) {
                        let mut tr = d.transport.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some((_, q)) = tr.device().event_fd() {
                            if tr.process_event(q, QUEUE_BUDGET) {
                                let _ = tr.notify_event().write(1);
                            }
                        }
                    }
                }
                t if t >= VIRTIO_TOKEN => {
                    if let Some(d) = devices.get((t - VIRTIO_TOKEN) as usize) {
                        let mut tr = d.transport.lock().unwrap_or_else(|p| p.into_inner());
                        if tr.process(QUEUE_BUDGET) {
                            // Work left: come back after the other ready events.
                            let _ = tr.notify_event().write(1);
                        }
                    }
                }
                _ => {}
            }
        }
    }
}
