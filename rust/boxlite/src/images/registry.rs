//! Registries: how each host is reached (transport, TLS, credentials), which ones are searched
//! for short names, and the client that talks the distribution API to one of them.
//!
//! Registries come from three places, merged in this order (the first entry for a host wins):
//! 1. `BoxliteOptions::image_registries` (code),
//! 2. `$BOXLITE_REGISTRIES`: a comma-separated list of `[http://|https://]host[:port]`, each one
//!    searched for short names (`http://` allows plain HTTP),
//! 3. `<home>/registries.json`: `{"registries": [{"host": ..., "transport": "http", "search":
//!    true, "skip_verify": false, "username": ..., "password": ..., "bearer_token": ...}]}`.
//!
//! The distribution API is oci-client's. Hand-written on purpose: this configuration (no crate
//! has it), the mapping of oci-client's errors to ours, and the digest checks on what a
//! registry sends. The accepted manifest media types are strings because oci-client takes
//! them as such.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol, SizedStream};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use serde::{Deserialize, Serialize};

use super::digest::Digest;
use super::reference::{normalize_registry, Reference, DOCKER_HUB};
use crate::error::{BoxliteError, BoxliteResult, ImageError};

/// The environment variable that lists registries without code.
pub const REGISTRIES_ENV: &str = "BOXLITE_REGISTRIES";
/// The file in the runtime home that configures registries.
pub const REGISTRIES_FILE: &str = "registries.json";

/// How a registry is reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[default]
    Https,
    /// Plain HTTP (a local mirror without TLS).
    Http,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Https => "https",
            Self::Http => "http",
        }
    }

    pub fn parse(text: &str) -> BoxliteResult<Self> {
        match text {
            "https" => Ok(Self::Https),
            "http" => Ok(Self::Http),
            other => Err(BoxliteError::invalid(
                "image_registries",
                format!("transport {other:?} must be \"https\" or \"http\""),
            )),
        }
    }
}

/// One registry host and how to use it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRegistry {
    /// `host[:port]`, without a scheme.
    pub host: String,
    #[serde(default)]
    pub transport: Transport,
    /// Accept a TLS certificate that does not verify (self-signed test registries).
    #[serde(default)]
    pub skip_verify: bool,
    /// Try this registry for short names (`alpine`), in order, before Docker Hub.
    #[serde(default)]
    pub search: bool,
    #[serde(default)]
    pub username: Option<String>,
    /// Never written out again (only read from code or the config file).
    #[serde(default, skip_serializing)]
    pub password: Option<String>,
    #[serde(default, skip_serializing)]
    pub bearer_token: Option<String>,
}

impl fmt::Debug for ImageRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("ImageRegistry")
            .field("host", &self.host)
            .field("transport", &self.transport)
            .field("skip_verify", &self.skip_verify)
            .field("search", &self.search)
            .field("username", &self.username)
            .field("password", &redacted(&self.password))
            .field("bearer_token", &redacted(&self.bearer_token))
            .finish()
    }
}

impl ImageRegistry {
    /// An HTTPS registry with anonymous access, not searched.
    pub fn new(host: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            transport: Transport::Https,
            skip_verify: false,
            search: false,
            username: None,
            password: None,
            bearer_token: None,
        }
    }

    /// Checks the fields; the error names `image_registries` and the culprit.
    pub fn validate(&self) -> BoxliteResult<()> {
        let bad = |why: String| BoxliteError::invalid("image_registries", why);
        if self.host.contains("://") || self.host.contains('/') {
            return Err(bad(format!(
                "host {:?} must be host[:port] without a scheme or path; use transport=\"http\" for plain HTTP",
                self.host
            )));
        }
        // The host must be what a reference can name: reuse the reference grammar.
        Reference::parse(&format!("{}/probe", self.host))
            .ok()
            .filter(Reference::is_qualified)
            .ok_or_else(|| bad(format!("host {:?} is not a valid registry host", self.host)))?;
        if self.password.is_some() && self.username.is_none() {
            return Err(bad(format!("{}: a password needs a username", self.host)));
        }
        if self.bearer_token.is_some() && self.username.is_some() {
            return Err(bad(format!(
                "{}: give either username/password or bearer_token, not both",
                self.host
            )));
        }
        Ok(())
    }

    fn auth(&self) -> RegistryAuth {
        match (&self.username, &self.password, &self.bearer_token) {
            (_, _, Some(token)) => RegistryAuth::Bearer(token.clone()),
            (Some(user), password, None) => {
                RegistryAuth::Basic(user.clone(), password.clone().unwrap_or_default())
            }
            (None, _, None) => RegistryAuth::Anonymous,
        }
    }
}

