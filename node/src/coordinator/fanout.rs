//! Sloppy fan-out: reaching each primary of a key or a live fallback in its
//! place (who answered is tallied in `tally`).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use shoal_client::proto::MemberInfo;
use shoal_ring::NodeId;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error};

use super::quorum::Coordinator;
use super::spare::{Leaves, THIS_TURN_BYTES};
use super::speculative::SpareGate;
use super::tally::Reply;
use crate::liveness::Liveness;
use crate::membership::View;
use crate::net::{PeerError, PeerRequest, PeerResponse, Transport, TransportError};
use crate::storage::Store;
use crate::version::Object;

/// One replica's answer to a fan-out.
pub(super) type Answer = (MemberInfo, Result<PeerResponse, TransportError>);

impl<T: Transport, S: Store> Coordinator<T, S> {
    /// A replica request, answered locally when `to` is this node.
    ///
    /// The remote call goes through `send_alone`, boxed, so that the
    /// futures awaiting this one (a fan-out's send, spawned three times
    /// per request) do not carry its KiBs when they answer locally or
    /// send in a batch (`spare`); one allocation is small beside a round
    /// trip.
    pub(super) async fn replica_call(
        &self,
        to: &MemberInfo,
        request: PeerRequest,
        deadline: Instant,
    ) -> Result<PeerResponse, TransportError> {
        if to.id == self.me.id {
            Ok(self.replica.answer(self.me.id, request).settled().await)
        } else {
            self.send_alone(to, request, deadline).await
        }
    }

