//! The replica with `fsync` on RocksDB: what a failed WAL sync means.

use super::*;
use crate::storage::RocksStore;

/// With `fsync`, a write is applied (and visible) before the WAL sync
/// that makes it durable. Once that sync fails, nothing on this node
/// may say the write is stored: not a repeat of it that changes
/// nothing (a coordinator's copy arriving after read repair's, a
/// handoff of it), which answered "stored" at once.
#[tokio::test]
async fn nothing_vouches_for_a_write_whose_sync_failed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RocksStore::open(dir.path(), true).unwrap());
    let replica = trees::tests::replica_over(store.clone());
    store.fail_syncs();
    let (object, _, durable) = replica
        .write(b"k", &Default::default(), Some(b"v".to_vec()))
        .unwrap();
    assert!(durable.wait().await.is_err());
    assert!(
        replica.merge(b"k", &object).is_err(),
        "a merge vouched for a write whose sync failed"
    );
    let repeated = match replica.merge_deferred(b"k", &object) {
        Ok((_, durable)) => durable.wait().await,
        Err(e) => Err(e),
    };
    let err = repeated.expect_err("a deferred merge vouched for it");
    assert!(err.to_string().contains("WAL sync failed"), "{err}");
}
