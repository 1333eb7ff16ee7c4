//! oci-spec's image types read from untrusted JSON, and the few rules we add on top.
//!
//! Indexes, manifests, descriptors, platforms, media types and the config's `rootfs` are
//! `oci_spec::image` types. Hand-written on purpose:
//! - *fitting* the JSON before oci-spec reads it: oci-spec follows the spec to the letter,
//!   while Go's JSON (Docker, skopeo, umoci, registries) and our readers so far accept a
//!   missing `schemaVersion`, a descriptor without `mediaType`, a platform without `os` or
//!   `architecture` and a config without `rootfs.type`; those are filled in so the same
//!   documents keep working;
//! - checking every descriptor digest first, so a malformed one is reported by name (as
//!   before) rather than as a serde message. Callers still parse each digest they use with
//!   [`Digest`](super::digest::Digest), which allows sha256 only, before it names a file;
//! - which media types we take: oci-spec's, or their Docker v2 schema 2 names, and the layer
//!   compressions we can read (zstd is not one: callers refuse it as unsupported).

use oci_spec::image::{
    Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType, ToDockerV2S2,
    ANNOTATION_REF_NAME,
};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::layout::LayerCompression;

/// Why a document does not fit oci-spec's type.
#[derive(Debug)]
pub(crate) enum Invalid {
    /// A descriptor's digest is not a digest at all (the text, quoted by callers).
    Digest(String),
    /// Not JSON, or a field of the wrong shape (serde's message).
    Json(serde_json::Error),
}

/// An image index (or the index of an OCI layout).
pub(crate) fn index(doc: Value) -> Result<ImageIndex, Invalid> {
    read(doc, |doc| fill(doc, "manifests", json!([])))
}

/// An image manifest.
pub(crate) fn manifest(doc: Value) -> Result<ImageManifest, Invalid> {
    read(doc, |_| {})
}

fn read<T: DeserializeOwned>(mut doc: Value, fit: impl FnOnce(&mut Value)) -> Result<T, Invalid> {
    // Missing reads as 0, "unknown"; whoever cares checks it (pull wants 2).
    fill(&mut doc, "schemaVersion", json!(0));
    fit(&mut doc);
    for key in ["config", "subject"] {
        if let Some(descriptor) = doc.get_mut(key) {
            fit_descriptor(descriptor)?;
        }
    }
    for key in ["manifests", "layers"] {
        if let Some(Value::Array(list)) = doc.get_mut(key) {
            list.iter_mut().try_for_each(fit_descriptor)?;
        }
    }
    serde_json::from_value(doc).map_err(Invalid::Json)
}

fn fit_descriptor(descriptor: &mut Value) -> Result<(), Invalid> {
    fill(descriptor, "mediaType", json!(""));
    if let Some(platform) = descriptor.get_mut("platform") {
        fill(platform, "architecture", json!(""));
        fill(platform, "os", json!(""));
    }
    match descriptor.get("digest").and_then(Value::as_str) {
        Some(text) if oci_spec::image::Digest::try_from(text).is_err() => {
            Err(Invalid::Digest(text.to_owned()))
        }
        _ => Ok(()),
    }
}

fn fill(object: &mut Value, key: &str, default: Value) {
    if let Value::Object(map) = object {
        map.entry(key).or_insert(default);
    }
}

/// oci-spec's image config, holding only where the image runs and what its layers uncompress
/// to. The run config (`config`) is left out: [`ImageConfig`](super::config::ImageConfig)
/// reads it, more forgivingly than oci-spec's typed one would.
pub(crate) fn config(bytes: &[u8]) -> Result<ImageConfiguration, serde_json::Error> {
    let mut head = serde_json::Map::new();
    if let Value::Object(mut doc) = serde_json::from_slice(bytes)? {
        for key in ["architecture", "os", "rootfs"] {
            if let Some(value) = doc.remove(key) {
                head.insert(key.to_owned(), value);
            }
        }
    }
    let mut head = Value::Object(head);
    fill(&mut head, "architecture", json!(""));
    fill(&mut head, "os", json!(""));
    if let Some(rootfs) = head.get_mut("rootfs") {
        fill(rootfs, "type", json!("layers"));
    }
    serde_json::from_value(head)
}

