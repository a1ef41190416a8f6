//! The RocksDB engine: one column family per [`Tree`], lz4-compressed, with the
//! WAL synced before a write is acknowledged when `fsync` is set (durability
//! across power loss; concurrent writes share a sync, see [`super::group`])
//! and left to the OS page cache otherwise (durability across process crashes).
//!
//! A full disk: a write whose WAL append fails (ENOSPC) fails with a clear
//! error and changes nothing, and reads go on. RocksDB keeps such a failure
//! as a sticky error ("Writer has previous error") that only reopening the
//! database clears, so once the disk has [`REOPEN_MIN_FREE`] bytes free
//! again the next failing write reopens it (at most once a second; the WAL
//! replays, so nothing acknowledged is lost) and writes resume without a
//! restart. No reopen is tried on a disk still full: it would fail and take
//! reads down with it.
//!
//! A WAL that fails otherwise (an I/O error on append or sync) is another
//! matter: writes applied since the last good sync were visible (group
//! commit applies a write before its sync) and may not be on disk, and
//! which of them are cannot be known (after a failed fsync the kernel may
//! have dropped the pages). Without `fsync` too: acknowledged writes wait
//! in WAL pages the kernel may have dropped, and a database reopened in
//! the running process would replay the WAL without them while the
//! replica went on under the same incarnation, its cache, trees and
//! actors' counters unchanged (a dot minted twice). As PostgreSQL and
//! Cassandra's `commit_failure_policy: stop` do, the store then refuses
//! every operation with that error until the node restarts; the restart
//! replays what the disk holds, under a new incarnation. (The replica
//! still answers reads of the keys in its object cache: what it holds was
//! written, and acknowledged only if its sync, with `fsync`, succeeded.)
//! A full disk is not such a failure: an append that fails for want of
//! space leaves the WAL before it intact, so it and the syncs that fail
//! after it (the sticky error) fail only their own writes, and the reopen
//! replays the rest.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, Direction, IteratorMode, Options, ReadOptions,
    WriteOptions, DB,
};

use super::group::{Durable, GroupCommit};
use super::{os, record, BatchOp, Scanned, Store, StoreError, Tree, WriteBatch};
use crate::config::HugePages;

/// Block cache shared by every column family of a node.
const BLOCK_CACHE_BYTES: usize = 128 << 20;

/// Memtable size of every column family Shoal uses: 32 MiB, scaled by a
/// factor drawn once per process from [0.75, 1.25) (RocksDB's own
/// `default` family, unused, keeps its 64 MiB).
///
/// Half RocksDB's default: a write's largest single cost is the memtable
/// insert's skiplist search, cache misses all the way down, and a smaller
/// skiplist misses less. Reads of recent objects are served by the
/// object cache in front of the store (`limits.object-cache-mb`), not the
/// memtable, so they do not lose by it. On the 2-core bench machine, in
/// 60 s runs of workload a side by side, 32 MiB took 5% off the servers'
/// CPU per operation against 64 MiB (bench/README.md, seventh look), and
/// workload c was the same with 16 or 64 MiB.
///
/// Replicas take the same writes, so with one size all of a key's
/// replicas switch memtables and flush in the same few milliseconds, and
/// the latency spike of a flush meets every replica a quorum could use at
/// once; staggered, a quorum mostly finds two that are not flushing.
fn memtable_bytes() -> usize {
    use rand::Rng;
    static BYTES: OnceLock<usize> = OnceLock::new();
    *BYTES.get_or_init(|| {
        let bytes = rand::thread_rng().gen_range((24 << 20)..(40 << 20));
        tracing::info!(mib = bytes >> 20, "memtable size drawn for this process");
        bytes
    })
}

/// Free space a stuck database waits for before it is reopened: room for
/// a new WAL and a memtable flush.
pub const REOPEN_MIN_FREE: u64 = 32 << 20;

/// An open database, with its group commit when `fsync` is set (started
/// once the database is shared, so that its syncer sees it open).
struct Open {
    db: DB,
    group: OnceLock<Arc<GroupCommit>>,
}

