//! Anti-entropy: a Merkle tree per partition, kept up to date in the write
//! path, rebuilt from the store, and compared between replicas.
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
//! ++ key -> digest ([`Tree::Aae`]), written in the same atomic batch, so an
//! exchange lists the keys of a segment with one range scan.
//!
//! # Rebuilds
//! Trees live in memory. On start and then every `anti-entropy.rebuild-secs`
//! they are rebuilt from the objects themselves, in key order, throttled to
//! `anti-entropy.rebuild-keys-per-sec`. A rebuild never blocks writes: it
//! reads each key under the key's lock, and a write to a key the rebuild has
//! already passed updates the tree being built as well as the live one, so
//! the rebuilt tree is exact when it replaces the live one. Until the first
//! rebuild is done the node takes part in no exchange.
//!
//! # Exchanges
//! Every `anti-entropy.interval-ms` a node sweeps the partitions it holds,
//! one exchange at a time, with each other replica that is up and has a
//! higher node id (so each pair is exchanged once). The protocol is
//! [`AaeRequest`]: compare the 32 branch hashes (one round trip when in
//! sync), then the leaves of differing branches, then the (key, digest)
//! lists of differing segments (64 segments per request), then fetch the
//! peer's objects for the keys that differ (answers capped at
//! [`BATCH_BYTES`], the rest asked again). The initiator merges them into its
//! copies and sends the peer the merged objects it lacks as a `Handoff`.
//! Repairs are paced to `anti-entropy.max-repairs-per-sec`. Exchanges, keys
//! repaired and bytes are in the metrics and in `shoal status --json`.
//!
//! # Tombstones
//! See [`Node::reap_tombstones`]: every `reap-interval-ms` (hourly by
//! default), the first primary of each
//! partition deletes tombstones older than `tombstone-grace-secs` that every
//! primary holds exactly, with a compare-and-delete on each.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_bytes::ByteBuf;
use shoal_client::proto::{AaeStatus, MemberInfo, PartitionSync};
use shoal_ring::{key_hash, partition_of};
use tracing::{debug, info, warn};

use crate::coordinator::Node;
use crate::net::{
    byte_bounded, AaeRequest, AaeResponse, HandoffEntry, PeerRequest, PeerResponse, Transport,
    BATCH_BYTES,
};
use crate::storage::{Store, StoreError, Tree, WriteBatch};
use crate::version::{decode_object, Object};

/// Anti-entropy settings, from the config's `[anti-entropy]`.
#[derive(Debug, Clone, Copy)]
pub struct AaeSettings {
    pub interval: Duration,
    pub rebuild_every: Duration,
    pub rebuild_keys_per_sec: u32,
    pub max_repairs_per_sec: u32,
    pub tombstone_grace: Duration,
    /// Pause between two reaper passes.
    pub reap_every: Duration,
}

impl AaeSettings {
    pub fn from_config(c: &crate::config::AntiEntropyConfig) -> Self {
        AaeSettings {
            interval: Duration::from_millis(c.interval_ms),
            rebuild_every: Duration::from_secs(c.rebuild_secs),
            rebuild_keys_per_sec: c.rebuild_keys_per_sec,
            max_repairs_per_sec: c.max_repairs_per_sec,
            tombstone_grace: Duration::from_secs(c.tombstone_grace_secs),
            reap_every: Duration::from_millis(c.reap_interval_ms),
        }
    }
}

/// What one exchange did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExchangeReport {
    /// Keys whose copies differed and were merged on one side or both.
    pub keys_repaired: u64,
    /// Encoded bytes of every request and answer of the exchange.
    pub bytes: u64,
    /// Segments whose leaves differed.
    pub segments: u64,
}

impl std::ops::AddAssign for ExchangeReport {
    fn add_assign(&mut self, r: ExchangeReport) {
        self.keys_repaired += r.keys_repaired;
        self.bytes += r.bytes;
        self.segments += r.segments;
    }
}

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

