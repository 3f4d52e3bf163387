//! [`ConfigError`]: every message names the field (or file line) at fault and
//! never contains a full API key or client token.

use std::{fmt, io, path::PathBuf};

use figment::{
    Source,
    error::{Actual, Kind},
};

use super::path::{field_path, is_plain_field_name, safe_segment};
use super::{secret::mask_key, sources};

/// Why a configuration could not be loaded or is invalid.
///
/// `Display` starts with the field path (`rate_limit.burst`, `keys[2]`,
/// `keys_file line 4`) and says what is wrong. Secrets appear only masked, in
/// `Display` and `Debug` alike.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("config file {}: {source}", path.display())]
    ReadConfigFile {
        /// The file that was asked for.
        path: PathBuf,
        /// Why it could not be read.
        source: io::Error,
    },

    /// The YAML or an environment variable does not fit the config's shape:
    /// a YAML syntax error, an unknown field, a wrong type, a bad duration.
    /// Each line names the key path and the layer (file or variable) it came
    /// from.
    #[error("{}", ParseDisplay(.0))]
    Parse(Box<figment::Error>),

    /// `keys_file` or `auth.tokens_file` could not be read.
    #[error("{field}: cannot read {}: {source}", path.display())]
    ReadListFile {
        /// `keys_file` or `auth.tokens_file`.
        field: &'static str,
        /// The resolved path.
        path: PathBuf,
        /// Why it could not be read.
        source: io::Error,
    },

    /// A line of `keys_file` or `auth.tokens_file` holds more than one word.
    #[error(
        "{field} line {line}: expected one value per line, optionally followed by ` # comment` ({})",
        path.display()
    )]
    ListFileLine {
        /// `keys_file` or `auth.tokens_file`.
        field: &'static str,
        /// The resolved path.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },

    /// Neither `keys`, `keys_file` nor `PROXYPAL_KEYS` supplied a key (outside
    /// `--dev`, where the caller supplies them).
    #[error("keys: no API keys configured — set keys, keys_file or PROXYPAL_KEYS")]
    NoKeys,

    /// A value appears twice where each must be unique (keys, key names,
    /// client tokens, CORS origins).
    #[error("{field}: duplicate of {first} ({label})")]
    Duplicate {
        /// Where the repeat is, e.g. `keys[3]` or `keys_file line 2`.
        field: String,
        /// Where it first appeared, e.g. `keys[0]`.
        first: String,
        /// The repeated value, masked if it is a secret.
        label: String,
    },

    /// A field holds a value outside what it accepts.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field path, e.g. `rate_limit.requests_per_minute` or `keys[1].burst`.
        field: String,
        /// What is wrong, with the rejected value unless it is a secret.
        reason: String,
    },
}

impl ConfigError {
    /// The field path the error is about, when it is about one field.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::ReadListFile { field, .. } | Self::ListFileLine { field, .. } => Some(field),
            Self::NoKeys => Some("keys"),
            Self::Duplicate { field, .. } | Self::Invalid { field, .. } => Some(field),
            Self::ReadConfigFile { .. } | Self::Parse(_) => None,
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid { field: field.into(), reason: reason.into() }
    }

    /// Wraps a figment error after masking any secret it quotes.
    pub(crate) fn parse(error: figment::Error) -> Self {
        Self::Parse(Box::new(redact(error)))
    }
}

/// Key paths whose values may be secrets: `keys` and `auth` (except the
/// fields of a key entry that are plainly not secret), and the document root.
fn is_secret_path(path: &[String]) -> bool {
    match path.first().map(String::as_str) {
        // An error about the whole document may quote it, whatever it holds.
        None => true,
        Some("keys") => {
            !matches!(path.last().map(String::as_str), Some("name" | "requests_per_minute" | "burst"))
        }
        Some("auth") => {
            !matches!(path.get(1).map(String::as_str), Some("tokens_file" | "allow_unauthenticated"))
        }
        // A client entry's token; its other fields are plainly not secret.
        Some("clients") => path.len() < 3 || path.last().is_some_and(|f| f == "token"),
        Some("ledger") => path.get(1).is_some_and(|f| f == "url"),
        // A webhook's secret, and its URL (whose path is often a credential).
        Some("webhooks") => path.len() < 3 || path.last().is_some_and(|f| f == "secret" || f == "url"),
        Some(_) => false,
    }
}

/// Masks values quoted by figment errors under secret paths: a string where a
/// list was expected (`keys: nvapi-…`), a map keyed by the secret
/// (`- nvapi-…: team-b`, which also lands in the error's path), a key typed
/// as a number.
fn redact(error: figment::Error) -> figment::Error {
    let mut errors: Vec<figment::Error> = error.into_iter().collect();
    for e in &mut errors {
        if !is_secret_path(&e.path) {
            continue;
        }
        for segment in &mut e.path {
            *segment = safe_segment(segment);
        }
        match &mut e.kind {
            Kind::InvalidType(actual, _)
            | Kind::InvalidValue(actual, _)
            | Kind::Unsupported(actual)
            | Kind::UnsupportedKey(actual, _) => redact_actual(actual),
            Kind::UnknownField(field, _) | Kind::UnknownVariant(field, _) if !is_plain_field_name(field) => {
                *field = mask_key(field);
            }
            _ => {}
        }
    }
    // `a.chain(b)` puts `b` in front of `a`: rebuild from the back.
    let mut rev = errors.into_iter().rev();
    match rev.next() {
        Some(last) => rev.fold(last, |acc, e| acc.chain(e)),
        // An iterator over an error yields at least that error.
        None => figment::Error::from("invalid configuration"),
    }
}

fn redact_actual(actual: &mut Actual) {
    let replacement = match actual {
        Actual::Str(s) => Actual::Str(mask_key(s)),
        Actual::Unsigned(_) | Actual::Signed(_) | Actual::Float(_) => {
            Actual::Other("a number (value hidden)".into())
        }
        Actual::Char(_) | Actual::Bytes(_) => Actual::Other("a value (hidden)".into()),
        // `Other` is a description chosen by code ("a number (quote the key)"),
        // and the rest carry no data.
        _ => return,
    };
    *actual = replacement;
}

/// Renders figment errors as `field: problem (in <layer>)`, one per line,
/// with list indices as `keys[1].burst` and environment-layer errors naming
/// the variable.
struct ParseDisplay<'a>(&'a figment::Error);

impl fmt::Display for ParseDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Walk the chain by cloning: `figment::Error` only iterates by value.
        for (i, e) in self.0.clone().into_iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            let field = field_path(&e.path);
            let layer = e.metadata.as_ref().map(|md| {
                if md.name == sources::ENV_LAYER_NAME {
                    let keys: Vec<&str> = e.path.iter().map(String::as_str).collect();
                    format!("environment variable {}", sources::env_var_name(&keys))
                } else {
                    match &md.source {
                        Some(Source::File(path)) => format!("{} {}", md.name, path.display()),
                        Some(other) => format!("{} {other}", md.name),
                        None => md.name.to_string(),
                    }
                }
            });
            match (field.is_empty(), layer) {
                (false, Some(layer)) => write!(f, "{field}: {} (in {layer})", e.kind)?,
                (false, None) => write!(f, "{field}: {}", e.kind)?,
                (true, Some(layer)) => write!(f, "{layer}: {}", e.kind)?,
                (true, None) => write!(f, "{}", e.kind)?,
            }
        }
        Ok(())
    }
}
