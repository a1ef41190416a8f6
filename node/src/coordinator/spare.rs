//! Spare sends: the replica requests of a read or a write that its quorum
//! need not wait for (with N=3 and R=W=2, the third replica's) travel to
//! each peer in batches instead of a message each.
//!
//! Every replica of a key is still asked: a read is still read-repaired
//! from all of them, and a write still reaches all of them at once, not
//! later through anti-entropy. The quorum's own sends (the local replica
//! and the R-1 or W-1 next ones in ring order after this node) go as
//! before; each spare waits up to [`WINDOW`] for other spares bound to the
//! same peer, and they travel as one [`PeerRequest::Batch`], answered with
//! one message. A spare's answer counts like any other: when a quorum
//! send is slow or fails, the spare completes the quorum a window later.
//!
//! Why: a small remote request costs far more in framing, QUIC packets,
//! syscalls and task wake-ups on both nodes than the replica's read or
//! merge it carries. On the 2-core bench machine, answering the third
//! replica in batches took about a third of the servers' CPU per read
//! away (bench/README.md). Cassandra gets the same saving by asking only
//! R replicas, at the price of read repair of the others; this keeps it.
//!
//! A peer that does not know `Batch` (an older node during a rolling
//! upgrade) answers with an error: each spare then fails there, as a send
//! to a down primary does, and a fallback is asked in its place.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_client::proto::MemberInfo;
use shoal_ring::NodeId;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::quorum::Coordinator;
use crate::net::{PeerRequest, PeerResponse, Transport, TransportError};
use crate::storage::Store;

/// How long a spare waits for others to the same peer. Its answer is
/// needed only when a quorum send failed or is slow, where this is small
/// beside the timeouts; under load it gathers tens of requests.
pub(super) const WINDOW: Duration = Duration::from_millis(1);

/// A batch is sent at once when it holds this many requests ...
const MAX_REQUESTS: usize = 128;

/// ... or about this many bytes (far under a pipelined frame's size).
const MAX_BYTES: usize = 256 << 10;

type Waiter = oneshot::Sender<Result<PeerResponse, TransportError>>;

/// The spares waiting for their batch, per peer.
#[derive(Default)]
pub struct Spares {
    pending: Mutex<HashMap<NodeId, Pending>>,
}

/// One peer's batch in the making.
#[derive(Default)]
struct Pending {
    requests: Vec<PeerRequest>,
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
    requests: Vec<PeerRequest>,
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
    /// The first of a new batch: start its window's timer (for batch number).
    Timer(u64),
    /// The batch is full: send it now.
    Send(Batch),
    Wait,
}

impl Spares {
    fn add(
        &self,
        to: &MemberInfo,
        request: PeerRequest,
        waiter: Waiter,
        deadline: Instant,
    ) -> Next {
        let mut pending = self.pending.lock().expect("spares lock");
        let p = pending.entry(to.id).or_default();
        p.bytes += request.batched_size();
        p.requests.push(request);
        p.waiters.push(waiter);
        p.deadline = Some(p.deadline.map_or(deadline, |d| d.max(deadline)));
        if p.requests.len() >= MAX_REQUESTS || p.bytes >= MAX_BYTES {
            Next::Send(p.take(to))
        } else if p.requests.len() == 1 {
            Next::Timer(p.taken)
        } else {
            Next::Wait
        }
    }

    /// The batch `number` for `to`, unless it left already.
    fn take(&self, to: &MemberInfo, number: u64) -> Option<Batch> {
        let mut pending = self.pending.lock().expect("spares lock");
        let p = pending.get_mut(&to.id)?;
        (p.taken == number && !p.requests.is_empty()).then(|| p.take(to))
    }
}

impl<T: Transport, S: Store> Coordinator<T, S> {
    /// Sends `request` (a batchable one) to `to` with the other spares
    /// bound there within [`WINDOW`], and waits for its own answer until
    /// `deadline`.
    pub(super) async fn spare_call(
        self: &Arc<Self>,
        to: &MemberInfo,
        request: PeerRequest,
        deadline: Instant,
    ) -> Result<PeerResponse, TransportError> {
        let (tx, rx) = oneshot::channel();
        match self.spares.add(to, request, tx, deadline) {
            Next::Send(batch) => {
                let node = self.clone();
                self.tasks
                    .spawn(async move { node.send_batch(batch).await });
            }
            Next::Timer(number) => {
                let (node, to) = (self.clone(), to.clone());
                self.tasks.spawn(async move {
                    tokio::time::sleep(WINDOW).await;
                    if let Some(batch) = node.spares.take(&to, number) {
                        node.send_batch(batch).await;
                    }
                });
            }
            Next::Wait => {}
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(TransportError::Failed(
                to.name.clone(),
                "its batch was dropped (the node is stopping)".into(),
            )),
            Err(_) => Err(TransportError::Failed(
                to.name.clone(),
                "no answer before the deadline".into(),
            )),
        }
    }

    async fn send_batch(&self, batch: Batch) {
        let Batch {
            to,
            requests,
            waiters,
            deadline,
        } = batch;
        let sent = requests.len();
        let request = PeerRequest::Batch(requests);
        match self.transport.call(&to, request, deadline).await {
            Ok(PeerResponse::Batch(answers)) if answers.len() == sent => {
                for (waiter, answer) in waiters.into_iter().zip(answers) {
                    let _ = waiter.send(Ok(answer));
                }
            }
            // Refused whole (a node that does not know batches): each
            // request was refused.
            Ok(PeerResponse::Error(e)) => {
                for waiter in waiters {
                    let _ = waiter.send(Ok(PeerResponse::Error(e.clone())));
                }
            }
            Ok(_) => {
                let why = format!("answered a batch of {sent} requests with something else");
                for waiter in waiters {
                    let _ = waiter.send(Err(TransportError::Failed(to.name.clone(), why.clone())));
                }
            }
            Err(e) => {
                for waiter in waiters {
                    let _ = waiter.send(Err(e.clone()));
                }
            }
        }
    }
}
