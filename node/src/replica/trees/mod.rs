//! The Merkle trees of anti-entropy, as the replica keeps them: a tree per
//! partition, updated in the write path, rebuilt from the store.
//!
//! # Trees (the Tictac AAE idea of Riak 3)
//! A partition's tree has [`SEGMENTS`] leaves. A key falls in the segment
//! given by the low bits of its hash (the partition takes the high bits), and
//! a leaf is the XOR of `hash(key ++ digest)` over the keys in it, where the
//! digest is a hash of the stored object bytes. XOR makes a write O(1): the
//! old contribution is XORed out and the new one in. [`BRANCHES`] branches of
//! [`BRANCH_WIDTH`] leaves each and the root are XORs of what is below them,
//! computed when asked (a few microseconds).
//!
//! Next to each object the store keeps an index entry, partition ++ segment
//! ++ key ([`Tree::Aae`]), written in the same atomic batch as the object's
//! creation and removed with it, so an exchange lists the keys of a segment
//! with one range scan and reads their digests from the objects. An update
//! of a present key leaves the entry as it is: the index says which keys a
//! segment holds, not their versions, so a write costs one memtable insert,
//! not two (bench/README.md, "Fourth look"). Entries written before this
//! held the digest as their value; it is not read.
//!
//! # Rebuilds
//! Trees live in memory. On start and then every `anti-entropy.rebuild-secs`
//! they are rebuilt from the objects themselves, in key order, throttled to
//! `anti-entropy.rebuild-keys-per-sec`. A rebuild never blocks writes: it
//! reads each key under the key's lock, and a write to a key the rebuild has
//! already passed updates the tree being built as well as the live one, so
//! the rebuilt tree is exact when it replaces the live one. Until the first
//! rebuild is done the node takes part in no exchange.

use std::collections::{BTreeSet, HashMap};
use std::sync::MutexGuard;

use shoal_ring::key_hash;

use super::Replica;
use crate::storage::{Store, StoreError, Tree};

/// Leaves per partition tree.
pub const SEGMENTS: usize = 1024;
/// Leaves per branch.
pub const BRANCH_WIDTH: usize = 32;
/// Branches per partition tree.
pub const BRANCHES: usize = SEGMENTS / BRANCH_WIDTH;

/// The segment of a key within its partition's tree.
pub fn segment_of(key: &[u8]) -> u16 {
    (key_hash(key) % SEGMENTS as u64) as u16
}

/// The version digest of a stored object: a hash of its encoded bytes.
pub fn digest(encoded: &[u8]) -> u64 {
    key_hash(encoded)
}

/// What a key with this digest contributes to its leaf.
fn contribution(key: &[u8], digest: u64) -> u64 {
    shoal_ring::key_hash_of(&[key, &digest.to_le_bytes()])
}

/// The index keys of segment `seg` of `partition`: from its first
/// (partition ++ segment) to the next segment's (`None`: to the end).
pub fn segment_range(partition: u32, seg: u16) -> (Vec<u8>, Option<Vec<u8>>) {
    let mut start = partition.to_be_bytes().to_vec();
    start.extend_from_slice(&seg.to_be_bytes());
    let end = seg.checked_add(1).map(|next| {
        let mut end = partition.to_be_bytes().to_vec();
        end.extend_from_slice(&next.to_be_bytes());
        end
    });
    (start, end)
}

