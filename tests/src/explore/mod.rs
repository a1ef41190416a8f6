//! A seeded, deterministic simulation of whole clusters that explores, with
//! an oracle (issue 10, item 2).
//!
//! One seed decides everything: the cluster size (3 to 5 nodes), each
//! node's clock skew, the random network faults, the workload and the
//! schedule of named faults. The real components run in one process on a
//! single-threaded tokio runtime with paused time: [`shoal_node::coordinator::Node`]s over
//! [`shoal_node::net::sim::SimNetwork`] (each request delivered into a task
//! of the receiving node; lost, duplicated, delayed and reordered messages,
//! answers lost after the request was applied, partitions one way or both)
//! and [`shoal_node::storage::MemoryStore`] (with the unsynced tail a power
//! loss can lose), each node running the production background loops of
//! [`shoal_node::server::start_background`] with short intervals. Node
//! clocks are [`shoal_node::clock::Clock::tokio`] plus a per-node skew.
//!
//! # A run
//! 1. Start the cluster; let it identify its members.
//! 2. Clients (3 to 5 tasks, 200+ operations in all, 4 to 10 keys so they
//!    collide) issue blind puts, read-modify-writes (a get, then a put or a
//!    delete with its context), writes with a context kept from long
//!    before, and writes with the previous write's reply context (a
//!    re-create when that write was a delete), each at a random node, each
//!    value unique. A nemesis meanwhile injects at least
//!    [`workload::MIN_FAULTS`] named faults: crashes (kill -9: tasks
//!    aborted, the node rebuilt from its store by the normal start path),
//!    clean stops (a crash that seals the replica, so that the next start
//!    goes on under the same actors; half of them leave the node serving,
//!    sealed, until the next draw, as a stop's stragglers would), power
//!    losses (a crash or clean stop that also loses the unsynced tail),
//!    partitions
//!    and one-way cuts, heals, and (with `--corruption-percent`) a record
//!    made to fail its checksum: an object or a hint. In a share of the
//!    seeds an operator ([`operator`]) meanwhile makes one or two
//!    membership changes: a join (a new machine), a leave, a remove (of a
//!    machine destroyed for good), each staged, planned and committed.
//! 3. Faults stop: random faults off, partitions healed, every node running.
//!    The cluster stays quiet until no hint is left and every key's
//!    primaries agree (at most [`QUIET_MAX`]); background loops stop.
//! 4. The oracle ([`oracle`]): every running node on the same layout with
//!    no change in transition, and a key held by its primaries only (old
//!    copies dropped); a member that left has removed itself; every
//!    acknowledged write is present unless a context that saw it
//!    superseded it; nothing never written appears; a
//!    value an acknowledged write or delete superseded (its context's read
//!    saw it) is absent; all primaries hold identical objects (siblings
//!    and shared counters, in seeds that prune clocks); no copy is
//!    left lost to corruption; no hints remain; every live Merkle tree
//!    equals a rebuild.
//!
//! # Fault envelope
//! Inside it the oracle must hold for every seed:
//! - at most one power loss per seed: with W = 2 that is at most W-1 = 1
//!   permanent loss (of the unsynced tail, whole batches) per key between
//!   re-replications; a seed whose nemesis drew more steps outside; a
//!   corrupted record is such a loss too (of one copy), so a seed with a
//!   corruption and a power loss is outside;
//! - power loss only through the modelled unsynced tail (the OS flushes
//!   every [`world::SYNC_EVERY`]); a crash without power loss loses nothing;
//! - at most one node down at a time (two in a tenth of the seeds), each
//!   for at most [`workload::MAX_DOWN`], which is *longer* than the
//!   tombstone grace ([`world::TOMBSTONE_GRACE`], reaper every
//!   [`world::REAP_EVERY`]): the design promises that nothing older than
//!   the grace (a hint, a node back from a long absence) brings a reaped
//!   delete back, so a fallback that is down across a reap is inside;
//! - every fault ends before the quiet period; no node is lost for good;
//! - clocks are pruned only with `--pruning-percent`, past 1 or 2
//!   entries once they are 10 to 15 s old: the design promises nothing
//!   of a copy that comes back after the minimum age (a day by default),
//!   and a node stays down at most 6 s, but a partition may last the
//!   whole fault phase, so such seeds may fail by design (seed 154747 at
//!   `--pruning-percent 20`: a replica cut off for 12 s got back a
//!   value whose delete the others had pruned the entry of); they are
//!   counted outside the envelope, their failures listed. Replicas
//!   may keep different clock entries (each keeps those of its own
//!   actors), so in these seeds the primaries must hold identical
//!   siblings and the same counter for every actor both clocks hold, not
//!   identical clocks;
//! - the tombstone grace is no shorter than the config accepts for the
//!   simulation's timeouts (a request's timeout, the read-repair window and
//!   the network's loss timeout), as `Config::validate` demands in production.
//!
//! Seeds outside the envelope are run and checked like the others; their
//! violations are reported and counted apart, never filtered out.
//!
//! # Diagnosis
//! Each violation carries a guess at its family, from the history:
//! - **A**: an acknowledged write lost to a later write whose context is
//!   older than a reap of the key (the coordinator minted the reaped
//!   key's dots again, and the old context covers them);
//! - **B**: a value an acknowledged delete or write superseded is back
//!   after the key was reaped (an older copy, e.g. a hint on a fallback
//!   that was down across the reap, handed off afterwards);
//! - **D**: an acknowledged write lost after a power loss of a primary (a
//!   dot minted again once the unsynced tail was lost);
//! - **F**: a superseded value back because the write was applied again
//!   after what superseded it completed (a forwarded put retried on another
//!   primary after its answer was lost);
//! - **P**: an acknowledged write lost in a seed that prunes clocks (a
//!   coordinator whose entry was pruned mints its dots again);
//! - **lost**: an acknowledged write lost otherwise (so far: A's and B's
//!   causes together: a copy from before a reap, such as a hint the
//!   coordinator kept for a primary it could not reach, handed off after
//!   the reap, whose clock covers the dots minted again since).
//!
//! The report prints the key's history, what each primary holds and the
//! faults, which is the evidence.
//!
//! # Replay
//! The trace hash folds every send, delivery, answer, loss, named fault,
//! background timer firing (each node's heartbeat, handoff, anti-entropy and
//! hello timers, through `Clock::with_timer_trace`) and client result, in order, with its simulated time. A seed gives one hash;
//! `SHOAL_SEED=n cargo test -p shoal-tests --test explore replay --
//! --nocapture` (or `shoal-sim --seed n --verbose`) replays it.

