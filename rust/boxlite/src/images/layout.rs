//! Reading an OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/...`).
//!
//! Everything in a layout is untrusted input: digests are parsed strictly before they name a
//! file, manifests and configs are size-capped and verified against their digests, and layers
//! are verified while they are read.
//!
//! The documents are oci-spec's types (read through `oci.rs`). Hand-written on purpose: the
//! choice of manifest (by ref name, then this host's platform), the size caps and digest
//! checks above, and the verifying layer reader, which hashes the compressed blob and the
//! uncompressed tar in one pass.

use std::io::Read;
use std::path::{Path, PathBuf};

use oci_spec::image::{Arch, Descriptor, ImageIndex, Os, Platform};
use sha2::{Digest as _, Sha256};

use super::config::ImageConfig;
use super::digest::Digest;
use super::oci::{self, Invalid};
use crate::error::{BoxliteError, BoxliteResult};

/// Manifests, indexes and configs larger than this are refused.
const MAX_METADATA_BYTES: u64 = 4 * 1024 * 1024;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
}

/// One layer of a resolved image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRef {
    pub digest: Digest,
    pub size: u64,
    pub compression: LayerCompression,
    /// The digest of the uncompressed tar, from the config's `rootfs.diff_ids`.
    pub diff_id: Digest,
}

/// An image picked out of a layout: its manifest digest (the cache key), config and layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    pub config: ImageConfig,
    pub layers: Vec<LayerRef>,
}

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct OciLayout {
    dir: PathBuf,
}

