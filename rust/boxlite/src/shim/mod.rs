//! The per-box supervisor ("shim"): a small process that owns one box's VM engine and its
//! agent connection, and serves any number of clients on a unix socket in the box directory.
//!
//! A virtio-serial port has one host end. With the shim holding it, a box can outlive the
//! process that created it (`detach`) and be reached from several processes at once. The
//! shim relays frames, rewriting channel ids, and passes credits end to end, so flow control
//! still runs between the guest and each real consumer.

mod client;
mod network;
mod server;
mod start;
pub(crate) mod template;
mod volumes;

use serde::{Deserialize, Serialize};

use crate::error::{BoxliteError, EngineError, GuestError, NetworkError, StorageError};
use crate::units::Seconds;
use crate::vmm::VmConfig;

pub(crate) use client::{connect, locate_shim, spawn};
pub(crate) use start::StartFrom;
pub(crate) use volumes::locate_virtiofsd;

/// Entry point of the `boxlite-shim` binary: `boxlite-shim <shim.json>` supervises a box,
/// `boxlite-shim --template <job.json>` makes a template.
pub fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|a| a == "--template") {
        return template::main(args.next().map(std::path::PathBuf::from));
    }
    server::main()
}

/// What the shim is told to run (`<box dir>/shim.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ShimConfig {
    pub qemu: std::path::PathBuf,
    pub box_id: String,
    /// Boot, or load a saved state.
    #[serde(default)]
    pub start: StartFrom,
    pub vm: VmConfig,
    pub boot_timeout: Seconds,
    /// Where clients connect.
    pub client_socket: std::path::PathBuf,
    /// The box's hostname (its name, else its id).
    pub hostname: String,
    /// The box's network, served by the shim on `vm.network`'s socket.
    pub network: Option<ShimNetwork>,
    /// How the agent confines the box's commands.
    #[serde(default)]
    pub sandbox: boxlite_proto::GuestSandbox,
    /// Where a pause writes the VM's saved state.
    #[serde(default)]
    pub saved_state: Option<std::path::PathBuf>,
    /// Host folders, one per `vm.volumes` device, in the same order.
    #[serde(default)]
    pub volumes: Vec<crate::options::VolumeSpec>,
    #[serde(default)]
    pub virtiofsd: Option<std::path::PathBuf>,
}

/// The policy and ports of a box's network (see `boxlite-net`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ShimNetwork {
    pub mac: [u8; 6],
    /// Validated `allow_net` entries.
    pub allow_net: Vec<String>,
    pub ports: Vec<crate::options::PortSpec>,
}

/// The one line the shim prints on stdout once the guest is ready, or booting failed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub(crate) enum ShimStatus {
    Ready {
        engine_pid: u32,
        spawn_ms: u64,
        boot_ms: u64,
        /// The published ports as bound (a requested port 0 shows the one chosen).
        #[serde(default)]
        ports: Vec<crate::options::PortSpec>,
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
    PortInUse {
        addr: String,
        reason: String,
    },
    NetworkSetup {
        reason: String,
    },
    Unsupported {
        what: String,
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
            BoxliteError::Network(NetworkError::PortInUse { addr, source }) => Self::PortInUse {
                addr: addr.clone(),
                reason: source.to_string(),
            },
            BoxliteError::Network(NetworkError::Setup { reason }) => Self::NetworkSetup {
                reason: reason.clone(),
            },
            BoxliteError::Unsupported(what) => Self::Unsupported { what: what.clone() },
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
            ErrorReport::PortInUse { addr, reason } => NetworkError::PortInUse {
                addr,
                source: std::io::Error::new(std::io::ErrorKind::AddrInUse, reason),
            }
            .into(),
            ErrorReport::NetworkSetup { reason } => NetworkError::Setup { reason }.into(),
            ErrorReport::Unsupported { what } => BoxliteError::Unsupported(what),
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
            BoxliteError::invalid("ports", "8080 is bad"),
            NetworkError::PortInUse {
                addr: "127.0.0.1:8080".into(),
                source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
            }
            .into(),
        ];
        for error in errors {
            let json = serde_json::to_string(&ErrorReport::from(&error)).unwrap();
            let back = BoxliteError::from(serde_json::from_str::<ErrorReport>(&json).unwrap());
            assert_eq!(back.kind(), error.kind(), "{json}");
            assert_eq!(back.to_string(), error.to_string(), "{json}");
        }
    }
}
