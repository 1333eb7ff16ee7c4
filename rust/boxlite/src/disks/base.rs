//! Base disks: an image's layers written into an ext4 filesystem image on the host by
//! `boxlite-ext4`, which never creates, opens or resolves a host path named by a layer entry
//! (layers are untrusted). Built in an ingest area, then renamed into place: a crash leaves no
//! half-built base behind, and garbage collection removes what a dead builder left.

use std::path::{Path, PathBuf};

use boxlite_ext4::{BuildOptions, Ext4Error};

use crate::error::{task_failed, BoxliteError, BoxliteResult, IoContext};
use crate::fsutil::{sync_dir, write_atomically, FileLock, LockMode, RemoveOnDrop};
use crate::images::{ImageConfig, OciLayout, ResolvedImage};
use crate::units::Bytes;

/// A built base disk and the config of the image it holds.
#[derive(Debug, Clone)]
pub(crate) struct BaseDisk {
    pub path: PathBuf,
    pub config: ImageConfig,
}

/// The base disks of one runtime home: `disks/` holds finished ones, `ingest/` the ones being
/// built, `locks/` one lock file per image so that one process builds while the others wait.
#[derive(Debug, Clone)]
pub(crate) struct BaseDiskStore {
    root: PathBuf,
}

/// The smallest base disk: boxes write into their overlays on top of this filesystem (the
/// image file is sparse: free space costs the host nothing).
const MIN_BASE_SIZE: Bytes = Bytes::from_gib(1);
/// The filesystem label of base disks.
const LABEL: &str = "boxlite-root";

impl BaseDiskStore {
    pub fn new(images_dir: &Path) -> BoxliteResult<Self> {
        for sub in ["disks", "ingest", "locks"] {
            let dir = images_dir.join(sub);
            std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        }
        Ok(Self {
            root: images_dir.to_path_buf(),
        })
    }

    fn disk_path(&self, image: &ResolvedImage) -> PathBuf {
        self.root
            .join("disks")
            .join(format!("sha256-{}.ext4", image.manifest_digest.hex()))
    }

    fn config_path(&self, image: &ResolvedImage) -> PathBuf {
        self.root
            .join("disks")
            .join(format!("sha256-{}.json", image.manifest_digest.hex()))
    }

    /// The base disk of `image`, built first if this is its first use.
    pub async fn ensure(
        &self,
        layout: &OciLayout,
        image: &ResolvedImage,
    ) -> BoxliteResult<BaseDisk> {
        let found = BaseDisk {
            path: self.disk_path(image),
            config: image.config.clone(),
        };
        if found.path.is_file() {
            return Ok(found);
        }
        let lock_path = self
            .root
            .join("locks")
            .join(format!("{}.lock", image.manifest_digest.hex()));
        let _lock = FileLock::acquire(lock_path, LockMode::Exclusive).await?;
        // Someone else may have built it while we waited for the lock.
        if found.path.is_file() {
            return Ok(found);
        }
        self.build(layout, image).await?;
        Ok(found)
    }

    async fn build(&self, layout: &OciLayout, image: &ResolvedImage) -> BoxliteResult<()> {
        let started = std::time::Instant::now();
        // Named after the image: GC removes it once the image's build lock is free.
        let disk = self.root.join("ingest").join(format!(
            "sha256-{}.{}.ext4",
            image.manifest_digest.hex(),
            ulid::Ulid::new()
        ));
        let guard = RemoveOnDrop(Some(disk.clone()));
        let (layout_c, image_c, disk_c) = (layout.clone(), image.clone(), disk.clone());
        let report = tokio::task::spawn_blocking(move || write_image(&layout_c, &image_c, &disk_c))
            .await
            .map_err(|e| task_failed("base disk", e))??;
        let config_json = serde_json::to_vec_pretty(&image.config)
            .map_err(|e| BoxliteError::Internal(format!("serializing image config: {e}")))?;
        write_atomically(&self.config_path(image), &config_json)?;
        let final_path = self.disk_path(image);
        std::fs::rename(&disk, &final_path)
            .ctx(|| format!("committing {}", final_path.display()))?;
        guard.disarm();
        sync_dir(&self.root.join("disks"));
        tracing::info!(image = %image.manifest_digest, ms = started.elapsed().as_millis() as u64,
            files = report.files, bytes = report.bytes, "base disk built");
        Ok(())
    }
}

/// Writes the image's layers (each verified against its digests while read) into `disk`: at
/// least [`MIN_BASE_SIZE`], larger when the content needs it.
fn write_image(
    layout: &OciLayout,
    image: &ResolvedImage,
    disk: &Path,
) -> BoxliteResult<boxlite_ext4::BuildReport> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(disk)
        .ctx(|| format!("creating {}", disk.display()))?;
    let build = |size: Option<u64>| {
        let readers = image
            .layers
            .iter()
            .map(|layer| layout.open_layer(layer))
            .collect::<BoxliteResult<Vec<_>>>()?;
        let options = BuildOptions {
            size,
            label: Some(LABEL.into()),
        };
        Ok::<_, BoxliteError>(boxlite_ext4::build(readers, &file, &options))
    };
    let report = match build(Some(MIN_BASE_SIZE.as_u64()))? {
        Err(Ext4Error::NoSpace { .. }) => build(None)?,
        other => other,
    }
    .map_err(|e| layer_error(layout, image, e))?;
    file.sync_all()
        .ctx(|| format!("syncing {}", disk.display()))?;
    Ok(report)
}

/// What a failed build means to the caller: a bad layer is a failed pull (retrying the same
/// content will not help), an I/O failure is the host's.
fn layer_error(layout: &OciLayout, image: &ResolvedImage, e: Ext4Error) -> BoxliteError {
    let reference = layout.dir().display().to_string();
    let digest = |index: usize| {
        image
            .layers
            .get(index)
            .map(|l| l.digest.to_string())
            .unwrap_or_else(|| format!("#{index}"))
    };
    match e {
        Ext4Error::Read { layer, source } => crate::error::ImageError::PullFailed {
            reference,
            reason: format!("layer {}: {source}", digest(layer)),
            source: Some(Box::new(source)),
        }
        .into(),
        Ext4Error::Tar { layer, .. }
        | Ext4Error::Truncated { layer, .. }
        | Ext4Error::Entry { layer, .. }
        | Ext4Error::Unsupported { layer, .. } => BoxliteError::pull_failed(
            reference,
            format!("layer {} is not a valid OCI layer: {e}", digest(layer)),
        ),
        Ext4Error::TooLarge(what) => {
            BoxliteError::Unsupported(format!("an image this large: {what}"))
        }
        Ext4Error::Write(source) => BoxliteError::io("writing a base disk", source),
        other => BoxliteError::Internal(format!("building a base disk: {other}")),
    }
}
