//! User namespaces per pod (`[userns] mode = "pod"`): the policy side. The host ID range
//! comes from the on-disk allocator ([`crate::idmap`]) shared by every shim process on the
//! host (`/run/containerd-tandem/idmap`, keyed `<containerd namespace>/<pod id>`); this
//! module decides what a container's spec gets and rewrites the bundle's `config.json`:
//!
//! * a spec that already has a user namespace (or uid/gid mappings) is honoured as given;
//! * the pod's first container (the CRI sandbox, or a plain `ctr run` container, which is its
//!   own pod) gets a new user namespace with `0 -> range.start`, 65536 IDs, for UIDs and GIDs;
//!   a network namespace it would join by path (CRI's, made in the host user namespace) is
//!   replaced by a new one made inside the pod's user namespace, so that capabilities such as
//!   CAP_NET_ADMIN apply to it (see `docs/userns.md`; the shim moves CNI's interfaces into it);
//! * the other containers of a CRI pod join the sandbox's user namespace by path
//!   (`/proc/<sandbox pid>/ns/user`); CRI already makes them join its net, ipc and uts
//!   namespaces, which are then owned by that user namespace.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

#[cfg(test)]
use crate::idmap::RANGE_SIZE;
use crate::idmap::{IdAllocator, IdRange, PoolConfig};
use crate::reaper::Reaper;

/// Where the allocations live (one file for the whole host, every namespace and handler).
pub fn state_dir() -> PathBuf {
    Path::new(crate::state::ROOT).join("idmap")
}

/// The allocator key of a pod: pod ids are unique per containerd namespace only.
pub fn pod_key(namespace: &str, pod_id: &str) -> String {
    format!("{namespace}/{pod_id}")
}

/// Release what a pod whose shim died held (the `delete` subcommand; the container is the pod
/// owner when its id is the pod id). Nothing held is fine.
pub fn release_after_dead_shim(namespace: &str, id: &str) {
    let dir = state_dir();
    if !dir.join(crate::idmap::STATE_FILE).exists() {
        return;
    }
    // release needs no pool; the default one is valid
    match IdAllocator::new(&dir, PoolConfig::default())
        .and_then(|a| a.release(&pod_key(namespace, id)))
    {
        Ok(true) => tracing::info!(namespace, id, "user namespace range released"),
        Ok(false) => {}
        Err(e) => tracing::warn!(namespace, id, "user namespace range: {e}"),
    }
}

/// Check a pool against the host's subordinate ID delegations (`/etc/subuid`, `/etc/subgid`:
/// `name:start:count` lines): a pool overlapping one would hand a pod IDs a host user owns.
pub fn check_subid_overlap(pool: &PoolConfig, file: &Path, text: &str) -> Result<(), String> {
    let p = IdRange {
        start: pool.start,
        size: pool.size,
    };
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split(':').collect();
        let (Some(start), Some(count)) = (
            f.get(1).and_then(|s| s.parse::<u32>().ok()),
            f.get(2).and_then(|s| s.parse::<u32>().ok()),
        ) else {
            continue;
        };
        let r = IdRange { start, size: count };
        if count > 0 && r.overlaps(&p) {
            return Err(format!(
                "[userns] pool {} overlaps {} line {} ({line:?}: IDs {}-{} delegated to {})",
                pool.name(),
                file.display(),
                n + 1,
                start,
                r.end(),
                f[0]
            ));
        }
    }
    Ok(())
}

/// Validate a configured pool: the allocator's rules and no overlap with /etc/subuid, /etc/subgid.
pub fn validate_pool(pool: &PoolConfig) -> Result<(), String> {
    validate_pool_with(pool, &[Path::new("/etc/subuid"), Path::new("/etc/subgid")])
}

fn validate_pool_with(pool: &PoolConfig, subid_files: &[&Path]) -> Result<(), String> {
    pool.validate().map_err(|e| format!("[userns] {e}"))?;
    for f in subid_files {
        if let Ok(text) = std::fs::read_to_string(f) {
            check_subid_overlap(pool, f, &text)?;
        }
    }
    Ok(())
}

