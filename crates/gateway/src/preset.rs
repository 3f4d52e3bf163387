//! Provider presets: what a provider's free tier looks like — base URL,
//! published limits, how it counts them (per key or per account), how it
//! announces limits ([`Dialect`]), the request parameters it rejects, and what
//! its terms say about pooling keys. Every field is a default the provider
//! configuration may override; limits an upstream announces win over these.
//!
//! The figures are the ones `shared/providers.md` cites (read 2026-07 to
//! 2026-11; free tiers change every few months): each preset's `source`
//! says where they came from.

use std::time::Duration;

use proxypal_limiter::Limits;

use crate::dialect::Dialect;

/// Whether a provider counts a budget per key or per account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QuotaScope {
    /// Each key has its own budget.
    Key,
    /// All keys of the provider share one budget (an organisation, account or
    /// project): more keys of one account add nothing.
    Account,
}

/// The namespaces of NVIDIA's API catalog (`meta/llama-…`, `nvidia/…`):
/// with NVIDIA as the default provider, no provider may take one of these
/// names, or `meta/llama-…` would be pinned to it instead of reaching
/// NVIDIA. From the catalog as listed in 2026-11; on reload the fetched
/// catalog is checked as well.
pub const NVIDIA_NAMESPACES: &[&str] = &[
    "01-ai",
    "abacusai",
    "adept",
    "ai21labs",
    "aisingapore",
    "baai",
    "baichuan-inc",
    "bigcode",
    "bytedance",
    "databricks",
    "deepseek-ai",
    "google",
    "gotocompany",
    "ibm",
    "igenius",
    "institute-of-science-tokyo",
    "marin",
    "mediatek",
    "meta",
    "microsoft",
    "minimaxai",
    "mistralai",
    "moonshotai",
    "nv-mistralai",
    "nvidia",
    "openai",
    "qwen",
    "rakuten",
    "sarvamai",
    "seallms",
    "snowflake",
    "speakleash",
    "stockmark",
    "thudm",
    "tiiuae",
    "tokyotech-llm",
    "upstage",
    "utter-project",
    "writer",
    "yentinglin",
    "zai-org",
    "zyphra",
];

/// One provider preset.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Preset {
    /// Its name in the configuration (`preset: groq`).
    pub name: &'static str,
    /// The OpenAI-compatible base URL.
    pub base_url: &'static str,
    /// The published free limits, per key or per account (see `scope`).
    pub limits: Limits,
    /// How the provider counts them.
    pub scope: QuotaScope,
    /// How it announces limits and explains 429s.
    pub dialect: Dialect,
    /// Top-level request fields it rejects with a 400 (removed before sending).
    pub strip: &'static [&'static str],
    /// What its terms (or reports of them) say about pooling keys or accounts.
    pub terms: &'static str,
    /// Where the figures come from.
    pub source: &'static str,
}

fn limits(
    rpm: Option<u64>,
    rpd: Option<u64>,
    reset: Option<&str>,
    tpm: Option<u64>,
    tpd: Option<u64>,
) -> Limits {
    Limits {
        requests_per_minute: rpm,
        requests_per_day: rpd,
        // The zones below are IANA names jiff knows (bundled): parsing cannot fail.
        day_reset: reset.and_then(|r| r.parse().ok()),
        tokens_per_minute: tpm,
        tokens_per_day: tpd,
        margin: Some(Limits::DEFAULT_MARGIN),
        ..Limits::default()
    }
}

