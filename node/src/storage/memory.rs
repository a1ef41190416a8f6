//! An in-memory [`Store`] for simulations: the same sealed records as on disk.
//!
//! Two things a simulated crash needs, both opt-in so plain tests see an
//! ordinary map:
//! - **Fencing.** [`MemoryStore::reopen`] gives a restarted node a fresh handle
//!   on the same data and fences every older handle: a write through one
//!   fails (`Io`), as a write of a killed process never reaches the disk. The
//!   tasks a crashed node leaves behind can then do no harm.
//! - **The unsynced tail.** With [`MemoryStore::track_unsynced`] on, every
//!   batch written since the last [`MemoryStore::sync`] is kept in an undo
//!   log; [`MemoryStore::lose_unsynced_tail`] undoes a suffix of those batches
//!   (whole batches: a RocksDB write batch is atomic in its WAL), which models
//!   a power loss with `fsync = false`.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, RwLock};

use super::{record, BatchOp, Scanned, Store, StoreError, Tree, WriteBatch};

type Trees = BTreeMap<Tree, BTreeMap<Vec<u8>, Vec<u8>>>;
/// What a batch overwrote: (tree, key, the sealed record before), in order.
type Undo = Vec<(Tree, Vec<u8>, Option<Vec<u8>>)>;

#[derive(Default)]
struct Data {
    trees: Trees,
    /// The handle generation allowed to write (see [`MemoryStore::reopen`]).
    epoch: u64,
    /// Undo logs of the batches written since the last sync, oldest first;
    /// `None`: not tracked (every write is durable at once).
    unsynced: Option<Vec<Undo>>,
    /// Every write fails, as on a full disk (see [`MemoryStore::set_full`]).
    full: bool,
    /// Every read fails (see [`MemoryStore::set_reads_fail`]).
    reads_fail: bool,
}

#[derive(Default)]
pub struct MemoryStore {
    data: Arc<RwLock<Data>>,
    /// This handle's generation; writes succeed only while it is current.
    epoch: u64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A new handle on the same data for a restarted node; every older
    /// handle's writes fail from now on.
    pub fn reopen(&self) -> Self {
        let mut d = self.data.write().expect("store lock");
        d.epoch += 1;
        MemoryStore {
            data: self.data.clone(),
            epoch: d.epoch,
        }
    }

    /// Starts keeping the writes since the last sync so that a power loss
    /// can lose them (see [`Self::lose_unsynced_tail`]).
    pub fn track_unsynced(&self) {
        let mut d = self.data.write().expect("store lock");
        if d.unsynced.is_none() {
            d.unsynced = Some(Vec::new());
        }
    }

    /// Everything written so far is durable (the OS flushed the WAL).
    pub fn sync(&self) {
        if let Some(log) = &mut self.data.write().expect("store lock").unsynced {
            log.clear();
        }
    }

    /// Batches written since the last sync.
    pub fn unsynced_batches(&self) -> usize {
        let d = self.data.read().expect("store lock");
        d.unsynced.as_ref().map_or(0, Vec::len)
    }

    /// Power loss: keeps the first `keep` batches written since the last
    /// sync and undoes the rest; returns how many were lost.
    pub fn lose_unsynced_tail(&self, keep: usize) -> usize {
        let mut d = self.data.write().expect("store lock");
        let Some(log) = d.unsynced.as_mut() else {
            return 0;
        };
        let lost: Vec<Undo> = log.drain(keep.min(log.len())..).collect();
        log.clear();
        let n = lost.len();
        for undo in lost.into_iter().rev() {
            for (tree, key, before) in undo.into_iter().rev() {
                let t = d.trees.entry(tree).or_default();
                match before {
                    Some(raw) => t.insert(key, raw),
                    None => t.remove(&key),
                };
            }
        }
        n
    }

    /// A full disk (`true`): every write fails with `Io` and changes
    /// nothing, as RocksDB's does on ENOSPC; reads go on.
    pub fn set_full(&self, full: bool) {
        self.data.write().expect("store lock").full = full;
    }

    /// A store that refuses every read (`true`), as RocksDB's does after a
    /// WAL failure until the node restarts; writes are not affected.
    pub fn set_reads_fail(&self, fail: bool) {
        self.data.write().expect("store lock").reads_fail = fail;
    }

