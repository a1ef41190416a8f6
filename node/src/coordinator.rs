//! The coordinator: get, put and delete over a key's sloppy quorum, with
//! per-request options and timeouts, read repair, and forwarding when the
//! receiving node does not replicate the key. Generic over [`Transport`] and
//! [`Store`], so the same code runs over QUIC with RocksDB and over the
//! simulated network with the in-memory store.
//!
//! # Sloppy quorum
//! Each of a key's N primaries is reached, if the failure detector sees it up,
//! directly. If it is down, or the send to it fails, the request goes to the
//! next live *fallback* (nodes walking the ring past the primaries, each taken
//! by at most one down primary), which answers from, or writes to, its hints
//! for that primary (see [`crate::handoff`]). W and R count every replica that
//! answered, fallbacks included; PW and PR count primaries only. A request
//! whose PW or PR exceeds the primaries that are up fails at once, before
//! anything is written, and a request whose primaries fail during it fails
//! with the quorum error naming who answered.
//!
//! # Write path
//! The coordinator is always a primary replica of the key (a node that is not
//! forwards the request to one, as Riak does): it applies the write to its own
//! copy, minting the new dot under its own node id, then sends the resulting
//! object to the other primaries (or their fallbacks), which merge it. The
//! write is acknowledged once W replicas (PW of them primaries) hold it; the
//! remaining sends carry on in the background. A primary that neither it nor
//! a fallback could reach gets a hint kept by the coordinator itself. If the
//! quorum is not met the error says how many and which replicas acknowledged;
//! the copies that did land are not rolled back (as in Dynamo: an
//! unacknowledged write may still appear later).
//!
//! # Read path and read repair
//! The coordinator asks the whole sloppy list and answers with the merge of
//! the first R answers (PR of them primaries). In the background it keeps
//! collecting answers for `timeouts.read-repair-ms` more, merges everything it
//! heard, and sends the merge to every primary whose answer was older or
//! missing. Repair never delays the reply.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use shoal_client::error::{ErrorKind, WireError};
use shoal_client::proto::*;
use shoal_ring::NodeId;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, warn};

use crate::clock::Clock;
use crate::detector::{DetectorConfig, FailureDetector};
use crate::handoff::HandoffSettings;
use crate::membership::{Membership, View};
use crate::metrics::Metrics;
use crate::net::{Handler, PeerRequest, PeerResponse, Transport, TransportError};
use crate::storage::{Store, StoreError, Tree};
use crate::version::{
    decode_context, decode_object, encode_context, encode_object, Actors, Object, VersionError,
    VersionVector,
};

/// Requests never wait longer than this, whatever they ask for.
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_millis(crate::config::MAX_REQUEST_MS);
/// Stripes of the per-key lock that makes read-modify-write of a local object
/// atomic.
const LOCK_STRIPES: usize = 256;

/// The coordinator's settings, from the config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub n: u32,
    pub r: u32,
    pub w: u32,
    pub pr: u32,
    pub pw: u32,
    pub max_value_bytes: usize,
    pub request_timeout: Duration,
    pub clock_max_entries: usize,
    pub clock_min_age_ms: u64,
    pub detector: DetectorConfig,
    pub handoff: HandoffSettings,
    pub aae: crate::antientropy::AaeSettings,
    /// How long after a read's reply late answers are still read-repaired.
    pub read_repair_window: Duration,
    /// Memory for the object cache (see [`Stripe`]); 0 turns it off.
    pub object_cache_bytes: usize,
    /// Wall-clock time for stored timestamps (see [`crate::clock`]).
    pub clock: Clock,
}

impl Settings {
    pub fn from_config(c: &crate::config::Config) -> Self {
        Settings {
            n: c.cluster.n,
            r: c.cluster.r,
            w: c.cluster.w,
            pr: c.cluster.pr,
            pw: c.cluster.pw,
            max_value_bytes: c.limits.max_value_bytes,
            request_timeout: Duration::from_millis(c.timeouts.request_ms),
            clock_max_entries: c.cluster.clock_max_entries,
            clock_min_age_ms: c.cluster.clock_min_age_secs * 1000,
            detector: DetectorConfig {
                heartbeat: Duration::from_millis(c.failure_detector.heartbeat_ms),
                threshold: c.failure_detector.phi_threshold,
                acceptable_pause: Duration::from_millis(c.failure_detector.acceptable_pause_ms),
                ..DetectorConfig::default()
            },
            handoff: HandoffSettings {
                interval: Duration::from_millis(c.handoff.interval_ms),
                batch_size: c.handoff.batch_size,
                max_keys_per_sec: c.handoff.max_keys_per_sec,
            },
            aae: crate::antientropy::AaeSettings::from_config(&c.anti_entropy),
            read_repair_window: Duration::from_millis(c.timeouts.read_repair_ms),
            object_cache_bytes: c.limits.object_cache_mb << 20,
            clock: Clock::system(),
        }
    }
}

/// A Shoal node's logic. Cheap to clone.
pub struct Node<T, S> {
    pub(crate) inner: Arc<Inner<T, S>>,
}

impl<T, S> Clone for Node<T, S> {
    fn clone(&self) -> Self {
        Node {
            inner: self.inner.clone(),
        }
    }
}

