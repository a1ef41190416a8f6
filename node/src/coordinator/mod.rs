//! The coordinator: get, put and delete over a key's sloppy quorum, with
//! per-request options and timeouts, read repair, and forwarding when the
//! receiving node does not replicate the key. Generic over [`Transport`] and
//! [`Store`], so the same code runs over QUIC with RocksDB and over the
//! simulated network with the in-memory store.
//!
//! This module is also the node's front door, with no logic of its own beyond
//! routing and hello/learn: [`Node`] owns one of each component (the
//! [`Replica`], the [`Coordinator`], the liveness [`Detector`], [`Handoff`],
//! [`AntiEntropy`], the [`Reaper`]), hands each the narrow handles it needs,
//! routes client and peer requests to them (the [`Handler`] impl), and
//! delegates the methods tests, the server and the simulation call.
//!
//! - [`quorum`]: the [`Coordinator`]: routing, forwarding, put, get.
//! - `fanout`: sloppy fan-out to primaries or fallbacks; `tally`: who answered.
//! - `read_repair`: the background repair after a read.
//! - `spare`: the sends a quorum need not wait for, batched per peer;
//!   `speculative`: a read's spares held until its quorum is slow.
//! - `inspect`: `shoal inspect`; `status`: `shoal status`; [`settings`].
//!
//! # Sloppy quorum
//! Each of a key's N primaries is reached, if the failure detector sees it up,
//! directly. If it is down, or the send to it fails, the request goes to the
//! next live *fallback* (nodes walking the ring past the primaries, each taken
//! by at most one down primary), which answers from, or writes to, its hints
//! for that primary (see [`crate::handoff`]). W and R count every replica that
//! answered, fallbacks included; PW and PR count primaries only. A request
//! whose PW or PR exceeds the primaries that are up fails at once, before
//! anything is written, and a request whose primaries fail during it fails with
//! the quorum error naming who answered.
//!
//! # Write path
//! The coordinator is always a primary replica of the key (a node that is not
//! forwards the request to one, as Riak does): it applies the write to its own
//! copy, minting the new dot under its own node id, then sends the resulting
//! object to the other primaries (or their fallbacks), which merge it. The
//! write is acknowledged once W replicas (PW of them primaries) hold it; the
//! remaining sends carry on in the background. The W-1 primaries after the
//! coordinator in ring order are sent to at once; the quorum need not wait for
//! the others, whose sends are batched per peer (see `spare`). A primary that
//! neither it nor a fallback could reach gets a hint kept by the coordinator
//! itself. If the quorum is not met the error says how many and which replicas
//! acknowledged; the copies that did land are not rolled back (as in Dynamo:
//! an unacknowledged write may still appear later).
//!
//! # Read path and read repair
//! The coordinator asks the whole sloppy list (itself and the R-1 after it at
//! once, the others as spares: see `spare` and `speculative`), answers with the
//! merge of the first R answers (PR of them primaries), then collects answers
//! for `timeouts.read-repair-ms` more and sends the merge of all to every
//! primary whose answer was older or missing, never delaying the reply.

mod cluster;
mod fanout;
mod forwards;
mod inspect;
pub mod quorum;
mod read_repair;
pub mod settings;
mod spare;
mod speculative;
mod status;
mod tally;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use shoal_client::proto::{AaeStatus, HintQueue, MemberInfo, PeerView, Request, Response};
use shoal_ring::NodeId;
use tokio::sync::watch;
use tracing::{error, warn};

pub use forwards::ForwardIds;
use forwards::ForwardsSeen;
pub use quorum::Coordinator;
pub use settings::Settings;

use crate::antientropy::{AntiEntropy, ExchangeError, ExchangeReport, PartitionTree, Trees};
use crate::handoff::Handoff;
use crate::liveness::{Detector, Liveness};
use crate::membership::{Membership, MEMBERS_KEY};
use crate::metrics::Metrics;
use crate::net::{Handler, PeerError, PeerRequest, PeerResponse, Transport};
use crate::reaper::Reaper;
use crate::replica::{Replica, ReplicaError};
use crate::storage::{Store, StoreError, Tree};
use crate::transfer::Transfer;
use crate::version::Object;

/// A Shoal node: its components, wired. Cheap to clone.
pub struct Node<T, S> {
    inner: Arc<Parts<T, S>>,
}

