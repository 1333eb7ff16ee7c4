//! `Bytes` and `Seconds`: the types of every size and duration in the public API.
//!
//! Both parse what people type. Sizes follow Docker: a bare number is bytes, `K`/`M`/`G`/`T`
//! and `KiB`/`MiB`/`GiB`/`TiB` are powers of 1024, `KB`/`MB`/`GB`/`TB` powers of 1000; case
//! does not matter. Durations: a bare number is seconds; `ms`, `s`, `m`, `h` suffixes.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::BoxliteError;

const KIB: u64 = 1024;
const MIB: u64 = KIB * 1024;
const GIB: u64 = MIB * 1024;
const TIB: u64 = GIB * 1024;

/// A size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Bytes(u64);

impl Bytes {
    pub const ZERO: Bytes = Bytes(0);

    pub const fn from_bytes(n: u64) -> Self {
        Self(n)
    }
    pub const fn from_kib(n: u64) -> Self {
        Self(n.saturating_mul(KIB))
    }
    pub const fn from_mib(n: u64) -> Self {
        Self(n.saturating_mul(MIB))
    }
    pub const fn from_gib(n: u64) -> Self {
        Self(n.saturating_mul(GIB))
    }
    pub const fn as_u64(self) -> u64 {
        self.0
    }
    /// Whole MiB, rounded down.
    pub const fn as_mib(self) -> u64 {
        self.0 / MIB
    }
    /// A size given in (possibly fractional) GiB, rounded to whole MiB; `field` names the
    /// argument in the error for a value that is not a positive size.
    pub fn from_gib_f64(field: &str, gib: f64) -> crate::BoxliteResult<Self> {
        if gib.is_finite() && gib > 0.0 && gib < (1u64 << 40) as f64 {
            Ok(Self::from_mib((gib * 1024.0).round() as u64))
        } else {
            Err(crate::BoxliteError::invalid(
                field,
                format!("{gib} is not a positive size in GiB"),
            ))
        }
    }
}

impl fmt::Display for Bytes {
    /// The largest binary unit with a value of at least 1, at most two decimals: `512 MiB`,
    /// `1.5 GiB`, `100 B`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")];
        for (size, name) in units {
            if self.0 >= size {
                return write!(
                    f,
                    "{} {name}",
                    trim_decimals(self.0 as f64 / size as f64, 2)
                );
            }
        }
        write!(f, "{} B", self.0)
    }
}

impl FromStr for Bytes {
    type Err = BoxliteError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| BoxliteError::invalid("size", format!("{input:?}: {why}"));
        let (number, unit) = split_number(input).map_err(|why| bad(&why))?;
        let multiplier = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => KIB,
            "m" | "mib" => MIB,
            "g" | "gib" => GIB,
            "t" | "tib" => TIB,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            _ => {
                return Err(bad(
                    "unknown unit; use B, KiB, MiB, GiB, TiB (or K, M, G, T)",
                ))
            }
        };
        let value = scale(number, multiplier).ok_or_else(|| bad("too large"))?;
        Ok(Self(value))
    }
}

