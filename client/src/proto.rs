//! The client wire protocol: one [`Request`] frame and one [`Response`] frame on
//! each bidirectional stream. Field names travel with the values (MessagePack
//! maps), so a field added later is ignored by an older peer rather than
//! misread.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use shoal_ring::{NodeId, Ring};

use crate::error::WireError;

/// ALPN protocol name of the client port.
pub const CLIENT_ALPN: &[u8] = b"shoal-client/1";

/// What a client certificate lets its holder do on the client port. The
/// role is a DNS name in the certificate's subject alternative names
/// (`read-write.role.shoal`, see [`Role::san`]), put there by
/// `shoal certs client --role`; a certificate from the cluster CA without
/// one is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// Reads, `inspect`, `status`, the ring.
    ReadOnly,
    /// Everything a read-only client does, and puts and deletes.
    ReadWrite,
    /// Everything, and the cluster and membership commands.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::ReadOnly, Role::ReadWrite, Role::Admin];

    /// The name used on the command line and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Role::ReadOnly => "read-only",
            Role::ReadWrite => "read-write",
            Role::Admin => "admin",
        }
    }

    /// The subject alternative name that grants this role.
    pub fn san(self) -> String {
        format!("{}.role.shoal", self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| format!("unknown role {s:?}: read-only, read-write or admin"))
    }
}

/// Per-request quorum and timeout overrides; `None` means the node's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestOptions {
    /// Replicas that must answer a read.
    pub r: Option<u32>,
    /// Replicas that must acknowledge a write.
    pub w: Option<u32>,
    /// Of the R answers, how many must come from primary replicas.
    pub pr: Option<u32>,
    /// Of the W acknowledgements, how many must come from primary replicas.
    pub pw: Option<u32>,
    /// Time budget of the request on the coordinating node, in milliseconds.
    pub timeout_ms: Option<u32>,
}

/// The opaque causal context returned by a read and passed back with a write:
/// the write then supersedes exactly the versions the read saw.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CausalContext(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl CausalContext {
    /// Text form for command lines and JSON: lowercase hex.
    pub fn to_text(&self) -> String {
        hex::encode(&self.0)
    }
    pub fn from_text(s: &str) -> Result<Self, crate::Error> {
        hex::decode(s.trim())
            .map(CausalContext)
            .map_err(|e| crate::Error::BadRequest(format!("causal context is not hex: {e}")))
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for CausalContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CausalContext({})", self.to_text())
    }
}

/// A request to any node's client port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    Get {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        options: RequestOptions,
    },
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        context: Option<CausalContext>,
        options: RequestOptions,
    },
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        context: Option<CausalContext>,
        options: RequestOptions,
    },
    /// The ring and its members, for routing.
    Ring,
    /// This node's own view of itself and the cluster.
    Status,
    /// What every replica of a key stores, clocks included.
    Inspect {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// A membership command (admin role): stage, plan, commit, clear.
    Cluster(ClusterCommand),
}

/// Membership commands (`shoal cluster ...`, `shoal leave`, `shoal remove`,
/// `shoal replace`). Changes are staged, shown as a plan, then committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterCommand {
    /// The staged changes and what committing them would do.
    Plan,
    /// Commit the plan shown for `version` (a plan that changed since is
    /// refused): with `plan`, the plan of that id ([`PlanView::id`]), so a
    /// plan for the same version whose changes or ring differ is refused
    /// too.
    Commit {
        version: u64,
        #[serde(default)]
        plan: Option<u64>,
    },
    /// Drop every staged change.
    Clear,
    /// Stage: the named member hands its partitions to the others, then stops.
    Leave { node: String },
    /// Stage: the named member is gone for good; its partitions are rebuilt
    /// from the surviving replicas.
    Remove { node: String },
    /// Stage: `new` (which has announced itself) takes `old`'s place.
    Replace { old: String, new: String },
}

/// The answer to a [`ClusterCommand`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterReply {
    /// The current layout version (0: the static ring of the config).
    pub version: u64,
    /// Staged changes: (member name, change).
    pub staged: Vec<(String, String)>,
    /// What committing would do (or, after a commit, what it does).
    pub plan: Option<PlanView>,
    /// Why there is no plan, or what was done.
    pub message: String,
}

