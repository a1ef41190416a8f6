//! The RocksDB engine: one column family per [`Tree`], lz4-compressed, with the
//! WAL synced on every batch when `fsync` is set (durability across power loss)
//! and left to the OS page cache otherwise (durability across process crashes).

use std::path::Path;

use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, Direction, IteratorMode, Options, ReadOptions,
    WriteOptions, DB,
};

use super::{record, BatchOp, Scanned, Store, StoreError, Tree, WriteBatch};

/// Block cache shared by every column family of a node.
const BLOCK_CACHE_BYTES: usize = 128 << 20;

pub struct RocksStore {
    db: DB,
    /// Whether each batch waits for its WAL record to reach the disk.
    fsync: bool,
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
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_paranoid_checks(true);
        opts.increase_parallelism(2);
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
            ColumnFamilyDescriptor::new(t.name(), cf)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(io("open"))?;
        Ok(RocksStore { db, fsync })
    }

    fn cf(&self, tree: Tree) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(tree.name())
            .expect("every tree's column family is created at open")
    }

    /// Writes memtables to SST files (tests that inspect files on disk).
    pub fn flush(&self) -> Result<(), StoreError> {
        for t in Tree::ALL {
            self.db.flush_cf(self.cf(t)).map_err(io("flush"))?;
        }
        Ok(())
    }

    /// The sealed record as stored (tests).
    pub fn raw_get(&self, tree: Tree, key: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.db
            .get_cf(self.cf(tree), key)
            .map_err(io("get"))?
            .ok_or_else(|| StoreError::Io {
                op: "get",
                detail: "absent".into(),
            })
    }

    /// Stores raw bytes without sealing them (tests).
    pub fn raw_put(&self, tree: Tree, key: &[u8], raw: &[u8]) -> Result<(), StoreError> {
        self.db.put_cf(self.cf(tree), key, raw).map_err(io("put"))
    }
}

impl RocksStore {
    fn write_with(&self, batch: WriteBatch, sync: bool) -> Result<(), StoreError> {
        let mut wb = rocksdb::WriteBatch::default();
        for op in &batch.ops {
            match op {
                BatchOp::Put { tree, key, value } => {
                    wb.put_cf(self.cf(*tree), key, record::seal(*tree, key, value))
                }
                BatchOp::Delete { tree, key } => wb.delete_cf(self.cf(*tree), key),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(wb, &wo).map_err(io("write"))
    }
}

impl Store for RocksStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self
            .db
            .get_pinned_cf(self.cf(tree), key)
            .map_err(io("get"))?
        {
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

    fn sync_wal(&self) -> Result<(), StoreError> {
        self.db.flush_wal(true).map_err(io("sync"))
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
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(
            self.cf(tree),
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
