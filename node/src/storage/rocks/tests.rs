//! The RocksDB engine's options, shown at work.

use super::*;

/// Objects larger than a memtable (siblings of values of megabytes:
/// up to `limits.max-object-mb`) fill one each. Four written back to
/// back stopped every write twice (RocksDB's two memtables), however
/// fast the flush, which runs at the lowest CPU priority; a node whose
/// writes stop stops answering, and its peers take it for down (the
/// hostile test's flake). With four memtables they never stop.
#[test]
fn objects_larger_than_a_memtable_do_not_stop_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = RocksStore::open(dir.path(), false).unwrap();
    // Incompressible, as values mostly are: a flush takes its time.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let big: Vec<u8> = (0..48 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for i in 0..4u8 {
        store.raw_put(Tree::Objects, &[i], &big).unwrap();
    }
    let stalls = store.stalls();
    println!("{stalls}");
    assert!(
        stalls.contains("total-stops"),
        "no stall counts: {stalls:?}"
    );
    assert!(
        stalls.contains("memtable-limit-stops: 0,"),
        "writes stopped: {stalls}"
    );
}
