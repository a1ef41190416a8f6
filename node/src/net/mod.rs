//! The network: the peer protocol, the [`Transport`] trait that hides the
//! network from the coordinator, and its two implementations.
//!
//! - [`quic`]: the real thing. One QUIC endpoint per role: the client port
//!   (TLS, server authenticated) and the peer port (mutual TLS against the
//!   cluster CA; a peer must hold a certificate for the node name it claims).
//!   Connections are long-lived and shared. Small requests are pipelined on
//!   one long-lived bidirectional stream per connection, each frame tagged
//!   with its request id; bulk ones ([`PeerRequest::is_bulk`]) get a stream
//!   each (see [`shoal_client::rpc`] and [`shoal_client::frame`]). A bad
//!   frame gets an error on its stream; the connection and the node carry on.
//! - [`sim`]: an in-memory network for tests, with faults a test names:
//!   `partition(a, b)`, `crash(a)`, `blackhole(a, b)` and `delay(a, b, d)`.
//! - [`tls`]: server and client TLS configurations and the name check.
//! - `budget`: the node-wide budget of client request bodies held at once.

mod budget;
pub mod quic;
pub mod sim;
pub mod tls;

use std::future::Future;

use tokio::time::Instant;

use serde::{Deserialize, Serialize};
use shoal_client::proto::{MemberInfo, Request, Response};
use shoal_ring::NodeId;

use crate::membership::state::ClusterState;
use crate::version::Object;

/// ALPN protocol name of the peer port.
pub const PEER_ALPN: &[u8] = b"shoal-peer/1";