impl OciLayout {
    /// Opens `dir`, checking that it looks like a layout.
    pub fn open(dir: &Path) -> BoxliteResult<Self> {
        let field = "rootfs_path";
        if !dir.exists() {
            return Err(BoxliteError::invalid(
                field,
                format!("{} does not exist", dir.display()),
            ));
        }
        if !dir.is_dir() {
            return Err(BoxliteError::invalid(
                field,
                format!("{} is not a directory", dir.display()),
            ));
        }
        if !dir.join("index.json").is_file() {
            return Err(BoxliteError::invalid(
                field,
                format!(
                    "{} is not an OCI image layout: it has no index.json",
                    dir.display()
                ),
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of a blob (the digest is already validated).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs").join("sha256").join(digest.hex())
    }

    /// Picks the manifest for this host's platform (tagged `tag` when given) and reads it.
    pub fn resolve(&self, tag: Option<&str>) -> BoxliteResult<ResolvedImage> {
        let index_bytes = read_capped(&self.dir.join("index.json"), MAX_METADATA_BYTES)
            .map_err(|e| self.malformed(format!("reading index.json: {e}")))?;
        let index = self.read_json(&index_bytes, "index.json", oci::index)?;
        let mut candidates: Vec<&Descriptor> = index.manifests().iter().collect();
        if let Some(tag) = tag {
            candidates.retain(|d| oci::ref_name(d) == Some(tag));
        }
        let descriptor = match candidates.as_slice() {
            [] => {
                return Err(BoxliteError::invalid(
                    "rootfs_path",
                    format!(
                        "{} holds no image manifest{}",
                        self.dir.display(),
                        tag.map(|t| format!(" tagged {t:?}")).unwrap_or_default()
                    ),
                ))
            }
            [only] => *only,
            many => *many
                .iter()
                .find(|d| platform_matches(d.platform().as_ref()))
                .unwrap_or(&many[0]),
        };
        let mut digest = self.parse_digest(descriptor.digest())?;
        let mut bytes = self.read_verified(&digest, descriptor.size())?;
        // A nested index (multi-platform image): choose our platform.
        if oci::is_index(descriptor.media_type()) {
            let nested: ImageIndex =
                self.read_json(&bytes, &format!("image index {digest}"), oci::index)?;
            let Some(chosen) = nested
                .manifests()
                .iter()
                .find(|d| platform_matches(d.platform().as_ref()))
            else {
                let available: Vec<String> = nested
                    .manifests()
                    .iter()
                    .filter_map(|d| {
                        d.platform()
                            .as_ref()
                            .map(|p| format!("{}/{}", p.os(), p.architecture()))
                    })
                    .collect();
                return Err(BoxliteError::image_not_found(format!(
                    "{} has no manifest for linux/{}; it has: {}",
                    self.dir.display(),
                    oci_arch(),
                    available.join(", ")
                )));
            };
            digest = self.parse_digest(chosen.digest())?;
            bytes = self.read_verified(&digest, chosen.size())?;
        }
        let manifest = self.read_json(&bytes, &format!("manifest {digest}"), oci::manifest)?;
        if manifest.media_type().as_ref().is_some_and(oci::is_index) {
            return Err(self.malformed("an index nested more than one level deep".into()));
        }
        let config_digest = self.parse_digest(manifest.config().digest())?;
        let config_bytes = self.read_verified(&config_digest, manifest.config().size())?;
        let config = ImageConfig::from_json(&config_bytes).map_err(|e| self.malformed(e))?;
        let rootfs = oci::config(&config_bytes)
            .map_err(|e| self.malformed(format!("config rootfs: {e}")))?;
        let diff_ids = rootfs.rootfs().diff_ids();
        if diff_ids.len() != manifest.layers().len() {
            return Err(self.malformed(format!(
                "the manifest lists {} layers but the config {} diff_ids",
                manifest.layers().len(),
                diff_ids.len()
            )));
        }
        let layers = manifest
            .layers()
            .iter()
            .zip(diff_ids)
            .map(|(layer, diff_id)| {
                Ok(LayerRef {
                    digest: self.parse_digest(layer.digest())?,
                    size: layer.size(),
                    compression: oci::layer_compression(layer.media_type()).ok_or_else(|| {
                        BoxliteError::Unsupported(format!(
                            "layer media type {:?}",
                            layer.media_type().to_string()
                        ))
                    })?,
                    diff_id: self.parse_digest(diff_id)?,
                })
            })
            .collect::<BoxliteResult<Vec<_>>>()?;
        Ok(ResolvedImage {
            manifest_digest: digest,
            config_digest,
            config,
            layers,
        })
    }

    /// Opens a layer for reading; the returned reader yields the *uncompressed* tar and checks
    /// both digests and the size when it reaches the end.
    pub fn open_layer(&self, layer: &LayerRef) -> BoxliteResult<VerifiedLayerReader> {
        let path = self.blob_path(&layer.digest);
        let file = std::fs::File::open(&path)
            .map_err(|e| self.malformed(format!("layer {}: {e}", layer.digest)))?;
        Ok(VerifiedLayerReader::new(Box::new(file), layer.clone()))
    }

    fn parse_digest(&self, text: impl AsRef<str>) -> BoxliteResult<Digest> {
        let text = text.as_ref();
        Digest::parse(text).map_err(|_| self.malformed(format!("invalid digest {text:?}")))
    }

    /// Parses a size-capped JSON document with an `oci` reader; errors name `what`.
    fn read_json<T>(
        &self,
        bytes: &[u8],
        what: &str,
        read: fn(serde_json::Value) -> Result<T, Invalid>,
    ) -> BoxliteResult<T> {
        serde_json::from_slice(bytes)
            .map_err(Invalid::Json)
            .and_then(read)
            .map_err(|e| match e {
                Invalid::Digest(text) => self.malformed(format!("invalid digest {text:?}")),
                Invalid::Json(e) => self.malformed(format!("{what}: {e}")),
            })
    }

    fn read_verified(&self, digest: &Digest, size: u64) -> BoxliteResult<Vec<u8>> {
        if size > MAX_METADATA_BYTES {
            return Err(self.malformed(format!(
                "{digest} is {size} bytes, more than the {MAX_METADATA_BYTES} allowed"
            )));
        }
        let bytes = read_capped(&self.blob_path(digest), MAX_METADATA_BYTES)
            .map_err(|e| self.malformed(format!("blob {digest}: {e}")))?;
        if bytes.len() as u64 != size || Digest::of(&bytes) != *digest {
            return Err(self.malformed(format!("blob {digest} does not match its digest or size")));
        }
        Ok(bytes)
    }

    fn malformed(&self, what: String) -> BoxliteError {
        BoxliteError::pull_failed(self.dir.display().to_string(), what)
    }
}

fn read_capped(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::new();
    std::fs::File::open(path)?
        .take(cap + 1)
        .read_to_end(&mut data)?;
    if data.len() as u64 > cap {
        return Err(std::io::Error::other(format!("larger than {cap} bytes")));
    }
    Ok(data)
}

/// The OCI name of this host's architecture.
pub(crate) fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn platform_matches(platform: Option<&Platform>) -> bool {
    platform.is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::from(oci_arch()))
}

/// Counts and hashes bytes as they pass.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// The compressed side of a layer stream, hashed as it is read.
enum BlobStream {
    Plain(Hashing<Box<dyn Read + Send>>),
    Gzip(flate2::read::MultiGzDecoder<Hashing<Box<dyn Read + Send>>>),
}

impl BlobStream {
    fn blob(&mut self) -> &mut Hashing<Box<dyn Read + Send>> {
        match self {
            Self::Plain(h) => h,
            Self::Gzip(gz) => gz.get_mut(),
        }
    }
}

impl Read for BlobStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(h) => h.read(buf),
            Self::Gzip(gz) => gz.read(buf),
        }
    }
}