/// A plan as operators read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanView {
    /// The layout version committing would create.
    pub version: u64,
    /// Partitions whose replicas change, and the replicas moved (a replica
    /// is one partition on one node).
    pub partitions_moving: u32,
    pub replicas_moving: u32,
    /// Per member: partitions owned and replicas held, before and after.
    pub members: Vec<PlanMember>,
    /// Up to the first 64 partitions that move: (partition, from, to).
    pub transfers: Vec<(u32, Vec<String>, Vec<String>)>,
    /// About how many bytes the new replicas will pull: the replicas moving
    /// times the average replica size on the node that made the plan
    /// (`None` when that node holds no replica to tell from).
    #[serde(default)]
    pub expected_bytes: Option<u64>,
    /// Names this plan (its version, changes and ring) to `Commit`; 0
    /// from a node that does not name plans.
    #[serde(default)]
    pub id: u64,
}

/// One member's share before and after a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanMember {
    pub name: String,
    pub zone: Option<String>,
    pub partitions_before: u32,
    pub partitions_after: u32,
    pub replicas_before: u32,
    pub replicas_after: u32,
}

impl Request {
    /// Whether sending this request twice has the same effect as once. Writes
    /// are not: a retried put that had already landed would add a sibling.
    pub fn is_idempotent(&self) -> bool {
        !matches!(
            self,
            Request::Put { .. }
                | Request::Delete { .. }
                | Request::Cluster(ClusterCommand::Commit { .. })
        )
    }

    /// The least role that may make this request.
    pub fn needs(&self) -> Role {
        match self {
            Request::Put { .. } | Request::Delete { .. } => Role::ReadWrite,
            Request::Get { .. } | Request::Inspect { .. } | Request::Ring | Request::Status => {
                Role::ReadOnly
            }
            Request::Cluster(_) => Role::Admin,
        }
    }

    /// What the request is, for messages.
    pub fn verb(&self) -> &'static str {
        match self {
            Request::Get { .. } => "get",
            Request::Put { .. } => "put",
            Request::Delete { .. } => "delete",
            Request::Inspect { .. } => "inspect",
            Request::Ring => "ring",
            Request::Status => "status",
            Request::Cluster(_) => "cluster",
        }
    }

    /// The key a data request is about.
    pub fn key(&self) -> Option<&[u8]> {
        match self {
            Request::Get { key, .. }
            | Request::Put { key, .. }
            | Request::Delete { key, .. }
            | Request::Inspect { key } => Some(key),
            Request::Ring | Request::Status | Request::Cluster(_) => None,
        }
    }
}

/// A value read back: every concurrent sibling, and the context covering them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetReply {
    /// Live siblings; empty when the key is absent or deleted.
    pub values: Vec<Value>,
    pub context: CausalContext,
}

/// One sibling's bytes.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Value(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

/// The outcome of a put or delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutReply {
    /// Context of the object after this write on the coordinator.
    pub context: CausalContext,
    /// Live siblings on the coordinator after this write: more than one means a
    /// concurrent writer's value is still there to be resolved.
    pub siblings: u32,
}

/// A member of the cluster as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: NodeId,
    pub name: String,
    pub client_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    /// The failure domain (rack, room, availability zone) the node is in:
    /// preference lists spread over distinct zones. Absent: no zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

/// The ring as clients need it for routing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingInfo {
    pub ring: Ring,
    pub members: Vec<MemberInfo>,
    /// Replication factor N.
    pub n: u32,
    /// Members the answering node's failure detector sees down: a client
    /// tries them last, so a fresh process (a CLI command) does not wait on
    /// a node the cluster already knows is gone.
    #[serde(default)]
    pub down: Vec<NodeId>,
    /// The layout version of the ring (0: the static ring of the config).
    #[serde(default)]
    pub version: u64,
}

