//! A guest stand-in: a second smoltcp stack on the other end of the netdev stream, speaking
//! QEMU's framing (4-byte big-endian length, then the Ethernet frame).

#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boxlite_net::{NetCounters, NetError, NetworkConfig};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    DnsPacket, DnsQuestion, DnsRecord, DnsRecordData, EthernetAddress, HardwareAddress, IpAddress,
    IpCidr, IpEndpoint, Ipv4Address,
};
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];

/// How long any single guest operation may take before the test fails.
pub const STEP: Duration = Duration::from_secs(10);

pub struct Dev {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<u8>,
    mtu: usize,
}

pub struct Rx(Vec<u8>);
pub struct Tx<'a>(&'a mut Vec<u8>);

impl phy::Device for Dev {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: SmolInstant) -> Option<(Rx, Tx<'_>)> {
        let f = self.rx.pop_front()?;
        Some((Rx(f), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<Tx<'_>> {
        (self.tx.len() < 4 << 20).then_some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = self.mtu + 14;
        c
    }
}

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let at = self.0.len();
        self.0.extend_from_slice(&(len as u32).to_be_bytes());
        self.0.resize(at + 4 + len, 0);
        f(&mut self.0[at + 4..])
    }
}

pub struct Guest {
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    dev: Dev,
    stream: UnixStream,
    inbuf: Vec<u8>,
    epoch: Instant,
    next_port: u16,
    traced: usize,
    pub buffer: usize,
}

/// The stack under test, serving one end of a fresh stream pair; the guest gets the other.
pub fn start(
    config: NetworkConfig,
    listeners: Vec<std::net::TcpListener>,
) -> (Guest, Arc<NetCounters>, JoinHandle<Result<(), NetError>>) {
    let (mut g, counters, task) = start_unprimed(config, listeners);
    g.prime_neighbors();
    (g, counters, task)
}

/// Like [`start`], but the guest has to ARP for everything itself (smoltcp sends at most one
/// ARP request per second, which slows tests that reach both the gateway and the alias).
pub fn start_unprimed(
    config: NetworkConfig,
    listeners: Vec<std::net::TcpListener>,
) -> (Guest, Arc<NetCounters>, JoinHandle<Result<(), NetError>>) {
    let (host_end, guest_end) = UnixStream::pair().expect("socketpair");
    let counters = Arc::new(NetCounters::new());
    let mtu = usize::from(config.mtu);
    let task = tokio::spawn(boxlite_net::serve(
        host_end,
        config,
        listeners,
        counters.clone(),
    ));
    (Guest::new(guest_end, mtu), counters, task)
}

/// An ARP request frame `from` (MAC, IP) asking for `target`.
pub fn arp_request(mac: [u8; 6], from: Ipv4Addr, target: Ipv4Addr, dst_mac: [u8; 6]) -> Vec<u8> {
    use smoltcp::wire::{
        ArpOperation, ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol, EthernetRepr,
    };
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(mac),
        source_protocol_addr: from,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(mac),
        dst_addr: EthernetAddress(dst_mac),
        ethertype: EthernetProtocol::Arp,
    };
    let mut buf = vec![0u8; 14 + arp.buffer_len()];
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut frame);
    arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
    buf
}

