//! What a budget allows, as operators configure it: [`Limits`] (the
//! configuration fields, each optional so that accounts and keys can override
//! the defaults field by field) compiled into windows.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use jiff::tz::TimeZone;

use crate::KeyQuota;

/// What a window counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// Requests sent upstream.
    Requests,
    /// Tokens (prompt + completion) the upstream reported, or reserved.
    Tokens,
}

impl Unit {
    /// `"requests"` or `"tokens"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Requests => "requests",
            Unit::Tokens => "tokens",
        }
    }
}

/// When a window forgets what it counted.
#[derive(Clone)]
pub enum Reset {
    /// Any interval of the period: a grant counts until one period (plus the
    /// margin) after it was made.
    Rolling,
    /// A calendar day that starts at `HH:MM` in an IANA time zone; the count
    /// goes back to zero at that instant (daylight-saving changes included).
    Daily(DailyReset),
}

/// A daily reset at a wall-clock time in a time zone, e.g. `00:00 UTC`.
#[derive(Clone)]
pub struct DailyReset {
    hour: i8,
    minute: i8,
    zone: TimeZone,
    name: Arc<str>,
}

impl DailyReset {
    /// The first reset instant strictly after `now` (Unix nanoseconds).
    pub(crate) fn next_after(&self, now: u64) -> u64 {
        let Ok(ts) = jiff::Timestamp::from_nanosecond(i128::from(now)) else {
            return now.saturating_add(DAY_NANOS);
        };
        let today = self.zone.to_datetime(ts).date();
        let mut date = today;
        // Today's reset if it is still ahead, else tomorrow's (a gap in the
        // clock resolves to the time after the gap, a fold to the first pass).
        for _ in 0..3 {
            let at = date.at(self.hour, self.minute, 0, 0);
            if let Ok(reset) = self.zone.to_timestamp(at) {
                let reset = u64::try_from(reset.as_nanosecond()).unwrap_or(0);
                if reset > now {
                    return reset;
                }
            }
            match date.tomorrow() {
                Ok(next) => date = next,
                Err(_) => break,
            }
        }
        now.saturating_add(DAY_NANOS)
    }
}

const DAY_NANOS: u64 = 86_400_000_000_000;

impl fmt::Display for Reset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reset::Rolling => f.write_str("rolling"),
            Reset::Daily(d) => write!(f, "{:02}:{:02} {}", d.hour, d.minute, d.name),
        }
    }
}

impl fmt::Debug for Reset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Debug for DailyReset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02} {}", self.hour, self.minute, self.name)
    }
}

impl PartialEq for Reset {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Reset::Rolling, Reset::Rolling) => true,
            (Reset::Daily(a), Reset::Daily(b)) => {
                a.hour == b.hour && a.minute == b.minute && a.name == b.name
            }
            _ => false,
        }
    }
}

impl Eq for Reset {}

/// Why a reset could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{value:?} is not `rolling` or `HH:MM <IANA zone>` (e.g. `00:00 UTC`, `00:00 America/Los_Angeles`): {reason}"
)]
pub struct ResetError {
    value: String,
    reason: String,
}

impl FromStr for Reset {
    type Err = ResetError;

    fn from_str(s: &str) -> Result<Self, ResetError> {
        let err = |reason: &str| ResetError { value: s.to_owned(), reason: reason.to_owned() };
        let s_trim = s.trim();
        if s_trim.eq_ignore_ascii_case("rolling") {
            return Ok(Reset::Rolling);
        }
        let (time, zone) = s_trim.split_once(char::is_whitespace).ok_or_else(|| err("no time zone"))?;
        let (h, m) = time.split_once(':').ok_or_else(|| err("the time is not HH:MM"))?;
        let hour: i8 =
            h.parse().ok().filter(|h| (0..24).contains(h)).ok_or_else(|| err("hour not in 00..23"))?;
        let minute: i8 =
            m.parse().ok().filter(|m| (0..60).contains(m)).ok_or_else(|| err("minute not in 00..59"))?;
        let name = zone.trim();
        let zone = TimeZone::get(name).map_err(|e| err(&format!("unknown time zone {name:?} ({e})")))?;
        Ok(Reset::Daily(DailyReset { hour, minute, zone, name: name.into() }))
    }
}