impl<T, S> Clone for Node<T, S> {
    fn clone(&self) -> Self {
        Node {
            inner: self.inner.clone(),
        }
    }
}

/// What a node is made of. Each component owns its state; the handles in
/// here are shared with them, never the whole node.
struct Parts<T, S> {
    me: MemberInfo,
    settings: Settings,
    store: Arc<S>,
    transport: Arc<T>,
    membership: Arc<Membership>,
    metrics: Arc<Metrics>,
    /// Where `/metrics` is served, once bound.
    metrics_addr: OnceLock<SocketAddr>,
    replica: Arc<Replica<S>>,
    detector: Arc<Detector>,
    coordinator: Arc<Coordinator<T, S>>,
    handoff: Handoff<T, S>,
    aae: AntiEntropy<T, S>,
    reaper: Reaper<T, S>,
    /// Forwards received lately (see [`ForwardsSeen`]).
    forwards_seen: ForwardsSeen,
    /// Picks gossip partners, seeded from the node id (replayable).
    partners: crate::gossip::Partners,
    transfer: Transfer<T, S>,
    /// Turns true once this node is removed from the cluster (it left, or
    /// an operator removed it) and a peer has its state.
    departed: tokio::sync::watch::Sender<bool>,
}

impl<T: Transport, S: Store> Node<T, S> {
    /// A node over `store`, under new or (after a clean stop) the same
    /// actors ([`crate::version`]); fails only if the store cannot say so.
    pub fn new(
        me: MemberInfo,
        settings: Settings,
        store: Arc<S>,
        transport: T,
        membership: Membership,
    ) -> Result<Self, StoreError> {
        let metrics = Arc::new(Metrics::default());
        let membership = Arc::new(membership);
        let transport = Arc::new(transport);
        let replica = Arc::new(Replica::new(
            me.id,
            store.clone(),
            settings.replica(),
            membership.clone(),
            metrics.clone(),
        )?);
        let detector = Arc::new(Detector::new(me.id, settings.detector, metrics.clone()));
        let liveness: Arc<dyn Liveness> = detector.clone();
        let n = settings.n as usize;
        let coordinator = Arc::new(Coordinator {
            me: me.clone(),
            settings: settings.clone(),
            replica: replica.clone(),
            transport: transport.clone(),
            liveness: liveness.clone(),
            membership: membership.clone(),
            metrics: metrics.clone(),
            tasks: crate::tasks::Tasks::counted_in(metrics.request_tasks.clone()),
            forward_ids: ForwardIds::starting_at(settings.clock.now_ms()),
            spares: Default::default(),
        });
        let handoff = Handoff {
            me: me.id,
            n,
            settings: settings.handoff,
            replica: replica.clone(),
            transport: transport.clone(),
            liveness: liveness.clone(),
            membership: membership.clone(),
            metrics: metrics.clone(),
        };
        let aae = AntiEntropy {
            me: me.id,
            settings: settings.aae,
            n,
            replica: replica.clone(),
            transport: transport.clone(),
            liveness: liveness.clone(),
            membership: membership.clone(),
            metrics: metrics.clone(),
            last: Default::default(),
            sweeping: std::sync::atomic::AtomicU32::new(1),
        };
        let reaper = Reaper {
            me: me.id,
            n,
            grace: settings.aae.tombstone_grace,
            keys_per_sec: settings.aae.reap_keys_per_sec,
            call_timeout: settings.aae.call_timeout,
            replica: replica.clone(),
            transport: transport.clone(),
            liveness: liveness.clone(),
            membership: membership.clone(),
            metrics: metrics.clone(),
            unfinished: Default::default(),
        };
        let transfer = Transfer::new(
            me.clone(),
            n,
            settings.w as usize,
            replica.clone(),
            transport.clone(),
            liveness.clone(),
            membership.clone(),
            metrics.clone(),
            settings.request_timeout,
            settings.aae.rebuild_keys_per_sec,
            settings.cleanup_linger,
        );
        let partners = crate::gossip::Partners::seeded(u64::from_be_bytes(
            me.id.0[..8].try_into().expect("8 bytes"),
        ));
        Ok(Node {
            inner: Arc::new(Parts {
                me,
                settings,
                store,
                transport,
                membership,
                metrics,
                metrics_addr: OnceLock::new(),
                replica,
                detector,
                coordinator,
                handoff,
                aae,
                reaper,
                forwards_seen: ForwardsSeen::default(),
                partners,
                transfer,
                departed: tokio::sync::watch::Sender::new(false),
            }),
        })
    }

