//! A box's network inside its supervisor: the published ports bound and the netdev socket
//! listening before the engine starts, then `boxlite-net` serving the engine's connection.

use std::sync::Arc;
use std::time::Duration;

use boxlite_net::{AllowEntry, ForwardProtocol, NetCounters, NetError, NetworkConfig, PortForward};
use boxlite_proto::net::GuestNetwork;
use tokio::net::UnixListener;

use super::ShimNetwork;
use crate::error::{BoxliteError, BoxliteResult, NetworkError};
use crate::options::{PortProtocol, PortSpec};
use crate::vmm::NetDevice;

/// How long the engine may take to connect its network device once the guest is up (it
/// connects while it starts, before the guest runs).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The network, ready before the engine starts.
#[derive(Debug)]
pub(crate) struct PreparedNetwork {
    config: NetworkConfig,
    listeners: Vec<std::net::TcpListener>,
    netdev: UnixListener,
    /// The ports as bound.
    pub ports: Vec<PortSpec>,
    pub counters: Arc<NetCounters>,
}

impl PreparedNetwork {
    /// Binds the published ports (a taken one fails here, before any VM exists) and the
    /// socket the engine's network device connects to.
    pub fn prepare(network: &ShimNetwork, device: &NetDevice) -> BoxliteResult<Self> {
        let allow_net = network
            .allow_net
            .iter()
            .map(|entry| {
                entry
                    .parse::<AllowEntry>()
                    .map_err(|e| BoxliteError::invalid("allow_net", e.to_string()))
            })
            .collect::<BoxliteResult<Vec<_>>>()?;
        let forwards: Vec<PortForward> = network.ports.iter().map(forward).collect();
        let listeners = boxlite_net::bind_forwards(&forwards).map_err(network_error)?;
        let ports = network
            .ports
            .iter()
            .zip(&listeners)
            .map(|(spec, listener)| {
                let bound = listener
                    .local_addr()
                    .map_err(|e| BoxliteError::io("reading a published port's address", e))?;
                Ok(PortSpec {
                    host_ip: bound.ip(),
                    host_port: bound.port(),
                    ..*spec
                })
            })
            .collect::<BoxliteResult<Vec<_>>>()?;
        let _ = std::fs::remove_file(&device.socket);
        let netdev = UnixListener::bind(&device.socket).map_err(|e| {
            BoxliteError::io(format!("listening on {}", device.socket.display()), e)
        })?;
        let mut config = NetworkConfig::new(network.mac);
        config.allow_net = allow_net;
        config.forwards = forwards;
        Ok(Self {
            config,
            listeners,
            netdev,
            ports,
            counters: Arc::new(NetCounters::new()),
        })
    }

    /// What the guest agent must configure.
    pub fn guest(&self) -> GuestNetwork {
        boxlite_net::guest_network(&self.config)
    }

    /// Takes the engine's connection and serves it until the engine goes away.
    pub async fn serve(self) -> BoxliteResult<()> {
        let (stream, _) = tokio::time::timeout(CONNECT_TIMEOUT, self.netdev.accept())
            .await
            .map_err(|_| NetworkError::Setup {
                reason: "the VM engine did not connect its network device".into(),
            })?
            .map_err(|e| BoxliteError::io("accepting the engine's network connection", e))?;
        boxlite_net::serve(stream, self.config, self.listeners, self.counters)
            .await
            .map_err(network_error)
    }
}

fn forward(spec: &PortSpec) -> PortForward {
    PortForward {
        host_ip: spec.host_ip,
        host_port: spec.host_port,
        guest_port: spec.guest_port,
        protocol: match spec.protocol {
            PortProtocol::Tcp => ForwardProtocol::Tcp,
            PortProtocol::Udp => ForwardProtocol::Udp,
        },
    }
}

fn network_error(e: NetError) -> BoxliteError {
    match e {
        NetError::PortInUse { addr, source } => NetworkError::PortInUse {
            addr: addr.to_string(),
            source,
        }
        .into(),
        NetError::NotSupported { what } => BoxliteError::Unsupported(what),
        other => NetworkError::Setup {
            reason: other.to_string(),
        }
        .into(),
    }
}
