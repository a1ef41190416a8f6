//! Shoal over QUIC: the client-port and peer-port servers, and
//! [`QuicTransport`], the pool of long-lived connections to peers.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use shoal_client::error::{ErrorKind, WireError};
use shoal_client::frame::{self, FrameError};
use shoal_client::proto::{MemberInfo, Request, Response};
use shoal_client::rpc::{self, CallError};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::tls::check_peer_name;
use super::{Handler, PeerEnvelope, PeerRequest, PeerResponse, Transport, TransportError};

/// Frame caps of a node.
#[derive(Debug, Clone, Copy)]
pub struct FrameLimits {
    /// Client request frames: a maximal key and value plus room for the rest.
    pub client_request: usize,
    /// Peer frames carry whole objects, siblings included.
    pub peer: usize,
}

impl FrameLimits {
    pub fn for_max_value(max_value: usize) -> Self {
        FrameLimits {
            client_request: max_value + shoal_client::client::MAX_KEY_BYTES + (64 << 10),
            peer: (max_value * 16).max(64 << 20),
        }
    }
}

/// Accepts client connections until `shutdown` turns true.
pub async fn serve_clients<H: Handler>(
    endpoint: quinn::Endpoint,
    handler: Arc<H>,
    limits: FrameLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => break },
            _ = shutdown.changed() => break,
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "client handshake failed");
                    return;
                }
            };
            while let Ok((send, recv)) = conn.accept_bi().await {
                let handler = handler.clone();
                tokio::spawn(serve_client_stream(send, recv, handler, limits));
            }
        });
    }
}

async fn serve_client_stream<H: Handler>(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    handler: Arc<H>,
    limits: FrameLimits,
) {
    let response = match frame::read::<Request>(&mut recv, limits.client_request).await {
        Ok(request) => handler.client(request).await,
        Err(e) => {
            warn!(error = %e, "refused a client frame");
            let kind = match e {
                FrameError::TooLarge { .. } => ErrorKind::TooLarge,
                _ => ErrorKind::BadRequest,
            };
            // Stop the sender: the rest of an oversized frame is never read.
            let _ = recv.stop(0u32.into());
            Response::Error(WireError::new(kind, format!("request refused: {e}")))
        }
    };
    if let Err(e) = frame::write(&mut send, &response).await {
        debug!(error = %e, "client went away before its answer");
    }
}

/// Accepts peer connections until `shutdown` turns true. TLS has already
/// checked the certificate chains to the cluster CA; each request's claimed
/// sender name is checked against that certificate.
pub async fn serve_peers<H: Handler>(
    endpoint: quinn::Endpoint,
    handler: Arc<H>,
    limits: FrameLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => break },
            _ = shutdown.changed() => break,
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    warn!(%remote, error = %e, "refused a peer connection");
                    return;
                }
            };
            let Some(cert) = peer_certificate(&conn) else {
                warn!(%remote, "peer connection without a certificate");
                conn.close(1u32.into(), b"certificate required");
                return;
            };
            let verified = Arc::new(Mutex::new(HashSet::<String>::new()));
            while let Ok((send, recv)) = conn.accept_bi().await {
                let (handler, cert, verified) = (handler.clone(), cert.clone(), verified.clone());
                tokio::spawn(async move {
                    serve_peer_stream(send, recv, handler, limits, &cert, &verified).await;
                });
            }
        });
    }
}

fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().cloned()
}

async fn serve_peer_stream<H: Handler>(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    handler: Arc<H>,
    limits: FrameLimits,
    cert: &CertificateDer<'static>,
    verified: &Mutex<HashSet<String>>,
) {
    let response = match frame::read::<PeerEnvelope>(&mut recv, limits.peer).await {
        Ok(envelope) => {
            let known = verified
                .lock()
                .expect("verified lock")
                .contains(&envelope.from);
            let check = if known {
                Ok(())
            } else {
                check_peer_name(cert, &envelope.from)
            };
            match check {
                Ok(()) => {
                    verified
                        .lock()
                        .expect("verified lock")
                        .insert(envelope.from.clone());
                    handler.peer(envelope.from, envelope.request).await
                }
                Err(e) => {
                    warn!(claimed = %envelope.from, error = %e, "peer claimed a name its certificate lacks");
                    PeerResponse::Error(e)
                }
            }
        }
        Err(e) => {
            warn!(error = %e, "refused a peer frame");
            let _ = recv.stop(0u32.into());
            PeerResponse::Error(format!("request refused: {e}"))
        }
    };
    let _ = frame::write(&mut send, &response).await;
}

