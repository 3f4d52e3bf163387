//! Secrets (API keys, client tokens) in the configuration: the project's one
//! [`Secret`] type (from `proxypal-keypool`, which never prints itself), read
//! from YAML and the environment.

use serde::{Deserialize, Deserializer};

pub use proxypal_gateway::keypool::Secret;

/// Masks a secret for logs, errors and summaries: `nvapi-…wxyz`. The one
/// masking rule of the project lives in [`proxypal_gateway::keypool::mask`]; see there.
///
/// ```
/// use proxypal_server::config::mask_key;
/// assert_eq!(mask_key("nvapi-0123456789abcdefwxyz"), "nvapi-…wxyz");
/// assert_eq!(mask_key("tiny"), "…");
/// ```
pub fn mask_key(secret: &str) -> String {
    proxypal_gateway::keypool::mask(secret)
}

/// `#[serde(deserialize_with)]` for one secret: a string.
pub(crate) fn secret<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
    String::deserialize(deserializer).map(Secret::new)
}

/// `#[serde(deserialize_with)]` for a list of secrets.
pub(crate) fn secrets<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Secret>, D::Error> {
    Vec::<String>::deserialize(deserializer).map(|v| v.into_iter().map(Secret::new).collect())
}

/// `#[serde(deserialize_with)]` for an optional secret.
pub(crate) fn optional_secret<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Secret>, D::Error> {
    Option::<String>::deserialize(deserializer).map(|v| v.map(Secret::new))
}
