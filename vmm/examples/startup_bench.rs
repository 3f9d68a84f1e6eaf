//! Start-up benchmark: tandem-vmm next to QEMU (`-enable-kvm -M microvm`) running the same
//! payload ("Hi\n" to COM1, then cli; hlt). The payload's first instruction is the serial write,
//! so "first instruction" is taken as the moment its byte reaches the log file (inotify).
//!
//! cargo build --release -p tandem-vmm --bin tandem-vmm --example startup_bench
//! target/release/examples/startup_bench [runs]     (default 50; needs /dev/kvm and qemu)

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tandem_vmm::{BootMode, CpuMode, MemoryConfig, VcpuConfig, VmConfig};

const GUEST_MIB: u64 = 16;
/// mov dx,0x3f8; "Hi\n"; cli; hlt; jmp hlt
const CODE: &[u8] = &[
    0xba, 0xf8, 0x03, 0xb0, b'H', 0xee, 0xb0, b'i', 0xee, 0xb0, b'\n', 0xee, 0xfa, 0xf4, 0xeb, 0xfd,
];

struct Watch(OwnedFd);

impl Watch {
    fn new(path: &Path) -> anyhow::Result<Self> {
        std::fs::write(path, b"")?;
        // SAFETY: plain syscalls; the fd is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            bail!("inotify_init1: {}", std::io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), libc::IN_MODIFY) } < 0 {
            bail!("inotify_add_watch: {}", std::io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    fn wait(&self, timeout: Duration) -> anyhow::Result<Instant> {
        let mut p = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) } != 1 {
            bail!("no serial output within {timeout:?}");
        }
        Ok(Instant::now())
    }
}

fn rss_without_guest(pid: u32) -> anyhow::Result<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let (mut total, mut size, mut found) = (0u64, 0u64, false);
    for line in smaps.lines() {
        let kb = |l: &str| -> u64 {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        if line.starts_with("Size:") {
            size = kb(line);
        } else if line.starts_with("Rss:") {
            if size == GUEST_MIB * 1024 {
                found = true;
            } else {
                total += kb(line);
            }
        }
    }
    if !found {
        bail!("guest memory mapping of {GUEST_MIB} MiB not found in /proc/{pid}/smaps");
    }
    Ok(total)
}

fn kill(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

struct Sample {
    first_byte: Duration,
    ready: Option<Duration>,
}

fn run_tandem(bin: &Path, dir: &Path, rss: bool) -> anyhow::Result<(Sample, Option<u64>)> {
    let log = dir.join("tandem.log");
    let sock = dir.join("tandem.sock");
    let _ = std::fs::remove_file(&sock);
    let watch = Watch::new(&log)?;
    let cfg = VmConfig {
        kernel: dir.join("payload.bin"),
        boot: BootMode::Flat {
            load_addr: 0x1000,
            mode: CpuMode::Real16,
        },
        initrd: None,
        cmdline: String::new(),
        vcpus: vec![VcpuConfig { host_cpu: None }],
        memory: MemoryConfig {
            size_mib: GUEST_MIB,
            ..Default::default()
        },
        nics: vec![],
        disks: vec![],
        vsock: None,
        serial_log: Some(log.clone()),
        agent: None,
        netns: None,
    };
    let json = serde_json::to_string(&cfg)?;
    let t0 = Instant::now();
    let mut child = Command::new(bin)
        .args(["--config-json", &json, "--api-socket"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn tandem-vmm")?;
    let first = watch.wait(Duration::from_secs(5))? - t0;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let ready = t0.elapsed();
    if line != "READY\n" {
        bail!("tandem-vmm said {line:?}");
    }
    let r = if rss {
        std::thread::sleep(Duration::from_millis(200));
        Some(rss_without_guest(child.id())?)
    } else {
        None
    };
    kill(child);
    let _ = std::fs::remove_file(&sock);
    Ok((
        Sample {
            first_byte: first,
            ready: Some(ready),
        },
        r,
    ))
}

fn run_qemu(dir: &Path, rss: bool) -> anyhow::Result<(Sample, Option<u64>)> {
    let log = dir.join("qemu.log");
    let watch = Watch::new(&log)?;
    let t0 = Instant::now();
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-enable-kvm",
            "-M",
            "microvm,rtc=off",
            "-m",
            &format!("{GUEST_MIB}M"),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
        ])
        .arg(format!("file:{}", log.display()))
        .arg("-bios")
        .arg(dir.join("bios.bin"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn qemu-system-x86_64")?;
    let first = watch.wait(Duration::from_secs(10))? - t0;
    let r = if rss {
        std::thread::sleep(Duration::from_millis(200));
        Some(rss_without_guest(child.id())?)
    } else {
        None
    };
    kill(child);
    Ok((
        Sample {
            first_byte: first,
            ready: None,
        },
        r,
    ))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(50);
    let exe = std::env::current_exe()?;
    let bin: PathBuf = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("tandem-vmm"))
        .context("binary dir")?;
    if !bin.exists() {
        bail!(
            "{}: build it first (cargo build --release -p tandem-vmm)",
            bin.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("tandem-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("payload.bin"), CODE)?;
    // The same code as a 64 KiB BIOS for QEMU: code at F000:0000, reset vector jumps there.
    let mut bios = vec![0xf4u8; 65536];
    bios[..CODE.len()].copy_from_slice(CODE);
    bios[0xfff0..0xfff5].copy_from_slice(&[0xea, 0x00, 0x00, 0x00, 0xf0]);
    std::fs::write(dir.join("bios.bin"), bios)?;

    let result = (|| -> anyhow::Result<()> {
        let (mut t_first, mut t_ready, mut q_first) = (vec![], vec![], vec![]);
        let mut t_rss = 0;
        let mut q_rss = 0;
        for i in 0..runs {
            let (s, r) = run_tandem(&bin, &dir, i == 0)?;
            t_first.push(s.first_byte);
            t_ready.extend(s.ready);
            if let Some(r) = r {
                t_rss = r;
            }
            let (s, r) = run_qemu(&dir, i == 0)?;
            q_first.push(s.first_byte);
            if let Some(r) = r {
                q_rss = r;
            }
        }
        let (tf, tr, qf) = (median(t_first), median(t_ready), median(q_first));
        println!("runs: {runs} each, guest memory {GUEST_MIB} MiB, 1 vCPU");
        println!(
            "start -> first instruction (= first serial byte): tandem-vmm {:.2} ms, qemu {:.2} ms, ratio {:.3}",
            ms(tf),
            ms(qf),
            ms(tf) / ms(qf)
        );
        println!(
            "start -> READY (vCPUs running, control socket up): tandem-vmm {:.2} ms",
            ms(tr)
        );
        println!(
            "RSS apart from guest memory: tandem-vmm {:.2} MiB, qemu {:.2} MiB, ratio {:.3}",
            t_rss as f64 / 1024.0,
            q_rss as f64 / 1024.0,
            t_rss as f64 / q_rss as f64
        );
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
