//! The one error type of the public API: a few cross-cutting variants, and one enum per area
//! (images, engine, guest, exec, storage, state, network, disk) joined in with `#[from]`. Sources are kept,
//! not stringified; `kind()` gives every failure a stable name.

use crate::units::Seconds;

/// An underlying error kept as the `source()` of ours.
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in boxlite, one variant per failure a caller can act on.
///
/// Messages say what happened and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum BoxliteError {
    /// An argument was rejected before anything was done.
    #[error("invalid argument `{field}`: {reason}")]
    InvalidArgument { field: String, reason: String },

    /// No box has this id or name.
    #[error("box not found: {id}")]
    BoxNotFound { id: String },

    /// The name is taken (by a box, a snapshot, ...).
    #[error("{what} named {name:?} already exists")]
    AlreadyExists { what: &'static str, name: String },

    /// The box is in a state that does not allow the operation.
    #[error("cannot {operation} box {id}: it is {state}")]
    InvalidState {
        id: String,
        state: String,
        operation: String,
    },

    /// The option or feature exists in the API but not in this build.
    #[error("not supported: {0}")]
    Unsupported(String),

    /// An operating-system I/O failure, with what we were doing.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error(transparent)]
    Image(#[from] ImageError),

    #[error(transparent)]
    Engine(#[from] EngineError),

    #[error(transparent)]
    Guest(#[from] GuestError),

    #[error(transparent)]
    Exec(#[from] ExecError),

    #[error(transparent)]
    Storage(#[from] StorageError),

    #[error(transparent)]
    State(#[from] StateError),

    #[error(transparent)]
    Network(#[from] NetworkError),

    #[error(transparent)]
    Disk(#[from] DiskError),

    /// A bug in boxlite; please report it.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Images: references, registries, layouts and the content store.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The reference names nothing the registry or layout has.
    #[error("image not found: {reference}")]
    NotFound { reference: String },

    /// The image could not be fetched or read (network, corrupt content, bad layout).
    #[error("pulling image {reference} failed: {reason}")]
    PullFailed {
        reference: String,
        reason: String,
        #[source]
        source: Option<Source>,
    },

    /// The registry refused our credentials (HTTP 401/403).
    #[error("registry {host} refused access: {reason}; check the credentials configured for it")]
    Unauthorized { host: String, reason: String },
}

/// The VM engine: finding it, booting it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine cannot run here: a missing binary, guest bundle or accelerator.
    #[error("engine unavailable: {reason}; {hint}")]
    Unavailable { reason: String, hint: String },

    /// The guest did not report ready in time. `console_tail` is the end of its console log.
    #[error("guest did not become ready within {timeout}; last console output:\n{console_tail}")]
    BootTimeout {
        timeout: Seconds,
        console_tail: String,
    },

    /// The engine's control channel failed: a state did not save or load, a command was
    /// refused.
    #[error("the VM engine's control channel failed: {reason}")]
    Control { reason: String },

    /// The engine process ended while the guest was booting.
    #[error("the VM engine exited during boot ({status}); console:\n{console_tail}\ncheck the engine's output above and the guest bundle (`make guest`)")]
    ExitedDuringBoot {
        status: String,
        console_tail: String,
    },
}

/// The connection to the guest agent.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The connection ended (the VM stopped or died, or the box's supervisor went away).
    #[error("lost the connection to the guest agent: {reason}")]
    ConnectionLost { reason: String },

    /// The agent (or the supervisor) sent something the protocol does not allow.
    #[error("guest protocol error: {reason}")]
    Protocol { reason: String },

    /// The guest bundle speaks another protocol version.
    #[error("the guest agent speaks protocol {guest}, this runtime {host}: rebuild the guest bundle (`make guest`)")]
    Incompatible { guest: u32, host: u32 },
}

/// A command in a box.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The command could not be started inside the box (not found, not executable, bad user...).
    #[error("cannot start `{command}` in the box: {reason}")]
    StartFailed { command: String, reason: String },

    /// The command ran longer than its timeout and was killed.
    #[error("`{command}` timed out after {timeout} and was killed")]
    Timeout { command: String, timeout: Seconds },
}

/// Disks, the image cache and box directories.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A disk tool (`qemu-img`, `mkfs.ext4`, ...) failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        tool: String,
        status: String,
        stderr: String,
    },

    /// The guest could not use its disk (mount, grow, or a write the guest reported failing).
    #[error("{context}: {reason}")]
    Guest { context: String, reason: String },

    /// The filesystem holding the home is full.
    #[error("no space left on the device ({context}); free some space or use a home on a larger filesystem")]
    NoSpace { context: String },

    /// Something on disk is not what boxlite wrote there.
    #[error("{path} is damaged: {reason}")]
    Damaged { path: String, reason: String },
}

/// The state database.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database {context}: {source}")]
    Sqlite {
        context: String,
        #[source]
        source: rusqlite::Error,
    },

    /// A stored record cannot be read back.
    #[error("box {id}: bad {what} in the state database: {reason}")]
    Corrupt {
        id: String,
        what: &'static str,
        reason: String,
    },

    /// A newer boxlite wrote this home.
    #[error("the state database has schema version {found}, this boxlite knows up to {supported}: upgrade boxlite or use another home")]
    NewerSchema { found: i64, supported: i64 },
}

/// A box's network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A published port's host address is taken; nothing was started.
    #[error("cannot publish on {addr}: {source}; choose another host port (or 0 for a free one) or stop what uses it")]
    PortInUse {
        addr: String,
        #[source]
        source: std::io::Error,
    },

    /// The network could not be set up.
    #[error("the box's network could not be set up: {reason}")]
    Setup { reason: String },
}

/// Snapshots, clones and box archives.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The box has no snapshot of this name.
    #[error("snapshot '{name}' not found for box '{box_id}'")]
    SnapshotNotFound { box_id: String, name: String },

    /// The archive to import does not exist.
    #[error("Archive not found: {path}")]
    ArchiveNotFound { path: String },

    /// The archive is not one boxlite wrote, or was damaged or cut short; nothing was kept.
    #[error("{path} is not a usable box archive: {reason}")]
    BadArchive { path: String, reason: String },
}

