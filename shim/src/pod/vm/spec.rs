//! The OCI spec a container gets in the guest, from the one containerd wrote for the host.
//! What names host things is dropped or rewritten: the rootfs is the overlay the agent mounts at
//! `<bundle>/rootfs`; namespaces given by host paths become new ones and the network namespace
//! goes (every container of the pod shares the guest's network, which is the pod's); host CPU and
//! NUMA numbers, hugepage and block-IO limits are the VM's business, not the guest cgroup's; hooks
//! and LSM labels name host programs and policies.
//!
//! Bind mounts of host paths ([`guest_spec_with_files`]; the guest cannot see host files): a small
//! regular file (CRI's `/etc/hosts`, `/etc/resolv.conf`, `/etc/hostname`, `/dev/termination-log`,
//! `ctr run --mount type=bind,src=<file>`) is copied — read here, at most
//! [`MAX_FILE_BYTES`] each and [`MAX_FILES_TOTAL_BYTES`] in all — sent with CreateContainer, and
//! bind-mounted in the guest from `<guest bundle>/files/<n>` with the mount's own options (ro/rw);
//! a directory bound on `/dev/shm` becomes the pod's shared tmpfs of the host mount's size
//! ([`pod_shm`]: one per host source, made by the agent, bound by every container that binds the
//! same source; a container without an IPC namespace of its own, CRI's `hostIPC`, gets a tmpfs of
//! its own as before); other directories
//! (emptyDir, hostPath dirs, image volumes) are served by virtio-fs ([`super::volumes`]: the guest
//! binds `<guest bundle>/shared/<id>/<n>`, the shim binds the host dir there); special files are
//! dropped and logged.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
pub use tandem_agent::client::File as GuestFile;
use tandem_agent::containers::FILES_DIR;
pub use tandem_agent::podshare::ShmReq;

/// Largest host file copied into the guest for a bind mount.
pub const MAX_FILE_BYTES: u64 = tandem_agent::containers::MAX_FILE_BYTES as u64;
/// Largest sum of the host files copied for one container.
pub const MAX_FILES_TOTAL_BYTES: u64 = tandem_agent::containers::MAX_FILES_TOTAL_BYTES as u64;
/// Most host files copied for one container.
pub const MAX_FILES: usize = tandem_agent::containers::MAX_FILES;

/// Why a container's bind mounts cannot be given to the guest.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("bind mount {src} -> {dest}: {msg}")]
    Mount {
        src: String,
        dest: String,
        msg: String,
    },
    #[error(
        "bind mounts of host files: {total} bytes in all, more than the {MAX_FILES_TOTAL_BYTES} \
         a VM container may copy"
    )]
    Total { total: u64 },
    #[error("bind mounts of host files: more than {MAX_FILES} files")]
    Count,
}

/// The guest's spec of a container, the host files it needs, and what was left out.
#[derive(Debug)]
pub struct GuestSpec {
    pub spec: Value,
    /// To send with CreateContainer (written at `<guest bundle>/files/<path>`).
    pub files: Vec<GuestFile>,
    /// Host bind mounts not given to the guest, as "source -> destination (why)".
    pub dropped: Vec<String>,
    /// Directory binds served through the pod's shared dir (virtio-fs, [`super::volumes`]); the
    /// guest spec already binds them from the guest's view of it.
    pub dirs: Vec<super::volumes::DirBind>,
    /// The pod's shared tmpfs mounts the guest spec binds (CreateContainer's `pod_shm`).
    pub shm: Vec<ShmReq>,
}

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
        if let Some(res) = linux.get_mut("resources") {
            strip_resources(res);
        }
    }
    (spec, dropped)
}

/// Remove from OCI `LinuxResources` (JSON) what is the VM's business on the host, not the guest
/// cgroup's: host CPU and NUMA numbers, hugepage, block-IO, network class and RDMA limits. Returns
/// the names of the fields removed.
pub fn strip_resources(res: &mut Value) -> Vec<&'static str> {
    let mut removed = Vec::new();
    let Some(res) = res.as_object_mut() else {
        return removed;
    };
    for k in ["hugepageLimits", "blockIO", "network", "rdma"] {
        if res.remove(k).is_some() {
            removed.push(k);
        }
    }
    if let Some(cpu) = res.get_mut("cpu").and_then(Value::as_object_mut) {
        for (k, name) in [("cpus", "cpu.cpus"), ("mems", "cpu.mems")] {
            if cpu.remove(k).is_some() {
                removed.push(name);
            }
        }
    }
    removed
}

fn is_bind(m: &Value) -> bool {
    m["type"].as_str() == Some("bind")
        || m["options"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "bind" || x == "rbind"))
}

