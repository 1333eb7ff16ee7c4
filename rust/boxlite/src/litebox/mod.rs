//! One box: a handle on its record in the state database, and this process's connection to it
//! while it runs. Split by job: `status` (the state machine), `lifecycle` (start, stop,
//! remove), `connection` (reaching a running box, noticing its end), `command` (what an exec
//! runs).

mod command;
mod connection;
mod fork;
mod lifecycle;
mod snapshots;
mod status;
mod transfer;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use boxlite_proto::Message;
use serde::Serialize;

pub(crate) use connection::Connection;
pub use snapshots::SnapshotInfo;
pub use status::BoxStatus;
pub(crate) use status::Event;
pub use transfer::ARCHIVE_EXTENSION;
pub(crate) use transfer::{clean_ingest, import as import_box};

use crate::copy::CopyOptions;
use crate::error::{BoxliteError, BoxliteResult};
use crate::exec::{BoxCommand, ExecCounters, Execution};
use crate::ids::BoxID;
use crate::images::ImageConfig;
use crate::metrics::{BoxCounters, BoxMetrics, StageTimings};
use crate::options::BoxOptions;
use crate::runtime::RuntimeShared;
use crate::state::BoxRecord;
use crate::vmm::Accel;

/// What a box is, for listings and `boxlite info`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BoxInfo {
    pub id: BoxID,
    pub name: Option<String>,
    pub status: BoxStatus,
    pub image: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub created_at: SystemTime,
    pub started_at: Option<SystemTime>,
    /// The VM engine process, while the box runs.
    pub pid: Option<u32>,
    /// The box's supervisor process, while the box runs.
    pub shim_pid: Option<u32>,
    pub detach: bool,
    pub auto_remove: bool,
    /// The accelerator of this process's runtime (boxes started elsewhere may differ).
    pub accel: Accel,
    /// Whether a hardware hypervisor isolates this box (TCG does not count).
    pub hardware_isolated: bool,
    /// The box's network options.
    pub network: crate::options::NetworkOptions,
    /// The published ports as bound, while the box runs (a requested port 0 shows the one
    /// chosen).
    pub ports: Vec<crate::options::PortSpec>,
}

/// A box. Clones share it.
#[derive(Debug, Clone)]
pub struct LiteBox {
    inner: Arc<BoxInner>,
}

/// What never changes about a box, and this process's view of it while it runs. Its status
/// lives in the state database only.
#[derive(Debug)]
pub(crate) struct BoxInner {
    id: BoxID,
    name: Option<String>,
    options: BoxOptions,
    image: String,
    image_config: ImageConfig,
    created_at_ms: i64,
    dir: PathBuf,
    runtime: Arc<RuntimeShared>,
    counters: Arc<BoxCounters>,
    stages: Mutex<StageTimings>,
    /// Serialises start, stop and remove within this process (a file lock does it across
    /// processes).
    lifecycle: tokio::sync::Mutex<()>,
    /// This process's connection to the box's supervisor, while it runs.
    conn: Mutex<Option<Arc<Connection>>>,
    /// This process started it and counts it in `num_running_boxes`.
    counted: AtomicBool,
}

impl LiteBox {
    /// A handle for a box known to the state database.
    pub(crate) fn from_record(record: BoxRecord, runtime: Arc<RuntimeShared>) -> Self {
        Self {
            inner: Arc::new(BoxInner {
                dir: runtime.box_dir(&record.id),
                id: record.id,
                name: record.name,
                options: record.options,
                image: record.image,
                image_config: record.image_config,
                created_at_ms: record.created_at_ms,
                runtime,
                counters: Arc::default(),
                stages: Mutex::default(),
                lifecycle: tokio::sync::Mutex::new(()),
                conn: Mutex::new(None),
                counted: AtomicBool::new(false),
            }),
        }
    }

    pub(crate) fn set_stages(&self, stages: StageTimings) {
        if let Ok(mut s) = self.inner.stages.lock() {
            *s = stages;
        }
    }

    pub(crate) fn record_create_total(&self, ms: u128) {
        if let Ok(mut stages) = self.inner.stages.lock() {
            stages.total_create_ms = Some(ms);
        }
    }

    pub(crate) fn downgrade(&self) -> Weak<BoxInner> {
        Arc::downgrade(&self.inner)
    }

    pub(crate) fn upgrade(weak: &Weak<BoxInner>) -> Option<Self> {
        weak.upgrade().map(|inner| Self { inner })
    }