/// One window in its general form: at most `limit` of `unit` per `period`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowSpec {
    /// What it counts.
    pub unit: Unit,
    /// How many.
    pub limit: u64,
    /// Over how long (24 h for a daily reset).
    pub period: Duration,
    /// Rolling, or a daily reset.
    pub reset: Reset,
}

/// A budget's limits as configured: every field optional, so defaults, an
/// account's and a key's own fields can be layered with [`Limits::overlay`].
///
/// [`Limits::compile`] turns them into windows: `requests_per_minute` is a
/// rolling 60 s request window, `requests_per_day` a 24 h one (rolling or
/// reset at `day_reset`), the token fields likewise, and `windows` adds any
/// other.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// At most this many requests in any rolling 60 s (+ margin).
    pub requests_per_minute: Option<u64>,
    /// GCRA shaping: at most this many back to back; defaults to
    /// `requests_per_minute` (the whole window may go at once).
    pub burst: Option<u32>,
    /// At most this many requests per day.
    pub requests_per_day: Option<u64>,
    /// How the day windows reset (default rolling).
    pub day_reset: Option<Reset>,
    /// At most this many tokens in any rolling 60 s (+ margin).
    pub tokens_per_minute: Option<u64>,
    /// At most this many tokens per day.
    pub tokens_per_day: Option<u64>,
    /// At most this many requests in flight at once.
    pub max_concurrent: Option<u32>,
    /// Slack added to rolling periods against clock and network jitter.
    pub margin: Option<Duration>,
    /// More windows in the general form (replaces, not extends, the layer below).
    pub windows: Option<Vec<WindowSpec>>,
}

/// Why [`Limits`] do not make a budget. `field` is relative (`burst`,
/// `windows[1].per`): prefix it with where the limits came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LimitError {
    /// A limit of zero.
    #[error("{field}: must be at least 1 (got 0)")]
    Zero {
        /// The field.
        field: String,
    },
    /// A window with a zero period.
    #[error("{field}: the period must be longer than zero")]
    ZeroPeriod {
        /// The field.
        field: String,
    },
    /// A daily reset on a window whose period is not a day.
    #[error("{field}: a `HH:MM zone` reset needs `per: 24h` (got {period:?})")]
    ResetNeedsDay {
        /// The field.
        field: String,
        /// The period given.
        period: Duration,
    },
    /// `burst` above what the request windows allow, so it could never be used.
    #[error("burst: {burst} is more than the windows allow at once ({allowed})")]
    BurstTooLarge {
        /// The burst asked for.
        burst: u32,
        /// The smallest request window.
        allowed: u64,
    },
    /// `burst` without `requests_per_minute` (the shaper's rate).
    #[error("burst: needs requests_per_minute (the rate the burst refills at)")]
    BurstWithoutRate,
    /// A margin at least as long as the shortest rolling period.
    #[error("margin: {margin:?} is not shorter than the shortest rolling period ({period:?})")]
    MarginTooLarge {
        /// The margin.
        margin: Duration,
        /// The shortest rolling period.
        period: Duration,
    },
}

impl LimitError {
    /// The field it names, relative to where the limits came from (`burst`,
    /// `windows[1].per`).
    pub fn field(&self) -> &str {
        match self {
            LimitError::Zero { field }
            | LimitError::ZeroPeriod { field }
            | LimitError::ResetNeedsDay { field, .. } => field,
            LimitError::BurstTooLarge { .. } | LimitError::BurstWithoutRate => "burst",
            LimitError::MarginTooLarge { .. } => "margin",
        }
    }