/// `/etc/resolv.conf` -> `etc-resolv.conf`: a file name for the guest copy.
fn file_name(index: usize, dest: &str) -> String {
    let tail: String = dest
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    format!("{index}-{tail}")
}

/// The bytes of a regular host file of at most `max` bytes (opened without blocking, checked on
/// the open file).
fn read_small(path: &Path, max: u64) -> Result<(Vec<u8>, u32), String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("open: {e}"))?;
    let meta = f.metadata().map_err(|e| format!("stat: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let too_big =
        |n: u64| format!("{n} bytes, more than the {max} a VM container may copy from a host file");
    if meta.len() > max {
        return Err(too_big(meta.len()));
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    f.take(max + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("read: {e}"))?;
    if data.len() as u64 > max {
        return Err(too_big(data.len() as u64));
    }
    Ok((data, meta.mode() & 0o7777))
}

/// Undo mountinfo's octal escapes (`\040` for a space).
pub(super) fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The size in bytes of the tmpfs mounted at `dir`, when `dir` is a tmpfs mount point.
fn tmpfs_size(dir: &Path, mountinfo: &str) -> Option<u64> {
    let dir = dir.canonicalize().ok()?;
    let is_tmpfs = mountinfo.lines().rev().any(|l| {
        let mut halves = l.splitn(2, " - ");
        let (left, right) = (halves.next().unwrap_or(""), halves.next().unwrap_or(""));
        left.split(' ').nth(4).map(unescape_mountinfo).as_deref() == dir.to_str()
            && right.split(' ').next() == Some("tmpfs")
    });
    if !is_tmpfs {
        return None;
    }
    let st = nix::sys::statvfs::statvfs(&dir).ok()?;
    Some(st.blocks() * st.fragment_size())
}

/// The guest's `/dev/shm` for a host directory bound there: a tmpfs of the host mount's size.
fn shm_tmpfs(m: &Value, host: &Path, mountinfo: &str) -> Value {
    let mut options = vec!["nosuid", "noexec", "nodev", "mode=1777"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    if m["options"]
        .as_array()
        .is_some_and(|a| a.iter().any(|o| o == "ro"))
    {
        options.push("ro".into());
    }
    if let Some(size) = tmpfs_size(host, mountinfo) {
        options.push(format!("size={}k", size.div_ceil(1024)));
    }
    json!({"destination": m["destination"], "type": "tmpfs", "source": "shm", "options": options})
}

/// Name of the pod's shared tmpfs for host shm dir `host` (its canonical path hashed, FNV-1a):
/// the same host dir gives the same name in every container of the pod.
pub fn pod_shm_name(host: &Path) -> String {
    let p = host.canonicalize().unwrap_or_else(|_| host.to_path_buf());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in p.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("shm-{h:016x}")
}

/// The guest's `/dev/shm` of a container with an IPC namespace: a bind of the pod's shared tmpfs
/// for the host dir `host` (the agent makes it, with the host mount's size when that is a tmpfs,
/// else the kernel's default), with the mount's `ro` if it has one.
fn pod_shm(m: &Value, host: &Path, mountinfo: &str) -> (Value, ShmReq) {
    let name = pod_shm_name(host);
    let mut options: Vec<String> = ["rbind", "nosuid", "noexec", "nodev"]
        .into_iter()
        .map(String::from)
        .collect();
    if m["options"]
        .as_array()
        .is_some_and(|a| a.iter().any(|o| o == "ro"))
    {
        options.push("ro".into());
    }
    let g = json!({"destination": m["destination"], "type": "bind",
        "source": tandem_agent::podshare::shm_path(&name), "options": options});
    let size_bytes = tmpfs_size(host, mountinfo).unwrap_or(0);
    (g, ShmReq { name, size_bytes })
}

/// [`guest_spec`], with the bind mounts of host paths turned into what the guest can have (see
/// the module doc): the files to copy are read here and checked against the limits. Relative
/// bind sources are taken from `host_bundle`; `guest_bundle` is the container's bundle in the
/// guest (`/run/tandem/bundles/<id>`). A missing source, a file over a limit or an unreadable one
/// is an error naming the mount; nothing is made.
pub fn guest_spec_with_files(
    mut spec: Value,
    id: &str,
    host_bundle: &Path,
    guest_bundle: &str,
) -> Result<GuestSpec, BindError> {
    let mounts = spec.as_object_mut().and_then(|o| o.remove("mounts"));
    let mut out = Vec::new();
    let mut files: Vec<GuestFile> = Vec::new();
    let mut dropped = Vec::new();
    let mut dirs = Vec::new();
    let mut shm = Vec::new();
    let mut total = 0u64;
    let mut mountinfo: Option<String> = None;
    // an IPC namespace (new or the sandbox's): /dev/shm is the pod's; none (hostIPC): its own
    let own_ipc = spec["linux"]["namespaces"]
        .as_array()
        .is_some_and(|a| a.iter().any(|n| n["type"] == "ipc"));
    if let Some(Value::Array(mounts)) = &mounts {
        for (i, m) in mounts.iter().enumerate() {
            if !is_bind(m) {
                out.push(m.clone());
                continue;
            }
            let source = m["source"].as_str().unwrap_or_default().to_string();
            let dest = m["destination"].as_str().unwrap_or_default().to_string();
            let err = |msg: String| BindError::Mount {
                src: source.clone(),
                dest: dest.clone(),
                msg,
            };
            let host: PathBuf = if Path::new(&source).is_absolute() {
                PathBuf::from(&source)
            } else {
                host_bundle.join(&source)
            };
            let meta =
                std::fs::metadata(&host).map_err(|e| err(format!("{}: {e}", host.display())))?;
            if meta.is_dir() {
                if dest == "/dev/shm" {
                    let mi = mountinfo.get_or_insert_with(|| {
                        std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default()
                    });
                    if own_ipc {
                        let (g, q) = pod_shm(m, &host, mi);
                        out.push(g);
                        if !shm.iter().any(|s: &ShmReq| s.name == q.name) {
                            shm.push(q);
                        }
                    } else {
                        out.push(shm_tmpfs(m, &host, mi));
                    }
                } else {
                    // served by virtio-fs: the shim binds it at <shared>/<id>/<i> on the host
                    let opts: Vec<&str> = m["options"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    let mut g = m.clone();
                    g["source"] = Value::String(super::volumes::guest_source(guest_bundle, id, i));
                    g["type"] = Value::String("bind".into());
                    if m["options"].as_array().is_none() {
                        g["options"] = json!(["rbind"]);
                    }
                    out.push(g);
                    dirs.push(super::volumes::DirBind {
                        index: i,
                        source: host.clone(),
                        dest: dest.clone(),
                        readonly: opts.contains(&"ro"),
                        recursive: opts.contains(&"rbind") || m["options"].as_array().is_none(),
                    });
                }
                continue;
            }
            if !meta.is_file() {
                dropped.push(format!("{source} -> {dest} (not a regular file)"));
                continue;
            }
            if files.len() >= MAX_FILES {
                return Err(BindError::Count);
            }
            let (content, mode) = read_small(&host, MAX_FILE_BYTES).map_err(err)?;
            total += content.len() as u64;
            if total > MAX_FILES_TOTAL_BYTES {
                return Err(BindError::Total { total });
            }
            let name = file_name(i, &dest);
            let mut g = m.clone();
            g["source"] = Value::String(format!("{guest_bundle}/{FILES_DIR}/{name}"));
            g["type"] = Value::String("bind".into());
            if m["options"].as_array().is_none() {
                g["options"] = json!(["rbind"]);
            }
            out.push(g);
            files.push(GuestFile {
                path: name,
                content,
                mode,
            });
        }
    }
    let (mut spec, _) = guest_spec(spec, id);
    if mounts.is_some() {
        spec["mounts"] = Value::Array(out);
    }
    Ok(GuestSpec {
        spec,
        files,
        dropped,
        dirs,
        shm,
    })
}

/// First guest ID of the range a VM pod's user namespace maps its root to with `[userns] mode =
/// "pod"`. The guest has an ID space of its own (the VM is the isolation boundary), so every VM
/// pod uses the same range and nothing is taken from the host's pool.
pub const GUEST_USERNS_BASE: u32 = 100_000;
/// IDs in that range (as a container-mode pod's).
pub const GUEST_USERNS_SIZE: u32 = 65_536;

/// The user namespace of a VM pod's container in the guest (docs/userns.md, "VM mode"): when the
/// host spec has one (a user namespace or mappings, e.g. containerd 2.x for CRI `hostUsers:
/// false`), its mappings are used as given, as guest IDs; else with the pod policy (`pod`), the
/// container's root maps to [`GUEST_USERNS_BASE`]. Either way the guest spec joins the pod's one
/// user namespace the agent keeps at [`tandem_agent::userns::POD_USERNS`] (made by the pod's
/// first container, with these mappings; the others must state the same). Returns whether the
/// container runs in it. A host user namespace joined by path without stated mappings cannot
/// be carried into the guest: an error naming it.
pub fn guest_userns(host: &Value, guest: &mut Value, pod_policy: bool) -> Result<bool, String> {
    let linux = &host["linux"];
    let user_ns = linux["namespaces"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["type"] == "user"));
    let given =
        user_ns.is_some() || !linux["uidMappings"].is_null() || !linux["gidMappings"].is_null();
    let nonempty = |v: &Value| v.as_array().is_some_and(|a| !a.is_empty());
    let (uid, gid) = if given {
        if !nonempty(&linux["uidMappings"]) || !nonempty(&linux["gidMappings"]) {
            let path = user_ns
                .and_then(|n| n["path"].as_str())
                .map(|p| format!(" (joined by host path {p})"))
                .unwrap_or_default();
            return Err(format!(
                "linux.namespaces: a user namespace{path} needs linux.uidMappings and \
                 linux.gidMappings in VM mode: the guest makes the pod's user namespace from \
                 them, it cannot join a host namespace"
            ));
        }
        (linux["uidMappings"].clone(), linux["gidMappings"].clone())
    } else if pod_policy {
        let m = json!([{"containerID": 0, "hostID": GUEST_USERNS_BASE, "size": GUEST_USERNS_SIZE}]);
        (m.clone(), m)
    } else {
        return Ok(false);
    };
    if !guest["linux"].is_object() {
        guest["linux"] = json!({});
    }
    let g = &mut guest["linux"];
    if !g["namespaces"].is_array() {
        g["namespaces"] = json!([]);
    }
    let ns = g["namespaces"].as_array_mut().expect("an array");
    ns.retain(|n| n["type"] != "user");
    ns.push(json!({"type": "user", "path": tandem_agent::userns::POD_USERNS}));
    pod_netns(ns);
    g["uidMappings"] = uid;
    g["gidMappings"] = gid;
    Ok(true)
}

/// A container in the pod user namespace also joins the pod's network namespace the agent makes
/// owned by it ([`tandem_agent::podnet::POD_NETNS`], with the pod's NICs moved in), so that
/// CAP_NET_ADMIN of the pod's root is over the pod's network (docs/userns.md, "VM mode").
fn pod_netns(ns: &mut Vec<Value>) {
    ns.retain(|n| n["type"] != "network");
    ns.push(json!({"type": "network", "path": tandem_agent::podnet::POD_NETNS}));
}

/// Whether a guest spec runs in the pod's user namespace ([`guest_userns`]).
pub fn in_pod_userns(guest: &Value) -> bool {
    guest["linux"]["namespaces"].as_array().is_some_and(|a| {
        a.iter()
            .any(|n| n["type"] == "user" && n["path"] == tandem_agent::userns::POD_USERNS)
    })
}

/// The pod's sandbox in the guest: the container whose namespaces the others join by path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodSandbox {
    /// The pid the shim reports for every process of the pod (QEMU's): CRI's namespace paths
    /// of the pod are `/proc/<vmm_pid>/ns/<type>`.
    pub vmm_pid: u32,
    /// The guest pid of the sandbox container's init.
    pub guest_pid: i32,
}

/// Namespace types a container joins its sandbox's by host path (CRI: IPC and UTS always, PID
/// with `shareProcessNamespace`).
pub const POD_NAMESPACES: [&str; 3] = ["ipc", "uts", "pid"];

/// Translate the namespace paths of a pod's container (docs/vm-mode.md, "Pod namespaces"): an
/// IPC, UTS or PID namespace given by the host path of the pod (`/proc/<QEMU pid>/ns/<type>`,
/// the pid the shim reported for the sandbox) becomes the guest path of the sandbox's one,
/// `/proc/<guest pid of its init>/ns/<type>` (the agent checks it names a running container's
/// init). Any other path of those types cannot be carried into the guest: an error naming it
/// (`sandbox` is `None` while the pod has no sandbox in its VM: every such path is). Returns the
/// types joined. `guest` is [`guest_spec`]'s output (paths removed, entries kept in order).
pub fn pod_namespaces(
    host: &Value,
    guest: &mut Value,
    sandbox: Option<PodSandbox>,
) -> Result<Vec<&'static str>, String> {
    let mut joined = Vec::new();
    let Some(host_ns) = host["linux"]["namespaces"].as_array() else {
        return Ok(joined);
    };
    for t in POD_NAMESPACES {
        let Some(path) = host_ns
            .iter()
            .find(|n| n["type"] == t)
            .and_then(|n| n["path"].as_str())
            .filter(|p| !p.is_empty())
        else {
            continue;
        };
        let guest_path = match sandbox {
            Some(sb) if path == format!("/proc/{}/ns/{t}", sb.vmm_pid) => {
                format!("/proc/{}/ns/{t}", sb.guest_pid)
            }
            Some(sb) => {
                return Err(format!(
                    "linux.namespaces: {t} path {path} is not the pod's (VM mode joins only the \
                     pod sandbox's namespaces, /proc/{}/ns/{t}; a VM has no other host process's)",
                    sb.vmm_pid
                ))
            }
            None => {
                return Err(format!(
                    "linux.namespaces: {t} path {path}: the pod has no running sandbox container \
                     in its VM whose namespace this could be (VM mode cannot join a host namespace)"
                ))
            }
        };
        let ns = guest["linux"]["namespaces"]
            .as_array_mut()
            .ok_or("linux.namespaces: missing in the guest spec")?;
        match ns.iter_mut().find(|n| n["type"] == t) {
            Some(n) => n["path"] = Value::String(guest_path),
            None => ns.push(json!({"type": t, "path": guest_path})),
        }
        joined.push(t);
    }
    Ok(joined)
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

    #[test]
    fn strip_resources_names_what_it_removed() {
        let mut r = json!({
            "cpu": {"shares": 512, "quota": 20000, "period": 100000, "cpus": "0-1", "mems": "0"},
            "memory": {"limit": 134217728},
            "hugepageLimits": [{"pageSize": "2MB", "limit": 0}],
            "blockIO": {"weight": 10},
            "devices": [{"allow": false, "access": "rwm"}]
        });
        let removed = strip_resources(&mut r);
        assert_eq!(
            removed,
            vec!["hugepageLimits", "blockIO", "cpu.cpus", "cpu.mems"]
        );
        assert_eq!(
            r,
            json!({
                "cpu": {"shares": 512, "quota": 20000, "period": 100000},
                "memory": {"limit": 134217728},
                "devices": [{"allow": false, "access": "rwm"}]
            })
        );
        assert!(strip_resources(&mut json!(null)).is_empty());
    }

    /// CRI's binds as containerd 1.6 writes them: the sandbox's hosts, resolv.conf, hostname
    /// files and shm dir, a directory volume, a FIFO, `ctr run --mount` of a file (relative
    /// source: from the bundle).
    #[test]
    fn host_file_binds_become_guest_files_dirs_are_shared_shm_is_tmpfs() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let sb = t.path().join("sandboxes/abc");
        std::fs::create_dir_all(sb.join("shm")).unwrap();
        std::fs::create_dir_all(t.path().join("volume")).unwrap();
        std::fs::write(sb.join("hosts"), "127.0.0.1 localhost\n").unwrap();
        std::fs::write(sb.join("resolv.conf"), "nameserver 198.18.0.53\n").unwrap();
        std::fs::write(sb.join("hostname"), "pod-a\n").unwrap();
        std::fs::set_permissions(
            sb.join("resolv.conf"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        let bundle = t.path().join("bundle");
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::write(bundle.join("cfg.txt"), "k=v").unwrap();
        nix::unistd::mkfifo(&t.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let p = |x: &str| sb.join(x).display().to_string();
        let spec = json!({
            "process": {"args": ["sh"]},
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": p("hosts"), "options": ["rbind", "rprivate", "rw"]},
                {"destination": "/etc/resolv.conf", "type": "bind", "source": p("resolv.conf"), "options": ["rbind", "ro"]},
                {"destination": "/etc/hostname", "source": p("hostname"), "options": ["bind", "ro"]},
                {"destination": "/dev/shm", "type": "bind", "source": p("shm"), "options": ["rbind", "ro"]},
                {"destination": "/data", "type": "bind", "source": t.path().join("volume"), "options": ["rbind"]},
                {"destination": "/pipe", "type": "bind", "source": t.path().join("fifo")},
                {"destination": "/x", "type": "bind", "source": "cfg.txt", "options": ["rbind", "ro"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs"}
            ],
            "linux": {"namespaces": [{"type": "mount"}]}
        });
        let g = guest_spec_with_files(spec, "c1", &bundle, "/run/tandem/bundles/c1").unwrap();
        let f = |n: &str| format!("/run/tandem/bundles/c1/files/{n}");
        assert_eq!(
            g.spec["mounts"],
            json!([
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": f("1-etc-hosts"), "options": ["rbind", "rprivate", "rw"]},
                {"destination": "/etc/resolv.conf", "type": "bind", "source": f("2-etc-resolv.conf"), "options": ["rbind", "ro"]},
                {"destination": "/etc/hostname", "type": "bind", "source": f("3-etc-hostname"), "options": ["bind", "ro"]},
                {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "ro"]},
                {"destination": "/data", "type": "bind", "source": "/run/tandem/bundles/c1/shared/c1/5", "options": ["rbind"]},
                {"destination": "/x", "type": "bind", "source": f("7-x"), "options": ["rbind", "ro"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs"}
            ])
        );
        let files: Vec<(&str, &[u8], u32)> = g
            .files
            .iter()
            .map(|f| (f.path.as_str(), f.content.as_slice(), f.mode))
            .collect();
        assert_eq!(
            files,
            vec![
                ("1-etc-hosts", &b"127.0.0.1 localhost\n"[..], 0o644),
                ("2-etc-resolv.conf", &b"nameserver 198.18.0.53\n"[..], 0o640),
                ("3-etc-hostname", &b"pod-a\n"[..], 0o644),
                ("7-x", &b"k=v"[..], 0o644),
            ]
        );
        assert_eq!(
            g.dirs,
            vec![super::super::volumes::DirBind {
                index: 5,
                source: t.path().join("volume"),
                dest: "/data".into(),
                readonly: false,
                recursive: true,
            }]
        );
        assert_eq!(g.dropped.len(), 1, "{:?}", g.dropped);
        assert!(
            g.dropped[0].ends_with("fifo -> /pipe (not a regular file)"),
            "{:?}",
            g.dropped
        );
        // the rest of the rewrite still applies
        assert_eq!(g.spec["root"], json!({"path": "rootfs", "readonly": false}));
        assert_eq!(g.spec["linux"]["cgroupsPath"], "/tandem/c1");
        // no mounts in, no mounts out
        let g = guest_spec_with_files(json!({"process": {}}), "c1", &bundle, "/b").unwrap();
        assert!(g.spec.get("mounts").is_none() && g.files.is_empty());
    }

    /// CRI's namespaces of a pod's container (containerd 1.6): the sandbox's IPC and UTS by
    /// path, PID by path with shareProcessNamespace, its own mount namespace, the pod netns. In
    /// VM mode the pod's path (QEMU's pid, reported for the sandbox) becomes the guest path of
    /// the sandbox's init; another host pid's path is an error naming it.
    #[test]
    fn pod_namespace_paths_become_the_sandbox_guest_paths() {
        let sb = PodSandbox {
            vmm_pid: 4242,
            guest_pid: 57,
        };
        let host = |pid_path: Option<&str>| {
            let mut ns = vec![
                json!({"type": "ipc", "path": "/proc/4242/ns/ipc"}),
                json!({"type": "uts", "path": "/proc/4242/ns/uts"}),
                json!({"type": "mount"}),
                json!({"type": "network", "path": "/var/run/netns/cni-1"}),
            ];
            ns.insert(
                0,
                match pid_path {
                    Some(p) => json!({"type": "pid", "path": p}),
                    None => json!({"type": "pid"}),
                },
            );
            json!({"process": {"args": ["sh"]}, "linux": {"namespaces": ns}})
        };
        // without shareProcessNamespace: a PID namespace of its own
        let h = host(None);
        let (mut g, _) = guest_spec(h.clone(), "c1");
        assert_eq!(
            pod_namespaces(&h, &mut g, Some(sb)).unwrap(),
            ["ipc", "uts"]
        );
        assert_eq!(
            g["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "ipc", "path": "/proc/57/ns/ipc"},
                   {"type": "uts", "path": "/proc/57/ns/uts"}, {"type": "mount"}])
        );
        // with it: the sandbox's
        let h = host(Some("/proc/4242/ns/pid"));
        let (mut g, _) = guest_spec(h.clone(), "c1");
        assert_eq!(
            pod_namespaces(&h, &mut g, Some(sb)).unwrap(),
            ["ipc", "uts", "pid"]
        );
        assert_eq!(
            g["linux"]["namespaces"][0],
            json!({"type": "pid", "path": "/proc/57/ns/pid"})
        );
        // in the pod user namespace: the user namespace stays the pod's, the others translated
        let (mut g, _) = guest_spec(h.clone(), "c1");
        assert!(guest_userns(&h, &mut g, true).unwrap());
        pod_namespaces(&h, &mut g, Some(sb)).unwrap();
        let types: Vec<(String, String)> = g["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["type"].as_str().unwrap().to_string(),
                    n["path"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        assert!(types.contains(&("user".into(), tandem_agent::userns::POD_USERNS.into())));
        assert!(types.contains(&("ipc".into(), "/proc/57/ns/ipc".into())));
        assert!(types.contains(&("pid".into(), "/proc/57/ns/pid".into())));
        // another host process's namespace (e.g. a pid other than the pod's): refused, named
        let h = host(Some("/proc/999/ns/pid"));
        let (mut g, _) = guest_spec(h.clone(), "c1");
        let e = pod_namespaces(&h, &mut g, Some(sb)).unwrap_err();
        assert!(
            e.contains("/proc/999/ns/pid")
                && e.contains("not the pod's")
                && e.contains("/proc/4242/ns/pid"),
            "{e}"
        );
        let h = json!({"linux": {"namespaces": [{"type": "ipc", "path": "/proc/4242/ns/uts"}]}});
        let (mut g, _) = guest_spec(h.clone(), "c1");
        assert!(
            pod_namespaces(&h, &mut g, Some(sb)).is_err(),
            "type mismatch"
        );
        // no sandbox in the VM yet (the pod's first container): no path can be the pod's
        let h = host(None);
        let (mut g, _) = guest_spec(h.clone(), "c1");
        let e = pod_namespaces(&h, &mut g, None).unwrap_err();
        assert!(
            e.contains("/proc/4242/ns/ipc") && e.contains("no running sandbox"),
            "{e}"
        );
        // new namespaces only (the sandbox, ctr run): unchanged
        let h = json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]}});
        let (mut g, _) = guest_spec(h.clone(), "c1");
        let before = g.clone();
        assert!(pod_namespaces(&h, &mut g, None).unwrap().is_empty());
        assert_eq!(g, before);
        // a path of another type (mount, cgroup) keeps today's behaviour: a new one
        let h =
            json!({"linux": {"namespaces": [{"type": "cgroup", "path": "/proc/999/ns/cgroup"}]}});
        let (mut g, _) = guest_spec(h.clone(), "c1");
        assert!(pod_namespaces(&h, &mut g, Some(sb)).unwrap().is_empty());
        assert_eq!(g["linux"]["namespaces"], json!([{"type": "cgroup"}]));
    }

    /// CRI binds the sandbox's shm dir on /dev/shm of every container: with an IPC namespace
    /// (new or the sandbox's) it is the pod's shared tmpfs, named after the host dir, sized as
    /// the host tmpfs; without one (hostIPC) a tmpfs of the container's own as before.
    #[test]
    fn shm_dir_becomes_the_pod_shared_tmpfs_unless_host_ipc() {
        let t = tempfile::tempdir().unwrap();
        let shm = t.path().join("sandboxes/abc/shm");
        std::fs::create_dir_all(&shm).unwrap();
        let spec = |ns: Value, opts: Value| {
            json!({
                "process": {"args": ["sh"]},
                "mounts": [{"destination": "/dev/shm", "type": "bind", "source": shm, "options": opts}],
                "linux": {"namespaces": ns}
            })
        };
        let g = |s: Value| guest_spec_with_files(s, "c1", t.path(), "/b").unwrap();
        let name = pod_shm_name(&shm);
        assert!(name.starts_with("shm-") && name.len() == 20, "{name}");
        assert_eq!(
            name,
            pod_shm_name(&t.path().join("sandboxes/abc/../abc/shm"))
        );
        assert_ne!(name, pod_shm_name(t.path()));
        let src = format!("{}/{name}", tandem_agent::podshare::POD_SHM_DIR);
        let sandbox = g(spec(json!([{"type": "ipc"}]), json!(["rbind", "rw"])));
        let app = g(spec(
            json!([{"type": "ipc", "path": "/proc/4242/ns/ipc"}]),
            json!(["rbind", "ro"]),
        ));
        assert_eq!(
            sandbox.spec["mounts"],
            json!([{"destination": "/dev/shm", "type": "bind", "source": src,
                    "options": ["rbind", "nosuid", "noexec", "nodev"]}])
        );
        assert_eq!(app.spec["mounts"][0]["source"], src);
        assert_eq!(app.spec["mounts"][0]["options"][4], "ro");
        // a plain directory on the host: the kernel's default size
        assert_eq!(
            sandbox.shm,
            vec![ShmReq {
                name: name.clone(),
                size_bytes: 0
            }]
        );
        assert_eq!(app.shm, sandbox.shm);
        // the host's /dev/shm (a tmpfs): its size
        let m = json!({"destination": "/dev/shm", "source": "/dev/shm"});
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let st = nix::sys::statvfs::statvfs("/dev/shm").unwrap();
        let (_, q) = pod_shm(&m, Path::new("/dev/shm"), &mi);
        assert_eq!(q.size_bytes, st.blocks() * st.fragment_size());
        // hostIPC: no IPC namespace, its own tmpfs, nothing shared
        let host_ipc = g(spec(json!([{"type": "mount"}]), json!(["rbind"])));
        assert_eq!(host_ipc.spec["mounts"][0]["type"], "tmpfs");
        assert!(host_ipc.shm.is_empty());
        // ctr run: /dev/shm is a tmpfs mount already, left as it is
        let ctr = json!({"mounts": [{"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
            "options": ["nosuid"]}], "linux": {"namespaces": [{"type": "ipc"}]}});
        let gc = g(ctr.clone());
        assert_eq!(gc.spec["mounts"], ctr["mounts"]);
        assert!(gc.shm.is_empty());
    }

    #[test]
    fn shm_of_a_host_tmpfs_keeps_its_size() {
        // /dev/shm of the machine the test runs on is a tmpfs mount point
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let st = nix::sys::statvfs::statvfs("/dev/shm").unwrap();
        let want = format!(
            "size={}k",
            (st.blocks() * st.fragment_size()).div_ceil(1024)
        );
        let m = json!({"destination": "/dev/shm", "type": "bind", "source": "/dev/shm", "options": ["rbind"]});
        let g = shm_tmpfs(&m, Path::new("/dev/shm"), &mi);
        assert_eq!(
            g,
            json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                   "options": ["nosuid", "noexec", "nodev", "mode=1777", want]})
        );
        // a mount point found through its escaped name; a plain directory has no size
        let fake = "36 25 0:32 / /run/a\\040b rw - tmpfs tmpfs rw\n";
        assert_eq!(unescape_mountinfo("/run/a\\040b"), "/run/a b");
        let t = tempfile::tempdir().unwrap();
        assert_eq!(tmpfs_size(t.path(), fake), None);
        assert_eq!(tmpfs_size(t.path(), &mi), None);
    }

    #[test]
    fn bad_binds_are_errors_naming_the_mount() {
        let t = tempfile::tempdir().unwrap();
        let big = t.path().join("big");
        std::fs::write(&big, vec![b'x'; MAX_FILE_BYTES as usize + 1]).unwrap();
        let spec = |src: &Path| {
            json!({"mounts": [{"destination": "/etc/big", "type": "bind",
                               "source": src, "options": ["rbind"]}]})
        };
        let e = guest_spec_with_files(spec(&big), "c1", t.path(), "/b")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&big.display().to_string())
                && e.contains("/etc/big")
                && e.contains("65537 bytes"),
            "{e}"
        );
        let missing = t.path().join("missing");
        let e = guest_spec_with_files(spec(&missing), "c1", t.path(), "/b")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing") && e.contains("No such file"), "{e}");
        // the sum of the files is limited too
        let mut mounts = Vec::new();
        for i in 0..5 {
            let p = t.path().join(format!("f{i}"));
            std::fs::write(&p, vec![b'y'; MAX_FILE_BYTES as usize]).unwrap();
            mounts.push(json!({"destination": format!("/f{i}"), "type": "bind", "source": p}));
        }
        let e = guest_spec_with_files(json!({"mounts": mounts}), "c1", t.path(), "/b")
            .unwrap_err()
            .to_string();
        assert!(e.contains("in all"), "{e}");
    }

    #[test]
    fn userns_by_policy_given_or_refused() {
        use tandem_agent::podnet::POD_NETNS;
        use tandem_agent::userns::POD_USERNS;
        let host = json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}});
        let mut g = host.clone();
        // no policy, nothing given: unchanged
        assert!(!guest_userns(&host, &mut g, false).unwrap());
        assert_eq!(g, host);
        assert!(!in_pod_userns(&g));
        // policy: the guest range, joined by the pod's path
        assert!(guest_userns(&host, &mut g, true).unwrap());
        assert!(in_pod_userns(&g));
        assert_eq!(
            g["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "mount"}, {"type": "user", "path": POD_USERNS},
                   {"type": "network", "path": POD_NETNS}])
        );
        let m = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        assert_eq!(g["linux"]["uidMappings"], m);
        assert_eq!(g["linux"]["gidMappings"], m);
        // given mappings win over the policy; a host path is replaced by the pod's
        let host = json!({"linux": {
            "namespaces": [{"type": "user", "path": "/proc/42/ns/user"}],
            "uidMappings": [{"containerID": 0, "hostID": 300000, "size": 65536}],
            "gidMappings": [{"containerID": 0, "hostID": 400000, "size": 65536}]}});
        let (mut g, _) = guest_spec(host.clone(), "c1");
        assert!(guest_userns(&host, &mut g, true).unwrap());
        assert_eq!(
            g["linux"]["namespaces"],
            json!([{"type": "user", "path": POD_USERNS}, {"type": "network", "path": POD_NETNS}])
        );
        assert_eq!(g["linux"]["uidMappings"][0]["hostID"], 300000);
        assert_eq!(g["linux"]["gidMappings"][0]["hostID"], 400000);
        // a host user namespace without mappings cannot be carried over
        let host = json!({"linux": {"namespaces": [{"type": "user", "path": "/proc/42/ns/user"}]}});
        let mut g = json!({});
        let e = guest_userns(&host, &mut g, true).unwrap_err();
        assert!(
            e.contains("/proc/42/ns/user") && e.contains("linux.uidMappings"),
            "{e}"
        );
        assert_eq!(g, json!({}), "nothing changed");
    }
}
