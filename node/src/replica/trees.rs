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

use std::collections::HashMap;
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
    let mut bytes = Vec::with_capacity(key.len() + 8);
    bytes.extend_from_slice(key);
    bytes.extend_from_slice(&digest.to_le_bytes());
    key_hash(&bytes)
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
/// `trees` themselves. The page is read and `page`/`page_end` set under the
/// state's lock, so no write falls between the read and the bookkeeping.
#[derive(Default)]
struct Rebuild {
    cursor: Option<Vec<u8>>,
    page: std::collections::HashSet<Vec<u8>>,
    page_end: Option<Vec<u8>>,
    trees: Trees,
}

impl Rebuild {
    /// Whether the rebuild will not read `key` any more: a write to it must
    /// update `trees` itself.
    fn passed(&self, key: &[u8]) -> bool {
        self.cursor.as_deref().is_some_and(|c| key <= c)
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
            let page = {
                let mut state = self.lock_trees();
                let page = self.store.scan(Tree::Objects, &start, None, REBUILD_PAGE)?;
                let r = state.rebuild.as_mut().expect("rebuild in progress");
                r.page = page.iter().map(|(k, _)| k.clone()).collect();
                r.page_end = page.last().map(|(k, _)| k.clone());
                page
            };
            let Some((last, _)) = page.last() else {
                break;
            };
            for (key, _) in &page {
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
                    if let Some(listed) = self.listed(partition, &ik, entry.is_ok())? {
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
    fn listed(
        &self,
        partition: u32,
        ik: &[u8],
        sound: bool,
    ) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        let named = indexed_key(ik)
            .ok()
            .filter(|key| index_key(partition, key) == ik);
        let Some(key) = named else {
            // A corrupt entry whose bytes name no key of this segment: the
            // key it stood for is restored by a rebuild.
            self.metrics.count_corrupt(Tree::Aae);
            tracing::warn!(key = %hex::encode(ik), "corrupt anti-entropy index entry dropped; rebuilding the trees");
            self.rebuild_wanted
                .store(true, std::sync::atomic::Ordering::Relaxed);
            self.drop_index_entry(ik)?;
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
pub(crate) mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;
    use shoal_client::proto::MemberInfo;
    use shoal_ring::NodeId;

    use super::*;
    use crate::config::MemberConfig;
    use crate::membership::Membership;
    use crate::replica::ReplicaSettings;
    use crate::storage::MemoryStore;
    use crate::version::{Object, VersionVector};

    /// A rebuild reads a page of keys, then adds them one by one; a key
    /// created meanwhile between two keys of the page is never read by it,
    /// so its write must reach the rebuilt tree itself.
    #[test]
    fn a_key_created_inside_a_page_already_read_is_in_the_rebuilt_tree() {
        let mut state = TreeState {
            rebuild: Some(Rebuild {
                cursor: Some(b"a".to_vec()),
                page: [b"a".to_vec(), b"c".to_vec()].into_iter().collect(),
                page_end: Some(b"c".to_vec()),
                trees: Trees::new(),
            }),
            ..TreeState::default()
        };
        state.apply(0, b"b", None, Some(7));
        let mut expected = PartitionTree::default();
        expected.toggle(b"b", 7);
        let rebuilt = |s: &TreeState| s.rebuild.as_ref().unwrap().trees.get(&0).cloned();
        assert_eq!(rebuilt(&state), Some(expected.clone()));
        // A listed key ahead of the cursor is left for the rebuild to read,
        // and a key past the page for a later page.
        state.apply(0, b"c", None, Some(9));
        state.apply(0, b"d", None, Some(11));
        assert_eq!(rebuilt(&state), Some(expected));
    }

    fn replica() -> Replica<MemoryStore> {
        replica_over(Arc::new(MemoryStore::new()))
    }

    /// A one-node replica over `store` (tests of the replica).
    pub(crate) fn replica_over<S: Store>(store: Arc<S>) -> Replica<S> {
        let me = MemberInfo {
            id: NodeId::from_u128(1),
            name: "n".into(),
            client_addr: ([127, 0, 0, 1], 1).into(),
            peer_addr: ([127, 0, 0, 1], 2).into(),
            zone: None,
        };
        let membership = Membership::new(
            vec![MemberConfig {
                name: "n".into(),
                peer_addr: me.peer_addr,
            }],
            vec![me.clone()],
            16,
            1,
        );
        let settings = ReplicaSettings {
            clock_max_entries: 50,
            clock_min_age_ms: 86_400_000,
            tombstone_grace: std::time::Duration::from_secs(3600),
            object_cache_bytes: 1 << 20,
            max_siblings: 100,
            max_object_bytes: 64 << 20,
            clock: crate::clock::Clock::system(),
        };
        Replica::new(me.id, store, settings, Arc::new(membership), Arc::default())
            .expect("the store records the incarnation")
    }

    /// Every key of a partition, once, in index order, when its keys are
    /// paged through a few at a time (the transfer's drop does so): the
    /// pages go from segment to segment on both engines.
    fn partition_keys_page_through_every_segment<S: Store>(store: Arc<S>) {
        let r = replica_over(store);
        let mut o = Object::default();
        o.update(
            &VersionVector::new(),
            Some(vec![1]),
            NodeId::from_u128(7),
            0,
        );
        let keys: Vec<Vec<u8>> = (0..600u32).map(|i| format!("k{i}").into_bytes()).collect();
        for k in &keys {
            r.merge(k, &o).unwrap();
        }
        for p in 0..16 {
            let mut expected: Vec<&Vec<u8>> =
                keys.iter().filter(|k| r.partition_of(k) == p).collect();
            expected.sort_by_key(|k| index_key(p, k));
            let mut paged = Vec::new();
            let mut after: Option<Vec<u8>> = None;
            loop {
                let page = r.partition_keys(p, after.as_deref(), 7).unwrap();
                assert!(page.len() <= 7);
                let Some(last) = page.last() else { break };
                after = Some(last.clone());
                paged.extend(page);
            }
            assert_eq!(paged.iter().collect::<Vec<_>>(), expected, "partition {p}");
        }
    }

    /// A corrupt index entry of a stored key is listed from the key's
    /// object and rewritten, and a stale one (its object gone) is dropped:
    /// skipped, a key whose entry is corrupt would be compared only when
    /// the other side lists it, and a transfer's pull from this node would
    /// miss it (found in review).
    #[test]
    fn segment_keys_repair_a_corrupt_index_entry_from_the_object() {
        let store = Arc::new(MemoryStore::new());
        let r = replica_over(store.clone());
        let mut o = Object::default();
        o.update(
            &VersionVector::new(),
            Some(vec![1]),
            NodeId::from_u128(7),
            0,
        );
        r.merge(b"k", &o).unwrap();
        // An update leaves the entry as it is.
        let mut o = Object::default();
        o.update(
            &VersionVector::new(),
            Some(vec![2]),
            NodeId::from_u128(8),
            0,
        );
        r.merge(b"k", &o).unwrap();
        let (p, seg) = (r.partition_of(b"k"), segment_of(b"k"));
        let ik = index_key(p, b"k");
        store.corrupt(Tree::Aae, &ik);
        assert!(store.get(Tree::Aae, &ik).is_err());
        let stored = r.stored_record(&mut r.lock_stripe(b"k"), b"k").unwrap();
        let expected = digest(stored.bytes().unwrap());
        assert_eq!(
            r.segment_keys(p, &[seg]).unwrap(),
            vec![(b"k".to_vec(), expected)]
        );
        assert!(
            matches!(store.get(Tree::Aae, &ik), Ok(Some(_))),
            "rewritten"
        );
        // An entry whose object is gone is dropped, corrupt or not.
        store.forget(Tree::Objects, b"k");
        r.drop_cache();
        store.corrupt(Tree::Aae, &ik);
        assert_eq!(r.segment_keys(p, &[seg]).unwrap(), vec![]);
        assert_eq!(store.get(Tree::Aae, &ik), Ok(None));
    }

    #[test]
    fn partition_keys_page_through_every_segment_in_memory() {
        partition_keys_page_through_every_segment(Arc::new(MemoryStore::new()));
    }

    #[cfg(feature = "rocksdb")]
    #[test]
    fn partition_keys_page_through_every_segment_in_rocksdb() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::storage::RocksStore::open(dir.path(), false).unwrap();
        partition_keys_page_through_every_segment(Arc::new(store));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(u8, u8),
        Remove(u8),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                (0u8..20, any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
                (0u8..20).prop_map(Op::Remove),
            ],
            0..60,
        )
    }

    fn run(r: &Replica<MemoryStore>, op: &Op) {
        match op {
            Op::Put(k, v) => {
                let mut o = Object::default();
                o.update(
                    &VersionVector::new(),
                    Some(vec![*v]),
                    NodeId::from_u128(7),
                    0,
                );
                r.merge(&[*k], &o).unwrap();
            }
            Op::Remove(k) => r.remove_object(&[*k]).unwrap(),
        }
    }

    proptest! {
        /// Acceptance 5 of issue 4: a rebuilt tree and the incrementally
        /// updated one agree after any sequence of puts and deletes.
        #[test]
        fn rebuilt_trees_equal_incremental_ones(before in ops(), during in ops()) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            rt.block_on(async {
                let r = Arc::new(replica());
                r.rebuild_trees(u32::MAX).await.unwrap();
                for op in &before {
                    run(&r, op);
                }
                let incremental = r.trees();
                r.rebuild_trees(u32::MAX).await.unwrap();
                let strip = |t: Trees| t.into_iter().filter(|(_, t)| t.leaves.iter().any(|l| *l != 0)).collect::<HashMap<_, _>>();
                prop_assert_eq!(strip(r.trees()), strip(incremental));
                // Writes while a (slow) rebuild runs are not lost to it.
                let rebuilding = {
                    let r = r.clone();
                    tokio::spawn(async move { r.rebuild_trees(2_000).await.unwrap() })
                };
                for op in &during {
                    run(&r, op);
                    tokio::task::yield_now().await;
                }
                let incremental = r.trees();
                rebuilding.await.unwrap();
                prop_assert_eq!(strip(r.trees()), strip(incremental));
                Ok(())
            })?;
        }

        /// The index lists exactly the stored keys (an update leaves a
        /// key's entry as it is), and the digests an exchange is given for
        /// them make the trees' leaves, after any creations, updates and
        /// removals.
        #[test]
        fn segment_keys_list_the_stored_keys_with_the_trees_digests(ops in ops()) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            rt.block_on(async {
                let r = replica();
                r.rebuild_trees(u32::MAX).await.unwrap();
                for op in &ops {
                    run(&r, op);
                }
                let trees = r.trees();
                let all: Vec<u16> = (0..SEGMENTS as u16).collect();
                for p in 0..16 {
                    let listed = r.segment_keys(p, &all).unwrap();
                    let mut tree = PartitionTree::default();
                    for (k, d) in &listed {
                        tree.toggle(k, *d);
                    }
                    let mut keys: Vec<Vec<u8>> = listed.into_iter().map(|(k, _)| k).collect();
                    keys.sort();
                    let stored: Vec<Vec<u8>> = (0u8..20)
                        .map(|k| vec![k])
                        .filter(|k| r.partition_of(k) == p && r.get(k).unwrap().is_some())
                        .collect();
                    prop_assert_eq!(keys, stored);
                    let leaves = trees.get(&p).map_or(vec![0; SEGMENTS], |t| t.leaves().to_vec());
                    prop_assert_eq!(tree.leaves(), &leaves[..]);
                }
                Ok(())
            })?;
        }
    }

