//! Host ID ranges for pods in user namespaces.
//!
//! Every pod that runs with its own user namespace (Kubernetes `hostUsers: false`) gets a range
//! of [`RANGE_SIZE`] host UIDs and the same range of host GIDs, taken from a pool set in the
//! configuration (`start`, `size`; `size` a multiple of [`RANGE_SIZE`]). Container ID 0..65535
//! maps to host ID `range.start .. range.start + 65535`.
//!
//! The allocations live in `<state_dir>/idmap.json`, read and rewritten under an exclusive
//! `flock` on `<state_dir>/idmap.lock`: they survive shim and containerd restarts, and pods
//! started at the same time by different shim processes never get overlapping ranges.
//! Allocation is idempotent per pod id (the same pod gets the same range again) and the range
//! is given back by [`IdAllocator::release`] when the pod is removed.
//!
//! Uses only std, libc, serde, serde_json and thiserror.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// IDs per pod (for UIDs and, separately, for GIDs): the full 16-bit range a container image
/// may use.
pub const RANGE_SIZE: u32 = 65536;

/// Name of the allocation file under the state dir.
pub const STATE_FILE: &str = "idmap.json";
/// Name of the lock file under the state dir.
pub const LOCK_FILE: &str = "idmap.lock";

#[derive(Debug, thiserror::Error)]
pub enum IdmapError {
    #[error("idmap pool {pool}: invalid: {msg}")]
    InvalidPool { pool: String, msg: String },
    #[error(
        "idmap pool {pool}: exhausted: all {count} ranges of {RANGE_SIZE} IDs are held by pods"
    )]
    Exhausted { pool: String, count: u32 },
    #[error("idmap: invalid pod id {id:?}: {msg}")]
    InvalidPodId { id: String, msg: String },
    #[error("idmap state {path}: {msg}")]
    Corrupt { path: PathBuf, msg: String },
    #[error("idmap {context} {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = IdmapError> = std::result::Result<T, E>;

/// The pool host IDs are taken from (from the shim's configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolConfig {
    /// First host ID of the pool.
    pub start: u32,
    /// Number of IDs in the pool; a multiple of [`RANGE_SIZE`].
    pub size: u32,
    /// Allow `start` below 65536 (IDs of host users and groups). Off by default.
    #[serde(default)]
    pub allow_host_ids: bool,
}

impl Default for PoolConfig {
    /// 100000 .. 100000 + 256 * 65536: 256 pods.
    fn default() -> Self {
        Self {
            start: 100_000,
            size: 256 * RANGE_SIZE,
            allow_host_ids: false,
        }
    }
}

impl PoolConfig {
    /// A printable name: `start-end` (end exclusive).
    pub fn name(&self) -> String {
        format!(
            "{}-{}",
            self.start,
            u64::from(self.start) + u64::from(self.size)
        )
    }

    /// Number of pod ranges in the pool.
    pub fn ranges(&self) -> u32 {
        self.size / RANGE_SIZE
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| {
            Err(IdmapError::InvalidPool {
                pool: self.name(),
                msg,
            })
        };
        if self.size == 0 || !self.size.is_multiple_of(RANGE_SIZE) {
            return bad(format!(
                "size {} is not a positive multiple of {RANGE_SIZE}",
                self.size
            ));
        }
        if self.start < RANGE_SIZE && !self.allow_host_ids {
            return bad(format!(
                "start {} is below {RANGE_SIZE} and overlaps host users/groups (set allow_host_ids to permit)",
                self.start
            ));
        }
        // the last ID must fit in u32 and must not be (uid_t)-1, which the kernel reserves
        let end = u64::from(self.start) + u64::from(self.size);
        if end > u64::from(u32::MAX) {
            return bad(format!(
                "start {} + size {} exceeds the largest ID {}",
                self.start,
                self.size,
                u32::MAX - 1
            ));
        }
        Ok(())
    }
}

/// A pod's host range: container IDs `0..size` map to host IDs `start..start+size`, for UIDs and
/// GIDs alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange {
    pub start: u32,
    pub size: u32,
}

impl IdRange {
    pub fn end(&self) -> u64 {
        u64::from(self.start) + u64::from(self.size)
    }

