//! ConfigureNetwork (guest side): finds each NIC by MAC, renames it, sets MTU and addresses,
//! brings it up, then adds the routes. The commands are busybox `ip` (in the initramfs); the
//! request is checked first, and the command list is built by a pure function (unit-tested).

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::command;
use crate::reaper::Reaper;

/// The `ip` implementation used in the guest.
pub const IP: &str = "/bin/busybox";

/// One NIC to configure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    pub mac: String,
    pub name: String,
    pub mtu: u32,
    pub addresses: Vec<String>,
}

/// One route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dest: String,
    pub gateway: String,
    pub device: String,
}

fn parse_mac(s: &str) -> Result<String, String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6
        || !parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(format!("MAC {s:?}: want aa:bb:cc:dd:ee:ff"));
    }
    Ok(s.to_ascii_lowercase())
}

/// Checks an interface name: 1-15 characters of [A-Za-z0-9_.-], not "." or "..".
pub fn check_ifname(s: &str) -> Result<(), String> {
    if s.is_empty()
        || s.len() > 15
        || s == "."
        || s == ".."
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err(format!(
            "interface name {s:?}: 1 to 15 characters of A-Z a-z 0-9 _ . -"
        ));
    }
    Ok(())
}

/// Parses "addr/prefix" (prefix within the family's width).
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (a, p) = s
        .split_once('/')
        .ok_or_else(|| format!("address {s:?}: want addr/prefix"))?;
    let addr: IpAddr = a
        .parse()
        .map_err(|_| format!("address {s:?}: {a:?} is not an IP address"))?;
    let prefix: u8 = p
        .parse()
        .map_err(|_| format!("address {s:?}: bad prefix {p:?}"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(format!("address {s:?}: prefix {prefix} > {max}"));
    }
    Ok((addr, prefix))
}

/// Checks the request; every error names the field and value.
pub fn validate(ifaces: &[Iface], routes: &[Route]) -> Result<(), String> {
    if ifaces.len() > 64 || routes.len() > 1024 {
        return Err(format!(
            "{} interfaces, {} routes: too many",
            ifaces.len(),
            routes.len()
        ));
    }
    let mut names = Vec::new();
    let mut macs = Vec::new();
    for (i, f) in ifaces.iter().enumerate() {
        let mac = parse_mac(&f.mac).map_err(|e| format!("interfaces[{i}]: {e}"))?;
        check_ifname(&f.name).map_err(|e| format!("interfaces[{i}]: {e}"))?;
        if f.mtu != 0 && !(68..=65535).contains(&f.mtu) {
            return Err(format!("interfaces[{i}]: MTU {}: 68 to 65535", f.mtu));
        }
        for a in &f.addresses {
            parse_cidr(a).map_err(|e| format!("interfaces[{i}]: {e}"))?;
        }
        if names.contains(&f.name) || macs.contains(&mac) {
            return Err(format!(
                "interfaces[{i}]: name {} or MAC {} given twice",
                f.name, f.mac
            ));
        }
        names.push(f.name.clone());
        macs.push(mac);
    }
    for (i, r) in routes.iter().enumerate() {
        route_args(r).map_err(|e| format!("routes[{i}]: {e}"))?;
    }
    Ok(())
}

/// `ip` arguments (after the binary's `ip`) that add route `r`.
pub fn route_args(r: &Route) -> Result<Vec<String>, String> {
    let (v6, dest) = match r.dest.as_str() {
        "default" => (false, "default".to_string()),
        "default6" => (true, "default".to_string()),
        d => {
            let (a, _) = parse_cidr(d)?;
            (a.is_ipv6(), d.to_string())
        }
    };
    let mut args = vec![
        if v6 { "-6" } else { "-4" }.to_string(),
        "route".into(),
        "replace".into(),
        dest,
    ];
    if !r.gateway.is_empty() {
        let gw: IpAddr = r
            .gateway
            .parse()
            .map_err(|_| format!("gateway {:?}: not an IP address", r.gateway))?;
        if gw.is_ipv6() != v6 {
            return Err(format!(
                "gateway {} is not of the family of {}",
                r.gateway, r.dest
            ));
        }
        args.extend(["via".into(), r.gateway.clone()]);
    }
    if !r.device.is_empty() {
        check_ifname(&r.device).map_err(|e| format!("device: {e}"))?;
        args.extend(["dev".into(), r.device.clone()]);
    }
    Ok(args)
}

