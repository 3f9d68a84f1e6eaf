//! virtio-net on a tap device (no vhost-net here). The tap carries a 12-byte virtio_net_hdr_v1
//! before each frame, so frames pass through unchanged; no offloads are offered. RX reads the
//! tap (non-blocking, edge-triggered in the event loop) into the guest's buffers; TX writes each
//! chain as one frame. Chains are checked; a bad one completes with length 0.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use crate::config::NicConfig;
use crate::error::{Error, Result};
use crate::microvm::virtio::{Processed, VirtioDevice};

/// virtio device id of net.
pub const VIRTIO_ID_NET: u32 = 1;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
/// virtio_net_hdr_v1 length.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame with header we move (64 KiB of frame + header).
pub const MAX_FRAME: usize = 65536 + VNET_HDR_LEN;
/// RX queue index.
pub const RX: usize = 0;
/// TX queue index.
pub const TX: usize = 1;

const F_MAC: u64 = 1 << 5;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// An open tap device.
pub struct Tap {
    file: File,
    name: String,
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Opens (or creates) tap `name` in the caller's network namespace, non-blocking, with a
    /// virtio-net header on every frame.
    pub fn open(name: &str) -> Result<Self> {
        let err = |what: &str, e: std::io::Error| Error::Device {
            device: format!("tap {name}"),
            reason: format!("{what}: {e}"),
        };
        if name.is_empty() || name.len() > 15 {
            return Err(Error::invalid("tap", format!("{name:?}: 1 to 15 bytes")));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| Error::io("/dev/net/tun", e))?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads/writes an ifreq, which `req` is laid out as.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(err("TUNSETIFF", std::io::Error::last_os_error()));
        }
        let hdr = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(err("TUNSETVNETHDRSZ", std::io::Error::last_os_error()));
        }
        // SAFETY: TUNSETOFFLOAD takes an unsigned long by value.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
            return Err(err("TUNSETOFFLOAD", std::io::Error::last_os_error()));
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// The fd (for the event loop).
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// The net device.
pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    buf: Vec<u8>,
    /// A frame read from the tap that found no guest buffer yet.
    stashed: Option<usize>,
}

impl Net {
    /// Net device for `nic` (opens its tap).
    pub fn open(nic: &NicConfig) -> Result<Self> {
        Ok(Self {
            tap: Tap::open(&nic.tap)?,
            mac: nic.mac,
            buf: vec![0; MAX_FRAME],
            stashed: None,
        })
    }

    /// The tap fd: readable means RX work.
    pub fn tap_fd(&self) -> RawFd {
        self.tap.fd()
    }

    fn tx(&mut self, mem: &GuestMemoryMmap, q: &mut Queue, budget: usize) -> Processed {
        let mut done = Processed::default();
        while done.completed < budget {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                return done;
            };
            let head = chain.head_index();
            if let Ok(mut r) = Reader::new(mem, chain) {
                let n = r.available_bytes();
                if (VNET_HDR_LEN..=MAX_FRAME).contains(&n)
                    && r.read_exact(&mut self.buf[..n]).is_ok()
                {
                    if let Err(e) = self.tap.file.write(&self.buf[..n]) {
                        tracing::debug!("tap {}: frame of {n} bytes dropped: {e}", self.tap.name);
                    }
                }
            }
            if let Err(e) = q.add_used(mem, head, 0) {
                tracing::warn!("tap {}: add_used {head}: {e}", self.tap.name);
            }
            done.completed += 1;
        }
        done.more = has_avail(mem, q);
        done
    }

    fn rx(&mut self, mem: &GuestMemoryMmap, q: &mut Queue, budget: usize) -> Processed {
        let mut done = Processed::default();
        while done.completed < budget {
            let len = match self.stashed.take() {
                Some(n) => n,
                None => match self.tap.file.read(&mut self.buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return done,
                    Err(e) => {
                        tracing::warn!("tap {}: read: {e}", self.tap.name);
                        return done;
                    }
                },
            };
            if len < VNET_HDR_LEN {
                continue;
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                // No guest buffer: keep the frame until the guest posts some (RX notify).
                self.stashed = Some(len);
                return done;
            };
            let head = chain.head_index();
            // virtio_net_hdr_v1.num_buffers = 1.
            self.buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            let written = match Writer::new(mem, chain) {
                Ok(mut w) if w.available_bytes() >= len => match w.write_all(&self.buf[..len]) {
                    Ok(()) => len as u32,
                    Err(_) => 0,
                },
                _ => 0, // too small or outside guest memory: the frame is dropped
            };
            if let Err(e) = q.add_used(mem, head, written) {
                tracing::warn!("tap {}: add_used {head}: {e}", self.tap.name);
            }
            done.completed += 1;
        }
        done.more = true; // budget spent; the tap may hold more
        done
    }
}

