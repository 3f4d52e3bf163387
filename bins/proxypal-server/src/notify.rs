//! What the webhooks hear: a background task that looks at the gateway's
//! state once a second and reports it as events. It reports the state as it
//! is on every look; the webhooks' deduplication turns that into one
//! delivery per change (`key.disabled` once until `key.recovered`, …), so
//! nothing here remembers what was sent — and a request never waits for it.
//!
//! - `key.disabled` / `key.recovered`: a key the upstream rejected, and one
//!   usable again (an operator's reset).
//! - `pool.exhausted` / `pool.recovered`: no key of a provider can send a
//!   request for at least [`EXHAUSTED_FOR`] (every key disabled, cooling
//!   down or out of a window), and back.
//! - `quota.warning`: a budget window of an hour or more (a key's or a
//!   client's) past 80 % used, once per window: a day with a fixed reset is
//!   one window; a rolling one counts per period-aligned slot.
//! - `client.quota_exhausted`: a named client's request refused by its own
//!   quota, once per window of the limit that refused it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use proxypal_gateway::Gateway;
use proxypal_gateway::keypool::KeyStatus;
use proxypal_gateway::limiter::{LimitKind, LimitReport};
use proxypal_webhooks::{Event, EventKind, Webhooks};
use serde_json::json;

/// How often the state is looked at.
pub const EVERY: Duration = Duration::from_secs(1);

/// A pool that cannot send anything for at least this long is exhausted
/// (shorter gaps are a busy pool, not an exhausted one).
pub const EXHAUSTED_FOR: Duration = Duration::from_secs(5);

/// Budget windows this long or longer warn at [`WARN_AT`].
const WARN_WINDOWS: Duration = Duration::from_secs(3600);

/// The share of a budget that triggers `quota.warning` (80 %).
const WARN_AT: (u64, u64) = (4, 5);

/// The watcher task; it stops when dropped.
#[derive(Debug)]
pub struct Notifier(tokio::task::JoinHandle<()>);

