//! Cgroups as plain files: v1, pure v2 and the hybrid layout (v1 controllers plus a cgroup2
//! mount at `<root>/unified` that holds the controllers v1 does not, e.g. hugetlb).
//!
//! Every function takes the cgroup root as a parameter (through [`Layout::detect`]) so that the
//! unit tests run against a fake tree in a temporary directory.

pub mod devices_bpf;
mod v1;
mod v2;

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci_spec::runtime::LinuxResources;

use crate::{Error, Result, Stats};

/// v1 controllers the engine manages (named hierarchies such as name=systemd are left alone).
const V1_CONTROLLERS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "blkio",
    "pids",
    "hugetlb",
    "net_cls",
    "net_prio",
    "perf_event",
    "rdma",
    "misc",
];

/// One mounted v1 hierarchy: its directory and the controllers mounted there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub mount: PathBuf,
    pub controllers: Vec<String>,
}

/// How cgroups are mounted under the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Pure cgroup2 at the root.
    V2 { mount: PathBuf },
    /// v1 hierarchies, plus the cgroup2 mount of the hybrid layout when present.
    V1 {
        hierarchies: Vec<Hierarchy>,
        unified: Option<PathBuf>,
    },
}

fn cg_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Cgroup {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Write `value` to `dir/file`, with an error naming the file and the value.
pub(crate) fn write(dir: &Path, file: &str, value: &str) -> Result<()> {
    let p = dir.join(file);
    fs::write(&p, value).map_err(|e| cg_err(&p, format!("write {value:?}: {e}")))
}

pub(crate) fn read(dir: &Path, file: &str) -> Result<String> {
    let p = dir.join(file);
    fs::read_to_string(&p).map_err(|e| cg_err(&p, format!("read: {e}")))
}

/// Read a file holding one number ("max" reads as u64::MAX); missing files read as 0.
pub(crate) fn read_u64(dir: &Path, file: &str) -> u64 {
    match fs::read_to_string(dir.join(file)) {
        Ok(s) => {
            let s = s.trim();
            if s == "max" {
                u64::MAX
            } else {
                s.parse().unwrap_or(0)
            }
        }
        Err(_) => 0,
    }
}

/// A "key value" file (memory.stat, cpu.stat, memory.events) as pairs.
pub(crate) fn read_keyed(dir: &Path, file: &str) -> Vec<(String, u64)> {
    fs::read_to_string(dir.join(file))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

pub(crate) fn keyed(pairs: &[(String, u64)], key: &str) -> u64 {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| *v)
        .unwrap_or(0)
}

/// "2MB" -> 2 MiB, "1GB" -> 1 GiB, "64KB" -> 64 KiB.
pub fn page_size_bytes(s: &str) -> Option<u64> {
    let (num, mult) = if let Some(n) = s.strip_suffix("KB") {
        (n, 1u64 << 10)
    } else if let Some(n) = s.strip_suffix("MB") {
        (n, 1 << 20)
    } else if let Some(n) = s.strip_suffix("GB") {
        (n, 1 << 30)
    } else {
        return None;
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    num.parse::<u64>().ok().map(|n| n * mult)
}

impl Layout {
    /// Look at what is mounted under `root`.
    pub fn detect(root: &Path) -> Result<Layout> {
        if root.join("cgroup.controllers").exists() {
            return Ok(Layout::V2 {
                mount: root.to_path_buf(),
            });
        }
        let entries = fs::read_dir(root).map_err(|e| cg_err(root, format!("read dir: {e}")))?;
        let mut hierarchies = Vec::new();
        let mut unified = None;
        for ent in entries.flatten() {
            let ft = match ent.file_type() {
                Ok(t) => t,
                Err(_) => continue,
            };
            if !ft.is_dir() {
                continue; // symlinks like cpu -> cpu,cpuacct would duplicate a hierarchy
            }
            let name = ent.file_name().to_string_lossy().into_owned();
            if ent.path().join("cgroup.controllers").exists() {
                unified = Some(ent.path());
                continue;
            }
            let controllers: Vec<String> = name
                .split(',')
                .filter(|c| V1_CONTROLLERS.contains(c))
                .map(str::to_string)
                .collect();
            if !controllers.is_empty() {
                hierarchies.push(Hierarchy {
                    mount: ent.path(),
                    controllers,
                });
            }
        }
        if hierarchies.is_empty() && unified.is_none() {
            return Err(cg_err(root, "no cgroup hierarchy found"));
        }
        hierarchies.sort_by(|a, b| a.mount.cmp(&b.mount));
        Ok(Layout::V1 {
            hierarchies,
            unified,
        })
    }

    pub fn is_v2(&self) -> bool {
        matches!(self, Layout::V2 { .. })
    }
}

/// The `cgroup.procs` file of the cgroup the process described by `proc_cgroup` (the text of
/// `/proc/<pid>/cgroup`) is in, in one hierarchy of `layout`: the first v1 hierarchy listed
/// there, else the cgroup2 one.
pub fn own_procs_file(layout: &Layout, proc_cgroup: &str) -> Option<PathBuf> {
    let lines = proc_cgroup.lines().filter_map(|l| {
        let mut it = l.splitn(3, ':');
        let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
        Some((ctrls, path.trim_start_matches('/')))
    });
    let (v1, v2): (Vec<_>, Vec<_>) = lines.partition(|(c, _)| !c.is_empty());
    match layout {
        Layout::V2 { mount } => v2.first().map(|(_, p)| mount.join(p).join("cgroup.procs")),
        Layout::V1 {
            hierarchies,
            unified,
        } => v1
            .iter()
            .find_map(|(ctrls, path)| {
                let h = hierarchies.iter().find(|h| {
                    ctrls
                        .split(',')
                        .any(|c| h.controllers.iter().any(|hc| hc == c))
                })?;
                Some(h.mount.join(path).join("cgroup.procs"))
            })
            .or_else(|| {
                let (u, (_, p)) = (unified.as_ref()?, v2.first()?);
                Some(u.join(p).join("cgroup.procs"))
            }),
    }
}

/// Start the slow part of the next cgroup migrations now, on a thread of its own, so that it
/// overlaps the caller's other work (rootfs mount, spec, state, cgroup dirs) instead of
/// delaying the container's init.
///
/// Writing a pid to `cgroup.procs` takes the kernel's global `cgroup_threadgroup_rwsem` for
/// writing, and the first writer after a quiet spell waits for an RCU grace period before it
/// gets it; writers within about one grace period after that do not wait. Measured on this
/// 2-vCPU host under load: the first of the 9 writes that place an init in its cgroups took
/// 8-28 ms, each of the others ~0.03 ms. This writes the calling process's own pid into the
/// `cgroup.procs` of the cgroup it is already in (a migration that moves nothing), which starts
/// that wait. Failures are ignored: it is only a head start, the real writes report errors.
pub fn prime_migration(layout: Layout) -> Option<std::thread::JoinHandle<()>> {
    let r = std::thread::Builder::new()
        .name("cgroup-prime".into())
        .spawn(move || {
            let Ok(own) = fs::read_to_string("/proc/self/cgroup") else {
                return;
            };
            let me = std::process::id().to_string();
            let Some(f) = own_procs_file(&layout, &own) else {
                return;
            };
            // only where this process already is (a cgroup namespace or another mount could
            // make the path name a different cgroup: then nothing is moved)
            let listed = fs::read_to_string(&f).is_ok_and(|l| l.lines().any(|p| p == me));
            if listed {
                if let Err(e) = fs::write(&f, &me) {
                    tracing::debug!("cgroup prime: write {}: {e}", f.display());
                }
            }
        });
    r.map_err(|e| tracing::debug!("cgroup prime thread: {e}"))
        .ok()
}

/// The cgroup(s) of one container: the same relative path in every hierarchy.
#[derive(Debug, Clone)]
pub struct Cgroup {
    pub layout: Layout,
    /// Relative path, e.g. "default/abc" (no leading slash).
    pub rel: String,
}

/// The relative cgroup path for a container: `linux.cgroupsPath` or `/tandem/<id>`.
pub fn rel_path(cgroups_path: Option<&Path>, id: &str) -> String {
    let p = cgroups_path
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let p = if p.is_empty() {
        format!("/tandem/{id}")
    } else {
        p
    };
    p.trim_matches('/').to_string()
}

impl Cgroup {
    pub fn new(root: &Path, rel: &str) -> Result<Cgroup> {
        Ok(Cgroup {
            layout: Layout::detect(root)?,
            rel: rel.trim_matches('/').to_string(),
        })
    }

    /// Every directory of this cgroup (one per hierarchy), whether it exists or not.
    pub fn dirs(&self) -> Vec<PathBuf> {
        match &self.layout {
            Layout::V2 { mount } => vec![mount.join(&self.rel)],
            Layout::V1 {
                hierarchies,
                unified,
            } => hierarchies
                .iter()
                .map(|h| &h.mount)
                .chain(unified.iter())
                .map(|m| m.join(&self.rel))
                .collect(),
        }
    }

    /// The directory of the hierarchy holding `controller` (v2: the one directory; hybrid:
    /// the unified one when only it has the controller).
    pub fn dir_of(&self, controller: &str) -> Option<PathBuf> {
        match &self.layout {
            Layout::V2 { mount } => Some(mount.join(&self.rel)),
            Layout::V1 {
                hierarchies,
                unified,
            } => {
                if let Some(h) = hierarchies
                    .iter()
                    .find(|h| h.controllers.iter().any(|c| c == controller))
                {
                    return Some(h.mount.join(&self.rel));
                }
                let u = unified.as_ref()?;
                let ctrls = fs::read_to_string(u.join("cgroup.controllers")).unwrap_or_default();
                ctrls
                    .split_whitespace()
                    .any(|c| c == controller)
                    .then(|| u.join(&self.rel))
            }
        }
    }

    /// Whether `controller` is served by a cgroup2 hierarchy (pure v2 or hybrid unified).
    fn is_v2_controller(&self, controller: &str) -> bool {
        match &self.layout {
            Layout::V2 { .. } => true,
            Layout::V1 { hierarchies, .. } => !hierarchies
                .iter()
                .any(|h| h.controllers.iter().any(|c| c == controller)),
        }
    }

    /// Make the directories (with parents), populating v1 cpusets and enabling v2 controllers
    /// down the path.
    pub fn create(&self) -> Result<()> {
        match &self.layout {
            Layout::V2 { mount } => v2::create(mount, &self.rel),
            Layout::V1 {
                hierarchies,
                unified,
            } => {
                for h in hierarchies {
                    let dir = h.mount.join(&self.rel);
                    fs::create_dir_all(&dir).map_err(|e| cg_err(&dir, format!("mkdir: {e}")))?;
                    if h.controllers.iter().any(|c| c == "cpuset") {
                        v1::populate_cpuset(&h.mount, &self.rel)?;
                    }
                }
                if let Some(u) = unified {
                    v2::create(u, &self.rel)?;
                }
                Ok(())
            }
        }
    }

    /// Move `pid` into this cgroup in every hierarchy.
    pub fn add_pid(&self, pid: i32) -> Result<()> {
        for d in self.dirs() {
            write(&d, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// Apply resources. `initial` adds the default device rules (as runc does at create).
    pub fn apply(&self, res: &LinuxResources, initial: bool) -> Result<()> {
        match &self.layout {
            Layout::V2 { mount } => v2::apply(&mount.join(&self.rel), res, initial),
            Layout::V1 { .. } => {
                v1::apply(self, res, initial)?;
                if let Some(h) = res.hugepage_limits() {
                    for l in h {
                        let dir = self.dir_of("hugetlb").ok_or_else(|| {
                            cg_err(
                                Path::new(&self.rel),
                                "hugepageLimits given but no hierarchy has the hugetlb controller",
                            )
                        })?;
                        if self.is_v2_controller("hugetlb") {
                            v2::write_hugetlb(&dir, l.page_size(), l.limit())?;
                        } else {
                            v1::write_hugetlb(&dir, l.page_size(), l.limit())?;
                        }
                    }
                }
                if let Some(u) = res.unified() {
                    if !u.is_empty() {
                        tracing::warn!(
                            "linux.resources.unified ignored on a v1/hybrid cgroup layout"
                        );
                    }
                }
                Ok(())
            }
        }
    }

    /// Host pids of every process in this cgroup (union over hierarchies).
    pub fn procs(&self) -> Result<Vec<i32>> {
        let mut pids = Vec::new();
        let mut found = false;
        for d in self.dirs() {
            match fs::read_to_string(d.join("cgroup.procs")) {
                Ok(s) => {
                    found = true;
                    pids.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(cg_err(&d.join("cgroup.procs"), format!("read: {e}"))),
            }
        }
        if !found {
            return Err(cg_err(Path::new(&self.rel), "cgroup does not exist"));
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    fn freezer(&self) -> Result<(PathBuf, bool)> {
        if let Layout::V2 { mount } = &self.layout {
            return Ok((mount.join(&self.rel), true));
        }
        let d = self
            .dir_of("freezer")
            .ok_or_else(|| cg_err(Path::new(&self.rel), "no freezer hierarchy"))?;
        let v2 = self.is_v2_controller("freezer");
        Ok((d, v2))
    }

    /// Freeze (`true`) or thaw, and wait until the state is reached (bounded).
    pub fn set_frozen(&self, frozen: bool) -> Result<()> {
        let (dir, v2) = self.freezer()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if v2 {
                write(&dir, "cgroup.freeze", if frozen { "1" } else { "0" })?;
            } else {
                write(
                    &dir,
                    "freezer.state",
                    if frozen { "FROZEN" } else { "THAWED" },
                )?;
            }
            if self.is_frozen_dir(&dir, v2)? == frozen {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(cg_err(
                    &dir,
                    format!("timed out waiting for freezer state frozen={frozen}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn is_frozen_dir(&self, dir: &Path, v2: bool) -> Result<bool> {
        if v2 {
            Ok(keyed(&read_keyed(dir, "cgroup.events"), "frozen") == 1)
        } else {
            Ok(read(dir, "freezer.state")?.trim() == "FROZEN")
        }
    }

    pub fn is_frozen(&self) -> Result<bool> {
        let (dir, v2) = self.freezer()?;
        self.is_frozen_dir(&dir, v2)
    }

    pub fn stats(&self) -> Result<Stats> {
        let mut st = Stats::default();
        match &self.layout {
            Layout::V2 { mount } => v2::stats(&mount.join(&self.rel), &mut st),
            Layout::V1 { .. } => {
                v1::stats(self, &mut st);
                if let Some(d) = self.dir_of("hugetlb") {
                    st.hugetlb = if self.is_v2_controller("hugetlb") {
                        v2::hugetlb_stats(&d)
                    } else {
                        v1::hugetlb_stats(&d)
                    };
                }
            }
        }
        Ok(st)
    }

    /// OOM kill count of the memory cgroup.
    pub fn oom_kills(&self) -> Result<u64> {
        let dir = self
            .dir_of("memory")
            .ok_or_else(|| cg_err(Path::new(&self.rel), "no memory hierarchy"))?;
        if self.is_v2_controller("memory") {
            let p = dir.join("memory.events");
            if !p.exists() {
                return Err(cg_err(&p, "missing"));
            }
            Ok(keyed(&read_keyed(&dir, "memory.events"), "oom_kill"))
        } else {
            let p = dir.join("memory.oom_control");
            if !p.exists() {
                return Err(cg_err(&p, "missing"));
            }
            Ok(keyed(&read_keyed(&dir, "memory.oom_control"), "oom_kill"))
        }
    }

    /// An fd readable after an OOM event (v1 eventfd on memory.oom_control, v2 inotify on
    /// memory.events).
    pub fn oom_notifier(&self) -> Result<std::os::fd::OwnedFd> {
        let dir = self
            .dir_of("memory")
            .ok_or_else(|| cg_err(Path::new(&self.rel), "no memory hierarchy"))?;
        if self.is_v2_controller("memory") {
            v2::oom_notifier(&dir)
        } else {
            v1::oom_notifier(&dir)
        }
    }

    /// Remove the directories (deepest level only: the container's own), retrying while the
    /// kernel still reports them busy. Missing directories are fine.
    pub fn remove(&self, timeout: Duration) -> Result<()> {
        remove_dirs(&self.dirs(), timeout)
    }
}

/// rmdir each directory, retrying on EBUSY until `timeout`. Missing ones are fine.
pub fn remove_dirs(dirs: &[PathBuf], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for d in dirs {
        loop {
            match fs::remove_dir(d) {
                Ok(()) => break,
                Err(e) if e.kind() == ErrorKind::NotFound => break,
                Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(cg_err(d, format!("rmdir: {e}"))),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fake v1 hierarchy with the files the engine touches.
    pub fn fake_v1(root: &Path, hybrid: bool) {
        for c in [
            "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "pids", "blkio",
        ] {
            fs::create_dir_all(root.join(c)).unwrap();
        }
        fs::write(root.join("cpuset/cpuset.cpus"), "0-1\n").unwrap();
        fs::write(root.join("cpuset/cpuset.mems"), "0\n").unwrap();
        fs::create_dir_all(root.join("systemd")).unwrap();
        if hybrid {
            fs::create_dir_all(root.join("unified")).unwrap();
            fs::write(root.join("unified/cgroup.controllers"), "hugetlb\n").unwrap();
            fs::write(root.join("unified/cgroup.subtree_control"), "").unwrap();
        }
    }

    pub fn fake_v2(root: &Path) {
        fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory hugetlb pids\n",
        )
        .unwrap();
        fs::write(root.join("cgroup.subtree_control"), "").unwrap();
    }

    #[test]
    fn detects_layouts() {
        let t = tempfile::tempdir().unwrap();
        fake_v1(t.path(), true);
        match Layout::detect(t.path()).unwrap() {
            Layout::V1 {
                hierarchies,
                unified,
            } => {
                assert_eq!(hierarchies.len(), 8, "{hierarchies:?}");
                assert_eq!(unified, Some(t.path().join("unified")));
            }
            l => panic!("{l:?}"),
        }
        let t2 = tempfile::tempdir().unwrap();
        fake_v2(t2.path());
        assert!(Layout::detect(t2.path()).unwrap().is_v2());
        let t3 = tempfile::tempdir().unwrap();
        assert!(Layout::detect(t3.path()).is_err());
    }

    #[test]
    fn own_procs_file_per_layout() {
        let own = "9:name=systemd:/\n8:pids:/user.slice\n4:memory:/x/y\n1:cpu:/\n0::/init.scope\n";
        let t = tempfile::tempdir().unwrap();
        fake_v1(t.path(), true);
        let l = Layout::detect(t.path()).unwrap();
        // name=systemd is not a managed hierarchy; pids is the first one listed that is
        assert_eq!(
            own_procs_file(&l, own),
            Some(t.path().join("pids/user.slice/cgroup.procs"))
        );
        // only the cgroup2 line: the unified mount of the hybrid layout
        assert_eq!(
            own_procs_file(&l, "0::/a\n"),
            Some(t.path().join("unified/a/cgroup.procs"))
        );
        let t2 = tempfile::tempdir().unwrap();
        fake_v2(t2.path());
        let l2 = Layout::detect(t2.path()).unwrap();
        assert_eq!(
            own_procs_file(&l2, own),
            Some(t2.path().join("init.scope/cgroup.procs"))
        );
        assert_eq!(own_procs_file(&l2, "8:pids:/\n"), None);
    }

    #[test]
    fn prime_writes_own_pid_into_own_cgroup() {
        let t = tempfile::tempdir().unwrap();
        fake_v1(t.path(), true);
        let l = Layout::detect(t.path()).unwrap();
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        let f = own_procs_file(&l, &own).expect("a cgroup of this process in the fake layout");
        fs::create_dir_all(f.parent().unwrap()).unwrap();
        // a cgroup.procs that does not list this process is left alone
        fs::write(&f, "1\n").unwrap();
        prime_migration(l.clone()).unwrap().join().unwrap();
        assert_eq!(fs::read_to_string(&f).unwrap(), "1\n");
        let me = std::process::id().to_string();
        fs::write(&f, format!("1\n{me}\n")).unwrap();
        prime_migration(l).unwrap().join().unwrap();
        assert_eq!(fs::read_to_string(&f).unwrap(), me);
        // a layout without this process's cgroup: nothing made, no panic
        let t2 = tempfile::tempdir().unwrap();
        fake_v2(t2.path());
        let before = fs::read_dir(t2.path()).unwrap().count();
        prime_migration(Layout::detect(t2.path()).unwrap())
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(fs::read_dir(t2.path()).unwrap().count(), before);
    }

    #[test]
    fn rel_paths() {
        assert_eq!(rel_path(None, "abc"), "tandem/abc");
        assert_eq!(rel_path(Some(Path::new("")), "abc"), "tandem/abc");
        assert_eq!(
            rel_path(Some(Path::new("/default/abc")), "abc"),
            "default/abc"
        );
    }

    #[test]
    fn page_sizes() {
        assert_eq!(page_size_bytes("2MB"), Some(2 << 20));
        assert_eq!(page_size_bytes("1GB"), Some(1 << 30));
        assert_eq!(page_size_bytes("64KB"), Some(64 << 10));
        assert_eq!(page_size_bytes("MB"), None);
        assert_eq!(page_size_bytes("2M"), None);
    }

    #[test]
    fn procs_union_and_remove() {
        let t = tempfile::tempdir().unwrap();
        fake_v1(t.path(), false);
        let cg = Cgroup::new(t.path(), "/default/c1").unwrap();
        cg.create().unwrap();
        fs::write(t.path().join("memory/default/c1/cgroup.procs"), "12\n7\n").unwrap();
        fs::write(t.path().join("pids/default/c1/cgroup.procs"), "7\n9\n").unwrap();
        assert_eq!(cg.procs().unwrap(), vec![7, 9, 12]);
        // a fake tree keeps the files, so rmdir fails with ENOTEMPTY: an error naming the dir
        let e = cg
            .remove(Duration::from_millis(10))
            .unwrap_err()
            .to_string();
        assert!(e.contains("default/c1"), "{e}");
    }
}
