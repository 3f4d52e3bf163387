//! The gateway's side of the quota engine: what a request is expected to
//! cost in tokens, what an upstream's answer announces about its limits, the
//! usage it reports, and the pool's limits as `x-ratelimit-*` headers.

use std::time::Duration;

use http::HeaderMap;
use proxypal_limiter::{Announced, Unit};

/// Completion tokens assumed for a request that declares no `max_tokens` or
/// `max_completion_tokens` (a reservation only: the reported usage replaces it).
pub const DEFAULT_COMPLETION_ESTIMATE: u64 = 1024;

/// Tokens a request reserves: its declared `max_completion_tokens` (or
/// `max_tokens`, else [`DEFAULT_COMPLETION_ESTIMATE`]) plus its prompt,
/// estimated as a quarter of the body's bytes (JSON syntax included, so on
/// the high side).
pub fn estimate_tokens(body: &[u8]) -> u64 {
    #[derive(serde::Deserialize)]
    struct Declared {
        max_completion_tokens: Option<u64>,
        max_tokens: Option<u64>,
    }
    let declared = serde_json::from_slice::<Declared>(body).ok();
    let completion = declared
        .and_then(|d| d.max_completion_tokens.or(d.max_tokens))
        .unwrap_or(DEFAULT_COMPLETION_ESTIMATE);
    completion.saturating_add(body.len() as u64 / 4)
}

/// A reset or retry value as upstreams write them: a Go-style duration
/// (`2m59.56s`, `7.66s`, `185ms`, `1h2m3s`), or a number of seconds (possibly
/// fractional), or an epoch (seconds above 1e9, milliseconds above 1e12,
/// relative to `now_unix_ms`). Rounded up to the millisecond. `None` for
/// anything else, negative or empty (unknown is never "now").
pub fn parse_reset(value: &str, now_unix_ms: u64) -> Option<Duration> {
    let v = value.trim();
    if v.is_empty() || v.starts_with('-') {
        return None;
    }
    if let Ok(n) = v.parse::<f64>() {
        if !n.is_finite() || n < 0.0 {
            return None;
        }
        let ms = if n > 1e12 {
            (n - now_unix_ms as f64).max(0.0)
        } else if n > 1e9 {
            (n * 1000.0 - now_unix_ms as f64).max(0.0)
        } else {
            n * 1000.0
        };
        return Some(Duration::from_millis(ms.ceil() as u64));
    }
    go_duration(v)
}

/// `1h2m3.5s`, `185ms`, `6m0s`, `10us`: every part consumed, else `None`.
fn go_duration(v: &str) -> Option<Duration> {
    let mut rest = v;
    let mut nanos = 0f64;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        if num_end == 0 {
            return None;
        }
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let (scale, len) = if rest.starts_with("ms") {
            (1e6, 2)
        } else if rest.starts_with("us") {
            (1e3, 2)
        } else if rest.starts_with("µs") {
            (1e3, "µs".len())
        } else if rest.starts_with("ns") {
            (1.0, 2)
        } else if rest.starts_with('h') {
            (3.6e12, 1)
        } else if rest.starts_with('m') {
            (6e10, 1)
        } else if rest.starts_with('s') {
            (1e9, 1)
        } else {
            return None;
        };
        nanos += n * scale;
        rest = &rest[len..];
    }
    let ms = (nanos / 1e6).ceil();
    (ms.is_finite() && ms >= 0.0).then(|| Duration::from_millis(ms as u64))
}

/// What `headers` announce about limits, in the OpenAI/Groq dialect
/// (`x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, period unsaid)
/// and the Cerebras one (the same with `-minute`, `-hour` or `-day`). At most
/// one entry per unit and period; fields a response leaves out stay unknown.
pub fn announced(headers: &HeaderMap, now_unix_ms: u64) -> Vec<Announced> {
    let mut out: Vec<Announced> = Vec::new();
    for (name, value) in headers {
        let Some(rest) = name.as_str().strip_prefix("x-ratelimit-") else { continue };
        let Some((field, dimension)) = rest.split_once('-') else { continue };
        let (unit, period) = match dimension {
            "requests" => (Unit::Requests, None),
            "tokens" => (Unit::Tokens, None),
            "requests-minute" => (Unit::Requests, Some(60)),
            "requests-hour" => (Unit::Requests, Some(3_600)),
            "requests-day" => (Unit::Requests, Some(86_400)),
            "tokens-minute" => (Unit::Tokens, Some(60)),
            "tokens-hour" => (Unit::Tokens, Some(3_600)),
            "tokens-day" => (Unit::Tokens, Some(86_400)),
            _ => continue,
        };
        let period = period.map(Duration::from_secs);
        let Ok(text) = value.to_str() else { continue };
        let entry = match out.iter_mut().find(|a| a.unit == unit && a.period == period) {
            Some(entry) => entry,
            None => {
                out.push(Announced { unit, period, limit: None, remaining: None, reset: None });
                let Some(last) = out.last_mut() else { continue };
                last
            }
        };
        let count = || text.trim().parse::<u64>().ok();
        match field {
            "limit" => entry.limit = count(),
            "remaining" => entry.remaining = count(),
            "reset" => entry.reset = parse_reset(text, now_unix_ms),
            _ => {}
        }
    }
    out
}

