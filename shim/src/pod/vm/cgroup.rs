//! The pod's cgroup on the host, for its VMM: the cgroup that `linux.cgroupsPath` of the pod's
//! first container (the CRI sandbox, or the lone container of a `ctr run`) names, as the
//! container engine makes it for a container, in every hierarchy (v1 controllers, the hybrid
//! layout's cgroup2 and pure cgroup2), through tandem-oci's cgroup code. The VMM joins it before
//! it execs (`QemuConfig::cgroups`), so its vCPU threads and guest memory are accounted there and
//! confined to the pod's cpuset; it is removed when the VM is gone.
//!
//! Paths: a cgroupfs path (`/kubepods/besteffort/pod<uid>/<id>`), a systemd-style
//! `slice:prefix:name` (kubelet's systemd driver: `kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`,
//! laid out on cgroupfs as systemd would: `kubepods.slice/kubepods-besteffort.slice/…/cri-containerd-<id>.scope`),
//! or none (`/<namespace>/<id>`, as containerd's default spec has it). Blocking.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tandem_oci::cgroups::{Cgroup, Layout};
use tandem_oci::LinuxResources;

/// How long removal retries while the kernel still reports the cgroup busy (a VMM just killed).
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[error("pod cgroup {path}: {msg}")]
pub struct Error {
    pub path: String,
    pub msg: String,
}

fn err(path: impl Into<String>, msg: impl Into<String>) -> Error {
    Error {
        path: path.into(),
        msg: msg.into(),
    }
}

/// `a-b-c.slice` -> `a.slice/a-b.slice/a-b-c.slice` (systemd's slice nesting); `-.slice` is the
/// root slice (empty path).
fn expand_slice(slice: &str) -> Result<String, Error> {
    let bad = |why: &str| err(slice, format!("systemd slice {slice:?}: {why}"));
    let name = slice
        .strip_suffix(".slice")
        .ok_or_else(|| bad("does not end in .slice"))?;
    if name == "-" {
        return Ok(String::new());
    }
    if name.is_empty() || name.contains('/') || name.starts_with('-') || name.ends_with('-') {
        return Err(bad("not a valid slice name"));
    }
    if name.contains("--") {
        return Err(bad("contains --"));
    }
    let mut path = Vec::new();
    let mut prefix = String::new();
    for part in name.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Ok(path.join("/"))
}

/// The cgroup path (relative to each hierarchy's root, no leading slash) for the pod's
/// `linux.cgroupsPath` (`None` or empty: `/<namespace>/<id>`).
pub fn rel_path(cgroups_path: Option<&str>, namespace: &str, id: &str) -> Result<String, Error> {
    let p = cgroups_path.unwrap_or("").trim();
    let rel = if p.is_empty() {
        format!("{namespace}/{id}")
    } else if !p.starts_with('/') && p.contains(':') {
        let parts: Vec<&str> = p.split(':').collect();
        let [slice, prefix, name] = parts[..] else {
            return Err(err(p, "systemd-style path must be slice:prefix:name"));
        };
        if name.is_empty() || name.contains('/') {
            return Err(err(
                p,
                format!("systemd unit name {name:?} is empty or has '/'"),
            ));
        }
        let slice = if slice.is_empty() {
            "system.slice"
        } else {
            slice
        };
        let unit = if name.ends_with(".slice") {
            name.to_string()
        } else if prefix.is_empty() {
            format!("{name}.scope")
        } else {
            format!("{prefix}-{name}.scope")
        };
        let base = expand_slice(slice)?;
        if base.is_empty() {
            unit
        } else {
            format!("{base}/{unit}")
        }
    } else {
        p.trim_matches('/').to_string()
    };
    if rel.is_empty() || rel.split('/').any(|c| c == ".." || c == ".") {
        return Err(err(p, "not a usable cgroup path (empty, or has . or ..)"));
    }
    Ok(rel)
}

/// The pod's cgroup (every hierarchy) while the VM lives.
#[derive(Debug)]
pub struct PodCgroup {
    cg: Cgroup,
}