/// A node's report on itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: NodeId,
    pub name: String,
    pub client_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    pub pid: u32,
    /// Whether the node knows every member and so the whole ring.
    pub ring_ready: bool,
    pub partitions_owned: u32,
    /// Members this node has not identified yet (only while starting).
    pub waiting_for: Vec<String>,
    /// Members this node cannot reach right now (a recent dial failed).
    #[serde(default)]
    pub unreachable: Vec<String>,
    /// This node's failure-detector view of every other member.
    #[serde(default)]
    pub peers: Vec<PeerView>,
    /// Where this node serves Prometheus metrics, if it does.
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
    /// Hints this node holds, per node they wait for (none listed: none held).
    #[serde(default)]
    pub hints_pending: Vec<HintQueue>,
    /// Hints this node handed off since it started.
    #[serde(default)]
    pub hints_delivered: u64,
    /// Anti-entropy on this node.
    #[serde(default)]
    pub anti_entropy: AaeStatus,
    /// The layout version of the node's ring (0: the config's static ring).
    #[serde(default)]
    pub ring_version: u64,
    /// The node's zone, when it has one.
    #[serde(default)]
    pub zone: Option<String>,
    /// Layout versions still in transition (older layouts kept until every
    /// member of the new one has synced), and the members not synced yet.
    #[serde(default)]
    pub transition: Option<Transition>,
    /// This node's part of the transition: partitions it pulls.
    #[serde(default)]
    pub transfer: Option<TransferStatus>,
    /// Copies this node holds of keys in partitions it no longer replicates
    /// (dropped once a change is over), counted up to a million.
    #[serde(default)]
    pub keys_unowned: u64,
}

/// A node pulling the partitions a new layout gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferStatus {
    /// The layout version being synced.
    pub version: u64,
    pub partitions_total: u32,
    pub partitions_done: u32,
    /// Keys repaired and bytes exchanged so far.
    pub keys: u64,
    pub bytes: u64,
    /// Estimated seconds left, from the pace so far.
    pub eta_secs: Option<u64>,
}

/// A layout change in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub from_version: u64,
    pub to_version: u64,
    /// Members of the new layout that have not synced their new partitions.
    pub unsynced: Vec<String>,
}

/// Anti-entropy work of one node since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AaeStatus {
    /// The trees are built and the node takes part in exchanges.
    pub trees_ready: bool,
    pub exchanges: u64,
    pub keys_repaired: u64,
    /// Bytes sent and received by the exchanges it initiated.
    pub bytes: u64,
    /// The last exchange of each partition it initiated.
    pub partitions: Vec<PartitionSync>,
}

/// The last exchange of one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionSync {
    pub partition: u32,
    pub peer: String,
    /// When it ended, ms since the Unix epoch.
    pub at_ms: u64,
    pub repaired: u64,
}

/// Hints a node holds for one other node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintQueue {
    pub for_node: String,
    pub pending: u64,
}

/// A hint for a key, held by a fallback (or a coordinator) for a primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintReport {
    pub holder: String,
    pub for_node: String,
    pub object: ObjectView,
}

/// How one node sees another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerView {
    pub name: String,
    pub up: bool,
    /// Failure-detector suspicion; the peer is down at or above the threshold.
    pub phi: f64,
}

/// What one replica stores for a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaReport {
    pub node: String,
    pub id: NodeId,
    /// `None` when the replica did not answer (see `error`) or has no record.
    pub object: Option<ObjectView>,
    pub error: Option<String>,
}

/// A stored object in readable form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectView {
    /// The causal history: (node name, counter) pairs.
    pub clock: Vec<(String, u64)>,
    pub siblings: Vec<SiblingView>,
}

/// One stored version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiblingView {
    /// The event that wrote it: (node name, counter).
    pub dot: (String, u64),
    /// `None` for a tombstone.
    pub value: Option<Value>,
    /// Wall clock of the coordinator when written, ms since the Unix epoch.
    pub timestamp_ms: u64,
}

/// The answer to [`Request::Inspect`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InspectReport {
    pub partition: u32,
    pub replicas: Vec<ReplicaReport>,
    /// Hints for the key waiting on any node for a primary to return.
    #[serde(default)]
    pub hints: Vec<HintReport>,
}

/// A node's answer on the client port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Value(GetReply),
    Written(PutReply),
    Ring(RingInfo),
    /// Boxed (the same on the wire): a status is large and rare, and every
    /// response, a node's and the SDK's, would otherwise take its size.
    Status(Box<NodeStatus>),
    Cluster(ClusterReply),
    Inspect(InspectReport),
    Error(WireError),
}

impl Response {
    /// How many bytes of values it carries (what makes encoding and
    /// decoding it heavy).
    pub fn value_bytes(&self) -> usize {
        match self {
            Response::Value(reply) => reply.values.iter().map(|v| v.0.len()).sum(),
            _ => 0,
        }
    }
}