/// WAL failures, kept across reopens (see the module doc).
#[derive(Default)]
struct Syncs {
    /// The first WAL failure that was no full disk: the store refuses
    /// everything.
    failed: OnceLock<String>,
    /// An append failed for want of space since the database was opened:
    /// the WAL's errors until the reopen are that one, kept.
    full: AtomicBool,
    /// Tests: every sync fails, as on a disk error.
    fail: AtomicBool,
    /// A write or WAL sync failed since the store was opened (every reopen
    /// follows one): see [`Store::intact`].
    troubled: AtomicBool,
}

impl Syncs {
    fn refused(failed: &str) -> StoreError {
        StoreError::Io {
            op: "sync",
            detail: format!(
                "a WAL sync failed ({failed}); writes since the last good sync may not be on \
                 disk, so this store refuses every read and write until the node restarts \
                 (the restart replays what the disk holds)"
            ),
        }
    }

    /// Runs a WAL sync, remembering a failure for good.
    fn sync(&self, db: &DB) -> Result<(), StoreError> {
        if let Some(failed) = self.failed.get() {
            return Err(Syncs::refused(failed));
        }
        let result = if self.fail.load(Ordering::Relaxed) {
            Err(StoreError::Io {
                op: "sync",
                detail: "injected WAL sync failure".into(),
            })
        } else {
            db.flush_wal(true).map_err(io("sync"))
        };
        result.inspect_err(|e| {
            self.troubled.store(true, Ordering::Relaxed);
            self.failure(e);
        })
    }

    /// A failed WAL append or sync: refuses everything from now on, unless
    /// it is (or follows) a full disk's.
    fn failure(&self, e: &StoreError) {
        if e.to_string().contains("No space left") {
            self.full.store(true, Ordering::Relaxed);
        }
        if self.full.load(Ordering::Relaxed) {
            return;
        }
        if self.failed.set(e.to_string()).is_ok() {
            tracing::error!(error = %e, "the WAL failed: this node's store refuses every read and write until it restarts");
        }
    }
}

impl std::ops::Deref for Open {
    type Target = DB;
    fn deref(&self) -> &DB {
        &self.db
    }
}

pub struct RocksStore {
    /// The open database; `None` only between closing one stuck on a write
    /// error and opening it again (see the module doc). Each operation
    /// holds a clone for its duration, so a reopen waits for those.
    db: RwLock<Option<Arc<Open>>>,
    path: PathBuf,
    /// Whether each batch waits for its WAL record to reach the disk.
    fsync: bool,
    /// The huge page size memtables are mapped with (see [`os`]).
    huge_pages: Option<usize>,
    /// When a reopen was last tried.
    reopened: Mutex<Option<Instant>>,
    syncs: Arc<Syncs>,
    /// Writes of more than [`crate::tasks::HEAVY_BYTES`] under way.
    heavy_writes: AtomicUsize,
}

fn io(op: &'static str) -> impl Fn(rocksdb::Error) -> StoreError {
    move |e| {
        let detail = e.to_string();
        if e.kind() == rocksdb::ErrorKind::Corruption {
            StoreError::Corruption {
                tree: "?",
                key: String::new(),
                detail,
            }
        } else {
            StoreError::Io { op, detail }
        }
    }
}

impl RocksStore {
    /// Opens (creating if needed) the store in `path`.
    pub fn open(path: &Path, fsync: bool) -> Result<Self, StoreError> {
        RocksStore::open_with(path, fsync, HugePages::Off)
    }

    /// [`Self::open`], the memtables on reserved huge pages if `Try` and safe (see [`os`]).
    pub fn open_with(path: &Path, fsync: bool, huge_pages: HugePages) -> Result<Self, StoreError> {
        let syncs = Arc::new(Syncs::default());
        let huge_pages = os::memtable_huge_page_bytes(huge_pages);
        Ok(RocksStore {
            db: RwLock::new(Some(open_db(path, fsync, huge_pages, &syncs)?)),
            path: path.to_path_buf(),
            fsync,
            huge_pages,
            reopened: Mutex::new(None),
            syncs,
            heavy_writes: AtomicUsize::new(0),
        })
    }

    /// Tests: every WAL sync fails from now on, as on a disk error.
    pub fn fail_syncs(&self) {
        self.syncs.fail.store(true, Ordering::Relaxed);
    }