    /// Reaches each primary of a key, or a fallback in its place, and sends
    /// `op` there; one [`Reply`] per primary arrives on the returned channel.
    /// Primaries the detector sees down get the first live fallbacks in ring
    /// order at once; a primary whose send fails takes the next one. A write
    /// that nobody took for a primary becomes a hint kept here. Sends stop
    /// at `deadline`, and so do the tasks that make them.
    /// Requests to remote primaries travel in batches per peer (see
    /// `spare`): the first `eager` ones asked directly (in `primaries`'
    /// order; a fallback standing in for a primary takes no slot) in a
    /// batch that leaves this turn; the quorum need not wait for the
    /// others, which travel as spares, in a batch that leaves after a
    /// window; or, with a `gate` (`cluster.spare-reads = "when-slow"`),
    /// only when the quorum is slow or a fallback answers for a primary
    /// (see `speculative`).
    /// Also returns the primaries asked directly (this node, and those the
    /// detector saw up), for `Tally::prefer_primaries`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn sloppy_fan_out(
        self: &Arc<Self>,
        view: &View,
        key: &[u8],
        primaries: &[MemberInfo],
        op: ReplicaOp,
        deadline: Instant,
        eager: usize,
        gate: Option<Arc<SpareGate>>,
    ) -> (mpsc::UnboundedReceiver<Reply>, Vec<NodeId>) {
        // Shared by every primary's send (an object or key copied per send
        // was a good part of a coordinator's allocations).
        let key: Arc<[u8]> = Arc::from(key);
        let op = Arc::new(op);
        let mut pool = Fallbacks {
            view: view.clone(),
            key: key.clone(),
            n: self.settings.n as usize,
            left: None,
        };
        let mut first_tries = Vec::with_capacity(primaries.len());
        for p in primaries {
            let first = if self.liveness.is_up(p.id) {
                Some(p.clone())
            } else {
                pool.next_live(self.liveness.as_ref())
            };
            first_tries.push((p.clone(), first));
        }
        let direct = (first_tries.iter())
            .filter(|(p, first)| first.as_ref().is_some_and(|f| f.id == p.id))
            .map(|(p, _)| p.id)
            .collect();
        let pool = Arc::new(Mutex::new(pool));
        let (tx, rx) = mpsc::unbounded_channel();
        // Remote sends first (stable: in `primaries`' order): this node's
        // own answer is read in place.
        first_tries.sort_by_key(|(_, first)| first.as_ref().is_some_and(|f| f.id == self.me.id));
        // The quorum's slots go to primaries asked directly: a fallback is
        // asked at once anyway (it is never batched), and in a slot it
        // would push a primary that is up (and may hold what the fallback
        // lacks) to a spare's window.
        let mut eager_left = eager;
        for (primary, first) in first_tries {
            let local = first.as_ref().is_some_and(|f| f.id == self.me.id);
            let remote = !local && first.as_ref().is_some_and(|f| f.id == primary.id);
            let spare = remote && eager_left == 0;
            if remote && !spare {
                eager_left -= 1;
            }
            let (node, tx, op, pool) = (self.clone(), tx.clone(), op.clone(), pool.clone());
            let (key, gate) = (key.clone(), gate.clone());
            let work = async move {
                let reply = node
                    .reach(primary, first, &key, &op, &pool, deadline, spare, gate)
                    .await;
                let _ = tx.send(reply);
            };
            self.tasks.spawn_unless_done(local, work);
        }
        (rx, direct)
    }

    /// One primary's part of [`Self::sloppy_fan_out`]: a remote primary
    /// itself is sent the request in a batch (a `spare` in one that waits
    /// a window; with a `gate`, held by it and then sent at once, if at
    /// all), fallbacks one by one as usual. A failed send for a quorum's
    /// primary, or a fallback's answer for a primary that is down,
    /// releases the gate's spares.
    #[allow(clippy::too_many_arguments)]
    async fn reach(
        self: &Arc<Self>,
        primary: MemberInfo,
        first: Option<MemberInfo>,
        key: &[u8],
        op: &ReplicaOp,
        pool: &Mutex<Fallbacks>,
        deadline: Instant,
        spare: bool,
        gate: Option<Arc<SpareGate>>,
    ) -> Reply {
        if let Some(gate) = gate.as_ref().filter(|_| spare) {
            if gate
                .holds_back(self.spares.answer_times.spare_delay())
                .await
            {
                (self.metrics.spare_reads_skipped).fetch_add(1, Ordering::Relaxed);
                return Reply::failed(primary, "not asked: the read was answered first".into());
            }
        }
        // For a quorum's primary (not a spare) of a gated read: a failed
        // send, or a fallback's answer, lets the read's spares go.
        let let_spares_go = || {
            if let Some(gate) = gate.as_ref().filter(|_| !spare) {
                gate.hurry();
            }
        };
        let mut failures = Vec::new();
        let mut next = first;
        while let Some(target) = next {
            let as_primary = target.id == primary.id;
            let hint_for = (!as_primary).then_some(primary.id);
            // A remote primary's request travels in a batch (see `spare`);
            // one its batch hands back goes on its own (built again: rare,
            // and only then is its object copied twice).
            let remote = as_primary && target.id != self.me.id;
            let leaves = match (remote, spare && gate.is_none()) {
                (false, _) => None,
                (true, true) => Some(Leaves::AfterWindow),
                (true, false) => self.joins_this_turn(key, op).then_some(Leaves::ThisTurn),
            };
            // Answer times are kept for the spare delay of gated reads.
            let sent = (remote && !spare && gate.is_some()).then(Instant::now);
            let batched = match leaves {
                Some(leaves) => {
                    self.batched_call(&target, leaves, op.request(key, None), deadline)
                        .await
                }
                None => None,
            };
            let answer = match batched {
                Some(answer) => answer,
                None => {
                    self.replica_call(&target, op.request(key, hint_for), deadline)
                        .await
                }
            };
            match answer {
                Ok(resp) if op.accepts(&resp) => {
                    if let Some(sent) = sent {
                        (self.spares.answer_times).record(target.id, sent.elapsed());
                    }
                    // A primary is down or failed, and a fallback answered
                    // for it: the tally holds that answer back while the
                    // primaries asked have yet to answer
                    // (`Tally::prefer_primaries`), and spares are primaries.
                    if !as_primary {
                        let_spares_go();
                    }
                    return Reply {
                        from: target,
                        for_primary: (!as_primary).then_some(primary),
                        result: Ok(resp),
                        corrupt: false,
                    };
                }
                // The primary's copy was lost to corruption: its answer
                // does not count, and read repair gives it what was heard.
                // A fallback's hint for it was lost: nothing counts for
                // that primary, and no other fallback is asked in its
                // place (one that never held its hints would say "absent").
                Ok(PeerResponse::Error(e @ PeerError::Corrupt { .. })) => {
                    let_spares_go();
                    return Reply {
                        result: Err(TransportError::Failed(target.name.clone(), e.to_string())),
                        for_primary: (!as_primary).then_some(primary),
                        from: target,
                        corrupt: as_primary,
                    };
                }
                Ok(other) => failures.push(format!("{}: {other:?}", target.name)),
                Err(e) => failures.push(e.to_string()),
            }
            let_spares_go();
            // Past the deadline no fallback is tried (each would fail at
            // once, or take a hint the client never waits for): a write
            // becomes a hint kept here.
            if Instant::now() >= deadline {
                failures.push("deadline passed".into());
                break;
            }
            next = pool
                .lock()
                .expect("pool lock")
                .next_live(self.liveness.as_ref());
        }
        if let ReplicaOp::Put(object) = op {
            if primary.id != self.me.id {
                match self.replica.store_hint(primary.id, key, object) {
                    Ok(()) => {
                        debug!(primary = %primary.name, "no fallback took the write; hint kept here")
                    }
                    Err(e) => error!(error = %e, "could not keep a hint"),
                }
            }
        }
        let detail = if failures.is_empty() {
            "down, and no live fallback".to_string()
        } else {
            failures.join("; ")
        };
        Reply::failed(primary, detail)
    }

    /// Whether a quorum's own request of `op` on `key` is small enough to
    /// join a batch that leaves this turn (see [`THIS_TURN_BYTES`]).
    fn joins_this_turn(&self, key: &[u8], op: &ReplicaOp) -> bool {
        match op {
            ReplicaOp::Put(object) => object.approx_size() <= THIS_TURN_BYTES,
            ReplicaOp::Get => self
                .replica
                .cached_len(key)
                .is_some_and(|len| len <= THIS_TURN_BYTES),
        }
    }

    /// Sends `request` to each target concurrently; answers arrive on the
    /// returned channel. Sends outlive the caller: a coordinator that has its
    /// quorum replies while slower replicas still receive the write, until
    /// `deadline`.
    pub(super) fn fan_out(
        self: &Arc<Self>,
        targets: &[MemberInfo],
        request: PeerRequest,
        deadline: Instant,
    ) -> mpsc::UnboundedReceiver<Answer> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut targets = targets.to_vec();
        targets.sort_by_key(|t| t.id == self.me.id);
        for target in targets {
            let local = target.id == self.me.id;
            let (node, tx, request) = (self.clone(), tx.clone(), request.clone());
            let work = async move {
                let answer = node.replica_call(&target, request, deadline).await;
                let _ = tx.send((target, answer));
            };
            self.tasks.spawn_unless_done(local, work);
        }
        rx
    }
}

