//! The runtime: a home directory, the boxes made from it, shared counters.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::OnceCell;

use crate::disks::{create_overlay, BaseDiskStore};
use crate::error::{BoxliteError, BoxliteResult, IoContext};
use crate::ids::BoxID;
use crate::images::OciLayout;
use crate::litebox::LiteBox;
use crate::metrics::{RuntimeMetrics, StageTimings};
use crate::options::{BoxOptions, BoxliteOptions};
use crate::vm::VmEnv;
use crate::vmm::{accel, qemu::QemuEngine, AccelChoice, GuestBundle};

/// The entry point: makes boxes. Clones share one runtime.
#[derive(Debug, Clone)]
pub struct BoxliteRuntime {
    inner: Arc<RuntimeInner>,
}

#[derive(Debug)]
struct RuntimeInner {
    options: BoxliteOptions,
    metrics: RuntimeMetrics,
    vm_env: OnceCell<VmEnv>,
    disks: BaseDiskStore,
    boxes: Mutex<Vec<LiteBox>>,
}

impl BoxliteRuntime {
    /// Opens (creating if needed) the runtime home. The engine and guest bundle are looked
    /// up at the first box, so a runtime can be inspected on a host that cannot run boxes.
    pub fn new(options: BoxliteOptions) -> BoxliteResult<Self> {
        let home = &options.home_dir;
        if home.as_os_str().is_empty() {
            return Err(BoxliteError::invalid("home_dir", "must not be empty"));
        }
        if home.exists() && !home.is_dir() {
            return Err(BoxliteError::invalid(
                "home_dir",
                format!("{} is not a directory", home.display()),
            ));
        }
        std::fs::create_dir_all(home.join("boxes"))
            .ctx(|| format!("creating {}", home.display()))?;
        let disks = BaseDiskStore::new(&home.join("images"))?;
        Ok(Self {
            inner: Arc::new(RuntimeInner {
                options,
                metrics: RuntimeMetrics::default(),
                vm_env: OnceCell::new(),
                disks,
                boxes: Mutex::new(Vec::new()),
            }),
        })
    }

    pub fn home(&self) -> &Path {
        &self.inner.options.home_dir
    }

    pub fn options(&self) -> &BoxliteOptions {
        &self.inner.options
    }

    /// Runtime-wide counters (shared with every box of this runtime).
    pub fn metrics(&self) -> RuntimeMetrics {
        self.inner.metrics.clone()
    }

    /// The accelerator boxes will use and why (probed once per process).
    pub fn accelerator() -> BoxliteResult<AccelChoice> {
        accel::choose()
    }

    /// The guest bundle boxes will boot.
    pub fn guest_bundle(&self) -> BoxliteResult<GuestBundle> {
        GuestBundle::locate(self.inner.options.guest_dir.as_deref(), self.home())
    }

    /// Creates a box from `options` and boots it; returns once its agent is ready.
    pub async fn create(&self, options: BoxOptions) -> BoxliteResult<LiteBox> {
        options.validate()?;
        let result = self.create_validated(options).await;
        match &result {
            Ok(_) => self.inner.metrics.box_created(),
            Err(_) => self.inner.metrics.box_failed(),
        }
        result
    }

    async fn create_validated(&self, options: BoxOptions) -> BoxliteResult<LiteBox> {
        let started = Instant::now();
        if let Some(name) = &options.name {
            if self.boxes().iter().any(|b| b.name() == Some(name.as_str())) {
                return Err(BoxliteError::invalid(
                    "name",
                    format!("a box named {name:?} already exists"),
                ));
            }
        }
        let mut stages = StageTimings::default();

        let stage = Instant::now();
        let id = BoxID::new();
        let dir = self.home().join("boxes").join(id.to_string());
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let cleanup = RemoveOnDrop(Some(dir.clone()));
        stages.filesystem_setup_ms = Some(stage.elapsed().as_millis());

        let stage = Instant::now();
        let (layout, image_name) = match (&options.rootfs_path, &options.image) {
            (Some(path), _) => (OciLayout::open(path)?, path.display().to_string()),
            (None, Some(reference)) => {
                return Err(BoxliteError::Unsupported(format!(
                    "pulling {reference:?} from a registry is not available yet; use rootfs_path with an OCI image layout"
                )))
            }
            (None, None) => return Err(BoxliteError::invalid("rootfs_path", "give an OCI image layout directory")),
        };
        let resolved = {
            let layout = layout.clone();
            tokio::task::spawn_blocking(move || layout.resolve(None))
                .await
                .map_err(|e| BoxliteError::Internal(format!("image task failed: {e}")))??
        };
        stages.image_prepare_ms = Some(stage.elapsed().as_millis());

        let stage = Instant::now();
        let env = self.vm_env().await?;
        let base = self.inner.disks.ensure(&layout, &resolved, &env).await?;
        let disk = dir.join("disk.qcow2");
        create_overlay(&base.path, &disk).await?;
        stages.guest_rootfs_ms = Some(stage.elapsed().as_millis());

        let litebox = LiteBox::new(
            id,
            options,
            image_name,
            base.config,
            dir,
            disk,
            env,
            self.inner.metrics.clone(),
            stages,
        );
        litebox.start().await?;
        litebox.record_create_total(started.elapsed().as_millis());
        std::mem::forget(cleanup);
        if let Ok(mut boxes) = self.inner.boxes.lock() {
            boxes.push(litebox.clone());
        }
        Ok(litebox)
    }

    /// The boxes this runtime created, newest last.
    pub fn boxes(&self) -> Vec<LiteBox> {
        self.inner
            .boxes
            .lock()
            .map(|b| b.clone())
            .unwrap_or_default()
    }

    /// Finds a box of this runtime by id or name.
    pub fn get(&self, id_or_name: &str) -> BoxliteResult<LiteBox> {
        self.boxes()
            .into_iter()
            .find(|b| {
                b.id().to_string().eq_ignore_ascii_case(id_or_name) || b.name() == Some(id_or_name)
            })
            .ok_or_else(|| BoxliteError::BoxNotFound {
                id: id_or_name.to_owned(),
            })
    }

    async fn vm_env(&self) -> BoxliteResult<VmEnv> {
        self.inner
            .vm_env
            .get_or_try_init(|| async {
                let engine = QemuEngine::locate()?;
                let bundle = self.guest_bundle()?;
                let choice = accel::choose()?;
                Ok::<_, BoxliteError>(VmEnv {
                    engine: Arc::new(engine),
                    bundle,
                    accel: choice.accel,
                    boot_timeout: self.inner.options.boot_timeout,
                    stop_timeout: self.inner.options.stop_timeout,
                })
            })
            .await
            .cloned()
    }
}

/// Removes a half-created box directory unless forgotten.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
