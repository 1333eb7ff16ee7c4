//! The content store: an OCI image layout at `<home>/images/store` whose immutable blobs are
//! addressed by digest and whose mutable `index.json` maps normalized references to manifests.
//!
//! Blobs are written the containerd way: streamed into `<home>/images/ingest/`, counted and
//! hashed on the way, and renamed into `blobs/sha256/` only when size and digest match, so a
//! truncated or corrupt download is never visible. A per-digest `flock` in
//! `<home>/images/locks/` makes concurrent pullers (tasks or processes) download a blob once:
//! the first writes it, the others find it when they get the lock. `index.json` is rewritten
//! atomically (temporary file, rename) under its own lock.
//!
//! Everything that adds content holds the store's *shared* GC lock; the garbage collector takes
//! it exclusively, so it never sees a half-pulled image.
//!
//! `index.json` is oci-spec's `ImageIndex` of `Descriptor`s. Hand-written on purpose: the
//! ingest path above (streamed, hashed and size-checked before the rename), which no OCI
//! crate here provides.

use std::io::Write;
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageIndex, MediaType, ANNOTATION_REF_NAME};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use super::digest::Digest;
use super::layout::OciLayout;
use super::oci::{self, ref_name, Invalid};
use crate::error::{BoxliteError, BoxliteResult, IoContext, StorageError};
use crate::fsutil::{sync_dir, write_atomically, FileLock, LockMode, RemoveOnDrop};

/// When the image was pulled (Unix seconds), on the index entry.
pub const PULLED_AT: &str = "io.boxlite.image.pulled";
/// The image index (multi-platform) the manifest was picked from, if any.
pub const INDEX_DIGEST: &str = "io.boxlite.image.index";

/// The content store of one runtime home.
#[derive(Debug, Clone)]
pub(crate) struct ContentStore {
    root: PathBuf,
    ingest: PathBuf,
    locks: PathBuf,
}

/// How a blob got into the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Committed {
    /// Already there (pulled before, or by a concurrent puller while we waited).
    Present,
    /// Written now by us.
    Written,
}

