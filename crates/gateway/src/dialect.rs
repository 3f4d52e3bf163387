//! How each provider announces its limits and explains its 429s, parsed into
//! one model: the quota engine's [`Announced`] (unit × period × limit,
//! remaining, reset) plus, for a 429, which window ran out and when to try
//! again. A dimension an answer does not mention stays unknown, never zero.
//!
//! The dialects follow the recorded answers in `shared/providers.md` §2–§4
//! (their tests use those recordings): OpenAI's and Groq's
//! `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (OpenAI's periods
//! are a minute; Groq's `-requests` is its day, `-tokens` its minute),
//! Cerebras' suffixed `-minute`/`-hour`/`-day` headers, OpenRouter's limits
//! inside the 429 body, Gemini's `QuotaFailure`/`RetryInfo` details, and
//! NVIDIA's bare 429, which says nothing.

use std::time::Duration;

use http::HeaderMap;
use proxypal_limiter::{Announced, Unit};
use serde_json::Value;

use crate::quota::{announced, parse_reset};

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

/// A provider's way of announcing limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Dialect {
    /// NVIDIA's hosted API: no limit headers, a bare 429.
    Nvidia,
    /// OpenAI: `x-ratelimit-*-requests|tokens`, both per minute.
    OpenAi,
    /// Groq: the same names, `-requests` per day (a continuous bucket),
    /// `-tokens` per minute; the 429 message names the window (`RPM`, `RPD`, …).
    Groq,
    /// Cerebras: `x-ratelimit-*-{requests,tokens}-{minute,hour,day}`.
    Cerebras,
    /// OpenRouter: limits inside the 429 body (`error.metadata.headers`, reset
    /// in epoch ms); `openrouter_free_tier_daily` is the account's day.
    OpenRouter,
    /// Gemini's OpenAI-compatible endpoint: no headers; a 429 body (wrapped in
    /// an array) with `QuotaFailure` (`…PerDay…` / `…PerMinute…`) and
    /// `RetryInfo.retryDelay`.
    Gemini,
    /// Any other OpenAI-compatible API: the OpenAI names, periods unknown.
    Generic,
}

/// Which window a 429 says ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Exhausted {
    /// A per-minute (or shorter) window: a short rest.
    Minute,
    /// A per-day window: no use before its reset.
    Day,
    /// The answer does not say.
    Unknown,
}

/// What a 429 explains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimited {
    /// Which window ran out.
    pub exhausted: Exhausted,
    /// When to try again, if the answer says (`retry-after-ms`, `retry-after`,
    /// the dialect's body fields), rounded up to the millisecond.
    pub retry_after: Option<Duration>,
    /// The limits it announces.
    pub announced: Vec<Announced>,
    /// It is the whole account's limit (every key of it, every model).
    pub account_wide: bool,
    /// A provider's upstream is busy, not this key's quota (OpenRouter's
    /// "Provider returned error"): rest briefly, spend nothing.
    pub upstream_busy: bool,
}

impl Dialect {
    /// Whether this provider's 429 bodies say more than their headers (which
    /// window ran out, when to retry): then the gateway reads the body
    /// before judging the key. NVIDIA's 429 is bare, a generic API's unknown.
    pub fn explains_429(self) -> bool {
        !matches!(self, Dialect::Nvidia | Dialect::Generic)
    }

    /// The limits `headers` announce, with the periods this dialect means.
    pub fn announced(self, headers: &HeaderMap, now_unix_ms: u64) -> Vec<Announced> {
        let mut out = announced(headers, now_unix_ms);
        for a in &mut out {
            if a.period.is_some() {
                continue;
            }
            a.period = match (self, a.unit) {
                (Dialect::OpenAi, _) | (Dialect::Groq, Unit::Tokens) => Some(MINUTE),
                (Dialect::Groq, Unit::Requests) => Some(DAY),
                _ => None,
            };
        }
        out
    }

