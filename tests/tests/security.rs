//! seccomp through ctr: containerd's default profile runs, a custom profile denies mkdir.

use tandem_tests::*;

#[test]
fn default_seccomp_profile_runs() {
    let c = Containerd::start(None).unwrap();
    c.import_busybox();
    let id = unique_id("seccompdef");
    let (code, out, err) = c.run_rm(
        &["--seccomp"],
        &id,
        &["sh", "-c", "mkdir /tmp/ok && echo fine"],
    );
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out, "fine\n");
    c.assert_no_leaks(&[&id]);
}

#[test]
fn custom_seccomp_profile_denies_mkdir() {
    let c = Containerd::start(None).unwrap();
    c.import_busybox();
    let id = unique_id("seccompdeny");
    let profile = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let path = c.dir().join("deny-mkdir.json");
    std::fs::write(&path, serde_json::to_vec(&profile).unwrap()).unwrap();
    let (code, out, err) = c.run_rm(
        &["--seccomp", "--seccomp-profile", path.to_str().unwrap()],
        &id,
        &["sh", "-c", "echo before; mkdir /tmp/x; echo rc=$?"],
    );
    assert_eq!(code, 0, "stderr: {err}\n{}", c.log_tail(20));
    assert_eq!(out, "before\nrc=1\n", "stderr: {err}");
    assert!(err.contains("Operation not permitted"), "stderr: {err}");
    c.assert_no_leaks(&[&id]);
}
