//! The image manager: pulls, the local image list, removal and garbage collection, and the
//! image preparation step of box creation (local first; the network only for a missing image).
//!
//! No OCI format is written out here: the store's entries are oci-spec descriptors and images
//! are resolved by `layout.rs`. The one hand-written reader, `Created`, is explained below.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use super::config::ImageConfig;
use super::digest::Digest;
use super::gc::{self, GcReport};
use super::layout::{OciLayout, ResolvedImage};
use super::oci::{annotation, ref_name};
use super::pull::{pull, ProgressFn};
use super::reference::Reference;
use super::registry::{ImageRegistry, Registries};
use super::store::{ContentStore, INDEX_DIGEST, PULLED_AT};
use crate::error::{BoxliteError, BoxliteResult, StorageError};
use crate::fsutil::FileLock;
use crate::templates::TemplateStore;

/// An image in the local store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The normalized reference it is stored under (`docker.io/library/alpine:latest`).
    pub reference: String,
    /// `registry/repository`.
    pub repository: String,
    pub tag: Option<String>,
    /// The manifest digest: the image's identity (and its base disk's name).
    pub digest: Digest,
    /// The multi-platform index it was picked from, if any.
    pub index_digest: Option<Digest>,
    pub config_digest: Digest,
    /// Bytes in the store: manifest, config and (compressed) layers.
    pub size: u64,
    pub layers: usize,
    pub architecture: String,
    pub os: String,
    /// The config's `created` timestamp, as written there.
    pub created: Option<String>,
    pub pulled_at: Option<SystemTime>,
    /// Memory templates in service for this image (one per box shape: CPUs, memory, disk
    /// size, network on or off).
    pub templates: usize,
    /// The defaults boxes inherit: Env, Cmd, Entrypoint, WorkingDir, User, ports, labels.
    pub config: ImageConfig,
}

/// An image ready for a box: the store as a layout and the resolved manifest.
#[derive(Debug)]
pub(crate) struct PreparedImage {
    pub layout: OciLayout,
    pub resolved: ResolvedImage,
    pub reference: String,
}

/// Pulls, lists, inspects and removes the images of one runtime home. Clones share it.
#[derive(Clone)]
pub struct ImageManager {
    inner: Arc<Inner>,
}

struct Inner {
    store: ContentStore,
    registries: Registries,
    disks_dir: PathBuf,
    boxes_dir: PathBuf,
}

impl std::fmt::Debug for ImageManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageManager")
            .field("store", &self.inner.store.root())
            .finish()
    }
}

/// The one config field [`ImageInfo`] shows that nothing else reads; hand-written so that an
/// odd value is shown as none rather than failing the whole image.
#[derive(Deserialize)]
struct Created {
    #[serde(default)]
    created: Option<String>,
}

const MAX_METADATA: u64 = 4 * 1024 * 1024;

impl ImageManager {
    /// Opens the image store of `home`, with `registries` merged with `$BOXLITE_REGISTRIES`
    /// and `<home>/registries.json`.
    pub fn open(home: &Path, registries: &[ImageRegistry]) -> BoxliteResult<Self> {
        let images = home.join("images");
        Ok(Self {
            inner: Arc::new(Inner {
                store: ContentStore::open(&images)?,
                registries: Registries::load(registries, home)?,
                disks_dir: images.join("disks"),
                boxes_dir: home.join("boxes"),
            }),
        })
    }

    /// Pulls `reference` from its registry (a short name from the search registries, then
    /// Docker Hub), even if it is cached: a tag may have moved.
    pub async fn pull(&self, reference: &str) -> BoxliteResult<ImageInfo> {
        self.pull_with_progress(reference, None).await
    }

    /// [`pull`](Self::pull), reporting bytes done/total per layer to `progress`.
    pub async fn pull_with_progress(
        &self,
        reference: &str,
        progress: Option<ProgressFn>,
    ) -> BoxliteResult<ImageInfo> {
        let reference = Reference::parse(reference)?;
        let _shared = self.inner.store.lock_gc(false).await?;
        let name = pull(
            &self.inner.store,
            &self.inner.registries,
            &reference,
            progress,
        )
        .await?;
        self.blocking(move |m| m.info(&name.to_string())).await
    }

    /// Every image in the local store, by reference.
    pub fn list(&self) -> BoxliteResult<Vec<ImageInfo>> {
        let mut out = Vec::new();
        for entry in self.inner.store.entries()? {
            if let Some(name) = ref_name(&entry) {
                match self.info(name) {
                    Ok(info) => out.push(info),
                    Err(e) => {
                        tracing::warn!(reference = name, error = %e, "skipping a damaged image")
                    }
                }
            }
        }
        Ok(out)
    }

