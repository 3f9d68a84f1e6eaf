//! On-disk container state: `<state_root>/<id>/state.json`, written before any host resource
//! is made and updated as the container comes up.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub const STATE_FILE: &str = "state.json";
pub const EXEC_FIFO: &str = "exec.fifo";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// Host pid of the container's init; 0 while it is being made.
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat`, to tell a reused pid from ours.
    pub pid_start_time: u64,
    /// The cgroup root used and the relative path of the container's cgroup.
    pub cgroup_root: PathBuf,
    pub cgroup_rel: String,
    /// Every cgroup directory made for the container (one per hierarchy).
    pub cgroup_dirs: Vec<PathBuf>,
    /// Unix seconds of creation.
    pub created: u64,
    pub spec: Spec,
}

impl State {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// Write atomically (temp file + rename).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let tmp = dir.join(".state.json.tmp");
        let data = serde_json::to_vec(self).map_err(|e| Error::Container {
            id: self.id.clone(),
            msg: format!("serialize state: {e}"),
        })?;
        let io = |context: String| move |source| Error::Io { context, source };
        let mut f = fs::File::create(&tmp).map_err(io(format!("create {}", tmp.display())))?;
        f.write_all(&data)
            .and_then(|_| f.sync_all())
            .map_err(io(format!("write {}", tmp.display())))?;
        fs::rename(&tmp, Self::path(dir)).map_err(io(format!(
            "rename {} to {}",
            tmp.display(),
            Self::path(dir).display()
        )))
    }

    pub fn load(dir: &Path, id: &str) -> Result<State> {
        let p = Self::path(dir);
        let data = match fs::read(&p) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(id.to_string()))
            }
            Err(source) => {
                return Err(Error::Io {
                    context: format!("read {}", p.display()),
                    source,
                })
            }
        };
        serde_json::from_slice(&data).map_err(|e| Error::Container {
            id: id.to_string(),
            msg: format!("{}: {e}", p.display()),
        })
    }
}

/// Start time (field 22 of `/proc/<pid>/stat`) and state letter of a process, if it exists.
pub fn proc_start_time(pid: i32) -> Option<(u64, char)> {
    if pid <= 0 {
        return None;
    }
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may hold spaces and parens: fields start after the last ')'
    let rest = &s[s.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field 22 is index 19
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, state))
}

/// Whether `pid` is still the process that had `start_time` and is not a zombie.
pub fn is_alive(pid: i32, start_time: u64) -> bool {
    matches!(proc_start_time(pid), Some((st, state)) if st == start_time && state != 'Z' && state != 'X')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip() {
        let t = tempfile::tempdir().unwrap();
        let spec: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}}}"#,
        )
        .unwrap();
        let st = State {
            id: "c1".into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            pid: 42,
            pid_start_time: 777,
            cgroup_root: "/sys/fs/cgroup".into(),
            cgroup_rel: "default/c1".into(),
            cgroup_dirs: vec!["/sys/fs/cgroup/memory/default/c1".into()],
            created: 1,
            spec,
        };
        st.save(t.path()).unwrap();
        let back = State::load(t.path(), "c1").unwrap();
        assert_eq!(back.pid, 42);
        assert_eq!(back.pid_start_time, 777);
        assert_eq!(back.cgroup_dirs, st.cgroup_dirs);
        assert_eq!(back.spec, st.spec);
        assert!(matches!(
            State::load(&t.path().join("x"), "x"),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn own_start_time_and_liveness() {
        let me = std::process::id() as i32;
        let (st, state) = proc_start_time(me).unwrap();
        assert!(st > 0);
        assert_ne!(state, 'Z');
        assert!(is_alive(me, st));
        assert!(!is_alive(me, st + 1));
        assert!(!is_alive(0, 0));
    }
}
