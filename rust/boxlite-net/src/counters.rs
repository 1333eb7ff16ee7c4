//! Traffic counters for a box's metrics, shared with whoever reports them.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of one box's network, updated by the stack; read them with
/// [`snapshot`](Self::snapshot) from any thread.
#[derive(Debug, Default)]
pub struct NetCounters {
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    tcp_connections: AtomicU64,
    tcp_errors: AtomicU64,
}

/// A copy of [`NetCounters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Payload bytes from the guest to the outside (TCP and UDP, published ports included;
    /// DNS answered by the stack itself is not counted).
    pub bytes_sent: u64,
    /// Payload bytes from the outside to the guest.
    pub bytes_received: u64,
    /// TCP connections relayed right now (outbound and published-port).
    pub tcp_connections: u64,
    /// TCP connections that failed: denied by policy or limits, refused, reset or timed out.
    pub tcp_errors: u64,
}

impl NetCounters {
    /// Zeroed counters.
    pub fn new() -> NetCounters {
        NetCounters::default()
    }

    /// The counters now.
    pub fn snapshot(&self) -> NetStats {
        NetStats {
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            tcp_connections: self.tcp_connections.load(Ordering::Relaxed),
            tcp_errors: self.tcp_errors.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn sent(&self, n: usize) {
        self.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn received(&self, n: usize) {
        self.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn tcp_opened(&self) {
        self.tcp_connections.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn tcp_closed(&self) {
        // Never below zero, whatever the bookkeeping says.
        let _ = self
            .tcp_connections
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(1))
            });
    }

    pub(crate) fn tcp_error(&self) {
        self.tcp_errors.fetch_add(1, Ordering::Relaxed);
    }
}
