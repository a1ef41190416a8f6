//! A batch's writes made in one store write.
//!
//! A coordinator's writes to a replica travel in batches (see
//! `coordinator::spare`): under load some five writes and as many reads a
//! batch in workload a. Each write used to be a store write of its own,
//! on RocksDB its own write group, WAL record and `write` system call, some
//! 8% of a node's CPU beside the memtable insert itself. A batch's
//! writes now make one: [`Replica::answer_batch`] applies them one after
//! the other, each under its key's stripe as any write, but adds each one's
//! changes to a [`Gathered`] write instead of making it, and keeps the
//! stripes it took until that write is made. Then the object cache and the
//! trees learn every change, as after a single write, and the stripes are
//! let go: nothing outside the batch sees a change before the store holds
//! it, and a failed write fails every write gathered in it and changes
//! nothing else (their keys are dropped from the cache, as for any write
//! that fails).
//!
//! A [`Run`] only ever takes a stripe with `try_lock`: one another thread
//! holds makes it write what it gathered and let go of every stripe first,
//! and the request then waits for its stripe as any request does. So a
//! batch never waits while holding a stripe, and cannot deadlock with
//! [`Replica::seal`] (which takes every stripe, in order) nor with another
//! worker's batch. A request for a key the run has already written (a
//! second write, a read) has the run written first, so it sees that write
//! as it did when every write was made at once; a run is also written
//! once it holds [`GATHER_BYTES`], which keeps the store write small
//! enough for the worker (see `RocksStore::write_to`).

use std::sync::{Arc, MutexGuard};

use super::serve::{failed, Answer};
use super::stripe::{self, Stripe};
use super::Replica;
use crate::net::{PeerError, PeerResponse};
use crate::storage::{Store, WriteBatch};
use crate::version::Object;

/// Most bytes of keys and values a run gathers before it is written.
pub(super) const GATHER_BYTES: usize = 64 << 10;

/// The changes gathered for one store write.
#[derive(Default)]
pub(super) struct Gathered {
    batch: WriteBatch,
    changes: Vec<Change>,
}

/// One write's change, for the cache and the trees once it is stored.
struct Change {
    partition: u32,
    key: Vec<u8>,
    old_digest: Option<u64>,
    new: Option<Arc<[u8]>>,
}

impl Gathered {
    /// Adds a write of `key` (its object's new bytes, `None`: removed),
    /// whose changes are `batch`.
    pub(super) fn add(
        &mut self,
        batch: WriteBatch,
        partition: u32,
        key: &[u8],
        old_digest: Option<u64>,
        new: Option<&[u8]>,
    ) {
        self.batch.ops.extend(batch.ops);
        self.changes.push(Change {
            partition,
            key: key.to_vec(),
            old_digest,
            new: new.map(Arc::from),
        });
    }
}

/// The writes of a batch gathered so far, and the stripes they hold.
pub(super) struct Run<'r, S> {
    replica: &'r Replica<S>,
    /// The stripes taken, by index.
    held: Vec<(usize, MutexGuard<'r, Stripe>)>,
    gathered: Gathered,
    /// Where each gathered write's answer goes in the batch's answers.
    answers_at: Vec<usize>,
}

impl<'r, S: Store> Run<'r, S> {
    pub(super) fn new(replica: &'r Replica<S>) -> Self {
        Run {
            replica,
            held: Vec::new(),
            gathered: Gathered::default(),
            answers_at: Vec::new(),
        }
    }

    /// Whether the run has written `key` (not made yet).
    fn wrote(&self, key: &[u8]) -> bool {
        self.gathered.changes.iter().any(|c| c.key == key)
    }

