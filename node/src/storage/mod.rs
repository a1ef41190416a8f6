//! Storage: the [`Store`] trait and its two engines.
//!
//! A store is a set of named [`Tree`]s (RocksDB column families), each a sorted
//! map of byte keys to byte values, with point reads, atomic batch writes and
//! range scans. [`RocksStore`] is the durable engine; [`MemoryStore`] serves
//! simulations and tests. Both seal every record the same way (see [`record`]):
//! a crc32 over the tree, key and value is stored in front of the value and
//! checked on every read, so a corrupted record is reported as
//! [`StoreError::Corruption`] and never served. One conformance suite runs
//! against both engines.

pub mod group;
mod memory;
#[cfg(feature = "rocksdb")]
mod os;
pub mod record;
#[cfg(feature = "rocksdb")]
mod rocks;
#[cfg(feature = "rocksdb")]
mod writeback;

pub use group::Durable;
pub use memory::MemoryStore;
#[cfg(feature = "rocksdb")]
pub use rocks::RocksStore;

/// The named trees of a node's store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tree {
    /// Key -> DVV set ([`crate::version::Object`]).
    Objects,
    /// Node identity and membership.
    Meta,
    /// Hints held for other nodes: primary id (16 bytes) ++ key -> object
    /// (see [`crate::handoff`]).
    Hints,
    /// Anti-entropy index: partition (4 bytes BE) ++ segment (2 bytes BE) ++
    /// key, for every stored object, written in the same batch as the
    /// object's creation and removal (see [`crate::replica::trees`]).
    Aae,
}

impl Tree {
    pub const ALL: [Tree; 4] = [Tree::Objects, Tree::Meta, Tree::Hints, Tree::Aae];

    pub fn name(self) -> &'static str {
        match self {
            Tree::Objects => "objects",
            Tree::Meta => "meta",
            Tree::Hints => "hints",
            Tree::Aae => "aae",
        }
    }
}

/// What a store operation can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("corrupt record in tree {tree} at key {key}: {detail}")]
    Corruption {
        tree: &'static str,
        key: String,
        detail: String,
    },
    #[error("storage {op} failed: {detail}")]
    Io { op: &'static str, detail: String },
}

/// One record of a [`Store::scan`]: its key, and its value or why the value
/// cannot be trusted.
pub type Scanned = (Vec<u8>, Result<Vec<u8>, StoreError>);

/// One change in a [`WriteBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOp {
    Put {
        tree: Tree,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        tree: Tree,
        key: Vec<u8>,
    },
}

/// Changes applied atomically: all or none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub ops: Vec<BatchOp>,
}

impl WriteBatch {
    pub fn put(&mut self, tree: Tree, key: &[u8], value: &[u8]) -> &mut Self {
        self.ops.push(BatchOp::Put {
            tree,
            key: key.to_vec(),
            value: value.to_vec(),
        });
        self
    }
    pub fn delete(&mut self, tree: Tree, key: &[u8]) -> &mut Self {
        self.ops.push(BatchOp::Delete {
            tree,
            key: key.to_vec(),
        });
        self
    }

    /// The bytes of its keys and values.
    pub fn bytes(&self) -> usize {
        self.ops
            .iter()
            .map(|op| match op {
                BatchOp::Put { key, value, .. } => key.len() + value.len(),
                BatchOp::Delete { key, .. } => key.len(),
            })
            .sum()
    }
}

/// A key-value engine with named trees. Values handed in and out are the
/// caller's bytes; sealing with a checksum happens inside.
pub trait Store: Send + Sync + 'static {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    fn write(&self, batch: WriteBatch) -> Result<(), StoreError>;
    /// Writes `batch` durably (the WAL synced) whatever the engine's
    /// `fsync` setting: for the few records that must survive a power loss
    /// (the incarnation counter). No default: an engine that did not sync here would let a power
    /// loss undo an incarnation (found by the simulation's power losses).
    fn write_synced(&self, batch: WriteBatch) -> Result<(), StoreError>;
    /// Writes `batch` for a caller that can wait for durability without
    /// holding anything up: the batch is applied (and visible) now, and with
    /// `fsync` set the returned [`Durable`] resolves once a WAL sync shared
    /// with the writes made meanwhile covers it (group commit, see
    /// [`group`]). Acknowledge the write only after. By default: [`Self::write`].
    fn write_deferred(&self, batch: WriteBatch) -> Result<Durable, StoreError> {
        self.write(batch).map(|()| Durable::now())
    }
    /// A [`Durable`] for every write made so far: an answer that vouches
    /// for what is stored without writing (a merge that changed nothing)
    /// may be vouching for a deferred write whose sync is still to come.
    /// By default: durable now.
    fn durable_so_far(&self) -> Result<Durable, StoreError> {
        Ok(Durable::now())
    }
    /// Makes every write so far durable (the WAL synced), whatever the
    /// engine's `fsync` setting: before a node vouches for a state that
    /// others will act on for good (the reaper's checks).
    fn sync_wal(&self) -> Result<(), StoreError>;
    /// Whether no write or WAL sync has failed since the store was opened
    /// (nor was the database reopened after one): a failed one may have
    /// cost WAL pages the kernel held, and a sync that succeeds later does
    /// not bring them back. Only then may a clean stop vouch that the store
    /// holds every write of the run (see `replica::seal`). By default: true.
    fn intact(&self) -> bool {
        true
    }
    /// Up to `limit` records with `start <= key < end` (no `end`: to the end of
    /// the tree), in key order. A record that fails its checksum is listed
    /// with its error, so that one bad record does not end a scan; an error
    /// of the whole call is one the engine could not read past.
    fn scan(
        &self,
        tree: Tree,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Scanned>, StoreError>;

    /// About how many bytes `tree` holds (the engine's estimate; 0 when it
    /// cannot tell): for plans' expected transfer sizes, not for decisions.
    fn approximate_bytes(&self, tree: Tree) -> u64;

    fn put(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let mut b = WriteBatch::default();
        b.put(tree, key, value);
        self.write(b)
    }
}

