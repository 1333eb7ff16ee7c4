//! Control messages: requests from the host, replies and events from the guest.

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change; the host refuses a guest that reports another one.
pub const PROTOCOL_VERSION: u32 = 2;

/// The name of the virtio-serial port the agent serves on (`/sys/class/virtio-ports/*/name`).
pub const GUEST_PORT_NAME: &str = "boxlite.agent";

/// Every control message, in both directions.
///
/// Requests (host -> guest) open a channel; the guest answers on the same channel with exactly
/// one final reply (`Pong`, `Done`, `Exited`, `MetricsReport` or `Error`), after any events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Guest, channel 0, once: the agent serves requests. `root_error` says why the box
    /// disk could not be mounted, if it could not.
    Ready {
        version: u32,
        agent_version: String,
        /// Guest uptime when the agent became ready (kernel boot plus agent start).
        uptime_ms: u64,
        root_error: Option<String>,
    },

    /// Host, once, before any other request: who the box is. Reply: `Done`.
    Configure(GuestSetup),
    /// Host: are you alive? Reply: `Pong`.
    Ping,
    /// Host: start a process. Events: `Started`, then stdout/stderr data, then `Exited`.
    Exec(ExecRequest),
    /// Host, on an exec's channel: send this signal to the process's group.
    Signal { signal: i32 },
    /// Host, on an exec's channel: the terminal size changed.
    Resize(TtySize),
    /// Host: a tar stream follows on `Stdin`; unpack it at `path` inside the box. Reply: `Done`.
    CopyIn { path: String },
    /// Host: send `path` inside the box as a tar stream on `Stdout`. Reply: `Done`.
    CopyOut { path: String },
    /// Host: an uncompressed OCI layer follows on `Stdin`; apply it (whiteouts included) on
    /// the root disk. Reply: `Done`.
    UnpackLayer,
    /// Host: report resource use. Reply: `MetricsReport`.
    Metrics,
    /// Host: sync and unmount the disks, reply `Done`, then power the VM off.
    Shutdown,

    /// Host to its box's supervisor (never reaches the guest): the network counters.
    /// Reply: `NetworkReport`.
    NetworkMetrics,
    /// Supervisor: reply to `NetworkMetrics`.
    NetworkReport(NetworkStats),

    /// Guest: reply to `Ping`.
    Pong,
    /// Guest: the process of an `Exec` is running.
    Started { pid: u32 },
    /// Guest: the process of an `Exec` is gone and its output streams are closed.
    Exited(ExitStatus),
    /// Guest: the request succeeded.
    Done,
    /// Guest: reply to `Metrics`.
    MetricsReport(GuestMetrics),
    /// Guest: the request failed.
    Error { kind: ErrorKind, message: String },
}

/// What a box is, told to its agent right after boot (and again after a restore from a
/// memory image): nothing the guest learned before this may identify the box.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestSetup {
    /// The box's hostname (its name, else its id).
    pub hostname: String,
    /// The network to configure; `None` when the box has none.
    pub network: Option<crate::net::GuestNetwork>,
    /// The host's wall clock, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Fresh randomness for the guest's entropy pool (mixed in, then the CRNG reseeded).
    pub entropy: Vec<u8>,
}

/// A box's network counters, kept by its supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetworkStats {
    /// Payload bytes the box sent out.
    pub bytes_sent: u64,
    /// Payload bytes the box received.
    pub bytes_received: u64,
    /// TCP connections open now.
    pub tcp_connections: u64,
    /// TCP connections refused, reset or timed out (policy refusals included).
    pub tcp_errors: u64,
}

/// What the host asks the guest to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub program: String,
    pub args: Vec<String>,
    /// The complete environment (image defaults already merged by the host).
    pub env: Vec<(String, String)>,
    /// Working directory inside the box; `/` when absent.
    pub cwd: Option<String>,
    /// `name`, `uid`, `uid:gid` or `name:group`, resolved against the box's /etc/passwd and
    /// /etc/group; root when absent.
    pub user: Option<String>,
    /// Run under a pseudo-terminal of this size (stdout and stderr merge into stdout).
    pub tty: Option<TtySize>,
    /// Kill the process group after this long and report `timed_out`.
    pub timeout_ms: Option<u64>,
}

impl ExecRequest {
    pub fn new<I, S>(program: impl Into<String>, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
            user: None,
            tty: None,
            timeout_ms: None,
        }
    }
}

/// A terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// The exit code, when the process exited by itself.
    pub code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
    /// The agent killed it because its timeout passed.
    pub timed_out: bool,
}

/// Resource use of the guest, as the guest kernel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GuestMetrics {
    /// CPU busy share since the previous report (or since boot), 0-100 over all vCPUs.
    pub cpu_percent: f32,
    pub memory_total_bytes: u64,
    /// Total minus available.
    pub memory_used_bytes: u64,
    pub disk_total_bytes: u64,
    pub disk_used_bytes: u64,
    pub uptime_ms: u64,
}

/// Why a request failed, so the host can map it to a typed error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request itself is malformed (empty program, bad env name, bad path).
    InvalidArgument,
    /// A named thing does not exist in the box: cwd, user, group, path.
    NotFound,
    /// The program could not be started (not found, not executable, bad format).
    SpawnFailed,
    /// The request is valid but this agent does not do it.
    Unsupported,
    /// An I/O failure inside the guest (disk full, read-only filesystem...).
    Io,
    /// A bug or broken invariant in the agent.
    Internal,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_use_tagged_snake_case_json() {
        let json = serde_json::to_string(&Message::Signal { signal: 9 }).unwrap();
        assert_eq!(json, r#"{"type":"signal","signal":9}"#);
        let back: Message = serde_json::from_str(r#"{"type":"pong"}"#).unwrap();
        assert_eq!(back, Message::Pong);
    }

    #[test]
    fn unknown_message_type_is_an_error() {
        assert!(serde_json::from_str::<Message>(r#"{"type":"format_disk"}"#).is_err());
    }
}
