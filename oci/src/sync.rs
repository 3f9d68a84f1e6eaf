//! The sync channel between the engine and the re-executed init: a SOCK_SEQPACKET socketpair
//! carrying small JSON messages, optionally with one fd (SCM_RIGHTS).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::{Deserialize, Serialize};

/// Environment variable naming the init's end of the socketpair.
pub const SYNC_FD_ENV: &str = "_TANDEM_SYNC_FD";
/// Environment variable naming the memfd holding the init's [`crate::init::InitConfig`].
pub const CONFIG_FD_ENV: &str = "_TANDEM_CONFIG_FD";

/// Messages in both directions.
#[derive(Debug, Serialize, Deserialize)]
pub enum Msg {
    /// engine -> init: the init is in its cgroups, go on.
    Go,
    /// init -> engine: write uid/gid maps for this pid (new user namespace).
    MapIds { pid: i32 },
    /// engine -> init: maps written.
    MapsDone,
    /// intermediate -> engine: host pid of the container process.
    Pid(i32),
    /// container -> engine: the pty master rides along (SCM_RIGHTS).
    Console,
    /// init -> engine: a warning to log.
    Warn(String),
    /// container -> engine: waiting for start (create) / about to exec (exec).
    Ready,
    /// init or container -> engine: setup failed.
    Error(String),
}

pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    /// A connected pair, both ends close-on-exec.
    pub fn pair() -> std::io::Result<(Channel, Channel)> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    pub fn from_fd(fd: OwnedFd) -> Channel {
        Channel { fd }
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    pub fn send(&self, msg: &Msg) -> std::io::Result<()> {
        self.send_fd(msg, None)
    }

    pub fn send_fd(&self, msg: &Msg, fd: Option<RawFd>) -> std::io::Result<()> {
        let data = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
        let iov = [IoSlice::new(&data)];
        let fds;
        let cmsgs: Vec<ControlMessage> = match fd {
            Some(f) => {
                fds = [f];
                vec![ControlMessage::ScmRights(&fds)]
            }
            None => vec![],
        };
        loop {
            match sendmsg::<()>(
                self.fd.as_raw_fd(),
                &iov,
                &cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Like [`Channel::recv`], but fails with `TimedOut` when nothing arrives before `deadline`.
    pub fn recv_until(
        &self,
        deadline: std::time::Instant,
    ) -> std::io::Result<Option<(Msg, Option<OwnedFd>)>> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no message from the container init",
                ));
            }
            let ms = left.as_millis().min(u128::from(i32::MAX as u32)) as i32;
            let mut pfd = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            match poll(
                &mut pfd,
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => return self.recv(),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Next message; `None` at EOF (every peer closed its end).
    pub fn recv(&self) -> std::io::Result<Option<(Msg, Option<OwnedFd>)>> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut cmsg = nix::cmsg_space!([RawFd; 2]);
        loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let r = recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            );
            let r = match r {
                Ok(r) => r,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let mut fd = None;
            for c in r.cmsgs()? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for f in fds {
                        // SAFETY: the kernel just gave us this fd; we own it now.
                        let owned = unsafe { OwnedFd::from_raw_fd(f) };
                        if fd.is_none() {
                            fd = Some(owned);
                        }
                    }
                }
            }
            let n = r.bytes;
            if n == 0 {
                return Ok(None);
            }
            let msg: Msg = serde_json::from_slice(&buf[..n]).map_err(std::io::Error::other)?;
            return Ok(Some((msg, fd)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_fds_cross() {
        let (a, b) = Channel::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        a.send(&Msg::Pid(42)).unwrap();
        a.send_fd(&Msg::Console, Some(f.as_raw_fd())).unwrap();
        match b.recv().unwrap() {
            Some((Msg::Pid(42), None)) => {}
            m => panic!("{m:?}"),
        }
        match b.recv().unwrap() {
            Some((Msg::Console, Some(_fd))) => {}
            m => panic!("{m:?}"),
        }
        drop(a);
        assert!(b.recv().unwrap().is_none());
    }

    #[test]
    fn recv_until_times_out() {
        let (_a, b) = Channel::pair().unwrap();
        let t = std::time::Instant::now();
        let e = b
            .recv_until(t + std::time::Duration::from_millis(50))
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(t.elapsed() >= std::time::Duration::from_millis(50));
    }
}
