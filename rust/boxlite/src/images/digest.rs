//! Content digests (`sha256:<64 hex>`), parsed strictly: they name files on disk.
//!
//! Hand-written on purpose: oci-spec's `Digest` accepts any registered or unregistered
//! algorithm (`sha512:...`, `foo+b64:...`), while a digest here becomes the file name
//! `blobs/sha256/<hex>` and is checked with sha256, so only `sha256:` and 64 lowercase hex
//! digits parse. Conversions to and from oci-spec's type are below.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{BoxliteError, BoxliteResult};

/// A sha256 content digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest {
    hex: String,
}

impl Digest {
    pub fn parse(text: &str) -> BoxliteResult<Self> {
        let bad = || {
            BoxliteError::invalid(
                "digest",
                format!("{text:?} is not a sha256:<64 lowercase hex> digest"),
            )
        };
        let hex = text.strip_prefix("sha256:").ok_or_else(bad)?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        Ok(Self {
            hex: hex.to_owned(),
        })
    }

    pub fn of(data: &[u8]) -> Self {
        Self {
            hex: hex::encode(Sha256::digest(data)),
        }
    }

    pub fn from_hasher(hasher: Sha256) -> Self {
        Self {
            hex: hex::encode(hasher.finalize()),
        }
    }

    /// The 64 hex characters, safe as a file name.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl TryFrom<String> for Digest {
    type Error = BoxliteError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.to_string()
    }
}

impl Digest {
    /// The same digest as oci-spec's type (for descriptors we write).
    pub(crate) fn to_oci(&self) -> oci_spec::image::Digest {
        oci_spec::image::Digest::try_from(self.to_string())
            .expect("sha256 and 64 lowercase hex digits is a valid OCI digest")
    }
}

/// A descriptor's digest, if it is one we take (sha256).
impl TryFrom<&oci_spec::image::Digest> for Digest {
    type Error = BoxliteError;
    fn try_from(value: &oci_spec::image::Digest) -> Result<Self, Self::Error> {
        Self::parse(value.as_ref())
    }
}

impl PartialEq<oci_spec::image::Digest> for Digest {
    fn eq(&self, other: &oci_spec::image::Digest) -> bool {
        other.as_ref().strip_prefix("sha256:") == Some(self.hex.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_sha256_digests_parse() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert_eq!(Digest::parse(&good).unwrap().to_string(), good);
        for bad in [
            "sha256:../../etc/passwd".to_string(),
            format!("sha512:{}", "a".repeat(64)),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            "a".repeat(64),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn converts_to_and_from_oci_spec() {
        let ours = Digest::of(b"x");
        let theirs = ours.to_oci();
        assert_eq!(theirs.to_string(), ours.to_string());
        assert_eq!(Digest::try_from(&theirs).unwrap(), ours);
        assert!(ours == theirs);
        assert!(Digest::of(b"y") != theirs);
        let sha512: oci_spec::image::Digest =
            format!("sha512:{}", "a".repeat(128)).parse().unwrap();
        assert!(Digest::try_from(&sha512).is_err());
    }

    #[test]
    fn digest_of_empty_input() {
        assert_eq!(
            Digest::of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
