//! One exchange of one partition's tree between two replicas, both sides:
//! the initiator's walk ([`AntiEntropy::exchange`]) and the responder's
//! answers ([`answer`]), which read only the responder's replica.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use serde::Serialize;
use serde_bytes::ByteBuf;
use shoal_client::proto::MemberInfo;
use tracing::info;

use super::{AntiEntropy, ExchangeError, ExchangeReport};
use crate::net::{
    byte_bounded, AaeRequest, AaeResponse, HandoffEntry, PeerError, PeerRequest, PeerResponse,
    Transport, BATCH_BYTES,
};
use crate::replica::trees::{BRANCHES, BRANCH_WIDTH};
use crate::replica::Replica;
use crate::storage::{Store, StoreError};
use crate::version::Object;

fn encoded_len<M: Serialize>(m: &M) -> u64 {
    rmp_serde::to_vec_named(m).map_or(0, |v| v.len() as u64)
}

/// Segments whose keys are listed per `Keys` request, so one answer stays
/// small even for a partition with millions of keys.
const SEGMENTS_PER_KEYS_REQUEST: usize = 64;

/// Approximate encoded size of an object: its values and per-sibling overhead.
/// Keys asked or repaired per request.
const REPAIR_CHUNK: usize = 100;

fn replica_failed(op: &str, key: &[u8], e: StoreError) -> PeerError {
    PeerError::Replica {
        op: op.into(),
        key: hex::encode(key),
        detail: e.to_string(),
    }
}

pub(super) fn bad_answer(
    peer: &MemberInfo,
    step: &'static str,
    answer: &AaeResponse,
) -> ExchangeError {
    ExchangeError::BadAnswer {
        peer: peer.name.clone(),
        step,
        answer: format!("{answer:?}"),
    }
}

/// Answers one exchange step on a request's worker thread: the steps that
/// read the store go off it ([`crate::tasks::heavy`]); branches and leaves
/// come from the trees in memory in microseconds, less than handing the
/// worker's tasks to another thread costs (a thread started at every sweep).
pub fn answer_on_worker<S: Store>(
    replica: &Replica<S>,
    request: AaeRequest,
) -> Result<AaeResponse, PeerError> {
    match request {
        AaeRequest::Keys { .. } | AaeRequest::Objects { .. } => {
            crate::tasks::heavy(|| answer(replica, request))
        }
        AaeRequest::Branches { .. } | AaeRequest::Leaves { .. } => answer(replica, request),
    }
}

/// Answers one exchange step from this node's trees and store.
pub fn answer<S: Store>(
    replica: &Replica<S>,
    request: AaeRequest,
) -> Result<AaeResponse, PeerError> {
    let tree = |p| replica.tree(p).ok_or(PeerError::TreesNotReady);
    Ok(match request {
        AaeRequest::Branches { partition } => AaeResponse::Branches(tree(partition)?.branches()),
        AaeRequest::Leaves {
            partition,
            branches,
        } => {
            let t = tree(partition)?;
            let mut out = Vec::with_capacity(branches.len());
            for b in branches {
                if b as usize >= BRANCHES {
                    return Err(PeerError::NoBranch {
                        branch: b,
                        branches: BRANCHES,
                    });
                }
                out.push(t.branch_leaves(b as usize).to_vec());
            }
            AaeResponse::Leaves(out)
        }
        AaeRequest::Keys {
            partition,
            segments,
        } => AaeResponse::Keys(
            replica
                .segment_keys(partition, &segments)
                .map_err(|e| replica_failed("list keys", &partition.to_be_bytes(), e))?
                .into_iter()
                .map(|(k, d)| (ByteBuf::from(k), d))
                .collect(),
        ),
        AaeRequest::Objects { keys, history } => {
            // Answers a prefix of `keys` within the batch cap; the
            // initiator asks again for the rest.
            let mut out = Vec::with_capacity(keys.len());
            let mut size = 0;
            for k in keys {
                let o = match history {
                    true => replica.restore_copy(&k),
                    false => replica.get(&k),
                };
                let o = o.map_err(|e| replica_failed("read", &k, e))?;
                size += k.len() + o.as_ref().map_or(0, Object::approx_size);
                out.push((k, o));
                if size > BATCH_BYTES {
                    break;
                }
            }
            AaeResponse::Objects(out)
        }
    })
}

impl<T: Transport, S: Store> AntiEntropy<T, S> {
    pub(super) async fn aae_call(
        &self,
        peer: &MemberInfo,
        request: AaeRequest,
        bytes: &mut u64,
    ) -> Result<AaeResponse, ExchangeError> {
        // An `Objects` answer carries up to a batch of objects (and one
        // past it); the other steps are small.
        let answer_bytes = match &request {
            AaeRequest::Objects { .. } => 2 * BATCH_BYTES,
            _ => 0,
        };
        let request = PeerRequest::Aae(request);
        let sent = encoded_len(&request);
        *bytes += sent;
        let deadline = self.deadline(sent as usize + answer_bytes);
        match self.transport.call(peer, request, deadline).await {
            Ok(PeerResponse::Aae(answer)) => {
                *bytes += encoded_len(&answer);
                Ok(answer)
            }
            Ok(PeerResponse::Error(error)) => Err(ExchangeError::Refused {
                peer: peer.name.clone(),
                error,
            }),
            Ok(other) => Err(ExchangeError::BadAnswer {
                peer: peer.name.clone(),
                step: "any",
                answer: format!("{other:?}"),
            }),
            Err(e) => Err(ExchangeError::Transport(e)),
        }
    }

