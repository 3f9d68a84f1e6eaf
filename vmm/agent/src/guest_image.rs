//! The guest image for tests and benchmarks on the host: runs `vmm/guest/build.sh` (which
//! caches the kernel, the static agent and the initramfs) and reads what it printed.
//!
//! One place for what every VM test needs: the nested cargo build of the agent gets only the
//! environment it needs (cargo's per-test variables would make it rebuild the agent every
//! time) and its own target dir (`TANDEM_AGENT_TARGET_DIR`, default `<repo>/target-agent`: the
//! agent is a static build, kept apart from the caller's).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// Kernel, initramfs and the kernel's release, as build.sh printed them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub release: String,
}

/// Builds (or reuses the cache of) the guest image of the repository at `repo_root`;
/// `no_agent` builds the variant whose /init is busybox sh and never answers. Calls in one
/// process are serialised (build.sh writes one cache).
pub fn build(repo_root: &Path, no_agent: bool) -> Result<GuestImage, String> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _serial = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let script = repo_root.join("vmm/guest/build.sh");
    let mut cmd = Command::new(&script);
    cmd.env_clear();
    for (k, v) in std::env::vars_os() {
        let ks = k.to_string_lossy();
        let keep = matches!(
            ks.as_ref(),
            "PATH" | "HOME" | "CARGO_HOME" | "RUSTUP_HOME" | "RUSTUP_TOOLCHAIN" | "TMPDIR"
        ) || ks.starts_with("TANDEM_")
            || ks.starts_with("http")
            || ks.starts_with("HTTP");
        if keep {
            cmd.env(k, v);
        }
    }
    cmd.env(
        "CARGO_TARGET_DIR",
        std::env::var_os("TANDEM_AGENT_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root.join("target-agent")),
    );
    if no_agent {
        cmd.env("TANDEM_GUEST_NO_AGENT", "1");
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed: {}", script.display(), out.status));
    }
    parse(&String::from_utf8_lossy(&out.stdout)).map_err(|e| format!("{}: {e}", script.display()))
}

/// Reads build.sh's `KERNEL=`, `INITRD=` and `KERNEL_RELEASE=` lines.
fn parse(text: &str) -> Result<GuestImage, String> {
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(str::to_string)
            .ok_or_else(|| format!("printed no {k}= line: {text:?}"))
    };
    Ok(GuestImage {
        kernel: get("KERNEL")?.into(),
        initrd: get("INITRD")?.into(),
        release: get("KERNEL_RELEASE")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_build_sh_output_and_names_a_missing_line() {
        let g = parse("KERNEL=/k\nINITRD=/i\nKERNEL_RELEASE=6.1.0-56-cloud-amd64\n").unwrap();
        assert_eq!(g.kernel, PathBuf::from("/k"));
        assert_eq!(g.initrd, PathBuf::from("/i"));
        assert_eq!(g.release, "6.1.0-56-cloud-amd64");
        let e = parse("KERNEL=/k\nKERNEL_RELEASE=x\n").unwrap_err();
        assert!(e.contains("INITRD="), "{e}");
    }
}
