//! The crate's error type.

use std::io;
use std::net::SocketAddr;

/// What can go wrong setting up or running a box's network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A published port's host address is taken by another program (or box).
    #[error(
        "host port {addr} is already in use by another program or box; \
         publish a different host port or stop whatever holds it"
    )]
    PortInUse {
        /// The host address that could not be bound.
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// A published port could not be bound for another reason (no such local address,
    /// a privileged port, ...).
    #[error("cannot listen on {addr} for a published port")]
    Bind {
        /// The host address that could not be bound.
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// A requested feature the stack does not provide (e.g. UDP published ports).
    #[error("{what} is not supported")]
    NotSupported {
        /// What was asked for.
        what: String,
    },
    /// The configuration is inconsistent.
    #[error("invalid network configuration: {0}")]
    Config(String),
    /// Reading or writing the QEMU netdev stream failed.
    #[error("the network device stream failed")]
    Netdev(#[source] io::Error),
}
