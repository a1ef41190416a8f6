//! A clean stop's seal: the next start goes on under the same actors only
//! when the store is as it was at the seal.

use std::sync::Arc;

use super::*;
use crate::replica::trees::tests::replica_over;
use crate::replica::ReplicaError;
use crate::storage::MemoryStore;
use crate::version::{Object, VersionVector};

/// Writes `value` to `k` over what `r` holds (its context), as a client
/// that read first does; returns the object stored.
fn overwrite(r: &Replica<MemoryStore>, value: &[u8]) -> Object {
    let ctx = r
        .get(b"k")
        .unwrap()
        .map(|o| o.context())
        .unwrap_or_default();
    r.write(b"k", &ctx.clone().into(), Some(value.to_vec()))
        .unwrap()
        .0
}

/// A new run of the node over `store` (the old handle fenced).
fn restarted(store: &Arc<MemoryStore>) -> (Arc<MemoryStore>, Replica<MemoryStore>) {
    let store = Arc::new(store.reopen());
    (store.clone(), replica_over(store))
}

/// A value of another key, written by another node.
fn from_elsewhere() -> Object {
    let mut o = Object::default();
    o.update(
        &Default::default(),
        Some(b"x".to_vec()),
        shoal_ring::NodeId::from_u128(9),
        1,
    );
    o
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
    // seal described.
    r.merge(b"other", &from_elsewhere()).unwrap();
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
    // Nothing is minted after the seal; other writes (a merge) go on.
    let ctx = r.get(b"k").unwrap().unwrap().context();
    assert!(matches!(
        r.write(b"k", &ctx.clone().into(), Some(b"after".to_vec())),
        Err(ReplicaError::Version {
            source: crate::version::VersionError::Sealed,
            ..
        })
    ));
    r.merge(b"other", &from_elsewhere()).unwrap();
    assert_eq!(store.lose_unsynced_tail(0), 1);
    let (_, r) = restarted(&store);
    assert_eq!(r.get(b"other").unwrap(), None);
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

#[cfg(feature = "rocksdb")]
#[test]
fn a_store_that_failed_a_sync_in_this_run_is_not_sealed() {
    use crate::storage::RocksStore;
    let dir = tempfile::tempdir().unwrap();
    let open = || Arc::new(RocksStore::open(dir.path(), false).unwrap());
    let store = open();
    let r = replica_over(store.clone());
    let ctx = VersionVector::new();
    drop(
        r.write(b"k", &ctx.clone().into(), Some(b"v1".to_vec()))
            .unwrap(),
    );
    r.seal().expect("an intact store is sealed");
    drop((r, store));
    let store = open();
    let r = replica_over(store.clone());
    let second = r
        .write(b"k", &ctx.clone().into(), Some(b"v2".to_vec()))
        .unwrap()
        .0;
    assert_eq!(second.clock().len(), 1, "went on after the clean stop");
    // A WAL sync fails (the kernel may have dropped WAL pages): the store
    // refuses everything from then on, and the run cannot vouch for what
    // it wrote.
    store.fail_syncs();
    assert!(store.sync_wal().is_err());
    assert!(!store.intact());
    assert!(r.seal().is_err(), "sealed a store whose WAL failed");
    drop((r, store));
    let r = replica_over(open());
    let third = r
        .write(b"k", &ctx.clone().into(), Some(b"v3".to_vec()))
        .unwrap()
        .0;
    assert_eq!(third.clock().len(), 2, "a new incarnation: {third:?}");
}
