//! The pod's network namespace in the guest (issue 4, VM mode with a pod user namespace).
//!
//! Without a user namespace the pod's containers share the guest's initial network namespace,
//! where ConfigureNetwork set up the pod's NICs. With the pod user namespace
//! ([`crate::userns::POD_USERNS`]) that would leave the pod's root without CAP_NET_ADMIN over
//! its own network (the initial netns belongs to the guest's initial user namespace). So the
//! host shim gives such a container's spec the network namespace path [`POD_NETNS`] too, and the
//! first container that asks for it makes it here:
//!
//! * a helper process joins the pod user namespace and unshares a network namespace (so the
//!   namespace is owned by the pod user namespace); the agent bind-mounts `/proc/<helper>/ns/net`
//!   on [`POD_NETNS`] (kept alive after the helper exits);
//! * the NICs ConfigureNetwork set up are moved into it (`ip link set … netns <helper>`, which
//!   drops their addresses and routes), then configured there again as ConfigureNetwork had
//!   them — MTU, addresses, up — with `lo` up and the routes;
//! * the modules a pod's root may need for its own links (802.1Q VLANs, macvlan) are loaded
//!   (a process in the pod cannot make the kernel load them; the guest has no modprobe).
//!
//! Every later container joins the same namespace by path (the engine `setns`es after joining
//! the user namespace); execs join the container init's.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Mutex;

use crate::network::{iface_plan, ip_in, route_args, Iface, Route};
use crate::reaper::Reaper;

/// Path of the pod's network namespace in the guest (a bind mount of an nsfs file).
pub const POD_NETNS: &str = "/run/tandem/pod-netns";

/// Modules loaded when the pod network namespace is made: what `ip link add … type vlan` and
/// `… type macvlan` need in the guest kernel.
pub const NET_MODULES: &[&str] = &["8021q", "macvlan"];

type R<T> = std::result::Result<T, String>;

/// The network namespace path a spec joins, if any.
pub fn netns_path_of(spec: &oci_spec::runtime::Spec) -> Option<String> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .iter()
        .flatten()
        .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)?
        .path()
        .as_ref()
        .map(|p| p.to_string_lossy().into_owned())
}

/// The pod's network as ConfigureNetwork set it up, and whether the pod netns was made.
#[derive(Debug, Default)]
pub struct PodNet {
    config: Mutex<(Vec<Iface>, Vec<Route>)>,
    made: Mutex<bool>,
}

impl PodNet {
    /// Remember the NICs and routes ConfigureNetwork configured (in the initial netns).
    pub fn record(&self, ifaces: &[Iface], routes: &[Route]) {
        let made = *self.made.lock().unwrap_or_else(|p| p.into_inner());
        if made {
            tracing::warn!(
                "ConfigureNetwork after the pod network namespace {POD_NETNS} was made: its interfaces stay in the guest's initial namespace"
            );
        }
        *self.config.lock().unwrap_or_else(|p| p.into_inner()) = (ifaces.to_vec(), routes.to_vec());
    }

    /// Make the pod network namespace at `path`, owned by the user namespace at `userns`, with
    /// the recorded NICs moved into it and configured; a no-op once made.
    pub fn ensure(&self, reaper: &Reaper, userns: &Path, path: &Path) -> R<()> {
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        if *made {
            return Ok(());
        }
        if std::process::id() == 1 {
            load_net_modules();
        }
        let (ifaces, routes) = self
            .config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        make(reaper, userns, path, &ifaces, &routes)?;
        *made = true;
        tracing::info!(
            path = %path.display(),
            interfaces = ifaces.len(),
            routes = routes.len(),
            "pod network namespace made"
        );
        Ok(())
    }
}

/// Load [`NET_MODULES`] (and what they depend on) from the running kernel's modules dir; a
/// failure is logged, not fatal (the pod's network works without them).
fn load_net_modules() {
    let dir = Path::new("/lib/modules").join(crate::guest::kernel_release());
    let names: Vec<String> = NET_MODULES.iter().map(|s| s.to_string()).collect();
    let r = crate::modules::ModulesDep::read(&dir.join("modules.dep"))
        .and_then(|dep| dep.load_order(&names));
    match r {
        Ok(order) => {
            for rel in order {
                if let Err(e) = crate::modules::load_module(&dir.join(&rel)) {
                    tracing::warn!("pod network: {e}");
                }
            }
        }
        Err(e) => tracing::warn!("pod network: modules {NET_MODULES:?}: {e}"),
    }
}

