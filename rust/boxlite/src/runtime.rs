//! The runtime: a home directory, the boxes recorded in it, shared counters.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use tokio::sync::{OnceCell, Semaphore, SemaphorePermit};

use crate::disks::{copy_clone_disk, create_overlay, BaseDiskStore};
use crate::error::{task_failed, BoxliteError, BoxliteResult, IoContext};
use crate::fsutil::{FileLock, LockMode};
use crate::ids::BoxID;
use crate::images::{ImageManager, OciLayout};
use crate::litebox::{BoxInfo, BoxInner, BoxStatus, Connection, Event, LiteBox};
use crate::metrics::{RuntimeMetrics, StageTimings};
use crate::options::{BoxOptions, BoxliteOptions};
use crate::shim::template::TemplateJob;
use crate::state::{BoxRecord, ProcessId, StateStore};
use crate::templates::{Template, Templates};
use crate::vm::{socket_dir, VmEnv};
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
    /// Connections to the boxes this runtime started without `detach`: they run until it
    /// closes (or this process ends), whether or not a handle is kept.
    owned: Mutex<HashMap<BoxID, Arc<Connection>>>,
    /// Memory templates; `None` when turned off.
    pub templates: Option<Templates>,
}

/// What a new box's first start does about templates.
#[derive(Debug)]
pub(crate) enum TemplatePlan {
    /// Start from this template.
    Use(Box<Template>),
    /// Boot cold, then make the template for the next box of this key.
    Make(Box<TemplateJob>),
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
                let engine_binds = if crate::vmm::jail::enabled() {
                    let binary = engine.binary().to_path_buf();
                    tokio::task::spawn_blocking(move || crate::vmm::jail::engine_binds(&binary))
                        .await
                        .map_err(|e| task_failed("engine jail", e))??
                } else {
                    Vec::new()
                };
                let resume_kernel = bundle
                    .resume_kernel(&self.options.home_dir.join("boot"))
                    .unwrap_or_else(|e| {
                        tracing::warn!("restored boxes keep the full kernel in memory: {e}");
                        bundle.kernel.clone()
                    });
                Ok::<_, BoxliteError>(VmEnv {
                    qemu: engine.binary().to_path_buf(),
                    engine_binds,
                    resume_kernel,
                    bundle,
                    shim,
                    accel: choice.accel,
                    boot_timeout: self.options.boot_timeout,
                })
            })
            .await
            .cloned()
    }

    /// What a new box of this shape may start from. Templates only make boxes start faster,
    /// so a failure here is logged and the box boots cold.
    async fn template_plan(
        &self,
        litebox: &LiteBox,
        image: &str,
        base_disk: &Path,
    ) -> Option<TemplatePlan> {
        let templates = self.templates.as_ref()?;
        // vhost-user-fs cannot be migrated: a box with volumes always boots cold.
        if !litebox.options().volumes.is_empty() {
            return None;
        }
        let env = self.vm_env().await.ok()?;
        let vm = litebox.vm_config(&env).ok()?;
        let base_size = std::fs::metadata(base_disk).ok()?.len();
        let disk_size = litebox
            .options()
            .disk_size
            .map_or(base_size, |size| size.as_u64().max(base_size));
        let inputs = {
            let (env, vm, image, base_disk) = (
                env.clone(),
                vm.clone(),
                image.to_string(),
                base_disk.to_path_buf(),
            );
            let templates_root = templates.store().root().to_path_buf();
            tokio::task::spawn_blocking(move || {
                Templates::key_inputs(&templates_root, &env, &vm, &image, &base_disk, disk_size)
            })
            .await
            .ok()?
        };
        let inputs = match inputs {
            Ok(inputs) => inputs,
            Err(e) => {
                tracing::warn!(error = %e, "cannot compute the template key; booting cold");
                return None;
            }
        };
        match templates.usable(&inputs.key()) {
            Some(template) => Some(TemplatePlan::Use(Box::new(template))),
            None => Some(TemplatePlan::Make(Box::new(TemplateJob {
                qemu: env.qemu.clone(),
                home: self.options.home_dir.clone(),
                inputs,
                vm,
                boot_timeout: env.boot_timeout,
            }))),
        }
    }

    /// Takes a template out of service (it failed to start a box).
    pub fn retire_template(&self, key: &str) {
        if let Some(templates) = &self.templates {
            templates.retire(key);
        }
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

    /// Holds off image GC and layer sweeps while disks are frozen or made.
    pub async fn hold_images(&self) -> BoxliteResult<FileLock> {
        self.images.hold().await
    }

    /// Removes the frozen disk layers nothing uses any more, unless a GC or a disk operation
    /// is under way (image GC catches them later).
    pub fn sweep_layers(&self) {
        if let Ok(Some(_exclusive)) = self.images.try_exclusive() {
            let freed = crate::disks::layers::sweep(&self.options.home_dir, &[]);
            if freed > 0 {
                tracing::debug!(bytes = freed, "unused disk layers removed");
            }
        }
    }

    fn lock_path(&self, id: &BoxID) -> PathBuf {
        self.box_dir(id).join("lock")
    }

    /// The cross-process lock of one box (held during create, start, stop and remove);
    /// `BoxNotFound` once the box has been removed.
    pub async fn lock_box(&self, id: &BoxID) -> BoxliteResult<FileLock> {
        if !self.box_dir(id).is_dir() {
            return Err(BoxliteError::BoxNotFound { id: id.to_string() });
        }
        FileLock::acquire(self.lock_path(id), LockMode::Exclusive).await
    }

    pub fn forget(&self, id: &BoxID) {
        if let Ok(mut live) = self.live.lock() {
            live.remove(id);
        }
    }

    pub fn keep_owned(&self, id: BoxID, conn: Arc<Connection>) {
        if let Ok(mut owned) = self.owned.lock() {
            owned.insert(id, conn);
        }
    }

    pub fn release_owned(&self, id: &BoxID) {
        let released = self.owned.lock().ok().and_then(|mut o| o.remove(id));
        drop(released);
    }

    pub fn box_dir(&self, id: &BoxID) -> PathBuf {
        self.options.home_dir.join("boxes").join(id.to_string())
    }

    /// Where a box's sockets live (its directory unless that path is too long).
    pub fn socket_dir(&self, id: &BoxID) -> BoxliteResult<PathBuf> {
        socket_dir(&self.box_dir(id), &id.to_string())
    }

    /// Where a box's supervisor listens.
    pub fn shim_socket(&self, id: &BoxID) -> BoxliteResult<PathBuf> {
        Ok(self.socket_dir(id)?.join("shim.sock"))
    }

    /// Brings a record's status in line with what is really running: a supervisor that died
    /// means the engine is gone; a start whose starter died (its lock is free) failed; a
    /// creation whose creator died is rolled back (`BoxNotFound`).
    pub fn reconcile(&self, record: BoxRecord) -> BoxliteResult<BoxRecord> {
        let lock_held = || FileLock::is_held(&self.lock_path(&record.id));
        if record.creator.is_some_and(|c| !c.is_alive()) && !lock_held() {
            tracing::info!(box_id = %record.id, "rolling back a creation whose creator died");
            if let Some(shim) = record.shim.filter(ProcessId::is_alive) {
                kill_now(shim);
            }
            self.store.delete(&record.id)?;
            let _ = std::fs::remove_dir_all(self.box_dir(&record.id));
            return Err(BoxliteError::BoxNotFound {
                id: record.id.to_string(),
            });
        }
        let supervisor_alive = record.shim.is_some_and(|s| s.is_alive());
        // The engine dies first; its supervisor follows a moment later.
        let engine_dead = record
            .engine_pid
            .is_some_and(|pid| crate::sys::process_start(pid).is_none_or(|(_, zombie)| zombie));
        let gone = match record.status {
            BoxStatus::Running | BoxStatus::Stopping => !supervisor_alive || engine_dead,
            BoxStatus::Starting => !lock_held(),
            _ => false,
        };
        if !gone {
            return Ok(record);
        }
        if let Some(shim) = record.shim.filter(|_| supervisor_alive) {
            // A start whose starter died (its detached supervisor has no one to serve), or a
            // supervisor about to follow its dead engine.
            kill_now(shim);
        }
        let reported = match record.shim {
            Some(shim) => self.store.engine_gone(&record.id, shim)?,
            None => self.store.apply(&record.id, Event::EngineGone, None)?,
        };
        let status = reported.unwrap_or_else(|| record.status.after_supervisor_died());
        Ok(BoxRecord {
            status,
            shim: None,
            engine_pid: None,
            ports: Vec::new(),
            ..record
        })
    }

    fn record_or_not_found(&self, id_or_name: &str) -> BoxliteResult<BoxRecord> {
        let record = self
            .store
            .find(id_or_name)?
            .ok_or_else(|| BoxliteError::BoxNotFound {
                id: id_or_name.to_owned(),
            })?;
        self.reconcile(record)
    }
}

