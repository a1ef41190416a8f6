//! The replica's side of the peer protocol: the requests a coordinator,
//! handoff or the reaper send to a replica, answered from this one.
//! (Anti-entropy's requests are answered by [`crate::antientropy`], which
//! reads the replica's trees.)

use shoal_ring::NodeId;
use tracing::error;

use super::gather::Run;
use super::{Replica, ReplicaError};
use crate::net::{
    Batched, BatchedAnswer, HandoffEntry, PeerError, PeerRequest, PeerResponse, BATCH_ANSWER_BYTES,
    BATCH_REQUESTS,
};
use crate::storage::{Durable, Store, StoreError};
use crate::version::Object;

pub(super) fn failed(op: &str, key: &[u8], e: impl Into<ReplicaError>) -> PeerResponse {
    let e = e.into();
    error!(op, key = %hex::encode(key), error = %e, "replica operation failed");
    PeerResponse::Error(PeerError::Replica {
        op: op.into(),
        key: hex::encode(key),
        detail: e.to_string(),
    })
}

/// The answer to a replica's read of `key`.
fn read_answer(key: &[u8], read: Result<Option<Object>, ReplicaError>) -> PeerResponse {
    match read {
        Ok(o) => PeerResponse::Object(o),
        Err(e @ ReplicaError::Lost { .. }) => PeerResponse::Error(PeerError::Corrupt {
            key: hex::encode(key),
            detail: e.to_string(),
        }),
        Err(e) => failed("read", key, e),
    }
}

/// Hints scanned per `HintsIn` request.
const HINTS_PAGE: usize = 512;

/// A replica's answer, to be sent once the write it made is durable.
#[must_use = "an answer is sent only once settled"]
pub struct Answer {
    response: PeerResponse,
    /// The written key and its durability (deferred writes only).
    pending: Option<(Vec<u8>, Durable)>,
}

impl Answer {
    pub(super) fn ready(response: PeerResponse) -> Answer {
        Answer {
            response,
            pending: None,
        }
    }

    /// "Stored", once `durable` resolves.
    pub(super) fn stored(key: Vec<u8>, durable: Durable) -> Answer {
        Answer {
            response: PeerResponse::Stored,
            pending: Some((key, durable)),
        }
    }

    /// The answer to a coordinator's write of `key` that `merged` into the
    /// copy here.
    pub(super) fn merged(key: Vec<u8>, merged: Result<(Object, Durable), StoreError>) -> Answer {
        match merged {
            Ok((_, durable)) => Answer::stored(key, durable),
            Err(e) => Answer::ready(failed("merge", &key, e)),
        }
    }

    /// The answer once its write is durable; an error if it cannot be.
    pub async fn settled(self) -> PeerResponse {
        match self.pending {
            None => self.response,
            Some((key, durable)) => match durable.wait().await {
                Ok(()) => self.response,
                Err(e) => failed("sync", &key, e),
            },
        }
    }
}

/// A batch's answers (`None`: answered [`BatchedAnswer::Alone`]), to be
/// sent once the writes in it are durable; or why it was refused whole.
#[must_use = "answers are sent only once settled"]
pub struct BatchAnswers(Result<Vec<Option<Answer>>, PeerError>);

impl BatchAnswers {
    pub async fn settled(self) -> Result<Vec<BatchedAnswer>, PeerError> {
        let settled = self.0?.into_iter().map(|answer| async move {
            match answer {
                Some(answer) => BatchedAnswer::from(answer.settled().await),
                None => BatchedAnswer::Alone,
            }
        });
        Ok(futures_util::future::join_all(settled).await)
    }
}

impl<S: Store> Replica<S> {
    /// Answers a replica request from this node's copy; `me` is this node
    /// (a hint "for" it is merged as its own data). A coordinator's write
    /// ([`PeerRequest::ReplicaPut`]) shares WAL syncs with the writes made
    /// meanwhile: send the answer once [`Answer::settled`].
    pub fn answer(&self, me: NodeId, request: PeerRequest) -> Answer {
        if let PeerRequest::ReplicaPut { key, object } = request {
            let merged = self.merge_deferred(&key, &object);
            return Answer::merged(key, merged);
        }
        Answer::ready(self.answer_now(me, request))
    }