    /// What is wrong, without the field.
    pub fn reason(&self) -> String {
        let text = self.to_string();
        let prefix = format!("{}: ", self.field());
        text.strip_prefix(&prefix).map(str::to_owned).unwrap_or(text)
    }
}

/// One window, compiled: the margin added to rolling periods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Window {
    pub(crate) unit: Unit,
    pub(crate) limit: u64,
    /// The configured period (shown to users).
    pub(crate) period: Duration,
    /// The period the engine counts with: `period + margin` when rolling.
    pub(crate) span: u64,
    pub(crate) reset: Reset,
}

/// Limits compiled into what a budget enforces.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BudgetSpec {
    pub(crate) windows: Vec<Window>,
    pub(crate) shaper: Option<KeyQuota>,
    pub(crate) max_concurrent: Option<NonZeroU32>,
}

impl BudgetSpec {
    /// Whether it limits nothing at all.
    pub fn is_unlimited(&self) -> bool {
        self.windows.is_empty() && self.shaper.is_none() && self.max_concurrent.is_none()
    }

    /// Each window as `(unit, period, limit)`.
    pub fn windows(&self) -> impl Iterator<Item = (Unit, Duration, u64)> + '_ {
        self.windows.iter().map(|w| (w.unit, w.period, w.limit))
    }

    /// The request windows' limits, smallest first (for the shaper check and docs).
    fn smallest_requests(&self) -> Option<u64> {
        self.windows.iter().filter(|w| w.unit == Unit::Requests).map(|w| w.limit).min()
    }
}

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

impl Limits {
    /// Requests per minute of NVIDIA's free tier, as reported.
    pub const DEFAULT_REQUESTS_PER_MINUTE: u64 = 40;
    /// Slack added to rolling periods unless configured otherwise.
    pub const DEFAULT_MARGIN: Duration = Duration::from_millis(500);

    /// NVIDIA's free tier: 40 requests in any rolling minute, bursts allowed,
    /// 500 ms margin. The gateway's default.
    pub fn nvidia_free_tier() -> Self {
        Self {
            requests_per_minute: Some(Self::DEFAULT_REQUESTS_PER_MINUTE),
            margin: Some(Self::DEFAULT_MARGIN),
            ..Self::default()
        }
    }

    /// No limit set (a layer that changes nothing).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// `self` with every field `over` sets replaced by `over`'s.
    pub fn overlay(&self, over: &Limits) -> Limits {
        Limits {
            requests_per_minute: over.requests_per_minute.or(self.requests_per_minute),
            burst: over.burst.or(self.burst),
            requests_per_day: over.requests_per_day.or(self.requests_per_day),
            day_reset: over.day_reset.clone().or_else(|| self.day_reset.clone()),
            tokens_per_minute: over.tokens_per_minute.or(self.tokens_per_minute),
            tokens_per_day: over.tokens_per_day.or(self.tokens_per_day),
            max_concurrent: over.max_concurrent.or(self.max_concurrent),
            margin: over.margin.or(self.margin),
            windows: over.windows.clone().or_else(|| self.windows.clone()),
        }
    }