/// A top-level field of a JSON document as `T`; `None` when it is absent or null.
pub(crate) fn field<T: DeserializeOwned>(
    doc: &Value,
    key: &str,
) -> Result<Option<T>, serde_json::Error> {
    match doc.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => T::deserialize(value).map(Some),
    }
}

/// Whether `media_type` is `kind` or the Docker v2 schema 2 name of `kind`.
fn is(media_type: &MediaType, kind: MediaType) -> bool {
    kind.to_docker_v2s2()
        .is_ok_and(|docker| media_type.as_ref() == docker)
        || *media_type == kind
}

pub(crate) fn is_index(media_type: &MediaType) -> bool {
    is(media_type, MediaType::ImageIndex)
}

pub(crate) fn is_manifest(media_type: &MediaType) -> bool {
    is(media_type, MediaType::ImageManifest)
}

pub(crate) fn is_config(media_type: &MediaType) -> bool {
    is(media_type, MediaType::ImageConfig)
}

/// How a layer of `media_type` is compressed; `None` for what we cannot read (zstd, foreign).
pub(crate) fn layer_compression(media_type: &MediaType) -> Option<LayerCompression> {
    match media_type {
        MediaType::ImageLayer | MediaType::ImageLayerNonDistributable => {
            Some(LayerCompression::None)
        }
        MediaType::ImageLayerNonDistributableGzip => Some(LayerCompression::Gzip),
        other if is(other, MediaType::ImageLayerGzip) => Some(LayerCompression::Gzip),
        _ => None,
    }
}

/// The annotation `key` of a descriptor.
pub(crate) fn annotation<'a>(descriptor: &'a Descriptor, key: &str) -> Option<&'a str> {
    descriptor
        .annotations()
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// The name (`org.opencontainers.image.ref.name`) a layout's index gives a descriptor.
pub(crate) fn ref_name(descriptor: &Descriptor) -> Option<&str> {
    annotation(descriptor, ANNOTATION_REF_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn what_real_producers_omit_is_filled_in() {
        let layout = index(json!({"manifests": [{
            "digest": format!("sha256:{HEX}"), "size": 3, "platform": {"architecture": "amd64"}
        }]}))
        .unwrap();
        assert_eq!(layout.schema_version(), 0);
        let entry = &layout.manifests()[0];
        assert_eq!(entry.media_type().to_string(), "");
        assert_eq!(entry.platform().as_ref().unwrap().os().to_string(), "");
        assert!(index(json!({})).unwrap().manifests().is_empty());

        let image = config(br#"{"rootfs":{"diff_ids":["sha256:x"]}}"#).unwrap();
        assert_eq!(image.rootfs().typ(), "layers");
        assert_eq!(image.architecture().to_string(), "");
        // The run config is not read here, however odd it is.
        config(br#"{"config":{"Volumes":{"/data":null}},"rootfs":{"diff_ids":[]}}"#).unwrap();
        assert!(config(br#"{"architecture":"amd64"}"#).is_err());
    }

    #[test]
    fn malformed_digests_are_named() {
        let bad = json!({"config": {"digest": "sha256:../../x", "size": 1}, "layers": []});
        assert!(matches!(manifest(bad), Err(Invalid::Digest(d)) if d == "sha256:../../x"));
        let missing = json!({"config": {"size": 1}, "layers": []});
        assert!(matches!(manifest(missing), Err(Invalid::Json(_))));
    }

    #[test]
    fn docker_media_types_are_accepted_where_oci_ones_are() {
        let docker = |t: &str| MediaType::from(t);
        assert!(is_index(&MediaType::ImageIndex));
        assert!(is_index(&docker(
            "application/vnd.docker.distribution.manifest.list.v2+json"
        )));
        assert!(is_manifest(&docker(
            "application/vnd.docker.distribution.manifest.v2+json"
        )));
        assert!(is_config(&docker(
            "application/vnd.docker.container.image.v1+json"
        )));
        assert!(!is_manifest(&MediaType::ImageIndex));
        assert_eq!(
            layer_compression(&docker("application/vnd.docker.image.rootfs.diff.tar.gzip")),
            Some(LayerCompression::Gzip)
        );
        assert_eq!(
            layer_compression(&MediaType::ImageLayer),
            Some(LayerCompression::None)
        );
        assert_eq!(layer_compression(&MediaType::ImageLayerZstd), None);
        assert_eq!(layer_compression(&docker("")), None);
    }
}
