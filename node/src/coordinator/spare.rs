//! Batched sends: a coordinator's requests to the primary replicas of keys
//! travel to each peer in batches instead of a message each, and with
//! N=3 and R=W=2 the third replica's (the spares, which no quorum waits
//! for) wait a little for others.
//!
//! Every replica of a key is still asked: a read is still read-repaired
//! from all of them, and a write still reaches all of them at once, not
//! later through anti-entropy (with `cluster.spare-reads = "when-slow"`,
//! a read's spares are held and sent, at once, only if its quorum is slow:
//! see `speculative`). The quorum's own sends (the R-1 or W-1
//! replicas after this node in ring order; the local replica is answered
//! in place) leave in the same turn of the scheduler: the first one bound
//! for a peer starts a task that yields once, so that the requests the
//! node is handling in this turn join it, and then sends them as one
//! [`PeerRequest::Spares`] (the wire name is older than this use),
//! answered with one message. A spare waits up to [`WINDOW`] for other
//! spares bound to the same peer. A spare's answer counts like any other:
//! when a quorum send is slow or fails, the spare completes the quorum a
//! window later.
//!
//! Why: a small remote request costs far more in framing, QUIC packets,
//! syscalls and task wake-ups on both nodes than the replica's read or
//! merge it carries. On the 2-core bench machine, answering the third
//! replica in batches took about a third of the servers' CPU per read
//! away, and batching the quorum's own sends in their turn took another
//! 4-5% of the servers' CPU per operation off workload a and c
//! (bench/README.md). Cassandra gets the first saving by asking only R
//! replicas, at the price of read repair of the others; this keeps it.
//!
//! A batch that comes back refused whole (from an older node during a
//! rolling upgrade, which does not know `Spares`) or answered with the
//! wrong count, or handing back its first request, is not a failure of its
//! requests: each is sent again on its own to the same primary, and so are
//! the next requests to that peer for [`ALONE_FOR`]. A read whose answer
//! would make the batch's too large comes back `Alone` and is sent again
//! likewise. (Nodes of 297ac1c..6d1d943 sent `PeerRequest::Batch`, which
//! is still answered, whole, for them.) Only a peer that cannot
//! be reached (or no answer by the deadline) fails a batched request, and
//! a fallback is asked in its place, as for any send: a fallback's
//! "absent" must never stand in for a primary that is up and holds the
//! key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_client::proto::MemberInfo;
use shoal_ring::NodeId;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::quorum::Coordinator;
use crate::net::{
    Batched, BatchedAnswer, PeerRequest, PeerResponse, Transport, TransportError,
    BATCH_ANSWER_BYTES, BATCH_REQUESTS,
};
use crate::storage::Store;

/// How long a spare waits for others to the same peer. Its answer is
/// needed only when a quorum send failed or is slow, where this is small
/// beside the timeouts; under load it gathers tens of requests.
pub(super) const WINDOW: Duration = Duration::from_millis(1);

/// Most bytes a quorum's own request may carry (for a read: its local
/// copy, cached) to join a batch that leaves this turn. A batch is
/// answered once all its requests are, so a large one would hold up the
/// others' answers, and a read of a large object is read whole before it
/// can be handed back; so larger ones, and reads of keys whose local copy
/// is not cached (of unknown size), go on their own.
pub(super) const THIS_TURN_BYTES: usize = 16 << 10;

/// How long spares to a peer that refused a batch go one by one.
const ALONE_FOR: Duration = Duration::from_secs(60);

/// What a spare's batch brought it.
enum Spared {
    Answer(Result<PeerResponse, TransportError>),
    /// Send the request again on its own.
    Alone,
}

type Waiter = oneshot::Sender<Spared>;

/// When a batch leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Leaves {
    /// Once the requests of this turn of the scheduler have joined it:
    /// the quorum waits for them.
    ThisTurn,
    /// After [`WINDOW`]: spares, which no quorum waits for.
    AfterWindow,
}

