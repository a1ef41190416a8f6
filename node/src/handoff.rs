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
//! [`Tree::Hints`] maps `primary id (16 bytes) ++ key` to the object. A second
//! hint for the same key and primary is merged into the first under the key's
//! lock, so a queue holds one entry per key however often it was written.
//! Hints are in RocksDB like everything else, so they survive kill -9.
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
use std::sync::atomic::Ordering;
use std::time::Duration;

use shoal_client::proto::{HintQueue, MemberInfo};
use shoal_ring::NodeId;
use tracing::{info, warn};

use crate::coordinator::Node;
use crate::net::{byte_bounded, HandoffEntry, PeerRequest, PeerResponse, Transport};
use crate::storage::{Store, StoreError, Tree, WriteBatch};
use crate::version::{decode_object, encode_object, Object};

/// Handoff settings, from the config's `[handoff]`.
#[derive(Debug, Clone, Copy)]
pub struct HandoffSettings {
    pub interval: Duration,
    pub batch_size: usize,
    pub max_keys_per_sec: u32,
}

impl Default for HandoffSettings {
    fn default() -> Self {
        let c = crate::config::HandoffConfig::default();
        HandoffSettings {
            interval: Duration::from_millis(c.interval_ms),
            batch_size: c.batch_size,
            max_keys_per_sec: c.max_keys_per_sec,
        }
    }
}

fn hint_key(primary: NodeId, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + key.len());
    k.extend_from_slice(&primary.0);
    k.extend_from_slice(key);
    k
}

