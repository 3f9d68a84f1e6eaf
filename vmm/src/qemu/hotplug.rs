//! vCPU and memory hot-plug of the QEMU backend (ACPI hot-plug on q35): the command-line limits
//! (`-smp <boot>,maxcpus=<max>`, `-m <boot>M,slots=<n>,maxmem=<max>M`) and the QMP arguments,
//! pure so that they are unit-tested without QEMU. The steps on a running QEMU are
//! `QemuVm::resize_vcpus` / `QemuVm::resize_memory` (mod.rs).
//!
//! vCPUs are `device_add`ed into the free slots `query-hotpluggable-cpus` lists (driver type
//! and socket/core/thread props as QEMU gives them) and removed with `device_del` (the guest
//! kernel offlines and ejects them on the ACPI eject request); only vCPUs added this way are
//! ever removed, never boot ones. Memory is added as a DIMM (`pc-dimm`) over a backend object
//! cloned from the boot RAM object `mem0` (same kind: memfd, share, hugetlb, host-nodes/policy,
//! prealloc), in whole guest memory blocks; it is never removed (memory hot-unplug is
//! unreliable: the guest may not be able to vacate a block).

use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::{pin, QemuVm};
use crate::config::{VcpuConfig, MAX_VCPUS};
use crate::error::{Error, Result};

/// How long a vCPU unplug waits for the guest to offline and eject the vCPU.
pub const VCPU_UNPLUG_TIMEOUT: Duration = Duration::from_secs(15);

/// Guest memory is added in multiples of this: the Linux x86-64 memory block size of guests
/// below 64 GiB (`/sys/devices/system/memory/block_size_bytes`); a partial block is never
/// onlined.
pub const MEMORY_BLOCK_MIB: u64 = 128;

/// QOM path prefix of devices made with an id by `device_add` (ours); boot vCPUs live under
/// `/machine/unattached`.
const PERIPHERAL: &str = "/machine/peripheral/";

/// Rewrites `-smp <n>` and `-m <n>M` of a command line made by `command_line` for hot-plug:
/// `-smp <n>,maxcpus=<max_vcpus>` when `max_vcpus > n`, and `-m <n>M,slots=<slots>,maxmem=<max>M`
/// when `max_memory_mib > n` and `slots > 0`. Limits not above the boot size leave the argument
/// as it is (no hot-plug of that kind).
pub fn set_hotplug_limits(
    args: &mut [String],
    max_vcpus: usize,
    max_memory_mib: u64,
    slots: u8,
) -> Result<()> {
    if max_vcpus > MAX_VCPUS {
        return Err(Error::invalid(
            "max_vcpus",
            format!("{max_vcpus}: at most {MAX_VCPUS}"),
        ));
    }
    let smp = value_after(args, "-smp")
        .ok_or_else(|| Error::invalid("max_vcpus", "no -smp argument on the QEMU command line"))?;
    let boot: usize = args[smp]
        .parse()
        .map_err(|_| Error::invalid("max_vcpus", format!("-smp {:?}: not a count", args[smp])))?;
    if max_vcpus > boot {
        args[smp] = format!("{boot},maxcpus={max_vcpus}");
    }
    let m = value_after(args, "-m").ok_or_else(|| {
        Error::invalid("max_memory_mib", "no -m argument on the QEMU command line")
    })?;
    let boot_mib: u64 = args[m]
        .strip_suffix('M')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Error::invalid("max_memory_mib", format!("-m {:?}: not <n>M", args[m])))?;
    if max_memory_mib > boot_mib && slots > 0 {
        args[m] = format!("{boot_mib}M,slots={slots},maxmem={max_memory_mib}M");
    }
    Ok(())
}

fn value_after(args: &[String], flag: &str) -> Option<usize> {
    args.iter()
        .position(|a| a == flag)
        .map(|i| i + 1)
        .filter(|i| *i < args.len())
}

