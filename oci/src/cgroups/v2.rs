//! cgroup v2 files (pure v2, and the unified mount of the hybrid layout).

use std::fs;
use std::os::fd::OwnedFd;
use std::path::Path;

use oci_spec::runtime::LinuxResources;

use super::{cg_err, devices_bpf, keyed, read_keyed, read_u64, write};
use crate::{HugetlbStats, Result, Stats};

/// Make `mount/rel` with parents, enabling in each ancestor's `cgroup.subtree_control` every
/// controller that ancestor offers (so that the container's cgroup gets the resource files).
pub(super) fn create(mount: &Path, rel: &str) -> Result<()> {
    let mut cur = mount.to_path_buf();
    for comp in rel.split('/').filter(|c| !c.is_empty()) {
        let offered = fs::read_to_string(cur.join("cgroup.controllers")).unwrap_or_default();
        let enabled = fs::read_to_string(cur.join("cgroup.subtree_control")).unwrap_or_default();
        let missing: Vec<String> = offered
            .split_whitespace()
            .filter(|c| {
                !enabled
                    .split_whitespace()
                    .any(|e| e.trim_start_matches('+') == *c)
            })
            .map(|c| format!("+{c}"))
            .collect();
        if !missing.is_empty() && write(&cur, "cgroup.subtree_control", &missing.join(" ")).is_err()
        {
            // one controller that cannot be enabled (e.g. cpu with realtime tasks) must not
            // keep the others off: enable them one by one, warn about the refused ones
            for m in &missing {
                if let Err(e) = write(&cur, "cgroup.subtree_control", m) {
                    tracing::warn!("{e}");
                }
            }
        }
        cur = cur.join(comp);
        if let Err(e) = fs::create_dir(&cur) {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(cg_err(&cur, format!("mkdir: {e}")));
            }
        }
        // a fake tree has no kernel to fill in the files of a new directory
        if !cur.join("cgroup.controllers").exists() && !mount.join("cgroup.procs").exists() {
            let sub = fs::read_to_string(cur.parent().unwrap().join("cgroup.subtree_control"))
                .unwrap_or_default();
            let ctrls: Vec<&str> = sub
                .split_whitespace()
                .map(|c| c.trim_start_matches('+'))
                .collect();
            fs::write(cur.join("cgroup.controllers"), ctrls.join(" "))
                .map_err(|e| cg_err(&cur, e.to_string()))?;
        }
    }
    Ok(())
}

/// runc's conversion of cgroup v1 cpu shares (2..262144) to cgroup v2 cpu.weight (1..10000).
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    let s = shares.clamp(2, 262144);
    1 + ((s - 2) * 9999) / 262142
}

pub(super) fn write_hugetlb(dir: &Path, page: &str, limit: i64) -> Result<()> {
    let v = if limit < 0 {
        "max".to_string()
    } else {
        limit.to_string()
    };
    write(dir, &format!("hugetlb.{page}.max"), &v)
}

fn limit_str(v: i64) -> String {
    if v < 0 {
        "max".into()
    } else {
        v.to_string()
    }
}

