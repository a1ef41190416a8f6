//! Restoring copies lost to corruption: this node asks every other primary
//! of each key whose copy here is lost for its copy, and hands them all to
//! [`crate::replica::Replica::restore`] (the rule and why it holds are in
//! the replica's `lost` module). The copies are asked with the exchange's
//! `Objects` step with `history` set, which a lost peer answers with its
//! partial copy, and a peer that reaped the key lately with the history
//! of its tombstone ([`crate::replica::Replica::restore_copy`]).
//!
//! Runs at the start of every sweep and as soon as the replica finds a copy
//! lost, once the sweep or reaper slice in progress is over (see
//! [`AntiEntropy::run`]); a key whose other primaries are not all
//! up, or do not all answer, stays lost until a later turn.

use std::sync::atomic::Ordering;

use serde_bytes::ByteBuf;
use shoal_client::proto::MemberInfo;
use tracing::debug;

use super::exchange::bad_answer;
use super::{AntiEntropy, ExchangeError};
use crate::membership::View;
use crate::net::{AaeRequest, AaeResponse, Transport};
use crate::storage::Store;
use crate::version::Object;

impl<T: Transport, S: Store> AntiEntropy<T, S> {
    /// Restores every copy known lost here whose key's other primaries all
    /// answer; returns how many it restored. Paced at
    /// `anti-entropy.max-repairs-per-sec`.
    pub async fn restore_lost(&self) -> u64 {
        let keys = self.replica.lost_keys();
        if keys.is_empty() {
            return 0;
        }
        let Some(view) = self.membership.view() else {
            return 0;
        };
        let mut restored = 0;
        for key in keys {
            let started = tokio::time::Instant::now();
            match self.restore(&key, &view).await {
                Ok(true) => restored += 1,
                Ok(false) => {}
                Err(e) => {
                    debug!(key = %hex::encode(&key), error = %e, "lost copy not restored yet")
                }
            }
            crate::clock::pace(started, 1, self.settings.max_repairs_per_sec).await;
        }
        restored
    }

    /// Restores `key`'s copy here if it is lost and every other replica of
    /// the key that is not removed answers with its copy.
    async fn restore(&self, key: &[u8], view: &View) -> Result<bool, ExchangeError> {
        // Read before any peer is asked: their answers come after the
        // marker of this generation was written.
        let Some(generation) = self.replica.lost_generation(key)? else {
            return Ok(false);
        };
        let mut others = Vec::new();
        // Every replica of the key, in every layout of a change in progress,
        // removed members aside: what they hold counts for nothing from the
        // commit on (as for reads, [`View::read_list`]), and one that is
        // gone would hold the key unreadable for the whole change.
        // Not from this copy alone, though, when removals took every other
        // replica: the next change's new replicas are waited for.
        let mut skipped = false;
        for id in view.replicas(key, self.n).into_iter().map(|m| m.id) {
            if view.removed.contains(&id) {
                skipped = true;
                continue;
            }
            if id == self.me {
                continue;
            }
            match view.members.get(&id) {
                Some(m) if self.liveness.is_up(id) => others.push(m.clone()),
                // Not every primary can answer: not restored this turn.
                _ => return Ok(false),
            }
        }
        if skipped && others.is_empty() {
            return Ok(false);
        }
        let asks = others.iter().map(|peer| async move {
            let mut bytes = 0;
            let copy = self.copy_of(peer, key, &mut bytes).await;
            self.metrics.aae_bytes.fetch_add(bytes, Ordering::Relaxed);
            copy
        });
        let copies = futures_util::future::join_all(asks)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.replica.restore(key, generation, &copies)?)
    }

    /// `peer`'s copy of `key` (its partial copy if its own is lost).
    async fn copy_of(
        &self,
        peer: &MemberInfo,
        key: &[u8],
        bytes: &mut u64,
    ) -> Result<Option<Object>, ExchangeError> {
        let request = AaeRequest::Objects {
            keys: vec![ByteBuf::from(key.to_vec())],
            history: true,
        };
        match self.aae_call(peer, request, bytes).await? {
            AaeResponse::Objects(mut o) if o.len() == 1 && o[0].0.as_slice() == key => {
                Ok(o.pop().and_then(|(_, copy)| copy))
            }
            other => Err(bad_answer(peer, "objects", &other)),
        }
    }
}
