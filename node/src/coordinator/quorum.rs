//! Quorum logic: a client's get, put or delete over the key's sloppy quorum,
//! and forwarding to a primary when this node is not one. Talks to other
//! nodes only through a [`Transport`], to its own copy only through the
//! [`Replica`], and to the failure detector only through [`Liveness`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use shoal_client::error::{ErrorKind, WireError};
use shoal_client::proto::{
    CausalContext, GetReply, MemberInfo, PutReply, Request, RequestOptions, Response, RingInfo,
    Value,
};
use tokio::time::Instant;

use super::fanout::ReplicaOp;
use super::read_repair::Heard;
use super::settings::Settings;
use super::speculative::{Settled, SpareGate};
use super::tally::Tally;
use crate::config::SpareReads;
use crate::liveness::Liveness;
use crate::membership::{Membership, View};
use crate::metrics::Metrics;
use crate::net::{PeerError, PeerRequest, PeerResponse, Transport, TransportError};
use crate::replica::{Replica, ReplicaError};
use crate::storage::{Store, StoreError};
use crate::version::{Opened, VersionError};

/// Requests never wait longer than this, whatever they ask for.
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_millis(crate::config::MAX_REQUEST_MS);

/// How long a read's fallback answers wait for the primaries the detector
/// sees up, at most (half the request's time when that is shorter; see
/// `Tally::prefer_primaries`): past the silence probe's 300 ms, far past
/// a replica's answer under load.
const FALLBACK_PATIENCE: Duration = Duration::from_millis(500);

/// The coordinator and the handles it needs; shared (in an `Arc`) with the
/// fan-out and read-repair tasks it spawns.
pub struct Coordinator<T, S> {
    pub me: MemberInfo,
    pub settings: Settings,
    pub replica: Arc<Replica<S>>,
    pub transport: Arc<T>,
    pub liveness: Arc<dyn Liveness>,
    pub membership: Arc<Membership>,
    pub metrics: Arc<Metrics>,
    /// The node's per-request tasks (fan-out sends, read repair), which a
    /// crash aborts.
    pub tasks: crate::tasks::Tasks,
    /// Ids for the requests this node forwards.
    pub forward_ids: super::ForwardIds,
    /// Requests to remote primaries, gathered per peer (see `spare`).
    pub(super) spares: super::spare::Spares,
}

/// Most entries a client's causal context may have: far more than a
/// clock keeps (pruning is lazy, so a clock may exceed its bound for a
/// while, and entries stay young for the minimum age).
fn max_context_entries(s: &Settings) -> usize {
    (4 * s.clock_max_entries).max(256)
}

fn wire(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error(WireError::new(kind, message))
}

fn store_error(e: StoreError) -> WireError {
    match e {
        StoreError::Corruption { .. } => WireError::new(ErrorKind::Corruption, e.to_string()),
        StoreError::Io { .. } => WireError::new(ErrorKind::Internal, e.to_string()),
    }
}

/// A failed local write as the client sees it: a context that cannot be
/// honoured is the client's error, the rest the node's.
fn write_error(e: ReplicaError) -> WireError {
    match e {
        ReplicaError::Store(e) => store_error(e),
        ReplicaError::Version { source, .. } => {
            let kind = match source {
                VersionError::EpochsExhausted(_) => ErrorKind::Internal,
                // Refused before anything was written: it did not run.
                VersionError::Sealed => ErrorKind::NotReady,
                VersionError::ContextTooLarge { .. }
                | VersionError::ContextMalformed(_)
                | VersionError::ContextNotIssued => ErrorKind::BadRequest,
            };
            WireError::new(kind, source.to_string())
        }
        e @ ReplicaError::ObjectTooLarge { .. } => {
            WireError::new(ErrorKind::TooLarge, e.to_string())
        }
        e @ (ReplicaError::Lost { .. } | ReplicaError::HintLost { .. }) => {
            WireError::new(ErrorKind::Corruption, e.to_string())
        }
    }
}

