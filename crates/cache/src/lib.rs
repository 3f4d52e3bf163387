//! ProxyPal's exact-match response cache: the same request, from the same
//! client, to the same model, gets the stored answer instead of spending a
//! key's quota on the upstream.
//!
//! This crate is the library half, with no HTTP in it; the gateway composes
//! it:
//!
//! - [`Policy::decide`] reads a request (endpoint, body, public model,
//!   client, `Cache-Control`) and says whether to look up, refresh or bypass,
//!   and under which [`CacheKey`]: a SHA-256 of the canonical JSON body
//!   (keys sorted, no whitespace; see [`CacheKey`] for numbers) with the
//!   endpoint, the model and the client's name.
//! - An [`Entry`] is a stored answer: a plain JSON body or a whole SSE
//!   stream, when it was stored, and its token counts.
//!   [`Entry::stream_events`] replays a stream event by event without
//!   copying; [`Entry::encode`] / [`Entry::decode`] are its Redis form.
//! - A [`StreamRecorder`] collects a stream as it passes to the client and
//!   gives it back only if it is complete: ended by `data: [DONE]`, no error
//!   event, nothing cut, within `cache.max_entry_bytes`.
//! - [`MemoryCache`] holds entries in the process (moka: bounded by bytes,
//!   TTL, TinyLFU admission); Redis, for replicas that share entries, is
//!   `proxypal-shared`'s `SharedCache`.
//! - [`Flights`] makes identical misses wait, a bounded time, for the one
//!   already upstream; [`CacheStats`] counts what happened.
//!
//! ```
//! use bytes::Bytes;
//! use proxypal_cache::{
//!     Body, CacheSettings, Decision, Endpoint, Entry, MemoryCache, Policy, StreamRecorder, now_unix_ms,
//! };
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let settings = CacheSettings::default();
//! let policy = Policy::new(settings.clone());
//! let memory = MemoryCache::new(&settings);
//!
//! let endpoint = Endpoint::from_path("/v1/chat/completions").ok_or("not a cached endpoint")?;
//! let body = br#"{"model":"llama","stream":true,"temperature":0,"messages":[{"role":"user","content":"hi"}]}"#;
//! let Decision::Use { key, stream: true } = policy.decide(endpoint, body, "llama", Some("team-a"), None) else {
//!     unreachable!("a deterministic streaming request is cacheable")
//! };
//! assert!(memory.get(&key).is_none()); // a miss: go upstream, recording what the client is sent
//!
//! let mut recorder = StreamRecorder::new(settings.max_entry_bytes);
//! for chunk in [&b"data: {\"id\":\"c1\",\"choices\":[]}\n"[..], b"\ndata: [DO", b"NE]\n\n"] {
//!     recorder.push(chunk);
//! }
//! if let Some(stream) = recorder.finish() {
//!     memory.insert(key, Entry::new(Body::Stream(stream), "text/event-stream", now_unix_ms()))?;
//! }
//!
//! // The same request again, with its keys in another order: a hit, replayed event by event.
//! let again = br#"{"messages":[{"content":"hi","role":"user"}],"temperature":0,"stream":true,"model":"llama"}"#;
//! let key = policy.decide(endpoint, again, "llama", Some("team-a"), None).key();
//! let hit = key.and_then(|key| memory.get(&key)).ok_or("a hit")?;
//! let events: Vec<Bytes> = hit.stream_events().collect();
//! assert_eq!(events, [&b"data: {\"id\":\"c1\",\"choices\":[]}\n\n"[..], b"data: [DONE]\n\n"]);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod entry;
mod error;
mod flight;
mod key;
mod memory;
mod policy;
mod sse;
mod stats;

pub use entry::{Body, Entry, Events, now_unix_ms};
pub use error::CacheError;
pub use flight::{Flight, Flights, LeaderGuard, Waiter};
pub use key::{CacheKey, Endpoint, Owner};
pub use memory::{ENTRY_OVERHEAD, MemoryCache};
pub use policy::{CacheSettings, Decision, Policy, Reason};
pub use sse::StreamRecorder;
pub use stats::{CacheStats, StatsSnapshot};