/// The index entry key of a key: partition ++ segment ++ key.
pub fn index_key(partition: u32, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(6 + key.len());
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(&segment_of(key).to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// The key an index entry is for (after the partition and segment
/// prefix). Its value is not read (see the module doc).
pub fn indexed_key(index_key: &[u8]) -> Result<&[u8], StoreError> {
    index_key.get(6..).ok_or_else(|| StoreError::Corruption {
        tree: Tree::Aae.name(),
        key: hex::encode(index_key),
        detail: "index key shorter than its 6-byte prefix".into(),
    })
}

/// One partition's Merkle tree: its leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionTree {
    leaves: Vec<u64>,
}

impl Default for PartitionTree {
    fn default() -> Self {
        PartitionTree {
            leaves: vec![0; SEGMENTS],
        }
    }
}

impl PartitionTree {
    /// Adds or removes (XOR is its own inverse) a key's contribution.
    pub fn toggle(&mut self, key: &[u8], digest: u64) {
        self.leaves[segment_of(key) as usize] ^= contribution(key, digest);
    }

    pub fn leaves(&self) -> &[u64] {
        &self.leaves
    }

    /// The leaves of branch `b`.
    pub fn branch_leaves(&self, b: usize) -> &[u64] {
        &self.leaves[b * BRANCH_WIDTH..(b + 1) * BRANCH_WIDTH]
    }

    pub fn branches(&self) -> Vec<u64> {
        (0..BRANCHES)
            .map(|b| self.branch_leaves(b).iter().fold(0, |a, l| a ^ l))
            .collect()
    }

    pub fn root(&self) -> u64 {
        self.leaves.iter().fold(0, |a, l| a ^ l)
    }
}

/// Every partition tree of a node.
pub type Trees = HashMap<u32, PartitionTree>;

/// A rebuild in progress: keys up to `cursor` are in `trees`, and so is
/// every key up to `page_end` that the page being read does not list.
///
/// A rebuild reads the store a page at a time and then adds the page's keys
/// one by one, so a write lands in one of three places: behind the cursor
/// (the rebuild passed the key: the write updates `trees` too), on a listed
/// key ahead of it (the rebuild reads that key's latest state when it gets
/// there), or on a key inside the page's range that the page does not list,
/// because it was created after the page was read. The rebuild will never
/// read that one, so, as for a key behind the cursor, its writes update
/// `trees` themselves.
///
/// The page is read without the state's lock, which every write takes (a
/// page of objects of megabytes takes up to seconds to read). The keys
/// written ahead of the cursor meanwhile are noted in `written`, and those
/// within the page's range are listed with it when `page`/`page_end` are
/// set: the read may have missed them.
#[derive(Default)]
struct Rebuild {
    cursor: Option<Vec<u8>>,
    page: std::collections::HashSet<Vec<u8>>,
    page_end: Option<Vec<u8>>,
    trees: Trees,
    /// Keys written ahead of the cursor while a page is read; `None`
    /// between reads.
    written: Option<BTreeSet<Vec<u8>>>,
    /// The last read found nothing more: every key is passed, until the
    /// rebuilt trees replace the live ones.
    finished: bool,
}

impl Rebuild {
    /// Whether the rebuild will not read `key` any more: a write to it must
    /// update `trees` itself.
    fn passed(&self, key: &[u8]) -> bool {
        self.finished
            || self.cursor.as_deref().is_some_and(|c| key <= c)
            || self
                .page_end
                .as_deref()
                .is_some_and(|end| key <= end && !self.page.contains(key))
    }
}

/// The trees of a node, and the rebuild in progress if any.
#[derive(Default)]
pub(crate) struct TreeState {
    live: Trees,
    /// The first rebuild finished: the live trees describe the store.
    ready: bool,
    rebuild: Option<Rebuild>,
}

impl TreeState {
    pub(super) fn apply(&mut self, partition: u32, key: &[u8], old: Option<u64>, new: Option<u64>) {
        for d in [old, new].into_iter().flatten() {
            self.live.entry(partition).or_default().toggle(key, d);
        }
        if let Some(r) = &mut self.rebuild {
            if r.passed(key) {
                for d in [old, new].into_iter().flatten() {
                    r.trees.entry(partition).or_default().toggle(key, d);
                }
            } else if let Some(written) = &mut r.written {
                written.insert(key.to_vec());
            }
        }
    }
}

/// Keys read per page by a rebuild (and by the reaper).
pub(crate) const REBUILD_PAGE: usize = 256;

impl<S: Store> Replica<S> {
    pub(super) fn lock_trees(&self) -> MutexGuard<'_, TreeState> {
        self.trees.lock().expect("trees lock")
    }

    /// A copy of the live tree of `partition`, once the first rebuild is done.
    pub fn tree(&self, partition: u32) -> Option<PartitionTree> {
        let state = self.lock_trees();
        state
            .ready
            .then(|| state.live.get(&partition).cloned().unwrap_or_default())
    }

    /// A copy of every live tree (tests compare them with a rebuild).
    pub fn trees(&self) -> Trees {
        self.lock_trees().live.clone()
    }

    /// Rebuilds every tree from the stored objects without blocking writes,
    /// at most `keys_per_sec` keys a second, then replaces the live trees.
    /// Returns how many keys it read.
    pub async fn rebuild_trees(&self, keys_per_sec: u32) -> Result<u64, StoreError> {
        let _one_at_a_time = self.rebuilding.lock().await;
        self.lock_trees().rebuild = Some(Rebuild::default());
        let result = self.rebuild_scan(keys_per_sec).await;
        let mut state = self.lock_trees();
        let rebuilt = state.rebuild.take().expect("rebuild in progress");
        if result.is_ok() {
            let nonzero = |t: &Trees| {
                t.iter()
                    .filter(|(_, tree)| tree.root() != 0 || tree.leaves.iter().any(|l| *l != 0))
                    .map(|(p, tree)| (*p, tree.clone()))
                    .collect::<HashMap<_, _>>()
            };
            if state.ready && nonzero(&state.live) != nonzero(&rebuilt.trees) {
                tracing::warn!("rebuilt anti-entropy trees differ from the live ones; replaced");
                self.metrics
                    .aae_rebuild_mismatches
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            state.live = rebuilt.trees;
            state.ready = true;
            self.metrics
                .aae_rebuilds
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        result
    }

    async fn rebuild_scan(&self, keys_per_sec: u32) -> Result<u64, StoreError> {
        let mut start = Vec::new();
        let mut read = 0u64;
        loop {
            let began = tokio::time::Instant::now();
            self.lock_trees()
                .rebuild
                .as_mut()
                .expect("rebuild in progress")
                .written = Some(BTreeSet::new());
            // A page may hold objects of megabytes: read off the worker, and
            // without the trees' lock (see [`Rebuild`]). Only its keys are
            // kept: each key's object is read again below, under its stripe.
            let scanned = crate::tasks::heavy(|| {
                let page = self.store.scan(Tree::Objects, &start, None, REBUILD_PAGE)?;
                Ok::<BTreeSet<_>, StoreError>(page.into_iter().map(|(key, _)| key).collect())
            });
            let page: Vec<Vec<u8>> = {
                let mut state = self.lock_trees();
                let r = state.rebuild.as_mut().expect("rebuild in progress");
                let written = r.written.take().unwrap_or_default();
                let mut keys = scanned?;
                // Past the page's last key, a written key is left to the next
                // page's read, which comes after the write. After the last
                // page, every one is read here.
                match keys.last().cloned() {
                    Some(last) => keys.extend(written.into_iter().filter(|k| *k <= last)),
                    None => keys = written,
                }
                r.page = keys.iter().cloned().collect();
                r.page_end = keys.last().cloned();
                // Done: from here, under this lock, every write updates the
                // rebuilt trees itself, also one landing before they replace
                // the live ones.
                r.finished = keys.is_empty();
                keys.into_iter().collect()
            };
            let Some(last) = page.last() else {
                break;
            };
            for key in &page {
                let mut stripe = self.lock_stripe(key);
                // A corrupt record is marked lost (and reported): its marker
                // differs from the other replicas' copies, so anti-entropy
                // restores it.
                let record = self.stored_record(&mut stripe, key)?;
                let current = record.bytes();
                let partition = self.partition_of(key);
                if current.is_some() {
                    // Restore an index entry that is missing (or corrupt).
                    let ikey = index_key(partition, key);
                    if !matches!(self.store.get(Tree::Aae, &ikey), Ok(Some(_))) {
                        self.store.put(Tree::Aae, &ikey, &[])?;
                    }
                }
                let mut state = self.lock_trees();
                let r = state.rebuild.as_mut().expect("rebuild in progress");
                if let Some(bytes) = current {
                    r.trees
                        .entry(partition)
                        .or_default()
                        .toggle(key, digest(bytes));
                }
                r.cursor = Some(key.clone());
            }
            read += page.len() as u64;
            start = last.clone();
            start.push(0);
            crate::clock::pace(began, page.len(), keys_per_sec).await;
        }
        Ok(read)
    }

    /// (key, digest) of every key of `partition` in `segments`: the keys
    /// from the index, each digest from the key's object as stored now
    /// (a corrupt object's, once it is marked lost, is its marker's, as in
    /// a rebuild).
    pub fn segment_keys(
        &self,
        partition: u32,
        segments: &[u16],
    ) -> Result<Vec<(Vec<u8>, u64)>, StoreError> {
        let mut out = Vec::new();
        for &seg in segments {
            let (mut start, end) = segment_range(partition, seg);
            loop {
                let page = self.store.scan(Tree::Aae, &start, end.as_deref(), 1024)?;
                let Some((last, _)) = page.last() else { break };
                let next = {
                    let mut n = last.clone();
                    n.push(0);
                    n
                };
                for (ik, entry) in page {
                    if let Some(listed) = self.listed(&ik, entry.is_ok())? {
                        out.push(listed);
                    }
                }
                start = next;
            }
        }
        Ok(out)
    }

    /// The key and digest an index entry lists, from the key's object;
    /// `None` if the object is gone. A corrupt entry (`sound` false) is
    /// rewritten when its key's object is there, and an entry whose object
    /// is gone is dropped: the index lists exactly the stored keys, which
    /// exchanges and transfers rely on (a key left out is compared only
    /// when the other side lists it).
    fn listed(&self, ik: &[u8], sound: bool) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        let Some(key) = self.named_key(ik)? else {
            return Ok(None);
        };
        let mut stripe = self.lock_stripe(key);
        let present = self.stored_record(&mut stripe, key)?.bytes().map(digest);
        if !sound {
            self.metrics.count_corrupt(Tree::Aae);
            tracing::warn!(key = %hex::encode(key), "corrupt anti-entropy index entry rewritten");
        }
        match present {
            Some(d) => {
                if !sound {
                    self.store.put(Tree::Aae, ik, &[])?;
                }
                Ok(Some((key.to_vec(), d)))
            }
            None => {
                self.drop_index_entry(ik)?;
                Ok(None)
            }
        }
    }

    /// The key index entry `ik` names, or `None` if its bytes name no key
    /// whose entry it would be: such an entry is corrupt, and
    /// is dropped (the key it stood for is restored by a rebuild, which is
    /// asked for). Kept, it would be listed for ever: clean-up's drop of
    /// the key it names deletes another entry.
    pub(super) fn named_key<'a>(&self, ik: &'a [u8]) -> Result<Option<&'a [u8]>, StoreError> {
        // The key's own partition, not the one scanned: the entry must be
        // the one a drop or an update of the key would write or delete.
        let named = indexed_key(ik)
            .ok()
            .filter(|key| index_key(self.partition_of(key), key) == ik);
        if named.is_none() {
            self.metrics.count_corrupt(Tree::Aae);
            tracing::warn!(key = %hex::encode(ik), "corrupt anti-entropy index entry dropped; rebuilding the trees");
            self.rebuild_wanted
                .store(true, std::sync::atomic::Ordering::Relaxed);
            self.drop_index_entry(ik)?;
        }
        Ok(named)
    }

    fn drop_index_entry(&self, ik: &[u8]) -> Result<(), StoreError> {
        let mut batch = crate::storage::WriteBatch::default();
        batch.delete(Tree::Aae, ik);
        self.store.write(batch)
    }

    /// Whether the first rebuild is done (the node takes part in exchanges).
    pub fn trees_ready(&self) -> bool {
        self.lock_trees().ready
    }
}

#[cfg(test)]
pub(crate) mod tests;
