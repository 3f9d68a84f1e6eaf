//! virtio-vsock whose host side is a unix socket (no /dev/vhost-vsock here), in the style of
//! Firecracker's hybrid vsock:
//! - host → guest: a host client connects to `uds_path` and writes `CONNECT <port>\n`; once the
//!   guest accepts, it reads `OK <host port>\n` and then the stream;
//! - guest → host: a guest connection to CID 2 port P is connected to `<uds_path>_P`.
//!
//! Stream sockets only. Every packet from the guest is checked (header size, CIDs, type, length
//! against the chain); bad ones are dropped or answered with RST. Credit-based flow control both
//! ways bounds what either side buffers.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::config::VsockConfig;
use crate::error::{Error, Result};
use crate::microvm::virtio::{Processed, VirtioDevice};

/// virtio device id of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
/// RX queue.
pub const RX: usize = 0;
/// TX queue.
pub const TX: usize = 1;
/// Packet header length.
pub const HDR_LEN: usize = 44;
/// Host CID.
pub const HOST_CID: u64 = 2;
/// Largest payload we accept from the guest in one packet.
pub const MAX_PKT: usize = 64 * 1024;
/// Receive buffer we advertise per connection.
pub const BUF_ALLOC: u32 = 256 * 1024;

/// Operations.
pub mod op {
    /// Connect.
    pub const REQUEST: u16 = 1;
    /// Accept.
    pub const RESPONSE: u16 = 2;
    /// Reset.
    pub const RST: u16 = 3;
    /// Shut down.
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Credit update.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Credit request.
    pub const CREDIT_REQUEST: u16 = 7;
}
const TYPE_STREAM: u16 = 1;

/// A vsock packet header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hdr {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Flags.
    pub flags: u32,
    /// Sender's receive buffer.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed.
    pub fwd_cnt: u32,
}

impl Hdr {
    /// Parses 44 little-endian bytes.
    pub fn parse(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().expect("2 bytes"));
        Hdr {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Serialises to 44 bytes.
    pub fn bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// (host port, guest port).
type Key = (u32, u32);

struct Conn {
    stream: UnixStream,
    established: bool,
    /// Host client waiting for `OK` (host-initiated connection).
    host_initiated: bool,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Bytes from the guest written to the stream.
    fwd_cnt: u32,
    /// Guest data not yet written to the stream (bounded by our BUF_ALLOC credit).
    out: Vec<u8>,
}

impl Conn {
    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// The vsock device.
pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<Key, Conn>,
    by_fd: HashMap<RawFd, Key>,
    /// Host clients that have not sent their CONNECT line yet.
    pending: HashMap<RawFd, (UnixStream, Vec<u8>)>,
    rx: VecDeque<(Hdr, Vec<u8>)>,
    next_port: u32,
}

const LISTENER: u64 = u64::MAX;

impl Vsock {
    /// Listens on `uds_path` (which must not exist).
    pub fn open(cfg: &VsockConfig) -> Result<Self> {
        let listener =
            UnixListener::bind(&cfg.uds_path).map_err(|e| Error::io(&cfg.uds_path, e))?;
        let derr = |e: std::io::Error| Error::Device {
            device: format!("virtio-vsock {}", cfg.uds_path.display()),
            reason: e.to_string(),
        };
        listener.set_nonblocking(true).map_err(derr)?;
        let epoll = Epoll::new().map_err(derr)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER),
            )
            .map_err(derr)?;
        Ok(Self {
            cid: cfg.cid as u64,
            uds_path: cfg.uds_path.clone(),
            listener,
            epoll,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            pending: HashMap::new(),
            rx: VecDeque::new(),
            next_port: 1 << 30,
        })
    }

    fn reply(&mut self, to: &Hdr, op: u16) {
        let h = Hdr {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self
                .conns
                .get(&(to.dst_port, to.src_port))
                .map(|c| c.fwd_cnt)
                .unwrap_or(0),
            ..Default::default()
        };
        self.rx.push_back((h, Vec::new()));
    }