    /// Flips a bit of a stored record (tests of corruption handling).
    pub fn corrupt(&self, tree: Tree, key: &[u8]) {
        let mut d = self.data.write().expect("store lock");
        if let Some(raw) = d.trees.get_mut(&tree).and_then(|t| t.get_mut(key)) {
            if let Some(last) = raw.last_mut() {
                *last ^= 1;
            }
        }
    }

    /// Removes a record as if it had never been written (tests of repair).
    pub fn forget(&self, tree: Tree, key: &[u8]) {
        if let Some(t) = self.data.write().expect("store lock").trees.get_mut(&tree) {
            t.remove(key);
        }
    }
}

impl Store for MemoryStore {
    fn approximate_bytes(&self, tree: Tree) -> u64 {
        let d = self.data.read().expect("store lock");
        d.trees.get(&tree).map_or(0, |t| {
            t.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum()
        })
    }

    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let d = self.data.read().expect("store lock");
        if d.reads_fail {
            return Err(StoreError::Io {
                op: "get",
                detail: "reads refused (test)".into(),
            });
        }
        match d.trees.get(&tree).and_then(|t| t.get(key)) {
            Some(raw) => record::open(tree, key, raw).map(Some),
            None => Ok(None),
        }
    }

    fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut guard = self.data.write().expect("store lock");
        let d = &mut *guard;
        if d.epoch != self.epoch {
            return Err(StoreError::Io {
                op: "write",
                detail: "the process that opened this store has crashed".into(),
            });
        }
        if d.full {
            return Err(StoreError::Io {
                op: "write",
                detail: "No space left on device".into(),
            });
        }
        let mut undo = Undo::new();
        let tracking = d.unsynced.is_some();
        for op in batch.ops {
            let (tree, key, new) = match op {
                BatchOp::Put { tree, key, value } => {
                    let sealed = record::seal(tree, &key, &value);
                    (tree, key, Some(sealed))
                }
                BatchOp::Delete { tree, key } => (tree, key, None),
            };
            let t = d.trees.entry(tree).or_default();
            let before = match new {
                Some(sealed) => t.insert(key.clone(), sealed),
                None => t.remove(&key),
            };
            if tracking {
                undo.push((tree, key, before));
            }
        }
        if let Some(log) = &mut d.unsynced {
            log.push(undo);
        }
        Ok(())
    }

    /// Like a synced RocksDB write: this batch and every one before it
    /// survive a power loss.
    fn write_synced(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.write(batch)?;
        self.sync();
        Ok(())
    }

    fn sync_wal(&self) -> Result<(), StoreError> {
        self.sync();
        Ok(())
    }

    fn scan(
        &self,
        tree: Tree,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Scanned>, StoreError> {
        let d = self.data.read().expect("store lock");
        let Some(t) = d.trees.get(&tree) else {
            return Ok(Vec::new());
        };
        let upper = end.map_or(Bound::Unbounded, |e| Bound::Excluded(e.to_vec()));
        Ok(t.range((Bound::Included(start.to_vec()), upper))
            .take(limit)
            .map(|(k, raw)| (k.clone(), record::open(tree, k, raw)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_power_loss_undoes_the_batches_after_the_last_sync() {
        let s = MemoryStore::new();
        s.track_unsynced();
        s.put(Tree::Objects, b"a", b"1").unwrap();
        s.sync();
        s.put(Tree::Objects, b"a", b"2").unwrap();
        s.put(Tree::Objects, b"b", b"1").unwrap();
        s.put(Tree::Objects, b"c", b"1").unwrap();
        assert_eq!(s.lose_unsynced_tail(1), 2);
        assert_eq!(s.get(Tree::Objects, b"a").unwrap(), Some(b"2".to_vec()));
        assert_eq!(s.get(Tree::Objects, b"b").unwrap(), None);
        assert_eq!(s.get(Tree::Objects, b"c").unwrap(), None);
    }

    #[test]
    fn a_reopened_store_fences_the_old_handle() {
        let s = MemoryStore::new();
        s.put(Tree::Objects, b"a", b"1").unwrap();
        let t = s.reopen();
        assert!(s.put(Tree::Objects, b"a", b"2").is_err());
        t.put(Tree::Objects, b"a", b"3").unwrap();
        assert_eq!(s.get(Tree::Objects, b"a").unwrap(), Some(b"3".to_vec()));
    }
}
