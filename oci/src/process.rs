//! Engine side of the process model: spawn `init_exe INIT_ARG` with the sync socket and the
//! config memfd, place it in the cgroups, answer its requests, collect pid / console / errors.

use std::io::{Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;

use oci_spec::runtime::LinuxIdMapping;

use crate::cgroups::Cgroup;
use crate::init::InitConfig;
use crate::sync::{Channel, Msg, CONFIG_FD_ENV, SYNC_FD_ENV};
use crate::{Error, Result, Spawned, Stdio, INIT_ARG};

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// Make sure an fd is not 0, 1 or 2 (those become the child's stdio).
fn above_stdio(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: plain fcntl on an fd we own.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: n is a fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

fn memfd(data: &[u8]) -> std::io::Result<OwnedFd> {
    // SAFETY: a static NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"tandem-init-config".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fd.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.write_all(data)?;
    f.rewind()?;
    Ok(OwnedFd::from(f))
}

fn write_maps(pid: i32, uid: &[LinuxIdMapping], gid: &[LinuxIdMapping]) -> Result<()> {
    let fmt = |m: &[LinuxIdMapping]| {
        m.iter()
            .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
            .collect::<String>()
    };
    for (file, maps) in [("gid_map", gid), ("uid_map", uid)] {
        if maps.is_empty() {
            return Err(Error::Spec {
                field: format!("linux.{}Mappings", &file[..3]),
                msg: "a new user namespace needs id mappings".into(),
            });
        }
        let p = format!("/proc/{pid}/{file}");
        std::fs::write(&p, fmt(maps)).map_err(io(format!("write {p}")))?;
    }
    Ok(())
}

/// How long the init may take to set the container up (mounts, namespaces) before create or
/// exec gives up and undoes everything.
pub(crate) const INIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// What to spawn.
pub(crate) struct SpawnReq<'a> {
    pub init_exe: &'a Path,
    pub config: &'a InitConfig,
    pub stdio: Stdio,
    pub terminal: bool,
    pub cgroup: &'a Cgroup,
    pub uid_maps: Vec<LinuxIdMapping>,
    pub gid_maps: Vec<LinuxIdMapping>,
    /// exec: wait until the program is exec'd (channel EOF) instead of stopping at Ready.
    pub until_exec: bool,
}

/// Spawn the init and run the protocol. On error the caller cleans up (cgroup procs are
/// killed there); the spawned helper itself is killed here.
pub(crate) fn spawn(mut req: SpawnReq<'_>, on_pid: &mut dyn FnMut(i32)) -> Result<Spawned> {
    let data = serde_json::to_vec(req.config).map_err(|e| Error::Init(format!("config: {e}")))?;
    let cfg_fd =
        above_stdio(memfd(&data).map_err(io("memfd_create"))?).map_err(io("dup config fd"))?;
    let (ours, theirs) = Channel::pair().map_err(io("socketpair"))?;
    let theirs = above_stdio(theirs.into_fd()).map_err(io("dup sync fd"))?;
    let (sync_raw, cfg_raw): (RawFd, RawFd) = (theirs.as_raw_fd(), cfg_fd.as_raw_fd());

    let mut cmd = std::process::Command::new(req.init_exe);
    cmd.arg(INIT_ARG)
        .env(SYNC_FD_ENV, sync_raw.to_string())
        .env(CONFIG_FD_ENV, cfg_raw.to_string());
    let conv =
        |f: Option<OwnedFd>| f.map_or_else(std::process::Stdio::null, std::process::Stdio::from);
    if req.terminal {
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
    } else {
        let s = std::mem::take(&mut req.stdio);
        cmd.stdin(conv(s.stdin))
            .stdout(conv(s.stdout))
            .stderr(conv(s.stderr));
    }
    // SAFETY: only async-signal-safe fcntl calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for fd in [sync_raw, cfg_raw] {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(io(format!("spawn {} {INIT_ARG}", req.init_exe.display())))?;
    drop(theirs);
    drop(cfg_fd);
    drop(cmd);
    let helper = child.id() as i32;
    let mut reported = None;
    let r = drive(&req, &ours, helper, &mut |p| {
        reported = Some(p);
        on_pid(p)
    });
    if r.is_err() {
        use nix::sys::signal::{kill, SIGKILL};
        use nix::sys::wait::{waitpid, WaitPidFlag};
        use nix::unistd::Pid;
        let _ = kill(Pid::from_raw(helper), SIGKILL);
        // the failed container process is a child of the caller (CLONE_PARENT) and nobody else
        // knows its pid: kill and reap it here (ECHILD if the caller's reaper was faster)
        if let Some(p) = reported {
            let _ = kill(Pid::from_raw(p), SIGKILL);
            let _ = waitpid(Pid::from_raw(p), Some(WaitPidFlag::__WALL));
        }
    }
    // reap the helper; the caller's subreaper may have got there first (ECHILD)
    let _ = child.wait();
    r
}

fn drive(
    req: &SpawnReq<'_>,
    chan: &Channel,
    helper: i32,
    on_pid: &mut dyn FnMut(i32),
) -> Result<Spawned> {
    req.cgroup.add_pid(helper)?;
    chan.send(&Msg::Go).map_err(io("sync: send Go"))?;
    let mut pid = None;
    let mut console = None;
    let mut ready = false;
    let deadline = std::time::Instant::now() + INIT_TIMEOUT;
    loop {
        let m = chan.recv_until(deadline).map_err(io(format!(
            "sync: waiting for the container init (pid {helper}, up to {}s)",
            INIT_TIMEOUT.as_secs()
        )))?;
        match m {
            Some((Msg::MapIds { pid: p }, _)) => {
                if let Err(e) = write_maps(p, &req.uid_maps, &req.gid_maps) {
                    let _ = chan.send(&Msg::Error(e.to_string()));
                    return Err(e);
                }
                chan.send(&Msg::MapsDone)
                    .map_err(io("sync: send MapsDone"))?;
            }
            Some((Msg::Pid(p), _)) => {
                pid = Some(p);
                on_pid(p);
            }
            Some((Msg::Console, fd)) => {
                console =
                    Some(fd.ok_or_else(|| Error::Init("console message without an fd".into()))?);
            }
            Some((Msg::Warn(w), _)) => tracing::warn!("container init: {w}"),
            Some((Msg::Ready, _)) => ready = true,
            Some((Msg::Error(e), _)) => {
                // the intermediate reports the pid of the failed process too (it must be
                // reaped); wait for that unless it is already known or cannot come any more
                if pid.is_none() {
                    while let Ok(Some((m, _))) = chan.recv() {
                        if let Msg::Pid(p) = m {
                            on_pid(p);
                            break;
                        }
                    }
                }
                return Err(Error::Init(e));
            }
            Some((m, _)) => return Err(Error::Init(format!("unexpected message {m:?}"))),
            None => {
                if ready && pid.is_some() {
                    break;
                }
                return Err(Error::Init(
                    "init exited without reporting (see the container's stderr)".into(),
                ));
            }
        }
        if ready && pid.is_some() && !req.until_exec {
            break;
        }
    }
    let pid = pid.unwrap_or_default();
    if req.terminal && console.is_none() {
        return Err(Error::Init(
            "terminal requested but no console received".into(),
        ));
    }
    Ok(Spawned { pid, console })
}
