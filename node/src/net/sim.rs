//! An in-memory network for cluster tests and the deterministic simulation.
//!
//! Messages go through the real frame codec (so what cannot be encoded fails
//! here too). Each request is delivered into a task owned by the *receiving*
//! node, with the answer sent back over a oneshot: a caller that gives up
//! does not cancel the remote work, as on a real network, and crashing a node
//! aborts exactly the requests it was serving.
//!
//! Faults a test names, after what they model:
//! - `partition(a, b)`: a and b cannot reach each other (calls fail at once,
//!   like a refused connection); `cut(from, to)` does it one way only: the
//!   requests from `from` fail, and answers to requests that went the other
//!   way are lost after the request was applied;
//! - `blackhole(a, b)`: calls from a to b are never answered (the caller's
//!   timeout decides);
//! - `delay(a, b, d)`: calls from a to b take `d` longer;
//! - `crash(a)` / `restart(a)`: a is unreachable from everyone while crashed,
//!   and the requests it was serving are aborted;
//! - `kill(a)`: a crash of the process itself: the transports it held stop
//!   working for good (a restarted node gets a new one from
//!   [`SimNetwork::transport`] and registers again).
//!
//! Random faults, for the seeded simulation only ([`SimNetwork::set_chaos`]):
//! per message a latency, and with the configured odds an extra delay (which
//! reorders), a lost request, a lost answer after the request was applied,
//! or a duplicate delivery. Every decision is drawn from one [`SimRng`] in
//! the order the single-threaded runtime makes the calls, so a seed replays
//! exactly. Every send, delivery, answer and loss is folded into a trace
//! hash ([`SimNetwork::trace_hash`]), together with whatever the simulation
//! notes itself ([`SimNetwork::note`]), each with the simulated time.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_client::frame;
use shoal_client::proto::MemberInfo;
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use super::{Handler, PeerRequest, PeerResponse, Transport, TransportError};

type BoxedHandler = Arc<
    dyn Fn(String, PeerRequest) -> Pin<Box<dyn Future<Output = PeerResponse> + Send>> + Send + Sync,
>;

