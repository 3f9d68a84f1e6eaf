//! Pod networking of VM pods, Kata's "tcfilter" model.
//!
//! CRI and CNI make the pod's network namespace with its interfaces (a veth `eth0` with the pod
//! IP, routes). For each interface except `lo`, [`setup`] makes a tap in that same namespace and
//! mirrors the two with tc: ingress of the interface is redirected to the tap's egress and the
//! tap's ingress to the interface's egress (`u32 match all action mirred egress redirect`). QEMU
//! runs inside the pod netns (`VmConfig.netns`) and opens the tap by name; the guest NIC gets the
//! interface's MAC, and the agent gives it the interface's name, MTU, addresses and routes
//! ([`PodNetwork::agent_interfaces`], [`PodNetwork::agent_routes`]). The pod IP then answers from
//! the guest. [`teardown`] removes the taps and the ingress qdiscs (the netns belongs to CRI).
//!
//! The work is done by iproute2's `ip` (JSON output) and `tc`, run inside the netns (setns between
//! fork and exec): tc over raw netlink would be a lot of code for little gain; each failing command
//! is named in the error with its stderr.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Errors of pod network setup; each names the namespace and the command or field.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The network namespace cannot be opened.
    #[error("network namespace {}: {source}", path.display())]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A command failed.
    #[error("network namespace {}: `{cmd}`: {reason}", netns.display())]
    Command {
        netns: PathBuf,
        cmd: String,
        reason: String,
    },
    /// The pod netns holds something this model cannot mirror.
    #[error("network namespace {}: {reason}", netns.display())]
    Unsupported { netns: PathBuf, reason: String },
}

type Result<T> = std::result::Result<T, NetError>;

/// One pod interface and the tap that mirrors it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInterface {
    /// Interface name in the pod netns (and in the guest), e.g. "eth0".
    pub name: String,
    /// Its MAC; the guest NIC gets the same.
    pub mac: [u8; 6],
    /// Its MTU.
    pub mtu: u32,
    /// Its global addresses, CIDR strings.
    pub addresses: Vec<String>,
    /// The tap made for it in the pod netns.
    pub tap: String,
}

/// A route of the pod netns (main table, not the kernel's own subnet routes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRoute {
    /// CIDR, "default" (IPv4) or "default6" (IPv6), as the agent takes it.
    pub dest: String,
    /// Gateway address; empty: on-link.
    pub gateway: String,
    /// Interface name.
    pub device: String,
}

/// What [`setup`] made; keep it (serialisable) for [`teardown`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodNetwork {
    /// The pod's netns path.
    pub netns: PathBuf,
    /// Interfaces mirrored, in order.
    pub interfaces: Vec<PodInterface>,
    /// Routes to give the guest.
    pub routes: Vec<PodRoute>,
}

impl PodNetwork {
    /// The NICs for the VM config (QEMU runs in `netns`, so it finds the taps by name).
    pub fn nics(&self) -> Vec<tandem_vmm::NicConfig> {
        self.interfaces
            .iter()
            .map(|i| tandem_vmm::NicConfig {
                tap: i.tap.clone(),
                mac: i.mac,
            })
            .collect()
    }

    /// The interfaces for the agent's ConfigureNetwork.
    pub fn agent_interfaces(&self) -> Vec<tandem_agent::client::NetInterface> {
        self.interfaces
            .iter()
            .map(|i| tandem_agent::client::NetInterface {
                mac: tandem_vmm::qemu::mac_string(&i.mac),
                name: i.name.clone(),
                mtu: i.mtu,
                addresses: i.addresses.clone(),
            })
            .collect()
    }

    /// The routes for the agent's ConfigureNetwork.
    pub fn agent_routes(&self) -> Vec<tandem_agent::client::NetRoute> {
        self.routes
            .iter()
            .map(|r| tandem_agent::client::NetRoute {
                dest: r.dest.clone(),
                gateway: r.gateway.clone(),
                device: r.device.clone(),
            })
            .collect()
    }
}

/// Runs iproute2 commands inside one netns.
struct Netns {
    path: PathBuf,
    file: File,
}

