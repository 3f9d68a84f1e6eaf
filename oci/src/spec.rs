//! Loading and validating `config.json`.
//!
//! The raw JSON is checked first (so that errors name the field, e.g. an unknown namespace
//! type), then parsed into oci-spec types and checked again for things the types do not express
//! (cpuset syntax, args, rootfs).

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxIdMapping, LinuxNamespaceType, Spec};
use serde_json::Value;

use crate::{Error, Result};

/// Namespace types the engine knows.
pub const NAMESPACE_TYPES: &[&str] = &[
    "pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time",
];

fn spec_err(field: impl Into<String>, msg: impl Into<String>) -> Error {
    Error::Spec {
        field: field.into(),
        msg: msg.into(),
    }
}

/// Load `<bundle>/config.json`, validate it and resolve the rootfs path.
pub fn load(bundle: &Path) -> Result<(Spec, PathBuf)> {
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Bundle {
        path: path.clone(),
        msg: format!("read: {e}"),
    })?;
    let spec = parse(&text)?;
    let rootfs = rootfs_path(bundle, &spec)?;
    Ok((spec, rootfs))
}

/// Parse and validate the text of a `config.json`.
pub fn parse(text: &str) -> Result<Spec> {
    let raw: Value = serde_json::from_str(text).map_err(|e| Error::Spec {
        field: "json".into(),
        msg: e.to_string(),
    })?;
    validate_raw(&raw)?;
    let spec: Spec = serde_json::from_value(raw).map_err(|e| spec_err("json", e.to_string()))?;
    validate(&spec)?;
    Ok(spec)
}

fn validate_raw(raw: &Value) -> Result<()> {
    if !raw.is_object() {
        return Err(spec_err("json", "top level is not an object"));
    }
    if let Some(nss) = raw.pointer("/linux/namespaces") {
        let nss = nss
            .as_array()
            .ok_or_else(|| spec_err("linux.namespaces", "not an array"))?;
        for (i, ns) in nss.iter().enumerate() {
            let typ = ns.get("type").and_then(Value::as_str).ok_or_else(|| {
                spec_err(
                    format!("linux.namespaces[{i}].type"),
                    "missing or not a string",
                )
            })?;
            if !NAMESPACE_TYPES.contains(&typ) {
                return Err(spec_err(
                    format!("linux.namespaces[{i}].type"),
                    format!(
                        "unknown namespace type {typ:?} (known: {})",
                        NAMESPACE_TYPES.join(", ")
                    ),
                ));
            }
        }
    }
    match raw.get("process") {
        None | Some(Value::Null) => return Err(spec_err("process", "missing")),
        Some(p) => match p.get("args") {
            Some(Value::Array(a)) if !a.is_empty() => {}
            Some(Value::Array(_)) => return Err(spec_err("process.args", "empty")),
            _ => return Err(spec_err("process.args", "missing")),
        },
    }
    Ok(())
}

