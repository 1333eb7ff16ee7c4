//! One box: its disk, its VM while it runs, and the commands running in it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use boxlite_proto::Message;
use serde::Serialize;

use crate::agent::AgentClient;
use crate::error::{BoxliteError, BoxliteResult};
use crate::exec::{to_request, BoxCommand, ExecCounters, Execution};
use crate::ids::BoxID;
use crate::metrics::{BoxCounters, BoxMetrics, StageTimings};
use crate::process::GuardedChild;
use crate::runtime::RuntimeShared;
use crate::shim::{self, ShimConfig};
use crate::state::{BoxRecord, ProcessId};
use crate::vm::socket_path;
use crate::vmm::{Accel, DiskAttachment, DiskFormat, VmConfig};

/// Where a box is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BoxStatus {
    Configured,
    Starting,
    Running,
    Stopping,
    Stopped,
    Failed,
}

impl BoxStatus {
    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Configured,
            Self::Starting,
            Self::Running,
            Self::Stopping,
            Self::Stopped,
            Self::Failed,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Configured => "configured",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }
}

impl std::fmt::Display for BoxStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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
}

/// A box. Clones share it.
#[derive(Debug, Clone)]
pub struct LiteBox {
    inner: Arc<BoxInner>,
}

#[derive(Debug)]
pub(crate) struct BoxInner {
    record: BoxRecord,
    dir: PathBuf,
    disk: PathBuf,
    runtime: Arc<RuntimeShared>,
    counters: Arc<BoxCounters>,
    stages: Mutex<StageTimings>,
    /// Serialises start, stop and remove within this process (a file lock does it across
    /// processes).
    lifecycle: tokio::sync::Mutex<()>,
    state: Mutex<RunState>,
}

#[derive(Debug)]
struct RunState {
    status: BoxStatus,
    conn: Option<Arc<Connection>>,
    started_at_ms: Option<i64>,
    shim: Option<ProcessId>,
    engine_pid: Option<u32>,
    /// This process started it and counts it in `num_running_boxes`.
    counted: bool,
}

/// This process's connection to a running box's supervisor.
#[derive(Debug)]
pub(crate) struct Connection {
    client: AgentClient,
    /// Set when this process started the supervisor without `detach`: dropping it ends the box.
    owned: Option<GuardedChild>,
    shim: ProcessId,
}

impl LiteBox {
    /// A handle for a box known to the state database.
    pub(crate) fn from_record(
        record: BoxRecord,
        dir: PathBuf,
        runtime: Arc<RuntimeShared>,
    ) -> Self {
        let alive = record.shim.filter(ProcessId::is_alive);
        let status = match record.status {
            BoxStatus::Running | BoxStatus::Starting | BoxStatus::Stopping if alive.is_none() => {
                BoxStatus::Stopped
            }
            other => other,
        };
        let state = RunState {
            status,
            conn: None,
            started_at_ms: record.started_at_ms,
            shim: alive,
            engine_pid: alive.and(record.engine_pid),
            counted: false,
        };
        Self {
            inner: Arc::new(BoxInner {
                disk: dir.join("disk.qcow2"),
                dir,
                record,
                runtime,
                counters: Arc::default(),
                stages: Mutex::default(),
                lifecycle: tokio::sync::Mutex::new(()),
                state: Mutex::new(state),
            }),
        }
    }

    pub(crate) fn set_stages(&self, stages: StageTimings) {
        if let Ok(mut s) = self.inner.stages.lock() {
            *s = stages;
        }
    }

    pub(crate) fn downgrade(&self) -> Weak<BoxInner> {
        Arc::downgrade(&self.inner)
    }

    pub(crate) fn upgrade(weak: &Weak<BoxInner>) -> Option<Self> {
        weak.upgrade().map(|inner| Self { inner })
    }

    pub fn id(&self) -> BoxID {
        self.inner.record.id
    }

    pub fn name(&self) -> Option<&str> {
        self.inner.record.name.as_deref()
    }

    pub fn options(&self) -> &crate::options::BoxOptions {
        &self.inner.record.options
    }

    /// The defaults the box's image gives its commands (Env, Entrypoint, Cmd, WorkingDir,
    /// User), as recorded when the box was created.
    pub fn image_config(&self) -> &crate::images::ImageConfig {
        &self.inner.record.image_config
    }

    pub fn status(&self) -> BoxStatus {
        self.refresh();
        self.inner
            .state
            .lock()
            .map(|s| s.status)
            .unwrap_or(BoxStatus::Failed)
    }

    /// Notices a supervisor that died behind our back (another process stopped the box, or
    /// its VM was killed).
    fn refresh(&self) {
        let Ok(state) = self.inner.state.lock() else {
            return;
        };
        if state.status == BoxStatus::Running && !state.shim.is_some_and(|s| s.is_alive()) {
            drop(state);
            self.mark_stopped();
        }
    }

