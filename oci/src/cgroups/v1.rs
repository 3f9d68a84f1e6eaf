//! cgroup v1 files.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType, LinuxResources};

use super::{cg_err, keyed, read, read_keyed, read_u64, write, Cgroup};
use crate::{HugetlbStats, Result, Stats};

/// A new v1 cpuset cgroup starts with empty cpus/mems, and a task cannot join it until they are
/// set: copy them from the parent, level by level down the path.
pub(super) fn populate_cpuset(mount: &Path, rel: &str) -> Result<()> {
    let mut parent = mount.to_path_buf();
    for comp in rel.split('/').filter(|c| !c.is_empty()) {
        let dir = parent.join(comp);
        for f in ["cpuset.cpus", "cpuset.mems"] {
            let cur = fs::read_to_string(dir.join(f)).unwrap_or_default();
            if cur.trim().is_empty() {
                let p = read(&parent, f)?;
                write(&dir, f, p.trim())?;
            }
        }
        parent = dir;
    }
    Ok(())
}

fn dir(cg: &Cgroup, controller: &str) -> Result<std::path::PathBuf> {
    cg.dir_of(controller).ok_or_else(|| {
        cg_err(
            Path::new(&cg.rel),
            format!("resources need the {controller} controller, which is not mounted"),
        )
    })
}

pub(super) fn device_rule(d: &LinuxDeviceCgroup) -> String {
    let typ = match d.typ() {
        None | Some(LinuxDeviceType::A) => "a",
        Some(LinuxDeviceType::B) => "b",
        Some(LinuxDeviceType::C) | Some(LinuxDeviceType::U) => "c",
        Some(LinuxDeviceType::P) => "p",
    };
    let num = |n: Option<i64>| {
        n.filter(|n| *n >= 0)
            .map_or("*".to_string(), |n| n.to_string())
    };
    let access = d.access().clone().unwrap_or_else(|| "rwm".into());
    format!("{typ} {}:{} {access}", num(d.major()), num(d.minor()))
}

/// Device rules runc always allows (null, zero, full, tty, random, urandom, ptmx, pts).
pub(crate) const DEFAULT_ALLOWED_DEVICES: &[&str] = &[
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 5:0 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
    "c *:* m",
    "b *:* m",
];