/// The requests waiting for their batch, per peer and kind of batch.
#[derive(Default)]
pub struct Spares {
    state: Mutex<State>,
    /// How fast peers answer, for the spare delay of `when-slow` reads.
    pub(super) answer_times: super::speculative::AnswerTimes,
}

#[derive(Default)]
struct State {
    pending: HashMap<(NodeId, Leaves), Pending>,
    /// Peers that refused a batch: until then their requests go one by one.
    alone_until: HashMap<NodeId, Instant>,
}

/// One peer's batch in the making.
#[derive(Default)]
struct Pending {
    requests: Vec<Batched>,
    waiters: Vec<Waiter>,
    bytes: usize,
    /// The latest deadline of the requests in it (each waiter keeps its own).
    deadline: Option<Instant>,
    /// Counts the batches taken, so that a window's timer takes only the
    /// batch it was started for, not one started after a full batch left.
    taken: u64,
}

/// A batch on its way.
struct Batch {
    to: MemberInfo,
    requests: Vec<Batched>,
    waiters: Vec<Waiter>,
    deadline: Instant,
}

impl Pending {
    fn take(&mut self, to: &MemberInfo) -> Batch {
        self.taken += 1;
        self.bytes = 0;
        Batch {
            to: to.clone(),
            requests: std::mem::take(&mut self.requests),
            waiters: std::mem::take(&mut self.waiters),
            deadline: self.deadline.take().expect("a batch holds a request"),
        }
    }
}

/// What adding a spare to its peer's batch calls for.
enum Next {
    /// The first of a new batch: start the task that sends it when it
    /// leaves (batch number).
    Timer(u64),
    /// The batch is full: send it now.
    Send(Batch),
    Wait,
}

impl Spares {
    /// Adds `request` to the batch for `to` that `leaves`, unless `to`
    /// refused one lately.
    fn add(
        &self,
        to: &MemberInfo,
        leaves: Leaves,
        request: Batched,
        waiter: Waiter,
        deadline: Instant,
    ) -> Result<Next, Batched> {
        let mut state = self.state.lock().expect("spares lock");
        if let Some(&until) = state.alone_until.get(&to.id) {
            if Instant::now() < until {
                return Err(request);
            }
            state.alone_until.remove(&to.id);
        }
        let p = state.pending.entry((to.id, leaves)).or_default();
        p.bytes += request.size();
        p.requests.push(request);
        p.waiters.push(waiter);
        p.deadline = Some(p.deadline.map_or(deadline, |d| d.max(deadline)));
        Ok(
            if p.requests.len() >= BATCH_REQUESTS || p.bytes >= BATCH_ANSWER_BYTES {
                Next::Send(p.take(to))
            } else if p.requests.len() == 1 {
                Next::Timer(p.taken)
            } else {
                Next::Wait
            },
        )
    }

    /// `to` refused a batch: send it none for [`ALONE_FOR`].
    fn refused_by(&self, to: &MemberInfo) {
        let mut state = self.state.lock().expect("spares lock");
        state.alone_until.insert(to.id, Instant::now() + ALONE_FOR);
    }

    /// The batch `number` for `to` that `leaves`, unless it left already.
    fn take(&self, to: &MemberInfo, leaves: Leaves, number: u64) -> Option<Batch> {
        let mut state = self.state.lock().expect("spares lock");
        let p = state.pending.get_mut(&(to.id, leaves))?;
        (p.taken == number && !p.requests.is_empty()).then(|| p.take(to))
    }
}

