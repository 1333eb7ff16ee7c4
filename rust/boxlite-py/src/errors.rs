//! The one place where core errors become Python exceptions.
//!
//! The exception classes live in `boxlite/errors.py` (so they can also derive from
//! `ValueError`, `TimeoutError`, ...); this module picks the class for each failure.

use boxlite::{
    BoxliteError, DiskError, EngineError, ExecError, GuestError, ImageError, NetworkError,
    StateError, StorageError,
};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// The Python class name for each failure. Exhaustive: a new variant does not compile until
/// it is mapped here.
pub fn class_name(error: &BoxliteError) -> &'static str {
    match error {
        BoxliteError::InvalidArgument { .. } => "InvalidArgumentError",
        BoxliteError::BoxNotFound { .. } => "BoxNotFoundError",
        BoxliteError::AlreadyExists { .. } => "AlreadyExistsError",
        BoxliteError::InvalidState { .. } => "InvalidStateError",
        BoxliteError::Unsupported(_) => "UnsupportedError",
        BoxliteError::Io { .. } => "BoxliteIOError",
        BoxliteError::Internal(_) => "InternalError",
        BoxliteError::Image(e) => match e {
            ImageError::NotFound { .. } => "ImageNotFoundError",
            ImageError::PullFailed { .. } => "ImagePullError",
            ImageError::Unauthorized { .. } => "RegistryUnauthorizedError",
        },
        BoxliteError::Engine(e) => match e {
            EngineError::Unavailable { .. } | EngineError::ExitedDuringBoot { .. } => {
                "EngineUnavailableError"
            }
            EngineError::BootTimeout { .. } => "BootTimeoutError",
            EngineError::Control { .. } => "EngineError",
        },
        BoxliteError::Guest(e) => match e {
            GuestError::ConnectionLost { .. }
            | GuestError::Protocol { .. }
            | GuestError::Incompatible { .. } => "GuestProtocolError",
        },
        BoxliteError::Exec(e) => match e {
            ExecError::StartFailed { .. } => "ExecStartError",
            ExecError::Timeout { .. } => "ExecTimeoutError",
        },
        BoxliteError::Storage(e) => match e {
            StorageError::Tool { .. }
            | StorageError::Guest { .. }
            | StorageError::Damaged { .. }
            | StorageError::NoSpace { .. } => "StorageError",
        },
        BoxliteError::Network(e) => match e {
            NetworkError::PortInUse { .. } => "PortInUseError",
            NetworkError::Setup { .. } => "NetworkError",
        },
        BoxliteError::Disk(e) => match e {
            DiskError::SnapshotNotFound { .. } | DiskError::ArchiveNotFound { .. } => {
                "NotFoundError"
            }
            DiskError::BadArchive { .. } => "StorageError",
        },
        BoxliteError::State(e) => match e {
            StateError::Sqlite { .. }
            | StateError::Corrupt { .. }
            | StateError::NewerSchema { .. } => "DatabaseError",
        },
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

/// One example of each failure, for the tests that check the mapping from Python (built only
/// with the `test-hooks` feature).
#[cfg(feature = "test-hooks")]
pub fn examples() -> Vec<BoxliteError> {
    use boxlite::Seconds;
    let io = || std::io::Error::from(std::io::ErrorKind::PermissionDenied);
    vec![
        BoxliteError::invalid("cpus", "must be at least 1"),
        BoxliteError::BoxNotFound { id: "ghost".into() },
        BoxliteError::AlreadyExists {
            what: "a box",
            name: "web".into(),
        },
        BoxliteError::InvalidState {
            id: "b".into(),
            state: "stopped".into(),
            operation: "exec in".into(),
        },
        BoxliteError::Unsupported("volumes".into()),
        BoxliteError::io("reading x", io()),
        BoxliteError::Internal("bug".into()),
        ImageError::NotFound {
            reference: "nope:latest".into(),
        }
        .into(),
        ImageError::PullFailed {
            reference: "a:b".into(),
            reason: "connection refused".into(),
            source: None,
        }
        .into(),
        ImageError::Unauthorized {
            host: "registry.test".into(),
            reason: "401".into(),
        }
        .into(),
        BoxliteError::engine_unavailable(
            "qemu-system-x86_64 not found",
            "install the qemu-system-x86 package",
        ),
        EngineError::ExitedDuringBoot {
            status: "signal 9".into(),
            console_tail: "".into(),
        }
        .into(),
        EngineError::BootTimeout {
            timeout: Seconds::from_secs(5),
            console_tail: "[    0.0] Linux".into(),
        }
        .into(),
        EngineError::Control {
            reason: "migration failed: Size mismatch".into(),
        }
        .into(),
        GuestError::ConnectionLost {
            reason: "the VM died".into(),
        }
        .into(),
        GuestError::Protocol {
            reason: "unexpected frame".into(),
        }
        .into(),
        GuestError::Incompatible { guest: 1, host: 2 }.into(),
        ExecError::StartFailed {
            command: "nope".into(),
            reason: "not found".into(),
        }
        .into(),
        ExecError::Timeout {
            command: "sleep 9".into(),
            timeout: Seconds::from_secs(1),
        }
        .into(),
        StorageError::Tool {
            tool: "qemu-img".into(),
            status: "exit 1".into(),
            stderr: "disk full".into(),
        }
        .into(),
        StorageError::Guest {
            context: "mounting".into(),
            reason: "bad superblock".into(),
        }
        .into(),
        StorageError::NoSpace {
            context: "writing a disk".into(),
        }
        .into(),
        StorageError::Damaged {
            path: "/x".into(),
            reason: "truncated".into(),
        }
        .into(),
        StateError::Corrupt {
            id: "b".into(),
            what: "options",
            reason: "bad json".into(),
        }
        .into(),
        StateError::NewerSchema {
            found: 9,
            supported: 1,
        }
        .into(),
        NetworkError::PortInUse {
            addr: "127.0.0.1:8080".into(),
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        }
        .into(),
        NetworkError::Setup {
            reason: "eth0 did not appear".into(),
        }
        .into(),
        DiskError::SnapshotNotFound {
            box_id: "b".into(),
            name: "s1".into(),
        }
        .into(),
        DiskError::ArchiveNotFound {
            path: "/x.boxlite".into(),
        }
        .into(),
        DiskError::BadArchive {
            path: "/x.boxlite".into(),
            reason: "checksum".into(),
        }
        .into(),
    ]
}
