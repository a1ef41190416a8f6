//! The fence against wall clocks that step: while the node runs its
//! windows run on the monotonic clock, and a restart judges entries by
//! names no clock's step made early.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::*;
use crate::replica::trees::tests::replica_with_clock;

/// A replica over `store` whose wall clock reads `wall` (which the test
/// steps).
fn on_wall(store: Arc<MemoryStore>, wall: &Arc<AtomicU64>) -> Replica<MemoryStore> {
    let wall = wall.clone();
    let clock = crate::clock::Clock::from_fn(move || wall.load(Ordering::Relaxed));
    replica_with_clock(store, clock)
}

/// A step of the wall clock while the node runs (an NTP step, a VM
/// resumed) does not end a fence early: a window is how long a message
/// can stay in flight, which only real time ends. Real time past the
/// window does end it.
#[tokio::test(start_paused = true)]
async fn a_wall_clock_stepped_forward_does_not_end_a_fence_early() {
    let wall = Arc::new(AtomicU64::new(1_000_000_000));
    let r = on_wall(Arc::new(MemoryStore::new()), &wall);
    let old = update(&Object::default(), &VersionVector::new(), Some(b"old"), 7);
    let tombstone = update(&old, &old.context(), None, 8);
    r.merge(b"k", &tombstone).unwrap();
    assert!(r.reap(b"k", &tombstone).unwrap(), "reaped");
    // An hour ahead at once, far past the 60 s window.
    wall.fetch_add(3_600_000, Ordering::Relaxed);
    r.merge(b"k", &old).unwrap();
    assert_eq!(
        r.get(b"k").unwrap(),
        None,
        "the wall clock's step ended the fence: the reaped key came back"
    );
    assert_ne!(r.fence_history(b"k"), Object::default());
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(
        r.fence_history(b"k"),
        Object::default(),
        "the window never ended"
    );
}

/// A wall clock stepped forward after the node started (a host that
/// booted slow and was corrected) and before a reap: the entry is named
/// by the corrected clock, so a restart within the window, judging names
/// by its own wall clock, still fences the key.
#[test]
fn a_wall_clock_stepped_forward_before_a_reap_leaves_its_entry_live_across_a_restart() {
    // An hour slow when the node starts, corrected before the reap.
    assert_eq!(
        reaped_then_restarted(REAL - 3_600_000, REAL),
        None,
        "the restart dropped a live fence entry: the reaped key came back"
    );
}

/// The wall clock when a test's clock is right.
const REAL: u64 = 1_000_000_000;

/// What key `k` holds after a replica took its tombstone (its wall clock
/// reading `at_start`), reaped it (reading `at_reap`), restarted 5 s after
/// [`REAL`] with its clock right, within the 60 s window, and then merged
/// a copy read before the reap.
fn reaped_then_restarted(at_start: u64, at_reap: u64) -> Option<Object> {
    let wall = Arc::new(AtomicU64::new(at_start));
    let store = Arc::new(MemoryStore::new());
    let r = on_wall(store.clone(), &wall);
    let old = update(&Object::default(), &VersionVector::new(), Some(b"old"), 7);
    let tombstone = update(&old, &old.context(), None, 8);
    r.merge(b"k", &tombstone).unwrap();
    wall.store(at_reap, Ordering::Relaxed);
    assert!(r.reap(b"k", &tombstone).unwrap(), "reaped");
    drop(r);
    wall.store(REAL + 5_000, Ordering::Relaxed);
    let r = on_wall(store, &wall);
    r.merge(b"k", &old).unwrap();
    r.get(b"k").unwrap()
}

/// An entry named far ahead (written by a run whose clock was ahead)
/// fences for a window at most: no real window has more left, and an
/// entry held longer would keep every later one in memory behind it.
#[test]
fn an_entry_named_far_ahead_fences_for_a_window_at_most() {
    let store = MemoryStore::new();
    let name = entry_key(b"k", 10 * 3_600_000);
    store
        .put(Tree::Meta, &name, &encode_object(&Object::default()))
        .unwrap();
    let mut fence = Fence::load(&store, Duration::from_secs(60), 1_000).unwrap();
    assert!(
        fence.history(b"k", 60_999).is_some(),
        "fenced within the window"
    );
    assert!(
        fence.history(b"k", 61_000).is_none(),
        "fenced past a window"
    );
    // Its expiry deletes the entry by the name it has.
    assert_eq!(fence.expire(61_000), vec![(10 * 3_600_000, b"k".to_vec())]);
}

/// A wall clock stepped back at a reap (and corrected after) does not
/// name its entry early either: a restart within the window still fences
/// the key.
#[test]
fn a_wall_clock_stepped_back_at_a_reap_leaves_its_entry_live_across_a_restart() {
    // Ten minutes back for the reap, corrected before the restart.
    assert_eq!(
        reaped_then_restarted(REAL, REAL - 600_000),
        None,
        "the restart dropped a live fence entry: the reaped key came back"
    );
}

/// Two entries of a key loaded at a restart: the key keeps the history of
/// both, whichever name is later (names follow a wall clock that can step
/// back; a later fence's history may hold more, as a restore's does).
#[test]
fn a_key_fenced_twice_keeps_both_histories_across_a_restart() {
    let store = MemoryStore::new();
    let a = update(&Object::default(), &VersionVector::new(), Some(b"a"), 7);
    let b = update(&Object::default(), &VersionVector::new(), Some(b"b"), 8);
    let history = |o: &Object| {
        let mut h = update(o, &o.context(), None, 9);
        h.drop_siblings_of(&h.clone());
        h
    };
    // The later fence (its history covers b too) has the earlier name.
    let both = Object::merged(&history(&a), &history(&b));
    store
        .put(Tree::Meta, &entry_key(b"k", 40_000), &encode_object(&both))
        .unwrap();
    store
        .put(
            Tree::Meta,
            &entry_key(b"k", 50_000),
            &encode_object(&history(&a)),
        )
        .unwrap();
    let fence = Fence::load(&store, Duration::from_secs(60), 1_000).unwrap();
    let kept = fence.history(b"k", 1_000).expect("fenced");
    assert!(
        Object::merged(&kept, &b).siblings().is_empty(),
        "the key's history lost what one of its entries held: {kept:?}"
    );
    assert!(Object::merged(&kept, &a).siblings().is_empty());
}

/// A key fenced twice while the node runs, the second history not holding
/// the first (a clock pruned in between): both are kept until the later
/// deadline, the first entry's expiry notwithstanding.
#[test]
fn a_key_fenced_twice_keeps_both_histories_until_the_later_deadline() {
    let mut fence = Fence::load(&MemoryStore::new(), Duration::from_millis(100), 0).unwrap();
    let a = update(&Object::default(), &VersionVector::new(), Some(b"a"), 7);
    let b = update(&Object::default(), &VersionVector::new(), Some(b"b"), 8);
    for (object, at) in [(&a, 1_000), (&b, 1_050)] {
        let tombstone = update(object, &object.context(), None, 9);
        let (deadline, history) = fence.entry(&tombstone, at, at).expect("fencing");
        fence.insert(b"k", deadline, history);
    }
    for at in [1_060, 1_120] {
        fence.expire(at);
        let kept = fence.history(b"k", at).expect("fenced");
        for deleted in [&a, &b] {
            assert!(
                Object::merged(&kept, deleted).siblings().is_empty(),
                "at {at} the key's history lost what one of its fences held: {kept:?}"
            );
        }
    }
    assert_eq!(fence.expire(1_150), vec![(1_150, b"k".to_vec())]);
    assert!(fence.history(b"k", 1_150).is_none());
}
