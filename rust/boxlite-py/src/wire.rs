//! The JSON shapes of value objects for remote runtimes: `boxlite serve` writes them with
//! `_to_wire()`, the REST client reads them back with `_from_wire()`, so one side owns both.
//!
//! Dicts cross the boundary as JSON text through Python's `json` module; input from the wire
//! is untrusted and a malformed one is a `ParseError` naming what was being read.

use std::collections::BTreeMap;

use pyo3::prelude::*;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::info::{BoxInfo, BoxState};
use crate::metrics::RuntimeMetrics;
use crate::network::{NetworkInfo, PublishedPort};

/// `value` as a Python dict (through JSON, so the shape is exactly serde's).
pub(crate) fn to_dict<T: Serialize>(py: Python<'_>, value: &T) -> PyResult<PyObject> {
    let text = serde_json::to_string(value).map_err(|e| parse_error(py, "a value", &e))?;
    Ok(py.import("json")?.call_method1("loads", (text,))?.unbind())
}

/// A wire dict read into `T`; `what` names it in the error.
pub(crate) fn from_dict<T: DeserializeOwned>(
    py: Python<'_>,
    dict: &Bound<'_, PyAny>,
    what: &str,
) -> PyResult<T> {
    let text: String = py
        .import("json")?
        .call_method1("dumps", (dict,))?
        .extract()?;
    serde_json::from_str(&text).map_err(|e| parse_error(py, what, &e))
}

pub(crate) fn parse_error(py: Python<'_>, what: &str, error: &serde_json::Error) -> PyErr {
    let message = format!("the server sent a malformed {what}: {error}");
    match py
        .import("boxlite.errors")
        .and_then(|m| m.getattr("ParseError")?.call1((message.clone(),)))
    {
        Ok(instance) => PyErr::from_value(instance),
        Err(_) => pyo3::exceptions::PyValueError::new_err(message),
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct PortWire {
    host_ip: String,
    host_port: u16,
    guest_port: u16,
    protocol: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct NetworkWire {
    mode: String,
    allow_net: Vec<String>,
    published_ports: Vec<PortWire>,
}

/// A box's info on the wire: the published REST shape (`box_id`, `status`, `labels`, ...)
/// plus boxlite's fields.
#[derive(Debug, Serialize, Deserialize)]
struct BoxInfoWire {
    #[serde(default)]
    box_id: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    status: String,
    #[serde(default)]
    running: bool,
    #[serde(default)]
    pid: Option<u32>,
    #[serde(default)]
    exit_code: Option<i32>,
    image: String,
    cpus: u32,
    memory_mib: u64,
    created_at: String,
    #[serde(default)]
    updated_at: Option<String>,
    #[serde(default)]
    started_at: Option<String>,
    #[serde(default)]
    accelerator: String,
    #[serde(default)]
    hardware_isolated: bool,
    #[serde(default)]
    detach: bool,
    #[serde(default)]
    auto_remove: bool,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    network: NetworkWire,
}

impl BoxInfo {
    pub(crate) fn to_wire(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_dict(py, &self.wire())
    }

    pub(crate) fn from_wire(py: Python<'_>, wire: &Bound<'_, PyAny>) -> PyResult<Self> {
        Self::from_wire_struct(py, from_dict(py, wire, "box info")?)
    }

    fn wire(&self) -> BoxInfoWire {
        let state = self.state.get();
        let network = self.network.get();
        BoxInfoWire {
            box_id: Some(self.id.clone()),
            id: Some(self.id.clone()),
            name: self.name.clone(),
            status: state.status.clone(),
            running: state.running,
            pid: state.pid,
            exit_code: state.exit_code,
            image: self.image.clone(),
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            created_at: self.created_at.clone(),
            updated_at: Some(
                self.started_at
                    .clone()
                    .unwrap_or_else(|| self.created_at.clone()),
            ),
            started_at: self.started_at.clone(),
            accelerator: self.accelerator.clone(),
            hardware_isolated: self.hardware_isolated,
            detach: self.detach,
            auto_remove: self.auto_remove,
            labels: BTreeMap::new(),
            network: NetworkWire {
                mode: network.mode.clone(),
                allow_net: network.allow_net.clone(),
                published_ports: network
                    .published_ports
                    .iter()
                    .map(|p| PortWire {
                        host_ip: p.host_ip.clone(),
                        host_port: p.host_port,
                        guest_port: p.guest_port,
                        protocol: p.protocol.clone(),
                    })
                    .collect(),
            },
        }
    }

    fn from_wire_struct(py: Python<'_>, wire: BoxInfoWire) -> PyResult<Self> {
        let id = wire.id.or(wire.box_id).unwrap_or_default();
        if id.is_empty() {
            return Err(parse_error(
                py,
                "box info",
                &serde::de::Error::missing_field("box_id"),
            ));
        }
        let running = wire.running || wire.status == "running";
        Ok(Self {
            id,
            name: wire.name,
            state: Py::new(
                py,
                BoxState {
                    status: wire.status,
                    running,
                    pid: wire.pid,
                    exit_code: wire.exit_code,
                },
            )?,
            image: wire.image,
            cpus: wire.cpus,
            memory_mib: wire.memory_mib,
            created_at: wire.created_at,
            started_at: wire.started_at,
            pid: wire.pid,
            accelerator: wire.accelerator,
            hardware_isolated: wire.hardware_isolated,
            detach: wire.detach,
            auto_remove: wire.auto_remove,
            auto_delete: u64::from(wire.auto_remove),
            network: Py::new(
                py,
                NetworkInfo {
                    mode: wire.network.mode,
                    allow_net: wire.network.allow_net,
                    published_ports: wire
                        .network
                        .published_ports
                        .into_iter()
                        .map(|p| PublishedPort {
                            host_ip: p.host_ip,
                            host_port: p.host_port,
                            guest_port: p.guest_port,
                            protocol: p.protocol,
                        })
                        .collect(),
                },
            )?,
        })
    }
}

/// Runtime counters on the wire: boxlite's names and the published package's.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct RuntimeMetricsWire {
    boxes_created_total: u64,
    boxes_failed_total: u64,
    num_running_boxes: u64,
    total_commands_run: u64,
    total_run_errors: u64,
    total_commands_executed: u64,
    total_exec_errors: u64,
}

impl RuntimeMetrics {
    pub(crate) fn to_wire(&self, py: Python<'_>) -> PyResult<PyObject> {
        let m = &self.0;
        to_dict(
            py,
            &RuntimeMetricsWire {
                boxes_created_total: m.boxes_created_total(),
                boxes_failed_total: m.boxes_failed_total(),
                num_running_boxes: m.num_running_boxes(),
                total_commands_run: m.total_commands_run(),
                total_run_errors: m.total_run_errors(),
                total_commands_executed: m.total_commands_run(),
                total_exec_errors: m.total_run_errors(),
            },
        )
    }

    /// Another runtime's counters, as its server reported them (fixed values).
    pub(crate) fn from_wire(py: Python<'_>, wire: &Bound<'_, PyAny>) -> PyResult<Self> {
        let w: RuntimeMetricsWire = from_dict(py, wire, "runtime metrics")?;
        Ok(Self(boxlite::RuntimeMetrics::from_totals(
            w.boxes_created_total,
            w.boxes_failed_total,
            w.num_running_boxes,
            w.total_commands_run.max(w.total_commands_executed),
            w.total_run_errors.max(w.total_exec_errors),
        )))
    }
}