/// The index entry key of a key: partition ++ segment ++ key.
pub fn index_key(partition: u32, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(6 + key.len());
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(&segment_of(key).to_be_bytes());
    k.extend_from_slice(key);
    k
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
pub(crate) struct AaeState {
    live: Trees,
    /// The first rebuild finished: the live trees describe the store.
    ready: bool,
    rebuild: Option<Rebuild>,
    /// Last exchange per partition: (peer, unix ms, keys repaired).
    last: BTreeMap<u32, (String, u64, u64)>,
}

impl AaeState {
    fn apply(&mut self, partition: u32, key: &[u8], old: Option<u64>, new: Option<u64>) {
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

/// Keys read per page by a rebuild.
const REBUILD_PAGE: usize = 256;

impl<T: Transport, S: Store> Node<T, S> {
    /// The partition of a key on this node's ring.
    pub fn partition_of(&self, key: &[u8]) -> u32 {
        partition_of(key, self.inner.membership.partitions())
    }

    /// Writes (`new` Some) or removes the stored object bytes of `key`, with
    /// its anti-entropy index entry, and updates the trees and the object
    /// cache. The caller holds the key's stripe and passes the bytes stored
    /// before.
    pub(crate) fn write_object(
        &self,
        stripe: &mut crate::coordinator::Stripe,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let partition = self.partition_of(key);
        let ikey = index_key(partition, key);
        let new_digest = new.map(digest);
        let mut batch = WriteBatch::default();
        match (new, new_digest) {
            (Some(bytes), Some(d)) => {
                batch
                    .put(Tree::Objects, key, bytes)
                    .put(Tree::Aae, &ikey, &d.to_le_bytes());
            }
            _ => {
                batch.delete(Tree::Objects, key).delete(Tree::Aae, &ikey);
            }
        }
        if let Err(e) = self.inner.store.write(batch) {
            stripe.forget(key); // what the store now holds is unknown
            return Err(e);
        }
        match new {
            Some(bytes) => stripe.remember(key, Arc::from(bytes)),
            None => stripe.forget(key),
        }
        self.inner
            .aae
            .lock()
            .expect("aae lock")
            .apply(partition, key, old.map(digest), new_digest);
        Ok(())
    }

    /// A copy of the live tree of `partition`, once the first rebuild is done.
    pub fn tree(&self, partition: u32) -> Option<PartitionTree> {
        let state = self.inner.aae.lock().expect("aae lock");
        state
            .ready
            .then(|| state.live.get(&partition).cloned().unwrap_or_default())
    }

    /// A copy of every live tree (tests compare them with a rebuild).
    pub fn trees(&self) -> Trees {
        self.inner.aae.lock().expect("aae lock").live.clone()
    }

    /// Rebuilds every tree from the stored objects without blocking writes,
    /// at most `keys_per_sec` keys a second, then replaces the live trees.
    /// Returns how many keys it read.
    pub async fn rebuild_trees(&self, keys_per_sec: u32) -> Result<u64, StoreError> {
        self.inner.aae.lock().expect("aae lock").rebuild = Some(Rebuild::default());
        let result = self.rebuild_scan(keys_per_sec).await;
        let mut state = self.inner.aae.lock().expect("aae lock");
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
                self.inner
                    .metrics
                    .aae_rebuild_mismatches
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            state.live = rebuilt.trees;
            state.ready = true;
            self.inner
                .metrics
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
                let mut state = self.inner.aae.lock().expect("aae lock");
                let page = self
                    .inner
                    .store
                    .scan(Tree::Objects, &start, None, REBUILD_PAGE)?;
                let r = state.rebuild.as_mut().expect("rebuild in progress");
                r.page = page.iter().map(|(k, _)| k.clone()).collect();
                r.page_end = page.last().map(|(k, _)| k.clone());
                page
            };
            let Some((last, _)) = page.last() else {
                break;
            };
            for (key, _) in &page {
                let _guard = self.lock_stripe(key);
                let current = self.inner.store.get(Tree::Objects, key)?;
                let partition = self.partition_of(key);
                if let Some(bytes) = &current {
                    // Restore an index entry that is missing or wrong.
                    let ikey = index_key(partition, key);
                    let d = digest(bytes).to_le_bytes();
                    if self.inner.store.get(Tree::Aae, &ikey)?.as_deref() != Some(&d[..]) {
                        self.inner.store.put(Tree::Aae, &ikey, &d)?;
                    }
                }
                let mut state = self.inner.aae.lock().expect("aae lock");
                let r = state.rebuild.as_mut().expect("rebuild in progress");
                if let Some(bytes) = current {
                    r.trees
                        .entry(partition)
                        .or_default()
                        .toggle(key, digest(&bytes));
                }
                r.cursor = Some(key.clone());
            }
            read += page.len() as u64;
            start = last.clone();
            start.push(0);
            crate::coordinator::pace(began, page.len(), keys_per_sec).await;
        }
        Ok(read)
    }
}

/// Whether `object` is a tombstone whose newest sibling is at least `grace`
/// old at `now_ms`.
pub(crate) fn reapable(object: &Object, grace: Duration, now_ms: u64) -> bool {
    let newest = object.siblings().iter().map(|s| s.timestamp_ms).max();
    object.is_deleted()
        && newest.is_some_and(|t| t.saturating_add(grace.as_millis() as u64) <= now_ms)
}

fn encoded_len<M: Serialize>(m: &M) -> u64 {
    rmp_serde::to_vec_named(m).map_or(0, |v| v.len() as u64)
}

/// Segments whose keys are listed per `Keys` request, so one answer stays
/// small even for a partition with millions of keys.
const SEGMENTS_PER_KEYS_REQUEST: usize = 64;

/// Approximate encoded size of an object: its values and per-sibling overhead.
fn object_size(o: &Object) -> usize {
    o.siblings()
        .iter()
        .map(|s| s.value.as_ref().map_or(0, Vec::len) + 48)
        .sum::<usize>()
        + o.clock().len() * 32
}

/// Keys asked or repaired per request.
const REPAIR_CHUNK: usize = 100;

impl<T: Transport, S: Store> Node<T, S> {
    /// Answers one exchange step from this node's trees and store.
    pub(crate) fn aae_answer(&self, request: AaeRequest) -> Result<AaeResponse, String> {
        let tree = |p| {
            self.tree(p)
                .ok_or_else(|| "anti-entropy trees are not built yet".to_string())
        };
        Ok(match request {
            AaeRequest::Branches { partition } => {
                AaeResponse::Branches(tree(partition)?.branches())
            }
            AaeRequest::Leaves {
                partition,
                branches,
            } => {
                let t = tree(partition)?;
                let mut out = Vec::with_capacity(branches.len());
                for b in branches {
                    if b as usize >= BRANCHES {
                        return Err(format!("no branch {b}"));
                    }
                    out.push(t.branch_leaves(b as usize).to_vec());
                }
                AaeResponse::Leaves(out)
            }
            AaeRequest::Keys {
                partition,
                segments,
            } => AaeResponse::Keys(
                self.segment_keys(partition, &segments)
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .map(|(k, d)| (ByteBuf::from(k), d))
                    .collect(),
            ),
            AaeRequest::Objects { keys } => {
                // Answers a prefix of `keys` within the batch cap; the
                // initiator asks again for the rest.
                let mut out = Vec::with_capacity(keys.len());
                let mut size = 0;
                for k in keys {
                    let o = self.local_get(&k).map_err(|e| e.to_string())?;
                    size += k.len() + o.as_ref().map_or(0, object_size);
                    out.push((k, o));
                    if size > BATCH_BYTES {
                        break;
                    }
                }
                AaeResponse::Objects(out)
            }
        })
    }

    /// (key, digest) of every key of `partition` in `segments`, from the index.
    fn segment_keys(
        &self,
        partition: u32,
        segments: &[u16],
    ) -> Result<Vec<(Vec<u8>, u64)>, StoreError> {
        let mut out = Vec::new();
        for &seg in segments {
            let mut prefix = partition.to_be_bytes().to_vec();
            prefix.extend_from_slice(&seg.to_be_bytes());
            let mut end = partition.to_be_bytes().to_vec();
            end.extend_from_slice(&(u32::from(seg) + 1).to_be_bytes()[2..]);
            let end = if seg == u16::MAX { None } else { Some(end) };
            let mut start = prefix.clone();
            loop {
                let page = self
                    .inner
                    .store
                    .scan(Tree::Aae, &start, end.as_deref(), 1024)?;
                let Some((last, _)) = page.last() else { break };
                let next = {
                    let mut n = last.clone();
                    n.push(0);
                    n
                };
                for (ik, d) in page {
                    let digest = <[u8; 8]>::try_from(d.as_slice())
                        .map(u64::from_le_bytes)
                        .map_err(|_| StoreError::Corruption {
                            tree: Tree::Aae.name(),
                            key: hex::encode(&ik),
                            detail: "digest is not 8 bytes".into(),
                        })?;
                    out.push((ik[6..].to_vec(), digest));
                }
                start = next;
            }
        }
        Ok(out)
    }

    async fn aae_call(
        &self,
        peer: &MemberInfo,
        request: AaeRequest,
        bytes: &mut u64,
    ) -> Result<AaeResponse, String> {
        let request = PeerRequest::Aae(request);
        *bytes += encoded_len(&request);
        match self.inner.transport.call(peer, request).await {
            Ok(PeerResponse::Aae(answer)) => {
                *bytes += encoded_len(&answer);
                Ok(answer)
            }
            Ok(other) => Err(format!("{}: {other:?}", peer.name)),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Compares this node's tree of `partition` with `peer`'s and repairs
    /// both sides by merge.
    pub async fn exchange(
        &self,
        partition: u32,
        peer: &MemberInfo,
    ) -> Result<ExchangeReport, String> {
        let started = tokio::time::Instant::now();
        let mut report = ExchangeReport::default();
        let mine = self
            .tree(partition)
            .ok_or("anti-entropy trees are not built yet")?;
        let theirs = match self
            .aae_call(peer, AaeRequest::Branches { partition }, &mut report.bytes)
            .await?
        {
            AaeResponse::Branches(b) if b.len() == BRANCHES => b,
            other => return Err(format!("{}: bad branches answer {other:?}", peer.name)),
        };
        let branches: Vec<u16> = mine
            .branches()
            .iter()
            .zip(&theirs)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i as u16)
            .collect();
        if !branches.is_empty() {
            let leaves = match self
                .aae_call(
                    peer,
                    AaeRequest::Leaves {
                        partition,
                        branches: branches.clone(),
                    },
                    &mut report.bytes,
                )
                .await?
            {
                AaeResponse::Leaves(l) if l.len() == branches.len() => l,
                other => return Err(format!("{}: bad leaves answer {other:?}", peer.name)),
            };
            let mut segments = Vec::new();
            for (b, their_leaves) in branches.iter().zip(&leaves) {
                for (i, (a, t)) in mine
                    .branch_leaves(*b as usize)
                    .iter()
                    .zip(their_leaves)
                    .enumerate()
                {
                    if a != t {
                        segments.push((*b as usize * BRANCH_WIDTH + i) as u16);
                    }
                }
            }
            report.segments = segments.len() as u64;
            let mut their_keys: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
            for chunk in segments.chunks(SEGMENTS_PER_KEYS_REQUEST) {
                let request = AaeRequest::Keys {
                    partition,
                    segments: chunk.to_vec(),
                };
                match self.aae_call(peer, request, &mut report.bytes).await? {
                    AaeResponse::Keys(k) => {
                        their_keys.extend(k.into_iter().map(|(k, d)| (k.into_vec(), d)))
                    }
                    other => return Err(format!("{}: bad keys answer {other:?}", peer.name)),
                }
            }
            let my_keys: BTreeMap<Vec<u8>, u64> = self
                .segment_keys(partition, &segments)
                .map_err(|e| e.to_string())?
                .into_iter()
                .collect();
            let differing: Vec<Vec<u8>> = my_keys
                .keys()
                .chain(their_keys.keys())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .filter(|k| my_keys.get(*k) != their_keys.get(*k))
                .cloned()
                .collect();
            for chunk in differing.chunks(REPAIR_CHUNK) {
                let chunk_started = tokio::time::Instant::now();
                report.keys_repaired += self.repair_keys(peer, chunk, &mut report.bytes).await?;
                let rate = self.inner.settings.aae.max_repairs_per_sec;
                crate::coordinator::pace(chunk_started, chunk.len(), rate).await;
            }
        }
        let m = &self.inner.metrics;
        m.aae_exchanges.fetch_add(1, Ordering::Relaxed);
        m.aae_keys_repaired
            .fetch_add(report.keys_repaired, Ordering::Relaxed);
        m.aae_bytes.fetch_add(report.bytes, Ordering::Relaxed);
        m.aae_exchange_latency.observe(started.elapsed());
        self.inner.aae.lock().expect("aae lock").last.insert(
            partition,
            (
                peer.name.clone(),
                self.now_ms(),
                report.keys_repaired,
            ),
        );
        if report.keys_repaired > 0 {
            info!(partition, peer = %peer.name, repaired = report.keys_repaired, bytes = report.bytes, "anti-entropy repaired keys");
        }
        Ok(report)
    }

    /// Fetches the peer's copies of `keys`, merges both ways.
    async fn repair_keys(
        &self,
        peer: &MemberInfo,
        keys: &[Vec<u8>],
        bytes: &mut u64,
    ) -> Result<u64, String> {
        let mut theirs = Vec::with_capacity(keys.len());
        while theirs.len() < keys.len() {
            let asked = &keys[theirs.len()..];
            let request = AaeRequest::Objects {
                keys: asked.iter().cloned().map(ByteBuf::from).collect(),
            };
            match self.aae_call(peer, request, bytes).await? {
                AaeResponse::Objects(o)
                    if !o.is_empty()
                        && o.len() <= asked.len()
                        && o.iter()
                            .zip(asked)
                            .all(|((k, _), a)| k.as_slice() == a.as_slice()) =>
                {
                    theirs.extend(o)
                }
                other => return Err(format!("{}: bad objects answer {other:?}", peer.name)),
            }
        }
        let mut push = Vec::new();
        let mut repaired = 0;
        for (key, their) in theirs {
            let mine = self.local_get(&key).map_err(|e| e.to_string())?;
            let merged = match (&mine, &their) {
                (Some(m), Some(t)) => Object::merged(m, t),
                (Some(m), None) => m.clone(),
                (None, Some(t)) => t.clone(),
                (None, None) => continue,
            };
            let mut changed = false;
            if mine.as_ref() != Some(&merged) {
                self.local_merge(&key, &merged).map_err(|e| e.to_string())?;
                changed = true;
            }
            if their.as_ref() != Some(&merged) {
                push.push(HandoffEntry {
                    key: key.into_vec(),
                    object: merged,
                });
                changed = true;
            }
            repaired += u64::from(changed);
        }
        while !push.is_empty() {
            let rest = push.split_off(byte_bounded(&push, |e| {
                e.key.len() + object_size(&e.object)
            }));
            let request = PeerRequest::Handoff(std::mem::replace(&mut push, rest));
            *bytes += encoded_len(&request);
            match self.inner.transport.call(peer, request).await {
                Ok(PeerResponse::Stored) => *bytes += encoded_len(&PeerResponse::Stored),
                other => return Err(format!("{}: repair not stored: {other:?}", peer.name)),
            }
        }
        Ok(repaired)
    }

    /// One sweep: every partition this node replicates, exchanged with each
    /// other replica that is up and has a higher id (so each pair is
    /// exchanged by one side), one exchange at a time.
    pub async fn aae_sweep(&self) -> ExchangeReport {
        let mut total = ExchangeReport::default();
        let Some(view) = self.inner.membership.view() else {
            return total;
        };
        if self.tree(0).is_none() {
            return total;
        }
        let me = self.inner.me.id;
        let n = self.inner.settings.n as usize;
        for p in 0..view.ring.partition_count() {
            let replicas = view.ring.preference_list_for_partition(p, n);
            if !replicas.contains(&me) {
                continue;
            }
            for peer in replicas.iter().filter(|id| **id > me && self.is_up(**id)) {
                let Some(member) = view.members.get(peer) else {
                    continue;
                };
                match self.exchange(p, member).await {
                    Ok(r) => total += r,
                    Err(e) => {
                        debug!(partition = p, peer = %member.name, error = %e, "exchange failed")
                    }
                }
            }
        }
        total
    }

    /// Reaps tombstones of the partitions this node is the first primary of:
    /// a key whose object is only tombstones, the newest older than the
    /// grace period, is deleted from every primary once all of them are up
    /// and hold exactly that object (compare-and-delete on each). A primary
    /// that still holds the old value gets the tombstone from anti-entropy
    /// first, so a reaped key never comes back. Returns the keys reaped.
    pub async fn reap_tombstones(&self) -> u64 {
        let Some(view) = self.inner.membership.view() else {
            return 0;
        };
        let me = self.inner.me.id;
        let n = self.inner.settings.n as usize;
        let now = self.now_ms();
        // A copy of a key may wait anywhere, not only on its primaries: a
        // fallback holds a hint, a node that was away holds an old value.
        // Reaping forgets the tombstone that covers such copies, so nothing
        // is reaped unless every member is up to be asked.
        let down: Vec<String> = view
            .members
            .values()
            .filter(|m| m.id != me && !self.is_up(m.id))
            .map(|m| m.name.clone())
            .collect();
        if !down.is_empty() {
            debug!(?down, "no tombstones reaped while members are down");
            return 0;
        }
        // Per partition: its primaries if this node is the first of them and
        // all are up (worked out once per pass), else `None`: not reaped here.
        let mut reapers: HashMap<u32, Option<Vec<shoal_ring::NodeId>>> = HashMap::new();
        let mut reaped = 0;
        let mut start = Vec::new();
        loop {
            let began = tokio::time::Instant::now();
            let page = match self
                .inner
                .store
                .scan(Tree::Objects, &start, None, REBUILD_PAGE)
            {
                Ok(page) => page,
                Err(e) => {
                    warn!(error = %e, "cannot list keys to reap; trying again next time");
                    break;
                }
            };
            let Some((last, _)) = page.last() else {
                break;
            };
            start = last.clone();
            start.push(0);
            for (key, bytes) in &page {
                let partition = self.partition_of(key);
                let replicas = reapers.entry(partition).or_insert_with(|| {
                    let replicas = view.ring.preference_list_for_partition(partition, n);
                    (replicas.first() == Some(&me) && replicas.iter().all(|r| self.is_up(*r)))
                        .then_some(replicas)
                });
                let Some(replicas) = replicas else {
                    continue;
                };
                let Ok(object) = decode_object(bytes) else {
                    continue; // a rebuild or read reports corruption
                };
                if !reapable(&object, self.inner.settings.aae.tombstone_grace, now) {
                    continue;
                }
                if self.reap(key, &object, replicas, &view).await {
                    reaped += 1;
                }
            }
            crate::coordinator::pace(
                began,
                page.len(),
                self.inner.settings.aae.rebuild_keys_per_sec,
            )
            .await;
        }
        if reaped > 0 {
            self.inner
                .metrics
                .tombstones_reaped
                .fetch_add(reaped, Ordering::Relaxed);
            info!(reaped, "tombstones reaped");
        }
        reaped
    }

    /// Reaps one tombstone if every other primary holds exactly it and no
    /// member holds a hint for its key (a hint older than the tombstone,
    /// handed off after the reap, would bring the deleted value back; it is
    /// delivered first and merged into the tombstone, and the key is reaped
    /// on a later pass).
    async fn reap(
        &self,
        key: &[u8],
        object: &Object,
        replicas: &[shoal_ring::NodeId],
        view: &crate::membership::View,
    ) -> bool {
        let others: Vec<&MemberInfo> = replicas
            .iter()
            .filter(|r| **r != self.inner.me.id)
            .filter_map(|r| view.members.get(r))
            .collect();
        for peer in &others {
            let asked = PeerRequest::ReplicaGet { key: key.to_vec() };
            match self.inner.transport.call(peer, asked).await {
                Ok(PeerResponse::Object(Some(theirs))) if &theirs == object => {}
                _ => return false,
            }
        }
        if !self.hints_of(key).is_ok_and(|h| h.is_empty()) {
            return false;
        }
        for member in view.members.values().filter(|m| m.id != self.inner.me.id) {
            let asked = PeerRequest::HintsOf { key: key.to_vec() };
            match self.inner.transport.call(member, asked).await {
                Ok(PeerResponse::Hints(held)) if held.is_empty() => {}
                _ => return false,
            }
        }
        for peer in &others {
            let reap = PeerRequest::Reap {
                key: key.to_vec(),
                object: object.clone(),
            };
            if !matches!(
                self.inner.transport.call(peer, reap).await,
                Ok(PeerResponse::Stored)
            ) {
                return false; // reaped where it worked; the rest next time
            }
        }
        self.reap_local(key, object).unwrap_or(false)
    }

    /// Anti-entropy as `shoal status` shows it.
    pub fn aae_status(&self) -> AaeStatus {
        let state = self.inner.aae.lock().expect("aae lock");
        let m = &self.inner.metrics;
        AaeStatus {
            trees_ready: state.ready,
            exchanges: m.aae_exchanges.load(Ordering::Relaxed),
            keys_repaired: m.aae_keys_repaired.load(Ordering::Relaxed),
            bytes: m.aae_bytes.load(Ordering::Relaxed),
            partitions: state
                .last
                .iter()
                .map(|(p, (peer, at_ms, repaired))| PartitionSync {
                    partition: *p,
                    peer: peer.clone(),
                    at_ms: *at_ms,
                    repaired: *repaired,
                })
                .collect(),
        }
    }

    /// Rebuilds the trees now and then every `rebuild_every`, and sweeps
    /// every `interval`, until `stop` turns true.
    pub async fn run_anti_entropy(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let settings = self.inner.settings.aae;
        let mut next_rebuild = tokio::time::Instant::now();
        let mut next_reap = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= next_rebuild {
                match self.rebuild_trees(settings.rebuild_keys_per_sec).await {
                    Ok(keys) => info!(keys, "anti-entropy trees built"),
                    Err(e) => warn!(error = %e, "anti-entropy rebuild failed; retried later"),
                }
                next_rebuild = tokio::time::Instant::now() + settings.rebuild_every;
            }
            // The first sweep waits one interval: a node that just started
            // lets handoff and read repair act first.
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = tokio::time::sleep(settings.interval) => {}
            }
            let swept = self.aae_sweep().await;
            if swept.keys_repaired > 0 {
                info!(
                    repaired = swept.keys_repaired,
                    bytes = swept.bytes,
                    "anti-entropy sweep"
                );
            }
            if tokio::time::Instant::now() >= next_reap {
                self.reap_tombstones().await;
                next_reap = tokio::time::Instant::now() + settings.reap_every;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;
    use shoal_client::proto::MemberInfo;
    use shoal_ring::NodeId;

    use super::*;
    use crate::config::MemberConfig;
    use crate::coordinator::Settings;
    use crate::membership::Membership;
    use crate::net::sim::{SimNetwork, SimTransport};
    use crate::storage::MemoryStore;
    use crate::version::{Object, VersionVector};

    /// A rebuild reads a page of keys, then adds them one by one; a key
    /// created meanwhile between two keys of the page is never read by it,
    /// so its write must reach the rebuilt tree itself.
    #[test]
    fn a_key_created_inside_a_page_already_read_is_in_the_rebuilt_tree() {
        let mut state = AaeState {
            rebuild: Some(Rebuild {
                cursor: Some(b"a".to_vec()),
                page: [b"a".to_vec(), b"c".to_vec()].into_iter().collect(),
                page_end: Some(b"c".to_vec()),
                trees: Trees::new(),
            }),
            ..AaeState::default()
        };
        state.apply(0, b"b", None, Some(7));
        let mut expected = PartitionTree::default();
        expected.toggle(b"b", 7);
        let rebuilt = |s: &AaeState| s.rebuild.as_ref().unwrap().trees.get(&0).cloned();
        assert_eq!(rebuilt(&state), Some(expected.clone()));
        // A listed key ahead of the cursor is left for the rebuild to read,
        // and a key past the page for a later page.
        state.apply(0, b"c", None, Some(9));
        state.apply(0, b"d", None, Some(11));
        assert_eq!(rebuilt(&state), Some(expected));
    }

    fn node() -> Node<SimTransport, MemoryStore> {
        let me = MemberInfo {
            id: NodeId::from_u128(1),
            name: "n".into(),
            client_addr: ([127, 0, 0, 1], 1).into(),
            peer_addr: ([127, 0, 0, 1], 2).into(),
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
        let net = SimNetwork::new();
        let settings = Settings::from_config(&crate::config::Config::default());
        Node::new(
            me,
            settings,
            Arc::new(MemoryStore::new()),
            net.transport("n"),
            membership,
        )
        .expect("a memory store records the incarnation")
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

    fn run(n: &Node<SimTransport, MemoryStore>, op: &Op) {
        match op {
            Op::Put(k, v) => {
                let mut o = Object::default();
                o.update(
                    &VersionVector::new(),
                    Some(vec![*v]),
                    NodeId::from_u128(7),
                    0,
                );
                n.local_merge(&[*k], &o).unwrap();
            }
            Op::Remove(k) => n.remove_object(&[*k]).unwrap(),
        }
    }

    proptest! {
        /// Acceptance 5 of issue 4: a rebuilt tree and the incrementally
        /// updated one agree after any sequence of puts and deletes.
        #[test]
        fn rebuilt_trees_equal_incremental_ones(before in ops(), during in ops()) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            rt.block_on(async {
                let n = node();
                n.rebuild_trees(u32::MAX).await.unwrap();
                for op in &before {
                    run(&n, op);
                }
                let incremental = n.trees();
                n.rebuild_trees(u32::MAX).await.unwrap();
                let strip = |t: Trees| t.into_iter().filter(|(_, t)| t.leaves.iter().any(|l| *l != 0)).collect::<HashMap<_, _>>();
                prop_assert_eq!(strip(n.trees()), strip(incremental));
                // Writes while a (slow) rebuild runs are not lost to it.
                let rebuilding = {
                    let n = n.clone();
                    tokio::spawn(async move { n.rebuild_trees(2_000).await.unwrap() })
                };
                for op in &during {
                    run(&n, op);
                    tokio::task::yield_now().await;
                }
                let incremental = n.trees();
                rebuilding.await.unwrap();
                prop_assert_eq!(strip(n.trees()), strip(incremental));
                Ok(())
            })?;
        }
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
