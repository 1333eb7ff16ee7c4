//! The event loop: one task owns the smoltcp interface, every host socket of the box and the
//! netdev stream, and is woken by any of them (or by a smoltcp timer). No busy polling.

use std::collections::HashMap;
use std::future::Future;
use std::hash::BuildHasher;
use std::io;
use std::net::{IpAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, PollResult, SocketSet};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, IpCidr,
    IpProtocol, Ipv4Packet, Ipv4Repr,
};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::task::JoinSet;
use tokio::time::Sleep;

use crate::counters::NetCounters;
use crate::dns::{self, Action};
use crate::frame::{push_udp, Dev, FrameReader, TxBuf};
use crate::limits::Limits;
use crate::policy::{NameMatch, Policy};
use crate::tcp::{Conn, TcpKey};
use crate::udp::UdpFlows;
use crate::{NetError, NetworkConfig, DNS_PORT, GATEWAY_IP, GATEWAY_MAC, GUEST_IP, HOST_ALIAS_IP};

/// Bytes read from the netdev stream at once.
const READ_BUFFER: usize = 256 * 1024;
/// Framed bytes queued for the netdev before the stack stops producing more.
const WRITE_BUFFER: usize = 1024 * 1024;
/// Loop rounds before yielding to other tasks of the runtime.
const ROUNDS_PER_POLL: usize = 64;
/// A smoltcp deadline closer than this is rounded up: it only ever means "now, but blocked".
const MIN_TIMER: Duration = Duration::from_millis(1);

/// Results of the stack's helper tasks.
#[derive(Debug)]
pub(crate) enum Event {
    Connected {
        key: TcpKey,
        result: io::Result<TcpStream>,
    },
    Resolved {
        to: DnsReplyTo,
        query: dns::Query,
        how: NameMatch,
        result: dns::Lookup,
    },
}

/// Where a DNS answer goes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DnsReplyTo {
    /// A UDP query from this guest address and port.
    Udp(SocketAddrV4),
    /// A DNS-over-TCP session.
    Tcp(TcpKey),
}

/// A published port: the host listener and the guest port it leads to.
#[derive(Debug)]
pub(crate) struct Forward {
    pub(crate) listener: TcpListener,
    pub(crate) guest_port: u16,
    /// After an accept error (e.g. out of descriptors), wait before trying again.
    pub(crate) retry_at: Option<Instant>,
}

pub(crate) struct Stack {
    pub(crate) iface: Interface,
    pub(crate) sockets: SocketSet<'static>,
    pub(crate) tx: TxBuf,
    reader: FrameReader,
    netdev: UnixStream,
    pub(crate) mtu: usize,
    epoch: Instant,
    pub(crate) policy: Policy,
    pub(crate) limits: Limits,
    pub(crate) counters: Arc<NetCounters>,
    pub(crate) guest_mac: EthernetAddress,
    pub(crate) tcp: HashMap<TcpKey, Conn>,
    pub(crate) pending_connects: usize,
    pub(crate) udp: UdpFlows,
    dns_lookups: usize,
    pub(crate) tasks: JoinSet<Event>,
    pub(crate) forwards: Vec<Forward>,
    /// Closed relay sockets for reuse (see `tcp::SPARE_SOCKETS`).
    pub(crate) spare_sockets: Vec<smoltcp::socket::tcp::Socket<'static>>,
    pub(crate) next_port: u16,
    timer: Pin<Box<Sleep>>,
    pub(crate) scratch: Vec<u8>,
    /// Tests only: every host connection goes here instead (the policy still decides first),
    /// so name checks can be exercised without traffic leaving the machine.
    #[cfg(test)]
    pub(crate) redirect: Option<std::net::SocketAddr>,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("tcp", &self.tcp.len())
            .field("udp", &self.udp.len())
            .finish_non_exhaustive()
    }
}

