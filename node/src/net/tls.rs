//! TLS for the two ports. Both present the node's certificate and demand one
//! from the caller, chaining to the cluster CA (a certificate that is
//! missing, from another CA or expired fails the handshake). On the peer
//! port [`check_peer_name`] then ties the name a peer claims to that
//! certificate; on the client port [`client_role`] reads what the client may
//! do.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use shoal_client::proto::{Role, CLIENT_ALPN};
use shoal_client::tls::{
    base_transport, provider, quic_client_config, root_store, transport_config,
};

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
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, TlsError> {
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls)).map_err(err)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport);
    Ok(config)
}

/// Mutual TLS against the cluster CA, speaking `alpn`.
fn mutual_tls(
    id: &Identity,
    transport: Arc<quinn::TransportConfig>,
    alpn: &[u8],
) -> Result<quinn::ServerConfig, TlsError> {
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
    tls.alpn_protocols = vec![alpn.to_vec()];
    server_config(tls, transport)
}

/// Streams one client connection may have open at once: the SDK uses one
/// long-lived stream and a few more for large requests.
const CLIENT_STREAMS: u32 = 16;

/// The client port: a client certificate from the cluster CA is required;
/// its role ([`client_role`]) says what the client may do. A connection
/// may send at most `window` bytes the node has not read yet, on at most
/// [`CLIENT_STREAMS`] streams.
pub fn client_port_config(
    id: &Identity,
    idle: Duration,
    window: u32,
) -> Result<quinn::ServerConfig, TlsError> {
    let mut transport = base_transport(idle);
    transport
        .max_concurrent_bidi_streams(CLIENT_STREAMS.into())
        .max_concurrent_uni_streams(0u32.into())
        .receive_window(window.into())
        .stream_receive_window(window.into());
    mutual_tls(id, Arc::new(transport), CLIENT_ALPN)
}

/// The peer port, accepting side: mutual TLS against the cluster CA.
pub fn peer_port_config(id: &Identity, idle: Duration) -> Result<quinn::ServerConfig, TlsError> {
    mutual_tls(id, transport_config(idle), PEER_ALPN)
}

/// The role a client certificate (already verified against the CA by TLS)
/// grants: the highest one it names (see [`Role::san`]); `None` if it names
/// none (a node's certificate, say).
pub fn client_role(cert: &CertificateDer<'_>) -> Option<Role> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    Role::ALL.into_iter().rev().find(|role| {
        let san = role.san();
        ServerName::try_from(san.as_str())
            .is_ok_and(|name| parsed.verify_is_valid_for_subject_name(&name).is_ok())
    })
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