impl<T: Transport, S: Store> Coordinator<T, S> {
    /// The ring, or the answer to give while it is not ready (a large
    /// `Err`, moved once per request that gets it: not worth a box).
    #[allow(clippy::result_large_err)]
    pub fn view(&self) -> Result<View, Response> {
        self.membership
            .view()
            .ok_or_else(|| wire(ErrorKind::NotReady, self.membership.not_ready_reason()))
    }

    /// Handles a client request; `forwarded` requests are coordinated here even
    /// if this node's ring disagrees that it is a replica (no forwarding loops).
    /// Once the node is stopping, refuses it unrun (see [`crate::tasks::Tasks::drain`]).
    pub async fn coordinate(self: &Arc<Self>, request: Request, forwarded: bool) -> Response {
        let Some(_taken) = self.tasks.take_request() else {
            let why = format!("{} is stopping; ask another node", self.me.name);
            return wire(ErrorKind::NotReady, why);
        };
        match request {
            Request::Get { ref key, options }
            | Request::Delete {
                ref key, options, ..
            }
            | Request::Put {
                ref key, options, ..
            } if !forwarded => {
                let view = match self.view() {
                    Ok(v) => v,
                    Err(r) => return r,
                };
                // While a layout change is in transition a replica of the
                // key in the old or the new layout coordinates.
                let n = self.settings.n as usize;
                if !view.replica_ids(key, n).contains(&self.me.id) {
                    // Boxed, as every rare way here: the future of each
                    // request is as large as its largest way, and moved.
                    let replicas = view.replicas(key, n);
                    return Box::pin(self.forward(&replicas, request.clone(), options)).await;
                }
                self.coordinate_local(request, view, false).await
            }
            Request::Ring => match self.view() {
                Ok(v) => Response::Ring(RingInfo {
                    ring: (*v.ring).clone(),
                    members: v.members.values().cloned().collect(),
                    n: self.settings.n,
                    down: v
                        .members
                        .keys()
                        .filter(|id| **id != self.me.id && !self.liveness.is_up(**id))
                        .copied()
                        .collect(),
                    version: v.version,
                }),
                Err(r) => r,
            },
            Request::Inspect { key } => match self.view() {
                Ok(v) => Box::pin(self.inspect(&key, &v)).await,
                Err(r) => r,
            },
            other => match self.view() {
                Ok(v) => self.coordinate_local(other, v, forwarded).await,
                Err(r) => r,
            },
        }
    }

