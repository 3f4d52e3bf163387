//! Standard Webhooks signatures (<https://www.standardwebhooks.com>): the endpoint's
//! [`Secret`], [`sign`] on our side and [`verify`] on the receiver's.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::hmac;
use serde::{Deserialize, Deserializer};

/// The prefix of secrets written the Standard Webhooks way.
pub const SECRET_PREFIX: &str = "whsec_";

/// Header carrying the message id (the same on every retry of one message).
pub const HEADER_ID: &str = "webhook-id";
/// Header carrying the attempt's time, in Unix seconds.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// Header carrying `v1,<base64 signature>` (several, space-separated, during a rotation).
pub const HEADER_SIGNATURE: &str = "webhook-signature";

/// An endpoint's signing key.
///
/// Written `whsec_<base64>` (Standard Webhooks), the key is the base64-decoded part after the
/// prefix. A string **without** the prefix is taken as the raw key bytes (its UTF-8), for
/// receivers that were given a plain shared secret. Either way the key must not be empty.
///
/// The key never shows: `Debug` prints `Secret(whsec_…)`, and there is no `Display` or
/// `Serialize`.
#[derive(Clone)]
pub struct Secret(Arc<[u8]>);

/// A secret that cannot be used; the message never repeats the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidSecret {
    /// The part after `whsec_` is not standard base64.
    #[error("webhook secret: the part after 'whsec_' is not valid base64 ({0})")]
    NotBase64(String),
    /// No key bytes at all (an empty key would let anyone sign).
    #[error("webhook secret: the key is empty")]
    Empty,
}

impl Secret {
    /// Parses `whsec_<base64>`, or takes a string without the prefix as raw key bytes.
    ///
    /// # Errors
    /// Invalid base64 after the prefix, or an empty key.
    pub fn parse(s: &str) -> Result<Self, InvalidSecret> {
        let key = match s.strip_prefix(SECRET_PREFIX) {
            Some(encoded) => BASE64.decode(encoded).map_err(|e| InvalidSecret::NotBase64(e.to_string()))?,
            None => s.as_bytes().to_vec(),
        };
        Secret::from_bytes(key)
    }

    /// A secret from raw key bytes.
    ///
    /// # Errors
    /// An empty key.
    pub fn from_bytes(key: impl Into<Vec<u8>>) -> Result<Self, InvalidSecret> {
        let key = key.into();
        if key.is_empty() {
            return Err(InvalidSecret::Empty);
        }
        Ok(Secret(key.into()))
    }

    fn hmac_key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(whsec_…)")
    }
}

