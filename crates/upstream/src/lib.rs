//! A hyper 1.x client that forwards one request to an OpenAI-compatible upstream (such as
//! NVIDIA's `https://integrate.api.nvidia.com/v1`) with a given API key and streams the response
//! back.
//!
//! This crate knows nothing about key pools or rate limits: the caller picks a key, builds its
//! `Authorization` value once with [`bearer`], and passes it to [`Upstream::send`] together with
//! the client's request ([`RequestParts`]) and its buffered body, so a failed attempt can be
//! replayed with another key.
//!
//! What [`Upstream::send`] does:
//! - rewrites headers: hop-by-hop headers and the client's credentials go, the given
//!   `Authorization` and the configured `User-Agent` come in, `Host` names the upstream;
//! - bounds time: connect, response headers, and silence between body frames
//!   (see [`UpstreamConfig`]);
//! - streams: the [`UpstreamBody`] forwards each frame as it arrives (server-sent events pass
//!   chunk by chunk), and dropping it or the request future cancels the upstream exchange.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{HeaderMap, Method};
//! use http_body_util::BodyExt as _;
//! use proxypal_upstream::{RequestParts, Upstream, UpstreamConfig, bearer};
//!
//! // Once, at start-up.
//! let upstream = Upstream::new(UpstreamConfig::default())?;
//! let key = bearer("nvapi-example")?;
//!
//! // Per client request: path after `/v1`, the client's headers, the buffered body.
//! let parts = RequestParts::new(Method::POST, "/chat/completions", HeaderMap::new());
//! let body = Bytes::from_static(br#"{"model":"meta/llama-3.1-8b-instruct","messages":[],"stream":true}"#);
//!
//! // Sending needs a Tokio runtime; this part is compiled, not run.
//! async fn forward(
//!     upstream: &Upstream,
//!     parts: &RequestParts,
//!     body: Bytes,
//!     key: &http::HeaderValue,
//! ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//!     let response = upstream.send(parts, body, key).await?;
//!     println!("upstream answered {}", response.status());
//!     let mut body = response.into_body();
//!     while let Some(frame) = body.frame().await {
//!         if let Some(chunk) = frame?.data_ref() {
//!             println!("{} bytes", chunk.len());
//!         }
//!     }
//!     Ok(())
//! }
//! # let _ = forward(&upstream, &parts, body, &key);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

mod body;
mod client;
mod config;
mod error;
mod headers;
mod pool;
mod tls;

pub use body::UpstreamBody;
pub use client::{RequestParts, Upstream, bearer};
pub use config::UpstreamConfig;
pub use error::{
    BoxError, ErrorKind, InvalidKey, InvalidTarget, UpstreamBodyError, UpstreamBuildError, UpstreamError,
};
pub use headers::strip_hop_by_hop;
/// The DER certificate type of [`UpstreamConfig::extra_root_certificates`], re-exported from
/// rustls so callers need not depend on it.
pub use rustls::pki_types::CertificateDer;
pub use tls::{PemCertificatesError, parse_pem_certificates};
