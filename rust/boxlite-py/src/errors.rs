//! The one place where core errors become Python exceptions.
//!
//! The exception classes live in `boxlite/errors.py` (so they can also derive from
//! `ValueError`, `TimeoutError`, ...); this module picks the class for each variant.

use boxlite::BoxliteError;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// The Python class name for each variant. Exhaustive: a new variant does not compile
/// until it is mapped here.
pub fn class_name(error: &BoxliteError) -> &'static str {
    match error {
        BoxliteError::InvalidArgument { .. } => "InvalidArgumentError",
        BoxliteError::ImageNotFound { .. } => "ImageNotFoundError",
        BoxliteError::ImagePullFailed { .. } => "ImagePullError",
        BoxliteError::RegistryUnauthorized { .. } => "RegistryUnauthorizedError",
        BoxliteError::BoxNotFound { .. } => "BoxNotFoundError",
        BoxliteError::InvalidState { .. } => "InvalidStateError",
        BoxliteError::EngineUnavailable { .. } => "EngineUnavailableError",
        BoxliteError::BootTimeout { .. } => "BootTimeoutError",
        BoxliteError::GuestProtocol(_) => "GuestProtocolError",
        BoxliteError::ExecStartFailed { .. } => "ExecStartError",
        BoxliteError::ExecTimeout { .. } => "ExecTimeoutError",
        BoxliteError::Storage(_) => "StorageError",
        BoxliteError::Database(_) => "DatabaseError",
        BoxliteError::Io { .. } => "BoxliteIOError",
        BoxliteError::Unsupported(_) => "NotSupportedError",
        BoxliteError::Internal(_) => "InternalError",
    }
}

/// Converts a core error into an instance of its `boxlite.errors` class.
pub fn to_py_err(error: BoxliteError) -> PyErr {
    Python::with_gil(|py| {
        let message = error.to_string();
        let instance = py
            .import("boxlite.errors")
            .and_then(|module| module.getattr(class_name(&error)))
            .and_then(|class| class.call1((message.clone(),)));
        match instance {
            Ok(instance) => {
                let _ = instance.setattr("kind", error.kind());
                PyErr::from_value(instance)
            }
            // Only reachable if the Python package is broken; still say what happened.
            Err(import_error) => PyRuntimeError::new_err(format!(
                "{message} (and boxlite.errors failed: {import_error})"
            )),
        }
    })
}

/// Extension to turn `BoxliteResult<T>` into `PyResult<T>` with `?`.
pub trait IntoPyResult<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, BoxliteError> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py_err)
    }
}

/// One example of each variant, for the tests that check the mapping from Python.
pub fn example(kind: &str) -> Option<BoxliteError> {
    use boxlite::Seconds;
    let io = || std::io::Error::from(std::io::ErrorKind::PermissionDenied);
    Some(match kind {
        "invalid_argument" => BoxliteError::invalid("cpus", "must be at least 1"),
        "image_not_found" => BoxliteError::ImageNotFound {
            reference: "nope:latest".into(),
        },
        "image_pull_failed" => BoxliteError::ImagePullFailed {
            reference: "a:b".into(),
            reason: "connection refused".into(),
        },
        "registry_unauthorized" => BoxliteError::RegistryUnauthorized {
            host: "registry.test".into(),
            reason: "401".into(),
        },
        "box_not_found" => BoxliteError::BoxNotFound { id: "ghost".into() },
        "invalid_state" => BoxliteError::InvalidState {
            id: "b".into(),
            state: "stopped".into(),
            operation: "exec in".into(),
        },
        "engine_unavailable" => BoxliteError::engine_unavailable(
            "qemu-system-x86_64 not found",
            "install the qemu-system-x86 package",
        ),
        "boot_timeout" => BoxliteError::BootTimeout {
            timeout: Seconds::from_secs(5),
            console_tail: "[    0.0] Linux".into(),
        },
        "guest_protocol" => BoxliteError::GuestProtocol("unexpected frame".into()),
        "exec_start_failed" => BoxliteError::ExecStartFailed {
            command: "nope".into(),
            reason: "not found".into(),
        },
        "exec_timeout" => BoxliteError::ExecTimeout {
            command: "sleep 9".into(),
            timeout: Seconds::from_secs(1),
        },
        "storage" => BoxliteError::Storage("disk full".into()),
        "database" => BoxliteError::Database("locked".into()),
        "io" => BoxliteError::io("reading x", io()),
        "unsupported" => BoxliteError::Unsupported("volumes".into()),
        "internal" => BoxliteError::Internal("bug".into()),
        _ => return None,
    })
}

/// Every variant's kind, in declaration order.
pub const KINDS: &[&str] = &[
    "invalid_argument",
    "image_not_found",
    "image_pull_failed",
    "registry_unauthorized",
    "box_not_found",
    "invalid_state",
    "engine_unavailable",
    "boot_timeout",
    "guest_protocol",
    "exec_start_failed",
    "exec_timeout",
    "storage",
    "database",
    "io",
    "unsupported",
    "internal",
];
