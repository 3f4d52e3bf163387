//! TLS: extra trusted root certificates and the rustls client configuration that uses them.

use std::sync::Arc;

use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{
        CertificateDer,
        pem::{self, PemObject as _},
    },
};

use crate::UpstreamBuildError;

/// Parses the certificates in a PEM file, e.g. a private CA for
/// [`UpstreamConfig::extra_root_certificates`](crate::UpstreamConfig::extra_root_certificates).
///
/// Every `-----BEGIN CERTIFICATE-----` section is returned, in order; sections of other types
/// (keys, CRLs) and text between sections are skipped. Each certificate is checked to be usable
/// as a trust anchor, so a broken file is reported here rather than by
/// [`Upstream::new`](crate::Upstream::new).
///
/// # Errors
///
/// [`PemCertificatesError`]: malformed PEM, a certificate that does not parse, or no
/// certificate at all.
///
/// ```
/// let err = proxypal_upstream::parse_pem_certificates(b"not a certificate").unwrap_err();
/// assert_eq!(err.to_string(), "no PEM certificate (-----BEGIN CERTIFICATE-----) found");
/// ```
pub fn parse_pem_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemCertificatesError> {
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert =
            cert.map_err(|source| PemCertificatesError::Malformed { number: certs.len() + 1, source })?;
        RootCertStore::empty()
            .add(cert.clone())
            .map_err(|source| PemCertificatesError::Invalid { number: certs.len() + 1, source })?;
        certs.push(cert);
    }
    if certs.is_empty() {
        return Err(PemCertificatesError::NoCertificates);
    }
    Ok(certs)
}

/// Why [`parse_pem_certificates`] found no usable certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PemCertificatesError {
    /// The PEM text is malformed (a section without its end line, bad base64, …).
    #[error("malformed PEM at certificate #{number}: {source}")]
    Malformed {
        /// 1-based number of the certificate being read.
        number: usize,
        /// The PEM parser's error.
        #[source]
        source: pem::Error,
    },
    /// A `CERTIFICATE` section does not hold an X.509 certificate usable as a trust anchor.
    #[error("certificate #{number} is not a usable X.509 certificate: {source}")]
    Invalid {
        /// 1-based number of the certificate in the file.
        number: usize,
        /// rustls' error.
        #[source]
        source: rustls::Error,
    },
    /// The text has no `CERTIFICATE` section at all.
    #[error("no PEM certificate (-----BEGIN CERTIFICATE-----) found")]
    NoCertificates,
}

/// A rustls client configuration with the `ring` provider, rustls' default protocol versions,
/// Mozilla's roots plus `extra_roots`, no client certificate and no ALPN (hyper-rustls sets it).
///
/// This is what `HttpsConnectorBuilder::with_provider_and_webpki_roots` builds, with the extra
/// roots added.
pub(crate) fn client_config_with_extra_roots(
    extra_roots: &[CertificateDer<'static>],
) -> Result<ClientConfig, UpstreamBuildError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for (i, cert) in extra_roots.iter().enumerate() {
        roots
            .add(cert.clone())
            .map_err(|source| UpstreamBuildError::InvalidRootCertificate { index: i, source })?;
    }
    Ok(ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_empty_input_have_no_certificates() {
        for input in [&b""[..], b"hello", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"] {
            assert!(matches!(parse_pem_certificates(input), Err(PemCertificatesError::NoCertificates)));
        }
    }

    #[test]
    fn unterminated_and_undecodable_sections_are_malformed() {
        let err = parse_pem_certificates(b"-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap_err();
        assert!(matches!(err, PemCertificatesError::Malformed { number: 1, .. }), "{err:?}");
        assert!(err.to_string().starts_with("malformed PEM at certificate #1: "), "{err}");

        let err = parse_pem_certificates(b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n")
            .unwrap_err();
        assert!(matches!(err, PemCertificatesError::Malformed { number: 1, .. }), "{err:?}");
    }

    #[test]
    fn a_section_that_is_not_x509_is_invalid() {
        // Valid base64 ("hello world"), not DER.
        let err = parse_pem_certificates(
            b"-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        )
        .unwrap_err();
        assert!(matches!(err, PemCertificatesError::Invalid { number: 1, .. }), "{err:?}");
        assert!(err.to_string().starts_with("certificate #1 is not a usable X.509 certificate: "), "{err}");
    }

    #[test]
    fn the_default_roots_plus_an_invalid_extra_root_is_refused() {
        let bad = CertificateDer::from(b"not der".to_vec());
        let err = client_config_with_extra_roots(&[bad]).unwrap_err();
        assert!(matches!(err, UpstreamBuildError::InvalidRootCertificate { index: 0, .. }), "{err:?}");
    }

    #[test]
    fn the_config_has_mozilla_roots_and_no_alpn() {
        let cfg = client_config_with_extra_roots(&[]).unwrap();
        assert!(cfg.alpn_protocols.is_empty());
    }
}