/// The hot-plug limits in a QEMU command line (ours, from /proc or as built): the most vCPUs
/// and the most memory in MiB. Without hot-plug limits: the boot figures.
pub fn limits_of(args: &[String]) -> (usize, u64) {
    let smp = value_after(args, "-smp")
        .map(|i| args[i].as_str())
        .unwrap_or("1");
    let mut parts = smp.split(',');
    let mut vcpus: usize = parts.next().and_then(|n| n.parse().ok()).unwrap_or(1);
    for p in parts {
        if let Some(n) = p.strip_prefix("maxcpus=").and_then(|n| n.parse().ok()) {
            vcpus = n;
        }
    }
    let m = value_after(args, "-m")
        .map(|i| args[i].as_str())
        .unwrap_or("");
    let mut parts = m.split(',');
    let mut mib: u64 = parts
        .next()
        .and_then(|n| n.strip_suffix('M'))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    for p in parts {
        if let Some(n) = p
            .strip_prefix("maxmem=")
            .and_then(|n| n.strip_suffix('M'))
            .and_then(|n| n.parse().ok())
        {
            mib = n;
        }
    }
    (vcpus, mib)
}

/// The boot RAM object (`-object {…,"id":"mem0",…}`) of a QEMU command line.
pub fn boot_memory_object(args: &[String]) -> Option<Value> {
    args.windows(2)
        .filter(|w| w[0] == "-object")
        .filter_map(|w| serde_json::from_str::<Value>(&w[1]).ok())
        .find(|v| v["id"] == "mem0")
}

/// One vCPU slot of `query-hotpluggable-cpus`.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuSlot {
    /// The CPU device type to `device_add` (e.g. `qemu64-x86_64-cpu`, `host-x86_64-cpu`).
    pub driver: String,
    /// Topology properties (`socket-id`, `die-id`, `core-id`, `thread-id`, …) as QEMU gave them.
    pub props: Map<String, Value>,
    /// QOM path of the plugged vCPU; `None`: the slot is free.
    pub qom_path: Option<String>,
}

impl CpuSlot {
    /// Position key: the ids in topology order (socket, die, cluster, core, thread).
    fn key(&self) -> Vec<u64> {
        [
            "node-id",
            "socket-id",
            "die-id",
            "cluster-id",
            "core-id",
            "thread-id",
        ]
        .iter()
        .map(|k| self.props.get(*k).and_then(Value::as_u64).unwrap_or(0))
        .collect()
    }

    /// The device id a hot-add gives this slot: `vcpu-<socket>-<die>-<cluster>-<core>-<thread>`
    /// (ids absent from the props are 0).
    pub fn device_id(&self) -> String {
        let k = self.key();
        format!("vcpu-{}-{}-{}-{}-{}", k[1], k[2], k[3], k[4], k[5])
    }

    /// The id of a vCPU we hot-added (QOM path under /machine/peripheral), `None` for a boot
    /// vCPU or a free slot.
    pub fn added_id(&self) -> Option<&str> {
        self.qom_path.as_deref()?.strip_prefix(PERIPHERAL)
    }

    /// QMP `device_add` arguments that plug a vCPU into this slot.
    pub fn device_add_args(&self) -> Value {
        let mut a = self.props.clone();
        a.insert("driver".into(), json!(self.driver));
        a.insert("id".into(), json!(self.device_id()));
        Value::Object(a)
    }
}

/// Parses a `query-hotpluggable-cpus` reply, sorted in topology order (the order QEMU numbers
/// vCPUs in).
pub fn parse_hotpluggable(v: &Value) -> Result<Vec<CpuSlot>> {
    let bad = |r: String| Error::invalid("query-hotpluggable-cpus", r);
    let mut out = Vec::new();
    for e in v
        .as_array()
        .ok_or_else(|| bad(format!("not a list: {v}")))?
    {
        let driver = e["type"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| bad(format!("entry without type: {e}")))?;
        let props = e["props"]
            .as_object()
            .ok_or_else(|| bad(format!("entry without props: {e}")))?;
        if e["vcpus-count"].as_u64().unwrap_or(1) != 1 {
            return Err(bad(format!(
                "slots of more than one vCPU are not handled: {e}"
            )));
        }
        out.push(CpuSlot {
            driver: driver.to_string(),
            props: props.clone(),
            qom_path: e["qom-path"].as_str().map(str::to_string),
        });
    }
    out.sort_by_key(CpuSlot::key);
    Ok(out)
}