    pub fn id(&self) -> BoxID {
        self.inner.id
    }

    pub fn name(&self) -> Option<&str> {
        self.inner.name.as_deref()
    }

    /// The options the box was created with.
    pub fn options(&self) -> &BoxOptions {
        &self.inner.options
    }

    /// The defaults the box's image gives its commands (Env, Entrypoint, Cmd, WorkingDir,
    /// User), as recorded when the box was created.
    pub fn image_config(&self) -> &ImageConfig {
        &self.inner.image_config
    }

    /// What `exec` without a command runs: the image's ENTRYPOINT and CMD with the box's
    /// `entrypoint`/`cmd` applied as Docker does. Empty if neither says anything.
    pub fn default_command(&self) -> Vec<String> {
        command::default_argv(&self.inner.options, &self.inner.image_config)
    }

    /// The box directory on the host (disk, console log).
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The box's record now, its status brought up to date with what is really running.
    fn record(&self) -> BoxliteResult<BoxRecord> {
        let record = self
            .inner
            .runtime
            .store
            .get(&self.inner.id)?
            .ok_or_else(|| BoxliteError::BoxNotFound {
                id: self.inner.id.to_string(),
            })?;
        self.inner.runtime.reconcile(record)
    }

    pub fn status(&self) -> BoxStatus {
        self.record()
            .map(|r| r.status)
            .unwrap_or(BoxStatus::Stopped)
    }

    /// What the box is now; `BoxNotFound` once it has been removed.
    pub fn try_info(&self) -> BoxliteResult<BoxInfo> {
        let record = self.record()?;
        let accel = self.inner.runtime.accel();
        let at = |ms: i64| UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
        let running = record.status.has_engine();
        Ok(BoxInfo {
            id: record.id,
            name: record.name,
            status: record.status,
            image: record.image,
            cpus: record.options.cpus,
            memory_mib: record.options.memory.as_mib(),
            created_at: at(self.inner.created_at_ms),
            started_at: record.started_at_ms.map(at),
            pid: record.engine_pid.filter(|_| running),
            shim_pid: record.shim.filter(|_| running).map(|p| p.pid),
            detach: record.options.detach,
            auto_remove: record.options.auto_remove,
            accel,
            hardware_isolated: accel.is_hardware_isolated(),
            network: record.options.network.clone(),
            ports: if running { record.ports } else { Vec::new() },
        })
    }

    /// What the box is now (a removed box reads as stopped).
    pub fn info(&self) -> BoxInfo {
        self.try_info().unwrap_or_else(|_| BoxInfo {
            id: self.inner.id,
            name: self.inner.name.clone(),
            status: BoxStatus::Stopped,
            image: self.inner.image.clone(),
            cpus: self.inner.options.cpus,
            memory_mib: self.inner.options.memory.as_mib(),
            created_at: UNIX_EPOCH + Duration::from_millis(self.inner.created_at_ms.max(0) as u64),
            started_at: None,
            pid: None,
            shim_pid: None,
            detach: self.inner.options.detach,
            auto_remove: self.inner.options.auto_remove,
            accel: self.inner.runtime.accel(),
            hardware_isolated: self.inner.runtime.accel().is_hardware_isolated(),
            network: self.inner.options.network.clone(),
            ports: Vec::new(),
        })
    }

    /// Counters and timings, with CPU, memory and disk as the guest reports them while it runs.
    pub async fn metrics(&self) -> BoxliteResult<BoxMetrics> {
        let stages = self.inner.stages.lock().map(|s| *s).unwrap_or_default();
        let mut metrics = self.inner.counters.snapshot(&stages);
        if let Ok(client) = self.client().await {
            if let Ok(Message::MetricsReport(report)) = client.request(Message::Metrics).await {
                metrics.cpu_percent = Some(report.cpu_percent);
                metrics.memory_bytes = Some(report.memory_used_bytes);
                metrics.disk_bytes_used = Some(report.disk_used_bytes);
                metrics.disk_bytes_total = Some(report.disk_total_bytes);
            }
            if let Ok(Message::NetworkReport(net)) = client.request(Message::NetworkMetrics).await {
                metrics.network_bytes_sent = Some(net.bytes_sent);
                metrics.network_bytes_received = Some(net.bytes_received);
                metrics.network_tcp_connections = Some(net.tcp_connections);
                metrics.network_tcp_errors = Some(net.tcp_errors);
            }
        }
        Ok(metrics)
    }