/// A small seeded PRNG (SplitMix64): the same numbers for the same seed on
/// every platform and every version of every crate.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> Self {
        SimRng(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// The odds of random faults per message.
#[derive(Debug, Clone, Copy)]
pub struct ChaosConfig {
    /// Every message (request and answer each) takes between these.
    pub latency: (Duration, Duration),
    /// Odds of an extra delay of up to `slow_by` (reordering).
    pub slow: f64,
    pub slow_by: Duration,
    pub drop_request: f64,
    /// Odds that the answer is lost after the request was applied.
    pub drop_reply: f64,
    pub duplicate: f64,
    /// How long a caller waits before a lost message shows as a failed call
    /// (the transport's idle timeout).
    pub loss_timeout: Duration,
}

struct Chaos {
    rng: SimRng,
    config: ChaosConfig,
}

/// FNV-1a over every event, in order.
struct Trace {
    hash: u64,
    events: u64,
    log: Option<Vec<String>>,
    origin: Option<tokio::time::Instant>,
}

impl Default for Trace {
    fn default() -> Self {
        Trace {
            hash: 0xcbf2_9ce4_8422_2325,
            events: 0,
            log: None,
            origin: None,
        }
    }
}

impl Trace {
    fn fold(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.hash ^= u64::from(*b);
            self.hash = self.hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// Folds one event: the simulated time, its text and its payload.
    fn event(&mut self, text: &dyn Fn() -> String, payload: &[u8]) {
        let now = tokio::time::Instant::now();
        let origin = *self.origin.get_or_insert(now);
        let at = now.duration_since(origin).as_micros() as u64;
        self.events += 1;
        self.fold(&at.to_le_bytes());
        let text = text();
        self.fold(text.as_bytes());
        self.fold(&[0xff]);
        self.fold(payload);
        if let Some(log) = &mut self.log {
            log.push(format!("{:>10.3}s {text}", at as f64 / 1e6));
        }
    }
}

#[derive(Default)]
struct Faults {
    cut: BTreeSet<(String, String)>,
    blackholed: BTreeSet<(String, String)>,
    delays: BTreeMap<(String, String), Duration>,
    crashed: BTreeSet<String>,
}

/// One attached node.
#[derive(Default)]
struct Entry {
    handler: Option<BoxedHandler>,
    /// Bumped by [`SimNetwork::kill`]: transports of older incarnations are
    /// dead.
    incarnation: u64,
    /// The requests it is serving (and whatever else was spawned on it),
    /// aborted when it crashes.
    tasks: Vec<AbortHandle>,
}

#[derive(Default)]
struct State {
    nodes: BTreeMap<String, Entry>,
    faults: Faults,
    chaos: Option<Chaos>,
    trace: Trace,
    next_id: u64,
}

/// The simulated network: nodes by name, and the faults in force.
#[derive(Default)]
pub struct SimNetwork {
    state: Mutex<State>,
}

/// What happens to one call, decided when it is made.
struct Plan {
    id: u64,
    delay: Duration,
    reply_delay: Duration,
    drop_request: bool,
    drop_reply: bool,
    duplicate: Option<Duration>,
    loss_timeout: Duration,
}

fn kind(r: &PeerRequest) -> &'static str {
    match r {
        PeerRequest::Hello(_) => "hello",
        PeerRequest::Ping => "ping",
        PeerRequest::ReplicaGet { .. } => "replica-get",
        PeerRequest::ReapCheck { .. } => "reap-check",
        PeerRequest::ReplicaPut { .. } => "replica-put",
        PeerRequest::Forward { .. } => "forward",
        PeerRequest::HintPut { .. } => "hint-put",
        PeerRequest::HintGet { .. } => "hint-get",
        PeerRequest::HintsOf { .. } => "hints-of",
        PeerRequest::ReapHintsOf { .. } => "reap-hints-of",
        PeerRequest::Handoff(_) => "handoff",
        PeerRequest::Aae(_) => "aae",
        PeerRequest::Reap { .. } => "reap",
        PeerRequest::Gossip { .. } => "gossip",
        PeerRequest::GossipPush(_) => "gossip-push",
        PeerRequest::HintsIn { .. } => "hints-in",
        PeerRequest::Spares(_) => "batch",
        PeerRequest::Batch(_) => "batch-v1",
    }
}

impl State {
    fn note(&mut self, text: &dyn Fn() -> String, payload: &[u8]) {
        self.trace.event(text, payload);
    }

    fn spawn_on(&mut self, node: &str, fut: impl Future<Output = ()> + Send + 'static) {
        let entry = self.nodes.entry(node.to_string()).or_default();
        if entry.tasks.len() > 64 {
            entry.tasks.retain(|t| !t.is_finished());
        }
        entry.tasks.push(tokio::spawn(fut).abort_handle());
    }

    fn abort(&mut self, node: &str) {
        if let Some(entry) = self.nodes.get_mut(node) {
            for t in entry.tasks.drain(..) {
                t.abort();
            }
        }
    }
}

impl SimNetwork {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("sim lock")
    }

    /// Attaches a node under `name`.
    pub fn register<H: Handler>(&self, name: &str, handler: Arc<H>) {
        let f: BoxedHandler = Arc::new(move |from, req| {
            let h = handler.clone();
            Box::pin(async move { h.peer(from, req).await })
        });
        self.lock()
            .nodes
            .entry(name.to_string())
            .or_default()
            .handler = Some(f);
    }

    /// The transport a node named `me` sends with (dead once `me` is killed).
    pub fn transport(self: &Arc<Self>, me: &str) -> SimTransport {
        let incarnation = self
            .lock()
            .nodes
            .entry(me.to_string())
            .or_default()
            .incarnation;
        SimTransport {
            net: self.clone(),
            me: me.to_string(),
            incarnation,
        }
    }

    pub fn partition(&self, a: &str, b: &str) {
        let mut s = self.lock();
        s.faults.cut.insert((a.into(), b.into()));
        s.faults.cut.insert((b.into(), a.into()));
    }

    /// One-way partition: messages from `from` to `to` are lost.
    pub fn cut(&self, from: &str, to: &str) {
        self.lock().faults.cut.insert((from.into(), to.into()));
    }

    pub fn blackhole(&self, from: &str, to: &str) {
        self.lock()
            .faults
            .blackholed
            .insert((from.into(), to.into()));
    }

    pub fn delay(&self, from: &str, to: &str, by: Duration) {
        self.lock()
            .faults
            .delays
            .insert((from.into(), to.into()), by);
    }

    /// `node` is unreachable and the requests it serves are aborted.
    pub fn crash(&self, node: &str) {
        let mut s = self.lock();
        s.faults.crashed.insert(node.into());
        s.abort(node);
    }

    pub fn restart(&self, node: &str) {
        self.lock().faults.crashed.remove(node);
    }

    /// The process of `node` dies: it is crashed, its handler detached and
    /// every transport it held is dead. Attach the restarted node with a new
    /// [`Self::transport`] and [`Self::register`], then [`Self::restart`].
    pub fn kill(&self, node: &str) {
        let mut s = self.lock();
        s.faults.crashed.insert(node.into());
        s.abort(node);
        let entry = s.nodes.entry(node.to_string()).or_default();
        entry.incarnation += 1;
        entry.handler = None;
    }

    /// Removes every named fault (random ones stay as configured).
    pub fn heal(&self) {
        let mut s = self.lock();
        let crashed = std::mem::take(&mut s.faults.crashed);
        s.faults = Faults::default();
        // A killed node stays down until it is attached again.
        s.faults.crashed = crashed
            .into_iter()
            .filter(|n| s.nodes.get(n).is_some_and(|e| e.handler.is_none()))
            .collect();
    }

    /// Whether `node` is crashed.
    pub fn is_crashed(&self, node: &str) -> bool {
        self.lock().faults.crashed.contains(node)
    }

    /// Runs `fut` as a task owned by `node`: a crash aborts it.
    pub fn spawn_on(&self, node: &str, fut: impl Future<Output = ()> + Send + 'static) {
        self.lock().spawn_on(node, fut);
    }

    /// Turns random faults on (`Some`) or off, drawing from `rng`.
    pub fn set_chaos(&self, chaos: Option<(SimRng, ChaosConfig)>) {
        self.lock().chaos = chaos.map(|(rng, config)| Chaos { rng, config });
    }

    /// Keeps the text of every traced event (see [`Self::take_trace_log`]).
    pub fn keep_trace_log(&self) {
        self.lock().trace.log = Some(Vec::new());
    }

    pub fn take_trace_log(&self) -> Vec<String> {
        self.lock().trace.log.take().unwrap_or_default()
    }

    /// Folds an event of the simulation itself into the trace.
    pub fn note(&self, event: impl Fn() -> String) {
        self.lock().note(&event, &[]);
    }

    /// The hash of every event so far, and how many there were.
    pub fn trace_hash(&self) -> (u64, u64) {
        let s = self.lock();
        (s.trace.hash, s.trace.events)
    }

    /// Delivers `request` into a task of `to`; its answer goes to `reply`
    /// (`None`: lost on the way back).
    fn deliver(
        self: &Arc<Self>,
        from: String,
        to: String,
        id: u64,
        request: PeerRequest,
        reply: Option<oneshot::Sender<Option<PeerResponse>>>,
        drop_reply: bool,
    ) {
        let mut s = self.lock();
        let alive = !s.faults.crashed.contains(&to);
        let handler = s.nodes.get(&to).and_then(|e| e.handler.clone());
        let (Some(handler), true) = (handler, alive) else {
            s.note(&|| format!("#{id} {from}>{to} not delivered: down"), &[]);
            return; // dropping `reply`: the connection was reset
        };
        let what = kind(&request);
        s.note(&|| format!("#{id} {from}>{to} deliver {what}"), &[]);
        let net = self.clone();
        let receiver = to.clone();
        s.spawn_on(&receiver, async move {
            let response = handler(from.clone(), request).await;
            let bytes = frame::encode(&response).unwrap_or_default();
            let mut s = net.lock();
            let lost = drop_reply
                || s.faults.cut.contains(&(to.clone(), from.clone()))
                || s.faults.crashed.contains(&from);
            s.note(
                &|| {
                    format!(
                        "#{id} {to}>{from} answer{}",
                        if lost { " lost" } else { "" }
                    )
                },
                &bytes,
            );
            drop(s);
            if let Some(reply) = reply {
                let _ = reply.send((!lost).then_some(response));
            }
        });
    }
}