/// What a resize to `want` vCPUs does on `slots`: the free slots to plug (in order), or the
/// ids of hot-added vCPUs to unplug (last first). Boot vCPUs are never unplugged, so the count
/// does not go below them; more than the free slots is an error naming the limit.
pub fn vcpu_plan(slots: &[CpuSlot], want: usize) -> Result<(Vec<CpuSlot>, Vec<String>)> {
    let present = slots.iter().filter(|s| s.qom_path.is_some()).count();
    if want > present {
        let free: Vec<CpuSlot> = slots
            .iter()
            .filter(|s| s.qom_path.is_none())
            .take(want - present)
            .cloned()
            .collect();
        if free.len() < want - present {
            return Err(Error::invalid(
                "vcpus",
                format!(
                    "{want} vCPUs asked, the VM can have at most {} (maxcpus)",
                    present + free.len()
                ),
            ));
        }
        return Ok((free, vec![]));
    }
    let remove: Vec<String> = slots
        .iter()
        .rev()
        .filter_map(|s| s.added_id().map(str::to_string))
        .take(present - want)
        .collect();
    Ok((vec![], remove))
}

/// The size of the DIMM that brings `current_mib` towards `target_mib` without passing
/// `max_mib`: the difference rounded up to whole memory blocks (and pages of `page_bytes`),
/// as much as fits below the maximum. 0: nothing to add (target reached, or no room).
pub fn dimm_mib(current_mib: u64, target_mib: u64, max_mib: u64, page_bytes: u64) -> u64 {
    if target_mib <= current_mib || max_mib <= current_mib {
        return 0;
    }
    let step = MEMORY_BLOCK_MIB.max(page_bytes >> 20).max(1);
    let want = (target_mib - current_mib).div_ceil(step) * step;
    let room = (max_mib - current_mib) / step * step;
    want.min(room)
}

/// The backend object of a DIMM of `size_mib`: the boot RAM object `mem0` with a new id and
/// size, so it is of the same kind (memfd/share/hugetlb/host-nodes/policy/prealloc).
pub fn dimm_backend(mem0: &Value, id: &str, size_mib: u64) -> Result<Value> {
    if mem0["qom-type"].as_str().is_none() {
        return Err(Error::invalid(
            "memory",
            format!("boot RAM object without qom-type: {mem0}"),
        ));
    }
    let mut o = mem0.clone();
    o["id"] = json!(id);
    o["size"] = json!(size_mib << 20);
    Ok(o)
}

/// QMP `device_add` arguments of a `pc-dimm` `id` over the backend `memdev`.
pub fn dimm_device_args(id: &str, memdev: &str) -> Value {
    json!({"driver": "pc-dimm", "id": id, "memdev": memdev})
}

/// Guest memory in MiB from a `query-memory-size-summary` reply (boot + plugged).
pub fn memory_summary_mib(v: &Value) -> Result<u64> {
    let base = v["base-memory"].as_u64().ok_or_else(|| {
        Error::invalid("query-memory-size-summary", format!("no base-memory: {v}"))
    })?;
    let plugged = v["plugged-memory"].as_u64().unwrap_or(0);
    Ok((base + plugged) >> 20)
}

impl QemuVm {
    /// [`crate::RunningVm::resize_vcpus`] of QEMU.
    pub(super) fn hotplug_vcpus(&mut self, vcpus: &[VcpuConfig]) -> Result<usize> {
        let want = vcpus.len();
        if want == 0 || want > MAX_VCPUS {
            return Err(Error::invalid(
                "vcpus",
                format!("{want} vCPUs: 1 to {MAX_VCPUS}"),
            ));
        }
        let t0 = Instant::now();
        let reply = self.qmp()?.execute("query-hotpluggable-cpus", None)?;
        let (add, remove) = vcpu_plan(&parse_hotpluggable(&reply)?, want)?;
        for s in &add {
            let id = s.device_id();
            self.qmp()?
                .execute("device_add", Some(s.device_add_args()))
                .map_err(|e| self.qerr(format!("hot-add of vCPU {id}: {e}")))?;
            if let Err(e) = self.pin_added(&id, vcpus) {
                // never leave a vCPU running unpinned in a pinned pod
                let _ = self.unplug_vcpu(&id);
                return Err(e);
            }
        }
        for id in &remove {
            self.unplug_vcpu(id)?;
        }
        let n = crate::RunningVm::vcpu_threads(self)?.len();
        if !add.is_empty() || !remove.is_empty() {
            tracing::info!(
                pid = self.pid,
                added = add.len(),
                removed = remove.len(),
                vcpus = n,
                "vCPU hot-plug done in {:?}",
                t0.elapsed()
            );
        }
        Ok(n)
    }