    /// Starts `command` in the box; a box that is not running is started first.
    pub async fn exec(&self, command: BoxCommand) -> BoxliteResult<Execution> {
        command.validate()?;
        let client = self.running_client().await?;
        let request = command::request(&command, &self.inner.options, &self.inner.image_config);
        let counters = ExecCounters {
            of_box: self.inner.counters.clone(),
            runtime: self.inner.runtime.metrics.clone(),
        };
        let channel = client.open(Message::Exec(request))?;
        Execution::start(channel, &command, counters).await
    }

    /// The box's default command (`default_command()`) plus `extra_args`, under a terminal of
    /// `tty` size if given, else of the default size when the box was created with `tty`.
    pub fn default_exec(
        &self,
        extra_args: Vec<String>,
        tty: Option<boxlite_proto::TtySize>,
    ) -> BoxliteResult<BoxCommand> {
        command::default_exec(
            &self.inner.options,
            &self.inner.image_config,
            extra_args,
            tty,
        )
    }

    /// Copies the host file or directory `src` into the box: to `dest` exactly, or into
    /// `dest` when it ends with `/`.
    pub async fn copy_in(&self, src: &Path, dest: &str, options: CopyOptions) -> BoxliteResult<()> {
        let client = self.running_client().await?;
        crate::copy::copy_in(&client, src, dest, options).await
    }

    /// Copies the box path `src` to the host: to `dest` exactly, or into `dest` when it is an
    /// existing directory or ends with `/`. Nothing lands outside `dest`; at most `max_bytes` of
    /// file content (default [`crate::copy::COPY_OUT_LIMIT`]) is written.
    pub async fn copy_out(
        &self,
        src: &str,
        dest: &Path,
        options: CopyOptions,
        max_bytes: Option<u64>,
    ) -> BoxliteResult<()> {
        let client = self.running_client().await?;
        crate::copy::copy_out(&client, src, dest, options, max_bytes).await
    }

    /// The contents of the regular file `path` in the box, at most `max_bytes` (default
    /// [`crate::copy::READ_FILE_LIMIT`]).
    pub async fn read_file(&self, path: &str, max_bytes: Option<u64>) -> BoxliteResult<Vec<u8>> {
        let client = self.running_client().await?;
        crate::copy::read_file(&client, path, max_bytes).await
    }

    /// Writes `data` to `path` in the box with permission bits `mode`, replacing the file and
    /// creating missing parent directories.
    pub async fn write_file(&self, path: &str, data: &[u8], mode: u32) -> BoxliteResult<()> {
        crate::copy::validate_write(path, mode)?;
        let client = self.running_client().await?;
        crate::copy::write_file(&client, path, data, mode).await
    }

    /// The names in the directory `path` of the box, sorted (no `.` and `..`). Uses the
    /// image's `find` (busybox or findutils).
    pub async fn list_dir(&self, path: &str) -> BoxliteResult<Vec<String>> {
        crate::options::validate_box_path("path", path)?;
        let prefix = format!("{}/", path.trim_end_matches('/'));
        let command = BoxCommand::new("find")
            .args([
                prefix.as_str(),
                "-mindepth",
                "1",
                "-maxdepth",
                "1",
                "-print0",
            ])
            .user("0:0");
        let result = self.exec(command).await?.wait().await?;
        if result.exit_code != 0 {
            let stderr = String::from_utf8_lossy(&result.stderr);
            let reason = stderr
                .trim()
                .lines()
                .last()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("find exited with {}", result.exit_code));
            return Err(BoxliteError::invalid(
                "path",
                format!("cannot list {path:?} in the box: {reason}"),
            ));
        }
        let mut names: Vec<String> = result
            .stdout
            .split(|b| *b == 0)
            .filter(|e| !e.is_empty())
            .map(|e| {
                String::from_utf8_lossy(e.strip_prefix(prefix.as_bytes()).unwrap_or(e)).into_owned()
            })
            .collect();
        names.sort();
        Ok(names)
    }

    fn wrong_state(&self, status: BoxStatus, operation: &str) -> BoxliteError {
        BoxliteError::InvalidState {
            id: self.inner.id.to_string(),
            state: status.to_string(),
            operation: operation.into(),
        }
    }
}

/// Compile-time check: the public handles can be shared across threads and tasks.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    const fn assert_clone<T: Clone>() {}
    assert_send_sync::<LiteBox>();
    assert_send_sync::<Execution>();
    assert_clone::<Execution>();
    assert_send_sync::<crate::runtime::BoxliteRuntime>();
};
