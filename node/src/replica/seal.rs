//! A clean stop's record, so that the next start mints under the same
//! actors (see [`crate::version`]).
//!
//! A node takes a new incarnation on every start because it cannot tell
//! whether the run before lost something it minted (a power loss takes the
//! unsynced WAL tail, and the dots in it may live on elsewhere). A clean
//! stop can tell: [`Replica::seal`] holds every key's stripe, so no write
//! is half done and none can start, stops the actors minting, and writes
//! their state ([`ActorsState`]) with a WAL sync, which puts every earlier
//! write on disk too (unless one failed in this run: then the WAL may have
//! lost pages, and it records nothing). From then on every object write
//! (a merge, a reap) deletes the record in its own batch. The next start
//! takes the record (and deletes it, in the synced batch that bumps the
//! incarnation counter) only if it is still there, which means the store
//! holds exactly what it held at the seal:
//! the run before ended there, and going on under its actors mints no dot
//! twice. A write after the seal (a task the stop did not end) or a start
//! without a stop (a crash) finds no record, and starts a new incarnation
//! as before. A write after the seal that a power loss took back took the
//! record's deletion with it: the store is again as at the seal.
//!
//! Every mint and every retirement happens under a key's stripe, the
//! retirement after the write that forgot the key; so a state taken with
//! every stripe held is exact, and a retirement afterwards comes with an
//! object write, which deletes the record. (A new incarnation started
//! after a stripe is released records one of its own, at epoch 0, and
//! deletes the record too.)

use std::sync::atomic::Ordering;

use tracing::{info, warn};

use shoal_ring::NodeId;

use super::stripe::relock;
use super::Replica;
use crate::storage::{Store, StoreError, Tree, WriteBatch};
use crate::version::{Actors, ActorsState};

/// Meta-tree key of the record a clean stop leaves.
pub const SEALED_KEY: &[u8] = b"sealed-actors";

impl<S: Store> Replica<S> {
    /// Records, durably, the actors' state after the last write of this
    /// run, for the next start to go on with. Call it once nothing should
    /// write any more (the stop's last step): client writes are refused
    /// from now on (nothing is minted), and any other object write makes
    /// the next start take a new incarnation. Fails, recording nothing,
    /// when the store had a failed write or sync in this run.
    pub fn seal(&self) -> Result<(), StoreError> {
        let _every_stripe: Vec<_> = self.stripes.iter().map(relock).collect();
        let state = self.actors.seal();
        if !self.store.intact() {
            return Err(StoreError::Io {
                op: "seal",
                detail: "a write or WAL sync failed in this run, so the store may not hold \
                         all it wrote: the next start takes a new incarnation"
                    .into(),
            });
        }
        let bytes = rmp_serde::to_vec(&state).map_err(|e| StoreError::Io {
            op: "seal",
            detail: e.to_string(),
        })?;
        let mut batch = WriteBatch::default();
        batch.put(Tree::Meta, SEALED_KEY, &bytes);
        // Before the write, under every stripe: each object write from now
        // on sees it, also after a write that failed yet left the record
        // (a WAL append whose sync failed, replayed by a reopen).
        self.sealed.store(true, Ordering::Relaxed);
        self.store.write_synced(batch)?;
        info!(
            incarnation = state.incarnation,
            "sealed: the next start goes on under this incarnation's actors"
        );
        Ok(())
    }

    /// Adds to an object write's `batch` the deletion of the seal's record,
    /// once there is one: the store no longer holds what it held then. The
    /// caller holds the key's stripe.
    pub(super) fn unseal_with(&self, batch: &mut WriteBatch) {
        if self.sealed.load(Ordering::Relaxed) {
            batch.delete(Tree::Meta, SEALED_KEY);
        }
    }
}

/// The actors a starting node mints under, and the number of this run
/// (bumped on every start, for lost markers' generations, which must differ
/// from every run before's): the sealed ones of the run before if it
/// stopped cleanly, else a new incarnation numbered by this run.
pub(super) fn actors_at_start<S: Store>(
    me: NodeId,
    store: &S,
    now_ms: u64,
) -> Result<(Actors, u32), StoreError> {
    let sealed = sealed_state(store)?;
    let run = next_incarnation(store, now_ms)?;
    let actors = match sealed {
        Some(state) => {
            info!(
                incarnation = state.incarnation,
                "the last run stopped cleanly: going on under its actors"
            );
            Actors::resume(me, state)
        }
        None => Actors::new(me, run),
    };
    Ok((actors, run))
}

/// The actors' state a clean stop left, if the store is as it was then.
/// A record that cannot be read is left for the new incarnation, which
/// deletes it: that only costs clock entries.
fn sealed_state<S: Store>(store: &S) -> Result<Option<ActorsState>, StoreError> {
    let bytes = match store.get(Tree::Meta, SEALED_KEY) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Ok(None),
        Err(e @ StoreError::Corruption { .. }) => {
            warn!(error = %e, "a clean stop's record is corrupt: starting a new incarnation");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    match rmp_serde::from_slice::<ActorsState>(&bytes) {
        Ok(state) => Ok(Some(state)),
        Err(e) => {
            warn!(error = %e, "a clean stop's record is malformed: starting a new incarnation");
            Ok(None)
        }
    }
}

/// Meta-tree key of the incarnation counter, bumped (and synced) on every
/// start: a run mints under a new incarnation unless the one before stopped
/// cleanly (see [`seal`]), and no two incarnations share a number.
pub const INCARNATION_KEY: &[u8] = b"incarnation";

/// Bumps and durably stores this node's incarnation; returns the new one.
/// An empty store (a first start, or a wiped data directory) starts from
/// the wall clock's seconds, so that even a node that came back with its
/// old id (it gets a new random one; this is the second guard) would not
/// take up an incarnation of its earlier life.
pub(super) fn next_incarnation<S: Store>(store: &S, now_ms: u64) -> Result<u32, StoreError> {
    let last = match store.get(Tree::Meta, INCARNATION_KEY)? {
        None => u32::try_from(now_ms / 1000).unwrap_or(u32::MAX - 1),
        Some(b) => decode_incarnation(&b)?,
    };
    // Wrapping is harmless: an actor also names its epoch, and 2^32 starts
    // of one node id do not happen.
    let next = last.wrapping_add(1);
    let mut batch = WriteBatch::default();
    batch.put(Tree::Meta, INCARNATION_KEY, &next.to_be_bytes());
    // A clean stop's record is used once, by the start that reads it first.
    batch.delete(Tree::Meta, SEALED_KEY);
    store.write_synced(batch)?;
    Ok(next)
}

/// Reads the stored incarnation counter (4 bytes, big-endian).
pub fn decode_incarnation(bytes: &[u8]) -> Result<u32, StoreError> {
    <[u8; 4]>::try_from(bytes)
        .map(u32::from_be_bytes)
        .map_err(|_| StoreError::Corruption {
            tree: Tree::Meta.name(),
            key: hex::encode(INCARNATION_KEY),
            detail: format!("incarnation is {} bytes, not 4", bytes.len()),
        })
}

#[cfg(test)]
mod tests;
