//! UDP: each flow (guest address and port to one destination) gets one connected host
//! socket; answers come back as frames built in place. DNS to the gateway is served here.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use smoltcp::wire::{EthernetAddress, IpAddress, Ipv4Repr, UdpPacket, UdpRepr};
use tokio::io::ReadBuf;
use tokio::net::UdpSocket;

use crate::frame::push_udp;
use crate::policy::{Deny, Verdict};
use crate::stack::{DnsReplyTo, Stack};
use crate::{DNS_PORT, GATEWAY_IP, GATEWAY_MAC, HOST_ALIAS_IP};

/// How often idle flows are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// QUIC's port, refused while names decide what is reachable.
const QUIC_PORT: u16 = 443;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct UdpKey {
    guest: SocketAddrV4,
    /// The destination as the guest addressed it.
    remote: SocketAddrV4,
}

#[derive(Debug)]
struct Flow {
    sock: UdpSocket,
    last: Instant,
}

#[derive(Debug, Default)]
pub(crate) struct UdpFlows {
    flows: HashMap<UdpKey, Flow>,
    last_sweep: Option<Instant>,
}

impl UdpFlows {
    pub(crate) fn len(&self) -> usize {
        self.flows.len()
    }

    /// How long until the next idle sweep is due, if there is anything to sweep.
    pub(crate) fn next_sweep(&self, now: Instant) -> Option<Duration> {
        if self.flows.is_empty() {
            return None;
        }
        let due = self.last_sweep.map_or(now, |t| t + SWEEP_EVERY);
        Some(due.saturating_duration_since(now))
    }
}

impl Stack {
    pub(crate) fn on_udp(&mut self, frame: &[u8], ip: &Ipv4Repr, payload: &[u8]) {
        let caps = smoltcp::phy::ChecksumCapabilities::default();
        let Ok(packet) = UdpPacket::new_checked(payload) else {
            return;
        };
        let src = IpAddress::Ipv4(ip.src_addr);
        let dst = IpAddress::Ipv4(ip.dst_addr);
        let Ok(repr) = UdpRepr::parse(&packet, &src, &dst, &caps) else {
            return;
        };
        let data = packet.payload();
        let key = UdpKey {
            guest: SocketAddrV4::new(ip.src_addr, repr.src_port),
            remote: SocketAddrV4::new(ip.dst_addr, repr.dst_port),
        };
        let port = repr.dst_port;
        let target = if ip.dst_addr == GATEWAY_IP {
            if port == DNS_PORT {
                self.on_dns(DnsReplyTo::Udp(key.guest), data);
                return;
            }
            Err(Deny::Gateway)
        } else if ip.dst_addr == HOST_ALIAS_IP {
            if self.policy.host_alias_allowed() {
                Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
            } else {
                Err(Deny::HostAlias)
            }
        } else {
            match self
                .policy
                .check_ip(IpAddr::V4(ip.dst_addr), Instant::now())
            {
                Verdict::Allow => Ok(SocketAddr::V4(key.remote)),
                Verdict::ViaName if port == QUIC_PORT => Err(Deny::Quic),
                Verdict::ViaName => Ok(SocketAddr::V4(key.remote)),
                Verdict::Deny(why) => Err(why),
            }
        };
        let target = match target {
            Ok(t) => t,
            Err(why) => {
                tracing::debug!(guest = %key.guest, dst = %key.remote, %why, "udp: denied");
                // smoltcp has no UDP socket, so it answers ICMP port unreachable; never
                // for broadcast or multicast destinations.
                if !ip.dst_addr.is_broadcast() && !ip.dst_addr.is_multicast() {
                    self.ingest(frame);
                }
                return;
            }
        };
        #[cfg(test)]
        let target = self.redirect.unwrap_or(target);
        let now = Instant::now();
        if !self.udp.flows.contains_key(&key) {
            if self.udp.flows.len() >= self.limits.max_udp_flows {
                // Replace the least recently used flow.
                if let Some(oldest) = self
                    .udp
                    .flows
                    .iter()
                    .min_by_key(|(_, f)| f.last)
                    .map(|(k, _)| *k)
                {
                    self.udp.flows.remove(&oldest);
                }
            }
            match open_flow(target) {
                Ok(sock) => {
                    self.udp.flows.insert(key, Flow { sock, last: now });
                }
                Err(e) => {
                    tracing::debug!(dst = %target, error = %e, "udp: cannot open a host socket");
                    return;
                }
            }
        }
        let Some(flow) = self.udp.flows.get_mut(&key) else {
            return;
        };
        flow.last = now;
        // A full host socket buffer drops the datagram, as a congested link would.
        if let Ok(n) = send_now(&flow.sock, data) {
            self.counters.sent(n);
        }
    }

    /// Datagrams from the host sockets to the guest.
    pub(crate) fn poll_udp(&mut self, cx: &mut Context<'_>) -> bool {
        let Stack {
            udp,
            tx,
            counters,
            mtu,
            guest_mac,
            ..
        } = self;
        let mut progress = false;
        let now = Instant::now();
        for (key, flow) in udp.flows.iter_mut() {
            while tx.has_room() {
                let mut outcome = Poll::Pending;
                let mut got = 0;
                push_udp(
                    tx,
                    *mtu,
                    EthernetAddress(GATEWAY_MAC),
                    *guest_mac,
                    key.remote,
                    key.guest,
                    |buf| {
                        let mut rb = ReadBuf::new(buf);
                        outcome = flow.sock.poll_recv(cx, &mut rb);
                        match outcome {
                            Poll::Ready(Ok(())) => {
                                got = rb.filled().len();
                                Some(got)
                            }
                            _ => None,
                        }
                    },
                );
                match outcome {
                    Poll::Pending => break,
                    Poll::Ready(Ok(())) => {
                        // Counted even when too big for the link and dropped: it arrived.
                        counters.received(got);
                        flow.last = now;
                        progress = true;
                    }
                    // An ICMP error from an earlier datagram; keep reading.
                    Poll::Ready(Err(_)) => progress = true,
                }
            }
        }
        progress
    }

    /// Closes flows idle longer than the limit (at most once a second).
    pub(crate) fn sweep_udp(&mut self) {
        let now = Instant::now();
        if self
            .udp
            .last_sweep
            .is_some_and(|t| now.duration_since(t) < SWEEP_EVERY)
        {
            return;
        }
        self.udp.last_sweep = Some(now);
        let idle = self.limits.udp_idle_timeout;
        self.udp
            .flows
            .retain(|_, f| now.duration_since(f.last) < idle);
    }
}

/// Sends at once. tokio's `try_send` refuses until the reactor has seen the socket become
/// writable, which would drop the first datagram of every flow.
fn send_now(sock: &UdpSocket, data: &[u8]) -> io::Result<usize> {
    // SAFETY: a valid descriptor and a buffer of `data.len()` readable bytes.
    let n = unsafe {
        libc::send(
            sock.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn open_flow(target: SocketAddr) -> io::Result<UdpSocket> {
    let any = match target {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let sock = std::net::UdpSocket::bind(SocketAddr::new(any, 0))?;
    sock.connect(target)?;
    sock.set_nonblocking(true)?;
    UdpSocket::from_std(sock)
}
