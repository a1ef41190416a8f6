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

/// The fence entries `store` holds, by name.
fn fence_entries(store: &MemoryStore) -> Vec<crate::storage::Scanned> {
    store
        .scan(Tree::Meta, PREFIX, Some(PAST_PREFIX), 10)
        .unwrap()
}

/// Corrupts the one fence entry `store` holds (a reap's).
fn corrupt_the_fence_entry(store: &MemoryStore) {
    let entries = fence_entries(store);
    assert_eq!(entries.len(), 1, "{entries:?}");
    store.corrupt(Tree::Meta, &entries[0].0);
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
        .write(b"k", &Default::default(), Some(b"new".to_vec()))
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
        let (deadline, history) = fence.entry(&tombstone, at, at).expect("fencing");
        fence.insert(b"k", deadline, history);
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
    assert!(off.entry(&tombstone, 1_000, 1_000).is_none());
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
    // An entry with no key in its name is deleted at the start; one that
    // cannot be read is kept, and its absent key refused changes.
    store.put(Tree::Meta, b"fence/k", b"no deadline").unwrap();
    let junk = entry_key(b"j", reaped_at + 30_000);
    store.put(Tree::Meta, &junk, b"not an object").unwrap();
    let r = replica_over(store.clone());
    let entries = fence_entries(&store);
    let names: Vec<_> = entries
        .iter()
        .map(|(name, _)| parse_entry_key(name))
        .collect();
    assert!(
        matches!(names[..], [Some((b"j", _)), Some((b"k", _))]),
        "{names:?}"
    );
    assert!(
        r.merge(b"j", &old).is_err(),
        "a key with no readable fence took a change"
    );
    r.merge(b"k", &old).unwrap();
    assert_eq!(
        r.get(b"k").unwrap(),
        None,
        "the reaped key came back after a restart"
    );
    let later = reaped_at + 61_000;
    let fence = Fence::load(store.as_ref(), Duration::from_secs(60), later).unwrap();
    assert!(fence.history(b"k", later).is_none());
    let entries = fence_entries(&store);
    assert!(entries.is_empty(), "an expired entry stays in the store");
}

/// A fence entry that cannot be read at a restart within its window does
/// not leave its key unfenced: while the key is absent here, a change to
/// it (a stale copy merged, a write) is refused for a window from that
/// restart (its checksum failed, so the deadline in its name is not
/// trusted), across a second restart too; a restore elsewhere is still
/// answered; past the window the entry goes.
#[test]
fn an_unreadable_fence_entry_refuses_changes_to_its_absent_key_for_a_window() {
    let store = Arc::new(MemoryStore::new());
    let (r, old, _) = reaped(store.clone());
    drop(r);
    corrupt_the_fence_entry(&store);
    // The first restart's clock, read after its load: the entry it rewrote
    // refuses until a window from its load, at the latest from this.
    let mut restarted_at = None;
    for restart in ["a restart", "a second restart"] {
        let r = replica_over(store.clone());
        restarted_at.get_or_insert(r.now_ms());
        let merged = r.merge(b"k", &old);
        assert!(
            matches!(merged, Err(StoreError::Corruption { .. })),
            "the reaped key took a stale copy after {restart}: {merged:?}"
        );
        assert_eq!(r.get(b"k").unwrap(), None, "the reaped key came back");
        let fresh = update(&Object::default(), &VersionVector::new(), Some(b"new"), 9);
        assert!(r.merge(b"k", &fresh).is_err(), "no history to start from");
        // A restore elsewhere is answered at once (waiting would let the
        // other primaries' fences expire): absent, with no history here.
        assert_eq!(r.restore_copy(b"k").unwrap(), None);
    }
    let later = restarted_at.expect("restarted") + 61_000;
    let fence = Fence::load(store.as_ref(), Duration::from_secs(60), later).unwrap();
    assert!(fence.refused(b"k", later).is_ok());
    let entries = fence_entries(&store);
    assert!(entries.is_empty(), "an expired entry stays in the store");
}

