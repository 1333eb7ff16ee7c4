//! The per-box supervisor ("shim"): a small process that owns one box's VM engine and its
//! agent connection, and serves any number of clients on a unix socket in the box directory.
//!
//! A virtio-serial port has one host end. With the shim holding it, a box can outlive the
//! process that created it (`detach`) and be reached from several processes at once. The
//! shim relays frames, rewriting channel ids, and passes credits end to end, so flow control
//! still runs between the guest and each real consumer.

mod client;
mod server;

use serde::{Deserialize, Serialize};

use crate::error::{BoxliteError, EngineError, GuestError, StorageError};
use crate::units::Seconds;
use crate::vmm::VmConfig;

pub(crate) use client::{connect, locate_shim, spawn};
pub use server::main;

/// What the shim is told to run (`<box dir>/shim.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ShimConfig {
    pub qemu: std::path::PathBuf,
    pub vm: VmConfig,
    pub boot_timeout: Seconds,
    /// Where clients connect.
    pub client_socket: std::path::PathBuf,
}

/// The one line the shim prints on stdout once the guest is ready, or booting failed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub(crate) enum ShimStatus {
    Ready {
        engine_pid: u32,
        spawn_ms: u64,
        boot_ms: u64,
    },
    Failed {
        error: ErrorReport,
    },
}

/// A `BoxliteError` carried across the process boundary, keeping its type and fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "snake_case")]
pub(crate) enum ErrorReport {
    BootTimeout {
        timeout_ms: u64,
        console_tail: String,
    },
    EngineUnavailable {
        reason: String,
        hint: String,
    },
    EngineExited {
        status: String,
        console_tail: String,
    },
    GuestIncompatible {
        guest: u32,
        host: u32,
    },
    GuestProtocol {
        reason: String,
    },
    GuestLost {
        reason: String,
    },
    GuestStorage {
        context: String,
        reason: String,
    },
    InvalidArgument {
        field: String,
        reason: String,
    },
    /// Anything the supervisor has no business failing with: reported as a bug.
    Other {
        kind: String,
        message: String,
    },
}

impl From<&BoxliteError> for ErrorReport {
    fn from(e: &BoxliteError) -> Self {
        match e {
            BoxliteError::Engine(EngineError::BootTimeout {
                timeout,
                console_tail,
            }) => Self::BootTimeout {
                timeout_ms: timeout.as_millis(),
                console_tail: console_tail.clone(),
            },
            BoxliteError::Engine(EngineError::Unavailable { reason, hint }) => {
                Self::EngineUnavailable {
                    reason: reason.clone(),
                    hint: hint.clone(),
                }
            }
            BoxliteError::Engine(EngineError::ExitedDuringBoot {
                status,
                console_tail,
            }) => Self::EngineExited {
                status: status.clone(),
                console_tail: console_tail.clone(),
            },
            BoxliteError::Guest(GuestError::Incompatible { guest, host }) => {
                Self::GuestIncompatible {
                    guest: *guest,
                    host: *host,
                }
            }
            BoxliteError::Guest(GuestError::Protocol { reason }) => Self::GuestProtocol {
                reason: reason.clone(),
            },
            BoxliteError::Guest(GuestError::ConnectionLost { reason }) => Self::GuestLost {
                reason: reason.clone(),
            },
            BoxliteError::Storage(StorageError::Guest { context, reason }) => Self::GuestStorage {
                context: context.clone(),
                reason: reason.clone(),
            },
            BoxliteError::InvalidArgument { field, reason } => Self::InvalidArgument {
                field: field.clone(),
                reason: reason.clone(),
            },
            other => Self::Other {
                kind: other.kind().to_owned(),
                message: other.to_string(),
            },
        }
    }
}

impl From<ErrorReport> for BoxliteError {
    fn from(r: ErrorReport) -> Self {
        match r {
            ErrorReport::BootTimeout {
                timeout_ms,
                console_tail,
            } => EngineError::BootTimeout {
                timeout: Seconds::from_millis(timeout_ms),
                console_tail,
            }
            .into(),
            ErrorReport::EngineUnavailable { reason, hint } => {
                EngineError::Unavailable { reason, hint }.into()
            }
            ErrorReport::EngineExited {
                status,
                console_tail,
            } => EngineError::ExitedDuringBoot {
                status,
                console_tail,
            }
            .into(),
            ErrorReport::GuestIncompatible { guest, host } => {
                GuestError::Incompatible { guest, host }.into()
            }
            ErrorReport::GuestProtocol { reason } => GuestError::Protocol { reason }.into(),
            ErrorReport::GuestLost { reason } => GuestError::ConnectionLost { reason }.into(),
            ErrorReport::GuestStorage { context, reason } => {
                StorageError::Guest { context, reason }.into()
            }
            ErrorReport::InvalidArgument { field, reason } => {
                BoxliteError::InvalidArgument { field, reason }
            }
            ErrorReport::Other { kind, message } => {
                BoxliteError::Internal(format!("the box supervisor failed ({kind}): {message}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_with_their_type() {
        let errors: Vec<BoxliteError> = vec![
            EngineError::BootTimeout {
                timeout: Seconds::from_secs(3),
                console_tail: "tail".into(),
            }
            .into(),
            BoxliteError::engine_unavailable("no qemu", "install it"),
            GuestError::Incompatible { guest: 1, host: 2 }.into(),
            BoxliteError::protocol("garbage"),
            BoxliteError::guest_storage("mounting", "bad superblock"),
            BoxliteError::invalid("ports", "8080 is taken"),
        ];
        for error in errors {
            let json = serde_json::to_string(&ErrorReport::from(&error)).unwrap();
            let back = BoxliteError::from(serde_json::from_str::<ErrorReport>(&json).unwrap());
            assert_eq!(back.kind(), error.kind(), "{json}");
            assert_eq!(back.to_string(), error.to_string(), "{json}");
        }
    }
}