/// A request from one node to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PeerRequest {
    /// "This is who I am"; answered with the same about the receiver.
    Hello(MemberInfo),
    /// A heartbeat for the failure detector; answered with `Pong`.
    Ping,
    /// The replica's stored object for a key.
    ReplicaGet {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// The reaper's check: the replica's stored object for a key, made
    /// durable before it is answered (a power loss must not take back a
    /// tombstone the reaper relied on).
    ReapCheck {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Merge this object into the replica's copy of the key.
    ReplicaPut {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        object: Object,
    },
    /// A client request for a key the sender does not replicate: coordinate it
    /// here and answer on its behalf. `id` is unique per sender (see
    /// [`crate::coordinator::ForwardIds`]): a write delivered twice (a
    /// network duplicate, a sender retrying what it thought lost) runs once.
    Forward { id: u64, request: Request },
    /// Sloppy quorum: keep this object as a hint for `for_primary`, which is
    /// down, and hand it off when it returns (see [`crate::handoff`]).
    HintPut {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        for_primary: NodeId,
        object: Object,
    },
    /// The hint this node holds for `for_primary` (a fallback's read answer).
    HintGet {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        for_primary: NodeId,
    },
    /// Every hint this node holds for the key, whoever it is for (inspect).
    HintsOf {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// The reaper's `HintsOf`, answered alike, but only by a member whose
    /// settled layout ([`crate::membership::Membership::settled`]) is
    /// `layout`: one on another, or in a change, may hold copies of the key
    /// the reaper's layout does not count. A node from before this request
    /// cannot decode it, so it never agrees by default.
    ReapHintsOf {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        layout: u64,
    },
    /// Hinted handoff: merge each object into the receiver's copy, which the
    /// receiver is a primary of; answered with `Stored` once all are durable.
    Handoff(Vec<HandoffEntry>),
    /// Anti-entropy exchange steps (see [`crate::antientropy`]).
    Aae(AaeRequest),
    /// Tombstone reaping: delete the key if its object is exactly `object`.
    Reap {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        object: Object,
    },
    /// Membership gossip: the digest of the sender's cluster state; answered
    /// with `Gossip(None)` when equal, else with the receiver's state
    /// (see [`crate::membership::gossip`]).
    Gossip { digest: u64 },
    /// Ownership transfer: the hints the receiver holds, for any primary,
    /// whose keys fall in `partitions`, scanning its hints after `after`;
    /// answered with `HintsIn` (see [`crate::transfer`]).
    HintsIn {
        partitions: Vec<u32>,
        #[serde(with = "serde_bytes")]
        after: Vec<u8>,
    },
    /// Membership gossip: merge this state (the sender's, after it merged
    /// the receiver's); answered with `Stored`.
    GossipPush(Box<ClusterState>),
    /// Several replica reads and small writes in one message, answered with
    /// `Spares`: one answer per request, in order, where a read whose
    /// object would take the answers past [`BATCH_ANSWER_BYTES`] is handed
    /// back ([`BatchedAnswer::Alone`]). The sends a quorum does not wait
    /// for travel this way (see `coordinator::spare`). At most
    /// [`BATCH_REQUESTS`]; it never holds another batch.
    Spares(Vec<Batched>),
    /// The batch of nodes 297ac1c..6d1d943 (the first with batches), still
    /// answered for a rolling upgrade from them: as `Spares`, but every
    /// request is answered in its `Batch`, never handed back (they cannot
    /// decode [`BatchedAnswer::Alone`]). No longer sent.
    Batch(Vec<Batched>),
}

/// A batch holds at most this many requests; the receiver refuses a larger
/// one whole.
pub const BATCH_REQUESTS: usize = 128;

/// About how many bytes of objects a batch carries, each way: the sender
/// closes a batch at this size, and the receiver of [`PeerRequest::Spares`]
/// hands back a read whose object would take its answer past it.
/// Both keep a batch's frame small on the shared stream of a connection.
pub const BATCH_ANSWER_BYTES: usize = 256 << 10;

/// A request that may travel in a [`PeerRequest::Spares`]: a replica's read
/// or a write of at most [`BULK_BYTES`]. Its variants are spelled as the
/// [`PeerRequest`] ones they stand for, so they encode alike.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Batched {
    ReplicaGet {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    ReplicaPut {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        object: Object,
    },
}

impl Batched {
    /// The request as it travels on its own.
    pub fn alone(self) -> PeerRequest {
        match self {
            Batched::ReplicaGet { key } => PeerRequest::ReplicaGet { key },
            Batched::ReplicaPut { key, object } => PeerRequest::ReplicaPut { key, object },
        }
    }

    /// Whether it may travel in a batch (a write of a large object may not).
    pub fn fits(&self) -> bool {
        match self {
            Batched::ReplicaGet { .. } => true,
            Batched::ReplicaPut { object, .. } => object.approx_size() <= BULK_BYTES,
        }
    }

    /// About how many bytes it adds to a batch.
    pub fn size(&self) -> usize {
        match self {
            Batched::ReplicaGet { key } => key.len() + 16,
            Batched::ReplicaPut { key, object } => key.len() + object.approx_size() + 16,
        }
    }
}

/// Whether a batch carries more than a bulk request's bytes (a hostile or
/// future sender's: this one's stay far under): it travels and is answered
/// as one.
pub fn is_bulk_batch(requests: &[Batched]) -> bool {
    requests.iter().map(Batched::size).sum::<usize>() > BULK_BYTES
}

/// The answer to one [`Batched`] request: what the request alone would
/// get, or `Alone`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BatchedAnswer {
    Object(Option<Object>),
    Stored,
    Error(PeerError),
    /// Not answered here, as its answer would have made the batch's too
    /// large: send the request again on its own.
    Alone,
}

impl BatchedAnswer {
    /// The answer to the request as it would have come alone (`None`:
    /// [`BatchedAnswer::Alone`]).
    pub fn alone(self) -> Option<PeerResponse> {
        match self {
            BatchedAnswer::Object(o) => Some(PeerResponse::Object(o)),
            BatchedAnswer::Stored => Some(PeerResponse::Stored),
            BatchedAnswer::Error(e) => Some(PeerResponse::Error(e)),
            BatchedAnswer::Alone => None,
        }
    }
}

impl From<PeerResponse> for BatchedAnswer {
    /// A replica's answer to a read or a write, which is one of the three.
    fn from(response: PeerResponse) -> Self {
        match response {
            PeerResponse::Object(o) => BatchedAnswer::Object(o),
            PeerResponse::Stored => BatchedAnswer::Stored,
            PeerResponse::Error(e) => BatchedAnswer::Error(e),
            other => BatchedAnswer::Error(PeerError::Refused(format!(
                "a batched request was answered with {other:?}"
            ))),
        }
    }
}

/// A request carrying more than this goes on a stream of its own.
const BULK_BYTES: usize = crate::tasks::HEAVY_BYTES;

impl PeerRequest {
    /// Whether running the request twice does no harm: every request but a
    /// forwarded client write is a read, a merge or a conditional removal.
    /// Only such requests may be retried elsewhere after a silent peer.
    pub fn is_idempotent(&self) -> bool {
        match self {
            PeerRequest::Forward { request, .. } => request.is_idempotent(),
            _ => true,
        }
    }

    /// The request as it travels in a [`PeerRequest::Spares`], if it may;
    /// else the request itself, handed back (moved, not worth a box).
    #[allow(clippy::result_large_err)]
    pub fn batched(self) -> Result<Batched, PeerRequest> {
        let batched = match self {
            PeerRequest::ReplicaGet { key } => Batched::ReplicaGet { key },
            PeerRequest::ReplicaPut { key, object } => Batched::ReplicaPut { key, object },
            other => return Err(other),
        };
        match batched.fits() {
            true => Ok(batched),
            false => Err(batched.alone()),
        }
    }

    /// Requests that may carry megabytes (batches of objects, hint lists,
    /// a large object or value) or are rare. Each gets a stream of its own,
    /// so that it never holds up the small requests pipelined on a
    /// connection's shared stream, and if it fails only it fails.
    pub fn is_bulk(&self) -> bool {
        matches!(
            self,
            PeerRequest::Hello(_)
                | PeerRequest::HintsOf { .. }
                | PeerRequest::ReapHintsOf { .. }
                | PeerRequest::Handoff(_)
                | PeerRequest::Aae(_)
                | PeerRequest::GossipPush(_)
                | PeerRequest::HintsIn { .. }
                | PeerRequest::Reap { .. }
        ) || self.bytes() > BULK_BYTES
    }

    /// About how many bytes of objects or values the request carries (what
    /// makes encoding and handling it heavy).
    pub fn bytes(&self) -> usize {
        match self {
            PeerRequest::ReplicaPut { object, .. } | PeerRequest::HintPut { object, .. } => {
                object.approx_size()
            }
            PeerRequest::Spares(requests) | PeerRequest::Batch(requests) => {
                requests.iter().map(Batched::size).sum()
            }
            PeerRequest::Forward {
                request: Request::Put { value, .. },
                ..
            } => value.len(),
            PeerRequest::Handoff(entries) => entries
                .iter()
                .map(|e| e.key.len() + e.object.approx_size())
                .sum(),
            _ => 0,
        }
    }
}

/// The anti-entropy exchange, asked by the initiator of one partition's
/// exchange; each is answered with the matching [`AaeResponse`].
///
/// 1. `Branches`: the responder's branch hashes; equal roots end here.
/// 2. `Leaves` of the differing branches.
/// 3. `Keys` (with version digests) of the differing segments.
/// 4. `Objects` for the keys whose digests differ; the initiator merges them
///    into its copies and sends the responder what it lacks as a `Handoff`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AaeRequest {
    Branches {
        partition: u32,
    },
    Leaves {
        partition: u32,
        branches: Vec<u16>,
    },
    Keys {
        partition: u32,
        segments: Vec<u16>,
    },
    /// `history`: each copy comes merged with the history of the key's
    /// tombstone if the key was reaped here lately (its clock, no
    /// siblings; the history alone when nothing is stored). A restore asks
    /// so ([`crate::replica::Replica::restore_copy`]); older nodes ignore
    /// the field and answer as for the exchange.
    Objects {
        keys: Vec<serde_bytes::ByteBuf>,
        #[serde(default)]
        history: bool,
    },
}