pub(super) fn apply(dir: &Path, res: &LinuxResources, initial: bool) -> Result<()> {
    if let Some(cpu) = res.cpu() {
        if let Some(s) = cpu.shares() {
            write(dir, "cpu.weight", &shares_to_weight(s).to_string())?;
        }
        if cpu.quota().is_some() || cpu.period().is_some() {
            let quota = match cpu.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".into(),
            };
            let period = cpu.period().unwrap_or(100_000);
            write(dir, "cpu.max", &format!("{quota} {period}"))?;
        }
        if let Some(c) = cpu.cpus().as_deref().filter(|c| !c.is_empty()) {
            write(dir, "cpuset.cpus", c)?;
        }
        if let Some(m) = cpu.mems().as_deref().filter(|m| !m.is_empty()) {
            write(dir, "cpuset.mems", m)?;
        }
    }
    if let Some(mem) = res.memory() {
        // convert (and reject) swap before writing anything
        let swap = match mem.swap() {
            None => None,
            Some(s) if s < 0 => Some("max".to_string()),
            Some(s) => match mem.limit() {
                Some(l) if l >= 0 => {
                    if s < l {
                        return Err(cg_err(
                            dir,
                            format!("memory.swap {s} is below memory.limit {l}"),
                        ));
                    }
                    Some((s - l).to_string())
                }
                _ => {
                    return Err(cg_err(
                        dir,
                        format!("memory.swap {s} without a memory.limit cannot be converted to memory.swap.max"),
                    ))
                }
            },
        };
        if let Some(r) = mem.reservation() {
            write(dir, "memory.low", &limit_str(r))?;
        }
        if let Some(l) = mem.limit() {
            write(dir, "memory.max", &limit_str(l))?;
        }
        if let Some(v) = swap {
            // OCI swap is memory+swap; v2 swap.max is swap alone
            write(dir, "memory.swap.max", &v)?;
        }
    }
    if let Some(p) = res.pids() {
        let v = if p.limit() > 0 {
            p.limit().to_string()
        } else {
            "max".into()
        };
        write(dir, "pids.max", &v)?;
    }
    if let Some(h) = res.hugepage_limits() {
        for l in h {
            write_hugetlb(dir, l.page_size(), l.limit())?;
        }
    }
    if let Some(devs) = res.devices() {
        if initial {
            // cgroup2 device control is an eBPF program attached to the cgroup
            let mut rules: Vec<devices_bpf::Rule> = devs
                .iter()
                .filter_map(|d| devices_bpf::Rule::parse(d.allow(), &super::v1::device_rule(d)))
                .collect();
            if !rules.is_empty() {
                rules.extend(
                    super::v1::DEFAULT_ALLOWED_DEVICES
                        .iter()
                        .filter_map(|r| devices_bpf::Rule::parse(true, r)),
                );
                devices_bpf::attach(dir, &rules).map_err(|e| cg_err(dir, e))?;
            }
        } else if !devs.is_empty() {
            tracing::warn!(
                cgroup = %dir.display(),
                "cgroup v2: device rules are set at create only; update ignores them"
            );
        }
    }
    if let Some(b) = res.block_io() {
        if let Some(w) = b.weight() {
            // v1 blkio weight 10..1000 -> io.weight 1..10000
            let w = 1 + ((u64::from(w).saturating_sub(10)) * 9999) / 990;
            write(dir, "io.weight", &w.to_string())?;
        }
    }
    if let Some(u) = res.unified() {
        for (k, v) in u {
            if k.contains('/') || k.starts_with('.') {
                return Err(cg_err(
                    dir,
                    format!("linux.resources.unified key {k:?} is not a file name"),
                ));
            }
            write(dir, k, v)?;
        }
    }
    Ok(())
}

pub(super) fn stats(dir: &Path, st: &mut Stats) {
    let cpu = read_keyed(dir, "cpu.stat");
    st.cpu.usage_total_ns = keyed(&cpu, "usage_usec") * 1000;
    st.cpu.usage_user_ns = keyed(&cpu, "user_usec") * 1000;
    st.cpu.usage_kernel_ns = keyed(&cpu, "system_usec") * 1000;
    st.cpu.nr_periods = keyed(&cpu, "nr_periods");
    st.cpu.nr_throttled = keyed(&cpu, "nr_throttled");
    st.cpu.throttled_time_ns = keyed(&cpu, "throttled_usec") * 1000;
    st.memory.usage_bytes = read_u64(dir, "memory.current");
    st.memory.max_usage_bytes = read_u64(dir, "memory.peak");
    st.memory.limit_bytes = read_u64(dir, "memory.max");
    let ms = read_keyed(dir, "memory.stat");
    st.memory.cache_bytes = keyed(&ms, "file");
    st.memory.rss_bytes = keyed(&ms, "anon");
    let ev = read_keyed(dir, "memory.events");
    st.memory.failcnt = keyed(&ev, "max");
    st.memory.oom_kills = keyed(&ev, "oom_kill");
    st.pids.current = read_u64(dir, "pids.current");
    st.pids.limit = read_u64(dir, "pids.max");
    st.hugetlb = hugetlb_stats(dir);
}

