//! What the shim made for a container, on disk, written BEFORE it is made, so that
//! `containerd-shim-tandem-v2 … delete` after a `kill -9` of the shim can undo it all:
//! `<root>/<namespace>/<id>.json`. The engine keeps its own state beside it, under
//! `<root>/<namespace>/engine/<id>/`.

use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Root of all tandem shim state.
pub const ROOT: &str = "/run/containerd-tandem";

#[derive(Debug, thiserror::Error)]
#[error("state {path}: {msg}")]
pub struct Error {
    pub path: PathBuf,
    pub msg: String,
}

/// One rootfs mount as containerd handed it over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// The record of one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub bundle: PathBuf,
    /// Where containerd's rootfs mounts go (`<bundle>/rootfs`) when there are any.
    pub rootfs_target: Option<PathBuf>,
    pub mounts: Vec<MountRecord>,
    /// Host pid of the container's init once known (0 before).
    pub pid: i32,
}

/// The state directory of one containerd namespace.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(root: &Path, namespace: &str) -> StateDir {
        StateDir {
            dir: root.join(namespace),
        }
    }

    /// Where the engine keeps its containers for this namespace.
    pub fn engine_root(&self) -> PathBuf {
        self.dir.join("engine")
    }

    pub fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Write the record atomically (temp file, fsync, rename).
    pub fn save(&self, r: &Record) -> Result<(), Error> {
        let path = self.path(&r.id);
        let err = |msg: String| Error {
            path: path.clone(),
            msg,
        };
        fs::create_dir_all(&self.dir).map_err(|e| err(format!("mkdir: {e}")))?;
        let tmp = self.dir.join(format!(".{}.json.tmp", r.id));
        let data = serde_json::to_vec(r).map_err(|e| err(format!("serialize: {e}")))?;
        let mut f = fs::File::create(&tmp).map_err(|e| err(format!("create temp: {e}")))?;
        f.write_all(&data)
            .and_then(|_| f.sync_all())
            .map_err(|e| err(format!("write: {e}")))?;
        fs::rename(&tmp, &path).map_err(|e| err(format!("rename: {e}")))
    }

    /// The record of `id`, `None` when there is none.
    pub fn load(&self, id: &str) -> Result<Option<Record>, Error> {
        let path = self.path(id);
        match fs::read(&path) {
            Ok(data) => serde_json::from_slice(&data).map(Some).map_err(|e| Error {
                path,
                msg: format!("parse: {e}"),
            }),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error {
                path,
                msg: format!("read: {e}"),
            }),
        }
    }

    pub fn remove(&self, id: &str) -> Result<(), Error> {
        let path = self.path(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error {
                path,
                msg: format!("remove: {e}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let s = StateDir::new(tmp.path(), "k8s.io");
        assert_eq!(s.load("c1").unwrap(), None);
        let r = Record {
            id: "c1".into(),
            bundle: "/b/c1".into(),
            rootfs_target: Some("/b/c1/rootfs".into()),
            mounts: vec![MountRecord {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec!["lowerdir=/a:/b".into(), "upperdir=/u".into()],
            }],
            pid: 0,
        };
        s.save(&r).unwrap();
        assert_eq!(s.load("c1").unwrap(), Some(r.clone()));
        let r2 = Record { pid: 1234, ..r };
        s.save(&r2).unwrap();
        assert_eq!(s.load("c1").unwrap().unwrap().pid, 1234);
        assert_eq!(s.path("c1"), tmp.path().join("k8s.io/c1.json"));
        assert_eq!(s.engine_root(), tmp.path().join("k8s.io/engine"));
        s.remove("c1").unwrap();
        assert_eq!(s.load("c1").unwrap(), None);
        s.remove("c1").unwrap();
    }

    #[test]
    fn corrupt_record_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let s = StateDir::new(tmp.path(), "default");
        std::fs::create_dir_all(tmp.path().join("default")).unwrap();
        std::fs::write(s.path("x"), b"{not json").unwrap();
        let e = s.load("x").unwrap_err().to_string();
        assert!(e.contains("x.json"), "{e}");
    }
}
