//! Secrets (API keys, client tokens) that never print themselves.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// A secret string, such as an upstream API key or a client token.
///
/// It has no `Display`, and its `Debug` shows only [`mask_key`]'s label, so a
/// `{:?}` of a whole [`Config`](super::Config) or a `tracing` field cannot
/// leak it. Reach the value with [`Secret::expose`] at the one place that needs
/// it (building the upstream `Authorization` header, comparing a token).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Call it only where the value must leave the process.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A label that identifies the secret without revealing it; see [`mask_key`].
    pub fn masked(&self) -> String {
        mask_key(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.masked())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self)
    }
}

/// Masks a secret for logs, errors and summaries: `nvapi-…wxyz`. The one
/// masking rule of the project lives in [`proxypal_keypool::mask`]; see there.
///
/// ```
/// use proxypal_server::config::mask_key;
/// assert_eq!(mask_key("nvapi-0123456789abcdefwxyz"), "nvapi-…wxyz");
/// assert_eq!(mask_key("tiny"), "…");
/// ```
pub fn mask_key(secret: &str) -> String {
    proxypal_keypool::mask(secret)
}
