//! The user-mode network stack of one boxlite box.
//!
//! QEMU runs the guest's `virtio-net-pci` device on
//! `-netdev stream,id=n0,server=off,addr.type=unix,addr.path=<sock>` and connects to a unix
//! socket the box's shim listens on; every Ethernet frame crosses it as a 4-byte big-endian
//! length and the frame. [`serve`] runs this crate's stack (smoltcp) on that stream: it
//! answers ARP for the gateway, serves DNS itself, and re-originates the guest's TCP and UDP
//! connections from ordinary host sockets. No root, no tap device, no DHCP: the guest agent
//! sets its address and route from a [`GuestNetwork`] ([`guest_network`]).
//!
//! # Addresses
//!
//! | what | address |
//! | --- | --- |
//! | guest | [`GUEST_IP`] 192.168.127.2/24 |
//! | gateway, DNS server | [`GATEWAY_IP`] 192.168.127.1 |
//! | the host's loopback, as `host.boxlite.internal` | [`HOST_ALIAS_IP`] 192.168.127.254 |
//!
//! The guest is IPv4 only; the policy classifies IPv6 addresses too (host DNS may return them).
//!
//! # Policy
//!
//! Decided per connection by the stack from the destination, never by the guest.
//!
//! - Never reachable: the host's loopback by address (127.0.0.0/8, `::1`, and IPv6 forms
//!   embedding them), 0.0.0.0/8, multicast, broadcast, 240.0.0.0/4.
//! - Reachable only through an `allow_net` IP or CIDR lying *inside* the range (so
//!   `0.0.0.0/0` means the public internet and opens none of these): link-local and cloud
//!   metadata (169.254.0.0/16, fe80::/10), private ranges (10/8, 172.16/12, 192.168/16,
//!   100.64/10, fc00::/7). The host's own interface addresses (from `getifaddrs`) open only
//!   to an entry naming exactly that address. A private address also opens when it came from
//!   the DNS answer for a name `allow_net` lists (exactly or by `*.domain`, not by `*`):
//!   naming a host is an explicit choice.
//! - Empty `allow_net`: the public internet, every name resolves.
//! - Non-empty `allow_net`: DNS answers only allowed names (others get NXDOMAIN). An address
//!   from an allowed name's answer stays reachable for [`policy::LEARNED_TTL`] (answers carry
//!   [`DNS_TTL_SECS`]; the host resolver gives no TTL). Such an address is reachable on every
//!   port, but on 443 the TLS SNI and on 80 the HTTP `Host` must name an allowed host before
//!   any byte is forwarded, and UDP 443 (QUIC) is refused. Any other destination is refused
//!   at once: RST to the SYN, ICMP port unreachable for UDP.
//! - The host's loopback services are reachable only as `host.boxlite.internal`
//!   ([`HOST_ALIAS_IP`]) and only when `allow_net` names it; port P there is 127.0.0.1:P
//!   (then `[::1]:P` if refused). DNS answers the name with [`HOST_ALIAS_IP`].
//! - Known limits: only the first HTTP request of a connection is checked; a TLS name check
//!   cannot see the encrypted HTTP `Host` (domain fronting among allowed names' servers).
//!
//! # Limits
//!
//! [`Limits`] caps one box (defaults): 256 TCP connections (connects in progress and published
//! port connections included), 64 connects in progress, 128 UDP flows (least recently used
//! replaced), 32 host name lookups, 256 KiB per direction per TCP connection, 20 s connect
//! timeout, 60 s UDP idle timeout. A SYN beyond a cap gets RST at once. Host descriptors are
//! thus bounded by [`Limits::fd_budget`]; stack memory by about 2 x `tcp_buffer_bytes` per
//! connection, the same for up to four closed connections whose sockets are kept for reuse,
//! plus a 1 MiB netdev write buffer.
//!
//! # Counters
//!
//! [`NetCounters`] counts guest payload bytes out and in, open TCP connections and TCP errors
//! (denied, refused, reset, timed out); [`NetCounters::snapshot`] reads them.
//!
//! # Also served
//!
//! DNS over UDP and TCP on the gateway's port 53 (A records; AAAA and other types answer
//! "no data"); ping to the gateway and the alias. Not relayed: ICMP to anything else, IP
//! fragments, IPv6, UDP datagrams larger than the MTU.
//!
//! # Use (in the box's shim)
//!
//! 1. `bind_forwards(&config.forwards)?` before the VM boots (a taken port is
//!    [`NetError::PortInUse`]), and listen on a unix socket for QEMU.
//! 2. QEMU: `-netdev stream,id=n0,server=off,addr.type=unix,addr.path=<sock>
//!    -device virtio-net-pci,netdev=n0,romfile=,mac=<GuestNetwork::mac_string()>`.
//! 3. Accept QEMU's one connection and spawn [`serve`] with it, the config, the listeners
//!    and an `Arc<NetCounters>` kept for metrics. It returns when QEMU closes the stream;
//!    the published ports are released then.
//! 4. Send [`guest_network`]`(&config)` to the agent, which applies it.