pub(crate) struct Inner<T, S> {
    pub(crate) me: MemberInfo,
    pub(crate) settings: Settings,
    pub(crate) store: Arc<S>,
    pub(crate) transport: T,
    pub(crate) membership: Membership,
    stripes: Vec<Mutex<Stripe>>,
    /// Liveness of every peer, fed by heartbeats (see [`crate::liveness`]).
    pub(crate) detector: Mutex<FailureDetector>,
    pub(crate) metrics: Arc<Metrics>,
    /// Where `/metrics` is served, once bound.
    pub(crate) metrics_addr: OnceLock<SocketAddr>,
    /// Hints held, per primary they wait for (see [`crate::handoff`]).
    pub(crate) hints_pending: Mutex<BTreeMap<NodeId, u64>>,
    /// Anti-entropy trees (see [`crate::antientropy`]).
    pub(crate) aae: Mutex<crate::antientropy::AaeState>,
    /// The actors this incarnation mints dots under (see
    /// [`crate::version`]: a dot is never minted twice).
    pub(crate) actors: Actors,
}

/// Meta-tree key of the incarnation counter, bumped (and synced) on every
/// start so that no two runs of a node mint dots under the same actor.
pub const INCARNATION_KEY: &[u8] = b"incarnation";

/// Bumps and durably stores this node's incarnation; returns the new one.
fn next_incarnation<S: Store>(store: &S) -> Result<u32, StoreError> {
    let last = match store.get(Tree::Meta, INCARNATION_KEY)? {
        None => 0,
        Some(b) => <[u8; 4]>::try_from(b.as_slice())
            .map(u32::from_be_bytes)
            .map_err(|_| StoreError::Corruption {
                tree: Tree::Meta.name(),
                key: hex::encode(INCARNATION_KEY),
                detail: format!("incarnation is {} bytes, not 4", b.len()),
            })?,
    };
    // Wrapping is harmless: an actor also names its epoch, and 2^32 starts
    // of one node id do not happen.
    let next = last.wrapping_add(1);
    let mut batch = crate::storage::WriteBatch::default();
    batch.put(Tree::Meta, INCARNATION_KEY, &next.to_be_bytes());
    store.write_synced(batch)?;
    Ok(next)
}

/// One of the stripes that keys are spread over. Its lock serialises every
/// change to its keys' stored objects (read-modify-write is atomic under it),
/// and it caches the stored bytes of recently used objects. The cache is
/// exact: it is filled from the store and changed after every write in the
/// same critical section as the write itself.
pub(crate) struct Stripe {
    cache: HashMap<Vec<u8>, Arc<[u8]>>,
    bytes: usize,
    budget: usize,
}

/// Locks a stripe even if a panic poisoned it: a bug hit by one request
/// must not make every key of the stripe fail from then on. Its cache may
/// be stale after such a panic (the store write may have happened without
/// the cache update), so it is emptied; the store stays the truth.
fn relock(stripe: &Mutex<Stripe>) -> MutexGuard<'_, Stripe> {
    stripe.lock().unwrap_or_else(|poisoned| {
        stripe.clear_poison();
        let mut guard = poisoned.into_inner();
        guard.clear();
        guard
    })
}

/// What an entry costs the cache beyond its key and value.
const CACHE_ENTRY_OVERHEAD: usize = 64;

impl Stripe {
    fn new(budget: usize) -> Self {
        Stripe {
            cache: HashMap::new(),
            bytes: 0,
            budget,
        }
    }

    fn cost(key: &[u8], value: &[u8]) -> usize {
        key.len() + value.len() + CACHE_ENTRY_OVERHEAD
    }

    pub(crate) fn forget(&mut self, key: &[u8]) {
        if let Some(old) = self.cache.remove(key) {
            self.bytes -= Stripe::cost(key, &old);
        }
    }

    /// Caches `value` as the stored bytes of `key`, evicting others (any)
    /// to stay within the budget; a value larger than the budget is not kept.
    pub(crate) fn remember(&mut self, key: &[u8], value: Arc<[u8]>) {
        self.forget(key);
        let cost = Stripe::cost(key, &value);
        if cost > self.budget {
            return;
        }
        while self.bytes + cost > self.budget {
            let Some(victim) = self.cache.keys().next().cloned() else {
                break;
            };
            self.forget(&victim);
        }
        self.bytes += cost;
        self.cache.insert(key.to_vec(), value);
    }

    fn clear(&mut self) {
        self.cache.clear();
        self.bytes = 0;
    }
}

/// Most entries a client's causal context may have: more than any clock
/// keeps (pruning is lazy, so a clock may exceed its bound for a while).
fn max_context_entries(s: &Settings) -> usize {
    (4 * s.clock_max_entries).max(256)
}

/// One replica's answer to a fan-out.
type Answer = (MemberInfo, Result<PeerResponse, TransportError>);


/// Background work's rate limit: sleeps until `n` items begun at `began`
/// have taken at least `n / per_sec` seconds.
pub(crate) async fn pace(began: Instant, n: usize, per_sec: u32) {
    let floor = Duration::from_secs_f64(n as f64 / f64::from(per_sec.max(1)));
    tokio::time::sleep_until(began + floor).await;
}

fn wire(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error(WireError::new(kind, message))
}

fn corruption(key: &[u8], detail: String) -> StoreError {
    StoreError::Corruption {
        tree: Tree::Objects.name(),
        key: hex::encode(key),
        detail,
    }
}

