//! TLS for the two ports. Both present the node's certificate; the peer port
//! also demands one from the caller, chaining to the cluster CA, and
//! [`check_peer_name`] then ties the name a peer claims to that certificate.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use shoal_client::proto::CLIENT_ALPN;
use shoal_client::tls::{provider, quic_client_config, root_store, transport_config};

use super::PEER_ALPN;

/// This node's TLS material, parsed once at start.
#[derive(Clone)]
pub struct Identity {
    pub ca_pem: Vec<u8>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
}

#[derive(Debug, thiserror::Error)]
#[error("TLS set-up failed: {0}")]
pub struct TlsError(pub String);

fn err(e: impl std::fmt::Display) -> TlsError {
    TlsError(e.to_string())
}

fn server_config(
    tls: rustls::ServerConfig,
    idle: Duration,
) -> Result<quinn::ServerConfig, TlsError> {
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls)).map_err(err)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport_config(idle));
    Ok(config)
}

/// The client port: server-authenticated TLS; client certificates not required.
pub fn client_port_config(id: &Identity, idle: Duration) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(err)?
        .with_no_client_auth()
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(err)?;
    tls.alpn_protocols = vec![CLIENT_ALPN.to_vec()];
    server_config(tls, idle)
}

/// The peer port, accepting side: mutual TLS against the cluster CA.
pub fn peer_port_config(id: &Identity, idle: Duration) -> Result<quinn::ServerConfig, TlsError> {
    let roots = Arc::new(root_store(&id.ca_pem).map_err(err)?);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(err)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(err)?;
    tls.alpn_protocols = vec![PEER_ALPN.to_vec()];
    server_config(tls, idle)
}

/// The peer port, calling side: presents this node's certificate.
pub fn peer_client_config(id: &Identity, idle: Duration) -> Result<quinn::ClientConfig, TlsError> {
    quic_client_config(
        &id.ca_pem,
        Some((id.chain.clone(), id.key.clone_key())),
        PEER_ALPN,
        idle,
    )
    .map_err(err)
}

/// Checks that `cert` (already verified against the CA by TLS) is issued for
/// the node `name`.
pub fn check_peer_name(cert: &CertificateDer<'_>, name: &str) -> Result<(), String> {
    let server_name =
        ServerName::try_from(name).map_err(|e| format!("{name:?} is not a node name: {e}"))?;
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("peer certificate unreadable: {e:?}"))?;
    parsed
        .verify_is_valid_for_subject_name(&server_name)
        .map_err(|_| format!("peer certificate is not issued for node {name:?}"))
}