mod counters;
mod dns;
mod error;
mod forward;
mod frame;
mod ifaddrs;
mod limits;
pub mod policy;
mod sniff;
mod stack;
mod tcp;
mod udp;

#[cfg(test)]
extern crate self as boxlite_net;
#[cfg(test)]
mod name_tests;

use std::net::Ipv4Addr;
use std::sync::Arc;

pub use boxlite_proto::net::GuestNetwork;
pub use counters::{NetCounters, NetStats};
pub use error::NetError;
pub use forward::{bind_forwards, ForwardProtocol, PortForward, DEFAULT_HOST_IP};
pub use limits::Limits;
pub use policy::{AllowEntry, AllowEntryProblem, Cidr, ParseAllowEntryError};

/// The guest's address.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 2);
/// The gateway: the stack itself, also the DNS server.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 1);
/// The address that stands for the host's loopback.
pub const HOST_ALIAS_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 254);
/// The name of [`HOST_ALIAS_IP`].
pub const HOST_ALIAS_NAME: &str = "host.boxlite.internal";
/// The virtual link's prefix length.
pub const PREFIX_LEN: u8 = 24;
/// The gateway's MAC address (locally administered; its last four bytes spell 192.168.127.1).
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0xc0, 0xa8, 0x7f, 0x01];
/// The guest interface the agent configures.
pub const GUEST_INTERFACE: &str = "eth0";
/// The default MTU of the virtual link.
pub const DEFAULT_MTU: u16 = 1500;
/// The TTL of the stack's DNS answers, in seconds.
pub const DNS_TTL_SECS: u32 = 300;
/// The DNS port on the gateway (UDP and TCP).
pub const DNS_PORT: u16 = 53;

/// One box's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The guest's MAC address (also given to QEMU's `virtio-net-pci`); see [`guest_mac`].
    pub guest_mac: [u8; 6],
    /// What the box may reach; empty is the public internet. See the crate docs.
    pub allow_net: Vec<AllowEntry>,
    /// Published ports, in the order of the listeners given to [`serve`].
    pub forwards: Vec<PortForward>,
    /// Per-box caps.
    pub limits: Limits,
    /// The link MTU (576-65520); the guest gets the same in its [`GuestNetwork`]. Larger
    /// values move bulk data with fewer, bigger frames.
    pub mtu: u16,
}

impl NetworkConfig {
    /// Internet access, no published ports, default limits, [`DEFAULT_MTU`].
    pub fn new(guest_mac: [u8; 6]) -> NetworkConfig {
        NetworkConfig {
            guest_mac,
            allow_net: Vec::new(),
            forwards: Vec::new(),
            limits: Limits::default(),
            mtu: DEFAULT_MTU,
        }
    }
}