#[cfg(test)]
mod conformance {
    //! The suite every [`Store`] engine must pass.
    use super::*;
    use std::sync::Arc;

    fn suite(store: &dyn Store) {
        // Absent keys, point reads, overwrite.
        assert_eq!(store.get(Tree::Objects, b"a").unwrap(), None);
        store.put(Tree::Objects, b"a", b"1").unwrap();
        store.put(Tree::Objects, b"a", b"2").unwrap();
        assert_eq!(store.get(Tree::Objects, b"a").unwrap(), Some(b"2".to_vec()));
        // Trees are separate namespaces.
        assert_eq!(store.get(Tree::Meta, b"a").unwrap(), None);
        // Batches apply atomically, deletes included.
        let mut b = WriteBatch::default();
        b.put(Tree::Objects, b"b", b"x")
            .put(Tree::Objects, b"c", b"y")
            .delete(Tree::Objects, b"a");
        store.write(b).unwrap();
        assert_eq!(store.get(Tree::Objects, b"a").unwrap(), None);
        // Empty values and empty keys are ordinary.
        store.put(Tree::Meta, b"", b"").unwrap();
        assert_eq!(store.get(Tree::Meta, b"").unwrap(), Some(vec![]));
        // Range scans: ordered, bounded, limited.
        for k in [&b"k1"[..], b"k3", b"k2", b"l"] {
            store.put(Tree::Objects, k, k).unwrap();
        }
        let keys = |v: Vec<Scanned>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(
            keys(store.scan(Tree::Objects, b"k", Some(b"l"), 100).unwrap()),
            vec![b"k1".to_vec(), b"k2".to_vec(), b"k3".to_vec()]
        );
        assert_eq!(
            keys(store.scan(Tree::Objects, b"k", None, 2).unwrap()),
            vec![b"k1".to_vec(), b"k2".to_vec()]
        );
        assert_eq!(
            store.scan(Tree::Objects, b"k2", None, 10).unwrap()[0],
            (b"k2".to_vec(), Ok(b"k2".to_vec()))
        );
        // Big values survive.
        let big = vec![7u8; 1 << 20];
        store.put(Tree::Objects, b"big", &big).unwrap();
        assert_eq!(store.get(Tree::Objects, b"big").unwrap(), Some(big));
    }