/// The registries of one runtime, merged from code, environment and config file.
#[derive(Debug, Clone, Default)]
pub(crate) struct Registries {
    list: Vec<ImageRegistry>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FileEntry {
    Host(String),
    Full(ImageRegistry),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RegistriesFile {
    Object { registries: Vec<FileEntry> },
    List(Vec<FileEntry>),
}

impl Registries {
    /// Merges `configured` with `$BOXLITE_REGISTRIES` and `<home>/registries.json`.
    pub fn load(configured: &[ImageRegistry], home: &Path) -> BoxliteResult<Self> {
        let mut list: Vec<ImageRegistry> = configured.to_vec();
        if let Some(value) = std::env::var_os(REGISTRIES_ENV) {
            let value = value.to_string_lossy();
            list.extend(parse_env(&value)?);
        }
        let file = home.join(REGISTRIES_FILE);
        match std::fs::read(&file) {
            Ok(data) => list.extend(parse_file(&data).map_err(|why| {
                BoxliteError::invalid("image_registries", format!("{}: {why}", file.display()))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(BoxliteError::io(format!("reading {}", file.display()), e)),
        }
        let mut merged: Vec<ImageRegistry> = Vec::new();
        for mut registry in list {
            registry.validate()?;
            registry.host = normalize_registry(&registry.host);
            if !merged.iter().any(|r| r.host == registry.host) {
                merged.push(registry);
            }
        }
        Ok(Self { list: merged })
    }

    /// Where to look for `reference`, in order: itself if it names a registry; otherwise the
    /// search registries, then Docker Hub.
    pub fn candidates(&self, reference: &Reference) -> Vec<Reference> {
        if reference.is_qualified() {
            return vec![reference.clone()];
        }
        let mut out: Vec<Reference> = self
            .list
            .iter()
            .filter(|r| r.search)
            .map(|r| reference.in_registry(&r.host))
            .collect();
        if !out.iter().any(|r| r.registry() == DOCKER_HUB) {
            out.push(reference.in_registry(DOCKER_HUB));
        }
        out
    }

    /// How to reach `host` (HTTPS and anonymous unless configured).
    pub fn config_for(&self, host: &str) -> ImageRegistry {
        self.list
            .iter()
            .find(|r| r.host == host)
            .cloned()
            .unwrap_or_else(|| ImageRegistry::new(host))
    }
}

fn parse_env(value: &str) -> BoxliteResult<Vec<ImageRegistry>> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|entry| {
            let (transport, host) = if let Some(host) = entry.strip_prefix("http://") {
                (Transport::Http, host)
            } else if let Some(host) = entry.strip_prefix("https://") {
                (Transport::Https, host)
            } else {
                (Transport::Https, entry)
            };
            let registry = ImageRegistry {
                transport,
                search: true,
                ..ImageRegistry::new(host.trim_end_matches('/'))
            };
            registry.validate().map_err(|e| {
                BoxliteError::invalid(REGISTRIES_ENV, format!("entry {entry:?}: {e}"))
            })?;
            Ok(registry)
        })
        .collect()
}

fn parse_file(data: &[u8]) -> Result<Vec<ImageRegistry>, String> {
    let file: RegistriesFile = serde_json::from_slice(data).map_err(|e| e.to_string())?;
    let entries = match file {
        RegistriesFile::Object { registries } => registries,
        RegistriesFile::List(list) => list,
    };
    Ok(entries
        .into_iter()
        .map(|e| match e {
            FileEntry::Host(host) => ImageRegistry {
                search: true,
                ..ImageRegistry::new(host)
            },
            FileEntry::Full(r) => r,
        })
        .collect())
}

/// Media types a manifest request accepts.
pub(crate) const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// Manifests larger than this are refused (the distribution spec's own limit).
pub(crate) const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// A distribution-API client for one registry host.
pub(crate) struct RegistryClient {
    client: oci_client::Client,
    auth: RegistryAuth,
    host: String,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryClient")
            .field("host", &self.host)
            .finish()
    }
}

impl RegistryClient {
    pub fn new(config: &ImageRegistry) -> BoxliteResult<Self> {
        // reqwest is built without a default TLS provider; install ring once per process
        // (an error means someone already installed one, which is as good).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client_config = ClientConfig {
            protocol: match config.transport {
                Transport::Http => ClientProtocol::Http,
                Transport::Https => ClientProtocol::Https,
            },
            accept_invalid_certificates: config.skip_verify,
            connect_timeout: Some(Duration::from_secs(15)),
            read_timeout: Some(Duration::from_secs(60)),
            platform_resolver: None,
            user_agent: concat!("boxlite/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        };
        let client =
            oci_client::Client::try_from(client_config).map_err(|e| ImageError::PullFailed {
                reference: config.host.clone(),
                reason: format!("cannot set up an HTTP client: {}", error_chain(&e)),
                source: Some(Box::new(e)),
            })?;
        Ok(Self {
            client,
            auth: config.auth(),
            host: config.host.clone(),
        })
    }

    fn oci_reference(reference: &Reference, version: &Version<'_>) -> oci_client::Reference {
        let registry = reference.registry().to_owned();
        let repository = reference.repository().to_owned();
        match version {
            Version::Digest(d) => {
                oci_client::Reference::with_digest(registry, repository, d.to_string())
            }
            Version::Reference => match (reference.digest(), reference.tag()) {
                (Some(d), _) => {
                    oci_client::Reference::with_digest(registry, repository, d.to_string())
                }
                (None, tag) => oci_client::Reference::with_tag(
                    registry,
                    repository,
                    tag.unwrap_or("latest").to_owned(),
                ),
            },
        }
    }

    /// Fetches a manifest or index (`version` defaults to the reference's own tag/digest)
    /// and checks it against its digest: the one asked for, else the registry's header.
    pub async fn manifest(
        &self,
        reference: &Reference,
        version: Version<'_>,
    ) -> BoxliteResult<(Vec<u8>, Digest)> {
        let oci_ref = Self::oci_reference(reference, &version);
        let (body, digest) = self
            .client
            .pull_manifest_raw(&oci_ref, &self.auth, MANIFEST_TYPES)
            .await
            .map_err(|e| self.error(reference, e))?;
        let failed = |reason: String| BoxliteError::pull_failed(reference.to_string(), reason);
        if body.len() > MAX_MANIFEST_BYTES {
            return Err(failed(format!(
                "the manifest is {} bytes, more than the {MAX_MANIFEST_BYTES} allowed",
                body.len()
            )));
        }
        let actual = Digest::of(&body);
        let expected = match &version {
            Version::Digest(d) => Some((*d).clone()),
            Version::Reference => reference.digest().cloned(),
        };
        if let Some(expected) = expected {
            if actual != expected {
                return Err(failed(format!(
                    "the registry sent a manifest with digest {actual}, not the {expected} asked for"
                )));
            }
        } else if Digest::parse(&digest).is_ok_and(|d| d != actual) {
            return Err(failed(format!(
                "the manifest's digest {actual} differs from the registry's header {digest}"
            )));
        }
        Ok((body.to_vec(), actual))
    }

    /// Opens a blob for streaming (the caller verifies size and digest).
    pub async fn blob(&self, reference: &Reference, digest: &Digest) -> BoxliteResult<SizedStream> {
        let oci_ref = Self::oci_reference(reference, &Version::Reference);
        let digest_text = digest.to_string();
        self.client
            .pull_blob_stream(&oci_ref, digest_text.as_str())
            .await
            .map_err(|e| self.error(reference, e))
    }

    /// Maps a client error to the variant a caller can act on; the client's error is kept as
    /// the source of a pull failure.
    pub fn error(&self, reference: &Reference, error: OciDistributionError) -> BoxliteError {
        let unauthorized = |reason: String| {
            BoxliteError::from(ImageError::Unauthorized {
                host: self.host.clone(),
                reason,
            })
        };
        let not_found = || {
            BoxliteError::image_not_found(format!(
                "{reference} (the registry {} has no such repository or tag)",
                self.host
            ))
        };
        match &error {
            OciDistributionError::UnauthorizedError { .. } => {
                return unauthorized("HTTP 401 Unauthorized".into())
            }
            OciDistributionError::AuthenticationFailure(why) => {
                return unauthorized(format!("authentication failed: {}", why.trim()))
            }
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    return unauthorized(envelope.to_string());
                }
                if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                            | OciErrorCode::BlobUnknown
                    )
                }) {
                    return not_found();
                }
            }
            OciDistributionError::ServerError { code, message, .. } => match code {
                401 | 403 => return unauthorized(format!("HTTP {code}: {}", message.trim())),
                404 => return not_found(),
                _ => {}
            },
            OciDistributionError::ImageManifestNotFoundError(_) => return not_found(),
            _ => {}
        }
        ImageError::PullFailed {
            reference: reference.to_string(),
            reason: format!("{} ({})", error_chain(&error), self.host),
            source: Some(Box::new(error)),
        }
        .into()
    }
}

