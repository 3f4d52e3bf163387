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

/// The longest prefix (up to and including the first `-`) that is kept, as in
/// `nvapi-`: a vendor tag says which service a key is for and reveals nothing.
const MAX_PREFIX_CHARS: usize = 8;

/// Masks a secret for logs, errors and summaries: `nvapi-…wxyz`.
///
/// - A prefix up to and including the first `-` is kept when it is at most
///   8 characters long (`nvapi-`, `sk-`), then `…`, then the last 4 characters.
/// - Keys shorter than 12 characters show only `…` and their last 2 characters,
///   and keys shorter than 8 characters show only `…`: with so few characters,
///   even a short tail gives away too much of the secret.
/// - Never more than the last 4 characters of the secret are shown.
///
/// ```
/// use proxypal_server::config::mask_key;
///
/// assert_eq!(mask_key("nvapi-0123456789abcdefwxyz"), "nvapi-…wxyz");
/// assert_eq!(mask_key("0123456789abcdefwxyz"), "…wxyz");
/// assert_eq!(mask_key("short-key1"), "…y1");
/// assert_eq!(mask_key("tiny"), "…");
/// ```
pub fn mask_key(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    let n = chars.len();
    let tail = |count: usize| chars[n - count..].iter().collect::<String>();
    if n < 8 {
        return "…".to_owned();
    }
    if n < 12 {
        return format!("…{}", tail(2));
    }
    let prefix: String = match chars.iter().position(|&c| c == '-') {
        // Keep the prefix only if what follows it is still long enough that the
        // prefix plus the 4-character tail leave most of the secret hidden.
        Some(dash) if dash < MAX_PREFIX_CHARS && n - (dash + 1) >= 8 => chars[..=dash].iter().collect(),
        _ => String::new(),
    };
    format!("{prefix}…{}", tail(4))
}
