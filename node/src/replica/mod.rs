//! The replica: this node's copy of the data, and the only code that changes
//! it. The coordinator, handoff, anti-entropy and the reaper all hold an
//! `Arc<Replica>` and go through its methods; none of them touches the store's
//! object, index or hint trees directly.
//!
//! What it owns:
//! - the store (objects, their anti-entropy index entries, hints, meta);
//! - the key locks and the object cache ([`stripe`]): every change to a
//!   key's object is a read-modify-write under its stripe's lock;
//! - the actors this incarnation mints dots under (see [`crate::version`]),
//!   and what a write's clock keeps ([`clocks`]);
//! - the Merkle trees kept up to date in the write path ([`trees`]);
//! - the hints kept for other nodes and their counts ([`hints`]).
//!
//! Every write of an object goes through `store_object`: the object and its
//! index entry in one atomic batch (or a peer batch's one write, [`gather`]),
//! then the cache and the trees, all under the key's stripe lock.
//!
//! # Lock order
//! stripe lock, then the trees lock (`store_object`, a rebuild's per-key
//! step), or the stripe lock, then the hint counts lock (`store_hint`,
//! `delete_delivered`), or the stripe lock, then the lost keys lock (a leaf;
//! see [`lost`]). A rebuild reads its pages of keys without the trees lock
//! (see `trees::Rebuild`). [`seal`] holds every stripe, taken in order; a
//! [`gather`] run holds several, taken with `try_lock` only: it never waits
//! for a stripe while it holds any. No lock is held across an await.

mod clocks;
mod fence;
mod gather;
mod handover;
pub mod hints;
mod lost;
mod seal;
mod serve;
pub mod stripe;
pub mod trees;

pub use seal::{decode_incarnation, INCARNATION_KEY};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use shoal_ring::NodeId;

use crate::clock::Clock;
use crate::membership::Membership;
use crate::metrics::Metrics;
use crate::storage::{Durable, Store, StoreError, Tree, WriteBatch};
use crate::version::{decode_object, encode_object, Actors, Dot, Object, Opened, VersionError};
use lost::Stored;
use stripe::{relock, Stripe, LOCK_STRIPES};
use trees::TreeState;

/// What the replica needs of the node's settings.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    /// Clock pruning bounds (see [`Object::prune`]).
    pub clock_max_entries: usize,
    pub clock_min_age_ms: u64,
    /// A tombstone younger than this is never reaped here, whoever asks.
    pub tombstone_grace: Duration,
    /// How long a reaped tombstone fences its key (see [`fence`]).
    pub reap_fence: Duration,
    /// Memory for the object cache; 0 turns it off.
    pub object_cache_bytes: usize,
    /// Admission limits of a client write (see [`Replica::write`]).
    pub max_siblings: usize,
    pub max_object_bytes: usize,
    /// Wall-clock time for stored timestamps (see [`crate::clock`]).
    pub clock: Clock,
}

/// When a change to a stored object must be durable.
enum Commit<'g> {
    /// Before the call returns (the engine's `fsync` setting).
    Now,
    /// When the returned [`Durable`] resolves: the caller awaits it before
    /// acknowledging, and concurrent writes share a WAL sync.
    Deferred,
    /// Added to a batch's gathered write, made later in one store write
    /// (see [`gather`]); what the call returns vouches for nothing.
    Gather(&'g mut gather::Gathered),
}

/// Why a replica operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The copy of `key` here was lost to corruption and is not restored
    /// yet (see [`lost`]).
    #[error("the copy of key {key} here failed its checksum; it is restored once every other primary of the key has answered")]
    Lost { key: String },
    /// The hint for `primary` of `key` here was lost to corruption (see
    /// [`hints`]): what it held is unknown, so it is not "no hint".
    #[error("the hint of key {key} for {primary} here failed its checksum; handoff tells {primary} to restore the key from the other primaries")]
    HintLost { key: String, primary: String },
    /// A client write could not be given a dot.
    #[error("cannot version the write of key {key}: {source}")]
    Version { key: String, source: VersionError },
    /// A client write would grow the key's object past a limit; nothing was
    /// written.
    #[error("key {key} would have {siblings} siblings and about {bytes} bytes, over the limit of {max_siblings} siblings and {max_bytes} bytes (limits.max-siblings, limits.max-object-bytes): read the key and write with its context to resolve the siblings; nothing was written")]
    ObjectTooLarge {
        key: String,
        siblings: usize,
        bytes: usize,
        max_siblings: usize,
        max_bytes: usize,
    },
}

