//! User namespaces per pod (`[userns] mode = "pod"`) through a real containerd: ctr (every
//! container its own pod) and the CRI client (a sandbox and its containers). Each test uses its
//! own ID pool so that tests running in parallel never see each other's ranges in the host-wide
//! allocation file (/run/containerd-tandem/idmap/idmap.json).

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tandem_tests::cri::{ContainerSpec, CriEnv, PodSpec};
use tandem_tests::*;

const RANGE: u32 = 65536;
const ALLOC_FILE: &str = "/run/containerd-tandem/idmap/idmap.json";

/// A pool of `n` ranges that no other test uses: 16 ranges apart per test number, far above
/// the default pool.
fn pool_start(test_no: u32) -> u32 {
    1_000_000_000 + test_no * 16 * RANGE
}

fn config(test_no: u32, n: u32) -> String {
    format!(
        "mode = \"container\"\n[userns]\nmode = \"pod\"\npool_start = {}\npool_size = {}\n",
        pool_start(test_no),
        n * RANGE
    )
}

/// The pod's root (an unprivileged host ID) must be able to reach the bundle's rootfs, as in
/// containerd's own state dir (0711): the harness's temp dir is 0700.
fn searchable(dir: &std::path::Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
}

fn setup(test_no: u32, n: u32) -> (Containerd, String) {
    let c = Containerd::start(Some(&config(test_no, n))).expect("start containerd");
    searchable(c.dir());
    c.import_busybox();
    let cfg = c.runtime_config.clone().unwrap();
    let cfg = cfg.to_str().unwrap().to_string();
    (c, cfg)
}