/// Which manifest to fetch.
#[derive(Debug)]
pub(crate) enum Version<'a> {
    /// The reference's own tag or digest.
    Reference,
    /// A manifest by digest (an index entry).
    Digest(&'a Digest),
}

/// `error: cause: cause...`, so "connection refused" is not hidden behind "request failed".
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn searched(host: &str) -> ImageRegistry {
        ImageRegistry {
            search: true,
            ..ImageRegistry::new(host)
        }
    }

    #[test]
    fn short_names_try_search_registries_then_docker_hub() {
        let registries = Registries {
            list: vec![
                searched("mirror.local:5000"),
                ImageRegistry::new("private.example.com"),
                searched("second.example.com"),
            ],
        };
        let short = Reference::parse("alpine").unwrap();
        let tried: Vec<String> = registries
            .candidates(&short)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            tried,
            [
                "mirror.local:5000/library/alpine:latest",
                "second.example.com/library/alpine:latest",
                "docker.io/library/alpine:latest"
            ]
        );
        let qualified = Reference::parse("quay.io/org/app:1").unwrap();
        assert_eq!(registries.candidates(&qualified), vec![qualified.clone()]);
        assert_eq!(
            registries.config_for("private.example.com").host,
            "private.example.com"
        );
        assert_eq!(
            registries.config_for("unknown.example.com").transport,
            Transport::Https
        );
    }

    #[test]
    fn hosts_are_validated() {
        for bad in ["http://x.io", "x.io/path", "", "bad host", "a:b:c"] {
            assert!(ImageRegistry::new(bad).validate().is_err(), "{bad}");
        }
        for good in [
            "registry.local:5000",
            "127.0.0.1:5000",
            "localhost",
            "ghcr.io",
        ] {
            ImageRegistry::new(good).validate().unwrap();
        }
        let no_user = ImageRegistry {
            password: Some("p".into()),
            ..ImageRegistry::new("x.io")
        };
        assert!(no_user.validate().is_err());
    }

    #[test]
    fn env_and_file_formats() {
        let env = parse_env("http://127.0.0.1:5000, mirror.example.com ,").unwrap();
        assert_eq!(env.len(), 2);
        assert_eq!(
            (env[0].host.as_str(), env[0].transport, env[0].search),
            ("127.0.0.1:5000", Transport::Http, true)
        );
        assert_eq!(env[1].transport, Transport::Https);
        assert!(parse_env("ftp://x").is_err());

        let file = br#"{"registries": ["a.io", {"host": "b.io:5000", "transport": "http",
            "username": "u", "password": "p"}]}"#;
        let list = parse_file(file).unwrap();
        assert!(list[0].search);
        assert_eq!(list[1].transport, Transport::Http);
        assert!(!list[1].search);
        assert!(matches!(list[1].auth(), RegistryAuth::Basic(u, p) if u == "u" && p == "p"));
        assert!(parse_file(br#"{"registries": [{"transport": "http"}]}"#).is_err());
        assert!(parse_file(br#"{"registries": [{"host": "x", "transport": "ftp"}]}"#).is_err());
    }

    #[test]
    fn load_merges_code_env_and_file_first_wins() {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(
            home.path().join(REGISTRIES_FILE),
            br#"[{"host": "a.io", "transport": "http", "search": true}, "c.io"]"#,
        )
        .unwrap();
        let registries = Registries::load(&[ImageRegistry::new("a.io")], home.path()).unwrap();
        // The code's a.io (HTTPS, not searched) wins over the file's.
        assert_eq!(registries.config_for("a.io").transport, Transport::Https);
        assert!(registries.config_for("c.io").search);

        std::fs::write(home.path().join(REGISTRIES_FILE), b"{not json").unwrap();
        let err = Registries::load(&[], home.path()).unwrap_err();
        assert!(err.to_string().contains(REGISTRIES_FILE), "{err}");
    }

    #[test]
    fn secrets_are_not_printed_or_serialized() {
        let r = ImageRegistry {
            username: Some("user".into()),
            password: Some("hunter2".into()),
            ..ImageRegistry::new("x.io")
        };
        assert!(!format!("{r:?}").contains("hunter2"));
        assert!(!serde_json::to_string(&r).unwrap().contains("hunter2"));
    }
}