pub mod operator;
pub mod oracle;
pub mod workload;
pub mod world;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_node::config::SpareReads;
use shoal_node::net::sim::{ChaosConfig, SimNetwork, SimRng};

use oracle::Violation;
use workload::{FaultStats, Shared};
use world::World;

/// The quiet period lasts at least this, and at most `QUIET_MAX`.
pub const QUIET_MIN: Duration = Duration::from_secs(5);
pub const QUIET_MAX: Duration = Duration::from_secs(60);

/// The fault envelope, as printed by the runner.
pub const ENVELOPE: &str = "fault envelope: <= 1 power loss or corrupted record per seed (W-1 permanent losses per key), \
power loss only through the unsynced tail (OS flush every 1 s), <= 1 node down at a time (2 in 10% of seeds), \
each down <= 6 s (tombstone grace 1 s, reaper every 0.5 s), all faults healed before a quiet period; \
clock pruning only with --pruning-percent; spare reads only when the quorum is slow in 30% of seeds by default; \
membership changes (1 or 2 joins, leaves, removes, one at a time) in 30% of seeds, a remove destroying its machine \
for good (counted as the seed's one permanent loss)";

/// What to explore.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Odds (percent) that a crash is a power loss.
    pub power_loss_percent: u64,
    /// Keep the text of every traced event (replays).
    pub trace_log: bool,
    /// Clients reuse a write's reply context even when the reply counts
    /// siblings they never saw (off: only when it counts none besides the
    /// write's own, which is what the SDK documents).
    pub any_reply_context: bool,
    /// Odds (percent) that a seed prunes clocks hard: past 1 or 2
    /// entries, once older than 10 to 15 s, longer than a node stays
    /// down; the others never prune. Off by default: a partition may last
    /// the whole fault phase, longer than that minimum age, and a copy
    /// out of reach longer than the minimum age may bring back a value
    /// whose supersession was pruned, as the design allows (see the
    /// module doc).
    pub pruning_percent: u64,
    /// Odds (percent) that a seed's nemesis corrupts one record (an object
    /// or a hint). Off by default: 0 draws nothing, so the default seeds'
    /// schedules and trace hashes stay as they were.
    pub corruption_percent: u64,
    /// Odds (percent) that a seed's operator makes membership changes
    /// (joins, leaves, removes; see [`operator`]). Drawn from a generator
    /// of its own, so the other seeds' schedules stay as they were.
    pub membership_percent: u64,
    /// Odds (percent) that a seed's nodes read with
    /// `cluster.spare-reads = "when-slow"`. Drawn from a generator of its
    /// own, so the other draws stay as they were.
    pub spare_reads_percent: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            power_loss_percent: 20,
            trace_log: false,
            any_reply_context: false,
            pruning_percent: 0,
            corruption_percent: 0,
            membership_percent: 30,
            spare_reads_percent: 30,
        }
    }
}

