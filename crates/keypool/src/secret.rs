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

/// Masks a secret for logs, errors, stats and summaries: `nvapi-…wxyz`.
///
/// - A prefix up to and including the first `-` is kept when it is at most
///   8 characters long (`nvapi-`, `sk-`) and at least 8 characters follow it;
///   then `…`, then the last 4 characters.
/// - Secrets shorter than 12 characters show only `…` and their last 2
///   characters, and secrets shorter than 8 characters only `…`: with so few
///   characters, even a short tail gives away too much.
/// - Never more than the last 4 characters of the secret are shown.
///
/// ```
/// use proxypal_keypool::mask;
/// assert_eq!(mask("nvapi-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"), "nvapi-…6789");
/// assert_eq!(mask("0123456789abcdefwxyz"), "…wxyz");
/// assert_eq!(mask("short-key1"), "…y1");
/// assert_eq!(mask("tiny"), "…");
/// ```
pub fn mask(secret: &str) -> String {
    const MAX_PREFIX_CHARS: usize = 8;
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
        // Keep the prefix only if what follows is long enough that prefix plus
        // the 4-character tail leave most of the secret hidden.
        Some(dash) if dash < MAX_PREFIX_CHARS && n - (dash + 1) >= 8 => chars[..=dash].iter().collect(),
        _ => String::new(),
    };
    format!("{prefix}…{}", tail(4))
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
        assert_eq!(mask("tiny"), "…");
        assert_eq!(mask(""), "…");
        assert_eq!(mask("abcdefghijk"), "…jk");
        assert_eq!(mask("verylongprefix-abcdefgh"), "…efgh");
    }

    #[test]
    fn multibyte_secrets_do_not_panic() {
        assert_eq!(mask("ключ-секретный"), "ключ-…тный");
    }
}
