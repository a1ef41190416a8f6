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
//! replica keeps the history (clock) of each tombstone it reaped, and a
//! change to the absent key starts from that history instead of from
//! nothing: a merge keeps only the siblings the tombstone does not cover
//! (writes made after the reap, never the values it deleted), and a write
//! made here carries the history on, so that a stale copy merged after
//! it is still covered. A replica restoring a copy lost to corruption is
//! answered with the history too, and a restore that leaves nothing but
//! a history fences the key like a reap (see [`super::lost`]).
//!
//! The entries are kept in the meta tree too (under [`PREFIX`] and the
//! key), written in the reap's (or restore's) own batch: a copy sent
//! before a restart can arrive after it, and a replica that restarts
//! within the window keeps fencing.

use std::collections::{HashMap, VecDeque};
use std::sync::MutexGuard;
use std::time::Duration;

use tracing::warn;

use super::{reapable, trees, Commit, Replica, Stored};
use crate::storage::{Store, StoreError, Tree, WriteBatch};
use crate::version::{decode_object, encode_object, Object};

/// The fence's entries in [`Tree::Meta`]: this prefix ++ key ++ deadline
/// (ms, 8 bytes big endian) -> history; a deadline in the name, so that a
/// deadline's passing deletes that entry and never a later one's.
const PREFIX: &[u8] = b"fence/";
/// The first key past [`PREFIX`]'s.
const PAST_PREFIX: &[u8] = b"fence0";

fn entry_key(key: &[u8], until: u64) -> Vec<u8> {
    [PREFIX, key, &until.to_be_bytes()].concat()
}

/// The key and deadline an entry's name holds.
fn parse_entry_key(name: &[u8]) -> Option<(&[u8], u64)> {
    let rest = name.strip_prefix(PREFIX)?;
    let (key, until) = rest.split_at_checked(rest.len().checked_sub(8)?)?;
    Some((key, u64::from_be_bytes(until.try_into().ok()?)))
}

impl<S: Store> Replica<S> {
    pub(super) fn lock_fence(&self) -> MutexGuard<'_, Fence> {
        self.fence.lock().expect("fence lock")
    }

    /// What a change to `key`, absent here, starts from: the history of
    /// its tombstone if it was reaped here lately, else nothing.
    pub(super) fn absent_start(&self, key: &[u8]) -> Object {
        let now = self.now_ms();
        self.lock_fence().history(key, now).unwrap_or_default()
    }

    /// This replica's copy of `key` for a restore elsewhere (see
    /// [`super::lost`]): as [`Self::get`], merged with the history of the
    /// key's tombstone if it was reaped here lately (a clock, no
    /// siblings; alone when nothing is stored), so that the restored copy
    /// drops what the delete superseded. The restoring replica may have
    /// no fence of its own (its copy was found corrupt when the others
    /// reaped), and a stale copy merged into its partial copy since would
    /// otherwise be restored from primaries that all answer "absent". A
    /// history covers only what the delete superseded, so merging it into
    /// any copy drops nothing written since (a copy written after the reap
    /// started from it, and a partial copy may hold a stale value too).
    pub fn restore_copy(&self, key: &[u8]) -> Result<Option<Object>, StoreError> {
        let mut stripe = self.lock_stripe(key);
        let copy = self.copy(&mut stripe, key)?;
        Ok(
            match (copy, self.lock_fence().history(key, self.now_ms())) {
                (Some(copy), Some(history)) => Some(Object::merged(&copy, &history)),
                (copy, history) => copy.or(history),
            },
        )
    }

    /// Fences `key`, gone here at `now` (`gone`: its reaped tombstone, or
    /// the history a restore came back with): the entry goes in `batch`,
    /// with the deletes of the entries past their window, and into the
    /// fence in memory at once, before the caller's write (a write that
    /// fails may still have deleted the key; the entry then covers only
    /// what that delete superseded, wherever it is read).
    pub(super) fn fence_in(&self, key: &[u8], gone: &Object, now: u64, batch: &mut WriteBatch) {
        let mut fence = self.lock_fence();
        for (until, expired) in fence.expire(now) {
            batch.delete(Tree::Meta, &entry_key(&expired, until));
        }
        if let Some((until, history)) = fence.entry(gone, now) {
            batch.put(Tree::Meta, &entry_key(key, until), &encode_object(&history));
            fence.insert(key, until, history);
        }
    }

    /// Removes the local object of `key` if it is exactly `expected`, a
    /// tombstone whose grace period has passed by this node's own clock (so
    /// one node with a fast clock cannot reap early for all); returns
    /// whether it did. The key's fence entry is written in the same batch
    /// as the delete, with the deletes of the entries past their window.
    /// A copy found lost is not removed; `expected` is merged into its
    /// partial copy (see [`super::lost`]).
    pub fn reap(&self, key: &[u8], expected: &Object) -> Result<bool, StoreError> {
        let now = self.now_ms();
        if !reapable(expected, self.settings.tombstone_grace, now) {
            return Ok(false);
        }
        let mut stripe = self.lock_stripe(key);
        let raw = match self.stored_record(&mut stripe, key)? {
            Stored::Present(raw) => raw,
            Stored::Absent => return Ok(false),
            // Found lost (now, or since the reaper's check): not reaped,
            // but the partial copy takes the tombstone every other
            // primary reaps, so that a stale copy merged into it later is
            // dropped however long the restore waits (their fences may
            // have expired by then).
            Stored::Lost { .. } => {
                drop(stripe);
                self.merge(key, expected)?;
                return Ok(false);
            }
        };
        if decode_object(&raw).ok().as_ref() != Some(expected) {
            return Ok(false);
        }
        let mut batch = WriteBatch::default();
        self.fence_in(key, expected, now, &mut batch);
        let digest = Some(trees::digest(&raw));
        self.store_object(&mut stripe, key, digest, None, Commit::Now, batch)
            .map(drop)?;
        // Forgotten here: never write under its actors again (before the
        // stripe is released, so no write to the key sees them live).
        let full = self.actors.retire(expected);
        drop(stripe);
        if full {
            self.new_incarnation("retired actors reached their bound")?;
        }
        Ok(true)
    }
}