    /// What a 429 with `headers` and `body` explains.
    pub fn rate_limited(self, headers: &HeaderMap, body: &[u8], now_unix_ms: u64) -> RateLimited {
        let mut out = RateLimited {
            exhausted: Exhausted::Unknown,
            retry_after: retry_after(headers, now_unix_ms),
            announced: self.announced(headers, now_unix_ms),
            account_wide: false,
            upstream_busy: false,
        };
        let json: Option<Value> = serde_json::from_slice(body).ok();
        // Gemini's compatible endpoint wraps the error in an array; Cerebras
        // puts its fields at the top level instead of under `error`.
        let error = json.as_ref().map(|v| {
            let v = match v {
                Value::Array(items) => items.first().unwrap_or(&Value::Null),
                other => other,
            };
            if v["error"].is_object() { &v["error"] } else { v }
        });
        let message = error.and_then(|e| e["message"].as_str()).unwrap_or_default();
        match self {
            Dialect::Groq | Dialect::OpenAi => {
                out.exhausted = window_in_message(message);
                if out.retry_after.is_none() {
                    out.retry_after = try_again_in(message);
                }
            }
            Dialect::Cerebras => {
                let lower = message.to_ascii_lowercase();
                out.exhausted = if lower.contains("per day") || lower.contains("daily") {
                    Exhausted::Day
                } else if lower.contains("per minute") {
                    Exhausted::Minute
                } else if out.announced.iter().any(|a| a.period == Some(DAY) && a.remaining == Some(0)) {
                    Exhausted::Day
                } else {
                    Exhausted::Unknown
                };
            }
            Dialect::OpenRouter => {
                let Some(error) = error else { return out };
                let meta = &error["metadata"];
                if message.contains("Provider returned error") || meta.get("raw").is_some() {
                    out.upstream_busy = true;
                    out.exhausted = Exhausted::Minute;
                    return out;
                }
                let daily = meta["limit_source"].as_str().is_some_and(|s| s.contains("daily"))
                    || message.contains("per-day");
                let h = &meta["headers"];
                let number = |name: &str| h[name].as_str().and_then(|v| v.trim().parse::<u64>().ok());
                let reset = h["X-RateLimit-Reset"].as_str().and_then(|v| parse_reset(v, now_unix_ms));
                if number("X-RateLimit-Limit").is_some() || reset.is_some() {
                    out.announced.push(Announced {
                        unit: Unit::Requests,
                        period: daily.then_some(DAY),
                        limit: number("X-RateLimit-Limit"),
                        remaining: number("X-RateLimit-Remaining"),
                        reset,
                    });
                }
                if daily {
                    out.exhausted = Exhausted::Day;
                    out.account_wide = true;
                    out.retry_after = out.retry_after.or(reset);
                }
            }
            Dialect::Gemini => {
                let details = error.and_then(|e| e["details"].as_array());
                let mut delay = None;
                for d in details.into_iter().flatten() {
                    for v in d["violations"].as_array().into_iter().flatten() {
                        let id = v["quotaId"].as_str().unwrap_or_default();
                        if id.contains("PerDay") {
                            out.exhausted = Exhausted::Day;
                        } else if id.contains("PerMinute") && out.exhausted != Exhausted::Day {
                            out.exhausted = Exhausted::Minute;
                        }
                    }
                    if let Some(r) = d["retryDelay"].as_str() {
                        delay = parse_reset(r, now_unix_ms);
                    }
                }
                out.account_wide = true; // Gemini counts per project
                // A per-day violation still carries a short retryDelay: not the day's reset.
                if out.exhausted != Exhausted::Day {
                    out.retry_after = out.retry_after.or(delay).or_else(|| try_again_in(message));
                    if out.exhausted == Exhausted::Unknown && out.retry_after.is_some() {
                        out.exhausted = Exhausted::Minute;
                    }
                }
            }
            Dialect::Nvidia | Dialect::Generic => {}
        }
        out
    }
}

