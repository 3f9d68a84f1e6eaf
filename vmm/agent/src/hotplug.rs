//! Onlining of hot-plugged vCPUs and memory blocks in the guest (OnlineCpuMem). The guest has
//! no udev: a vCPU the host hot-adds appears as `/sys/devices/system/cpu/cpuN` with `online` 0,
//! and a memory block the kernel did not online by itself (`memhp_default_state=online` on the
//! command line does it) as `/sys/devices/system/memory/memoryN` with `state` "offline". The
//! agent writes `1` / `online` to them, until the host's counts are reached or the time is up.
//! Sysfs is read through a root path so that the logic is tested on fake trees.

use std::path::Path;
use std::time::{Duration, Instant};

/// Default and largest wait of one OnlineCpuMem call.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// Pause between two sysfs scans while waiting.
const POLL: Duration = Duration::from_millis(20);

/// What is online after a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Online {
    pub cpus: u32,
    pub memory_mib: u64,
    /// Onlined by this call.
    pub cpus_onlined: u32,
    pub blocks_onlined: u32,
    /// The counts asked for were not reached in time.
    pub timed_out: bool,
}

fn numbered(dir: &Path, prefix: &str) -> Vec<(u64, std::path::PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut v: Vec<_> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix(prefix)?.parse::<u64>().ok()?;
            Some((n, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// One pass: onlines every offline CPU and memory block; returns the counts after it.
pub fn online_pass(sys: &Path) -> Online {
    let mut o = Online::default();
    for (n, dir) in numbered(&sys.join("devices/system/cpu"), "cpu") {
        let f = dir.join("online");
        match std::fs::read_to_string(&f) {
            // cpu0 of this kernel has no `online` file: always online
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => o.cpus += 1,
            Err(e) => tracing::warn!("{}: {e}", f.display()),
            Ok(s) if s.trim() == "1" => o.cpus += 1,
            Ok(_) => match std::fs::write(&f, b"1") {
                Ok(()) => {
                    o.cpus += 1;
                    o.cpus_onlined += 1;
                    tracing::info!(cpu = n, "vCPU onlined");
                }
                Err(e) => tracing::warn!(cpu = n, "online {}: {e}", f.display()),
            },
        }
    }
    let mem = sys.join("devices/system/memory");
    let block = std::fs::read_to_string(mem.join("block_size_bytes"))
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
        .unwrap_or(128 << 20);
    let mut online_blocks = 0u64;
    for (n, dir) in numbered(&mem, "memory") {
        let f = dir.join("state");
        match std::fs::read_to_string(&f) {
            Ok(s) if s.trim() == "online" => online_blocks += 1,
            Ok(s) if s.trim() == "offline" => match std::fs::write(&f, b"online") {
                Ok(()) => {
                    online_blocks += 1;
                    o.blocks_onlined += 1;
                    tracing::info!(block = n, "memory block onlined");
                }
                Err(e) => tracing::warn!(block = n, "online {}: {e}", f.display()),
            },
            Ok(_) => {}
            Err(e) => tracing::warn!("{}: {e}", f.display()),
        }
    }
    o.memory_mib = (online_blocks * block) >> 20;
    o
}

/// Onlines what is offline until at least `cpus` CPUs and `memory_mib` MiB of memory blocks
/// are online, at most `wait` (capped at [`MAX_WAIT`]; zero: [`DEFAULT_WAIT`]): hot-plug
/// notifications reach the guest kernel asynchronously, so new CPUs/blocks may appear later.
pub fn online(sys: &Path, cpus: u32, memory_mib: u64, wait: Duration) -> Online {
    let wait = if wait.is_zero() {
        DEFAULT_WAIT
    } else {
        wait.min(MAX_WAIT)
    };
    let deadline = Instant::now() + wait;
    let (mut cpus_onlined, mut blocks_onlined) = (0, 0);
    loop {
        let mut o = online_pass(sys);
        cpus_onlined += o.cpus_onlined;
        blocks_onlined += o.blocks_onlined;
        o.cpus_onlined = cpus_onlined;
        o.blocks_onlined = blocks_onlined;
        if o.cpus >= cpus && o.memory_mib >= memory_mib {
            return o;
        }
        if Instant::now() >= deadline {
            o.timed_out = true;
            return o;
        }
        std::thread::sleep(POLL);
    }
}

/// MemTotal of `/proc/meminfo` text, in KiB.
pub fn mem_total_kib(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_sys(cpus: &[Option<&str>], blocks: &[&str]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (i, st) in cpus.iter().enumerate() {
            let c = d.path().join(format!("devices/system/cpu/cpu{i}"));
            std::fs::create_dir_all(&c).unwrap();
            if let Some(st) = st {
                std::fs::write(c.join("online"), format!("{st}\n")).unwrap();
            }
        }
        // not CPUs
        std::fs::create_dir_all(d.path().join("devices/system/cpu/cpufreq")).unwrap();
        std::fs::write(d.path().join("devices/system/cpu/online"), "0\n").unwrap();
        let m = d.path().join("devices/system/memory");
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(m.join("block_size_bytes"), "8000000\n").unwrap();
        for (i, st) in blocks.iter().enumerate() {
            let b = m.join(format!("memory{}", i * 8));
            std::fs::create_dir_all(&b).unwrap();
            std::fs::write(b.join("state"), format!("{st}\n")).unwrap();
        }
        d
    }

    #[test]
    fn onlines_offline_cpus_and_blocks() {
        let sys = fake_sys(
            &[None, Some("1"), Some("0"), Some("0")],
            &["online", "online", "offline", "going-offline"],
        );
        let o = online(sys.path(), 4, 384, Duration::from_millis(100));
        assert_eq!(o.cpus, 4);
        assert_eq!(o.cpus_onlined, 2);
        assert_eq!(o.memory_mib, 3 * 128);
        assert_eq!(o.blocks_onlined, 1);
        assert!(!o.timed_out);
        let cpu3 = sys.path().join("devices/system/cpu/cpu3/online");
        assert_eq!(std::fs::read_to_string(cpu3).unwrap(), "1");
        let b = sys.path().join("devices/system/memory/memory16/state");
        assert_eq!(std::fs::read_to_string(b).unwrap(), "online");
        // a second call has nothing left to do
        let o = online(sys.path(), 4, 0, Duration::ZERO);
        assert_eq!((o.cpus, o.cpus_onlined, o.blocks_onlined), (4, 0, 0));
    }

    #[test]
    fn counts_not_reached_time_out_with_what_is_there() {
        let sys = fake_sys(&[None, Some("0")], &["online"]);
        let t0 = Instant::now();
        let o = online(sys.path(), 3, 1024, Duration::from_millis(150));
        assert!(o.timed_out);
        assert_eq!((o.cpus, o.memory_mib), (2, 128));
        assert!(t0.elapsed() >= Duration::from_millis(150));
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn meminfo_total() {
        assert_eq!(
            mem_total_kib("MemTotal:        1000448 kB\nMemFree: 1 kB\n"),
            1000448
        );
        assert_eq!(mem_total_kib("nothing"), 0);
    }
}