impl Preset {
    /// Every preset, by name.
    pub const NAMES: [&'static str; 6] =
        ["nvidia", "groq", "cerebras", "openrouter", "gemini", "openai-compatible"];

    /// The preset called `name`, or `None`.
    pub fn get(name: &str) -> Option<Self> {
        let p = match name {
            "nvidia" => Preset {
                name: "nvidia",
                base_url: "https://integrate.api.nvidia.com/v1",
                limits: limits(Some(40), None, None, None, None),
                scope: QuotaScope::Key,
                dialect: Dialect::Nvidia,
                strip: &[],
                terms: "the hosted trial is for evaluation; rotating several accounts has been refused as against the terms (reported)",
                source: "40 requests per rolling minute, shown on the build.nvidia.com account page (reported 2025-09); no limit headers",
            },
            "groq" => Preset {
                name: "groq",
                base_url: "https://api.groq.com/openai/v1",
                // Most free models: 30 RPM, 1,000 RPD (a continuous bucket, not a midnight reset), 6,000 TPM.
                limits: limits(Some(30), Some(1_000), None, Some(6_000), None),
                scope: QuotaScope::Account,
                dialect: Dialect::Groq,
                strip: &["logprobs", "logit_bias", "top_logprobs"],
                terms: "limits are per organisation: several keys of one organisation add nothing",
                source: "console.groq.com/docs/rate-limits (2026-07); per model, per organisation; headers announce the day (requests) and the minute (tokens)",
            },
            "cerebras" => Preset {
                name: "cerebras",
                base_url: "https://api.cerebras.ai/v1",
                limits: limits(Some(30), Some(14_400), None, Some(60_000), Some(1_000_000)),
                scope: QuotaScope::Account,
                dialect: Dialect::Cerebras,
                strip: &[
                    "frequency_penalty",
                    "presence_penalty",
                    "logit_bias",
                    "logprobs",
                    "parallel_tool_calls",
                    "service_tier",
                ],
                terms: "limits are per organisation (an older copy of the docs said per key)",
                source: "inference-docs.cerebras.ai/support/rate-limits (2026); newer trial accounts report 5 RPM: the headers win",
            },
            "openrouter" => Preset {
                name: "openrouter",
                base_url: "https://openrouter.ai/api/v1",
                // `:free` models: 20 RPM, 50 RPD for all of them together, reset 00:00 UTC.
                limits: limits(Some(20), Some(50), Some("00:00 UTC"), None, None),
                scope: QuotaScope::Account,
                dialect: Dialect::OpenRouter,
                strip: &[],
                terms: "the account's daily cap covers all its keys; do not expose a proxy publicly (reported)",
                source: "openrouter.ai/docs/api-reference/limits (2026-07); 1,000 RPD once $10 of credit was bought",
            },
            "gemini" => Preset {
                name: "gemini",
                base_url: "https://generativelanguage.googleapis.com/v1beta/openai",
                // Flash models: 5 RPM, 20 RPD (midnight Pacific), 250,000 TPM.
                limits: limits(Some(5), Some(20), Some("00:00 America/Los_Angeles"), Some(250_000), None),
                scope: QuotaScope::Account,
                dialect: Dialect::Gemini,
                strip: &["frequency_penalty", "presence_penalty", "top_k", "logit_bias"],
                terms: "counted per project; unpaid-tier content may be used to improve Google's products",
                source: "ai.google.dev/gemini-api/docs/rate-limits; figures as listed 2026-07 (Flash cut to about 20 RPD in 2025-12)",
            },
            "openai-compatible" => Preset {
                name: "openai-compatible",
                base_url: "http://127.0.0.1:8000/v1",
                limits: Limits::default(),
                scope: QuotaScope::Key,
                dialect: Dialect::Generic,
                strip: &[],
                terms: "whatever your provider's are",
                source: "none: set base_url and limits yourself; x-ratelimit-* headers are still learned",
            },
            _ => return None,
        };
        Some(p)
    }

    /// The rolling minute of this preset, if it has one (for docs and summaries).
    pub fn requests_per_minute(&self) -> Option<u64> {
        self.limits.requests_per_minute
    }

    /// The margin its rolling windows use.
    pub fn margin(&self) -> Duration {
        self.limits.margin.unwrap_or(Limits::DEFAULT_MARGIN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_exists_and_its_limits_make_a_budget() {
        for name in Preset::NAMES {
            let p = Preset::get(name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(p.name, name);
            assert!(p.base_url.starts_with("http"), "{name}");
            p.limits.compile().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!p.source.is_empty() && !p.terms.is_empty());
        }
        assert!(Preset::get("nvidia-ish").is_none());
    }

    #[test]
    fn day_resets_are_where_the_providers_put_them() {
        let reset = |n: &str| Preset::get(n).and_then(|p| p.limits.day_reset).map(|r| r.to_string());
        assert_eq!(reset("openrouter").as_deref(), Some("00:00 UTC"));
        assert_eq!(reset("gemini").as_deref(), Some("00:00 America/Los_Angeles"));
        assert_eq!(reset("groq"), None, "Groq's day is a continuous bucket: rolling");
        let groq = Preset::get("groq").unwrap();
        assert_eq!((groq.scope, groq.dialect), (QuotaScope::Account, Dialect::Groq));
        assert_eq!(Preset::get("nvidia").unwrap().requests_per_minute(), Some(40));
    }
}
