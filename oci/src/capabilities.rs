//! process.capabilities -> the five capability sets (`caps` crate).

use caps::{CapSet, Capability, CapsHashSet};
use oci_spec::runtime::{Capabilities, Process};

type R<T> = std::result::Result<T, String>;

/// Convert an OCI capability set; names this `caps` crate does not know are reported by `warn`.
pub fn convert(set: &Capabilities, warn: &mut dyn FnMut(String)) -> CapsHashSet {
    let mut out = CapsHashSet::new();
    for c in set {
        let name = crate::seccomp::serde_name(c);
        match name.parse::<Capability>() {
            Ok(cap) => {
                out.insert(cap);
            }
            Err(_) => warn(format!(
                "process.capabilities: unknown capability {name} skipped"
            )),
        }
    }
    out
}

/// Drop from the bounding set every capability not listed (needs CAP_SETPCAP: run before the
/// user switch).
pub fn drop_bounding(process: &Process) -> R<()> {
    let Some(caps) = process.capabilities() else {
        return Ok(());
    };
    let keep = convert(
        caps.bounding().as_ref().unwrap_or(&Capabilities::new()),
        &mut |_| {},
    );
    for c in caps::runtime::thread_all_supported() {
        if !keep.contains(&c) {
            caps::drop(None, CapSet::Bounding, c)
                .map_err(|e| format!("process.capabilities.bounding: drop {c}: {e}"))?;
        }
    }
    Ok(())
}

/// Set effective, inheritable, permitted and ambient (after the user switch, with keepcaps).
pub fn apply(process: &Process, warn: &mut dyn FnMut(String)) -> R<()> {
    let Some(caps) = process.capabilities() else {
        return Ok(());
    };
    let empty = Capabilities::new();
    let eff = convert(caps.effective().as_ref().unwrap_or(&empty), warn);
    let inh = convert(caps.inheritable().as_ref().unwrap_or(&empty), warn);
    let perm = convert(caps.permitted().as_ref().unwrap_or(&empty), warn);
    let amb = convert(caps.ambient().as_ref().unwrap_or(&empty), warn);
    // effective first (it is checked against the current, larger permitted set)
    caps::set(None, CapSet::Effective, &eff)
        .map_err(|e| format!("process.capabilities.effective: {e}"))?;
    caps::set(None, CapSet::Inheritable, &inh)
        .map_err(|e| format!("process.capabilities.inheritable: {e}"))?;
    caps::set(None, CapSet::Permitted, &perm)
        .map_err(|e| format!("process.capabilities.permitted: {e}"))?;
    // like runc: an ambient capability that cannot be raised (not in inheritable and
    // permitted) is a warning, not an error
    for c in amb {
        if let Err(e) = caps::raise(None, CapSet::Ambient, c) {
            warn(format!("process.capabilities.ambient: raise {c}: {e}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_names() {
        let set: Capabilities =
            serde_json::from_str(r#"["CAP_CHOWN","CAP_NET_BIND_SERVICE","CAP_SYS_ADMIN"]"#)
                .unwrap();
        let mut warned = vec![];
        let c = convert(&set, &mut |w| warned.push(w));
        assert!(c.contains(&Capability::CAP_CHOWN));
        assert!(c.contains(&Capability::CAP_NET_BIND_SERVICE));
        assert!(c.contains(&Capability::CAP_SYS_ADMIN));
        assert_eq!(c.len(), 3);
        assert!(warned.is_empty());
    }
}
