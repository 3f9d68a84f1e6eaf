//! Resource control through containerd + ctr: pause/resume (freezer), metrics, cpuset, memory
//! limit + OOM event, pids limit, hugetlb limit.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tandem_tests::*;

fn setup() -> Containerd {
    let c = Containerd::start(None).expect("start containerd");
    c.import_busybox();
    c
}

fn freezer_state(c: &Containerd, id: &str) -> String {
    let v1 = PathBuf::from("/sys/fs/cgroup/freezer")
        .join(&c.namespace)
        .join(id)
        .join("freezer.state");
    let v2 = PathBuf::from("/sys/fs/cgroup")
        .join(&c.namespace)
        .join(id)
        .join("cgroup.freeze");
    std::fs::read_to_string(&v1)
        .or_else(|_| std::fs::read_to_string(&v2))
        .unwrap_or_else(|e| panic!("no freezer file {} or {}: {e}", v1.display(), v2.display()))
        .trim()
        .to_string()
}

#[test]
fn pause_freezes_and_resume_continues() {
    let c = setup();
    let id = unique_id("pause");
    c.run_detached(&[], &id, &["sh", "-c", "while :; do :; done"]);
    let pid = c.task_pid(&id);
    c.ctr_ok(&["task", "pause", &id]);
    c.wait_task_status(&id, "PAUSED", Duration::from_secs(5));
    let st = freezer_state(&c, &id);
    assert!(st == "FROZEN" || st == "1", "freezer state {st:?}");
    let t0 = proc_cpu_ticks(pid).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let t1 = proc_cpu_ticks(pid).unwrap();
    assert_eq!(t0, t1, "busy loop got CPU while paused");

    c.ctr_ok(&["task", "resume", &id]);
    c.wait_task_status(&id, "RUNNING", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(400));
    let t2 = proc_cpu_ticks(pid).unwrap();
    assert!(
        t2 > t1 + 5,
        "busy loop did not run after resume ({t1} -> {t2} ticks)"
    );
    c.remove(&id);
    c.assert_no_leaks(&[&id]);
}

