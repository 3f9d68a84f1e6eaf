//! What the containers of a VM pod share in the guest besides the VM itself: the sandbox's IPC,
//! UTS and (when the pod asks) PID namespaces, and one `/dev/shm` tmpfs per pod.
//!
//! * Namespaces: the host shim gives a container that joins its sandbox's namespace the path
//!   `/proc/<guest pid of the sandbox's init>/ns/<type>`; the engine `setns`es into it (after
//!   the user namespace, so a pod user namespace that owns the sandbox's namespaces works).
//!   [`check_ns_paths`] accepts such a path only when the pid is the init of a container this
//!   agent made and still runs, and the type in the path is the entry's type: the host cannot
//!   make a container join the agent's own namespaces (`/proc/1/ns/…`) or any other process's.
//! * `/dev/shm`: [`PodShm`] keeps a tmpfs per name at `<`[`POD_SHM_DIR`]`>/<name>` in the agent's
//!   mount namespace (a bind from another mount namespace, `/proc/<pid>/root/…`, is refused by
//!   the kernel), made by the first container that asks for it (CreateContainer's `pod_shm`), bound
//!   by the guest spec of every container of the pod that asks for the same name, unmounted when
//!   the last of them is removed. Names and sizes are checked here ([`validate_shm`]).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use oci_spec::runtime::{LinuxNamespaceType, Spec};

/// Where the pod's shared tmpfs mounts live in the guest.
pub const POD_SHM_DIR: &str = "/run/tandem/pod-shm";
/// Most shared tmpfs mounts one CreateContainer may ask for.
pub const MAX_POD_SHM: usize = 4;

type R<T> = std::result::Result<T, String>;

/// A shared tmpfs asked for by CreateContainer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShmReq {
    /// `[A-Za-z0-9_.-]{1,64}`, not starting with '.'.
    pub name: String,
    /// tmpfs `size=` in bytes; 0 = the kernel's default (half the guest's RAM).
    pub size_bytes: u64,
}

/// The guest path of the shared tmpfs `name`.
pub fn shm_path(name: &str) -> String {
    format!("{POD_SHM_DIR}/{name}")
}

fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Check a request's shared tmpfs list: at most [`MAX_POD_SHM`], names as [`ShmReq::name`] says,
/// each once, sizes at most `max_bytes` (the guest's RAM).
pub fn validate_shm(reqs: &[ShmReq], max_bytes: u64) -> R<()> {
    if reqs.len() > MAX_POD_SHM {
        return Err(format!(
            "pod_shm: {} entries, more than {MAX_POD_SHM}",
            reqs.len()
        ));
    }
    let mut seen = HashSet::new();
    for r in reqs {
        if !name_ok(&r.name) {
            return Err(format!(
                "pod_shm name {:?}: must be 1-64 of [A-Za-z0-9_.-], not starting with '.'",
                r.name
            ));
        }
        if !seen.insert(r.name.as_str()) {
            return Err(format!("pod_shm name {:?}: given twice", r.name));
        }
        if r.size_bytes > max_bytes {
            return Err(format!(
                "pod_shm {}: size {} bytes, more than the guest's {max_bytes} bytes of RAM",
                r.name, r.size_bytes
            ));
        }
    }
    Ok(())
}

/// The guest's RAM in bytes (the largest pod tmpfs size allowed).
pub fn guest_ram() -> u64 {
    nix::sys::sysinfo::sysinfo()
        .map(|s| s.ram_total())
        .unwrap_or(0)
}

/// `/proc/<pid>/ns/<type>` -> (pid, type name); only the canonical form (decimal pid without
/// leading zeros, no `.`/`..`, nothing after the type).
fn proc_ns_path(p: &str) -> Option<(i32, &str)> {
    let rest = p.strip_prefix("/proc/")?;
    let (pid, rest) = rest.split_once('/')?;
    let kind = rest.strip_prefix("ns/")?;
    if pid.is_empty() || pid.starts_with('0') || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let pid: i32 = pid.parse().ok()?;
    (!kind.is_empty() && !kind.contains('/')).then_some((pid, kind))
}

/// The file name under `/proc/<pid>/ns/` of a namespace type.
pub fn ns_file(t: LinuxNamespaceType) -> &'static str {
    match t {
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Time => "time",
    }
}

