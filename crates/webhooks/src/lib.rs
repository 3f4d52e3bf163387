//! ProxyPal's webhooks: operators hear when a key is disabled or recovers, a pool is
//! exhausted or recovers, a budget passes its warning threshold, or a client spends its
//! quota.
//!
//! - Events are reported with [`Webhooks::emit`], which never blocks: a dedup check under
//!   a short lock and a `try_send` into a bounded queue. Repeats of a state that lasts are
//!   suppressed (the rules are on [`Webhooks::emit`]).
//! - A background task POSTs each event as JSON, the
//!   [Standard Webhooks](https://www.standardwebhooks.com) way: a payload of `type`,
//!   `timestamp` (RFC 3339, UTC) and `data`, and the headers `webhook-id`,
//!   `webhook-timestamp` and, with a [`Secret`], `webhook-signature` (see [`sign`]; the
//!   receiver's side is [`verify`]).
//! - Failed attempts (a non-2xx answer, a transport error, a timeout) are retried with
//!   exponential backoff, each endpoint on its own queue, so a dead endpoint delays no
//!   other.
//! - Prometheus counters: `webhook_deliveries{event, result}`, `webhook_dropped`,
//!   `webhook_deduplicated`.
//!
//! ```no_run
//! use std::time::Duration;
//! use proxypal_webhooks::{Endpoint, Event, EventKind, Secret, WebhookConfig, Webhooks};
//! use serde_json::json;
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let mut registry = prometheus_client::registry::Registry::with_prefix("proxypal");
//! let endpoint = Endpoint::new("https://hooks.example.com/proxypal")?
//!     .events([EventKind::KeyDisabled, EventKind::KeyRecovered])
//!     .secret(Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")?);
//! let config = WebhookConfig { endpoints: vec![endpoint], ..WebhookConfig::default() };
//! let hooks = Webhooks::try_start(config, &mut registry)?;
//!
//! hooks.emit(Event::new(EventKind::KeyDisabled).provider("nvidia").key("nvidia-3").figure("status", json!(401)));
//!
//! hooks.shutdown(Duration::from_secs(5)).await;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod config;
mod dedup;
mod delivery;
mod event;
mod metrics;
mod signing;
mod time;
mod webhooks;

pub use config::{Endpoint, InvalidEndpoint, MAX_BACKOFF, WebhookConfig};
pub use event::{Event, EventKind, ParseEventKindError};
pub use signing::{
    HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, InvalidSecret, SECRET_PREFIX, Secret, sign, verify,
};
pub use webhooks::{StartError, Webhooks};
