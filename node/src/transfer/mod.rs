//! Ownership transfer: moving partitions to their new replicas when a
//! committed layout changes them, losing nothing and serving throughout
//! (Garage's layout history with its ack and sync trackers; Cassandra's
//! pending ranges).
//!
//! While a change is in transition the history holds the old layout and the
//! new one ([`crate::membership::state`]). Every node runs [`Transfer::step`]
//! each gossip interval, and each step moves its own part forward:
//! 1. **Ack.** Once the node has adopted the new layout (its writes reach W
//!    replicas of the old *and* the new preference list) and no write it
//!    routed by an older layout is still running, it records `acked`.
//! 2. **Sync.** Once every live member of the history has acked, no write
//!    is acknowledged by the old replicas alone any more. Each member of the
//!    new layout then pulls every partition it replicates now but did not
//!    before: first the hints any live node holds for keys of those
//!    partitions (a hint stands for an old replica's copy), then a Merkle
//!    exchange ([`crate::antientropy`]) with old replicas, at least `N-W+1`
//!    of the oldest layout's (one fewer if the node is one of them:
//!    `transfer/pull.rs`), so every W-set of that list is met: every write
//!    acknowledged before the acks is then on this node. Exchanges are
//!    throttled by `anti-entropy.max-repairs-per-sec`. A partition done is
//!    persisted, so a restarted node resumes where it stopped. When all are
//!    done the node records `synced`.
//! 3. **Switch.** Once every live member of the new layout has synced,
//!    reads go to the new replicas, which hold every acknowledged write (W
//!    of them held each write made during the transition; the synced ones
//!    hold every write made before). Writes still reach both. Once no read
//!    it routed to the old replicas runs, a node records `switched`.
//! 4. **Prune.** When every live member of the history has switched, the
//!    old layout is dropped from the history (by every node, as a function
//!    of the merged state): no reader needs the old replicas any more, so
//!    writes stop reaching them. A node records `pruned` once no request it
//!    routed by the longer history runs.
//! 5. **Clean up.** Once every participant (every member not removed) has
//!    pruned, nobody routes anything to the old replicas; a node drops its
//!    copies of the partitions it no longer replicates (retiring their
//!    actors: a later write here never reuses a forgotten dot), and again
//!    after `linger` (late deliveries of requests routed before), then
//!    records `cleaned`. The next change is planned only once every
//!    participant has cleaned, so no node gets a partition back while it
//!    still holds stale copies of it, and the reaper waits for it too.
//!
//! The reaper reaps nothing until every participant has cleaned (an old
//! replica's copy must not come back after its tombstone was reaped from
//! the new ones). A member gone for good is removed (`shoal remove`, also
//! during a transition) so that no step waits for it.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_client::proto::{MemberInfo, TransferStatus};
use shoal_ring::NodeId;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use self::pull::{to_pull, Pull};
use crate::antientropy::AntiEntropy;
use crate::gossip::{self, Outcome};
use crate::liveness::Liveness;
use crate::membership::state::{Change, ClusterState};
use crate::membership::Membership;
use crate::metrics::Metrics;
use crate::net::{PeerRequest, PeerResponse, Transport};
use crate::replica::Replica;
use crate::storage::{Store, Tree};

/// Meta-tree key of the partitions pulled for the layout in transition.
pub const TRANSFER_KEY: &[u8] = b"transfer-done";

/// Keys dropped per page when cleaning up a partition.
const DROP_PAGE: usize = 256;

/// What a node has pulled for one layout version (persisted).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Pulled {
    version: u64,
    done: BTreeSet<u32>,
}

/// Progress of this node's part of a transition.
#[derive(Debug, Default)]
struct Local {
    pulled: Pulled,
    /// Partitions to pull for `pulled.version`, when known.
    total: usize,
    started: Option<Instant>,
    keys: u64,
    bytes: u64,
    /// The first clean-up pass for a version, and when it ended.
    cleaning: Option<(u64, Instant)>,
}

/// Whether `me` is to remove itself, as far as `c` tells: in no layout
/// but older ones (it left) or none (its join was cleared), with no join
/// staged, and not removed already.
fn departs(c: &ClusterState, me: NodeId) -> bool {
    let member = c.current().is_some_and(|l| l.ring.members().contains(&me));
    let joining = (c.staged.get(&me)).is_some_and(|s| s.change == Some(Change::Join));
    let removed = c.members.get(&me).is_some_and(|m| m.removed);
    !member && !joining && !removed
}