/// Check the namespace paths of a spec of the `/proc/…` form: `/proc/<pid>/ns/<type of the
/// entry>` with `live_init(pid)` true (the init of a running container of this agent). Other
/// paths (the pod's user and network namespaces) are checked where they are made.
pub fn check_ns_paths(spec: &Spec, live_init: impl Fn(i32) -> bool) -> R<()> {
    let Some(ns) = spec.linux().as_ref().and_then(|l| l.namespaces().as_ref()) else {
        return Ok(());
    };
    for n in ns {
        let Some(p) = n.path() else { continue };
        let p = p.to_string_lossy();
        if !p.starts_with("/proc/") {
            continue;
        }
        let t = n.typ();
        let Some((pid, kind)) = proc_ns_path(&p) else {
            return Err(format!(
                "linux.namespaces: {t} path {p}: not of the form /proc/<pid>/ns/{}",
                ns_file(t)
            ));
        };
        if kind != ns_file(t) {
            return Err(format!(
                "linux.namespaces: {t} path {p}: names a {kind} namespace, not a {} one",
                ns_file(t)
            ));
        }
        if !live_init(pid) {
            return Err(format!(
                "linux.namespaces: {t} path {p}: pid {pid} is not the init of a running container of this pod"
            ));
        }
    }
    Ok(())
}

/// The pod's shared tmpfs mounts: name -> (size, users).
#[derive(Debug)]
pub struct PodShm {
    dir: PathBuf,
    made: Mutex<HashMap<String, (u64, HashSet<String>)>>,
}

impl Default for PodShm {
    fn default() -> Self {
        Self::new(Path::new(POD_SHM_DIR))
    }
}

