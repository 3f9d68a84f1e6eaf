//! The OCI spec a container gets in the guest, from the one containerd wrote for the host.
//! What names host things is dropped or rewritten: the rootfs is the overlay the agent mounts at
//! `<bundle>/rootfs`; namespaces given by host paths become new ones and the network namespace
//! goes (every container of the pod shares the guest's network, which is the pod's); bind mounts
//! of host paths are dropped (the guest cannot see host files); host CPU and NUMA numbers, hugepage
//! and block-IO limits are the VM's business, not the guest cgroup's; hooks and LSM labels name
//! host programs and policies.

use serde_json::Value;

/// Guest cgroup of a container.
pub fn cgroup_path(id: &str) -> String {
    format!("/tandem/{id}")
}

fn strip_process(p: &mut Value) {
    if let Some(o) = p.as_object_mut() {
        o.remove("apparmorProfile");
        o.remove("selinuxLabel");
    }
}

/// The guest's spec for container `id`; returns it and the host bind mounts it dropped.
pub fn guest_spec(mut spec: Value, id: &str) -> (Value, Vec<String>) {
    let readonly = spec["root"]["readonly"].as_bool().unwrap_or(false);
    spec["root"] = serde_json::json!({"path": "rootfs", "readonly": readonly});
    strip_process(&mut spec["process"]);
    let mut dropped = Vec::new();
    if let Some(o) = spec.as_object_mut() {
        o.remove("hooks");
        if let Some(mounts) = o.get_mut("mounts").and_then(Value::as_array_mut) {
            mounts.retain(|m| {
                let bind = m["type"].as_str() == Some("bind")
                    || m["options"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x == "bind" || x == "rbind"));
                if bind {
                    dropped.push(format!(
                        "{} -> {}",
                        m["source"].as_str().unwrap_or_default(),
                        m["destination"].as_str().unwrap_or_default()
                    ));
                }
                !bind
            });
        }
    }
    if let Some(linux) = spec.get_mut("linux").and_then(Value::as_object_mut) {
        linux.remove("mountLabel");
        linux.insert("cgroupsPath".into(), Value::String(cgroup_path(id)));
        if let Some(ns) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
            ns.retain(|n| n["type"].as_str() != Some("network"));
            for n in ns.iter_mut() {
                if let Some(o) = n.as_object_mut() {
                    o.remove("path");
                }
            }
        }
        if let Some(res) = linux.get_mut("resources").and_then(Value::as_object_mut) {
            res.remove("hugepageLimits");
            res.remove("blockIO");
            res.remove("network");
            res.remove("rdma");
            if let Some(cpu) = res.get_mut("cpu").and_then(Value::as_object_mut) {
                cpu.remove("cpus");
                cpu.remove("mems");
            }
        }
    }
    (spec, dropped)
}

/// The guest's process spec of an exec.
pub fn guest_process(mut process: Value) -> Value {
    strip_process(&mut process);
    process
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn host_things_are_dropped_or_rewritten() {
        let spec = json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "apparmorProfile": "cri-containerd.apparmor.d", "terminal": false},
            "root": {"path": "/var/lib/x/rootfs", "readonly": true},
            "hooks": {"prestart": [{"path": "/usr/bin/hook"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/c/hosts", "options": ["rbind", "ro"]},
                {"destination": "/dev/shm", "source": "/run/c/shm", "options": ["rbind"]}
            ],
            "linux": {
                "cgroupsPath": "kubepods-besteffort.slice:cri-containerd:abc",
                "namespaces": [
                    {"type": "pid"},
                    {"type": "network", "path": "/var/run/netns/cni-1"},
                    {"type": "ipc", "path": "/proc/42/ns/ipc"}
                ],
                "resources": {
                    "cpu": {"cpus": "1", "mems": "0", "quota": 50000},
                    "memory": {"limit": 1048576},
                    "hugepageLimits": [{"pageSize": "2MB", "limit": 2097152}]
                }
            }
        });
        let (g, dropped) = guest_spec(spec, "c1");
        assert_eq!(g["root"], json!({"path": "rootfs", "readonly": true}));
        assert!(g["process"].get("apparmorProfile").is_none());
        assert!(g.get("hooks").is_none());
        assert_eq!(g["mounts"].as_array().unwrap().len(), 1);
        assert_eq!(
            dropped,
            vec!["/var/lib/c/hosts -> /etc/hosts", "/run/c/shm -> /dev/shm"]
        );
        assert_eq!(g["linux"]["cgroupsPath"], "/tandem/c1");
        assert_eq!(
            g["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "ipc"}])
        );
        assert_eq!(g["linux"]["resources"]["cpu"], json!({"quota": 50000}));
        assert_eq!(g["linux"]["resources"]["memory"]["limit"], 1048576);
        assert!(g["linux"]["resources"].get("hugepageLimits").is_none());
        let p = guest_process(json!({"args": ["ls"], "terminal": true, "apparmorProfile": "x"}));
        assert_eq!(p, json!({"args": ["ls"], "terminal": true}));
    }
}
