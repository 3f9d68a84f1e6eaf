//! 200 sequential `ctr run --rm … /bin/true` cycles leave nothing behind.

use std::time::Instant;

use tandem_tests::*;

#[test]
fn two_hundred_run_rm_cycles_leave_nothing() {
    let c = Containerd::start(None).unwrap();
    c.import_busybox();
    let n: usize = std::env::var("TANDEM_LEAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mounts_before = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count();
    let t0 = Instant::now();
    let mut ids = Vec::new();
    for i in 0..n {
        let id = unique_id("cycle");
        let (code, _, err) = c.run_rm(&[], &id, &["/bin/true"]);
        assert_eq!(code, 0, "cycle {i} ({id}): {err}\n{}", c.log_tail(20));
        ids.push(id);
    }
    let elapsed = t0.elapsed();
    eprintln!("{n} cycles in {elapsed:?} ({:?} each)", elapsed / n as u32);
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    // Known defect (noted on issue 2): under load the last shim of a fast run of `ctr run --rm`
    // sometimes stays alive (sleeping, 2 threads) for 5-8 s after containerd logged "shim
    // disconnected", before it exits by itself. Everything else is gone at once. Until that is
    // found, this test gives teardown 15 s (and prints how long it took, when over 1 s); anything
    // still there after that is a leak.
    c.assert_no_leaks_within(&refs, std::time::Duration::from_secs(15));
    let mounts_after = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count();
    assert!(
        mounts_after <= mounts_before,
        "mount count grew {mounts_before} -> {mounts_after}"
    );
    // No container cgroup is left under the namespace in any hierarchy.
    for h in cgroup_hierarchies() {
        let ns = h.join(&c.namespace);
        if let Ok(rd) = std::fs::read_dir(&ns) {
            let left: Vec<_> = rd
                .flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.path())
                .collect();
            assert!(left.is_empty(), "cgroups left: {left:?}");
        }
    }
    assert!(c.shim_pids().is_empty(), "shims left: {:?}", c.shim_pids());
}
