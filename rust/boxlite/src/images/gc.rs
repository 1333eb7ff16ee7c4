//! Garbage collection of the image store and the base disks.
//!
//! Roots: every manifest named in the store's `index.json`, and every base disk a box's
//! overlay is backed by (read from the qcow2 header of each `<home>/boxes/<id>/*.qcow2`, the
//! one record of a box's image that is always true). A blob is kept if a root manifest refers
//! to it; a base disk if its manifest is named in the index or a box uses it. The collector
//! holds the store's GC lock exclusively, and everything that adds content (pulls, box
//! creation up to its overlay) holds it shared, so it never sees work half done.
//!
//! Hand-written on purpose: the marking reads manifests and indexes as loosely as it can
//! (`Refs`, only the digests), not as oci-spec's types: a document it failed to read would
//! leave everything it refers to unmarked, and collected. The qcow2 header reader is ours
//! because it is twenty lines and needs no qemu.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::digest::Digest;
use super::oci::annotation;
use super::store::{ContentStore, INDEX_DIGEST};
use crate::error::BoxliteResult;
use crate::fsutil::FileLock;
use crate::templates::TemplateStore;

/// Base-disk build leftovers older than this are removed (younger ones may be in progress in
/// a process that does not take the GC lock).
const STALE_BUILD_AGE: Duration = Duration::from_secs(6 * 3600);

/// What a collection removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub blobs_removed: usize,
    pub disks_removed: usize,
    pub templates_removed: usize,
    pub bytes_freed: u64,
}

#[derive(Deserialize)]
struct Refs {
    #[serde(default)]
    config: Option<Ref>,
    #[serde(default)]
    layers: Vec<Ref>,
    #[serde(default)]
    manifests: Vec<Ref>,
}

#[derive(Deserialize)]
struct Ref {
    digest: String,
}

/// What each box's disks rest on: `(box id, backing files nearest first)` for every qcow2 in
/// a box directory or its `snapshots/`, or `None` if some box disk could not be read (then nothing a box might
/// use may be removed).
pub(crate) fn box_disk_chains(boxes_dir: &Path) -> Option<Vec<(String, Vec<PathBuf>)>> {
    let mut chains = Vec::new();
    let Ok(entries) = std::fs::read_dir(boxes_dir) else {
        return Some(chains);
    };
    for entry in entries.flatten() {
        let box_dir = entry.path();
        if !box_dir.is_dir() {
            continue;
        }
        let box_id = entry.file_name().to_string_lossy().into_owned();
        let Ok(files) = std::fs::read_dir(&box_dir) else {
            return None;
        };
        // A box's snapshots (`snapshots/<id>.qcow2`, empty overlays on frozen layers) are
        // roots too.
        let snapshots = std::fs::read_dir(box_dir.join("snapshots"))
            .into_iter()
            .flatten();
        for file in files.flatten().chain(snapshots.flatten()) {
            let path = file.path();
            if path.extension().and_then(|e| e.to_str()) != Some("qcow2") {
                continue;
            }
            match backing_chain(&path) {
                Ok(chain) => chains.push((box_id.clone(), chain)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read a box disk; keeping every base disk and template");
                    return None;
                }
            }
        }
    }
    Some(chains)
}

/// The manifest digests of the base disks boxes use (directly, or under a template's
/// overlay), or `None` if some box disk could not be read.
pub(crate) fn disks_in_use(boxes_dir: &Path, disks_dir: &Path) -> Option<Vec<(String, Digest)>> {
    Some(
        box_disk_chains(boxes_dir)?
            .into_iter()
            .flat_map(|(id, chain)| {
                chain
                    .iter()
                    .filter_map(|file| base_disk_digest(file, disks_dir))
                    .map(|digest| (id.clone(), digest))
                    .collect::<Vec<_>>()
            })
            .collect(),
    )
}

/// The longest backing chain followed: a box on a template is three deep, each fork adds one.
const MAX_CHAIN: usize = 16;

/// The files a qcow2 disk rests on, nearest first, ending at the first file that is not qcow2
/// (the raw base disk) or has no backing file.
pub(crate) fn backing_chain(disk: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut chain: Vec<PathBuf> = Vec::new();
    let mut current = disk.to_path_buf();
    for _ in 0..MAX_CHAIN {
        let backing = match qcow2_backing_file(&current) {
            Ok(Some(backing)) => backing,
            Ok(None) => break,
            Err(e) if chain.is_empty() => return Err(e),
            // The raw base disk (not qcow2), or a layer that is gone.
            Err(_) => break,
        };
        let backing = if backing.is_absolute() {
            backing
        } else {
            current.parent().unwrap_or(Path::new("/")).join(backing)
        };
        chain.push(backing.clone());
        current = backing;
    }
    Ok(chain)
}