/// What the spec of one container asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecUserns {
    /// A user namespace or mappings already there: used as given.
    Given,
    /// None: the pod policy decides.
    Absent,
}

pub fn spec_userns(spec: &Value) -> SpecUserns {
    let linux = &spec["linux"];
    let has_ns = linux["namespaces"]
        .as_array()
        .is_some_and(|a| a.iter().any(|n| n["type"] == "user"));
    let has_maps = !linux["uidMappings"].is_null() || !linux["gidMappings"].is_null();
    if has_ns || has_maps {
        SpecUserns::Given
    } else {
        SpecUserns::Absent
    }
}

fn namespaces_mut(spec: &mut Value) -> Result<&mut Vec<Value>, String> {
    if !spec["linux"].is_object() {
        spec["linux"] = json!({});
    }
    let linux = &mut spec["linux"];
    if linux["namespaces"].is_null() {
        linux["namespaces"] = json!([]);
    }
    linux["namespaces"]
        .as_array_mut()
        .ok_or_else(|| "linux.namespaces is not an array".to_string())
}

/// The network namespace path the spec joins, if any.
pub fn netns_path(spec: &Value) -> Option<String> {
    spec["linux"]["namespaces"].as_array().and_then(|a| {
        a.iter()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
            .filter(|p| !p.is_empty())
            .map(str::to_string)
    })
}

/// A new user namespace mapping container IDs 0..65535 to `range`. When the spec joins a
/// network namespace by path, that namespace belongs to the host user namespace, where the
/// pod's capabilities count for nothing: the container gets a new network namespace instead
/// (inside its user namespace), and the old path is returned so that its interfaces can be
/// moved over.
pub fn add_new_userns(spec: &mut Value, range: IdRange) -> Result<Option<String>, String> {
    let old_net = netns_path(spec);
    let ns = namespaces_mut(spec)?;
    ns.push(json!({"type": "user"}));
    if old_net.is_some() {
        for n in ns.iter_mut() {
            if n["type"] == "network" {
                *n = json!({"type": "network"});
            }
        }
    }
    let maps = json!([{"containerID": 0, "hostID": range.start, "size": range.size}]);
    spec["linux"]["uidMappings"] = maps.clone();
    spec["linux"]["gidMappings"] = maps;
    Ok(old_net)
}

/// Join the user namespace at `path` (the pod sandbox's, mapped to `range`). The user namespace
/// is joined first, so every other namespace joined by path must belong to it. The mapping is
/// stated too: the engine idmaps the image rootfs with it.
pub fn add_join_userns(spec: &mut Value, path: &Path, range: IdRange) -> Result<(), String> {
    let ns = namespaces_mut(spec)?;
    ns.push(json!({"type": "user", "path": path}));
    let maps = json!([{"containerID": 0, "hostID": range.start, "size": range.size}]);
    spec["linux"]["uidMappings"] = maps.clone();
    spec["linux"]["gidMappings"] = maps;
    Ok(())
}

/// Let the pod's root (host GID `gid`) into the bundle directory (containerd makes it 0700,
/// and does this itself when the spec it writes already has a user namespace): group `gid`,
/// mode 0710, so that the container's root can reach `<bundle>/rootfs`.
pub fn open_bundle(bundle: &Path, gid: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(bundle, None, Some(gid))
        .and_then(|_| std::fs::set_permissions(bundle, std::fs::Permissions::from_mode(0o710)))
        .map_err(|e| format!("bundle {}: let GID {gid} in: {e}", bundle.display()))
}

