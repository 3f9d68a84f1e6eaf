//! How big a pod's VM is and where it runs, from the pod's OCI spec and the host's topology:
//! vCPU count from the CPU limit (quota/period, rounded up) or the cpuset, each vCPU pinned 1:1
//! to a cpuset CPU when there is a cpuset; memory from the memory limit plus the guest's own
//! overhead, on hugepages when the spec has `hugepageLimits`, bound to the NUMA nodes of the
//! pinned CPUs. Sysfs is read through a root path so that the logic is tested on fake trees.

use std::path::Path;

use serde_json::Value;
use tandem_vmm::{MemoryBacking, MemoryConfig, VcpuConfig};

use crate::config::VmSection;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {msg}")]
pub struct Error {
    pub field: String,
    pub msg: String,
}

fn err(field: &str, msg: impl Into<String>) -> Error {
    Error {
        field: field.to_string(),
        msg: msg.into(),
    }
}

/// Parse a kernel CPU list ("0-3,8,10-11"); sorted, without duplicates.
pub fn parse_cpulist(field: &str, s: &str) -> Result<Vec<usize>, Error> {
    let mut cpus = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let num = |x: &str| {
            x.trim()
                .parse::<usize>()
                .map_err(|_| err(field, format!("{s:?}: {x:?} is not a CPU number")))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b || b - a > 4096 {
                    return Err(err(field, format!("{s:?}: bad range {part:?}")));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(num(part)?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// The NUMA nodes holding any of `cpus`, from `<sys>/devices/system/node/node*/cpulist`.
/// No node directory (a kernel without NUMA): no nodes, i.e. no binding.
pub fn numa_nodes_of(sys: &Path, cpus: &[usize]) -> Result<Vec<u32>, Error> {
    let dir = sys.join("devices/system/node");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(vec![]);
    };
    let mut nodes = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(n) = name
            .strip_prefix("node")
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let path = e.path().join("cpulist");
        let field = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| err(&field, e.to_string()))?;
        let list = parse_cpulist(&field, &text)?;
        if list.iter().any(|c| cpus.contains(c)) {
            nodes.push(n);
        }
    }
    nodes.sort_unstable();
    Ok(nodes)
}

/// The VM's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub vcpus: Vec<VcpuConfig>,
    pub memory: MemoryConfig,
}

