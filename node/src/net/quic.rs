//! Shoal over QUIC: the client-port and peer-port servers, and
//! [`QuicTransport`], the pool of long-lived connections to peers.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustls::pki_types::CertificateDer;
use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_client::error::{ErrorKind, WireError};
use shoal_client::frame::{self, FrameError};
use shoal_client::proto::{MemberInfo, Response, Role};
use shoal_client::rpc::{self, CallError, Link, Links};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, warn};

use super::budget::read_budgeted;
use super::tls::{check_peer_name, client_role};
use super::{
    Handler, PeerEnvelope, PeerError, PeerRequest, PeerResponse, Transport, TransportError,
};

/// Frame caps of a node. Frames are read as their bytes arrive (see
/// [`shoal_client::frame`]), so a cap bounds memory per stream, and one
/// declared but not sent costs nothing.
#[derive(Debug, Clone, Copy)]
pub struct FrameLimits {
    /// Client request frames: a maximal key and value plus room for the rest.
    pub client_request: usize,
    /// Answers on the client port: a read may return an object past the
    /// write limits (merged from both sides of a partition); the SDK reads
    /// up to this much.
    pub client_answer: usize,
    /// Peer frames, both ways, carry whole objects, siblings included: any
    /// object a merge can produce, many times the per-write object limit.
    /// A message over it fails only its own request.
    pub peer: usize,
    /// Client connections served at once.
    pub client_connections: usize,
    /// Bytes of client request bodies held at once, all connections
    /// together.
    pub client_budget: usize,
}

impl FrameLimits {
    pub fn new(l: &crate::config::LimitsConfig) -> Self {
        FrameLimits {
            client_request: l.max_value_bytes + shoal_client::client::MAX_KEY_BYTES + (64 << 10),
            client_answer: shoal_client::client::MAX_RESPONSE_BYTES,
            peer: l.max_object_bytes.saturating_mul(16).max(256 << 20),
            client_connections: l.max_client_connections,
            client_budget: l.client_request_budget_mb << 20,
        }
    }
}

/// Counts a connection as served for as long as it lives.
struct Served(Arc<AtomicUsize>);