    /// Serves a data request with this node as coordinator; `forwarded`
    /// (another node handed it here) forbids handing it on again.
    async fn coordinate_local(
        self: &Arc<Self>,
        request: Request,
        view: View,
        forwarded: bool,
    ) -> Response {
        let started = Instant::now();
        // Until this request has its answer, the stage of the layouts it is
        // routed by counts as in use here (see `Membership::pin`).
        let pinned = self.membership.pin();
        let (view, _in_flight) = match pinned {
            Some((latest, guard)) => (latest, Some(guard)),
            None => (view, None),
        };
        let m = &self.metrics;
        let (op, result) = match request {
            Request::Get { key, options } => (&m.get, self.get(&key, options, &view).await),
            Request::Put {
                key,
                value,
                context,
                options,
            } => (
                &m.put,
                self.put(key, Some(value), context, options, &view, forwarded)
                    .await,
            ),
            Request::Delete {
                key,
                context,
                options,
            } => (
                &m.delete,
                self.put(key, None, context, options, &view, forwarded)
                    .await,
            ),
            _ => {
                return Response::Error(WireError::new(ErrorKind::BadRequest, "not a data request"))
            }
        };
        op.requests.fetch_add(1, Ordering::Relaxed);
        op.latency.observe(started.elapsed());
        if let Err(e) = &result {
            op.errors.fetch_add(1, Ordering::Relaxed);
            if e.kind == ErrorKind::Quorum {
                op.quorum_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        result.unwrap_or_else(Response::Error)
    }

    /// Where a key's replicas (`list`, in ring order) start after this
    /// node, which comes last if it is one of them: each node sends its
    /// quorum's requests to the replicas after it, so that each replica
    /// takes its share of them.
    fn after_me(&self, list: &[MemberInfo]) -> usize {
        list.iter()
            .position(|m| m.id == self.me.id)
            .map_or(0, |mine| mine + 1)
    }

    pub(super) fn deadline(&self, options: &RequestOptions) -> Instant {
        let budget = options
            .timeout_ms
            .map_or(self.settings.request_timeout, |ms| {
                Duration::from_millis(u64::from(ms))
            })
            .min(MAX_REQUEST_TIMEOUT);
        Instant::now() + budget
    }

    /// Resolves one quorum option against its default and N.
    fn quorum(
        &self,
        asked: Option<u32>,
        default: u32,
        name: &str,
        min: u32,
    ) -> Result<u32, WireError> {
        let n = self.settings.n;
        let v = asked.unwrap_or(default);
        if v < min || v > n {
            return Err(WireError::new(
                ErrorKind::BadRequest,
                format!("{name}={v} is impossible with N={n}"),
            ));
        }
        Ok(v)
    }

    async fn forward(
        &self,
        primaries: &[MemberInfo],
        request: Request,
        options: RequestOptions,
    ) -> Response {
        let deadline = self.deadline(&options);
        let (mut failures, mut not_ready) = (Vec::new(), 0);
        // Primaries the detector sees up first: a dead one costs a timeout.
        let mut order: Vec<&MemberInfo> = primaries.iter().collect();
        order.sort_by_key(|p| !self.liveness.is_up(p.id));
        for p in order {
            let forward = PeerRequest::Forward {
                id: self.forward_ids.next(),
                request: request.clone(),
            };
            // Only a request that never reached `p` may go to the next
            // primary: one that may have run there would run twice (a
            // duplicate sibling), or be reported failed after it landed.
            match self.transport.call(p, forward, deadline).await {
                // Refused unrun (`p` is stopping, or not ready): the next
                // primary may take it.
                Ok(PeerResponse::Forwarded(Response::Error(e)))
                    if e.kind == ErrorKind::NotReady =>
                {
                    not_ready += 1;
                    failures.push(format!("{}: {}", p.name, e.message))
                }
                Ok(PeerResponse::Forwarded(r)) => return r,
                // A duplicate's answer: the first delivery ran (or runs) there.
                Ok(PeerResponse::Error(e @ PeerError::DuplicateForward { .. })) => {
                    return Response::Error(WireError::new(
                        ErrorKind::Timeout,
                        format!(
                            "{}: {e}; its answer was lost, the request may have been applied there",
                            p.name
                        ),
                    ))
                }
                Ok(other) => failures.push(format!("{}: {other:?}", p.name)),
                Err(e @ TransportError::Unreachable(..)) => failures.push(e.to_string()),
                // Failed after it may have reached `p`, or no answer in time.
                Err(e @ TransportError::Failed(..)) => {
                    return Response::Error(WireError::new(
                        ErrorKind::Timeout,
                        format!("{e}; the request may have been applied there"),
                    ))
                }
            }
        }
        // Every primary refused it unrun: so does this node, and the client
        // may ask another.
        if not_ready == primaries.len() {
            return wire(ErrorKind::NotReady, failures.join("; "));
        }
        Response::Error(WireError {
            kind: ErrorKind::Quorum,
            message: format!(
                "no replica of the key could coordinate it: {}",
                failures.join("; ")
            ),
            answered: Vec::new(),
            needed: 1,
        })
    }

    /// Fails a request whose PR/PW cannot be met by the primaries that are up,
    /// before anything is sent.
    fn check_primaries_up(
        &self,
        primaries: &[MemberInfo],
        needed: u32,
        name: &str,
        what: &str,
    ) -> Result<(), WireError> {
        let (up, down): (Vec<&MemberInfo>, Vec<&MemberInfo>) =
            primaries.iter().partition(|p| self.liveness.is_up(p.id));
        if (up.len() as u32) >= needed {
            return Ok(());
        }
        let names = |v: &[&MemberInfo]| v.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
        Err(WireError {
            kind: ErrorKind::Quorum,
            message: format!(
                "{name}={needed} needs {needed} primary replicas up, but only {} {} ({}); down: {}; {what}",
                up.len(),
                if up.len() == 1 { "is" } else { "are" },
                names(&up).join(", "),
                names(&down).join(", "),
            ),
            answered: names(&up),
            needed,
        })
    }

    async fn put(
        self: &Arc<Self>,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        context: Option<CausalContext>,
        options: RequestOptions,
        view: &View,
        forwarded: bool,
    ) -> Result<Response, WireError> {
        let s = &self.settings;
        if key.len() > shoal_client::client::MAX_KEY_BYTES {
            return Err(WireError::new(
                ErrorKind::TooLarge,
                format!("key of {} bytes exceeds the 65536-byte limit", key.len()),
            ));
        }
        if let Some(v) = &value {
            if v.len() > s.max_value_bytes {
                return Err(WireError::new(
                    ErrorKind::TooLarge,
                    format!(
                        "value of {} bytes exceeds the {}-byte limit; nothing was written",
                        v.len(),
                        s.max_value_bytes
                    ),
                ));
            }
        }
        let w = self.quorum(options.w, s.w, "W", 1)?;
        let pw = self.quorum(options.pw, s.pw, "PW", 0)?;
        if pw > w {
            return Err(WireError::new(
                ErrorKind::BadRequest,
                format!("PW={pw} exceeds W={w}"),
            ));
        }
        let deadline = self.deadline(&options);
        let ctx = match &context {
            Some(c) => (s.context_key)
                .open(&key, &c.0, max_context_entries(s))
                .map_err(|e| WireError::new(ErrorKind::BadRequest, e.to_string()))?,
            None => Opened::default(),
        };
        // One preference list per layout in the history (one, unless a
        // change is in transition): W (PW) of each must hold the write.
        let lists = view.write_lists(&key, s.n as usize);
        for primaries in &lists {
            self.check_primaries_up(primaries, pw, "PW", "nothing was written")?;
        }
        let me = self.me.id;
        let mut others: Vec<MemberInfo> = Vec::new();
        for list in &lists {
            let start = self.after_me(list);
            for m in list[start..].iter().chain(&list[..start]) {
                if m.id != me && !others.iter().any(|o| o.id == m.id) {
                    others.push(m.clone());
                }
            }
        }
        // This node's copy and the next replicas make the quorum; the
        // others' copies travel as spares. In transition every layout's
        // quorum must be met, so every send is made at once.
        let eager = match lists.len() {
            1 => self.quorum_sends(w, &lists[0]),
            _ => usize::MAX,
        };
        // Kept to hand the write on should this node fail to store it.
        let retry = (!forwarded && !others.is_empty()).then(|| (value.clone(), context.clone()));
        // A value of megabytes is decoded, merged and stored off the worker.
        let bytes = value.as_ref().map_or(0, Vec::len);
        let written = crate::tasks::heavy_for(bytes, || self.replica.write(&key, &ctx, value));
        let (object, dot, durable) = match written {
            Ok(written) => written,
            // This node cannot store (a full or failing disk), so it cannot
            // mint a version; nothing was written here, and another primary
            // can coordinate the write instead.
            Err(ReplicaError::Store(e)) if retry.is_some() => {
                crate::log::warn_limited("local write failed", || {
                    format!("cannot store a write ({e}); handing it to another primary")
                });
                let (value, context) = retry.expect("checked");
                let request = match value {
                    Some(value) => Request::Put {
                        key,
                        value,
                        context,
                        options,
                    },
                    None => Request::Delete {
                        key,
                        context,
                        options,
                    },
                };
                return Ok(Box::pin(self.forward(&others, request, options)).await);
            }
            Err(e) => return Err(write_error(e)),
        };
        let reply = Response::Written(PutReply {
            context: CausalContext(
                s.context_key
                    .seal(&key, &object.reply_entries(&ctx.vector, dot)),
            ),
            siblings: object.values().count() as u32,
        });
        let mut answers = self
            .sloppy_fan_out(
                view,
                &key,
                &others,
                ReplicaOp::Put(object),
                deadline,
                eager,
                None,
            )
            .0;
        let mut tally = Tally::over(&lists);
        // The local copy counts once durable (with `fsync`, when a WAL
        // sync shared with other writes covers it), while the others store.
        match tokio::time::timeout_at(deadline, durable.wait()).await {
            Ok(Ok(())) => tally.count(&self.me, None),
            Ok(Err(e)) => tally.fail(format!("{}: {e}", self.me.name)),
            Err(_) => tally.fail(format!(
                "{}: the local write was not synced in time",
                self.me.name
            )),
        }
        tally
            .collect(&mut answers, others.len(), w, pw, deadline, drop)
            .await;
        tally.result(w, pw, "write", reply, view)
    }

    /// How many replicas, after this node in ring order, are sent to at
    /// once to make a quorum of `quorum` among `primaries`: it, less this
    /// node's own copy when this node is one of them (a forwarded request
    /// may be coordinated by a node whose ring does not list it).
    fn quorum_sends(&self, quorum: u32, primaries: &[MemberInfo]) -> usize {
        let local = primaries.iter().any(|p| p.id == self.me.id);
        (quorum as usize).saturating_sub(local as usize)
    }

    async fn get(
        self: &Arc<Self>,
        key: &[u8],
        options: RequestOptions,
        view: &View,
    ) -> Result<Response, WireError> {
        let s = &self.settings;
        let r = self.quorum(options.r, s.r, "R", 1)?;
        let pr = self.quorum(options.pr, s.pr, "PR", 0)?;
        if pr > r {
            return Err(WireError::new(
                ErrorKind::BadRequest,
                format!("PR={pr} exceeds R={r}"),
            ));
        }
        let deadline = self.deadline(&options);
        // The oldest layout's replicas while a change is in transition:
        // they hold every acknowledged write until the new ones synced.
        let mut primaries = view.read_list(key, s.n as usize);
        let start = self.after_me(&primaries);
        primaries.rotate_left(start);
        self.check_primaries_up(&primaries, pr, "PR", "nothing was read")?;
        // This node's copy and the next replicas make the quorum; the
        // others are asked as spares, for read repair (or only when the
        // quorum is slow: `cluster.spare-reads`).
        let eager = self.quorum_sends(r, &primaries);
        let patience =
            (deadline.saturating_duration_since(Instant::now())).min(2 * FALLBACK_PATIENCE) / 2;
        // A spare held to half the patience still has the other half to
        // answer before a fallback's answer is taken for it.
        let gate =
            (s.spare_reads == SpareReads::WhenSlow).then(|| Arc::new(SpareGate::new(patience / 2)));
        let settled = gate.clone().map(Settled);
        let (mut answers, direct) =
            self.sloppy_fan_out(view, key, &primaries, ReplicaOp::Get, deadline, eager, gate);
        let mut heard: Vec<Heard> = Vec::new();
        let mut tally = Tally::default();
        // From after the fan-out, which may have read this node's copy.
        tally.prefer_primaries(direct, Instant::now() + patience);
        tally
            .collect(&mut answers, primaries.len(), r, pr, deadline, |reply| {
                heard.extend(Heard::from_reply(reply))
            })
            .await;
        // The read has its answer: the spares still held are not sent.
        drop(settled);
        // Merging and copying values of megabytes: off the worker.
        let reply = crate::tasks::heavy_for(Heard::bytes(&heard), || {
            let merged = Heard::merge_all(&heard);
            Response::Value(GetReply {
                values: merged.values().map(|v| Value(v.to_vec())).collect(),
                context: CausalContext(s.context_key.seal(key, &merged.read_entries())),
            })
        });
        let outstanding = primaries.len() - tally.heard;
        let node = self.clone();
        let key = key.to_vec();
        self.tasks.spawn(async move {
            node.read_repair(key, heard, answers, outstanding).await;
        });
        tally.result(r, pr, "read", reply, view)
    }
}
