//! Copies lost to corruption, and the one way they come back.
//!
//! A stored object whose record fails its checksum ([`crate::storage::record`],
//! or RocksDB's own block checksum) can never be served or trusted. The
//! first time the replica meets one (a read, a write, a merge, a tree
//! rebuild) it replaces the record with a *lost marker* and reports it (log,
//! `shoal_corrupt_records_total{tree="objects"}`). From then on, until the
//! copy is restored:
//!
//! - a client read's answer from this replica is an error
//!   ([`super::ReplicaError::Lost`]): it does not count towards R, so a read
//!   quorum still overlaps every write quorum;
//! - writes and merges (a client write, read repair, handoff, anti-entropy)
//!   are kept in the marker as its *partial* copy, and the copy stays lost:
//!   whatever they bring, they do not show that nothing else is missing;
//! - repair paths that only add (anti-entropy, `Replica::get`) see the
//!   partial copy; the reaper's check refuses a lost copy;
//! - the marker has its own digest in the Merkle tree, so anti-entropy
//!   keeps seeing the key differ until it is restored.
//!
//! # Restoring: the rule
//! A lost copy is restored by one step, [`Replica::restore`]: the marker
//! is replaced by its partial copy merged with the copy of *every other
//! primary* of the key, each asked by this node after the marker was
//! written (a peer whose own copy is lost gives its partial copy; one that
//! reaped the key lately adds its tombstone's history: see below), and only
//! if the marker is still the one that was there when the asking began
//! (its generation). Nothing else clears a marker: not a merge, not read
//! repair (which may come from a read that missed its quorum, carrying a
//! stale replica's copy), not a client write.
//!
//! Why that is enough: a write this copy acknowledged before it was lost was
//! acknowledged by W replicas. Each other primary's copy only grows (merges
//! add; the reaper removes only a tombstone every primary holds exactly),
//! so an answer asked after the loss holds every write that primary held
//! before it. The restored copy therefore holds every write that any other
//! primary still holds; one it lacks was lost by every primary that had it
//! (W copies, past the guarantee), or waits as a hint on a fallback, which
//! handoff delivers as it would have without the loss. And a restore never
//! trusts a subset: with a stale primary's copy alone (the read above) the
//! copy stays lost, so a read at it and at the stale replica fails its
//! quorum instead of returning the old value. The generation check keeps a
//! restore that began before a second loss from completing over it (its
//! answers may predate writes the second loss took).
//!
//! When the other primaries reaped the key, the partial copy may hold a
//! value the delete superseded (this copy was found corrupt when they
//! reaped, and a stale copy was merged into it since). Within their reap
//! fence's window they answer with the tombstone's history
//! ([`Replica::restore_copy`]), and the restore starts from this replica's
//! own fence: the merge drops what the delete superseded. When no sibling
//! is left the restore removes the record, fences the key here if a
//! history came back, and retires the actors the forgotten clock names,
//! as a reap does: the key is gone everywhere and nothing is brought back.
//! A restore can also wait past every peer's window (a primary down that
//! long) and get "absent" with no history. For that, a reap asked of a
//! copy found lost (the reaper's check saw it whole) merges the tombstone
//! into the partial copy: the copy holds the delete itself, and a stale
//! copy merged into it later is dropped. (Left open: a copy whose reap
//! never reached it, found corrupt only after every other primary's fence
//! expired, with a stale copy merged into it after that.)
//!
//! Forgetting a key's history is amnesia: copies elsewhere may name this
//! node's actors with counters it no longer knows, so the node moves to a
//! new incarnation (durably) before the marker is written, and no dot it
//! minted for the key is minted again (see [`crate::version`]).
//!
//! # Format
//! `0xEE` (a format byte no object has), the marker's generation (8 bytes,
//! big-endian), then the partial copy as an object record, if any. A bare
//! `0xEE` (older nodes) is generation 0 with nothing.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::{info, warn};

use super::seal::next_incarnation;
use super::stripe::Stripe;
use super::{corruption, trees, Commit, Replica};
use crate::storage::{Store, StoreError, Tree, WriteBatch};
use crate::version::{decode_object, encode_object, DecodeError, Object};

/// The first byte of a lost marker.
const LOST_FORMAT: u8 = 0xEE;

/// Encodes a lost marker of `generation` holding `partial`.
pub(super) fn encode_marker(generation: u64, partial: Option<&Object>) -> Vec<u8> {
    let mut out = vec![LOST_FORMAT];
    out.extend_from_slice(&generation.to_be_bytes());
    if let Some(o) = partial {
        out.extend_from_slice(&encode_object(o));
    }
    out
}

/// A lost marker's generation and partial copy; `None` if `bytes` is not a
/// marker.
pub(super) fn decode_marker(bytes: &[u8]) -> Option<Result<(u64, Option<Object>), DecodeError>> {
    let (&first, rest) = bytes.split_first()?;
    if first != LOST_FORMAT {
        return None;
    }
    if rest.is_empty() {
        return Some(Ok((0, None)));
    }
    let Some((generation, partial)) = rest.split_first_chunk::<8>() else {
        return Some(Err(DecodeError::Malformed(format!(
            "a lost marker of {} bytes",
            bytes.len()
        ))));
    };
    let generation = u64::from_be_bytes(*generation);
    Some(match partial {
        [] => Ok((generation, None)),
        object => decode_object(object).map(|o| (generation, Some(o))),
    })
}

