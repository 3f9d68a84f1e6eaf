//! The shim's own configuration: a TOML file named by the runtime options containerd passes
//! with CreateTask (`ConfigPath`), else `/etc/tandem/tandem.toml` when it exists, else the
//! defaults. Unknown keys are rejected so that a typo does not silently fall back.
//!
//! Pod annotations under [`ANNOTATION_PREFIX`] are requests to reconfigure the runtime for one
//! pod. Pod specs are untrusted, so the handler's config decides which of them a pod may use
//! (`[annotations] allow`, glob patterns with a trailing `*`); every other one fails the pod at
//! Create with an error naming the annotation and the config file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The file read when the runtime options name none.
pub const DEFAULT_PATH: &str = "/etc/tandem/tandem.toml";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {msg}")]
    Parse { path: PathBuf, msg: String },
    #[error("pod annotation {key}={value:?} is not allowed by the handler config {config} ([annotations] allow = {allow:?})")]
    AnnotationRefused {
        key: String,
        value: String,
        config: String,
        allow: Vec<String>,
    },
    #[error("pod annotation {key}: tandem knows no such annotation (known: {known:?})")]
    AnnotationUnknown { key: String, known: Vec<String> },
}

/// Annotations under this prefix address tandem itself.
pub const ANNOTATION_PREFIX: &str = "io.tandem.";

/// The per-pod annotations tandem honours (when the handler config allows them). None yet: the
/// mechanism is in place so that none is honoured by accident when the first one lands.
pub const KNOWN_ANNOTATIONS: &[&str] = &[];

/// How the pod's containers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Namespaced Linux containers on the host (the oci engine).
    Container,
    /// One VM per pod; its containers run inside it, by the guest agent (`[vm]`).
    Vm,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Container => f.write_str("container"),
            Mode::Vm => f.write_str("vm"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_mode")]
    pub mode: Mode,
    #[serde(default)]
    pub annotations: Annotations,
    /// `[userns]`: user namespaces per pod (docs/userns.md).
    #[serde(default)]
    pub userns: Userns,
    /// `[vm]`: how VM-mode pods are booted (read only with `mode = "vm"`).
    #[serde(default)]
    pub vm: VmSection,
    /// Where the config was read from (for error messages); not a key of the file.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[annotations]`: which `io.tandem.*` pod annotations this handler lets pods use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Annotations {
    /// Exact keys, or prefixes ending in `*`. Empty (the default): no pod may reconfigure.
    #[serde(default)]
    pub allow: Vec<String>,
}

/// Hypervisor backend of VM mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hypervisor {
    /// QEMU (`qemu-system-x86_64`), KVM or TCG.
    Qemu,
}

/// Accelerator of the QEMU backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when the host can boot a stock guest on it, else TCG.
    Auto,
    Kvm,
    Tcg,
}

/// Where vmm/guest/build.sh puts the guest image by default (`<repo>/.tandem-build/guest` is
/// where the build leaves it; deploy/setup.sh installs it here).
pub const DEFAULT_GUEST_DIR: &str = "/usr/share/tandem/guest";

