//! Read-only records: a box's info and state, images, pull progress, GC reports.

use std::sync::Mutex;
use std::time::UNIX_EPOCH;

use boxlite::rfc3339;

use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;

/// The iterator behind `await` on a value that is already there: it finishes at once with it
/// (so code written for an API where the call is a coroutine keeps working).
#[derive(Debug)]
#[pyclass(frozen, module = "boxlite._native")]
pub struct Ready(Mutex<Option<PyObject>>);

impl Ready {
    pub fn new(value: PyObject) -> Self {
        Self(Mutex::new(Some(value)))
    }
}

#[pymethods]
impl Ready {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<()> {
        let value = self
            .0
            .lock()
            .ok()
            .and_then(|mut v| v.take())
            .unwrap_or_else(|| py.None());
        Err(PyStopIteration::new_err((value,)))
    }
}

/// Where a box is in its life: `status` is one of configured, starting, running, stopping,
/// stopped, failed. (The published package calls this class `BoxStateInfo`.)
#[derive(Debug, Clone)]
#[pyclass(frozen, get_all, module = "boxlite")]
pub struct BoxState {
    pub status: String,
    pub running: bool,
    pub pid: Option<u32>,
    pub exit_code: Option<i32>,
}

#[pymethods]
impl BoxState {
    fn __repr__(&self) -> String {
        format!(
            "BoxState(status={:?}, running={}, pid={:?})",
            self.status,
            if self.running { "True" } else { "False" },
            self.pid
        )
    }
}

/// What a box is. `pid` is its VM engine process while it runs; times are RFC 3339 strings.
/// `await box.info()` works too (the published package's `info()` is a coroutine).
#[derive(Debug)]
#[pyclass(frozen, get_all, module = "boxlite")]
pub struct BoxInfo {
    pub id: String,
    pub name: Option<String>,
    pub state: Py<BoxState>,
    pub image: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub created_at: String,
    pub started_at: Option<String>,
    pub pid: Option<u32>,
    pub accelerator: String,
    pub hardware_isolated: bool,
    pub detach: bool,
    pub auto_remove: bool,
    /// `1` when the box is deleted at stop, else `0` (the published package's field).
    pub auto_delete: u64,
    pub network: Py<crate::network::NetworkInfo>,
}

impl BoxInfo {
    pub fn new(py: Python<'_>, info: boxlite::BoxInfo) -> PyResult<Self> {
        let running = info.status == boxlite::BoxStatus::Running;
        Ok(Self {
            id: info.id.to_string(),
            name: info.name,
            state: Py::new(
                py,
                BoxState {
                    status: info.status.as_str().to_owned(),
                    running,
                    pid: info.pid,
                    exit_code: None,
                },
            )?,
            image: info.image,
            cpus: info.cpus,
            memory_mib: info.memory_mib,
            created_at: rfc3339(info.created_at),
            started_at: info.started_at.map(rfc3339),
            pid: info.pid,
            accelerator: info.accel.to_string(),
            hardware_isolated: info.hardware_isolated,
            detach: info.detach,
            auto_remove: info.auto_remove,
            auto_delete: u64::from(info.auto_remove),
            network: Py::new(
                py,
                crate::network::NetworkInfo::new(&info.network, &info.ports),
            )?,
        })
    }
}

#[pymethods]
impl BoxInfo {
    #[getter]
    fn status(&self) -> String {
        self.state.get().status.clone()
    }

    #[getter]
    fn running(&self) -> bool {
        self.state.get().running
    }

    fn __await__(slf: Py<Self>) -> Ready {
        Ready::new(slf.into_any())
    }

    /// This info as a JSON-ready dict (the REST shape; see `wire.rs`).
    fn _to_wire(&self, py: Python<'_>) -> PyResult<PyObject> {
        self.to_wire(py)
    }

    /// Info read from a REST response (`ParseError` if malformed).
    #[staticmethod]
    fn _from_wire(py: Python<'_>, wire: &Bound<'_, PyAny>) -> PyResult<Self> {
        Self::from_wire(py, wire)
    }

    fn __repr__(&self) -> String {
        format!(
            "BoxInfo(id={:?}, name={}, status={:?}, image={:?}, cpus={}, memory_mib={})",
            self.id,
            self.name
                .as_ref()
                .map_or("None".into(), |n| format!("{n:?}")),
            self.state.get().status,
            self.image,
            self.cpus,
            self.memory_mib
        )
    }
}