    pub fn me(&self) -> &MemberInfo {
        &self.inner.me
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// Turns true once this node is no longer a member (it left, or was
    /// removed) and a peer has heard so: `Running::until_stopped` then returns.
    pub fn departed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.departed.subscribe()
    }

    pub fn membership(&self) -> &Membership {
        &self.inner.membership
    }

    pub fn store(&self) -> &Arc<S> {
        &self.inner.store
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The node's client requests and per-request tasks (see [`crate::tasks`]):
    /// a crash aborts them, a graceful stop drains them first. The background
    /// loops are stopped by their own handles ([`crate::server::start_background`]).
    pub fn tasks(&self) -> &crate::tasks::Tasks {
        &self.inner.coordinator.tasks
    }

    /// This node's replica, for components and tests that want the handle.
    pub fn replica(&self) -> &Arc<Replica<S>> {
        &self.inner.replica
    }

    /// Records where `/metrics` is served, for `shoal status`.
    pub fn set_metrics_addr(&self, addr: SocketAddr) {
        let _ = self.inner.metrics_addr.set(addr);
    }

    /// Records a member and persists what is known, so a restart does not
    /// need the others to be up to know the ring.
    pub fn learn(&self, info: MemberInfo) {
        if self.inner.membership.learn(info) {
            let known = self.inner.membership.learned();
            let bytes = crate::membership::encode_known(&known);
            if let Err(e) = self.inner.store.put(Tree::Meta, MEMBERS_KEY, &bytes) {
                error!(error = %e, "could not persist the member list");
            }
        }
    }

    /// Says hello to every configured member not identified yet, or to all of
    /// them when `everyone` (on start, so peers notice a restarted node).
    pub async fn say_hello(&self, everyone: bool) {
        let missing = self.inner.membership.missing_names();
        // All at once, each bounded: a silent member delays nobody else.
        let deadline = tokio::time::Instant::now() + self.inner.settings.request_timeout;
        let targets = self
            .inner
            .membership
            .expected()
            .into_iter()
            .filter(|m| everyone || missing.contains(&m.name));
        let hellos = targets.map(|target| async move {
            if target.name == self.inner.me.name {
                self.learn(self.inner.me.clone());
                return;
            }
            let hello = PeerRequest::Hello(self.inner.me.clone());
            match self.inner.transport.call(&target, hello, deadline).await {
                Ok(PeerResponse::Hello(info)) if info.name == target.name => self.learn(info),
                Ok(other) => {
                    warn!(peer = %target.name, answer = ?other, "unexpected answer to hello")
                }
                Err(e) => {
                    tracing::debug!(peer = %target.name, error = %e, "member not reachable yet")
                }
            }
        });
        futures_util::future::join_all(hellos).await;
    }

    // ---- client requests ---------------------------------------------------

    /// Handles a client request; `forwarded` requests are coordinated here even
    /// if this node's ring disagrees that it is a replica (no forwarding loops).
    pub async fn coordinate(&self, request: Request, forwarded: bool) -> Response {
        match request {
            Request::Status => Response::Status(Box::new(self.status())),
            // A node removed from the cluster (it left, or an operator
            // removed it) serves nothing: its copies may be gone, and
            // nothing waits for the requests it would route.
            _ if self.inner.membership.removed(&self.inner.me.id) => {
                Response::Error(shoal_client::error::WireError::new(
                    shoal_client::error::ErrorKind::NotReady,
                    format!(
                        "{} is no longer a member of the cluster (it left or was removed); it is stopping",
                        self.inner.me.name
                    ),
                ))
            }
            // Boxed: rare, and large (each request's future is as large
            // as its largest way, and is moved into its task).
            Request::Cluster(command) => Box::pin(self.cluster_command(command, forwarded)).await,
            other => self.inner.coordinator.coordinate(other, forwarded).await,
        }
    }

    // ---- liveness ----------------------------------------------------------

    /// Pings every identified member once, then re-evaluates the detector.
    pub async fn heartbeat_round(&self) {
        let peers = self.inner.membership.known();
        self.inner
            .detector
            .heartbeat_round(&self.inner.transport, peers)
            .await
    }

    /// Whether the failure detector considers `peer` up (this node always is).
    pub fn is_up(&self, peer: NodeId) -> bool {
        self.inner.detector.is_up(peer)
    }

    /// The detector's view of every other identified member, for status.
    pub fn peer_views(&self) -> Vec<PeerView> {
        self.inner
            .detector
            .peer_views(self.inner.membership.known())
    }

    // ---- hinted handoff ----------------------------------------------------

    /// Per-request tasks still running (see [`crate::tasks`]).
    pub fn tasks_running(&self) -> usize {
        self.inner.coordinator.tasks.running()
    }

    /// One delivery round (see [`Handoff::round`]).
    pub async fn handoff_round(&self) -> u64 {
        self.inner.handoff.round().await
    }

    /// Hints held, per node they wait for (for `shoal status`).
    pub fn hint_queues(&self) -> Vec<HintQueue> {
        let view = self.inner.membership.view();
        self.inner
            .replica
            .hint_counts()
            .iter()
            .map(|(id, n)| HintQueue {
                for_node: view.as_ref().map_or_else(|| id.to_hex(), |v| v.name_of(id)),
                pending: *n,
            })
            .collect()
    }

    /// Every hint held for `key`, by the primary it waits for.
    pub fn hints_of(&self, key: &[u8]) -> Result<Vec<(NodeId, Object)>, ReplicaError> {
        self.inner.replica.hints_of(key)
    }

    /// The hint held for `primary` and `key`, if any.
    pub fn hint(&self, primary: NodeId, key: &[u8]) -> Result<Option<Object>, ReplicaError> {
        self.inner.replica.hint(primary, key)
    }

    /// Keeps `object` as a hint for `primary`, merged with any already held.
    pub fn store_hint(
        &self,
        primary: NodeId,
        key: &[u8],
        object: &Object,
    ) -> Result<(), StoreError> {
        self.inner.replica.store_hint(primary, key, object)
    }

    /// Counts the hints in the store (on start).
    pub fn load_hint_counts(&self) -> Result<u64, StoreError> {
        self.inner.replica.load_hint_counts()
    }

    // ---- anti-entropy and reaping ------------------------------------------

    /// One sweep of exchanges (see [`AntiEntropy::sweep`]).
    pub async fn aae_sweep(&self) -> ExchangeReport {
        self.inner.aae.sweep().await
    }

    /// Compares this node's tree of `partition` with `peer`'s and repairs
    /// both sides by merge.
    pub async fn exchange(
        &self,
        partition: u32,
        peer: &MemberInfo,
    ) -> Result<ExchangeReport, ExchangeError> {
        self.inner.aae.exchange(partition, peer).await
    }

    /// Anti-entropy as `shoal status` shows it.
    pub fn aae_status(&self) -> AaeStatus {
        self.inner.aae.status()
    }

    /// One reaping pass (see [`Reaper::reap_tombstones`]).
    pub async fn reap_tombstones(&self) -> u64 {
        self.inner.reaper.reap_tombstones().await
    }

    /// The tombstone reaper (tests).
    pub fn reaper(&self) -> &Reaper<T, S> {
        &self.inner.reaper
    }

    /// Rebuilds every tree from the stored objects (see
    /// [`Replica::rebuild_trees`]).
    pub async fn rebuild_trees(&self, keys_per_sec: u32) -> Result<u64, StoreError> {
        self.inner.replica.rebuild_trees(keys_per_sec).await
    }

    /// A copy of the live tree of `partition`, once the first rebuild is done.
    pub fn tree(&self, partition: u32) -> Option<PartitionTree> {
        self.inner.replica.tree(partition)
    }

    /// A copy of every live tree (tests compare them with a rebuild).
    pub fn trees(&self) -> Trees {
        self.inner.replica.trees()
    }

    /// The partition of a key on this node's ring.
    pub fn partition_of(&self, key: &[u8]) -> u32 {
        self.inner.replica.partition_of(key)
    }

    /// Anti-entropy's loop, with the reaper (see [`AntiEntropy::run`]).
    pub async fn run_anti_entropy(&self, stop: watch::Receiver<bool>) {
        self.inner.aae.run(&self.inner.reaper, stop).await
    }

    // ---- the local replica -------------------------------------------------

    /// This replica's stored object for `key`.
    pub fn local_get(&self, key: &[u8]) -> Result<Option<Object>, StoreError> {
        self.inner.replica.get(key)
    }

    /// This replica's copy of `key` as a read's answer: a copy lost to
    /// corruption and not restored yet is [`crate::replica::ReplicaError::Lost`].
    pub fn local_read(&self, key: &[u8]) -> Result<Option<Object>, ReplicaError> {
        self.inner.replica.read(key)
    }

    /// Merges an object into the local copy.
    pub fn local_merge(&self, key: &[u8], incoming: &Object) -> Result<Object, StoreError> {
        self.inner.replica.merge(key, incoming)
    }

    /// Empties the object cache (after the store was changed behind the
    /// node's back).
    pub fn drop_cache(&self) {
        self.inner.replica.drop_cache()
    }

    /// A batch's answers ([`crate::replica::Replica::answer_batch`]); one
    /// of more than a bulk request's bytes is merged off the worker.
    async fn answer_batch(
        &self,
        requests: Vec<crate::net::Batched>,
        hand_back: bool,
    ) -> Result<Vec<crate::net::BatchedAnswer>, PeerError> {
        let replica = &self.inner.replica;
        let answers = if crate::net::is_bulk_batch(&requests) {
            crate::tasks::heavy(|| replica.answer_batch(requests, hand_back))
        } else {
            replica.answer_batch(requests, hand_back)
        };
        answers.settled().await
    }
}

impl<T: Transport, S: Store> Handler for Node<T, S> {
    async fn client(&self, request: Request) -> Response {
        self.coordinate(request, false).await
    }

