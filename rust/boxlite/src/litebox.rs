//! One box: its disk, its VM while it runs, and the commands running in it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, SystemTime};

use boxlite_proto::Message;
use serde::Serialize;

use crate::error::{BoxliteError, BoxliteResult};
use crate::exec::{to_request, BoxCommand, ExecCounters, Execution};
use crate::ids::BoxID;
use crate::images::ImageConfig;
use crate::metrics::{BoxCounters, BoxMetrics, RuntimeMetrics, StageTimings};
use crate::options::BoxOptions;
use crate::vm::{launch, socket_path, RunningVm, VmEnv};
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
    /// The engine process, while the box runs.
    pub pid: Option<u32>,
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
    pub id: BoxID,
    pub options: BoxOptions,
    pub image_name: String,
    pub image: ImageConfig,
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub env: VmEnv,
    pub runtime_metrics: RuntimeMetrics,
    pub counters: Arc<BoxCounters>,
    pub stages: Mutex<StageTimings>,
    pub created_at: SystemTime,
    /// Serialises start and stop.
    lifecycle: tokio::sync::Mutex<()>,
    state: Mutex<RunState>,
}

#[derive(Debug)]
struct RunState {
    status: BoxStatus,
    vm: Option<Arc<RunningVm>>,
    started_at: Option<SystemTime>,
}

impl LiteBox {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: BoxID,
        options: BoxOptions,
        image_name: String,
        image: ImageConfig,
        dir: PathBuf,
        disk: PathBuf,
        env: VmEnv,
        runtime_metrics: RuntimeMetrics,
        stages: StageTimings,
    ) -> Self {
        Self {
            inner: Arc::new(BoxInner {
                id,
                options,
                image_name,
                image,
                dir,
                disk,
                env,
                runtime_metrics,
                counters: Arc::default(),
                stages: Mutex::new(stages),
                created_at: SystemTime::now(),
                lifecycle: tokio::sync::Mutex::new(()),
                state: Mutex::new(RunState {
                    status: BoxStatus::Configured,
                    vm: None,
                    started_at: None,
                }),
            }),
        }
    }

    pub fn id(&self) -> BoxID {
        self.inner.id
    }

    pub fn name(&self) -> Option<&str> {
        self.inner.options.name.as_deref()
    }

    pub fn status(&self) -> BoxStatus {
        self.inner
            .state
            .lock()
            .map(|s| s.status)
            .unwrap_or(BoxStatus::Failed)
    }

    pub fn info(&self) -> BoxInfo {
        let (status, started_at, pid) = match self.inner.state.lock() {
            Ok(s) => (
                s.status,
                s.started_at,
                s.vm.as_ref().map(|vm| vm.child.pid()),
            ),
            Err(_) => (BoxStatus::Failed, None, None),
        };
        BoxInfo {
            id: self.inner.id,
            name: self.inner.options.name.clone(),
            status,
            image: self.inner.image_name.clone(),
            cpus: self.inner.options.cpus,
            memory_mib: self.inner.options.memory.as_mib(),
            created_at: self.inner.created_at,
            started_at,
            pid,
            accel: self.inner.env.accel,
            hardware_isolated: self.inner.env.accel.is_hardware_isolated(),
        }
    }

    /// Counters and timings, with CPU and memory as the guest reports them while it runs.
    pub async fn metrics(&self) -> BoxliteResult<BoxMetrics> {
        let stages = self.inner.stages.lock().map(|s| *s).unwrap_or_default();
        let mut metrics = self.inner.counters.snapshot(&stages);
        if let Some(vm) = self.running_vm() {
            if let Ok(Message::MetricsReport(report)) = vm.client.request(Message::Metrics).await {
                metrics.cpu_percent = Some(report.cpu_percent);
                metrics.memory_bytes = Some(report.memory_used_bytes);
            }
        }
        Ok(metrics)
    }

    /// Boots the box's VM from its disk (state kept from earlier runs).
    pub async fn start(&self) -> BoxliteResult<()> {
        let _serial = self.inner.lifecycle.lock().await;
        let status = self.status();
        if !matches!(
            status,
            BoxStatus::Configured | BoxStatus::Stopped | BoxStatus::Failed
        ) {
            return Err(self.wrong_state(status, "start"));
        }
        self.set_status(BoxStatus::Starting);
        let started = Instant::now();
        let config = match self.vm_config() {
            Ok(config) => config,
            Err(e) => {
                self.set_status(BoxStatus::Failed);
                return Err(e);
            }
        };
        let box_config_ms = started.elapsed().as_millis();
        match launch(
            self.inner.env.engine.as_ref(),
            &config,
            self.inner.env.boot_timeout,
        )
        .await
        {
            Ok(vm) => {
                let vm = Arc::new(vm);
                if let Ok(mut stages) = self.inner.stages.lock() {
                    stages.box_config_ms = Some(box_config_ms);
                    stages.box_spawn_ms = Some(vm.spawn_ms);
                    stages.container_init_ms = Some(vm.boot_ms.saturating_sub(vm.spawn_ms));
                    stages.guest_boot_ms = Some(vm.boot_ms);
                }
                if let Ok(mut state) = self.inner.state.lock() {
                    state.status = BoxStatus::Running;
                    state.vm = Some(vm.clone());
                    state.started_at = Some(SystemTime::now());
                }
                self.inner.runtime_metrics.box_started();
                tokio::spawn(watch_engine(
                    Arc::downgrade(&self.inner),
                    Arc::downgrade(&vm),
                    vm.child.exited(),
                ));
                Ok(())
            }
            Err(e) => {
                self.set_status(BoxStatus::Failed);
                Err(e)
            }
        }
    }

    /// Syncs and powers the guest off (killing it after the stop timeout). Stopping a box
    /// that is not running is a no-op.
    pub async fn stop(&self) -> BoxliteResult<()> {
        let _serial = self.inner.lifecycle.lock().await;
        let vm = {
            let mut state = self.inner.state.lock().map_err(|_| poisoned())?;
            match state.vm.take() {
                Some(vm) => {
                    state.status = BoxStatus::Stopping;
                    vm
                }
                None => return Ok(()),
            }
        };
        vm.shutdown(self.inner.env.stop_timeout).await;
        mark_stopped(&self.inner);
        Ok(())
    }

    /// Starts `command` in the box.
    pub async fn exec(&self, command: BoxCommand) -> BoxliteResult<Execution> {
        command.validate()?;
        let vm = self
            .running_vm()
            .ok_or_else(|| self.wrong_state(self.status(), "exec in"))?;
        let box_options = &self.inner.options;
        let image = &self.inner.image;
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
            runtime: self.inner.runtime_metrics.clone(),
        };
        let channel = vm.client.open(Message::Exec(request))?;
        Execution::start(channel, &command, counters).await
    }

    /// Copies the host file or directory `src` into the box: to `dest` exactly, or into
    /// `dest` when it ends with `/`.
    pub async fn copy_in(&self, src: &std::path::Path, dest: &str) -> BoxliteResult<()> {
        let vm = self
            .running_vm()
            .ok_or_else(|| self.wrong_state(self.status(), "copy into"))?;
        crate::copy::copy_in(&vm.client, src, dest).await
    }

    /// Copies the box path `src` to the host: to `dest` exactly, or into `dest` when it is an
    /// existing directory or ends with `/`. Nothing lands outside `dest`.
    pub async fn copy_out(&self, src: &str, dest: &std::path::Path) -> BoxliteResult<()> {
        let vm = self
            .running_vm()
            .ok_or_else(|| self.wrong_state(self.status(), "copy out of"))?;
        crate::copy::copy_out(&vm.client, src, dest).await
    }

    pub(crate) fn record_create_total(&self, ms: u128) {
        if let Ok(mut stages) = self.inner.stages.lock() {
            stages.total_create_ms = Some(ms);
        }
    }

    /// The box directory on the host (disk, console log).
    pub fn dir(&self) -> &std::path::Path {
        &self.inner.dir
    }

    pub(crate) fn running_vm(&self) -> Option<Arc<RunningVm>> {
        let state = self.inner.state.lock().ok()?;
        match state.status {
            BoxStatus::Running => state.vm.clone(),
            _ => None,
        }
    }

    fn set_status(&self, status: BoxStatus) {
        if let Ok(mut state) = self.inner.state.lock() {
            state.status = status;
        }
    }

    fn wrong_state(&self, status: BoxStatus, operation: &str) -> BoxliteError {
        BoxliteError::InvalidState {
            id: self.inner.id.to_string(),
            state: status.to_string(),
            operation: operation.into(),
        }
    }

    fn vm_config(&self) -> BoxliteResult<VmConfig> {
        let env = &self.inner.env;
        let id = self.inner.id.to_string();
        Ok(VmConfig {
            name: format!("boxlite-{id}"),
            kernel: env.bundle.kernel.clone(),
            initramfs: env.bundle.initramfs.clone(),
            kernel_args: vec!["boxlite.root=/dev/vda".into(), "boxlite.mode=box".into()],
            cpus: self.inner.options.cpus,
            memory: self.inner.options.memory,
            disks: vec![DiskAttachment {
                path: self.inner.disk.clone(),
                format: DiskFormat::Qcow2,
                volatile: false,
            }],
            agent_socket: socket_path(self.inner.dir.join("agent.sock"), &id)?,
            console_log: self.inner.dir.join("console.log"),
            accel: env.accel,
        })
    }
}

