//! Sloppy fan-out: reaching each primary of a key or a live fallback in its
//! place, and tallying who answered against a quorum.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use shoal_client::error::{ErrorKind, WireError};
use shoal_client::proto::{MemberInfo, Response};
use shoal_ring::NodeId;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error};

use super::quorum::Coordinator;
use super::spare::{Leaves, THIS_TURN_BYTES};
use super::speculative::{Answered, Ask};
use crate::liveness::Liveness;
use crate::membership::View;
use crate::net::{PeerError, PeerRequest, PeerResponse, Transport, TransportError};
use crate::storage::Store;
use crate::version::Object;

/// One replica's answer to a fan-out.
pub(super) type Answer = (MemberInfo, Result<PeerResponse, TransportError>);

impl<T: Transport, S: Store> Coordinator<T, S> {
    /// A replica request, answered locally when `to` is this node.
    pub(super) async fn replica_call(
        &self,
        to: &MemberInfo,
        request: PeerRequest,
        deadline: Instant,
    ) -> Result<PeerResponse, TransportError> {
        if to.id == self.me.id {
            Ok(self.replica.answer(self.me.id, request).settled().await)
        } else {
            self.transport.call(to, request, deadline).await
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
    /// window; or, with `answered` (`cluster.spare-reads = "when-slow"`),
    /// only if it is not set within the spare delay (see `speculative`).
    /// Also returns the primaries asked directly (this node, and those the
    /// detector saw up), for [`Tally::prefer_primaries`].
    pub(super) fn sloppy_fan_out(
        self: &Arc<Self>,
        view: &View,
        key: &[u8],
        primaries: &[MemberInfo],
        op: ReplicaOp,
        deadline: Instant,
        eager: usize,
        answered: Option<Arc<Answered>>,
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
            let ask = match (remote && eager_left == 0, &answered) {
                (false, _) => Ask::Quorum,
                (true, None) => Ask::Spare,
                (true, Some(answered)) => Ask::WhenSlow(answered.clone()),
            };
            if remote && matches!(ask, Ask::Quorum) {
                eager_left -= 1;
            }
            let (node, tx, op, pool) = (self.clone(), tx.clone(), op.clone(), pool.clone());
            let key = key.clone();
            let work = async move {
                let reply = node
                    .reach(primary, first, &key, &op, &pool, deadline, ask)
                    .await;
                let _ = tx.send(reply);
            };
            self.tasks.spawn_unless_done(local, work);
        }
        (rx, direct)
    }

    /// One primary's part of [`Self::sloppy_fan_out`]: a remote primary
    /// itself is sent the request in a batch (a spare in one that waits
    /// a window, or not at all if the quorum answers within the spare
    /// delay), fallbacks one by one as usual.
    #[allow(clippy::too_many_arguments)]
    async fn reach(
        self: &Arc<Self>,
        primary: MemberInfo,
        first: Option<MemberInfo>,
        key: &[u8],
        op: &ReplicaOp,
        pool: &Mutex<Fallbacks>,
        deadline: Instant,
        ask: Ask,
    ) -> Reply {
        if let Ask::WhenSlow(answered) = &ask {
            let delay = (self.answer_times).spare_delay(self.settings.request_timeout / 4);
            if answered.first_within(delay).await {
                (self.metrics.spare_reads_skipped).fetch_add(1, Ordering::Relaxed);
                return Reply {
                    result: Err(TransportError::Failed(
                        primary.name.clone(),
                        "not asked: the quorum had answered".into(),
                    )),
                    from: primary,
                    for_primary: None,
                    corrupt: false,
                };
            }
        }
        let mut failures = Vec::new();
        let mut next = first;
        while let Some(target) = next {
            let as_primary = target.id == primary.id;
            let hint_for = (!as_primary).then_some(primary.id);
            // A remote primary's request travels in a batch (see `spare`);
            // one its batch hands back goes on its own (built again: rare,
            // and only then is its object copied twice).
            let leaves = match (as_primary && target.id != self.me.id, &ask) {
                (false, _) => None,
                (true, Ask::Spare) => Some(Leaves::AfterWindow),
                (true, Ask::Quorum | Ask::WhenSlow(_)) => {
                    self.joins_this_turn(key, op).then_some(Leaves::ThisTurn)
                }
            };
            let sent = Instant::now();
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
                    if as_primary && matches!(ask, Ask::Quorum) && target.id != self.me.id {
                        (self.answer_times).record(target.id, sent.elapsed());
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
                    return Reply {
                        result: Err(TransportError::Failed(target.name.clone(), e.to_string())),
                        for_primary: (!as_primary).then_some(primary),
                        from: target,
                        corrupt: as_primary,
                    }
                }
                Ok(other) => failures.push(format!("{}: {other:?}", target.name)),
                Err(e) => failures.push(e.to_string()),
            }
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
        Reply {
            result: Err(TransportError::Failed(primary.name.clone(), detail)),
            from: primary,
            for_primary: None,
            corrupt: false,
        }
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

/// The outcome of reaching one primary: who answered (the primary, or a
/// fallback `for_primary`), or why nobody did.
pub(super) struct Reply {
    pub(super) from: MemberInfo,
    pub(super) for_primary: Option<MemberInfo>,
    pub(super) result: Result<PeerResponse, TransportError>,
    /// `from`, a primary, holds a copy lost to corruption: the answer
    /// failed, but the replica is read-repaired.
    pub(super) corrupt: bool,
}

/// Who answered a fan-out, and who did not and why.
#[derive(Default)]
pub(super) struct Tally {
    /// Good answers: who answered, and the primary it stood in for if it
    /// is a fallback (named only in an error).
    ok: Vec<(NodeId, Option<NodeId>)>,
    /// How many of `ok` are primaries.
    pub(super) primaries: u32,
    failed: Vec<String>,
    /// Replies read from the channel.
    pub(super) heard: usize,
    /// For writes: the preference list of each layout in the history (one
    /// unless a change is in transition), each with its own count: the
    /// quorum must be met in every one.
    groups: Vec<Group>,
    /// For reads: primaries asked directly that have not replied yet (see
    /// [`Self::prefer_primaries`]).
    waiting_for: Vec<NodeId>,
    /// Fallbacks' good answers not counted yet: (from, for the primary).
    held: Vec<(MemberInfo, MemberInfo)>,
    /// When `held` answers count even though some of `waiting_for` has not
    /// replied.
    patience: Option<Instant>,
}

/// One layout's preference list and how many of it (primaries, or
/// fallbacks for them) answered.
struct Group {
    members: Vec<NodeId>,
    ok: u32,
    primaries: u32,
}

impl Tally {
    /// A tally against one preference list per layout (`lists`): each
    /// must meet the quorum on its own, and only its members (or fallbacks
    /// standing in for them) count; a coordinator in none of them (a node
    /// whose view is behind, handed a forward) counts for nothing.
    pub(super) fn over(lists: &[Vec<MemberInfo>]) -> Self {
        let mut tally = Tally::default();
        {
            tally.groups = lists
                .iter()
                .map(|l| Group {
                    members: l.iter().map(|m| m.id).collect(),
                    ok: 0,
                    primaries: 0,
                })
                .collect();
        }
        tally
    }

    /// A fallback's answer counts only once every one of `direct` (the
    /// primaries asked directly: up, or this node) has replied. A fallback
    /// knows only the hints it holds: its "absent" must not make a read's
    /// quorum while a primary that is up, and may hold the key, has yet to
    /// answer (one that answers with an error, its store failing, is
    /// replaced by a fallback too). Its answer is still merged into the
    /// reply. Without this a read at a primary that missed a write (down
    /// when it was made), with the next primary down, was answered by that
    /// one's fallback and missed the write the third primary held.
    ///
    /// Until `patience`: a primary the detector sees up whose answer does
    /// not come (its store hangs while it still answers pings) then no
    /// longer holds the read back to its deadline; the read is as sloppy as
    /// before, from then on.
    pub(super) fn prefer_primaries(&mut self, direct: Vec<NodeId>, patience: Instant) {
        self.waiting_for = direct;
        self.patience = Some(patience);
    }

    /// Counts a good answer from `from`, standing in for `for_primary` if set.
    pub(super) fn count(&mut self, from: &MemberInfo, for_primary: Option<&MemberInfo>) {
        self.ok.push((from.id, for_primary.map(|p| p.id)));
        self.primaries += u32::from(for_primary.is_none());
        let replica = for_primary.unwrap_or(from).id;
        for g in self
            .groups
            .iter_mut()
            .filter(|g| g.members.contains(&replica))
        {
            g.ok += 1;
            if for_primary.is_none() {
                g.primaries += 1;
            }
        }
    }

    /// A replica that failed outside of the fan-out (the local copy).
    pub(super) fn fail(&mut self, why: String) {
        self.failed.push(why);
    }

    /// Whether the quorum is met (in every layout's list, in transition).
    fn met(&self, need: u32, need_primaries: u32) -> bool {
        if self.groups.is_empty() {
            return self.ok.len() as u32 >= need && self.primaries >= need_primaries;
        }
        self.groups
            .iter()
            .all(|g| g.ok >= need && g.primaries >= need_primaries)
    }

    /// Reads replies until `need` replicas (`need_primaries` of them
    /// primaries) answered well, all `targets` replied, or the deadline
    /// passed. `seen` sees every good reply, and every corrupt one.
    pub(super) async fn collect(
        &mut self,
        answers: &mut mpsc::UnboundedReceiver<Reply>,
        targets: usize,
        need: u32,
        need_primaries: u32,
        deadline: Instant,
        mut seen: impl FnMut(Reply),
    ) {
        while !self.met(need, need_primaries) && self.heard < targets {
            let until = match self.patience {
                Some(p) if !self.held.is_empty() && !self.waiting_for.is_empty() => p.min(deadline),
                _ => deadline,
            };
            match tokio::time::timeout_at(until, answers.recv()).await {
                Ok(Some(reply)) => {
                    self.heard += 1;
                    let primary = reply.for_primary.as_ref().unwrap_or(&reply.from).id;
                    self.waiting_for.retain(|p| *p != primary);
                    match &reply.result {
                        Ok(_) => {
                            match &reply.for_primary {
                                Some(p) if !self.waiting_for.is_empty() => {
                                    self.held.push((reply.from.clone(), p.clone()))
                                }
                                for_primary => self.count(&reply.from, for_primary.as_ref()),
                            }
                            seen(reply);
                        }
                        Err(e) => {
                            self.failed.push(e.to_string());
                            if reply.corrupt {
                                seen(reply);
                            }
                        }
                    }
                }
                Ok(None) => break,
                // Patience ran out: the primaries still silent no longer
                // hold the fallbacks' answers back.
                Err(_) if until < deadline => self.waiting_for.clear(),
                Err(_) => {
                    self.failed
                        .push("deadline passed before the others answered".into());
                    break;
                }
            }
            if self.waiting_for.is_empty() {
                for (from, for_primary) in std::mem::take(&mut self.held) {
                    self.count(&from, Some(&for_primary));
                }
            }
        }
        if !self.held.is_empty() {
            let held: Vec<String> = (self.held.iter())
                .map(|(from, p)| format!("{} for {}", from.name, p.name))
                .collect();
            self.failed.push(format!(
                "not counted: {} (fallbacks wait for the primaries that are up, {} of which had not answered)",
                held.join(", "),
                self.waiting_for.len()
            ));
        }
    }

    /// The reply if the quorum was met, else the quorum error, which
    /// names (by `view`) who answered and why the others did not.
    pub(super) fn result(
        self,
        need: u32,
        need_primaries: u32,
        what: &str,
        reply: Response,
        view: &View,
    ) -> Result<Response, WireError> {
        if self.met(need, need_primaries) {
            return Ok(reply);
        }
        let ok: Vec<String> = (self.ok.iter())
            .map(|(from, for_primary)| match for_primary {
                None => view.name_of(from),
                Some(p) => format!("{} for {}", view.name_of(from), view.name_of(p)),
            })
            .collect();
        let layouts = if self.groups.len() < 2 {
            String::new()
        } else {
            let counts: Vec<String> = self.groups.iter().map(|g| g.ok.to_string()).collect();
            format!(
                " in each layout of a membership change in transition ({} answered per layout)",
                counts.join(" and ")
            )
        };
        let primaries = if need_primaries > 0 {
            format!(
                " ({need_primaries} of them primaries; {} primaries answered)",
                self.primaries
            )
        } else {
            String::new()
        };
        // A write is not rolled back: say where it is.
        let applied = if what == "write" {
            format!(
                "; the write was stored on {} and may still reach the others (it was not \
                 rolled back: a read may return it)",
                ok.join(", ")
            )
        } else {
            String::new()
        };
        Err(WireError {
            kind: ErrorKind::Quorum,
            message: format!(
                "{what} needed {need} replicas{primaries}{layouts}, {} answered ({}); failures: {}{applied}",
                ok.len(),
                ok.join(", "),
                self.failed.join("; ")
            ),
            answered: ok,
            needed: need,
        })
    }
}
