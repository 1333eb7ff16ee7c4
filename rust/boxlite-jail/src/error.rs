use std::io;
use std::path::PathBuf;

/// Why a jail could not be set up; each message says what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jailing is not supported on {0}: run the program without a jail")]
    Unsupported(&'static str),

    #[error("invalid jail spec: {0}")]
    InvalidSpec(String),

    #[error("user namespaces are unavailable ({reason}); {hint}")]
    UserNamespaces { reason: String, hint: String },

    #[error("jail setup failed: {step}: {source}; {hint}")]
    Setup {
        step: String,
        hint: String,
        #[source]
        source: io::Error,
    },

    #[error("cannot execute {} in the jail: {source}; {hint}", program.display())]
    Exec {
        program: PathBuf,
        hint: String,
        #[source]
        source: io::Error,
    },

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl JailError {
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}