/// What a key's object record holds.
pub(super) enum Stored {
    Absent,
    /// The copy here was lost to corruption and is not restored yet; what
    /// reached it since is `partial`.
    Lost {
        raw: Arc<[u8]>,
        generation: u64,
        partial: Option<Object>,
    },
    Present(Arc<[u8]>),
}

impl Stored {
    /// The stored bytes, a lost marker included (for tree bookkeeping).
    pub(super) fn bytes(&self) -> Option<&[u8]> {
        match self {
            Stored::Absent => None,
            Stored::Lost { raw, .. } => Some(raw),
            Stored::Present(b) => Some(b),
        }
    }
}

impl<S: Store> Replica<S> {
    /// The key's object record, under its stripe (the caller holds
    /// `stripe`). A record that fails its checksum now is marked lost.
    pub(super) fn stored_record(
        &self,
        stripe: &mut Stripe,
        key: &[u8],
    ) -> Result<Stored, StoreError> {
        let error = match self.stored(stripe, key) {
            Ok(None) => return Ok(Stored::Absent),
            Ok(Some(b)) => match decode_marker(&b) {
                None => return Ok(Stored::Present(b)),
                Some(Ok((generation, partial))) => {
                    self.note_lost(key);
                    return Ok(Stored::Lost {
                        raw: b,
                        generation,
                        partial,
                    });
                }
                // A marker whose checksum held but that does not decode:
                // lost again, with nothing.
                Some(Err(e)) => corruption(key, e),
            },
            Err(e @ StoreError::Corruption { .. }) => e,
            Err(e) => return Err(e),
        };
        self.mark_lost(stripe, key, &error)
    }

    /// Replaces a corrupt record of `key` with a new lost marker (see the
    /// module doc). The trees are rebuilt at the anti-entropy loop's next
    /// turn: the digest they hold for the key is of the bytes lost.
    fn mark_lost(
        &self,
        stripe: &mut Stripe,
        key: &[u8],
        error: &StoreError,
    ) -> Result<Stored, StoreError> {
        self.metrics.count_corrupt(Tree::Objects);
        warn!(
            key = %hex::encode(key),
            %error,
            "corrupt object: marked lost; restored from the other primaries"
        );
        self.new_incarnation("a corrupt object's history was forgotten")?;
        // The digest the trees hold for the key is of bytes now unreadable,
        // so it cannot be taken out of its leaf: the trees are rebuilt.
        self.rebuild_wanted.store(true, Ordering::Relaxed);
        let generation = self.next_generation();
        let marker: Arc<[u8]> = Arc::from(encode_marker(generation, None));
        self.write_object(stripe, key, None, Some(&marker))?;
        self.note_lost(key);
        Ok(Stored::Lost {
            raw: marker,
            generation,
            partial: None,
        })
    }

    /// A generation no marker of this node had before: the incarnation in
    /// the high half (one more on every start), a count in the low.
    pub(super) fn next_generation(&self) -> u64 {
        self.marker_generations.fetch_add(1, Ordering::Relaxed)
    }

    /// Records that `key`'s copy here is lost, and wakes the restorer if
    /// that is news (see [`Self::lost_found`]).
    fn note_lost(&self, key: &[u8]) {
        if self.lock_lost().insert(key.to_vec()) {
            self.lost_found.notify_one();
        }
    }

