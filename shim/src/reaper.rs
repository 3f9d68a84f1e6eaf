//! The shim is the child subreaper of everything it starts: container processes are re-parented
//! to it (and the engine's helpers exit to it too). SIGCHLD wakes one task that reaps with
//! `waitpid(-1, WNOHANG)` until nothing is left and hands each exit status to whoever
//! subscribed to that pid.
//!
//! A process may exit before its pid is known to anyone (a `/bin/true` that is done before the
//! engine has even returned its pid), so exits of unknown pids are kept for a grace period and
//! handed to a late subscriber. Unknown pids that nobody claims (the engine's helpers) are
//! dropped after the grace period.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How long the exit of a pid nobody subscribed to is kept.
const GRACE: Duration = Duration::from_secs(30);

/// An exit as the shim reports it: `code` is the exit code, or 128 + signal number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub pid: i32,
    pub code: i32,
    pub at: SystemTime,
}

/// Exit code of a wait status as containerd reports it (128 + signal for a signal death).
pub fn exit_code(status: &WaitStatus) -> Option<(i32, i32)> {
    match *status {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), code)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), 128 + sig as i32)),
        _ => None,
    }
}

#[derive(Default)]
struct Table {
    subscribers: HashMap<i32, oneshot::Sender<Exit>>,
    /// Exits nobody asked for yet, with the monotonic time they were reaped.
    unclaimed: HashMap<i32, (Exit, Instant)>,
}

/// Pid -> subscriber dispatch. Cheap to clone.
#[derive(Clone, Default)]
pub struct Reaper {
    table: Arc<Mutex<Table>>,
}

impl Reaper {
    /// Make this process a child subreaper and start the reaping task on the current tokio
    /// runtime.
    pub fn start() -> std::io::Result<Reaper> {
        // SAFETY: plain prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Reaper::default();
        let r = reaper.clone();
        tokio::spawn(async move {
            // reap once at start: a child may have exited before the handler was installed
            loop {
                r.reap_all();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Collect every exited child, without blocking.
    fn reap_all(&self) {
        loop {
            match waitpid(
                Pid::from_raw(-1),
                Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL),
            ) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(status) => {
                    if let Some((pid, code)) = exit_code(&status) {
                        self.dispatch(Exit {
                            pid,
                            code,
                            at: SystemTime::now(),
                        });
                    }
                }
                Err(Errno::EINTR) => {}
                Err(e) => {
                    tracing::warn!("waitpid(-1): {e}");
                    break;
                }
            }
        }
    }

    /// Hand an exit to the subscriber of its pid, or keep it for a late subscriber.
    pub fn dispatch(&self, exit: Exit) {
        let mut t = self.table.lock().expect("reaper table poisoned");
        if let Some(tx) = t.subscribers.remove(&exit.pid) {
            tracing::debug!(pid = exit.pid, code = exit.code, "process exited");
            let _ = tx.send(exit);
            return;
        }
        let now = Instant::now();
        t.unclaimed
            .retain(|_, (_, at)| now.duration_since(*at) < GRACE);
        t.unclaimed.insert(exit.pid, (exit, now));
    }

    /// A receiver that resolves with the exit of `pid`. If `pid` already exited (and was reaped
    /// before anybody asked) it resolves at once, unless a live process holds that pid again:
    /// then the kept exit belonged to an earlier process with the same pid.
    pub fn subscribe(&self, pid: i32) -> oneshot::Receiver<Exit> {
        self.subscribe_with(pid, |p| {
            std::path::Path::new(&format!("/proc/{p}")).exists()
        })
    }

    fn subscribe_with(&self, pid: i32, alive: impl Fn(i32) -> bool) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        let mut t = self.table.lock().expect("reaper table poisoned");
        if let Some((exit, at)) = t.unclaimed.remove(&pid) {
            if at.elapsed() < GRACE && !alive(pid) {
                let _ = tx.send(exit);
                return rx;
            }
        }
        t.subscribers.insert(pid, tx);
        rx
    }

    /// Forget a subscription (the process is no longer of interest).
    pub fn unsubscribe(&self, pid: i32) {
        self.table
            .lock()
            .expect("reaper table poisoned")
            .subscribers
            .remove(&pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(pid: i32, code: i32) -> Exit {
        Exit {
            pid,
            code,
            at: SystemTime::now(),
        }
    }

    #[test]
    fn exit_codes_follow_containerd() {
        let p = Pid::from_raw(42);
        assert_eq!(exit_code(&WaitStatus::Exited(p, 3)), Some((42, 3)));
        assert_eq!(
            exit_code(&WaitStatus::Signaled(
                p,
                nix::sys::signal::Signal::SIGKILL,
                false
            )),
            Some((42, 137))
        );
        assert_eq!(
            exit_code(&WaitStatus::Signaled(
                p,
                nix::sys::signal::Signal::SIGTERM,
                true
            )),
            Some((42, 143))
        );
        assert_eq!(exit_code(&WaitStatus::StillAlive), None);
    }

    #[test]
    fn subscriber_gets_its_exit_only() {
        let r = Reaper::default();
        let mut a = r.subscribe_with(10, |_| false);
        let mut b = r.subscribe_with(11, |_| false);
        r.dispatch(exit(10, 3));
        assert_eq!(a.try_recv().unwrap().code, 3);
        assert!(b.try_recv().is_err(), "11 has not exited");
        r.dispatch(exit(11, 0));
        assert_eq!(b.try_recv().unwrap().code, 0);
    }

    #[test]
    fn exit_before_subscription_is_kept() {
        let r = Reaper::default();
        r.dispatch(exit(20, 1));
        let mut rx = r.subscribe_with(20, |_| false);
        assert_eq!(rx.try_recv().unwrap().code, 1);
        // it was handed out once; a new subscriber waits for a new exit
        let mut again = r.subscribe_with(20, |_| false);
        assert!(again.try_recv().is_err());
    }

    #[test]
    fn kept_exit_of_a_reused_pid_is_not_handed_out() {
        let r = Reaper::default();
        r.dispatch(exit(30, 9));
        // a live process holds pid 30 again: the kept exit was an earlier process's
        let mut rx = r.subscribe_with(30, |_| true);
        assert!(rx.try_recv().is_err());
        r.dispatch(exit(30, 0));
        assert_eq!(rx.try_recv().unwrap().code, 0);
    }

    #[test]
    fn unsubscribed_exit_is_kept_not_sent() {
        let r = Reaper::default();
        let mut rx = r.subscribe_with(40, |_| false);
        r.unsubscribe(40);
        r.dispatch(exit(40, 2));
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reaps_a_real_child_that_exits_before_subscription() {
        let r = Reaper::start().expect("subreaper");
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        std::mem::forget(child); // the reaper, not std, collects it
        tokio::time::sleep(Duration::from_millis(200)).await;
        let got = tokio::time::timeout(Duration::from_secs(5), r.subscribe(pid))
            .await
            .expect("exit within 5 s")
            .unwrap();
        assert_eq!(got.code, 7);
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", "kill -TERM $$"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let rx = r.subscribe(pid);
        std::mem::forget(child);
        let got = tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.code, 128 + libc::SIGTERM);
    }
}