    /// Answers a batch ([`PeerRequest::Spares`] or `Batch`): each request
    /// as [`Self::answer`] does, the writes made in one store write (see
    /// [`super::gather`]) and sharing their WAL syncs, one
    /// answer per request in order; send them once [`BatchAnswers::settled`].
    /// A batch of more than [`BATCH_REQUESTS`] is refused whole, a write too
    /// large for a batch on its own. With `hand_back`, a read whose object
    /// would take the answers past [`BATCH_ANSWER_BYTES`] is answered
    /// [`BatchedAnswer::Alone`] (never the first: an object larger than
    /// that still moves); writes and reads of absent keys never are.
    pub fn answer_batch(&self, requests: Vec<Batched>, hand_back: bool) -> BatchAnswers {
        if requests.len() > BATCH_REQUESTS {
            return BatchAnswers(Err(PeerError::Refused(format!(
                "a batch of {} requests, over the {BATCH_REQUESTS} allowed",
                requests.len()
            ))));
        }
        let mut bytes = 0;
        let mut answers = Vec::with_capacity(requests.len());
        // The batch's writes are made in one store write (see `gather`).
        let mut run = Run::new(self);
        for request in requests {
            if !request.fits() {
                answers.push(Some(Answer::ready(PeerResponse::Error(
                    PeerError::NotAReplicaRequest(
                        "a write of a large object travels on its own, not in a batch".into(),
                    ),
                ))));
                continue;
            }
            let key = match request {
                Batched::ReplicaPut { key, object } => {
                    run.put(key, &object, &mut answers);
                    continue;
                }
                Batched::ReplicaGet { key } => key,
            };
            let response = read_answer(&key, run.get(&key, &mut answers));
            let size = match &response {
                PeerResponse::Object(Some(o)) => o.approx_size(),
                _ => 0,
            };
            if hand_back && size > 0 && !answers.is_empty() && bytes + size > BATCH_ANSWER_BYTES {
                answers.push(None);
                continue;
            }
            bytes += size;
            answers.push(Some(Answer::ready(response)));
        }
        run.write(&mut answers);
        BatchAnswers(Ok(answers))
    }

    fn answer_now(&self, me: NodeId, request: PeerRequest) -> PeerResponse {
        match request {
            PeerRequest::ReplicaGet { key } => read_answer(&key, self.read(&key)),
            PeerRequest::HintPut {
                key,
                for_primary,
                object,
            } => {
                let stored = if for_primary == me {
                    // Views that disagree could name this node as its own fallback.
                    self.merge(&key, &object).map(|_| ())
                } else {
                    self.store_hint(for_primary, &key, &object)
                };
                match stored {
                    Ok(()) => PeerResponse::Stored,
                    Err(e) => failed("hint", &key, e),
                }
            }
            PeerRequest::HintGet { key, for_primary } => match self.hint(for_primary, &key) {
                Ok(o) => PeerResponse::Object(o),
                Err(e @ ReplicaError::HintLost { .. }) => PeerResponse::Error(PeerError::Corrupt {
                    key: hex::encode(&key),
                    detail: e.to_string(),
                }),
                Err(e) => failed("hint read", &key, e),
            },
            // Read, then synced: the reaper acts on "no hint here" for good,
            // and a power loss must not bring back a hint deleted as
            // delivered.
            PeerRequest::HintsOf { key } | PeerRequest::ReapHintsOf { key, .. } => {
                match self.hints_of(&key).and_then(|h| {
                    self.store()
                        .sync_wal()
                        .map(|()| h)
                        .map_err(ReplicaError::from)
                }) {
                    Ok(h) => PeerResponse::Hints(h),
                    Err(e) => failed("hints read", &key, e),
                }
            }
            // A lost copy is an error here: the reaper must not take it
            // for "absent", nor its partial copy for the whole.
            PeerRequest::ReapCheck { key } => {
                match self.read(&key).and_then(|o| {
                    self.store()
                        .sync_wal()
                        .map(|()| o)
                        .map_err(ReplicaError::from)
                }) {
                    Ok(o) => PeerResponse::Object(o),
                    Err(e) => failed("reap check", &key, e),
                }
            }
            PeerRequest::Handoff(entries) => match self.accept_handoff(&entries) {
                Ok(()) => PeerResponse::Stored,
                Err((key, e)) => failed("handoff merge", &key, e),
            },
            PeerRequest::HintsIn { partitions, after } => {
                let partitions = partitions.into_iter().collect();
                let after = (!after.is_empty()).then_some(after.as_slice());
                match self.hints_in(&partitions, after, HINTS_PAGE) {
                    Ok((entries, next)) => PeerResponse::HintsIn {
                        entries,
                        next: next.unwrap_or_default(),
                    },
                    Err(e) => failed("hints scan", &[], e),
                }
            }
            PeerRequest::Reap { key, object } => match self.reap(&key, &object) {
                Ok(true) => PeerResponse::Stored,
                Ok(false) => PeerResponse::Error(PeerError::NotReaped {
                    key: hex::encode(&key),
                }),
                Err(e) => failed("reap", &key, e),
            },
            other => PeerResponse::Error(PeerError::NotAReplicaRequest(format!("{other:?}"))),
        }
    }

    /// Merges handed-off objects into this node's copies; a hint that was
    /// lost on its way marks the copy lost (see [`super::hints`]). On
    /// failure, the key that failed.
    pub(super) fn accept_handoff(
        &self,
        entries: &[HandoffEntry],
    ) -> Result<(), (Vec<u8>, StoreError)> {
        for e in entries {
            let merged = if e.lost {
                self.merge_incomplete(&e.key, &e.object)
            } else {
                self.merge(&e.key, &e.object).map(drop)
            };
            merged.map_err(|err| (e.key.clone(), err))?;
        }
        Ok(())
    }
}