/// The transfer service: the narrow handles it needs and its progress.
pub struct Transfer<T, S> {
    pub me: MemberInfo,
    pub n: usize,
    pub w: usize,
    pub replica: Arc<Replica<S>>,
    pub transport: Arc<T>,
    pub liveness: Arc<dyn Liveness>,
    pub membership: Arc<Membership>,
    pub metrics: Arc<Metrics>,
    pub call_timeout: Duration,
    /// Keys dropped per second when cleaning up.
    pub drop_keys_per_sec: u32,
    /// How long after the first clean-up pass the second runs: longer than
    /// any request routed before the prune may still deliver.
    pub linger: Duration,
    local: Mutex<Local>,
}

impl<T: Transport, S: Store> Transfer<T, S> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: MemberInfo,
        n: usize,
        w: usize,
        replica: Arc<Replica<S>>,
        transport: Arc<T>,
        liveness: Arc<dyn Liveness>,
        membership: Arc<Membership>,
        metrics: Arc<Metrics>,
        call_timeout: Duration,
        drop_keys_per_sec: u32,
        linger: Duration,
    ) -> Self {
        let pulled = match replica.store().get(Tree::Meta, TRANSFER_KEY) {
            Ok(Some(bytes)) => rmp_serde::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(error = %e, "transfer progress unreadable; pulling again");
                Pulled::default()
            }),
            _ => Pulled::default(),
        };
        Transfer {
            me,
            n,
            w,
            replica,
            transport,
            liveness,
            membership,
            metrics,
            call_timeout,
            drop_keys_per_sec,
            linger,
            local: Mutex::new(Local {
                pulled,
                ..Local::default()
            }),
        }
    }

    /// One step of this node's part (see the module doc). Returns whether
    /// the cluster state changed (the caller persists it).
    pub async fn step(&self, aae: &AntiEntropy<T, S>) -> bool {
        let cluster = self.membership.cluster();
        let v = cluster.version();
        self.metrics.ring_version.store(v, Ordering::Relaxed);
        let Some(view) = self
            .membership
            .view()
            .filter(|view| v > 0 && view.version == v)
        else {
            return false;
        };
        let me = self.me.id;
        let mine = cluster.progress.get(&me).copied().unwrap_or_default();
        let mut next = mine;
        // Each step is reported only once no request routed by an earlier
        // stage of the layouts is still running here (`Membership::pin`).
        let idle_before = |stage: u64| self.membership.requests_before(stage) == 0;
        if mine.acked < v && idle_before(v * 4) {
            next.acked = v;
        }
        let current = cluster.current().expect("version > 0");
        let member = current.ring.members().contains(&me);
        if mine.synced < v {
            if !member || cluster.layouts.len() == 1 {
                // Nothing to receive: not a replica of the new layout, or
                // no older layout left to receive from.
                next.synced = v;
            } else if cluster.all_acked() && self.pull(&cluster, aae).await {
                next.synced = v;
            }
        }
        let reads_new = view.reads_new || !view.in_transition();
        if mine.switched < v && reads_new && idle_before(v * 4 + 1) {
            next.switched = v;
        }
        if mine.pruned < v && !view.in_transition() && idle_before(v * 4 + 2) {
            next.pruned = v;
        }
        if next.pruned >= v
            && mine.cleaned < v
            && cluster.waiting_for(|p| p.pruned).iter().all(|id| *id == me)
            && self.clean_up(&cluster).await
        {
            next.cleaned = v;
        }
        // After the clean-up, a copy that arrived late (a request with a
        // longer timeout than `linger`) is dropped at the next step.
        if mine.cleaned >= v && self.unowned_keys(1) > 0 {
            self.drop_unowned(&cluster).await;
        }
        // A node that left: once it dropped everything and holds no hint
        // (handoff delivers them), it removes itself, so that nothing waits
        // for it any more; it then serves nothing and stops once a peer has
        // heard (`Node::departed`).
        if mine.cleaned >= v && departs(&cluster, me) && self.replica.hint_counts().is_empty() {
            // For good, so checked first against the claimant's state,
            // which has every commit: this node may have heard a `clear`
            // made before the commit that took it in, and not the commit.
            match self.ask_claimant().await {
                Some(false) => {}
                Some(true) => return true,
                None => return false,
            }
            // Decided again on the state as it is now: gossip may have
            // brought the commit while the claimant was asked, or a write
            // a hint.
            if !self.replica.hint_counts().is_empty() {
                return false;
            }
            let now = self.replica.now_ms();
            return self.membership.edit(|c| {
                let departs = c.version() == v && departs(c, me);
                if departs {
                    info!(
                        version = v,
                        "left the cluster: every partition handed off; this node stops once a peer has heard"
                    );
                }
                departs && c.remove_now(me, now)
            });
        }
        if next == mine {
            return false;
        }
        // What the step reports (pulled data above all) is durable first.
        if let Err(e) = self.replica.store().sync_wal() {
            warn!(error = %e, "cannot sync before reporting transfer progress; retried");
            return false;
        }
        if next.synced > mine.synced && member {
            info!(version = v, "partitions of the new layout synced");
        }
        self.membership.edit(|c| c.advance(me, next))
    }

    /// Exchanges state with the claimant (none to ask if this node is it):
    /// whether ours changed, `None` when it did not answer.
    async fn ask_claimant(&self) -> Option<bool> {
        let Some(claimant) = self.membership.claimant().filter(|c| c.id != self.me.id) else {
            return Some(false);
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        match gossip::exchange(&self.membership, &*self.transport, &claimant, deadline).await {
            Ok(Outcome::Merged { changed: true, .. }) => Some(true),
            Ok(_) => Some(false),
            Err(e) => {
                debug!(claimant = %claimant.name, error = %e, "the claimant did not answer; this node removes itself once it does");
                None
            }
        }
    }

    /// Pulls what is left to pull of the current layout's new partitions.
    /// Returns whether all are done.
    async fn pull(&self, cluster: &ClusterState, aae: &AntiEntropy<T, S>) -> bool {
        let v = cluster.version();
        let work = to_pull(cluster, self.me.id, self.n, self.w);
        let pending: Vec<Pull> = {
            let mut local = self.local.lock().expect("transfer lock");
            if local.pulled.version != v {
                local.pulled = Pulled {
                    version: v,
                    done: BTreeSet::new(),
                };
                local.started = None;
                local.keys = 0;
                local.bytes = 0;
            }
            local.total = work.len();
            local.started.get_or_insert_with(Instant::now);
            work.into_iter()
                .filter(|pull| !local.pulled.done.contains(&pull.partition))
                .collect()
        };
        self.metrics
            .transfer_pending
            .store(pending.len() as u64, Ordering::Relaxed);
        if pending.is_empty() {
            return true;
        }
        // Hints first: a hint delivered to an old replica after this scan is
        // on that replica, durably, when the exchanges below reach it.
        let partitions: Vec<u32> = pending.iter().map(|pull| pull.partition).collect();
        if let Err(e) = self.pull_hints(cluster, &partitions).await {
            debug!(error = %e, "hints not pulled yet; the transfer waits");
            return false;
        }
        for Pull {
            partition: p,
            sources,
            oldest,
            needed,
        } in pending
        {
            // Counted among the oldest layout's replicas: every write
            // acknowledged since it was committed is on W of them.
            let mut exchanged = 0;
            for (i, id) in sources.iter().enumerate() {
                let Some(peer) = cluster.members.get(id).map(|m| m.info.clone()) else {
                    continue;
                };
                if !self.liveness.is_up(peer.id) {
                    continue;
                }
                match aae.exchange(p, &peer).await {
                    Ok(report) => {
                        exchanged += usize::from(i < oldest);
                        let mut local = self.local.lock().expect("transfer lock");
                        local.keys += report.keys_repaired;
                        local.bytes += report.bytes;
                        self.metrics
                            .transfer_keys
                            .fetch_add(report.keys_repaired, Ordering::Relaxed);
                        self.metrics
                            .transfer_bytes
                            .fetch_add(report.bytes, Ordering::Relaxed);
                    }
                    Err(e) => {
                        debug!(partition = p, peer = %peer.name, error = %e, "pull exchange failed")
                    }
                }
            }
            if exchanged < needed {
                debug!(
                    partition = p,
                    exchanged, needed, "not enough old replicas reached; retried next step"
                );
                return false;
            }
            let pulled = {
                let mut local = self.local.lock().expect("transfer lock");
                local.pulled.done.insert(p);
                local.pulled.clone()
            };
            self.metrics
                .transfer_partitions
                .fetch_add(1, Ordering::Relaxed);
            self.metrics
                .transfer_pending
                .fetch_sub(1, Ordering::Relaxed);
            let bytes = rmp_serde::to_vec(&pulled).expect("progress encodes");
            if let Err(e) = self.replica.store().put(Tree::Meta, TRANSFER_KEY, &bytes) {
                warn!(error = %e, "cannot persist transfer progress");
            }
        }
        true
    }

    /// Merges every hint any live member of the history (this node
    /// included) holds for keys of `partitions`.
    async fn pull_hints(&self, cluster: &ClusterState, partitions: &[u32]) -> Result<(), String> {
        let set: BTreeSet<u32> = partitions.iter().copied().collect();
        for id in cluster.history_members() {
            let Some(peer) = cluster.members.get(&id).map(|m| m.info.clone()) else {
                continue;
            };
            let mut after = Vec::new();
            loop {
                let (entries, next) = if id == self.me.id {
                    let from = (!after.is_empty()).then_some(after.as_slice());
                    let (entries, next) = self
                        .replica
                        .hints_in(&set, from, 512)
                        .map_err(|e| e.to_string())?;
                    (entries, next.unwrap_or_default())
                } else {
                    let deadline = Instant::now() + self.call_timeout;
                    let request = PeerRequest::HintsIn {
                        partitions: partitions.to_vec(),
                        after: after.clone(),
                    };
                    match self.transport.call(&peer, request, deadline).await {
                        Ok(PeerResponse::HintsIn { entries, next }) => (entries, next),
                        other => return Err(format!("{}: {other:?}", peer.name)),
                    }
                };
                self.replica
                    .accept_entries(&entries)
                    .map_err(|e| e.to_string())?;
                if next.is_empty() {
                    break;
                }
                after = next;
            }
        }
        Ok(())
    }

    /// Drops the copies of partitions this node no longer replicates: a
    /// pass once every participant has pruned, and another once `linger`
    /// has passed, for what requests routed before the prune (their
    /// background sends, read repair) delivered late. Returns whether both
    /// passes are done.
    async fn clean_up(&self, cluster: &ClusterState) -> bool {
        let v = cluster.version();
        let first = {
            let local = self.local.lock().expect("transfer lock");
            local
                .cleaning
                .filter(|(version, _)| *version == v)
                .map(|(_, at)| at)
        };
        match first {
            Some(at) if at.elapsed() < self.linger => return false,
            _ => {}
        }
        if !self.drop_unowned(cluster).await {
            return false;
        }
        let mut local = self.local.lock().expect("transfer lock");
        match first {
            None => {
                local.cleaning = Some((v, Instant::now()));
                false
            }
            Some(_) => true,
        }
    }

    /// One pass of dropping copies of partitions not replicated here.
    /// Returns whether it went through.
    async fn drop_unowned(&self, cluster: &ClusterState) -> bool {
        let v = cluster.version();
        let current = &cluster.current().expect("a layout").ring;
        let mut dropped = 0u64;
        for p in 0..current.partition_count() {
            if current
                .preference_list_for_partition(p, self.n)
                .contains(&self.me.id)
            {
                continue;
            }
            loop {
                let started = Instant::now();
                let keys = match self.replica.partition_keys(p, None, DROP_PAGE) {
                    Ok(keys) => keys,
                    Err(e) => {
                        warn!(partition = p, error = %e, "cannot list keys to drop; retried later");
                        return false;
                    }
                };
                if keys.is_empty() {
                    break;
                }
                for key in &keys {
                    // A newer layout meanwhile: the next step starts over.
                    if self.membership.view().is_none_or(|view| view.version != v) {
                        return false;
                    }
                    if let Err(e) = self.replica.drop_key(key) {
                        warn!(error = %e, "cannot drop a copy; retried later");
                        return false;
                    }
                    dropped += 1;
                }
                crate::clock::pace(started, keys.len(), self.drop_keys_per_sec).await;
            }
        }
        self.metrics
            .keys_dropped
            .fetch_add(dropped, Ordering::Relaxed);
        if dropped > 0 {
            info!(
                version = v,
                keys = dropped,
                "dropped copies this node no longer replicates"
            );
        }
        true
    }

    /// Copies held here of keys in partitions this node replicates in no
    /// layout of its view (counted up to `limit`): what clean-up drops.
    pub fn unowned_keys(&self, limit: u64) -> u64 {
        let Some(view) = self.membership.view() else {
            return 0;
        };
        let mut rings: Vec<&shoal_ring::Ring> = view.older.iter().collect();
        rings.push(&view.ring);
        let mut count = 0;
        for p in 0..view.ring.partition_count() {
            if rings.iter().any(|r| {
                r.preference_list_for_partition(p, self.n)
                    .contains(&self.me.id)
            }) {
                continue;
            }
            let mut after: Option<Vec<u8>> = None;
            while let Ok(keys) = self.replica.partition_keys(p, after.as_deref(), DROP_PAGE) {
                count += keys.len() as u64;
                if keys.len() < DROP_PAGE || count >= limit {
                    break;
                }
                after = keys.last().cloned();
            }
            if count >= limit {
                break;
            }
        }
        count.min(limit)
    }

    /// The transfer in progress here, for `shoal status`.
    pub fn status(&self) -> Option<TransferStatus> {
        let cluster = self.membership.cluster();
        if cluster.layouts.len() < 2 {
            return None;
        }
        let local = self.local.lock().expect("transfer lock");
        let done = if local.pulled.version == cluster.version() {
            local.pulled.done.len()
        } else {
            0
        };
        let eta_secs = local.started.filter(|_| done > 0).map(|s| {
            let per = s.elapsed().as_secs_f64() / done as f64;
            (per * local.total.saturating_sub(done) as f64).ceil() as u64
        });
        Some(TransferStatus {
            version: cluster.version(),
            partitions_total: local.total as u32,
            partitions_done: done as u32,
            keys: local.keys,
            bytes: local.bytes,
            eta_secs,
        })
    }
}

mod pull;