pub(crate) fn corruption(key: &[u8], detail: impl ToString) -> StoreError {
    StoreError::Corruption {
        tree: Tree::Objects.name(),
        key: hex::encode(key),
        detail: detail.to_string(),
    }
}

/// Whether `object` is a tombstone whose newest sibling is at least `grace`
/// old at `now_ms`.
pub fn reapable(object: &Object, grace: Duration, now_ms: u64) -> bool {
    let newest = object.siblings().iter().map(|s| s.timestamp_ms).max();
    object.is_deleted()
        && newest.is_some_and(|t| t.saturating_add(grace.as_millis() as u64) <= now_ms)
}

/// This node's copy of the data (see the module doc).
pub struct Replica<S> {
    store: Arc<S>,
    settings: ReplicaSettings,
    /// For the partition count (index keys) and the known members (whose
    /// hints to look up).
    membership: Arc<Membership>,
    metrics: Arc<Metrics>,
    stripes: Vec<Mutex<Stripe>>,
    /// The actors this incarnation mints dots under (see
    /// [`crate::version`]: a dot is never minted twice).
    actors: Actors,
    /// Anti-entropy trees (see [`trees`]).
    trees: Mutex<TreeState>,
    /// Held for a whole tree rebuild: two at once would share one
    /// bookkeeping slot, and the second would wreck the first's.
    rebuilding: tokio::sync::Mutex<()>,
    /// Hints held, per primary they wait for (see [`hints`]).
    hints_pending: Mutex<BTreeMap<NodeId, u64>>,
    /// Held while the incarnation moves on, so two moves never take the
    /// same number.
    incarnations: Mutex<()>,
    /// Set when the live trees may no longer match the store (a corrupt
    /// record whose index entry could not be read): the anti-entropy loop
    /// rebuilds them at its next turn.
    rebuild_wanted: AtomicBool,
    /// Keys whose copy here is lost, for the restorer (see [`lost`]).
    lost: Mutex<BTreeSet<Vec<u8>>>,
    /// Woken when a key is added to `lost`.
    lost_found: tokio::sync::Notify,
    /// The next lost marker's generation (see [`lost`]).
    marker_generations: AtomicU64,
    /// Tombstones reaped lately (see [`fence`]); taken under a key's
    /// stripe lock, never the other way round.
    fence: Mutex<fence::Fence>,
    /// Set by [`Self::seal`]: object writes delete its record.
    sealed: AtomicBool,
}

impl<S: Store> Replica<S> {
    /// The replica of node `me` over `store`, going on under the actors of
    /// the run before if it stopped cleanly, else starting a new
    /// incarnation (see [`crate::version`], [`seal`]); fails only if the
    /// store cannot record it.
    pub fn new(
        me: NodeId,
        store: Arc<S>,
        settings: ReplicaSettings,
        membership: Arc<Membership>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let (actors, run) = seal::actors_at_start(me, store.as_ref(), settings.clock.now_ms())?;
        let budget = settings.object_cache_bytes / LOCK_STRIPES;
        let stripes = (0..LOCK_STRIPES)
            .map(|_| Mutex::new(Stripe::new(budget)))
            .collect();
        let now = settings.clock.now_ms();
        let fence = fence::Fence::load(store.as_ref(), settings.reap_fence, now)?;
        Ok(Replica {
            store,
            membership,
            metrics,
            stripes,
            actors,
            trees: Mutex::default(),
            rebuilding: tokio::sync::Mutex::new(()),
            hints_pending: Mutex::new(BTreeMap::new()),
            incarnations: Mutex::new(()),
            rebuild_wanted: AtomicBool::new(false),
            lost: Mutex::default(),
            lost_found: tokio::sync::Notify::new(),
            marker_generations: AtomicU64::new(u64::from(run) << 32),
            fence: Mutex::new(fence),
            sealed: AtomicBool::new(false),
            settings,
        })
    }

    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// Reports a background timer's firing (see [`Clock::fired`]).
    pub fn timer_fired(&self, what: &str) {
        self.settings.clock.fired(what);
    }

    /// The node's wall clock (see [`crate::clock`]).
    pub fn now_ms(&self) -> u64 {
        self.settings.clock.now_ms()
    }

    /// The partition of a key on this node's ring.
    pub fn partition_of(&self, key: &[u8]) -> u32 {
        shoal_ring::partition_of(key, self.membership.partitions())
    }