/// The host-wide allocations: key `<namespace>/<pod id>` -> (start, size).
fn allocations() -> HashMap<String, (u32, u32)> {
    let Ok(text) = std::fs::read(ALLOC_FILE) else {
        return HashMap::new();
    };
    let v: serde_json::Value = serde_json::from_slice(&text).expect("allocation file is JSON");
    v["allocations"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, r)| {
                    (
                        k.clone(),
                        (
                            r["start"].as_u64().unwrap() as u32,
                            r["size"].as_u64().unwrap() as u32,
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn allocation(ns: &str, id: &str) -> Option<(u32, u32)> {
    allocations().get(&format!("{ns}/{id}")).copied()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `0 <start> <size>` of /proc/<pid>/uid_map (one line expected).
fn uid_map(pid: i32, file: &str) -> (u32, u32, u32) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
    let f: Vec<u32> = text
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(f.len(), 3, "{file} of {pid}: {text}");
    (f[0], f[1], f[2])
}

/// The 4 IDs of the `Uid:` or `Gid:` line of /proc/<pid>/status.
fn status_ids(pid: i32, key: &str) -> Vec<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find(|l| l.starts_with(key))
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect()
}

fn exec(c: &Containerd, id: &str, cmd: &[&str]) -> (i32, String, String) {
    let exec_id = unique_id("x");
    let mut args = vec!["task", "exec", "--exec-id", &exec_id, id];
    args.extend_from_slice(cmd);
    let o = c.ctr(&args);
    (
        exit_code(&o.status),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn run_detached_cfg(c: &Containerd, cfg: &str, extra: &[&str], id: &str) {
    let mut e = vec!["--runtime-config-path", cfg];
    e.extend_from_slice(extra);
    c.run_detached(&e, id, &["sleep", "1000"]);
}

fn assert_disjoint(ranges: &[(String, u32)]) {
    for (i, (a, ra)) in ranges.iter().enumerate() {
        for (b, rb) in &ranges[i + 1..] {
            assert!(
                ra + RANGE <= *rb || rb + RANGE <= *ra,
                "{a} at {ra} overlaps {b} at {rb}"
            );
        }
    }
}

#[test]
fn root_inside_is_the_mapped_id_outside() {
    let (c, cfg) = setup(1, 4);
    let id = unique_id("usr");
    run_detached_cfg(&c, &cfg, &[], &id);
    let (start, size) = allocation(&c.namespace, &id).expect("the pod holds a range");
    assert_eq!(size, RANGE);
    assert!(start >= pool_start(1) && start < pool_start(1) + 4 * RANGE);
    let pid = c.task_pid(&id);
    assert_eq!(uid_map(pid, "uid_map"), (0, start, RANGE));
    assert_eq!(uid_map(pid, "gid_map"), (0, start, RANGE));
    assert_eq!(status_ids(pid, "Uid:"), vec![start; 4]);
    assert_eq!(status_ids(pid, "Gid:"), vec![start; 4]);
    let (code, out, err) = exec(
        &c,
        &id,
        &["sh", "-c", "id -u; id -g; cat /proc/self/uid_map"],
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["0", "0"], "{out}");
    assert_eq!(
        lines[2].split_whitespace().collect::<Vec<_>>(),
        ["0", &start.to_string(), "65536"]
    );
    // the image appears with its real ownership (idmapped rootfs), and root may write to it
    let (code, out, err) = exec(
        &c,
        &id,
        &[
            "sh",
            "-c",
            "stat -c '%u:%g' /bin /etc/passwd && touch /etc/made-inside && stat -c %u /etc/made-inside",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "0:0\n0:0\n0\n");
    c.remove(&id);
    assert_eq!(allocation(&c.namespace, &id), None, "range not released");
    c.assert_no_leaks(&[&id]);
}

#[test]
fn host_volumes_plain_and_idmapped() {
    let (c, cfg) = setup(2, 2);
    let id = unique_id("vol");
    let dir = c.dir().join("vol");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "host root only\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let plain = format!("type=bind,src={},dst=/v,options=rbind:rw", dir.display());
    let idm = format!(
        "type=bind,src={},dst=/w,options=rbind:rw:idmap",
        dir.display()
    );
    run_detached_cfg(&c, &cfg, &["--mount", &plain, "--mount", &idm], &id);
    let (start, _) = allocation(&c.namespace, &id).unwrap();
    // plain bind: root inside writes as its host ID and cannot read a host-root 0600 file
    let (code, out, err) = exec(&c, &id, &["sh", "-c", "touch /v/by-pod; cat /v/secret"]);
    assert_ne!(code, 0, "a 0600 host-root file was readable: {out}");
    assert!(
        err.contains("Permission denied") || out.contains("Permission denied"),
        "{out} {err}"
    );
    let m = std::fs::metadata(dir.join("by-pod")).unwrap();
    assert_eq!((m.uid(), m.gid()), (start, start));
    let (_, out, _) = exec(&c, &id, &["stat", "-c", "%u", "/v/secret"]);
    assert_eq!(
        out.trim(),
        "65534",
        "unmapped host root shows as the overflow ID"
    );
    // idmapped bind: host ownership appears as it is; root inside writes as host root
    let (code, out, err) = exec(
        &c,
        &id,
        &[
            "sh",
            "-c",
            "stat -c %u /w/secret; cat /w/secret; touch /w/by-pod-idmap",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "0\nhost root only\n");
    let m = std::fs::metadata(dir.join("by-pod-idmap")).unwrap();
    assert_eq!((m.uid(), m.gid()), (0, 0));
    c.remove(&id);
    c.assert_no_leaks(&[&id]);
}

#[test]
fn pods_get_disjoint_ranges_also_concurrently() {
    let (c, cfg) = setup(3, 8);
    let seq: Vec<String> = (0..2).map(|i| unique_id(&format!("seq{i}"))).collect();
    for id in &seq {
        run_detached_cfg(&c, &cfg, &[], id);
    }
    let par: Vec<String> = (0..4).map(|i| unique_id(&format!("par{i}"))).collect();
    std::thread::scope(|s| {
        for id in &par {
            let (c, cfg) = (&c, &cfg);
            s.spawn(move || run_detached_cfg(c, cfg, &[], id));
        }
    });
    let mut ranges = Vec::new();
    for id in seq.iter().chain(&par) {
        let pid = c.task_pid(id);
        let (_, host, size) = uid_map(pid, "uid_map");
        assert_eq!(size, RANGE);
        assert_eq!(allocation(&c.namespace, id), Some((host, RANGE)));
        assert!(host >= pool_start(3) && host + RANGE <= pool_start(3) + 8 * RANGE);
        ranges.push((id.clone(), host));
    }
    assert_disjoint(&ranges);
    let ids: Vec<&str> = ranges.iter().map(|(i, _)| i.as_str()).collect();
    for id in &ids {
        c.remove(id);
        assert_eq!(allocation(&c.namespace, id), None);
    }
    c.assert_no_leaks(&ids);
}

#[test]
fn ranges_survive_a_containerd_restart_and_come_back_after_removal() {
    let (mut c, cfg) = setup(4, 4);
    let a = unique_id("a");
    run_detached_cfg(&c, &cfg, &[], &a);
    let (ra, _) = allocation(&c.namespace, &a).unwrap();
    c.restart().expect("restart containerd");
    let b = unique_id("b");
    run_detached_cfg(&c, &cfg, &[], &b);
    let (rb, _) = allocation(&c.namespace, &b).unwrap();
    assert_ne!(ra, rb, "a new pod got the range of a living one");
    assert_eq!(uid_map(c.task_pid(&a), "uid_map").1, ra);
    // removal gives the range back: the next pod gets the lowest free one, a's
    c.remove(&a);
    assert_eq!(allocation(&c.namespace, &a), None);
    let d = unique_id("d");
    run_detached_cfg(&c, &cfg, &[], &d);
    assert_eq!(allocation(&c.namespace, &d).unwrap().0, ra.min(rb));
    c.remove(&b);
    c.remove(&d);
    c.assert_no_leaks(&[&a, &b, &d]);
    assert_eq!(allocation(&c.namespace, &b), None);
}

#[test]
fn a_killed_shim_gives_the_range_back_through_delete() {
    let (c, cfg) = setup(5, 2);
    let a = unique_id("k");
    run_detached_cfg(&c, &cfg, &[], &a);
    assert!(allocation(&c.namespace, &a).is_some());
    for p in c.shim_pids() {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::SIGKILL).unwrap();
    }
    // containerd runs `<shim> delete` for the dead shim
    let _ = c.ctr(&["task", "delete", "-f", &a]);
    wait_for("range released", Duration::from_secs(10), || {
        allocation(&c.namespace, &a).is_none()
    });
    c.ctr_ok(&["container", "rm", &a]);
    c.assert_no_leaks(&[&a]);
}

#[test]
fn cap_net_admin_works_in_the_pod_netns_only() {
    let (c, cfg) = setup(6, 2);
    let id = unique_id("net");
    // the host's network namespace, pinned where the pod's root may open it
    let pin = c.dir().join("hostnet");
    std::fs::write(&pin, "").unwrap();
    let o = std::process::Command::new("mount")
        .args(["--bind", "/proc/self/ns/net"])
        .arg(&pin)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let hostnet = format!(
        "type=bind,src={},dst=/hostnet,options=rbind:ro",
        pin.display()
    );
    let script = "set -e; ip link add a0 type veth peer name b0; \
        ip link add link a0 name m0 type macvlan; ip link set dev a0 mtu 1400; \
        ip link show a0 | grep -q 'mtu 1400'; ip link show m0 >/dev/null; echo made; \
        ip link add link a0 name v10 type vlan id 10 2>&1 || echo vlan-refused; \
        nsenter --net=/hostnet ip link set lo mtu 1400 2>&1 || echo hostnet-refused";
    let (code, out, err) = c.run_rm(
        &[
            "--runtime-config-path",
            &cfg,
            "--cap-add",
            "CAP_NET_ADMIN",
            "--cap-add",
            "CAP_SYS_ADMIN",
            "--mount",
            &hostnet,
        ],
        &id,
        &["sh", "-c", script],
    );
    assert_eq!(code, 0, "{out} {err}\n{}", c.log_tail(20));
    assert!(out.contains("made"), "{out}");
    // the host kernel has no 802.1Q (CONFIG_VLAN_8021Q unset): refused as for host root
    assert!(out.contains("vlan-refused"), "{out}");
    let _ = std::process::Command::new("umount").arg(&pin).output();
    assert!(
        out.contains("hostnet-refused"),
        "setns into the host netns was allowed: {out}"
    );
    // the host's lo keeps its MTU; nothing of the pod's shows in the host netns
    let lo = std::fs::read_to_string("/sys/class/net/lo/mtu").unwrap();
    assert_eq!(lo.trim(), "65536");
    // without CAP_NET_ADMIN the same is refused
    let id2 = unique_id("nonet");
    let (code, out, err) = c.run_rm(
        &["--runtime-config-path", &cfg],
        &id2,
        &["sh", "-c", "ip link add a0 type veth peer name b0"],
    );
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("not permitted") || out.contains("not permitted"),
        "{out} {err}"
    );
    c.assert_no_leaks(&[&id, &id2]);
}

#[test]
fn exhausted_pool_fails_clearly_and_leaves_nothing() {
    let (c, cfg) = setup(7, 1);
    let a = unique_id("full");
    run_detached_cfg(&c, &cfg, &[], &a);
    let b = unique_id("none");
    let (code, out, err) = c.run_rm(&["--runtime-config-path", &cfg], &b, &["true"]);
    assert_ne!(code, 0, "{out}");
    let pool = format!("{}-{}", pool_start(7), pool_start(7) + RANGE);
    assert!(
        err.contains("exhausted") && err.contains(&pool) && err.contains("all 1 ranges"),
        "{err}"
    );
    let _ = c.ctr(&["container", "rm", &b]);
    assert_eq!(allocation(&c.namespace, &b), None);
    c.remove(&a);
    c.assert_no_leaks(&[&a, &b]);
}

#[test]
fn pool_over_host_ids_is_refused() {
    let c = Containerd::start(Some(
        "[userns]\nmode = \"pod\"\npool_start = 1000\npool_size = 65536\n",
    ))
    .unwrap();
    c.import_busybox();
    let cfg = c.runtime_config.clone().unwrap();
    let id = unique_id("lowpool");
    let (code, _, err) = c.run_rm(
        &["--runtime-config-path", cfg.to_str().unwrap()],
        &id,
        &["true"],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("1000-66536")
            && err.contains("below 65536")
            && err.contains("runtime-config.toml"),
        "{err}"
    );
    let _ = c.ctr(&["container", "rm", &id]);
    c.assert_no_leaks(&[&id]);
    assert_eq!(allocation(&c.namespace, &id), None);
}

/// A spec of `ctr run --config`: busybox rootfs dir, the given mappings.
fn spec_with(c: &Containerd, id: &str, args: &[&str]) -> (serde_json::Value, PathBuf) {
    let rootfs = c.dir().join(format!("rootfs-{id}"));
    unpack_busybox_rootfs(&rootfs).unwrap();
    (base_spec(c, id, &rootfs, args), rootfs)
}

fn run_config(
    c: &Containerd,
    cfg: &str,
    id: &str,
    spec: &serde_json::Value,
) -> (i32, String, String) {
    let path = c.dir().join(format!("{id}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(spec).unwrap()).unwrap();
    let rt = runtime();
    let o = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        &rt,
        "--runtime-config-path",
        cfg,
        "--config",
        path.to_str().unwrap(),
        id,
    ]);
    (
        exit_code(&o.status),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn mappings_in_the_spec_are_honoured_and_bad_ones_refused() {
    let (c, cfg) = setup(8, 2);
    // given mappings (as containerd 2.x puts them for hostUsers: false): used, nothing allocated
    let id = unique_id("given");
    let (mut spec, _) = spec_with(&c, &id, &["cat", "/proc/self/uid_map"]);
    let given = pool_start(8) + 8 * RANGE; // outside the pool
    spec["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "user"}));
    let maps = serde_json::json!([{"containerID": 0, "hostID": given, "size": RANGE}]);
    spec["linux"]["uidMappings"] = maps.clone();
    spec["linux"]["gidMappings"] = maps;
    let (code, out, err) = run_config(&c, &cfg, &id, &spec);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["0", &given.to_string(), "65536"]
    );
    assert_eq!(allocation(&c.namespace, &id), None);
    c.assert_no_leaks(&[&id]);
    // a bad mapping: size 0
    let id = unique_id("badmap");
    spec["linux"]["uidMappings"] =
        serde_json::json!([{"containerID": 0, "hostID": given, "size": 0}]);
    let (code, _, err) = run_config(&c, &cfg, &id, &spec);
    assert_ne!(code, 0);
    assert!(
        err.contains("linux.uidMappings") && err.contains("size"),
        "{err}"
    );
    let _ = c.ctr(&["container", "rm", &id]);
    c.assert_no_leaks(&[&id]);
    // a create that fails after the range was taken gives it back
    let id = unique_id("noprog");
    let (spec, _) = spec_with(&c, &id, &["/no/such/program"]);
    let (code, _, err) = run_config(&c, &cfg, &id, &spec);
    assert_ne!(code, 0);
    assert!(err.contains("/no/such/program"), "{err}");
    let _ = c.ctr(&["container", "rm", &id]);
    c.assert_no_leaks(&[&id]);
    assert_eq!(
        allocation(&c.namespace, &id),
        None,
        "range kept after a failed create"
    );
}

const CRI_TOML_HEAD: &str = "mode = \"container\"\n";

fn cri_pod(env: &CriEnv, name: &str) -> PodSpec {
    PodSpec {
        name: name.into(),
        handler: "tandem".into(),
        log_dir: env.net.dir().join("logs").join(name),
        cgroup_parent: format!("/tandemtest-{name}"),
        annotations: HashMap::new(),
    }
}

#[test]
fn cri_pod_shares_one_user_namespace_and_owns_its_network() {
    let toml = format!(
        "{CRI_TOML_HEAD}[userns]\nmode = \"pod\"\npool_start = {}\npool_size = {}\n",
        pool_start(9),
        4 * RANGE
    );
    let mut env = CriEnv::start(&toml).expect("CRI env");
    searchable(env.containerd.dir());
    let name = unique_id("upod");
    let spec = cri_pod(&env, &name);
    let (pod_id, pod_cfg) = env.cri.run_pod(&spec).expect("RunPodSandbox");
    let (start, _) = allocation("k8s.io", &pod_id).expect("the sandbox holds the pod's range");
    let ctr = ContainerSpec {
        name: "app".into(),
        image: BUSYBOX.into(),
        command: vec!["sleep".into(), "1000".into()],
        add_capabilities: vec!["NET_ADMIN".into()],
        ..Default::default()
    };
    let cid = env
        .cri
        .create_container(&pod_id, &pod_cfg, &ctr)
        .expect("CreateContainer");
    env.cri.start_container(&cid).expect("StartContainer");
    let r = env
        .cri
        .exec_sync(&cid, &["sh", "-c", "id -u; cat /proc/self/uid_map; readlink /proc/self/ns/user; readlink /proc/self/ns/net"])
        .unwrap();
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    assert_eq!(
        r.exit_code,
        0,
        "{out} {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "0");
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["0", &start.to_string(), "65536"]
    );
    // the app container is in the sandbox's user and network namespaces
    let sandbox_pid = processes_matching("/pause")
        .into_iter()
        .map(|(p, _)| p)
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/uid_map"))
                .is_ok_and(|m| m.split_whitespace().nth(1) == Some(&start.to_string()))
        })
        .expect("the pod's pause process");
    let ns = |p: i32, n: &str| std::fs::read_link(format!("/proc/{p}/ns/{n}")).unwrap();
    assert_eq!(lines[2], ns(sandbox_pid, "user").to_str().unwrap());
    assert_eq!(lines[3], ns(sandbox_pid, "net").to_str().unwrap());
    assert_eq!(status_ids(sandbox_pid, "Uid:"), vec![start; 4]);
    // CNI's interface is in the pod's own network namespace, with its address
    let ip = env.cri.pod_status(&pod_id).unwrap().network.unwrap().ip;
    assert!(ip.starts_with("198.19."), "{ip}");
    let r = env
        .cri
        .exec_sync(
            &cid,
            &[
                "sh",
                "-c",
                "set -e; ip addr show eth0 | grep -q \"inet $0/\"; ip route | grep -q default; \
                 ip link add link eth0 name m0 type macvlan; ip link set dev eth0 mtu 1400; \
                 ip link show eth0 | grep -q 'mtu 1400'; ip link show m0 >/dev/null; echo ok",
                &ip,
            ],
        )
        .unwrap();
    assert_eq!(
        (r.exit_code, String::from_utf8_lossy(&r.stdout).trim()),
        (0, "ok"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    // the pod's network still reaches the bridge (the gateway) on the host
    let gw = ip.rsplit_once('.').unwrap().0.to_string() + ".1";
    let r = env
        .cri
        .exec_sync(&cid, &["ping", "-c", "1", "-W", "2", &gw])
        .unwrap();
    assert_eq!(
        r.exit_code,
        0,
        "ping {gw}: {}",
        String::from_utf8_lossy(&r.stdout)
    );
    env.cri.teardown_pod(&pod_id).expect("teardown");
    assert_eq!(
        allocation("k8s.io", &pod_id),
        None,
        "range not released with the pod"
    );
}
