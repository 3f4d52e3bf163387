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
//! | key set | `keyset` | keys, their budgets in the quota engine, `Authorization` values, metric handles — one generation, swapped whole on reload |
//! | quota | [`quota`] | a request's token estimate, limits upstreams announce, reported usage, the pool's `x-ratelimit-*` headers |
//! | lease | [`lease`] | the next key with a permit, or a place in a first-come-first-served queue |
//! | classify | [`classify`] | what an upstream answer means: the key's outcome, the metrics label, deliver or fail over |
//! | failover | `failover` | the attempt loop |
//! | dialects | [`dialect`] | what a provider's `x-ratelimit-*` headers and 429 bodies say, in one model (Groq, Cerebras, OpenRouter, Gemini, OpenAI, NVIDIA) |
//! | presets | [`preset`] | each provider's base URL, free limits, quota scope, dialect, rejected parameters and terms |
//! | errors | [`openai`] | the OpenAI error shape, and upstream errors rewritten into it |
//!
//! [`Gateway`] holds the shared state; a [`Handle`] (the gateway plus one
//! worker's [`Upstream`](proxypal_upstream::Upstream) client) serves requests
//! with an unboxed future, and [`GatewayService`] is the same as a boxed
//! `hyper`/`tower` service.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use proxypal_gateway::upstream::{Upstream, UpstreamConfig};
//! use proxypal_gateway::{Gateway, GatewayConfig, Handle, keypool::KeySpec};
//!
//! let mut registry = proxypal_gateway::prometheus_client::registry::Registry::with_prefix("proxypal");
//! let gateway = Gateway::new(
//!     GatewayConfig::with_keys([KeySpec::new("nvapi-…"), KeySpec::new("nvapi-…second")]),
//!     &mut registry,
//! )?;
//! let upstream = Upstream::new(UpstreamConfig::default())?; // https://integrate.api.nvidia.com/v1
//! let service = Handle::new(gateway, upstream).into_service();
//! // hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
//! //     .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service)) …
//! # let _ = service; Ok(()) }
//! ```
//!
//! A complete program: `examples/embed_gateway.rs` in the repository.
#![deny(missing_docs)]

pub mod admission;
mod body;
pub mod classify;
mod config;
pub mod dialect;
mod failover;
mod gateway;
mod keyset;
pub mod lease;
pub mod metrics;
pub mod openai;
pub mod preset;
pub mod quota;
mod reply;
pub mod state;

pub use admission::REQUEST_ID;
pub use body::{BoxError, ProxyBody, full};
pub use config::{GatewayConfig, KeyConfig};
pub use gateway::{Gateway, GatewayService, Handle, KeyReport, ResponseFuture};
pub use keyset::{BuildError, Engine, KeyResources, SharedClock};
pub use lease::MAX_ATTEMPTS;
pub use reply::{not_found, unauthorized};

/// The metrics library whose `Registry` [`Gateway::new`] registers into.
pub use prometheus_client;
pub use proxypal_keypool as keypool;
pub use proxypal_limiter as limiter;
pub use proxypal_upstream as upstream;
