//! Shoal over QUIC: the client-port and peer-port servers, and
//! [`QuicTransport`], the pool of long-lived connections to peers.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustls::pki_types::CertificateDer;
use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_client::error::{ErrorKind, WireError};
use shoal_client::frame::{self, FrameError};
use shoal_client::proto::{MemberInfo, Response};
use shoal_client::rpc::{self, CallError, Link, Links};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, warn};

use super::tls::check_peer_name;
use super::{
    Handler, PeerEnvelope, PeerError, PeerRequest, PeerResponse, Transport, TransportError,
};

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
                tokio::spawn(serve_stream(
                    send,
                    recv,
                    limits.client_request,
                    client_refusal,
                    move |request| {
                        let handler = handler.clone();
                        async move { handler.client(request).await }
                    },
                ));
            }
        });
    }
}

/// Requests one stream may have in progress at once; past this the server
/// stops reading it until one finishes, and QUIC flow control holds the
/// sender back.
const MAX_IN_FLIGHT_PER_STREAM: usize = 1024;

pub use shoal_client::rpc::NO_ID;

/// Serves one stream: reads `(id, request)` frames until the sender finishes,
/// handles each in its own task and sends back `(id, response)` as soon as it
/// is ready. A frame that cannot be read gets `refused` as its answer (under
/// its id if that could be read, else [`NO_ID`] and the stream ends); the
/// connection and the node carry on.
async fn serve_stream<Req, Resp, F, Fut>(
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    max: usize,
    refused: fn(ErrorKind, String) -> Resp,
    handle: F,
) where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    F: Fn(Req) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    // Bounded: a client that sends requests without reading the answers
    // stalls its handlers, which keep their permits, so the reader stops
    // and QUIC flow control holds the client back; memory stays bounded.
    let (answers, queued) = mpsc::channel(MAX_IN_FLIGHT_PER_STREAM);
    let writer = tokio::spawn(rpc::send_frames(send, queued));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_STREAM));
    let encode = move |id: u64, response: &Resp| -> Option<Bytes> {
        frame::encode(&(id, response))
            .or_else(|e| {
                frame::encode(&(
                    id,
                    refused(ErrorKind::Internal, format!("answer not sent: {e}")),
                ))
            })
            .ok()
            .map(Bytes::from)
    };
    let answer = move |answers: mpsc::Sender<Bytes>, id: u64, response: Resp| async move {
        if let Some(frame) = encode(id, &response) {
            let _ = answers.send(frame).await;
        }
    };
    loop {
        let refusal = match frame::read_body(&mut recv, max).await {
            Ok(None) => break,
            Ok(Some((body, crc))) => match frame::decode_body::<(u64, Req)>(&body, crc) {
                Ok((id, request)) => {
                    let permit = in_flight
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("the semaphore is never closed");
                    let (answers, handle) = (answers.clone(), handle.clone());
                    tokio::spawn(async move {
                        let response = handle(request).await;
                        answer(answers, id, response).await;
                        drop(permit);
                    });
                    continue;
                }
                // The frame was whole: if its id can be read, answer that
                // request and read on.
                Err(e @ FrameError::Decode(_)) => {
                    match rmp_serde::from_slice::<(u64, serde::de::IgnoredAny)>(&body) {
                        Ok((id, _)) => {
                            warn!(error = %e, "refused a request");
                            let kind = ErrorKind::BadRequest;
                            let refusal = refused(kind, format!("request refused: {e}"));
                            answer(answers.clone(), id, refusal).await;
                            continue;
                        }
                        Err(_) => e,
                    }
                }
                Err(e) => e,
            },
            // The connection or stream went away: nobody to answer.
            Err(FrameError::Stream(e)) => {
                debug!(error = %e, "stream ended");
                break;
            }
            Err(e) => e,
        };
        warn!(error = %refusal, "refused a frame; closing its stream");
        let kind = match refusal {
            FrameError::TooLarge { .. } => ErrorKind::TooLarge,
            _ => ErrorKind::BadRequest,
        };
        // Stop the sender: the rest of the stream is never read.
        let _ = recv.stop(0u32.into());
        let refusal = refused(kind, format!("request refused: {refusal}"));
        answer(answers.clone(), NO_ID, refusal).await;
        break;
    }
    drop(answers);
    if let Err(e) = writer.await.unwrap_or_else(|e| Err(e.to_string())) {
        debug!(error = %e, "the other side went away before its answers");
    }
}

fn client_refusal(kind: ErrorKind, message: String) -> Response {
    Response::Error(WireError::new(kind, message))
}

fn peer_refusal(_: ErrorKind, message: String) -> PeerResponse {
    PeerResponse::Error(PeerError::Refused(message))
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
                tokio::spawn(serve_stream(
                    send,
                    recv,
                    limits.peer,
                    peer_refusal,
                    move |envelope: PeerEnvelope| {
                        let (handler, cert, verified) =
                            (handler.clone(), cert.clone(), verified.clone());
                        async move { serve_peer_request(envelope, &*handler, &cert, &verified).await }
                    },
                ));
            }
        });
    }
}

fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().cloned()
}

/// Answers one peer request once its claimed sender name is checked against
/// the connection's certificate (each name is checked once per connection).
async fn serve_peer_request<H: Handler>(
    envelope: PeerEnvelope,
    handler: &H,
    cert: &CertificateDer<'static>,
    verified: &Mutex<HashSet<String>>,
) -> PeerResponse {
    let known = verified
        .lock()
        .expect("verified lock")
        .contains(&envelope.from);
    if !known {
        if let Err(e) = check_peer_name(cert, &envelope.from) {
            warn!(claimed = %envelope.from, error = %e, "peer claimed a name its certificate lacks");
            return PeerResponse::Error(PeerError::NameNotInCertificate {
                claimed: envelope.from,
                detail: e,
            });
        }
        verified
            .lock()
            .expect("verified lock")
            .insert(envelope.from.clone());
    }
    handler.peer(envelope.from, envelope.request).await
}

/// Long-lived connections to peers, one per address, a stream per call.
pub struct QuicTransport {
    endpoint: quinn::Endpoint,
    me: String,
    connections: Links<PeerResponse>,
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
            connections: Links::new(max_frame),
            backoff_until: Mutex::new(HashMap::new()),
            connect_timeout,
            backoff,
            max_frame,
        }
    }

    async fn connection(&self, to: &MemberInfo) -> Result<Link<PeerResponse>, TransportError> {
        let addr = to.peer_addr;
        if let Some(link) = self.connections.get(addr).await {
            return Ok(link);
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
        let dialled = (self.connections)
            .dial(&self.endpoint, addr, &to.name, self.connect_timeout)
            .await;
        match dialled {
            Ok(link) => {
                self.backoff_until.lock().expect("pool lock").remove(&addr);
                Ok(link)
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
        let link = self.connection(to).await?;
        let bulk = request.is_bulk();
        let envelope = PeerEnvelope {
            from: self.me.clone(),
            request,
        };
        let result = if bulk {
            rpc::call(&link.conn, &envelope, self.max_frame).await
        } else {
            link.mux.call(&envelope).await
        };
        result.map_err(|e| {
            if let CallError::NotDelivered(_) = e {
                // Dead or unreachable: fail fast for a while instead of re-dialling per call.
                self.connections.remove(to.peer_addr);
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
