//! Error types. None of them ever holds or prints an `Authorization` value.

use std::{error::Error as StdError, fmt, io, time::Duration};

use http::Uri;

/// A boxed error, the `source` of the wrapping variants.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// What went wrong, as a small label set for metrics and for choosing a status code.
///
/// ```
/// use proxypal_upstream::ErrorKind;
///
/// assert_eq!(ErrorKind::ResponseTimeout.as_str(), "response_timeout");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request path could not be turned into an upstream URI ([`InvalidTarget`]).
    InvalidTarget,
    /// No connection: refused, DNS failure, TLS failure.
    Connect,
    /// No TCP connection within the connect timeout.
    ConnectTimeout,
    /// No response headers within the response timeout.
    ResponseTimeout,
    /// The connection broke or the upstream spoke malformed HTTP before the headers arrived.
    Protocol,
    /// The response body was silent for longer than the idle timeout.
    IdleTimeout,
    /// Reading the response body failed (connection reset, malformed framing).
    BodyRead,
}

impl ErrorKind {
    /// A stable `snake_case` label, e.g. for a metrics dimension.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidTarget => "invalid_target",
            Self::Connect => "connect",
            Self::ConnectTimeout => "connect_timeout",
            Self::ResponseTimeout => "response_timeout",
            Self::Protocol => "protocol",
            Self::IdleTimeout => "idle_timeout",
            Self::BodyRead => "body_read",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why [`Upstream::send`](crate::Upstream::send) produced no response.
///
/// The `Display` text names the upstream URI (without its query string) and the underlying
/// causes; it never includes request headers, so the API key cannot leak through it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The request path was rejected before anything was sent.
    #[error(transparent)]
    InvalidTarget(#[from] InvalidTarget),
    /// No connection could be made (refused, DNS, TCP connect timeout, TLS).
    #[error("cannot connect to upstream {}{}", NoQuery(.uri), chain(.source))]
    Connect {
        /// The URI the request was for, without its query string.
        uri: Uri,
        /// The underlying error; it and its causes are already part of this error's `Display`.
        #[source]
        source: BoxError,
    },
    /// No response headers arrived within [`response_timeout`](crate::UpstreamConfig::response_timeout).
    #[error("upstream {} sent no response headers within {after:?}", NoQuery(.uri))]
    ResponseTimeout {
        /// The URI the request was for, without its query string.
        uri: Uri,
        /// The timeout that elapsed.
        after: Duration,
    },
    /// The request failed after connecting: the connection was reset or closed, or the
    /// response was malformed.
    #[error("upstream {} request failed{}", NoQuery(.uri), chain(.source))]
    Protocol {
        /// The URI the request was for, without its query string.
        uri: Uri,
        /// The underlying error; it and its causes are already part of this error's `Display`.
        #[source]
        source: BoxError,
    },
}

impl UpstreamError {
    /// True when no connection could be made, so the upstream never saw the request.
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect { .. })
    }

    /// True for a response timeout or a TCP connect timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self.kind(), ErrorKind::ResponseTimeout | ErrorKind::ConnectTimeout)
    }

    /// The label for metrics. A `Connect` error whose cause is a timed-out TCP connect reports
    /// [`ErrorKind::ConnectTimeout`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidTarget(_) => ErrorKind::InvalidTarget,
            Self::Connect { source, .. } if timed_out(source.as_ref()) => ErrorKind::ConnectTimeout,
            Self::Connect { .. } => ErrorKind::Connect,
            Self::ResponseTimeout { .. } => ErrorKind::ResponseTimeout,
            Self::Protocol { .. } => ErrorKind::Protocol,
        }
    }
}

/// Why reading an [`UpstreamBody`](crate::UpstreamBody) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamBodyError {
    /// No frame arrived within [`idle_timeout`](crate::UpstreamConfig::idle_timeout).
    #[error("upstream response body was idle for {after:?}")]
    IdleTimeout {
        /// The timeout that elapsed.
        after: Duration,
    },
    /// The connection broke or the body framing was malformed.
    #[error("reading the upstream response body failed: {source}{}", Causes(.source.source()))]
    Read {
        /// hyper's error.
        #[source]
        source: BoxError,
    },
}