/// A helper process in the user namespace `userns_fd` with a new network namespace of its own;
/// it exits when the returned pipe end is dropped.
fn spawn_helper(userns: &Path) -> R<(i32, std::os::fd::OwnedFd)> {
    let ns = fs::File::open(userns).map_err(|e| format!("open {}: {e}", userns.display()))?;
    let (r, w) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    let (r2, w2) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: the child only makes raw syscalls (no allocation, no locks) and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        unsafe {
            libc::close(w2.as_raw_fd());
            libc::close(r.as_raw_fd());
            // [step, errno]: step 0 = ok, 1 = setns user, 2 = unshare net
            let mut msg = [0u8; 2];
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWUSER) != 0 {
                msg = [1, *libc::__errno_location() as u8];
            } else if libc::unshare(libc::CLONE_NEWNET) != 0 {
                msg = [2, *libc::__errno_location() as u8];
            }
            libc::write(w.as_raw_fd(), msg.as_ptr() as *const libc::c_void, 2);
            let mut b = 0u8;
            libc::read(r2.as_raw_fd(), &mut b as *mut u8 as *mut libc::c_void, 1);
            libc::_exit(0);
        }
    }
    drop(w);
    drop(r2);
    let mut msg = [0u8; 2];
    let n = nix::unistd::read(&r, &mut msg).map_err(|e| format!("helper pipe: {e}"))?;
    if n != 2 || msg[0] != 0 {
        drop(w2);
        reap(pid);
        let what = match msg[0] {
            1 => format!("join the pod user namespace {}", userns.display()),
            _ => "unshare a network namespace".to_string(),
        };
        return Err(format!(
            "helper process: {what}: {}",
            std::io::Error::from_raw_os_error(msg[1] as i32)
        ));
    }
    Ok((pid, w2))
}