/// The first key after every hint for `primary`.
fn prefix_end(primary: NodeId) -> Option<Vec<u8>> {
    let mut end = primary.0.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

fn corrupt(key: &[u8], detail: String) -> StoreError {
    StoreError::Corruption {
        tree: Tree::Hints.name(),
        key: hex::encode(key),
        detail,
    }
}

impl<T: Transport, S: Store> Node<T, S> {
    /// Keeps `object` as a hint for `primary`, merged with any hint already
    /// held for the key.
    pub fn store_hint(
        &self,
        primary: NodeId,
        key: &[u8],
        object: &Object,
    ) -> Result<(), StoreError> {
        let hk = hint_key(primary, key);
        let _guard = self.lock_stripe(key);
        let before = self.read_hint(&hk)?;
        let mut merged = before.clone().unwrap_or_default();
        merged.merge(object);
        if before.as_ref() != Some(&merged) {
            self.inner
                .store
                .put(Tree::Hints, &hk, &encode_object(&merged))?;
        }
        self.inner
            .metrics
            .hints_stored
            .fetch_add(1, Ordering::Relaxed);
        if before.is_none() {
            self.count_hints(primary, 1);
        }
        Ok(())
    }

    fn read_hint(&self, hk: &[u8]) -> Result<Option<Object>, StoreError> {
        match self.inner.store.get(Tree::Hints, hk)? {
            Some(bytes) => decode_object(&bytes).map(Some).map_err(|d| corrupt(hk, d)),
            None => Ok(None),
        }
    }

    /// The hint held for `primary` and `key`, if any.
    pub fn hint(&self, primary: NodeId, key: &[u8]) -> Result<Option<Object>, StoreError> {
        self.read_hint(&hint_key(primary, key))
    }

    /// Every hint held for `key`, by the primary it waits for.
    pub fn hints_of(&self, key: &[u8]) -> Result<Vec<(NodeId, Object)>, StoreError> {
        let mut found = Vec::new();
        for m in self.inner.membership.known() {
            if let Some(o) = self.hint(m.id, key)? {
                found.push((m.id, o));
            }
        }
        Ok(found)
    }

    /// Adjusts the pending count for `primary` and the metrics gauge.
    fn count_hints(&self, primary: NodeId, delta: i64) {
        let mut pending = self.inner.hints_pending.lock().expect("hints lock");
        let n = pending.entry(primary).or_default();
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            pending.remove(&primary);
        }
        let total: u64 = pending.values().sum();
        self.inner
            .metrics
            .hints_pending
            .store(total, Ordering::Relaxed);
    }

    /// Counts the hints in the store (on start).
    pub fn load_hint_counts(&self) -> Result<u64, StoreError> {
        let mut counts: BTreeMap<NodeId, u64> = BTreeMap::new();
        let mut start = Vec::new();
        loop {
            let page = self.inner.store.scan(Tree::Hints, &start, None, 1024)?;
            let Some((last, _)) = page.last() else { break };
            for (k, _) in &page {
                if let Ok(id) = <[u8; 16]>::try_from(&k[..16.min(k.len())]) {
                    *counts.entry(NodeId(id)).or_default() += 1;
                }
            }
            start = last.clone();
            start.push(0);
        }
        let total = counts.values().sum();
        *self.inner.hints_pending.lock().expect("hints lock") = counts;
        self.inner
            .metrics
            .hints_pending
            .store(total, Ordering::Relaxed);
        Ok(total)
    }

    /// Hints held, per node they wait for (for `shoal status`).
    pub fn hint_queues(&self) -> Vec<HintQueue> {
        let view = self.inner.membership.view();
        self.inner
            .hints_pending
            .lock()
            .expect("hints lock")
            .iter()
            .map(|(id, n)| HintQueue {
                for_node: view.as_ref().map_or_else(|| id.to_hex(), |v| v.name_of(id)),
                pending: *n,
            })
            .collect()
    }

    /// One delivery round: offers every held hint to its primary if the
    /// failure detector sees that primary up. Returns how many were delivered.
    pub async fn handoff_round(&self) -> u64 {
        let waiting: Vec<NodeId> = self
            .inner
            .hints_pending
            .lock()
            .expect("hints lock")
            .keys()
            .copied()
            .collect();
        let mut delivered = 0;
        for primary in waiting {
            if !self.is_up(primary) || primary == self.inner.me.id {
                continue;
            }
            let Some(target) = self
                .inner
                .membership
                .known()
                .into_iter()
                .find(|m| m.id == primary)
            else {
                continue;
            };
            delivered += self.hand_off_to(&target).await;
        }
        delivered
    }

    /// Delivers every hint for `target`, batch by batch, until done or a
    /// delivery fails.
    async fn hand_off_to(&self, target: &MemberInfo) -> u64 {
        let settings = self.inner.settings.handoff;
        let end = prefix_end(target.id);
        let mut start = target.id.0.to_vec();
        let mut delivered = 0;
        loop {
            let mut page = match self.inner.store.scan(
                Tree::Hints,
                &start,
                end.as_deref(),
                settings.batch_size,
            ) {
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
            start = last.clone();
            start.push(0);
            let mut entries = Vec::with_capacity(page.len());
            for (hk, bytes) in &page {
                match decode_object(bytes) {
                    Ok(object) => entries.push(HandoffEntry {
                        key: hk[16..].to_vec(),
                        object,
                    }),
                    Err(e) => warn!(key = %hex::encode(hk), error = %e, "undecodable hint skipped"),
                }
            }
            let sent = tokio::time::Instant::now();
            let count = entries.len();
            match self
                .inner
                .transport
                .call(target, PeerRequest::Handoff(entries))
                .await
            {
                Ok(PeerResponse::Stored) => {
                    self.inner.metrics.handoff_batches.observe(sent.elapsed());
                }
                other => {
                    warn!(peer = %target.name, answer = ?other, "handoff failed; hints kept for the next round");
                    return delivered;
                }
            }
            delivered += self.delete_delivered(target.id, &page);
            crate::coordinator::pace(sent, count, settings.max_keys_per_sec).await;
        }
        if delivered > 0 {
            info!(peer = %target.name, delivered, "hints handed off");
        }
        delivered
    }

    /// Deletes the delivered hints that did not change since they were read.
    fn delete_delivered(&self, primary: NodeId, sent: &[(Vec<u8>, Vec<u8>)]) -> u64 {
        let mut deleted = 0;
        for (hk, bytes) in sent {
            let key = &hk[16..];
            let _guard = self.lock_stripe(key);
            match self.inner.store.get(Tree::Hints, hk) {
                Ok(Some(now)) if &now == bytes => {
                    let mut batch = WriteBatch::default();
                    batch.delete(Tree::Hints, hk);
                    match self.inner.store.write(batch) {
                        Ok(()) => deleted += 1,
                        Err(e) => warn!(error = %e, "cannot delete a delivered hint"),
                    }
                }
                Ok(_) => {} // changed meanwhile: delivered again next round
                Err(e) => warn!(error = %e, "cannot re-read a delivered hint"),
            }
        }
        if deleted > 0 {
            self.count_hints(primary, -(deleted as i64));
            self.inner
                .metrics
                .hints_delivered
                .fetch_add(deleted, Ordering::Relaxed);
        }
        deleted
    }

    /// Merges handed-off objects into this node's copies.
    pub(crate) fn accept_handoff(&self, entries: &[HandoffEntry]) -> Result<(), StoreError> {
        for e in entries {
            self.local_merge(&e.key, &e.object)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_bounds_one_primary() {
        let id = NodeId::from_u128(0x01ff);
        let end = prefix_end(id).unwrap();
        assert!(hint_key(id, b"\xff\xff") < end);
        assert!(hint_key(NodeId::from_u128(0x0200), b"") >= end);
        assert_eq!(prefix_end(NodeId([0xff; 16])), None);
    }
}
