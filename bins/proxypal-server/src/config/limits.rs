//! The quota fields shared by `rate_limit`, `accounts.<name>` and each key:
//! every field optional, so that an account or a key overrides only what it
//! sets. [`LimitFields::to_limits`] turns them into the quota engine's
//! [`Limits`].

use std::time::Duration;

use proxypal_gateway::limiter::{Limits, Reset, Unit, WindowSpec};
use serde::Deserialize;

use super::parse;

/// Limits as configured (see `docs/configuration.md`, "Quotas").
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct LimitFields {
    /// At most this many requests in any rolling 60 s (+ margin).
    pub requests_per_minute: Option<u64>,
    /// GCRA shaping: requests that may go back to back (default: the whole
    /// minute window).
    pub burst: Option<u32>,
    /// At most this many requests per day.
    pub requests_per_day: Option<u64>,
    /// `rolling` (any 24 h, the default) or `"HH:MM <IANA zone>"`.
    pub day_reset: Option<String>,
    /// At most this many tokens in any rolling 60 s.
    pub tokens_per_minute: Option<u64>,
    /// At most this many tokens per day.
    pub tokens_per_day: Option<u64>,
    /// Requests in flight at once.
    pub max_concurrent: Option<u32>,
    /// Slack added to rolling periods (default 500 ms).
    #[serde(deserialize_with = "parse::optional_duration")]
    pub margin: Option<Duration>,
    /// More windows in the general form.
    pub windows: Option<Vec<WindowEntry>>,
}

/// One window in the general form: `{ requests: 1000, per: 24h, reset: "00:00 UTC" }`
/// or `{ tokens: 6000, per: 1m }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct WindowEntry {
    /// A request limit (exactly one of `requests` and `tokens`).
    #[serde(default)]
    pub requests: Option<u64>,
    /// A token limit.
    #[serde(default)]
    pub tokens: Option<u64>,
    /// The period.
    #[serde(deserialize_with = "parse::duration")]
    pub per: Duration,
    /// `rolling` (default) or `"HH:MM <IANA zone>"` (needs `per: 24h`).
    #[serde(default)]
    pub reset: Option<String>,
}

/// Why [`LimitFields`] cannot become [`Limits`]: `(field, reason)`, the field
/// relative to the fields' own place (`day_reset`, `windows[1]`).
pub(crate) type FieldError = (String, String);

impl LimitFields {
    /// The built-in defaults, stated by the quota engine: 40 requests in any
    /// rolling minute, 500 ms margin, nothing else.
    pub fn builtin() -> Self {
        let limits = Limits::nvidia_free_tier();
        Self { requests_per_minute: limits.requests_per_minute, margin: limits.margin, ..Self::default() }
    }

    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The quota engine's form of these fields.
    ///
    /// # Errors
    /// A reset that is not `rolling` or `HH:MM zone`, or a window with both or
    /// neither of `requests` and `tokens`; the field is relative.
    pub(crate) fn to_limits(&self) -> Result<Limits, FieldError> {
        let reset = |field: String, value: Option<&String>| -> Result<Option<Reset>, FieldError> {
            value.map(|v| v.parse::<Reset>().map_err(|e| (field, e.to_string()))).transpose()
        };
        let mut windows = None;
        if let Some(entries) = &self.windows {
            let mut out = Vec::with_capacity(entries.len());
            for (i, w) in entries.iter().enumerate() {
                let (unit, limit) = match (w.requests, w.tokens) {
                    (Some(n), None) => (Unit::Requests, n),
                    (None, Some(n)) => (Unit::Tokens, n),
                    _ => {
                        return Err((
                            format!("windows[{i}]"),
                            "set exactly one of `requests` and `tokens`".into(),
                        ));
                    }
                };
                let reset = reset(format!("windows[{i}].reset"), w.reset.as_ref())?.unwrap_or(Reset::Rolling);
                out.push(WindowSpec { unit, limit, period: w.per, reset });
            }
            windows = Some(out);
        }
        Ok(Limits {
            requests_per_minute: self.requests_per_minute,
            burst: self.burst,
            requests_per_day: self.requests_per_day,
            day_reset: reset("day_reset".into(), self.day_reset.as_ref())?,
            tokens_per_minute: self.tokens_per_minute,
            tokens_per_day: self.tokens_per_day,
            max_concurrent: self.max_concurrent,
            margin: self.margin,
            windows,
        })
    }
}