fn store_error(e: StoreError) -> WireError {
    match e {
        StoreError::Corruption { .. } => WireError::new(ErrorKind::Corruption, e.to_string()),
        StoreError::Io { .. } => WireError::new(ErrorKind::Internal, e.to_string()),
    }
}

impl<T: Transport, S: Store> Node<T, S> {
    /// The node's wall clock (see [`crate::clock`]).
    pub(crate) fn now_ms(&self) -> u64 {
        self.inner.settings.clock.now_ms()
    }

    /// A node over `store`, starting a new incarnation (see
    /// [`crate::version`]); fails only if the store cannot record it.
    pub fn new(
        me: MemberInfo,
        settings: Settings,
        store: Arc<S>,
        transport: T,
        membership: Membership,
    ) -> Result<Self, StoreError> {
        let incarnation = next_incarnation(store.as_ref())?;
        let budget = settings.object_cache_bytes / LOCK_STRIPES;
        let stripes = (0..LOCK_STRIPES)
            .map(|_| Mutex::new(Stripe::new(budget)))
            .collect();
        let detector = Mutex::new(FailureDetector::new(settings.detector));
        let actors = Actors::new(me.id, incarnation);
        Ok(Node {
            inner: Arc::new(Inner {
                me,
                settings,
                store,
                transport,
                membership,
                stripes,
                detector,
                metrics: Arc::new(Metrics::default()),
                metrics_addr: OnceLock::new(),
                hints_pending: Mutex::new(BTreeMap::new()),
                aae: Mutex::default(),
                actors,
            }),
        })
    }