pub(super) fn apply(cg: &Cgroup, res: &LinuxResources, initial: bool) -> Result<()> {
    if let Some(cpu) = res.cpu() {
        if cpu.shares().is_some() || cpu.quota().is_some() || cpu.period().is_some() {
            let d = dir(cg, "cpu")?;
            if let Some(s) = cpu.shares() {
                write(&d, "cpu.shares", &s.to_string())?;
            }
            if let Some(p) = cpu.period() {
                write(&d, "cpu.cfs_period_us", &p.to_string())?;
            }
            if let Some(q) = cpu.quota() {
                let q = if q <= 0 { -1 } else { q };
                write(&d, "cpu.cfs_quota_us", &q.to_string())?;
            }
        }
        if let Some(p) = cpu.realtime_period() {
            write(&dir(cg, "cpu")?, "cpu.rt_period_us", &p.to_string())?;
        }
        if let Some(r) = cpu.realtime_runtime() {
            write(&dir(cg, "cpu")?, "cpu.rt_runtime_us", &r.to_string())?;
        }
        if let Some(c) = cpu.cpus().as_deref().filter(|c| !c.is_empty()) {
            write(&dir(cg, "cpuset")?, "cpuset.cpus", c)?;
        }
        if let Some(m) = cpu.mems().as_deref().filter(|m| !m.is_empty()) {
            write(&dir(cg, "cpuset")?, "cpuset.mems", m)?;
        }
    }
    if let Some(mem) = res.memory() {
        let d = || dir(cg, "memory");
        if let Some(r) = mem.reservation() {
            write(&d()?, "memory.soft_limit_in_bytes", &r.to_string())?;
        }
        match (mem.limit(), mem.swap()) {
            (Some(l), Some(s)) => {
                let d = d()?;
                // limit first; when raising both, memsw must grow first (memsw >= limit)
                if write(&d, "memory.limit_in_bytes", &l.to_string()).is_err() {
                    write(&d, "memory.memsw.limit_in_bytes", &s.to_string())?;
                    write(&d, "memory.limit_in_bytes", &l.to_string())?;
                } else {
                    write(&d, "memory.memsw.limit_in_bytes", &s.to_string())?;
                }
            }
            (Some(l), None) => write(&d()?, "memory.limit_in_bytes", &l.to_string())?,
            (None, Some(s)) => write(&d()?, "memory.memsw.limit_in_bytes", &s.to_string())?,
            (None, None) => {}
        }
        if let Some(sw) = mem.swappiness() {
            if sw > 100 {
                return Err(cg_err(
                    &d()?,
                    format!("memory.swappiness {sw} is above 100"),
                ));
            }
            write(&d()?, "memory.swappiness", &sw.to_string())?;
        }
        if mem.disable_oom_killer() == Some(true) {
            write(&d()?, "memory.oom_control", "1")?;
        }
    }
    if let Some(p) = res.pids() {
        let v = if p.limit() > 0 {
            p.limit().to_string()
        } else {
            "max".into()
        };
        write(&dir(cg, "pids")?, "pids.max", &v)?;
    }
    if let Some(devs) = res.devices() {
        if let Some(d) = cg.dir_of("devices") {
            for dev in devs {
                let file = if dev.allow() {
                    "devices.allow"
                } else {
                    "devices.deny"
                };
                write(&d, file, &device_rule(dev))?;
            }
            if initial {
                for r in DEFAULT_ALLOWED_DEVICES {
                    write(&d, "devices.allow", r)?;
                }
            }
        } else if !devs.is_empty() {
            tracing::warn!(cgroup = %cg.rel, "no devices hierarchy: device rules skipped");
        }
    }
    if let Some(b) = res.block_io() {
        if let Some(w) = b.weight() {
            write(&dir(cg, "blkio")?, "blkio.weight", &w.to_string())?;
        }
        let d = || dir(cg, "blkio");
        for (file, list) in [
            (
                "blkio.throttle.read_bps_device",
                b.throttle_read_bps_device(),
            ),
            (
                "blkio.throttle.write_bps_device",
                b.throttle_write_bps_device(),
            ),
            (
                "blkio.throttle.read_iops_device",
                b.throttle_read_iops_device(),
            ),
            (
                "blkio.throttle.write_iops_device",
                b.throttle_write_iops_device(),
            ),
        ] {
            for t in list.iter().flatten() {
                write(
                    &d()?,
                    file,
                    &format!("{}:{} {}", t.major(), t.minor(), t.rate()),
                )?;
            }
        }
    }
    if let Some(n) = res.network() {
        if let Some(c) = n.class_id() {
            write(&dir(cg, "net_cls")?, "net_cls.classid", &c.to_string())?;
        }
    }
    Ok(())
}

pub(super) fn write_hugetlb(dir: &Path, page: &str, limit: i64) -> Result<()> {
    write(
        dir,
        &format!("hugetlb.{page}.limit_in_bytes"),
        &limit.to_string(),
    )
}

pub(super) fn stats(cg: &Cgroup, st: &mut Stats) {
    if let Some(d) = cg.dir_of("cpuacct") {
        st.cpu.usage_total_ns = read_u64(&d, "cpuacct.usage");
        let user = read_u64(&d, "cpuacct.usage_user");
        let sys = read_u64(&d, "cpuacct.usage_sys");
        if user != 0 || sys != 0 {
            st.cpu.usage_user_ns = user;
            st.cpu.usage_kernel_ns = sys;
        } else {
            // cpuacct.stat is in USER_HZ ticks
            let tick = 1_000_000_000 / clock_ticks();
            let kv = read_keyed(&d, "cpuacct.stat");
            st.cpu.usage_user_ns = keyed(&kv, "user") * tick;
            st.cpu.usage_kernel_ns = keyed(&kv, "system") * tick;
        }
    }
    if let Some(d) = cg.dir_of("cpu") {
        let kv = read_keyed(&d, "cpu.stat");
        st.cpu.nr_periods = keyed(&kv, "nr_periods");
        st.cpu.nr_throttled = keyed(&kv, "nr_throttled");
        st.cpu.throttled_time_ns = keyed(&kv, "throttled_time");
    }
    if let Some(d) = cg.dir_of("memory") {
        st.memory.usage_bytes = read_u64(&d, "memory.usage_in_bytes");
        st.memory.max_usage_bytes = read_u64(&d, "memory.max_usage_in_bytes");
        st.memory.limit_bytes = read_u64(&d, "memory.limit_in_bytes");
        st.memory.failcnt = read_u64(&d, "memory.failcnt");
        let kv = read_keyed(&d, "memory.stat");
        st.memory.cache_bytes = keyed(&kv, "total_cache").max(keyed(&kv, "cache"));
        st.memory.rss_bytes = keyed(&kv, "total_rss").max(keyed(&kv, "rss"));
        st.memory.oom_kills = keyed(&read_keyed(&d, "memory.oom_control"), "oom_kill");
    }
    if let Some(d) = cg.dir_of("pids") {
        st.pids.current = read_u64(&d, "pids.current");
        st.pids.limit = read_u64(&d, "pids.max");
    }
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Page sizes found in a hugetlb directory from files named `hugetlb.<size>.<suffix>`.
pub(super) fn page_sizes(dir: &Path, suffix: &str) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let rest = n.strip_prefix("hugetlb.")?;
            let size = rest.strip_suffix(suffix)?;
            (!size.contains('.')).then(|| size.to_string())
        })
        .collect();
    out.sort();
    out
}

