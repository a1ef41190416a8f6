//! Anti-entropy: replicas compare their Merkle trees and repair the keys
//! that differ by merge. The trees themselves are the replica's (see
//! [`crate::replica::trees`]: kept up to date in the write path, rebuilt
//! from the store); this module is the exchange protocol and the loop that
//! runs it.
//!
//! # Exchanges
//! Every `anti-entropy.interval-ms` a node sweeps the partitions it holds,
//! one exchange at a time, with each other replica that is up and has a
//! higher node id (so each pair is exchanged once). The exchanges with a
//! peer are spread evenly over the first half of the interval: at once,
//! the 256 exchanges of a sweep took the 2-core bench machine's idle time
//! for a moment, every 10 s, and set the open-loop p99 of those seconds to
//! 10-24 ms. The protocol is
//! [`crate::net::AaeRequest`]: compare the 32 branch hashes (one round trip when in
//! sync), then the leaves of differing branches, then the (key, digest)
//! lists of differing segments (64 segments per request), then fetch the
//! peer's objects for the keys that differ (answers capped at
//! [`crate::net::BATCH_BYTES`], the rest asked again). The initiator merges them into its
//! copies and sends the peer the merged objects it lacks as a `Handoff`.
//! Repairs are paced to `anti-entropy.max-repairs-per-sec`. Exchanges, keys
//! repaired and bytes are in the metrics and in `shoal status --json`.
//!
//! # Lost copies
//! A copy lost to corruption is not restored by an exchange's merges (they
//! land in its partial copy) but by [`AntiEntropy::restore_lost`] (see
//! `restore`), at the start of every sweep and as soon as one is found
//! (once the sweep or reaper slice in progress, if any, is over).
//!
//! # Tombstones
//! See [`crate::reaper`]: the same loop ([`AntiEntropy::run`]) has the
//! reaper delete, every `reap-interval-ms`, tombstones older than
//! `tombstone-grace-secs` that every primary holds exactly.

mod exchange;
mod restore;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_client::proto::{AaeStatus, PartitionSync};
use shoal_ring::NodeId;
use tokio::sync::watch;
use tracing::{debug, info, warn};

pub use exchange::{answer, answer_on_worker};

use crate::liveness::Liveness;
use crate::membership::Membership;
use crate::metrics::Metrics;
use crate::net::{PeerError, Transport, TransportError};
use crate::reaper::Reaper;
use crate::replica::Replica;
use crate::storage::{Store, StoreError};

// The trees are the replica's; these names stay here too, where exchanges
// and their tests have always found them.
pub use crate::replica::trees::{
    digest, index_key, segment_of, PartitionTree, Trees, BRANCHES, BRANCH_WIDTH, SEGMENTS,
};

/// Anti-entropy settings, from the config's `[anti-entropy]`.
#[derive(Debug, Clone, Copy)]
pub struct AaeSettings {
    pub interval: Duration,
    pub rebuild_every: Duration,
    pub rebuild_keys_per_sec: u32,
    pub reap_keys_per_sec: u32,
    pub max_repairs_per_sec: u32,
    pub tombstone_grace: Duration,
    /// How long a reaped tombstone still fences the copies of its key read
    /// before the reap (see [`crate::replica`]'s `fence`): the longest a
    /// message may stay in flight.
    pub reap_fence: Duration,
    /// Pause between two reaper passes.
    pub reap_every: Duration,
    /// How long one exchange step may wait for the peer's answer
    /// (`timeouts.request-ms`).
    pub call_timeout: Duration,
}

impl AaeSettings {
    pub fn from_config(c: &crate::config::Config) -> Self {
        let call_timeout = Duration::from_millis(c.timeouts.request_ms);
        let reap_fence = Duration::from_millis(c.in_flight_ms());
        let c = &c.anti_entropy;
        AaeSettings {
            interval: Duration::from_millis(c.interval_ms),
            rebuild_every: Duration::from_secs(c.rebuild_secs),
            rebuild_keys_per_sec: c.rebuild_keys_per_sec,
            reap_keys_per_sec: c.reap_keys_per_sec,
            max_repairs_per_sec: c.max_repairs_per_sec,
            tombstone_grace: Duration::from_secs(c.tombstone_grace_secs),
            reap_fence,
            reap_every: Duration::from_millis(c.reap_interval_ms),
            call_timeout,
        }
    }
}

/// What one exchange did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExchangeReport {
    /// Keys whose copies differed and were merged on one side or both.
    pub keys_repaired: u64,
    /// Encoded bytes of every request and answer of the exchange.
    pub bytes: u64,
    /// Segments whose leaves differed.
    pub segments: u64,
}