/// Answers to [`AaeRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AaeResponse {
    Branches(Vec<u64>),
    /// Per requested branch, its leaves.
    Leaves(Vec<Vec<u64>>),
    Keys(Vec<(serde_bytes::ByteBuf, u64)>),
    Objects(Vec<(serde_bytes::ByteBuf, Option<Object>)>),
}

/// Soft cap on the payload of one batch message (handoff, anti-entropy), far
/// under the peer frame limit: a batch stops growing once it reaches this.
pub const BATCH_BYTES: usize = 8 << 20;

/// The time a transfer of `bytes` may take on top of a call's own timeout:
/// one second per 4 MiB (a link of about 32 Mbit/s), so that bulk calls
/// (handoff batches, anti-entropy objects) finish on slow links too.
pub fn transfer_time(bytes: usize) -> std::time::Duration {
    // 4 MiB in 1,000 ms: a millisecond per 4,194 bytes.
    std::time::Duration::from_millis(bytes as u64 / 4_194)
}

/// How many of `items`, from the front, fit in [`BATCH_BYTES`] (always at
/// least one, so a single large item still moves).
pub fn byte_bounded<T>(items: &[T], size: impl Fn(&T) -> usize) -> usize {
    let mut total = 0;
    for (i, item) in items.iter().enumerate() {
        total += size(item);
        if total > BATCH_BYTES {
            return i.max(1);
        }
    }
    items.len()
}