pub(super) fn hugetlb_stats(dir: &Path) -> Vec<HugetlbStats> {
    super::v1::page_sizes(dir, ".max")
        .into_iter()
        .map(|p| HugetlbStats {
            usage_bytes: read_u64(dir, &format!("hugetlb.{p}.current")),
            max_usage_bytes: 0,
            failcnt: keyed(&read_keyed(dir, &format!("hugetlb.{p}.events")), "max"),
            page_size: p,
        })
        .collect()
}

/// inotify on memory.events: readable when the file changes (an OOM kill among others).
pub(super) fn oom_notifier(dir: &Path) -> Result<OwnedFd> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let ino = Inotify::init(InitFlags::IN_CLOEXEC)
        .map_err(|e| cg_err(dir, format!("inotify_init: {e}")))?;
    let p = dir.join("memory.events");
    ino.add_watch(&p, AddWatchFlags::IN_MODIFY)
        .map_err(|e| cg_err(&p, format!("inotify_add_watch: {e}")))?;
    Ok(OwnedFd::from(ino))
}

#[cfg(test)]
mod tests {
    use super::super::tests::fake_v2;
    use super::super::Cgroup;
    use super::*;

    fn rd(p: std::path::PathBuf) -> String {
        fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{p:?}: {e}"))
            .trim()
            .to_string()
    }

    #[test]
    fn weight_conversion_matches_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262144), 10000);
        assert_eq!(shares_to_weight(0), 0);
    }

    #[test]
    fn v2_resource_files() {
        let t = tempfile::tempdir().unwrap();
        fake_v2(t.path());
        let cg = Cgroup::new(t.path(), "/default/c1").unwrap();
        cg.create().unwrap();
        let r = t.path();
        assert_eq!(
            rd(r.join("cgroup.subtree_control")),
            "+cpuset +cpu +io +memory +hugetlb +pids"
        );
        let res: LinuxResources = serde_json::from_str(
            r#"{"cpu":{"shares":1024,"quota":50000,"period":100000,"cpus":"0-1","mems":"0"},
                "memory":{"limit":16777216,"swap":33554432,"reservation":1048576},
                "pids":{"limit":20},
                "hugepageLimits":[{"pageSize":"2MB","limit":2097152}],
                "unified":{"memory.high":"max"}}"#,
        )
        .unwrap();
        cg.apply(&res, true).unwrap();
        let d = r.join("default/c1");
        assert_eq!(rd(d.join("cpu.weight")), "39");
        assert_eq!(rd(d.join("cpu.max")), "50000 100000");
        assert_eq!(rd(d.join("cpuset.cpus")), "0-1");
        assert_eq!(rd(d.join("memory.max")), "16777216");
        assert_eq!(rd(d.join("memory.swap.max")), "16777216");
        assert_eq!(rd(d.join("memory.low")), "1048576");
        assert_eq!(rd(d.join("pids.max")), "20");
        assert_eq!(rd(d.join("hugetlb.2MB.max")), "2097152");
        assert_eq!(rd(d.join("memory.high")), "max");
        let bad: LinuxResources =
            serde_json::from_str(r#"{"memory":{"limit":100,"swap":50}}"#).unwrap();
        assert!(cg
            .apply(&bad, false)
            .unwrap_err()
            .to_string()
            .contains("memory.swap"));

        fs::write(
            d.join("memory.events"),
            "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
        )
        .unwrap();
        fs::write(
            d.join("cpu.stat"),
            "usage_usec 10\nuser_usec 6\nsystem_usec 4\n",
        )
        .unwrap();
        fs::write(d.join("hugetlb.2MB.current"), "2097152\n").unwrap();
        let st = cg.stats().unwrap();
        assert_eq!(st.memory.oom_kills, 1);
        assert_eq!(st.memory.failcnt, 4);
        assert_eq!(st.memory.limit_bytes, 16777216);
        assert_eq!(st.cpu.usage_total_ns, 10_000);
        assert_eq!(st.cpu.usage_user_ns, 6_000);
        assert_eq!(st.hugetlb[0].usage_bytes, 2097152);
        assert_eq!(cg.oom_kills().unwrap(), 1);

        fs::write(d.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        assert!(!cg.is_frozen().unwrap());
        fs::write(d.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        assert!(cg.is_frozen().unwrap());
    }
}
