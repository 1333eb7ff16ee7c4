//! Metrics as read-only Python objects.

use pyo3::prelude::*;

/// Runtime-wide counters; every read is live.
#[derive(Debug)]
#[pyclass(frozen, module = "boxlite._native")]
pub struct RuntimeMetrics(pub boxlite::RuntimeMetrics);

#[pymethods]
impl RuntimeMetrics {
    #[getter]
    fn boxes_created_total(&self) -> u64 {
        self.0.boxes_created_total()
    }
    #[getter]
    fn boxes_failed_total(&self) -> u64 {
        self.0.boxes_failed_total()
    }
    #[getter]
    fn num_running_boxes(&self) -> u64 {
        self.0.num_running_boxes()
    }
    #[getter]
    fn total_commands_run(&self) -> u64 {
        self.0.total_commands_run()
    }
    #[getter]
    fn total_run_errors(&self) -> u64 {
        self.0.total_run_errors()
    }
    /// The published package's name for `total_commands_run`.
    #[getter]
    fn total_commands_executed(&self) -> u64 {
        self.0.total_commands_run()
    }
    /// The published package's name for `total_run_errors`.
    #[getter]
    fn total_exec_errors(&self) -> u64 {
        self.0.total_run_errors()
    }
    fn _to_wire(&self, py: Python<'_>) -> PyResult<PyObject> {
        self.to_wire(py)
    }
    #[staticmethod]
    fn _from_wire(py: Python<'_>, wire: &Bound<'_, PyAny>) -> PyResult<Self> {
        Self::from_wire(py, wire)
    }
    /// `await runtime.metrics()` works too (the published package's `metrics()` is async).
    fn __await__(slf: Py<Self>) -> crate::info::Ready {
        crate::info::Ready::new(slf.into_any())
    }
    fn __repr__(&self) -> String {
        format!(
            "RuntimeMetrics(boxes_created_total={}, boxes_failed_total={}, num_running_boxes={}, total_commands_run={}, total_run_errors={})",
            self.0.boxes_created_total(),
            self.0.boxes_failed_total(),
            self.0.num_running_boxes(),
            self.0.total_commands_run(),
            self.0.total_run_errors()
        )
    }
}

/// A snapshot of one box's metrics.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
#[pyclass(frozen, get_all, module = "boxlite._native")]
pub struct BoxMetrics {
    commands_run_total: u64,
    run_errors_total: u64,
    bytes_sent_total: u64,
    bytes_received_total: u64,
    total_create_duration_ms: Option<u128>,
    guest_boot_duration_ms: Option<u128>,
    cpu_percent: Option<f32>,
    memory_bytes: Option<u64>,
    network_bytes_sent: Option<u64>,
    network_bytes_received: Option<u64>,
    network_tcp_connections: Option<u64>,
    network_tcp_errors: Option<u64>,
    disk_bytes_used: Option<u64>,
    disk_bytes_total: Option<u64>,
    stage_filesystem_setup_ms: Option<u128>,
    stage_image_prepare_ms: Option<u128>,
    stage_guest_rootfs_ms: Option<u128>,
    stage_box_config_ms: Option<u128>,
    stage_box_spawn_ms: Option<u128>,
    stage_container_init_ms: Option<u128>,
    started_from_template: bool,
}

impl From<boxlite::BoxMetrics> for BoxMetrics {
    fn from(m: boxlite::BoxMetrics) -> Self {
        Self {
            commands_run_total: m.commands_run_total,
            run_errors_total: m.run_errors_total,
            bytes_sent_total: m.bytes_sent_total,
            bytes_received_total: m.bytes_received_total,
            total_create_duration_ms: m.total_create_duration_ms,
            guest_boot_duration_ms: m.guest_boot_duration_ms,
            cpu_percent: m.cpu_percent,
            memory_bytes: m.memory_bytes,
            network_bytes_sent: m.network_bytes_sent,
            network_bytes_received: m.network_bytes_received,
            network_tcp_connections: m.network_tcp_connections,
            network_tcp_errors: m.network_tcp_errors,
            disk_bytes_used: m.disk_bytes_used,
            disk_bytes_total: m.disk_bytes_total,
            stage_filesystem_setup_ms: m.stage_filesystem_setup_ms,
            stage_image_prepare_ms: m.stage_image_prepare_ms,
            stage_guest_rootfs_ms: m.stage_guest_rootfs_ms,
            stage_box_config_ms: m.stage_box_config_ms,
            stage_box_spawn_ms: m.stage_box_spawn_ms,
            stage_container_init_ms: m.stage_container_init_ms,
            started_from_template: m.started_from_template,
        }
    }
}

#[pymethods]
impl BoxMetrics {
    /// The published package's name for `commands_run_total`.
    #[getter]
    fn commands_executed_total(&self) -> u64 {
        self.commands_run_total
    }
    /// The published package's name for `run_errors_total`.
    #[getter]
    fn exec_errors_total(&self) -> u64 {
        self.run_errors_total
    }
    /// Every field, plus the published package's names `commands_executed_total` and
    /// `exec_errors_total`.
    fn _to_wire(&self, py: Python<'_>) -> PyResult<PyObject> {
        let mut value = serde_json::to_value(self)
            .map_err(|e| crate::wire::parse_error(py, "box metrics", &e))?;
        if let Some(map) = value.as_object_mut() {
            map.insert(
                "commands_executed_total".into(),
                self.commands_run_total.into(),
            );
            map.insert("exec_errors_total".into(), self.run_errors_total.into());
        }
        crate::wire::to_dict(py, &value)
    }
    #[staticmethod]
    fn _from_wire(py: Python<'_>, wire: &Bound<'_, PyAny>) -> PyResult<Self> {
        crate::wire::from_dict(py, wire, "box metrics")
    }
    fn __repr__(&self) -> String {
        let opt = |v: Option<u128>| v.map_or("None".into(), |v| v.to_string());
        format!(
            "BoxMetrics(commands_run_total={}, run_errors_total={}, bytes_sent_total={}, bytes_received_total={}, total_create_duration_ms={}, guest_boot_duration_ms={})",
            self.commands_run_total,
            self.run_errors_total,
            self.bytes_sent_total,
            self.bytes_received_total,
            opt(self.total_create_duration_ms),
            opt(self.guest_boot_duration_ms)
        )
    }
}
