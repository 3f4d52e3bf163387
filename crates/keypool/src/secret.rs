use std::fmt;

/// An API key's secret. It never prints itself: `Debug` shows the masked label.
///
/// Use [`Secret::expose`] at the one place the real value is needed (building
/// the upstream `Authorization` header).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(Box<str>);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<Box<str>>) -> Self {
        Self(secret.into())
    }

    /// The real secret. Never log or display it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The masked label, e.g. `nvapi-…wxyz`.
    pub fn masked(&self) -> String {
        mask(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", mask(&self.0))
    }
}

/// Masks a secret for display: a short vendor prefix (up to and including the
/// first `-`, if it is at most 8 characters long), `…`, and at most the last 4
/// characters — fewer for short secrets, so that at most a third of a secret is
/// ever shown.
///
/// ```
/// use proxypal_keypool::mask;
/// assert_eq!(mask("nvapi-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"), "nvapi-…6789");
/// assert_eq!(mask("sk-short12"), "sk-…12");
/// assert_eq!(mask("ab"), "…");
/// ```
pub fn mask(secret: &str) -> String {
    let prefix = match secret.find('-') {
        Some(i) if i < 8 && secret[..i].chars().all(|c| c.is_ascii_alphanumeric()) => &secret[..=i],
        _ => "",
    };
    let rest = secret[prefix.len()..].chars().count();
    // Show at most 4 trailing characters and never more than a third of the rest.
    let shown = (rest / 3).min(4);
    let tail: String = secret.chars().skip(prefix.chars().count() + rest - shown).collect();
    format!("{prefix}…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_show_at_most_four_trailing_chars() {
        let s = "nvapi-Zq3xVb8nL0pR7tY2uW9eK4mJ6hG1fD5sA0cX";
        assert_eq!(mask(s), "nvapi-…A0cX");
        assert_eq!(format!("{:?}", Secret::new(s)), "Secret(nvapi-…A0cX)");
        assert_eq!(mask("no-dash-prefix-is-long-enough"), "no-…ough");
        assert_eq!(mask("plainsecretvalue1234"), "…1234");
        assert_eq!(mask("tiny"), "…y");
        assert_eq!(mask(""), "…");
        assert_eq!(mask("verylongprefix-abcdefgh"), "…efgh");
    }

    #[test]
    fn multibyte_secrets_do_not_panic() {
        assert_eq!(mask("ключ-секретный"), "…тный");
    }
}