    pub fn info(&self) -> BoxInfo {
        self.refresh();
        let record = &self.inner.record;
        let (status, started_at_ms, pid, shim_pid) = match self.inner.state.lock() {
            Ok(s) => (
                s.status,
                s.started_at_ms,
                s.engine_pid,
                s.shim.map(|p| p.pid),
            ),
            Err(_) => (BoxStatus::Failed, None, None, None),
        };
        let accel = self.inner.runtime.accel();
        let at = |ms: i64| UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
        BoxInfo {
            id: record.id,
            name: record.name.clone(),
            status,
            image: record.image.clone(),
            cpus: record.options.cpus,
            memory_mib: record.options.memory.as_mib(),
            created_at: at(record.created_at_ms),
            started_at: started_at_ms.map(at),
            pid,
            shim_pid,
            detach: record.options.detach,
            auto_remove: record.options.auto_remove,
            accel,
            hardware_isolated: accel.is_hardware_isolated(),
        }
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
        }
        Ok(metrics)
    }

    /// Boots the box's VM from its disk (state kept from earlier runs).
    pub async fn start(&self) -> BoxliteResult<()> {
        let _serial = self.inner.lifecycle.lock().await;
        let _cross_process = self.inner.runtime.lock_box(&self.inner.dir).await?;
        self.refresh();
        let status = self.status();
        if !matches!(
            status,
            BoxStatus::Configured | BoxStatus::Stopped | BoxStatus::Failed
        ) {
            return Err(self.wrong_state(status, "start"));
        }
        let _slot = self.inner.runtime.boot_slot().await?;
        self.set_status(BoxStatus::Starting);
        match self.boot().await {
            Ok(conn) => {
                let running = (conn.shim, self.engine_pid());
                self.inner.runtime.store.set_status(
                    &self.id(),
                    BoxStatus::Running,
                    Some(running),
                )?;
                let started_at_ms = crate::state::now_ms();
                if let Ok(mut state) = self.inner.state.lock() {
                    state.status = BoxStatus::Running;
                    state.shim = Some(conn.shim);
                    state.started_at_ms = Some(started_at_ms);
                    state.conn = Some(conn.clone());
                    state.counted = true;
                }
                self.inner.runtime.metrics.box_started();
                tokio::spawn(watch_connection(
                    Arc::downgrade(&self.inner),
                    Arc::downgrade(&conn),
                    conn.client.clone(),
                ));
                Ok(())
            }
            Err(e) => {
                self.set_status(BoxStatus::Failed);
                let _ = self
                    .inner
                    .runtime
                    .store
                    .set_status(&self.id(), BoxStatus::Failed, None);
                Err(e)
            }
        }
    }

    fn engine_pid(&self) -> u32 {
        self.inner
            .state
            .lock()
            .ok()
            .and_then(|s| s.engine_pid)
            .unwrap_or_default()
    }

    async fn boot(&self) -> BoxliteResult<Arc<Connection>> {
        let started = Instant::now();
        let env = self.inner.runtime.vm_env().await?;
        let id = self.id().to_string();
        let vm = VmConfig {
            name: format!("boxlite-{id}"),
            kernel: env.bundle.kernel.clone(),
            initramfs: env.bundle.initramfs.clone(),
            kernel_args: vec!["boxlite.root=/dev/vda".into(), "boxlite.mode=box".into()],
            cpus: self.inner.record.options.cpus,
            memory: self.inner.record.options.memory,
            disks: vec![DiskAttachment {
                path: self.inner.disk.clone(),
                format: DiskFormat::Qcow2,
                volatile: false,
            }],
            agent_socket: socket_path(self.inner.dir.join("agent.sock"), &format!("{id}-agent"))?,
            console_log: self.inner.dir.join("console.log"),
            accel: env.accel,
        };
        let client_socket = socket_path(self.inner.dir.join("shim.sock"), &id)?;
        let config = ShimConfig {
            qemu: env.qemu.clone(),
            vm,
            boot_timeout: env.boot_timeout,
            client_socket: client_socket.clone(),
        };
        let box_config_ms = started.elapsed().as_millis();
        let detach = self.inner.record.options.detach;
        let handle = shim::spawn(&env.shim, &self.inner.dir, &config, detach).await?;
        let client = match shim::connect(&client_socket).await {
            Ok(client) => client,
            Err(e) => {
                handle.child.kill_and_wait().await;
                return Err(e);
            }
        };
        if let Ok(mut stages) = self.inner.stages.lock() {
            stages.box_config_ms = Some(box_config_ms);
            stages.box_spawn_ms = Some(handle.spawn_ms);
            stages.container_init_ms = Some(handle.boot_ms.saturating_sub(handle.spawn_ms));
            stages.guest_boot_ms = Some(handle.boot_ms);
        }
        if let Ok(mut state) = self.inner.state.lock() {
            state.engine_pid = Some(handle.engine_pid);
        }
        let process = handle.process;
        let owned = (!detach).then_some(handle.child);
        Ok(Arc::new(Connection {
            client,
            owned,
            shim: process,
        }))
    }

    /// Syncs and powers the guest off (killing it after the stop timeout); a no-op for a box
    /// that is not running. Works on boxes started by other processes too.
    pub async fn stop(&self) -> BoxliteResult<()> {
        let _serial = self.inner.lifecycle.lock().await;
        let _cross_process = self.inner.runtime.lock_box(&self.inner.dir).await?;
        self.stop_locked().await?;
        if self.inner.record.options.auto_remove {
            self.remove_files()?;
        }
        Ok(())
    }

    async fn stop_locked(&self) -> BoxliteResult<()> {
        self.refresh();
        let (status, shim, conn) = {
            let state = self.inner.state.lock().map_err(|_| poisoned())?;
            (state.status, state.shim, state.conn.clone())
        };
        let Some(shim) = shim.filter(|_| status == BoxStatus::Running) else {
            return Ok(());
        };
        self.set_status(BoxStatus::Stopping);
        let client = match conn {
            Some(conn) => Some(conn.client.clone()),
            None => shim::connect(&socket_path(
                self.inner.dir.join("shim.sock"),
                &self.id().to_string(),
            )?)
            .await
            .ok(),
        };
        let timeout = self.inner.runtime.options.stop_timeout.as_duration();
        let graceful = async {
            if let Some(client) = &client {
                // The guest may power off before its reply leaves; the exit is what counts.
                let _ = client.request(Message::Shutdown).await;
            }
            wait_gone(shim).await;
        };
        if tokio::time::timeout(timeout, graceful).await.is_err() {
            tracing::warn!(box_id = %self.id(), "graceful stop timed out; killing the box");
        }
        kill_gone(shim).await;
        if let Some(engine) = self
            .inner
            .state
            .lock()
            .ok()
            .and_then(|s| s.engine_pid)
            .and_then(ProcessId::of)
        {
            kill_gone(engine).await;
        }
        if let Some(client) = client {
            client.close("the box was stopped");
        }
        self.mark_stopped();
        Ok(())
    }

    /// Stops (if `force`) and deletes the box: disk, directory and record.
    pub(crate) async fn remove(&self, force: bool) -> BoxliteResult<()> {
        let _serial = self.inner.lifecycle.lock().await;
        let _cross_process = self.inner.runtime.lock_box(&self.inner.dir).await?;
        self.refresh();
        let status = self.status();
        if matches!(
            status,
            BoxStatus::Running | BoxStatus::Starting | BoxStatus::Stopping
        ) {
            if !force {
                return Err(BoxliteError::InvalidState {
                    id: self.id().to_string(),
                    state: status.to_string(),
                    operation: "remove (use force=True to stop it first)".into(),
                });
            }
            self.stop_locked().await?;
        }
        self.remove_files()
    }

    fn remove_files(&self) -> BoxliteResult<()> {
        self.inner.runtime.store.delete(&self.id())?;
        self.inner.runtime.forget(&self.id());
        match std::fs::remove_dir_all(&self.inner.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BoxliteError::io(
                format!("removing {}", self.inner.dir.display()),
                e,
            )),
        }
    }

    fn mark_stopped(&self) {
        let counted = self
            .inner
            .state
            .lock()
            .map(|mut s| {
                s.status = BoxStatus::Stopped;
                s.conn = None;
                s.shim = None;
                s.engine_pid = None;
                std::mem::take(&mut s.counted)
            })
            .unwrap_or(false);
        if counted {
            self.inner.runtime.metrics.box_stopped();
        }
        let _ = self
            .inner
            .runtime
            .store
            .set_status(&self.id(), BoxStatus::Stopped, None);
    }

    /// The connection to the running box, attaching to its supervisor if another process
    /// started it.
    async fn client(&self) -> BoxliteResult<AgentClient> {
        self.refresh();
        let (status, conn, shim) = {
            let state = self.inner.state.lock().map_err(|_| poisoned())?;
            (state.status, state.conn.clone(), state.shim)
        };
        if status != BoxStatus::Running {
            return Err(self.wrong_state(status, "exec in"));
        }
        if let Some(conn) = conn.filter(|c| c.client.closed_reason().is_none()) {
            return Ok(conn.client.clone());
        }
        let shim = shim.ok_or_else(|| self.wrong_state(BoxStatus::Stopped, "exec in"))?;
        let client = shim::connect(&socket_path(
            self.inner.dir.join("shim.sock"),
            &self.id().to_string(),
        )?)
        .await?;
        let conn = Arc::new(Connection {
            client: client.clone(),
            owned: None,
            shim,
        });
        if let Ok(mut state) = self.inner.state.lock() {
            state.conn = Some(conn.clone());
        }
        tokio::spawn(watch_connection(
            Arc::downgrade(&self.inner),
            Arc::downgrade(&conn),
            client.clone(),
        ));
        Ok(client)
    }

    /// Starts `command` in the box.
    pub async fn exec(&self, command: BoxCommand) -> BoxliteResult<Execution> {
        command.validate()?;
        let client = self.client().await?;
        let record = &self.inner.record;
        let (box_options, image) = (&record.options, &record.image_config);
        let env = crate::images::merge_env(
            &crate::images::merge_env(&image.env, &box_options.env),
            &command.env,
        );
        let cwd = command
            .cwd
            .clone()
            .or_else(|| box_options.working_dir.clone())
            .or_else(|| image.working_dir.clone());
        let user = command
            .user
            .clone()
            .or_else(|| box_options.user.clone())
            .or_else(|| image.user.clone());
        let request = to_request(&command, env, cwd, user);
        let counters = ExecCounters {
            of_box: self.inner.counters.clone(),
            runtime: self.inner.runtime.metrics.clone(),
        };
        let channel = client.open(Message::Exec(request))?;
        Execution::start(channel, &command, counters).await
    }

    /// Copies the host file or directory `src` into the box: to `dest` exactly, or into
    /// `dest` when it ends with `/`.
    pub async fn copy_in(&self, src: &Path, dest: &str) -> BoxliteResult<()> {
        let client = self.client().await?;
        crate::copy::copy_in(&client, src, dest).await
    }

    /// Copies the box path `src` to the host: to `dest` exactly, or into `dest` when it is an
    /// existing directory or ends with `/`. Nothing lands outside `dest`.
    pub async fn copy_out(&self, src: &str, dest: &Path) -> BoxliteResult<()> {
        let client = self.client().await?;
        crate::copy::copy_out(&client, src, dest).await
    }

    pub(crate) fn record_create_total(&self, ms: u128) {
        if let Ok(mut stages) = self.inner.stages.lock() {
            stages.total_create_ms = Some(ms);
        }
    }

    /// The box directory on the host (disk, console log).
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn set_status(&self, status: BoxStatus) {
        if let Ok(mut state) = self.inner.state.lock() {
            state.status = status;
        }
    }

    fn wrong_state(&self, status: BoxStatus, operation: &str) -> BoxliteError {
        BoxliteError::InvalidState {
            id: self.id().to_string(),
            state: status.to_string(),
            operation: operation.into(),
        }
    }
}

