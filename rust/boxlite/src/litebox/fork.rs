//! Forking a running box: a new box that continues from the same memory and disk.
//!
//! The parent is paused (its RAM and devices saved, see `pause`), its disk frozen into a
//! read-only layer under `<home>/layers/` that both boxes' new overlays rest on, its saved
//! state shared with the child (a hard link), and both resume from it. The child is a box of
//! its own: its id, name, MAC address and hostname, fresh entropy and the clock are given to
//! its agent on resume; its processes and files are the parent's at the moment of the fork.

use std::path::Path;

use super::{BoxStatus, LiteBox};
use crate::disks::create_clone_overlay;
use crate::error::{BoxliteResult, IoContext};
use crate::ids::BoxID;
use crate::state::BoxRecord;

impl LiteBox {
    /// Makes a new running box from this running (or paused) one; both continue from the same
    /// memory, and writes in one are never seen by the other. The child publishes no ports
    /// (the parent keeps them) and has `name` (unique in the home), else none.
    pub async fn fork(&self, name: Option<String>) -> BoxliteResult<LiteBox> {
        if let Some(name) = &name {
            crate::options::validate_name(name)?;
        }
        match self.status() {
            BoxStatus::Running => self.pause().await?,
            BoxStatus::Paused => {}
            other => return Err(self.wrong_state(other, "fork")),
        }
        let child = self.fork_paused(name).await;
        // The parent goes on whatever happened to the child.
        let resumed = self.resume().await;
        let child = child?;
        resumed?;
        child.start().await.inspect_err(|_| {
            let _ = child.remove_files();
        })?;
        self.inner.runtime.store.finish_creation(&child.inner.id)?;
        Ok(child)
    }

    /// Splits the paused box's disk and saved state into a child box, paused too.
    async fn fork_paused(&self, name: Option<String>) -> BoxliteResult<LiteBox> {
        let runtime = &self.inner.runtime;
        let _serial = self.inner.lifecycle.lock().await;
        let _cross_process = runtime.lock_box(&self.inner.id).await?;
        let parent = self.record()?;
        if parent.status != BoxStatus::Paused {
            return Err(self.wrong_state(parent.status, "fork"));
        }
        let mut options = parent.options.clone();
        options.name = name;
        options.ports.clear();
        let id = BoxID::new();
        let dir = runtime.box_dir(&id);
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        // Paused from the start: its first start resumes the shared state.
        let child = self.insert_child(&parent, id, options, BoxStatus::Paused, &dir)?;
        match self.split_into(&child).await {
            Ok(()) => Ok(child),
            Err(e) => {
                let _ = child.remove_files();
                Err(e)
            }
        }
    }

    /// Records a box made from `parent` (its image and disk lineage, `options`, `status`) and
    /// returns its handle; on failure the child's directory `dir` is removed.
    pub(super) fn insert_child(
        &self,
        parent: &BoxRecord,
        id: BoxID,
        options: crate::options::BoxOptions,
        status: BoxStatus,
        dir: &Path,
    ) -> BoxliteResult<LiteBox> {
        let runtime = &self.inner.runtime;
        let record = BoxRecord {
            image: parent.image.clone(),
            image_config: parent.image_config.clone(),
            base_disk: parent.base_disk.clone(),
            status,
            ..BoxRecord::creating(id, options)
        };
        if let Err(e) = runtime.store.insert(&record) {
            let _ = std::fs::remove_dir_all(dir);
            return Err(e);
        }
        Ok(LiteBox::from_record(record, runtime.clone()))
    }

    /// Freezes this box's disk into a shared layer, puts a new overlay for each box on it, and
    /// gives the child the saved state.
    async fn split_into(&self, child: &LiteBox) -> BoxliteResult<()> {
        let layers = self.inner.runtime.options.home_dir.join("layers");
        std::fs::create_dir_all(&layers).ctx(|| format!("creating {}", layers.display()))?;
        // Layer sweeps and image GC must not see the layer before the overlays on it.
        let _hold = self.inner.runtime.hold_images().await?;
        let frozen = layers.join(format!("{}.qcow2", ulid::Ulid::new()));
        let disk = self.inner.dir.join("disk.qcow2");
        std::fs::rename(&disk, &frozen).ctx(|| format!("freezing {}", disk.display()))?;
        let overlays = async {
            set_read_only(&frozen)?;
            create_clone_overlay(&frozen, &disk).await?;
            create_clone_overlay(&frozen, &child.inner.dir.join("disk.qcow2")).await
        }
        .await;
        if let Err(e) = overlays {
            // Put the parent's disk back as it was.
            let _ = std::fs::remove_file(&disk);
            let _ = std::fs::rename(&frozen, &disk);
            return Err(e);
        }
        let state = self.saved_state_path();
        std::fs::hard_link(&state, child.saved_state_path())
            .or_else(|_| std::fs::copy(&state, child.saved_state_path()).map(|_| ()))
            .ctx(|| format!("sharing {}", state.display()))?;
        crate::fsutil::sync_dir(&layers);
        crate::fsutil::sync_dir(&self.inner.dir);
        crate::fsutil::sync_dir(&child.inner.dir);
        Ok(())
    }
}

fn set_read_only(path: &Path) -> BoxliteResult<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
        .ctx(|| format!("sealing {}", path.display()))
}