pub(super) fn hugetlb_stats(dir: &Path) -> Vec<HugetlbStats> {
    page_sizes(dir, ".limit_in_bytes")
        .into_iter()
        .map(|p| HugetlbStats {
            usage_bytes: read_u64(dir, &format!("hugetlb.{p}.usage_in_bytes")),
            max_usage_bytes: read_u64(dir, &format!("hugetlb.{p}.max_usage_in_bytes")),
            failcnt: read_u64(dir, &format!("hugetlb.{p}.failcnt")),
            page_size: p,
        })
        .collect()
}

/// Register an eventfd for OOM events through `cgroup.event_control`.
pub(super) fn oom_notifier(dir: &Path) -> Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned right after.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if raw < 0 {
        return Err(cg_err(
            dir,
            format!("eventfd: {}", std::io::Error::last_os_error()),
        ));
    }
    // SAFETY: fresh fd.
    let efd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let ctl_path = dir.join("memory.oom_control");
    let ctl = fs::File::open(&ctl_path).map_err(|e| cg_err(&ctl_path, format!("open: {e}")))?;
    write(
        dir,
        "cgroup.event_control",
        &format!("{} {}", efd.as_raw_fd(), ctl.as_raw_fd()),
    )?;
    Ok(efd)
}

#[cfg(test)]
mod tests {
    use super::super::tests::fake_v1;
    use super::super::Cgroup;
    use super::*;

    fn res(json: &str) -> LinuxResources {
        serde_json::from_str(json).unwrap()
    }

    fn rd(p: std::path::PathBuf) -> String {
        fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{p:?}: {e}"))
            .trim()
            .to_string()
    }