/// Histories of the tombstones reaped here (or restored away) in the last
/// `window`, by key.
#[derive(Debug)]
pub(super) struct Fence {
    window_ms: u64,
    reaped: HashMap<Vec<u8>, (u64, Object)>,
    /// Keys in the order their entries expire (a key reaped twice appears
    /// twice; only its entry's own deadline removes it).
    expiry: VecDeque<(u64, Vec<u8>)>,
}

impl Fence {
    /// The fence `store` kept, at `now_ms`; entries past their window are
    /// deleted from it, and one that cannot be read is dropped (its key
    /// is no longer fenced; logged).
    pub(super) fn load<S: Store>(
        store: &S,
        window: Duration,
        now_ms: u64,
    ) -> Result<Self, StoreError> {
        let mut fence = Fence {
            window_ms: window.as_millis() as u64,
            reaped: HashMap::new(),
            expiry: VecDeque::new(),
        };
        let mut entries = Vec::new();
        let mut gone = WriteBatch::default();
        let mut start = PREFIX.to_vec();
        loop {
            let page = store.scan(Tree::Meta, &start, Some(PAST_PREFIX), 1024)?;
            let Some((last, _)) = page.last() else { break };
            start = [last.as_slice(), &[0]].concat();
            for (name, record) in page {
                let entry = parse_entry_key(&name).ok_or_else(|| "a malformed name".to_string());
                let entry = entry.and_then(|(key, until)| {
                    let bytes = record.map_err(|e| e.to_string())?;
                    let history = decode_object(&bytes).map_err(|e| e.to_string())?;
                    Ok((key.to_vec(), until, history))
                });
                match entry {
                    Ok((key, until, history)) if until > now_ms => {
                        entries.push((until, key, history))
                    }
                    Ok(_) => {
                        gone.delete(Tree::Meta, &name);
                    }
                    Err(e) => {
                        warn!(entry = %hex::encode(&name), error = %e,
                            "a reap fence entry could not be read: dropped, its key no longer fenced");
                        gone.delete(Tree::Meta, &name);
                    }
                }
            }
        }
        if !gone.ops.is_empty() {
            store.write(gone)?;
        }
        entries.sort_by_key(|(until, _, _)| *until);
        for (until, key, history) in entries {
            fence.insert(&key, until, history);
        }
        Ok(fence)
    }

    /// The entry fencing a key whose `tombstone` is reaped at `now_ms`:
    /// its deadline and the tombstone's history; none when the fence is off.
    fn entry(&self, tombstone: &Object, now_ms: u64) -> Option<(u64, Object)> {
        if self.window_ms == 0 {
            return None;
        }
        let mut history = tombstone.clone();
        history.drop_siblings_of(tombstone);
        Some((now_ms.saturating_add(self.window_ms), history))
    }

