//! Exporting a stopped box to one portable archive and importing it into another home
//! (`disks::archive` has the format and its checks).
//!
//! Export flattens the box's disk chain with `qemu-img convert` into `<home>/ingest/`, writes
//! the archive beside its destination and renames it into place: a crash leaves the box as it
//! was and no archive under the final name. Import streams the archive into the new box's own
//! directory (a directory without a record is removed when a runtime next opens the home),
//! verifies it, and only then turns the disk into a frozen layer under the box's overlay.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use super::{BoxStatus, LiteBox};
use crate::disks::archive::{self, BaseDiskInfo, DiskEntry, Manifest};
use crate::disks::layers;
use crate::error::{BoxliteError, BoxliteResult, DiskError, IoContext};
use crate::ids::BoxID;
use crate::options::BoxOptions;
use crate::runtime::RuntimeShared;
use crate::state::{now_ms, BoxRecord};

/// The file name extension of box archives.
pub const ARCHIVE_EXTENSION: &str = "boxlite";

impl LiteBox {
    /// Writes the stopped box (options, image, its disk flattened) to one archive: at `dest`,
    /// or `<dest>/<name or id>.boxlite` when `dest` is a directory. Returns the path written.
    pub async fn export(&self, dest: &Path) -> BoxliteResult<PathBuf> {
        let target = if dest.is_dir() {
            let stem = self
                .name()
                .map_or_else(|| self.id().to_string(), str::to_owned);
            dest.join(format!("{stem}.{ARCHIVE_EXTENSION}"))
        } else {
            dest.to_path_buf()
        };
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(BoxliteError::invalid(
                "dest",
                format!("{} is not a directory", parent.display()),
            ));
        }
        let (_serial, _lock, record) = self.lock_stopped("export").await?;
        let home = &self.inner.runtime.options.home_dir;
        let ingest = ingest_dir(home);
        std::fs::create_dir_all(&ingest).ctx(|| format!("creating {}", ingest.display()))?;
        let flat = ingest.join(format!(
            "export-{}-{}.qcow2",
            std::process::id(),
            ulid::Ulid::new()
        ));
        let _flat_guard = crate::fsutil::RemoveOnDrop(Some(flat.clone()));
        let disk = self.disk_path();
        let virtual_size = layers::qcow2_virtual_size(&disk)?;
        let qemu_img = crate::disks::find_tool("qemu-img", "qemu-utils")?;
        let mut command = Command::new(qemu_img);
        command
            .args(["convert", "-q", "-O", "qcow2"])
            .arg(&disk)
            .arg(&flat);
        crate::disks::run_tool(command).await?;
        let base_disk = (!record.base_disk.as_os_str().is_empty()).then(|| BaseDiskInfo {
            file: record
                .base_disk
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes: std::fs::metadata(&record.base_disk)
                .map(|m| m.len())
                .unwrap_or(0),
        });
        let tmp = parent.join(format!(
            ".{}.partial-{}",
            target
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            ulid::Ulid::new()
        ));
        let tmp_guard = crate::fsutil::RemoveOnDrop(Some(tmp.clone()));
        let (flat_path, tmp_path) = (flat.clone(), tmp.clone());
        let manifest_base = Manifest {
            format: archive::FORMAT.into(),
            version: archive::VERSION,
            box_id: record.id.to_string(),
            name: record.name.clone(),
            options: serde_json::to_value(&record.options)
                .map_err(|e| BoxliteError::Internal(format!("serializing options: {e}")))?,
            image: record.image.clone(),
            image_config: serde_json::to_value(&record.image_config)
                .map_err(|e| BoxliteError::Internal(format!("serializing image config: {e}")))?,
            base_disk,
            disk: DiskEntry {
                member: archive::DISK_MEMBER.into(),
                format: "qcow2".into(),
                virtual_size,
                bytes: 0,
                sha256: String::new(),
            },
            created_at_ms: now_ms(),
        };
        tokio::task::spawn_blocking(move || -> BoxliteResult<()> {
            let (sha256, bytes) = archive::hash_file(&flat_path)
                .ctx(|| format!("hashing {}", flat_path.display()))?;
            let mut manifest = manifest_base;
            manifest.disk.sha256 = sha256;
            manifest.disk.bytes = bytes;
            let file = std::fs::File::create(&tmp_path)
                .ctx(|| format!("creating {}", tmp_path.display()))?;
            let mut out = std::io::BufWriter::new(file);
            archive::write(&mut out, &manifest, &flat_path)
                .ctx(|| format!("writing {}", tmp_path.display()))?;
            out.into_inner()
                .map_err(|e| e.into_error())
                .and_then(|f| f.sync_all())
                .ctx(|| format!("syncing {}", tmp_path.display()))
        })
        .await
        .map_err(|e| crate::error::task_failed("export", e))??;
        std::fs::rename(&tmp, &target).ctx(|| format!("renaming into {}", target.display()))?;
        tmp_guard.disarm();
        crate::fsutil::sync_dir(&parent);
        Ok(target)
    }
}

/// Where exports stage their flattened disks.
pub(crate) fn ingest_dir(home: &Path) -> PathBuf {
    home.join("ingest")
}

