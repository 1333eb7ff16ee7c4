//! `BoxOptions(advanced=AdvancedBoxOptions(...))` in the published package's shapes, and
//! their conversion into the core's `GuestSandbox` (capabilities, seccomp, resource limits).

use boxlite::BoxliteError;
use boxlite_proto::{GuestLimits, GuestSandbox};
use pyo3::prelude::*;

fn invalid(field: &str, reason: impl Into<String>) -> PyErr {
    crate::errors::to_py_err(BoxliteError::invalid(field, reason))
}

fn unsupported(what: &str) -> PyErr {
    crate::errors::to_py_err(BoxliteError::Unsupported(what.to_owned()))
}

/// Docker-style capability changes: `add` to Docker's default set, then `drop` (names
/// case-insensitive, `CAP_` optional, `ALL` allowed). Kept as given; checked at create.
#[derive(Debug, Clone, Default)]
#[pyclass(module = "boxlite")]
pub struct ContainerCapabilities {
    #[pyo3(get, set)]
    pub add: Vec<String>,
    #[pyo3(get, set)]
    pub drop: Vec<String>,
}

#[pymethods]
impl ContainerCapabilities {
    #[new]
    #[pyo3(signature = (add=None, drop=None))]
    fn new(add: Option<Vec<String>>, drop: Option<Vec<String>>) -> Self {
        Self {
            add: add.unwrap_or_default(),
            drop: drop.unwrap_or_default(),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "ContainerCapabilities(add={:?}, drop={:?})",
            self.add, self.drop
        )
    }
}

/// How a box's commands are confined. The VMM jail is always on here (`jailer_enabled=False`
/// does not turn it off); `seccomp_enabled` switches the agent's seccomp filter; the `max_*`
/// fields become resource limits of every command (`max_memory` in bytes of address space,
/// `max_cpu_time` in CPU seconds).
#[derive(Debug, Clone)]
#[pyclass(module = "boxlite")]
pub struct SecurityOptions {
    #[pyo3(get, set)]
    pub jailer_enabled: bool,
    #[pyo3(get, set)]
    pub seccomp_enabled: bool,
    #[pyo3(get, set)]
    pub max_open_files: Option<u64>,
    #[pyo3(get, set)]
    pub max_file_size: Option<u64>,
    #[pyo3(get, set)]
    pub max_processes: Option<u64>,
    #[pyo3(get, set)]
    pub max_memory: Option<u64>,
    #[pyo3(get, set)]
    pub max_cpu_time: Option<u64>,
    #[pyo3(get, set)]
    pub network_enabled: bool,
    #[pyo3(get, set)]
    pub close_fds: bool,
}

#[pymethods]
impl SecurityOptions {
    #[new]
    #[pyo3(signature = (jailer_enabled=false, seccomp_enabled=false, max_open_files=None, max_file_size=None, max_processes=None, max_memory=None, max_cpu_time=None, network_enabled=true, close_fds=true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        jailer_enabled: bool,
        seccomp_enabled: bool,
        max_open_files: Option<u64>,
        max_file_size: Option<u64>,
        max_processes: Option<u64>,
        max_memory: Option<u64>,
        max_cpu_time: Option<u64>,
        network_enabled: bool,
        close_fds: bool,
    ) -> Self {
        Self {
            jailer_enabled,
            seccomp_enabled,
            max_open_files,
            max_file_size,
            max_processes,
            max_memory,
            max_cpu_time,
            network_enabled,
            close_fds,
        }
    }

    /// No seccomp filter, no limits.
    #[staticmethod]
    fn development() -> Self {
        Self::new(false, false, None, None, None, None, None, true, false)
    }

    /// Jail and seccomp on, no limits (what a box gets without `advanced`).
    #[staticmethod]
    fn standard() -> Self {
        Self::new(true, true, None, None, None, None, None, true, true)
    }

    /// Jail and seccomp on, 1024 open files, 1 GiB files, 100 processes.
    #[staticmethod]
    fn maximum() -> Self {
        Self::new(
            true,
            true,
            Some(1024),
            Some(1 << 30),
            Some(100),
            None,
            None,
            true,
            true,
        )
    }

    fn __repr__(&self) -> String {
        let opt = |v: Option<u64>| v.map_or("None".to_owned(), |v| v.to_string());
        let py_bool = |b: bool| if b { "True" } else { "False" };
        format!(
            "SecurityOptions(jailer_enabled={}, seccomp_enabled={}, max_open_files={}, \
             max_file_size={}, max_processes={}, max_memory={}, max_cpu_time={}, \
             network_enabled={}, close_fds={})",
            py_bool(self.jailer_enabled),
            py_bool(self.seccomp_enabled),
            opt(self.max_open_files),
            opt(self.max_file_size),
            opt(self.max_processes),
            opt(self.max_memory),
            opt(self.max_cpu_time),
            py_bool(self.network_enabled),
            py_bool(self.close_fds),
        )
    }
}