impl ContentStore {
    /// Opens (creating) `<images>/store` as an OCI layout, with `ingest/` and `locks/` beside it.
    pub fn open(images_dir: &Path) -> BoxliteResult<Self> {
        let store = Self {
            root: images_dir.join("store"),
            ingest: images_dir.join("ingest"),
            locks: images_dir.join("locks"),
        };
        for dir in [
            store.root.join("blobs").join("sha256"),
            store.ingest.clone(),
            store.locks.clone(),
        ] {
            std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        }
        let marker = store.root.join("oci-layout");
        if !marker.is_file() {
            write_atomically(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        if !store.index_path().is_file() {
            let empty = new_index(vec![]);
            let _lock =
                FileLock::acquire_blocking(&store.locks.join("index.lock"), LockMode::Exclusive)?;
            if !store.index_path().is_file() {
                store.write_index(&empty)?;
            }
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn ingest_dir(&self) -> &Path {
        &self.ingest
    }

    pub fn locks_dir(&self) -> &Path {
        &self.locks
    }

    /// The store as an OCI layout, for `resolve` and `open_layer`.
    pub fn layout(&self) -> BoxliteResult<OciLayout> {
        OciLayout::open(&self.root)
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join("sha256").join(digest.hex())
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    /// Reads a small verified blob (a manifest or config).
    pub fn read_blob(&self, digest: &Digest, cap: u64) -> BoxliteResult<Vec<u8>> {
        use std::io::Read;
        let path = self.blob_path(digest);
        let mut data = Vec::new();
        std::fs::File::open(&path)
            .ctx(|| format!("reading {}", path.display()))?
            .take(cap + 1)
            .read_to_end(&mut data)
            .ctx(|| format!("reading {}", path.display()))?;
        if data.len() as u64 > cap || Digest::of(&data) != *digest {
            return Err(StorageError::Damaged {
                path: path.display().to_string(),
                reason: format!("it does not hash to {digest}; remove the image and pull it again"),
            }
            .into());
        }
        Ok(data)
    }

    /// Stores a small blob already in memory (verified against `digest`).
    pub async fn put_bytes(
        &self,
        reference: &str,
        digest: &Digest,
        data: Vec<u8>,
    ) -> BoxliteResult<Committed> {
        let size = data.len() as u64;
        let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(data)]);
        self.ingest_stream(
            reference,
            digest,
            size,
            |_| {},
            || async move { Ok(stream) },
        )
        .await
    }

    /// Commits the blob `digest` of `size` bytes, calling `open` for its bytes only if it is
    /// not in the store yet. Holds the blob's lock across the download so concurrent callers
    /// (in this process or others) wait for the first one and then find the blob present.
    /// `progress` gets the bytes written so far; errors name `reference`.
    pub async fn ingest_stream<S, B, F, Fut>(
        &self,
        reference: &str,
        digest: &Digest,
        size: u64,
        progress: impl Fn(u64) + Send,
        open: F,
    ) -> BoxliteResult<Committed>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = BoxliteResult<S>>,
        S: futures_util::Stream<Item = std::io::Result<B>> + Unpin,
        B: AsRef<[u8]> + Send + 'static,
    {
        use futures_util::StreamExt;
        if self.has_blob(digest) {
            return Ok(Committed::Present);
        }
        let _lock = self
            .lock(format!("blob-{}.lock", digest.hex()), LockMode::Exclusive)
            .await?;
        if self.has_blob(digest) {
            return Ok(Committed::Present);
        }
        let partial = self.ingest.join(format!(
            "sha256-{}.{}.partial",
            digest.hex(),
            ulid::Ulid::new()
        ));
        let mut stream = open().await?;
        // Created here, not on the writer thread, so the guard always covers it.
        let file =
            std::fs::File::create(&partial).ctx(|| format!("creating {}", partial.display()))?;
        let guard = RemoveOnDrop(Some(partial.clone()));

        // The file is written and hashed on a blocking thread fed through a bounded channel.
        let (tx, mut rx) = mpsc::channel::<B>(16);
        let writer = tokio::task::spawn_blocking(move || -> std::io::Result<(Digest, u64)> {
            let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
            let mut hasher = Sha256::new();
            let mut written = 0u64;
            while let Some(chunk) = rx.blocking_recv() {
                let chunk = chunk.as_ref();
                hasher.update(chunk);
                out.write_all(chunk)?;
                written += chunk.len() as u64;
            }
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            Ok((Digest::from_hasher(hasher), written))
        });

        let mut received = 0u64;
        let mut failure: Option<String> = None;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => {
                    received += chunk.as_ref().len() as u64;
                    if received > size {
                        failure = Some(format!(
                            "the registry sent more than the {size} bytes the manifest declares"
                        ));
                        break;
                    }
                    if tx.send(chunk).await.is_err() {
                        break;
                    }
                    progress(received);
                }
                Err(e) => {
                    failure = Some(format!("the download broke off: {e}"));
                    break;
                }
            }
        }
        drop(tx);
        drop(stream);
        let written = writer
            .await
            .map_err(|e| BoxliteError::Internal(format!("blob writer failed: {e}")))?;
        let reject = |why: String| {
            BoxliteError::pull_failed(
                reference.to_owned(),
                format!("blob {digest} rejected: {why}"),
            )
        };
        if let Some(why) = failure {
            return Err(reject(why));
        }
        let (actual, count) =
            written.map_err(|e| BoxliteError::io(format!("writing {}", partial.display()), e))?;
        if count != size {
            return Err(reject(format!(
                "got {count} bytes, the manifest declares {size}"
            )));
        }
        if actual != *digest {
            return Err(reject(format!("its content hashes to {actual}")));
        }
        let target = self.blob_path(digest);
        std::fs::rename(&partial, &target).ctx(|| format!("committing {}", target.display()))?;
        guard.disarm();
        sync_dir(&self.root.join("blobs").join("sha256"));
        Ok(Committed::Written)
    }

    /// Every entry of `index.json`. Their digests are checked with [`Digest`] (sha256 only),
    /// so callers convert them without a failure.
    pub fn entries(&self) -> BoxliteResult<Vec<Descriptor>> {
        let data = std::fs::read(self.index_path())
            .ctx(|| format!("reading {}", self.index_path().display()))?;
        let damaged = |reason: String| {
            BoxliteError::from(StorageError::Damaged {
                path: self.index_path().display().to_string(),
                reason: format!("{reason}; fix or remove it"),
            })
        };
        let index = serde_json::from_slice(&data)
            .map_err(Invalid::Json)
            .and_then(oci::index)
            .map_err(|e| match e {
                Invalid::Digest(text) => damaged(format!("invalid digest {text:?}")),
                Invalid::Json(e) => damaged(e.to_string()),
            })?;
        if let Some(bad) = index
            .manifests()
            .iter()
            .find(|d| Digest::try_from(d.digest()).is_err())
        {
            return Err(damaged(format!(
                "invalid digest {:?}",
                bad.digest().as_ref()
            )));
        }
        Ok(index.manifests().clone())
    }

    /// The entry named `name` (a normalized reference).
    pub fn entry(&self, name: &str) -> BoxliteResult<Option<Descriptor>> {
        Ok(self
            .entries()?
            .into_iter()
            .find(|d| ref_name(d) == Some(name)))
    }

    /// Points `name` at `descriptor` (replacing what it pointed at).
    pub async fn set_entry(&self, name: &str, mut descriptor: Descriptor) -> BoxliteResult<()> {
        let mut annotations = descriptor.annotations().clone().unwrap_or_default();
        annotations.insert(ANNOTATION_REF_NAME.into(), name.into());
        descriptor.set_annotations(Some(annotations));
        self.update_index(move |entries| {
            entries.retain(|d| ref_name(d) != ref_name(&descriptor));
            entries.push(descriptor);
            entries.sort_by(|a, b| ref_name(a).cmp(&ref_name(b)));
            true
        })
        .await
        .map(|_| ())
    }

    /// Removes `name` from the index; returns the entry it had.
    pub async fn remove_entry(&self, name: &str) -> BoxliteResult<Option<Descriptor>> {
        let name = name.to_owned();
        let mut removed = None;
        self.update_index(|entries| {
            if let Some(i) = entries
                .iter()
                .position(|d| ref_name(d) == Some(name.as_str()))
            {
                removed = Some(entries.remove(i));
                true
            } else {
                false
            }
        })
        .await?;
        Ok(removed)
    }

    /// Reads, edits and atomically rewrites `index.json` under its lock; `edit` returns
    /// whether anything changed.
    async fn update_index(
        &self,
        edit: impl FnOnce(&mut Vec<Descriptor>) -> bool,
    ) -> BoxliteResult<()> {
        let _lock = self.lock("index.lock".into(), LockMode::Exclusive).await?;
        let mut entries = self.entries()?;
        if edit(&mut entries) {
            self.write_index(&new_index(entries))?;
        }
        Ok(())
    }

    fn write_index(&self, index: &ImageIndex) -> BoxliteResult<()> {
        // Through a `Value`, whose maps are sorted, so the annotations (a `HashMap` in
        // oci-spec) come out in the same order every time.
        let data = serde_json::to_value(index)
            .and_then(|value| serde_json::to_vec_pretty(&value))
            .map_err(|e| BoxliteError::Internal(format!("serializing index.json: {e}")))?;
        write_atomically(&self.index_path(), &data)
    }

    /// The lock every writer of the store holds shared; GC holds it exclusively.
    pub async fn lock_gc(&self, exclusive: bool) -> BoxliteResult<FileLock> {
        let mode = if exclusive {
            LockMode::Exclusive
        } else {
            LockMode::Shared
        };
        self.lock("gc.lock".into(), mode).await
    }

    /// Takes `locks/<name>` in `mode`, waiting off the async threads.
    async fn lock(&self, name: String, mode: LockMode) -> BoxliteResult<FileLock> {
        FileLock::acquire(self.locks.join(name), mode).await
    }
}

/// `index.json` as it is written: schema version 2, the OCI index media type, `manifests`.
fn new_index(manifests: Vec<Descriptor>) -> ImageIndex {
    let mut index = ImageIndex::default();
    index.set_media_type(Some(MediaType::ImageIndex));
    index.set_manifests(manifests);
    index
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn chunks(data: &[u8]) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> + Unpin {
        let parts: Vec<std::io::Result<Vec<u8>>> = data.chunks(7).map(|c| Ok(c.to_vec())).collect();
        futures_util::stream::iter(parts)
    }

    fn leftovers(store: &ContentStore) -> usize {
        std::fs::read_dir(store.ingest_dir()).unwrap().count()
    }

    #[tokio::test]
    async fn a_good_blob_is_committed_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let data = b"hello blob".repeat(100);
        let digest = Digest::of(&data);
        let seen = std::sync::Mutex::new(0u64);
        let got = store
            .ingest_stream(
                "t",
                &digest,
                data.len() as u64,
                |n| *seen.lock().unwrap() = n,
                || async { Ok(chunks(&data)) },
            )
            .await
            .unwrap();
        assert_eq!(got, Committed::Written);
        assert_eq!(*seen.lock().unwrap(), data.len() as u64);
        assert_eq!(std::fs::read(store.blob_path(&digest)).unwrap(), data);
        let opened = AtomicUsize::new(0);
        let again = store
            .ingest_stream(
                "t",
                &digest,
                data.len() as u64,
                |_| {},
                || async {
                    opened.fetch_add(1, Ordering::SeqCst);
                    Ok(chunks(&data))
                },
            )
            .await
            .unwrap();
        assert_eq!(again, Committed::Present);
        assert_eq!(
            opened.load(Ordering::SeqCst),
            0,
            "a present blob is not downloaded"
        );
        assert_eq!(leftovers(&store), 0);
    }