/// `retry-after-ms` over `retry-after` (seconds, fractional, or an HTTP date).
fn retry_after(headers: &HeaderMap, now_unix_ms: u64) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        if ms.is_finite() && ms >= 0.0 {
            return Some(Duration::from_millis(ms.ceil() as u64));
        }
    }
    let value = text("retry-after")?;
    parse_reset(value, now_unix_ms).or_else(|| {
        let at = httpdate_to_unix_ms(value)?;
        Some(Duration::from_millis(at.saturating_sub(now_unix_ms)))
    })
}

/// An RFC 7231 date (`Wed, 21 Oct 2026 07:28:00 GMT`) as Unix ms.
fn httpdate_to_unix_ms(value: &str) -> Option<u64> {
    let ts = jiff::fmt::rfc2822::parse(value.trim()).ok()?;
    u64::try_from(ts.timestamp().as_millisecond()).ok()
}

/// The window a Groq/OpenAI 429 message names: `(RPM)`, `(TPM)` → minute;
/// `(RPD)`, `(TPD)` → day.
fn window_in_message(message: &str) -> Exhausted {
    if message.contains("(RPD)") || message.contains("(TPD)") || message.contains("per day") {
        Exhausted::Day
    } else if message.contains("(RPM)") || message.contains("(TPM)") || message.contains("per min") {
        Exhausted::Minute
    } else {
        Exhausted::Unknown
    }
}

