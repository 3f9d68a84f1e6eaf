use super::*;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[test]
fn tap_names_fit_ifnamsiz() {
    assert_eq!(tap_name(0, "eth0"), "tap0_eth0");
    assert_eq!(tap_name(12, "a-long-ifname0"), "tap12_a-long-if");
    assert!(tap_name(3, "abcdefghijklmno").len() <= 15);
}

#[test]
fn parses_ip_json() {
    let links: Vec<Value> = serde_json::from_str(
        r#"[{"ifindex":1,"ifname":"lo","mtu":65536,"link_type":"loopback","address":"00:00:00:00:00:00"},
            {"ifindex":2,"ifname":"eth0","mtu":1450,"link_type":"ether","address":"0a:58:c6:12:00:05"},
            {"ifindex":3,"ifname":"tap0_eth0","mtu":1450,"link_type":"ether","address":"aa:bb:cc:dd:ee:ff",
             "linkinfo":{"info_kind":"tun"}}]"#,
    )
    .unwrap();
    assert_eq!(
        links_to_mirror(&links),
        [("eth0".to_string(), [0x0a, 0x58, 0xc6, 0x12, 0, 5], 1450)]
    );
    let addrs: Vec<Value> = serde_json::from_str(
        r#"[{"ifname":"eth0","addr_info":[
            {"family":"inet","local":"198.18.0.5","prefixlen":24,"scope":"global"},
            {"family":"inet6","local":"2001:db8::5","prefixlen":64,"scope":"global"},
            {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}]}]"#,
    )
    .unwrap();
    assert_eq!(addresses_of(&addrs), ["198.18.0.5/24", "2001:db8::5/64"]);
    let names = vec!["eth0".to_string()];
    let r4: Vec<Value> = serde_json::from_str(
        r#"[{"dst":"default","gateway":"198.18.0.1","dev":"eth0","flags":[]},
            {"dst":"198.18.0.0/24","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"198.18.0.5"},
            {"dst":"198.19.0.7","gateway":"198.18.0.1","dev":"eth0"},
            {"dst":"198.19.1.0/24","dev":"other"}]"#,
    )
    .unwrap();
    assert_eq!(
        routes_of(&r4, false, &names),
        [
            PodRoute {
                dest: "default".into(),
                gateway: "198.18.0.1".into(),
                device: "eth0".into()
            },
            PodRoute {
                dest: "198.19.0.7/32".into(),
                gateway: "198.18.0.1".into(),
                device: "eth0".into()
            },
        ]
    );
    let r6: Vec<Value> = serde_json::from_str(
        r#"[{"dst":"fe80::/64","dev":"eth0","protocol":"kernel"},
            {"type":"multicast","dst":"ff00::/8","dev":"eth0","protocol":"kernel"},
            {"dst":"default","gateway":"2001:db8::1","dev":"eth0","protocol":"static"}]"#,
    )
    .unwrap();
    assert_eq!(
        routes_of(&r6, true, &names),
        [PodRoute {
            dest: "default6".into(),
            gateway: "2001:db8::1".into(),
            device: "eth0".into()
        }]
    );
}

#[test]
fn a_missing_netns_is_named() {
    let e = setup(Path::new("/nonexistent/netns/pod")).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/netns/pod"), "{e}");
    // Teardown after CRI removed the netns: nothing to do.
    teardown(&PodNetwork {
        netns: "/nonexistent/netns/pod".into(),
        interfaces: vec![],
        routes: vec![],
    })
    .unwrap();
}

/// A named netns (`ip netns add`), deleted on drop.
struct TestNetns {
    name: String,
}

impl TestNetns {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "tnd-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        sh(&["ip", "netns", "add", &name]);
        TestNetns { name }
    }
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }
    fn exec(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A pod netns with eth0 (`pod_ip`/24, default route via `.1`) wired by a veth to a peer netns
/// holding `.1`, as the CNI bridge/ptp plugins would leave it.
fn pod_and_peer(subnet: &str) -> (TestNetns, TestNetns) {
    let pod = TestNetns::new("pod");
    let peer = TestNetns::new("peer");
    sh(&[
        "ip", "-n", &peer.name, "link", "add", "veth0", "type", "veth", "peer", "name", "eth0",
        "netns", &pod.name,
    ]);
    sh(&[
        "ip",
        "-n",
        &peer.name,
        "addr",
        "add",
        &format!("{subnet}.1/24"),
        "dev",
        "veth0",
    ]);
    sh(&["ip", "-n", &peer.name, "link", "set", "veth0", "up"]);
    sh(&[
        "ip",
        "-n",
        &pod.name,
        "addr",
        "add",
        &format!("{subnet}.2/24"),
        "dev",
        "eth0",
    ]);
    sh(&["ip", "-n", &pod.name, "link", "set", "eth0", "up"]);
    sh(&["ip", "-n", &pod.name, "link", "set", "lo", "up"]);
    sh(&[
        "ip",
        "-n",
        &pod.name,
        "route",
        "add",
        "default",
        "via",
        &format!("{subnet}.1"),
    ]);
    (pod, peer)
}

/// Opens the persistent tap `name` inside `netns` (as QEMU would) from a short-lived thread.
fn open_tap(netns: &Path, name: &str) -> File {
    let netns = netns.to_path_buf();
    let name = name.to_string();
    std::thread::spawn(move || {
        let ns = File::open(&netns).unwrap();
        // SAFETY: this thread only; it ends right after.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        let flags: u16 = 0x0002 | 0x1000; // IFF_TAP | IFF_NO_PI
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF with a 40-byte ifreq.
        let r = unsafe { libc::ioctl(tun.as_raw_fd(), 0x400454ca, ifr.as_mut_ptr()) };
        assert_eq!(
            r,
            0,
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        );
        tun
    })
    .join()
    .unwrap()
}

/// Next frame from the tap whose ethertype is `ethertype`, within `timeout`.
fn read_frame(tap: &mut File, ethertype: u16, timeout: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut p = libc::pollfd {
            fd: tap.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, left.as_millis() as i32) } != 1 {
            continue;
        }
        let n = tap.read(&mut buf).unwrap();
        if n >= 14 && u16::from_be_bytes([buf[12], buf[13]]) == ethertype {
            return Some(buf[..n].to_vec());
        }
    }
}

