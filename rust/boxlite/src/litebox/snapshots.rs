//! Disk snapshots and clones of a stopped box, as qcow2 backing chains.
//!
//! A snapshot freezes the box's disk into an immutable layer (`disks::layers`) and the box
//! goes on writing a fresh overlay on it; the snapshot itself is `<box>/snapshots/<id>.qcow2`,
//! an empty overlay on that layer, so restoring is copying it over the box's disk (no data
//! copied, no tool run). A clone freezes the same way and gets its own overlay on the layer:
//! both share every unchanged block and neither sees the other's writes. Layers live in
//! `<home>/layers/` because a clone's chain may outlive the box it came from; they go when no
//! box disk or snapshot reaches them.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{BoxStatus, LiteBox};
use crate::disks::layers;
use crate::error::{BoxliteError, BoxliteResult, DiskError, IoContext};
use crate::fsutil::FileLock;
use crate::ids::BoxID;
use crate::state::{now_ms, BoxRecord, SnapshotRecord};

/// One snapshot of a box's disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    pub box_id: BoxID,
    pub name: String,
    pub created_at: SystemTime,
    /// Bytes the snapshot holds on the host (what changed since the layer below it).
    pub size_bytes: u64,
    /// The box disk's size as the guest sees it.
    pub container_disk_bytes: u64,
}

impl From<SnapshotRecord> for SnapshotInfo {
    fn from(r: SnapshotRecord) -> Self {
        Self {
            id: r.id,
            box_id: r.box_id,
            name: r.name,
            created_at: UNIX_EPOCH + Duration::from_millis(r.created_at_ms.max(0) as u64),
            size_bytes: r.size_bytes,
            container_disk_bytes: r.disk_bytes,
        }
    }
}

/// Snapshot names are labels, never paths (files are named by id), but the published package
/// refuses these, so do we.
pub(crate) fn validate_snapshot_name(name: &str) -> BoxliteResult<()> {
    let reason = if name.is_empty() {
        "cannot be empty"
    } else if name.starts_with('.') {
        "cannot start with '.'"
    } else if name.contains(['/', '\\', '\0']) {
        "cannot contain '/', '\\' or NUL"
    } else if name.len() > 255 || name.chars().any(char::is_control) {
        "must be at most 255 bytes without control characters"
    } else {
        return Ok(());
    };
    Err(BoxliteError::invalid(
        "name",
        format!("snapshot name {name:?} {reason}"),
    ))
}

impl LiteBox {
    pub(crate) fn disk_path(&self) -> PathBuf {
        self.inner.dir.join("disk.qcow2")
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.inner.dir.join("snapshots")
    }

    fn snapshot_file(&self, id: &str) -> PathBuf {
        self.snapshots_dir().join(format!("{id}.qcow2"))
    }

    /// Takes the box's locks and checks its engine is not running (a running disk changes
    /// under us; a paused box's saved memory belongs to its disk as it is).
    pub(crate) async fn lock_stopped(
        &self,
        operation: &str,
    ) -> BoxliteResult<(tokio::sync::MutexGuard<'_, ()>, FileLock, BoxRecord)> {
        let serial = self.inner.lifecycle.lock().await;
        let cross_process = self.inner.runtime.lock_box(&self.inner.id).await?;
        let record = self.record()?;
        if record.status.has_engine() || record.status == BoxStatus::Paused {
            return Err(BoxliteError::InvalidState {
                id: self.inner.id.to_string(),
                state: format!("{}; stop it first", record.status),
                operation: operation.into(),
            });
        }
        if !self.disk_path().is_file() {
            return Err(crate::error::StorageError::Damaged {
                path: self.disk_path().display().to_string(),
                reason: "the box has no disk".into(),
            }
            .into());
        }
        Ok((serial, cross_process, record))
    }

    /// Freezes the box's current disk as snapshot `name`.
    pub async fn create_snapshot(&self, name: &str) -> BoxliteResult<SnapshotInfo> {
        validate_snapshot_name(name)?;
        let (_serial, _lock, _) = self.lock_stopped("snapshot").await?;
        let store = &self.inner.runtime.store;
        if self.find_snapshot(name)?.is_some() {
            return Err(BoxliteError::AlreadyExists {
                what: "a snapshot",
                name: name.into(),
            });
        }
        let home = self.inner.runtime.options.home_dir.clone();
        let hold = self.inner.runtime.hold_images().await?;
        let disk = self.disk_path();
        let layer = layers::freeze_or_reuse(&home, &disk).await?;
        let id = ulid::Ulid::new().to_string();
        let dir = self.snapshots_dir();
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let size = layers::qcow2_virtual_size(&disk)?;
        let file = self.snapshot_file(&id);
        layers::create_overlay_on(&layer, &file, size).await?;
        drop(hold);
        crate::fsutil::sync_dir(&dir);
        let record = SnapshotRecord {
            id,
            box_id: self.inner.id,
            name: name.into(),
            created_at_ms: now_ms(),
            size_bytes: allocated_bytes(&layer),
            disk_bytes: size,
        };
        if let Err(e) = store.insert_snapshot(&record) {
            let _ = std::fs::remove_file(&file);
            return Err(e);
        }
        Ok(record.into())
    }