/// The result type of the public API.
pub type BoxliteResult<T> = Result<T, BoxliteError>;

impl BoxliteError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn engine_unavailable(reason: impl Into<String>, hint: impl Into<String>) -> Self {
        EngineError::Unavailable {
            reason: reason.into(),
            hint: hint.into(),
        }
        .into()
    }

    /// Wraps an I/O error with what we were doing when it happened; a full filesystem is a
    /// storage error of its own.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return StorageError::NoSpace {
                context: context.into(),
            }
            .into();
        }
        Self::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn protocol(reason: impl Into<String>) -> Self {
        GuestError::Protocol {
            reason: reason.into(),
        }
        .into()
    }

    pub(crate) fn connection_lost(reason: impl Into<String>) -> Self {
        GuestError::ConnectionLost {
            reason: reason.into(),
        }
        .into()
    }

    pub(crate) fn pull_failed(reference: impl Into<String>, reason: impl Into<String>) -> Self {
        ImageError::PullFailed {
            reference: reference.into(),
            reason: reason.into(),
            source: None,
        }
        .into()
    }

    pub(crate) fn image_not_found(reference: impl Into<String>) -> Self {
        ImageError::NotFound {
            reference: reference.into(),
        }
        .into()
    }

    pub(crate) fn guest_storage(context: impl Into<String>, reason: impl Into<String>) -> Self {
        StorageError::Guest {
            context: context.into(),
            reason: reason.into(),
        }
        .into()
    }

    /// A stable snake_case name of the failure (the Python exception mapping keys on it, and
    /// it crosses the supervisor's status line).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidArgument { .. } => "invalid_argument",
            Self::BoxNotFound { .. } => "box_not_found",
            Self::AlreadyExists { .. } => "already_exists",
            Self::InvalidState { .. } => "invalid_state",
            Self::Unsupported(_) => "unsupported",
            Self::Io { .. } => "io",
            Self::Internal(_) => "internal",
            Self::Image(ImageError::NotFound { .. }) => "image_not_found",
            Self::Image(ImageError::PullFailed { .. }) => "image_pull_failed",
            Self::Image(ImageError::Unauthorized { .. }) => "registry_unauthorized",
            Self::Engine(
                EngineError::Unavailable { .. } | EngineError::ExitedDuringBoot { .. },
            ) => "engine_unavailable",
            Self::Engine(EngineError::BootTimeout { .. }) => "boot_timeout",
            Self::Engine(EngineError::Control { .. }) => "engine_control",
            Self::Guest(_) => "guest_protocol",
            Self::Exec(ExecError::StartFailed { .. }) => "exec_start_failed",
            Self::Exec(ExecError::Timeout { .. }) => "exec_timeout",
            Self::Storage(_) => "storage",
            Self::State(_) => "database",
            Self::Network(NetworkError::PortInUse { .. }) => "port_in_use",
            Self::Network(NetworkError::Setup { .. }) => "network",
            Self::Disk(DiskError::SnapshotNotFound { .. }) => "snapshot_not_found",
            Self::Disk(DiskError::ArchiveNotFound { .. }) => "archive_not_found",
            Self::Disk(DiskError::BadArchive { .. }) => "bad_archive",
        }
    }
}