impl Netns {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| NetError::Netns {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Runs `prog args` in the netns; returns stdout, or an error naming the command.
    fn run<S: AsRef<OsStr>>(&self, prog: &str, args: &[S]) -> Result<String> {
        let shown = std::iter::once(prog.to_string())
            .chain(
                args.iter()
                    .map(|a| a.as_ref().to_string_lossy().into_owned()),
            )
            .collect::<Vec<_>>()
            .join(" ");
        let err = |reason: String| NetError::Command {
            netns: self.path.clone(),
            cmd: shown.clone(),
            reason,
        };
        let fd = self.file.as_raw_fd();
        let mut cmd = Command::new(prog);
        cmd.args(args).env("LC_ALL", "C");
        // SAFETY: only setns(2) runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // through the shim's reaper, which would otherwise take the command's exit (ECHILD)
        let out = crate::pod::vm::output(&mut cmd)
            .map_err(|e| err(format!("cannot run (iproute2 installed?): {e}")))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(err(format!("{}: {}", out.status, stderr.trim())));
        }
        String::from_utf8(out.stdout).map_err(|e| err(format!("output not UTF-8: {e}")))
    }

    fn json(&self, args: &[&str]) -> Result<Vec<Value>> {
        let out = self.run("ip", args)?;
        if out.trim().is_empty() {
            return Ok(Vec::new());
        }
        let v: Value = serde_json::from_str(&out).map_err(|e| NetError::Command {
            netns: self.path.clone(),
            cmd: format!("ip {}", args.join(" ")),
            reason: format!("bad JSON: {e}"),
        })?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }
}