    fn lock_lost(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<Vec<u8>>> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The keys whose copy here is known lost: met since this start (a
    /// read, a write, a merge, the tree rebuild, which meets every key).
    pub fn lost_keys(&self) -> Vec<Vec<u8>> {
        self.lock_lost().iter().cloned().collect()
    }

    /// Resolves once a copy was found lost that was not known lost before.
    pub async fn lost_found(&self) {
        self.lost_found.notified().await
    }

    /// The generation of `key`'s lost marker, or `None` if its copy here is
    /// not lost (then it is no longer listed as lost).
    pub fn lost_generation(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        match self.stored_record(&mut self.lock_stripe(key), key)? {
            Stored::Lost { generation, .. } => Ok(Some(generation)),
            Stored::Absent | Stored::Present(_) => {
                self.lock_lost().remove(key);
                Ok(None)
            }
        }
    }

    /// Restores `key`'s lost copy (see the module doc for the rule):
    /// `copies` are the copies of every other primary of the key, each asked
    /// after the marker of `generation` was written. The marker is replaced
    /// by its partial copy merged with all of them and with this replica's
    /// fence, or removed if no sibling is left (the key then fenced here if
    /// a history came back, and the forgotten clock's actors retired).
    /// Returns false, changing nothing, if the marker is no longer that one
    /// (lost again meanwhile, or already restored).
    pub fn restore(
        &self,
        key: &[u8],
        generation: u64,
        copies: &[Option<Object>],
    ) -> Result<bool, StoreError> {
        let mut stripe = self.lock_stripe(key);
        let Stored::Lost {
            raw,
            generation: now,
            partial,
        } = self.stored_record(&mut stripe, key)?
        else {
            return Ok(false);
        };
        if now != generation {
            return Ok(false);
        }
        let heavy = copies
            .iter()
            .flatten()
            .map(Object::approx_size)
            .sum::<usize>()
            + raw.len()
            > crate::tasks::HEAVY_BYTES;
        let merge = || {
            // The partial copy (writes into it start from nothing) is
            // fenced like any change to a key reaped here lately.
            let mut object = self.fence_history(key);
            object.merge(&partial.unwrap_or_default());
            for copy in copies.iter().flatten() {
                object.merge(copy);
            }
            self.pruned(&mut object, &[]);
            // Nothing to store when no sibling is left. A history left
            // alone (the others reaped the key: see `restore_copy`) fences
            // the key here as their reaps did there, so that a stale copy
            // merged later cannot bring it back either.
            let mut batch = WriteBatch::default();
            let bytes = match object.siblings().is_empty() {
                false => Some(encode_object(&object)),
                true if object.clock().is_empty() => None,
                true => {
                    self.fence_in(key, &object, &mut batch);
                    None
                }
            };
            let digest = Some(trees::digest(&raw));
            self.store_object(
                &mut stripe,
                key,
                digest,
                bytes.as_deref(),
                Commit::Now,
                batch,
            )
            .map(drop)?;
            Ok::<_, StoreError>(bytes.is_none().then_some(object))
        };
        let forgotten = match heavy {
            true => crate::tasks::heavy(merge)?,
            false => merge()?,
        };
        self.lock_lost().remove(key);
        // A clock forgotten here (the key removed): never write under its
        // actors again, as after a reap (before the stripe is released,
        // so no write to the key sees them live).
        let full = forgotten.is_some_and(|o| self.actors.retire(&o));
        drop(stripe);
        if full {
            self.new_incarnation("retired actors reached their bound")?;
        }
        self.metrics.lost_restored.fetch_add(1, Ordering::Relaxed);
        info!(key = %hex::encode(key), "lost copy restored from every other primary");
        Ok(true)
    }

    /// Merges `incoming`, what a lost hint kept for this node (see
    /// [`super::hints`]), into `key`'s copy and marks the copy lost: a
    /// write the hint carried may be missing here, so the copy is restored
    /// from every other primary before it answers reads again. Nothing was
    /// forgotten here, so no new incarnation; but a new generation, so that
    /// a restore already under way (whose answers may predate that write)
    /// does not complete.
    pub fn merge_incomplete(&self, key: &[u8], incoming: &Object) -> Result<(), StoreError> {
        let mut stripe = self.lock_stripe(key);
        let record = self.stored_record(&mut stripe, key)?;
        let mut object = match &record {
            Stored::Present(b) => decode_object(b).map_err(|e| corruption(key, e))?,
            Stored::Absent => self.absent_start(key)?,
            Stored::Lost { partial, .. } => partial.clone().unwrap_or_default(),
        };
        object.merge(incoming);
        self.pruned(&mut object, &[]);
        let marker = encode_marker(self.next_generation(), Some(&object));
        let old = record.bytes().map(trees::digest);
        self.write_object(&mut stripe, key, old, Some(&marker))?;
        self.note_lost(key);
        warn!(
            key = %hex::encode(key),
            "a hint for this copy was lost: marked lost until restored from the other primaries"
        );
        Ok(())
    }

    /// Moves this node to a new incarnation, durably: every actor of the
    /// one before is retired (see [`crate::version`]).
    pub(super) fn new_incarnation(&self, why: &str) -> Result<(), StoreError> {
        let _one_at_a_time = self.incarnations.lock().expect("incarnations lock");
        let incarnation = next_incarnation(self.store.as_ref(), self.now_ms())?;
        self.actors.new_incarnation(incarnation);
        info!(incarnation, why, "new incarnation");
        Ok(())
    }

    /// Whether the trees should be rebuilt now; asking clears the request.
    pub fn take_rebuild_request(&self) -> bool {
        self.rebuild_wanted.swap(false, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_and_are_never_objects() {
        let mut o = Object::default();
        o.update(
            &Default::default(),
            Some(b"v".to_vec()),
            shoal_ring::NodeId::from_u128(7),
            1,
        );
        for partial in [None, Some(&o)] {
            let m = encode_marker(42, partial);
            let (g, p) = decode_marker(&m).unwrap().unwrap();
            assert_eq!((g, p.as_ref()), (42, partial));
        }
        assert!(matches!(decode_marker(&[LOST_FORMAT]), Some(Ok((0, None)))));
        assert!(matches!(decode_marker(&[LOST_FORMAT, 1, 2]), Some(Err(_))));
        assert!(decode_marker(&encode_object(&o)).is_none());
        assert!(decode_marker(&[]).is_none());
    }
}
