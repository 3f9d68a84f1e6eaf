//! End to end: a VM pod's network. The pod netns and its peer are made as CNI would; the guest
//! (QEMU, TCG, the real image from vmm/guest/build.sh) gets the pod interface through the tap
//! mirror and ConfigureNetwork, and the pod IP answers ping from the peer.

use super::*;

use tandem_agent::client::{AgentClient, Command as GuestCommand};
use tandem_vmm::qemu::{Qemu, QemuConfig};
use tandem_vmm::{AgentChannel, Hypervisor, MemoryConfig, VcpuConfig, VmConfig};

use tandem_agent::guest_image::GuestImage as Guest;

fn guest() -> Guest {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap();
    tandem_agent::guest_image::build(&root, false).unwrap_or_else(|e| panic!("{e}"))
}

fn guest_sh(client: &AgentClient, script: &str) -> (Option<i32>, String) {
    let out = client
        .run_command(&GuestCommand {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            timeout: Duration::from_secs(20),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("guest `{script}`: {e}"));
    (
        out.exit_code,
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn pod_ip_answers_from_the_guest() {
    let g = guest();
    let (pod, peer) = pod_and_peer("198.18.72");
    let net = setup(&pod.path()).expect("setup");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let cfg = VmConfig {
        kernel: g.kernel,
        boot: Default::default(),
        initrd: Some(g.initrd),
        cmdline: "console=ttyS0 quiet panic=-1".into(),
        vcpus: vec![VcpuConfig { host_cpu: None }],
        memory: MemoryConfig {
            size_mib: 256,
            ..Default::default()
        },
        nics: net.nics(),
        disks: vec![],
        vsock: None,
        serial_log: Some(dir.path().join("console.log")),
        agent: Some(AgentChannel::SerialPort {
            socket: socket.clone(),
        }),
        netns: Some(pod.path()),
    };
    let started = Instant::now();
    let mut vm = Qemu::new(QemuConfig::new(dir.path().join("run")))
        .start(&cfg)
        .expect("start qemu in the pod netns");
    let client = AgentClient::connect(&socket, Duration::from_secs(20)).unwrap();
    client
        .version_within(Duration::from_secs(90))
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nconsole:\n{}",
                std::fs::read_to_string(dir.path().join("console.log")).unwrap_or_default()
            )
        });
    let booted = started.elapsed();
    let t0 = Instant::now();
    client
        .configure_network(&net.agent_interfaces(), &net.agent_routes())
        .expect("ConfigureNetwork");
    eprintln!(
        "agent up {booted:?} after QEMU start; ConfigureNetwork took {:?}",
        t0.elapsed()
    );
    let (code, out) = guest_sh(&client, "ip addr show eth0; ip route");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("inet 198.18.72.2/24"), "{out}");
    assert!(out.contains("default via 198.18.72.1 dev eth0"), "{out}");

    // The pod IP answers from the guest, seen from the peer (the CNI side of the veth).
    let t0 = Instant::now();
    let ping = peer.exec(&["busybox", "ping", "-c", "3", "-W", "5", "198.18.72.2"]);
    assert!(
        ping.status.success(),
        "ping the pod IP: {}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&ping.stdout));
    eprintln!("3 pings took {:?}", t0.elapsed());
    // And the guest reaches its gateway (tap -> eth0 direction, routed by the guest).
    let (code, out) = guest_sh(&client, "/bin/busybox ping -c 1 -W 5 198.18.72.1");
    assert_eq!(code, Some(0), "{out}");

    // A bad request is refused by the agent, naming the field.
    let mut bad = net.agent_interfaces();
    bad[0].addresses = vec!["198.18.72.2/40".into()];
    let e = client.configure_network(&bad, &[]).unwrap_err().to_string();
    assert!(e.contains("prefix 40"), "{e}");

    drop(client);
    vm.stop().expect("stop");
    teardown(&net).expect("teardown");
    assert!(!pod
        .exec(&["ip", "link", "show", "tap0_eth0"])
        .status
        .success());
}
