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

/// What one container asks of the pod's VM (Kata's hot-plug model): vCPUs =
/// ceil(quota/period) of its CPU limit, memory = its memory limit in MiB (rounded up); 0
/// without a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Demand {
    pub vcpus: usize,
    pub memory_mib: u64,
}

fn cpu_demand(cpu: &Value) -> usize {
    let period = cpu["period"].as_u64().filter(|p| *p > 0).unwrap_or(100_000);
    match cpu["quota"].as_i64() {
        Some(q) if q > 0 => (q as u64).div_ceil(period) as usize,
        _ => 0,
    }
}

fn memory_demand(memory: &Value) -> u64 {
    match memory["limit"].as_i64() {
        Some(l) if l > 0 => mib_ceil(l as u64),
        _ => 0,
    }
}

/// The demand of a container from its `linux.resources` (OCI JSON).
pub fn demand_of(resources: &Value) -> Demand {
    Demand {
        vcpus: cpu_demand(&resources["cpu"]),
        memory_mib: memory_demand(&resources["memory"]),
    }
}

/// The demand after an update (`ctr task update`, CRI UpdateContainerResources) whose
/// resources are `update`: a field the update sets replaces the old ask (a quota or limit of
/// 0/-1 removes it), a field it leaves out keeps it.
pub fn updated_demand(old: Demand, update: &Value) -> Demand {
    let cpu = &update["cpu"];
    let vcpus = if cpu.get("quota").is_some_and(|q| !q.is_null()) {
        cpu_demand(cpu)
    } else {
        old.vcpus
    };
    let mem = &update["memory"];
    let memory_mib = if mem.get("limit").is_some_and(|l| !l.is_null()) {
        memory_demand(mem)
    } else {
        old.memory_mib
    };
    Demand { vcpus, memory_mib }
}

/// How a pod's VM is sized after boot: `base` is what the VM booted with beyond the first
/// container's own demand (the `[vm]` defaults for a CRI sandbox, which asks for nothing; 0
/// vCPUs when `ctr run`'s container sized the VM from its quota), and the target for the
/// containers' demands is `base + Σ demands`, never below the boot size (boot vCPUs are not
/// unplugged, memory is never shrunk), at most the maxima.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sizing {
    pub boot_vcpus: usize,
    pub base_vcpus: usize,
    /// Most vCPUs: `[vm] max_vcpus` (0: the host's online CPUs), at most the cpuset's size for
    /// a pinned pod, at least the boot count.
    pub max_vcpus: usize,
    /// The pod's cpuset when its vCPUs are pinned: vCPU `i` runs on `pins[i % len]`.
    pub pins: Vec<usize>,
    pub boot_memory_mib: u64,
    pub base_memory_mib: u64,
    /// Most memory: `[vm] max_memory_mib` (0: the host's RAM), at least the boot size.
    pub max_memory_mib: u64,
}

/// The VM size a set of demands asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// One entry per vCPU, with its pin.
    pub vcpus: Vec<VcpuConfig>,
    pub memory_mib: u64,
    /// What was asked beyond the maxima (logged by the caller), e.g. "5 vCPUs capped at 2".
    pub capped: Vec<String>,
}

/// The host's online CPU count, from `<sys>/devices/system/cpu/online`.
pub fn host_online_cpus(sys: &Path) -> Result<usize, Error> {
    let p = sys.join("devices/system/cpu/online");
    let field = p.display().to_string();
    let text = std::fs::read_to_string(&p).map_err(|e| err(&field, e.to_string()))?;
    Ok(parse_cpulist(&field, &text)?.len().max(1))
}

/// MemTotal of a `/proc/meminfo` text, in MiB.
pub fn meminfo_total_mib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib / 1024)
}