impl<T: Transport, S: Store> Coordinator<T, S> {
    /// Sends `request` to the remote peer `to` with the other requests
    /// bound there that join its batch before it `leaves`, and waits for
    /// its own answer until `deadline`; sends it on its own if it may not
    /// travel in a batch or `to` refused one lately. `None`: its batch
    /// handed it back; build it again and send it on its own.
    pub(super) async fn batched_call(
        self: &Arc<Self>,
        to: &MemberInfo,
        leaves: Leaves,
        request: PeerRequest,
        deadline: Instant,
    ) -> Option<Result<PeerResponse, TransportError>> {
        let request = match request.batched() {
            Ok(request) => request,
            Err(request) => return Some(self.send_alone(to, request, deadline).await),
        };
        let (tx, rx) = oneshot::channel();
        let next = match self.spares.add(to, leaves, request, tx, deadline) {
            Ok(next) => next,
            Err(request) => return Some(self.send_alone(to, request.alone(), deadline).await),
        };
        match next {
            Next::Send(batch) => {
                let node = self.clone();
                self.tasks
                    .spawn(async move { node.send_batch(batch).await });
            }
            Next::Timer(number) => {
                let (node, to) = (self.clone(), to.clone());
                self.tasks.spawn(async move {
                    match leaves {
                        // Runs again once the tasks ready now have run
                        // (tokio defers a yielded task until it has
                        // polled for I/O): they add their requests.
                        Leaves::ThisTurn => tokio::task::yield_now().await,
                        Leaves::AfterWindow => tokio::time::sleep(WINDOW).await,
                    }
                    if let Some(batch) = node.spares.take(&to, leaves, number) {
                        node.send_batch(batch).await;
                    }
                });
            }
            Next::Wait => {}
        }
        let failed = |why: &str| Err(TransportError::Failed(to.name.clone(), why.into()));
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Spared::Answer(answer))) => Some(answer),
            Ok(Ok(Spared::Alone)) => None,
            Ok(Err(_)) => Some(failed("its batch was dropped (the node is stopping)")),
            Err(_) => Some(failed("no answer before the deadline")),
        }
    }

    /// One call to the remote `to`, its future (KiBs) boxed: the futures
    /// awaiting it stay small (`replica_call`'s, `batched_call`'s, and a
    /// batch's task, held from its spawn through its window).
    pub(super) async fn send_alone(
        &self,
        to: &MemberInfo,
        request: PeerRequest,
        deadline: Instant,
    ) -> Result<PeerResponse, TransportError> {
        Box::pin(self.transport.call(to, request, deadline)).await
    }

    async fn send_batch(&self, batch: Batch) {
        let Batch {
            to,
            requests,
            waiters,
            deadline,
        } = batch;
        let sent = requests.len();
        let request = PeerRequest::Spares(requests);
        let answers = match self.send_alone(&to, request, deadline).await {
            // The first request is never handed back (its object moves
            // whatever its size).
            Ok(PeerResponse::Spares(answers))
                if answers.len() == sent && answers.first() != Some(&BatchedAnswer::Alone) =>
            {
                answers
            }
            // The peer cannot be reached: each request failed there, and
            // is sent to a fallback.
            Err(e) => {
                for waiter in waiters {
                    let _ = waiter.send(Spared::Answer(Err(e.clone())));
                }
                return;
            }
            // Refused whole (a node that does not know batches) or not
            // answered request by request: each goes again on its own.
            Ok(other) => {
                crate::log::warn_limited("batch refused", || {
                    let answer = match other {
                        PeerResponse::Error(e) => e.to_string(),
                        PeerResponse::Spares(answers) => format!("{} answers", answers.len()),
                        _ => "another kind of answer".into(),
                    };
                    format!(
                        "{} answered a batch of {sent} requests with {answer}; sending requests to it \
                         one by one for {ALONE_FOR:?}",
                        to.name
                    )
                });
                self.spares.refused_by(&to);
                for waiter in waiters {
                    let _ = waiter.send(Spared::Alone);
                }
                return;
            }
        };
        for (waiter, answer) in waiters.into_iter().zip(answers) {
            let _ = waiter.send(match answer.alone() {
                Some(response) => Spared::Answer(Ok(response)),
                None => Spared::Alone,
            });
        }
    }
}