impl From<u64> for Bytes {
    fn from(n: u64) -> Self {
        Self(n)
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    /// Accepts a byte count or a string such as `"512MiB"`.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NumberOrText::deserialize(d)? {
            NumberOrText::Number(n) if n >= 0.0 && n.fract() == 0.0 && n <= u64::MAX as f64 => {
                Ok(Self(n as u64))
            }
            NumberOrText::Number(n) => Err(serde::de::Error::custom(format!("invalid size {n}"))),
            NumberOrText::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A duration, with millisecond precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Seconds(Duration);

impl Seconds {
    pub const fn from_secs(n: u64) -> Self {
        Self(Duration::from_secs(n))
    }
    pub const fn from_millis(n: u64) -> Self {
        Self(Duration::from_millis(n))
    }
    /// `None` for negative, non-finite or absurdly large values.
    pub fn try_from_secs_f64(secs: f64) -> Option<Self> {
        Duration::try_from_secs_f64(secs).ok().map(Self)
    }
    /// A duration of at least a millisecond; `field` names the argument in the error.
    pub fn positive(field: &str, secs: f64) -> crate::BoxliteResult<Self> {
        Self::try_from_secs_f64(secs)
            .filter(|s| s.as_millis() > 0)
            .ok_or_else(|| {
                crate::BoxliteError::invalid(
                    field,
                    format!("{secs} is not a positive number of seconds"),
                )
            })
    }
    pub const fn as_duration(self) -> Duration {
        self.0
    }
    pub fn as_secs_f64(self) -> f64 {
        self.0.as_secs_f64()
    }
    pub fn as_millis(self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }
}

impl From<Duration> for Seconds {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

impl fmt::Display for Seconds {
    /// `500ms` below a second, else seconds with up to three decimals: `1.5s`, `30s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 < Duration::from_secs(1) {
            write!(f, "{}ms", self.0.as_millis())
        } else {
            write!(f, "{}s", trim_decimals(self.0.as_secs_f64(), 3))
        }
    }
}

impl FromStr for Seconds {
    type Err = BoxliteError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| BoxliteError::invalid("duration", format!("{input:?}: {why}"));
        let (number, unit) = split_number(input).map_err(|why| bad(&why))?;
        let millis_per_unit = match unit.to_ascii_lowercase().as_str() {
            "ms" => 1,
            "" | "s" | "sec" | "secs" => 1_000,
            "m" | "min" => 60_000,
            "h" => 3_600_000,
            _ => return Err(bad("unknown unit; use ms, s, m or h")),
        };
        let millis = scale(number, millis_per_unit).ok_or_else(|| bad("too large"))?;
        Ok(Self::from_millis(millis))
    }
}

impl Serialize for Seconds {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.0.as_secs_f64())
    }
}

impl<'de> Deserialize<'de> for Seconds {
    /// Accepts seconds as a number or a string such as `"500ms"`.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NumberOrText::deserialize(d)? {
            NumberOrText::Number(n) => Self::try_from_secs_f64(n)
                .ok_or_else(|| serde::de::Error::custom(format!("invalid duration {n}"))),
            NumberOrText::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Number(f64),
    Text(String),
}

/// Splits `"1.5 GiB"` into the decimal number and the unit, rejecting signs and garbage.
fn split_number(input: &str) -> Result<(&str, &str), String> {
    let s = input.trim();
    if s.is_empty() {
        return Err("empty".into());
    }
    if s.starts_with('-') {
        return Err("cannot be negative".into());
    }
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = (&s[..end], s[end..].trim());
    let well_formed = !number.is_empty()
        && number.matches('.').count() <= 1
        && number != "."
        && !number.ends_with('.');
    if !well_formed {
        return Err("expected a number followed by an optional unit".into());
    }
    Ok((number, unit))
}

/// `number * multiplier` rounded to the nearest integer, exactly for whole numbers,
/// `None` on overflow.
fn scale(number: &str, multiplier: u64) -> Option<u64> {
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    let whole: u64 = whole.parse().ok()?;
    let mut value = whole.checked_mul(multiplier)?;
    if !frac.is_empty() {
        // At most 18 fractional digits keep 10^digits inside u64.
        let digits = &frac[..frac.len().min(18)];
        let denominator = 10u128.pow(digits.len() as u32);
        let numerator: u128 = digits.parse().ok()?;
        let part = (numerator * multiplier as u128 + denominator / 2) / denominator;
        value = value.checked_add(u64::try_from(part).ok()?)?;
    }
    Some(value)
}