/// Checks on the typed spec.
pub fn validate(spec: &Spec) -> Result<()> {
    if spec.root().is_none() {
        return Err(spec_err("root", "missing"));
    }
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| spec_err("process", "missing"))?;
    validate_process(process, "process")?;
    if spec.hooks().is_some() {
        tracing::warn!("config.json: hooks are not supported by tandem-oci and are ignored");
    }
    if let Some(linux) = spec.linux() {
        if let Some(res) = linux.resources() {
            validate_resources(res)?;
        }
        if let Some(nss) = linux.namespaces() {
            let mut seen = std::collections::HashSet::new();
            for ns in nss {
                if !seen.insert(ns.typ()) {
                    return Err(spec_err(
                        "linux.namespaces",
                        format!("namespace {} listed twice", ns.typ()),
                    ));
                }
            }
        }
        if let Some(p) = linux.cgroups_path() {
            let s = p.to_string_lossy();
            if !s.is_empty() && !s.starts_with('/') && s.contains(':') {
                return Err(spec_err(
                    "linux.cgroupsPath",
                    format!("{s:?}: systemd-style cgroup paths (slice:prefix:name) are not supported; use a cgroupfs path like /default/<id>"),
                ));
            }
            if s.split('/').any(|c| c == "..") {
                return Err(spec_err("linux.cgroupsPath", format!("{s:?}: contains ..")));
            }
        }
        if let Some(prop) = linux.rootfs_propagation() {
            if ![
                "",
                "private",
                "rprivate",
                "slave",
                "rslave",
                "shared",
                "rshared",
                "unbindable",
                "runbindable",
            ]
            .contains(&prop.as_str())
            {
                return Err(spec_err(
                    "linux.rootfsPropagation",
                    format!("unknown propagation {prop:?}"),
                ));
            }
        }
    }
    if let Some(linux) = spec.linux() {
        if linux.intel_rdt().is_some() {
            tracing::warn!("config.json: linux.intelRdt is not supported and is ignored");
        }
        if linux.personality().is_some() {
            tracing::warn!("config.json: linux.personality is not supported and is ignored");
        }
    }
    if process.scheduler().is_some() || process.io_priority().is_some() {
        tracing::warn!(
            "config.json: process.scheduler / process.ioPriority are not supported and are ignored"
        );
    }
    let has_userns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|n| n.iter().any(|n| n.typ() == LinuxNamespaceType::User));
    if let Some(linux) = spec.linux() {
        let (u, g) = (linux.uid_mappings(), linux.gid_mappings());
        if (u.is_some() || g.is_some()) && !has_userns {
            return Err(spec_err(
                "linux.uidMappings",
                "uid/gid mappings are set but linux.namespaces has no user namespace",
            ));
        }
        if let Some(u) = u {
            validate_mappings(u, "linux.uidMappings")?;
        }
        if let Some(g) = g {
            validate_mappings(g, "linux.gidMappings")?;
        }
    }
    if let Some(mounts) = spec.mounts() {
        for (i, m) in mounts.iter().enumerate() {
            let opts = m.options().clone().unwrap_or_default();
            let idmap_opt = opts.iter().any(|o| o == "idmap" || o == "ridmap");
            let has_maps = m.uid_mappings().is_some() || m.gid_mappings().is_some();
            if idmap_opt || has_maps {
                let is_bind = m.typ().as_deref() == Some("bind")
                    || opts.iter().any(|o| o == "bind" || o == "rbind");
                if !is_bind {
                    return Err(spec_err(
                        format!("mounts[{i}]"),
                        format!(
                            "{}: idmapped mounts are supported for bind mounts only (type {:?})",
                            m.destination().display(),
                            m.typ().as_deref().unwrap_or("")
                        ),
                    ));
                }
                match (m.uid_mappings(), m.gid_mappings()) {
                    (Some(u), Some(g)) => {
                        validate_mappings(u, &format!("mounts[{i}].uidMappings"))?;
                        validate_mappings(g, &format!("mounts[{i}].gidMappings"))?;
                    }
                    (None, None) => {
                        // "idmap" without mappings: the container's user namespace mapping
                        if !has_userns {
                            return Err(spec_err(
                                format!("mounts[{i}].options"),
                                format!(
                                    "{}: idmap without uidMappings/gidMappings uses the container's user namespace mapping, but there is no user namespace in linux.namespaces",
                                    m.destination().display()
                                ),
                            ));
                        }
                    }
                    _ => {
                        return Err(spec_err(
                            format!("mounts[{i}]"),
                            format!(
                                "{}: an idmapped mount needs both uidMappings and gidMappings",
                                m.destination().display()
                            ),
                        ))
                    }
                }
            }
            if !m.destination().is_absolute() {
                return Err(spec_err(
                    format!("mounts[{i}].destination"),
                    format!("{:?} is not absolute", m.destination()),
                ));
            }
        }
    }
    Ok(())
}

/// Most lines a kernel `uid_map` / `gid_map` accepts.
pub const MAX_MAP_LINES: usize = 340;

