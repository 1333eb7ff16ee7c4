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
    Configure(Box<GuestSetup>),
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
    /// Host, before `Configure`, on a VM about to be saved as a template: bring `link` up (the
    /// interface, address and route every box of the template has; each box's `Configure`
    /// then only changes the MAC), write back the page cache and settle. Reply: `Done`. The
    /// agent then waits for the `Configure` that each box restored from the template sends.
    PrepareTemplate {
        #[serde(default)]
        link: Option<crate::net::GuestNetwork>,
    },

    /// Host, as the last frame before the VM is saved: reply `Done`, then send nothing more
    /// until the next `Configure` (which the restored VM gets first). Requests still arriving
    /// are read and dropped unanswered; output of running commands is dropped for good.
    Quiesce,
    /// Host to its box's supervisor: save the VM (memory and devices) into the box's saved
    /// state, reply `Done`, and exit; the box is then paused.
    Pause,

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
    /// How user commands are confined; absent (an older host) means the safe default.
    #[serde(default)]
    pub sandbox: GuestSandbox,
    /// The box's id (its hostname may be its name).
    #[serde(default)]
    pub box_id: String,
    /// How this VM got here: booted, or restored from a memory image.
    #[serde(default)]
    pub after: SetupAfter,
    /// Host folders to mount (virtio-fs) before any user command runs.
    #[serde(default)]
    pub volumes: Vec<GuestVolume>,
}

/// How the agent's reply to a `Configure` starts when mounting a volume failed (the host
/// reports it as a storage error, not a network one).
pub const VOLUME_ERROR_PREFIX: &str = "volumes: ";

/// One host folder in the box: the virtio-fs `tag` its device advertises, mounted at
/// `path` (absolute, inside the box root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestVolume {
    pub tag: String,
    pub path: String,
    #[serde(default)]
    pub read_only: bool,
}

/// What happened to a VM before its `Configure`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SetupAfter {
    /// A cold boot: nothing ran before.
    #[default]
    Boot,
    /// Restored from a template another box was made from: the identity is new.
    Template,
    /// Resumed from this box's own saved memory: processes carry on.
    Resume,
}

/// How the agent confines every user command of the box (the agent itself never is): which
/// capabilities they keep and whether a seccomp filter like Docker's default profile applies.
/// Whatever this says, user commands run in the box's own pid, mount and ipc namespaces and
/// never see the agent or its devices. The default is Docker's: its default capability set
/// and seccomp on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestSandbox {
    /// The final capability set, by name (`"CAP_CHOWN"`; case-insensitive, the `CAP_` prefix
    /// optional, `"ALL"` for every one). A command running as uid 0 gets it as its bounding,
    /// permitted and effective set; any other uid gets it as its bounding set only (so a
    /// setuid-root program gets no more). Build it with [`GuestSandbox::from_changes`].
    pub capabilities: Vec<String>,
    /// Apply the agent's seccomp filter (see `rust/boxlite-guest/src/seccomp.rs`).
    pub seccomp: bool,
    /// Resource limits every user command starts with (soft = hard); `None` keeps the
    /// kernel's default.
    pub limits: GuestLimits,
}

/// Per-process resource limits (`setrlimit`) for a box's commands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestLimits {
    /// `RLIMIT_NOFILE`: open file descriptors.
    pub open_files: Option<u64>,
    /// `RLIMIT_FSIZE`: bytes one file may grow to.
    pub file_size: Option<u64>,
    /// `RLIMIT_NPROC`: processes of the command's user (in the whole box).
    pub processes: Option<u64>,
    /// `RLIMIT_AS`: bytes of address space of one process.
    pub memory: Option<u64>,
    /// `RLIMIT_CPU`: seconds of CPU time of one process.
    pub cpu_time: Option<u64>,
}

impl Default for GuestSandbox {
    fn default() -> Self {
        Self {
            capabilities: Self::DOCKER_DEFAULT_CAPABILITIES
                .iter()
                .map(|c| c.to_string())
                .collect(),
            seccomp: true,
            limits: GuestLimits::default(),
        }
    }
}

