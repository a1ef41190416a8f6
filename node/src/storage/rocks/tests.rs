//! The RocksDB engine's options, shown at work.

use super::*;

/// The objects tree's write stalls so far, as RocksDB counts them
/// (the tree's "Write Stall (count)" line of `rocksdb.stats`; tests).
fn stalls(store: &RocksStore) -> String {
    let Ok(db) = store.db() else {
        return String::new();
    };
    let stats = db.property_value_cf(cf(&db, Tree::Objects), "rocksdb.stats");
    let stats = stats.ok().flatten().unwrap_or_default();
    stats
        .lines()
        .find(|l| l.starts_with("Write Stall (count): cf-"))
        .unwrap_or_default()
        .to_string()
}

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
    let stalls = stalls(&store);
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

/// A write RocksDB holds back (writes stopped or slowed while flushes or
/// compactions lag: seconds, at the lowest CPU priority on a busy
/// machine) waits off the worker, whose other tasks, the connections'
/// among them, go on. A node of a local cluster on two cores has one
/// worker; held by such a write, it stopped acknowledging packets and its
/// peers and clients took it for down (the hostile test's flake: "no
/// acknowledgement within 300ms").
#[test]
fn a_write_rocksdb_holds_back_waits_off_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RocksStore::open(dir.path(), false).unwrap());
    store.raw_put(Tree::Objects, b"a", b"x").unwrap();
    store.flush().unwrap();
    // One file in level 0, and writes stop at one: stopped until the
    // limit goes back up.
    let db = store.db().unwrap();
    let stop_at = |files: &str| {
        db.set_options_cf(
            cf(&db, Tree::Objects),
            &[
                ("level0_slowdown_writes_trigger", files),
                ("level0_stop_writes_trigger", files),
            ],
        )
        .unwrap()
    };
    stop_at("1");
    let stopped = db.property_int_value("rocksdb.is-write-stopped").unwrap();
    assert_eq!(stopped, Some(1), "the test could not stop writes");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_time()
        .build()
        .unwrap();
    let ticks = Arc::new(AtomicUsize::new(0));
    let counter = ticks.clone();
    runtime.spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(5)).await;
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let writer = store.clone();
    let write = runtime.spawn(async move {
        let mut batch = WriteBatch::default();
        batch.put(Tree::Objects, b"b", b"y");
        writer.write(batch)
    });
    std::thread::sleep(Duration::from_millis(100));
    let before = ticks.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(400));
    let ticked = ticks.load(Ordering::Relaxed) - before;
    let held_back = !write.is_finished();
    stop_at("36");
    let written =
        runtime.block_on(async { tokio::time::timeout(Duration::from_secs(30), write).await });
    runtime.shutdown_background();

    assert!(
        held_back,
        "the write was not held back: the test shows nothing"
    );
    assert!(
        ticked >= 20,
        "the worker stood still behind the held-back write: {ticked} ticks of 5 ms in 400 ms"
    );
    written
        .expect("written once writes resume")
        .unwrap()
        .unwrap();
    assert_eq!(
        store.get(Tree::Objects, b"b").unwrap().as_deref(),
        Some(&b"y"[..])
    );
}

/// Without `fsync` as with it, a WAL that fails other than for want of
/// space (here a sync's I/O error) makes the store refuse every read and
/// write until the node restarts: the kernel may have dropped WAL pages
/// holding acknowledged writes, and a database reopened in the running
/// process would replay the WAL without them while the replica went on
/// under the same incarnation (its cache, its trees, its actors' counters:
/// a dot minted twice). The restart replays what the disk holds under a
/// new incarnation (review, helper-89).
#[test]
fn without_fsync_a_failed_wal_refuses_everything_until_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = RocksStore::open(dir.path(), false).unwrap();
    let put = |value: &[u8]| {
        let mut batch = WriteBatch::default();
        batch.put(Tree::Objects, b"k", value);
        store.write(batch)
    };
    put(b"v1").unwrap();
    store.fail_syncs();
    assert!(store.sync_wal().is_err());
    let refused = put(b"v2").expect_err("a write after the WAL failed");
    assert!(
        refused.to_string().contains("until the node restarts"),
        "{refused}"
    );
    assert!(store.get(Tree::Objects, b"k").is_err(), "a read too");
    drop(store);
    let store = RocksStore::open(dir.path(), false).unwrap();
    assert_eq!(
        store.get(Tree::Objects, b"k").unwrap(),
        Some(b"v1".to_vec())
    );
}