    pub fn overlaps(&self, other: &IdRange) -> bool {
        u64::from(self.start) < other.end() && u64::from(other.start) < self.end()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    /// pod id -> range
    allocations: BTreeMap<String, IdRange>,
}

/// The allocator of one state dir and pool. Cheap; every call takes the file lock.
#[derive(Debug, Clone)]
pub struct IdAllocator {
    dir: PathBuf,
    pool: PoolConfig,
}

/// An exclusive flock held until drop.
struct Lock(fs::File);

impl Lock {
    fn take(path: &Path) -> Result<Lock> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| IdmapError::Io {
                context: "open lock",
                path: path.into(),
                source,
            })?;
        loop {
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Lock(f));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(IdmapError::Io {
                    context: "flock",
                    path: path.into(),
                    source: e,
                });
            }
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: unlock an fd we own (closing would release it too).
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn check_pod_id(id: &str) -> Result<()> {
    let bad = |msg: &str| {
        Err(IdmapError::InvalidPodId {
            id: id.into(),
            msg: msg.into(),
        })
    };
    if id.is_empty() {
        return bad("empty");
    }
    if id.len() > 1024 {
        return bad("longer than 1024 bytes");
    }
    if id.chars().any(char::is_control) {
        return bad("contains a control character");
    }
    Ok(())
}