impl Guest {
    pub fn new(stream: UnixStream, mtu: usize) -> Guest {
        let mut dev = Dev {
            rx: VecDeque::new(),
            tx: Vec::new(),
            mtu,
        };
        let cfg = Config::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC)));
        let mut iface = Interface::new(cfg, &mut dev, SmolInstant::from_micros(0));
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::v4(192, 168, 127, 2), 24))
                .expect("address");
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::new(192, 168, 127, 1))
            .expect("route");
        Guest {
            iface,
            sockets: SocketSet::new(Vec::new()),
            dev,
            stream,
            inbuf: Vec::new(),
            epoch: Instant::now(),
            next_port: 40000,
            traced: 0,
            buffer: 256 * 1024,
        }
    }

    /// Teaches the guest the gateway's and the alias's MAC the way smoltcp learns: from ARP
    /// requests aimed at it.
    pub fn prime_neighbors(&mut self) {
        for ip in [
            Ipv4Addr::new(192, 168, 127, 1),
            Ipv4Addr::new(192, 168, 127, 254),
        ] {
            let f = arp_request(
                boxlite_net::GATEWAY_MAC,
                ip,
                Ipv4Addr::new(192, 168, 127, 2),
                GUEST_MAC,
            );
            self.dev.rx.push_back(f);
        }
    }

    /// Frames received and not yet given to smoltcp (taken).
    pub fn take_rx(&mut self) -> Vec<Vec<u8>> {
        self.dev.rx.drain(..).collect()
    }

    fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// One round: smoltcp, then the stream (write what we can, wait a little for input).
    pub async fn step(&mut self, max_wait: Duration) {
        let now = self.now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        if std::env::var_os("BOXLITE_NET_TRACE").is_some() {
            let mut at = self.traced;
            while at + 4 <= self.dev.tx.len() {
                let len =
                    u32::from_be_bytes(self.dev.tx[at..at + 4].try_into().expect("4")) as usize;
                eprintln!(
                    "{:?} -> {}",
                    self.epoch.elapsed(),
                    smoltcp::wire::PrettyPrinter::<smoltcp::wire::EthernetFrame<&[u8]>>::new(
                        "",
                        &&self.dev.tx[at + 4..at + 4 + len]
                    )
                );
                at += 4 + len;
            }
            self.traced = at;
        }
        // Write without blocking: the stack may be waiting for us to read.
        while !self.dev.tx.is_empty() {
            match self.stream.try_write(&self.dev.tx) {
                Ok(n) => {
                    self.dev.tx.drain(..n);
                    self.traced = self.traced.saturating_sub(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("guest write: {e}"),
            }
        }
        let wait = self
            .iface
            .poll_delay(now, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
            .unwrap_or(max_wait)
            .min(max_wait);
        let interest = if self.dev.tx.is_empty() {
            Interest::READABLE
        } else {
            Interest::READABLE | Interest::WRITABLE
        };
        if let Ok(Ok(ready)) = tokio::time::timeout(wait, self.stream.ready(interest)).await {
            if ready.is_readable() {
                self.read_frames();
            }
        }
    }

    fn read_frames(&mut self) {
        let mut buf = [0u8; 64 * 1024];
        loop {
            match self.stream.try_read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                Err(_) => break,
            }
        }
        let mut at = 0;
        while self.inbuf.len() - at >= 4 {
            let len = u32::from_be_bytes(self.inbuf[at..at + 4].try_into().expect("4")) as usize;
            if self.inbuf.len() - at < 4 + len {
                break;
            }
            let frame = self.inbuf[at + 4..at + 4 + len].to_vec();
            if std::env::var_os("BOXLITE_NET_TRACE").is_some() {
                eprintln!(
                    "{:?} <- {}",
                    self.epoch.elapsed(),
                    smoltcp::wire::PrettyPrinter::<smoltcp::wire::EthernetFrame<&[u8]>>::new(
                        "", &frame
                    )
                );
            }
            self.dev.rx.push_back(frame);
            at += 4 + len;
        }
        self.inbuf.drain(..at);
    }

    /// Drives the guest until `f` says done, failing the test after `limit`.
    pub async fn until<T>(
        &mut self,
        limit: Duration,
        mut f: impl FnMut(&mut Guest) -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(t) = f(self) {
                return t;
            }
            assert!(start.elapsed() < limit, "guest: timed out after {limit:?}");
            self.step(Duration::from_millis(20)).await;
        }
    }

    /// Writes raw bytes onto the netdev stream (framing included by the caller).
    pub async fn write_raw(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await.expect("raw write");
    }

    /// Reads and drops whatever the stack sent, for `d`.
    pub async fn drain_for(&mut self, d: Duration) {
        let start = Instant::now();
        while start.elapsed() < d {
            self.step(Duration::from_millis(10)).await;
            self.dev.rx.clear();
        }
    }

    pub fn port(&mut self) -> u16 {
        self.next_port += 1;
        self.next_port
    }

    pub fn tcp(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    fn new_tcp(&mut self) -> tcp::Socket<'static> {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; self.buffer]),
            tcp::SocketBuffer::new(vec![0; self.buffer]),
        );
        s.set_nagle_enabled(false);
        s
    }

    /// Starts a connection; see [`Guest::wait_connected`].
    pub fn tcp_start(&mut self, to: SocketAddrV4) -> SocketHandle {
        let port = self.port();
        let mut s = self.new_tcp();
        s.connect(
            self.iface.context(),
            IpEndpoint::new(IpAddress::Ipv4(*to.ip()), to.port()),
            port,
        )
        .expect("connect");
        self.sockets.add(s)
    }

    /// `Ok` once established, `Err` if the stack refused (RST).
    pub async fn wait_connected(&mut self, h: SocketHandle) -> Result<(), ()> {
        self.until(STEP, |g| match g.tcp(h).state() {
            tcp::State::Established => Some(Ok(())),
            tcp::State::Closed => Some(Err(())),
            _ => None,
        })
        .await
    }

    pub async fn tcp_connect(&mut self, to: SocketAddrV4) -> Result<SocketHandle, ()> {
        let h = self.tcp_start(to);
        self.wait_connected(h).await.map(|()| h)
    }

    pub fn tcp_listen(&mut self, port: u16) -> SocketHandle {
        let mut s = self.new_tcp();
        s.listen(port).expect("listen");
        self.sockets.add(s)
    }

    pub async fn send_all(&mut self, h: SocketHandle, data: &[u8]) {
        let mut off = 0;
        self.until(STEP, |g| {
            let s = g.tcp(h);
            if s.can_send() {
                off += s.send_slice(&data[off..]).expect("send");
            }
            (off == data.len()).then_some(())
        })
        .await;
    }

    pub async fn recv_exact(&mut self, h: SocketHandle, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        self.until(STEP, |g| {
            let s = g.tcp(h);
            let _ = s.recv(|b| {
                let take = b.len().min(n - out.len());
                out.extend_from_slice(&b[..take]);
                (take, ())
            });
            (out.len() == n).then_some(())
        })
        .await;
        out
    }

    /// Reads until the peer closes; `Err` if the connection was reset.
    pub async fn recv_to_end(
        &mut self,
        h: SocketHandle,
        limit: Duration,
    ) -> Result<Vec<u8>, Vec<u8>> {
        let mut out = Vec::new();
        self.until(limit, |g| {
            let s = g.tcp(h);
            let _ = s.recv(|b| {
                out.extend_from_slice(b);
                (b.len(), ())
            });
            match s.state() {
                tcp::State::Closed if s.remote_endpoint().is_none() && !s.can_recv() => Some(()),
                tcp::State::CloseWait | tcp::State::LastAck | tcp::State::TimeWait
                    if !s.can_recv() =>
                {
                    Some(())
                }
                _ => None,
            }
        })
        .await;
        let s = self.tcp(h);
        if matches!(s.state(), tcp::State::Closed) && out.is_empty() {
            Err(out)
        } else {
            Ok(out)
        }
    }

    /// Closes our side and waits for the connection to finish.
    pub async fn close(&mut self, h: SocketHandle) {
        self.tcp(h).close();
        self.until(STEP, |g| {
            matches!(g.tcp(h).state(), tcp::State::Closed | tcp::State::TimeWait).then_some(())
        })
        .await;
    }

    /// One DNS query over UDP to the gateway: the response code and the A records.
    pub async fn dns(&mut self, name: &str, qtype: u16) -> (u8, Vec<Ipv4Addr>) {
        let mut s = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]),
        );
        let port = self.port();
        s.bind(port).expect("bind");
        let q = dns_query(0x1234, name, qtype);
        s.send_slice(&q, IpEndpoint::new(IpAddress::v4(192, 168, 127, 1), 53))
            .expect("send");
        let h = self.sockets.add(s);
        let reply = self
            .until(STEP, |g| {
                g.sockets
                    .get_mut::<udp::Socket>(h)
                    .recv()
                    .ok()
                    .map(|(d, _)| d.to_vec())
            })
            .await;
        self.sockets.remove(h);
        parse_dns(&reply, 0x1234)
    }

    /// One DNS query over TCP to the gateway.
    pub async fn dns_tcp(&mut self, name: &str, qtype: u16) -> (u8, Vec<Ipv4Addr>) {
        let h = self
            .tcp_connect("192.168.127.1:53".parse().expect("addr"))
            .await
            .expect("dns over tcp");
        let q = dns_query(0x4321, name, qtype);
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        self.send_all(h, &framed).await;
        let len = self.recv_exact(h, 2).await;
        let n = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let reply = self.recv_exact(h, n).await;
        self.close(h).await;
        parse_dns(&reply, 0x4321)
    }

    /// Sends one UDP datagram and waits up to `wait` for one back.
    pub async fn udp_exchange(
        &mut self,
        to: SocketAddrV4,
        data: &[u8],
        wait: Duration,
    ) -> Option<Vec<u8>> {
        let mut s = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 65536]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 65536]),
        );
        let port = self.port();
        s.bind(port).expect("bind");
        s.send_slice(data, IpEndpoint::new(IpAddress::Ipv4(*to.ip()), to.port()))
            .expect("send");
        let h = self.sockets.add(s);
        let start = Instant::now();
        let mut got = None;
        while start.elapsed() < wait {
            if let Ok((d, _)) = self.sockets.get_mut::<udp::Socket>(h).recv() {
                got = Some(d.to_vec());
                break;
            }
            self.step(Duration::from_millis(10)).await;
        }
        self.sockets.remove(h);
        got
    }
}

