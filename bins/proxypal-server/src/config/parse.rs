//! Lenient deserializers for values that arrive both from YAML and from
//! environment variables, where figment has already turned `30` into a number.

use std::{fmt, net::SocketAddr, time::Duration};

use serde::{
    Deserializer,
    de::{self, Unexpected, Visitor},
};

/// A duration: a humantime string (`"5s"`, `"1m 30s"`, `"250ms"`) or a bare
/// number of seconds (`30`, `1.5`) — the form an environment variable such as
/// `PROXYPAL_RETRY__QUEUE_TIMEOUT=30` takes after figment parses it.
pub(crate) fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    deserializer.deserialize_any(DurationVisitor)
}

/// [`duration`], for an optional field (`#[serde(default)]` gives `None`).
pub(crate) fn optional_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    duration(deserializer).map(Some)
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as \"30s\" or \"1m 30s\", or a number of seconds")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        humantime::parse_duration(v.trim()).map_err(|e| {
            E::custom(format_args!(
                "invalid duration {v:?}: {e} (write e.g. \"30s\", \"1m 30s\" or a number of seconds)"
            ))
        })
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        Ok(Duration::from_secs(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        u64::try_from(v).map(Duration::from_secs).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
        Duration::try_from_secs_f64(v).map_err(|_| E::invalid_value(Unexpected::Float(v), &self))
    }
}

/// A size in bytes: an integer (`33554432`) or a string with a unit
/// (`"32 MiB"`, `"10MB"`, `"512KiB"`, `"100B"`).
pub(crate) fn byte_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<usize, D::Error> {
    deserializer.deserialize_any(ByteSizeVisitor)
}

struct ByteSizeVisitor;

/// Units accepted by [`byte_size`], matched case-insensitively.
const BYTE_UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("b", 1),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
];

impl Visitor<'_> for ByteSizeVisitor {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size in bytes such as 33554432 or \"32 MiB\"")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<usize, E> {
        usize::try_from(v).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<usize, E> {
        usize::try_from(v).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<usize, E> {
        let s = v.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let unit = unit.trim().to_ascii_lowercase();
        let invalid = || {
            E::custom(format_args!(
                "invalid size {v:?} (write bytes as an integer, or use B, KB, MB, GB, KiB, MiB or GiB)"
            ))
        };
        let number: u64 = number.parse().map_err(|_| invalid())?;
        let (_, factor) = BYTE_UNITS.iter().find(|(name, _)| *name == unit).ok_or_else(invalid)?;
        number
            .checked_mul(*factor)
            .and_then(|bytes| usize::try_from(bytes).ok())
            .ok_or_else(|| E::custom(format_args!("size {v:?} is too large")))
    }
}

/// A socket address (`127.0.0.1:8080`, `[::]:8080`), with an error that shows
/// the rejected text: std's own says only "invalid socket address syntax".
pub(crate) fn socket_addr<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    deserializer.deserialize_any(SocketAddrVisitor)
}

struct SocketAddrVisitor;

impl Visitor<'_> for SocketAddrVisitor {
    type Value = SocketAddr;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an IP:PORT socket address such as 127.0.0.1:8080 or [::]:8080")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<SocketAddr, E> {
        v.trim().parse().map_err(|_| {
            E::custom(format_args!(
                "invalid socket address {v:?} (expected IP:PORT such as 127.0.0.1:8080 or [::]:8080; host names are not resolved)"
            ))
        })
    }
}