impl UpstreamBodyError {
    /// True for [`UpstreamBodyError::IdleTimeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::IdleTimeout { .. })
    }

    /// The label for metrics.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::IdleTimeout { .. } => ErrorKind::IdleTimeout,
            Self::Read { .. } => ErrorKind::BodyRead,
        }
    }
}

/// A request path that cannot be appended to the base URL.
///
/// Returned by [`Upstream::target_uri`](crate::Upstream::target_uri). Paths with `.` or `..`
/// segments are refused so a request can never climb out of the base URL's path prefix with the
/// proxy's key attached.
#[derive(Debug, thiserror::Error)]
#[error("invalid upstream target path {path:?}: {reason}")]
pub struct InvalidTarget {
    /// The offending path, without its query string.
    pub(crate) path: String,
    pub(crate) reason: &'static str,
}

/// An API key that cannot be sent as an `Authorization` header value.
///
/// The message describes the problem but never contains the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("API key is not usable in an Authorization header: {reason}")]
pub struct InvalidKey {
    pub(crate) reason: &'static str,
}

/// Why [`Upstream::new`](crate::Upstream::new) refused its configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamBuildError {
    /// `base_url` is not an absolute `http` or `https` URL.
    #[error("invalid upstream base_url {url}: {reason}")]
    InvalidBaseUrl {
        /// The configured URL.
        url: Uri,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An entry of [`extra_root_certificates`](crate::UpstreamConfig::extra_root_certificates)
    /// is not an X.509 certificate usable as a trust anchor.
    #[error("upstream extra_root_certificates[{index}] is not a usable root certificate: {source}")]
    InvalidRootCertificate {
        /// Its position in `extra_root_certificates`.
        index: usize,
        /// rustls' error.
        #[source]
        source: rustls::Error,
    },
    /// The TLS configuration could not be built.
    #[error("cannot build the upstream TLS configuration: {source}")]
    Tls {
        /// rustls' error.
        #[from]
        source: rustls::Error,
    },
}

/// `uri` minus its query string (the client's, possibly private), for keeping in an error.
pub(crate) fn without_query(uri: &Uri) -> Uri {
    if uri.query().is_none() {
        return uri.clone();
    }
    // Reparsing the scheme, authority and path of a valid URI cannot fail; the fallback is `/`.
    NoQuery(uri).to_string().parse().unwrap_or_default()
}

/// True if any error in the chain starting at `err` is an I/O timeout.
fn timed_out(err: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.downcast_ref::<io::Error>().is_some_and(|io| io.kind() == io::ErrorKind::TimedOut) {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Displays a URI without its query string (which is the client's and may be long or private).
struct NoQuery<'a>(&'a Uri);

impl fmt::Display for NoQuery<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(scheme) = self.0.scheme() {
            write!(f, "{scheme}://")?;
        }
        if let Some(authority) = self.0.authority() {
            f.write_str(authority.as_str())?;
        }
        f.write_str(self.0.path())
    }
}

/// Displays an error chain as `: cause: cause of cause…` (nothing when there is no cause).
struct Causes<'a>(Option<&'a (dyn StdError + 'static)>);

/// `: <error>: <its cause>: …` for a boxed error.
fn chain(e: &BoxError) -> Causes<'_> {
    Causes(Some(e.as_ref()))
}

impl fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut cur = self.0;
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_query_drops_only_the_query() {
        let uri = Uri::from_static("http://h:1/v1/models?key=secret");
        assert_eq!(without_query(&uri), "http://h:1/v1/models");
        let uri = Uri::from_static("https://h/v1/models");
        assert_eq!(without_query(&uri), uri);
    }

    #[test]
    fn no_query_drops_the_query_string() {
        let uri = Uri::from_static("http://h:1/v1/models?key=secret");
        assert_eq!(NoQuery(&uri).to_string(), "http://h:1/v1/models");
    }

    #[test]
    fn connect_timeout_is_classified_from_the_cause_chain() {
        let io = io::Error::new(io::ErrorKind::TimedOut, "connect timeout");
        let err = UpstreamError::Connect { uri: Uri::from_static("http://h/v1"), source: Box::new(io) };
        assert!(err.is_connect());
        assert!(err.is_timeout());
        assert_eq!(err.kind(), ErrorKind::ConnectTimeout);
    }
}