/// The cpuset of the spec (`linux.resources.cpu.cpus`/`mems`), as resources to apply.
fn cpuset_of(spec: &Value) -> Result<Option<LinuxResources>, Error> {
    let cpu = &spec["linux"]["resources"]["cpu"];
    let pick = |k: &str| {
        cpu[k]
            .as_str()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let (cpus, mems) = (pick("cpus"), pick("mems"));
    if cpus.is_none() && mems.is_none() {
        return Ok(None);
    }
    let mut c = serde_json::Map::new();
    if let Some(v) = cpus {
        c.insert("cpus".into(), Value::String(v));
    }
    if let Some(v) = mems {
        c.insert("mems".into(), Value::String(v));
    }
    serde_json::from_value(serde_json::json!({ "cpu": c }))
        .map(Some)
        .map_err(|e| err("linux.resources.cpu", e.to_string()))
}

/// For each directory of `cg`, its first ancestor (or itself) that does not exist yet: what
/// creating it makes, and what a failed create removes again.
fn missing_tops(cg: &Cgroup) -> Vec<PathBuf> {
    let mounts: Vec<PathBuf> = match &cg.layout {
        Layout::V2 { mount } => vec![mount.clone()],
        Layout::V1 {
            hierarchies,
            unified,
        } => hierarchies
            .iter()
            .map(|h| h.mount.clone())
            .chain(unified.iter().cloned())
            .collect(),
    };
    let mut tops = Vec::new();
    for m in mounts {
        let mut p = m.clone();
        for comp in cg.rel.split('/').filter(|c| !c.is_empty()) {
            p.push(comp);
            if !p.exists() {
                tops.push(p.clone());
                break;
            }
        }
    }
    tops
}

/// rmdir `top` and every cgroup below it, deepest first (they hold no process).
fn remove_tree(top: &Path) {
    let mut dirs = vec![top.to_path_buf()];
    let mut i = 0;
    while i < dirs.len() {
        if let Ok(rd) = std::fs::read_dir(&dirs[i]) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                }
            }
        }
        i += 1;
    }
    for d in dirs.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
}

impl PodCgroup {
    /// Make the cgroup `rel` under `root` (normally /sys/fs/cgroup) in every hierarchy and apply
    /// the spec's cpuset. On error nothing it made is left.
    pub fn create(root: &Path, rel: &str, spec: &Value) -> Result<PodCgroup, Error> {
        let cg = Cgroup::new(root, rel).map_err(|e| err(rel, e.to_string()))?;
        let res = cpuset_of(spec)?;
        let tops = missing_tops(&cg);
        let made = cg.create().and_then(|()| match &res {
            Some(r) => cg.apply(r, false),
            None => Ok(()),
        });
        if let Err(e) = made {
            for t in &tops {
                remove_tree(t);
            }
            return Err(err(rel, e.to_string()));
        }
        Ok(PodCgroup { cg })
    }

    /// Every directory of the cgroup (one per hierarchy): what the VMM joins.
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.cg.dirs()
    }

    /// Remove the pod's own directories (not the parents, which belong to the pod's owner, e.g.
    /// kubelet), waiting while the kernel reports them busy. Missing ones are fine.
    pub fn remove(&self) -> Result<(), Error> {
        self.cg
            .remove(REMOVE_TIMEOUT)
            .map_err(|e| err(self.cg.rel.clone(), e.to_string()))
    }
}