    /// The local image `reference` names (short names resolved as for pulls); never touches
    /// the network. `ImageNotFound` if it is not in the store.
    pub fn get(&self, reference: &str) -> BoxliteResult<ImageInfo> {
        let reference = Reference::parse(reference)?;
        let name = self
            .find_local(&reference)?
            .ok_or_else(|| not_local(&reference))?;
        self.info(&name)
    }

    /// Removes `reference` from the store and collects what nothing else uses. Refused while
    /// a box uses the image (unless another reference names the same image).
    pub async fn remove(&self, reference: &str) -> BoxliteResult<()> {
        let reference = Reference::parse(reference)?;
        let name = self
            .find_local(&reference)?
            .ok_or_else(|| not_local(&reference))?;
        // Exclusive: no box creation is between choosing this image and making its overlay.
        let _exclusive = self.inner.store.lock_gc(true).await?;
        let entries = self.inner.store.entries()?;
        let Some(entry) = entries.iter().find(|e| ref_name(e) == Some(name.as_str())) else {
            return Err(not_local(&reference));
        };
        let aliased = entries
            .iter()
            .any(|e| e.digest() == entry.digest() && ref_name(e) != Some(name.as_str()));
        if !aliased {
            let used = gc::disks_in_use(&self.inner.boxes_dir, &self.inner.disks_dir).ok_or_else(
                || {
                    BoxliteError::from(StorageError::Damaged {
                        path: self.inner.boxes_dir.display().to_string(),
                        reason: format!(
                            "cannot tell which boxes use {name}: some box disk is unreadable"
                        ),
                    })
                },
            )?;
            let users: Vec<String> = used
                .into_iter()
                .filter(|(_, d)| *d == *entry.digest())
                .map(|(id, _)| id)
                .collect();
            if !users.is_empty() {
                return Err(BoxliteError::InvalidState {
                    id: users.join(", "),
                    state: "still there; remove the box first".into(),
                    operation: format!("remove image {name}, which is used by"),
                });
            }
        }
        self.inner.store.remove_entry(&name).await?;
        let manager = self.clone();
        tokio::task::spawn_blocking(move || {
            gc::collect(
                &manager.inner.store,
                &manager.inner.disks_dir,
                &manager.inner.boxes_dir,
                &manager.template_store()?,
            )
        })
        .await
        .map_err(|e| BoxliteError::Internal(format!("gc task failed: {e}")))??;
        Ok(())
    }

    /// Removes blobs and base disks that no image in the store and no box references.
    pub async fn gc(&self) -> BoxliteResult<GcReport> {
        let _exclusive = self.inner.store.lock_gc(true).await?;
        self.blocking(|m| {
            gc::collect(
                &m.inner.store,
                &m.inner.disks_dir,
                &m.inner.boxes_dir,
                &m.template_store()?,
            )
        })
        .await
    }

    /// Holds off garbage collection (shared lock) while a box is being made from an image.
    pub(crate) async fn hold(&self) -> BoxliteResult<FileLock> {
        self.inner.store.lock_gc(false).await
    }

    /// The GC lock, exclusively, if nobody holds it now (a quick sweep that may be skipped).
    pub(crate) fn try_exclusive(&self) -> BoxliteResult<Option<FileLock>> {
        FileLock::try_acquire(
            &self.inner.store.locks_dir().join("gc.lock"),
            crate::fsutil::LockMode::Exclusive,
        )
    }

    /// The image for a new box: from the store if it is there (no network at all), else
    /// pulled first. The caller holds [`hold`](Self::hold).
    pub(crate) async fn prepare(&self, text: &str) -> BoxliteResult<PreparedImage> {
        let reference = Reference::parse(text)?;
        if let Some(name) = self.find_local(&reference)? {
            let found = name.clone();
            match self.blocking(move |m| m.resolve_local(&found)).await {
                Ok(prepared) => return Ok(prepared),
                Err(e) => {
                    tracing::warn!(reference = %name, error = %e, "the cached image is incomplete; pulling it again")
                }
            }
        }
        let name = pull(&self.inner.store, &self.inner.registries, &reference, None).await?;
        self.blocking(move |m| m.resolve_local(&name.to_string()))
            .await
    }

