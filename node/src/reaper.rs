//! The reaper: deletes tombstones once nothing can bring their key back.
//!
//! A delete is a tombstone, kept so that an older copy met later (a hint, a
//! replica that was away, an anti-entropy peer) is superseded by merge
//! rather than resurrected. A tombstone is dropped only when that can no
//! longer happen: every `anti-entropy.reap-interval-ms` the first primary of
//! each partition looks for tombstones older than `tombstone-grace-secs`
//! (by its own clock; each primary judges the grace again by its own before
//! deleting) and, while every member is up, on the same layout with no
//! change in progress, and none holds a hint for the key, has every primary
//! compare-and-delete exactly that tombstone. The config refuses a grace
//! shorter than a request can stay in flight.
//! Deleting a key forgets its history: the next write to it mints under a
//! fresh actor epoch (see [`crate::version`]).
//!
//! A pass reads every key of the store, at `anti-entropy.reap-keys-per-sec`:
//! slowly, as it is never in a hurry. At the rebuild's 50,000 a second the
//! first pass (three nodes' at once, 10 s after they started) took the
//! 2-core bench machine's idle time, and the open-loop p99 of that second
//! rose to 20-54 ms.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use shoal_client::proto::MemberInfo;
use shoal_ring::NodeId;
use tracing::{debug, info, warn};

use crate::liveness::Liveness;
use crate::membership::{Membership, View};
use crate::metrics::Metrics;
use crate::net::{PeerRequest, PeerResponse, Transport, TransportError};
use crate::replica::trees::REBUILD_PAGE;
use crate::replica::{reapable, Replica};
use crate::storage::{Store, Tree};
use crate::version::{decode_object, Object};

/// The reaping service and the handles it needs.
pub struct Reaper<T, S> {
    pub me: NodeId,
    /// Replicas per key.
    pub n: usize,
    /// `anti-entropy.tombstone-grace-secs`.
    pub grace: Duration,
    /// Keys read per second while looking for tombstones.
    pub keys_per_sec: u32,
    /// How long each check or reap may wait for a peer's answer.
    pub call_timeout: Duration,
    pub replica: Arc<Replica<S>>,
    pub transport: Arc<T>,
    pub liveness: Arc<dyn Liveness>,
    pub membership: Arc<Membership>,
    pub metrics: Arc<Metrics>,
    /// Where a pass [`Self::reap_until`] left unfinished goes on: the next
    /// key to read.
    pub unfinished: std::sync::Mutex<Option<Vec<u8>>>,
}

/// How a call of [`Reaper::reap_until`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slice {
    /// The pass is over: the next call starts another.
    Over,
    /// The deadline came: the next call goes on from there.
    Paused,
    /// Reaping may not happen now (a member is down, or not on this node's
    /// layout, or a change is under way): the next call tries again from
    /// the same place.
    Blocked,
}