/// What one seed did and found.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub seed: u64,
    pub nodes: usize,
    /// The clock pruning bounds, if this seed prunes.
    pub pruning: Option<(usize, u64)>,
    pub spare_reads: SpareReads,
    pub keys: usize,
    pub ops: usize,
    pub acked_writes: usize,
    pub faults: FaultStats,
    pub trace_hash: u64,
    pub events: u64,
    pub sim_ms: u64,
    /// Why the seed stepped outside the fault envelope, if it did.
    pub outside: Option<String>,
    pub violations: Vec<Violation>,
    /// The history of each key with a violation, and the faults.
    pub report: String,
    pub trace_log: Vec<String>,
}

impl Outcome {
    pub fn failed(&self) -> bool {
        !self.violations.is_empty()
    }

    pub fn summary(&self) -> String {
        format!(
            "seed {}: {} nodes{}{}, {} keys, {} ops ({} writes acked), {} faults {:?}, {:.1} s simulated, \
             {} events, trace hash {:016x}{}{}",
            self.seed,
            self.nodes,
            self.pruning.map_or(String::new(), |(n, ms)| format!(
                " (clocks pruned past {n} entries, {ms} ms)"
            )),
            match self.spare_reads {
                SpareReads::Always => "",
                SpareReads::WhenSlow => " (spare reads when slow)",
            },
            self.keys,
            self.ops,
            self.acked_writes,
            self.faults.total(),
            self.faults,
            self.sim_ms as f64 / 1000.0,
            self.events,
            self.trace_hash,
            self.outside
                .as_ref()
                .map_or(String::new(), |w| format!(", OUTSIDE the envelope ({w})")),
            if self.failed() {
                format!(", {} VIOLATIONS", self.violations.len())
            } else {
                String::new()
            }
        )
    }
}

/// Runs one seed on a fresh single-threaded runtime with paused time.
pub fn run_seed(seed: u64, options: Options) -> Outcome {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a tokio runtime");
    let outcome = rt.block_on(simulate(seed, options));
    // Leftover tasks of crashed nodes die with the runtime.
    rt.shutdown_background();
    outcome
}