impl Guest {
    /// Sends one datagram from each of `flows` fresh source ports to `to`, and gives the
    /// stack a moment.
    pub async fn udp_burst(&mut self, to: SocketAddrV4, flows: usize, size: usize) {
        let mut handles = Vec::new();
        for _ in 0..flows {
            let mut s = udp::Socket::new(
                udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 2], vec![0; size + 64]),
                udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 2], vec![0; size + 64]),
            );
            let port = self.port();
            s.bind(port).expect("bind");
            s.send_slice(
                &vec![0u8; size],
                IpEndpoint::new(IpAddress::Ipv4(*to.ip()), to.port()),
            )
            .expect("send");
            handles.push(self.sockets.add(s));
        }
        for _ in 0..20 {
            self.step(Duration::from_millis(5)).await;
        }
        for h in handles {
            self.sockets.remove(h);
        }
    }
}

pub fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = vec![0u8; 12];
    q[0..2].copy_from_slice(&id.to_be_bytes());
    q[2] = 0x01;
    q[5] = 1;
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q
}

fn parse_dns(reply: &[u8], id: u16) -> (u8, Vec<Ipv4Addr>) {
    let p = DnsPacket::new_checked(reply).expect("dns reply");
    assert_eq!(p.transaction_id(), id);
    let (mut rest, _) = DnsQuestion::parse(p.payload()).expect("question");
    let mut addrs = Vec::new();
    for _ in 0..p.answer_record_count() {
        let (r, rec) = DnsRecord::parse(rest).expect("record");
        rest = r;
        if let DnsRecordData::A(a) = rec.data {
            addrs.push(a);
        }
    }
    (reply[3] & 0x0F, addrs)
}

pub fn alias(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(192, 168, 127, 254), port)
}

pub fn config(allow: &[&str]) -> NetworkConfig {
    let mut c = NetworkConfig::new(GUEST_MAC);
    c.allow_net = allow
        .iter()
        .map(|s| s.parse().expect("allow entry"))
        .collect();
    c
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}
