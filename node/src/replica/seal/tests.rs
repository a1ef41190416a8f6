//! A clean stop's seal: the next start goes on under the same actors only
//! when the store is as it was at the seal.

use std::sync::Arc;

use super::*;
use crate::replica::trees::tests::replica_over;
use crate::storage::MemoryStore;
use crate::version::Object;

/// Writes `value` to `k` over what `r` holds (its context), as a client
/// that read first does; returns the object stored.
fn overwrite(r: &Replica<MemoryStore>, value: &[u8]) -> Object {
    let ctx = r
        .get(b"k")
        .unwrap()
        .map(|o| o.context())
        .unwrap_or_default();
    r.write(b"k", &ctx, Some(value.to_vec())).unwrap().0
}

/// A new run of the node over `store` (the old handle fenced).
fn restarted(store: &Arc<MemoryStore>) -> (Arc<MemoryStore>, Replica<MemoryStore>) {
    let store = Arc::new(store.reopen());
    (store.clone(), replica_over(store))
}

#[test]
fn a_clean_stop_lets_the_next_start_go_on_under_the_same_actors() {
    let store = Arc::new(MemoryStore::new());
    let r = replica_over(store.clone());
    let first = overwrite(&r, b"v1");
    r.seal().unwrap();
    let (store, r) = restarted(&store);
    let second = overwrite(&r, b"v2");
    assert_eq!(second.clock().len(), 1, "no new entry: {second:?}");
    assert_eq!(
        first.clock().keys().collect::<Vec<_>>(),
        second.clock().keys().collect::<Vec<_>>()
    );
    // The record is used once: a crash of this run starts anew.
    let (_, r) = restarted(&store);
    assert_eq!(overwrite(&r, b"v3").clock().len(), 2);
}

#[test]
fn a_start_without_a_seal_takes_a_new_incarnation() {
    let store = Arc::new(MemoryStore::new());
    overwrite(&replica_over(store.clone()), b"v1");
    let (_, r) = restarted(&store);
    assert_eq!(overwrite(&r, b"v2").clock().len(), 2);
}

#[test]
fn a_write_after_the_seal_makes_the_next_start_take_a_new_incarnation() {
    let store = Arc::new(MemoryStore::new());
    let r = replica_over(store.clone());
    overwrite(&r, b"v1");
    r.seal().unwrap();
    // A task the stop did not end writes: the store is no longer what the
    // seal described (this merge may carry what the node minted after).
    let other = Object::default();
    let mut incoming = other.clone();
    incoming.update(
        &Default::default(),
        Some(b"x".to_vec()),
        shoal_ring::NodeId::from_u128(9),
        1,
    );
    r.merge(b"other", &incoming).unwrap();
    assert_eq!(store.get(Tree::Meta, SEALED_KEY).unwrap(), None);
    let (_, r) = restarted(&store);
    assert_eq!(overwrite(&r, b"v2").clock().len(), 2);
}

#[test]
fn a_power_loss_that_takes_back_a_write_after_the_seal_keeps_the_seal() {
    let store = Arc::new(MemoryStore::new());
    store.track_unsynced();
    let r = replica_over(store.clone());
    overwrite(&r, b"v1");
    r.seal().unwrap();
    assert_eq!(store.unsynced_batches(), 0, "the seal synced every write");
    overwrite(&r, b"after the seal");
    assert_eq!(store.lose_unsynced_tail(0), 1);
    let (_, r) = restarted(&store);
    let values = |o: &Object| -> Vec<Vec<u8>> {
        o.siblings()
            .iter()
            .filter_map(|s| s.value.clone())
            .collect()
    };
    assert_eq!(values(&r.get(b"k").unwrap().unwrap()), [b"v1".to_vec()]);
    // What was taken back is gone with the seal's deletion: the store is
    // as at the seal, and the actor goes on from there.
    let next = overwrite(&r, b"v2");
    assert_eq!(next.clock().len(), 1, "{next:?}");
}

#[test]
fn an_unreadable_seal_record_starts_a_new_incarnation() {
    for spoil in [true, false] {
        let store = Arc::new(MemoryStore::new());
        let r = replica_over(store.clone());
        overwrite(&r, b"v1");
        r.seal().unwrap();
        match spoil {
            true => store.corrupt(Tree::Meta, SEALED_KEY),
            false => store.put(Tree::Meta, SEALED_KEY, b"not a state").unwrap(),
        }
        let (store, r) = restarted(&store);
        assert_eq!(overwrite(&r, b"v2").clock().len(), 2);
        assert_eq!(store.get(Tree::Meta, SEALED_KEY).unwrap(), None);
    }
}