    #[test]
    fn v1_resource_files() {
        let t = tempfile::tempdir().unwrap();
        fake_v1(t.path(), false);
        let cg = Cgroup::new(t.path(), "/k8s.io/c1").unwrap();
        cg.create().unwrap();
        let r = t.path();
        // cpuset populated from the parent down the path
        assert_eq!(rd(r.join("cpuset/k8s.io/cpuset.cpus")), "0-1");
        assert_eq!(rd(r.join("cpuset/k8s.io/c1/cpuset.mems")), "0");
        cg.apply(
            &res(r#"{"cpu":{"shares":512,"quota":50000,"period":100000,"cpus":"1","mems":"0"},
                 "memory":{"limit":16777216,"reservation":8388608,"swap":33554432},
                 "pids":{"limit":10},
                 "devices":[{"allow":false,"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":3,"access":"rw"}]}"#),
            true,
        )
        .unwrap();
        assert_eq!(rd(r.join("cpu/k8s.io/c1/cpu.shares")), "512");
        assert_eq!(rd(r.join("cpu/k8s.io/c1/cpu.cfs_quota_us")), "50000");
        assert_eq!(rd(r.join("cpu/k8s.io/c1/cpu.cfs_period_us")), "100000");
        assert_eq!(rd(r.join("cpuset/k8s.io/c1/cpuset.cpus")), "1");
        assert_eq!(
            rd(r.join("memory/k8s.io/c1/memory.limit_in_bytes")),
            "16777216"
        );
        assert_eq!(
            rd(r.join("memory/k8s.io/c1/memory.memsw.limit_in_bytes")),
            "33554432"
        );
        assert_eq!(
            rd(r.join("memory/k8s.io/c1/memory.soft_limit_in_bytes")),
            "8388608"
        );
        assert_eq!(rd(r.join("pids/k8s.io/c1/pids.max")), "10");
        // a plain file keeps only the last write: the last default rule
        assert_eq!(rd(r.join("devices/k8s.io/c1/devices.deny")), "a *:* rwm");
        assert_eq!(rd(r.join("devices/k8s.io/c1/devices.allow")), "b *:* m");
        cg.apply(&res(r#"{"pids":{"limit":-1}}"#), false).unwrap();
        assert_eq!(rd(r.join("pids/k8s.io/c1/pids.max")), "max");
    }

    #[test]
    fn hybrid_hugetlb_goes_to_unified() {
        let t = tempfile::tempdir().unwrap();
        fake_v1(t.path(), true);
        let cg = Cgroup::new(t.path(), "/default/h1").unwrap();
        cg.create().unwrap();
        let r = t.path();
        assert_eq!(rd(r.join("unified/cgroup.subtree_control")), "+hugetlb");
        assert_eq!(
            rd(r.join("unified/default/cgroup.subtree_control")),
            "+hugetlb"
        );
        cg.apply(
            &res(r#"{"hugepageLimits":[{"pageSize":"2MB","limit":4194304}]}"#),
            true,
        )
        .unwrap();
        assert_eq!(rd(r.join("unified/default/h1/hugetlb.2MB.max")), "4194304");
        assert!(cg.dirs().contains(&r.join("unified/default/h1")));
    }

    #[test]
    fn v1_hugetlb_and_stats() {
        let t = tempfile::tempdir().unwrap();
        fake_v1(t.path(), false);
        fs::create_dir_all(t.path().join("hugetlb")).unwrap();
        let cg = Cgroup::new(t.path(), "c2").unwrap();
        cg.create().unwrap();
        let r = t.path();
        cg.apply(
            &res(r#"{"hugepageLimits":[{"pageSize":"2MB","limit":2097152}]}"#),
            true,
        )
        .unwrap();
        assert_eq!(
            rd(r.join("hugetlb/c2/hugetlb.2MB.limit_in_bytes")),
            "2097152"
        );
        fs::write(r.join("hugetlb/c2/hugetlb.2MB.usage_in_bytes"), "4096\n").unwrap();
        fs::write(r.join("hugetlb/c2/hugetlb.2MB.failcnt"), "3\n").unwrap();
        fs::write(r.join("memory/c2/memory.usage_in_bytes"), "1000\n").unwrap();
        fs::write(
            r.join("memory/c2/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        fs::write(
            r.join("memory/c2/memory.stat"),
            "cache 5\nrss 6\ntotal_cache 50\ntotal_rss 60\n",
        )
        .unwrap();
        fs::write(r.join("cpuacct/c2/cpuacct.usage"), "123456\n").unwrap();
        fs::write(
            r.join("cpu/c2/cpu.stat"),
            "nr_periods 4\nnr_throttled 1\nthrottled_time 99\n",
        )
        .unwrap();
        fs::write(r.join("pids/c2/pids.current"), "3\n").unwrap();
        fs::write(r.join("pids/c2/pids.max"), "max\n").unwrap();
        let st = cg.stats().unwrap();
        assert_eq!(st.memory.usage_bytes, 1000);
        assert_eq!(st.memory.oom_kills, 2);
        assert_eq!(st.memory.cache_bytes, 50);
        assert_eq!(st.memory.rss_bytes, 60);
        assert_eq!(st.cpu.usage_total_ns, 123456);
        assert_eq!(st.cpu.nr_throttled, 1);
        assert_eq!(st.cpu.throttled_time_ns, 99);
        assert_eq!(st.pids.current, 3);
        assert_eq!(st.pids.limit, u64::MAX);
        assert_eq!(st.hugetlb.len(), 1);
        assert_eq!(st.hugetlb[0].page_size, "2MB");
        assert_eq!(st.hugetlb[0].usage_bytes, 4096);
        assert_eq!(st.hugetlb[0].failcnt, 3);
        assert_eq!(cg.oom_kills().unwrap(), 2);
    }

    #[test]
    fn v1_freezer_on_fake_tree() {
        let t = tempfile::tempdir().unwrap();
        fake_v1(t.path(), false);
        let cg = Cgroup::new(t.path(), "f1").unwrap();
        cg.create().unwrap();
        // a plain file reflects the written state at once
        cg.set_frozen(true).unwrap();
        assert!(cg.is_frozen().unwrap());
        cg.set_frozen(false).unwrap();
        assert!(!cg.is_frozen().unwrap());
    }
}