    /// Locks `key`'s stripe (see [`Stripe`]).
    fn lock_stripe(&self, key: &[u8]) -> MutexGuard<'_, Stripe> {
        relock(self.stripe_of(key))
    }

    fn stripe_of(&self, key: &[u8]) -> &Mutex<Stripe> {
        &self.stripes[stripe::index_of(key)]
    }

    /// The stored bytes of `key`'s object, from the cache or else the store
    /// (then cached); one known to be large is read off the worker. The
    /// caller holds `stripe`, the key's stripe.
    fn stored(&self, stripe: &mut Stripe, key: &[u8]) -> Result<Option<Arc<[u8]>>, StoreError> {
        if let Some(bytes) = stripe.cached(key) {
            return Ok(Some(bytes));
        }
        let read = || Ok::<_, StoreError>(self.store.get(Tree::Objects, key)?.map(Arc::from));
        let bytes: Option<Arc<[u8]>> = match stripe.is_large(key) {
            true => crate::tasks::heavy(read)?,
            false => read()?,
        };
        match &bytes {
            Some(b) => stripe.remember(key, b.clone()),
            None => stripe.sized(key, None),
        }
        Ok(bytes)
    }

    /// The size of `key`'s stored object if the object cache holds it
    /// (then it is small: at most a stripe's share of the cache); reads
    /// nothing from the store. `None` too while another thread holds the
    /// key's stripe: the answer only guides batching, not worth a wait
    /// behind work on an object of megabytes.
    pub fn cached_len(&self, key: &[u8]) -> Option<usize> {
        self.stripe_of(key).try_lock().ok()?.cached_len(key)
    }

    /// Empties the object cache: after the store was changed behind the
    /// node's back (tests that lose or corrupt records).
    pub fn drop_cache(&self) {
        for stripe in &self.stripes {
            relock(stripe).clear();
        }
    }

    /// This replica's stored object for `key`, for repair paths that only
    /// add what they find: a copy lost to corruption gives what reached it
    /// since (see [`lost`]).
    pub fn get(&self, key: &[u8]) -> Result<Option<Object>, StoreError> {
        self.copy(&mut self.lock_stripe(key), key)
    }

    /// [`Self::get`], under `stripe`, the key's stripe.
    fn copy(&self, stripe: &mut Stripe, key: &[u8]) -> Result<Option<Object>, StoreError> {
        match self.stored_record(stripe, key)? {
            Stored::Present(b) => decode_object(&b).map(Some).map_err(|e| corruption(key, e)),
            Stored::Absent => Ok(None),
            Stored::Lost { partial, .. } => Ok(partial),
        }
    }

    /// This replica's stored object for `key`, as a read's answer: a copy
    /// lost to corruption is an error, so that it never counts as "absent"
    /// towards a read quorum until repair has restored it.
    pub fn read(&self, key: &[u8]) -> Result<Option<Object>, ReplicaError> {
        self.read_in(&mut self.lock_stripe(key), key)
    }

    /// [`Self::read`], under `stripe`, the key's stripe.
    fn read_in(&self, stripe: &mut Stripe, key: &[u8]) -> Result<Option<Object>, ReplicaError> {
        match self.stored_record(stripe, key)? {
            Stored::Present(b) => Ok(Some(decode_object(&b).map_err(|e| corruption(key, e))?)),
            Stored::Absent => Ok(None),
            Stored::Lost { .. } => Err(ReplicaError::Lost {
                key: hex::encode(key),
            }),
        }
    }

    /// Read-modify-write of the local object under the key's lock; nothing
    /// is written if `change` fails. A copy lost to corruption is changed
    /// in its partial copy and stays lost (see [`lost`]).
    ///
    /// With [`Commit::Deferred`], the change may not be durable yet when
    /// this returns: acknowledge it only once the [`Durable`] resolves.
    /// Pruning keeps the clock entries `change` says it learned (a write's).
    fn apply<E: From<StoreError>>(
        &self,
        key: &[u8],
        commit: Commit,
        change: impl FnOnce(Option<&Object>, &mut Object) -> Result<Vec<NodeId>, E>,
    ) -> Result<(Object, Durable), E> {
        self.apply_in(&mut self.lock_stripe(key), key, commit, change)
    }

    /// [`Self::apply`], under `stripe`, the key's stripe.
    fn apply_in<E: From<StoreError>>(
        &self,
        stripe: &mut Stripe,
        key: &[u8],
        commit: Commit,
        change: impl FnOnce(Option<&Object>, &mut Object) -> Result<Vec<NodeId>, E>,
    ) -> Result<(Object, Durable), E> {
        let record = self.stored_record(stripe, key)?;
        let raw = record.bytes();
        let modify = || {
            let (before, lost) = match &record {
                Stored::Present(b) => (
                    Some(decode_object(b).map_err(|e| corruption(key, e))?),
                    None,
                ),
                Stored::Absent => (None, None),
                Stored::Lost {
                    generation,
                    partial,
                    ..
                } => (partial.clone(), Some(*generation)),
            };
            // A key reaped here lately starts from its tombstone's history
            // (see [`fence`]).
            let mut object = match (&before, &record) {
                (Some(before), _) => before.clone(),
                (None, Stored::Absent) => self.absent_start(key)?,
                (None, _) => Object::default(),
            };
            let learned = change(before.as_ref(), &mut object)?;
            self.pruned(&mut object, &learned);
            // An absent key stays absent when nothing is left to store (a
            // fenced copy of a reaped one).
            let unchanged = match &before {
                Some(before) => before == &object,
                None => object.siblings().is_empty(),
            };
            let durable = if unchanged {
                // Nothing to write; but what is stored may be a deferred
                // write whose sync is still to come (or failed), and this
                // answer vouches for it too.
                let durable = self.store.durable_so_far()?;
                if matches!(commit, Commit::Now) && !durable.is_done() {
                    crate::tasks::heavy(|| self.store.sync_wal())?;
                    Durable::now()
                } else {
                    durable
                }
            } else {
                let bytes = match lost {
                    Some(generation) => lost::encode_marker(generation, Some(&object)),
                    None => encode_object(&object),
                };
                self.store_object(
                    stripe,
                    key,
                    raw.map(trees::digest),
                    Some(&bytes),
                    commit,
                    WriteBatch::default(),
                )?
            };
            Ok((object, durable))
        };
        // Decoding, merging and storing megabytes takes a while: off the
        // worker, which also drives the node's connections.
        crate::tasks::heavy_for(raw.map_or(0, |b| b.len()), modify)
    }

    /// Merges an object sent by a coordinator (or found by read repair,
    /// handoff or anti-entropy) into the local copy.
    pub fn merge(&self, key: &[u8], incoming: &Object) -> Result<Object, StoreError> {
        self.merge_with(key, incoming, Commit::Now).map(|(o, _)| o)
    }

    /// [`Self::merge`] for a caller that awaits durability itself (a
    /// replica answering a coordinator's write): concurrent merges share
    /// WAL syncs.
    pub fn merge_deferred(
        &self,
        key: &[u8],
        incoming: &Object,
    ) -> Result<(Object, Durable), StoreError> {
        self.merge_with(key, incoming, Commit::Deferred)
    }

    fn merge_with(
        &self,
        key: &[u8],
        incoming: &Object,
        commit: Commit,
    ) -> Result<(Object, Durable), StoreError> {
        self.merge_in(&mut self.lock_stripe(key), key, incoming, commit)
    }

    /// [`Self::merge_with`], under `stripe`, the key's stripe.
    fn merge_in(
        &self,
        stripe: &mut Stripe,
        key: &[u8],
        incoming: &Object,
        commit: Commit,
    ) -> Result<(Object, Durable), StoreError> {
        self.apply_in(stripe, key, commit, |_, o| {
            o.merge(incoming);
            Ok::<Vec<NodeId>, StoreError>(Vec::new())
        })
    }

    /// Applies a client write to the local copy under the key's lock: the
    /// dot is minted under the actor [`Actors::for_write`] picks, so it was
    /// never minted before (see [`crate::version`]).
    ///
    /// A write that would leave the object over `max_siblings` or
    /// `max_object_bytes`, and larger than it was, is refused before
    /// anything is written: the limits admit writes, and a write that
    /// resolves siblings always gets in. They never drop what is stored;
    /// merges (repair, handoff, both sides of a partition) may exceed them.
    ///
    /// The write is durable once the returned [`Durable`] resolves.
    pub fn write(
        &self,
        key: &[u8],
        ctx: &Opened,
        value: Option<Vec<u8>>,
    ) -> Result<(Object, Dot, Durable), ReplicaError> {
        let now = self.now_ms();
        let (stamps, ctx) = (&ctx.stamps, &ctx.vector);
        let mut dot = None;
        let (object, durable) = self.apply(key, Commit::Deferred, |before, o| {
            let version = |source| ReplicaError::Version {
                key: hex::encode(key),
                source,
            };
            let actor = self.actors.for_write(o, ctx).map_err(version)?;
            let learned = o.learned_from(ctx);
            let minted = o
                .update_from(ctx, stamps, value, actor, now)
                .ok_or_else(|| {
                    version(VersionError::ContextMalformed(
                        "it names a counter at its maximum".into(),
                    ))
                })?;
            self.admit(key, before, o)?;
            dot = Some(minted);
            Ok::<Vec<NodeId>, ReplicaError>(learned)
        })?;
        Ok((object, dot.expect("minted when the write applied"), durable))
    }

    /// The admission limits of [`Self::write`], each on its own: `after`
    /// may be over a limit only where it is no worse than `before` (a write
    /// that resolves siblings gets in even if the object stays over). Bytes
    /// are the siblings' (values and a fixed allowance each), not the
    /// clock's, which pruning bounds.
    fn admit(
        &self,
        key: &[u8],
        before: Option<&Object>,
        after: &Object,
    ) -> Result<(), ReplicaError> {
        let s = &self.settings;
        let size = |o: &Object| (o.siblings().len(), o.siblings_size());
        let (siblings, bytes) = size(after);
        let (had, had_bytes) = before.map_or((0, 0), size);
        if (siblings > s.max_siblings && siblings > had)
            || (bytes > s.max_object_bytes && bytes > had_bytes)
        {
            return Err(ReplicaError::ObjectTooLarge {
                key: hex::encode(key),
                siblings,
                bytes,
                max_siblings: s.max_siblings,
                max_bytes: s.max_object_bytes,
            });
        }
        Ok(())
    }

    /// Removes the local object of `key` altogether (tests of the trees).
    #[cfg(test)]
    pub(crate) fn remove_object(&self, key: &[u8]) -> Result<(), StoreError> {
        let mut stripe = self.lock_stripe(key);
        if let Some(raw) = self.stored(&mut stripe, key)? {
            self.write_object(&mut stripe, key, Some(trees::digest(&raw)), None)?;
        }
        Ok(())
    }

    /// Writes (`new` Some) or removes `key`'s stored object and index entry,
    /// then the trees and cache; the caller holds the key's stripe and passes
    /// the digest of what was stored before (as the trees hold it).
    fn write_object(
        &self,
        stripe: &mut Stripe,
        key: &[u8],
        old_digest: Option<u64>,
        new: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let batch = WriteBatch::default();
        self.store_object(stripe, key, old_digest, new, Commit::Now, batch)
            .map(drop)
    }

    /// [`Self::write_object`], with the other changes of `batch`, durable
    /// at once or (deferred) when the returned [`Durable`] resolves.
    fn store_object(
        &self,
        stripe: &mut Stripe,
        key: &[u8],
        old_digest: Option<u64>,
        new: Option<&[u8]>,
        commit: Commit,
        mut batch: WriteBatch,
    ) -> Result<Durable, StoreError> {
        let partition = self.partition_of(key);
        let ikey = trees::index_key(partition, key);
        self.unseal_with(&mut batch);
        match new {
            Some(bytes) => {
                batch.put(Tree::Objects, key, bytes);
                // The index lists which keys are stored, not their
                // versions (see `trees`): a key the trees hold no digest
                // for is new here (or lost, and its entry rewritten).
                if old_digest.is_none() {
                    batch.put(Tree::Aae, &ikey, &[]);
                }
            }
            None => {
                batch.delete(Tree::Objects, key).delete(Tree::Aae, &ikey);
            }
        }
        let written = match commit {
            Commit::Now => self.store.write(batch).map(|()| Durable::now()),
            Commit::Deferred => self.store.write_deferred(batch),
            Commit::Gather(gathered) => {
                gathered.add(batch, partition, key, old_digest, new);
                return Ok(Durable::now());
            }
        };
        let durable = match written {
            Ok(d) => d,
            Err(e) => {
                stripe.forget(key); // what the store now holds is unknown
                return Err(e);
            }
        };
        self.learn_written(stripe, partition, key, old_digest, new.map(Arc::from));
        Ok(durable)
    }

    /// Tells the object cache and the trees what a write that succeeded
    /// stored for `key` (`None`: removed), under the key's stripe.
    fn learn_written(
        &self,
        stripe: &mut Stripe,
        partition: u32,
        key: &[u8],
        old_digest: Option<u64>,
        new: Option<Arc<[u8]>>,
    ) {
        let new_digest = new.as_deref().map(trees::digest);
        match new {
            Some(bytes) => stripe.remember(key, bytes),
            None => {
                stripe.forget(key);
                stripe.sized(key, None);
            }
        }
        self.lock_trees()
            .apply(partition, key, old_digest, new_digest);
    }
}

#[cfg(all(test, feature = "rocksdb"))]
mod group_commit_tests;