/// `<disks>/sha256-<hex>.ext4` -> the manifest digest.
fn base_disk_digest(path: &Path, disks_dir: &Path) -> Option<Digest> {
    if path.parent()? != disks_dir {
        let canonical = path.canonicalize().ok()?;
        if canonical.parent()? != disks_dir.canonicalize().ok()? {
            return None;
        }
    }
    let name = path.file_name()?.to_str()?;
    let hex = name.strip_prefix("sha256-")?.strip_suffix(".ext4")?;
    Digest::parse(&format!("sha256:{hex}")).ok()
}

/// The backing file named in a qcow2 header (big-endian: magic, version, then the backing
/// file's offset (u64) and length (u32)).
pub(crate) fn qcow2_backing_file(path: &Path) -> std::io::Result<Option<PathBuf>> {
    use std::os::unix::ffi::OsStrExt;
    let mut file = std::fs::File::open(path)?;
    let mut header = [0u8; 20];
    file.read_exact(&mut header)?;
    if &header[..4] != b"QFI\xfb" {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a qcow2 file",
        ));
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().unwrap_or_default());
    let len = u32::from_be_bytes(header[16..20].try_into().unwrap_or_default()) as usize;
    if offset == 0 || len == 0 {
        return Ok(None);
    }
    if len > 4096 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "backing file name too long",
        ));
    }
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset))?;
    let mut name = vec![0u8; len];
    file.read_exact(&mut name)?;
    Ok(Some(PathBuf::from(std::ffi::OsStr::from_bytes(&name))))
}