impl Stack {
    pub(crate) fn new(
        netdev: UnixStream,
        config: &NetworkConfig,
        listeners: Vec<std::net::TcpListener>,
        counters: Arc<NetCounters>,
        host_addrs: Vec<IpAddr>,
    ) -> Result<Stack, NetError> {
        let mtu = usize::from(config.mtu);
        let mut tx = TxBuf::new(WRITE_BUFFER);
        let mut cfg = Config::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        cfg.random_seed =
            std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now());
        let epoch = Instant::now();
        let mut dev = Dev {
            rx: None,
            tx: &mut tx,
            mtu,
        };
        let mut iface = Interface::new(cfg, &mut dev, SmolInstant::from_micros(0));
        iface.update_ip_addrs(|addrs| {
            for ip in [GATEWAY_IP, HOST_ALIAS_IP] {
                let _ = addrs.push(IpCidr::new(ip.into(), crate::PREFIX_LEN));
            }
        });
        // Accept packets for every destination: each one is a connection to re-originate.
        iface.set_any_ip(true);
        let mut forwards = Vec::with_capacity(listeners.len());
        for (listener, fwd) in listeners.into_iter().zip(&config.forwards) {
            listener.set_nonblocking(true).map_err(|e| NetError::Bind {
                addr: fwd.host_addr(),
                source: e,
            })?;
            let listener = TcpListener::from_std(listener).map_err(|e| NetError::Bind {
                addr: fwd.host_addr(),
                source: e,
            })?;
            forwards.push(Forward {
                listener,
                guest_port: fwd.guest_port,
                retry_at: None,
            });
        }
        Ok(Stack {
            iface,
            sockets: SocketSet::new(Vec::new()),
            tx,
            reader: FrameReader::new(READ_BUFFER),
            netdev,
            mtu,
            epoch,
            policy: Policy::new(&config.allow_net, host_addrs),
            limits: config.limits.clone(),
            counters,
            guest_mac: EthernetAddress(config.guest_mac),
            tcp: HashMap::new(),
            pending_connects: 0,
            udp: UdpFlows::default(),
            dns_lookups: 0,
            tasks: JoinSet::new(),
            forwards,
            spare_sockets: Vec::new(),
            next_port: 49152,
            timer: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
            scratch: vec![0; crate::sniff::SNIFF_LIMIT],
            #[cfg(test)]
            redirect: None,
        })
    }

    /// Runs until the netdev stream ends (`Ok`) or fails.
    pub(crate) async fn run(mut self) -> Result<(), NetError> {
        std::future::poll_fn(|cx| self.poll_run(cx)).await
    }

    pub(crate) fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), NetError>> {
        for _ in 0..ROUNDS_PER_POLL {
            let mut progress = false;
            match self.poll_input(cx) {
                Poll::Ready(Ok(true)) => progress = true,
                Poll::Ready(Ok(false)) => return Poll::Ready(Ok(())),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(NetError::Netdev(e))),
                Poll::Pending => {}
            }
            while let Poll::Ready(Some(done)) = self.tasks.poll_join_next(cx) {
                progress = true;
                match done {
                    Ok(event) => self.on_event(event),
                    Err(e) => tracing::warn!(error = %e, "network helper task failed"),
                }
            }
            progress |= self.poll_accepts(cx);
            progress |= self.pump_tcp(cx);
            progress |= self.poll_udp(cx);
            progress |= self.egress();
            progress |= self.reap_tcp();
            match self.tx.poll_flush(cx, &mut self.netdev) {
                Poll::Ready(Ok(n)) => progress |= n > 0,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(NetError::Netdev(e))),
                Poll::Pending => {}
            }
            self.sweep_udp();
            if progress {
                continue;
            }
            match self.next_wakeup() {
                Some(delay) => {
                    let at = tokio::time::Instant::now() + delay.max(MIN_TIMER);
                    self.timer.as_mut().reset(at);
                    if self.timer.as_mut().poll(cx).is_ready() {
                        continue;
                    }
                }
                None => self
                    .timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + Duration::from_secs(3600)),
            }
            return Poll::Pending;
        }
        // Plenty of work: let the runtime's other tasks run, then come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Reads and handles frames. `Ready(Ok(false))`: the stream ended.
    fn poll_input(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if !self.tx.has_room() {
            // The guest is not reading; the flush's waker brings us back.
            return Poll::Pending;
        }
        // Frames are borrowed from the reader while the stack handles them.
        let mut reader = std::mem::take(&mut self.reader);
        let r = match reader.poll_fill(cx, &mut self.netdev) {
            Poll::Ready(Ok(0)) => Poll::Ready(Ok(false)),
            Poll::Ready(Ok(_)) => {
                while let Some(frame) = reader.next_frame() {
                    self.on_frame(frame);
                }
                Poll::Ready(Ok(true))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        };
        self.reader = reader;
        r
    }

    /// One frame from the guest: decide, then hand it to smoltcp or a relay.
    pub(crate) fn on_frame(&mut self, frame: &[u8]) {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return;
        };
        match eth.ethertype() {
            EthernetProtocol::Arp => {
                // With any-IP, smoltcp would claim every address; answer only for ours.
                let Ok(packet) = ArpPacket::new_checked(eth.payload()) else {
                    return;
                };
                if let Ok(ArpRepr::EthernetIpv4 {
                    target_protocol_addr,
                    ..
                }) = ArpRepr::parse(&packet)
                {
                    if target_protocol_addr == GATEWAY_IP || target_protocol_addr == HOST_ALIAS_IP {
                        self.ingest(frame);
                    }
                }
            }
            EthernetProtocol::Ipv4 => {
                let Ok(packet) = Ipv4Packet::new_checked(eth.payload()) else {
                    return;
                };
                let caps = smoltcp::phy::ChecksumCapabilities::default();
                let Ok(ip) = Ipv4Repr::parse(&packet, &caps) else {
                    return;
                };
                // No reassembly; only the guest's own address speaks.
                if packet.more_frags() || packet.frag_offset() != 0 || ip.src_addr != GUEST_IP {
                    return;
                }
                match ip.next_header {
                    IpProtocol::Tcp => self.on_tcp(frame, &ip, packet.payload()),
                    IpProtocol::Udp => self.on_udp(frame, &ip, packet.payload()),
                    IpProtocol::Icmp
                        if ip.dst_addr == GATEWAY_IP || ip.dst_addr == HOST_ALIAS_IP =>
                    {
                        self.ingest(frame)
                    }
                    _ => {}
                }
            }
            // No IPv6 in the guest; everything else is noise.
            _ => {}
        }
    }

    /// Gives one frame to smoltcp (its replies go to the netdev).
    pub(crate) fn ingest(&mut self, frame: &[u8]) {
        let now = self.now();
        let mut dev = Dev {
            rx: Some(frame),
            tx: &mut self.tx,
            mtu: self.mtu,
        };
        let _ = self
            .iface
            .poll_ingress_single(now, &mut dev, &mut self.sockets);
    }

    fn egress(&mut self) -> bool {
        let now = self.now();
        let mut dev = Dev {
            rx: None,
            tx: &mut self.tx,
            mtu: self.mtu,
        };
        let mut any = false;
        // Each pass sends at most one segment per socket; the write buffer bounds the total.
        for _ in 0..4096 {
            match self.iface.poll_egress(now, &mut dev, &mut self.sockets) {
                PollResult::SocketStateChanged => any = true,
                PollResult::None => break,
            }
        }
        any
    }

    fn next_wakeup(&mut self) -> Option<Duration> {
        let now = self.now();
        let mut next = if self.tx.has_room() {
            self.iface
                .poll_delay(now, &self.sockets)
                .map(|d| Duration::from_micros(d.total_micros()))
        } else {
            None
        };
        let mut consider = |d: Option<Duration>| {
            if let Some(d) = d {
                next = Some(next.map_or(d, |n| n.min(d)));
            }
        };
        consider(self.udp.next_sweep(Instant::now()));
        let wall = Instant::now();
        for f in &self.forwards {
            consider(f.retry_at.map(|t| t.saturating_duration_since(wall)));
        }
        next
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Connected { key, result } => self.on_connected(key, result),
            Event::Resolved {
                to,
                query,
                how,
                result,
            } => {
                self.dns_lookups = self.dns_lookups.saturating_sub(1);
                let reply = dns::finish(&query, how, result, &mut self.policy, Instant::now());
                self.dns_reply(to, &reply);
            }
        }
    }

    /// A DNS message from the guest, by UDP or TCP.
    pub(crate) fn on_dns(&mut self, to: DnsReplyTo, msg: &[u8]) -> bool {
        match dns::handle(msg, &self.policy) {
            None => false,
            Some(Action::Reply(reply)) => {
                self.dns_reply(to, &reply);
                true
            }
            Some(Action::Lookup { query, name, how }) => {
                if self.dns_lookups >= self.limits.max_dns_lookups {
                    let reply = dns::servfail(&query);
                    self.dns_reply(to, &reply);
                    return true;
                }
                self.dns_lookups += 1;
                self.tasks.spawn(async move {
                    let result = tokio::task::spawn_blocking(move || dns::lookup_ipv4(&name))
                        .await
                        .unwrap_or(dns::Lookup::Failed);
                    Event::Resolved {
                        to,
                        query,
                        how,
                        result,
                    }
                });
                true
            }
        }
    }

    fn dns_reply(&mut self, to: DnsReplyTo, reply: &[u8]) {
        match to {
            DnsReplyTo::Udp(guest) => push_udp(
                &mut self.tx,
                self.mtu,
                EthernetAddress(GATEWAY_MAC),
                self.guest_mac,
                SocketAddrV4::new(GATEWAY_IP, DNS_PORT),
                guest,
                |buf| {
                    let dst = buf.get_mut(..reply.len())?;
                    dst.copy_from_slice(reply);
                    Some(reply.len())
                },
            ),
            DnsReplyTo::Tcp(key) => self.dns_tcp_reply(key, reply),
        }
    }

    /// A fresh ephemeral port of the gateway, for connections the stack opens to the guest.
    pub(crate) fn alloc_port(&mut self) -> u16 {
        for _ in 0..=(u16::MAX - 49152) {
            let port = self.next_port;
            self.next_port = if port == u16::MAX { 49152 } else { port + 1 };
            let taken = self
                .tcp
                .keys()
                .any(|k| *k.remote.ip() == GATEWAY_IP && k.remote.port() == port);
            if !taken {
                return port;
            }
        }
        // Unreachable with max_tcp_connections below 16384; any port then.
        self.next_port
    }
}