    fn insert(&mut self, key: &[u8], until: u64, history: Object) {
        self.reaped.insert(key.to_vec(), (until, history));
        self.expiry.push_back((until, key.to_vec()));
    }

    /// What a change to `key`, absent here, starts from at `now_ms`: the
    /// history of the tombstone reaped here lately, without its siblings;
    /// `None` when no reap fences the key (nothing).
    pub(super) fn history(&self, key: &[u8], now_ms: u64) -> Option<Object> {
        let (until, history) = self.reaped.get(key)?;
        (*until > now_ms).then(|| history.clone())
    }

    /// Forgets the entries past their window at `now_ms`; returns each
    /// one's deadline and key (a key reaped twice has two).
    fn expire(&mut self, now_ms: u64) -> Vec<(u64, Vec<u8>)> {
        let mut expired = Vec::new();
        while let Some((until, _)) = self.expiry.front() {
            if *until > now_ms {
                break;
            }
            let (until, key) = self.expiry.pop_front().expect("a front");
            if self.reaped.get(&key).is_some_and(|(u, _)| *u == until) {
                self.reaped.remove(&key);
            }
            expired.push((until, key));
        }
        expired
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

    /// A replica over `store` that took a tombstone of key `k` over `old`
    /// and reaped it.
    fn reaped(store: Arc<MemoryStore>) -> (Replica<MemoryStore>, Object, Object) {
        let r = replica_over(store);
        let old = update(&Object::default(), &VersionVector::new(), Some(b"old"), 7);
        let tombstone = update(&old, &old.context(), None, 8);
        r.merge(b"k", &tombstone).unwrap();
        assert!(r.reap(b"k", &tombstone).unwrap(), "reaped");
        (r, old, tombstone)
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
        let (r, old, tombstone) = reaped(Arc::new(MemoryStore::new()));
        r.merge(b"k", &old).unwrap();
        assert_eq!(r.get(b"k").unwrap(), None, "the reaped key came back");
        r.merge(b"k", &tombstone).unwrap();
        assert_eq!(r.get(b"k").unwrap(), None, "the reaped tombstone came back");
        let newer = update(&old, &VersionVector::new(), Some(b"new"), 9);
        r.merge(b"k", &newer).unwrap();
        assert_eq!(values(&r.get(b"k").unwrap()), vec![b"new".to_vec()]);
    }

    /// A write made here after the reap (a blind put, or any whose context
    /// lacks the deleted value) starts from the tombstone's history: a copy
    /// read before the reap and merged after the write still cannot bring
    /// the deleted value back beside it.
    #[test]
    fn a_write_after_the_reap_keeps_the_fence() {
        let (r, old, _) = reaped(Arc::new(MemoryStore::new()));
        let _written = r
            .write(b"k", &VersionVector::new(), Some(b"new".to_vec()))
            .unwrap();
        r.merge(b"k", &old).unwrap();
        assert_eq!(
            values(&r.get(b"k").unwrap()),
            vec![b"new".to_vec()],
            "the reaped value came back beside the write"
        );
    }

    /// A lost hint's copy merged into a key reaped here lately (the key is
    /// then restored from the other primaries, which reaped it too) keeps
    /// only what the tombstone does not cover.
    #[test]
    fn a_lost_hints_copy_does_not_bring_a_reaped_key_back() {
        let (r, old, _) = reaped(Arc::new(MemoryStore::new()));
        r.merge_incomplete(b"k", &old).unwrap();
        let generation = r.lost_generation(b"k").unwrap().expect("not marked lost");
        assert!(r.restore(b"k", generation, &[None, None]).unwrap());
        let stored = r.store().get(crate::storage::Tree::Objects, b"k").unwrap();
        assert_eq!(stored, None, "the reaped key came back: {:?}", r.get(b"k"));
    }

    /// A copy lost here exactly when the other primaries reaped the key
    /// (the reaper met the corrupt record and marked it lost instead), with
    /// a stale copy merged into it since: restored from primaries that
    /// answer with their tombstone's history, the deleted value does not
    /// come back, and this replica fences the key from then on.
    #[test]
    fn a_restore_from_primaries_that_reaped_the_key_does_not_bring_it_back() {
        let (b, old, _) = reaped(Arc::new(MemoryStore::new()));
        let (c, _, _) = reaped(Arc::new(MemoryStore::new()));
        let a = replica_over(Arc::new(MemoryStore::new()));
        a.merge_incomplete(b"k", &old).unwrap();
        let generation = a.lost_generation(b"k").unwrap().expect("not marked lost");
        let copies = [b.restore_copy(b"k").unwrap(), c.restore_copy(b"k").unwrap()];
        assert!(a.restore(b"k", generation, &copies).unwrap());
        assert_eq!(a.get(b"k").unwrap(), None, "the reaped key came back");
        a.merge(b"k", &old).unwrap();
        assert_eq!(a.get(b"k").unwrap(), None, "the reaped key came back later");
    }

    /// A copy found corrupt by its own reap (the other primaries reaped the
    /// key), a stale copy merged into it since, restored only after every
    /// other primary's fence expired (they answer "absent", with no
    /// history): the lost copy kept the tombstone the reap was asked about,
    /// so the deleted value does not come back.
    #[test]
    fn a_copy_found_lost_by_its_reap_keeps_the_tombstone() {
        let store = Arc::new(MemoryStore::new());
        let a = replica_over(store.clone());
        let old = update(&Object::default(), &VersionVector::new(), Some(b"old"), 7);
        let tombstone = update(&old, &old.context(), None, 8);
        a.merge(b"k", &tombstone).unwrap();
        store.corrupt(Tree::Objects, b"k");
        a.drop_cache();
        assert!(!a.reap(b"k", &tombstone).unwrap(), "a lost copy was reaped");
        a.merge(b"k", &old).unwrap();
        let generation = a.lost_generation(b"k").unwrap().expect("not marked lost");
        assert!(a.restore(b"k", generation, &[None, None]).unwrap());
        // The tombstone stays (anti-entropy spreads it and the reaper
        // reaps it again): the key is deleted, not back.
        let restored = a.get(b"k").unwrap();
        assert!(
            values(&restored).is_empty(),
            "the reaped key came back: {restored:?}"
        );
    }

    /// A copy lost here within the window of a reap here (a write made
    /// after the reap, its record corrupt since): a stale copy merged into
    /// the lost copy is restored within the fence all the same.
    #[test]
    fn a_copy_lost_after_a_reap_here_is_restored_within_the_fence() {
        let store = Arc::new(MemoryStore::new());
        let (r, old, _) = reaped(store.clone());
        let newer = update(&old, &VersionVector::new(), Some(b"new"), 9);
        r.merge(b"k", &newer).unwrap();
        store.corrupt(Tree::Objects, b"k");
        r.drop_cache();
        r.merge(b"k", &old).unwrap();
        let generation = r.lost_generation(b"k").unwrap().expect("not marked lost");
        // The others lost "new" too (W copies gone, past the guarantee):
        // "old" is what the restore must not bring back.
        assert!(r.restore(b"k", generation, &[None, None]).unwrap());
        assert_eq!(r.get(b"k").unwrap(), None, "the reaped key came back");
    }

    /// A restore that leaves nothing forgets the key's clock, as a reap
    /// does: the actors it names are retired here, so no dot they minted
    /// is minted again once the fence has expired.
    #[test]
    fn a_restore_to_nothing_retires_the_forgotten_actors() {
        let a = replica_over(Arc::new(MemoryStore::new()));
        // Written and deleted at a, long ago, under a's actor.
        let x = a.actors.fresh().unwrap();
        let mut tombstone = Object::default();
        tombstone.update(&VersionVector::new(), Some(b"v".to_vec()), x, 0);
        tombstone.update(&tombstone.context(), None, x, 0);
        a.merge(b"k", &tombstone).unwrap();
        let b = replica_over(Arc::new(MemoryStore::new()));
        b.merge(b"k", &tombstone).unwrap();
        assert!(b.reap(b"k", &tombstone).unwrap(), "reaped");
        // a's copy is lost before a reaps it.
        a.merge_incomplete(b"k", &tombstone).unwrap();
        let generation = a.lost_generation(b"k").unwrap().expect("not marked lost");
        let copy = b.restore_copy(b"k").unwrap();
        assert!(copy.is_some(), "no history");
        assert!(a.restore(b"k", generation, &[copy.clone(), copy]).unwrap());
        assert_eq!(a.get(b"k").unwrap(), None);
        let next = a
            .actors
            .for_write(&tombstone, &VersionVector::new())
            .unwrap();
        assert_ne!(next, x, "a forgotten actor writes on");
    }

    /// A store whose next write is applied and then reported failed (as a
    /// WAL sync that fails after the write).
    struct FailsAfterWriting {
        inner: MemoryStore,
        fail_next: std::sync::atomic::AtomicBool,
    }

    impl Store for FailsAfterWriting {
        fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get(tree, key)
        }
        fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
            self.inner.write(batch)?;
            match self
                .fail_next
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                true => Err(StoreError::Io {
                    op: "sync",
                    detail: "failed after the write".into(),
                }),
                false => Ok(()),
            }
        }
        fn write_synced(&self, batch: WriteBatch) -> Result<(), StoreError> {
            self.write(batch)
        }
        fn sync_wal(&self) -> Result<(), StoreError> {
            self.inner.sync_wal()
        }
        fn scan(
            &self,
            tree: Tree,
            start: &[u8],
            end: Option<&[u8]>,
            limit: usize,
        ) -> Result<Vec<crate::storage::Scanned>, StoreError> {
            self.inner.scan(tree, start, end, limit)
        }
        fn approximate_bytes(&self, tree: Tree) -> u64 {
            self.inner.approximate_bytes(tree)
        }
    }

    /// A reap whose write fails may still have deleted the key: the key
    /// is fenced all the same.
    #[test]
    fn a_reap_whose_write_fails_still_fences() {
        let store = Arc::new(FailsAfterWriting {
            inner: MemoryStore::new(),
            fail_next: false.into(),
        });
        let r = replica_over(store.clone());
        let old = update(&Object::default(), &VersionVector::new(), Some(b"old"), 7);
        let tombstone = update(&old, &old.context(), None, 8);
        r.merge(b"k", &tombstone).unwrap();
        store
            .fail_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(r.reap(b"k", &tombstone).is_err(), "the write failed");
        r.merge(b"k", &old).unwrap();
        assert_eq!(r.get(b"k").unwrap(), None, "the reaped key came back");
    }

    #[test]
    fn the_fence_lasts_its_window() {
        let old = update(&Object::default(), &VersionVector::new(), Some(b"old"), 7);
        let tombstone = update(&old, &old.context(), None, 8);
        let store = MemoryStore::new();
        let mut fence = Fence::load(&store, Duration::from_millis(100), 0).unwrap();
        let reap = |fence: &mut Fence, at| {
            let (until, history) = fence.entry(&tombstone, at).expect("fencing");
            fence.insert(b"k", until, history);
        };
        reap(&mut fence, 1_000);
        let history = fence.history(b"k", 1_099).expect("fenced");
        assert!(history.siblings().is_empty());
        assert!(Object::merged(&history, &old).siblings().is_empty());
        assert!(fence.history(b"other", 1_099).is_none());
        assert!(fence.history(b"k", 1_100).is_none());
        // Reaped again later (written and deleted again): the first entry's
        // deadline does not end the second.
        reap(&mut fence, 1_050);
        assert_eq!(fence.expire(1_100), vec![(1_100, b"k".to_vec())]);
        assert!(fence.history(b"k", 1_120).is_some());
        assert_eq!(fence.expire(1_150), vec![(1_150, b"k".to_vec())]);
        assert!(fence.history(b"k", 1_120).is_none());
        let off = Fence::load(&store, Duration::ZERO, 0).unwrap();
        assert!(off.entry(&tombstone, 1_000).is_none());
    }

    /// A replica that restarts within the window still fences the key (a
    /// copy sent before the restart can arrive after it); once the window
    /// has passed, the stored entry goes.
    #[test]
    fn the_fence_outlives_a_restart() {
        let store = Arc::new(MemoryStore::new());
        let (r, old, _) = reaped(store.clone());
        let reaped_at = r.now_ms();
        drop(r);
        // Entries that cannot be read are dropped at start, the rest kept.
        store.put(Tree::Meta, b"fence/k", b"no deadline").unwrap();
        let junk = entry_key(b"j", reaped_at + 30_000);
        store.put(Tree::Meta, &junk, b"not an object").unwrap();
        let r = replica_over(store.clone());
        let entries = store
            .scan(Tree::Meta, PREFIX, Some(PAST_PREFIX), 10)
            .unwrap();
        let names: Vec<_> = entries
            .iter()
            .map(|(name, _)| parse_entry_key(name))
            .collect();
        assert!(matches!(names[..], [Some((b"k", _))]), "{names:?}");
        r.merge(b"k", &old).unwrap();
        assert_eq!(
            r.get(b"k").unwrap(),
            None,
            "the reaped key came back after a restart"
        );
        let later = reaped_at + 61_000;
        let fence = Fence::load(store.as_ref(), Duration::from_secs(60), later).unwrap();
        assert!(fence.history(b"k", later).is_none());
        let entries = store
            .scan(Tree::Meta, PREFIX, Some(PAST_PREFIX), 10)
            .unwrap();
        assert!(entries.is_empty(), "an expired entry stays in the store");
    }
}