impl Drop for Served {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The next connection to serve, `None` once the endpoint is closed. Once
/// `shutdown` turns true (a graceful stop: see [`crate::server::Running::stop`])
/// each new connection is refused at once, so that its client or peer turns
/// to another node instead of waiting out a handshake nobody completes.
async fn next_incoming(
    endpoint: &quinn::Endpoint,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<quinn::Incoming> {
    loop {
        if *shutdown.borrow_and_update() {
            endpoint.accept().await?.refuse();
            continue;
        }
        tokio::select! {
            incoming = endpoint.accept() => return incoming,
            changed = shutdown.changed() => changed.ok()?,
        }
    }
}

/// Accepts client connections, refusing new ones once `shutdown` turns true.
pub async fn serve_clients<H: Handler>(
    endpoint: quinn::Endpoint,
    handler: Arc<H>,
    limits: FrameLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let served = Arc::new(AtomicUsize::new(0));
    let budget = Arc::new(Semaphore::new(limits.client_budget));
    loop {
        let Some(incoming) = next_incoming(&endpoint, &mut shutdown).await else {
            break;
        };
        if served.load(Ordering::Relaxed) >= limits.client_connections {
            crate::log::warn_limited(
                "client connection refused: limits.max-client-connections reached",
                || incoming.remote_address().to_string(),
            );
            incoming.refuse();
            continue;
        }
        served.fetch_add(1, Ordering::Relaxed);
        let connection = Served(served.clone());
        let (handler, budget) = (handler.clone(), budget.clone());
        tokio::spawn(async move {
            let _connection = connection;
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                // This node's TLS refused the client (no certificate from the
                // cluster CA, or an expired one).
                Err(e @ quinn::ConnectionError::TransportError(_)) => {
                    crate::log::warn_limited("client refused at the TLS handshake", || {
                        format!("{remote}: {e}")
                    });
                    return;
                }
                // The client gave up or went away: nothing to warn about.
                Err(e) => {
                    debug!(%remote, error = %e, "client handshake not completed");
                    return;
                }
            };
            let Some(role) = peer_certificate(&conn).and_then(|c| client_role(&c)) else {
                crate::log::warn_limited("client certificate names no role", || remote.to_string());
                conn.close(
                    2u32.into(),
                    b"its certificate grants no client role (read-only, read-write or admin)",
                );
                return;
            };
            while let Ok((send, recv)) = conn.accept_bi().await {
                let handler = handler.clone();
                tokio::spawn(serve_stream(
                    send,
                    recv,
                    (limits.client_request, limits.client_answer),
                    Some(budget.clone()),
                    move |request: shoal_client::proto::Request| {
                        let handler = handler.clone();
                        async move {
                            match permitted(role, &request) {
                                Ok(()) => handler.client(request).await,
                                Err(refusal) => Response::Error(refusal),
                            }
                        }
                    },
                ));
            }
        });
    }
}

/// Whether a client of `role` may make `request`.
fn permitted(role: Role, request: &shoal_client::proto::Request) -> Result<(), WireError> {
    let needs = request.needs();
    if role >= needs {
        return Ok(());
    }
    Err(WireError::new(
        ErrorKind::Unauthorised,
        format!(
            "this client's certificate grants {} access; {} needs {} (issue a certificate \
             with `shoal certs client --role {}`)",
            role.name(),
            request.verb(),
            needs.name(),
            needs.name()
        ),
    ))
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
/// connection and the node carry on. `(max, max_answer)` cap request and
/// answer frames; an answer over its cap is replaced by an error for that
/// request alone (the reader would end the stream on it). With a `budget`,
/// a request's body is read only once its size in bytes is taken from it,
/// and given back when the request is answered.
async fn serve_stream<Req, Resp, F, Fut>(
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    (max, max_answer): (usize, usize),
    budget: Option<Arc<Semaphore>>,
    handle: F,
) where
    Req: DeserializeOwned + Send + 'static,
    Resp: Answer,
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
        crate::tasks::heavy_for(response.bytes(), || frame::encode(&(id, response)))
            .and_then(|f| match f.len() - frame::HEADER_LEN {
                len if len > max_answer => Err(FrameError::TooLarge {
                    len,
                    max: max_answer,
                }),
                _ => Ok(f),
            })
            .or_else(|e| {
                frame::encode(&(
                    id,
                    Resp::refused(ErrorKind::Internal, format!("answer not sent: {e}")),
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
        let mut held = None;
        let read = async {
            let Some((len, crc)) = frame::read_header(&mut recv, max).await? else {
                return Ok(None);
            };
            let body = match &budget {
                Some(budget) => {
                    let (body, permit) = read_budgeted(&mut recv, len, budget).await?;
                    held = Some(permit);
                    body
                }
                None => frame::read_body_of(&mut recv, len).await?,
            };
            Ok(Some((body, crc)))
        };
        let refusal = match read.await {
            Ok(None) => break,
            Ok(Some((body, crc))) => match frame::decode_body::<(u64, Req)>(&body, crc) {
                Ok((id, request)) => {
                    let permit = in_flight
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("the semaphore is never closed");
                    let (answers, handle) = (answers.clone(), handle.clone());
                    let bytes = held.take();
                    crate::tasks::spawn_boxed(async move {
                        let response = handle(request).await;
                        answer(answers, id, response).await;
                        drop((permit, bytes));
                    });
                    continue;
                }
                // The frame was whole: if its id can be read, answer that
                // request and read on.
                Err(e @ FrameError::Decode(_)) => {
                    match rmp_serde::from_slice::<(u64, serde::de::IgnoredAny)>(&body) {
                        Ok((id, _)) => {
                            crate::log::warn_limited("refused a request", || e.to_string());
                            let kind = ErrorKind::BadRequest;
                            let refusal = Resp::refused(kind, format!("request refused: {e}"));
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
        crate::log::warn_limited("refused a frame; closing its stream", || {
            refusal.to_string()
        });
        let kind = match refusal {
            FrameError::TooLarge { .. } => ErrorKind::TooLarge,
            _ => ErrorKind::BadRequest,
        };
        // Stop the sender: the rest of the stream is never read.
        let _ = recv.stop(0u32.into());
        let refusal = Resp::refused(kind, format!("request refused: {refusal}"));
        answer(answers.clone(), NO_ID, refusal).await;
        break;
    }
    drop(answers);
    if let Err(e) = writer.await.unwrap_or_else(|e| Err(e.to_string())) {
        debug!(error = %e, "the other side went away before its answers");
    }
}

/// An answer of a port: how a request is refused, and whether an answer is
/// heavy to encode.
trait Answer: Serialize + Send + 'static {
    fn refused(kind: ErrorKind, message: String) -> Self;
    /// About how many bytes of values it carries: one of megabytes is
    /// encoded off the worker ([`crate::tasks::heavy_for`]).
    fn bytes(&self) -> usize;
}

impl Answer for Response {
    fn refused(kind: ErrorKind, message: String) -> Self {
        Response::Error(WireError::new(kind, message))
    }

    fn bytes(&self) -> usize {
        self.value_bytes()
    }
}

impl Answer for PeerResponse {
    fn refused(_: ErrorKind, message: String) -> Self {
        PeerResponse::Error(PeerError::Refused(message))
    }

    fn bytes(&self) -> usize {
        PeerResponse::bytes(self)
    }
}

/// Accepts peer connections, refusing new ones once `shutdown` turns true. TLS has already
/// checked the certificate chains to the cluster CA; each request's claimed
/// sender name is checked against that certificate.
pub async fn serve_peers<H: Handler>(
    endpoint: quinn::Endpoint,
    handler: Arc<H>,
    limits: FrameLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let Some(incoming) = next_incoming(&endpoint, &mut shutdown).await else {
            break;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e @ quinn::ConnectionError::TransportError(_)) => {
                    crate::log::warn_limited("refused a peer connection", || {
                        format!("{remote}: {e}")
                    });
                    return;
                }
                Err(e) => {
                    debug!(%remote, error = %e, "peer handshake not completed");
                    return;
                }
            };
            let Some(cert) = peer_certificate(&conn) else {
                warn!(%remote, "peer connection without a certificate");
                conn.close(1u32.into(), b"certificate required");
                return;
            };
            // A client's certificate is from the same CA: it must not
            // pass for a node here, whatever name it carries.
            if client_role(&cert).is_some() {
                crate::log::warn_limited("a client certificate on the peer port", || {
                    remote.to_string()
                });
                conn.close(1u32.into(), b"a client certificate is not a node's");
                return;
            }
            let verified = Arc::new(Mutex::new(HashSet::<String>::new()));
            while let Ok((send, recv)) = conn.accept_bi().await {
                let (handler, cert, verified) = (handler.clone(), cert.clone(), verified.clone());
                tokio::spawn(serve_stream(
                    send,
                    recv,
                    (limits.peer, limits.peer),
                    None,
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
                Err(unreachable(e.to_string()))
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

    async fn send(
        &self,
        to: &MemberInfo,
        request: PeerRequest,
    ) -> Result<PeerResponse, TransportError> {
        // Boxed, the rare way (a dial, a new stream): every call's future
        // would otherwise carry its space, and a call's future is moved
        // into each task that makes one.
        let link = match self.connections.ready(to.peer_addr) {
            Some(link) => link,
            None => Box::pin(self.connection(to)).await?,
        };
        let (bulk, bytes) = (request.is_bulk(), request.bytes());
        let idempotent = request.is_idempotent();
        let envelope = PeerEnvelope {
            from: self.me.clone(),
            request,
        };
        let result = if bulk {
            Box::pin(rpc::call(&link.conn, &envelope, bytes, self.max_frame)).await
        } else {
            link.mux.call(&envelope).await
        };
        result.map_err(|e| {
            if let CallError::TooLarge(_) = e {
                // Not sent, and nothing wrong with the peer.
                TransportError::Unreachable(to.name.clone(), e.to_string())
            } else if let CallError::NotDelivered(_) | CallError::Silent(_) = e {
                // Dead or unreachable: fail fast for a while instead of re-dialling per call.
                self.connections.remove(to.peer_addr);
                self.backoff_until
                    .lock()
                    .expect("pool lock")
                    .insert(to.peer_addr, Instant::now() + self.backoff);
                match e {
                    // A silent peer may still run the request later (a
                    // paused process): only one that can run twice harmlessly
                    // counts as not sent.
                    CallError::Silent(_) if !idempotent => {
                        TransportError::Failed(to.name.clone(), e.to_string())
                    }
                    _ => TransportError::Unreachable(to.name.clone(), e.to_string()),
                }
            } else {
                TransportError::Failed(to.name.clone(), e.to_string())
            }
        })
    }
}
