//! Bad input and crashes: ctr fails with the runtime's message naming the bad thing, and
//! nothing is left behind; a SIGKILLed shim is cleaned up by `ctr task delete -f`.

use std::time::Duration;

use tandem_tests::*;

fn setup() -> Containerd {
    let c = Containerd::start(None).expect("start containerd");
    c.import_busybox();
    c
}

/// Runs a spec expected to fail; returns ctr's stderr after checking ctr failed and the
/// container leaves nothing once removed.
fn spec_fails(c: &Containerd, id: &str, spec: &serde_json::Value) -> String {
    let (code, out, err) = run_spec(c, id, spec);
    assert_ne!(code, 0, "ctr run succeeded with a bad spec; stdout: {out}");
    // `ctr run --rm` removes the container only after a successful start.
    let _ = c.ctr(&["container", "rm", id]);
    c.assert_no_leaks(&[id]);
    err
}

#[test]
fn malformed_config_json_is_rejected() {
    let c = setup();
    let id = unique_id("badjson");
    let path = c.dir().join("bad.json");
    std::fs::write(&path, b"{\"ociVersion\": \"1.0.2\", \"process\": ").unwrap();
    let rt = runtime();
    let o = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        &rt,
        "--config",
        path.to_str().unwrap(),
        &id,
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("unexpected end of JSON input"),
        "stderr: {err}"
    );
    let _ = c.ctr(&["container", "rm", &id]);
    c.assert_no_leaks(&[&id]);
}

#[test]
fn empty_args_are_rejected() {
    let c = setup();
    let id = unique_id("noargs");
    let rootfs = c.dir().join("rootfs");
    unpack_busybox_rootfs(&rootfs).unwrap();
    let mut spec = base_spec(&c, &id, &rootfs, &[]);
    spec["process"]["args"] = serde_json::json!([]);
    let err = spec_fails(&c, &id, &spec);
    assert!(
        err.contains("args"),
        "stderr does not name process.args: {err}"
    );
}

#[test]
fn missing_rootfs_is_rejected() {
    let c = setup();
    let id = unique_id("norootfs");
    let rt = runtime();
    let o = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        &rt,
        "--rootfs",
        "/nonexistent/rootfs",
        &id,
        "/bin/true",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("/nonexistent/rootfs"),
        "stderr does not name the rootfs: {err}"
    );
    let _ = c.ctr(&["container", "rm", &id]);
    c.assert_no_leaks(&[&id]);
}

#[test]
fn unknown_namespace_type_is_rejected() {
    let c = setup();
    let id = unique_id("badns");
    let rootfs = c.dir().join("rootfs");
    unpack_busybox_rootfs(&rootfs).unwrap();
    let mut spec = base_spec(&c, &id, &rootfs, &["/bin/true"]);
    spec["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "bogusns"}));
    let err = spec_fails(&c, &id, &spec);
    assert!(
        err.contains("bogusns"),
        "stderr does not name the namespace type: {err}"
    );
}

#[test]
fn bad_cpuset_is_rejected() {
    let c = setup();
    let id = unique_id("badcpuset");
    let rootfs = c.dir().join("rootfs");
    unpack_busybox_rootfs(&rootfs).unwrap();
    let mut spec = base_spec(&c, &id, &rootfs, &["/bin/true"]);
    spec["linux"]["resources"]["cpu"] = serde_json::json!({"cpus": "abc"});
    let err = spec_fails(&c, &id, &spec);
    assert!(
        err.contains("abc"),
        "stderr does not name the cpuset value: {err}"
    );
}

#[test]
fn killed_shim_is_cleaned_up_by_delete() {
    let c = setup();
    let id = unique_id("shimkill");
    c.run_detached(&[], &id, &["sleep", "1000"]);
    let init = c.task_pid(&id);
    let shims = c.shim_pids();
    assert_eq!(shims.len(), 1, "expected one shim for {id}: {shims:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shims[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while proc_state(shims[0]).is_some_and(|s| s != 'Z') {
        assert!(
            std::time::Instant::now() < deadline,
            "shim {} did not die",
            shims[0]
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // containerd notices the dead shim; delete -f and rm must leave nothing.
    let _ = c.ctr(&["task", "delete", "-f", &id]);
    let _ = c.ctr(&["container", "rm", &id]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while proc_state(init).is_some_and(|s| s != 'Z') {
        assert!(
            std::time::Instant::now() < deadline,
            "container init {init} still alive after shim kill + delete -f"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    c.assert_no_leaks(&[&id]);
}

/// `ctr run --runtime-config-path FILE` hands tandem its config (as CRI's `ConfigPath` does):
/// a valid file runs the container; a bad key fails it with the file and key named, and leaves
/// nothing behind.
#[test]
fn runtime_config_path_is_read_and_checked() {
    if !is_tandem() {
        return; // tandem's own config file; runc's shim reads other options
    }
    let c = Containerd::builder()
        .runtime_config("mode = \"container\"\n")
        .start()
        .expect("start containerd");
    c.import_busybox();
    let cfg = c.runtime_config.clone().expect("runtime config written");
    let id = unique_id("cfgok");
    let (code, out, err) = c.run_rm(
        &["--runtime-config-path", cfg.to_str().unwrap()],
        &id,
        &["echo", "configured"],
    );
    assert_eq!((code, out.as_str()), (0, "configured\n"), "stderr: {err}");

    std::fs::write(&cfg, "mode = \"container\"\nbogus = 1\n").unwrap();
    let id = unique_id("cfgbad");
    let (code, _, err) = c.run_rm(
        &["--runtime-config-path", cfg.to_str().unwrap()],
        &id,
        &["true"],
    );
    assert_ne!(code, 0, "a bad config must fail the container");
    assert!(
        err.contains("bogus") && err.contains(cfg.to_str().unwrap()),
        "ctr's error names the key and the file: {err}"
    );
    let _ = c.ctr(&["container", "rm", &id]);
    c.assert_no_leaks(&[&id]);
}