/// containerd 1.6's CRI plugin keeps its per-pod files (`/dev/shm`, `hostname`, `hosts`,
/// `resolv.conf`) under `io.containerd.grpc.v1.cri` directories it makes 0700, which the pod's
/// root (an unprivileged host ID) cannot pass through to bind them (containerd 1.7+ makes them
/// 0711 for user namespaces), below containerd's root and state dirs, which 1.6 also makes
/// 0700. Add search permission for others (`o+x`, not read) to the directories from the bind
/// sources up to containerd's root or state dir. Nothing else is touched: a volume source the
/// pod cannot reach fails the bind, naming it.
pub fn open_cri_dirs(spec: &Value) -> Result<Vec<PathBuf>, String> {
    use std::os::unix::fs::PermissionsExt;
    const CRI_DIR: &str = "io.containerd.grpc.v1.cri";
    let mut changed = Vec::new();
    for m in spec["mounts"].as_array().into_iter().flatten() {
        let Some(src) = m["source"].as_str() else {
            continue;
        };
        let src = Path::new(src);
        if !src.components().any(|c| c.as_os_str() == CRI_DIR) {
            continue;
        }
        let mut dir = src.parent();
        let mut last = false;
        while let Some(d) = dir {
            let meta = std::fs::metadata(d).map_err(|e| format!("{}: {e}", d.display()))?;
            let mode = meta.permissions().mode();
            if mode & 0o001 == 0 {
                std::fs::set_permissions(
                    d,
                    std::fs::Permissions::from_mode((mode & 0o7777) | 0o001),
                )
                .map_err(|e| format!("{}: chmod o+x: {e}", d.display()))?;
                changed.push(d.to_path_buf());
            }
            // containerd's root or state dir, the CRI dir's parent, is the last one
            if d.file_name().is_some_and(|n| n == CRI_DIR) {
                last = true;
            } else if last {
                break;
            }
            dir = d.parent();
        }
    }
    Ok(changed)
}

/// Read `<bundle>/config.json`.
pub fn read_spec(bundle: &Path) -> Result<Value, String> {
    let p = bundle.join("config.json");
    let text = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", p.display()))
}

/// Rewrite `<bundle>/config.json` atomically (temp file in the bundle, rename).
pub fn write_spec(bundle: &Path, spec: &Value) -> Result<(), String> {
    let p = bundle.join("config.json");
    let tmp = bundle.join(".config.json.tandem-userns");
    let data = serde_json::to_vec(spec).map_err(|e| format!("{}: {e}", p.display()))?;
    std::fs::write(&tmp, data).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &p).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: rename: {e}", p.display())
    })
}

/// Run `ip ARGS` (iproute2) inside the network namespace `netns` (a path to an nsfs file).
/// The shim is a subreaper whose reaper collects every child: the exit status comes from it,
/// never from `wait` (which would race it). Blocking: call from a blocking thread.
fn ip_in(reaper: &Reaper, netns: &Path, args: &[&str]) -> Result<String, String> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let what = || format!("ip {} in {}", args.join(" "), netns.display());
    let ns = std::fs::File::open(netns).map_err(|e| format!("{}: {e}", netns.display()))?;
    let fd = ns.as_raw_fd();
    let mut cmd = std::process::Command::new("ip");
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: setns is async-signal-safe; the fd stays open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("{}: {e}", what()))?;
    let exit = reaper.subscribe(child.id() as i32);
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let code = exit
        .blocking_recv()
        .map_err(|_| format!("{}: exit status lost", what()))?
        .code;
    if code != 0 {
        return Err(format!("{}: exit {code}: {}", what(), err.trim()));
    }
    Ok(out)
}

fn json_list(text: &str, what: &str) -> Result<Vec<Value>, String> {
    if text.trim().is_empty() {
        return Ok(vec![]);
    }
    serde_json::from_str::<Vec<Value>>(text).map_err(|e| format!("{what}: {e}"))
}