    pub fn me(&self) -> &MemberInfo {
        &self.inner.me
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    pub fn membership(&self) -> &Membership {
        &self.inner.membership
    }

    pub fn store(&self) -> &Arc<S> {
        &self.inner.store
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Records where `/metrics` is served, for `shoal status`.
    pub fn set_metrics_addr(&self, addr: SocketAddr) {
        let _ = self.inner.metrics_addr.set(addr);
    }

    /// Records a member and persists what is known, so a restart does not
    /// need the others to be up to know the ring.
    pub fn learn(&self, info: MemberInfo) {
        if self.inner.membership.learn(info) {
            let known = self.inner.membership.known();
            let bytes = rmp_serde::to_vec_named(&known).expect("member list encodes");
            if let Err(e) = self
                .inner
                .store
                .put(Tree::Meta, crate::server::MEMBERS_KEY, &bytes)
            {
                error!(error = %e, "could not persist the member list");
            }
        }
    }

    /// Says hello to every configured member not identified yet, or to all of
    /// them when `everyone` (on start, so peers notice a restarted node).
    pub async fn say_hello(&self, everyone: bool) {
        let missing = self.inner.membership.missing_names();
        for target in self
            .inner
            .membership
            .expected()
            .into_iter()
            .filter(|m| everyone || missing.contains(&m.name))
        {
            if target.name == self.inner.me.name {
                self.learn(self.inner.me.clone());
                continue;
            }
            match self
                .inner
                .transport
                .call(&target, PeerRequest::Hello(self.inner.me.clone()))
                .await
            {
                Ok(PeerResponse::Hello(info)) if info.name == target.name => self.learn(info),
                Ok(other) => {
                    warn!(peer = %target.name, answer = ?other, "unexpected answer to hello")
                }
                Err(e) => {
                    tracing::debug!(peer = %target.name, error = %e, "member not reachable yet")
                }
            }
        }
    }

    fn view(&self) -> Result<View, Response> {
        self.inner.membership.view().ok_or_else(|| {
            let missing = self.inner.membership.missing_names();
            wire(
                ErrorKind::NotReady,
                format!("ring not ready: waiting to identify {}", missing.join(", ")),
            )
        })
    }

    // ---- the local replica -------------------------------------------------

    fn stripe(&self, key: &[u8]) -> &Mutex<Stripe> {
        &self.inner.stripes[shoal_ring::key_hash(key) as usize % LOCK_STRIPES]
    }

    /// Locks `key`'s stripe (see [`Stripe`]).
    pub(crate) fn lock_stripe(&self, key: &[u8]) -> MutexGuard<'_, Stripe> {
        relock(self.stripe(key))
    }

    /// The stored bytes of `key`'s object, from the cache or else the store
    /// (then cached). The caller holds `stripe`, the key's stripe.
    pub(crate) fn stored(
        &self,
        stripe: &mut Stripe,
        key: &[u8],
    ) -> Result<Option<Arc<[u8]>>, StoreError> {
        if let Some(bytes) = stripe.cache.get(key) {
            return Ok(Some(bytes.clone()));
        }
        let bytes: Option<Arc<[u8]>> = self.inner.store.get(Tree::Objects, key)?.map(Arc::from);
        if let Some(b) = &bytes {
            stripe.remember(key, b.clone());
        }
        Ok(bytes)
    }

    /// Empties the object cache: after the store was changed behind the
    /// node's back (tests that lose or corrupt records).
    pub fn drop_cache(&self) {
        for stripe in &self.inner.stripes {
            relock(stripe).clear();
        }
    }

    /// This replica's stored object for `key`.
    pub fn local_get(&self, key: &[u8]) -> Result<Option<Object>, StoreError> {
        let bytes = self.stored(&mut self.lock_stripe(key), key)?;
        bytes
            .map(|b| decode_object(&b).map_err(|detail| corruption(key, detail)))
            .transpose()
    }

    /// Read-modify-write of the local object under the key's lock.
    fn local_apply(
        &self,
        key: &[u8],
        change: impl FnOnce(&mut Object),
    ) -> Result<Object, StoreError> {
        let mut stripe = self.lock_stripe(key);
        let raw = self.stored(&mut stripe, key)?;
        let before = raw
            .as_deref()
            .map(decode_object)
            .transpose()
            .map_err(|detail| corruption(key, detail))?;
        let mut object = before.clone().unwrap_or_default();
        change(&mut object);
        let s = &self.inner.settings;
        object.prune(
            s.clock_max_entries,
            s.clock_min_age_ms,
            s.clock.now_ms(),
            |actor| self.inner.actors.is_current(actor),
        );
        if before.as_ref() != Some(&object) {
            self.write_object(
                &mut stripe,
                key,
                raw.as_deref(),
                Some(&encode_object(&object)),
            )?;
        }
        Ok(object)
    }

    /// Removes the local object of `key` altogether (tests of the trees).
    #[cfg(test)]
    pub(crate) fn remove_object(&self, key: &[u8]) -> Result<(), StoreError> {
        let mut stripe = self.lock_stripe(key);
        if let Some(raw) = self.stored(&mut stripe, key)? {
            self.write_object(&mut stripe, key, Some(&raw), None)?;
        }
        Ok(())
    }

    /// Removes the local object of `key` if it is exactly `expected`, a
    /// tombstone whose grace period has passed by this node's own clock (so
    /// one node with a fast clock cannot reap early for all); returns
    /// whether it did.
    pub(crate) fn reap_local(&self, key: &[u8], expected: &Object) -> Result<bool, StoreError> {
        if !crate::antientropy::reapable(
            expected,
            self.inner.settings.aae.tombstone_grace,
            self.now_ms(),
        ) {
            return Ok(false);
        }
        let mut stripe = self.lock_stripe(key);
        let Some(raw) = self.stored(&mut stripe, key)? else {
            return Ok(false);
        };
        if decode_object(&raw).ok().as_ref() != Some(expected) {
            return Ok(false);
        }
        self.write_object(&mut stripe, key, Some(&raw), None)?;
        // Forgotten here: never write under its actors again (before the
        // stripe is released, so no write to the key sees them live).
        let full = self.inner.actors.retire(expected);
        drop(stripe);
        if full {
            let incarnation = next_incarnation(self.inner.store.as_ref())?;
            self.inner.actors.new_incarnation(incarnation);
            tracing::info!(incarnation, "new incarnation: retired actors reached their bound");
        }
        Ok(true)
    }

    /// Applies a client write to the local copy under the key's lock: the
    /// dot is minted under the actor [`Actors::for_write`] picks, so it was
    /// never minted before (see [`crate::version`]).
    fn local_write(
        &self,
        key: &[u8],
        ctx: &VersionVector,
        value: Option<Vec<u8>>,
    ) -> Result<(Object, crate::version::Dot), WireError> {
        let now = self.now_ms();
        let mut minted: Result<crate::version::Dot, VersionError> =
            Err(VersionError::EpochsExhausted(0));
        let object = self
            .local_apply(key, |o| {
                minted = self.inner.actors.for_write(o, ctx).and_then(|actor| {
                    o.update(ctx, value, actor, now)
                        .ok_or(VersionError::ContextMalformed(
                            "it names a counter at its maximum".into(),
                        ))
                });
            })
            .map_err(store_error)?;
        let dot = minted.map_err(|e| {
            let kind = match e {
                VersionError::EpochsExhausted(_) => ErrorKind::Internal,
                VersionError::ContextTooLarge { .. } | VersionError::ContextMalformed(_) => {
                    ErrorKind::BadRequest
                }
            };
            WireError::new(kind, e.to_string())
        })?;
        Ok((object, dot))
    }

    /// Merges an object sent by a coordinator into the local copy.
    pub fn local_merge(&self, key: &[u8], incoming: &Object) -> Result<Object, StoreError> {
        self.local_apply(key, |o| o.merge(incoming))
    }

    /// A replica request, answered locally when `to` is this node.
    async fn replica_call(
        &self,
        to: &MemberInfo,
        request: PeerRequest,
    ) -> Result<PeerResponse, TransportError> {
        if to.id == self.inner.me.id {
            Ok(self.peer_local(request))
        } else {
            self.inner.transport.call(to, request).await
        }
    }

    fn peer_local(&self, request: PeerRequest) -> PeerResponse {
        let me = self.inner.me.id;
        let result = match request {
            PeerRequest::ReplicaGet { key } => self.local_get(&key).map(PeerResponse::Object),
            PeerRequest::ReplicaPut { key, object } => self
                .local_merge(&key, &object)
                .map(|_| PeerResponse::Stored),
            PeerRequest::HintPut {
                key,
                for_primary,
                object,
            } => if for_primary == me {
                // Views that disagree could name this node as its own fallback.
                self.local_merge(&key, &object).map(|_| ())
            } else {
                self.store_hint(for_primary, &key, &object)
            }
            .map(|_| PeerResponse::Stored),
            PeerRequest::HintGet { key, for_primary } => {
                self.hint(for_primary, &key).map(PeerResponse::Object)
            }
            PeerRequest::HintsOf { key } => self.hints_of(&key).map(PeerResponse::Hints),
            PeerRequest::Handoff(entries) => {
                self.accept_handoff(&entries).map(|_| PeerResponse::Stored)
            }
            PeerRequest::Reap { key, object } => match self.reap_local(&key, &object) {
                Ok(true) => Ok(PeerResponse::Stored),
                Ok(false) => return PeerResponse::Error("not reaped here".into()),
                Err(e) => Err(e),
            },
            PeerRequest::Aae(request) => {
                return self
                    .aae_answer(request)
                    .map_or_else(PeerResponse::Error, PeerResponse::Aae)
            }
            other => return PeerResponse::Error(format!("not a replica request: {other:?}")),
        };
        result.unwrap_or_else(|e| {
            error!(error = %e, "replica operation failed");
            PeerResponse::Error(e.to_string())
        })
    }

    /// Reaches each primary of a key, or a fallback in its place, and sends
    /// `op` there; one [`Reply`] per primary arrives on the returned channel.
    /// Primaries the detector sees down get the first live fallbacks in ring
    /// order at once; a primary whose send fails takes the next one. A write
    /// that nobody took for a primary becomes a hint kept here.
    fn sloppy_fan_out(
        &self,
        view: &View,
        key: &[u8],
        primaries: &[MemberInfo],
        op: ReplicaOp,
    ) -> mpsc::UnboundedReceiver<Reply> {
        let mut pool = Fallbacks {
            view: view.clone(),
            key: key.to_vec(),
            n: self.inner.settings.n as usize,
            left: None,
        };
        let mut first_tries = Vec::with_capacity(primaries.len());
        for p in primaries {
            let first = if self.is_up(p.id) {
                Some(p.clone())
            } else {
                pool.next_live(self)
            };
            first_tries.push((p.clone(), first));
        }
        let pool = Arc::new(Mutex::new(pool));
        let (tx, rx) = mpsc::unbounded_channel();
        for (primary, first) in first_tries {
            let (node, tx, op, pool) = (self.clone(), tx.clone(), op.clone(), pool.clone());
            let key = key.to_vec();
            tokio::spawn(async move {
                let reply = node.reach(primary, first, &key, &op, &pool).await;
                let _ = tx.send(reply);
            });
        }
        rx
    }

    /// One primary's part of [`Self::sloppy_fan_out`].
    async fn reach(
        &self,
        primary: MemberInfo,
        first: Option<MemberInfo>,
        key: &[u8],
        op: &ReplicaOp,
        pool: &Mutex<Fallbacks>,
    ) -> Reply {
        let mut failures = Vec::new();
        let mut next = first;
        while let Some(target) = next {
            let as_primary = target.id == primary.id;
            let request = op.request(key, (!as_primary).then_some(primary.id));
            match self.replica_call(&target, request).await {
                Ok(resp) if op.accepts(&resp) => {
                    return Reply {
                        from: target,
                        for_primary: (!as_primary).then_some(primary),
                        result: Ok(resp),
                    }
                }
                Ok(other) => failures.push(format!("{}: {other:?}", target.name)),
                Err(e) => failures.push(e.to_string()),
            }
            next = pool.lock().expect("pool lock").next_live(self);
        }
        if let ReplicaOp::Put(object) = op {
            if primary.id != self.inner.me.id {
                match self.store_hint(primary.id, key, object) {
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
        }
    }

    /// Sends `request` to each target concurrently; answers arrive on the
    /// returned channel. Sends outlive the caller: a coordinator that has its
    /// quorum replies while slower replicas still receive the write.
    fn fan_out(
        &self,
        targets: &[MemberInfo],
        request: PeerRequest,
    ) -> mpsc::UnboundedReceiver<Answer> {
        let (tx, rx) = mpsc::unbounded_channel();
        for target in targets.iter().cloned() {
            let (node, tx, request) = (self.clone(), tx.clone(), request.clone());
            tokio::spawn(async move {
                let answer = node.replica_call(&target, request).await;
                let _ = tx.send((target, answer));
            });
        }
        rx
    }

    // ---- coordination ------------------------------------------------------

    /// Handles a client request; `forwarded` requests are coordinated here even
    /// if this node's ring disagrees that it is a replica (no forwarding loops).
    pub async fn coordinate(&self, request: Request, forwarded: bool) -> Response {
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
                let primaries = view.preference_list(key, self.inner.settings.n as usize);
                if !primaries.iter().any(|m| m.id == self.inner.me.id) {
                    return self.forward(&primaries, request.clone(), options).await;
                }
                self.coordinate_local(request, view).await
            }
            Request::Ring => match self.view() {
                Ok(v) => Response::Ring(RingInfo {
                    ring: (*v.ring).clone(),
                    members: v.members.values().cloned().collect(),
                    n: self.inner.settings.n,
                }),
                Err(r) => r,
            },
            Request::Status => Response::Status(self.status()),
            Request::Inspect { key } => match self.view() {
                Ok(v) => self.inspect(&key, &v).await,
                Err(r) => r,
            },
            other => match self.view() {
                Ok(v) => self.coordinate_local(other, v).await,
                Err(r) => r,
            },
        }
    }

    async fn coordinate_local(&self, request: Request, view: View) -> Response {
        let started = Instant::now();
        let m = &self.inner.metrics;
        let (op, result) = match request {
            Request::Get { key, options } => (&m.get, self.get(&key, options, &view).await),
            Request::Put {
                key,
                value,
                context,
                options,
            } => (
                &m.put,
                self.put(key, Some(value), context, options, &view).await,
            ),
            Request::Delete {
                key,
                context,
                options,
            } => (
                &m.delete,
                self.put(key, None, context, options, &view).await,
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

    fn deadline(&self, options: &RequestOptions) -> Instant {
        let budget = options
            .timeout_ms
            .map_or(self.inner.settings.request_timeout, |ms| {
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
        let n = self.inner.settings.n;
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
        let mut failures = Vec::new();
        // Primaries the detector sees up first: a dead one costs a timeout.
        let mut order: Vec<&MemberInfo> = primaries.iter().collect();
        order.sort_by_key(|p| !self.is_up(p.id));
        for p in order {
            let call = self
                .inner
                .transport
                .call(p, PeerRequest::Forward(request.clone()));
            // Only a request that never reached `p` may go to the next
            // primary: one that may have run there would run twice (a
            // duplicate sibling), or be reported failed after it landed.
            match tokio::time::timeout_at(deadline, call).await {
                Ok(Ok(PeerResponse::Forwarded(r))) => return r,
                Ok(Ok(other)) => failures.push(format!("{}: {other:?}", p.name)),
                Ok(Err(e @ TransportError::Unreachable(..))) => failures.push(e.to_string()),
                Ok(Err(e @ TransportError::Failed(..))) => {
                    return Response::Error(WireError::new(
                        ErrorKind::Timeout,
                        format!("{e}; the request may have been applied there"),
                    ))
                }
                Err(_) => {
                    return Response::Error(WireError::new(
                        ErrorKind::Timeout,
                        format!(
                            "{} did not answer in time; the request may have been applied there",
                            p.name
                        ),
                    ))
                }
            }
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
            primaries.iter().partition(|p| self.is_up(p.id));
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
        &self,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        context: Option<CausalContext>,
        options: RequestOptions,
        view: &View,
    ) -> Result<Response, WireError> {
        let s = &self.inner.settings;
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
        let ctx: VersionVector = match &context {
            Some(c) => decode_context(&c.0, max_context_entries(s))
                .map_err(|e| WireError::new(ErrorKind::BadRequest, e.to_string()))?,
            None => VersionVector::new(),
        };
        let primaries = view.preference_list(&key, s.n as usize);
        self.check_primaries_up(&primaries, pw, "PW", "nothing was written")?;
        let me = self.inner.me.id;
        let (object, dot) = self.local_write(&key, &ctx, value)?;
        let reply = Response::Written(PutReply {
            context: CausalContext(encode_context(&object.reply_context(&ctx, dot))),
            siblings: object.values().count() as u32,
        });
        let others: Vec<MemberInfo> = primaries.iter().filter(|m| m.id != me).cloned().collect();
        let mut answers = self.sloppy_fan_out(view, &key, &others, ReplicaOp::Put(object));
        let mut tally = Tally::default();
        tally.ok.push(self.inner.me.name.clone());
        tally.primaries = 1;
        tally
            .collect(&mut answers, others.len(), w, pw, deadline, drop)
            .await;
        tally.result(w, pw, "write", reply)
    }

    async fn get(
        &self,
        key: &[u8],
        options: RequestOptions,
        view: &View,
    ) -> Result<Response, WireError> {
        let s = &self.inner.settings;
        let r = self.quorum(options.r, s.r, "R", 1)?;
        let pr = self.quorum(options.pr, s.pr, "PR", 0)?;
        if pr > r {
            return Err(WireError::new(
                ErrorKind::BadRequest,
                format!("PR={pr} exceeds R={r}"),
            ));
        }
        let deadline = self.deadline(&options);
        let primaries = view.preference_list(key, s.n as usize);
        self.check_primaries_up(&primaries, pr, "PR", "nothing was read")?;
        let mut answers = self.sloppy_fan_out(view, key, &primaries, ReplicaOp::Get);
        let mut heard: Vec<Heard> = Vec::new();
        let mut tally = Tally::default();
        tally
            .collect(&mut answers, primaries.len(), r, pr, deadline, |reply| {
                heard.extend(Heard::from_reply(reply))
            })
            .await;
        let merged = Heard::merge_all(&heard);
        let reply = Response::Value(GetReply {
            values: merged.values().map(|v| Value(v.to_vec())).collect(),
            context: CausalContext(encode_context(&merged.context())),
        });
        let outstanding = primaries.len() - tally.heard;
        let node = self.clone();
        let key = key.to_vec();
        tokio::spawn(async move {
            node.read_repair(key, heard, answers, outstanding).await;
        });
        tally.result(r, pr, "read", reply)
    }

    /// Collects the answers still outstanding (for at most the read-repair
    /// window), then sends the merge of everything heard to every primary
    /// whose copy lacks part of it.
    async fn read_repair(
        &self,
        key: Vec<u8>,
        mut heard: Vec<Heard>,
        mut answers: mpsc::UnboundedReceiver<Reply>,
        mut outstanding: usize,
    ) {
        let window = Instant::now() + self.inner.settings.read_repair_window;
        while outstanding > 0 {
            match tokio::time::timeout_at(window, answers.recv()).await {
                Ok(Some(reply)) => {
                    outstanding -= 1;
                    heard.extend(Heard::from_reply(reply));
                }
                _ => break,
            }
        }
        let merged = Heard::merge_all(&heard);
        if merged == Object::default() {
            return;
        }
        for h in &heard {
            if !h.primary || h.object.as_ref().is_some_and(|o| o.descends(&merged)) {
                continue;
            }
            let request = PeerRequest::ReplicaPut {
                key: key.clone(),
                object: merged.clone(),
            };
            match self.replica_call(&h.from, request).await {
                Ok(PeerResponse::Stored) => {
                    self.inner
                        .metrics
                        .read_repairs
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(replica = %h.from.name, key = %hex::encode(&key), "read repair");
                }
                other => {
                    warn!(replica = %h.from.name, answer = ?other, "read repair failed")
                }
            }
        }
    }

    async fn inspect(&self, key: &[u8], view: &View) -> Response {
        let primaries = view.preference_list(key, self.inner.settings.n as usize);
        let mut answers = self.fan_out(&primaries, PeerRequest::ReplicaGet { key: key.to_vec() });
        let deadline = self.deadline(&RequestOptions::default());
        let mut replicas: Vec<ReplicaReport> = primaries
            .iter()
            .map(|m| ReplicaReport {
                node: m.name.clone(),
                id: m.id,
                object: None,
                error: Some("no answer".into()),
            })
            .collect();
        for _ in 0..primaries.len() {
            let Ok(Some((member, answer))) =
                tokio::time::timeout_at(deadline, answers.recv()).await
            else {
                break;
            };
            let slot = replicas
                .iter_mut()
                .find(|r| r.id == member.id)
                .expect("answer from a target");
            match answer {
                Ok(PeerResponse::Object(o)) => {
                    slot.object = o.map(|o| object_view(&o, view));
                    slot.error = None;
                }
                Ok(other) => slot.error = Some(format!("{other:?}")),
                Err(e) => slot.error = Some(e.to_string()),
            }
        }
        // Hints for the key, wherever they wait: ask every member that is up.
        let holders: Vec<MemberInfo> = view
            .members
            .values()
            .filter(|m| self.is_up(m.id))
            .cloned()
            .collect();
        let mut hint_answers = self.fan_out(&holders, PeerRequest::HintsOf { key: key.to_vec() });
        let mut hints = Vec::new();
        for _ in 0..holders.len() {
            let Ok(Some((holder, answer))) =
                tokio::time::timeout_at(deadline, hint_answers.recv()).await
            else {
                break;
            };
            if let Ok(PeerResponse::Hints(held)) = answer {
                hints.extend(held.iter().map(|(for_node, o)| HintReport {
                    holder: holder.name.clone(),
                    for_node: view.name_of(for_node),
                    object: object_view(o, view),
                }));
            }
        }
        hints.sort_by(|a, b| (&a.holder, &a.for_node).cmp(&(&b.holder, &b.for_node)));
        Response::Inspect(InspectReport {
            partition: view.ring.partition_of(key),
            replicas,
            hints,
        })
    }

    fn status(&self) -> NodeStatus {
        let me = &self.inner.me;
        let view = self.inner.membership.view();
        NodeStatus {
            id: me.id,
            name: me.name.clone(),
            client_addr: me.client_addr,
            peer_addr: me.peer_addr,
            pid: std::process::id(),
            ring_ready: view.is_some(),
            partitions_owned: view.map_or(0, |v| v.ring.partitions_of(me.id).len() as u32),
            waiting_for: self.inner.membership.missing_names(),
            peers: self.peer_views(),
            metrics_addr: self.inner.metrics_addr.get().copied(),
            hints_pending: self.hint_queues(),
            hints_delivered: self.inner.metrics.hints_delivered.load(Ordering::Relaxed),
            anti_entropy: self.aae_status(),
            unreachable: {
                let addrs = self.inner.transport.unreachable();
                let members = self.inner.membership.expected();
                members
                    .into_iter()
                    .filter(|m| addrs.contains(&m.peer_addr))
                    .map(|m| m.name)
                    .collect()
            },
        }
    }
}

/// Readable name of an actor: `node1#3.17` is epoch 17 of node1's third
/// incarnation (see [`crate::version`]); the hex id if no member matches.
fn actor_name(actor: &NodeId, view: &View) -> String {
    let (prefix, incarnation, epoch) = Actors::parts(actor);
    view.members
        .values()
        .find(|m| Actors::node_prefix(&m.id) == prefix)
        .map_or_else(
            || actor.to_hex(),
            |m| format!("{}#{incarnation}.{epoch}", m.name),
        )
}

/// Readable form of an object, with node names instead of actor ids.
fn object_view(o: &Object, view: &View) -> ObjectView {
    ObjectView {
        clock: o
            .clock()
            .iter()
            .map(|(n, e)| (actor_name(n, view), e.counter))
            .collect(),
        siblings: o
            .siblings()
            .iter()
            .map(|s| SiblingView {
                dot: (actor_name(&s.dot.node, view), s.dot.counter),
                value: s.value.clone().map(Value),
                timestamp_ms: s.timestamp_ms,
            })
            .collect(),
    }
}

/// A key's fallbacks not taken yet, in ring order; worked out only when a
/// primary is down or fails (walking the ring is not free).
struct Fallbacks {
    view: View,
    key: Vec<u8>,
    n: usize,
    left: Option<VecDeque<MemberInfo>>,
}

impl Fallbacks {
    /// The next fallback the detector sees up.
    fn next_live<T: Transport, S: Store>(&mut self, node: &Node<T, S>) -> Option<MemberInfo> {
        let view = &self.view;
        let left = self.left.get_or_insert_with(|| {
            view.ring
                .fallbacks(&self.key, self.n)
                .iter()
                .filter_map(|id| view.members.get(id).cloned())
                .collect()
        });
        while let Some(m) = left.pop_front() {
            if node.is_up(m.id) {
                return Some(m);
            }
        }
        None
    }
}

/// What a sloppy fan-out asks of each replica.
#[derive(Clone)]
enum ReplicaOp {
    Get,
    Put(Object),
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
                object: object.clone(),
            },
            (ReplicaOp::Put(object), Some(for_primary)) => PeerRequest::HintPut {
                key,
                for_primary,
                object: object.clone(),
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
struct Reply {
    from: MemberInfo,
    for_primary: Option<MemberInfo>,
    result: Result<PeerResponse, TransportError>,
}

/// One replica's answer to a read, kept for read repair.
struct Heard {
    from: MemberInfo,
    /// A primary (fallbacks answer from hints and are not repaired).
    primary: bool,
    object: Option<Object>,
}

impl Heard {
    fn from_reply(reply: Reply) -> Option<Heard> {
        match reply.result {
            Ok(PeerResponse::Object(object)) => Some(Heard {
                from: reply.from,
                primary: reply.for_primary.is_none(),
                object,
            }),
            _ => None,
        }
    }

    fn merge_all(heard: &[Heard]) -> Object {
        let mut merged = Object::default();
        for o in heard.iter().filter_map(|h| h.object.as_ref()) {
            merged.merge(o);
        }
        merged
    }
}

/// Who answered a fan-out, and who did not and why.
#[derive(Default)]
struct Tally {
    ok: Vec<String>,
    /// How many of `ok` are primaries.
    primaries: u32,
    failed: Vec<String>,
    /// Replies read from the channel.
    heard: usize,
}

impl Tally {
    /// Reads replies until `need` replicas (`need_primaries` of them
    /// primaries) answered well, all `targets` replied, or the deadline
    /// passed. `seen` sees every good reply.
    async fn collect(
        &mut self,
        answers: &mut mpsc::UnboundedReceiver<Reply>,
        targets: usize,
        need: u32,
        need_primaries: u32,
        deadline: Instant,
        mut seen: impl FnMut(Reply),
    ) {
        while ((self.ok.len() as u32) < need || self.primaries < need_primaries)
            && self.heard < targets
        {
            match tokio::time::timeout_at(deadline, answers.recv()).await {
                Ok(Some(reply)) => {
                    self.heard += 1;
                    match &reply.result {
                        Ok(_) => {
                            match &reply.for_primary {
                                None => {
                                    self.primaries += 1;
                                    self.ok.push(reply.from.name.clone());
                                }
                                Some(p) => {
                                    self.ok.push(format!("{} for {}", reply.from.name, p.name))
                                }
                            }
                            seen(reply);
                        }
                        Err(e) => self.failed.push(e.to_string()),
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    self.failed
                        .push("deadline passed before the others answered".into());
                    break;
                }
            }
        }
    }

    fn result(
        self,
        need: u32,
        need_primaries: u32,
        what: &str,
        reply: Response,
    ) -> Result<Response, WireError> {
        if self.ok.len() as u32 >= need && self.primaries >= need_primaries {
            return Ok(reply);
        }
        let primaries = if need_primaries > 0 {
            format!(
                " ({need_primaries} of them primaries; {} primaries answered)",
                self.primaries
            )
        } else {
            String::new()
        };
        Err(WireError {
            kind: ErrorKind::Quorum,
            message: format!(
                "{what} needed {need} replicas{primaries}, {} answered ({}); failures: {}",
                self.ok.len(),
                self.ok.join(", "),
                self.failed.join("; ")
            ),
            answered: self.ok,
            needed: need,
        })
    }
}

impl<T: Transport, S: Store> Handler for Node<T, S> {
    async fn client(&self, request: Request) -> Response {
        self.coordinate(request, false).await
    }

    async fn peer(&self, from: String, request: PeerRequest) -> PeerResponse {
        if let Some(sender) = self.inner.membership.by_name(&from) {
            self.inner.transport.heard_from(&sender);
        }
        match request {
            PeerRequest::Hello(info) => {
                if info.name != from {
                    return PeerResponse::Error(format!("{from} said hello as {}", info.name));
                }
                self.learn(info);
                PeerResponse::Hello(self.inner.me.clone())
            }
            PeerRequest::Ping => PeerResponse::Pong,
            PeerRequest::Forward(request) => {
                PeerResponse::Forwarded(self.coordinate(request, true).await)
            }
            replica => self.peer_local(replica),
        }
    }
}
