//! The agent's child reaper. As PID 1 (or a child subreaper) the agent inherits every orphan and
//! must collect every exit status; the container engine requires that its caller reaps with
//! `waitpid(-1)`. One thread reads SIGCHLD from a signalfd and reaps everything; callers that
//! want a status `track` a pid (while holding the reaper's lock across spawn + track, so that a
//! fast exit cannot be lost) and `wait` for it. Statuses of untracked pids are dropped.
//!
//! SIGCHLD must be blocked in every thread ([`block_signals`] first thing in `main`).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::{io_err, Result};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// containerd's convention: the code, or 128 + signal.
    pub fn status(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

#[derive(Debug, Default)]
pub struct Table {
    /// Tracked pids; `Some` once exited.
    pids: HashMap<i32, Option<Exit>>,
}

impl Table {
    pub fn track(&mut self, pid: i32) {
        self.pids.entry(pid).or_insert(None);
    }
}

/// Shared handle of the reaper.
#[derive(Debug, Clone, Default)]
pub struct Reaper {
    inner: Arc<(Mutex<Table>, Condvar)>,
}

/// Block SIGCHLD and SIGIO in the calling thread (and so in every thread spawned after).
pub fn block_signals() -> Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.add(Signal::SIGIO);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(|e| io_err("block SIGCHLD/SIGIO")(e.into()))
}

impl Reaper {
    /// Start the reaping thread. SIGCHLD must already be blocked.
    pub fn start() -> Result<Self> {
        let reaper = Reaper::default();
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGCHLD);
        let sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC)
            .map_err(|e| io_err("signalfd(SIGCHLD)")(e.into()))?;
        let r = reaper.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || loop {
                // Reap first: children may have exited before the thread started.
                r.reap_all();
                if let Err(e) = sfd.read_signal() {
                    tracing::error!("reaper: read signalfd: {e}");
                    return;
                }
            })
            .map_err(io_err("spawn reaper thread"))?;
        Ok(reaper)
    }

    fn reap_all(&self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.record(pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => self.record(pid, Exit::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    }

    fn record(&self, pid: Pid, exit: Exit) {
        let (lock, cvar) = &*self.inner;
        let mut table = lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = table.pids.get_mut(&pid.as_raw()) {
            *slot = Some(exit);
            cvar.notify_all();
        } else {
            tracing::debug!("reaped untracked pid {pid}: {exit:?}");
        }
    }

    /// Lock the table; hold it across spawn + [`Table::track`].
    pub fn lock(&self) -> MutexGuard<'_, Table> {
        self.inner.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for a tracked pid to exit, at most `timeout`. The pid stays tracked (later waits see
    /// the same status) until [`Reaper::forget`].
    pub fn wait(&self, pid: i32, timeout: Duration) -> Option<Exit> {
        let (lock, cvar) = &*self.inner;
        let deadline = Instant::now() + timeout;
        let mut table = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match table.pids.get(&pid) {
                Some(Some(exit)) => return Some(*exit),
                Some(None) => {}
                None => return None,
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            table = cvar
                .wait_timeout(table, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Stop tracking a pid (its status will be dropped).
    pub fn forget(&self, pid: i32) {
        self.lock().pids.remove(&pid);
    }
}