    /// The open database, reopening it if a reopen left it closed; an
    /// error for good after a failed sync (see the module doc).
    fn db(&self) -> Result<Arc<Open>, StoreError> {
        if let Some(failed) = self.syncs.failed.get() {
            return Err(Syncs::refused(failed));
        }
        if let Some(db) = &*self.db.read().expect("db lock") {
            return Ok(db.clone());
        }
        if self.has_room() {
            self.reopen(None);
        }
        self.db
            .read()
            .expect("db lock")
            .clone()
            .ok_or_else(|| StoreError::Io {
                op: "open",
                detail: format!(
                "the database in {} is closed after a write error and could not be reopened yet \
                 (is the disk still full?); retrying at most once a second",
                self.path.display()
            ),
            })
    }

    /// After a failed write through `failed`: reopens the database if the
    /// disk has room again (see the module doc).
    fn recover(&self, failed: Arc<Open>) {
        // The pointer only: a clone held while waiting for the lock would
        // keep the reopen waiting for it.
        let ptr = Arc::as_ptr(&failed);
        drop(failed);
        if self.has_room() {
            self.reopen(Some(ptr));
        }
    }

    /// Whether the disk has room to reopen the database (or its free
    /// space cannot be read, when trying is all there is).
    fn has_room(&self) -> bool {
        os::free_bytes(&self.path).is_none_or(|free| free >= REOPEN_MIN_FREE)
    }

    /// Closes the database (`failed`, if it is still the current one) and
    /// opens it again; at most once a second.
    fn reopen(&self, failed: Option<*const Open>) {
        {
            let mut last = self.reopened.lock().expect("reopen lock");
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *last = Some(Instant::now());
        }
        let mut slot = self.db.write().expect("db lock");
        let old = match (slot.take(), failed) {
            (Some(current), Some(failed)) if std::ptr::eq(Arc::as_ptr(&current), failed) => {
                Some(current)
            }
            (None, _) => None,
            // Someone else reopened it already.
            (current, _) => {
                *slot = current;
                return;
            }
        };
        if let Some(old) = old {
            // Operations in flight hold clones for a few milliseconds; no
            // new one starts while the lock is held.
            let deadline = Instant::now() + Duration::from_secs(5);
            while Arc::strong_count(&old) > 1 {
                if Instant::now() > deadline {
                    *slot = Some(old);
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            drop(old);
        }
        match open_db(&self.path, self.fsync, self.huge_pages, &self.syncs) {
            Ok(db) => {
                self.syncs.full.store(false, Ordering::Relaxed);
                tracing::warn!(path = %self.path.display(), "reopened the database after a write error; writes resume");
                *slot = Some(db);
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "reopening the database after a write error failed; retrying");
            }
        }
    }
}

fn open_db(
    path: &Path,
    fsync: bool,
    huge_pages: Option<usize>,
    syncs: &Arc<Syncs>,
) -> Result<Arc<Open>, StoreError> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    opts.set_paranoid_checks(true);
    opts.increase_parallelism(2);
    // No `bytes_per_sync` / `wal_bytes_per_sync`: librocksdb-sys compiles
    // RocksDB without ROCKSDB_RANGESYNC_PRESENT, so they do nothing here
    // (strace shows no `sync_file_range`), and a RocksDB built with it calls
    // `sync_file_range` from the writing thread, a request's, where the
    // open-loop tail was no better (bench/README.md, "The open-loop tail").
    // A thread of our own starts the files' writeback instead (see
    // `writeback`).
    // Flushes and compactions run at the lowest CPU priority (nice 19):
    // they take the cores only when the threads serving requests leave
    // them idle. At the normal priority a memtable flush (all three nodes
    // at once here, as they take the same writes) preempted the servers
    // for 100-200 ms: p99 at 10,000 ops/s went from 179-266 ms to 71-73 ms
    // with this on the 2-core bench machine, at the same closed-loop
    // throughput. The pools are the process's (RocksDB's default Env).
    let mut env = rocksdb::Env::new().map_err(io("env"))?;
    env.lower_thread_pool_cpu_priority();
    env.lower_high_priority_thread_pool_cpu_priority();
    opts.set_env(&env);

