//! An in-memory [`Store`] for simulations: the same sealed records as on disk.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::RwLock;

use super::{record, BatchOp, Store, StoreError, Tree, WriteBatch};

#[derive(Default)]
pub struct MemoryStore {
    trees: RwLock<BTreeMap<Tree, BTreeMap<Vec<u8>, Vec<u8>>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Flips a bit of a stored record (tests of corruption handling).
    pub fn corrupt(&self, tree: Tree, key: &[u8]) {
        let mut trees = self.trees.write().expect("store lock");
        if let Some(raw) = trees.get_mut(&tree).and_then(|t| t.get_mut(key)) {
            if let Some(last) = raw.last_mut() {
                *last ^= 1;
            }
        }
    }

    /// Removes a record as if it had never been written (tests of repair).
    pub fn forget(&self, tree: Tree, key: &[u8]) {
        if let Some(t) = self.trees.write().expect("store lock").get_mut(&tree) {
            t.remove(key);
        }
    }
}

impl Store for MemoryStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let trees = self.trees.read().expect("store lock");
        match trees.get(&tree).and_then(|t| t.get(key)) {
            Some(raw) => record::open(tree, key, raw).map(Some),
            None => Ok(None),
        }
    }

    fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut trees = self.trees.write().expect("store lock");
        for op in batch.ops {
            match op {
                BatchOp::Put { tree, key, value } => {
                    let sealed = record::seal(tree, &key, &value);
                    trees.entry(tree).or_default().insert(key, sealed);
                }
                BatchOp::Delete { tree, key } => {
                    trees.entry(tree).or_default().remove(&key);
                }
            }
        }
        Ok(())
    }

    fn scan(
        &self,
        tree: Tree,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let trees = self.trees.read().expect("store lock");
        let Some(t) = trees.get(&tree) else {
            return Ok(Vec::new());
        };
        let upper = end.map_or(Bound::Unbounded, |e| Bound::Excluded(e.to_vec()));
        t.range((Bound::Included(start.to_vec()), upper))
            .take(limit)
            .map(|(k, raw)| record::open(tree, k, raw).map(|v| (k.clone(), v)))
            .collect()
    }
}