/// An image in the local store. `digest` (also `id`) is its manifest digest.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[pyclass(frozen, get_all, module = "boxlite")]
pub struct ImageInfo {
    pub reference: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: String,
    pub index_digest: Option<String>,
    pub config_digest: String,
    pub size: u64,
    pub layers: usize,
    pub architecture: String,
    pub os: String,
    pub created: Option<String>,
    pub pulled_at: Option<f64>,
    /// Memory templates in service for this image (one per box shape).
    pub templates: usize,
    pub env: Vec<(String, String)>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub exposed_ports: Vec<String>,
    pub labels: std::collections::BTreeMap<String, String>,
}

impl From<boxlite::images::ImageInfo> for ImageInfo {
    fn from(info: boxlite::images::ImageInfo) -> Self {
        let config = info.config;
        Self {
            reference: info.reference,
            repository: info.repository,
            tag: info.tag,
            digest: info.digest.to_string(),
            index_digest: info.index_digest.map(|d| d.to_string()),
            config_digest: info.config_digest.to_string(),
            size: info.size,
            layers: info.layers,
            architecture: info.architecture,
            os: info.os,
            created: info.created,
            pulled_at: info
                .pulled_at
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs_f64()),
            templates: info.templates,
            env: config.env,
            entrypoint: config.entrypoint,
            cmd: config.cmd,
            working_dir: config.working_dir,
            user: config.user,
            exposed_ports: config.exposed_ports,
            labels: config.labels,
        }
    }
}

#[pymethods]
impl ImageInfo {
    #[getter]
    fn id(&self) -> &str {
        &self.digest
    }
    /// The published package's name for `size`.
    #[getter]
    fn size_bytes(&self) -> u64 {
        self.size
    }
    /// When the image was pulled, RFC 3339 (the published package's `cached_at`).
    #[getter]
    fn cached_at(&self) -> Option<String> {
        self.pulled_at
            .map(|secs| rfc3339(UNIX_EPOCH + std::time::Duration::from_secs_f64(secs.max(0.0))))
    }
    fn _to_wire(&self, py: Python<'_>) -> PyResult<PyObject> {
        crate::wire::to_dict(py, self)
    }
    #[staticmethod]
    fn _from_wire(py: Python<'_>, wire: &Bound<'_, PyAny>) -> PyResult<Self> {
        crate::wire::from_dict(py, wire, "image info")
    }
    fn __repr__(&self) -> String {
        format!(
            "ImageInfo(reference={:?}, digest={:?}, size={}, layers={})",
            self.reference, self.digest, self.size, self.layers
        )
    }
}

/// One layer's progress: `done` of `total` bytes are in the local store.
#[derive(Debug)]
#[pyclass(frozen, get_all, module = "boxlite")]
pub struct PullProgress {
    pub layer: String,
    pub index: usize,
    pub layers: usize,
    pub done: u64,
    pub total: u64,
}

impl From<&boxlite::images::PullProgress> for PullProgress {
    fn from(p: &boxlite::images::PullProgress) -> Self {
        Self {
            layer: p.layer.to_string(),
            index: p.index,
            layers: p.layers,
            done: p.done,
            total: p.total,
        }
    }
}

#[pymethods]
impl PullProgress {
    #[getter]
    fn fraction(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            self.done as f64 / self.total as f64
        }
    }
    fn __repr__(&self) -> String {
        format!(
            "PullProgress(layer={:?}, index={}, layers={}, done={}, total={})",
            self.layer, self.index, self.layers, self.done, self.total
        )
    }
}

/// What a garbage collection removed.
#[derive(Debug)]
#[pyclass(frozen, get_all, module = "boxlite")]
pub struct GcReport {
    pub blobs_removed: usize,
    pub disks_removed: usize,
    pub templates_removed: usize,
    pub bytes_freed: u64,
}

#[pymethods]
impl GcReport {
    fn __repr__(&self) -> String {
        format!(
            "GcReport(blobs_removed={}, disks_removed={}, templates_removed={}, bytes_freed={})",
            self.blobs_removed, self.disks_removed, self.templates_removed, self.bytes_freed
        )
    }
}