impl FromStr for Secret {
    type Err = InvalidSecret;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Secret::parse(s)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Secret::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The `webhook-signature` value for one message: `v1,` and the base64 of
/// HMAC-SHA256(key, `"{id}.{timestamp}.{body}"`).
///
/// ```
/// use proxypal_webhooks::{Secret, sign};
///
/// // The Standard Webhooks reference vector.
/// let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")?;
/// let signature = sign(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
/// assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
/// # Ok::<(), proxypal_webhooks::InvalidSecret>(())
/// ```
pub fn sign(secret: &Secret, id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut ctx = hmac::Context::with_key(&secret.hmac_key());
    ctx.update(id.as_bytes());
    ctx.update(b".");
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let mut out = String::with_capacity(3 + 44);
    out.push_str("v1,");
    BASE64.encode_string(tag.as_ref(), &mut out);
    out
}

/// The receiver's check: true when `headers` carry a `webhook-id`, a `webhook-timestamp`
/// within `tolerance` of `now_s` (Unix seconds, either side) and a `webhook-signature` with
/// at least one `v1,` entry that matches `body` under `secret`.
///
/// The signature header may list several entries separated by spaces (a secret rotation);
/// entries of other versions are ignored. The comparison is constant-time.
///
/// ```
/// use std::time::Duration;
/// use http::{HeaderMap, HeaderValue};
/// use proxypal_webhooks::{Secret, sign, verify};
///
/// let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")?;
/// let body = br#"{"type":"key.disabled"}"#;
/// let mut headers = HeaderMap::new();
/// headers.insert("webhook-id", HeaderValue::from_static("msg_1"));
/// headers.insert("webhook-timestamp", HeaderValue::from_static("1700000000"));
/// let signature = format!("v1,bm90LWl0 {}", sign(&secret, "msg_1", 1_700_000_000, body));
/// headers.insert("webhook-signature", signature.parse()?);
/// assert!(verify(&secret, &headers, body, 1_700_000_030, Duration::from_secs(300)));
/// assert!(!verify(&secret, &headers, b"{}", 1_700_000_030, Duration::from_secs(300)));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn verify(
    secret: &Secret,
    headers: &http::HeaderMap,
    body: &[u8],
    now_s: i64,
    tolerance: Duration,
) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(id), Some(timestamp), Some(signatures)) =
        (header(HEADER_ID), header(HEADER_TIMESTAMP), header(HEADER_SIGNATURE))
    else {
        return false;
    };
    let Ok(ts) = timestamp.trim().parse::<i64>() else {
        return false;
    };
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    if now_s.abs_diff(ts) > tolerance.unsigned_abs() {
        return false;
    }
    let mut signed = Vec::with_capacity(id.len() + body.len() + 24);
    signed.extend_from_slice(id.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(ts.to_string().as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(body);
    let key = secret.hmac_key();
    signatures
        .split(' ')
        .filter_map(|entry| entry.trim().strip_prefix("v1,"))
        .filter_map(|encoded| BASE64.decode(encoded).ok())
        .any(|tag| hmac::verify(&key, &signed, &tag).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    const VECTOR_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const VECTOR_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const VECTOR_TS: i64 = 1_614_265_330;
    const VECTOR_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const VECTOR_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn headers(id: &str, ts: i64, signature: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HEADER_ID, HeaderValue::from_str(id).unwrap());
        h.insert(HEADER_TIMESTAMP, HeaderValue::from_str(&ts.to_string()).unwrap());
        h.insert(HEADER_SIGNATURE, HeaderValue::from_str(signature).unwrap());
        h
    }

    #[test]
    fn sign_reproduces_the_standard_webhooks_reference_vector() {
        let secret = Secret::parse(VECTOR_SECRET).unwrap();
        assert_eq!(sign(&secret, VECTOR_ID, VECTOR_TS, VECTOR_BODY), VECTOR_SIGNATURE);
    }

    #[test]
    fn sign_matches_an_independent_hmac() {
        let secret = Secret::parse("whsec_c2VjcmV0LWtleS1mb3ItdGVzdHM=").unwrap();
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"secret-key-for-tests");
        let tag = hmac::sign(&key, b"msg_1.42.{\"a\":1}");
        let expected = format!("v1,{}", BASE64.encode(tag.as_ref()));
        assert_eq!(sign(&secret, "msg_1", 42, br#"{"a":1}"#), expected);
    }

    #[test]
    fn a_secret_without_the_prefix_is_raw_bytes() {
        let raw = Secret::parse("plain-shared-secret").unwrap();
        let bytes = Secret::from_bytes(b"plain-shared-secret".to_vec()).unwrap();
        assert_eq!(sign(&raw, "m", 1, b"x"), sign(&bytes, "m", 1, b"x"));
    }

    #[test]
    fn invalid_or_empty_secrets_are_refused_without_echoing_them() {
        let err = Secret::parse("whsec_not*base64!").unwrap_err();
        assert!(matches!(err, InvalidSecret::NotBase64(_)));
        assert!(!err.to_string().contains("not*base64"), "{err}");
        assert_eq!(Secret::parse("whsec_").unwrap_err(), InvalidSecret::Empty);
        assert_eq!(Secret::parse("").unwrap_err(), InvalidSecret::Empty);
    }

    #[test]
    fn debug_masks_the_key() {
        let secret = Secret::parse(VECTOR_SECRET).unwrap();
        let shown = format!("{secret:?}");
        assert_eq!(shown, "Secret(whsec_…)");
        assert!(!shown.contains("MfKQ"));
    }

    #[test]
    fn verify_accepts_the_reference_vector_and_rotated_lists() {
        let secret = Secret::parse(VECTOR_SECRET).unwrap();
        let tol = Duration::from_secs(300);
        let h = headers(VECTOR_ID, VECTOR_TS, VECTOR_SIGNATURE);
        assert!(verify(&secret, &h, VECTOR_BODY, VECTOR_TS, tol));
        let rotated = format!("v1,AAAA v2,whatever {VECTOR_SIGNATURE}");
        let h = headers(VECTOR_ID, VECTOR_TS, &rotated);
        assert!(verify(&secret, &h, VECTOR_BODY, VECTOR_TS + 10, tol));
    }

    #[test]
    fn verify_refuses_tampering_stale_timestamps_and_missing_headers() {
        let secret = Secret::parse(VECTOR_SECRET).unwrap();
        let tol = Duration::from_secs(300);
        let h = headers(VECTOR_ID, VECTOR_TS, VECTOR_SIGNATURE);
        assert!(!verify(&secret, &h, br#"{"test": 2432232315}"#, VECTOR_TS, tol));
        assert!(!verify(&secret, &h, VECTOR_BODY, VECTOR_TS + 301, tol));
        assert!(!verify(&secret, &h, VECTOR_BODY, VECTOR_TS - 301, tol));
        let other = Secret::parse("whsec_c2VjcmV0LWtleS1mb3ItdGVzdHM=").unwrap();
        assert!(!verify(&other, &h, VECTOR_BODY, VECTOR_TS, tol));
        let h = headers("msg_other", VECTOR_TS, VECTOR_SIGNATURE);
        assert!(!verify(&secret, &h, VECTOR_BODY, VECTOR_TS, tol));
        let mut h = headers(VECTOR_ID, VECTOR_TS, VECTOR_SIGNATURE);
        h.remove(HEADER_SIGNATURE);
        assert!(!verify(&secret, &h, VECTOR_BODY, VECTOR_TS, tol));
    }
}
