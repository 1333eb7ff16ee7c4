//! Identifiers: `BoxID` (a ULID) and `ContainerID` (the OCI 64-hex form).

use std::fmt;
use std::io::Read;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{BoxliteError, BoxliteResult};

/// A box's identity: a ULID, 26 Crockford base32 characters, sortable by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BoxID(ulid::Ulid);

impl BoxID {
    pub const LEN: usize = 26;

    pub fn new() -> Self {
        Self(ulid::Ulid::new())
    }

    /// Parses the canonical form; lower case is accepted and normalised to upper case.
    pub fn parse(text: &str) -> BoxliteResult<Self> {
        let bad = |why: &str| BoxliteError::invalid("box id", format!("{text:?} {why}"));
        if text.len() != Self::LEN {
            return Err(bad(&format!(
                "has {} characters, a box id has {}",
                text.len(),
                Self::LEN
            )));
        }
        // 26 base32 digits carry 130 bits; a first digit above 7 would overflow 128.
        if !matches!(text.as_bytes()[0], b'0'..=b'7') {
            return Err(bad(
                "is out of range: a box id starts with a digit from 0 to 7",
            ));
        }
        ulid::Ulid::from_string(text)
            .map(Self)
            .map_err(|e| bad(&format!("is not a ULID ({e})")))
    }

    /// Milliseconds since the Unix epoch at which the id was made.
    pub fn timestamp_ms(&self) -> u64 {
        self.0.timestamp_ms()
    }

    /// Whether `text` looks like a box id (and not a name).
    pub fn is_valid(text: &str) -> bool {
        Self::parse(text).is_ok()
    }
}

impl Default for BoxID {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for BoxID {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for BoxID {
    type Err = BoxliteError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A container's identity in the OCI form: 64 lowercase hex characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerID(String);

impl ContainerID {
    pub const LEN: usize = 64;

    /// A new random id (256 bits from the OS).
    pub fn new() -> BoxliteResult<Self> {
        let mut raw = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut raw))
            .map_err(|e| BoxliteError::io("reading /dev/urandom for a container id", e))?;
        Ok(Self(hex::encode(raw)))
    }

    pub fn parse(text: &str) -> BoxliteResult<Self> {
        let bad = |why: String| BoxliteError::invalid("container id", format!("{text:?} {why}"));
        if text.len() != Self::LEN {
            return Err(bad(format!(
                "has {} characters, a container id has {}",
                text.len(),
                Self::LEN
            )));
        }
        if let Some(c) = text.chars().find(|c| !matches!(c, '0'..='9' | 'a'..='f')) {
            return Err(bad(format!(
                "contains {c:?}; only lowercase hex digits are allowed"
            )));
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 characters, as `docker ps` shows them.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl fmt::Display for ContainerID {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ContainerID {
    type Err = BoxliteError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

macro_rules! serde_as_string {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                Self::parse(&text).map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_string!(BoxID);
serde_as_string!(ContainerID);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_ids_are_26_crockford_chars_and_sort_by_time() {
        let a = BoxID::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = BoxID::new();
        let text = a.to_string();
        assert_eq!(text.len(), 26);
        assert!(text
            .chars()
            .all(|c| "0123456789ABCDEFGHJKMNPQRSTVWXYZ".contains(c)));
        assert!(a < b && a.to_string() < b.to_string());
        assert_eq!(BoxID::parse(&text).unwrap(), a);
        assert_eq!(BoxID::parse(&text.to_lowercase()).unwrap(), a);
    }

    #[test]
    fn box_id_boundaries() {
        assert!(BoxID::parse("00000000000000000000000000").is_ok());
        assert!(BoxID::parse("7ZZZZZZZZZZZZZZZZZZZZZZZZZ").is_ok());
        // The first character carries 3 bits: 8 and up overflow 128 bits.
        assert!(BoxID::parse("8ZZZZZZZZZZZZZZZZZZZZZZZZZ").is_err());
    }

    #[test]
    fn bad_box_ids_name_the_input() {
        for bad in [
            "",
            "short",
            "01ARZ3NDEKTSV4RRFFQ69G5FAVX",
            "01ARZ3NDEKTSV4RRFFQ69G5FA!",
            "01ARZ3NDEKTSV4RRFFQ69G5FAU",
        ] {
            let err = BoxID::parse(bad).unwrap_err();
            assert_eq!(err.kind(), "invalid_argument");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
            assert!(!BoxID::is_valid(bad));
        }
    }

    #[test]
    fn container_ids_are_64_lowercase_hex() {
        let a = ContainerID::new().unwrap();
        let b = ContainerID::new().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 64);
        assert_eq!(ContainerID::parse(a.as_str()).unwrap(), a);
        assert_eq!(a.short().len(), 12);
        let upper = a.as_str().to_uppercase();
        if upper != a.as_str() {
            assert!(ContainerID::parse(&upper).is_err());
        }
        assert!(ContainerID::parse(&"a".repeat(63)).is_err());
        assert!(ContainerID::parse(&"a".repeat(65)).is_err());
        let err = ContainerID::parse(&format!("{}g", "a".repeat(63))).unwrap_err();
        assert!(err.to_string().contains("'g'"));
        assert!(ContainerID::parse(&"0".repeat(64)).is_ok());
    }

    #[test]
    fn ids_serialize_as_strings() {
        let id = BoxID::new();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<BoxID>(&json).unwrap(), id);
        assert!(serde_json::from_str::<BoxID>("\"nope\"").is_err());
        let cid = ContainerID::new().unwrap();
        let json = serde_json::to_string(&cid).unwrap();
        assert_eq!(serde_json::from_str::<ContainerID>(&json).unwrap(), cid);
    }
}