    async fn peer(&self, from: String, request: PeerRequest) -> PeerResponse {
        if let Some(sender) = self.inner.membership.by_name(&from) {
            self.inner.transport.heard_from(&sender);
        }
        // Nothing is taken from or served to a removed node but gossip (so
        // it learns it was removed) and heartbeats.
        let gossip = matches!(
            request,
            PeerRequest::Gossip { .. } | PeerRequest::GossipPush(_) | PeerRequest::Ping
        );
        let membership = &self.inner.membership;
        if !gossip && (membership.removed(&self.inner.me.id) || membership.removed_name(&from)) {
            return PeerResponse::Error(PeerError::Refused(format!(
                "{from} -> {}: a removed node takes part in nothing",
                self.inner.me.name
            )));
        }
        if let Some(refused) = crate::reaper::refusal(membership, &request) {
            return refused;
        }
        match request {
            PeerRequest::Hello(info) => {
                if info.name != from {
                    return PeerResponse::Error(PeerError::HelloAsOther {
                        sender: from,
                        claimed: info.name,
                    });
                }
                self.learn(info);
                PeerResponse::Hello(self.inner.me.clone())
            }
            PeerRequest::Ping => PeerResponse::Pong,
            gossip @ (PeerRequest::Gossip { .. } | PeerRequest::GossipPush(_)) => {
                self.answer_gossip(gossip)
            }
            PeerRequest::Forward { id, request } => {
                if !self.inner.forwards_seen.first(&from, id) {
                    return PeerResponse::Error(PeerError::DuplicateForward { from, id });
                }
                // Boxed: a client request's future is large, and every peer
                // request's would be as large (and moved into its task).
                PeerResponse::Forwarded(Box::pin(self.coordinate(request, true)).await)
            }
            PeerRequest::Aae(request) => {
                crate::antientropy::answer_on_worker(&self.inner.replica, request)
                    .map_or_else(PeerResponse::Error, PeerResponse::Aae)
            }
            PeerRequest::Spares(requests) => self
                .answer_batch(requests, true)
                .await
                .map_or_else(PeerResponse::Error, PeerResponse::Spares),
            PeerRequest::Batch(requests) => self
                .answer_batch(requests, false)
                .await
                .map_or_else(PeerResponse::Error, PeerResponse::Batch),
            // Merging and storing a batch or a large object takes a while:
            // off the worker, which also drives the node's connections.
            replica if replica.is_bulk() => {
                crate::tasks::heavy(|| self.inner.replica.answer(self.inner.me.id, replica))
                    .settled()
                    .await
            }
            replica => {
                self.inner
                    .replica
                    .answer(self.inner.me.id, replica)
                    .settled()
                    .await
            }
        }
    }
}