    /// The anti-entropy index's reads: point reads, scans of one segment
    /// (one prefix: partition ++ segment) and scans across segments, from
    /// any key. `written` first writes the entries, so that the RocksDB
    /// engine is checked from its memtable and, called again after a
    /// flush, from its files.
    fn index_suite(store: &dyn Store, written: bool) {
        let ik = |p: u32, seg: u16, key: &[u8]| {
            let mut k = p.to_be_bytes().to_vec();
            k.extend_from_slice(&seg.to_be_bytes());
            k.extend_from_slice(key);
            k
        };
        let entries = [
            ik(1, 0, b"a"),
            ik(1, 0, b"b"),
            ik(1, 0x00FF, b"c"),
            ik(1, 0x0100, b"a"),
            ik(1, 0x0100, b"d"),
            ik(1, 1023, b"e"),
            ik(2, 0, b"a"),
            ik(0, 1023, b"z"),
        ];
        if written {
            // Out of order, in two batches.
            for k in entries.iter().rev() {
                store.put(Tree::Aae, k, &[7; 8]).unwrap();
            }
        }
        let keys = |start: &[u8], end: Option<&[u8]>, limit| {
            let page = store.scan(Tree::Aae, start, end, limit).unwrap();
            page.into_iter()
                .map(|(k, v)| {
                    assert_eq!(v.unwrap(), vec![7; 8]);
                    k
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            store.get(Tree::Aae, &ik(1, 0x0100, b"a")).unwrap(),
            Some(vec![7; 8])
        );
        assert_eq!(store.get(Tree::Aae, &ik(1, 0x0101, b"a")).unwrap(), None);
        // One segment, from its start and from after a key.
        let seg = |p: u32, s: u16| (ik(p, s, b""), ik(p, s + 1, b""));
        let (s, e) = seg(1, 0);
        assert_eq!(keys(&s, Some(&e), 100), entries[0..2].to_vec());
        assert_eq!(
            keys(&[&entries[0][..], &[0]].concat(), Some(&e), 100),
            entries[1..2].to_vec()
        );
        let (s, e) = seg(1, 0x00FF);
        assert_eq!(keys(&s, Some(&e), 100), entries[2..3].to_vec());
        let (s, e) = seg(1, 0x0100);
        assert_eq!(keys(&s, Some(&e), 1), entries[3..4].to_vec());
        let (s, e) = seg(1, 7);
        assert_eq!(keys(&s, Some(&e), 100), Vec::<Vec<u8>>::new());
        // Across segments: a partition, and the whole index.
        assert_eq!(
            keys(&1u32.to_be_bytes(), Some(&2u32.to_be_bytes()), 100),
            entries[0..6].to_vec()
        );
        assert_eq!(
            keys(&entries[2], Some(&2u32.to_be_bytes()), 2),
            entries[2..4].to_vec()
        );
        let mut all = entries.to_vec();
        all.sort();
        assert_eq!(keys(b"", None, 100), all);
    }

    #[test]
    fn memory_store_conforms() {
        suite(&MemoryStore::new());
        index_suite(&MemoryStore::new(), true);
    }

    #[cfg(feature = "rocksdb")]
    #[test]
    fn rocks_store_conforms() {
        let dir = tempfile::tempdir().unwrap();
        suite(&RocksStore::open(dir.path(), false).unwrap());
        // The index's reads from the memtable, then from the files, with
        // memtables on huge pages where the machine has them reserved.
        let dir = tempfile::tempdir().unwrap();
        let store =
            RocksStore::open_with(dir.path(), false, crate::config::HugePages::Try).unwrap();
        index_suite(&store, true);
        store.flush().unwrap();
        index_suite(&store, false);
        drop(store);
        index_suite(&RocksStore::open(dir.path(), false).unwrap(), false);
    }

    #[cfg(feature = "rocksdb")]
    #[test]
    fn rocks_store_keeps_data_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RocksStore::open(dir.path(), true).unwrap();
            s.put(Tree::Objects, b"k", b"v").unwrap();
        }
        let s = RocksStore::open(dir.path(), true).unwrap();
        assert_eq!(s.get(Tree::Objects, b"k").unwrap(), Some(b"v".to_vec()));
    }

    /// Group commit on the real engine: 64 writers with `fsync` share WAL
    /// syncs, each write is acknowledged only once one covers it, and
    /// every acknowledged write is there after a reopen.
    #[cfg(feature = "rocksdb")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rocks_store_groups_the_syncs_of_concurrent_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RocksStore::open(dir.path(), true).unwrap());
        let writers: Vec<_> = (0..64u32)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    for i in 0..20u32 {
                        let mut b = WriteBatch::default();
                        b.put(Tree::Objects, format!("{w}/{i}").as_bytes(), b"v");
                        store.write_deferred(b).unwrap().wait().await.unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        let syncs = store.group_syncs();
        assert!(
            (1..1280).contains(&syncs),
            "1280 writes took {syncs} WAL syncs"
        );
        println!("1280 writes from 64 writers: {syncs} WAL syncs");
        drop(store);
        let store = RocksStore::open(dir.path(), true).unwrap();
        assert_eq!(
            store.scan(Tree::Objects, b"", None, 2000).unwrap().len(),
            1280
        );
        // Without fsync there is nothing to wait for.
        let plain = RocksStore::open(tempfile::tempdir().unwrap().path(), false).unwrap();
        plain
            .write_deferred(WriteBatch::default())
            .unwrap()
            .wait()
            .await
            .unwrap();
        assert_eq!(plain.group_syncs(), 0);
    }