impl Sizing {
    /// The sizing of a VM booted as `shape` for the first container's `spec`, on a host with
    /// `host_cpus` online CPUs and `host_memory_mib` of RAM.
    pub fn new(
        spec: &Value,
        shape: &Shape,
        cfg: &VmSection,
        host_cpus: usize,
        host_memory_mib: u64,
    ) -> Sizing {
        let first = demand_of(&spec["linux"]["resources"]);
        let boot_vcpus = shape.vcpus.len();
        let pinned = shape.vcpus.first().is_some_and(|v| v.host_cpu.is_some());
        let pins = if pinned {
            spec["linux"]["resources"]["cpu"]["cpus"]
                .as_str()
                .and_then(|s| parse_cpulist("linux.resources.cpu.cpus", s).ok())
                .unwrap_or_default()
        } else {
            vec![]
        };
        let mut max_vcpus = match cfg.max_vcpus {
            0 => host_cpus,
            n => n as usize,
        }
        .min(tandem_vmm::config::MAX_VCPUS);
        if !pins.is_empty() {
            max_vcpus = max_vcpus.min(pins.len());
        }
        let boot_memory_mib = shape.memory.size_mib;
        let max_memory_mib = match cfg.max_memory_mib {
            0 => host_memory_mib,
            n => n,
        };
        Sizing {
            boot_vcpus,
            base_vcpus: boot_vcpus.saturating_sub(first.vcpus),
            max_vcpus: max_vcpus.max(boot_vcpus),
            pins,
            boot_memory_mib,
            base_memory_mib: boot_memory_mib.saturating_sub(first.memory_mib),
            max_memory_mib: max_memory_mib.max(boot_memory_mib),
        }
    }

    /// The size the VM should have for `demands` (every container of the pod).
    pub fn target(&self, demands: impl IntoIterator<Item = Demand>) -> Target {
        let (mut cpus, mut mem) = (self.base_vcpus, self.base_memory_mib);
        for d in demands {
            cpus = cpus.saturating_add(d.vcpus);
            mem = mem.saturating_add(d.memory_mib);
        }
        let cpus = cpus.max(self.boot_vcpus);
        let mem = mem.max(self.boot_memory_mib);
        let mut capped = Vec::new();
        if cpus > self.max_vcpus {
            capped.push(format!(
                "{cpus} vCPUs capped at {} ([vm] max_vcpus{})",
                self.max_vcpus,
                if self.pins.is_empty() {
                    ""
                } else {
                    " or the pod's cpuset"
                }
            ));
        }
        if mem > self.max_memory_mib {
            capped.push(format!(
                "{mem} MiB capped at {} MiB ([vm] max_memory_mib)",
                self.max_memory_mib
            ));
        }
        let n = cpus.min(self.max_vcpus);
        let vcpus = (0..n)
            .map(|i| VcpuConfig {
                host_cpu: (!self.pins.is_empty()).then(|| self.pins[i % self.pins.len()]),
            })
            .collect();
        Target {
            vcpus,
            memory_mib: mem.min(self.max_memory_mib),
            capped,
        }
    }
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

    fn d(vcpus: usize, memory_mib: u64) -> Demand {
        Demand { vcpus, memory_mib }
    }

    #[test]
    fn demands_from_resources_and_updates() {
        let r =
            json!({"cpu": {"quota": 200000, "period": 100000}, "memory": {"limit": 768u64 << 20}});
        assert_eq!(demand_of(&r), d(2, 768));
        assert_eq!(demand_of(&json!({"cpu": {"quota": 150000}})), d(2, 0));
        assert_eq!(
            demand_of(&json!({"cpu": {"quota": -1}, "memory": {"limit": -1}})),
            d(0, 0)
        );
        assert_eq!(demand_of(&json!({"memory": {"limit": 1}})), d(0, 1));
        // an update replaces what it names, keeps the rest
        let old = d(2, 768);
        assert_eq!(
            updated_demand(old, &json!({"cpu": {"quota": 300000, "period": 100000}})),
            d(3, 768)
        );
        assert_eq!(
            updated_demand(old, &json!({"memory": {"limit": 1u64 << 30}})),
            d(2, 1024)
        );
        assert_eq!(updated_demand(old, &json!({"cpu": {"shares": 512}})), old);
        assert_eq!(
            updated_demand(old, &json!({"cpu": {"quota": 0}})),
            d(0, 768)
        );
        assert_eq!(updated_demand(old, &json!({})), old);
    }

