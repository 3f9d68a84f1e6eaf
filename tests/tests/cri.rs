//! Kubernetes pods through containerd's CRI plugin, as kubelet drives them, with the RuntimeClass
//! handler `tandem` (container mode).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tandem_tests::cri::{ContainerSpec, CriEnv, LinuxContainerResources, PodSpec};
use tandem_tests::{processes_matching, unique_id, BUSYBOX};

const TANDEM_TOML: &str = r#"mode = "container"
"#;

fn pod(env: &CriEnv, name: &str) -> PodSpec {
    PodSpec {
        name: name.into(),
        handler: "tandem".into(),
        log_dir: env.net.dir().join("logs").join(name),
        cgroup_parent: format!("/tandemtest-{name}"),
        annotations: HashMap::new(),
    }
}

fn busybox(name: &str, cmd: &[&str]) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        image: BUSYBOX.into(),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Shim processes of this containerd (they carry its socket in `-address`).
fn tandem_shims(env: &CriEnv) -> Vec<i32> {
    let sock = env.containerd.socket.to_string_lossy().into_owned();
    processes_matching(&sock)
        .into_iter()
        .filter(|(_, c)| c.contains("containerd-shim-tandem-v2"))
        .map(|(p, _)| p)
        .collect()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True when no container cgroup is left under the pod's cgroup parent in any hierarchy. The
/// parent itself is kubelet's (it makes and removes the pod cgroup), so the runtime leaves it;
/// the test removes it once empty, as kubelet would.
fn cgroup_gone(parent: &str) -> bool {
    tandem_tests::cgroup_hierarchies().iter().all(|h| {
        let dir = h.join(parent.trim_start_matches('/'));
        let children = std::fs::read_dir(&dir)
            .map(|rd| rd.flatten().filter(|e| e.path().is_dir()).count())
            .unwrap_or(0);
        if children == 0 {
            let _ = std::fs::remove_dir(&dir);
        }
        children == 0
    })
}

#[test]
fn kubelet_sequence_runs_a_pod_through_the_tandem_handler() {
    let mut env = CriEnv::start(TANDEM_TOML).expect("containerd with CRI");
    let name = unique_id("kpod");
    let spec = pod(&env, &name);
    let (pod_id, pod_cfg) = env.cri.run_pod(&spec).expect("RunPodSandbox");
    let st = env.cri.pod_status(&pod_id).expect("PodSandboxStatus");
    let ip = st
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    assert!(
        ip.starts_with("198.19."),
        "pod IP {ip:?} from the test range"
    );

    let cid = env
        .cri
        .create_container(
            &pod_id,
            &pod_cfg,
            &busybox("app", &["sh", "-c", "echo started; exec sleep 1000"]),
        )
        .expect("CreateContainer");
    env.cri.start_container(&cid).expect("StartContainer");

    // ExecSync: runs in the container, sees the pod's hostname and network.
    let r = env
        .cri
        .exec_sync(
            &cid,
            &["sh", "-c", "hostname; ip -4 addr show eth0; exit 4"],
        )
        .expect("ExecSync");
    let out = String::from_utf8_lossy(&r.stdout);
    assert_eq!(r.exit_code, 4, "exit code of ExecSync: {out}");
    assert!(out.starts_with(&name), "hostname is the pod's: {out}");
    assert!(out.contains(&ip), "eth0 has the pod IP {ip}: {out}");

    let cs = env.cri.container_status(&cid).expect("ContainerStatus");
    assert_eq!(cs.state, 1, "CONTAINER_RUNNING: {cs:?}");
    let listed = env.cri.list_containers(&pod_id).expect("ListContainers");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, cid);
    assert!(env
        .cri
        .list_pods()
        .expect("ListPodSandbox")
        .iter()
        .any(|p| p.id == pod_id));

    // Stats come from the container's cgroup.
    let stats = env.cri.container_stats(&cid).expect("ContainerStats");
    let mem = stats
        .memory
        .and_then(|m| m.working_set_bytes)
        .map(|v| v.value)
        .unwrap_or(0);
    assert!(mem > 0, "working set from the memory cgroup: {mem}");
    let cpu = stats
        .cpu
        .and_then(|c| c.usage_core_nano_seconds)
        .map(|v| v.value)
        .unwrap_or(0);
    assert!(cpu > 0, "cpu usage from the cgroup: {cpu}");

    // The container's stdout reaches the CRI log file.
    let log = spec.log_dir.join("app.log");
    wait_for(
        "CRI log has the container's output",
        Duration::from_secs(5),
        || {
            std::fs::read_to_string(&log)
                .map(|s| s.contains(" stdout F started"))
                .unwrap_or(false)
        },
    );

    // UpdateContainerResources: the new cpuset is visible inside.
    env.cri
        .update_resources(
            &cid,
            LinuxContainerResources {
                cpuset_cpus: "1".into(),
                cpu_shares: 2,
                ..Default::default()
            },
        )
        .expect("UpdateContainerResources");
    let r = env
        .cri
        .exec_sync(&cid, &["grep", "Cpus_allowed_list", "/proc/self/status"])
        .expect("ExecSync after update");
    assert_eq!(
        String::from_utf8_lossy(&r.stdout).trim(),
        "Cpus_allowed_list:\t1"
    );

    // One shim serves the pod (sandbox and container).
    assert_eq!(tandem_shims(&env).len(), 1, "one shim process per pod");

    env.cri.stop_container(&cid, 2).expect("StopContainer");
    assert_eq!(
        env.cri.container_status(&cid).expect("status").state,
        2,
        "CONTAINER_EXITED"
    );
    env.cri.remove_container(&cid).expect("RemoveContainer");
    env.cri.stop_pod(&pod_id).expect("StopPodSandbox");
    env.cri.remove_pod(&pod_id).expect("RemovePodSandbox");

    wait_for("the pod's shim exits", Duration::from_secs(5), || {
        tandem_shims(&env).is_empty()
    });
    wait_for(
        "the pod's cgroups are removed",
        Duration::from_secs(5),
        || cgroup_gone(&spec.cgroup_parent),
    );
    assert!(
        processes_matching(&pod_id).is_empty(),
        "no process names the pod"
    );
}