    /// Applies a coordinator's write of `object` to `key` and adds its
    /// answer to `answers`: gathered (its answer set once the run is
    /// written), or made at once when the key's stripe is held elsewhere.
    pub(super) fn put(&mut self, key: Vec<u8>, object: &Object, answers: &mut Vec<Option<Answer>>) {
        if self.wrote(&key) || self.gathered.batch.bytes() >= GATHER_BYTES {
            self.write(answers);
        }
        let Some(stripe) = take(&mut self.held, self.replica, &key) else {
            self.write(answers);
            let merged = self.replica.merge_deferred(&key, object);
            answers.push(Some(Answer::merged(key, merged)));
            return;
        };
        let before = self.gathered.changes.len();
        let gather = super::Commit::Gather(&mut self.gathered);
        let merged = self.replica.merge_in(stripe, &key, object, gather);
        let answer = match merged {
            Ok(_) if self.gathered.changes.len() > before => {
                self.answers_at.push(answers.len());
                Answer::ready(unwritten(&key))
            }
            // Nothing to write (what is stored is vouched for as it is),
            // or an error.
            merged => Answer::merged(key, merged),
        };
        answers.push(Some(answer));
    }

    /// A replica's read of `key`, after the run's write of it if any.
    pub(super) fn get(
        &mut self,
        key: &[u8],
        answers: &mut [Option<Answer>],
    ) -> Result<Option<Object>, super::ReplicaError> {
        if self.wrote(key) {
            self.write(answers);
        }
        let index = stripe::index_of(key);
        if let Some((_, held)) = self.held.iter_mut().find(|(i, _)| *i == index) {
            return self.replica.read_in(held, key);
        }
        // Not kept: a read changes nothing the run must hold back.
        match stripe::try_relock(&self.replica.stripes[index]) {
            Some(mut stripe) => self.replica.read_in(&mut stripe, key),
            None => {
                self.write(answers);
                self.replica.read(key)
            }
        }
    }

    /// Makes the gathered writes in one store write, sets their answers
    /// in `answers`, and lets go of every stripe.
    pub(super) fn write(&mut self, answers: &mut [Option<Answer>]) {
        let Gathered { batch, changes } = std::mem::take(&mut self.gathered);
        let answers_at = std::mem::take(&mut self.answers_at);
        let written = match changes.is_empty() {
            true => Ok(crate::storage::Durable::now()),
            false => self.replica.store.write_deferred(batch),
        };
        for (change, at) in changes.into_iter().zip(answers_at) {
            let stripe = take(&mut self.held, self.replica, &change.key)
                .expect("a gathered write's stripe is held until it is made");
            let Change {
                partition,
                key,
                old_digest,
                new,
            } = change;
            answers[at] = Some(match &written {
                Ok(durable) => {
                    self.replica
                        .learn_written(stripe, partition, &key, old_digest, new);
                    Answer::stored(key, durable.clone())
                }
                Err(e) => {
                    stripe.forget(&key); // what the store now holds is unknown
                    Answer::ready(failed("merge", &key, e.clone()))
                }
            });
        }
        self.held.clear();
    }
}

/// The stripe of `key`: one `held` already, or else taken now if no other
/// thread holds it (then held too); `None` if one does.
fn take<'a, 'r, S>(
    held: &'a mut Vec<(usize, MutexGuard<'r, Stripe>)>,
    replica: &'r Replica<S>,
    key: &[u8],
) -> Option<&'a mut Stripe> {
    let index = stripe::index_of(key);
    let at = match held.iter().position(|(i, _)| *i == index) {
        Some(at) => at,
        None => {
            held.push((index, stripe::try_relock(&replica.stripes[index])?));
            held.len() - 1
        }
    };
    Some(&mut held[at].1)
}