impl std::ops::AddAssign for ExchangeReport {
    fn add_assign(&mut self, r: ExchangeReport) {
        self.keys_repaired += r.keys_repaired;
        self.bytes += r.bytes;
        self.segments += r.segments;
    }
}

/// Why an exchange stopped. What it repaired before stays repaired.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("anti-entropy trees are not built yet")]
    TreesNotReady,
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("{peer} refused an exchange step: {error}")]
    Refused { peer: String, error: PeerError },
    #[error("{peer}: unexpected answer to the {step} step: {answer}")]
    BadAnswer {
        peer: String,
        step: &'static str,
        answer: String,
    },
    #[error("{peer}: repair not stored: {answer}")]
    RepairNotStored { peer: String, answer: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A peer's part of a sweep's repair rate, given up when dropped (its
/// sweep ended, or was abandoned).
struct Sharing<'a>(&'a std::sync::atomic::AtomicU32);

impl Drop for Sharing<'_> {
    fn drop(&mut self) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }
}

/// The exchange service: the handles it needs and the last exchange of
/// each partition (for `shoal status`).
pub struct AntiEntropy<T, S> {
    pub me: NodeId,
    pub settings: AaeSettings,
    /// Replicas per key.
    pub n: usize,
    pub replica: Arc<Replica<S>>,
    pub transport: Arc<T>,
    pub liveness: Arc<dyn Liveness>,
    pub membership: Arc<Membership>,
    pub metrics: Arc<Metrics>,
    /// Last exchange per partition: (peer, unix ms, keys repaired).
    pub last: Mutex<BTreeMap<u32, (String, u64, u64)>>,
    /// Peers a sweep is exchanging with at once: they share
    /// `max-repairs-per-sec` (readers take at least 1).
    pub sweeping: std::sync::atomic::AtomicU32,
}