/// `[vm]`: the VM of a VM-mode pod.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSection {
    #[serde(default = "default_hypervisor")]
    pub hypervisor: Hypervisor,
    #[serde(default = "default_accel")]
    pub accel: Accel,
    /// The QEMU binary (a name is looked up on PATH).
    #[serde(default = "default_qemu")]
    pub qemu: PathBuf,
    /// Guest kernel; a missing file fails the pod at Create, naming this path.
    #[serde(default = "default_kernel")]
    pub kernel: PathBuf,
    /// Guest initramfs with the agent as /init.
    #[serde(default = "default_initrd")]
    pub initrd: PathBuf,
    /// vCPUs when the pod's spec names neither a CPU limit nor a cpuset.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Guest memory in MiB when the pod's spec has no memory limit.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Least guest memory in MiB (kernel + agent + the containers' writable layers).
    #[serde(default = "default_min_memory_mib")]
    pub min_memory_mib: u64,
    /// Added to the pod's memory limit for the guest kernel and agent.
    #[serde(default = "default_overhead_mib")]
    pub overhead_mib: u64,
    /// Seconds from VM start until the agent must answer.
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout_s: u64,
    /// Seconds every other agent call may take.
    #[serde(default = "default_call_timeout")]
    pub call_timeout_s: u64,
    /// Where per-layer erofs images are cached.
    #[serde(default = "default_layer_cache")]
    pub layer_cache: PathBuf,
    /// Size bound of `layer_cache` in MiB: at pod delete the least recently used images that no
    /// running VM (of any shim) has attached are removed until the cache fits. 0: unbounded.
    #[serde(default = "default_layer_cache_max_mb")]
    pub layer_cache_max_mb: u64,
    /// Where each pod's VM keeps its sockets, console log and disk images.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// Most vCPUs a pod's VM grows to through hot-plug (vCPUs = base + the containers'
    /// ceil(quota/period)); 0: the host's online CPU count. Requests above are capped, logged.
    #[serde(default)]
    pub max_vcpus: u32,
    /// Most guest memory in MiB a pod's VM grows to through hot-plug (memory = base + the
    /// containers' limits; never shrunk); 0: the host's RAM (MemTotal). Capped, logged.
    #[serde(default)]
    pub max_memory_mib: u64,
}

fn default_hypervisor() -> Hypervisor {
    Hypervisor::Qemu
}
fn default_accel() -> Accel {
    Accel::Auto
}
fn default_qemu() -> PathBuf {
    PathBuf::from("/usr/bin/qemu-system-x86_64")
}
fn default_kernel() -> PathBuf {
    Path::new(DEFAULT_GUEST_DIR).join("vmlinuz")
}
fn default_initrd() -> PathBuf {
    Path::new(DEFAULT_GUEST_DIR).join("initramfs.cpio.gz")
}
fn default_vcpus() -> u32 {
    1
}
fn default_memory_mib() -> u64 {
    512
}
fn default_min_memory_mib() -> u64 {
    256
}
fn default_overhead_mib() -> u64 {
    128
}
fn default_boot_timeout() -> u64 {
    60
}
fn default_call_timeout() -> u64 {
    10
}
fn default_layer_cache() -> PathBuf {
    PathBuf::from("/var/lib/tandem/layers")
}
fn default_layer_cache_max_mb() -> u64 {
    4096
}
fn default_run_dir() -> PathBuf {
    PathBuf::from("/run/tandem-vm")
}

impl Default for VmSection {
    fn default() -> Self {
        VmSection {
            hypervisor: default_hypervisor(),
            accel: default_accel(),
            qemu: default_qemu(),
            kernel: default_kernel(),
            initrd: default_initrd(),
            vcpus: default_vcpus(),
            memory_mib: default_memory_mib(),
            min_memory_mib: default_min_memory_mib(),
            overhead_mib: default_overhead_mib(),
            boot_timeout_s: default_boot_timeout(),
            call_timeout_s: default_call_timeout(),
            layer_cache: default_layer_cache(),
            layer_cache_max_mb: default_layer_cache_max_mb(),
            run_dir: default_run_dir(),
            max_vcpus: 0,
            max_memory_mib: 0,
        }
    }
}

/// `[userns] mode`: whether pods get their own user namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UsernsMode {
    /// Containers run in the host user namespace unless their spec asks for one.
    #[default]
    Off,
    /// Every pod gets a user namespace with its own 65536 host UIDs and GIDs from the pool.
    Pod,
}

/// `[userns]`: user namespaces per pod and the host ID pool their ranges come from. The pool
/// is checked at load: size a positive multiple of 65536, no ID past 4294967294, no ID below
/// 65536 (host users) unless `allow_host_ids`, no overlap with /etc/subuid or /etc/subgid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Userns {
    #[serde(default)]
    pub mode: UsernsMode,
    /// First host ID of the pool.
    #[serde(default = "default_pool_start")]
    pub pool_start: u32,
    /// IDs in the pool: a multiple of 65536 (one range per pod).
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Let the pool start below 65536.
    #[serde(default)]
    pub allow_host_ids: bool,
}

fn default_pool_start() -> u32 {
    crate::idmap::PoolConfig::default().start
}
fn default_pool_size() -> u32 {
    crate::idmap::PoolConfig::default().size
}

