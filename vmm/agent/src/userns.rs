//! The pod's user namespace in the guest (issue 4, VM mode). The host shim asks for it by giving
//! a container's spec the user namespace path [`POD_USERNS`] together with `linux.uidMappings`
//! and `linux.gidMappings`: the first such container makes it (a helper process unshares a user
//! namespace, the agent writes its maps and bind-mounts `/proc/<helper>/ns/user` on
//! [`POD_USERNS`], which keeps it alive after the helper exits); every later one joins the same
//! namespace (the engine `setns`es into the path), and must state the same mappings. So all
//! containers of the pod (= of the VM) share one user namespace, as the containers of a
//! container-mode pod join the sandbox's.
//!
//! Rootfs ownership without a chown copy: a rootfs mount with the option `idmap` (the erofs
//! image layers) is idmapped in place with the container's user namespace
//! (`open_tree(OPEN_TREE_CLONE)` + `mount_setattr(MOUNT_ATTR_IDMAP)`, the plain mount detached,
//! the idmapped clone moved onto its place), so image files owned by root appear owned by the
//! container's root; overlayfs takes idmapped lower layers given by path (Linux 5.19+). A layer
//! whose root is already owned by the mapped root (a chown'ed copy, e.g. `ctr run --uidmap`) is
//! used as it is. The writable upper layer is a tmpfs, which cannot be idmapped before Linux 6.3
//! (the guest kernel is 6.1): files the container writes are stored with the container's guest
//! IDs, which is what they are; only the upper directory itself (the overlay's root inode) is
//! given to the container's root.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use oci_spec::runtime::{LinuxIdMapping, LinuxIdMappingBuilder, LinuxNamespaceType, Spec};

/// Path of the pod's user namespace in the guest (a bind mount of an nsfs file).
pub const POD_USERNS: &str = "/run/tandem/pod-userns";

type R<T> = std::result::Result<T, String>;
/// `(containerID, hostID, size)` lines of a mapping.
pub type IdMaps = Vec<(u32, u32, u32)>;

/// The user namespace a container's spec asks for, with its mappings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecUserns {
    /// `linux.namespaces[type=user].path`, if joined by path.
    pub path: Option<String>,
    pub uid: Vec<(u32, u32, u32)>,
    pub gid: Vec<(u32, u32, u32)>,
}

impl SpecUserns {
    /// The guest ID that container ID `id` maps to.
    pub fn to_host(maps: &[(u32, u32, u32)], id: u32) -> Option<u32> {
        maps.iter().find_map(|&(c, h, n)| {
            let off = id.checked_sub(c)?;
            (off < n).then(|| h + off)
        })
    }

    /// Host (guest) uid and gid of the container's root.
    pub fn root(&self) -> Option<(u32, u32)> {
        Some((Self::to_host(&self.uid, 0)?, Self::to_host(&self.gid, 0)?))
    }
}

fn triples(m: &Option<Vec<LinuxIdMapping>>) -> Vec<(u32, u32, u32)> {
    m.iter()
        .flatten()
        .map(|m| (m.container_id(), m.host_id(), m.size()))
        .collect()
}

/// The spec's user namespace, if it has one.
pub fn of_spec(spec: &Spec) -> Option<SpecUserns> {
    let linux = spec.linux().as_ref()?;
    let ns = linux
        .namespaces()
        .iter()
        .flatten()
        .find(|n| n.typ() == LinuxNamespaceType::User)?;
    Some(SpecUserns {
        path: ns.path().as_ref().map(|p| p.to_string_lossy().into_owned()),
        uid: triples(linux.uid_mappings()),
        gid: triples(linux.gid_mappings()),
    })
}

/// `containerID hostID size` lines as written to `uid_map` / `gid_map`.
pub fn map_text(m: &[(u32, u32, u32)]) -> String {
    m.iter().map(|(c, h, n)| format!("{c} {h} {n}\n")).collect()
}

fn mappings(m: &[(u32, u32, u32)]) -> R<Vec<LinuxIdMapping>> {
    m.iter()
        .map(|&(c, h, n)| {
            LinuxIdMappingBuilder::default()
                .container_id(c)
                .host_id(h)
                .size(n)
                .build()
                .map_err(|e| format!("mapping {c} {h} {n}: {e}"))
        })
        .collect()
}

/// A user namespace with the given maps, as an fd (tandem-oci's helper-process way; safe in the
/// multi-threaded agent).
pub fn make_userns(uid: &[(u32, u32, u32)], gid: &[(u32, u32, u32)]) -> R<OwnedFd> {
    tandem_oci::idmap::make_userns(&mappings(uid)?, &mappings(gid)?)
}

/// The pod's user namespace in the guest: made by the first container that asks for it, joined
/// by the others (see the module docs).
#[derive(Debug, Default)]
pub struct PodUserns {
    /// Mappings of the namespace at [`POD_USERNS`] once made.
    made: std::sync::Mutex<Option<(IdMaps, IdMaps)>>,
}