/// Long-lived connections to peers, one per address, a stream per call.
pub struct QuicTransport {
    endpoint: quinn::Endpoint,
    me: String,
    connections: Mutex<HashMap<SocketAddr, quinn::Connection>>,
    /// After a failed dial, calls to that peer fail fast until this instant.
    backoff_until: Mutex<HashMap<SocketAddr, Instant>>,
    connect_timeout: Duration,
    backoff: Duration,
    max_frame: usize,
}

impl QuicTransport {
    /// `endpoint` must carry a default client config with this node's identity.
    pub fn new(
        endpoint: quinn::Endpoint,
        me: String,
        connect_timeout: Duration,
        backoff: Duration,
        max_frame: usize,
    ) -> Self {
        QuicTransport {
            endpoint,
            me,
            connections: Mutex::new(HashMap::new()),
            backoff_until: Mutex::new(HashMap::new()),
            connect_timeout,
            backoff,
            max_frame,
        }
    }

    async fn connection(&self, to: &MemberInfo) -> Result<quinn::Connection, TransportError> {
        let addr = to.peer_addr;
        if let Some(c) = self.connections.lock().expect("pool lock").get(&addr) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        if let Some(until) = self.backoff_until.lock().expect("pool lock").get(&addr) {
            if *until > Instant::now() {
                return Err(TransportError::Unreachable(
                    to.name.clone(),
                    "recently failed; backing off".into(),
                ));
            }
        }
        let unreachable = |e: String| TransportError::Unreachable(to.name.clone(), e);
        let result = async {
            let connecting = self
                .endpoint
                .connect(addr, &to.name)
                .map_err(|e| e.to_string())?;
            tokio::time::timeout(self.connect_timeout, connecting)
                .await
                .map_err(|_| format!("no handshake within {:?}", self.connect_timeout))?
                .map_err(|e| e.to_string())
        }
        .await;
        match result {
            Ok(conn) => {
                self.connections
                    .lock()
                    .expect("pool lock")
                    .insert(addr, conn.clone());
                self.backoff_until.lock().expect("pool lock").remove(&addr);
                Ok(conn)
            }
            Err(e) => {
                self.backoff_until
                    .lock()
                    .expect("pool lock")
                    .insert(addr, Instant::now() + self.backoff);
                Err(unreachable(e))
            }
        }
    }
}

impl Transport for QuicTransport {
    fn unreachable(&self) -> Vec<SocketAddr> {
        let now = Instant::now();
        let backoff = self.backoff_until.lock().expect("pool lock");
        backoff
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(addr, _)| *addr)
            .collect()
    }

    fn heard_from(&self, peer: &MemberInfo) {
        let mut backoff = self.backoff_until.lock().expect("pool lock");
        if !backoff.is_empty() {
            backoff.remove(&peer.peer_addr);
        }
    }

    async fn call(
        &self,
        to: &MemberInfo,
        request: PeerRequest,
    ) -> Result<PeerResponse, TransportError> {
        let conn = self.connection(to).await?;
        let envelope = PeerEnvelope {
            from: self.me.clone(),
            request,
        };
        rpc::call(&conn, &envelope, self.max_frame)
            .await
            .map_err(|e| {
                if let CallError::NotDelivered(_) = e {
                    // Dead or unreachable: fail fast for a while instead of re-dialling per call.
                    self.connections
                        .lock()
                        .expect("pool lock")
                        .remove(&to.peer_addr);
                    self.backoff_until
                        .lock()
                        .expect("pool lock")
                        .insert(to.peer_addr, Instant::now() + self.backoff);
                    TransportError::Unreachable(to.name.clone(), e.to_string())
                } else {
                    TransportError::Failed(to.name.clone(), e.to_string())
                }
            })
    }
}