impl Drop for RuntimeShared {
    fn drop(&mut self) {
        // The boxes this runtime started without `detach` end with it.
        let owned: Vec<(BoxID, Arc<Connection>)> = self
            .owned
            .lock()
            .map(|mut o| o.drain().collect())
            .unwrap_or_default();
        for (id, conn) in owned {
            let shim = conn.shim;
            drop(conn);
            let _ = self.store.engine_gone(&id, shim);
        }
    }
}

fn kill_now(process: ProcessId) {
    // SAFETY: kill(2) on a pid whose start time the caller just checked.
    unsafe { libc::kill(process.pid as libc::pid_t, libc::SIGKILL) };
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
        let store = StateStore::open(home)?;
        let boot_slots = Semaphore::new(options.max_concurrent_boots.max(1));
        let templates = if options.templates {
            Some(Templates::open(home)?)
        } else {
            None
        };
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
                owned: Mutex::new(HashMap::new()),
                templates,
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
            let Ok(now) = shared.reconcile(record.clone()) else {
                continue; // rolled back
            };
            let ended = record.status.has_engine() && !now.status.has_engine();
            if ended && now.options.auto_remove && !FileLock::is_held(&shared.lock_path(&now.id)) {
                shared.store.delete(&now.id)?;
                let _ = std::fs::remove_dir_all(shared.box_dir(&now.id));
            }
        }
        crate::litebox::clean_ingest(&shared.options.home_dir);
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
    /// stage fails, nothing of the box is left behind; if this process dies half-way, the
    /// next runtime to open the home rolls the creation back.
    pub async fn create(&self, mut options: BoxOptions) -> BoxliteResult<LiteBox> {
        options.validate()?;
        options.canonicalize_volumes()?;
        let result = self.create_validated(options).await;
        match &result {
            Ok(_) => self.shared.metrics.box_created(),
            Err(_) => self.shared.metrics.box_failed(),
        }
        result
    }

    async fn create_validated(&self, options: BoxOptions) -> BoxliteResult<LiteBox> {
        let started = Instant::now();
        let shared = &self.shared;
        if let Some(name) = &options.name {
            // A record left by a creator that died is rolled back here, freeing its name.
            if let Some(record) = shared.store.find(name)? {
                if shared.reconcile(record).is_ok() {
                    return Err(BoxliteError::AlreadyExists {
                        what: "a box",
                        name: name.clone(),
                    });
                }
            }
        }
        let mut stages = StageTimings::default();

        let stage = Instant::now();
        let id = BoxID::new();
        let dir = shared.box_dir(&id);
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let mut cleanup = HalfCreated {
            armed: true,
            shared,
            id,
        };
        let lock = shared.lock_box(&id).await?;
        // The name is reserved before the slow stages; the record is complete only when the
        // box has started.
        let record = BoxRecord::creating(id, options);
        if let Err(e) = shared.store.insert(&record) {
            cleanup.armed = false;
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        stages.filesystem_setup_ms = Some(stage.elapsed().as_millis());

        let stage = Instant::now();
        let options = &record.options;
        // Holds off image GC until the overlay references the base disk.
        let images_hold = shared.images.hold().await?;
        let (layout, resolved, image_name) = match (&options.rootfs_path, &options.image) {
            (Some(path), _) => {
                let layout = OciLayout::open(path)?;
                let resolved = {
                    let layout = layout.clone();
                    tokio::task::spawn_blocking(move || layout.resolve(None))
                        .await
                        .map_err(|e| task_failed("image", e))??
                };
                (layout, resolved, path.display().to_string())
            }
            // A cached image is used without any network call; a missing one is pulled.
            (None, Some(reference)) => {
                let image = shared.images.prepare(reference).await?;
                (image.layout, image.resolved, image.reference)
            }
            (None, None) => {
                return Err(BoxliteError::invalid(
                    "rootfs_path",
                    "give an OCI image layout directory (rootfs_path) or an image",
                ))
            }
        };
        stages.image_prepare_ms = Some(stage.elapsed().as_millis());

        let stage = Instant::now();
        let base = shared.disks.ensure(&layout, &resolved).await?;
        shared
            .store
            .set_image(&id, &image_name, &base.config, &base.path)?;
        let mut record = record;
        record.image = image_name;
        record.image_config = base.config;
        record.base_disk = base.path.clone();
        let litebox = LiteBox::from_record(record, shared.clone());
        let plan = shared
            .template_plan(&litebox, &resolved.manifest_digest.to_string(), &base.path)
            .await;
        let disk = dir.join("disk.qcow2");
        let template = match &plan {
            Some(TemplatePlan::Use(template)) => {
                match copy_clone_disk(&template.clone_disk(), &disk) {
                    Ok(()) => Some(template),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot put a box disk on its template; booting cold");
                        None
                    }
                }
            }
            _ => None,
        };
        if template.is_none() {
            let _ = std::fs::remove_file(&disk);
            create_overlay(&base.path, &disk, litebox.options().disk_size).await?;
        }
        drop(images_hold);
        stages.guest_rootfs_ms = Some(stage.elapsed().as_millis());

        litebox.set_stages(stages);
        drop(lock);
        litebox.start_from(template.map(|t| &**t)).await?;
        shared.store.finish_creation(&id)?;
        if let Some(TemplatePlan::Make(job)) = &plan {
            if let (Some(templates), Ok(env)) = (&shared.templates, shared.vm_env().await) {
                templates.build_in_background(&env.shim, job);
            }
        }
        litebox.record_create_total(started.elapsed().as_millis());
        cleanup.armed = false;
        self.remember(&litebox);
        Ok(litebox)
    }

    fn remember(&self, litebox: &LiteBox) {
        if let Ok(mut live) = self.shared.live.lock() {
            live.retain(|_, weak| weak.strong_count() > 0);
            live.insert(litebox.id(), litebox.downgrade());
        }
    }

    /// A box by id or name, from this process or any other sharing the home, or `None`. A
    /// running box started elsewhere is reattached on first use.
    pub fn get(&self, id_or_name: &str) -> BoxliteResult<Option<LiteBox>> {
        match self.shared.record_or_not_found(id_or_name) {
            Ok(record) => Ok(Some(self.handle(record))),
            Err(BoxliteError::BoxNotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn handle(&self, record: BoxRecord) -> LiteBox {
        if let Some(existing) = self
            .shared
            .live
            .lock()
            .ok()
            .and_then(|live| live.get(&record.id).and_then(LiteBox::upgrade))
        {
            return existing;
        }
        let litebox = LiteBox::from_record(record, self.shared.clone());
        self.remember(&litebox);
        litebox
    }

    pub fn get_info(&self, id_or_name: &str) -> BoxliteResult<Option<BoxInfo>> {
        self.get(id_or_name)?.map(|b| b.try_info()).transpose()
    }

    /// Every box recorded in the home, oldest first.
    pub fn list_info(&self) -> BoxliteResult<Vec<BoxInfo>> {
        let records = self.shared.store.list()?;
        Ok(records
            .into_iter()
            .filter_map(|r| self.shared.reconcile(r).ok())
            .filter_map(|r| self.handle(r).try_info().ok())
            .collect())
    }

    /// Deletes a box; a running one needs `force` (it is stopped first). `BoxNotFound` if
    /// there is no such box.
    pub async fn remove(&self, id_or_name: &str, force: bool) -> BoxliteResult<()> {
        let record = self.shared.record_or_not_found(id_or_name)?;
        self.handle(record).remove(force).await
    }

    /// Makes a stopped box from a `.boxlite` archive written by [`LiteBox::export`], named
    /// `name` (else unnamed). The archive is checked before anything of it is used; a bad one
    /// is `BadArchive` and leaves nothing behind. `untrusted` also refuses host-only options.
    pub async fn import_box(
        &self,
        archive: &Path,
        name: Option<String>,
        untrusted: bool,
    ) -> BoxliteResult<LiteBox> {
        let litebox = crate::litebox::import_box(&self.shared, archive, name, untrusted).await?;
        self.remember(&litebox);
        Ok(litebox)
    }

    /// Boxes with a live handle in this process, and those this runtime started and keeps.
    pub fn boxes(&self) -> Vec<LiteBox> {
        let mut ids: Vec<BoxID> = self
            .shared
            .owned
            .lock()
            .map(|o| o.keys().copied().collect())
            .unwrap_or_default();
        if let Ok(live) = self.shared.live.lock() {
            ids.extend(
                live.iter()
                    .filter(|(_, w)| w.strong_count() > 0)
                    .map(|(id, _)| *id),
            );
        }
        ids.sort();
        ids.dedup();
        ids.iter()
            .filter_map(|id| self.get(&id.to_string()).ok().flatten())
            .collect()
    }

    /// Stops every box this runtime started or handles, concurrently.
    pub async fn close(&self) -> BoxliteResult<()> {
        let stops = self
            .boxes()
            .into_iter()
            .map(|b| async move { b.stop().await });
        let results = futures_util::future::join_all(stops).await;
        if let Some(templates) = &self.shared.templates {
            let limit = self.shared.options.boot_timeout.as_duration() + TEMPLATE_SAVE_GRACE;
            templates.wait_for_builds(limit).await;
        }
        results.into_iter().collect()
    }
}

/// Beyond its boot, how long a template maker may take to save and seal its files.
const TEMPLATE_SAVE_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Undoes a creation that did not finish: record, directory, and anything running.
struct HalfCreated<'a> {
    armed: bool,
    shared: &'a RuntimeShared,
    id: BoxID,
}

impl Drop for HalfCreated<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.release_owned(&self.id);
            let _ = self.shared.store.delete(&self.id);
            let _ = std::fs::remove_dir_all(self.shared.box_dir(&self.id));
        }
    }
}