    // Point reads dominate: a shared block cache, a bloom filter per SST
    // file and one over each memtable, so that a read of a key that a
    // file or memtable lacks costs a few hashes instead of a search.
    let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES);
    let cfs = Tree::ALL.iter().map(|t| {
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_bloom_filter(10.0, false);
        table.set_cache_index_and_filter_blocks(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        let mut cf = Options::default();
        cf.set_compression_type(rocksdb::DBCompressionType::Lz4);
        cf.set_block_based_table_factory(&table);
        cf.set_memtable_whole_key_filtering(true);
        cf.set_memtable_prefix_bloom_ratio(0.05);
        cf.set_memtable_huge_page_size(huge_pages.unwrap_or(0)); // 0: off
        cf.set_write_buffer_size(memtable_bytes());
        // Room for three full memtables waiting for their flush, not one
        // (RocksDB's default of two in all): an object of megabytes fills
        // a memtable by itself, and with two of them in a row every write
        // of the node stopped behind a flush that runs at the lowest CPU
        // priority; a node whose writes stop stops answering, and its
        // peers take it for down. With four, RocksDB slows writes at the
        // third and stops them only at the fourth. The memory is spent
        // only while flushes lag.
        cf.set_max_write_buffer_number(4);
        ColumnFamilyDescriptor::new(t.name(), cf)
    });
    let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(io("open"))?;
    let open = Arc::new(Open {
        db,
        group: OnceLock::new(),
    });
    super::writeback::start(path.to_path_buf(), Arc::downgrade(&open));
    if fsync {
        let syncs = syncs.clone();
        let group = GroupCommit::start(Arc::downgrade(&open), move |open: &Open| {
            syncs.sync(&open.db)
        });
        let _ = open.group.set(group);
    }
    Ok(open)
}

fn cf(db: &DB, tree: Tree) -> &rocksdb::ColumnFamily {
    db.cf_handle(tree.name())
        .expect("every tree's column family is created at open")
}

impl RocksStore {
    /// Writes memtables to SST files (tests that inspect files on disk).
    pub fn flush(&self) -> Result<(), StoreError> {
        let db = self.db()?;
        for t in Tree::ALL {
            db.flush_cf(cf(&db, t)).map_err(io("flush"))?;
        }
        Ok(())
    }

    /// The sealed record as stored (tests).
    pub fn raw_get(&self, tree: Tree, key: &[u8]) -> Result<Vec<u8>, StoreError> {
        let db = self.db()?;
        let raw = db.get_cf(cf(&db, tree), key).map_err(io("get"))?;
        raw.ok_or_else(|| StoreError::Io {
            op: "get",
            detail: "absent".into(),
        })
    }

    /// Stores raw bytes without sealing them (tests).
    pub fn raw_put(&self, tree: Tree, key: &[u8], raw: &[u8]) -> Result<(), StoreError> {
        let db = self.db()?;
        db.put_cf(cf(&db, tree), key, raw).map_err(io("put"))
    }

    /// WAL syncs made by group commit so far (tests; 0 without `fsync`).
    pub fn group_syncs(&self) -> u64 {
        self.db()
            .ok()
            .and_then(|db| db.group.get().map(|g| g.syncs()))
            .unwrap_or(0)
    }

    /// Writes `batch` to `db` (the current database), its WAL synced if `sync`.
    fn write_with(&self, batch: WriteBatch, sync: bool) -> Result<(), StoreError> {
        self.write_to(self.db()?, batch, sync)
    }

    /// RocksDB writes one group of batches at a time: a write that arrives
    /// while one of megabytes is being written waits for it (80-100 ms for
    /// 60 MiB), blocking the thread it runs on. So a write of megabytes,
    /// and every write while one is under way, runs off the worker
    /// ([`crate::tasks::heavy`]), which goes on driving the connections.
    /// RocksDB also holds writes back while flushes or compactions lag
    /// (slowed, or stopped until a flush at the lowest CPU priority ends:
    /// seconds on a busy machine): a write on the worker is not let wait,
    /// it is written again off the worker.
    fn write_to(&self, db: Arc<Open>, batch: WriteBatch, sync: bool) -> Result<(), StoreError> {
        let large = batch.bytes() > crate::tasks::HEAVY_BYTES;
        let mut result = Ok(false);
        if !large && self.heavy_writes.load(Ordering::Acquire) == 0 {
            result = self.write_now(&db, &batch, sync, Hold::Refuse);
        }
        let result = match result {
            Ok(false) => {
                let _under_way = large.then(|| UnderWay::new(&self.heavy_writes));
                crate::tasks::heavy(|| self.write_now(&db, &batch, sync, Hold::Wait))
            }
            done => done,
        };
        if let Err(e @ StoreError::Io { .. }) = &result {
            self.syncs.troubled.store(true, Ordering::Relaxed);
            self.syncs.failure(e);
            if self.syncs.failed.get().is_none() {
                // This handle is the write's last: a reopen waits for it.
                self.recover(db);
            }
        }
        result.map(drop)
    }