impl Drop for Notifier {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Notifier {
    /// Looks at `gateway` every `every` and reports to `hooks` (nothing is
    /// spawned when no endpoint is configured).
    pub fn spawn(gateway: &Arc<Gateway>, hooks: &Webhooks, every: Duration) -> Option<Self> {
        if !hooks.is_enabled() {
            return None;
        }
        let gateway = Arc::downgrade(gateway);
        let hooks = hooks.clone();
        Some(Self(tokio::spawn(async move {
            let mut refused: HashMap<String, u64> = HashMap::new();
            loop {
                let Some(gateway) = gateway.upgrade() else { return };
                look(&gateway, &hooks, &mut refused);
                drop(gateway);
                tokio::time::sleep(every).await;
            }
        })))
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The window's name in events: `requests/86400s`.
fn window_name(l: &LimitReport) -> String {
    format!("{}/{}s", l.kind.as_str(), l.period.map_or(0, |p| p.as_secs()))
}

/// When the window `l` ends, as its identity for deduplication (Unix ms):
/// a fixed reset's next reset (to the minute), or the end of the
/// period-aligned slot of a rolling window.
fn window_end(l: &LimitReport, now: i64) -> i64 {
    let period = l.period.map_or(0, |p| i64::try_from(p.as_millis()).unwrap_or(i64::MAX));
    if l.reset != "rolling" {
        let at = now.saturating_add(i64::try_from(l.resets_in.as_millis()).unwrap_or(i64::MAX));
        return (at + 30_000) / 60_000 * 60_000;
    }
    if period <= 0 { now } else { (now / period + 1) * period }
}

/// The figures of one window.
fn figures(event: Event, l: &LimitReport, now: i64) -> Event {
    event
        .figure("window", window_name(l))
        .figure("limit", l.limit)
        .figure("used", l.used)
        .figure("remaining", l.remaining)
        .figure("resets_at", window_end(l, now))
}

/// A budget window worth a warning now.
fn warns(l: &LimitReport) -> bool {
    l.kind != LimitKind::Concurrent
        && l.period.is_some_and(|p| p >= WARN_WINDOWS)
        && l.limit > 0
        && l.used.saturating_mul(WARN_AT.1) >= l.limit.saturating_mul(WARN_AT.0)
}

fn look(gateway: &Gateway, hooks: &Webhooks, refused: &mut HashMap<String, u64>) {
    let now = now_ms();
    let reports = gateway.key_reports();
    // Per provider: the soonest any key could send again.
    let mut soonest: Vec<(String, Duration, usize)> = Vec::new();
    for r in &reports {
        let key = &r.snapshot.label;
        let kind = if r.snapshot.status == KeyStatus::Disabled {
            EventKind::KeyDisabled
        } else {
            EventKind::KeyRecovered
        };
        hooks.emit(Event::new(kind).provider(&r.provider).key(key));
        for l in r.limits.iter().filter(|l| warns(l)) {
            hooks.emit(figures(Event::new(EventKind::QuotaWarning).provider(&r.provider).key(key), l, now));
        }
        let usable_in = match r.snapshot.status {
            KeyStatus::Disabled => Duration::MAX,
            KeyStatus::CoolingDown { remaining, .. } => remaining,
            _ => Duration::ZERO,
        };
        let window = r
            .limits
            .iter()
            .filter(|l| l.kind != LimitKind::Concurrent && l.remaining == 0)
            .map(|l| l.resets_in)
            .max()
            .unwrap_or(Duration::ZERO);
        let ready_in = usable_in.max(window).max(r.blocked_for);
        match soonest.iter_mut().find(|(p, _, _)| *p == r.provider) {
            Some((_, s, n)) => {
                *s = (*s).min(ready_in);
                *n += 1;
            }
            None => soonest.push((r.provider.clone(), ready_in, 1)),
        }
    }
    for (provider, ready_in, keys) in soonest {
        if ready_in >= EXHAUSTED_FOR {
            let next = if ready_in == Duration::MAX { json!(null) } else { json!(ready_in.as_secs()) };
            hooks.emit(
                Event::new(EventKind::PoolExhausted)
                    .provider(&provider)
                    .figure("keys", keys)
                    .figure("next_permit_in_seconds", next),
            );
        } else {
            hooks.emit(Event::new(EventKind::PoolRecovered).provider(&provider).figure("keys", keys));
        }
    }
    for c in gateway.client_reports() {
        for l in c.limits.iter().filter(|l| warns(l)) {
            hooks.emit(figures(Event::new(EventKind::QuotaWarning).client(&c.name), l, now));
        }
        let before = refused.insert(c.name.clone(), c.refused).unwrap_or(0);
        if c.refused > before {
            // The window that refused: a spent one (the longest wait first).
            let spent = c
                .limits
                .iter()
                .filter(|l| l.kind != LimitKind::Concurrent && l.remaining == 0)
                .max_by_key(|l| l.resets_in)
                .or(c.limits.first());
            let mut event =
                Event::new(EventKind::ClientQuotaExhausted).client(&c.name).figure("refused", c.refused);
            if let Some(l) = spent {
                event = figures(event, l, now);
            }
            hooks.emit(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use proxypal_gateway::limiter::{KeyBudget, Limits, ManualClock, QuotaEngine};

    use super::*;

    /// The report of a budget with `limits` after `used` requests.
    fn report(limits: Limits, used: u64) -> Vec<LimitReport> {
        let clock = ManualClock::at("2026-12-01T00:00:05Z").unwrap();
        let budget = KeyBudget { own: Some(limits.compile().unwrap()), ..KeyBudget::default() };
        let engine = QuotaEngine::new([budget], clock);
        for _ in 0..used {
            engine.try_acquire(0, 0).unwrap().finish(None);
        }
        engine.report(0)
    }

    #[test]
    fn a_rolling_day_is_named_by_its_period_slot_and_warns_past_80_percent() {
        let day = Limits { requests_per_day: Some(100), ..Limits::default() };
        let now = 1_796_083_200_000 + 5_000; // 5 s into a UTC day
        let l = &report(day.clone(), 85)[0];
        assert_eq!(window_end(l, now), 1_796_083_200_000 + 86_400_000);
        assert_eq!(window_end(l, now + 3_600_000), window_end(l, now), "the same slot all day");
        assert!(warns(l), "85 of 100");
        assert!(!warns(&report(day, 79)[0]), "79 of 100");
        let minute = Limits { requests_per_minute: Some(10), ..Limits::default() };
        assert!(!warns(&report(minute, 10)[0]), "a minute window is load, not a budget");
    }
}
