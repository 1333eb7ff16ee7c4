//! The one error type of the public API.

use crate::units::Seconds;

/// Everything that can go wrong in boxlite, one variant per failure a caller can act on.
///
/// Messages say what happened and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum BoxliteError {
    /// An argument was rejected before anything was done.
    #[error("invalid argument `{field}`: {reason}")]
    InvalidArgument { field: String, reason: String },

    /// The image reference names nothing the registry or layout has.
    #[error("image not found: {reference}")]
    ImageNotFound { reference: String },

    /// The image could not be fetched or read (network, corrupt content, bad layout).
    #[error("pulling image {reference} failed: {reason}")]
    ImagePullFailed { reference: String, reason: String },

    /// The registry refused our credentials (HTTP 401/403).
    #[error("registry {host} refused access: {reason}; check the credentials configured for it")]
    RegistryUnauthorized { host: String, reason: String },

    /// No box has this id or name.
    #[error("box not found: {id}")]
    BoxNotFound { id: String },

    /// The box is in a state that does not allow the operation.
    #[error("cannot {operation} box {id}: it is {state}")]
    InvalidState {
        id: String,
        state: String,
        operation: String,
    },

    /// The VM engine cannot run here: a missing binary, guest bundle or accelerator.
    #[error("engine unavailable: {reason}; {hint}")]
    EngineUnavailable { reason: String, hint: String },

    /// The guest did not report ready in time. `console_tail` is the end of its console log.
    #[error("guest did not become ready within {timeout}; last console output:\n{console_tail}")]
    BootTimeout {
        timeout: Seconds,
        console_tail: String,
    },

    /// The guest agent sent something we did not expect, or the connection broke.
    #[error("guest protocol error: {0}")]
    GuestProtocol(String),

    /// The command could not be started inside the box (not found, not executable, bad user...).
    #[error("cannot start `{command}` in the box: {reason}")]
    ExecStartFailed { command: String, reason: String },

    /// The command ran longer than its timeout and was killed.
    #[error("`{command}` timed out after {timeout} and was killed")]
    ExecTimeout { command: String, timeout: Seconds },

    /// Disk images, the image cache or the box directory could not be prepared.
    #[error("storage error: {0}")]
    Storage(String),

    /// The state database failed.
    #[error("database error: {0}")]
    Database(String),

    /// An operating-system I/O failure, with what we were doing.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// The option or feature exists in the API but not in this build yet.
    #[error("not supported: {0}")]
    Unsupported(String),

    /// A bug in boxlite; please report it.
    #[error("internal error: {0}")]
    Internal(String),
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
        Self::EngineUnavailable {
            reason: reason.into(),
            hint: hint.into(),
        }
    }

    /// Wraps an I/O error with what we were doing when it happened.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// A stable snake_case name of the variant (the Python exception mapping keys on it).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidArgument { .. } => "invalid_argument",
            Self::ImageNotFound { .. } => "image_not_found",
            Self::ImagePullFailed { .. } => "image_pull_failed",
            Self::RegistryUnauthorized { .. } => "registry_unauthorized",
            Self::BoxNotFound { .. } => "box_not_found",
            Self::InvalidState { .. } => "invalid_state",
            Self::EngineUnavailable { .. } => "engine_unavailable",
            Self::BootTimeout { .. } => "boot_timeout",
            Self::GuestProtocol(_) => "guest_protocol",
            Self::ExecStartFailed { .. } => "exec_start_failed",
            Self::ExecTimeout { .. } => "exec_timeout",
            Self::Storage(_) => "storage",
            Self::Database(_) => "database",
            Self::Io { .. } => "io",
            Self::Unsupported(_) => "unsupported",
            Self::Internal(_) => "internal",
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
        let e = BoxliteError::InvalidState {
            id: "b1".into(),
            state: "stopped".into(),
            operation: "exec in".into(),
        };
        assert_eq!(e.to_string(), "cannot exec in box b1: it is stopped");
    }

    #[test]
    fn io_context_keeps_the_source() {
        let err: BoxliteResult<()> =
            Err(std::io::Error::from(std::io::ErrorKind::NotFound)).ctx(|| "reading x");
        let err = err.unwrap_err();
        assert_eq!(err.kind(), "io");
        assert!(std::error::Error::source(&err).is_some());
    }
}
