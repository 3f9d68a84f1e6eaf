//! containerd's stdio: fifo paths in CreateTaskRequest / ExecProcessRequest.
//!
//! Without a terminal, stdout and stderr fifos are handed straight to the process (no copy, no
//! buffer in the shim). They are opened read-write so that the open never blocks and the
//! process never sees EPIPE while containerd (the reader) is away, e.g. restarting. Stdin goes
//! through a pipe and a copy task, because CloseIO must give the process EOF while containerd
//! may still hold its end of the fifo.
//!
//! With a terminal, the engine returns the pty master: stdin fifo -> master and
//! master -> stdout fifo are copied by two tasks; ResizePty sets the window size on the master.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// The stdio paths containerd gave for one process. Empty means none (`/dev/null`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

fn ctx(what: &str, path: &str) -> impl FnOnce(std::io::Error) -> std::io::Error {
    let msg = format!("{what} {path}");
    move |e| std::io::Error::new(e.kind(), format!("{msg}: {e}"))
}

/// Open an output fifo (or file) for handing to a process. Read-write: never blocks, never
/// EPIPE while the reader is away.
fn open_output(path: &str) -> std::io::Result<Option<OwnedFd>> {
    if path.is_empty() {
        return Ok(None);
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(ctx("open", path))?;
    Ok(Some(f.into()))
}

/// Open an input fifo for the shim to read from: read-only and non-blocking. epoll reports
/// nothing until a writer (containerd) has come, and a hang-up once the last writer is gone
/// again, so the copy sees EOF exactly when containerd closes its end.
fn open_input(path: &str) -> std::io::Result<pipe::Receiver> {
    pipe::OpenOptions::new()
        .open_receiver(path)
        .map_err(ctx("open", path))
}

/// The IO of one process as the shim holds it after spawn.
#[derive(Default)]
pub struct ProcessIo {
    stdin_close: Option<oneshot::Sender<()>>,
    console: Option<Arc<AsyncFd<OwnedFd>>>,
    /// Becomes true when the terminal output copy is done (the process and everything holding
    /// the pty are gone).
    output_done: Option<watch::Receiver<bool>>,
    tasks: Vec<JoinHandle<()>>,
}

/// What a process gets before spawn, plus what the shim keeps until the process exists.
pub struct Prepared {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    stdin_src: Option<pipe::Receiver>,
    stdin_dst: Option<pipe::Sender>,
    paths: StdioPaths,
}

/// Open what the process needs before it is spawned. For a terminal nothing is handed over
/// (the engine makes the pty), the fifos are opened after spawn by [`Prepared::attach`].
pub fn prepare(paths: &StdioPaths) -> std::io::Result<Prepared> {
    let mut p = Prepared {
        stdin: None,
        stdout: None,
        stderr: None,
        stdin_src: None,
        stdin_dst: None,
        paths: paths.clone(),
    };
    if paths.terminal {
        return Ok(p);
    }
    if !paths.stdin.is_empty() {
        let src = open_input(&paths.stdin)?;
        let (tx, rx) = pipe::pipe()?;
        p.stdin = Some(rx.into_blocking_fd()?);
        p.stdin_src = Some(src);
        p.stdin_dst = Some(tx);
    }
    p.stdout = open_output(&paths.stdout)?;
    p.stderr = if paths.stderr == paths.stdout && !paths.stderr.is_empty() {
        p.stdout
            .as_ref()
            .map(|f| f.try_clone())
            .transpose()
            .map_err(ctx("dup", &paths.stderr))?
    } else {
        open_output(&paths.stderr)?
    };
    Ok(p)
}

impl Prepared {
    /// Start the copies once the process exists. `console` is the pty master for a terminal.
    pub fn attach(self, console: Option<OwnedFd>) -> std::io::Result<ProcessIo> {
        let mut io = ProcessIo::default();
        if let Some(master) = console {
            set_nonblocking(&master)?;
            // SAFETY: the master is an OwnedFd that the AsyncFd owns and nothing else closes.
            let master = Arc::new(unsafe { AsyncFd::register(master)? });
            if !self.paths.stdin.is_empty() {
                let src = open_input(&self.paths.stdin)?;
                let (close_tx, close_rx) = oneshot::channel();
                io.stdin_close = Some(close_tx);
                io.tasks
                    .push(tokio::spawn(copy_in_to_pty(src, master.clone(), close_rx)));
            }
            let (done_tx, done_rx) = watch::channel(false);
            if !self.paths.stdout.is_empty() {
                let dst = pipe::OpenOptions::new()
                    .read_write(true)
                    .open_sender(&self.paths.stdout)
                    .map_err(ctx("open", &self.paths.stdout))?;
                io.tasks
                    .push(tokio::spawn(copy_pty_out(master.clone(), dst, done_tx)));
            } else {
                let _ = done_tx.send(true);
            }
            io.output_done = Some(done_rx);
            io.console = Some(master);
            return Ok(io);
        }
        if let (Some(src), Some(dst)) = (self.stdin_src, self.stdin_dst) {
            let (close_tx, close_rx) = oneshot::channel();
            io.stdin_close = Some(close_tx);
            io.tasks.push(tokio::spawn(copy_in(src, dst, close_rx)));
        }
        Ok(io)
    }
}

impl ProcessIo {
    /// Give the process EOF on stdin (after what is already written has been passed on).
    pub fn close_stdin(&mut self) {
        if let Some(tx) = self.stdin_close.take() {
            let _ = tx.send(());
        }
    }

    pub fn resize(&self, width: u32, height: u32) -> std::io::Result<()> {
        let Some(master) = &self.console else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the process has no terminal",
            ));
        };
        let ws = libc::winsize {
            ws_row: height.min(u16::MAX as u32) as u16,
            ws_col: width.min(u16::MAX as u32) as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
        if unsafe { libc::ioctl(master.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// A waiter for the terminal output to be copied out entirely (None without a terminal).
    pub fn output_waiter(&self) -> Option<watch::Receiver<bool>> {
        self.output_done.clone()
    }

    /// Stop every copy and close everything.
    pub fn shutdown(&mut self) {
        self.stdin_close.take();
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.console.take();
    }
}

impl Drop for ProcessIo {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

const BUF: usize = 8192;

/// stdin fifo -> process pipe, until CloseIO (then pass on what is buffered and close).
async fn copy_in(mut src: pipe::Receiver, mut dst: pipe::Sender, mut close: oneshot::Receiver<()>) {
    let mut buf = vec![0u8; BUF];
    loop {
        tokio::select! {
            r = src.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if dst.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            _ = &mut close => {
                while let Ok(n) = src.try_read(&mut buf) {
                    if n == 0 || dst.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                break;
            }
        }
    }
    // dropping dst closes the pipe: the process reads EOF
}

async fn write_pty(master: &AsyncFd<OwnedFd>, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let mut guard = master.writable().await?;
        match guard.try_io(|m| nix::unistd::write(m.get_ref(), data).map_err(Into::into)) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

/// stdin fifo -> pty master, until CloseIO.
async fn copy_in_to_pty(
    mut src: pipe::Receiver,
    master: Arc<AsyncFd<OwnedFd>>,
    mut close: oneshot::Receiver<()>,
) {
    let mut buf = vec![0u8; BUF];
    loop {
        tokio::select! {
            r = src.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if write_pty(&master, &buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            _ = &mut close => {
                while let Ok(n) = src.try_read(&mut buf) {
                    if n == 0 || write_pty(&master, &buf[..n]).await.is_err() {
                        break;
                    }
                }
                break;
            }
        }
    }
}

/// pty master -> stdout fifo, until the pty is closed on the other side (EIO).
async fn copy_pty_out(
    master: Arc<AsyncFd<OwnedFd>>,
    mut dst: pipe::Sender,
    done: watch::Sender<bool>,
) {
    let mut buf = vec![0u8; BUF];
    loop {
        let mut guard = match master.readable().await {
            Ok(g) => g,
            Err(_) => break,
        };
        match guard
            .try_io(|m| nix::unistd::read(m.get_ref(), &mut buf).map_err(std::io::Error::from))
        {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => {
                if dst.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            Ok(Err(_)) => break, // EIO: every slave fd is closed
            Err(_would_block) => {}
        }
    }
    let _ = done.send(true);
}

/// Wait (at most `limit`) until the terminal output has been copied out entirely.
pub async fn wait_output(waiter: Option<watch::Receiver<bool>>, limit: Duration) {
    if let Some(mut rx) = waiter {
        let _ = tokio::time::timeout(limit, rx.wait_for(|d| *d)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::path::Path;

    fn fifo(dir: &Path, name: &str) -> String {
        let p = dir.join(name);
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        p.to_string_lossy().into_owned()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stdin_reaches_process_and_close_io_gives_eof() {
        let dir = tempfile::tempdir().unwrap();
        let paths = StdioPaths {
            stdin: fifo(dir.path(), "in"),
            ..Default::default()
        };
        let prepared = prepare(&paths).unwrap();
        let mut child_stdin =
            std::fs::File::from(prepared.stdin.as_ref().unwrap().try_clone().unwrap());
        let mut pio = Prepared {
            stdin: None,
            ..prepared
        }
        .attach(None)
        .unwrap();
        // containerd side writes into the fifo and keeps it open
        let mut w = std::fs::OpenOptions::new()
            .write(true)
            .open(&paths.stdin)
            .unwrap();
        std::io::Write::write_all(&mut w, b"hello").unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        pio.close_stdin();
        let got = tokio::task::spawn_blocking(move || {
            let mut s = String::new();
            child_stdin.read_to_string(&mut s).map(|_| s)
        });
        let got = tokio::time::timeout(Duration::from_secs(5), got)
            .await
            .expect("EOF after CloseIO")
            .unwrap()
            .unwrap();
        assert_eq!(got, "hello");
        drop(w);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn writer_closing_the_fifo_gives_eof_without_close_io() {
        let dir = tempfile::tempdir().unwrap();
        let paths = StdioPaths {
            stdin: fifo(dir.path(), "in"),
            ..Default::default()
        };
        let mut prepared = prepare(&paths).unwrap();
        let mut child_stdin = std::fs::File::from(prepared.stdin.take().unwrap());
        let _pio = prepared.attach(None).unwrap();
        // no writer yet: the copy must not take that for EOF
        tokio::time::sleep(Duration::from_millis(50)).await;
        let path = paths.stdin.clone();
        tokio::task::spawn_blocking(move || {
            let mut w = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            std::io::Write::write_all(&mut w, b"abc\n").unwrap();
        })
        .await
        .unwrap();
        let got = tokio::task::spawn_blocking(move || {
            let mut s = String::new();
            child_stdin.read_to_string(&mut s).map(|_| s)
        });
        let got = tokio::time::timeout(Duration::from_secs(5), got)
            .await
            .expect("EOF once the writer closed")
            .unwrap()
            .unwrap();
        assert_eq!(got, "abc\n");
    }

    #[test]
    fn outputs_open_without_a_reader_and_stderr_may_share_stdout() {
        let dir = tempfile::tempdir().unwrap();
        let out = fifo(dir.path(), "out");
        let paths = StdioPaths {
            stdout: out.clone(),
            stderr: out,
            ..Default::default()
        };
        let p = prepare(&paths).unwrap();
        assert!(p.stdout.is_some() && p.stderr.is_some() && p.stdin.is_none());
        let e = prepare(&StdioPaths {
            stdout: dir.path().join("missing").to_string_lossy().into_owned(),
            ..Default::default()
        })
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("missing"), "{e}");
    }
}
