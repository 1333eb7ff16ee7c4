//! Pulling an image into the content store: resolve the manifest (picking this host's
//! platform from an index), fetch config and layers concurrently into the store, and only then
//! point the reference at the manifest in `index.json`.
//!
//! Indexes, manifests and descriptors are oci-spec's types (read through `oci.rs`).
//! Hand-written on purpose: the order of the checks on untrusted input (`registry.rs` caps
//! each manifest's size and checks its digest before it is parsed here; the schema version,
//! media types and config size are checked before any blob is fetched, and every digest is
//! parsed with our strict [`Digest`] before it names one), the platform choice, and the
//! layer fetch, a few at a time, into the content store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use oci_spec::image::{Arch, Descriptor, MediaType, Os, Platform};
use serde_json::Value;
use tokio::sync::Semaphore;

use super::digest::Digest;
use super::layout::oci_arch;
use super::oci::{self, Invalid};
use super::reference::Reference;
use super::registry::{Registries, RegistryClient, Version};
use super::store::{ContentStore, INDEX_DIGEST, PULLED_AT};
use crate::error::{BoxliteError, BoxliteResult, ImageError};

/// Configs larger than this are refused.
const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;
/// Layers downloaded at once.
const CONCURRENT_LAYERS: usize = 3;

/// Progress of one layer of a pull: `done` of `total` bytes are in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullProgress {
    /// The normalized reference being pulled.
    pub reference: String,
    /// The layer's blob digest.
    pub layer: Digest,
    /// Position of the layer in the image (0 is the bottom).
    pub index: usize,
    /// How many layers the image has.
    pub layers: usize,
    pub done: u64,
    pub total: u64,
}

/// Receives [`PullProgress`] reports; called from the runtime's threads, so keep it quick.
pub type ProgressFn = Arc<dyn Fn(&PullProgress) + Send + Sync>;

/// Pulls `reference` (trying each candidate registry of a short name in order) and returns
/// the name it is stored under. The caller holds the store's shared GC lock.
pub(crate) async fn pull(
    store: &ContentStore,
    registries: &Registries,
    reference: &Reference,
    progress: Option<ProgressFn>,
) -> BoxliteResult<Reference> {
    let candidates = registries.candidates(reference);
    let mut errors: Vec<(Reference, BoxliteError)> = Vec::new();
    for candidate in &candidates {
        let config = registries.config_for(candidate.registry());
        match pull_one(store, &config, candidate, progress.clone()).await {
            Ok(()) => return Ok(candidate.clone()),
            Err(e) => {
                tracing::debug!(reference = %candidate, error = %e, "pull candidate failed");
                errors.push((candidate.clone(), e));
            }
        }
    }
    Err(combine(reference, errors))
}

