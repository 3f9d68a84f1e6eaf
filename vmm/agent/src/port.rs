//! Bridge between the virtio-serial port and the agent's ttrpc server.
//!
//! ttrpc's server wants a listening socket; the port is a character device. So the server listens
//! on a unix socket inside the guest and this bridge, for each host connection, connects to it and
//! pumps bytes both ways. A host connection is a "session": it begins with the first bytes read
//! from the port and ends when the host side closes (a read of the port returns 0 and poll reports
//! POLLHUP), which closes the socket so the server drops that connection; bytes of the old session
//! still unwritten are dropped, never sent to the next host connection.
//!
//! While the host is not connected the port reads EOF at once, so the bridge waits for SIGIO,
//! which virtio_console sends when the host connection state changes (O_ASYNC + F_SETOWN), with a
//! 1 s safety net. SIGIO must be blocked in every thread ([`crate::reaper::block_signals`]).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::{io_err, Error, Result};

fn port_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Port {
        name: path.display().to_string(),
        msg: msg.to_string(),
    }
}

/// Open the port non-blocking with SIGIO notification to this process.
fn open_port(path: &Path) -> Result<File> {
    let port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err(format!("open {}", path.display())))?;
    // SAFETY: F_SETOWN with our pid on an fd we own.
    if unsafe { libc::fcntl(port.as_raw_fd(), libc::F_SETOWN, libc::getpid()) } < 0 {
        return Err(port_err(
            path,
            format!("F_SETOWN: {}", std::io::Error::last_os_error()),
        ));
    }
    let fl =
        OFlag::from_bits_truncate(fcntl(&port, FcntlArg::F_GETFL).map_err(|e| port_err(path, e))?);
    fcntl(
        &port,
        FcntlArg::F_SETFL(fl | OFlag::O_ASYNC | OFlag::O_NONBLOCK),
    )
    .map_err(|e| port_err(path, format!("O_ASYNC: {e}")))?;
    Ok(port)
}

fn wait_sigio() {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGIO);
    let ts = libc::timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    // SAFETY: valid set and timespec; a null siginfo pointer is allowed.
    unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
}

/// Write all of `data` to the non-blocking port; false when the host went away.
fn write_port(port: &File, mut data: &[u8]) -> bool {
    while !data.is_empty() {
        match (&*port).write(data) {
            Ok(0) => return false,
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLOUT)];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {
                        let re = fds[0].revents().unwrap_or(PollFlags::empty());
                        if re.contains(PollFlags::POLLHUP) && !re.contains(PollFlags::POLLOUT) {
                            return false;
                        }
                    }
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(_) => return false,
                }
            }
            Err(_) => return false,
        }
    }
    true
}

/// Serve sessions forever: bytes from the port go to a fresh connection to `server_socket`,
/// bytes from that connection go back to the port.
pub fn bridge(port_path: &Path, server_socket: &Path) -> Result<()> {
    let port = Arc::new(open_port(port_path)?);
    let mut session: Option<UnixStream> = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match (&*port).read(&mut buf) {
            Ok(0) => {
                // Host not connected (or just went away): end the session, wait for a change.
                if let Some(s) = session.take() {
                    tracing::info!("agent port: host disconnected");
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                wait_sigio();
            }
            Ok(n) => {
                if session.is_none() {
                    tracing::info!("agent port: host connected");
                    let s = UnixStream::connect(server_socket)
                        .map_err(io_err(format!("connect {}", server_socket.display())))?;
                    let back = s.try_clone().map_err(io_err("clone session socket"))?;
                    let port2 = Arc::clone(&port);
                    std::thread::Builder::new()
                        .name("port-writer".into())
                        .spawn(move || pump_to_port(back, &port2))
                        .map_err(io_err("spawn port writer"))?;
                    session = Some(s);
                }
                let s = session.as_mut().expect("session set above");
                if s.write_all(&buf[..n]).is_err() {
                    tracing::warn!("agent port: ttrpc server closed the session");
                    session = None;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(port_err(port_path, format!("poll: {e}"))),
                }
            }
            Err(e) => {
                return Err(port_err(
                    port_path,
                    format!("read (fd {}): {e}", port.as_raw_fd()),
                ))
            }
        }
    }
}

fn pump_to_port(mut from: UnixStream, port: &File) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if !write_port(port, &buf[..n]) {
                    // Host gone: drop what is left of this session.
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}