/// "Please try again in 2s" / "in 1m26.4s" / "in 125ms" / "Please retry in 53.016342224s".
fn try_again_in(message: &str) -> Option<Duration> {
    let at = message
        .find("try again in ")
        .map(|i| i + "try again in ".len())
        .or_else(|| message.find("retry in ").map(|i| i + "retry in ".len()))?;
    let rest = &message[at..];
    let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '.')).unwrap_or(rest.len());
    let token = rest[..end].trim_end_matches('.');
    parse_reset(token, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    fn find(a: &[Announced], unit: Unit, period: Option<Duration>) -> Announced {
        *a.iter()
            .find(|x| x.unit == unit && x.period == period)
            .unwrap_or_else(|| panic!("{unit:?} {period:?} in {a:?}"))
    }

    #[test]
    fn groq_200_requests_are_the_day_and_tokens_the_minute() {
        // shared/providers.md §2, "Groq 200, openai/gpt-oss-20b, free plan".
        let h = headers(&[
            ("x-ratelimit-limit-requests", "1000"),
            ("x-ratelimit-remaining-requests", "999"),
            ("x-ratelimit-reset-requests", "1m26.4s"),
            ("x-ratelimit-limit-tokens", "8000"),
            ("x-ratelimit-remaining-tokens", "7921"),
            ("x-ratelimit-reset-tokens", "592ms"),
        ]);
        let a = Dialect::Groq.announced(&h, 0);
        let day = find(&a, Unit::Requests, Some(DAY));
        assert_eq!(
            (day.limit, day.remaining, day.reset),
            (Some(1000), Some(999), Some(Duration::from_millis(86_400)))
        );
        let minute = find(&a, Unit::Tokens, Some(MINUTE));
        assert_eq!(
            (minute.limit, minute.remaining, minute.reset),
            (Some(8000), Some(7921), Some(Duration::from_millis(592)))
        );
        // The same names mean a minute for OpenAI, and nothing certain for a generic API.
        assert!(Dialect::OpenAi.announced(&h, 0).iter().all(|a| a.period == Some(MINUTE)));
        assert!(Dialect::Generic.announced(&h, 0).iter().all(|a| a.period.is_none()));
    }

    #[test]
    fn groq_429_names_its_window_and_the_wait() {
        // §2 "Groq 429, RPM": retry-after 2, token headers absent.
        let h = headers(&[
            ("retry-after", "2"),
            ("x-ratelimit-limit-requests", "14400"),
            ("x-ratelimit-remaining-requests", "14370"),
        ]);
        let body = br#"{"error":{"message":"Rate limit reached for model `llama-3.1-8b-instant` in organization `org_x` service tier `on_demand` on requests per minute (RPM): Limit 30, Used 30, Requested 1. Please try again in 2s. Need more tokens? Upgrade to Dev Tier today at https://console.groq.com/settings/billing","type":"requests","code":"rate_limit_exceeded"}}"#;
        let r = Dialect::Groq.rate_limited(&h, body, 0);
        assert_eq!(r.exhausted, Exhausted::Minute);
        assert_eq!(r.retry_after, Some(Duration::from_secs(2)));
        assert!(r.announced.iter().all(|a| a.unit == Unit::Requests), "the token dimension stays unknown");
        // TPM variant, no retry-after header: the wait comes from the message.
        let tpm = br#"{"error":{"message":"Rate limit reached for model `openai/gpt-oss-20b` in organization `org_redacted` service tier `on_demand` on tokens per minute (TPM): Limit 8000, Used 6170, Requested 5386. Please try again in 26.67s. Need more tokens?","type":"tokens","code":"rate_limit_exceeded"}}"#;
        let r = Dialect::Groq.rate_limited(&HeaderMap::new(), tpm, 0);
        assert_eq!((r.exhausted, r.retry_after), (Exhausted::Minute, Some(Duration::from_millis(26_670))));
        let rpd = br#"{"error":{"message":"Rate limit reached ... on requests per day (RPD): Limit 1000, Used 1000, Requested 1. Please try again in 1m26.4s.","type":"requests","code":"rate_limit_exceeded"}}"#;
        assert_eq!(Dialect::Groq.rate_limited(&HeaderMap::new(), rpd, 0).exhausted, Exhausted::Day);
    }

    #[test]
    fn cerebras_headers_carry_their_periods() {
        // §2 "Cerebras 200, free-tier shape".
        let h = headers(&[
            ("x-ratelimit-limit-requests-minute", "30"),
            ("x-ratelimit-remaining-requests-minute", "29"),
            ("x-ratelimit-reset-requests-minute", "11.382867097854614"),
            ("x-ratelimit-limit-requests-day", "14400"),
            ("x-ratelimit-remaining-requests-day", "14399"),
            ("x-ratelimit-reset-requests-day", "33011.382867097855"),
            ("x-ratelimit-limit-tokens-minute", "60000"),
            ("x-ratelimit-remaining-tokens-minute", "43617"),
            ("x-ratelimit-reset-tokens-minute", "11.382867097854614"),
        ]);
        let a = Dialect::Cerebras.announced(&h, 0);
        assert_eq!(find(&a, Unit::Requests, Some(MINUTE)).limit, Some(30));
        let day = find(&a, Unit::Requests, Some(DAY));
        assert_eq!((day.limit, day.reset), (Some(14_400), Some(Duration::from_millis(33_011_383))));
        assert_eq!(find(&a, Unit::Tokens, Some(MINUTE)).remaining, Some(43_617));
        let body = br#"{"message":"Requests per minute limit exceeded - too many requests sent.","type":"too_many_requests_error","param":"quota","code":"request_quota_exceeded"}"#;
        // Cerebras puts the message at the top level, not under `error`.
        assert_eq!(Dialect::Cerebras.rate_limited(&HeaderMap::new(), body, 0).exhausted, Exhausted::Minute);
        let tpd = br#"{"message":"Tokens per day limit exceeded - too many tokens processed.","type":"too_many_requests_error"}"#;
        assert_eq!(Dialect::Cerebras.rate_limited(&HeaderMap::new(), tpd, 0).exhausted, Exhausted::Day);
    }

    #[test]
    fn openrouter_daily_cap_is_the_accounts_until_midnight_utc() {
        // §2 "OpenRouter 429, daily free cap": reset in epoch ms (2026-10-01T00:00Z).
        let body = br#"{"error":{"message":"Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free model requests per day","code":429,"metadata":{"headers":{"X-RateLimit-Limit":"50","X-RateLimit-Remaining":"0","X-RateLimit-Reset":"1790812800000"},"limit_source":"openrouter_free_tier_daily"}},"user_id":"user_x"}"#;
        let now = 1_790_812_800_000 - 3_600_000; // an hour before
        let r = Dialect::OpenRouter.rate_limited(&HeaderMap::new(), body, now);
        assert_eq!(r.exhausted, Exhausted::Day);
        assert!(r.account_wide);
        assert_eq!(r.retry_after, Some(Duration::from_secs(3_600)));
        let a = find(&r.announced, Unit::Requests, Some(DAY));
        assert_eq!((a.limit, a.remaining), (Some(50), Some(0)));
        // An upstream provider's 429 is that model, briefly: not the account's day.
        let busy = br#"{"error":{"message":"Provider returned error","code":429,"metadata":{"raw":"google/gemma-4-31b-it:free is temporarily rate-limited upstream. Please retry shortly."}}}"#;
        let r = Dialect::OpenRouter.rate_limited(&HeaderMap::new(), busy, now);
        assert!(r.upstream_busy && !r.account_wide);
        assert_eq!(r.exhausted, Exhausted::Minute);
    }

    #[test]
    fn gemini_per_day_ignores_the_short_retry_delay_and_per_minute_uses_it() {
        // §2 "Gemini 429, per-day quota" (array-wrapped as the compatible endpoint sends it).
        let day = br#"[{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing details.","status":"RESOURCE_EXHAUSTED","details":[
 {"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier","quotaDimensions":{"model":"gemini-2.0-pro-exp","location":"global"},"quotaValue":"25"}]},
 {"@type":"type.googleapis.com/google.rpc.Help","links":[{"description":"Learn more about Gemini API quotas","url":"https://ai.google.dev/gemini-api/docs/rate-limits"}]},
 {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"5s"}]}}]"#;
        let r = Dialect::Gemini.rate_limited(&HeaderMap::new(), day, 0);
        assert_eq!(r.exhausted, Exhausted::Day);
        assert_eq!(r.retry_after, None, "5 s is not the day's reset");
        // §2 "Gemini 429, per-minute": RetryInfo wins over the prose.
        let minute = br#"[{"error":{"code":429,"message":"You exceeded your current quota... Please retry in 53.016342224s.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"53s"}]}}]"#;
        let r = Dialect::Gemini.rate_limited(&HeaderMap::new(), minute, 0);
        assert_eq!((r.exhausted, r.retry_after), (Exhausted::Minute, Some(Duration::from_secs(53))));
    }

    #[test]
    fn nvidia_says_nothing_and_retry_after_forms_are_read() {
        let r = Dialect::Nvidia.rate_limited(
            &HeaderMap::new(),
            br#"{"status":429,"title":"Too Many Requests"}"#,
            0,
        );
        assert_eq!((r.exhausted, r.retry_after, r.announced.len()), (Exhausted::Unknown, None, 0));
        let now = 1_792_567_680_000; // 2026-10-21T07:28:00Z
        let h = headers(&[("retry-after", "Wed, 21 Oct 2026 07:28:30 GMT")]);
        assert_eq!(Dialect::Generic.rate_limited(&h, b"", now).retry_after, Some(Duration::from_secs(30)));
        let h = headers(&[("retry-after", "11.75"), ("retry-after-ms", "250")]);
        assert_eq!(
            Dialect::Generic.rate_limited(&h, b"", 0).retry_after,
            Some(Duration::from_millis(250)),
            "ms first"
        );
        let h = headers(&[("retry-after", "-1")]);
        assert_eq!(Dialect::Generic.rate_limited(&h, b"", 0).retry_after, None, "unknown, never now");
    }
}