impl GuestSandbox {
    /// Docker's default capability set (moby `oci/caps/defaults.go`).
    pub const DOCKER_DEFAULT_CAPABILITIES: [&'static str; 14] = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    ];

    /// Every capability Linux 6.1 knows; the index is its number.
    pub const CAPABILITIES: [&'static str; 41] = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_LINUX_IMMUTABLE",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_BROADCAST",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_IPC_LOCK",
        "CAP_IPC_OWNER",
        "CAP_SYS_MODULE",
        "CAP_SYS_RAWIO",
        "CAP_SYS_CHROOT",
        "CAP_SYS_PTRACE",
        "CAP_SYS_PACCT",
        "CAP_SYS_ADMIN",
        "CAP_SYS_BOOT",
        "CAP_SYS_NICE",
        "CAP_SYS_RESOURCE",
        "CAP_SYS_TIME",
        "CAP_SYS_TTY_CONFIG",
        "CAP_MKNOD",
        "CAP_LEASE",
        "CAP_AUDIT_WRITE",
        "CAP_AUDIT_CONTROL",
        "CAP_SETFCAP",
        "CAP_MAC_OVERRIDE",
        "CAP_MAC_ADMIN",
        "CAP_SYSLOG",
        "CAP_WAKE_ALARM",
        "CAP_BLOCK_SUSPEND",
        "CAP_AUDIT_READ",
        "CAP_PERFMON",
        "CAP_BPF",
        "CAP_CHECKPOINT_RESTORE",
    ];

    /// The number of capability `name` (case-insensitive, `CAP_` optional); `None` for an
    /// unknown name and for `ALL`.
    pub fn capability_number(name: &str) -> Option<u32> {
        let upper = name.trim().to_ascii_uppercase();
        let full = if upper.starts_with("CAP_") {
            upper
        } else {
            format!("CAP_{upper}")
        };
        Self::CAPABILITIES
            .iter()
            .position(|c| *c == full)
            .map(|i| i as u32)
    }

    /// The sandbox for Docker-style `--cap-add`/`--cap-drop` lists (the published package's
    /// `ContainerCapabilities(add, drop)`), with Docker's rule: `ALL` in `add` starts from every
    /// capability and removes `drop`; `ALL` in `drop` keeps only `add`; otherwise Docker's
    /// default set plus `add` minus `drop`. Names as in [`GuestSandbox::capabilities`]; an
    /// unknown name is an error naming it. The result lists canonical names in number order.
    pub fn from_changes<S: AsRef<str>>(
        add: &[S],
        drop: &[S],
        seccomp: bool,
    ) -> Result<Self, String> {
        let parse = |list: &[S]| -> Result<(bool, u64), String> {
            let mut all = false;
            let mut mask = 0u64;
            for name in list {
                let name = name.as_ref();
                if name.trim().eq_ignore_ascii_case("ALL") {
                    all = true;
                } else {
                    let n = Self::capability_number(name)
                        .ok_or_else(|| format!("unknown capability {name:?}"))?;
                    mask |= 1 << n;
                }
            }
            Ok((all, mask))
        };
        let every = (1u64 << Self::CAPABILITIES.len()) - 1;
        let (add_all, add) = parse(add)?;
        let (drop_all, drop) = parse(drop)?;
        let mask = if add_all {
            every & !drop
        } else if drop_all {
            add
        } else {
            let default = Self::DOCKER_DEFAULT_CAPABILITIES
                .iter()
                .filter_map(|c| Self::capability_number(c))
                .fold(0u64, |m, n| m | 1 << n);
            (default | add) & !drop
        };
        let capabilities = Self::CAPABILITIES
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, c)| c.to_string())
            .collect();
        Ok(Self {
            capabilities,
            seccomp,
            limits: GuestLimits::default(),
        })
    }
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
    /// Where the agent's time went, for a process it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<ExecTrace>,
}