    /// Two rebuilds at once used to share one bookkeeping slot: the first
    /// to finish took it, the other panicked holding the trees lock, and
    /// every later write panicked on the poisoned lock.
    #[tokio::test]
    async fn two_rebuilds_at_once_both_finish_and_writes_go_on() {
        let r = Arc::new(replica());
        for k in 0..600u16 {
            run(&r, &Op::Put((k % 20) as u8, k as u8));
        }
        let (a, b) = (r.clone(), r.clone());
        let first = tokio::spawn(async move { a.rebuild_trees(20_000).await });
        let second = tokio::spawn(async move { b.rebuild_trees(20_000).await });
        assert!(first.await.unwrap().is_ok());
        assert!(second.await.unwrap().is_ok());
        run(&r, &Op::Put(1, 1));
        let live = r.trees();
        r.rebuild_trees(u32::MAX).await.unwrap();
        assert_eq!(r.trees(), live);
    }

    #[test]
    fn branches_and_root_are_xors_of_leaves() {
        let mut t = PartitionTree::default();
        t.toggle(b"a", 1);
        t.toggle(b"b", 2);
        assert_eq!(t.branches().iter().fold(0, |a, b| a ^ b), t.root());
        t.toggle(b"a", 1);
        t.toggle(b"b", 2);
        assert_eq!(t, PartitionTree::default());
    }
}