#[test]
fn containers_of_a_pod_share_localhost_and_one_shim() {
    let mut env = CriEnv::start(TANDEM_TOML).expect("containerd with CRI");
    let name = unique_id("lpod");
    let spec = pod(&env, &name);
    let (pod_id, pod_cfg) = env.cri.run_pod(&spec).expect("RunPodSandbox");
    let server = env
        .cri
        .create_container(
            &pod_id,
            &pod_cfg,
            &busybox(
                "server",
                &["httpd", "-f", "-p", "127.0.0.1:8080", "-h", "/etc"],
            ),
        )
        .expect("create server");
    env.cri.start_container(&server).expect("start server");
    let client = env
        .cri
        .create_container(&pod_id, &pod_cfg, &busybox("client", &["sleep", "1000"]))
        .expect("create client");
    env.cri.start_container(&client).expect("start client");

    let mut body = String::new();
    wait_for(
        "client fetches from server over localhost",
        Duration::from_secs(10),
        || {
            let r = env
                .cri
                .exec_sync(&client, &["wget", "-qO-", "http://127.0.0.1:8080/passwd"])
                .expect("ExecSync wget");
            body = String::from_utf8_lossy(&r.stdout).into_owned();
            r.exit_code == 0
        },
    );
    assert!(body.starts_with("root:x:0:0"), "served /etc/passwd: {body}");
    assert_eq!(tandem_shims(&env).len(), 1, "one shim for three containers");

    env.cri.teardown_pod(&pod_id).expect("teardown");
    wait_for("the pod's shim exits", Duration::from_secs(5), || {
        tandem_shims(&env).is_empty()
    });
    wait_for(
        "the pod's cgroups are removed",
        Duration::from_secs(5),
        || cgroup_gone(&spec.cgroup_parent),
    );
}

#[test]
fn pods_keep_running_across_a_containerd_restart() {
    let mut env = CriEnv::start(TANDEM_TOML).expect("containerd with CRI");
    let name = unique_id("rpod");
    let spec = pod(&env, &name);
    let (pod_id, pod_cfg) = env.cri.run_pod(&spec).expect("RunPodSandbox");
    let cid = env
        .cri
        .create_container(&pod_id, &pod_cfg, &busybox("app", &["sleep", "1000"]))
        .expect("CreateContainer");
    env.cri.start_container(&cid).expect("StartContainer");
    let shims = tandem_shims(&env);
    assert_eq!(shims.len(), 1);

    env.restart_containerd().expect("restart containerd");

    assert_eq!(tandem_shims(&env), shims, "the same shim survived");
    let cs = env
        .cri
        .container_status(&cid)
        .expect("status after restart");
    assert_eq!(cs.state, 1, "still running after restart: {cs:?}");
    let r = env
        .cri
        .exec_sync(&cid, &["echo", "again"])
        .expect("ExecSync after restart");
    assert_eq!(String::from_utf8_lossy(&r.stdout), "again\n");
    env.cri.teardown_pod(&pod_id).expect("teardown");
    wait_for("the pod's shim exits", Duration::from_secs(5), || {
        tandem_shims(&env).is_empty()
    });
    wait_for(
        "the pod's cgroups are removed",
        Duration::from_secs(5),
        || cgroup_gone(&spec.cgroup_parent),
    );
}

#[test]
fn refused_annotation_and_bad_handler_config_give_clear_errors() {
    // The handler's config allows no annotation: a pod asking for one is refused.
    let mut env = CriEnv::start(TANDEM_TOML).expect("containerd with CRI");
    let mut spec = pod(&env, &unique_id("apod"));
    spec.annotations
        .insert("io.tandem.mode".into(), "vm".into());
    let err = env
        .cri
        .run_pod(&spec)
        .expect_err("annotation must be refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("io.tandem.mode") && msg.contains("not allowed"),
        "error names the annotation: {msg}"
    );
    assert!(
        cgroup_gone(&spec.cgroup_parent),
        "nothing left of the refused pod"
    );

    // A broken tandem.toml: the error names the file and the key.
    std::fs::write(&env.tandem_config, "mode = \"container\"\nbogus = 1\n").unwrap();
    let spec = pod(&env, &unique_id("bpod"));
    let err = env.cri.run_pod(&spec).expect_err("bad config must fail");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("bogus") && msg.contains(&env.tandem_config.display().to_string()),
        "error names the key and the file: {msg}"
    );
    wait_for(
        "no shim left after the failed pods",
        Duration::from_secs(5),
        || tandem_shims(&env).is_empty(),
    );
}