/// The tap name for interface `index` named `ifname`: `tap<index>_<ifname>`, at most 15 bytes.
pub fn tap_name(index: usize, ifname: &str) -> String {
    let mut s = format!("tap{index}_{ifname}");
    while s.len() > 15 {
        s.pop();
    }
    s
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Interfaces to mirror from `ip -j link show` output: every ethernet link but our own taps.
fn links_to_mirror(links: &[Value]) -> Vec<(String, [u8; 6], u32)> {
    links
        .iter()
        .filter(|l| l["link_type"].as_str() == Some("ether"))
        .filter_map(|l| {
            let name = l["ifname"].as_str()?.to_string();
            let is_tap = l["linkinfo"]["info_kind"].as_str() == Some("tun");
            if is_tap || name == "lo" {
                return None;
            }
            let mac = parse_mac(l["address"].as_str()?)?;
            let mtu = l["mtu"].as_u64().unwrap_or(1500) as u32;
            Some((name, mac, mtu))
        })
        .collect()
}

/// Global addresses of one interface from `ip -j addr show dev X` output, as CIDRs.
fn addresses_of(addrs: &[Value]) -> Vec<String> {
    addrs
        .iter()
        .flat_map(|a| a["addr_info"].as_array().cloned().unwrap_or_default())
        .filter(|i| i["scope"].as_str() == Some("global"))
        .filter_map(|i| {
            Some(format!(
                "{}/{}",
                i["local"].as_str()?,
                i["prefixlen"].as_u64()?
            ))
        })
        .collect()
}

/// Routes from `ip -j [-6] route show table main` output, minus the kernel's own (subnet routes
/// come back in the guest when the address is added) and multicast/link-local ones.
fn routes_of(routes: &[Value], v6: bool, names: &[String]) -> Vec<PodRoute> {
    routes
        .iter()
        .filter(|r| r["protocol"].as_str() != Some("kernel"))
        .filter(|r| r["type"].as_str().is_none_or(|t| t == "unicast"))
        .filter_map(|r| {
            let dst = r["dst"].as_str()?;
            let device = r["dev"].as_str().unwrap_or("").to_string();
            if !device.is_empty() && !names.contains(&device) {
                return None;
            }
            let dest = if dst == "default" {
                if v6 { "default6" } else { "default" }.to_string()
            } else if dst.contains('/') {
                dst.to_string()
            } else {
                format!("{dst}/{}", if v6 { 128 } else { 32 })
            };
            if dest.starts_with("fe80:") || dest.starts_with("ff00:") {
                return None;
            }
            Some(PodRoute {
                dest,
                gateway: r["gateway"].as_str().unwrap_or("").to_string(),
                device,
            })
        })
        .collect()
}

/// Mirrors every interface of the pod netns at `netns` onto a new tap in it (see the module
/// doc). On error, whatever was made is removed again.
pub fn setup(netns: &Path) -> Result<PodNetwork> {
    let ns = Netns::open(netns)?;
    let links = ns.json(&["-j", "-d", "link", "show"])?;
    let mut interfaces = Vec::new();
    for (i, (name, mac, mtu)) in links_to_mirror(&links).into_iter().enumerate() {
        let addrs = ns.json(&["-j", "addr", "show", "dev", &name])?;
        interfaces.push(PodInterface {
            tap: tap_name(i, &name),
            addresses: addresses_of(&addrs),
            name,
            mac,
            mtu,
        });
    }
    if interfaces.is_empty() {
        return Err(NetError::Unsupported {
            netns: netns.to_path_buf(),
            reason: "no ethernet interface besides lo to give the VM".into(),
        });
    }
    for i in &interfaces {
        let taken = links
            .iter()
            .any(|l| l["ifname"].as_str() == Some(i.tap.as_str()));
        if taken {
            return Err(NetError::Unsupported {
                netns: netns.to_path_buf(),
                reason: format!(
                    "tap {} for {} exists already (pod network set up twice?)",
                    i.tap, i.name
                ),
            });
        }
    }
    let names: Vec<String> = interfaces.iter().map(|i| i.name.clone()).collect();
    let mut routes = routes_of(
        &ns.json(&["-j", "-4", "route", "show", "table", "main"])?,
        false,
        &names,
    );
    routes.extend(routes_of(
        &ns.json(&["-j", "-6", "route", "show", "table", "main"])?,
        true,
        &names,
    ));
    let net = PodNetwork {
        netns: netns.to_path_buf(),
        interfaces,
        routes,
    };
    let mut made = Vec::new();
    for iface in &net.interfaces {
        let r = mirror(&ns, iface);
        made.push(iface.clone());
        if let Err(e) = r {
            let partial = PodNetwork {
                interfaces: made,
                ..net.clone()
            };
            let _ = teardown_in(&ns, &partial);
            return Err(e);
        }
    }
    tracing::info!(netns = %netns.display(), interfaces = ?names, "pod network mirrored onto taps");
    Ok(net)
}

fn mirror(ns: &Netns, i: &PodInterface) -> Result<()> {
    let (dev, tap) = (i.name.as_str(), i.tap.as_str());
    ns.run("ip", &["tuntap", "add", "dev", tap, "mode", "tap"])?;
    ns.run(
        "ip",
        &["link", "set", "dev", tap, "mtu", &i.mtu.to_string(), "up"],
    )?;
    for (from, to) in [(dev, tap), (tap, dev)] {
        ns.run("tc", &["qdisc", "add", "dev", from, "ingress"])?;
        ns.run(
            "tc",
            &[
                "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match",
                "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
            ],
        )?;
    }
    Ok(())
}

fn teardown_in(ns: &Netns, net: &PodNetwork) -> Result<()> {
    let mut first_err = None;
    for i in &net.interfaces {
        // The interface's ingress qdisc (with its filter); the tap goes with its own.
        if let Err(e) = ns.run("tc", &["qdisc", "del", "dev", &i.name, "ingress"]) {
            if !is_gone(&e) {
                first_err.get_or_insert(e);
            }
        }
        if let Err(e) = ns.run("ip", &["link", "del", "dev", &i.tap]) {
            if !is_gone(&e) {
                first_err.get_or_insert(e);
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Errors that mean "already removed".
fn is_gone(e: &NetError) -> bool {
    let s = e.to_string();
    [
        "Cannot find device",
        "does not exist",
        "No such file",
        "Invalid handle",
        "Cannot delete qdisc with handle of zero",
        "Invalid argument",
    ]
    .iter()
    .any(|m| s.contains(m))
}

/// Removes the taps and ingress qdiscs [`setup`] made. Idempotent; a netns that is gone
/// already (CRI removed it) leaves nothing to do.
pub fn teardown(net: &PodNetwork) -> Result<()> {
    let ns = match Netns::open(&net.netns) {
        Ok(ns) => ns,
        Err(NetError::Netns { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(())
        }
        Err(e) => return Err(e),
    };
    teardown_in(&ns, net)
}

#[cfg(test)]
mod tests;
