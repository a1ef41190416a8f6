//! Hint storage: writes kept for a down primary until handoff delivers them
//! (see [`crate::handoff`] for where hints come from and how they travel).
//!
//! [`Tree::Hints`] maps `primary id (16 bytes) ++ key` to the object. A second
//! hint for the same key and primary is merged into the first under the key's
//! lock, so a queue holds one entry per key however often it was written.
//! Hints are in the store like everything else, so they survive kill -9. The
//! count per primary is kept in memory (loaded on start) for `shoal status`
//! and for handoff to know whom to visit.
//!
//! # Lost hints
//! A hint whose record fails its checksum carried a write this node
//! acknowledged for its primary; that write may now live on fewer than W
//! replicas, and the primary does not know it missed it. So the hint is not
//! dropped but replaced by a lost marker (the object's format, see
//! [`super::lost`]), which keeps what is hinted for the key afterwards:
//! - a read standing in for the primary (`HintGet`) answers "lost"
//!   ([`ReplicaError::HintLost`]), never "absent": the coordinator counts
//!   nothing for that primary and asks no other fallback in its place;
//! - `HintsOf` fails, so the reaper reaps nothing of the key meanwhile;
//! - handoff delivers it like any hint, flagged lost
//!   ([`crate::net::HandoffEntry::lost`]): the primary merges what it kept
//!   and marks its own copy of the key lost, so that it restores the key
//!   from every other primary ([`Replica::restore`]) instead of passing for
//!   a complete copy.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

use shoal_ring::NodeId;
use tracing::warn;

use super::lost::{decode_marker, encode_marker};
use super::{Replica, ReplicaError};
use crate::storage::{Store, StoreError, Tree, WriteBatch};
use crate::version::{decode_object, encode_object, Object};

/// The hints-tree key of the hint for `primary` and `key`.
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

fn corrupt(key: &[u8], detail: impl ToString) -> StoreError {
    StoreError::Corruption {
        tree: Tree::Hints.name(),
        key: hex::encode(key),
        detail: detail.to_string(),
    }
}

/// A page of stored hints for one primary: (hints-tree key, stored bytes).
pub type HintPage = Vec<(Vec<u8>, Vec<u8>)>;

/// A hint record as read.
enum Held {
    None,
    Hint(Object),
    /// Lost to corruption; what was hinted for the key since.
    Lost(Option<Object>),
}

/// A hint as handoff delivers it: the object to merge, and whether the
/// hint was lost (then the object is only what was hinted since).
pub fn decode_hint(bytes: &[u8]) -> Result<(Object, bool), crate::version::DecodeError> {
    match decode_marker(bytes) {
        Some(marker) => marker.map(|(_, partial)| (partial.unwrap_or_default(), true)),
        None => decode_object(bytes).map(|o| (o, false)),
    }
}

/// The key a hints-tree key is a hint for.
pub fn hinted_key(hint_key: &[u8]) -> &[u8] {
    &hint_key[16.min(hint_key.len())..]
}

/// The primary a hints-tree key is a hint for; `None` if the key is too
/// short to name one.
pub fn hint_primary(hint_key: &[u8]) -> Option<NodeId> {
    hint_key.get(..16)?.try_into().ok().map(NodeId)
}