    /// The budget these limits describe.
    ///
    /// # Errors
    /// [`LimitError`] naming the field: a zero limit or period, a daily reset
    /// on a period that is not 24 h, a burst the windows could never allow, a
    /// margin as long as a rolling period.
    pub fn compile(&self) -> Result<BudgetSpec, LimitError> {
        let margin = self.margin.unwrap_or(Self::DEFAULT_MARGIN);
        let day_reset = self.day_reset.clone().unwrap_or(Reset::Rolling);
        let mut specs: Vec<(String, WindowSpec)> = Vec::new();
        let mut field = |name: &str, unit, value: Option<u64>, period, reset: &Reset| {
            if let Some(limit) = value {
                specs.push((name.to_owned(), WindowSpec { unit, limit, period, reset: reset.clone() }));
            }
        };
        field("requests_per_minute", Unit::Requests, self.requests_per_minute, MINUTE, &Reset::Rolling);
        field("requests_per_day", Unit::Requests, self.requests_per_day, DAY, &day_reset);
        field("tokens_per_minute", Unit::Tokens, self.tokens_per_minute, MINUTE, &Reset::Rolling);
        field("tokens_per_day", Unit::Tokens, self.tokens_per_day, DAY, &day_reset);
        for (i, w) in self.windows.iter().flatten().enumerate() {
            specs.push((format!("windows[{i}]"), w.clone()));
        }

        let mut windows = Vec::with_capacity(specs.len());
        let mut shortest_rolling: Option<Duration> = None;
        for (name, w) in specs {
            let is_general = name.starts_with("windows[");
            let limit_field = if is_general { format!("{name}.{}", w.unit.as_str()) } else { name.clone() };
            if w.limit == 0 {
                return Err(LimitError::Zero { field: limit_field });
            }
            if w.period.is_zero() {
                return Err(LimitError::ZeroPeriod { field: format!("{name}.per") });
            }
            let span = match &w.reset {
                Reset::Rolling => {
                    shortest_rolling = Some(shortest_rolling.map_or(w.period, |p| p.min(w.period)));
                    crate::clock::nanos(w.period.saturating_add(margin))
                }
                Reset::Daily(_) if w.period != DAY => {
                    let field = if is_general { format!("{name}.reset") } else { "day_reset".to_owned() };
                    return Err(LimitError::ResetNeedsDay { field, period: w.period });
                }
                Reset::Daily(_) => crate::clock::nanos(w.period),
            };
            windows.push(Window { unit: w.unit, limit: w.limit, period: w.period, span, reset: w.reset });
        }
        if let Some(period) = shortest_rolling.filter(|p| margin >= *p) {
            return Err(LimitError::MarginTooLarge { margin, period });
        }
        if self.max_concurrent == Some(0) {
            return Err(LimitError::Zero { field: "max_concurrent".into() });
        }
        let mut spec = BudgetSpec {
            windows,
            shaper: None,
            max_concurrent: self.max_concurrent.and_then(NonZeroU32::new),
        };
        if let Some(burst) = self.burst {
            if burst == 0 {
                return Err(LimitError::Zero { field: "burst".into() });
            }
            let rate = self.requests_per_minute.ok_or(LimitError::BurstWithoutRate)?;
            if let Some(allowed) = spec.smallest_requests().filter(|a| u64::from(burst) > *a) {
                return Err(LimitError::BurstTooLarge { burst, allowed });
            }
            // The shaper only matters below the window: at burst = rate it
            // never refuses what the rolling minute allows (a token bucket of
            // N refilling N per period admits every sequence the window does).
            if u64::from(burst) < rate {
                let rate = u32::try_from(rate).unwrap_or(u32::MAX);
                let quota = KeyQuota::new(rate, burst)
                    .and_then(|q| q.with_margin(margin))
                    .map_err(|_| LimitError::Zero { field: "burst".into() })?;
                spec.shaper = Some(quota);
            }
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> u64 {
        let ts: jiff::Timestamp = s.parse().unwrap();
        u64::try_from(ts.as_nanosecond()).unwrap()
    }

    #[test]
    fn resets_parse_and_print() {
        assert_eq!("rolling".parse::<Reset>().unwrap(), Reset::Rolling);
        let r: Reset = "00:00 America/Los_Angeles".parse().unwrap();
        assert_eq!(r.to_string(), "00:00 America/Los_Angeles");
        for bad in ["", "00:00", "24:00 UTC", "12:60 UTC", "noon UTC", "00:00 Mars/Olympus"] {
            let e = bad.parse::<Reset>().unwrap_err().to_string();
            assert!(e.contains("HH:MM"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_daily_reset_follows_the_zone_across_daylight_saving() {
        let Reset::Daily(la) = "00:00 America/Los_Angeles".parse::<Reset>().unwrap() else { panic!() };
        // PST (UTC-8) before 2026-03-08, PDT (UTC-7) after.
        assert_eq!(la.next_after(at("2026-03-07T12:00:00Z")), at("2026-03-08T08:00:00Z"));
        assert_eq!(la.next_after(at("2026-03-08T08:00:00Z")), at("2026-03-09T07:00:00Z"), "23 h day");
        assert_eq!(la.next_after(at("2026-11-01T06:59:59Z")), at("2026-11-01T07:00:00Z"));
        assert_eq!(la.next_after(at("2026-11-01T07:00:00Z")), at("2026-11-02T08:00:00Z"), "25 h day");
        let Reset::Daily(utc) = "00:00 UTC".parse::<Reset>().unwrap() else { panic!() };
        assert_eq!(utc.next_after(at("2026-11-30T23:59:59Z")), at("2026-12-01T00:00:00Z"));
        // A reset inside the spring-forward gap happens right after the gap.
        let Reset::Daily(gap) = "02:30 America/New_York".parse::<Reset>().unwrap() else { panic!() };
        assert_eq!(gap.next_after(at("2026-03-08T05:00:00Z")), at("2026-03-08T07:30:00Z"));
    }

    #[test]
    fn fields_become_windows_and_errors_name_the_field() {
        let limits = Limits {
            requests_per_day: Some(1000),
            day_reset: Some("00:00 UTC".parse().unwrap()),
            tokens_per_minute: Some(6000),
            ..Limits::nvidia_free_tier()
        };
        let spec = limits.compile().unwrap();
        assert_eq!(spec.windows.len(), 3);
        assert_eq!(spec.windows[0].span, 60_500_000_000, "the margin widens rolling windows");
        assert_eq!(spec.windows[1].span, 86_400_000_000_000, "not fixed-reset ones");
        assert!(spec.shaper.is_none(), "burst defaults to the whole window: no shaper");

        let err = |l: Limits| l.compile().unwrap_err().to_string();
        assert_eq!(
            err(Limits { requests_per_day: Some(0), ..Limits::default() }),
            "requests_per_day: must be at least 1 (got 0)"
        );
        let w = |unit, limit, secs, reset: &str| WindowSpec {
            unit,
            limit,
            period: Duration::from_secs(secs),
            reset: reset.parse().unwrap(),
        };
        assert_eq!(
            err(Limits {
                windows: Some(vec![w(Unit::Tokens, 5, 60, "rolling"), w(Unit::Requests, 0, 60, "rolling")]),
                ..Limits::default()
            }),
            "windows[1].requests: must be at least 1 (got 0)"
        );
        assert!(
            err(Limits { windows: Some(vec![w(Unit::Tokens, 5, 0, "rolling")]), ..Limits::default() })
                .starts_with("windows[0].per:")
        );
        assert!(
            err(Limits { windows: Some(vec![w(Unit::Requests, 5, 3600, "00:00 UTC")]), ..Limits::default() })
                .starts_with("windows[0].reset:")
        );
        assert!(
            err(Limits { burst: Some(41), ..Limits::nvidia_free_tier() }).starts_with("burst: 41 is more")
        );
        assert!(err(Limits { burst: Some(5), ..Limits::default() }).starts_with("burst: needs"));
        assert!(err(Limits { margin: Some(MINUTE), ..Limits::nvidia_free_tier() }).starts_with("margin:"));
        let shaped = Limits { burst: Some(10), ..Limits::nvidia_free_tier() }.compile().unwrap();
        assert_eq!(shaped.shaper.map(|q| q.burst()), Some(10));
    }

    #[test]
    fn overlay_replaces_field_by_field() {
        let base = Limits::nvidia_free_tier();
        let over = Limits { requests_per_day: Some(500), ..Limits::default() };
        let both = base.overlay(&over);
        assert_eq!(both.requests_per_minute, Some(40));
        assert_eq!(both.requests_per_day, Some(500));
        assert!(Limits::default().is_empty() && !over.is_empty());
    }
}