/// The uncompressed bytes of a layer; at the end of the stream it checks the blob digest,
/// blob size and diff_id, and fails the read that would have returned EOF if any differs.
pub struct VerifiedLayerReader {
    inner: Hashing<BlobStream>,
    layer: LayerRef,
    verified: bool,
}

impl std::fmt::Debug for VerifiedLayerReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedLayerReader")
            .field("layer", &self.layer.digest)
            .finish()
    }
}

impl VerifiedLayerReader {
    pub fn new(blob: Box<dyn Read + Send>, layer: LayerRef) -> Self {
        let blob = Hashing {
            inner: blob,
            hasher: Sha256::new(),
            count: 0,
        };
        let stream = match layer.compression {
            LayerCompression::None => BlobStream::Plain(blob),
            LayerCompression::Gzip => BlobStream::Gzip(flate2::read::MultiGzDecoder::new(blob)),
        };
        Self {
            inner: Hashing {
                inner: stream,
                hasher: Sha256::new(),
                count: 0,
            },
            layer,
            verified: false,
        }
    }

    /// Uncompressed bytes read so far.
    pub fn uncompressed_len(&self) -> u64 {
        self.inner.count
    }

    fn verify(&mut self) -> std::io::Result<()> {
        let fail = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        let diff_id = Digest::from_hasher(std::mem::replace(&mut self.inner.hasher, Sha256::new()));
        let blob = self.inner.inner.blob();
        // Trailing bytes after the compressed stream still count toward the blob digest.
        std::io::copy(blob, &mut std::io::sink())?;
        let blob_len = blob.count;
        let blob_digest = Digest::from_hasher(std::mem::replace(&mut blob.hasher, Sha256::new()));
        if blob_digest != self.layer.digest {
            return Err(fail(format!(
                "layer blob digest mismatch: expected {}, got {blob_digest}",
                self.layer.digest
            )));
        }
        if blob_len != self.layer.size {
            return Err(fail(format!(
                "layer {} is {blob_len} bytes, the manifest says {}",
                self.layer.digest, self.layer.size
            )));
        }
        if diff_id != self.layer.diff_id {
            return Err(fail(format!(
                "layer {} uncompresses to {diff_id}, the config says {}",
                self.layer.digest, self.layer.diff_id
            )));
        }
        Ok(())
    }
}

impl Read for VerifiedLayerReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() && !self.verified {
            self.verify()?;
            self.verified = true;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn layer_of(tar: &[u8], blob: &[u8]) -> LayerRef {
        LayerRef {
            digest: Digest::of(blob),
            size: blob.len() as u64,
            compression: LayerCompression::Gzip,
            diff_id: Digest::of(tar),
        }
    }