/// The hops of one exec inside the guest, in microseconds after the agent decoded the request
/// (the guest's monotonic clock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecTrace {
    /// The cloned child runs (the agent's worker took the job and cloned).
    pub child_started_us: u64,
    /// The final process calls `execve` (namespaces entered, user, capabilities, seccomp set).
    pub execve_called_us: u64,
    /// The agent knows `execve` succeeded and has sent `Started`.
    pub started_us: u64,
    /// The first output byte was read, if there was output.
    pub first_output_us: Option<u64>,
    /// The agent saw the exit.
    pub exit_seen_us: u64,
    /// The exit report is queued for the host.
    pub reported_us: u64,
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
    fn a_setup_without_sandbox_gets_the_docker_default() {
        let json = r#"{"type":"configure","hostname":"h","network":null,"time_ms":1,"entropy":[]}"#;
        let Message::Configure(setup) = serde_json::from_str(json).unwrap() else {
            panic!("not a configure message");
        };
        assert_eq!(setup.sandbox, GuestSandbox::default());
        assert!(setup.sandbox.seccomp);
        assert_eq!(setup.sandbox.capabilities.len(), 14);
        // Partial objects fill in the rest.
        let s: GuestSandbox = serde_json::from_str(r#"{"seccomp":false}"#).unwrap();
        assert_eq!(s.capabilities, GuestSandbox::default().capabilities);
        assert!(!s.seccomp);
    }

    #[test]
    fn capability_names_and_docker_changes() {
        assert_eq!(GuestSandbox::capability_number("CAP_SYS_ADMIN"), Some(21));
        assert_eq!(GuestSandbox::capability_number("sys_admin"), Some(21));
        assert_eq!(GuestSandbox::capability_number("Cap_Bpf"), Some(39));
        assert_eq!(GuestSandbox::capability_number("ALL"), None);
        assert_eq!(GuestSandbox::capability_number("FOO"), None);
        let none: [&str; 0] = [];
        let d = GuestSandbox::from_changes(&none, &none, true).unwrap();
        let mut want: Vec<_> = GuestSandbox::DOCKER_DEFAULT_CAPABILITIES.to_vec();
        want.sort_by_key(|c| GuestSandbox::capability_number(c));
        assert_eq!(d.capabilities, want);
        let s = GuestSandbox::from_changes(&["net_admin"], &["CAP_MKNOD", "kill"], false).unwrap();
        assert!(s.capabilities.contains(&"CAP_NET_ADMIN".to_string()));
        assert!(!s.capabilities.contains(&"CAP_MKNOD".to_string()));
        assert!(!s.capabilities.contains(&"CAP_KILL".to_string()));
        assert_eq!(s.capabilities.len(), 13);
        assert!(!s.seccomp);
        let all = GuestSandbox::from_changes(&["ALL"], &["sys_admin"], true).unwrap();
        assert_eq!(all.capabilities.len(), 40);
        let only = GuestSandbox::from_changes(&["chown"], &["all"], true).unwrap();
        assert_eq!(only.capabilities, vec!["CAP_CHOWN"]);
        let err = GuestSandbox::from_changes(&["FOO"], &none, true).unwrap_err();
        assert!(err.contains("FOO"), "{err}");
    }

    #[test]
    fn an_exit_carries_its_trace_and_parses_without_one() {
        let traced = Message::Exited(ExitStatus {
            code: Some(0),
            signal: None,
            timed_out: false,
            trace: Some(ExecTrace {
                child_started_us: 300,
                execve_called_us: 900,
                started_us: 1200,
                first_output_us: None,
                exit_seen_us: 2500,
                reported_us: 2600,
            }),
        });
        let json = serde_json::to_string(&traced).unwrap();
        assert_eq!(serde_json::from_str::<Message>(&json).unwrap(), traced);
        let bare = r#"{"type":"exited","code":3,"signal":null,"timed_out":false}"#;
        let Message::Exited(status) = serde_json::from_str(bare).unwrap() else {
            panic!("not an exit");
        };
        assert_eq!((status.code, status.trace), (Some(3), None));
    }

    #[test]
    fn unknown_message_type_is_an_error() {
        assert!(serde_json::from_str::<Message>(r#"{"type":"format_disk"}"#).is_err());
    }
}
