//! The runtime: a home directory, the boxes recorded in it, shared counters.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use tokio::sync::{OnceCell, Semaphore, SemaphorePermit};

use crate::disks::{create_overlay, BaseDiskStore};
use crate::error::{BoxliteError, BoxliteResult, IoContext};
use crate::fsutil::{FileLock, LockMode};
use crate::ids::BoxID;
use crate::images::{ImageManager, OciLayout};
use crate::litebox::{BoxInfo, BoxInner, BoxStatus, LiteBox};
use crate::metrics::{RuntimeMetrics, StageTimings};
use crate::options::{BoxOptions, BoxliteOptions};
use crate::state::{now_ms, BoxRecord, StateStore};
use crate::vm::VmEnv;
use crate::vmm::{accel, qemu::QemuEngine, Accel, AccelChoice, GuestBundle};

/// The entry point: makes boxes and finds them again. Clones share one runtime; several
/// runtimes (in one process or many) may share a home directory.
#[derive(Debug, Clone)]
pub struct BoxliteRuntime {
    shared: Arc<RuntimeShared>,
}

/// What every box of a runtime shares.
#[derive(Debug)]
pub(crate) struct RuntimeShared {
    pub options: BoxliteOptions,
    pub metrics: RuntimeMetrics,
    pub store: StateStore,
    vm_env: OnceCell<VmEnv>,
    disks: BaseDiskStore,
    images: ImageManager,
    boot_slots: Semaphore,
    /// Boxes with a live handle in this process, so `get` returns the same box.
    live: Mutex<HashMap<BoxID, Weak<BoxInner>>>,
}

impl RuntimeShared {
    /// The VM environment, looked up at the first boot: engine, bundle, shim, accelerator.
    pub async fn vm_env(&self) -> BoxliteResult<VmEnv> {
        self.vm_env
            .get_or_try_init(|| async {
                let engine = QemuEngine::locate()?;
                let bundle =
                    GuestBundle::locate(self.options.guest_dir.as_deref(), &self.options.home_dir)?;
                let shim = crate::shim::locate_shim(self.options.shim_path.as_deref())?;
                let choice = accel::choose()?;
                Ok::<_, BoxliteError>(VmEnv {
                    qemu: engine.binary().to_path_buf(),
                    engine: Arc::new(engine),
                    bundle,
                    shim,
                    accel: choice.accel,
                    boot_timeout: self.options.boot_timeout,
                    stop_timeout: self.options.stop_timeout,
                })
            })
            .await
            .cloned()
    }

    /// The accelerator boxes of this runtime use (TCG if it cannot be determined).
    pub fn accel(&self) -> Accel {
        self.vm_env
            .get()
            .map(|e| e.accel)
            .or_else(|| accel::choose().ok().map(|c| c.accel))
            .unwrap_or(Accel::Tcg)
    }

    /// Waits for one of the concurrent-boot slots.
    pub async fn boot_slot(&self) -> BoxliteResult<SemaphorePermit<'_>> {
        self.boot_slots
            .acquire()
            .await
            .map_err(|_| BoxliteError::Internal("boot slots closed".into()))
    }

    /// The cross-process lock of one box (held during create, start, stop and remove).
    pub async fn lock_box(&self, dir: &Path) -> BoxliteResult<FileLock> {
        FileLock::acquire(dir.join("lock"), LockMode::Exclusive).await
    }

    pub fn forget(&self, id: &BoxID) {
        if let Ok(mut live) = self.live.lock() {
            live.remove(id);
        }
    }

    fn box_dir(&self, id: &BoxID) -> PathBuf {
        self.options.home_dir.join("boxes").join(id.to_string())
    }
}