    /// Writes `batch`: `Ok(false)` when RocksDB held it back and `hold`
    /// refused to wait (nothing written).
    fn write_now(
        &self,
        db: &Open,
        batch: &WriteBatch,
        sync: bool,
        hold: Hold,
    ) -> Result<bool, StoreError> {
        let mut wb = rocksdb::WriteBatch::default();
        for op in &batch.ops {
            match op {
                BatchOp::Put { tree, key, value } => {
                    wb.put_cf(cf(db, *tree), key, record::seal(*tree, key, value))
                }
                BatchOp::Delete { tree, key } => wb.delete_cf(cf(db, *tree), key),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        wo.set_no_slowdown(hold == Hold::Refuse);
        match db.write_opt(wb, &wo) {
            Ok(()) => Ok(true),
            Err(e) if hold == Hold::Refuse && e.kind() == rocksdb::ErrorKind::Incomplete => {
                Ok(false)
            }
            Err(e) => Err(io("write")(e)),
        }
    }
}

/// Whether a write may wait while RocksDB holds writes back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hold {
    Wait,
    Refuse,
}

/// Counts one write of megabytes under way while it lives.
struct UnderWay<'a>(&'a AtomicUsize);

impl<'a> UnderWay<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        UnderWay(count)
    }
}

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Store for RocksStore {
    fn approximate_bytes(&self, tree: Tree) -> u64 {
        let Ok(db) = self.db() else { return 0 };
        let property = |name: &str| {
            db.property_int_value_cf(cf(&db, tree), name)
                .ok()
                .flatten()
                .unwrap_or(0)
        };
        property("rocksdb.estimate-live-data-size") + property("rocksdb.cur-size-all-mem-tables")
    }

    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let db = self.db()?;
        let raw = db.get_pinned_cf(cf(&db, tree), key).map_err(io("get"))?;
        match raw {
            Some(raw) => record::open(tree, key, &raw).map(Some),
            None => Ok(None),
        }
    }

    fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.write_with(batch, self.fsync)
    }

    fn write_synced(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.write_with(batch, true)
    }

    fn write_deferred(&self, batch: WriteBatch) -> Result<Durable, StoreError> {
        let db = self.db()?;
        let Some(group) = db.group.get().cloned() else {
            return self.write_to(db, batch, false).map(|()| Durable::now());
        };
        self.write_to(db, batch, false)?;
        Ok(group.register())
    }

    fn durable_so_far(&self) -> Result<Durable, StoreError> {
        let db = self.db()?;
        Ok(db.group.get().map_or_else(Durable::now, |g| g.so_far()))
    }

    fn intact(&self) -> bool {
        !self.syncs.troubled.load(Ordering::Relaxed)
    }

    fn sync_wal(&self) -> Result<(), StoreError> {
        let db = self.db()?;
        let result = self.syncs.sync(&db);
        if matches!(result, Err(StoreError::Io { .. })) && self.syncs.failed.get().is_none() {
            self.recover(db);
        }
        result
    }

    fn scan(
        &self,
        tree: Tree,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Scanned>, StoreError> {
        let mut ro = ReadOptions::default();
        if let Some(end) = end {
            ro.set_iterate_upper_bound(end.to_vec());
        }
        let db = self.db()?;
        let mut out = Vec::new();
        for item in db.iterator_cf_opt(
            cf(&db, tree),
            ro,
            IteratorMode::From(start, Direction::Forward),
        ) {
            if out.len() >= limit {
                break;
            }
            let (k, raw) = item.map_err(io("scan"))?;
            let v = record::open(tree, &k, &raw);
            out.push((k.into_vec(), v));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