impl PodShm {
    /// Shared tmpfs mounts under `dir` (normally [`POD_SHM_DIR`]).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            made: Mutex::new(HashMap::new()),
        }
    }

    /// Path of the tmpfs `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Make (or reuse) each tmpfs of `reqs` for container `id`. A name already made must be
    /// asked for with the same size. On error nothing new is left (what this call made is
    /// released).
    pub fn acquire(&self, id: &str, reqs: &[ShmReq]) -> R<()> {
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        let mut done: Vec<&str> = Vec::new();
        let mut r = Ok(());
        for q in reqs {
            if let Some((size, users)) = made.get_mut(&q.name) {
                if *size != q.size_bytes {
                    r = Err(format!(
                        "pod_shm {}: made with size {} bytes, asked for with {}",
                        q.name, size, q.size_bytes
                    ));
                    break;
                }
                users.insert(id.to_string());
                done.push(&q.name);
                continue;
            }
            if let Err(e) = self.mount(q) {
                r = Err(e);
                break;
            }
            made.insert(
                q.name.clone(),
                (q.size_bytes, HashSet::from([id.to_string()])),
            );
            done.push(&q.name);
            tracing::info!(name = q.name, size = q.size_bytes, id, "pod shm made");
        }
        if r.is_err() {
            for name in done {
                self.drop_user(&mut made, name, id);
            }
        }
        r
    }

    fn mount(&self, q: &ShmReq) -> R<()> {
        let path = self.path(&q.name);
        std::fs::create_dir_all(&path).map_err(|e| format!("mkdir {}: {e}", path.display()))?;
        let mut data = String::from("mode=1777");
        if q.size_bytes > 0 {
            data.push_str(&format!(",size={}", q.size_bytes));
        }
        use nix::mount::MsFlags;
        nix::mount::mount(
            Some("shm"),
            &path,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(data.as_str()),
        )
        .map_err(|e| {
            let _ = std::fs::remove_dir(&path);
            format!("mount tmpfs {data} on {}: {e}", path.display())
        })
    }

    fn drop_user(&self, made: &mut HashMap<String, (u64, HashSet<String>)>, name: &str, id: &str) {
        let Some((_, users)) = made.get_mut(name) else {
            return;
        };
        users.remove(id);
        if !users.is_empty() {
            return;
        }
        made.remove(name);
        let path = self.path(name);
        if let Err(e) = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!("pod shm: umount {}: {e}", path.display());
        }
        let _ = std::fs::remove_dir(&path);
        tracing::info!(name, "pod shm removed (its last container is gone)");
    }

    /// Container `id` is gone: drop it from every tmpfs; the last user unmounts one.
    pub fn release(&self, id: &str) {
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        let names: Vec<String> = made
            .iter()
            .filter(|(_, (_, u))| u.contains(id))
            .map(|(n, _)| n.clone())
            .collect();
        for n in names {
            self.drop_user(&mut made, &n, id);
        }
    }

    /// Names made, with their users (for tests and logs).
    pub fn users(&self, name: &str) -> Vec<String> {
        let made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<String> = made
            .get(name)
            .map(|(_, u)| u.iter().cloned().collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(ns: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2", "root": {"path": "rootfs"},
            "linux": {"namespaces": ns}
        }))
        .unwrap()
    }

    #[test]
    fn proc_namespace_paths_must_name_a_live_container_init_and_the_right_type() {
        let live = |pid: i32| pid == 57;
        let ok = spec(serde_json::json!([
            {"type": "ipc", "path": "/proc/57/ns/ipc"},
            {"type": "uts", "path": "/proc/57/ns/uts"},
            {"type": "pid", "path": "/proc/57/ns/pid"},
            {"type": "mount"},
            {"type": "user", "path": crate::userns::POD_USERNS},
            {"type": "network", "path": crate::podnet::POD_NETNS}
        ]));
        check_ns_paths(&ok, live).unwrap();
        for (ns, want) in [
            (
                serde_json::json!([{"type": "ipc", "path": "/proc/1/ns/ipc"}]),
                "pid 1 is not the init",
            ),
            (
                serde_json::json!([{"type": "ipc", "path": "/proc/57/ns/mnt"}]),
                "names a mnt namespace, not a ipc one",
            ),
            (
                serde_json::json!([{"type": "uts", "path": "/proc/57/../1/ns/uts"}]),
                "not of the form",
            ),
            (
                serde_json::json!([{"type": "uts", "path": "/proc/057/ns/uts"}]),
                "not of the form",
            ),
            (
                serde_json::json!([{"type": "pid", "path": "/proc/self/ns/pid"}]),
                "not of the form",
            ),
            (
                serde_json::json!([{"type": "pid", "path": "/proc/57/ns/pid/x"}]),
                "not of the form",
            ),
        ] {
            let e = check_ns_paths(&spec(ns.clone()), live).unwrap_err();
            assert!(e.contains(want), "{ns}: {e}");
        }
        check_ns_paths(&spec(serde_json::json!([])), live).unwrap();
    }

    #[test]
    fn shm_requests_are_checked() {
        let q = |n: &str, s: u64| ShmReq {
            name: n.into(),
            size_bytes: s,
        };
        validate_shm(&[q("shm-0123abcd", 64 << 20), q("b", 0)], 1 << 30).unwrap();
        for (reqs, want) in [
            (vec![q("", 1)], "must be 1-64"),
            (vec![q("../x", 1)], "must be 1-64"),
            (vec![q(".x", 1)], "must be 1-64"),
            (vec![q(&"a".repeat(65), 1)], "must be 1-64"),
            (vec![q("a", 1), q("a", 1)], "given twice"),
            (vec![q("a", (1 << 30) + 1)], "more than the guest's"),
            (
                (0..5).map(|i| q(&format!("n{i}"), 1)).collect(),
                "more than 4",
            ),
        ] {
            let e = validate_shm(&reqs, 1 << 30).unwrap_err();
            assert!(e.contains(want), "{reqs:?}: {e}");
        }
    }

    /// As root: one tmpfs per name, shared by its users, sized as asked, unmounted and removed
    /// with the last user; a second size for the same name is refused and leaves nothing new.
    #[test]
    fn pod_shm_is_made_once_shared_and_removed_with_its_last_user() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let shm = PodShm::new(d.path());
        let q = ShmReq {
            name: "shm-a".into(),
            size_bytes: 8 << 20,
        };
        shm.acquire("sandbox", std::slice::from_ref(&q)).unwrap();
        let p = shm.path("shm-a");
        let st = nix::sys::statvfs::statvfs(&p).unwrap();
        assert_eq!(st.blocks() * st.fragment_size(), 8 << 20);
        assert_ne!(
            std::fs::metadata(&p).unwrap().dev(),
            std::fs::metadata(d.path()).unwrap().dev(),
            "a mount of its own"
        );
        std::fs::write(p.join("f"), b"x").unwrap();
        shm.acquire("app", std::slice::from_ref(&q)).unwrap();
        assert_eq!(shm.users("shm-a"), ["app", "sandbox"]);
        let other = ShmReq {
            name: "shm-b".into(),
            size_bytes: 0,
        };
        let bad = ShmReq {
            size_bytes: 4 << 20,
            ..q.clone()
        };
        let e = shm.acquire("c3", &[other, bad]).unwrap_err();
        assert!(e.contains("made with size 8388608"), "{e}");
        assert!(!shm.path("shm-b").exists(), "undone");
        assert_eq!(shm.users("shm-a"), ["app", "sandbox"]);
        shm.release("sandbox");
        assert_eq!(std::fs::read(p.join("f")).unwrap(), b"x", "kept for app");
        shm.release("app");
        assert!(!p.exists(), "unmounted and removed");
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mi.contains(&d.path().display().to_string()), "{mi}");
    }
}