fn reap(pid: i32) {
    let mut st = 0;
    // SAFETY: reap our own helper (the agent's reaper may have done it: ECHILD then).
    unsafe { libc::waitpid(pid, &mut st, libc::__WALL) };
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The `ip` argument lists, in order, that set the pod netns up once the NICs are in it:
/// `lo` up, each NIC as ConfigureNetwork had it, the routes.
pub fn netns_plan(ifaces: &[Iface], routes: &[Route]) -> R<Vec<Vec<String>>> {
    let mut plan = vec![strings(&["link", "set", "dev", "lo", "up"])];
    for f in ifaces {
        plan.extend(iface_plan(f, &f.name));
    }
    for (i, r) in routes.iter().enumerate() {
        plan.push(route_args(r).map_err(|e| format!("routes[{i}]: {e}"))?);
    }
    Ok(plan)
}

fn make(reaper: &Reaper, userns: &Path, path: &Path, ifaces: &[Iface], routes: &[Route]) -> R<()> {
    let plan = netns_plan(ifaces, routes)?;
    let (pid, keep) = spawn_helper(userns)?;
    let mut moved: Vec<&str> = Vec::new();
    let mut mounted = false;
    let r = (|| -> R<()> {
        if let Some(d) = path.parent() {
            fs::create_dir_all(d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
        }
        fs::write(path, b"").map_err(|e| format!("create {}: {e}", path.display()))?;
        let src = format!("/proc/{pid}/ns/net");
        nix::mount::mount(
            Some(src.as_str()),
            path,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("bind {src} on {}: {e}", path.display()))?;
        mounted = true;
        for f in ifaces {
            ip_in(
                reaper,
                None,
                &strings(&["link", "set", "dev", &f.name, "netns", &pid.to_string()]),
            )
            .map_err(|e| format!("move interface {} into the pod netns: {e}", f.name))?;
            moved.push(&f.name);
        }
        for args in &plan {
            ip_in(reaper, Some(path), args)?;
        }
        Ok(())
    })();
    if r.is_err() {
        // give the NICs back to the initial netns (they come back down and bare: configure
        // them as before) and drop the half-made namespace
        for name in &moved {
            let _ = ip_in(
                reaper,
                Some(path),
                &strings(&[
                    "link",
                    "set",
                    "dev",
                    name,
                    "netns",
                    &std::process::id().to_string(),
                ]),
            );
        }
        if !moved.is_empty() {
            for f in ifaces {
                for args in iface_plan(f, &f.name) {
                    let _ = ip_in(reaper, None, &args);
                }
            }
            for rt in routes {
                if let Ok(args) = route_args(rt) {
                    let _ = ip_in(reaper, None, &args);
                }
            }
        }
        if mounted {
            let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = fs::remove_file(path);
    }
    drop(keep);
    reap(pid);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(ns: serde_json::Value) -> oci_spec::runtime::Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2", "root": {"path": "rootfs"},
            "linux": {"namespaces": ns}
        }))
        .unwrap()
    }

    #[test]
    fn netns_path_of_a_spec() {
        let s = spec(serde_json::json!([{"type": "network", "path": POD_NETNS}, {"type": "pid"}]));
        assert_eq!(netns_path_of(&s).as_deref(), Some(POD_NETNS));
        assert_eq!(
            netns_path_of(&spec(serde_json::json!([{"type": "network"}]))),
            None
        );
        assert_eq!(netns_path_of(&spec(serde_json::json!([]))), None);
    }

    #[test]
    fn plan_brings_lo_up_then_the_nics_then_the_routes() {
        let f = Iface {
            mac: "02:aa:00:00:00:01".into(),
            name: "eth0".into(),
            mtu: 1500,
            addresses: vec!["198.19.0.5/16".into()],
        };
        let r = Route {
            dest: "default".into(),
            gateway: "198.19.0.1".into(),
            device: "eth0".into(),
        };
        let plan: Vec<String> = netns_plan(&[f], &[r])
            .unwrap()
            .iter()
            .map(|a| a.join(" "))
            .collect();
        assert_eq!(
            plan,
            [
                "link set dev lo up",
                "link set dev eth0 down",
                "link set dev eth0 mtu 1500",
                "addr flush dev eth0",
                "addr add 198.19.0.5/16 dev eth0",
                "link set dev eth0 up",
                "-4 route replace default via 198.19.0.1 dev eth0",
            ]
        );
        let bad = Route {
            dest: "nonsense".into(),
            gateway: String::new(),
            device: String::new(),
        };
        let e = netns_plan(&[], &[bad]).unwrap_err();
        assert!(e.contains("routes[0]") && e.contains("nonsense"), "{e}");
    }

    /// As root on the host: the helper's network namespace is owned by the pod user namespace
    /// (NS_GET_USERNS of it is that namespace); a bad user namespace path is named.
    #[test]
    fn helper_netns_is_owned_by_the_pod_user_namespace() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let e = spawn_helper(&d.path().join("nope")).unwrap_err();
        assert!(e.contains("nope"), "{e}");
        let userns = d.path().join("user");
        let u = crate::userns::SpecUserns {
            path: Some(userns.to_string_lossy().into_owned()),
            uid: vec![(0, 310_000, 65536)],
            gid: vec![(0, 310_000, 65536)],
        };
        crate::userns::PodUserns::default()
            .ensure(&userns, &u)
            .unwrap();
        let user_ino = fs::metadata(&userns).unwrap().ino();
        let r = spawn_helper(&userns);
        let _ = nix::mount::umount2(&userns, nix::mount::MntFlags::MNT_DETACH);
        let (pid, keep) = r.unwrap();
        let net = fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
        let mine = fs::metadata("/proc/self/ns/net").unwrap().ino();
        // NS_GET_USERNS = _IO(0xb7, 0x1)
        let owner = unsafe { libc::ioctl(net.as_raw_fd(), 0xb701) };
        let owner_ino = (owner >= 0).then(|| {
            let m = fs::metadata(format!("/proc/self/fd/{owner}"))
                .unwrap()
                .ino();
            unsafe { libc::close(owner) };
            m
        });
        let net_ino = net.metadata().unwrap().ino();
        drop(keep);
        reap(pid);
        assert_ne!(net_ino, mine, "a network namespace of its own");
        assert_eq!(owner_ino, Some(user_ino), "owned by the pod user namespace");
    }
}