fn poisoned() -> BoxliteError {
    BoxliteError::Internal("box state lock poisoned".into())
}

/// Marks the box stopped once, whoever notices first (stop, or the engine dying).
fn mark_stopped(inner: &BoxInner) {
    if let Ok(mut state) = inner.state.lock() {
        if matches!(state.status, BoxStatus::Running | BoxStatus::Stopping) {
            inner.runtime_metrics.box_stopped();
        }
        state.status = BoxStatus::Stopped;
        state.vm = None;
    }
}

/// Notices an engine that died on its own (crash, `kill -9`) and marks its box stopped.
/// It holds no strong reference, so dropping the box still kills the engine.
async fn watch_engine(
    inner: Weak<BoxInner>,
    vm: Weak<RunningVm>,
    exited: impl std::future::Future<Output = crate::process::ExitDescription>,
) {
    exited.await;
    let Some(vm) = vm.upgrade() else { return };
    vm.client.close("the VM engine exited");
    let Some(inner) = inner.upgrade() else { return };
    let still_current = inner
        .state
        .lock()
        .ok()
        .and_then(|s| s.vm.clone())
        .is_some_and(|current| Arc::ptr_eq(&current, &vm));
    if still_current {
        tracing::warn!(box_id = %inner.id, "the VM engine exited unexpectedly");
        mark_stopped(&inner);
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