impl BoxliteRuntime {
    /// Opens (creating if needed) the runtime home and recovers from crashes: boxes whose
    /// supervisor is gone are marked stopped, half-created boxes are removed. The engine and
    /// guest bundle are looked up at the first boot.
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
        let images = ImageManager::open(home, &options.image_registries)?;
        let store = StateStore::open(&home.join("boxlite.db"))?;
        let boot_slots = Semaphore::new(options.max_concurrent_boots.max(1));
        let runtime = Self {
            shared: Arc::new(RuntimeShared {
                options,
                metrics: RuntimeMetrics::default(),
                store,
                vm_env: OnceCell::new(),
                disks,
                images,
                boot_slots,
                live: Mutex::new(HashMap::new()),
            }),
        };
        runtime.recover()?;
        Ok(runtime)
    }

    /// Reconciles the database with what is really running, after any crash.
    fn recover(&self) -> BoxliteResult<()> {
        let shared = &self.shared;
        let records = shared.store.list()?;
        for record in &records {
            let alive = record.shim.is_some_and(|p| p.is_alive());
            if matches!(
                record.status,
                BoxStatus::Running | BoxStatus::Starting | BoxStatus::Stopping
            ) && !alive
            {
                tracing::info!(box_id = %record.id, "the box's supervisor is gone; marking it stopped");
                shared
                    .store
                    .mark_if(&record.id, record.status, BoxStatus::Stopped)?;
                if record.options.auto_remove {
                    shared.store.delete(&record.id)?;
                    let _ = std::fs::remove_dir_all(shared.box_dir(&record.id));
                }
            }
        }
        // Directories without a record are creations that died half-way (their lock is free).
        let known: Vec<String> = records.iter().map(|r| r.id.to_string()).collect();
        if let Ok(entries) = std::fs::read_dir(shared.options.home_dir.join("boxes")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !known.contains(&name)
                    && BoxID::is_valid(&name)
                    && !FileLock::is_held(&entry.path().join("lock"))
                {
                    tracing::info!(dir = %entry.path().display(), "removing a half-created box");
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(())
    }

    pub fn home(&self) -> &Path {
        &self.shared.options.home_dir
    }

    pub fn options(&self) -> &BoxliteOptions {
        &self.shared.options
    }

    /// The images of this home: pull, list, get, remove, gc.
    pub fn images(&self) -> ImageManager {
        self.shared.images.clone()
    }

    /// Runtime-wide counters (shared with every box of this runtime).
    pub fn metrics(&self) -> RuntimeMetrics {
        self.shared.metrics.clone()
    }

    /// The accelerator boxes will use and why (probed once per process).
    pub fn accelerator() -> BoxliteResult<AccelChoice> {
        accel::choose()
    }

    /// The guest bundle boxes will boot.
    pub fn guest_bundle(&self) -> BoxliteResult<GuestBundle> {
        GuestBundle::locate(self.shared.options.guest_dir.as_deref(), self.home())
    }

    /// Creates a box from `options` and boots it; returns once its agent is ready. If any
    /// stage fails, nothing of the box is left behind.
    pub async fn create(&self, options: BoxOptions) -> BoxliteResult<LiteBox> {
        options.validate()?;
        let result = self.create_validated(options).await;
        match &result {
            Ok(_) => self.shared.metrics.box_created(),
            Err(_) => self.shared.metrics.box_failed(),
        }
        result
    }

    async fn create_validated(&self, options: BoxOptions) -> BoxliteResult<LiteBox> {
        let started = Instant::now();
        if let Some(name) = &options.name {
            if self.shared.store.find(name)?.is_some() {
                return Err(BoxliteError::invalid(
                    "name",
                    format!("a box named {name:?} already exists"),
                ));
            }
        }
        let mut stages = StageTimings::default();

        let stage = Instant::now();
        let id = BoxID::new();
        let dir = self.shared.box_dir(&id);
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let mut cleanup = HalfCreated {
            dir: Some(dir.clone()),
            shared: &self.shared,
            id,
        };
        let lock = self.shared.lock_box(&dir).await?;
        stages.filesystem_setup_ms = Some(stage.elapsed().as_millis());

        let stage = Instant::now();
        // Holds off image GC until the overlay references the base disk.
        let images_hold = self.shared.images.hold().await?;
        let (layout, resolved, image_name) = match (&options.rootfs_path, &options.image) {
            (Some(path), _) => {
                let layout = OciLayout::open(path)?;
                let resolved = {
                    let layout = layout.clone();
                    tokio::task::spawn_blocking(move || layout.resolve(None))
                        .await
                        .map_err(|e| BoxliteError::Internal(format!("image task failed: {e}")))??
                };
                (layout, resolved, path.display().to_string())
            }
            // A cached image is used without any network call; a missing one is pulled.
            (None, Some(reference)) => {
                let image = self.shared.images.prepare(reference).await?;
                (image.layout, image.resolved, image.reference)
            }
            (None, None) => {
                return Err(BoxliteError::invalid(
                    "rootfs_path",
                    "give an OCI image layout directory",
                ))
            }
        };
        stages.image_prepare_ms = Some(stage.elapsed().as_millis());

        let stage = Instant::now();
        let env = self.shared.vm_env().await?;
        let base = {
            let _slot = self.shared.boot_slot().await?;
            self.shared.disks.ensure(&layout, &resolved, &env).await?
        };
        create_overlay(&base.path, &dir.join("disk.qcow2"), options.disk_size).await?;
        drop(images_hold);
        stages.guest_rootfs_ms = Some(stage.elapsed().as_millis());

        let record = BoxRecord {
            id,
            name: options.name.clone(),
            options,
            image: image_name,
            image_config: base.config,
            base_disk: base.path,
            status: BoxStatus::Configured,
            shim: None,
            engine_pid: None,
            created_at_ms: now_ms(),
            started_at_ms: None,
        };
        self.shared.store.insert(&record)?;
        let litebox = LiteBox::from_record(record, dir, self.shared.clone());
        litebox.set_stages(stages);
        drop(lock);
        litebox.start().await?;
        litebox.record_create_total(started.elapsed().as_millis());
        cleanup.dir = None;
        self.remember(&litebox);
        Ok(litebox)
    }

    fn remember(&self, litebox: &LiteBox) {
        if let Ok(mut live) = self.shared.live.lock() {
            live.retain(|_, weak| weak.strong_count() > 0);
            live.insert(litebox.id(), litebox.downgrade());
        }
    }

    /// A box by id or name, from this process or any other sharing the home. A running box
    /// started elsewhere is reattached on first use.
    pub fn get(&self, id_or_name: &str) -> BoxliteResult<LiteBox> {
        let record =
            self.shared
                .store
                .find(id_or_name)?
                .ok_or_else(|| BoxliteError::BoxNotFound {
                    id: id_or_name.to_owned(),
                })?;
        if let Some(existing) = self
            .shared
            .live
            .lock()
            .ok()
            .and_then(|live| live.get(&record.id).and_then(LiteBox::upgrade))
        {
            return Ok(existing);
        }
        let dir = self.shared.box_dir(&record.id);
        let litebox = LiteBox::from_record(record, dir, self.shared.clone());
        self.remember(&litebox);
        Ok(litebox)
    }

    pub fn get_info(&self, id_or_name: &str) -> BoxliteResult<BoxInfo> {
        Ok(self.get(id_or_name)?.info())
    }

    /// Every box recorded in the home, oldest first.
    pub fn list_info(&self) -> BoxliteResult<Vec<BoxInfo>> {
        let records = self.shared.store.list()?;
        Ok(records
            .iter()
            .filter_map(|r| self.get(&r.id.to_string()).ok())
            .map(|b| b.info())
            .collect())
    }

    /// Deletes a box; a running one needs `force` (it is stopped first).
    pub async fn remove(&self, id_or_name: &str, force: bool) -> BoxliteResult<()> {
        self.get(id_or_name)?.remove(force).await
    }

    /// Boxes with a live handle in this process.
    pub fn boxes(&self) -> Vec<LiteBox> {
        self.shared
            .live
            .lock()
            .map(|live| live.values().filter_map(LiteBox::upgrade).collect())
            .unwrap_or_default()
    }
}

/// Undoes a creation that did not finish: record, directory, and anything running.
struct HalfCreated<'a> {
    dir: Option<PathBuf>,
    shared: &'a RuntimeShared,
    id: BoxID,
}

impl Drop for HalfCreated<'_> {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = self.shared.store.delete(&self.id);
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
