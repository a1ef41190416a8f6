//! Copies lost to corruption.
//!
//! A stored object whose record fails its checksum ([`crate::storage::record`],
//! or RocksDB's own block checksum) can never be served or trusted. The
//! first time the replica meets one (a read, a write, a merge, a tree
//! rebuild) it replaces the record with a *lost marker* and reports it (log,
//! `shoal_corrupt_records_total{tree="objects"}`). From then on:
//!
//! - a client read's answer from this replica is an error
//!   ([`super::ReplicaError::Lost`]): it does not count towards R, so a read
//!   quorum still overlaps every write quorum, and the coordinator
//!   read-repairs the replica;
//! - repair paths (anti-entropy, the reaper's check, handoff and read repair
//!   merges) see the key as missing here, and the first merge replaces the
//!   marker with the healthy replicas' version;
//! - the marker has its own digest in the Merkle tree, so anti-entropy sees
//!   the key differ from the other replicas and restores it with nobody
//!   reading it.
//!
//! Forgetting a key's history is amnesia: copies elsewhere may name this
//! node's actors with counters it no longer knows, so the node moves to a
//! new incarnation (durably) before the marker is written, and no dot it
//! minted for the key is minted again (see [`crate::version`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::{info, warn};

use super::stripe::Stripe;
use super::{next_incarnation, trees, Replica};
use crate::storage::{Store, StoreError, Tree};

/// The record of a copy lost to corruption: a format byte no object has.
pub(super) const LOST: &[u8] = &[0xEE];

/// What a key's object record holds.
pub(super) enum Stored {
    Absent,
    /// The copy here was lost to corruption and is not restored yet.
    Lost,
    Present(Arc<[u8]>),
}

impl Stored {
    /// The stored bytes, the lost marker included (for tree bookkeeping).
    pub(super) fn bytes(&self) -> Option<&[u8]> {
        match self {
            Stored::Absent => None,
            Stored::Lost => Some(LOST),
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
        match self.stored(stripe, key) {
            Ok(None) => Ok(Stored::Absent),
            Ok(Some(b)) if &*b == LOST => Ok(Stored::Lost),
            Ok(Some(b)) => Ok(Stored::Present(b)),
            Err(e @ StoreError::Corruption { .. }) => {
                self.mark_lost(stripe, key, &e)?;
                Ok(Stored::Lost)
            }
            Err(e) => Err(e),
        }
    }

    /// Replaces a corrupt record of `key` with the lost marker (see the
    /// module doc). The tree gives up the digest the key's index entry
    /// says was written; if that entry cannot be read either, the trees are
    /// rebuilt at the anti-entropy loop's next turn.
    fn mark_lost(
        &self,
        stripe: &mut Stripe,
        key: &[u8],
        error: &StoreError,
    ) -> Result<(), StoreError> {
        self.metrics.count_corrupt(Tree::Objects);
        warn!(
            key = %hex::encode(key),
            %error,
            "corrupt object: marked lost; the other replicas restore it"
        );
        self.new_incarnation("a corrupt object's history was forgotten")?;
        let ikey = trees::index_key(self.partition_of(key), key);
        let indexed = match self.store.get(Tree::Aae, &ikey) {
            Ok(None) => None,
            Ok(Some(d)) if d.len() == 8 => Some(u64::from_le_bytes(d.try_into().expect("8 bytes"))),
            _ => {
                self.rebuild_wanted.store(true, Ordering::Relaxed);
                None
            }
        };
        self.write_object(stripe, key, indexed, Some(LOST))
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
