//! TLS set-up shared by the SDK and the node: PEM loading and the QUIC client
//! configuration. Only TLS 1.3 (QUIC requires it) with the `ring` provider.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;

/// The `ring` crypto provider every Shoal TLS config uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every certificate in a PEM document.
pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| Error::Config(format!("certificate PEM is malformed: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Config("no certificate found in PEM".into()));
    }
    Ok(certs)
}

/// Parses the first private key in a PEM document.
pub fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, Error> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| Error::Config(format!("private key PEM is malformed: {e}")))?
        .ok_or_else(|| Error::Config("no private key found in PEM".into()))
}

/// A root store holding the cluster CA.
pub fn root_store(ca_pem: &[u8]) -> Result<rustls::RootCertStore, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in parse_certs(ca_pem)? {
        roots
            .add(cert)
            .map_err(|e| Error::Config(format!("CA certificate rejected: {e}")))?;
    }
    Ok(roots)
}

/// Transport settings for long-lived connections: keep-alives so an idle
/// connection stays open, and an idle timeout that notices a dead peer.
pub fn transport_config(idle_timeout: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    t.keep_alive_interval(Some(idle_timeout / 4));
    t.max_concurrent_bidi_streams(4096u32.into());
    Arc::new(t)
}

/// A QUIC client configuration trusting `ca_pem`, presenting `identity` (a
/// certificate chain and key) when given, speaking `alpn`.
pub fn quic_client_config(
    ca_pem: &[u8],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[u8],
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Config(e.to_string()))?
        .with_root_certificates(root_store(ca_pem)?);
    let mut tls = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| Error::Config(format!("client certificate rejected: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| Error::Config(format!("TLS config unusable for QUIC: {e}")))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport_config(idle_timeout));
    Ok(config)
}