/// Remove the cgroup `rel` a VM record names (cleanup after a shim crash).
pub fn remove_recorded(root: &Path, rel: &str) -> Result<(), Error> {
    let cg = Cgroup::new(root, rel).map_err(|e| err(rel, e.to_string()))?;
    cg.remove(REMOVE_TIMEOUT)
        .map_err(|e| err(rel, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_systemd_and_default_paths() {
        assert_eq!(rel_path(None, "ns1", "pod1").unwrap(), "ns1/pod1");
        assert_eq!(rel_path(Some(""), "ns1", "pod1").unwrap(), "ns1/pod1");
        assert_eq!(
            rel_path(Some("/kubepods/besteffort/podu1/abc"), "k8s.io", "abc").unwrap(),
            "kubepods/besteffort/podu1/abc"
        );
        assert_eq!(
            rel_path(
                Some("kubepods-besteffort-podu1.slice:cri-containerd:abc"),
                "k8s.io",
                "abc"
            )
            .unwrap(),
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podu1.slice/cri-containerd-abc.scope"
        );
        assert_eq!(
            rel_path(Some(":cri-containerd:abc"), "k8s.io", "abc").unwrap(),
            "system.slice/cri-containerd-abc.scope"
        );
        assert_eq!(
            rel_path(Some("-.slice::abc"), "k8s.io", "abc").unwrap(),
            "abc.scope"
        );
        for bad in [
            "/a/../b",
            "a.slice:b",
            "kube--pods.slice:p:n",
            "kubepods:p:n",
            "kubepods.slice:p:",
            "kubepods.slice:p:a/b",
        ] {
            let e = rel_path(Some(bad), "ns", "id").unwrap_err().to_string();
            assert!(e.contains(bad.split(':').next().unwrap()), "{bad}: {e}");
        }
    }

    fn fake_hybrid(root: &Path) {
        for c in ["cpu", "cpuacct", "cpuset", "memory", "pids"] {
            std::fs::create_dir_all(root.join(c)).unwrap();
        }
        std::fs::write(root.join("cpuset/cpuset.cpus"), "0-1\n").unwrap();
        std::fs::write(root.join("cpuset/cpuset.mems"), "0\n").unwrap();
        std::fs::create_dir_all(root.join("unified")).unwrap();
        std::fs::write(root.join("unified/cgroup.controllers"), "hugetlb\n").unwrap();
        std::fs::write(root.join("unified/cgroup.subtree_control"), "").unwrap();
    }

    #[test]
    fn made_in_every_hierarchy_with_the_cpuset() {
        let t = tempfile::tempdir().unwrap();
        fake_hybrid(t.path());
        let spec = serde_json::json!({"linux": {"resources": {"cpu": {"cpus": "1", "mems": "0"}}}});
        let cg = PodCgroup::create(t.path(), "ns1/pod1", &spec).unwrap();
        let dirs = cg.dirs();
        assert_eq!(dirs.len(), 6, "{dirs:?}");
        for c in ["cpu", "cpuacct", "cpuset", "memory", "pids", "unified"] {
            assert!(
                dirs.contains(&t.path().join(c).join("ns1/pod1")),
                "{c}: {dirs:?}"
            );
            assert!(t.path().join(c).join("ns1/pod1").is_dir());
        }
        let cpus = std::fs::read_to_string(t.path().join("cpuset/ns1/pod1/cpuset.cpus")).unwrap();
        assert_eq!(cpus.trim(), "1");
        // the parent got the root's cpuset (populated down the path)
        let parent = std::fs::read_to_string(t.path().join("cpuset/ns1/cpuset.cpus")).unwrap();
        assert_eq!(parent.trim(), "0-1");
    }

    #[test]
    fn a_failed_create_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        fake_hybrid(t.path());
        // a cpuset write the kernel refuses: here it fails because cpuset.cpus is a directory;
        // the cpuset hierarchy's dirs pre-exist (its owner's), the others' are new
        std::fs::create_dir_all(t.path().join("cpuset/ns1/pod1/cpuset.cpus")).unwrap();
        let spec = serde_json::json!({"linux": {"resources": {"cpu": {"cpus": "1"}}}});
        let e = PodCgroup::create(t.path(), "ns1/pod1", &spec)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ns1/pod1"), "{e}");
        for c in ["cpu", "cpuacct", "memory", "pids", "unified"] {
            assert!(!t.path().join(c).join("ns1").exists(), "{c}/ns1 left");
        }
        assert!(
            t.path().join("cpuset/ns1/pod1").exists(),
            "pre-existing dirs kept"
        );
    }
}