impl IdAllocator {
    /// Validate the pool and create the state dir.
    pub fn new(state_dir: impl Into<PathBuf>, pool: PoolConfig) -> Result<Self> {
        pool.validate()?;
        let dir = state_dir.into();
        fs::create_dir_all(&dir).map_err(|source| IdmapError::Io {
            context: "mkdir",
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir, pool })
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    fn locked<T>(&self, f: impl FnOnce(&mut StateFile) -> Result<(T, bool)>) -> Result<T> {
        let _lock = Lock::take(&self.dir.join(LOCK_FILE))?;
        let path = self.state_path();
        let mut state = match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| IdmapError::Corrupt {
                path: path.clone(),
                msg: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile::default(),
            Err(source) => {
                return Err(IdmapError::Io {
                    context: "read",
                    path,
                    source,
                })
            }
        };
        let (out, dirty) = f(&mut state)?;
        if dirty {
            self.save(&state)?;
        }
        Ok(out)
    }

    /// Write to a temp file, fsync, rename: a crash leaves the old or the new file.
    fn save(&self, state: &StateFile) -> Result<()> {
        let path = self.state_path();
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let io = |context, source| IdmapError::Io {
            context,
            path: tmp.clone(),
            source,
        };
        let data = serde_json::to_vec_pretty(state).map_err(|e| IdmapError::Corrupt {
            path: path.clone(),
            msg: format!("serialize: {e}"),
        })?;
        let mut f = fs::File::create(&tmp).map_err(|e| io("create", e))?;
        f.write_all(&data).map_err(|e| io("write", e))?;
        f.sync_all().map_err(|e| io("fsync", e))?;
        fs::rename(&tmp, &path).map_err(|source| IdmapError::Io {
            context: "rename to",
            path,
            source,
        })
    }

    /// The range of `pod_id`: the one it already holds, else the lowest free range of the pool.
    pub fn allocate(&self, pod_id: &str) -> Result<IdRange> {
        check_pod_id(pod_id)?;
        let pool = self.pool;
        self.locked(|st| {
            if let Some(r) = st.allocations.get(pod_id) {
                return Ok((*r, false));
            }
            for i in 0..pool.ranges() {
                let cand = IdRange {
                    start: pool.start + i * RANGE_SIZE,
                    size: RANGE_SIZE,
                };
                // ranges held under an older pool configuration still count
                if st.allocations.values().all(|r| !r.overlaps(&cand)) {
                    st.allocations.insert(pod_id.to_string(), cand);
                    return Ok((cand, true));
                }
            }
            Err(IdmapError::Exhausted {
                pool: pool.name(),
                count: pool.ranges(),
            })
        })
    }

    /// The range `pod_id` holds, if any.
    #[cfg_attr(not(test), allow(dead_code))] // used by tests
    pub fn get(&self, pod_id: &str) -> Result<Option<IdRange>> {
        self.locked(|st| Ok((st.allocations.get(pod_id).copied(), false)))
    }

    /// Give the range of `pod_id` back. Returns whether it held one (releasing twice is fine).
    pub fn release(&self, pod_id: &str) -> Result<bool> {
        self.locked(|st| {
            let had = st.allocations.remove(pod_id).is_some();
            Ok((had, had))
        })
    }

    /// All allocations (pod id -> range).
    #[cfg_attr(not(test), allow(dead_code))] // used by tests
    pub fn allocations(&self) -> Result<BTreeMap<String, IdRange>> {
        self.locked(|st| Ok((st.allocations.clone(), false)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHILD_DIR_ENV: &str = "TANDEM_IDMAP_TEST_CHILD_DIR";
    const CHILD_PREFIX_ENV: &str = "TANDEM_IDMAP_TEST_CHILD_PREFIX";

    fn pool(n: u32) -> PoolConfig {
        PoolConfig {
            start: 100_000,
            size: n * RANGE_SIZE,
            allow_host_ids: false,
        }
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "tandem-idmap-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn assert_disjoint(m: &BTreeMap<String, IdRange>) {
        let v: Vec<_> = m.iter().collect();
        for (i, (a, ra)) in v.iter().enumerate() {
            for (b, rb) in &v[i + 1..] {
                assert!(!ra.overlaps(rb), "{a} {ra:?} overlaps {b} {rb:?}");
            }
        }
    }

    #[test]
    fn pool_validation() {
        assert!(PoolConfig::default().validate().is_ok());
        let e = PoolConfig {
            start: 1000,
            size: RANGE_SIZE,
            allow_host_ids: false,
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("1000-66536") && e.contains("below 65536"), "{e}");
        assert!(PoolConfig {
            start: 1000,
            size: RANGE_SIZE,
            allow_host_ids: true
        }
        .validate()
        .is_ok());
        let e = PoolConfig {
            start: 100_000,
            size: 1000,
            allow_host_ids: false,
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("size 1000") && e.contains("multiple"), "{e}");
        assert!(pool(0).validate().is_err());
        let e = PoolConfig {
            start: u32::MAX - RANGE_SIZE,
            size: 2 * RANGE_SIZE,
            allow_host_ids: false,
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("exceeds"), "{e}");
        let d = tmpdir("invalid");
        assert!(IdAllocator::new(&d, pool(0)).is_err());
        assert!(!d.exists(), "an invalid pool must not create the state dir");
    }

    #[test]
    fn allocate_is_idempotent_release_and_reuse() {
        let d = tmpdir("basic");
        let a = IdAllocator::new(&d, pool(3)).unwrap();
        let r1 = a.allocate("pod-a").unwrap();
        assert_eq!(
            r1,
            IdRange {
                start: 100_000,
                size: RANGE_SIZE
            }
        );
        assert_eq!(a.allocate("pod-a").unwrap(), r1);
        let r2 = a.allocate("pod-b").unwrap();
        assert_eq!(r2.start, 100_000 + RANGE_SIZE);
        // a second allocator (a restarted shim) sees the same state on disk
        let b = IdAllocator::new(&d, pool(3)).unwrap();
        assert_eq!(b.get("pod-a").unwrap(), Some(r1));
        assert_eq!(b.allocate("pod-b").unwrap(), r2);
        assert!(b.release("pod-a").unwrap());
        assert!(!b.release("pod-a").unwrap());
        assert_eq!(a.get("pod-a").unwrap(), None);
        // the freed range is reused
        assert_eq!(a.allocate("pod-c").unwrap(), r1);
        let on_disk: serde_json::Value =
            serde_json::from_slice(&fs::read(d.join(STATE_FILE)).unwrap()).unwrap();
        assert_eq!(on_disk["allocations"]["pod-c"]["start"], 100_000);
        assert_eq!(on_disk["allocations"]["pod-b"]["start"], 100_000 + 65536);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn exhausted_pool_names_pool_and_count() {
        let d = tmpdir("exhaust");
        let a = IdAllocator::new(&d, pool(2)).unwrap();
        a.allocate("p1").unwrap();
        a.allocate("p2").unwrap();
        let e = a.allocate("p3").unwrap_err().to_string();
        assert!(
            e.contains("pool 100000-231072") && e.contains("all 2 ranges"),
            "{e}"
        );
        // nothing recorded for the failed pod; releasing one makes room
        assert_eq!(a.get("p3").unwrap(), None);
        a.release("p1").unwrap();
        assert_eq!(a.allocate("p3").unwrap().start, 100_000);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn ranges_held_under_an_old_pool_are_respected() {
        let d = tmpdir("repool");
        let old = IdAllocator::new(&d, pool(4)).unwrap();
        old.allocate("x").unwrap();
        let r = old.allocate("y").unwrap();
        old.release("x").unwrap();
        // the new pool starts inside y's range
        let new = IdAllocator::new(
            &d,
            PoolConfig {
                start: r.start,
                size: 2 * RANGE_SIZE,
                allow_host_ids: false,
            },
        )
        .unwrap();
        let z = new.allocate("z").unwrap();
        assert!(!z.overlaps(&r), "{z:?} overlaps {r:?}");
        assert_eq!(z.start, r.start + RANGE_SIZE);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_pod_id_and_corrupt_state() {
        let d = tmpdir("corrupt");
        let a = IdAllocator::new(&d, pool(1)).unwrap();
        assert!(a.allocate("").unwrap_err().to_string().contains("empty"));
        assert!(a.allocate("a\nb").is_err());
        fs::write(d.join(STATE_FILE), b"{not json").unwrap();
        let e = a.allocate("p").unwrap_err().to_string();
        assert!(e.contains(STATE_FILE), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn concurrent_threads_get_disjoint_ranges() {
        let d = tmpdir("threads");
        let a = IdAllocator::new(&d, pool(64)).unwrap();
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let a = a.clone();
                std::thread::spawn(move || {
                    (0..5)
                        .map(|i| {
                            let id = format!("t{t}-{i}");
                            (id.clone(), a.allocate(&id).unwrap())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut got = BTreeMap::new();
        for h in handles {
            for (id, r) in h.join().unwrap() {
                got.insert(id, r);
            }
        }
        assert_eq!(got.len(), 40);
        assert_disjoint(&got);
        assert_eq!(a.allocations().unwrap(), got);
        fs::remove_dir_all(&d).unwrap();
    }

    /// Run by `concurrent_processes_get_disjoint_ranges` in child processes (a no-op otherwise).
    #[test]
    fn child_process_allocates() {
        let (Ok(dir), Ok(prefix)) = (
            std::env::var(CHILD_DIR_ENV),
            std::env::var(CHILD_PREFIX_ENV),
        ) else {
            return;
        };
        let a = IdAllocator::new(dir, pool(64)).unwrap();
        for i in 0..6 {
            let id = format!("{prefix}-{i}");
            let r = a.allocate(&id).unwrap();
            // idempotent from another process's point of view as well
            assert_eq!(a.allocate(&id).unwrap(), r);
        }
    }

    #[test]
    fn concurrent_processes_get_disjoint_ranges() {
        let d = tmpdir("procs");
        fs::create_dir_all(&d).unwrap();
        let exe = std::env::current_exe().unwrap();
        // the test's own path, whatever module this file is mounted as
        let name = module_path!()
            .split_once("::")
            .map_or("", |(_, rest)| rest)
            .to_string();
        let test = if name.is_empty() {
            "child_process_allocates".to_string()
        } else {
            format!("{name}::child_process_allocates")
        };
        // start all children, then wait: they race for the lock
        let kids: Vec<_> = (0..6)
            .map(|p| {
                std::process::Command::new(&exe)
                    .args([test.as_str(), "--exact", "--test-threads", "1"])
                    .env(CHILD_DIR_ENV, &d)
                    .env(CHILD_PREFIX_ENV, format!("par{p}"))
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for k in kids {
            let out = k.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{text}");
            assert!(text.contains("1 passed"), "child ran no test: {text}");
        }
        let a = IdAllocator::new(&d, pool(64)).unwrap();
        let all = a.allocations().unwrap();
        assert_eq!(all.len(), 36, "{all:?}");
        assert_disjoint(&all);
        fs::remove_dir_all(&d).unwrap();
    }
}