/// One hint on its way to its primary (or an object anti-entropy sends).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandoffEntry {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub object: Object,
    /// The hint was lost to corruption: `object` is only what was hinted
    /// since, and the receiver's copy may miss a write it carried, so the
    /// receiver marks its copy lost and restores it from every other
    /// primary (see [`crate::replica::hints`]). Absent on the wire: false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lost: bool,
}

/// A node's answer to a [`PeerRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PeerResponse {
    Hello(MemberInfo),
    Pong,
    Object(Option<Object>),
    Stored,
    Forwarded(Response),
    /// Hints held for a key, by the primary they are for.
    Hints(Vec<(NodeId, Object)>),
    Aae(AaeResponse),
    /// The receiver's cluster state, unless the digests matched.
    Gossip(Option<Box<ClusterState>>),
    /// Hints for the partitions asked, and where the scan goes on from
    /// (empty: it reached the end).
    HintsIn {
        entries: Vec<HandoffEntry>,
        #[serde(with = "serde_bytes")]
        next: Vec<u8>,
    },
    /// The answers to a [`PeerRequest::Spares`], in its order.
    Spares(Vec<BatchedAnswer>),
    /// The answers to a [`PeerRequest::Batch`], in its order (never
    /// [`BatchedAnswer::Alone`]).
    Batch(Vec<BatchedAnswer>),
    Error(PeerError),
}

impl PeerResponse {
    /// About how many bytes of objects, values or keys the answer carries
    /// (what makes encoding it heavy).
    pub fn bytes(&self) -> usize {
        let objects = |objects: &mut dyn Iterator<Item = &Object>| {
            objects.map(Object::approx_size).sum::<usize>()
        };
        match self {
            PeerResponse::Object(Some(o)) => o.approx_size(),
            PeerResponse::Hints(hints) => objects(&mut hints.iter().map(|(_, o)| o)),
            PeerResponse::Spares(answers) | PeerResponse::Batch(answers) => {
                objects(&mut answers.iter().filter_map(|a| match a {
                    BatchedAnswer::Object(o) => o.as_ref(),
                    _ => None,
                }))
            }
            PeerResponse::Forwarded(answer) => answer.value_bytes(),
            PeerResponse::HintsIn { entries, .. } => {
                objects(&mut entries.iter().map(|e| &e.object))
            }
            PeerResponse::Aae(AaeResponse::Objects(found)) => {
                objects(&mut found.iter().filter_map(|(_, o)| o.as_ref()))
            }
            PeerResponse::Aae(AaeResponse::Keys(keys)) => {
                keys.iter().map(|(k, _)| k.len() + 16).sum()
            }
            _ => 0,
        }
    }
}