fn has_avail(mem: &GuestMemoryMmap, q: &Queue) -> bool {
    q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .map(|i| i.0 != q.next_avail())
        .unwrap_or(false)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn name(&self) -> String {
        format!("virtio-net tap {}", self.tap.name)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        F_MAC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| self.mac.get(o as usize).copied())
                .unwrap_or(0);
        }
    }

    fn event_fd(&self) -> Option<(RawFd, usize)> {
        Some((self.tap.fd(), RX))
    }

    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        index: usize,
        queue: &mut Queue,
        budget: usize,
    ) -> Processed {
        match index {
            RX => self.rx(mem, queue, budget),
            TX => self.tx(mem, queue, budget),
            _ => Processed::default(),
        }
    }

    fn reset(&mut self) {
        self.stashed = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::microvm::virtio::testutil::{TestQueue, DATA};
    use vm_memory::{Bytes, GuestAddress};

    const ETHERTYPE: [u8; 2] = [0x88, 0xb5]; // local experimental

    /// Runs `f` on a thread in a fresh network namespace (the tap and its traffic stay there and
    /// vanish with it).
    fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            // SAFETY: affects only this thread's network namespace.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            f()
        })
        .join()
        .unwrap()
    }

    fn link_up(name: &str) {
        // SAFETY: plain socket + SIOC[GS]IFFLAGS on an ifreq-sized buffer.
        unsafe {
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            assert!(s >= 0);
            let mut req = IfReq {
                name: [0; 16],
                flags: 0,
                _pad: [0; 22],
            };
            req.name[..name.len()].copy_from_slice(name.as_bytes());
            assert_eq!(libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req), 0);
            req.flags |= libc::IFF_UP as libc::c_short;
            assert_eq!(libc::ioctl(s, libc::SIOCSIFFLAGS, &mut req), 0);
            libc::close(s);
        }
    }

    /// AF_PACKET socket on `name`: sees what the device writes to the tap, and sends into it.
    fn packet_socket(name: &str) -> i32 {
        let cname = std::ffi::CString::new(name).unwrap();
        // SAFETY: plain socket calls with properly sized structures.
        unsafe {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            let s = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                proto as i32,
            );
            assert!(s >= 0);
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = libc::if_nametoindex(cname.as_ptr()) as i32;
            assert!(sll.sll_ifindex > 0);
            let r = libc::bind(
                s,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(r, 0);
            let tv = libc::timeval {
                tv_sec: 5,
                tv_usec: 0,
            };
            libc::setsockopt(
                s,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
            s
        }
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend([0x02, 0, 0, 0, 0, 0x99]);
        f.extend(ETHERTYPE);
        f.extend(payload);
        f.resize(60.max(f.len()), 0);
        f
    }

    fn nic(name: &str) -> NicConfig {
        NicConfig {
            tap: name.into(),
            mac: [0x02, 0, 0, 0, 0, 0x01],
        }
    }

    #[test]
    fn tx_frames_reach_the_tap_and_bad_chains_are_dropped() {
        in_netns(|| {
            let mut net = Net::open(&nic("tndtx0")).unwrap();
            link_up("tndtx0");
            let ps = packet_socket("tndtx0");
            let mut tq = TestQueue::new(16);
            let mut q = tq.queue();
            // A chain outside guest memory, a device-writable-only chain, then a good frame.
            tq.chain(0, &[(0xffff_0000, 64, false)]);
            tq.chain(1, &[(DATA, 64, true)]);
            let f = frame(b"tandem-tx");
            tq.mem
                .write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(DATA))
                .unwrap();
            tq.mem
                .write_slice(&f, GuestAddress(DATA + VNET_HDR_LEN as u64))
                .unwrap();
            // Header and frame split over two descriptors.
            tq.chain(
                2,
                &[
                    (DATA, VNET_HDR_LEN as u32, false),
                    (DATA + VNET_HDR_LEN as u64, f.len() as u32, false),
                ],
            );
            let p = net.process_queue(&tq.mem, TX, &mut q, 8);
            assert_eq!(
                p,
                Processed {
                    completed: 3,
                    more: false,
                    kick: 0
                }
            );
            assert_eq!(tq.used_idx(), 3);
            let mut buf = [0u8; 2048];
            loop {
                // SAFETY: reading into a local buffer.
                let n = unsafe { libc::recv(ps, buf.as_mut_ptr() as *mut _, buf.len(), 0) };
                assert!(n > 0, "no frame from the tap");
                if buf[12..14] == ETHERTYPE {
                    assert_eq!(&buf[..n as usize], &f[..]);
                    break;
                }
            }
            // SAFETY: our fd.
            unsafe { libc::close(ps) };
        });
    }

    #[test]
    fn rx_frames_reach_guest_buffers_and_wait_for_them() {
        in_netns(|| {
            let mut net = Net::open(&nic("tndrx0")).unwrap();
            link_up("tndrx0");
            let ps = packet_socket("tndrx0");
            let mut tq = TestQueue::new(32);
            let mut q = tq.queue();
            let f = frame(b"tandem-rx");
            // SAFETY: sending a local buffer on our bound socket.
            let n = unsafe { libc::send(ps, f.as_ptr() as *const _, f.len(), 0) };
            assert_eq!(n as usize, f.len());
            let mut pfd = libc::pollfd {
                fd: net.tap_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1);
            // No guest buffers yet: nothing is consumed, the frame waits.
            let p = net.process_queue(&tq.mem, RX, &mut q, 8);
            assert_eq!(p.completed, 0);
            // A buffer too small for any frame is completed empty.
            tq.chain(0, &[(DATA, 10, true)]);
            // The first frame in the tap (ours, or one the kernel sent on link-up) is dropped
            // into it; send ours again so that it is still there for the real buffers.
            net.process_queue(&tq.mem, RX, &mut q, 8);
            // SAFETY: sending a local buffer on our bound socket.
            let n = unsafe { libc::send(ps, f.as_ptr() as *const _, f.len(), 0) };
            assert_eq!(n as usize, f.len());
            // Then room for several frames (the kernel may send others, e.g. IPv6 MLD).
            for i in 0..8u16 {
                tq.chain(1 + i, &[(DATA + 0x1000 * (1 + i as u64), 2048, true)]);
            }
            let mut found = false;
            for _ in 0..5 {
                net.process_queue(&tq.mem, RX, &mut q, 8);
                for u in 0..tq.used_idx() {
                    let (id, len) = tq.used(u);
                    if id == 0 {
                        assert_eq!(len, 0, "frame written into a 10-byte buffer");
                        continue;
                    }
                    let mut got = vec![0u8; len as usize];
                    tq.mem
                        .read_slice(&mut got, GuestAddress(DATA + 0x1000 * id as u64))
                        .unwrap();
                    if got.len() > VNET_HDR_LEN + 14
                        && got[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == ETHERTYPE
                    {
                        assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers");
                        assert_eq!(&got[VNET_HDR_LEN..], &f[..]);
                        found = true;
                    }
                }
                if found {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            assert!(found, "frame not delivered to the guest");
            // SAFETY: our fd.
            unsafe { libc::close(ps) };
        });
    }

    #[test]
    fn config_space_holds_the_mac_and_bad_taps_are_named() {
        in_netns(|| {
            let net = Net::open(&nic("tndcfg0")).unwrap();
            let mut mac = [0u8; 8];
            net.read_config(0, &mut mac);
            assert_eq!(&mac[..6], &[0x02, 0, 0, 0, 0, 0x01]);
            assert_eq!(&mac[6..], &[0, 0]);
            let e = Net::open(&nic("x".repeat(16).as_str()))
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("xxxxxxxxxxxxxxxx"), "{e}");
        });
    }
}
