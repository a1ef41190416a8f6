//! The reap fence: a reaped tombstone still supersedes, for as long as a
//! message can stay in flight, the copies of its key read before the reap.
//!
//! The reaper deletes a tombstone once every primary holds exactly it (see
//! [`crate::reaper`]). A copy of the key read from a replica just before
//! that replica took the tombstone can still land after the reap, in a key
//! that is absent by then: an anti-entropy exchange fetched it and merges
//! it when the answer comes back, a write's send carries an older copy the
//! coordinator held, a read repair writes what it heard. Merged as it is,
//! such a copy brings the deleted values back (explore seed 3135: node3,
//! back after a long absence with the values the delete superseded, was
//! asked for them by an exchange, got the tombstone by handoff, the key
//! was reaped everywhere, and the exchange's answer was merged after).
//!
//! Such a copy is in flight no longer than a message lives (the bound the
//! config already holds the grace period to: the longest request, the
//! read-repair window and a connection's idle time). For that long the
//! replica keeps each tombstone it reaped, and what is merged into the
//! absent key keeps only the siblings the tombstone does not cover: writes
//! made after the reap, never the values it deleted.

use std::collections::{HashMap, VecDeque};
use std::sync::MutexGuard;
use std::time::Duration;

use super::Replica;
use crate::storage::Store;
use crate::version::Object;

impl<S: Store> Replica<S> {
    pub(super) fn lock_fence(&self) -> MutexGuard<'_, Fence> {
        self.fence.lock().expect("fence lock")
    }
}

/// Tombstones reaped here in the last `window`, by key.
#[derive(Debug)]
pub(super) struct Fence {
    window_ms: u64,
    reaped: HashMap<Vec<u8>, (u64, Object)>,
    /// Keys in the order their entries expire (a key reaped twice appears
    /// twice; only its entry's own deadline removes it).
    expiry: VecDeque<(u64, Vec<u8>)>,
}

impl Fence {
    pub(super) fn new(window: Duration) -> Self {
        Fence {
            window_ms: window.as_millis() as u64,
            reaped: HashMap::new(),
            expiry: VecDeque::new(),
        }
    }

    /// `tombstone` of `key` was reaped here at `now_ms`.
    pub(super) fn reaped(&mut self, key: &[u8], tombstone: &Object, now_ms: u64) {
        self.expire(now_ms);
        if self.window_ms == 0 {
            return;
        }
        let until = now_ms.saturating_add(self.window_ms);
        self.reaped.insert(key.to_vec(), (until, tombstone.clone()));
        self.expiry.push_back((until, key.to_vec()));
    }

    /// What of `incoming` may be merged into `key`, absent here, at
    /// `now_ms`: `None` when no reap fences the key (all of it), else the
    /// siblings the reaped tombstone does not cover (possibly none), with
    /// the history of both.
    pub(super) fn admit(&mut self, key: &[u8], incoming: &Object, now_ms: u64) -> Option<Object> {
        self.expire(now_ms);
        let (_, tombstone) = self.reaped.get(key)?;
        let mut admitted = Object::merged(tombstone, incoming);
        admitted.drop_siblings_of(tombstone);
        Some(admitted)
    }

    fn expire(&mut self, now_ms: u64) {
        while let Some((until, _)) = self.expiry.front() {
            if *until > now_ms {
                break;
            }
            let (until, key) = self.expiry.pop_front().expect("a front");
            if self.reaped.get(&key).is_some_and(|(u, _)| *u == until) {
                self.reaped.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use shoal_ring::NodeId;

    use super::*;
    use crate::replica::trees::tests::replica_over;
    use crate::storage::MemoryStore;
    use crate::version::VersionVector;

    /// `object` with `value` (None: a delete) written over `ctx` by node
    /// `writer`, stamped at time 0 (long past any grace).
    fn update(object: &Object, ctx: &VersionVector, value: Option<&[u8]>, writer: u128) -> Object {
        let mut o = object.clone();
        o.update(ctx, value.map(<[u8]>::to_vec), NodeId::from_u128(writer), 0);
        o
    }

    fn values(o: &Option<Object>) -> Vec<Vec<u8>> {
        o.iter()
            .flat_map(|o| o.values().map(<[u8]>::to_vec))
            .collect()
    }

    /// A copy read before the reap and merged after it: the deleted value
    /// stays deleted, and a write made after the reap (under an actor the
    /// tombstone never saw) gets in.
    #[test]
    fn a_copy_read_before_a_reap_does_not_bring_the_key_back() {
        let r = replica_over(Arc::new(MemoryStore::new()));
        let old = update(&Object::default(), &VersionVector::new(), Some(b"old"), 7);
        let tombstone = update(&old, &old.context(), None, 8);
        r.merge(b"k", &tombstone).unwrap();
        assert!(r.reap(b"k", &tombstone).unwrap(), "reaped");
        r.merge(b"k", &old).unwrap();
        assert_eq!(r.get(b"k").unwrap(), None, "the reaped key came back");
        r.merge(b"k", &tombstone).unwrap();
        assert_eq!(r.get(b"k").unwrap(), None, "the reaped tombstone came back");
        let newer = update(&old, &VersionVector::new(), Some(b"new"), 9);
        r.merge(b"k", &newer).unwrap();
        assert_eq!(values(&r.get(b"k").unwrap()), vec![b"new".to_vec()]);
    }

    #[test]
    fn the_fence_lasts_its_window() {
        let old = update(&Object::default(), &VersionVector::new(), Some(b"old"), 7);
        let tombstone = update(&old, &old.context(), None, 8);
        let mut fence = Fence::new(Duration::from_millis(100));
        fence.reaped(b"k", &tombstone, 1_000);
        let admitted = fence.admit(b"k", &old, 1_099).expect("fenced");
        assert_eq!(admitted.values().count(), 0);
        assert!(admitted.siblings().is_empty());
        assert!(fence.admit(b"other", &old, 1_099).is_none());
        // Reaped again later (written and deleted again): the first entry's
        // deadline does not end the second.
        fence.reaped(b"k", &tombstone, 1_050);
        assert!(fence.admit(b"k", &old, 1_120).is_some());
        assert!(fence.admit(b"k", &old, 1_150).is_none());
        let mut off = Fence::new(Duration::ZERO);
        off.reaped(b"k", &tombstone, 1_000);
        assert!(off.admit(b"k", &old, 1_000).is_none());
    }
}