    /// Compares this node's tree of `partition` with `peer`'s and repairs
    /// both sides by merge.
    pub async fn exchange(
        &self,
        partition: u32,
        peer: &MemberInfo,
    ) -> Result<ExchangeReport, ExchangeError> {
        let started = tokio::time::Instant::now();
        let mut report = ExchangeReport::default();
        let mine = self
            .replica
            .tree(partition)
            .ok_or(ExchangeError::TreesNotReady)?;
        let theirs = match self
            .aae_call(peer, AaeRequest::Branches { partition }, &mut report.bytes)
            .await?
        {
            AaeResponse::Branches(b) if b.len() == BRANCHES => b,
            other => return Err(bad_answer(peer, "branches", &other)),
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
                other => return Err(bad_answer(peer, "leaves", &other)),
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
                    other => return Err(bad_answer(peer, "keys", &other)),
                }
            }
            // Reads the objects of every differing segment: off the worker.
            let my_keys: BTreeMap<Vec<u8>, u64> =
                crate::tasks::heavy(|| self.replica.segment_keys(partition, &segments))?
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
                let sharing = self
                    .sweeping
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .max(1);
                let rate = (self.settings.max_repairs_per_sec / sharing).max(1);
                crate::clock::pace(chunk_started, chunk.len(), rate).await;
            }
        }
        let m = &self.metrics;
        m.aae_exchanges.fetch_add(1, Ordering::Relaxed);
        m.aae_keys_repaired
            .fetch_add(report.keys_repaired, Ordering::Relaxed);
        m.aae_bytes.fetch_add(report.bytes, Ordering::Relaxed);
        m.aae_exchange_latency.observe(started.elapsed());
        self.last.lock().expect("last exchanges lock").insert(
            partition,
            (
                peer.name.clone(),
                self.replica.now_ms(),
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
    ) -> Result<u64, ExchangeError> {
        let mut theirs = Vec::with_capacity(keys.len());
        while theirs.len() < keys.len() {
            let asked = &keys[theirs.len()..];
            let request = AaeRequest::Objects {
                keys: asked.iter().cloned().map(ByteBuf::from).collect(),
                history: false,
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
                other => return Err(bad_answer(peer, "objects", &other)),
            }
        }
        let mut push = Vec::new();
        let mut repaired = 0;
        for (key, their) in theirs {
            let mine = self.replica.get(&key)?;
            let merged = match (&mine, &their) {
                (Some(m), Some(t)) => Object::merged(m, t),
                (Some(m), None) => m.clone(),
                (None, Some(t)) => t.clone(),
                (None, None) => continue,
            };
            let mut changed = false;
            if mine.as_ref() != Some(&merged) {
                self.replica.merge(&key, &merged)?;
                changed = true;
            }
            if their.as_ref() != Some(&merged) {
                push.push(HandoffEntry {
                    key: key.into_vec(),
                    object: merged,
                    lost: false,
                });
                changed = true;
            }
            repaired += u64::from(changed);
        }
        while !push.is_empty() {
            let rest = push.split_off(byte_bounded(&push, |e| {
                e.key.len() + e.object.approx_size()
            }));
            let request = PeerRequest::Handoff(std::mem::replace(&mut push, rest));
            let sent = encoded_len(&request);
            *bytes += sent;
            match self
                .transport
                .call(peer, request, self.deadline(sent as usize))
                .await
            {
                Ok(PeerResponse::Stored) => *bytes += encoded_len(&PeerResponse::Stored),
                other => {
                    return Err(ExchangeError::RepairNotStored {
                        peer: peer.name.clone(),
                        answer: format!("{other:?}"),
                    })
                }
            }
        }
        Ok(repaired)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_bytes::ByteBuf;

    use super::*;
    use crate::replica::trees::tests::replica_over;
    use crate::storage::MemoryStore;
    use crate::version::VersionVector;

    /// The restore's ask (`history`) gets a key reaped lately as its
    /// tombstone's history; the exchange's own ask still gets "absent".
    #[test]
    fn objects_asked_with_history_carry_the_reap_fence() {
        let r = replica_over(Arc::new(MemoryStore::new()));
        let writer = shoal_ring::NodeId::from_u128(7);
        let mut tombstone = Object::default();
        tombstone.update(&VersionVector::new(), Some(b"old".to_vec()), writer, 0);
        tombstone.update(&tombstone.context(), None, writer, 0);
        r.merge(b"k", &tombstone).unwrap();
        assert!(r.reap(b"k", &tombstone).unwrap(), "reaped");
        let ask = |history| {
            let keys = vec![ByteBuf::from(b"k".to_vec())];
            match answer(&r, AaeRequest::Objects { keys, history }).unwrap() {
                AaeResponse::Objects(mut o) if o.len() == 1 => o.pop().unwrap().1,
                other => panic!("{other:?}"),
            }
        };
        let history = ask(true).expect("the restore's ask gets the history");
        assert!(history.siblings().is_empty());
        assert_eq!(history.context(), tombstone.context());
        assert_eq!(ask(false), None);
    }
}