    fn close(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            self.by_fd.remove(&c.stream.as_raw_fd());
        }
    }

    fn watch(&mut self, key: Key, stream: &UnixStream) {
        let fd = stream.as_raw_fd();
        if self
            .epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            )
            .is_ok()
        {
            self.by_fd.insert(fd, key);
        }
    }

    /// One packet from the guest.
    fn handle_guest_packet(&mut self, h: Hdr, data: &[u8]) {
        if h.src_cid != self.cid || h.dst_cid != HOST_CID || h.type_ != TYPE_STREAM {
            return; // not for us or not a stream: dropped
        }
        let key = (h.dst_port, h.src_port);
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            op::REQUEST => {
                if self.conns.contains_key(&key) {
                    self.reply(&h, op::RST);
                    return;
                }
                let path = format!("{}_{}", self.uds_path.display(), h.dst_port);
                match UnixStream::connect(&path) {
                    Ok(s) if s.set_nonblocking(true).is_ok() => {
                        self.watch(key, &s);
                        self.conns.insert(
                            key,
                            Conn {
                                stream: s,
                                established: true,
                                host_initiated: false,
                                peer_buf_alloc: h.buf_alloc,
                                peer_fwd_cnt: h.fwd_cnt,
                                tx_cnt: 0,
                                fwd_cnt: 0,
                                out: Vec::new(),
                            },
                        );
                        self.reply(&h, op::RESPONSE);
                    }
                    _ => self.reply(&h, op::RST),
                }
            }
            op::RESPONSE => match self.conns.get_mut(&key) {
                Some(c) if c.host_initiated && !c.established => {
                    c.established = true;
                    let line = format!("OK {}\n", h.dst_port);
                    if c.stream.write_all(line.as_bytes()).is_err() {
                        self.close(key);
                        self.reply(&h, op::RST);
                    }
                }
                _ => self.reply(&h, op::RST),
            },
            op::RW => {
                let Some(c) = self.conns.get_mut(&key).filter(|c| c.established) else {
                    self.reply(&h, op::RST);
                    return;
                };
                if c.out.len() + data.len() > BUF_ALLOC as usize {
                    // The guest ignored our credit.
                    self.close(key);
                    self.reply(&h, op::RST);
                    return;
                }
                c.out.extend_from_slice(data);
                let mut written = 0;
                while written < c.out.len() {
                    match c.stream.write(&c.out[written..]) {
                        Ok(0) => break,
                        Ok(n) => written += n,
                        Err(_) => break, // EAGAIN: kept in `out`; others: seen on read
                    }
                }
                c.out.drain(..written);
                c.fwd_cnt = c.fwd_cnt.wrapping_add(written as u32);
                if written > 0 {
                    self.reply(&h, op::CREDIT_UPDATE);
                }
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => self.reply(&h, op::CREDIT_UPDATE),
            op::SHUTDOWN => {
                self.close(key);
                self.reply(&h, op::RST);
            }
            op::RST => self.close(key),
            _ => self.reply(&h, op::RST),
        }
    }

    /// Host-side events: new clients, CONNECT lines, stream data within the guest's credit.
    fn poll_host(&mut self) {
        let mut events = vec![EpollEvent::default(); 32];
        let n = self.epoll.wait(0, &mut events).unwrap_or(0);
        for ev in &events[..n] {
            let token = ev.data();
            if token == LISTENER {
                while let Ok((s, _)) = self.listener.accept() {
                    if s.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = s.as_raw_fd();
                    if self
                        .epoll
                        .ctl(
                            ControlOperation::Add,
                            fd,
                            EpollEvent::new(EventSet::IN, fd as u64),
                        )
                        .is_ok()
                    {
                        self.pending.insert(fd, (s, Vec::new()));
                    }
                }
                continue;
            }
            let fd = token as RawFd;
            if self.pending.contains_key(&fd) {
                self.host_connect_line(fd);
            } else if let Some(&key) = self.by_fd.get(&fd) {
                self.host_data(key);
            }
        }
    }

    fn host_connect_line(&mut self, fd: RawFd) {
        let Some((s, line)) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut b = [0u8; 64];
        let done = match s.read(&mut b) {
            Ok(0) => Err(()),
            Ok(n) => {
                line.extend_from_slice(&b[..n]);
                if line.len() > 64 {
                    Err(())
                } else {
                    Ok(line.contains(&b'\n'))
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(_) => Err(()),
        };
        let port = match done {
            Ok(false) => return,
            Ok(true) => std::str::from_utf8(line)
                .ok()
                .and_then(|l| l.trim_end().strip_prefix("CONNECT "))
                .and_then(|p| p.parse::<u32>().ok()),
            Err(()) => None,
        };
        let (s, _) = self.pending.remove(&fd).expect("present");
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let Some(port) = port else {
            return; // bad request line: the client is dropped
        };
        let local = self.next_port;
        self.next_port = self.next_port.wrapping_add(1).max(1 << 30);
        let key = (local, port);
        self.watch(key, &s);
        self.conns.insert(
            key,
            Conn {
                stream: s,
                established: false,
                host_initiated: true,
                peer_buf_alloc: 0,
                peer_fwd_cnt: 0,
                tx_cnt: 0,
                fwd_cnt: 0,
                out: Vec::new(),
            },
        );
        self.rx.push_back((
            Hdr {
                src_cid: HOST_CID,
                dst_cid: self.cid,
                src_port: local,
                dst_port: port,
                type_: TYPE_STREAM,
                op: op::REQUEST,
                buf_alloc: BUF_ALLOC,
                ..Default::default()
            },
            Vec::new(),
        ));
    }

    fn host_data(&mut self, key: Key) {
        let cid = self.cid;
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if !c.established {
            return;
        }
        let room = (c.credit() as usize).min(MAX_PKT);
        let mut hdr = Hdr {
            src_cid: HOST_CID,
            dst_cid: cid,
            src_port: key.0,
            dst_port: key.1,
            type_: TYPE_STREAM,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: c.fwd_cnt,
            ..Default::default()
        };
        if room == 0 {
            hdr.op = op::CREDIT_REQUEST;
            self.rx.push_back((hdr, Vec::new()));
            return;
        }
        let mut buf = vec![0u8; room];
        match c.stream.read(&mut buf) {
            Ok(0) => {
                hdr.op = op::SHUTDOWN;
                hdr.flags = 3;
                self.rx.push_back((hdr, Vec::new()));
                self.close(key);
            }
            Ok(n) => {
                buf.truncate(n);
                c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                hdr.op = op::RW;
                hdr.len = n as u32;
                self.rx.push_back((hdr, buf));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => {
                hdr.op = op::RST;
                self.rx.push_back((hdr, Vec::new()));
                self.close(key);
            }
        }
    }

    fn tx(&mut self, mem: &GuestMemoryMmap, q: &mut Queue, budget: usize) -> Processed {
        let mut done = Processed::default();
        let mut data = Vec::new();
        while done.completed < budget {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            if let Ok(mut r) = Reader::new(mem, chain) {
                let mut hb = [0u8; HDR_LEN];
                if r.read_exact(&mut hb).is_ok() {
                    let h = Hdr::parse(&hb);
                    let len = h.len as usize;
                    data.resize(len.min(MAX_PKT), 0);
                    if len <= MAX_PKT
                        && len <= r.available_bytes()
                        && r.read_exact(&mut data).is_ok()
                    {
                        self.handle_guest_packet(h, &data);
                    }
                }
            }
            if let Err(e) = q.add_used(mem, head, 0) {
                tracing::warn!("vsock: add_used {head}: {e}");
            }
            done.completed += 1;
        }
        done.more = q
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .map(|i| i.0 != q.next_avail())
            .unwrap_or(false);
        if !self.rx.is_empty() {
            done.kick = 1 << RX;
        }
        done
    }

    fn rx(&mut self, mem: &GuestMemoryMmap, q: &mut Queue, budget: usize) -> Processed {
        self.poll_host();
        let mut done = Processed::default();
        while done.completed < budget {
            let Some((mut h, data)) = self.rx.pop_front() else {
                return done;
            };
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                self.rx.push_front((h, data));
                return done;
            };
            let head = chain.head_index();
            let mut written = 0u32;
            match Writer::new(mem, chain) {
                Ok(mut w) if w.available_bytes() >= HDR_LEN => {
                    let fit = data.len().min(w.available_bytes() - HDR_LEN);
                    let rest = data[fit..].to_vec();
                    h.len = fit as u32;
                    if w.write_all(&h.bytes()).is_ok() && w.write_all(&data[..fit]).is_ok() {
                        written = (HDR_LEN + fit) as u32;
                    }
                    if !rest.is_empty() {
                        h.len = rest.len() as u32;
                        self.rx.push_front((h, rest));
                    }
                }
                _ => {
                    // Unusable buffer: the packet waits for the next one.
                    self.rx.push_front((h, data));
                }
            }
            if let Err(e) = q.add_used(mem, head, written) {
                tracing::warn!("vsock: add_used {head}: {e}");
            }
            done.completed += 1;
        }
        done.more = !self.rx.is_empty();
        done
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn name(&self) -> String {
        format!("virtio-vsock {}", self.uds_path.display())
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| cfg.get(o as usize).copied())
                .unwrap_or(0);
        }
    }

    fn event_fd(&self) -> Option<(RawFd, usize)> {
        Some((self.epoll.as_raw_fd(), RX))
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
            _ => Processed::default(), // event queue: we send no events
        }
    }

    fn reset(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.close(k);
        }
        self.rx.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::microvm::virtio::testutil::{TestQueue, DATA};
    use std::io::{BufRead, BufReader};
    use vm_memory::{Bytes, GuestAddress};

    const CID: u64 = 3;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn setup(name: &str) -> (Dir, Vsock) {
        let d = std::env::temp_dir().join(format!("tandem-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let v = Vsock::open(&VsockConfig {
            cid: CID as u32,
            uds_path: d.join("v.sock"),
        })
        .unwrap();
        (Dir(d), v)
    }

    fn guest_hdr(op: u16, src_port: u32, dst_port: u32, len: u32) -> Hdr {
        Hdr {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 65536,
            ..Default::default()
        }
    }

    /// Guest sends one packet on TX (header and payload in separate descriptors).
    fn send(v: &mut Vsock, tq: &mut TestQueue, q: &mut Queue, h: Hdr, data: &[u8]) -> Processed {
        tq.mem.write_slice(&h.bytes(), GuestAddress(DATA)).unwrap();
        tq.mem
            .write_slice(data, GuestAddress(DATA + 0x100))
            .unwrap();
        let head = tq.used_idx() % 8;
        if data.is_empty() {
            tq.chain(head * 2, &[(DATA, HDR_LEN as u32, false)]);
        } else {
            tq.chain(
                head * 2,
                &[
                    (DATA, HDR_LEN as u32, false),
                    (DATA + 0x100, data.len() as u32, false),
                ],
            );
        }
        v.process_queue(&tq.mem, TX, q, 8)
    }

    /// Guest posts RX buffers and collects what the device delivers.
    fn recv(v: &mut Vsock, tq: &mut TestQueue, q: &mut Queue) -> Vec<(Hdr, Vec<u8>)> {
        let start = tq.used_idx();
        for i in 0..4u16 {
            let slot = (start + i) % 16;
            tq.chain(slot, &[(DATA + 0x1000 * (1 + slot as u64), 4096, true)]);
        }
        v.process_queue(&tq.mem, RX, q, 4);
        let mut out = vec![];
        for u in start..tq.used_idx() {
            let (id, len) = tq.used(u);
            if len == 0 {
                continue;
            }
            let mut b = vec![0u8; len as usize];
            tq.mem
                .read_slice(&mut b, GuestAddress(DATA + 0x1000 * (1 + id as u64)))
                .unwrap();
            let h = Hdr::parse(b[..HDR_LEN].try_into().unwrap());
            out.push((h, b[HDR_LEN..].to_vec()));
        }
        // Unused buffers: forget them (the test queue is rebuilt per call site).
        out
    }

    #[test]
    fn header_roundtrip() {
        let h = guest_hdr(op::RW, 1, 2, 3);
        assert_eq!(Hdr::parse(&h.bytes()), h);
    }

    #[test]
    fn guest_connects_to_a_host_unix_socket_and_exchanges_data() {
        let (d, mut v) = setup("g2h");
        let listener = UnixListener::bind(d.0.join("v.sock_1234")).unwrap();
        let mut txq = TestQueue::new(16);
        let mut tx = txq.queue();
        let mut rxq = TestQueue::new(16);
        let mut rx = rxq.queue();

        let p = send(
            &mut v,
            &mut txq,
            &mut tx,
            guest_hdr(op::REQUEST, 5000, 1234, 0),
            &[],
        );
        assert_eq!(p.kick, 1 << RX);
        let got = recv(&mut v, &mut rxq, &mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.op, op::RESPONSE);
        assert_eq!((got[0].0.src_port, got[0].0.dst_port), (1234, 5000));
        assert_eq!(got[0].0.dst_cid, CID);
        let (mut host, _) = listener.accept().unwrap();

        send(
            &mut v,
            &mut txq,
            &mut tx,
            guest_hdr(op::RW, 5000, 1234, 5),
            b"hello",
        );
        let mut b = [0u8; 5];
        host.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hello");
        // The device tells the guest it consumed 5 bytes.
        let got = recv(&mut v, &mut rxq, &mut rx);
        assert!(got
            .iter()
            .any(|(h, _)| h.op == op::CREDIT_UPDATE && h.fwd_cnt == 5));

        host.write_all(b"world").unwrap();
        let mut data = vec![];
        for _ in 0..50 {
            for (h, d) in recv(&mut v, &mut rxq, &mut rx) {
                if h.op == op::RW {
                    assert_eq!((h.src_port, h.dst_port), (1234, 5000));
                    data.extend(d);
                }
            }
            if data.len() >= 5 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(data, b"world");

        send(
            &mut v,
            &mut txq,
            &mut tx,
            guest_hdr(op::SHUTDOWN, 5000, 1234, 0),
            &[],
        );
        let got = recv(&mut v, &mut rxq, &mut rx);
        assert!(got.iter().any(|(h, _)| h.op == op::RST));
        assert_eq!(host.read(&mut b).unwrap(), 0, "host side not closed");
    }

    #[test]
    fn host_connects_to_a_guest_port() {
        let (d, mut v) = setup("h2g");
        let mut txq = TestQueue::new(16);
        let mut tx = txq.queue();
        let mut rxq = TestQueue::new(16);
        let mut rx = rxq.queue();
        let mut client = UnixStream::connect(d.0.join("v.sock")).unwrap();
        client.write_all(b"CONNECT 52\n").unwrap();
        let mut req = None;
        for _ in 0..50 {
            req = recv(&mut v, &mut rxq, &mut rx)
                .into_iter()
                .find(|(h, _)| h.op == op::REQUEST);
            if req.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let (h, _) = req.expect("no REQUEST for the guest");
        assert_eq!(h.dst_port, 52);
        assert_eq!(h.dst_cid, CID);
        let host_port = h.src_port;
        send(
            &mut v,
            &mut txq,
            &mut tx,
            guest_hdr(op::RESPONSE, 52, host_port, 0),
            &[],
        );
        let mut line = String::new();
        BufReader::new(&client).read_line(&mut line).unwrap();
        assert_eq!(line, format!("OK {host_port}\n"));
        send(
            &mut v,
            &mut txq,
            &mut tx,
            guest_hdr(op::RW, 52, host_port, 2),
            b"hi",
        );
        let mut b = [0u8; 2];
        client.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
    }

    #[test]
    fn bad_packets_are_dropped_or_reset() {
        let (_d, mut v) = setup("bad");
        let mut txq = TestQueue::new(16);
        let mut tx = txq.queue();
        let mut rxq = TestQueue::new(16);
        let mut rx = rxq.queue();
        // Connection to a host port nobody listens on: RST.
        send(
            &mut v,
            &mut txq,
            &mut tx,
            guest_hdr(op::REQUEST, 1, 999, 0),
            &[],
        );
        // Data on a connection that does not exist: RST.
        send(
            &mut v,
            &mut txq,
            &mut tx,
            guest_hdr(op::RW, 1, 998, 3),
            b"abc",
        );
        // Unknown op: RST.
        send(&mut v, &mut txq, &mut tx, guest_hdr(42, 1, 997, 0), &[]);
        let got = recv(&mut v, &mut rxq, &mut rx);
        let rst: Vec<u32> = got
            .iter()
            .filter(|(h, _)| h.op == op::RST)
            .map(|(h, _)| h.src_port)
            .collect();
        assert_eq!(rst, vec![999, 998, 997]);
        // Spoofed source CID, wrong type, length beyond the chain, short header: dropped.
        let mut h = guest_hdr(op::REQUEST, 1, 999, 0);
        h.src_cid = 7;
        send(&mut v, &mut txq, &mut tx, h, &[]);
        let mut h = guest_hdr(op::REQUEST, 1, 999, 0);
        h.type_ = 2;
        send(&mut v, &mut txq, &mut tx, h, &[]);
        send(
            &mut v,
            &mut txq,
            &mut tx,
            guest_hdr(op::RW, 1, 999, 60000),
            b"x",
        );
        txq.chain(0, &[(DATA, 10, false)]);
        v.process_queue(&txq.mem, TX, &mut tx, 8);
        // A chain outside guest memory.
        txq.chain(1, &[(0xffff_0000, 44, false)]);
        v.process_queue(&txq.mem, TX, &mut tx, 8);
        assert!(recv(&mut v, &mut rxq, &mut rx).is_empty());
        // Config space: the guest CID.
        let mut c = [0u8; 8];
        v.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), CID);
    }
}