/// Removes unreferenced blobs, base disks and stale ingest files. The caller holds the GC
/// lock exclusively.
pub(crate) fn collect(
    store: &ContentStore,
    disks_dir: &Path,
    boxes_dir: &Path,
    templates: &TemplateStore,
) -> BoxliteResult<GcReport> {
    let mut report = GcReport::default();
    let entries = store.entries()?;

    // Live blobs: each named manifest, its config and layers, and the index it came from.
    let mut live: BTreeSet<Digest> = BTreeSet::new();
    let mut manifests: BTreeSet<Digest> = BTreeSet::new();
    for entry in &entries {
        // `entries` took only sha256 digests.
        let digest = Digest::try_from(entry.digest())?;
        live.insert(digest.clone());
        manifests.insert(digest.clone());
        if let Some(index) = annotation(entry, INDEX_DIGEST).and_then(|d| Digest::parse(d).ok()) {
            live.insert(index);
        }
        mark(store, &digest, &mut live, 0);
    }

    let blobs_dir = store.root().join("blobs").join("sha256");
    if let Ok(files) = std::fs::read_dir(&blobs_dir) {
        for file in files.flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            let keep = Digest::parse(&format!("sha256:{name}")).is_ok_and(|d| live.contains(&d));
            if !keep {
                report.bytes_freed += file.metadata().map(|m| m.len()).unwrap_or(0);
                if std::fs::remove_file(file.path()).is_ok() {
                    report.blobs_removed += 1;
                }
            }
        }
    }

    // Templates: kept while their image is named and for boxes whose disks rest on them.
    let chains = box_disk_chains(boxes_dir);
    if let Some(chains) = &chains {
        let in_use: BTreeSet<PathBuf> =
            chains.iter().flat_map(|(_, c)| c.iter().cloned()).collect();
        let removed = templates.gc(&in_use, |manifest| {
            Digest::parse(&manifest.inputs.image).is_ok_and(|d| manifests.contains(&d))
                && manifest.inputs.base_disk.is_file()
        });
        report.templates_removed = removed.removed;
        report.bytes_freed += removed.bytes_freed;
        // Disk layers frozen by forks, once no box rests on them.
        let layers = boxes_dir.parent().unwrap_or(Path::new("/")).join("layers");
        for layer in std::fs::read_dir(&layers).into_iter().flatten().flatten() {
            let path = layer.path();
            if !in_use.contains(&path) {
                report.bytes_freed += layer.metadata().map(|m| m.len()).unwrap_or(0);
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    // Base disks: kept for named images, for boxes and for the templates that remain.
    match chains {
        Some(chains) => {
            let mut keep = manifests.clone();
            let template_chains = templates
                .overlays()
                .into_iter()
                .filter_map(|overlay| backing_chain(&overlay).ok());
            for chain in chains.into_iter().map(|(_, c)| c).chain(template_chains) {
                keep.extend(chain.iter().filter_map(|f| base_disk_digest(f, disks_dir)));
            }
            if let Ok(files) = std::fs::read_dir(disks_dir) {
                for file in files.flatten() {
                    let name = file.file_name().to_string_lossy().into_owned();
                    let Some(hex) = name
                        .strip_prefix("sha256-")
                        .and_then(|n| n.strip_suffix(".ext4").or_else(|| n.strip_suffix(".json")))
                    else {
                        continue;
                    };
                    let Ok(digest) = Digest::parse(&format!("sha256:{hex}")) else {
                        continue;
                    };
                    if !keep.contains(&digest) {
                        report.bytes_freed += file.metadata().map(|m| m.len()).unwrap_or(0);
                        if std::fs::remove_file(file.path()).is_ok() && name.ends_with(".ext4") {
                            report.disks_removed += 1;
                        }
                    }
                }
            }
        }
        None => tracing::warn!("some box overlay is unreadable; base disks were not collected"),
    }

    // Ingest leftovers: blob downloads and base disk builds whose lock nobody holds (their
    // writer died), and anything else old.
    if let Ok(files) = std::fs::read_dir(store.ingest_dir()) {
        for file in files.flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            let hex = |rest: &str| {
                rest.strip_prefix("sha256-")
                    .and_then(|r| r.split('.').next())
                    .map(str::to_owned)
            };
            let remove = if let Some(rest) = name.strip_suffix(".partial") {
                hex(rest).is_none_or(|hex| {
                    !FileLock::is_held(&store.locks_dir().join(format!("blob-{hex}.lock")))
                })
            } else if let Some(hex) = name.strip_suffix(".ext4").and_then(hex) {
                !FileLock::is_held(&store.locks_dir().join(format!("{hex}.lock")))
            } else {
                file.metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .is_some_and(|age| age > STALE_BUILD_AGE)
            };
            if remove {
                report.bytes_freed += file.metadata().map(|m| m.len()).unwrap_or(0);
                let _ = std::fs::remove_file(file.path());
            }
        }
    }

    // Lock files of blobs and base disks that are gone (nobody can be waiting on them: pullers
    // and builders hold the GC lock shared while we hold it exclusively).
    if let Ok(files) = std::fs::read_dir(store.locks_dir()) {
        for file in files.flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            let gone = if let Some(hex) = name
                .strip_prefix("blob-")
                .and_then(|n| n.strip_suffix(".lock"))
            {
                !Digest::parse(&format!("sha256:{hex}")).is_ok_and(|d| store.has_blob(&d))
            } else if let Some(hex) = name.strip_suffix(".lock").filter(|h| h.len() == 64) {
                // A base disk's build lock (builders, too, hold the GC lock shared).
                !disks_dir.join(format!("sha256-{hex}.ext4")).exists()
            } else {
                false
            };
            if gone && !FileLock::is_held(&file.path()) {
                let _ = std::fs::remove_file(file.path());
            }
        }
    }
    if report.blobs_removed + report.disks_removed > 0 {
        tracing::info!(
            blobs = report.blobs_removed,
            disks = report.disks_removed,
            bytes = report.bytes_freed,
            "image garbage collected"
        );
    }
    Ok(report)
}