    fn read_all(blob: Vec<u8>, layer: LayerRef) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        VerifiedLayerReader::new(Box::new(std::io::Cursor::new(blob)), layer)
            .read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn a_good_layer_reads_through() {
        let tar = b"pretend tar".repeat(1000);
        let blob = gzip(&tar);
        assert_eq!(read_all(blob.clone(), layer_of(&tar, &blob)).unwrap(), tar);
    }

    #[test]
    fn corrupt_truncated_or_mislabelled_layers_fail_at_the_end() {
        let tar = b"pretend tar".repeat(1000);
        let blob = gzip(&tar);
        let layer = layer_of(&tar, &blob);

        let mut corrupt = blob.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        assert!(read_all(corrupt, layer.clone()).is_err());

        let truncated = blob[..blob.len() / 2].to_vec();
        assert!(read_all(truncated, layer.clone()).is_err());

        let wrong_diff = LayerRef {
            diff_id: Digest::of(b"other"),
            ..layer.clone()
        };
        let err = read_all(blob.clone(), wrong_diff).unwrap_err();
        assert!(err.to_string().contains("uncompresses to"), "{err}");

        let wrong_size = LayerRef {
            size: layer.size + 1,
            ..layer
        };
        assert!(read_all(blob, wrong_size).is_err());
    }

    fn write_layout(dir: &Path, manifest_size_delta: i64) -> Digest {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let put = |data: &[u8]| {
            let d = Digest::of(data);
            std::fs::write(blobs.join(d.hex()), data).unwrap();
            d
        };
        let tar = b"layer".to_vec();
        let blob = gzip(&tar);
        let layer = put(&blob);
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"]}},"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
            Digest::of(&tar)
        );
        let config_digest = put(config.as_bytes());
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer}","size":{}}}]}}"#,
            config.len(),
            blob.len()
        );
        let manifest_digest = put(manifest.as_bytes());
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest_digest}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"latest"}}}}]}}"#,
            manifest.len() as i64 + manifest_size_delta
        );
        std::fs::write(dir.join("index.json"), index).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        manifest_digest
    }

    #[test]
    fn resolves_a_layout() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = write_layout(dir.path(), 0);
        let layout = OciLayout::open(dir.path()).unwrap();
        let image = layout.resolve(None).unwrap();
        assert_eq!(image.manifest_digest, manifest);
        assert_eq!(image.layers.len(), 1);
        assert_eq!(image.config.env, vec![("PATH".into(), "/bin".into())]);
        assert_eq!(layout.resolve(Some("latest")).unwrap(), image);
        let err = layout.resolve(Some("nope")).unwrap_err();
        assert!(
            err.to_string()
                .contains("no image manifest tagged \"nope\""),
            "{err}"
        );
        let mut reader = layout.open_layer(&image.layers[0]).unwrap();
        let mut tar = Vec::new();
        reader.read_to_end(&mut tar).unwrap();
        assert_eq!(tar, b"layer");
    }

    #[test]
    fn rejects_what_is_not_a_layout() {
        let dir = tempfile::tempdir().unwrap();
        let missing = OciLayout::open(&dir.path().join("nope")).unwrap_err();
        assert!(missing.to_string().contains("does not exist"));
        let empty = OciLayout::open(dir.path()).unwrap_err();
        assert!(empty.to_string().contains("no index.json"));
        std::fs::write(
            dir.path().join("index.json"),
            r#"{"schemaVersion":2,"manifests":[]}"#,
        )
        .unwrap();
        let err = OciLayout::open(dir.path())
            .unwrap()
            .resolve(None)
            .unwrap_err();
        assert!(err.to_string().contains("holds no image manifest"), "{err}");
        std::fs::write(
            dir.path().join("index.json"),
            r#"{"manifests":[{"digest":"sha256:../../x","size":1}]}"#,
        )
        .unwrap();
        let err = OciLayout::open(dir.path())
            .unwrap()
            .resolve(None)
            .unwrap_err();
        assert!(err.to_string().contains("invalid digest"), "{err}");
    }

    #[test]
    fn a_manifest_that_does_not_match_its_descriptor_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_layout(dir.path(), 1);
        let err = OciLayout::open(dir.path())
            .unwrap()
            .resolve(None)
            .unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }
}