    #[tokio::test]
    async fn corrupt_truncated_and_oversized_blobs_are_never_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let data = b"the real content".repeat(50);
        let digest = Digest::of(&data);
        let size = data.len() as u64;

        let mut corrupt = data.clone();
        corrupt[100] ^= 1;
        let err = store
            .ingest_stream(
                "t",
                &digest,
                size,
                |_| {},
                || async { Ok(chunks(&corrupt)) },
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("hashes to"), "{err}");

        let truncated = data[..data.len() - 1].to_vec();
        let err = store
            .ingest_stream(
                "t",
                &digest,
                size,
                |_| {},
                || async { Ok(chunks(&truncated)) },
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("declares"), "{err}");

        let mut longer = data.clone();
        longer.push(0);
        let err = store
            .ingest_stream("t", &digest, size, |_| {}, || async { Ok(chunks(&longer)) })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");

        let broken = futures_util::stream::iter(vec![
            Ok(data[..10].to_vec()),
            Err(std::io::Error::other("connection reset")),
        ]);
        let err = store
            .ingest_stream("t", &digest, size, |_| {}, || async { Ok(broken) })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("connection reset"), "{err}");

        assert!(!store.has_blob(&digest));
        assert_eq!(leftovers(&store), 0, "partial downloads must be cleaned up");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_ingests_of_one_blob_download_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let data = Arc::new(b"shared layer".repeat(10_000));
        let digest = Digest::of(&data);
        let downloads = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let (store, data, digest, downloads) = (
                store.clone(),
                data.clone(),
                digest.clone(),
                downloads.clone(),
            );
            tasks.push(tokio::spawn(async move {
                store
                    .ingest_stream(
                        "t",
                        &digest,
                        data.len() as u64,
                        |_| {},
                        || async {
                            downloads.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            Ok(chunks(&data))
                        },
                    )
                    .await
            }));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(downloads.load(Ordering::SeqCst), 1);
        assert!(store.has_blob(&digest));
    }

    #[tokio::test]
    async fn the_index_maps_names_to_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let d = |data: &[u8]| {
            Descriptor::new(
                MediaType::ImageManifest,
                data.len() as u64,
                Digest::of(data).to_oci(),
            )
        };
        store
            .set_entry("docker.io/library/b:latest", d(b"b"))
            .await
            .unwrap();
        store
            .set_entry("docker.io/library/a:latest", d(b"a"))
            .await
            .unwrap();
        store
            .set_entry("docker.io/library/b:latest", d(b"b2"))
            .await
            .unwrap();
        let entries = store.entries().unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(ref_name(&entries[0]), Some("docker.io/library/a:latest"));
        let b = store.entry("docker.io/library/b:latest").unwrap().unwrap();
        assert!(Digest::of(b"b2") == *b.digest());
        let removed = store
            .remove_entry("docker.io/library/a:latest")
            .await
            .unwrap();
        assert!(removed.is_some());
        assert!(store.remove_entry("nope").await.unwrap().is_none());
        assert_eq!(store.entries().unwrap().len(), 1);
        // The store stays a valid OCI layout.
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(store.root().join("index.json")).unwrap())
                .unwrap();
        assert_eq!(index["schemaVersion"], 2);
        assert!(store.root().join("oci-layout").is_file());
    }

    /// `index.json` byte for byte as the previous release wrote it (its own serde types,
    /// pretty-printed): an existing home must still read.
    const PREVIOUS_INDEX: &str = r#"{
  "schemaVersion": 2,
  "mediaType": "application/vnd.oci.image.index.v1+json",
  "manifests": [
    {
      "mediaType": "application/vnd.oci.image.manifest.v1+json",
      "digest": "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc",
      "size": 567,
      "platform": {
        "architecture": "amd64",
        "os": "linux"
      },
      "annotations": {
        "io.boxlite.image.pulled": "1764630001",
        "org.opencontainers.image.ref.name": "127.0.0.1:5000/app:v1"
      }
    },
    {
      "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
      "digest": "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
      "size": 1234,
      "platform": {
        "architecture": "arm64",
        "os": "linux",
        "variant": "v8"
      },
      "annotations": {
        "io.boxlite.image.index": "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
        "io.boxlite.image.pulled": "1764630000",
        "org.opencontainers.image.ref.name": "docker.io/library/alpine:latest"
      }
    }
  ]
}"#;

    /// The previous release's reader of `index.json`, verbatim: what we write must still
    /// parse with it (and so with an older boxlite sharing the home).
    mod previous {
        use super::super::Digest;
        use serde::Deserialize;
        use std::collections::BTreeMap;

        #[derive(Deserialize)]
        pub struct Index {
            #[serde(rename = "schemaVersion")]
            pub schema_version: u32,
            #[serde(rename = "mediaType", default)]
            pub media_type: String,
            #[serde(default)]
            pub manifests: Vec<Descriptor>,
        }

        #[derive(Deserialize)]
        pub struct Descriptor {
            #[serde(rename = "mediaType")]
            pub media_type: String,
            pub digest: Digest,
            pub size: u64,
            #[serde(default)]
            pub platform: Option<Platform>,
            #[serde(default)]
            pub annotations: BTreeMap<String, String>,
        }

        #[derive(Deserialize)]
        pub struct Platform {
            pub architecture: String,
            pub os: String,
            #[serde(default)]
            pub variant: Option<String>,
        }
    }

    #[tokio::test]
    async fn an_index_written_by_the_previous_release_reads_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        std::fs::write(store.root().join("index.json"), PREVIOUS_INDEX).unwrap();

        let entries = store.entries().unwrap();
        assert_eq!(entries.len(), 2);
        let alpine = store
            .entry("docker.io/library/alpine:latest")
            .unwrap()
            .unwrap();
        assert_eq!(
            alpine.media_type().to_string(),
            "application/vnd.docker.distribution.manifest.v2+json"
        );
        assert!(Digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap() == *alpine.digest());
        assert_eq!(alpine.size(), 1234);
        let platform = alpine.platform().as_ref().unwrap();
        assert_eq!(
            (
                platform.os().to_string(),
                platform.architecture().to_string(),
                platform.variant().as_deref()
            ),
            ("linux".into(), "arm64".into(), Some("v8"))
        );
        assert_eq!(
            oci::annotation(&alpine, INDEX_DIGEST),
            Some(format!("sha256:{}", "b".repeat(64)).as_str())
        );
        assert_eq!(oci::annotation(&alpine, PULLED_AT), Some("1764630000"));

        // Rewritten by us, it still parses with the previous reader, entries unchanged.
        let new = Descriptor::new(MediaType::ImageManifest, 9, Digest::of(b"new").to_oci());
        store.set_entry("x.io/new:1", new).await.unwrap();
        let written = std::fs::read(store.root().join("index.json")).unwrap();
        let old: previous::Index = serde_json::from_slice(&written).unwrap();
        assert_eq!(old.schema_version, 2);
        assert_eq!(old.media_type, "application/vnd.oci.image.index.v1+json");
        let names: Vec<&str> = old
            .manifests
            .iter()
            .map(|d| d.annotations[ANNOTATION_REF_NAME].as_str())
            .collect();
        assert_eq!(
            names,
            [
                "127.0.0.1:5000/app:v1",
                "docker.io/library/alpine:latest",
                "x.io/new:1"
            ]
        );
        let alpine = &old.manifests[1];
        assert_eq!(
            alpine.media_type,
            "application/vnd.docker.distribution.manifest.v2+json"
        );
        assert_eq!(alpine.digest.hex(), "a".repeat(64));
        assert_eq!(alpine.size, 1234);
        let platform = alpine.platform.as_ref().unwrap();
        assert_eq!(
            (platform.os.as_str(), platform.architecture.as_str()),
            ("linux", "arm64")
        );
        assert_eq!(platform.variant.as_deref(), Some("v8"));
        assert_eq!(alpine.annotations[PULLED_AT], "1764630000");
        assert!(old.manifests[2].platform.is_none());
        assert_eq!(old.manifests[2].digest, Digest::of(b"new"));
    }

    #[test]
    fn a_damaged_index_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let path = store.root().join("index.json");
        for bad in [
            "{not json".to_owned(),
            r#"{"manifests":[{"mediaType":"x","digest":"sha256:../../x","size":1}]}"#.to_owned(),
            // A well-formed digest of an algorithm the store does not use.
            format!(
                r#"{{"manifests":[{{"mediaType":"x","digest":"sha512:{}","size":1}}]}}"#,
                "a".repeat(128)
            ),
        ] {
            std::fs::write(&path, &bad).unwrap();
            let err = store.entries().unwrap_err();
            assert!(
                matches!(err, BoxliteError::Storage(StorageError::Damaged { .. })),
                "{bad}: {err:?}"
            );
        }
    }
}