impl From<rusqlite::Error> for StateError {
    fn from(source: rusqlite::Error) -> Self {
        Self::Sqlite {
            context: "query failed".into(),
            source,
        }
    }
}

/// Adds context to I/O results: `fs::read(p).ctx(|| format!("reading {}", p.display()))`.
pub(crate) trait IoContext<T> {
    fn ctx<S: Into<String>>(self, context: impl FnOnce() -> S) -> BoxliteResult<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx<S: Into<String>>(self, context: impl FnOnce() -> S) -> BoxliteResult<T> {
        self.map_err(|e| BoxliteError::io(context(), e))
    }
}

/// A background task that panicked or was cancelled is a bug, not a user error.
pub(crate) fn task_failed(what: &str, e: tokio::task::JoinError) -> BoxliteError {
    BoxliteError::Internal(format!("{what} task failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_culprit_and_the_fix() {
        let e = BoxliteError::invalid("cpus", "must be at least 1");
        assert_eq!(e.to_string(), "invalid argument `cpus`: must be at least 1");
        let e = BoxliteError::engine_unavailable(
            "qemu-system-x86_64 not found",
            "install the qemu-system-x86 package",
        );
        assert!(e
            .to_string()
            .contains("install the qemu-system-x86 package"));
        assert_eq!(e.kind(), "engine_unavailable");
        let e = BoxliteError::InvalidState {
            id: "b1".into(),
            state: "stopped".into(),
            operation: "exec in".into(),
        };
        assert_eq!(e.to_string(), "cannot exec in box b1: it is stopped");
        let e = BoxliteError::AlreadyExists {
            what: "a box",
            name: "web".into(),
        };
        assert_eq!(e.to_string(), "a box named \"web\" already exists");
    }

    #[test]
    fn a_full_filesystem_is_a_storage_error() {
        let err = BoxliteError::io("writing x", std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(err.kind(), "storage");
        assert!(err.to_string().contains("no space left"), "{err}");
    }

    #[test]
    fn io_context_keeps_the_source() {
        let err: BoxliteResult<()> =
            Err(std::io::Error::from(std::io::ErrorKind::NotFound)).ctx(|| "reading x");
        let err = err.unwrap_err();
        assert_eq!(err.kind(), "io");
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn area_errors_keep_their_sources_through_the_top_level() {
        let sqlite = rusqlite::Connection::open_in_memory()
            .unwrap()
            .execute("not sql", [])
            .unwrap_err();
        let err: BoxliteError = StateError::from(sqlite).into();
        assert_eq!(err.kind(), "database");
        // `transparent` forwards source() to the inner error's own source: the rusqlite error.
        let source = std::error::Error::source(&err).expect("the sqlite error is kept");
        assert!(source.downcast_ref::<rusqlite::Error>().is_some());
        let pulled: BoxliteError = ImageError::PullFailed {
            reference: "a".into(),
            reason: "b".into(),
            source: Some(Box::new(std::io::Error::other("tcp reset"))),
        }
        .into();
        assert_eq!(pulled.kind(), "image_pull_failed");
        assert!(std::error::Error::source(&pulled).is_some());
    }
}