impl<T: Transport, S: Store> Reaper<T, S> {
    /// The deadline of a check or reap sent now.
    fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.call_timeout
    }

    /// Reaps tombstones of the partitions this node is the first primary of:
    /// a key whose object is only tombstones, the newest older than the
    /// grace period, is deleted from every primary once all of them are up
    /// and hold exactly that object (compare-and-delete on each). A primary
    /// that still holds the old value gets the tombstone from anti-entropy
    /// first, so a reaped key never comes back. Goes on with the pass in
    /// progress (or starts one) until it is over or blocked; returns the
    /// keys reaped.
    pub async fn reap_tombstones(&self) -> u64 {
        let mut reaped = 0;
        loop {
            let (more, slice) = self.reap_until(None).await;
            reaped += more;
            if slice != Slice::Paused {
                return reaped;
            }
        }
    }

    /// Goes on with the pass in progress (or starts one) until it is over,
    /// blocked, or `deadline` comes; returns the keys reaped meanwhile, and
    /// how it ended. The anti-entropy loop reaps between sweeps this way,
    /// so that a long pass (a slow one, as passes are: see the module doc)
    /// does not hold the sweeps up, and a pass blocked for a while goes on
    /// where it was. Each call checks again that reaping may happen at all.
    pub async fn reap_until(&self, deadline: Option<tokio::time::Instant>) -> (u64, Slice) {
        let start = self
            .unfinished
            .lock()
            .expect("reaper lock")
            .take()
            .unwrap_or_default();
        let (start, reaped, slice) = self.reap_pages(start, deadline).await;
        if slice != Slice::Over {
            *self.unfinished.lock().expect("reaper lock") = Some(start);
        }
        if reaped > 0 {
            self.metrics
                .tombstones_reaped
                .fetch_add(reaped, Ordering::Relaxed);
            info!(reaped, "tombstones reaped");
        }
        (reaped, slice)
    }

    /// Reaps from `start` on until the store's end, a reason to stop, or
    /// `deadline`: returns where to go on from, the keys reaped, and which.
    async fn reap_pages(
        &self,
        mut start: Vec<u8>,
        deadline: Option<tokio::time::Instant>,
    ) -> (Vec<u8>, u64, Slice) {
        let mut reaped = 0;
        // Until a layout change is over everywhere, old copies dropped
        // included, old replicas may hold copies of keys they no longer
        // replicate: a tombstone reaped from the new replicas alone would
        // let such a value come back. Every member asked confirms it is on
        // this same settled layout (see `reap`).
        let (Some(layout), Some(view)) = (self.membership.settled(), self.membership.view()) else {
            return (start, reaped, Slice::Blocked);
        };
        if view.version != layout {
            return (start, reaped, Slice::Blocked);
        }
        let me = self.me;
        let n = self.n;
        let now = self.replica.now_ms();
        // A copy of a key may wait anywhere, not only on its primaries: a
        // fallback holds a hint, a node that was away holds an old value.
        // Reaping forgets the tombstone that covers such copies, so nothing
        // is reaped unless every node that may hold one is up to be asked.
        let holders = self.may_hold(&view);
        let down: Vec<String> = holders
            .iter()
            .filter(|m| !self.liveness.is_up(m.id))
            .map(|m| m.name.clone())
            .collect();
        if !down.is_empty() {
            debug!(?down, "no tombstones reaped while members are down");
            return (start, reaped, Slice::Blocked);
        }
        // Per partition: its primaries if this node is the first of them and
        // all are up (worked out once per slice), else `None`: not reaped here.
        let mut reapers: HashMap<u32, Option<Vec<NodeId>>> = HashMap::new();
        loop {
            let began = tokio::time::Instant::now();
            if deadline.is_some_and(|d| began >= d) {
                return (start, reaped, Slice::Paused);
            }
            // A page may hold objects of megabytes: read off the worker.
            let page = match crate::tasks::heavy(|| {
                self.replica
                    .store()
                    .scan(Tree::Objects, &start, None, REBUILD_PAGE)
            }) {
                Ok(page) => page,
                Err(e) => {
                    warn!(error = %e, "cannot list keys to reap; trying again next time");
                    break;
                }
            };
            let Some((last, _)) = page.last() else {
                break;
            };
            start = last.clone();
            start.push(0);
            for (key, record) in &page {
                // A corrupt record is skipped: a read or the tree rebuild
                // drops it, and repair restores the key.
                let Ok(bytes) = record else {
                    continue;
                };
                let partition = self.replica.partition_of(key);
                let replicas = reapers.entry(partition).or_insert_with(|| {
                    let replicas = view.ring.preference_list_for_partition(partition, n);
                    (replicas.first() == Some(&me)
                        && replicas.iter().all(|r| self.liveness.is_up(*r)))
                    .then_some(replicas)
                });
                let Some(replicas) = replicas else {
                    continue;
                };
                let decoded = crate::tasks::heavy_for(bytes.len(), || decode_object(bytes));
                let Ok(object) = decoded else {
                    continue; // a rebuild or read reports corruption
                };
                if !reapable(&object, self.grace, now) {
                    continue;
                }
                match self.reap(key, &object, replicas, &view, &holders).await {
                    Ok(true) => reaped += 1,
                    Ok(false) => {}
                    Err(e) => {
                        // A member failed to answer. Once the detector sees
                        // it down, the pass waits, from this key, until all
                        // are up again (rather than a deadline per key);
                        // until then, other keys go on.
                        let all_up = holders.iter().all(|m| self.liveness.is_up(m.id));
                        debug!(error = %e, all_up, "a reaping check failed");
                        if !all_up {
                            // This key is tried again first.
                            return (key.clone(), reaped, Slice::Blocked);
                        }
                    }
                }
            }
            crate::clock::pace(began, page.len(), self.keys_per_sec).await;
        }
        (start, reaped, Slice::Over)
    }

    /// Every node but this one that may hold a copy of a key off its
    /// primaries, and so must be up and asked before a reap: the members of
    /// the layouts in the history, and every other node not removed. A node
    /// that left removes itself only once its hints are delivered, and
    /// until then a hint of an old value may wait there, even when it has
    /// staged a join again (a restart with seeds does so). A staged joiner
    /// with no layout refuses, so nothing is reaped until its join is
    /// committed or it is removed.
    fn may_hold(&self, view: &View) -> Vec<MemberInfo> {
        let cluster = self.membership.cluster();
        let mut all: BTreeMap<NodeId, MemberInfo> = (*view.members).clone();
        for (id, m) in cluster.members.iter().filter(|(_, m)| !m.removed) {
            all.entry(*id).or_insert_with(|| m.info.clone());
        }
        all.into_values().filter(|m| m.id != self.me).collect()
    }

    /// Reaps one tombstone if every other primary holds exactly it and no
    /// node that may hold a copy ([`Self::may_hold`]) holds a hint for its
    /// key (a hint older than the tombstone, handed off after the reap,
    /// would bring the deleted value back; it is delivered first and merged
    /// into the tombstone, and the key is reaped on a later pass). Each of
    /// them must also be on `view`'s layout with no change in progress: one
    /// that has committed or learned a change the others have not heard of
    /// yet may be a new primary of the key, holding a copy from before the
    /// delete (explore seed 6866). Returns whether it reaped, or the call
    /// that failed (every call has a deadline).
    async fn reap(
        &self,
        key: &[u8],
        object: &Object,
        replicas: &[NodeId],
        view: &View,
        holders: &[MemberInfo],
    ) -> Result<bool, TransportError> {
        let others: Vec<&MemberInfo> = replicas
            .iter()
            .filter(|r| **r != self.me)
            .filter_map(|r| view.members.get(r))
            .collect();
        // What is compared is made durable on every primary (this node's
        // copy and hints were read before this sync; `ReapCheck` and
        // `HintsOf` sync after reading too): a power loss after the reap
        // must not roll a node back to a copy before the tombstone, or to
        // a hint it had delivered.
        if self.membership.settled() != Some(view.version)
            || !self.replica.hints_of(key).is_ok_and(|h| h.is_empty())
            || self.replica.store().sync_wal().is_err()
        {
            return Ok(false);
        }
        for peer in &others {
            let asked = PeerRequest::ReapCheck { key: key.to_vec() };
            match self.transport.call(peer, asked, self.deadline()).await? {
                PeerResponse::Object(Some(theirs)) if &theirs == object => {}
                _ => return Ok(false),
            }
        }
        for member in holders {
            let asked = PeerRequest::ReapHintsOf {
                key: key.to_vec(),
                layout: view.version,
            };
            match self.transport.call(member, asked, self.deadline()).await? {
                PeerResponse::Hints(held) if held.is_empty() => {}
                _ => return Ok(false),
            }
        }
        for peer in &others {
            let reap = PeerRequest::Reap {
                key: key.to_vec(),
                object: object.clone(),
            };
            let stored = self.transport.call(peer, reap, self.deadline()).await?;
            if !matches!(stored, PeerResponse::Stored) {
                return Ok(false); // reaped where it worked; the rest next time
            }
        }
        Ok(self.replica.reap(key, object).unwrap_or(false))
    }
}

/// The refusal of a [`PeerRequest::ReapHintsOf`] by a member not on the
/// reaper's settled layout (see [`Reaper::reap`]); `None` for any other
/// request.
pub fn refusal(membership: &Membership, request: &PeerRequest) -> Option<PeerResponse> {
    let PeerRequest::ReapHintsOf { layout, .. } = request else {
        return None;
    };
    let mine = membership.settled();
    if mine == Some(*layout) {
        return None;
    }
    let on = mine.map_or_else(|| "a change in progress".into(), |v| format!("layout {v}"));
    Some(PeerResponse::Error(crate::net::PeerError::Refused(
        format!("not reaping under layout {layout}: this node is on {on}"),
    )))
}
