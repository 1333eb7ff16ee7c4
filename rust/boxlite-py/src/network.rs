//! Network option classes in the published package's shapes, and the conversions of its
//! port and network forms into the core's `NetworkOptions` and `PortSpec`.

use std::net::IpAddr;

use boxlite::{BoxliteError, NetworkOptions, PortProtocol, PortSpec};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};

use crate::errors::IntoPyResult;

fn invalid(field: &str, reason: impl Into<String>) -> PyErr {
    crate::errors::to_py_err(BoxliteError::invalid(field, reason))
}

/// Where the box may connect: `mode` "enabled" or "disabled" (no network interface at all),
/// and `allow_net` (host names, `*.wildcard` names, IPs, CIDRs; empty = the internet).
#[derive(Debug, Clone)]
#[pyclass(module = "boxlite")]
pub struct OutboundNetworkSpec {
    #[pyo3(get, set)]
    pub mode: String,
    #[pyo3(get, set)]
    pub allow_net: Vec<String>,
}

#[pymethods]
impl OutboundNetworkSpec {
    #[new]
    #[pyo3(signature = (mode="enabled".to_owned(), allow_net=Vec::new()))]
    fn new(mode: String, allow_net: Vec<String>) -> Self {
        Self { mode, allow_net }
    }

    fn __repr__(&self) -> String {
        format!(
            "OutboundNetworkSpec(mode={:?}, allow_net={:?})",
            self.mode, self.allow_net
        )
    }
}

/// Who may reach the box's services from outside (remote runtimes); locally, published
/// `ports` are how a box is reached.
#[derive(Debug, Clone)]
#[pyclass(module = "boxlite")]
pub struct InboundNetworkSpec {
    #[pyo3(get, set)]
    pub mode: String,
    #[pyo3(get, set)]
    pub allow_net: Vec<String>,
}

#[pymethods]
impl InboundNetworkSpec {
    #[new]
    #[pyo3(signature = (mode="disabled".to_owned(), allow_net=Vec::new()))]
    fn new(mode: String, allow_net: Vec<String>) -> Self {
        Self { mode, allow_net }
    }

    fn __repr__(&self) -> String {
        format!(
            "InboundNetworkSpec(mode={:?}, allow_net={:?})",
            self.mode, self.allow_net
        )
    }
}

/// A box's network: `NetworkSpec(outbound=OutboundNetworkSpec(...), inbound=...)`, or the
/// older forms `NetworkSpec("disabled")`, `NetworkSpec(mode=..., allow_net=[...])` and
/// `NetworkSpec(allow_net=[...])`, which set `outbound`.
#[derive(Debug, Clone)]
#[pyclass(module = "boxlite")]
pub struct NetworkSpec {
    #[pyo3(get)]
    pub outbound: Option<OutboundNetworkSpec>,
    #[pyo3(get)]
    pub inbound: Option<InboundNetworkSpec>,
}

#[pymethods]
impl NetworkSpec {
    #[new]
    #[pyo3(signature = (outbound=None, inbound=None, mode=None, allow_net=None))]
    fn new(
        outbound: Option<&Bound<'_, PyAny>>,
        inbound: Option<InboundNetworkSpec>,
        mode: Option<String>,
        allow_net: Option<Vec<String>>,
    ) -> PyResult<Self> {
        // The legacy positional form puts the mode first: NetworkSpec("disabled").
        let (outbound, mode) = match outbound {
            Some(value) if value.is_instance_of::<PyString>() => {
                if mode.is_some() {
                    return Err(PyValueError::new_err("the mode is given twice"));
                }
                (None, Some(value.extract::<String>()?))
            }
            Some(value) if !value.is_none() => {
                (Some(value.extract::<OutboundNetworkSpec>()?), mode)
            }
            _ => (None, mode),
        };
        let legacy = mode.is_some() || allow_net.is_some();
        let outbound = match (outbound, legacy) {
            (Some(_), true) => {
                return Err(PyValueError::new_err(
                    "cannot mix outbound with the legacy mode/allow_net arguments",
                ))
            }
            (Some(outbound), false) => Some(outbound),
            (None, true) => Some(OutboundNetworkSpec {
                mode: mode.unwrap_or_else(|| "enabled".into()),
                allow_net: allow_net.unwrap_or_default(),
            }),
            (None, false) => None,
        };
        Ok(Self { outbound, inbound })
    }

    /// The outbound mode ("enabled" when unset).
    #[getter]
    fn mode(&self) -> String {
        self.outbound
            .as_ref()
            .map_or_else(|| "enabled".into(), |o| o.mode.clone())
    }

    /// The outbound allow-list.
    #[getter]
    fn allow_net(&self) -> Vec<String> {
        self.outbound
            .as_ref()
            .map(|o| o.allow_net.clone())
            .unwrap_or_default()
    }

    fn __repr__(&self) -> String {
        let show = |o: Option<String>| o.unwrap_or_else(|| "None".into());
        format!(
            "NetworkSpec(outbound={}, inbound={})",
            show(self.outbound.as_ref().map(OutboundNetworkSpec::__repr__)),
            show(self.inbound.as_ref().map(InboundNetworkSpec::__repr__))
        )
    }
}