/// A health check's timing in seconds. Kept for the published shape; a local box refuses it
/// (there is no health-check command to run).
#[derive(Debug, Clone)]
#[pyclass(module = "boxlite")]
pub struct HealthCheckOptions {
    #[pyo3(get, set)]
    pub interval: u64,
    #[pyo3(get, set)]
    pub timeout: u64,
    #[pyo3(get, set)]
    pub retries: u32,
    #[pyo3(get, set)]
    pub start_period: u64,
}

#[pymethods]
impl HealthCheckOptions {
    #[new]
    #[pyo3(signature = (interval=30, timeout=10, retries=3, start_period=60))]
    fn new(interval: u64, timeout: u64, retries: u32, start_period: u64) -> Self {
        Self {
            interval,
            timeout,
            retries,
            start_period,
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "HealthCheckOptions(interval={}s, timeout={}s, retries={}, start_period={}s)",
            self.interval, self.timeout, self.retries, self.start_period
        )
    }
}

/// `security`, `health_check` and `capabilities` of a box; each `None` unless given.
#[derive(Debug, Clone, Default)]
#[pyclass(module = "boxlite")]
pub struct AdvancedBoxOptions {
    #[pyo3(get, set)]
    pub security: Option<SecurityOptions>,
    #[pyo3(get, set)]
    pub health_check: Option<HealthCheckOptions>,
    #[pyo3(get, set)]
    pub capabilities: Option<ContainerCapabilities>,
}

#[pymethods]
impl AdvancedBoxOptions {
    #[new]
    #[pyo3(signature = (security=None, health_check=None, capabilities=None))]
    fn new(
        security: Option<SecurityOptions>,
        health_check: Option<HealthCheckOptions>,
        capabilities: Option<ContainerCapabilities>,
    ) -> Self {
        Self {
            security,
            health_check,
            capabilities,
        }
    }

    fn __repr__(&self) -> String {
        let or_none = |s: Option<String>| s.unwrap_or_else(|| "None".to_owned());
        format!(
            "AdvancedBoxOptions(security={}, health_check={}, capabilities={})",
            or_none(self.security.as_ref().map(SecurityOptions::__repr__)),
            or_none(self.health_check.as_ref().map(HealthCheckOptions::__repr__)),
            or_none(
                self.capabilities
                    .as_ref()
                    .map(ContainerCapabilities::__repr__)
            ),
        )
    }
}

impl AdvancedBoxOptions {
    /// The guest confinement these options ask for; what a local box cannot do is a typed
    /// error that says so.
    pub fn sandbox(&self) -> PyResult<GuestSandbox> {
        if self.health_check.is_some() {
            return Err(unsupported(
                "advanced.health_check is not supported by local boxes; poll the box with \
                 exec() instead",
            ));
        }
        let security = self
            .security
            .clone()
            .unwrap_or_else(SecurityOptions::standard);
        if !security.network_enabled {
            return Err(invalid(
                "advanced.security.network_enabled",
                "the network is chosen with BoxOptions(network=NetworkSpec(mode=\"disabled\"))",
            ));
        }
        let caps = self.capabilities.clone().unwrap_or_default();
        let mut sandbox =
            GuestSandbox::from_changes(&caps.add, &caps.drop, security.seccomp_enabled)
                .map_err(|reason| invalid("advanced.capabilities", reason))?;
        let positive = |field: &str, v: Option<u64>| match v {
            Some(0) => Err(invalid(
                &format!("advanced.security.{field}"),
                "must be at least 1 (None means no limit)",
            )),
            v => Ok(v),
        };
        sandbox.limits = GuestLimits {
            open_files: positive("max_open_files", security.max_open_files)?,
            file_size: positive("max_file_size", security.max_file_size)?,
            processes: positive("max_processes", security.max_processes)?,
            memory: positive("max_memory", security.max_memory)?,
            cpu_time: positive("max_cpu_time", security.max_cpu_time)?,
        };
        Ok(sandbox)
    }
}
