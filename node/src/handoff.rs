//! Hinted handoff: writes a down primary missed, kept by another node and
//! delivered when the primary is back.
//!
//! # Where hints come from
//! A coordinator that cannot reach a primary (the failure detector says it is
//! down, or the send failed) gives the write to a fallback, the next live node
//! on the ring, with `HintPut { for_primary }`. The fallback keeps the object
//! in its hints tree, not as its own data. When no fallback takes it either
//! (a cluster of N nodes has none), the coordinator keeps the hint itself, as
//! Cassandra does: a returning node is then brought up to date without anyone
//! reading its keys.
//!
//! # Storage
//! Hints are the replica's (see [`crate::replica::hints`]): merged per key
//! and primary under the key's lock, in the store, so they survive kill -9.
//! This module only delivers them.
//!
//! # Delivery
//! Every `handoff.interval-ms` the node offers its hints to every primary the
//! failure detector sees up: `Handoff` batches of `handoff.batch-size`, in key
//! order, at most `handoff.max-keys-per-sec` hints per second. The primary
//! merges each object into its own copy and answers once all are written.
//! Only then is each hint deleted, and only if it did not change meanwhile
//! (a newer write merged into it is delivered in the next round). A delivery
//! that fails leaves the hints for the next round. Delivering twice is
//! harmless: merge is idempotent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use shoal_client::proto::MemberInfo;
use shoal_ring::NodeId;
use tracing::{debug, info, warn};

use crate::liveness::Liveness;
use crate::membership::{Membership, View};
use crate::metrics::Metrics;
use crate::net::{byte_bounded, HandoffEntry, PeerRequest, PeerResponse, Transport};
use crate::replica::hints::{decode_hint, hinted_key};
use crate::replica::Replica;
use crate::storage::Store;

/// Handoff settings, from the config's `[handoff]`.
#[derive(Debug, Clone, Copy)]
pub struct HandoffSettings {
    pub interval: Duration,
    pub batch_size: usize,
    pub max_keys_per_sec: u32,
    /// How long one batch may wait for the primary's answer
    /// (`timeouts.request-ms`).
    pub call_timeout: Duration,
}

impl Default for HandoffSettings {
    fn default() -> Self {
        let c = crate::config::Config::default();
        HandoffSettings {
            interval: Duration::from_millis(c.handoff.interval_ms),
            batch_size: c.handoff.batch_size,
            max_keys_per_sec: c.handoff.max_keys_per_sec,
            call_timeout: Duration::from_millis(c.timeouts.request_ms),
        }
    }
}

/// The delivery service: holds the handles it needs and nothing else.
pub struct Handoff<T, S> {
    pub me: NodeId,
    /// Replicas per key: where hints of a departed node go.
    pub n: usize,
    pub settings: HandoffSettings,
    pub replica: Arc<Replica<S>>,
    pub transport: Arc<T>,
    pub liveness: Arc<dyn Liveness>,
    pub membership: Arc<Membership>,
    pub metrics: Arc<Metrics>,
}

impl<T: Transport, S: Store> Handoff<T, S> {
    /// One delivery round: offers every held hint to its primary if the
    /// failure detector sees that primary up, to all such primaries at once
    /// (each batch has a deadline, so a silent primary holds up only its
    /// own hints). Returns how many were delivered.
    pub async fn round(&self) -> u64 {
        let waiting = self.replica.hint_counts();
        // Hints for a node in no layout of the ring any more (it left, or
        // its id changed), or removed (gone for good, from the commit on,
        // though its layout lasts until the change ends): they go to the
        // keys' replicas. A hint that waited out the change (hours, for a
        // large one) could outlive the clock entries that supersede its
        // values, and bring them back.
        let view = self.membership.view().filter(|v| v.version > 0);
        let departed: Vec<NodeId> = match &view {
            Some(view) => waiting
                .keys()
                .filter(|id| !view.members.contains_key(id) || view.removed.contains(id))
                .copied()
                .collect(),
            None => Vec::new(),
        };
        let targets: Vec<MemberInfo> = self
            .membership
            .known()
            .into_iter()
            .filter(|m| m.id != self.me && waiting.contains_key(&m.id))
            .filter(|m| !departed.contains(&m.id) && self.liveness.is_up(m.id))
            .collect();
        // `max-keys-per-sec` is the node's, shared by its deliveries.
        let streams = (targets.len() + departed.len()).max(1) as u32;
        let rate = (self.settings.max_keys_per_sec / streams).max(1);
        let deliveries = targets
            .iter()
            .map(|target| async move { self.hand_off_to(target, rate).await });
        let mut delivered: u64 = futures_util::future::join_all(deliveries)
            .await
            .into_iter()
            .sum();
        for id in departed {
            delivered += self.redirect(id, rate).await;
        }
        delivered
    }

    /// Delivers the hints held for `departed`, a node in no layout any
    /// more or removed, to every current replica of each key (merges are
    /// idempotent), deleting them once all replicas stored them.
    async fn redirect(&self, departed: NodeId, rate: u32) -> u64 {
        let Some(view) = self.membership.view() else {
            return 0;
        };
        let mut after: Option<Vec<u8>> = None;
        let mut delivered = 0;
        loop {
            let page =
                match self
                    .replica
                    .hint_page(departed, after.as_deref(), self.settings.batch_size)
                {
                    Ok(p) => p,
                    Err(e) => {
                        warn!(error = %e, "cannot read hints of a departed node");
                        return delivered;
                    }
                };
            let Some((last, _)) = page.last() else {
                break;
            };
            after = Some(last.clone());
            let sent = tokio::time::Instant::now();
            let mut sending = Vec::new();
            let mut entries = Vec::new();
            for (hk, bytes) in &page {
                let Ok((object, lost)) = decode_hint(bytes) else {
                    continue;
                };
                if !self.has_home(&view, hinted_key(hk)) {
                    continue;
                }
                entries.push(HandoffEntry {
                    key: hinted_key(hk).to_vec(),
                    object,
                    lost,
                });
                sending.push((hk.clone(), bytes.clone()));
            }
            if !self.deliver_to_replicas(&view, entries).await {
                return delivered;
            }
            let count = sending.len();
            delivered += self.replica.delete_delivered(departed, &sending);
            crate::clock::pace(sent, count, rate).await;
        }
        if delivered > 0 {
            info!(
                delivered,
                "hints of a departed node handed to the keys' replicas"
            );
        }
        delivered
    }

