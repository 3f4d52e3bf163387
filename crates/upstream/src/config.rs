//! [`UpstreamConfig`]: where the upstream is and how long to wait for it.

use std::time::Duration;

use http::{HeaderValue, Uri};
use rustls::pki_types::CertificateDer;

/// The `User-Agent` sent upstream unless configured otherwise: `proxypal/<crate version>`.
const DEFAULT_USER_AGENT: &str = concat!("proxypal/", env!("CARGO_PKG_VERSION"));

/// How to reach the upstream OpenAI-compatible API.
///
/// [`Default`] targets NVIDIA's hosted API (`https://integrate.api.nvidia.com/v1`) with the
/// timeouts documented on each field.
///
/// ```
/// use proxypal_upstream::UpstreamConfig;
///
/// let cfg = UpstreamConfig {
///     base_url: "http://127.0.0.1:8000/v1".parse()?,
///     ..UpstreamConfig::default()
/// };
/// assert_eq!(cfg.idle_timeout.as_secs(), 180);
/// # Ok::<(), http::uri::InvalidUri>(())
/// ```
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The API root, with scheme, authority and an optional path prefix, e.g.
    /// `https://integrate.api.nvidia.com/v1` or `http://127.0.0.1:8000/v1`. The request's path
    /// is appended to it (see [`Upstream::target_uri`](crate::Upstream::target_uri)); a trailing
    /// slash is ignored. `http` and `https` are both accepted, so a local (simulated) upstream
    /// works without TLS.
    pub base_url: Uri,
    /// Longest wait for a TCP connection to be established (default 5 s). The TLS handshake is
    /// bounded by [`response_timeout`](Self::response_timeout), not by this.
    pub connect_timeout: Duration,
    /// Longest wait from sending the request until the response headers arrive, connecting
    /// included (default 300 s: a non-streaming completion only answers when it is done).
    pub response_timeout: Duration,
    /// Longest silence between two response body frames, and between the headers and the first
    /// frame (default 180 s). Bounds a stalled stream without bounding a long one.
    pub idle_timeout: Duration,
    /// The `User-Agent` sent upstream, replacing the client's (default `proxypal/<version>`).
    /// NVIDIA has been reported to answer 403 to the stock OpenAI SDK user agent.
    pub user_agent: HeaderValue,
    /// How long an unused pooled connection is kept open (default 90 s).
    pub pool_idle_timeout: Duration,
    /// Most idle connections kept per upstream host (default 256). On HTTP/2 one connection
    /// multiplexes every request, so this matters for HTTP/1 upstreams.
    pub pool_max_idle_per_host: usize,
    /// Interval of HTTP/2 keep-alive pings, also sent on idle connections, so a dead connection
    /// is noticed during a long silent stream (default 30 s; `None` disables them).
    pub http2_keep_alive_interval: Option<Duration>,
    /// Root certificates (DER) trusted for `https` upstreams *in addition to* Mozilla's roots
    /// compiled in (default none): for an upstream behind a private CA, or a TLS-inspecting
    /// corporate proxy. Load a PEM file with
    /// [`parse_pem_certificates`](crate::parse_pem_certificates).
    ///
    /// Each must be a CA (or self-signed) certificate that issued the upstream's chain; the
    /// upstream's host name is still verified against its certificate. Ignored for `http`
    /// upstreams.
    pub extra_root_certificates: Vec<CertificateDer<'static>>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            base_url: Uri::from_static("https://integrate.api.nvidia.com/v1"),
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(180),
            user_agent: HeaderValue::from_static(DEFAULT_USER_AGENT),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 256,
            http2_keep_alive_interval: Some(Duration::from_secs(30)),
            extra_root_certificates: Vec::new(),
        }
    }
}