    #[test]
    fn cri_sandbox_then_containers_kata_sizing() {
        let sys = fake_sys(&["0-7"]);
        let cfg = VmSection {
            max_vcpus: 4,
            ..cfg()
        };
        // the pause sandbox asks for nothing: boot with the defaults
        let sandbox = json!({"linux": {"resources": {"cpu": {"shares": 2}}}});
        let shape = shape(&sandbox, &cfg, sys.path()).unwrap();
        let s = Sizing::new(&sandbox, &shape, &cfg, 8, 24000);
        assert_eq!((s.boot_vcpus, s.base_vcpus, s.max_vcpus), (1, 1, 4));
        assert_eq!(
            (s.boot_memory_mib, s.base_memory_mib, s.max_memory_mib),
            (512, 512, 24000)
        );
        assert!(s.pins.is_empty());
        assert_eq!(s.target([d(0, 0)]).vcpus.len(), 1);
        // a container with cpu 2 / 768 MiB: 1 + 2 vCPUs, 512 + 768 MiB
        let t = s.target([d(0, 0), d(2, 768)]);
        assert_eq!(t.vcpus.len(), 3);
        assert!(t.vcpus.iter().all(|v| v.host_cpu.is_none()));
        assert_eq!(t.memory_mib, 1280);
        assert!(t.capped.is_empty());
        // above the maxima: capped, and said so
        let t = s.target([d(0, 0), d(2, 768), d(3, 30000)]);
        assert_eq!(t.vcpus.len(), 4);
        assert_eq!(t.memory_mib, 24000);
        assert_eq!(t.capped.len(), 2, "{:?}", t.capped);
        assert!(
            t.capped[0].contains("6 vCPUs capped at 4"),
            "{:?}",
            t.capped
        );
        assert!(t.capped[1].contains("max_memory_mib"), "{:?}", t.capped);
        // the container gone: back to the boot size (memory is never below it)
        let t = s.target([d(0, 0)]);
        assert_eq!((t.vcpus.len(), t.memory_mib), (1, 512));
        // max 0 = the host's CPUs
        let s = Sizing::new(&sandbox, &shape, &VmSection::default(), 2, 24000);
        assert_eq!(s.max_vcpus, 2);
        assert_eq!(s.target([d(2, 0)]).vcpus.len(), 2);
    }

    #[test]
    fn ctr_run_container_sized_the_boot_so_no_hot_plug_until_it_asks_more() {
        let sys = fake_sys(&["0-7"]);
        let spec = json!({"linux": {"resources": {"cpu": {"quota": 200000, "period": 100000},
                                                   "memory": {"limit": 300u64 << 20}}}});
        let shape = shape(&spec, &cfg(), sys.path()).unwrap();
        let s = Sizing::new(&spec, &shape, &cfg(), 8, 4096);
        assert_eq!((s.boot_vcpus, s.base_vcpus), (2, 0));
        assert_eq!((s.boot_memory_mib, s.base_memory_mib), (428, 128));
        let first = demand_of(&spec["linux"]["resources"]);
        let t = s.target([first]);
        assert_eq!(
            (t.vcpus.len(), t.memory_mib),
            (2, 428),
            "the boot size: nothing to do"
        );
        // ctr task update --cpu-quota 400000: 4 vCPUs
        let t = s.target([updated_demand(first, &json!({"cpu": {"quota": 400000}}))]);
        assert_eq!(t.vcpus.len(), 4);
        // a smaller quota never goes below the boot vCPUs
        let t = s.target([d(1, 0)]);
        assert_eq!(t.vcpus.len(), 2);
    }

    #[test]
    fn pinned_pod_grows_on_its_cpuset_only() {
        let sys = fake_sys(&["0-3", "4-7"]);
        let spec = json!({"linux": {"resources": {"cpu": {"cpus": "2-3,6", "quota": 100000, "period": 100000}}}});
        let shape = shape(&spec, &cfg(), sys.path()).unwrap();
        let s = Sizing::new(&spec, &shape, &cfg(), 8, 4096);
        assert_eq!(s.pins, vec![2, 3, 6]);
        assert_eq!((s.boot_vcpus, s.max_vcpus), (1, 3));
        let t = s.target([d(2, 0)]);
        assert_eq!(
            t.vcpus,
            vec![
                VcpuConfig { host_cpu: Some(2) },
                VcpuConfig { host_cpu: Some(3) }
            ],
            "vCPU i on the cpuset's i-th CPU, as at boot"
        );
        let t = s.target([d(5, 0)]);
        assert_eq!(t.vcpus.len(), 3);
        assert!(t.capped[0].contains("cpuset"), "{:?}", t.capped);
    }

    #[test]
    fn host_figures() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("devices/system/cpu")).unwrap();
        std::fs::write(d.path().join("devices/system/cpu/online"), "0-1,4\n").unwrap();
        assert_eq!(host_online_cpus(d.path()).unwrap(), 3);
        let e = host_online_cpus(Path::new("/nonexistent"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/devices/system/cpu/online"), "{e}");
        assert_eq!(
            meminfo_total_mib("MemTotal:       24576000 kB\n"),
            Some(24000)
        );
        assert_eq!(meminfo_total_mib("x"), None);
    }
}