    /// Whether `key` has a replica that may take its hint: one in a layout
    /// of `view`, not removed. A key whose every replica was removed keeps
    /// its hints until a change gives it new ones.
    fn has_home(&self, view: &View, key: &[u8]) -> bool {
        (view.replicas(key, self.n).iter()).any(|m| !view.removed.contains(&m.id))
    }

    /// Merges `entries` into every replica of each key, in every layout of
    /// `view`, removed members aside (merges are idempotent); whether all
    /// of them stored theirs.
    async fn deliver_to_replicas(&self, view: &View, entries: Vec<HandoffEntry>) -> bool {
        let mut by_target: BTreeMap<NodeId, (MemberInfo, Vec<HandoffEntry>)> = BTreeMap::new();
        for entry in entries {
            let replicas = view.replicas(&entry.key, self.n).into_iter();
            for m in replicas.filter(|m| !view.removed.contains(&m.id)) {
                by_target
                    .entry(m.id)
                    .or_insert_with(|| (m.clone(), Vec::new()))
                    .1
                    .push(entry.clone());
            }
        }
        for (id, (target, entries)) in by_target {
            let stored = if id == self.me {
                self.replica.accept_entries(&entries).is_ok()
            } else {
                let deadline = tokio::time::Instant::now() + self.settings.call_timeout;
                matches!(
                    self.transport
                        .call(&target, PeerRequest::Handoff(entries), deadline)
                        .await,
                    Ok(PeerResponse::Stored)
                )
            };
            if !stored {
                debug!(peer = %target.name, "hints not delivered to a replica yet");
                return false;
            }
        }
        true
    }

    /// Delivers every hint for `target`, batch by batch, at most `rate` a
    /// second, until done or a delivery fails.
    async fn hand_off_to(&self, target: &MemberInfo, rate: u32) -> u64 {
        let settings = self.settings;
        let mut after: Option<Vec<u8>> = None;
        let mut delivered = 0;
        loop {
            let mut page =
                match self
                    .replica
                    .hint_page(target.id, after.as_deref(), settings.batch_size)
                {
                    Ok(p) => p,
                    Err(e) => {
                        warn!(peer = %target.name, error = %e, "cannot read hints; handoff paused");
                        return delivered;
                    }
                };
            page.truncate(byte_bounded(&page, |(k, v)| k.len() + v.len()));
            let Some((last, _)) = page.last() else {
                break;
            };
            after = Some(last.clone());
            let mut entries = Vec::with_capacity(page.len());
            // Only what was sent is deleted after: an undecodable hint stays
            // (and is reported each round) rather than vanish as delivered.
            let mut sending = Vec::with_capacity(page.len());
            // A lost hint goes too, flagged: its primary then restores the
            // key from the other primaries (see `replica::hints`).
            for (hk, bytes) in &page {
                match decode_hint(bytes) {
                    Ok((object, lost)) => {
                        entries.push(HandoffEntry {
                            key: hinted_key(hk).to_vec(),
                            object,
                            lost,
                        });
                        sending.push((hk.clone(), bytes.clone()));
                    }
                    Err(e) => {
                        warn!(key = %hex::encode(hk), error = %e, "undecodable hint kept, not delivered")
                    }
                }
            }
            // A key `target` no longer replicates (a layout change moved
            // it): its hint goes to the key's replicas instead, so no copy
            // lands on a node that dropped the partition.
            if let Some(view) = self.membership.view().filter(|v| v.version > 0) {
                let homeless = |key: &[u8]| !self.has_home(&view, key);
                entries.retain(|e| !homeless(&e.key));
                sending.retain(|(hk, _)| !homeless(hinted_key(hk)));
                let (keep, elsewhere): (Vec<HandoffEntry>, Vec<HandoffEntry>) =
                    entries.into_iter().partition(|e| {
                        view.replicas(&e.key, self.n)
                            .iter()
                            .any(|m| m.id == target.id)
                    });
                if !elsewhere.is_empty() && !self.deliver_to_replicas(&view, elsewhere).await {
                    return delivered;
                }
                entries = keep;
            }
            let sent = tokio::time::Instant::now();
            let count = entries.len();
            let size: usize = sending.iter().map(|(k, v)| k.len() + v.len()).sum();
            let deadline = sent + settings.call_timeout + crate::net::transfer_time(size);
            match self
                .transport
                .call(target, PeerRequest::Handoff(entries), deadline)
                .await
            {
                Ok(PeerResponse::Stored) => {
                    self.metrics.handoff_batches.observe(sent.elapsed());
                }
                other => {
                    warn!(peer = %target.name, answer = ?other, "handoff failed; hints kept for the next round");
                    return delivered;
                }
            }
            delivered += self.replica.delete_delivered(target.id, &sending);
            crate::clock::pace(sent, count, rate).await;
        }
        if delivered > 0 {
            info!(peer = %target.name, delivered, "hints handed off");
        }
        delivered
    }
}