/// A key's fallbacks not taken yet, in ring order; worked out only when a
/// primary is down or fails (walking the ring is not free).
struct Fallbacks {
    view: View,
    key: Arc<[u8]>,
    n: usize,
    left: Option<VecDeque<MemberInfo>>,
}

impl Fallbacks {
    /// The next fallback the detector sees up.
    fn next_live(&mut self, live: &dyn Liveness) -> Option<MemberInfo> {
        let view = &self.view;
        let left = self.left.get_or_insert_with(|| {
            // In transition, a replica of the key in an older layout is no
            // fallback: it would be counted twice.
            let replicas = view.replicas(&self.key, self.n);
            view.ring
                .fallbacks(&self.key, self.n)
                .iter()
                .filter(|id| !replicas.iter().any(|r| r.id == **id))
                .filter_map(|id| view.members.get(id).cloned())
                .collect()
        });
        while let Some(m) = left.pop_front() {
            if live.is_up(m.id) {
                return Some(m);
            }
        }
        None
    }
}

/// What a sloppy fan-out asks of each replica.
#[derive(Clone)]
pub(super) enum ReplicaOp {
    Get,
    Put(Object),
}

/// A copy of `object` for one replica's request; of megabytes, made off
/// the worker.
pub(super) fn copy(object: &Object) -> Object {
    crate::tasks::heavy_for(object.approx_size(), || object.clone())
}

impl ReplicaOp {
    /// The request for a primary (`hint_for` None) or for a fallback standing
    /// in for the primary `hint_for`.
    fn request(&self, key: &[u8], hint_for: Option<NodeId>) -> PeerRequest {
        let key = key.to_vec();
        match (self, hint_for) {
            (ReplicaOp::Get, None) => PeerRequest::ReplicaGet { key },
            (ReplicaOp::Get, Some(for_primary)) => PeerRequest::HintGet { key, for_primary },
            (ReplicaOp::Put(object), None) => PeerRequest::ReplicaPut {
                key,
                object: copy(object),
            },
            (ReplicaOp::Put(object), Some(for_primary)) => PeerRequest::HintPut {
                key,
                for_primary,
                object: copy(object),
            },
        }
    }

    fn accepts(&self, response: &PeerResponse) -> bool {
        matches!(
            (self, response),
            (ReplicaOp::Get, PeerResponse::Object(_)) | (ReplicaOp::Put(_), PeerResponse::Stored)
        )
    }
}