/// Marks what a manifest or index refers to (an index's manifests, recursively, bounded).
fn mark(store: &ContentStore, digest: &Digest, live: &mut BTreeSet<Digest>, depth: usize) {
    if depth > 2 {
        return;
    }
    let Ok(data) = store.read_blob(digest, 4 * 1024 * 1024) else {
        return;
    };
    let Ok(refs) = serde_json::from_slice::<Refs>(&data) else {
        return;
    };
    let parse = |r: &Ref| Digest::parse(&r.digest).ok();
    if let Some(config) = refs.config.as_ref().and_then(parse) {
        live.insert(config);
    }
    live.extend(refs.layers.iter().filter_map(parse));
    for nested in refs.manifests.iter().filter_map(parse) {
        if store.has_blob(&nested) {
            live.insert(nested.clone());
            mark(store, &nested, live, depth + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_backing_file_of_a_qcow2_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 65536]).unwrap();
        let overlay = dir.path().join("disk.qcow2");
        let Some(qemu_img) = ["/usr/bin/qemu-img", "/bin/qemu-img"]
            .iter()
            .find(|p| Path::new(p).is_file())
        else {
            return; // no qemu-img here: covered by the integration tests
        };
        let status = std::process::Command::new(qemu_img)
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&base)
            .arg(&overlay)
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(qcow2_backing_file(&overlay).unwrap(), Some(base.clone()));
        assert!(qcow2_backing_file(&base).is_err());
    }

    /// A fake qcow2 header naming `backing` (what `qemu-img create -b` writes, enough for us).
    fn overlay(path: &Path, backing: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let name = backing.as_os_str().as_bytes();
        let mut header = vec![0u8; 512];
        header[..4].copy_from_slice(b"QFI\xfb");
        header[4..8].copy_from_slice(&3u32.to_be_bytes());
        header[8..16].copy_from_slice(&512u64.to_be_bytes());
        header[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        header.extend_from_slice(name);
        std::fs::write(path, header).unwrap();
    }

    #[tokio::test]
    async fn collects_what_no_image_and_no_box_references() {
        use oci_spec::image::{Descriptor, MediaType};
        let home = tempfile::tempdir().unwrap();
        let images = home.path().join("images");
        let store = ContentStore::open(&images).unwrap();
        let disks = images.join("disks");
        let boxes = home.path().join("boxes");
        std::fs::create_dir_all(&disks).unwrap();
        std::fs::create_dir_all(boxes.join("b1")).unwrap();

        let put = |data: &[u8]| {
            let d = Digest::of(data);
            std::fs::write(store.blob_path(&d), data).unwrap();
            d
        };
        let (config, layer) = (put(b"{}"), put(b"layer"));
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{config}","size":2}},"layers":[{{"digest":"{layer}","size":5}}]}}"#
        );
        let named = put(manifest.as_bytes());
        let stray = put(b"stray");
        store
            .set_entry(
                "x.io/a:latest",
                Descriptor::new(
                    MediaType::ImageManifest,
                    manifest.len() as u64,
                    named.to_oci(),
                ),
            )
            .await
            .unwrap();
        let disk = |d: &Digest| disks.join(format!("sha256-{}.ext4", d.hex()));
        let (boxed, orphan) = (Digest::of(b"boxed"), Digest::of(b"orphan"));
        for d in [&named, &boxed, &orphan] {
            std::fs::write(disk(d), b"ext4").unwrap();
            std::fs::write(disks.join(format!("sha256-{}.json", d.hex())), b"{}").unwrap();
        }
        overlay(&boxes.join("b1").join("disk.qcow2"), &disk(&boxed));

        let templates = TemplateStore::new(home.path()).unwrap();
        let report = collect(&store, &disks, &boxes, &templates).unwrap();
        assert_eq!((report.blobs_removed, report.disks_removed), (1, 1));
        assert!(!store.has_blob(&stray));
        for d in [&named, &config, &layer] {
            assert!(store.has_blob(d), "{d} was removed");
        }
        assert!(disk(&named).exists() && disk(&boxed).exists() && !disk(&orphan).exists());
        assert!(!disks.join(format!("sha256-{}.json", orphan.hex())).exists());

        // A box overlay that cannot be read: no base disk may go.
        std::fs::write(boxes.join("b1").join("broken.qcow2"), b"garbage").unwrap();
        store.remove_entry("x.io/a:latest").await.unwrap();
        let report = collect(&store, &disks, &boxes, &templates).unwrap();
        assert_eq!((report.blobs_removed, report.disks_removed), (3, 0));
        assert!(disk(&named).exists());
    }

    #[test]
    fn base_disk_names_map_to_manifest_digests() {
        let dir = tempfile::tempdir().unwrap();
        let hex = "b".repeat(64);
        let path = dir.path().join(format!("sha256-{hex}.ext4"));
        assert_eq!(
            base_disk_digest(&path, dir.path()).unwrap().hex(),
            hex.as_str()
        );
        assert!(base_disk_digest(&dir.path().join("other.ext4"), dir.path()).is_none());
        assert!(base_disk_digest(Path::new("/elsewhere/sha256-x.ext4"), dir.path()).is_none());
    }
}