/// `1.50` -> `1.5`, `2.00` -> `2`.
fn trim_decimals(value: f64, decimals: usize) -> String {
    let text = format!("{value:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

/// RFC 3339 in UTC with microseconds, as the published package reports times.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_parse_what_people_type() {
        let cases = [
            ("512MiB", 512 * MIB),
            ("512m", 512 * MIB),
            ("2G", 2 * GIB),
            ("1.5GiB", 3 * GIB / 2),
            ("  64 KiB ", 64 * KIB),
            ("100", 100),
            ("100B", 100),
            ("1MB", 1_000_000),
            ("1tb", 1_000_000_000_000),
            ("0", 0),
            ("0.5K", 512),
        ];
        for (text, expect) in cases {
            assert_eq!(text.parse::<Bytes>().unwrap().as_u64(), expect, "{text}");
        }
    }

    #[test]
    fn bytes_reject_bad_forms_with_the_reason() {
        for (text, why) in [
            ("-1", "negative"),
            ("abc", "number"),
            ("", "empty"),
            ("1.2.3G", "number"),
            ("5.G", "number"),
            ("12 parsecs", "unknown unit"),
            ("18446744073709551616", "too large"),
            ("16777216T", "too large"),
        ] {
            let err = text.parse::<Bytes>().unwrap_err();
            assert_eq!(err.kind(), "invalid_argument");
            assert!(err.to_string().contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn bytes_display_is_human_and_round_trips() {
        assert_eq!(Bytes::from_mib(512).to_string(), "512 MiB");
        assert_eq!(Bytes::from_bytes(3 * GIB / 2).to_string(), "1.5 GiB");
        assert_eq!(Bytes::from_bytes(100).to_string(), "100 B");
        assert_eq!(Bytes::from_gib(2).to_string(), "2 GiB");
        for b in [
            Bytes::from_mib(512),
            Bytes::from_gib(3),
            Bytes::from_kib(1),
            Bytes::ZERO,
        ] {
            assert_eq!(b.to_string().replace(' ', "").parse::<Bytes>().unwrap(), b);
        }
    }

    #[test]
    fn bytes_constructors_saturate() {
        assert_eq!(Bytes::from_gib(u64::MAX).as_u64(), u64::MAX);
        assert_eq!(Bytes::from_mib(3).as_mib(), 3);
    }

    #[test]
    fn seconds_parse_and_display() {
        let cases = [
            ("30s", 30_000),
            ("500ms", 500),
            ("1.5s", 1_500),
            ("2m", 120_000),
            ("1h", 3_600_000),
            ("10", 10_000),
        ];
        for (text, millis) in cases {
            assert_eq!(
                text.parse::<Seconds>().unwrap().as_millis(),
                millis,
                "{text}"
            );
        }
        assert_eq!(Seconds::from_millis(1_500).to_string(), "1.5s");
        assert_eq!(Seconds::from_millis(500).to_string(), "500ms");
        assert_eq!(Seconds::from_secs(30).to_string(), "30s");
        for s in [
            Seconds::from_millis(1_500),
            Seconds::from_millis(7),
            Seconds::from_secs(90),
        ] {
            assert_eq!(s.to_string().parse::<Seconds>().unwrap(), s);
        }
    }

    #[test]
    fn seconds_reject_bad_forms() {
        for text in [
            "-1",
            "abc",
            "",
            "5 fortnights",
            "99999999999999999999s",
            ".s",
        ] {
            let err = text.parse::<Seconds>().unwrap_err();
            assert_eq!(err.kind(), "invalid_argument", "{text}");
        }
        assert!(Seconds::try_from_secs_f64(-1.0).is_none());
        assert!(Seconds::try_from_secs_f64(f64::NAN).is_none());
    }

    #[test]
    fn serde_accepts_numbers_and_text() {
        assert_eq!(serde_json::to_string(&Bytes::from_kib(1)).unwrap(), "1024");
        assert_eq!(
            serde_json::from_str::<Bytes>("\"1KiB\"").unwrap(),
            Bytes::from_kib(1)
        );
        assert_eq!(
            serde_json::from_str::<Bytes>("2048").unwrap(),
            Bytes::from_kib(2)
        );
        assert!(serde_json::from_str::<Bytes>("-5").is_err());
        assert!(serde_json::from_str::<Bytes>("1.5").is_err());
        assert_eq!(
            serde_json::to_string(&Seconds::from_millis(1500)).unwrap(),
            "1.5"
        );
        assert_eq!(
            serde_json::from_str::<Seconds>("\"250ms\"").unwrap(),
            Seconds::from_millis(250)
        );
        assert_eq!(
            serde_json::from_str::<Seconds>("2").unwrap(),
            Seconds::from_secs(2)
        );
        assert!(serde_json::from_str::<Seconds>("-2").is_err());
    }

    #[test]
    fn rfc3339_of_known_instants() {
        use std::time::{Duration, UNIX_EPOCH};
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000+00:00");
        let t = UNIX_EPOCH + Duration::from_millis(1_796_166_646_065);
        assert_eq!(rfc3339(t), "2026-12-01T23:10:46.065000+00:00");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000000+00:00");
    }
}