async fn simulate(seed: u64, options: Options) -> Outcome {
    let origin = tokio::time::Instant::now();
    let mut rng = SimRng::new(seed);
    let net = SimNetwork::new();
    if options.trace_log {
        net.keep_trace_log();
    }
    let size = rng.range(3, 5) as usize;
    let keys = rng.range(4, 10) as usize;
    let clients = rng.range(3, 5) as usize;
    let scale = [0.0, 0.5, 1.0, 2.0][rng.below(4) as usize];
    net.set_chaos(Some((
        SimRng::new(rng.next_u64()),
        ChaosConfig {
            latency: (Duration::from_micros(200), Duration::from_millis(3)),
            slow: 0.05 * scale,
            slow_by: Duration::from_millis(300),
            drop_request: 0.01 * scale,
            drop_reply: 0.01 * scale,
            duplicate: 0.01 * scale,
            loss_timeout: Duration::from_millis(1000),
        },
    )));
    let pruning = (rng.below(100) < options.pruning_percent)
        .then(|| (rng.range(1, 2) as usize, rng.range(10_000, 15_000)));
    let mut corrupt = options.corruption_percent > 0 && rng.below(100) < options.corruption_percent;
    let mut changes_rng = SimRng::new(seed ^ 0x6d65_6d62_6572_7321);
    let changes = if changes_rng.below(100) < options.membership_percent {
        operator::draw(&mut changes_rng, size)
    } else {
        Vec::new()
    };
    // A machine destroyed for good is the one permanent loss a key may
    // take (W-1 with W=2): such seeds draw no power loss or corruption.
    let mut power_loss_percent = options.power_loss_percent;
    if changes.contains(&operator::Change::Remove) {
        power_loss_percent = 0;
        corrupt = false;
    }
    let spare_reads =
        if SimRng::new(seed ^ 0x7370_6172_6573_2121).below(100) < options.spare_reads_percent {
            SpareReads::WhenSlow
        } else {
            SpareReads::Always
        };
    let world = World::new(net.clone(), size, &mut rng, pruning, spare_reads);
    let shared = Arc::new(Shared {
        seed,
        net: net.clone(),
        world: Mutex::new(world),
        history: Mutex::new(Vec::new()),
        faults: Mutex::new(Vec::new()),
        power_losses: Mutex::new(Vec::new()),
        origin,
        keys,
        any_reply_context: options.any_reply_context,
    });
    // Let the members identify each other and the detectors settle.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let syncer = tokio::spawn(workload::syncer(shared.clone()));
    let total_ops = rng.range(200, 300) as usize;
    let done = Arc::new(AtomicBool::new(false));
    let nemesis = tokio::spawn(workload::nemesis(
        shared.clone(),
        SimRng::new(rng.next_u64()),
        done.clone(),
        power_loss_percent,
        corrupt,
    ));
    let operator = (!changes.is_empty()).then(|| {
        tokio::spawn(operator::operator(
            shared.clone(),
            changes_rng,
            changes,
            done.clone(),
        ))
    });
    let mut tasks = Vec::new();
    for c in 0..clients {
        let ops = total_ops / clients + usize::from(c < total_ops % clients);
        tasks.push(tokio::spawn(workload::client(
            shared.clone(),
            c,
            ops,
            SimRng::new(rng.next_u64()),
        )));
    }
    for t in tasks {
        t.await.expect("a client");
    }
    done.store(true, Ordering::SeqCst);
    let mut faults = nemesis.await.expect("the nemesis");

    // Faults stop; the cluster goes quiet.
    net.set_chaos(None);
    net.heal();
    {
        let mut w = shared.world.lock().expect("world lock");
        for i in 0..size {
            if !w.is_up(i) {
                w.start(i);
            }
        }
    }
    net.note(|| "faults stop".into());
    let quiet_start = tokio::time::Instant::now();
    let mut stable = 0;
    while quiet_start.elapsed() < QUIET_MAX {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // An operator still committing its last change keeps it from quiet.
        let ok = operator.as_ref().is_none_or(|o| o.is_finished())
            && oracle::converged(
                &shared.world.lock().expect("world lock"),
                keys,
                pruning.is_some(),
            );
        stable = if ok { stable + 1 } else { 0 };
        if stable >= 2 && quiet_start.elapsed() >= QUIET_MIN {
            break;
        }
    }
    syncer.abort();
    if let Some(operator) = operator {
        if operator.is_finished() {
            faults.add_changes(operator.await.expect("the operator"));
        } else {
            operator.abort();
        }
    }
    shared.world.lock().expect("world lock").sync_all();
    let mut world = std::mem::replace(
        &mut *shared.world.lock().expect("world lock"),
        World::empty(net.clone()),
    );
    world.stop_background().await;
    // Let requests in flight finish.
    tokio::time::sleep(Duration::from_secs(2)).await;
    net.note(|| "checks".into());

    let history = shared.history.lock().expect("history lock").clone();
    let power_losses = shared.power_losses.lock().expect("power lock").clone();
    let mut violations = oracle::check(&world, keys, &history, &power_losses, pruning.is_some());
    for m in &world.machines {
        let Some(n) = &m.node else { continue };
        let nonzero = |t: shoal_node::antientropy::Trees| {
            let mut v: Vec<(u32, Vec<u64>)> = t
                .into_iter()
                .filter(|(_, t)| t.leaves().iter().any(|l| *l != 0))
                .map(|(p, t)| (p, t.leaves().to_vec()))
                .collect();
            v.sort();
            v
        };
        let live = nonzero(n.trees());
        if let Err(e) = n.rebuild_trees(u32::MAX).await {
            violations.push(Violation {
                family: "",
                rule: "every live Merkle tree equals a rebuild",
                key: None,
                detail: format!("{}: rebuild failed: {e}", m.me.name),
            });
            continue;
        }
        if live != nonzero(n.trees()) {
            violations.push(Violation {
                family: "",
                rule: "every live Merkle tree equals a rebuild",
                key: None,
                detail: format!("{}'s live trees differ from a rebuild", m.me.name),
            });
        }
    }

    let mut report = String::new();
    if !violations.is_empty() {
        for v in &violations {
            report.push_str(&format!(
                "  VIOLATION: {}{}: {}{}\n",
                v.rule,
                v.key.map_or(String::new(), |k| format!(" (key k{k})")),
                v.detail,
                if v.family.is_empty() {
                    String::new()
                } else {
                    format!("\n    diagnosis: {}", v.family)
                }
            ));
        }
        let mut bad: Vec<usize> = violations.iter().filter_map(|v| v.key).collect();
        bad.sort();
        bad.dedup();
        for k in bad {
            report.push_str(&oracle::explain(&world, k, &history));
        }
        report.push_str("  faults:\n");
        for f in shared.faults.lock().expect("faults lock").iter() {
            report.push_str(&format!("    {f}\n"));
        }
    }
    // Machines destroyed, whether or not their remove was committed.
    let destroyed = world.machines.iter().filter(|m| m.gone).count();
    let outside = (faults.power_losses + faults.corruptions + destroyed > 1).then(|| {
        format!(
            "{} power losses, {} corrupted records, {destroyed} machines destroyed",
            faults.power_losses, faults.corruptions
        )
    });
    // A partition may outlast the pruning seeds' minimum age (see the
    // module doc): what they find is reported, outside the envelope.
    let outside = outside.or_else(|| {
        pruning.map(|(_, ms)| format!("clocks pruned at {ms} ms, which a partition may outlast"))
    });
    let (trace_hash, events) = net.trace_hash();
    Outcome {
        seed,
        nodes: size,
        pruning,
        spare_reads,
        keys,
        ops: history.len(),
        acked_writes: history.iter().filter(|o| o.what != "get" && o.ok).count(),
        faults,
        trace_hash,
        events,
        sim_ms: origin.elapsed().as_millis() as u64,
        outside,
        violations,
        report,
        trace_log: net.take_trace_log(),
    }
}

