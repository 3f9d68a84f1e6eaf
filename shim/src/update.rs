//! UpdateTaskRequest.resources: an `Any` whose value is the OCI `LinuxResources` as JSON.

use tandem_oci::LinuxResources;

/// Decode the resources of an update; the error names what was wrong.
pub fn decode(value: &[u8]) -> Result<LinuxResources, String> {
    if value.is_empty() {
        return Err("update: no resources given".into());
    }
    serde_json::from_slice(value)
        .map_err(|e| format!("update: resources (LinuxResources JSON): {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_limit_and_cpu_shares() {
        let r = decode(br#"{"memory":{"limit":67108864},"cpu":{"shares":512}}"#).unwrap();
        assert_eq!(r.memory().as_ref().unwrap().limit(), Some(67108864));
        assert_eq!(r.cpu().as_ref().unwrap().shares(), Some(512));
    }

    #[test]
    fn bad_json_and_empty_are_errors() {
        assert!(decode(b"").unwrap_err().contains("no resources"));
        let e = decode(br#"{"memory":{"limit":"lots"}}"#).unwrap_err();
        assert!(e.contains("LinuxResources"), "{e}");
    }
}
