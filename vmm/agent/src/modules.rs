//! Kernel modules of the initramfs: `modules.dep` (depmod's format: `path: dep-path dep-path…`,
//! dependencies direct or transitive) and `modules.load` (names to load at boot, one a line), and
//! loading with `finit_module`, dependencies first.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::{io_err, Error, Result};

/// Canonical module name of a path or name: file stem, `-` folded to `_`.
pub fn module_name(path_or_name: &str) -> String {
    let base = path_or_name.rsplit('/').next().unwrap_or(path_or_name);
    let stem = base
        .strip_suffix(".ko")
        .or_else(|| base.strip_suffix(".ko.xz"))
        .or_else(|| base.strip_suffix(".ko.zst"))
        .unwrap_or(base);
    stem.replace('-', "_")
}

/// A parsed `modules.dep`: module name → (path relative to the modules dir, dependency names).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ModulesDep {
    entries: HashMap<String, (String, Vec<String>)>,
}

impl ModulesDep {
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut entries = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (module, deps) = line.split_once(':').ok_or_else(|| Error::ModulesDep {
                path: path.to_path_buf(),
                line: i + 1,
                msg: format!("no ':' in {line:?}"),
            })?;
            let module = module.trim();
            if module.is_empty() || !module.ends_with(".ko") || module.contains("..") {
                return Err(Error::ModulesDep {
                    path: path.to_path_buf(),
                    line: i + 1,
                    msg: format!("bad module path {module:?}"),
                });
            }
            let deps = deps.split_whitespace().map(module_name).collect();
            entries.insert(module_name(module), (module.to_string(), deps));
        }
        Ok(Self { entries })
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(io_err(format!("read {}", path.display())))?;
        Self::parse(&text, path)
    }

    /// Module paths to load for `names`, each after its dependencies, each once.
    pub fn load_order(&self, names: &[String]) -> Result<Vec<String>> {
        let mut order = Vec::new();
        let mut done = HashSet::new();
        let mut on_stack = HashSet::new();
        for name in names {
            self.visit(&module_name(name), &mut order, &mut done, &mut on_stack)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        order: &mut Vec<String>,
        done: &mut HashSet<String>,
        on_stack: &mut HashSet<String>,
    ) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if !on_stack.insert(name.to_string()) {
            return Err(Error::Module {
                module: name.to_string(),
                msg: "dependency cycle in modules.dep".into(),
            });
        }
        let (path, deps) = self.entries.get(name).ok_or_else(|| Error::Module {
            module: name.to_string(),
            msg: "not in modules.dep".into(),
        })?;
        for dep in deps {
            self.visit(dep, order, done, on_stack)?;
        }
        on_stack.remove(name);
        done.insert(name.to_string());
        order.push(path.clone());
        Ok(())
    }
}

/// Names listed in a `modules.load` file (one a line, `#` comments).
pub fn parse_load_list(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(module_name)
        .collect()
}

/// Outcome of loading one module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    Loaded,
    AlreadyLoaded,
}

/// Load one module file with `finit_module`. `EEXIST` (already loaded) is not an error.
pub fn load_module(path: &Path) -> Result<Loaded> {
    let file =
        std::fs::File::open(path).map_err(io_err(format!("open module {}", path.display())))?;
    let params = c"";
    match nix::kmod::finit_module(&file, params, nix::kmod::ModuleInitFlags::empty()) {
        Ok(()) => Ok(Loaded::Loaded),
        Err(nix::errno::Errno::EEXIST) => Ok(Loaded::AlreadyLoaded),
        Err(e) => Err(Error::Module {
            module: path.display().to_string(),
            msg: format!("finit_module: {e}"),
        }),
    }
}

/// Load every module of `<dir>/modules.load` (dependencies first, from `<dir>/modules.dep`).
/// Returns the paths loaded, in order.
pub fn load_all(dir: &Path) -> Result<Vec<PathBuf>> {
    let dep = ModulesDep::read(&dir.join("modules.dep"))?;
    let list_path = dir.join("modules.load");
    let list = std::fs::read_to_string(&list_path)
        .map_err(io_err(format!("read {}", list_path.display())))?;
    let mut loaded = Vec::new();
    for rel in dep.load_order(&parse_load_list(&list))? {
        let path = dir.join(&rel);
        load_module(&path)?;
        loaded.push(path);
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/drivers/virtio/virtio_ring.ko:\n\
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko\n\
kernel/drivers/virtio/virtio_pci_modern_dev.ko:\n\
kernel/net/8021q/8021q.ko: kernel/net/802/garp.ko\n\
kernel/net/802/garp.ko: kernel/net/802/stp.ko\n\
kernel/net/802/stp.ko:\n";

    fn dep() -> ModulesDep {
        ModulesDep::parse(DEP, Path::new("modules.dep")).unwrap()
    }

    #[test]
    fn names_fold_dashes_and_suffixes() {
        assert_eq!(module_name("kernel/fs/x/vmw-vsock.ko"), "vmw_vsock");
        assert_eq!(module_name("virtio_pci"), "virtio_pci");
        assert_eq!(module_name("a/b.ko.xz"), "b");
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let order = dep()
            .load_order(&["virtio_pci".into(), "virtio".into(), "8021q".into()])
            .unwrap();
        assert_eq!(
            order,
            vec![
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
                "kernel/drivers/virtio/virtio_pci.ko",
                "kernel/net/802/stp.ko",
                "kernel/net/802/garp.ko",
                "kernel/net/8021q/8021q.ko",
            ]
        );
    }

    #[test]
    fn unknown_module_is_named() {
        let err = dep().load_order(&["erofs".into()]).unwrap_err().to_string();
        assert!(
            err.contains("erofs") && err.contains("not in modules.dep"),
            "{err}"
        );
    }

    #[test]
    fn cycle_is_an_error() {
        let d = ModulesDep::parse("a.ko: b.ko\nb.ko: a.ko\n", Path::new("m")).unwrap();
        let err = d.load_order(&["a".into()]).unwrap_err().to_string();
        assert!(err.contains("cycle"), "{err}");
    }

    #[test]
    fn malformed_line_names_line() {
        let err = ModulesDep::parse("ok.ko:\nnonsense\n", Path::new("/x/modules.dep"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/x/modules.dep") && err.contains("line 2"),
            "{err}"
        );
        let err = ModulesDep::parse("../evil.ko:\n", Path::new("m"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad module path"), "{err}");
    }

    #[test]
    fn load_list_skips_comments() {
        assert_eq!(
            parse_load_list("# x\nvirtio\n\nvmw-vsock\n"),
            vec!["virtio", "vmw_vsock"]
        );
    }

    #[test]
    fn missing_module_file_is_named() {
        let err = load_module(Path::new("/nonexistent/x.ko"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/x.ko"), "{err}");
    }
}