fn mib_ceil(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// The VM shape for the spec of the pod's first container (`spec` is config.json).
pub fn shape(spec: &Value, cfg: &VmSection, sys: &Path) -> Result<Shape, Error> {
    let res = &spec["linux"]["resources"];
    let cpuset = match res["cpu"]["cpus"].as_str() {
        Some(s) if !s.trim().is_empty() => Some(parse_cpulist("linux.resources.cpu.cpus", s)?),
        _ => None,
    };
    let quota = res["cpu"]["quota"].as_i64().filter(|q| *q > 0);
    let period = res["cpu"]["period"]
        .as_u64()
        .filter(|p| *p > 0)
        .unwrap_or(100_000);
    let from_quota = quota.map(|q| (q as u64).div_ceil(period) as usize);
    let count = match (&cpuset, from_quota) {
        (Some(set), Some(n)) => n.clamp(1, set.len()),
        (Some(set), None) => set.len(),
        (None, Some(n)) => n.max(1),
        (None, None) => cfg.vcpus.max(1) as usize,
    };
    if count > tandem_vmm::config::MAX_VCPUS {
        return Err(err(
            "linux.resources.cpu",
            format!("{count} vCPUs, at most {}", tandem_vmm::config::MAX_VCPUS),
        ));
    }
    let pins: Vec<Option<usize>> = match &cpuset {
        Some(set) => set.iter().take(count).map(|c| Some(*c)).collect(),
        None => vec![None; count],
    };
    let vcpus = pins
        .into_iter()
        .map(|host_cpu| VcpuConfig { host_cpu })
        .collect();

    let limit = res["memory"]["limit"].as_i64().filter(|l| *l > 0);
    let mut size_mib = match limit {
        Some(l) => mib_ceil(l as u64) + cfg.overhead_mib,
        None => cfg.memory_mib,
    }
    .max(cfg.min_memory_mib);
    let mut backing = MemoryBacking::Anon;
    if let Some(limits) = res["hugepageLimits"].as_array() {
        for l in limits {
            let size = l["pageSize"].as_str().unwrap_or_default();
            let want = l["limit"].as_u64().unwrap_or(0);
            if want == 0 {
                continue;
            }
            let b = match size {
                "2MB" => MemoryBacking::Hugetlb2M,
                "1GB" => MemoryBacking::Hugetlb1G,
                other => {
                    return Err(err(
                        "linux.resources.hugepageLimits",
                        format!("page size {other:?}: the VM can use 2MB or 1GB pages"),
                    ))
                }
            };
            // the larger page size wins when both are asked for
            if b.page_size() > backing.page_size() {
                backing = b;
            }
        }
    }
    let page_mib = (backing.page_size() >> 20).max(1);
    size_mib = size_mib.div_ceil(page_mib) * page_mib;
    let numa_nodes = match &cpuset {
        Some(set) => numa_nodes_of(sys, &set[..count.min(set.len())])?,
        None => vec![],
    };
    Ok(Shape {
        vcpus,
        memory: MemoryConfig {
            size_mib,
            backing,
            numa_nodes,
            prefault: backing != MemoryBacking::Anon,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A fake sysfs with `nodes[i]` = cpulist of node i.
    fn fake_sys(nodes: &[&str]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (i, list) in nodes.iter().enumerate() {
            let n = d.path().join(format!("devices/system/node/node{i}"));
            std::fs::create_dir_all(&n).unwrap();
            std::fs::write(n.join("cpulist"), format!("{list}\n")).unwrap();
        }
        // not a node: must be ignored
        std::fs::create_dir_all(d.path().join("devices/system/node/power")).unwrap();
        d
    }

    fn cfg() -> VmSection {
        VmSection::default()
    }

    #[test]
    fn cpulists() {
        assert_eq!(
            parse_cpulist("f", "0-3,8,10-11\n").unwrap(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpulist("f", "5,1,5").unwrap(), vec![1, 5]);
        assert_eq!(parse_cpulist("f", "").unwrap(), Vec::<usize>::new());
        let e = parse_cpulist("linux.resources.cpu.cpus", "1-x").unwrap_err();
        assert!(e.to_string().contains("linux.resources.cpu.cpus"), "{e}");
        assert!(parse_cpulist("f", "3-1").is_err());
    }

    #[test]
    fn numa_nodes_from_a_two_node_tree() {
        let sys = fake_sys(&["0-3,8-11", "4-7,12-15"]);
        assert_eq!(numa_nodes_of(sys.path(), &[1, 2]).unwrap(), vec![0]);
        assert_eq!(numa_nodes_of(sys.path(), &[5, 13]).unwrap(), vec![1]);
        assert_eq!(numa_nodes_of(sys.path(), &[3, 4]).unwrap(), vec![0, 1]);
        assert_eq!(numa_nodes_of(sys.path(), &[99]).unwrap(), Vec::<u32>::new());
        let none = tempfile::tempdir().unwrap();
        assert_eq!(numa_nodes_of(none.path(), &[0]).unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn defaults_without_limits() {
        let sys = fake_sys(&["0-1"]);
        let s = shape(&json!({}), &cfg(), sys.path()).unwrap();
        assert_eq!(s.vcpus, vec![VcpuConfig { host_cpu: None }]);
        assert_eq!(s.memory.size_mib, 512);
        assert_eq!(s.memory.backing, MemoryBacking::Anon);
        assert!(s.memory.numa_nodes.is_empty());
    }

    #[test]
    fn vcpus_from_quota_round_up() {
        let sys = fake_sys(&["0-7"]);
        let spec = json!({"linux": {"resources": {"cpu": {"quota": 150000, "period": 100000}}}});
        let s = shape(&spec, &cfg(), sys.path()).unwrap();
        assert_eq!(s.vcpus.len(), 2);
        assert!(s.vcpus.iter().all(|v| v.host_cpu.is_none()));
        let spec = json!({"linux": {"resources": {"cpu": {"quota": 1000}}}});
        assert_eq!(shape(&spec, &cfg(), sys.path()).unwrap().vcpus.len(), 1);
    }

    #[test]
    fn cpuset_pins_one_to_one_and_binds_memory_to_its_node() {
        let sys = fake_sys(&["0-3", "4-7"]);
        let spec = json!({"linux": {"resources": {"cpu": {"cpus": "5-6"}}}});
        let s = shape(&spec, &cfg(), sys.path()).unwrap();
        assert_eq!(
            s.vcpus,
            vec![
                VcpuConfig { host_cpu: Some(5) },
                VcpuConfig { host_cpu: Some(6) }
            ]
        );
        assert_eq!(s.memory.numa_nodes, vec![1]);
        // a quota smaller than the cpuset takes its first CPUs
        let spec = json!({"linux": {"resources": {"cpu": {"cpus": "2,5-6", "quota": 50000, "period": 100000}}}});
        let s = shape(&spec, &cfg(), sys.path()).unwrap();
        assert_eq!(s.vcpus, vec![VcpuConfig { host_cpu: Some(2) }]);
        assert_eq!(s.memory.numa_nodes, vec![0]);
        let spec = json!({"linux": {"resources": {"cpu": {"cpus": "1-z"}}}});
        let e = shape(&spec, &cfg(), sys.path()).unwrap_err().to_string();
        assert!(e.contains("linux.resources.cpu.cpus"), "{e}");
    }

    #[test]
    fn memory_from_limit_with_overhead_floor_and_hugepages() {
        let sys = fake_sys(&["0-3", "4-7"]);
        let spec = json!({"linux": {"resources": {"memory": {"limit": 300 * 1024 * 1024 + 1}}}});
        let s = shape(&spec, &cfg(), sys.path()).unwrap();
        assert_eq!(s.memory.size_mib, 301 + 128);
        let spec = json!({"linux": {"resources": {"memory": {"limit": 16 << 20}}}});
        assert_eq!(
            shape(&spec, &cfg(), sys.path()).unwrap().memory.size_mib,
            256
        );
        let spec = json!({"linux": {"resources": {
            "memory": {"limit": (301u64 << 20)},
            "cpu": {"cpus": "4"},
            "hugepageLimits": [{"pageSize": "2MB", "limit": 64 << 20}]}}});
        let s = shape(&spec, &cfg(), sys.path()).unwrap();
        assert_eq!(s.memory.backing, MemoryBacking::Hugetlb2M);
        assert_eq!(s.memory.size_mib, 430, "429 MiB rounded up to 2 MiB pages");
        assert_eq!(s.memory.numa_nodes, vec![1]);
        assert!(s.memory.prefault);
        let spec = json!({"linux": {"resources": {
            "hugepageLimits": [{"pageSize": "2MB", "limit": 0}, {"pageSize": "1GB", "limit": 1 << 30}]}}});
        let s = shape(&spec, &cfg(), sys.path()).unwrap();
        assert_eq!(s.memory.backing, MemoryBacking::Hugetlb1G);
        assert_eq!(s.memory.size_mib, 1024);
        let spec = json!({"linux": {"resources": {
            "hugepageLimits": [{"pageSize": "64KB", "limit": 1 << 20}]}}});
        let e = shape(&spec, &cfg(), sys.path()).unwrap_err().to_string();
        assert!(e.contains("hugepageLimits") && e.contains("64KB"), "{e}");
    }
}