/// One failure is reported as is; for a short name tried in several registries, "not found"
/// everywhere is not-found, and otherwise the first other failure wins (naming the rest).
fn combine(reference: &Reference, mut errors: Vec<(Reference, BoxliteError)>) -> BoxliteError {
    if errors.len() == 1 {
        return errors.remove(0).1;
    }
    let tried: Vec<String> = errors.iter().map(|(r, _)| r.to_string()).collect();
    if errors
        .iter()
        .all(|(_, e)| matches!(e, BoxliteError::Image(ImageError::NotFound { .. })))
    {
        return BoxliteError::image_not_found(format!("{reference} (tried {})", tried.join(", ")));
    }
    let index = errors
        .iter()
        .position(|(_, e)| !matches!(e, BoxliteError::Image(ImageError::NotFound { .. })))
        .unwrap_or(0);
    match errors.remove(index).1 {
        BoxliteError::Image(ImageError::PullFailed {
            reference: r,
            reason,
            source,
        }) => BoxliteError::from(ImageError::PullFailed {
            reference: r,
            reason: format!("{reason} (tried {})", tried.join(", ")),
            source,
        }),
        other => other,
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn pull_one(
    store: &ContentStore,
    config: &super::registry::ImageRegistry,
    reference: &Reference,
    progress: Option<ProgressFn>,
) -> BoxliteResult<()> {
    let started = Instant::now();
    let name = reference.to_string();
    let failed = |reason: String| BoxliteError::pull_failed(name.clone(), reason);
    let client = Arc::new(RegistryClient::new(config)?);

    // Reading a document into oci-spec's type: `what` names it in errors.
    let invalid = |e: Invalid, what: &str| match e {
        Invalid::Digest(text) => failed(format!("unsupported or malformed digest {text:?}")),
        Invalid::Json(e) => failed(format!("{what} is not valid JSON: {e}")),
    };

    // The manifest, or an index and the manifest of our platform in it.
    let (top_bytes, top_digest) = client.manifest(reference, Version::Reference).await?;
    let top: Value = serde_json::from_slice(&top_bytes)
        .map_err(|e| invalid(Invalid::Json(e), "the manifest"))?;
    let (index, manifest_bytes, manifest_digest, platform) = if is_index(&top) {
        let top = oci::index(top).map_err(|e| invalid(e, "the manifest"))?;
        let entries = top.manifests();
        let chosen = pick_platform(entries).ok_or_else(|| {
            let available: Vec<String> = entries
                .iter()
                .filter_map(|d| d.platform().as_ref())
                .filter(|p| p.os().to_string() != "unknown")
                .map(describe)
                .collect();
            BoxliteError::image_not_found(format!(
                "{name} has no image for linux/{}; it has: {}",
                oci_arch(),
                if available.is_empty() {
                    "no platform images".to_owned()
                } else {
                    available.join(", ")
                }
            ))
        })?;
        let digest = parse_digest(chosen.digest()).map_err(failed)?;
        let (bytes, digest) = client.manifest(reference, Version::Digest(&digest)).await?;
        if bytes.len() as u64 != chosen.size() {
            return Err(failed(format!(
                "manifest {digest} is {} bytes, the index says {}",
                bytes.len(),
                chosen.size()
            )));
        }
        (
            Some((top_bytes, top_digest)),
            bytes,
            digest,
            chosen.platform().clone(),
        )
    } else {
        (None, top_bytes, top_digest, None)
    };
    let what = format!("manifest {manifest_digest}");
    let doc: Value =
        serde_json::from_slice(&manifest_bytes).map_err(|e| invalid(Invalid::Json(e), &what))?;
    if is_index(&doc) {
        return Err(failed("an image index nested in an image index".into()));
    }
    // Schema version and media type are checked on the JSON: a schema 1 manifest, say, is
    // unsupported, not malformed, though it has no `config` for oci-spec's type.
    let schema_version: u32 = oci::field(&doc, "schemaVersion")
        .map_err(|e| invalid(Invalid::Json(e), &what))?
        .unwrap_or(0);
    if schema_version != 2 {
        return Err(BoxliteError::Unsupported(format!(
            "{name}: manifest schema version {schema_version} (only version 2 is supported)"
        )));
    }
    let media_type: MediaType = oci::field(&doc, "mediaType")
        .map_err(|e| invalid(Invalid::Json(e), &what))?
        .unwrap_or(MediaType::ImageManifest);
    if !oci::is_manifest(&media_type) {
        return Err(BoxliteError::Unsupported(format!(
            "{name}: manifest media type {:?}",
            media_type.to_string()
        )));
    }
    if ["config", "layers"]
        .iter()
        .any(|key| doc.get(key).is_none_or(Value::is_null))
    {
        return Err(failed(format!(
            "manifest {manifest_digest} has no config or no layers"
        )));
    }
    let manifest = oci::manifest(doc).map_err(|e| invalid(e, &what))?;
    let config_desc = manifest.config();
    let config_type = config_desc.media_type().to_string();
    if !config_type.is_empty() && !oci::is_config(config_desc.media_type()) {
        return Err(BoxliteError::Unsupported(format!(
            "{name} is not a container image: its config is {config_type:?}"
        )));
    }
    if config_desc.size() > MAX_CONFIG_BYTES {
        return Err(failed(format!(
            "the image config is {} bytes, more than the {MAX_CONFIG_BYTES} allowed",
            config_desc.size()
        )));
    }
    for layer in manifest.layers() {
        if oci::layer_compression(layer.media_type()).is_none() {
            return Err(BoxliteError::Unsupported(format!(
                "{name}: layer media type {:?} (supported: uncompressed and gzip tar layers)",
                layer.media_type().to_string()
            )));
        }
    }
    let config_digest = parse_digest(config_desc.digest()).map_err(failed)?;
    let layers: Vec<(Digest, u64)> = manifest
        .layers()
        .iter()
        .map(|l| Ok((parse_digest(l.digest())?, l.size())))
        .collect::<Result<_, String>>()
        .map_err(failed)?;

    // The config first: it says whether the image can run here at all.
    {
        let client = client.clone();
        let digest = config_digest.clone();
        let reference = reference.clone();
        store
            .ingest_stream(
                &name,
                &config_digest,
                config_desc.size(),
                |_| {},
                || async move { client.blob(&reference, &digest).await },
            )
            .await?;
    }
    let config_bytes = store.read_blob(&config_digest, MAX_CONFIG_BYTES)?;
    let image_config = oci::config(&config_bytes)
        .map_err(|e| failed(format!("the image config is malformed: {e}")))?;
    let diff_ids = image_config.rootfs().diff_ids();
    if diff_ids.len() != layers.len() {
        return Err(failed(format!(
            "the manifest lists {} layers but the config {} diff_ids",
            layers.len(),
            diff_ids.len()
        )));
    }
    let (os, architecture) = (
        image_config.os().to_string(),
        image_config.architecture().to_string(),
    );
    if (!os.is_empty() && os != "linux") || (!architecture.is_empty() && architecture != oci_arch())
    {
        return Err(BoxliteError::image_not_found(format!(
            "{name} is an image for {os}/{architecture}; this host runs linux/{}",
            oci_arch()
        )));
    }

    fetch_layers(store, &client, reference, &layers, progress).await?;

    // Every blob is in; now the manifest (and index), then the name.
    if let Some((bytes, digest)) = &index {
        store.put_bytes(&name, digest, bytes.clone()).await?;
    }
    store
        .put_bytes(&name, &manifest_digest, manifest_bytes.clone())
        .await?;
    let mut annotations = HashMap::new();
    annotations.insert(PULLED_AT.to_owned(), now_secs().to_string());
    if let Some((_, digest)) = &index {
        annotations.insert(INDEX_DIGEST.to_owned(), digest.to_string());
    }
    let platform = platform.unwrap_or_else(|| {
        let mut platform = Platform::default();
        platform.set_os(Os::Linux);
        platform.set_architecture(Arch::from(if architecture.is_empty() {
            oci_arch()
        } else {
            architecture.as_str()
        }));
        platform
    });
    let mut descriptor = Descriptor::new(
        media_type,
        manifest_bytes.len() as u64,
        manifest_digest.to_oci(),
    );
    descriptor.set_platform(Some(platform));
    descriptor.set_annotations(Some(annotations));
    store.set_entry(&name, descriptor).await?;
    tracing::info!(
        reference = %name,
        manifest = %manifest_digest,
        layers = layers.len(),
        ms = started.elapsed().as_millis() as u64,
        "image pulled"
    );
    Ok(())
}

/// Fetches the layers, a few at a time, reporting progress per layer.
async fn fetch_layers(
    store: &ContentStore,
    client: &Arc<RegistryClient>,
    reference: &Reference,
    layers: &[(Digest, u64)],
    progress: Option<ProgressFn>,
) -> BoxliteResult<()> {
    let slots = Arc::new(Semaphore::new(CONCURRENT_LAYERS));
    let mut tasks = tokio::task::JoinSet::new();
    let count = layers.len();
    for (index, (digest, size)) in layers.iter().cloned().enumerate() {
        let (store, client, reference, slots, progress) = (
            store.clone(),
            client.clone(),
            reference.clone(),
            slots.clone(),
            progress.clone(),
        );
        tasks.spawn(async move {
            let _slot = slots
                .acquire_owned()
                .await
                .map_err(|_| BoxliteError::Internal("layer slots closed".into()))?;
            let name = reference.to_string();
            let reporter = Reporter::new(progress, &name, &digest, index, count, size);
            reporter.report(0, true);
            let fetch_digest = digest.clone();
            store
                .ingest_stream(
                    &name,
                    &digest,
                    size,
                    |done| reporter.report(done, false),
                    || async move { client.blob(&reference, &fetch_digest).await },
                )
                .await?;
            reporter.report(size, true);
            Ok::<_, BoxliteError>(())
        });
    }
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let result = joined
            .map_err(|e| BoxliteError::Internal(format!("layer task failed: {e}")))
            .and_then(|r| r);
        if let Err(e) = result {
            if first_error.is_none() {
                first_error = Some(e);
                // The other downloads stop: their partial files are removed as they drop.
                tasks.abort_all();
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Calls the progress callback for one layer, at most every 1% or 1 MiB, always at 0 and
/// at the end.
struct Reporter {
    callback: Option<ProgressFn>,
    template: PullProgress,
    last: AtomicU64,
    step: u64,
    finished: Mutex<bool>,
}

impl Reporter {
    fn new(
        callback: Option<ProgressFn>,
        reference: &str,
        layer: &Digest,
        index: usize,
        layers: usize,
        total: u64,
    ) -> Self {
        Self {
            callback,
            template: PullProgress {
                reference: reference.to_owned(),
                layer: layer.clone(),
                index,
                layers,
                done: 0,
                total,
            },
            last: AtomicU64::new(0),
            step: (total / 100).clamp(64 * 1024, 1024 * 1024),
            finished: Mutex::new(false),
        }
    }

    fn report(&self, done: u64, force: bool) {
        let Some(callback) = &self.callback else {
            return;
        };
        let last = self.last.load(Ordering::Relaxed);
        let at_end = done >= self.template.total;
        if !force && !at_end && done < last + self.step {
            return;
        }
        if at_end {
            // The final report is made once.
            let Ok(mut finished) = self.finished.lock() else {
                return;
            };
            if *finished {
                return;
            }
            *finished = true;
        }
        self.last.store(done, Ordering::Relaxed);
        callback(&PullProgress {
            done,
            ..self.template.clone()
        });
    }
}

/// Whether a fetched document is an index: by its media type, or without one by its shape.
fn is_index(doc: &Value) -> bool {
    let has = |key: &str| doc.get(key).is_some_and(|v| !v.is_null());
    match doc.get("mediaType").and_then(Value::as_str) {
        Some(t) => oci::is_index(&MediaType::from(t)),
        None => has("manifests") && !has("config"),
    }
}

fn parse_digest(text: &oci_spec::image::Digest) -> Result<Digest, String> {
    Digest::try_from(text)
        .map_err(|_| format!("unsupported or malformed digest {:?}", text.as_ref()))
}

/// `os/architecture[/variant]`.
fn describe(platform: &Platform) -> String {
    match platform.variant() {
        Some(v) => format!("{}/{}/{v}", platform.os(), platform.architecture()),
        None => format!("{}/{}", platform.os(), platform.architecture()),
    }
}

/// The entry of an index for linux on this architecture (arm64: variant v8 or none).
fn pick_platform(entries: &[Descriptor]) -> Option<&Descriptor> {
    entries.iter().find(|d| {
        d.platform().as_ref().is_some_and(|p| {
            *p.os() == Os::Linux
                && *p.architecture() == Arch::from(oci_arch())
                && (oci_arch() != "arm64" || matches!(p.variant().as_deref(), None | Some("v8")))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(arch: &str, os: &str) -> Descriptor {
        let mut platform = Platform::default();
        platform.set_architecture(Arch::from(arch));
        platform.set_os(Os::from(os));
        let mut entry = Descriptor::new(MediaType::ImageManifest, 1, Digest::of(b"a").to_oci());
        entry.set_platform(Some(platform));
        entry
    }

    #[test]
    fn picks_this_hosts_platform() {
        let entries = vec![
            entry("s390x", "linux"),
            entry(oci_arch(), "windows"),
            entry(oci_arch(), "linux"),
        ];
        let chosen = pick_platform(&entries).unwrap();
        assert_eq!(
            chosen.platform().as_ref().unwrap().os().to_string(),
            "linux"
        );
        assert!(pick_platform(&entries[..2]).is_none());
    }

    #[test]
    fn index_detection_by_media_type_or_shape() {
        let index: Value = serde_json::from_str(r#"{"schemaVersion":2,"manifests":[]}"#).unwrap();
        assert!(is_index(&index));
        let manifest: Value = serde_json::from_str(
            r#"{"schemaVersion":2,"config":{"digest":"x","size":1},"layers":[]}"#,
        )
        .unwrap();
        assert!(!is_index(&manifest));
    }

    #[test]
    fn failures_of_several_candidates_combine() {
        let r = Reference::parse("alpine").unwrap();
        let nf = |s: &str| BoxliteError::image_not_found(s);
        let both_missing = combine(
            &r,
            vec![
                (r.in_registry("a.io"), nf("a")),
                (r.in_registry("docker.io"), nf("b")),
            ],
        );
        assert!(matches!(
            both_missing,
            BoxliteError::Image(ImageError::NotFound { .. })
        ));
        assert!(both_missing
            .to_string()
            .contains("tried a.io/library/alpine:latest"));
        let offline = combine(
            &r,
            vec![
                (r.in_registry("a.io"), nf("a")),
                (
                    r.in_registry("docker.io"),
                    BoxliteError::pull_failed(
                        "docker.io/library/alpine:latest",
                        "connection refused",
                    ),
                ),
            ],
        );
        assert!(matches!(
            offline,
            BoxliteError::Image(ImageError::PullFailed { .. })
        ));
        assert!(offline.to_string().contains("connection refused"));
    }

    #[test]
    fn progress_is_throttled_and_ends_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let callback: ProgressFn = Arc::new(move |p: &PullProgress| {
            sink.lock().unwrap().push(p.done);
        });
        let total = 10 * 1024 * 1024;
        let reporter = Reporter::new(Some(callback), "r", &Digest::of(b"x"), 0, 1, total);
        reporter.report(0, true);
        for done in (0..=total).step_by(4096) {
            reporter.report(done, false);
        }
        reporter.report(total, true);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.first(), Some(&0));
        assert_eq!(seen.last(), Some(&total));
        assert_eq!(seen.iter().filter(|&&d| d == total).count(), 1);
        assert!(seen.len() <= 110, "{} reports", seen.len());
    }
}