/// Move the interfaces CNI configured in `old` (CRI's network namespace, owned by the host
/// user namespace) into `new` (the pod's, owned by its user namespace), with their MTU,
/// addresses and routes: moving a link to another namespace drops its addresses, so they are
/// read first and added again. `lo` stays (`new` has its own, set up here).
pub fn move_links(reaper: &Reaper, old: &Path, new: &Path) -> Result<(), String> {
    let links = json_list(
        &ip_in(reaper, old, &["-j", "addr", "show"])?,
        "ip -j addr show",
    )?;
    let mut routes = Vec::new();
    for fam in ["-4", "-6"] {
        routes.extend(json_list(
            &ip_in(reaper, old, &["-j", fam, "route", "show", "table", "main"])?,
            "ip -j route show",
        )?);
    }
    let moved: Vec<Value> = links
        .into_iter()
        .filter(|l| l["ifname"].as_str().is_some_and(|n| n != "lo"))
        .collect();
    let new_s = new.to_string_lossy().into_owned();
    ip_in(reaper, new, &["link", "set", "lo", "up"])?;
    for l in &moved {
        let name = l["ifname"].as_str().unwrap_or_default();
        ip_in(reaper, old, &["link", "set", "dev", name, "netns", &new_s]).or_else(|_| {
            // older iproute2 wants a pid or a name: fall back to the pid in /proc/<pid>/ns/net
            let pid = new_s
                .strip_prefix("/proc/")
                .and_then(|r| r.split('/').next())
                .unwrap_or_default()
                .to_string();
            ip_in(reaper, old, &["link", "set", "dev", name, "netns", &pid])
        })?;
        for a in l["addr_info"].as_array().into_iter().flatten() {
            if a["scope"] == "link" && a["family"] == "inet6" {
                continue; // the kernel makes the link-local address again
            }
            let (Some(local), Some(len)) = (a["local"].as_str(), a["prefixlen"].as_u64()) else {
                continue;
            };
            let cidr = format!("{local}/{len}");
            let mut args = vec!["addr", "add", &cidr, "dev", name];
            if let Some(b) = a["broadcast"].as_str() {
                args.extend(["broadcast", b]);
            }
            ip_in(reaper, new, &args)?;
        }
        ip_in(reaper, new, &["link", "set", "dev", name, "up"])?;
    }
    let names: Vec<&str> = moved.iter().filter_map(|l| l["ifname"].as_str()).collect();
    for r in &routes {
        let (Some(dst), Some(dev)) = (r["dst"].as_str(), r["dev"].as_str()) else {
            continue;
        };
        if !names.contains(&dev) || r["protocol"] == "kernel" {
            continue; // the kernel's own routes come back with the addresses
        }
        let fam = if dst.contains(':') || r["gateway"].as_str().is_some_and(|g| g.contains(':')) {
            "-6"
        } else {
            "-4"
        };
        let mut args = vec![fam, "route", "replace", dst];
        if let Some(gw) = r["gateway"].as_str() {
            args.extend(["via", gw]);
        }
        args.extend(["dev", dev]);
        if let Some(src) = r["prefsrc"].as_str() {
            args.extend(["src", src]);
        }
        if let Some(scope) = r["scope"].as_str() {
            args.extend(["scope", scope]);
        }
        ip_in(reaper, new, &args)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(start: u32, n: u32) -> PoolConfig {
        PoolConfig {
            start,
            size: n * RANGE_SIZE,
            allow_host_ids: false,
        }
    }

    #[test]
    fn subid_overlap_names_pool_and_line() {
        let text = "# comment\nalice:100000:65536\nbob:300000:65536\n";
        let f = Path::new("/etc/subuid");
        assert!(check_subid_overlap(&pool(1_000_000, 4), f, text).is_ok());
        let e = check_subid_overlap(&pool(200_000, 2), f, text).unwrap_err();
        assert!(
            e.contains("200000-331072") && e.contains("/etc/subuid line 3") && e.contains("bob"),
            "{e}"
        );
        // bad lines are not ours to judge
        assert!(check_subid_overlap(&pool(100_000, 1), f, "x\ny:z:1\n").is_ok());
    }

    #[test]
    fn validate_pool_reads_files() {
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("subgid");
        std::fs::write(&sub, "carol:165536:65536\n").unwrap();
        let missing = d.path().join("none");
        let e = validate_pool_with(&pool(100_000, 2), &[&missing, &sub]).unwrap_err();
        assert!(e.contains("subgid") && e.contains("carol"), "{e}");
        assert!(validate_pool_with(&pool(300_000, 2), &[&missing, &sub]).is_ok());
        let e = validate_pool_with(&pool(1000, 1), &[]).unwrap_err();
        assert!(e.contains("[userns]") && e.contains("below 65536"), "{e}");
    }

    #[test]
    fn spec_userns_given_or_absent() {
        assert_eq!(spec_userns(&json!({})), SpecUserns::Absent);
        let s = json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "network"}]}});
        assert_eq!(spec_userns(&s), SpecUserns::Absent);
        let s = json!({"linux": {"namespaces": [{"type": "user"}]}});
        assert_eq!(spec_userns(&s), SpecUserns::Given);
        let s = json!({"linux": {"uidMappings": []}});
        assert_eq!(spec_userns(&s), SpecUserns::Given);
    }

    #[test]
    fn new_userns_maps_and_replaces_a_joined_netns() {
        let r = IdRange {
            start: 165_536,
            size: RANGE_SIZE,
        };
        let mut s = json!({"linux": {"namespaces": [
            {"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]}});
        let old = add_new_userns(&mut s, r).unwrap();
        assert_eq!(old.as_deref(), Some("/var/run/netns/cni-1"));
        let ns = s["linux"]["namespaces"].as_array().unwrap();
        assert!(ns.contains(&json!({"type": "user"})));
        assert!(ns.contains(&json!({"type": "network"})));
        assert_eq!(netns_path(&s), None);
        assert_eq!(
            s["linux"]["uidMappings"],
            json!([{"containerID": 0, "hostID": 165_536, "size": 65536}])
        );
        assert_eq!(s["linux"]["gidMappings"], s["linux"]["uidMappings"]);
        assert_eq!(spec_userns(&s), SpecUserns::Given);
        // no linux section at all
        let mut s = json!({});
        assert_eq!(add_new_userns(&mut s, r).unwrap(), None);
        assert_eq!(s["linux"]["namespaces"], json!([{"type": "user"}]));
    }

    #[test]
    fn join_userns_by_path() {
        let mut s =
            json!({"linux": {"namespaces": [{"type": "network", "path": "/proc/7/ns/net"}]}});
        let r = IdRange {
            start: 200_000,
            size: RANGE_SIZE,
        };
        add_join_userns(&mut s, Path::new("/proc/7/ns/user"), r).unwrap();
        assert_eq!(
            s["linux"]["namespaces"][1],
            json!({"type": "user", "path": "/proc/7/ns/user"})
        );
        assert_eq!(
            s["linux"]["gidMappings"],
            json!([{"containerID": 0, "hostID": 200_000, "size": 65536}])
        );
    }

    #[test]
    fn cri_dirs_get_search_permission_only() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let top = d.path().join("state");
        let cri = top.join("io.containerd.grpc.v1.cri");
        let sb = cri.join("sandboxes/abc");
        std::fs::create_dir_all(&sb).unwrap();
        std::fs::write(sb.join("hosts"), "").unwrap();
        for p in [&d.path().to_path_buf(), &top, &cri, &sb] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        let other = d.path().join("private");
        std::fs::create_dir(&other).unwrap();
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o700)).unwrap();
        let spec = json!({"mounts": [
            {"source": sb.join("hosts"), "destination": "/etc/hosts"},
            {"source": other.join("x"), "destination": "/x"},
            {"destination": "/proc"}]});
        let changed = open_cri_dirs(&spec).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&sb), 0o701);
        assert_eq!(mode(&cri), 0o701);
        assert_eq!(mode(&top), 0o701, "containerd's state dir");
        assert_eq!(
            mode(d.path()) & 0o001,
            0,
            "above containerd's dir nothing changes"
        );
        assert_eq!(mode(&other), 0o700, "a volume source is not ours to open");
        // sandboxes/abc, cri, state (sandboxes was 0755 already)
        assert_eq!(changed.len(), 3, "{changed:?}");
        assert!(open_cri_dirs(&spec).unwrap().is_empty());
    }

    #[test]
    fn spec_round_trip_in_bundle() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("config.json"),
            br#"{"ociVersion":"1.0.2","x":{"y":1}}"#,
        )
        .unwrap();
        let mut s = read_spec(d.path()).unwrap();
        s["z"] = json!(2);
        write_spec(d.path(), &s).unwrap();
        assert_eq!(
            read_spec(d.path()).unwrap(),
            json!({"ociVersion":"1.0.2","x":{"y":1},"z":2})
        );
        assert!(!d.path().join(".config.json.tandem-userns").exists());
        let e = read_spec(&d.path().join("none")).unwrap_err();
        assert!(e.contains("config.json"), "{e}");
    }
}