/// Totals over a range of seeds.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    pub seeds: usize,
    pub failed: Vec<u64>,
    pub outside: usize,
    pub outside_failed: Vec<u64>,
    pub ops: usize,
    pub faults: usize,
    pub min_ops: usize,
    pub min_faults: usize,
    /// Per violation family (see [`Violation::family`]): seeds, and the
    /// first seed.
    pub families: std::collections::BTreeMap<String, (usize, u64)>,
}

impl Totals {
    fn add(&mut self, o: &Outcome) {
        if self.seeds == 0 {
            self.min_ops = usize::MAX;
            self.min_faults = usize::MAX;
        }
        self.seeds += 1;
        self.ops += o.ops;
        self.faults += o.faults.total();
        self.min_ops = self.min_ops.min(o.ops);
        self.min_faults = self.min_faults.min(o.faults.total());
        let mut fams: Vec<String> = o
            .violations
            .iter()
            .map(|v| {
                if v.family.is_empty() {
                    v.rule
                } else {
                    v.family
                }
            })
            .map(|f| f.split(' ').next().unwrap_or(f).to_string())
            .map(|f| {
                if o.outside.is_some() {
                    format!("{f} (outside)")
                } else {
                    f
                }
            })
            .collect();
        fams.sort();
        fams.dedup();
        for f in fams {
            let e = self.families.entry(f).or_insert((0, o.seed));
            e.0 += 1;
            e.1 = e.1.min(o.seed);
        }
        match (&o.outside, o.failed()) {
            (Some(_), true) => {
                self.outside += 1;
                self.outside_failed.push(o.seed);
            }
            (Some(_), false) => self.outside += 1,
            (None, true) => self.failed.push(o.seed),
            (None, false) => {}
        }
    }