/// Why a node refused or failed a peer request, as the sender reads it.
/// Strings inside are for people (hex keys, store error texts); the variant
/// is what code matches on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum PeerError {
    /// The frame or stream could not be read (too large, bad checksum, ...).
    #[error("{0}")]
    Refused(String),
    /// The sender's certificate was not issued for the name it claims.
    #[error("peer name {claimed:?} refused: {detail}")]
    NameNotInCertificate { claimed: String, detail: String },
    /// A `Hello` whose member info names another node than the sender.
    #[error("{sender} said hello as {claimed}")]
    HelloAsOther { sender: String, claimed: String },
    /// A request the receiver does not answer as a replica.
    #[error("not a replica request: {0}")]
    NotAReplicaRequest(String),
    /// The receiver's replica could not do `op` on `key` (hex).
    #[error("{op} of key {key} failed: {detail}")]
    Replica {
        op: String,
        key: String,
        detail: String,
    },
    /// `ReplicaGet`: the receiver's copy of `key` (hex) failed its checksum
    /// and is not restored yet: the coordinator does not count this answer
    /// and read-repairs the replica. `HintGet`: the receiver's hint for the
    /// key was lost: nothing is counted for its primary.
    #[error("corrupt copy of key {key}: {detail}")]
    Corrupt { key: String, detail: String },
    /// `Reap`: the receiver's copy of `key` (hex) is not exactly the
    /// tombstone asked for, or not past the grace period by its clock.
    #[error("tombstone of key {key} not reaped here")]
    NotReaped { key: String },
    /// `Forward`: this sender's request `id` was already received; it ran
    /// (or runs) once, and its first delivery answers.
    #[error("forward {id} from {from} was already received")]
    DuplicateForward { from: String, id: u64 },
    /// Anti-entropy: the receiver has not finished its first tree build.
    #[error("anti-entropy trees are not built yet")]
    TreesNotReady,
    /// Anti-entropy: a `Leaves` request named a branch that does not exist.
    #[error("no branch {branch}: a tree has {branches}")]
    NoBranch { branch: u16, branches: usize },
}

/// A peer request with the name its sender claims; the receiver checks the
/// claim against the sender's TLS certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerEnvelope {
    pub from: String,
    pub request: PeerRequest,
}

/// Why a peer call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("{0} is unreachable: {1}")]
    Unreachable(String, String),
    #[error("call to {0} failed: {1}")]
    Failed(String, String),
}

/// Sends peer requests. The coordinator only ever talks to other nodes
/// through this, so the same logic runs over QUIC and over [`sim`].
pub trait Transport: Send + Sync + 'static {
    /// The peer just reached us, so it is up: forget any failed dial to it.
    fn heard_from(&self, _peer: &MemberInfo) {}

    /// Peer addresses this transport will not dial right now.
    fn unreachable(&self) -> Vec<std::net::SocketAddr> {
        Vec::new()
    }

    /// Sends `request` to `to` and waits for the answer, however long that
    /// takes. Callers use [`Transport::call`], which bounds the wait.
    fn send(
        &self,
        to: &MemberInfo,
        request: PeerRequest,
    ) -> impl Future<Output = Result<PeerResponse, TransportError>> + Send;

    /// Sends `request` to `to` and waits for the answer until `deadline`;
    /// past it the call fails as [`TransportError::Failed`] (the request may
    /// have run there). Every peer call has a deadline: a peer that accepts
    /// and never answers costs its caller this long, not forever. A call
    /// made after its deadline is not sent at all ([`TransportError::Unreachable`]).
    fn call(
        &self,
        to: &MemberInfo,
        request: PeerRequest,
        deadline: Instant,
    ) -> impl Future<Output = Result<PeerResponse, TransportError>> + Send {
        async move {
            if Instant::now() >= deadline {
                return Err(TransportError::Unreachable(
                    to.name.clone(),
                    "not sent: the deadline had passed".into(),
                ));
            }
            match tokio::time::timeout_at(deadline, self.send(to, request)).await {
                Ok(answer) => answer,
                Err(_) => Err(TransportError::Failed(
                    to.name.clone(),
                    "no answer before the deadline".into(),
                )),
            }
        }
    }
}

/// What a node does with requests; the servers and the simulated network call
/// into it.
pub trait Handler: Send + Sync + 'static {
    fn client(&self, request: Request) -> impl Future<Output = Response> + Send;
    fn peer(&self, from: String, request: PeerRequest)
        -> impl Future<Output = PeerResponse> + Send;
}

#[cfg(test)]
mod tests;
