//! Per-box caps that keep a misbehaving guest from exhausting the host.

use std::time::Duration;

/// Per-box limits. The defaults bound one box to at most
/// `max_tcp_connections + max_udp_flows` host sockets (plus one listener per published port)
/// and about `2 * tcp_buffer_bytes` of stack memory per TCP connection (and per closed
/// connection socket kept for reuse, at most four).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// TCP connections at once, counting outbound connects still in progress, inbound
    /// (published-port) connections and DNS-over-TCP sessions. A guest SYN beyond it is
    /// answered with RST at once; published ports stop accepting (the host kernel's backlog
    /// holds the callers) until a connection ends. Default 256.
    pub max_tcp_connections: usize,
    /// Outbound host connects in progress at once (a SYN flood to many endpoints lands here);
    /// beyond it a SYN is answered with RST. Default 64.
    pub max_pending_connects: usize,
    /// UDP flows (guest address and port to one destination) at once, each one host socket;
    /// a new flow beyond it replaces the least recently used. Default 128.
    pub max_udp_flows: usize,
    /// Host name lookups in progress at once; a query beyond it gets SERVFAIL. Default 32.
    pub max_dns_lookups: usize,
    /// Buffer per direction per TCP connection inside the stack (also its receive window).
    /// Default 256 KiB.
    pub tcp_buffer_bytes: usize,
    /// How long an outbound host connect may take before the guest gets RST. Default 20 s.
    pub connect_timeout: Duration,
    /// A UDP flow idle this long is closed. Default 60 s.
    pub udp_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_tcp_connections: 256,
            max_pending_connects: 64,
            max_udp_flows: 128,
            max_dns_lookups: 32,
            tcp_buffer_bytes: 256 * 1024,
            connect_timeout: Duration::from_secs(20),
            udp_idle_timeout: Duration::from_secs(60),
        }
    }
}

impl Limits {
    /// The most host file descriptors the stack holds for one box with `forwards` published
    /// ports (the netdev stream included).
    pub fn fd_budget(&self, forwards: usize) -> usize {
        self.max_tcp_connections + self.max_udp_flows + forwards + 1
    }
}