    /// Adds the totals of another range.
    pub fn merge(&mut self, other: &Totals) {
        if other.seeds == 0 {
            return;
        }
        self.min_ops = if self.seeds == 0 {
            other.min_ops
        } else {
            self.min_ops.min(other.min_ops)
        };
        self.min_faults = if self.seeds == 0 {
            other.min_faults
        } else {
            self.min_faults.min(other.min_faults)
        };
        self.seeds += other.seeds;
        self.failed.extend(&other.failed);
        self.outside += other.outside;
        self.outside_failed.extend(&other.outside_failed);
        self.ops += other.ops;
        self.faults += other.faults;
        for (f, (n, first)) in &other.families {
            let e = self.families.entry(f.clone()).or_insert((0, *first));
            e.0 += n;
            e.1 = e.1.min(*first);
        }
    }

    pub fn line(&self, elapsed: Duration) -> String {
        format!(
            "{} seeds, {} failed (inside the envelope), {} outside the envelope ({} of them failed), \
             {} ops (min {} per seed), {} faults (min {} per seed), {:.1} s, {:.1} seeds/s; \
             by family (seeds, first seed): {:?}",
            self.seeds,
            self.failed.len(),
            self.outside,
            self.outside_failed.len(),
            self.ops,
            if self.seeds == 0 { 0 } else { self.min_ops },
            self.faults,
            if self.seeds == 0 { 0 } else { self.min_faults },
            elapsed.as_secs_f64(),
            self.seeds as f64 / elapsed.as_secs_f64().max(1e-9),
            self.families
        )
    }
}

/// Runs `seeds` on `jobs` threads; `each` sees every outcome (in completion
/// order) with the totals so far.
pub fn run_range(
    seeds: std::ops::Range<u64>,
    jobs: usize,
    options: Options,
    each: impl Fn(&Outcome, &Totals, Duration) + Sync,
) -> Totals {
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let totals = Mutex::new(Totals::default());
    let list: Vec<u64> = seeds.collect();
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(&seed) = list.get(i) else { break };
                let o = run_seed(seed, options);
                let mut t = totals.lock().expect("totals lock");
                t.add(&o);
                each(&o, &t, started.elapsed());
            });
        }
    });
    let mut t = totals.into_inner().expect("totals lock");
    t.failed.sort();
    t.outside_failed.sort();
    t
}
