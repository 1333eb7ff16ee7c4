//! Published ports: host listeners bound before the VM boots, so a taken port is a clear
//! error up front, then handed to [`crate::serve`].

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};

use crate::NetError;

/// The host address published ports bind to unless told otherwise: loopback only.
pub const DEFAULT_HOST_IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The protocol of a published port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ForwardProtocol {
    /// Supported.
    #[default]
    Tcp,
    /// Refused by [`bind_forwards`] with [`NetError::NotSupported`].
    Udp,
}

/// A host port that leads to a guest port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortForward {
    /// The host address to listen on ([`DEFAULT_HOST_IP`], 127.0.0.1, unless told otherwise).
    pub host_ip: IpAddr,
    /// The host port; 0 picks a free one (read it from the returned listener).
    pub host_port: u16,
    /// The guest port connections are opened to.
    pub guest_port: u16,
    /// TCP only for now.
    pub protocol: ForwardProtocol,
}

impl PortForward {
    /// A TCP port published on the host's loopback.
    pub fn tcp(host_port: u16, guest_port: u16) -> PortForward {
        PortForward {
            host_ip: DEFAULT_HOST_IP,
            host_port,
            guest_port,
            protocol: ForwardProtocol::Tcp,
        }
    }

    /// The host address this forward listens on.
    pub fn host_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host_ip, self.host_port)
    }
}

/// Binds one listener per forward, in order. A taken port is [`NetError::PortInUse`]; the
/// listeners are non-blocking, ready for [`crate::serve`]. Dropping them frees the ports.
pub fn bind_forwards(forwards: &[PortForward]) -> Result<Vec<TcpListener>, NetError> {
    let mut out = Vec::with_capacity(forwards.len());
    for f in forwards {
        let addr = f.host_addr();
        if f.protocol != ForwardProtocol::Tcp {
            return Err(NetError::NotSupported {
                what: format!("publishing UDP port {addr} (only TCP ports can be published)"),
            });
        }
        if f.guest_port == 0 {
            return Err(NetError::Config(format!(
                "published port {addr} leads to guest port 0; give a guest port 1-65535"
            )));
        }
        let listener = TcpListener::bind(addr).map_err(|source| {
            if source.kind() == io::ErrorKind::AddrInUse {
                NetError::PortInUse { addr, source }
            } else {
                NetError::Bind { addr, source }
            }
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| NetError::Bind { addr, source })?;
        out.push(listener);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_port_is_a_clear_error() {
        let first = bind_forwards(&[PortForward::tcp(0, 80)]).expect("bind");
        let port = first[0].local_addr().expect("addr").port();
        let err = bind_forwards(&[PortForward::tcp(port, 80)]).expect_err("taken");
        assert!(matches!(err, NetError::PortInUse { addr, .. } if addr.port() == port));
        let text = err.to_string();
        assert!(
            text.contains(&port.to_string()) && text.contains("already in use"),
            "{text}"
        );
        assert!(std::error::Error::source(&err).is_some());
        drop(first);
        // Free again once dropped.
        bind_forwards(&[PortForward::tcp(port, 80)]).expect("free again");
    }

    #[test]
    fn refuses_udp_and_port_zero() {
        let mut udp = PortForward::tcp(0, 53);
        udp.protocol = ForwardProtocol::Udp;
        assert!(matches!(
            bind_forwards(&[udp]),
            Err(NetError::NotSupported { .. })
        ));
        assert!(matches!(
            bind_forwards(&[PortForward::tcp(0, 0)]),
            Err(NetError::Config(_))
        ));
    }
}