/// The answer of a gathered write until it is made: never sent as it is
/// unless the run ended without writing it.
fn unwritten(key: &[u8]) -> PeerResponse {
    PeerResponse::Error(PeerError::Replica {
        op: "merge".into(),
        key: hex::encode(key),
        detail: "the batch ended before this write was made; nothing was written".into(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;
    use shoal_ring::NodeId;

    use super::*;
    use crate::net::{Batched, BatchedAnswer};
    use crate::replica::trees::tests::replica_over;
    use crate::storage::MemoryStore;
    use crate::version::VersionVector;

    /// An object holding `value` alone, written by node `writer`.
    fn written(value: &[u8], writer: u128) -> Object {
        let mut o = Object::default();
        let writer = NodeId::from_u128(writer);
        o.update(&VersionVector::new(), Some(value.to_vec()), writer, 0);
        o
    }

    fn put(key: &[u8], object: Object) -> Batched {
        Batched::ReplicaPut {
            key: key.to_vec(),
            object,
        }
    }

    fn answered<S: Store>(r: &Replica<S>, batch: Vec<Batched>) -> Vec<BatchedAnswer> {
        let answers = r.answer_batch(batch, false);
        futures_util::FutureExt::now_or_never(answers.settled())
            .expect("fsync is off: nothing to wait for")
            .expect("a batch of replica requests")
    }

    #[test]
    fn a_batch_s_writes_are_one_store_write() {
        let store = Arc::new(MemoryStore::new());
        let r = replica_over(store.clone());
        store.track_unsynced();
        let mut batch: Vec<Batched> = (0..5u8).map(|k| put(&[k], written(&[k], 7))).collect();
        batch.insert(2, Batched::ReplicaGet { key: vec![9] });
        let answers = answered(&r, batch);
        assert_eq!(
            store.unsynced_batches(),
            1,
            "one store write for five writes"
        );
        assert_eq!(answers.len(), 6);
        for (i, answer) in answers.iter().enumerate() {
            let expected = match i {
                2 => BatchedAnswer::Object(None),
                _ => BatchedAnswer::Stored,
            };
            assert_eq!(answer, &expected, "answer {i}");
        }
        for k in 0..5u8 {
            assert_eq!(r.get(&[k]).unwrap(), Some(written(&[k], 7)));
        }
    }

    /// A full disk fails the one write: every write gathered in it is
    /// answered with the error, none is stored or cached, and the batch's
    /// other answers stand.
    #[test]
    fn a_failed_write_fails_every_write_gathered_in_it() {
        let store = Arc::new(MemoryStore::new());
        let r = replica_over(store.clone());
        r.merge(b"x", &written(b"x", 7)).unwrap();
        store.set_full(true);
        let batch = vec![
            put(b"a", written(b"a", 7)),
            Batched::ReplicaGet { key: b"x".to_vec() },
            put(b"b", written(b"b", 7)),
        ];
        let answers = answered(&r, batch);
        store.set_full(false);
        assert!(
            matches!(&answers[0], BatchedAnswer::Error(_)),
            "{answers:?}"
        );
        assert_eq!(answers[1], BatchedAnswer::Object(Some(written(b"x", 7))));
        assert!(
            matches!(&answers[2], BatchedAnswer::Error(_)),
            "{answers:?}"
        );
        assert_eq!(r.get(b"a").unwrap(), None, "an unwritten write was cached");
        assert_eq!(r.get(b"b").unwrap(), None);
    }

    /// A stripe a panic poisoned is taken (and its cache emptied), as
    /// [`stripe::relock`] does: the batch does not wait for it for ever.
    #[test]
    fn a_poisoned_stripe_is_taken_not_waited_for() {
        let r = Arc::new(replica_over(Arc::new(MemoryStore::new())));
        let stripe = stripe::index_of(b"a");
        let poisoner = r.clone();
        let _ = std::thread::spawn(move || {
            let _held = poisoner.stripes[stripe].lock().unwrap();
            panic!("poisons the stripe");
        })
        .join();
        assert!(r.stripes[stripe].is_poisoned());
        let (done, answers) = std::sync::mpsc::channel();
        let batching = r.clone();
        std::thread::spawn(move || {
            let batch = vec![
                put(b"a", written(b"a", 7)),
                Batched::ReplicaGet { key: b"a".to_vec() },
            ];
            let _ = done.send(answered(&batching, batch));
        });
        let answers = answers
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the batch waited for a stripe it held itself");
        let stored = BatchedAnswer::Object(Some(written(b"a", 7)));
        assert_eq!(answers, vec![BatchedAnswer::Stored, stored]);
        assert!(
            !r.stripes[stripe].is_poisoned(),
            "the poison was not cleared"
        );
    }

    /// A batch never waits for a stripe while it holds others: it makes
    /// the writes it gathered first, then waits as any request does.
    #[test]
    fn a_stripe_held_elsewhere_has_the_run_written_before_the_batch_waits() {
        let store = Arc::new(MemoryStore::new());
        let r = Arc::new(replica_over(store.clone()));
        let (a, b) = (b"a".to_vec(), b"b".to_vec());
        assert_ne!(stripe::index_of(&a), stripe::index_of(&b));
        let held = r.stripes[stripe::index_of(&b)].lock().unwrap();
        let batching = {
            let r = r.clone();
            let batch = vec![put(&a, written(b"a", 7)), put(&b, written(b"b", 7))];
            std::thread::spawn(move || answered(&r, batch))
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while store
            .get(crate::storage::Tree::Objects, &a)
            .unwrap()
            .is_none()
        {
            assert!(std::time::Instant::now() < deadline, "a was never written");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        drop(held);
        let answers = batching.join().unwrap();
        assert_eq!(answers, vec![BatchedAnswer::Stored; 2]);
        assert_eq!(r.get(&b).unwrap(), Some(written(b"b", 7)));
    }

    /// A request of the batch: a write of value `v` by writer `w` to key
    /// `k`, or a read of `k`.
    #[derive(Debug, Clone)]
    enum Req {
        Put(u8, u8, u8),
        Get(u8),
    }

    fn batches() -> impl Strategy<Value = Vec<Vec<Req>>> {
        let req = prop_oneof![
            (0u8..6, any::<u8>(), 1u8..4).prop_map(|(k, v, w)| Req::Put(k, v, w)),
            (0u8..6).prop_map(Req::Get),
        ];
        prop::collection::vec(prop::collection::vec(req, 0..24), 1..4)
    }

    proptest! {
        /// Batches leave the same objects, answers and trees as their
        /// requests made one by one (keys written twice in a batch, read
        /// after a write in it, siblings from several writers).
        #[test]
        fn batches_do_what_their_requests_one_by_one_do(batches in batches()) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            rt.block_on(async {
                let gathered = replica_over(Arc::new(MemoryStore::new()));
                let alone = replica_over(Arc::new(MemoryStore::new()));
                gathered.rebuild_trees(u32::MAX).await.unwrap();
                alone.rebuild_trees(u32::MAX).await.unwrap();
                for reqs in &batches {
                    let batch = reqs.iter().map(|r| match r {
                        Req::Put(k, v, w) => put(&[*k], written(&[*v], u128::from(*w))),
                        Req::Get(k) => Batched::ReplicaGet { key: vec![*k] },
                    });
                    let answers = answered(&gathered, batch.clone().collect());
                    let one_by_one: Vec<BatchedAnswer> = batch
                        .map(|request| match request {
                            Batched::ReplicaPut { key, object } => {
                                alone.merge(&key, &object).unwrap();
                                BatchedAnswer::Stored
                            }
                            Batched::ReplicaGet { key } => BatchedAnswer::Object(alone.read(&key).unwrap()),
                        })
                        .collect();
                    prop_assert_eq!(answers, one_by_one);
                }
                for k in 0..6u8 {
                    prop_assert_eq!(gathered.get(&[k]).unwrap(), alone.get(&[k]).unwrap());
                }
                // Partitions without keys: absent from a rebuilt tree.
                let strip = |t: crate::replica::trees::Trees| {
                    t.into_iter()
                        .filter(|(_, t)| t.leaves().iter().any(|l| *l != 0))
                        .collect::<std::collections::HashMap<_, _>>()
                };
                let incremental = strip(gathered.trees());
                prop_assert_eq!(&incremental, &strip(alone.trees()));
                gathered.rebuild_trees(u32::MAX).await.unwrap();
                prop_assert_eq!(strip(gathered.trees()), incremental);
                Ok(())
            })?;
        }
    }
}
