//! 200 sequential `ctr run --rm … /bin/true` cycles leave nothing behind.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tandem_tests::*;

/// How long a shim process (the server, or the `delete` helper containerd runs after the
/// server's connection closes) may outlive the `ctr run --rm` that used it. The server exits
/// within milliseconds of containerd's Shutdown, before `ctr` returns.
const GRACE: Duration = Duration::from_secs(2);

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
    // pid -> when it was first seen alive after a run had returned
    let mut seen: HashMap<i32, Instant> = HashMap::new();
    let mut oldest = Duration::ZERO;
    for i in 0..n {
        // The `x` ends the id: the leak checks match ids as substrings of command lines, and
        // `cycle-P-1` would otherwise match the processes of `cycle-P-1NN`.
        let id = format!("{}x", unique_id("cycle"));
        let (code, _, err) = c.run_rm(&[], &id, &["/bin/true"]);
        assert_eq!(code, 0, "cycle {i} ({id}): {err}\n{}", c.log_tail(20));
        ids.push(id);
        let now = Instant::now();
        let alive = c.shim_pids();
        seen.retain(|p, _| alive.contains(p));
        for p in alive {
            let age = now.duration_since(*seen.entry(p).or_insert(now));
            oldest = oldest.max(age);
            assert!(
                age <= GRACE,
                "cycle {i}: shim {p} still alive {age:?} after the run that used it returned: {}",
                std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .unwrap_or_default()
                    .replace('\0', " ")
            );
        }
    }
    let elapsed = t0.elapsed();
    eprintln!("{n} cycles in {elapsed:?} ({:?} each)", elapsed / n as u32);
    // The last shims: gone within GRACE too.
    let t = Instant::now();
    while !c.shim_pids().is_empty() && t.elapsed() < GRACE {
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "oldest shim seen during the cycles: {oldest:?}; last shims gone {:?} after the last run",
        t.elapsed()
    );
    assert!(c.shim_pids().is_empty(), "shims left: {:?}", c.shim_pids());
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    c.assert_no_leaks_within(&refs, GRACE);
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
}