impl<T: Transport, S: Store> AntiEntropy<T, S> {
    /// The deadline of a peer call made now that moves about `bytes`.
    fn deadline(&self, bytes: usize) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.settings.call_timeout + crate::net::transfer_time(bytes)
    }

    /// One sweep: every partition this node replicates, exchanged with each
    /// other replica that is up and has a higher id (so each pair is
    /// exchanged by one side). Peers are swept at once, each its partitions
    /// one exchange at a time, so a silent peer (every step has a deadline)
    /// holds up only its own exchanges.
    pub async fn sweep(&self) -> ExchangeReport {
        self.sweep_over(Duration::ZERO).await
    }

    /// A [`Self::sweep`] whose exchanges with each peer start evenly spread
    /// over `spread` (an exchange that takes longer delays the next ones).
    async fn sweep_over(&self, spread: Duration) -> ExchangeReport {
        self.restore_lost().await;
        let mut total = ExchangeReport::default();
        let Some(view) = self.membership.view() else {
            return total;
        };
        if !self.replica.trees_ready() {
            return total;
        }
        let me = self.me;
        let mut by_peer: BTreeMap<NodeId, Vec<u32>> = BTreeMap::new();
        for p in 0..view.ring.partition_count() {
            let replicas = view.ring.preference_list_for_partition(p, self.n);
            if replicas.contains(&me) {
                for peer in replicas.into_iter().filter(|id| *id > me) {
                    by_peer.entry(peer).or_default().push(p);
                }
            }
        }
        // `max-repairs-per-sec` is shared by the peers exchanged with at
        // once: not one the detector sees down (never swept), and a peer
        // leaves the share when its sweep ends.
        by_peer.retain(|peer, _| self.liveness.is_up(*peer));
        self.sweeping
            .store(by_peer.len().max(1) as u32, Ordering::Relaxed);
        let sweeps = by_peer.into_iter().filter_map(|(peer, partitions)| {
            let member = view.members.get(&peer)?.clone();
            Some(async move {
                let _sharing = Sharing(&self.sweeping);
                let mut report = ExchangeReport::default();
                let began = tokio::time::Instant::now();
                let count = partitions.len() as u32;
                for (i, p) in (0u32..).zip(partitions) {
                    if !spread.is_zero() {
                        tokio::time::sleep_until(began + spread * i / count).await;
                    }
                    // Asked again per exchange: a peer that went down
                    // meanwhile is left for the next sweep.
                    if !self.liveness.is_up(member.id) {
                        break;
                    }
                    match self.exchange(p, &member).await {
                        Ok(r) => report += r,
                        // Silent or unreachable: its other partitions wait
                        // for the next sweep instead of a deadline each.
                        Err(e @ ExchangeError::Transport(_)) => {
                            debug!(partition = p, peer = %member.name, error = %e, "exchange failed; peer left for the next sweep");
                            break;
                        }
                        Err(e) => {
                            debug!(partition = p, peer = %member.name, error = %e, "exchange failed")
                        }
                    }
                }
                report
            })
        });
        for report in futures_util::future::join_all(sweeps).await {
            total += report;
        }
        self.sweeping.store(1, Ordering::Relaxed);
        total
    }

    /// Anti-entropy as `shoal status` shows it.
    pub fn status(&self) -> AaeStatus {
        let last = self.last.lock().expect("last exchanges lock");
        let m = &self.metrics;
        AaeStatus {
            trees_ready: self.replica.trees_ready(),
            exchanges: m.aae_exchanges.load(Ordering::Relaxed),
            keys_repaired: m.aae_keys_repaired.load(Ordering::Relaxed),
            bytes: m.aae_bytes.load(Ordering::Relaxed),
            partitions: last
                .iter()
                .map(|(p, (peer, at_ms, repaired))| PartitionSync {
                    partition: *p,
                    peer: peer.clone(),
                    at_ms: *at_ms,
                    repaired: *repaired,
                })
                .collect(),
        }
    }

    /// Rebuilds the trees now and then every `rebuild_every`, sweeps every
    /// `interval`, and has `reaper` reap every `reap_every`, until `stop`
    /// turns true. One task, so a sweep and a reaping pass never overlap.
    pub async fn run(&self, reaper: &Reaper<T, S>, mut stop: watch::Receiver<bool>) {
        let settings = self.settings;
        let mut next_rebuild = tokio::time::Instant::now();
        let mut next_reap = tokio::time::Instant::now();
        // The first sweep waits one interval: a node that just started
        // lets handoff and read repair act first.
        let mut next_sweep = tokio::time::Instant::now() + settings.interval;
        loop {
            // A corrupt record whose index entry was unreadable left the
            // trees unsure: rebuilt now rather than at the daily turn.
            if tokio::time::Instant::now() >= next_rebuild || self.replica.take_rebuild_request() {
                match self
                    .replica
                    .rebuild_trees(settings.rebuild_keys_per_sec)
                    .await
                {
                    Ok(keys) => info!(keys, "anti-entropy trees built"),
                    // RocksDB's own checksum failed on a block: a scan cannot
                    // read past it. Keys in it are restored one by one as
                    // they are read; the whole store only by a refill.
                    Err(e @ StoreError::Corruption { tree: "?", .. }) => tracing::error!(
                        error = %e,
                        "the store has a corrupt block: anti-entropy cannot rebuild its trees \
                         (retried later). Reads restore its keys one by one from the replicas; \
                         to restore all, stop this node, move its data directory away and start \
                         it again: it rejoins empty and anti-entropy refills it"
                    ),
                    Err(e) => warn!(error = %e, "anti-entropy rebuild failed; retried later"),
                }
                next_rebuild = tokio::time::Instant::now() + settings.rebuild_every;
            }
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                // A copy just found lost is restored now, not at the next
                // sweep; the sweep keeps its time.
                _ = self.replica.lost_found() => {
                    self.restore_lost().await;
                    continue;
                }
                _ = tokio::time::sleep_until(next_sweep) => self.replica.timer_fired("anti-entropy"),
            }
            let began = tokio::time::Instant::now();
            let sweep = self.sweep_over(settings.interval / 2);
            // A copy found lost meanwhile is restored when the sweep ends
            // (the select above): running it inside the sweep would hold
            // an exchange's answer unread for as long as the restore takes,
            // and a stale answer merged after a reap could bring a deleted
            // key back.
            let swept = tokio::select! {
                biased;
                _ = stop.changed() => return,
                swept = sweep => swept,
            };
            next_sweep = began + settings.interval;
            if swept.keys_repaired > 0 {
                info!(
                    repaired = swept.keys_repaired,
                    bytes = swept.bytes,
                    "anti-entropy sweep"
                );
            }
            // A pass is slow (`reap-keys-per-sec`): it goes on in slices of
            // at most half an interval after each sweep, so that the sweeps
            // keep their pace. A slice that may not reap (a member down, a
            // layout change) leaves the pass where it was for the next.
            if tokio::time::Instant::now() >= next_reap {
                let slice_end = tokio::time::Instant::now() + settings.interval / 2;
                let (_, slice) = reaper.reap_until(Some(slice_end)).await;
                if slice == crate::reaper::Slice::Over {
                    next_reap = tokio::time::Instant::now() + settings.reap_every;
                }
            }
        }
    }
}