impl PodUserns {
    /// Make the namespace at `path` with `u`'s mappings, or check that the one there has them.
    pub fn ensure(&self, path: &Path, u: &SpecUserns) -> R<()> {
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((uid, gid)) = made.as_ref() {
            if *uid != u.uid || *gid != u.gid {
                return Err(format!(
                    "the pod's user namespace {} maps uid {:?} gid {:?}; this container asks for uid {:?} gid {:?} (all containers of a VM pod share one user namespace)",
                    path.display(),
                    map_text(uid).trim_end(),
                    map_text(gid).trim_end(),
                    map_text(&u.uid).trim_end(),
                    map_text(&u.gid).trim_end()
                ));
            }
            return Ok(());
        }
        let ns = make_userns(&u.uid, &u.gid)?;
        if let Some(d) = path.parent() {
            fs::create_dir_all(d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
        }
        fs::write(path, b"").map_err(|e| format!("create {}: {e}", path.display()))?;
        let src = format!("/proc/self/fd/{}", ns.as_raw_fd());
        nix::mount::mount(
            Some(src.as_str()),
            path,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            let _ = fs::remove_file(path);
            format!("bind the pod's user namespace on {}: {e}", path.display())
        })?;
        *made = Some((u.uid.clone(), u.gid.clone()));
        tracing::info!(
            path = %path.display(),
            uid_map = map_text(&u.uid).trim_end(),
            "pod user namespace made"
        );
        Ok(())
    }
}

/// The user namespace of `u` as an fd: opened by path, or a new one with its mappings.
pub fn open(u: &SpecUserns) -> R<OwnedFd> {
    match &u.path {
        Some(p) => fs::File::open(p)
            .map(OwnedFd::from)
            .map_err(|e| format!("user namespace {p}: {e}")),
        None => make_userns(&u.uid, &u.gid),
    }
}

/// Replace the mount at `target` by an idmapped clone of it (mapped with `userns`): a file the
/// filesystem says is owned by ID x appears owned by whatever x maps to in `userns`.
pub fn idmap_in_place(target: &Path, userns: &OwnedFd) -> R<()> {
    let tree = tandem_oci::idmap::idmapped_tree(target, userns, false, false)?;
    nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH)
        .map_err(|e| format!("detach the plain mount at {}: {e}", target.display()))?;
    tandem_oci::idmap::attach(&tree, target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_userns_and_root() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "user", "path": POD_USERNS}],
                "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
                "gidMappings": [{"containerID": 0, "hostID": 200000, "size": 10},
                                {"containerID": 10, "hostID": 300000, "size": 5}]
            }
        }))
        .unwrap();
        let u = of_spec(&spec).unwrap();
        assert_eq!(u.path.as_deref(), Some(POD_USERNS));
        assert_eq!(u.root(), Some((100000, 200000)));
        assert_eq!(SpecUserns::to_host(&u.gid, 12), Some(300002));
        assert_eq!(SpecUserns::to_host(&u.gid, 15), None);
        assert_eq!(map_text(&u.gid), "0 200000 10\n10 300000 5\n");
        let none: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2", "linux": {"namespaces": [{"type": "pid"}]}
        }))
        .unwrap();
        assert_eq!(of_spec(&none), None);
    }

    /// As root: the pod namespace is made once, joined with the same maps, refused with others;
    /// a tmpfs idmapped in place shows its root-owned files as the mapped root's.
    #[test]
    fn pod_userns_made_once_and_idmap_in_place() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("userns");
        let u = SpecUserns {
            path: Some(path.to_string_lossy().into_owned()),
            uid: vec![(0, 300_000, 65536)],
            gid: vec![(0, 300_000, 65536)],
        };
        let p = PodUserns::default();
        p.ensure(&path, &u).unwrap();
        let ino = fs::metadata(&path).unwrap();
        p.ensure(&path, &u).unwrap();
        let other = SpecUserns {
            uid: vec![(0, 400_000, 65536)],
            ..u.clone()
        };
        let e = p.ensure(&path, &other).unwrap_err();
        assert!(
            e.contains("0 300000 65536") && e.contains("0 400000 65536"),
            "{e}"
        );
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(&path).unwrap().ino(), ino.ino());
        // the bind mount holds a user namespace with the maps
        let ns = open(&u).unwrap();
        let mnt = d.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &mnt,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        fs::write(mnt.join("f"), b"x").unwrap();
        let r = idmap_in_place(&mnt, &ns);
        let owner = fs::metadata(mnt.join("f")).unwrap().uid();
        let _ = nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH);
        let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
        r.unwrap();
        assert_eq!(owner, 300_000);
        // bad maps: named
        let bad = SpecUserns {
            path: None,
            uid: vec![(0, 500_000, 10), (5, 600_000, 10)],
            gid: vec![(0, 500_000, 10)],
        };
        let e = make_userns(&bad.uid, &bad.gid).unwrap_err();
        assert!(e.contains("linux.uidMappings"), "{e}");
    }
}
