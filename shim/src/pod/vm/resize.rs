//! Hot-plug sizing of a pod's VM (Kata's model): the VM follows its containers' resources.
//! Each container's ask ([`topology::Demand`]: ceil(quota/period) vCPUs, its memory limit) is
//! kept per container; on CreateContainer, UpdateContainer and container delete the pod's
//! target ([`topology::Sizing::target`]: base + Σ asks, capped at `[vm] max_vcpus` /
//! `max_memory_mib`) is applied through the hypervisor (`RunningVm::resize_vcpus` /
//! `resize_memory`) **before** the container is created or updated, so that its cgroup limits
//! fit; the agent then onlines what was added (`OnlineCpuMem`; the guest has no udev). vCPUs
//! go again when containers go; memory is never shrunk.
//!
//! The guest is untrusted: the size recorded is what the VMM reports after each step (QMP), not
//! the agent's word; the agent's answer only decides whether the guest onlined what it got. A
//! failed step leaves the VM as the VMM reports it (recorded), the pod usable, and fails the
//! create/update with an error naming the step.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::topology::{Demand, Sizing};
use super::{Error, Result, Vm};

/// How long the agent may wait for hot-plugged vCPUs and memory blocks to appear and online.
const ONLINE_WAIT: Duration = Duration::from_secs(10);

/// The pod's sizing state (in [`Vm`]).
#[derive(Debug)]
pub(super) struct PodSize {
    pub sizing: Sizing,
    /// Each container's ask.
    pub demands: HashMap<String, Demand>,
    /// vCPUs and memory (MiB) the VM has, as its VMM last reported them.
    pub vcpus: usize,
    pub memory_mib: u64,
}

impl PodSize {
    pub fn new(sizing: Sizing) -> PodSize {
        PodSize {
            vcpus: sizing.boot_vcpus,
            memory_mib: sizing.boot_memory_mib,
            sizing,
            demands: HashMap::new(),
        }
    }
}

/// The outcome of a resize: the VM's size afterwards (as the VMM reports it) when anything was
/// tried, and the error of what failed.
pub(super) struct Resized {
    pub size: Option<(usize, u64)>,
    pub result: Result<()>,
}

/// Memory the guest must show online after a resize to `mib`: whole 128 MiB blocks.
fn online_floor(mib: u64) -> u64 {
    mib / 128 * 128
}

impl Vm {
    /// Sets the ask of container `id` (`None`: it is gone) and brings the VM to the pod's
    /// target. When a new ask (create, update) cannot be met, it is taken back (the container
    /// is not created/updated); a removal stays.
    pub(super) fn resize_for(&self, id: &str, demand: Option<Demand>, why: &str) -> Resized {
        let mut sz = self.size.lock().expect("size poisoned");
        let old = match demand {
            Some(d) => sz.demands.insert(id.to_string(), d),
            None => sz.demands.remove(id),
        };
        let target = sz.sizing.target(sz.demands.values().copied());
        for c in &target.capped {
            tracing::warn!(id, why, "VM size: {c}");
        }
        let want_vcpus = target.vcpus.len();
        let grow_mem = target.memory_mib > sz.memory_mib;
        if want_vcpus == sz.vcpus && !grow_mem {
            return Resized {
                size: None,
                result: Ok(()),
            };
        }
        let t0 = Instant::now();
        let (vcpus_before, mem_before) = (sz.vcpus, sz.memory_mib);
        let mut errors = Vec::new();
        {
            let mut running = self.running.lock().expect("vm poisoned");
            let Some(vm) = running.as_mut().filter(|_| !self.dead()) else {
                if demand.is_some() {
                    restore(&mut sz.demands, id, old);
                }
                return Resized {
                    size: None,
                    result: Err(Error::FailedPrecondition(format!(
                        "container {id}: VM resize ({why}): the pod's VM is stopped"
                    ))),
                };
            };
            if grow_mem {
                match vm.resize_memory(target.memory_mib) {
                    Ok(m) => sz.memory_mib = m,
                    Err(e) => errors.push(format!(
                        "memory hot-plug {} -> {} MiB: {e}",
                        sz.memory_mib, target.memory_mib
                    )),
                }
            }
            if want_vcpus != sz.vcpus {
                match vm.resize_vcpus(&target.vcpus) {
                    Ok(n) => {
                        if n != want_vcpus {
                            errors.push(format!(
                                "vCPU hot-plug {} -> {want_vcpus}: the VMM reports {n} vCPUs",
                                sz.vcpus
                            ));
                        }
                        sz.vcpus = n;
                    }
                    Err(e) => {
                        errors.push(format!("vCPU hot-plug {} -> {want_vcpus}: {e}", sz.vcpus));
                        // what is there now, from the VMM
                        if let Ok(t) = vm.vcpu_threads() {
                            sz.vcpus = t.len();
                        }
                    }
                }
            }
        }
        let plugged_at = t0.elapsed();
        if sz.vcpus > vcpus_before || sz.memory_mib > mem_before {
            let mem_online = online_floor(sz.memory_mib);
            match self
                .agent
                .online_cpu_mem(sz.vcpus as u32, mem_online, ONLINE_WAIT)
            {
                Ok(g) if g.online_cpus as usize >= sz.vcpus && g.online_memory_mib >= mem_online => {
                    tracing::info!(
                        id,
                        why,
                        vcpus = sz.vcpus,
                        memory_mib = sz.memory_mib,
                        guest_mem_total_kib = g.mem_total_kib,
                        "VM resized from {vcpus_before} vCPUs / {mem_before} MiB: plugged in \
                         {plugged_at:?}, online in the guest after {:?}",
                        t0.elapsed()
                    );
                }
                Ok(g) => errors.push(format!(
                    "the guest onlined {} of {} vCPUs and {} of {mem_online} MiB within {ONLINE_WAIT:?}",
                    g.online_cpus, sz.vcpus, g.online_memory_mib
                )),
                Err(e) => errors.push(format!("onlining in the guest: {e}")),
            }
        } else {
            tracing::info!(
                id,
                why,
                vcpus = sz.vcpus,
                memory_mib = sz.memory_mib,
                "VM resized from {vcpus_before} vCPUs / {mem_before} MiB in {:?}",
                t0.elapsed()
            );
        }
        let size = Some((sz.vcpus, sz.memory_mib));
        if errors.is_empty() {
            return Resized {
                size,
                result: Ok(()),
            };
        }
        if demand.is_some() {
            restore(&mut sz.demands, id, old);
        }
        let msg = format!(
            "container {id}: VM resize ({why}) to {want_vcpus} vCPUs / {} MiB: {}; the VM has \
             {} vCPUs / {} MiB",
            target.memory_mib,
            errors.join("; "),
            sz.vcpus,
            sz.memory_mib
        );
        tracing::warn!("{msg}");
        Resized {
            size,
            result: Err(Error::Other(msg)),
        }
    }
}

fn restore(demands: &mut HashMap<String, Demand>, id: &str, old: Option<Demand>) {
    match old {
        Some(d) => {
            demands.insert(id.to_string(), d);
        }
        None => {
            demands.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_puts_back_the_old_ask() {
        let mut m = HashMap::new();
        let d = Demand {
            vcpus: 2,
            memory_mib: 768,
        };
        m.insert("c".to_string(), Demand::default());
        restore(&mut m, "c", Some(d));
        assert_eq!(m["c"], d);
        restore(&mut m, "c", None);
        assert!(m.is_empty());
        assert_eq!(online_floor(1280), 1280);
        assert_eq!(online_floor(430), 384);
    }
}
