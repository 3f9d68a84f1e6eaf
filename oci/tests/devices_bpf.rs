//! The cgroup2 device filter (eBPF) on the real kernel: attached to a cgroup2 directory (pure
//! v2 root, or the hybrid layout's unified mount), it lets /dev/null through and denies
//! /dev/zero.

use std::path::PathBuf;
use std::process::Command;

use tandem_oci::cgroups::devices_bpf::{attach, Rule};

fn cgroup2_root() -> PathBuf {
    for p in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let p = PathBuf::from(p);
        if p.join("cgroup.controllers").exists() {
            return p;
        }
    }
    panic!("no cgroup2 mount under /sys/fs/cgroup");
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        for _ in 0..200 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

#[test]
fn device_filter_allows_null_and_denies_zero() {
    let dir = Dir(cgroup2_root().join(format!("tandem-bpf-test-{}", std::process::id())));
    std::fs::create_dir(&dir.0).unwrap();
    let rules = vec![
        Rule::parse(false, "a *:* rwm").unwrap(),
        Rule::parse(true, "c 1:3 rw").unwrap(),
        Rule::parse(true, "c 1:5 m").unwrap(),
    ];
    attach(&dir.0, &rules).unwrap();
    let script = format!(
        "echo $$ > {}/cgroup.procs || exit 9; \
         head -c 1 /dev/null && echo null-ok; \
         head -c 1 /dev/zero >/dev/null 2>&1 || echo zero-denied; \
         head -c 1 /dev/full >/dev/null 2>&1 || echo full-denied",
        dir.0.display()
    );
    let out = Command::new("/bin/busybox")
        .args(["sh", "-c", &script])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{s} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s, "null-ok\nzero-denied\nfull-denied\n");
    // the same commands outside the cgroup work
    let out = Command::new("/bin/busybox")
        .args([
            "sh",
            "-c",
            "head -c 1 /dev/zero | wc -c; head -c 1 /dev/full | wc -c",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\n1\n");
}