/// One node's view of a [`SimNetwork`].
pub struct SimTransport {
    net: Arc<SimNetwork>,
    me: String,
    incarnation: u64,
}

impl Transport for SimTransport {
    async fn send(
        &self,
        to: &MemberInfo,
        request: PeerRequest,
    ) -> Result<PeerResponse, TransportError> {
        let from = self.me.clone();
        let unreachable =
            |why: &str| TransportError::Unreachable(to.name.clone(), format!("simulated {why}"));
        let wire = |e: frame::FrameError| TransportError::Failed(to.name.clone(), e.to_string());
        let encoded = frame::encode(&request).map_err(wire)?;
        let link = (from.clone(), to.name.clone());
        let what = kind(&request);
        let (plan, blackholed) = {
            let mut s = self.net.lock();
            let id = s.next_id;
            s.next_id += 1;
            let name = &to.name;
            let me_now = s.nodes.get(&from).map_or(0, |e| e.incarnation);
            let refused = if me_now != self.incarnation {
                Some("crash of the sender")
            } else if s.faults.crashed.contains(&from) || s.faults.crashed.contains(name) {
                Some("crash")
            } else if s.faults.cut.contains(&link) {
                Some("partition")
            } else {
                None
            };
            if let Some(why) = refused {
                s.note(
                    &|| format!("#{id} {from}>{name} {what} refused: {why}"),
                    &[],
                );
                return Err(unreachable(why));
            }
            if s.nodes.get(name).and_then(|e| e.handler.as_ref()).is_none() {
                return Err(unreachable("absence: no such node"));
            }
            let mut plan = Plan {
                id,
                delay: s.faults.delays.get(&link).copied().unwrap_or_default(),
                reply_delay: Duration::ZERO,
                drop_request: false,
                drop_reply: false,
                duplicate: None,
                loss_timeout: Duration::ZERO,
            };
            if let Some(Chaos { rng, config: c }) = &mut s.chaos {
                let latency = |rng: &mut SimRng| {
                    let (lo, hi) = (
                        c.latency.0.as_micros() as u64,
                        c.latency.1.as_micros() as u64,
                    );
                    let mut d = Duration::from_micros(rng.range(lo, hi));
                    if rng.chance(c.slow) {
                        d += Duration::from_micros(rng.below(c.slow_by.as_micros() as u64));
                    }
                    d
                };
                plan.delay += latency(rng);
                plan.reply_delay = latency(rng);
                plan.drop_request = rng.chance(c.drop_request);
                plan.drop_reply = rng.chance(c.drop_reply);
                if rng.chance(c.duplicate) {
                    plan.duplicate = Some(latency(rng) + plan.delay);
                }
                plan.loss_timeout = c.loss_timeout;
            }
            let blackholed = s.faults.blackholed.contains(&link);
            s.note(
                &|| {
                    format!(
                        "#{id} {from}>{name} send {what}{}",
                        if blackholed { " (blackholed)" } else { "" }
                    )
                },
                &encoded,
            );
            (plan, blackholed)
        };
        if blackholed {
            std::future::pending::<()>().await;
        }
        // Through the codec both ways, as on the wire.
        let request: PeerRequest = frame::decode(&encoded, usize::MAX).map_err(wire)?;
        if let Some(after) = plan.duplicate {
            let (net, from, name, request) = (
                self.net.clone(),
                from.clone(),
                to.name.clone(),
                request.clone(),
            );
            let id = plan.id;
            let owner = from.clone();
            self.net.spawn_on(&owner, async move {
                tokio::time::sleep(after).await;
                net.note(|| format!("#{id} duplicate"));
                net.deliver(from, name, id, request, None, false);
            });
        }
        if !plan.delay.is_zero() {
            tokio::time::sleep(plan.delay).await;
        }
        if plan.drop_request {
            let id = plan.id;
            self.net.note(|| format!("#{id} request lost"));
            tokio::time::sleep(plan.loss_timeout).await;
            return Err(TransportError::Failed(
                to.name.clone(),
                "simulated loss of the request".into(),
            ));
        }
        let (tx, rx) = oneshot::channel();
        self.net.deliver(
            from,
            to.name.clone(),
            plan.id,
            request,
            Some(tx),
            plan.drop_reply,
        );
        match rx.await {
            Ok(Some(response)) => {
                if !plan.reply_delay.is_zero() {
                    tokio::time::sleep(plan.reply_delay).await;
                }
                let bytes = frame::encode(&response).map_err(wire)?;
                frame::decode(&bytes, usize::MAX).map_err(wire)
            }
            Ok(None) => {
                tokio::time::sleep(plan.loss_timeout).await;
                Err(TransportError::Failed(
                    to.name.clone(),
                    "simulated loss of the answer".into(),
                ))
            }
            Err(_) => Err(TransportError::Failed(
                to.name.clone(),
                "connection reset: the peer crashed".into(),
            )),
        }
    }
}
