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

use crate::error::BoxliteError;
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

/// A `BoxliteError` carried across the process boundary, keeping its type.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ErrorReport {
    pub kind: String,
    pub message: String,
    pub timeout_ms: Option<u64>,
    pub console_tail: Option<String>,
}

impl From<&BoxliteError> for ErrorReport {
    fn from(e: &BoxliteError) -> Self {
        let (timeout_ms, console_tail) = match e {
            BoxliteError::BootTimeout {
                timeout,
                console_tail,
            } => (Some(timeout.as_millis()), Some(console_tail.clone())),
            _ => (None, None),
        };
        Self {
            kind: e.kind().to_owned(),
            message: e.to_string(),
            timeout_ms,
            console_tail,
        }
    }
}

impl From<ErrorReport> for BoxliteError {
    fn from(r: ErrorReport) -> Self {
        match r.kind.as_str() {
            "boot_timeout" => BoxliteError::BootTimeout {
                timeout: Seconds::from_millis(r.timeout_ms.unwrap_or_default()),
                console_tail: r.console_tail.unwrap_or_default(),
            },
            "engine_unavailable" => BoxliteError::EngineUnavailable {
                reason: r.message,
                hint: "see the box's shim.log".into(),
            },
            "guest_protocol" => BoxliteError::GuestProtocol(r.message),
            "storage" => BoxliteError::Storage(r.message),
            "invalid_argument" => BoxliteError::invalid("box", r.message),
            _ => BoxliteError::Internal(format!("the box supervisor failed: {}", r.message)),
        }
    }
}