/// A key written since its reap carries the fence's history in its
/// object: an unreadable entry for it refuses nothing.
#[test]
fn an_unreadable_fence_entry_of_a_key_written_since_refuses_nothing() {
    let store = Arc::new(MemoryStore::new());
    let (r, old, _) = reaped(store.clone());
    let new = update(&Object::default(), &VersionVector::new(), Some(b"new"), 9);
    r.merge(b"k", &new).unwrap();
    drop(r);
    corrupt_the_fence_entry(&store);
    let r = replica_over(store.clone());
    r.merge(b"k", &old).unwrap();
    assert_eq!(values(&r.read(b"k").unwrap()), vec![b"new".to_vec()]);
}

/// A later reap's readable entry covers an earlier unreadable one (the
/// key's history went on from it): nothing is refused.
#[test]
fn a_later_readable_entry_covers_an_unreadable_one() {
    let mut fence = Fence::load(&MemoryStore::new(), Duration::from_millis(100), 0).unwrap();
    fence.unreadable.insert(b"k".to_vec(), 50);
    assert!(fence.refused(b"k", 10).is_err());
    fence.insert(b"k", (60, 60), Object::default());
    assert!(fence.refused(b"k", 10).is_ok());
    assert!(fence.refused(b"j", 10).is_ok());
}

/// An unreadable entry's deadline comes from its name, which the record's
/// checksum covers too: a name whose deadline bytes were damaged may say
/// years. No entry outlasts a window from the start that read it.
#[test]
fn an_unreadable_entry_refuses_for_a_window_at_most() {
    let store = MemoryStore::new();
    let years = 10 * 365 * 86_400_000;
    store
        .put(Tree::Meta, &entry_key(b"k", years), b"not an object")
        .unwrap();
    let fence = Fence::load(&store, Duration::from_secs(60), 1_000).unwrap();
    assert!(fence.refused(b"k", 1_000).is_err());
    assert!(
        fence.refused(b"k", 61_001).is_ok(),
        "an unreadable entry refused past a window from the start"
    );
    // A restart within that window still refuses; past it, nothing is left.
    let again = Fence::load(&store, Duration::from_secs(60), 2_000).unwrap();
    assert!(again.refused(b"k", 2_000).is_err());
    Fence::load(&store, Duration::from_secs(60), 61_001).unwrap();
    assert!(
        fence_entries(&store).is_empty(),
        "{:?}",
        fence_entries(&store)
    );
}

/// The record's checksum covers its name: an entry that fails it may
/// hold a damaged deadline, earlier than its own as easily as later. It
/// is not taken for expired, nor trusted to end early: its key is refused
/// changes for a window from the start (review of the unreadable-entry
/// fix, helper-57).
#[test]
fn an_entry_failing_its_checksum_is_not_taken_for_expired() {
    let store = MemoryStore::new();
    // Its name says it ended at 500; loaded at 1_000.
    let name = entry_key(b"k", 500);
    store.put(Tree::Meta, &name, b"history").unwrap();
    store.corrupt(Tree::Meta, &name);
    let fence = Fence::load(&store, Duration::from_secs(60), 1_000).unwrap();
    assert!(
        fence.refused(b"k", 1_000).is_err(),
        "an entry whose checksum failed was dropped as expired"
    );
    assert!(fence.refused(b"k", 61_001).is_ok());
    // A restart within that window refuses too (the entry was rewritten,
    // sound, with the window's deadline).
    let again = Fence::load(&store, Duration::from_secs(60), 31_000).unwrap();
    assert!(
        again.refused(b"k", 31_000).is_err(),
        "a restart within the window took changes to the key"
    );
    assert!(again.refused(b"k", 61_001).is_ok());
    // Past that window a restart finds nothing left.
    Fence::load(&store, Duration::from_secs(60), 61_001).unwrap();
    assert!(
        fence_entries(&store).is_empty(),
        "{:?}",
        fence_entries(&store)
    );
}

/// Fences against clocks that step.
mod clock;