/// The `ip` argument lists that configure interface `f`, currently named `current`.
pub fn iface_plan(f: &Iface, current: &str) -> Vec<Vec<String>> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let mut plan = vec![s(&["link", "set", "dev", current, "down"])];
    if current != f.name {
        plan.push(s(&["link", "set", "dev", current, "name", &f.name]));
    }
    if f.mtu != 0 {
        plan.push(s(&[
            "link",
            "set",
            "dev",
            &f.name,
            "mtu",
            &f.mtu.to_string(),
        ]));
    }
    plan.push(s(&["addr", "flush", "dev", &f.name]));
    for a in &f.addresses {
        plan.push(s(&["addr", "add", a, "dev", &f.name]));
    }
    plan.push(s(&["link", "set", "dev", &f.name, "up"]));
    plan
}

/// The interface under `sys_class_net` whose address is `mac`.
pub fn find_by_mac(sys_class_net: &Path, mac: &str) -> Option<String> {
    let want = mac.to_ascii_lowercase();
    std::fs::read_dir(sys_class_net)
        .ok()?
        .flatten()
        .find(|e| {
            std::fs::read_to_string(e.path().join("address"))
                .map(|a| a.trim().eq_ignore_ascii_case(&want))
                .unwrap_or(false)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

fn ip(reaper: &Reaper, args: &[String]) -> Result<(), String> {
    ip_in(reaper, None, args)
}

/// `busybox ip <args>`, in the network namespace at `netns` when given.
pub(crate) fn ip_in(reaper: &Reaper, netns: Option<&Path>, args: &[String]) -> Result<(), String> {
    let mut argv = vec![IP.to_string()];
    if let Some(ns) = netns {
        argv.extend([
            "nsenter".to_string(),
            format!("--net={}", ns.display()),
            IP.to_string(),
        ]);
    }
    argv.push("ip".into());
    argv.extend(args.iter().cloned());
    let o = command::run(
        reaper,
        command::Spec {
            argv,
            timeout: Some(Duration::from_secs(10)),
            ..Default::default()
        },
    )
    .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if o.exit_code != 0 {
        return Err(format!(
            "ip {}{}: exit {} signal {}: {}",
            args.join(" "),
            netns
                .map(|n| format!(" (in {})", n.display()))
                .unwrap_or_default(),
            o.exit_code,
            o.signal,
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(())
}

/// An `ifreq` naming `name`, and a datagram socket to ask about it.
fn ifreq_for(name: &str) -> Result<(libc::ifreq, std::os::fd::OwnedFd), String> {
    let bytes = name.as_bytes();
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() || bytes.contains(&0) {
        return Err(format!("link {name:?}: not an interface name"));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("link {name}: socket: {e}"))?;
    Ok((req, sock))
}

/// The flags (IFF_*) of the link `name` in the calling thread's network namespace.
pub fn link_flags(name: &str) -> Result<libc::c_int, String> {
    use std::os::fd::AsRawFd;
    let (mut req, sock) = ifreq_for(name)?;
    // SAFETY: SIOCGIFFLAGS writes ifru_flags of the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(format!(
            "link {name}: SIOCGIFFLAGS: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: the member SIOCGIFFLAGS filled.
    Ok(unsafe { req.ifr_ifru.ifru_flags } as u16 as libc::c_int)
}

/// Set IFF_UP on the link `name` of the calling thread's network namespace: two ioctls instead
/// of a forked `ip` (which cost ~0.08 s of every pod start under TCG).
pub fn link_up(name: &str) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let flags = link_flags(name)?;
    if flags & libc::IFF_UP != 0 {
        return Ok(());
    }
    let (mut req, sock) = ifreq_for(name)?;
    req.ifr_ifru.ifru_flags = (flags | libc::IFF_UP) as u16 as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(format!(
            "link {name}: SIOCSIFFLAGS: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// How long a NIC may take to appear (a hot-added one is probed after the request can arrive).
const NIC_WAIT: Duration = Duration::from_secs(10);

/// Configures the interfaces and routes; returns the names in request order.
pub fn configure(
    reaper: &Reaper,
    ifaces: &[Iface],
    routes: &[Route],
) -> Result<Vec<String>, String> {
    validate(ifaces, routes)?;
    let sys = Path::new("/sys/class/net");
    let mut done = Vec::new();
    link_up("lo")?;
    for f in ifaces {
        let deadline = Instant::now() + NIC_WAIT;
        let current = loop {
            if let Some(n) = find_by_mac(sys, &f.mac) {
                break n;
            }
            if Instant::now() > deadline {
                return Err(format!("no NIC with MAC {} within {NIC_WAIT:?}", f.mac));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        for args in iface_plan(f, &current) {
            ip(reaper, &args).map_err(|e| format!("interface {} ({}): {e}", f.name, f.mac))?;
        }
        done.push(f.name.clone());
    }
    for r in routes {
        let args = route_args(r)?;
        ip(reaper, &args)?;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    /// `lo` of a fresh network namespace is down; link_up brings it up (checked by a second
    /// SIOCGIFFLAGS), a second call is a no-op, a missing link is an error naming it.
    #[test]
    fn link_up_sets_iff_up_in_a_fresh_netns() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (a new network namespace)");
            return;
        }
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
            assert_eq!(super::link_flags("lo").unwrap() & libc::IFF_UP, 0);
            super::link_up("lo").unwrap();
            assert_ne!(super::link_flags("lo").unwrap() & libc::IFF_UP, 0);
            super::link_up("lo").unwrap();
            let e = super::link_up("nosuch0").unwrap_err();
            assert!(e.contains("nosuch0") && e.contains("SIOCGIFFLAGS"), "{e}");
            let e = super::link_up("a-name-far-too-long").unwrap_err();
            assert!(e.contains("not an interface name"), "{e}");
        })
        .join()
        .unwrap();
    }

    use super::*;

    fn iface() -> Iface {
        Iface {
            mac: "02:AA:00:00:00:01".into(),
            name: "eth0".into(),
            mtu: 1400,
            addresses: vec!["198.18.5.2/24".into(), "2001:db8::2/64".into()],
        }
    }

    #[test]
    fn validation_names_the_field() {
        validate(&[iface()], &[]).unwrap();
        let mut f = iface();
        f.mac = "02:aa".into();
        assert!(validate(&[f], &[])
            .unwrap_err()
            .contains("interfaces[0]: MAC"));
        let mut f = iface();
        f.name = "a/b".into();
        assert!(validate(&[f], &[]).unwrap_err().contains("interface name"));
        let mut f = iface();
        f.addresses = vec!["198.18.5.2/33".into()];
        assert!(validate(&[f], &[]).unwrap_err().contains("prefix 33"));
        let mut f = iface();
        f.mtu = 10;
        assert!(validate(&[f], &[]).unwrap_err().contains("MTU 10"));
        assert!(validate(&[iface(), iface()], &[])
            .unwrap_err()
            .contains("twice"));
        let r = Route {
            dest: "default".into(),
            gateway: "2001:db8::1".into(),
            device: "eth0".into(),
        };
        assert!(validate(&[], &[r])
            .unwrap_err()
            .contains("routes[0]: gateway"));
    }

    #[test]
    fn plans() {
        let p = iface_plan(&iface(), "ens3");
        let lines: Vec<String> = p.iter().map(|a| a.join(" ")).collect();
        assert_eq!(
            lines,
            [
                "link set dev ens3 down",
                "link set dev ens3 name eth0",
                "link set dev eth0 mtu 1400",
                "addr flush dev eth0",
                "addr add 198.18.5.2/24 dev eth0",
                "addr add 2001:db8::2/64 dev eth0",
                "link set dev eth0 up",
            ]
        );
        let r = route_args(&Route {
            dest: "default".into(),
            gateway: "198.18.5.1".into(),
            device: "eth0".into(),
        })
        .unwrap();
        assert_eq!(
            r.join(" "),
            "-4 route replace default via 198.18.5.1 dev eth0"
        );
        let r = route_args(&Route {
            dest: "2001:db8:1::/48".into(),
            gateway: String::new(),
            device: String::new(),
        })
        .unwrap();
        assert_eq!(r.join(" "), "-6 route replace 2001:db8:1::/48");
    }

    #[test]
    fn finds_nic_by_mac_in_a_fake_sysfs() {
        let d = tempfile::tempdir().unwrap();
        for (n, m) in [("lo", "00:00:00:00:00:00"), ("ens3", "02:aa:00:00:00:01")] {
            std::fs::create_dir(d.path().join(n)).unwrap();
            std::fs::write(d.path().join(n).join("address"), format!("{m}\n")).unwrap();
        }
        assert_eq!(
            find_by_mac(d.path(), "02:AA:00:00:00:01").as_deref(),
            Some("ens3")
        );
        assert_eq!(find_by_mac(d.path(), "02:aa:00:00:00:02"), None);
    }
}