#[test]
fn metrics_show_memory_and_cpu() {
    let c = setup();
    let id = unique_id("metrics");
    c.run_detached(
        &[],
        &id,
        &[
            "sh",
            "-c",
            "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; sleep 1000",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    let out = c.ctr_ok(&["task", "metrics", "--format", "json", &id]);
    let m: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    // cgroup v1 (hybrid host): memory.usage.usage, cpu.usage.total; v2: memory.usage, cpu.usage_usec.
    let mem = m["memory"]["usage"]["usage"]
        .as_u64()
        .or_else(|| m["memory"]["usage"].as_u64());
    let cpu = m["cpu"]["usage"]["total"]
        .as_u64()
        .or_else(|| m["cpu"]["usage_usec"].as_u64());
    assert!(mem.unwrap_or(0) > 0, "no memory usage in metrics: {out}");
    assert!(cpu.unwrap_or(0) > 0, "no cpu usage in metrics: {out}");
    let pids = m["pids"]["current"].as_u64();
    assert_eq!(pids, Some(1), "pids.current in metrics: {out}");
    c.remove(&id);
    c.assert_no_leaks(&[&id]);
}

#[test]
fn cpuset_is_applied() {
    let c = setup();
    let id = unique_id("cpuset");
    let rootfs = c.dir().join("rootfs");
    unpack_busybox_rootfs(&rootfs).unwrap();
    let mut spec = base_spec(
        &c,
        &id,
        &rootfs,
        &["sh", "-c", "grep Cpus_allowed_list /proc/self/status"],
    );
    spec["linux"]["resources"]["cpu"] = serde_json::json!({"cpus": "1"});
    let (code, out, err) = run_spec(&c, &id, &spec);
    assert_eq!(code, 0, "stderr: {err}\n{}", c.log_tail(20));
    assert_eq!(out.trim(), "Cpus_allowed_list:\t1");
    c.assert_no_leaks(&[&id]);
}

#[test]
fn memory_limit_oom_kills_with_137_and_event() {
    let c = setup();
    let id = unique_id("oom");
    let mut events = c
        .ctr_cmd(&["events"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = events.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    // busybox tail buffers a line without newline whole: 64 MiB against a 16 MiB limit.
    let (code, _, err) = c.run_rm(
        &["--memory-limit", "16777216"],
        &id,
        &["sh", "-c", "head -c 67108864 /dev/zero | tail"],
    );
    assert_eq!(code, 137, "stderr: {err}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    let mut oom = false;
    while let Ok(l) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if l.contains("/tasks/oom") && l.contains(&id) {
            oom = true;
            break;
        }
        seen.push(l);
    }
    let _ = events.kill();
    let _ = events.wait();
    assert!(
        oom,
        "no /tasks/oom event for {id}; events seen:\n{}",
        seen.join("\n")
    );
    c.assert_no_leaks(&[&id]);
}

#[test]
fn pids_limit_stops_forks() {
    let c = setup();
    let id = unique_id("pids");
    let rootfs = c.dir().join("rootfs");
    unpack_busybox_rootfs(&rootfs).unwrap();
    let spec_args = ["sh", "-c", "i=0; while [ $i -lt 20 ]; do sleep 30 & i=$((i+1)); done; kill $(jobs -p) 2>/dev/null; exit 0"];
    let mut spec = base_spec(&c, &id, &rootfs, &spec_args);
    spec["linux"]["resources"]["pids"] = serde_json::json!({"limit": 8});
    let (code, _out, err) = run_spec(&c, &id, &spec);
    assert!(
        err.contains("fork") || err.contains("Resource temporarily unavailable"),
        "no fork failure under pids limit 8 (exit {code}); stderr: {err}\n{}",
        c.log_tail(20)
    );
    c.assert_no_leaks(&[&id]);

    // The limit is visible in the cgroup while the container runs.
    let id2 = unique_id("pidsmax");
    let mut spec = base_spec(&c, &id2, &rootfs, &["sleep", "1000"]);
    spec["linux"]["resources"]["pids"] = serde_json::json!({"limit": 8});
    let path = c.dir().join(format!("{id2}.json"));
    std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();
    let rt = runtime();
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        &rt,
        "--config",
        path.to_str().unwrap(),
        &id2,
    ]);
    c.wait_task_status(&id2, "RUNNING", Duration::from_secs(10));
    let v1 = PathBuf::from("/sys/fs/cgroup/pids")
        .join(&c.namespace)
        .join(&id2)
        .join("pids.max");
    let v2 = PathBuf::from("/sys/fs/cgroup")
        .join(&c.namespace)
        .join(&id2)
        .join("pids.max");
    let max = std::fs::read_to_string(&v1)
        .or_else(|_| std::fs::read_to_string(&v2))
        .unwrap();
    assert_eq!(max.trim(), "8");
    c.remove(&id2);
    c.assert_no_leaks(&[&id2]);
}

/// Reserves `extra` more 2 MiB hugepages and restores the previous count on drop (unless
/// someone else changed it meanwhile).
struct HugepageReservation {
    prev: u64,
    set: u64,
}

impl HugepageReservation {
    fn new(extra: u64) -> Self {
        let f = "/proc/sys/vm/nr_hugepages";
        let prev: u64 = std::fs::read_to_string(f).unwrap().trim().parse().unwrap();
        std::fs::write(f, (prev + extra).to_string()).unwrap();
        let set: u64 = std::fs::read_to_string(f).unwrap().trim().parse().unwrap();
        assert!(
            set >= prev + extra,
            "could reserve only {set} hugepages (wanted {})",
            prev + extra
        );
        HugepageReservation { prev, set }
    }
}

impl Drop for HugepageReservation {
    fn drop(&mut self) {
        let f = "/proc/sys/vm/nr_hugepages";
        let now: u64 = std::fs::read_to_string(f).unwrap().trim().parse().unwrap();
        if now == self.set {
            let _ = std::fs::write(f, self.prev.to_string());
        }
    }
}

/// hugetlb limit from linux.resources.hugepageLimits lands in the hugetlb controller (on this
/// hybrid host that is cgroup2, /sys/fs/cgroup/unified; elsewhere v1 or pure v2), and a process
/// in the container cannot allocate more hugepages than the limit.
#[test]
fn hugetlb_limit_is_set_and_enforced() {
    let _reserve = HugepageReservation::new(8);
    let c = setup();
    let id = unique_id("hugetlb");
    let rootfs = c.dir().join("rootfs");
    unpack_busybox_rootfs(&rootfs).unwrap();
    std::fs::create_dir_all(rootfs.join("hp")).unwrap();
    let mut spec = base_spec(&c, &id, &rootfs, &["sleep", "1000"]);
    spec["linux"]["resources"]["hugepageLimits"] =
        serde_json::json!([{"pageSize": "2MB", "limit": 4194304}]);
    spec["mounts"].as_array_mut().unwrap().push(serde_json::json!(
        {"destination": "/hp", "type": "hugetlbfs", "source": "hugetlbfs", "options": ["pagesize=2M"]}
    ));
    let path = c.dir().join(format!("{id}.json"));
    std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();
    let rt = runtime();
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        &rt,
        "--config",
        path.to_str().unwrap(),
        &id,
    ]);
    c.wait_task_status(&id, "RUNNING", Duration::from_secs(10));
    let cg = format!("{}/{}", c.namespace, id);
    let candidates = [
        PathBuf::from(format!("/sys/fs/cgroup/unified/{cg}/hugetlb.2MB.max")),
        PathBuf::from(format!(
            "/sys/fs/cgroup/hugetlb/{cg}/hugetlb.2MB.limit_in_bytes"
        )),
        PathBuf::from(format!("/sys/fs/cgroup/{cg}/hugetlb.2MB.max")),
    ];
    let val = candidates
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_else(|| panic!("no hugetlb limit file among {candidates:?}"));
    assert_eq!(val.trim(), "4194304");

    // 2 pages fit; 4 more do not (fallocate on hugetlbfs charges the hugetlb cgroup).
    let o = c.ctr(&[
        "task", "exec", "--exec-id", "hp", &id, "sh", "-c",
        "fallocate -l 4194304 /hp/a && echo first-ok; fallocate -l 8388608 /hp/b; echo rc=$?; rm -f /hp/a /hp/b",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        out.contains("first-ok"),
        "4 MiB of hugepages within the limit failed: {out} {err}"
    );
    assert!(
        out.contains("rc=1"),
        "8 MiB more hugepages were allowed over a 4 MiB limit: {out} {err}"
    );
    assert!(err.contains("No space left on device"), "stderr: {err}");
    c.remove(&id);
    c.assert_no_leaks(&[&id]);
}