    /// The box's snapshots, oldest first. Records whose file is gone (a crash between the two)
    /// are dropped, as are files without a record.
    pub fn list_snapshots(&self) -> BoxliteResult<Vec<SnapshotInfo>> {
        let records = self.inner.runtime.store.snapshots(&self.inner.id)?;
        Ok(records
            .into_iter()
            .filter(|r| self.snapshot_file(&r.id).is_file())
            .map(SnapshotInfo::from)
            .collect())
    }

    pub fn get_snapshot(&self, name: &str) -> BoxliteResult<Option<SnapshotInfo>> {
        Ok(self.find_snapshot(name)?.map(SnapshotInfo::from))
    }

    fn find_snapshot(&self, name: &str) -> BoxliteResult<Option<SnapshotRecord>> {
        Ok(self
            .inner
            .runtime
            .store
            .snapshots(&self.inner.id)?
            .into_iter()
            .find(|r| r.name == name && self.snapshot_file(&r.id).is_file()))
    }

    fn snapshot_or_not_found(&self, name: &str) -> BoxliteResult<SnapshotRecord> {
        self.find_snapshot(name)?.ok_or_else(|| {
            DiskError::SnapshotNotFound {
                box_id: self.inner.id.to_string(),
                name: name.into(),
            }
            .into()
        })
    }

    /// Deletes snapshot `name`; the layers only it kept are freed.
    pub async fn remove_snapshot(&self, name: &str) -> BoxliteResult<()> {
        let _serial = self.inner.lifecycle.lock().await;
        let _lock = self.inner.runtime.lock_box(&self.inner.id).await?;
        let record = self.snapshot_or_not_found(name)?;
        self.inner.runtime.store.delete_snapshot(&record.id)?;
        let _ = std::fs::remove_file(self.snapshot_file(&record.id));
        self.inner.runtime.sweep_layers();
        Ok(())
    }

    /// Puts the box's disk back to snapshot `name` (what was written since is dropped,
    /// unless another snapshot holds it). The box must be stopped.
    pub async fn restore_snapshot(&self, name: &str) -> BoxliteResult<()> {
        let (_serial, _lock, _) = self.lock_stopped("restore a snapshot of").await?;
        let record = self.snapshot_or_not_found(name)?;
        let disk = self.disk_path();
        let next = disk.with_extension("qcow2.next");
        let guard = crate::fsutil::RemoveOnDrop(Some(next.clone()));
        copy_writable(&self.snapshot_file(&record.id), &next)?;
        std::fs::rename(&next, &disk).ctx(|| format!("replacing {}", disk.display()))?;
        guard.disarm();
        crate::fsutil::sync_dir(&self.inner.dir);
        self.inner.runtime.sweep_layers();
        Ok(())
    }

    /// A new stopped box with this one's options (and `name`), sharing its disk's blocks.
    pub async fn clone_box(&self, name: Option<String>) -> BoxliteResult<LiteBox> {
        if let Some(name) = &name {
            crate::options::validate_name(name)?;
        }
        let (_serial, _lock, parent) = self.lock_stopped("clone").await?;
        let runtime = &self.inner.runtime;
        let mut options = parent.options.clone();
        options.name = name;
        let id = BoxID::new();
        let dir = runtime.box_dir(&id);
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let _child_lock = runtime.lock_box(&id).await?;
        let child = self.insert_child(&parent, id, options, BoxStatus::Stopped, &dir)?;
        let made = async {
            let hold = runtime.hold_images().await?;
            let disk = self.disk_path();
            let layer = layers::freeze_or_reuse(&runtime.options.home_dir, &disk).await?;
            let size = layers::qcow2_virtual_size(&disk)?;
            layers::create_overlay_on(&layer, &child.disk_path(), size).await?;
            drop(hold);
            crate::fsutil::sync_dir(&dir);
            runtime.store.finish_creation(&id)
        }
        .await;
        if let Err(e) = made {
            let _ = child.remove_files();
            return Err(e);
        }
        Ok(child)
    }
}

/// A copy of the small qcow2 file `from` at `to`, owner-writable and synced.
fn copy_writable(from: &Path, to: &Path) -> BoxliteResult<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::copy(from, to).ctx(|| format!("copying {} to {}", from.display(), to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o644))
        .and_then(|()| std::fs::File::open(to)?.sync_all())
        .ctx(|| format!("writing {}", to.display()))
}

/// The bytes a file really occupies (qcow2 layers are sparse).
pub(crate) fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_follow_the_published_rules() {
        for ok in ["s1", "before upgrade", "v1.2", "ü"] {
            validate_snapshot_name(ok).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "a\\b", "a\0b", "tab\there"] {
            let err = validate_snapshot_name(bad).unwrap_err();
            assert_eq!(err.kind(), "invalid_argument", "{bad:?}");
        }
        assert!(validate_snapshot_name("")
            .unwrap_err()
            .to_string()
            .contains("cannot be empty"));
    }
}