fn mac_of(netns: &TestNetns, dev: &str) -> [u8; 6] {
    let out = netns.exec(&["cat", &format!("/sys/class/net/{dev}/address")]);
    parse_mac(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
}

/// Both directions of the mirror, with the tap opened here instead of by a VM: the peer's ARP
/// request for the pod IP comes out of the tap; an ARP reply written into the tap reaches the
/// peer, which then sends its ICMP echo, which comes out of the tap too.
#[test]
fn mirrors_the_pod_interface_onto_a_tap_and_tears_down() {
    let (pod, peer) = pod_and_peer("198.18.71");
    let net = setup(&pod.path()).expect("setup");
    assert_eq!(net.interfaces.len(), 1);
    let i = &net.interfaces[0];
    assert_eq!((i.name.as_str(), i.tap.as_str()), ("eth0", "tap0_eth0"));
    assert_eq!(i.addresses, ["198.18.71.2/24"]);
    assert_eq!(i.mac, mac_of(&pod, "eth0"));
    assert_eq!(
        net.routes,
        [PodRoute {
            dest: "default".into(),
            gateway: "198.18.71.1".into(),
            device: "eth0".into()
        }]
    );
    assert_eq!(net.nics()[0].tap, "tap0_eth0");
    assert_eq!(
        net.agent_interfaces()[0].mac,
        tandem_vmm::qemu::mac_string(&i.mac)
    );
    let filters = String::from_utf8_lossy(
        &pod.exec(&["tc", "filter", "show", "dev", "eth0", "ingress"])
            .stdout,
    )
    .into_owned();
    assert!(
        filters.contains("mirred") && filters.contains("tap0_eth0"),
        "{filters}"
    );

    let mut tap = open_tap(&pod.path(), "tap0_eth0");
    let mut ping = Command::new("ip")
        .args([
            "netns",
            "exec",
            &peer.name,
            "busybox",
            "ping",
            "-c",
            "1",
            "-W",
            "5",
            "198.18.71.2",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let arp = read_frame(&mut tap, 0x0806, Duration::from_secs(5)).expect("ARP request on the tap");
    assert_eq!(&arp[38..42], &[198, 18, 71, 2], "ARP asks for the pod IP");
    let peer_mac: [u8; 6] = arp[6..12].try_into().unwrap();
    // ARP reply "198.18.71.2 is at <eth0's MAC>", as the guest NIC (with that MAC) would send.
    let mut reply = Vec::new();
    reply.extend(peer_mac);
    reply.extend(i.mac);
    reply.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
    reply.extend(i.mac);
    reply.extend([198, 18, 71, 2]);
    reply.extend(peer_mac);
    reply.extend([198, 18, 71, 1]);
    tap.write_all(&reply).unwrap();
    let icmp = read_frame(&mut tap, 0x0800, Duration::from_secs(5)).expect("ICMP echo on the tap");
    assert_eq!(icmp[14 + 9], 1, "IPv4 protocol ICMP");
    assert_eq!(&icmp[14 + 16..14 + 20], &[198, 18, 71, 2]);
    let _ = ping.kill();
    let _ = ping.wait();
    drop(tap);

    // Setting up twice is refused (the tap exists) and the first setup stays intact.
    assert!(setup(&pod.path()).is_err());
    assert!(pod
        .exec(&["ip", "link", "show", "tap0_eth0"])
        .status
        .success());

    teardown(&net).expect("teardown");
    assert!(!pod
        .exec(&["ip", "link", "show", "tap0_eth0"])
        .status
        .success());
    let qdiscs = String::from_utf8_lossy(&pod.exec(&["tc", "qdisc", "show", "dev", "eth0"]).stdout)
        .into_owned();
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
    teardown(&net).expect("teardown is idempotent");
}

mod vm;