impl<S: Store> Replica<S> {
    fn lock_hint_counts(&self) -> MutexGuard<'_, BTreeMap<NodeId, u64>> {
        self.hints_pending.lock().expect("hints lock")
    }

    /// Keeps `object` as a hint for `primary`, merged with any hint already
    /// held for the key; one of megabytes off the worker.
    pub fn store_hint(
        &self,
        primary: NodeId,
        key: &[u8],
        object: &Object,
    ) -> Result<(), StoreError> {
        crate::tasks::heavy_for(object.approx_size(), || {
            self.store_hint_here(primary, key, object)
        })
    }

    fn store_hint_here(
        &self,
        primary: NodeId,
        key: &[u8],
        object: &Object,
    ) -> Result<(), StoreError> {
        let hk = hint_key(primary, key);
        let _guard = self.lock_stripe(key);
        let (before, lost) = match self.read_hint_locked(&hk)? {
            Held::None => (None, false),
            Held::Hint(o) => (Some(o), false),
            Held::Lost(partial) => (partial, true),
        };
        let mut merged = before.clone().unwrap_or_default();
        merged.merge(object);
        if before.as_ref() != Some(&merged) {
            let bytes = if lost {
                encode_marker(0, Some(&merged))
            } else {
                encode_object(&merged)
            };
            self.store.put(Tree::Hints, &hk, &bytes)?;
        }
        self.metrics.hints_stored.fetch_add(1, Ordering::Relaxed);
        if before.is_none() && !lost {
            self.count_hints(primary, 1);
        }
        Ok(())
    }

    /// The hint stored under `hk`. A record failing its checksum is marked
    /// lost (see [`Self::mark_hint_lost`]). The caller holds the stripe of
    /// the hinted key.
    fn read_hint_locked(&self, hk: &[u8]) -> Result<Held, StoreError> {
        match self.store.get(Tree::Hints, hk) {
            Ok(Some(bytes)) => match decode_marker(&bytes) {
                Some(marker) => marker
                    .map(|(_, partial)| Held::Lost(partial))
                    .map_err(|d| corrupt(hk, d)),
                None => decode_object(&bytes)
                    .map(Held::Hint)
                    .map_err(|d| corrupt(hk, d)),
            },
            Ok(None) => Ok(Held::None),
            Err(e @ StoreError::Corruption { .. }) => {
                self.mark_hint_lost(hk, &e)?;
                Ok(Held::Lost(None))
            }
            Err(e) => Err(e),
        }
    }

    /// Replaces a hint whose record failed its checksum with a lost marker
    /// (see the module doc); it still counts as a hint for its primary. The
    /// caller holds the stripe of the hinted key.
    fn mark_hint_lost(&self, hk: &[u8], error: &StoreError) -> Result<Vec<u8>, StoreError> {
        self.metrics.count_corrupt(Tree::Hints);
        warn!(hint = %hex::encode(hk), %error, "corrupt hint: marked lost; its primary restores the key from the other primaries");
        let marker = encode_marker(0, None);
        self.store.put(Tree::Hints, hk, &marker)?;
        Ok(marker)
    }

    /// The hint held for `primary` and `key`, if any. A lost one (see the
    /// module doc) fails this read: it must not count as "no hint" towards
    /// a read quorum, nor for the reaper.
    pub fn hint(&self, primary: NodeId, key: &[u8]) -> Result<Option<Object>, ReplicaError> {
        let _guard = self.lock_stripe(key);
        match self.read_hint_locked(&hint_key(primary, key))? {
            Held::None => Ok(None),
            Held::Hint(o) => Ok(Some(o)),
            Held::Lost(_) => Err(ReplicaError::HintLost {
                key: hex::encode(key),
                primary: primary.to_hex(),
            }),
        }
    }

    /// Every hint held for `key`, by the primary it waits for; fails if one
    /// of them is lost.
    pub fn hints_of(&self, key: &[u8]) -> Result<Vec<(NodeId, Object)>, ReplicaError> {
        // Every primary hints are held for, members or not: hints for a
        // node that was removed (or whose id changed) wait here too, and
        // the reaper must see them (a hint hidden from it comes back after
        // the reap).
        let mut primaries: std::collections::BTreeSet<NodeId> =
            self.hint_counts().into_keys().collect();
        primaries.extend(self.membership.known().iter().map(|m| m.id));
        let mut found = Vec::new();
        for id in primaries {
            if let Some(o) = self.hint(id, key)? {
                found.push((id, o));
            }
        }
        Ok(found)
    }

    /// Adjusts the pending count for `primary` and the metrics gauge.
    fn count_hints(&self, primary: NodeId, delta: i64) {
        let mut pending = self.lock_hint_counts();
        let n = pending.entry(primary).or_default();
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            pending.remove(&primary);
        }
        let total: u64 = pending.values().sum();
        self.metrics.hints_pending.store(total, Ordering::Relaxed);
    }

    /// Counts the hints in the store (on start).
    pub fn load_hint_counts(&self) -> Result<u64, StoreError> {
        let mut counts: BTreeMap<NodeId, u64> = BTreeMap::new();
        let mut start = Vec::new();
        loop {
            let page = self.store.scan(Tree::Hints, &start, None, 1024)?;
            let Some((last, _)) = page.last() else { break };
            for (k, _) in &page {
                if let Some(id) = hint_primary(k) {
                    *counts.entry(id).or_default() += 1;
                }
            }
            start = last.clone();
            start.push(0);
        }
        let total = counts.values().sum();
        *self.lock_hint_counts() = counts;
        self.metrics.hints_pending.store(total, Ordering::Relaxed);
        Ok(total)
    }

    /// How many hints wait for each primary.
    pub fn hint_counts(&self) -> BTreeMap<NodeId, u64> {
        self.lock_hint_counts().clone()
    }

    /// Up to `limit` hints for `primary`, in key order, from the hints-tree
    /// key `after` on (`None`: from the first). Corrupt ones found on the
    /// way are marked lost, and listed as their markers.
    pub fn hint_page(
        &self,
        primary: NodeId,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<HintPage, StoreError> {
        let start = match after {
            Some(last) => {
                let mut s = last.to_vec();
                s.push(0);
                s
            }
            None => primary.0.to_vec(),
        };
        let end = prefix_end(primary);
        let page = self
            .store
            .scan(Tree::Hints, &start, end.as_deref(), limit)?;
        let mut healthy = Vec::with_capacity(page.len());
        for (hk, record) in page {
            match record {
                Ok(bytes) => healthy.push((hk, bytes)),
                Err(e) => {
                    // Checked again under the key's lock: a hint written
                    // over it meanwhile is listed as it is now.
                    let _guard = self.lock_stripe(hinted_key(&hk));
                    match self.store.get(Tree::Hints, &hk) {
                        Err(StoreError::Corruption { .. }) => {
                            let marker = self.mark_hint_lost(&hk, &e)?;
                            healthy.push((hk, marker));
                        }
                        Ok(Some(bytes)) => healthy.push((hk, bytes)),
                        Ok(None) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(healthy)
    }

    /// Deletes the delivered hints of `primary` that did not change since
    /// they were read (a newer write merged into one is delivered in the
    /// next round). Returns how many it deleted.
    pub fn delete_delivered(&self, primary: NodeId, sent: &[(Vec<u8>, Vec<u8>)]) -> u64 {
        let mut deleted = 0;
        for (hk, bytes) in sent {
            let _guard = self.lock_stripe(hinted_key(hk));
            match self.store.get(Tree::Hints, hk) {
                Ok(Some(now)) if &now == bytes => {
                    let mut batch = WriteBatch::default();
                    batch.delete(Tree::Hints, hk);
                    match self.store.write(batch) {
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
            self.metrics
                .hints_delivered
                .fetch_add(deleted, Ordering::Relaxed);
        }
        deleted
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
