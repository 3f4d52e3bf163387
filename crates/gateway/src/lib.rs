//! ProxyPal's OpenAI-compatible `/v1` pipeline as a library: mount it in your
//! own hyper (or tower/axum) service and every request is served through a
//! pool of upstream API keys — each kept under its rate limit, failed over to
//! another key before the client sees an error, and streamed back untouched.
//!
//! The pieces, stage by stage (each a module with one job):
//!
//! | stage | module | what it decides |
//! |---|---|---|
//! | admission | [`admission`] | an in-flight slot; which client sent it |
//! | routes | `route` | a request's `model` → an alias's targets (tiers, weights), a pinned `provider/model`, or the default provider |
//! | providers | [`Provider`] | one provider's key pool, base URL, dialect and rejected fields; a worker's client per provider |
//! | key set | `keyset` | keys, their budgets in the quota engine, `Authorization` values, metric handles — one generation, swapped whole on reload |
//! | quota | [`quota`] | a request's token estimate, limits upstreams announce, reported usage, the pool's `x-ratelimit-*` headers |
//! | lease | [`lease`] | the next key with a permit, or a place in a first-come-first-served queue |
//! | classify | [`classify`] | what an upstream answer means: the key's outcome, the metrics label, deliver or fail over |
//! | failover | `failover` | the attempt loop: keys of a target, then the next target; `x-proxypal-route` and `x-proxypal-attempts` |
//! | models | `catalog` | `GET /v1/models`: aliases and cached provider catalogs |
//! | dialects | [`dialect`] | what a provider's `x-ratelimit-*` headers and 429 bodies say, in one model (Groq, Cerebras, OpenRouter, Gemini, OpenAI, NVIDIA) |
//! | presets | [`preset`] | each provider's base URL, free limits, quota scope, dialect, rejected parameters and terms |
//! | errors | [`openai`] | the OpenAI error shape, and upstream errors rewritten into it |
//!
//! [`Gateway`] holds the shared state; a [`Handle`] (the gateway plus one
//! worker's [`Upstream`](proxypal_upstream::Upstream) clients) serves requests
//! with an unboxed future, and [`GatewayService`] is the same as a boxed
//! `hyper`/`tower` service.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use proxypal_gateway::preset::Preset;
//! use proxypal_gateway::{AliasConfig, Gateway, GatewayConfig, Handle, ProviderConfig, TargetConfig};
//! use proxypal_gateway::keypool::KeySpec;
//!
//! // Two free tiers; `llama-70b` spends NVIDIA's and Groq's (1:2), a local server last.
//! let nvidia = ProviderConfig::from_preset("nvidia", &Preset::get("nvidia").unwrap())
//!     .with_keys([KeySpec::new("nvapi-…"), KeySpec::new("nvapi-…second")]);
//! let groq = ProviderConfig::from_preset("groq", &Preset::get("groq").unwrap()).with_keys([KeySpec::new("gsk_…")]);
//! let mut config = GatewayConfig::with_providers([nvidia, groq]);
//! config.models.insert("llama-70b".into(), AliasConfig::new([
//!     TargetConfig::new("nvidia", "meta/llama-3.3-70b-instruct"),
//!     TargetConfig::new("groq", "llama-3.3-70b-versatile").weight(2),
//! ]));
//! let mut registry = proxypal_gateway::prometheus_client::registry::Registry::with_prefix("proxypal");
//! let gateway = Gateway::new(config, &mut registry)?;
//! let service = Handle::new(gateway).into_service();
//! // hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
//! //     .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service)) …
//! # let _ = service; Ok(()) }
//! ```
//!
//! A complete program: `examples/embed_gateway.rs` in the repository.
#![deny(missing_docs)]

pub mod admission;
mod body;
pub mod cache;
mod catalog;
pub mod classify;
mod clients;
mod config;
pub mod dialect;
mod failover;
mod fair;
mod gateway;
mod json;
mod keyset;
pub mod lease;
mod messages;
pub mod metrics;
pub mod openai;
pub mod preset;
mod provider;
pub mod quota;
pub mod replicas;
mod reply;
mod route;
pub mod state;
pub mod usage;

pub use admission::REQUEST_ID;
pub use body::{BoxError, ProxyBody, full};
pub use catalog::CatalogReport;
pub use clients::{ClientConfig, glob_match};
pub use config::{
    AliasConfig, Auth, DEFAULT_PROVIDER, GatewayConfig, KeyConfig, MAX_PROVIDERS, MAX_TARGETS,
    ProviderConfig, RoutingConfig, TargetConfig,
};
pub use failover::{ATTEMPTS, ROUTE};
pub use gateway::{
    AliasReport, Caller, ClientReport, Gateway, GatewayService, Handle, KeyReport, ResponseFuture,
    TargetReport,
};
pub use keyset::{BuildError, Engine, KeyResources, SharedClock};
pub use lease::MAX_ATTEMPTS;
pub use provider::Provider;
pub use reply::{not_found, unauthorized};
pub use route::MAX_WEIGHT;

/// The metrics library whose `Registry` [`Gateway::new`] registers into.
pub use prometheus_client;
pub use proxypal_keypool as keypool;
pub use proxypal_limiter as limiter;
pub use proxypal_upstream as upstream;