    /// Resolves a stored image and checks its layers are all present.
    fn resolve_local(&self, name: &str) -> BoxliteResult<PreparedImage> {
        let layout = self.inner.store.layout()?;
        let resolved = layout.resolve(Some(name))?;
        if let Some(missing) = resolved
            .layers
            .iter()
            .find(|l| !self.inner.store.has_blob(&l.digest))
        {
            return Err(StorageError::Damaged {
                path: self.inner.store.root().display().to_string(),
                reason: format!(
                    "layer {} of {name} is missing; remove the image and pull it again",
                    missing.digest
                ),
            }
            .into());
        }
        Ok(PreparedImage {
            layout,
            resolved,
            reference: name.to_owned(),
        })
    }

    /// The stored name `reference` resolves to: the first candidate the index has, or for a
    /// digest reference, any name of the same repository pinned to that manifest or index.
    fn find_local(&self, reference: &Reference) -> BoxliteResult<Option<String>> {
        let entries = self.inner.store.entries()?;
        let candidates = self.inner.registries.candidates(reference);
        for candidate in &candidates {
            let name = candidate.to_string();
            if entries.iter().any(|e| ref_name(e) == Some(name.as_str())) {
                return Ok(Some(name));
            }
        }
        for candidate in &candidates {
            let Some(digest) = candidate.digest() else {
                continue;
            };
            let repository = format!("{}/{}", candidate.registry(), candidate.repository());
            let same = |e: &&oci_spec::image::Descriptor| {
                let in_repo = ref_name(e).is_some_and(|n| {
                    n.strip_prefix(&repository)
                        .is_some_and(|rest| rest.starts_with([':', '@']))
                });
                let pinned = *digest == *e.digest()
                    || annotation(e, INDEX_DIGEST) == Some(digest.to_string().as_str());
                in_repo && pinned
            };
            if let Some(entry) = entries.iter().find(same) {
                return Ok(ref_name(entry).map(str::to_owned));
            }
        }
        Ok(None)
    }

    fn info(&self, name: &str) -> BoxliteResult<ImageInfo> {
        let store = &self.inner.store;
        let entry = store
            .entry(name)?
            .ok_or_else(|| BoxliteError::image_not_found(name.to_owned()))?;
        let resolved = store.layout()?.resolve(Some(name))?;
        let config_digest = resolved.config_digest.clone();
        let config_bytes = store.read_blob(&config_digest, MAX_METADATA)?;
        let created = serde_json::from_slice::<Created>(&config_bytes)
            .ok()
            .and_then(|c| c.created);
        let parsed = Reference::parse(name)?;
        let size = entry.size()
            + config_bytes.len() as u64
            + resolved.layers.iter().map(|l| l.size).sum::<u64>();
        Ok(ImageInfo {
            reference: name.to_owned(),
            repository: format!("{}/{}", parsed.registry(), parsed.repository()),
            tag: parsed.tag().map(str::to_owned),
            digest: Digest::try_from(entry.digest())?,
            index_digest: annotation(&entry, INDEX_DIGEST).and_then(|d| Digest::parse(d).ok()),
            config_digest,
            size,
            layers: resolved.layers.len(),
            architecture: resolved.config.architecture.clone(),
            os: resolved.config.os.clone(),
            created,
            pulled_at: annotation(&entry, PULLED_AT)
                .and_then(|s| s.parse::<u64>().ok())
                .map(|secs| UNIX_EPOCH + Duration::from_secs(secs)),
            templates: self.templates_of(&Digest::try_from(entry.digest())?),
            config: resolved.config,
        })
    }

    /// The home's templates (`<home>/templates`, beside `<home>/boxes`).
    fn template_store(&self) -> BoxliteResult<TemplateStore> {
        TemplateStore::new(self.inner.boxes_dir.parent().unwrap_or(Path::new("/")))
    }

    fn templates_of(&self, image: &Digest) -> usize {
        let Ok(templates) = self.template_store() else {
            return 0;
        };
        let image = image.to_string();
        templates
            .list()
            .into_iter()
            .filter(|(_, lookup)| {
                matches!(lookup, crate::templates::Lookup::Found(t) if t.manifest.inputs.image == image)
            })
            .count()
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&ImageManager) -> BoxliteResult<T> + Send + 'static,
    ) -> BoxliteResult<T> {
        let manager = self.clone();
        tokio::task::spawn_blocking(move || work(&manager))
            .await
            .map_err(|e| BoxliteError::Internal(format!("image task failed: {e}")))?
    }
}

fn not_local(reference: &Reference) -> BoxliteError {
    BoxliteError::image_not_found(format!(
        "{reference} is not in the local image store (pull it first)"
    ))
}
