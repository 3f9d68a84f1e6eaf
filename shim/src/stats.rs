//! tandem_oci::Stats -> containerd's `io.containerd.cgroups.v1.Metrics` (what `ctr task
//! metrics` and CRI's ContainerStats decode).

use containerd_shim::protos::cgroups::metrics::{
    CPUStat, CPUUsage, HugetlbStat, MemoryEntry, MemoryOomControl, MemoryStat, Metrics, PidsStat,
    Throttle,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use tandem_oci::Stats;

/// `Metrics::descriptor().full_name()`, without loading descriptors at run time.
pub const METRICS_TYPE_URL: &str = "io.containerd.cgroups.v1.Metrics";

pub fn to_metrics(s: &Stats) -> Metrics {
    Metrics {
        hugetlb: s
            .hugetlb
            .iter()
            .map(|h| HugetlbStat {
                usage: h.usage_bytes,
                max: h.max_usage_bytes,
                failcnt: h.failcnt,
                pagesize: h.page_size.clone(),
                ..Default::default()
            })
            .collect(),
        pids: Some(PidsStat {
            current: s.pids.current,
            // "max" (no limit) reads as 0, as containerd's own cgroups code reports it
            limit: if s.pids.limit == u64::MAX {
                0
            } else {
                s.pids.limit
            },
            ..Default::default()
        })
        .into(),
        cpu: Some(CPUStat {
            usage: Some(CPUUsage {
                total: s.cpu.usage_total_ns,
                kernel: s.cpu.usage_kernel_ns,
                user: s.cpu.usage_user_ns,
                ..Default::default()
            })
            .into(),
            throttling: Some(Throttle {
                periods: s.cpu.nr_periods,
                throttled_periods: s.cpu.nr_throttled,
                throttled_time: s.cpu.throttled_time_ns,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
        .into(),
        memory: Some(MemoryStat {
            cache: s.memory.cache_bytes,
            rss: s.memory.rss_bytes,
            total_cache: s.memory.cache_bytes,
            total_rss: s.memory.rss_bytes,
            hierarchical_memory_limit: s.memory.limit_bytes,
            usage: Some(MemoryEntry {
                limit: s.memory.limit_bytes,
                usage: s.memory.usage_bytes,
                max: s.memory.max_usage_bytes,
                failcnt: s.memory.failcnt,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
        .into(),
        memory_oom_control: Some(MemoryOomControl {
            oom_kill: s.memory.oom_kills,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

/// The metrics packed as containerd expects them in StatsResponse.stats.
pub fn to_any(s: &Stats) -> Result<Any, containerd_shim::protos::protobuf::Error> {
    let m = to_metrics(s);
    Ok(Any {
        type_url: METRICS_TYPE_URL.to_string(),
        value: m.write_to_bytes()?,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_oci::{CpuStats, HugetlbStats, MemoryStats, PidsStats};

    #[test]
    fn fields_land_where_containerd_reads_them() {
        let s = Stats {
            cpu: CpuStats {
                usage_total_ns: 100,
                usage_user_ns: 60,
                usage_kernel_ns: 40,
                nr_periods: 5,
                nr_throttled: 2,
                throttled_time_ns: 7,
            },
            memory: MemoryStats {
                usage_bytes: 4096,
                max_usage_bytes: 8192,
                limit_bytes: 1 << 20,
                cache_bytes: 1000,
                rss_bytes: 2000,
                failcnt: 3,
                oom_kills: 1,
            },
            pids: PidsStats {
                current: 4,
                limit: 100,
            },
            hugetlb: vec![HugetlbStats {
                page_size: "2MB".into(),
                usage_bytes: 2 << 20,
                max_usage_bytes: 4 << 20,
                failcnt: 0,
            }],
        };
        let any = to_any(&s).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v1.Metrics");
        use containerd_shim::protos::protobuf::MessageFull;
        assert_eq!(METRICS_TYPE_URL, Metrics::descriptor().full_name());
        let m = Metrics::parse_from_bytes(&any.value).unwrap();
        let cpu = m.cpu.as_ref().unwrap();
        assert_eq!(cpu.usage.total, 100);
        assert_eq!(cpu.usage.user, 60);
        assert_eq!(cpu.usage.kernel, 40);
        assert_eq!(cpu.throttling.periods, 5);
        assert_eq!(cpu.throttling.throttled_periods, 2);
        assert_eq!(cpu.throttling.throttled_time, 7);
        let mem = m.memory.as_ref().unwrap();
        assert_eq!(mem.usage.usage, 4096);
        assert_eq!(mem.usage.max, 8192);
        assert_eq!(mem.usage.limit, 1 << 20);
        assert_eq!(mem.usage.failcnt, 3);
        assert_eq!(mem.cache, 1000);
        assert_eq!(mem.rss, 2000);
        assert_eq!(m.memory_oom_control.oom_kill, 1);
        assert_eq!(m.pids.current, 4);
        assert_eq!(m.pids.limit, 100);
        assert_eq!(m.hugetlb.len(), 1);
        assert_eq!(m.hugetlb[0].pagesize, "2MB");
        assert_eq!(m.hugetlb[0].usage, 2 << 20);
        assert_eq!(m.hugetlb[0].max, 4 << 20);
    }
}