    /// `device_del` of the hot-added vCPU `id`, waiting for the guest to release it.
    fn unplug_vcpu(&mut self, id: &str) -> Result<()> {
        let t0 = Instant::now();
        self.qmp()?
            .execute("device_del", Some(json!({ "id": id })))
            .map_err(|e| self.qerr(format!("unplug of vCPU {id}: {e}")))?;
        // QEMU 7.2 sends no DEVICE_DELETED for a vCPU: it is gone when query-cpus-fast no
        // longer lists it (after the guest's _EJ0)
        let path = format!("{PERIPHERAL}{id}");
        let deadline = t0 + VCPU_UNPLUG_TIMEOUT;
        loop {
            let v = self.qmp()?.execute("query-cpus-fast", None)?;
            let present = v
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["qom-path"].as_str() == Some(path.as_str()));
            if !present {
                tracing::info!(
                    pid = self.pid,
                    vcpu = id,
                    "vCPU unplugged in {:?}",
                    t0.elapsed()
                );
                let _ = self.qmp()?.take_events();
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.qerr(format!(
                    "unplug of vCPU {id}: the guest did not release it within \
                     {VCPU_UNPLUG_TIMEOUT:?}; it stays plugged"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pins the thread of the hot-added vCPU `id` like a boot vCPU: to the `host_cpu` of its
    /// entry in `vcpus` (by its position among the VM's vCPUs), if any.
    fn pin_added(&mut self, id: &str, vcpus: &[VcpuConfig]) -> Result<()> {
        let v = self.qmp()?.execute("query-cpus-fast", None)?;
        let mut cpus: Vec<&Value> = v.as_array().into_iter().flatten().collect();
        cpus.sort_by_key(|c| c["cpu-index"].as_u64());
        let path = format!("{PERIPHERAL}{id}");
        let Some((pos, c)) = cpus
            .iter()
            .enumerate()
            .find(|(_, c)| c["qom-path"].as_str() == Some(path.as_str()))
        else {
            return Err(self.qerr(format!("hot-added vCPU {id} is not in query-cpus-fast")));
        };
        let Some(tid) = c["thread-id"].as_i64() else {
            return Err(self.qerr(format!("hot-added vCPU {id}: no thread-id in {c}")));
        };
        if let Some(cpu) = vcpus.get(pos).and_then(|v| v.host_cpu) {
            pin(tid as i32, cpu).map_err(|e| Error::Vcpu {
                index: pos,
                reason: format!("pin thread {tid} of hot-added {id} to host CPU {cpu}: {e}"),
            })?;
        }
        Ok(())
    }

    /// Guest memory in MiB as QEMU has it (boot + plugged DIMMs).
    fn memory_mib(&mut self) -> Result<u64> {
        memory_summary_mib(&self.qmp()?.execute("query-memory-size-summary", None)?)
    }

    /// [`crate::RunningVm::resize_memory`] of QEMU.
    pub(super) fn hotplug_memory(&mut self, size_mib: u64) -> Result<u64> {
        let current = self.memory_mib()?;
        let Some(mem0) = self.mem_object.clone() else {
            return Err(Error::Unsupported {
                backend: "qemu",
                feature: "memory hot-plug without a mem0 boot RAM object".into(),
            });
        };
        let page = mem0["hugetlbsize"].as_u64().unwrap_or(4096);
        let add = dimm_mib(current, size_mib, self.max_memory_mib, page);
        if add == 0 {
            return Ok(current);
        }
        let t0 = Instant::now();
        let q = self.qmp()?;
        let devices = q.execute("query-memory-devices", None)?;
        let objects = q.execute("qom-list", Some(json!({"path": "/objects"})))?;
        let taken: Vec<String> = devices
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["data"]["id"].as_str().map(str::to_string))
            .chain(
                objects
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|o| o["name"].as_str().map(str::to_string)),
            )
            .collect();
        let n = (0..)
            .find(|n| !taken.contains(&format!("dimm{n}")) && !taken.contains(&format!("hpmem{n}")))
            .expect("a free name");
        let (mid, did) = (format!("hpmem{n}"), format!("dimm{n}"));
        let backend = dimm_backend(&mem0, &mid, add)?;
        let merr = |reason: String| Error::Memory {
            backing: mem0["qom-type"].as_str().unwrap_or("?").to_string(),
            size: add << 20,
            reason,
        };
        q.execute("object-add", Some(backend))
            .map_err(|e| merr(format!("hot-add: backend {mid}: {e}")))?;
        if let Err(e) = q.execute("device_add", Some(dimm_device_args(&did, &mid))) {
            let _ = q.execute("object-del", Some(json!({ "id": mid })));
            return Err(merr(format!("hot-add: {did}: {e}")));
        }
        let now = self.memory_mib()?;
        tracing::info!(
            pid = self.pid,
            dimm = did,
            added_mib = add,
            memory_mib = now,
            "memory hot-plug done in {:?}",
            t0.elapsed()
        );
        Ok(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn command_line_limits() {
        let mut a = s(&["-smp", "1", "-object", "{}", "-m", "512M"]);
        set_hotplug_limits(&mut a, 4, 2048, 16).unwrap();
        assert_eq!(a[1], "1,maxcpus=4");
        assert_eq!(a[5], "512M,slots=16,maxmem=2048M");
        assert_eq!(limits_of(&a), (4, 2048));
        // limits not above the boot size: untouched
        let mut b = s(&["-smp", "2", "-m", "512M"]);
        set_hotplug_limits(&mut b, 2, 512, 16).unwrap();
        assert_eq!(b, s(&["-smp", "2", "-m", "512M"]));
        assert_eq!(limits_of(&b), (2, 512));
        let mut c = s(&["-smp", "2", "-m", "512M"]);
        set_hotplug_limits(&mut c, 1, 4096, 0).unwrap();
        assert_eq!(
            c,
            s(&["-smp", "2", "-m", "512M"]),
            "no slots: no memory hot-plug"
        );
        let e = set_hotplug_limits(&mut c, 1000, 0, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_vcpus") && e.contains("1000"), "{e}");
        let e = set_hotplug_limits(&mut s(&["-m", "1M"]), 2, 0, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("-smp"), "{e}");
    }

    #[test]
    fn boot_object_is_found() {
        let a = s(&[
            "-object",
            r#"{"qom-type":"rng-random","id":"rng0"}"#,
            "-object",
            r#"{"qom-type":"memory-backend-memfd","id":"mem0","size":536870912,"share":true}"#,
        ]);
        let m = boot_memory_object(&a).unwrap();
        assert_eq!(m["qom-type"], "memory-backend-memfd");
        assert!(boot_memory_object(&a[..2]).is_none());
    }

    fn slots_reply() -> Value {
        // as QEMU 7.2 answers for q35 with -smp 1,maxcpus=3 (newest slot first)
        json!([
            {"props": {"core-id": 0, "thread-id": 0, "socket-id": 2, "die-id": 0},
             "vcpus-count": 1, "type": "qemu64-x86_64-cpu"},
            {"props": {"core-id": 0, "thread-id": 0, "socket-id": 1, "die-id": 0},
             "vcpus-count": 1, "qom-path": "/machine/peripheral/vcpu-1-0-0-0-0",
             "type": "qemu64-x86_64-cpu"},
            {"props": {"core-id": 0, "thread-id": 0, "socket-id": 0, "die-id": 0},
             "vcpus-count": 1, "qom-path": "/machine/unattached/device[0]",
             "type": "qemu64-x86_64-cpu"}
        ])
    }

    #[test]
    fn hotpluggable_cpus_parsed_in_topology_order() {
        let slots = parse_hotpluggable(&slots_reply()).unwrap();
        assert_eq!(slots.len(), 3);
        assert_eq!(slots[0].props["socket-id"], 0);
        assert_eq!(slots[2].props["socket-id"], 2);
        assert_eq!(slots[0].added_id(), None, "a boot vCPU is not ours");
        assert_eq!(slots[1].added_id(), Some("vcpu-1-0-0-0-0"));
        assert_eq!(slots[2].qom_path, None);
        assert_eq!(
            slots[2].device_add_args(),
            json!({"driver": "qemu64-x86_64-cpu", "id": "vcpu-2-0-0-0-0",
                   "socket-id": 2, "die-id": 0, "core-id": 0, "thread-id": 0})
        );
        let e = parse_hotpluggable(&json!([{"props": {}}]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("query-hotpluggable-cpus") && e.contains("type"),
            "{e}"
        );
        assert!(parse_hotpluggable(&json!({})).is_err());
    }

    #[test]
    fn vcpu_plans() {
        let slots = parse_hotpluggable(&slots_reply()).unwrap();
        // 2 present: grow to 3 plugs the free slot
        let (add, rm) = vcpu_plan(&slots, 3).unwrap();
        assert_eq!(add.len(), 1);
        assert_eq!(add[0].device_id(), "vcpu-2-0-0-0-0");
        assert!(rm.is_empty());
        // shrink to 1 unplugs the hot-added one
        let (add, rm) = vcpu_plan(&slots, 1).unwrap();
        assert!(add.is_empty());
        assert_eq!(rm, vec!["vcpu-1-0-0-0-0".to_string()]);
        // the boot vCPU is never unplugged
        let (_, rm) = vcpu_plan(&slots, 0).unwrap();
        assert_eq!(rm.len(), 1);
        // same size: nothing
        assert_eq!(vcpu_plan(&slots, 2).unwrap(), (vec![], vec![]));
        let e = vcpu_plan(&slots, 4).unwrap_err().to_string();
        assert!(e.contains("at most 3"), "{e}");
    }

    #[test]
    fn dimm_sizes_in_blocks_pages_and_below_the_maximum() {
        // 512 -> 512 + 768: 768 MiB, whole blocks
        assert_eq!(dimm_mib(512, 1280, 4096, 4096), 768);
        // a part of a block is rounded up
        assert_eq!(dimm_mib(512, 576, 4096, 4096), 128);
        // reached or shrinking: nothing
        assert_eq!(dimm_mib(1024, 1024, 4096, 4096), 0);
        assert_eq!(dimm_mib(1024, 512, 4096, 4096), 0);
        // capped by the maximum, in whole blocks
        assert_eq!(dimm_mib(512, 4096, 1000, 4096), 384);
        assert_eq!(dimm_mib(512, 4096, 600, 4096), 0);
        // 1 GiB pages: whole pages
        assert_eq!(dimm_mib(1024, 1100, 8192, 1 << 30), 1024);
    }

    #[test]
    fn dimm_backend_is_the_boot_kind() {
        let mem0 = json!({"qom-type": "memory-backend-memfd", "id": "mem0", "size": 256u64 << 20,
                          "hugetlb": true, "hugetlbsize": 2097152, "share": true,
                          "host-nodes": [1], "policy": "bind", "prealloc": true});
        let o = dimm_backend(&mem0, "hpmem0", 768).unwrap();
        assert_eq!(
            o,
            json!({"qom-type": "memory-backend-memfd", "id": "hpmem0", "size": 768u64 << 20,
                   "hugetlb": true, "hugetlbsize": 2097152, "share": true,
                   "host-nodes": [1], "policy": "bind", "prealloc": true})
        );
        assert!(dimm_backend(&json!({}), "x", 1).is_err());
        assert_eq!(
            dimm_device_args("dimm0", "hpmem0"),
            json!({"driver": "pc-dimm", "id": "dimm0", "memdev": "hpmem0"})
        );
        assert_eq!(
            memory_summary_mib(
                &json!({"base-memory": 536870912u64, "plugged-memory": 805306368u64})
            )
            .unwrap(),
            1280
        );
        assert!(memory_summary_mib(&json!({})).is_err());
    }
}