impl Default for Userns {
    fn default() -> Self {
        Userns {
            mode: UsernsMode::Off,
            pool_start: default_pool_start(),
            pool_size: default_pool_size(),
            allow_host_ids: false,
        }
    }
}

impl Userns {
    pub fn pool(&self) -> crate::idmap::PoolConfig {
        crate::idmap::PoolConfig {
            start: self.pool_start,
            size: self.pool_size,
            allow_host_ids: self.allow_host_ids,
        }
    }
}

fn default_mode() -> Mode {
    Mode::Container
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: default_mode(),
            annotations: Annotations::default(),
            userns: Userns::default(),
            vm: VmSection::default(),
            source: None,
        }
    }
}

impl Config {
    /// Parse TOML text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, Error> {
        let mut c: Config = toml::from_str(text).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            msg: e.message().to_string()
                + &e.span()
                    .map(|s| {
                        let line = text[..s.start].matches('\n').count() + 1;
                        format!(" (line {line})")
                    })
                    .unwrap_or_default(),
        })?;
        crate::userns::validate_pool(&c.userns.pool()).map_err(|msg| Error::Parse {
            path: path.to_path_buf(),
            msg,
        })?;
        c.source = Some(path.to_path_buf());
        Ok(c)
    }

    /// Refuse every `io.tandem.*` annotation the handler config does not allow, or that tandem
    /// does not know. Other annotations (Kubernetes', CRI's) are not ours to judge.
    pub fn check_annotations<'a>(
        &self,
        annotations: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<(), Error> {
        let mut keys: Vec<_> = annotations
            .into_iter()
            .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
            .collect();
        keys.sort();
        for (key, value) in keys {
            let allowed = self
                .annotations
                .allow
                .iter()
                .any(|p| match p.strip_suffix('*') {
                    Some(prefix) => key.starts_with(prefix),
                    None => key == p,
                });
            if !allowed {
                return Err(Error::AnnotationRefused {
                    key: key.clone(),
                    value: value.clone(),
                    config: self
                        .source
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "(defaults: no config file)".into()),
                    allow: self.annotations.allow.clone(),
                });
            }
            if !KNOWN_ANNOTATIONS.contains(&key.as_str()) {
                return Err(Error::AnnotationUnknown {
                    key: key.clone(),
                    known: KNOWN_ANNOTATIONS.iter().map(|s| s.to_string()).collect(),
                });
            }
        }
        Ok(())
    }

    /// Read `path` (which must exist), or the default file when it exists, or the defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, Error> {
        Self::load_with_default(path, Path::new(DEFAULT_PATH))
    }

    fn load_with_default(path: Option<&Path>, default: &Path) -> Result<Config, Error> {
        let path = match path {
            Some(p) => p,
            None if default.exists() => default,
            None => return Ok(Config::default()),
        };
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", Path::new("t.toml")).unwrap();
        assert_eq!(c.annotations, Annotations::default());
        assert_eq!(c.source.as_deref(), Some(Path::new("t.toml")));
        assert_eq!(c.mode, Mode::Container);
    }

    #[test]
    fn mode_container() {
        let c = Config::parse("mode = \"container\"\n", Path::new("t.toml")).unwrap();
        assert_eq!(c.mode, Mode::Container);
    }

    #[test]
    fn unknown_mode_names_value_and_file() {
        let e = Config::parse("mode = \"vmx\"\n", Path::new("/x/t.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/x/t.toml"), "{e}");
        assert!(e.contains("vmx"), "{e}");
    }

    #[test]
    fn vm_section() {
        let c = Config::parse(
            "mode = \"vm\"\n[vm]\naccel = \"tcg\"\nkernel = \"/k\"\nvcpus = 2\nmemory_mib = 300\nmax_vcpus = 6\nmax_memory_mib = 8192\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Vm);
        assert_eq!(c.vm.accel, Accel::Tcg);
        assert_eq!(c.vm.kernel, Path::new("/k"));
        assert_eq!(c.vm.vcpus, 2);
        assert_eq!(c.vm.memory_mib, 300);
        assert_eq!((c.vm.max_vcpus, c.vm.max_memory_mib), (6, 8192));
        assert_eq!(VmSection::default().max_vcpus, 0, "0: the host's CPUs");
        assert_eq!(c.vm.initrd, VmSection::default().initrd);
        assert_eq!(c.vm.hypervisor, Hypervisor::Qemu);
        let e = Config::parse("[vm]\naccel = \"hvf\"\n", Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("hvf"), "{e}");
        let e = Config::parse("[vm]\nkernal = \"/k\"\n", Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("kernal"), "{e}");
    }

    #[test]
    fn userns_section() {
        let c = Config::parse("", Path::new("t.toml")).unwrap();
        assert_eq!(c.userns.mode, UsernsMode::Off);
        assert_eq!(c.userns.pool(), crate::idmap::PoolConfig::default());
        let c = Config::parse(
            "[userns]\nmode = \"pod\"\npool_start = 1000000\npool_size = 131072\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.userns.mode, UsernsMode::Pod);
        assert_eq!(c.userns.pool().ranges(), 2);
        for (bad, want) in [
            ("pool_size = 1000\n", "multiple of 65536"),
            ("pool_start = 0\n", "below 65536"),
            ("pool_start = 4294000000\n", "exceeds"),
            ("mode = \"host\"\n", "host"),
            ("pool = 1\n", "pool"),
        ] {
            let e = Config::parse(&format!("[userns]\n{bad}"), Path::new("/x/t.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("/x/t.toml") && e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn deploy_vm_config_parses() {
        let text = include_str!("../../deploy/tandem-vm.toml");
        let c = Config::parse(text, Path::new("deploy/tandem-vm.toml")).unwrap();
        assert_eq!(c.mode, Mode::Vm);
        assert_eq!(c.vm, VmSection::default());
    }

    #[test]
    fn unknown_key_is_rejected() {
        let e = Config::parse("mode = \"container\"\nfoo = 1\n", Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("foo"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    fn ann(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn annotations_refused_unless_allowed() {
        let c = Config::parse("mode = \"container\"\n", Path::new("/etc/t.toml")).unwrap();
        // Kubernetes' and CRI's own annotations are not ours to judge.
        let a = ann(&[("io.kubernetes.cri.sandbox-id", "x"), ("foo", "bar")]);
        c.check_annotations(a.iter().map(|(k, v)| (k, v))).unwrap();
        let a = ann(&[("io.tandem.mode", "vm")]);
        let e = c
            .check_annotations(a.iter().map(|(k, v)| (k, v)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("io.tandem.mode") && e.contains("not allowed"),
            "{e}"
        );
        assert!(e.contains("/etc/t.toml"), "{e}");
    }

    #[test]
    fn allowed_annotations_must_still_be_known() {
        let c = Config::parse(
            "[annotations]\nallow = [\"io.tandem.*\"]\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.annotations.allow, vec!["io.tandem.*".to_string()]);
        let a = ann(&[("io.tandem.bogus", "1")]);
        let e = c
            .check_annotations(a.iter().map(|(k, v)| (k, v)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("io.tandem.bogus") && e.contains("no such"),
            "{e}"
        );
        let e = Config::parse("[annotations]\ndeny = []\n", Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("deny"), "{e}");
    }

    #[test]
    fn load_order() {
        let dir = tempfile::tempdir().unwrap();
        let missing_default = dir.path().join("none.toml");
        // no path, no default file: defaults
        assert_eq!(
            Config::load_with_default(None, &missing_default).unwrap(),
            Config::default()
        );
        // default file exists and is read
        let def = dir.path().join("default.toml");
        std::fs::write(&def, "bogus = true\n").unwrap();
        assert!(Config::load_with_default(None, &def).is_err());
        // an explicit path wins and must exist
        let p = dir.path().join("given.toml");
        std::fs::write(&p, "mode = \"container\"\n").unwrap();
        assert_eq!(
            Config::load_with_default(Some(&p), &def).unwrap().mode,
            Mode::Container
        );
        let e = Config::load_with_default(Some(&dir.path().join("nope.toml")), &def)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.toml"), "{e}");
    }
}