/// A stable, locally administered unicast MAC address for a box, derived from `seed` (its
/// id). Never the gateway's.
pub fn guest_mac(seed: &str) -> [u8; 6] {
    // FNV-1a: stable across Rust versions, unlike std's hashers.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    let mac = [(b[0] & 0xfe) | 0x02, b[1], b[2], b[3], b[4], b[5]];
    if mac == GATEWAY_MAC {
        [0x52, 0x55, 0xc0, 0xa8, 0x7f, 0x02]
    } else {
        mac
    }
}

/// What the guest agent must configure for `config`: `eth0` with [`GUEST_IP`]/24, the
/// default route and DNS via [`GATEWAY_IP`], and `host.boxlite.internal` in `/etc/hosts`
/// when `allow_net` names it.
pub fn guest_network(config: &NetworkConfig) -> GuestNetwork {
    let alias = config
        .allow_net
        .iter()
        .any(|e| matches!(e, AllowEntry::Name(n) if n == HOST_ALIAS_NAME));
    GuestNetwork {
        interface: GUEST_INTERFACE.to_string(),
        mac: config.guest_mac,
        address: GUEST_IP,
        prefix_len: PREFIX_LEN,
        gateway: GATEWAY_IP,
        dns: vec![GATEWAY_IP],
        mtu: config.mtu,
        hosts: if alias {
            vec![(HOST_ALIAS_NAME.to_string(), HOST_ALIAS_IP)]
        } else {
            Vec::new()
        },
    }
}

/// Runs the box's network on `netdev` (QEMU's stream connection) until the stream ends
/// (`Ok`) or fails. `listeners` come from [`bind_forwards`] for `config.forwards`, in order.
/// Must run inside a tokio runtime; one task, woken only by its sockets and timers.
pub async fn serve(
    netdev: tokio::net::UnixStream,
    config: NetworkConfig,
    listeners: Vec<std::net::TcpListener>,
    counters: Arc<NetCounters>,
) -> Result<(), NetError> {
    if listeners.len() != config.forwards.len() {
        return Err(NetError::Config(format!(
            "{} listeners for {} published ports (bind them with bind_forwards)",
            listeners.len(),
            config.forwards.len()
        )));
    }
    if !(576..=65520).contains(&config.mtu) {
        return Err(NetError::Config(format!(
            "MTU {} is outside 576-65520",
            config.mtu
        )));
    }
    if config.limits.tcp_buffer_bytes < 4096 || config.limits.tcp_buffer_bytes > (1 << 30) {
        return Err(NetError::Config(format!(
            "tcp_buffer_bytes {} is outside 4 KiB-1 GiB",
            config.limits.tcp_buffer_bytes
        )));
    }
    let host_addrs = ifaddrs::host_addresses();
    let stack = stack::Stack::new(netdev, &config, listeners, counters, host_addrs)?;
    stack.run().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_stable_local_unicast() {
        let a = guest_mac("01HZXBOXID");
        assert_eq!(a, guest_mac("01HZXBOXID"));
        assert_ne!(a, guest_mac("another"));
        assert_eq!(a[0] & 0x01, 0, "unicast");
        assert_eq!(a[0] & 0x02, 0x02, "locally administered");
    }

    #[test]
    fn guest_setup_follows_the_config() {
        let mut c = NetworkConfig::new(guest_mac("x"));
        let g = guest_network(&c);
        assert_eq!(g.address, GUEST_IP);
        assert_eq!(g.gateway, GATEWAY_IP);
        assert_eq!(g.dns, vec![GATEWAY_IP]);
        assert_eq!(g.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert!(g.hosts.is_empty());
        c.allow_net = vec!["host.boxlite.internal".parse().expect("entry")];
        assert_eq!(
            guest_network(&c).hosts,
            vec![(HOST_ALIAS_NAME.to_string(), HOST_ALIAS_IP)]
        );
    }
}