/// Removes the staging files of exports whose process is gone.
pub(crate) fn clean_ingest(home: &Path) {
    for entry in std::fs::read_dir(ingest_dir(home))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("export-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| p != 0 && crate::state::ProcessId::of(p).is_some());
        if !alive {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Options that name host paths or host ports: an untrusted archive may not carry them.
fn binds_the_host(options: &BoxOptions) -> bool {
    options.rootfs_path.is_some() || !options.ports.is_empty() || !options.volumes.is_empty()
}

/// Makes a stopped box in this home from the archive at `path`. With `untrusted`, options
/// that reach into the host (a layout path, published ports) are refused.
pub(crate) async fn import(
    runtime: &Arc<RuntimeShared>,
    path: &Path,
    name: Option<String>,
    untrusted: bool,
) -> BoxliteResult<LiteBox> {
    if !path.is_file() {
        return Err(DiskError::ArchiveNotFound {
            path: path.display().to_string(),
        }
        .into());
    }
    if let Some(name) = &name {
        crate::options::validate_name(name)?;
        // Checked again when the record goes in; this spares reading a large archive.
        if let Some(record) = runtime.store.find(name)? {
            if runtime.reconcile(record).is_ok() {
                return Err(BoxliteError::AlreadyExists {
                    what: "a box",
                    name: name.clone(),
                });
            }
        }
    }
    let id = BoxID::new();
    let dir = runtime.box_dir(&id);
    std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    let mut cleanup = Cleanup {
        dir: Some(dir.clone()),
        layer: None,
    };
    let _lock = runtime.lock_box(&id).await?;
    let staged = dir.join("disk.qcow2.import");
    let manifest = {
        let (path, staged) = (path.to_path_buf(), staged.clone());
        tokio::task::spawn_blocking(move || archive::read(&path, &staged))
            .await
            .map_err(|e| crate::error::task_failed("import", e))??
    };
    let bad = |reason: String| -> BoxliteError {
        DiskError::BadArchive {
            path: path.display().to_string(),
            reason,
        }
        .into()
    };
    archive::check_disk(&staged, manifest.disk.virtual_size)
        .await
        .map_err(bad)?;
    let mut options: BoxOptions = serde_json::from_value(manifest.options.clone())
        .map_err(|e| bad(format!("bad box options: {e}")))?;
    let image_config = serde_json::from_value(manifest.image_config.clone())
        .map_err(|e| bad(format!("bad image config: {e}")))?;
    if untrusted && binds_the_host(&options) {
        return Err(bad(
            "it uses host paths (rootfs_path, volumes) or published ports, refused for an \
             untrusted archive"
                .into(),
        ));
    }
    // A box from a larger host gets this host's CPUs.
    let host_cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    options.cpus = options.cpus.clamp(1, host_cpus);
    options.name = name;
    options
        .validate()
        .map_err(|e| bad(format!("its options are not valid here: {e}")))?;

    let hold = runtime.hold_images().await?;
    let layers_dir = layers::layers_dir(&runtime.options.home_dir);
    std::fs::create_dir_all(&layers_dir).ctx(|| format!("creating {}", layers_dir.display()))?;
    let layer = layers_dir.join(format!("{}.qcow2", ulid::Ulid::new()));
    std::fs::rename(&staged, &layer).ctx(|| format!("renaming into {}", layer.display()))?;
    cleanup.layer = Some(layer.clone());
    layers::set_read_only(&layer)?;
    layers::create_overlay_on(&layer, &dir.join("disk.qcow2"), manifest.disk.virtual_size).await?;
    drop(hold);
    let record = BoxRecord {
        image: manifest.image.clone(),
        image_config,
        base_disk: layer,
        status: BoxStatus::Stopped,
        ..BoxRecord::creating(id, options)
    };
    runtime.store.insert(&record)?;
    crate::fsutil::sync_dir(&layers_dir);
    crate::fsutil::sync_dir(&dir);
    if let Err(e) = runtime.store.finish_creation(&id) {
        let _ = runtime.store.delete(&id);
        return Err(e);
    }
    cleanup.dir = None;
    cleanup.layer = None;
    Ok(LiteBox::from_record(record, runtime.clone()))
}

/// Undoes an import that did not finish.
struct Cleanup {
    dir: Option<PathBuf>,
    layer: Option<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(layer) = self.layer.take() {
            let _ = std::fs::remove_file(layer);
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_and_ports_bind_the_host() {
        let plain = BoxOptions {
            image: Some("alpine".into()),
            ..BoxOptions::default()
        };
        assert!(!binds_the_host(&plain));
        let with = |change: fn(&mut BoxOptions)| {
            let mut options = plain.clone();
            change(&mut options);
            binds_the_host(&options)
        };
        assert!(with(|o| o.rootfs_path = Some("/layout".into())));
        assert!(with(|o| o.volumes = vec![crate::options::VolumeSpec {
            host_path: "/home/user/src".into(),
            guest_path: "/src".into(),
            read_only: false,
        }]));
        assert!(with(
            |o| o.ports = vec![crate::options::PortSpec::tcp(8080, 80)]
        ));
    }
}