    /// Without `fsync`, the WAL's pages are handed to writeback as it grows
    /// (see `writeback`), not left dirty until a memtable switch syncs them
    /// in one burst (the kernel alone would wait 30 s): within a few passes
    /// of 16 MiB of writes, the page cache holds next to none of the WAL
    /// dirty. The kernel's per-file count (`cachestat`, Linux 6.5) is read
    /// without starting any writeback itself.
    #[cfg(all(feature = "rocksdb", target_os = "linux"))]
    #[test]
    fn rocks_store_starts_writing_its_wal_back_as_it_grows() {
        use std::time::{Duration, Instant};
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), false).unwrap();
        let value = vec![7u8; 64 << 10];
        for i in 0..256u32 {
            store.put(Tree::Objects, &i.to_be_bytes(), &value).unwrap();
        }
        let wal = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .max_by_key(|p| p.metadata().unwrap().len())
            .expect("a WAL");
        let wal = std::fs::File::open(wal).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let Some((cached, dirty)) = dirty_pages(&wal) else {
                eprintln!("cachestat is not available here (a kernel before 6.5, or refused): not checked");
                return;
            };
            // Of the 4,096 pages written, a tenth may still be dirty.
            if dirty <= 409 {
                println!("{dirty} of the WAL's {cached} cached pages are dirty");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{dirty} of the WAL's {cached} cached pages are still dirty 10 s after the writes"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The pages of `file` in the page cache, and how many of them are
    /// dirty; `None` where `cachestat` is not available.
    #[cfg(all(feature = "rocksdb", target_os = "linux"))]
    fn dirty_pages(file: &std::fs::File) -> Option<(u64, u64)> {
        use std::os::fd::AsRawFd;
        #[repr(C)]
        struct Range {
            off: u64,
            len: u64,
        }
        const SYS_CACHESTAT: libc::c_long = 451;
        let range = Range { off: 0, len: 0 };
        // cache, dirty, writeback, evicted, recently evicted.
        let mut stat = [0u64; 5];
        // SAFETY: both are laid out as the kernel's structs and outlive
        // the call; the descriptor is valid.
        let r = unsafe { libc::syscall(SYS_CACHESTAT, file.as_raw_fd(), &range, &mut stat, 0) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            // ENOSYS: a kernel before 6.5; EPERM: a seccomp filter.
            assert!(
                matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)),
                "cachestat: {e}"
            );
            return None;
        }
        Some((stat[0], stat[1]))
    }

    #[test]
    fn memory_store_reports_a_corrupted_record() {
        let s = MemoryStore::new();
        s.put(Tree::Objects, b"k", b"value").unwrap();
        s.put(Tree::Objects, b"l", b"fine").unwrap();
        s.corrupt(Tree::Objects, b"k");
        assert!(matches!(
            s.get(Tree::Objects, b"k"),
            Err(StoreError::Corruption { .. })
        ));
        // A scan lists the bad record with its error and reads on.
        let page = s.scan(Tree::Objects, b"", None, 10).unwrap();
        assert!(matches!(page[0], (_, Err(StoreError::Corruption { .. }))));
        assert_eq!(page[1], (b"l".to_vec(), Ok(b"fine".to_vec())));
    }

    /// Flip one byte of a stored value in the SST file on disk: the read must
    /// fail with a corruption error, never return the damaged bytes.
    #[cfg(feature = "rocksdb")]
    #[test]
    fn rocks_store_reports_a_byte_flipped_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        // Random bytes do not compress, so they appear verbatim in the file.
        let value: Vec<u8> = (0..4096).map(|_| rand::random::<u8>()).collect();
        {
            let s = RocksStore::open(dir.path(), false).unwrap();
            s.put(Tree::Objects, b"victim", &value).unwrap();
            s.flush().unwrap();
        }
        let mut flipped = 0;
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "sst") {
                let mut bytes = std::fs::read(&path).unwrap();
                if let Some(pos) = bytes.windows(64).position(|w| w == &value[1000..1064]) {
                    bytes[pos + 10] ^= 0x40;
                    std::fs::write(&path, bytes).unwrap();
                    flipped += 1;
                }
            }
        }
        assert_eq!(
            flipped, 1,
            "the value must be found in exactly one SST file"
        );
        match RocksStore::open(dir.path(), false) {
            // RocksDB may refuse the damaged file at open; that is also refusing to serve it.
            Err(e) => assert!(e.to_string().to_lowercase().contains("corrupt"), "{e}"),
            Ok(s) => {
                let got = s.get(Tree::Objects, b"victim");
                assert!(
                    matches!(got, Err(StoreError::Corruption { .. })),
                    "got {got:?}"
                );
            }
        }
    }

    /// Our own checksum catches damage RocksDB's block checksums do not see
    /// (here: a record rewritten under the wrong key by a buggy writer).
    #[cfg(feature = "rocksdb")]
    #[test]
    fn a_record_moved_to_another_key_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), false).unwrap();
        s.put(Tree::Objects, b"a", b"value").unwrap();
        let raw = s.raw_get(Tree::Objects, b"a").unwrap();
        s.raw_put(Tree::Objects, b"b", &raw).unwrap();
        assert!(matches!(
            s.get(Tree::Objects, b"b"),
            Err(StoreError::Corruption { .. })
        ));
    }
}
