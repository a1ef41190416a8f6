//! Hint storage: writes kept for a down primary until handoff delivers them
//! (see [`crate::handoff`] for where hints come from and how they travel).
//!
//! [`Tree::Hints`] maps `primary id (16 bytes) ++ key` to the object. A second
//! hint for the same key and primary is merged into the first under the key's
//! lock, so a queue holds one entry per key however often it was written.
//! Hints are in the store like everything else, so they survive kill -9. The
//! count per primary is kept in memory (loaded on start) for `shoal status`
//! and for handoff to know whom to visit.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

use shoal_ring::NodeId;
use tracing::warn;

use super::Replica;
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
    /// held for the key.
    pub fn store_hint(
        &self,
        primary: NodeId,
        key: &[u8],
        object: &Object,
    ) -> Result<(), StoreError> {
        let hk = hint_key(primary, key);
        let _guard = self.lock_stripe(key);
        let (before, _) = self.read_hint_locked(&hk)?;
        let mut merged = before.clone().unwrap_or_default();
        merged.merge(object);
        if before.as_ref() != Some(&merged) {
            self.store.put(Tree::Hints, &hk, &encode_object(&merged))?;
        }
        self.metrics.hints_stored.fetch_add(1, Ordering::Relaxed);
        if before.is_none() {
            self.count_hints(primary, 1);
        }
        Ok(())
    }

    /// The hint stored under `hk`. A record failing its checksum is dropped
    /// (see [`Self::drop_corrupt_hint`]) and read as absent; the corruption
    /// is returned beside. The caller holds the stripe of the hinted key.
    fn read_hint_locked(
        &self,
        hk: &[u8],
    ) -> Result<(Option<Object>, Option<StoreError>), StoreError> {
        match self.store.get(Tree::Hints, hk) {
            Ok(Some(bytes)) => decode_object(&bytes)
                .map(|o| (Some(o), None))
                .map_err(|d| corrupt(hk, d)),
            Ok(None) => Ok((None, None)),
            Err(e @ StoreError::Corruption { .. }) => {
                self.drop_corrupt_hint(hk, &e)?;
                Ok((None, Some(e)))
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes a hint whose record failed its checksum: it can never be
    /// delivered, and kept it would be met again by every handoff round.
    /// The write it carried lives on the replicas that acknowledged it,
    /// and anti-entropy brings the primary up to date. The caller holds the
    /// stripe of the hinted key.
    fn drop_corrupt_hint(&self, hk: &[u8], error: &StoreError) -> Result<(), StoreError> {
        self.metrics.count_corrupt(Tree::Hints);
        warn!(hint = %hex::encode(hk), %error, "corrupt hint dropped");
        let mut batch = WriteBatch::default();
        batch.delete(Tree::Hints, hk);
        self.store.write(batch)?;
        if let Some(id) = hint_primary(hk) {
            self.count_hints(id, -1);
        }
        Ok(())
    }

    /// The hint held for `primary` and `key`, if any. A corrupt one fails
    /// this read (it must not count as "no hint" towards a read quorum, nor
    /// for the reaper) and is dropped.
    pub fn hint(&self, primary: NodeId, key: &[u8]) -> Result<Option<Object>, StoreError> {
        let _guard = self.lock_stripe(key);
        match self.read_hint_locked(&hint_key(primary, key))? {
            (_, Some(dropped)) => Err(dropped),
            (hint, None) => Ok(hint),
        }
    }

    /// Every hint held for `key`, by the primary it waits for.
    pub fn hints_of(&self, key: &[u8]) -> Result<Vec<(NodeId, Object)>, StoreError> {
        let mut found = Vec::new();
        for m in self.membership.known() {
            if let Some(o) = self.hint(m.id, key)? {
                found.push((m.id, o));
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
    /// way are dropped and left out.
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
                    // over it meanwhile is kept.
                    let _guard = self.lock_stripe(hinted_key(&hk));
                    if let Err(StoreError::Corruption { .. }) = self.store.get(Tree::Hints, &hk) {
                        self.drop_corrupt_hint(&hk, &e)?;
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