impl NetworkSpec {
    /// The core's options; the mode words and the inbound side are checked by the core.
    pub fn to_core(&self) -> PyResult<NetworkOptions> {
        if let Some(inbound) = &self.inbound {
            NetworkOptions::from_mode(&inbound.mode, Vec::new()).py()?;
            if !inbound.allow_net.is_empty() {
                return Err(crate::errors::to_py_err(BoxliteError::Unsupported(
                    "inbound.allow_net (publish ports instead)".into(),
                )));
            }
        }
        match &self.outbound {
            Some(outbound) => {
                NetworkOptions::from_mode(&outbound.mode, outbound.allow_net.clone()).py()
            }
            None => Ok(NetworkOptions::default()),
        }
    }
}

/// The published forms of one `ports` entry: `(host_port, guest_port[, protocol[,
/// host_ip]])`, or a dict with `guest_port` and optional `host_port` (0 or absent = a free
/// port), `protocol` and `host_ip`.
pub fn port_spec(entry: &Bound<'_, PyAny>) -> PyResult<PortSpec> {
    let (host_port, guest_port, protocol, host_ip) = if let Ok(dict) = entry.downcast::<PyDict>() {
        let get = |key: &str| dict.get_item(key).ok().flatten().filter(|v| !v.is_none());
        let guest_port = get("guest_port")
            .ok_or_else(|| invalid("ports", "a ports dict needs guest_port"))?
            .extract::<i64>()?;
        let host_port = get("host_port").map(|v| v.extract::<i64>()).transpose()?;
        let protocol = get("protocol").map(|v| v.extract::<String>()).transpose()?;
        let host_ip = get("host_ip").map(|v| v.extract::<String>()).transpose()?;
        (host_port.unwrap_or(0), guest_port, protocol, host_ip)
    } else if let Ok(tuple) = entry.downcast::<PyTuple>() {
        if !(2..=4).contains(&tuple.len()) {
            return Err(invalid(
                "ports",
                "a ports tuple is (host_port, guest_port[, protocol[, host_ip]])",
            ));
        }
        let protocol = tuple
            .get_item(2)
            .ok()
            .filter(|v| !v.is_none())
            .map(|v| v.extract::<String>())
            .transpose()?;
        let host_ip = tuple
            .get_item(3)
            .ok()
            .filter(|v| !v.is_none())
            .map(|v| v.extract::<String>())
            .transpose()?;
        (
            tuple.get_item(0)?.extract::<i64>()?,
            tuple.get_item(1)?.extract::<i64>()?,
            protocol,
            host_ip,
        )
    } else {
        return Err(invalid(
            "ports",
            format!("expected a (host_port, guest_port) tuple or a dict, got {entry}"),
        ));
    };
    let port = |field: &str, n: i64| {
        u16::try_from(n)
            .map_err(|_| invalid("ports", format!("{field} {n} is not a port (0-65535)")))
    };
    let host_ip = match host_ip {
        Some(text) => text
            .parse::<IpAddr>()
            .map_err(|_| invalid("ports", format!("host_ip {text:?} is not an IP address")))?,
        None => boxlite::DEFAULT_PORT_HOST_IP,
    };
    Ok(PortSpec {
        host_ip,
        host_port: port("host_port", host_port)?,
        guest_port: port("guest_port", guest_port)?,
        protocol: match protocol {
            Some(p) => PortProtocol::parse(&p).py()?,
            None => PortProtocol::Tcp,
        },
    })
}

/// One published port, as bound.
#[derive(Debug, Clone)]
#[pyclass(frozen, get_all, module = "boxlite")]
pub struct PublishedPort {
    pub host_ip: String,
    pub host_port: u16,
    pub guest_port: u16,
    pub protocol: String,
}

#[pymethods]
impl PublishedPort {
    fn __repr__(&self) -> String {
        format!(
            "PublishedPort(host_ip={:?}, host_port={}, guest_port={}, protocol={:?})",
            self.host_ip, self.host_port, self.guest_port, self.protocol
        )
    }
}

impl From<&PortSpec> for PublishedPort {
    fn from(p: &PortSpec) -> Self {
        Self {
            host_ip: p.host_ip.to_string(),
            host_port: p.host_port,
            guest_port: p.guest_port,
            protocol: p.protocol.as_str().into(),
        }
    }
}

/// A box's network as it is: `mode`, `allow_net`, and the ports published now.
#[derive(Debug)]
#[pyclass(frozen, get_all, module = "boxlite")]
pub struct NetworkInfo {
    pub mode: String,
    pub allow_net: Vec<String>,
    pub published_ports: Vec<PublishedPort>,
}

impl NetworkInfo {
    pub fn new(network: &NetworkOptions, ports: &[PortSpec]) -> Self {
        Self {
            mode: network.mode().into(),
            allow_net: network.allow_net.clone(),
            published_ports: ports.iter().map(PublishedPort::from).collect(),
        }
    }
}

#[pymethods]
impl NetworkInfo {
    fn __repr__(&self) -> String {
        format!(
            "NetworkInfo(mode={:?}, allow_net={:?}, published_ports={})",
            self.mode,
            self.allow_net,
            self.published_ports.len()
        )
    }
}