/// Checks on id mappings (of the user namespace or of an idmapped mount): sizes, overflow,
/// overlaps inside and outside, the kernel's line limit. Empty lists are checked by the caller.
pub fn validate_mappings(maps: &[LinuxIdMapping], field: &str) -> Result<()> {
    if maps.len() > MAX_MAP_LINES {
        return Err(spec_err(
            field,
            format!(
                "{} entries; the kernel accepts at most {MAX_MAP_LINES}",
                maps.len()
            ),
        ));
    }
    for (i, m) in maps.iter().enumerate() {
        let f = format!("{field}[{i}]");
        if m.size() == 0 {
            return Err(spec_err(f, "size is 0"));
        }
        for (what, start) in [("containerID", m.container_id()), ("hostID", m.host_id())] {
            let end = u64::from(start) + u64::from(m.size());
            // the kernel reserves (uid_t)-1: the last valid ID is 4294967294
            if end > u64::from(u32::MAX) {
                return Err(spec_err(
                    f,
                    format!(
                        "{what} {start} + size {} goes past the largest ID {}",
                        m.size(),
                        u32::MAX - 1
                    ),
                ));
            }
        }
        for (j, o) in maps.iter().enumerate().take(i) {
            let overlap = |a: u32, b: u32| {
                u64::from(a) < u64::from(b) + u64::from(o.size())
                    && u64::from(b) < u64::from(a) + u64::from(m.size())
            };
            if overlap(m.container_id(), o.container_id()) {
                return Err(spec_err(
                    f,
                    format!(
                        "containerID range {}+{} overlaps {field}[{j}] ({}+{})",
                        m.container_id(),
                        m.size(),
                        o.container_id(),
                        o.size()
                    ),
                ));
            }
            if overlap(m.host_id(), o.host_id()) {
                return Err(spec_err(
                    f,
                    format!(
                        "hostID range {}+{} overlaps {field}[{j}] ({}+{})",
                        m.host_id(),
                        m.size(),
                        o.host_id(),
                        o.size()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Checks on a process spec (of the container or of an exec).
pub fn validate_process(process: &oci_spec::runtime::Process, field: &str) -> Result<()> {
    match process.args() {
        Some(a) if !a.is_empty() => {}
        _ => return Err(spec_err(format!("{field}.args"), "missing or empty")),
    }
    if !process.cwd().is_absolute() {
        return Err(spec_err(
            format!("{field}.cwd"),
            format!("{:?} is not absolute", process.cwd()),
        ));
    }
    Ok(())
}

/// Checks on resources (also used by `update`).
pub fn validate_resources(res: &oci_spec::runtime::LinuxResources) -> Result<()> {
    if let Some(cpu) = res.cpu() {
        if let Some(c) = cpu.cpus() {
            parse_cpuset(c).map_err(|m| spec_err("linux.resources.cpu.cpus", m))?;
        }
        if let Some(m) = cpu.mems() {
            parse_cpuset(m).map_err(|msg| spec_err("linux.resources.cpu.mems", msg))?;
        }
    }
    if let Some(h) = res.hugepage_limits() {
        for (i, l) in h.iter().enumerate() {
            crate::cgroups::page_size_bytes(l.page_size()).ok_or_else(|| {
                spec_err(
                    format!("linux.resources.hugepageLimits[{i}].pageSize"),
                    format!("{:?} is not a page size like 2MB or 1GB", l.page_size()),
                )
            })?;
        }
    }
    Ok(())
}

/// Parse a cpuset list ("0-3,5,7-8"); an empty string is allowed (means "inherit").
pub fn parse_cpuset(s: &str) -> std::result::Result<Vec<u32>, String> {
    let mut out = Vec::new();
    let t = s.trim();
    if t.is_empty() {
        return Ok(out);
    }
    for part in t.split(',') {
        let num = |x: &str| -> std::result::Result<u32, String> {
            if x.is_empty() || !x.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("{s:?}: {x:?} is not a number"));
            }
            x.parse::<u32>().map_err(|e| format!("{s:?}: {x:?}: {e}"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("{s:?}: range {a}-{b} is reversed"));
                }
                out.extend(a..=b);
            }
            None => out.push(num(part)?),
        }
    }
    Ok(out)
}

fn rootfs_path(bundle: &Path, spec: &Spec) -> Result<PathBuf> {
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| spec_err("root", "missing"))?;
    let p = if root.path().is_absolute() {
        root.path().clone()
    } else {
        bundle.join(root.path())
    };
    match std::fs::metadata(&p) {
        Ok(m) if m.is_dir() => Ok(p),
        Ok(_) => Err(Error::Bundle {
            path: p,
            msg: "root.path is not a directory".into(),
        }),
        Err(e) => Err(Error::Bundle {
            path: p,
            msg: format!("root.path: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
        "process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},
        "linux":{"namespaces":[{"type":"pid"},{"type":"mount"}]}}"#;

    fn with(patch: impl FnOnce(&mut Value)) -> String {
        let mut v: Value = serde_json::from_str(MINIMAL).unwrap();
        patch(&mut v);
        v.to_string()
    }

    #[test]
    fn minimal_spec_parses() {
        let s = parse(MINIMAL).unwrap();
        assert_eq!(
            s.process().as_ref().unwrap().args().as_ref().unwrap()[0],
            "sh"
        );
    }

    #[test]
    fn malformed_json_names_line_and_column() {
        let e = parse("{\n \"ociVersion\": ,}").unwrap_err().to_string();
        assert!(e.starts_with("config.json: invalid json"), "{e}");
        assert!(e.contains("line 2 column"), "{e}");
    }

    #[test]
    fn unknown_namespace_type_is_named() {
        let t = with(|v| v["linux"]["namespaces"][1]["type"] = "bogus".into());
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.contains("linux.namespaces[1].type"), "{e}");
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn missing_process_and_args() {
        let t = with(|v| {
            v.as_object_mut().unwrap().remove("process");
        });
        assert!(parse(&t)
            .unwrap_err()
            .to_string()
            .contains("invalid process: missing"));
        let t = with(|v| v["process"]["args"] = serde_json::json!([]));
        assert!(parse(&t).unwrap_err().to_string().contains("process.args"));
        let t = with(|v| {
            v["process"].as_object_mut().unwrap().remove("args");
        });
        assert!(parse(&t).unwrap_err().to_string().contains("process.args"));
    }

    #[test]
    fn bad_cpusets_are_rejected() {
        for bad in ["abc", "1-", "-1", "3-1", "1,,2", "1-2-3"] {
            let t = with(|v| v["linux"]["resources"] = serde_json::json!({"cpu":{"cpus": bad}}));
            let e = parse(&t).unwrap_err().to_string();
            assert!(e.contains("linux.resources.cpu.cpus"), "{bad}: {e}");
        }
        let t = with(|v| v["linux"]["resources"] = serde_json::json!({"cpu":{"mems": "x"}}));
        assert!(parse(&t).unwrap_err().to_string().contains("cpu.mems"));
    }

    #[test]
    fn cpuset_parsing() {
        assert_eq!(parse_cpuset("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert_eq!(parse_cpuset("1").unwrap(), vec![1]);
        assert_eq!(parse_cpuset("").unwrap(), Vec::<u32>::new());
        assert_eq!(parse_cpuset(" 3-3 ").unwrap(), vec![3]);
        assert!(parse_cpuset("1-").is_err());
        assert!(parse_cpuset("abc").is_err());
    }

    #[test]
    fn systemd_cgroup_path_is_unsupported() {
        let t = with(|v| v["linux"]["cgroupsPath"] = "system.slice:tandem:abc".into());
        let e = parse(&t).unwrap_err().to_string();
        assert!(
            e.contains("linux.cgroupsPath") && e.contains("systemd"),
            "{e}"
        );
    }

    #[test]
    fn idmapped_mount_checks() {
        let userns = |v: &mut Value| {
            v["linux"]["namespaces"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({"type": "user"}));
            v["linux"]["uidMappings"] =
                serde_json::json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
            v["linux"]["gidMappings"] =
                serde_json::json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        };
        // idmap with the container's mapping needs a user namespace
        let bind = serde_json::json!([{"destination":"/data","type":"bind","source":"/tmp","options":["rbind","idmap"]}]);
        let t = with(|v| v["mounts"] = bind.clone());
        let e = parse(&t).unwrap_err().to_string();
        assert!(
            e.contains("mounts[0].options") && e.contains("no user namespace"),
            "{e}"
        );
        let t = with(|v| {
            userns(v);
            v["mounts"] = bind.clone();
        });
        parse(&t).unwrap();
        // explicit mappings work without a user namespace; both are needed
        let t = with(|v| {
            v["mounts"] = serde_json::json!([{"destination":"/d","type":"bind","source":"/tmp",
                "uidMappings":[{"containerID":0,"hostID":1000,"size":1}],
                "gidMappings":[{"containerID":0,"hostID":1000,"size":1}]}])
        });
        parse(&t).unwrap();
        let t = with(|v| {
            v["mounts"] = serde_json::json!([{"destination":"/d","type":"bind","source":"/tmp",
                "uidMappings":[{"containerID":0,"hostID":1000,"size":1}]}])
        });
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.contains("both uidMappings and gidMappings"), "{e}");
        // only bind mounts
        let t = with(|v| {
            userns(v);
            v["mounts"] = serde_json::json!([{"destination":"/t","type":"tmpfs","source":"tmpfs","options":["idmap"]}]);
        });
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.contains("bind mounts only") && e.contains("tmpfs"), "{e}");
    }

    #[test]
    fn bad_mappings_are_named() {
        let cases: &[(Value, &str)] = &[
            (
                serde_json::json!([{"containerID": 0, "hostID": 100000, "size": 0}]),
                "size is 0",
            ),
            (
                serde_json::json!([{"containerID": 0, "hostID": 4294967000u32, "size": 65536}]),
                "hostID 4294967000",
            ),
            (
                serde_json::json!([{"containerID": 0, "hostID": 100000, "size": 1000},
                                   {"containerID": 500, "hostID": 300000, "size": 10}]),
                "containerID range 500+10 overlaps linux.uidMappings[0]",
            ),
            (
                serde_json::json!([{"containerID": 0, "hostID": 100000, "size": 1000},
                                   {"containerID": 1000, "hostID": 100999, "size": 10}]),
                "hostID range 100999+10 overlaps",
            ),
        ];
        for (maps, want) in cases {
            let t = with(|v| {
                v["linux"]["namespaces"]
                    .as_array_mut()
                    .unwrap()
                    .push(serde_json::json!({"type": "user"}));
                v["linux"]["uidMappings"] = maps.clone();
                v["linux"]["gidMappings"] =
                    serde_json::json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
            });
            let e = parse(&t).unwrap_err().to_string();
            assert!(
                e.contains("linux.uidMappings") && e.contains(want),
                "{want}: {e}"
            );
        }
        let many: Vec<Value> = (0..341)
            .map(|i| serde_json::json!({"containerID": i, "hostID": 100000 + i, "size": 1}))
            .collect();
        let t = with(|v| {
            v["linux"]["namespaces"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({"type": "user"}));
            v["linux"]["uidMappings"] = Value::Array(many.clone());
            v["linux"]["gidMappings"] = Value::Array(many.clone());
        });
        assert!(parse(&t).unwrap_err().to_string().contains("at most 340"));
        // mappings without a user namespace
        let t = with(|v| {
            v["linux"]["uidMappings"] =
                serde_json::json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        });
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.contains("no user namespace"), "{e}");
    }

    #[test]
    fn relative_mount_destination_is_rejected() {
        let t = with(|v| {
            v["mounts"] =
                serde_json::json!([{"destination":"data","type":"tmpfs","source":"tmpfs"}])
        });
        assert!(parse(&t)
            .unwrap_err()
            .to_string()
            .contains("mounts[0].destination"));
    }

    #[test]
    fn bad_hugepage_size() {
        let t = with(|v| {
            v["linux"]["resources"] =
                serde_json::json!({"hugepageLimits":[{"pageSize":"2XB","limit":1}]})
        });
        assert!(parse(&t).unwrap_err().to_string().contains("pageSize"));
    }

    #[test]
    fn missing_rootfs_is_a_bundle_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), MINIMAL).unwrap();
        let e = load(dir.path()).unwrap_err();
        match e {
            Error::Bundle { path, .. } => assert_eq!(path, dir.path().join("rootfs")),
            e => panic!("{e}"),
        }
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        let (_, rootfs) = load(dir.path()).unwrap();
        assert_eq!(rootfs, dir.path().join("rootfs"));
    }
}