fn poisoned() -> BoxliteError {
    BoxliteError::Internal("box state lock poisoned".into())
}

/// Waits until the process is gone (polling: it may not be our child).
async fn wait_gone(process: ProcessId) {
    while process.is_alive() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills the process if it is still the one recorded, and waits until it is gone.
async fn kill_gone(process: ProcessId) {
    if process.is_alive() {
        // SAFETY: kill(2) on a pid whose start time we just checked.
        unsafe { libc::kill(process.pid as libc::pid_t, libc::SIGKILL) };
        let _ = tokio::time::timeout(Duration::from_secs(10), wait_gone(process)).await;
    }
}

/// Notices a connection that ends without `stop` (the VM was killed, or another process
/// stopped the box) and marks the box stopped. Holds no strong reference to the box.
async fn watch_connection(inner: Weak<BoxInner>, conn: Weak<Connection>, client: AgentClient) {
    client.closed().await;
    let (Some(inner), Some(conn)) = (inner.upgrade(), conn.upgrade()) else {
        return;
    };
    let litebox = LiteBox { inner };
    let current = litebox.inner.state.lock().ok().and_then(|s| s.conn.clone());
    if current.is_some_and(|c| Arc::ptr_eq(&c, &conn)) {
        // Give the supervisor a moment to exit after its VM did.
        let _ = tokio::time::timeout(Duration::from_secs(2), wait_gone(conn.shim)).await;
        if !conn.shim.is_alive() {
            tracing::warn!(box_id = %litebox.id(), "the box's VM exited");
            litebox.mark_stopped();
        } else if let Ok(mut state) = litebox.inner.state.lock() {
            state.conn = None; // Reconnect on next use.
        }
    }
}

impl Drop for BoxInner {
    fn drop(&mut self) {
        // The last handle of a box this process started (not detached): it dies with us.
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let owned = state.conn.take().filter(|c| c.owned.is_some());
        if owned.is_some() {
            drop(owned);
            let _ = self
                .runtime
                .store
                .set_status(&self.record.id, BoxStatus::Stopped, None);
        }
        if std::mem::take(&mut state.counted) {
            self.runtime.metrics.box_stopped();
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