/// A duration the way OpenAI writes `x-ratelimit-reset-*`: `1.5s`, `6m0s`,
/// `1h2m3s`, `0s`.
pub fn openai_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 60_000 {
        let secs = ms as f64 / 1000.0;
        return format!("{secs}s");
    }
    let total = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
    if h > 0 { format!("{h}h{m}m{s}s") } else { format!("{m}m{s}s") }
}

/// How long the pool's `x-ratelimit-*` headers are reused before they are
/// summed again (summing visits every key).
const POOL_HEADERS_TTL: std::time::Duration = std::time::Duration::from_millis(100);

/// The pool's limits as OpenAI-style response headers, summed over usable
/// keys at most every [`POOL_HEADERS_TTL`].
#[derive(Debug)]
pub(crate) struct PoolHeaders {
    /// When they were summed (`None`: never).
    at: Option<std::time::Instant>,
    values: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl PoolHeaders {
    pub(crate) fn empty() -> Self {
        Self { at: None, values: Vec::new() }
    }

    /// Adds the headers to `headers` (replacing an upstream's per-key ones).
    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.values {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// The current pool headers, summed again when stale.
pub(crate) fn pool_headers(
    keys: &proxypal_keypool::KeyPool<crate::keyset::KeyResources>,
    cache: &arc_swap::ArcSwap<PoolHeaders>,
) -> std::sync::Arc<PoolHeaders> {
    let current = cache.load_full();
    if current.at.is_some_and(|at| at.elapsed() < POOL_HEADERS_TTL) {
        return current;
    }
    let usable: Vec<bool> =
        keys.snapshot().iter().map(|k| k.status == proxypal_keypool::KeyStatus::Ready).collect();
    let minute = Duration::from_secs(60);
    let mut values = Vec::new();
    const NAMES: [(Unit, [&str; 3]); 2] = [
        (
            Unit::Requests,
            ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"],
        ),
        (
            Unit::Tokens,
            ["x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"],
        ),
    ];
    keys.with_current(|_, resources| {
        for (unit, [limit, remaining, reset]) in NAMES {
            let include = |i: usize| usable.get(i).copied().unwrap_or(false);
            let Some(sum) = resources.quotas.pool_window(unit, minute, include) else { continue };
            // Static names: cloning one per response costs nothing.
            values.push((http::HeaderName::from_static(limit), http::HeaderValue::from(sum.limit)));
            values.push((http::HeaderName::from_static(remaining), http::HeaderValue::from(sum.remaining)));
            if let Ok(value) = http::HeaderValue::try_from(openai_duration(sum.reset)) {
                values.push((http::HeaderName::from_static(reset), value));
            }
        }
    });
    let fresh = std::sync::Arc::new(PoolHeaders { at: Some(std::time::Instant::now()), values });
    cache.store(std::sync::Arc::clone(&fresh));
    fresh
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body::{Body, Frame};
    use proxypal_limiter::Permit;

    use super::*;
    use crate::keyset::SharedClock;

    #[test]
    fn resets_in_every_dialect() {
        let ms = Duration::from_millis;
        assert_eq!(parse_reset("2m59.56s", 0), Some(ms(179_560)));
        assert_eq!(parse_reset("7.66s", 0), Some(ms(7_660)));
        assert_eq!(parse_reset("185ms", 0), Some(ms(185)));
        assert_eq!(parse_reset("6m0s", 0), Some(ms(360_000)));
        assert_eq!(parse_reset("1h2m3s", 0), Some(ms(3_723_000)));
        assert_eq!(parse_reset("1m26.4s", 0), Some(ms(86_400)));
        assert_eq!(parse_reset("33011.382867097855", 0), Some(ms(33_011_383)), "float seconds, rounded up");
        assert_eq!(parse_reset("11.75", 0), Some(ms(11_750)));
        assert_eq!(parse_reset("1790812800000", 1_790_812_790_000), Some(ms(10_000)), "epoch ms");
        assert_eq!(parse_reset("1790812800", 1_790_812_790_000), Some(ms(10_000)), "epoch s");
        for unknown in ["", "-1", "soon", "5x", "m", "1.5.5s"] {
            assert_eq!(parse_reset(unknown, 0), None, "{unknown:?}");
        }
    }

    #[test]
    fn groq_and_cerebras_headers_become_announcements() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("x-ratelimit-limit-requests", "14400"),
            ("x-ratelimit-limit-tokens", "18000"),
            ("x-ratelimit-remaining-requests", "14370"),
            ("x-ratelimit-remaining-tokens", "17997"),
            ("x-ratelimit-reset-requests", "2m59.56s"),
            ("x-ratelimit-reset-tokens", "7.66s"),
            ("x-ratelimit-remaining-requests-day", "0"),
            ("x-ratelimit-reset-requests-day", "33011.382867097855"),
        ] {
            h.insert(k, v.parse().unwrap());
        }
        let a = announced(&h, 0);
        assert_eq!(a.len(), 3);
        let requests = a.iter().find(|a| a.unit == Unit::Requests && a.period.is_none()).unwrap();
        assert_eq!(
            (requests.limit, requests.remaining, requests.reset),
            (Some(14_400), Some(14_370), Some(Duration::from_millis(179_560)))
        );
        let day = a.iter().find(|a| a.period == Some(Duration::from_secs(86_400))).unwrap();
        assert_eq!((day.limit, day.remaining), (None, Some(0)));
    }

    #[test]
    fn durations_print_as_openai_does() {
        assert_eq!(openai_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(openai_duration(Duration::ZERO), "0s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(openai_duration(Duration::from_secs(3723)), "1h2m3s");
    }

    #[test]
    fn a_request_reserves_its_declared_completion_and_its_prompt() {
        let body = br#"{"model":"m","max_tokens":100,"messages":[{"role":"user","content":"hello there"}]}"#;
        assert_eq!(estimate_tokens(body), 100 + body.len() as u64 / 4);
        let body = br#"{"max_completion_tokens":7,"max_tokens":100}"#;
        assert_eq!(estimate_tokens(body), 7 + body.len() as u64 / 4);
        assert_eq!(estimate_tokens(b"not json"), DEFAULT_COMPLETION_ESTIMATE + 2);
    }

    /// An engine with one token window, and a permit reserving 500 tokens.
    fn reserved() -> (std::sync::Arc<crate::Engine>, Permit<SharedClock>) {
        use proxypal_limiter::{KeyBudget, Limits, ManualClock};
        let limits = Limits { tokens_per_minute: Some(10_000), ..Limits::default() };
        let budget = KeyBudget { own: Some(limits.compile().unwrap()), ..KeyBudget::default() };
        let clock: SharedClock = std::sync::Arc::new(ManualClock::new(1_700_000_000_000_000_000));
        let engine = std::sync::Arc::new(proxypal_limiter::QuotaEngine::new([budget], clock));
        let permit = engine.try_acquire(0, 500).unwrap();
        (engine, permit)
    }

    /// The answer tapped to settle `permit` with its usage.
    fn tap<B>(body: B, sse: bool, permit: Permit<SharedClock>) -> crate::usage::Tap<B> {
        crate::usage::Tap::new(
            body,
            sse,
            crate::usage::Settle { key: Some(permit), client: None, record: None },
        )
    }

    async fn drain(body: impl Body<Data = Bytes, Error = std::convert::Infallible>) {
        use http_body_util::BodyExt;
        let _ = body.collect().await.unwrap();
    }

    fn frames(parts: &[&str]) -> impl Body<Data = Bytes, Error = std::convert::Infallible> {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
            parts.iter().map(|p| Ok(Frame::data(Bytes::from(p.to_string())))).collect();
        http_body_util::StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_stream_settles_with_its_last_usage_event_split_across_frames() {
        let (engine, permit) = reserved();
        assert_eq!(engine.report(0)[0].used, 500, "reserved");
        let body = frames(&[
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,",
            "\"completion_tokens\":32,\"total_tokens\":42}}\n\ndata: [DONE]\n\n",
        ]);
        drain(tap(body, true, permit)).await;
        assert_eq!(engine.report(0)[0].used, 42, "the reservation is replaced by the reported usage");
    }

    #[tokio::test]
    async fn a_json_answer_settles_with_its_usage_and_a_dropped_one_keeps_the_reservation() {
        let (engine, permit) = reserved();
        let body = frames(&["{\"id\":\"x\",\"usage\":{\"total_tokens\"", ":7}}"]);
        drain(tap(body, false, permit)).await;
        assert_eq!(engine.report(0)[0].used, 7);

        let (engine, permit) = reserved();
        drop(tap(frames(&["{\"usage\":{\"total_tokens\":7}}"]), false, permit));
        assert_eq!(engine.report(0)[0].used, 500, "cut before the end: the reservation counts");
    }
}
