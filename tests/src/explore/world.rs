//! The simulated cluster: real nodes over the simulated network and
//! in-memory stores, each running the production background loops, with
//! crash (kill -9), power loss (the unsynced tail) and restart through the
//! normal start path.

use std::sync::Arc;
use std::time::Duration;

use shoal_client::proto::MemberInfo;
use shoal_node::antientropy::AaeSettings;
use shoal_node::clock::Clock;
use shoal_node::config::{MemberConfig, SpareReads};
use shoal_node::coordinator::Settings;
use shoal_node::detector::DetectorConfig;
use shoal_node::handoff::HandoffSettings;
use shoal_node::net::sim::{SimNetwork, SimRng};
use shoal_node::storage::{MemoryStore, Store, Tree};
use shoal_ring::NodeId;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::sim::SimNode;

/// Partitions of the simulated ring: few, so sweeps are cheap and keys
/// share partitions.
pub const PARTITIONS: u32 = 16;
/// The tombstone grace period and the reaper's pace: short, so reaping
/// happens while faults are still going on, but no shorter than the config
/// accepts for these timeouts: a message may be in flight for the request
/// timeout (1.5 s), the read-repair window (0.2 s) and until the network
/// gives it up (1 s, its stand-in for an idle connection's end).
pub const TOMBSTONE_GRACE: Duration = Duration::from_secs(3);
pub const REAP_EVERY: Duration = Duration::from_millis(500);
/// How often the operating system flushes a node's WAL (what a power loss
/// can lose is what was written since).
pub const SYNC_EVERY: Duration = Duration::from_millis(1000);

/// Clock pruning bounds of a seed that prunes: (max entries, min age ms).
pub type Pruning = Option<(usize, u64)>;

/// The settings of every simulated node (its clock aside); `pruning`
/// overrides the clock bounds (the default, 50 entries and a day, never
/// prunes in a simulation).
pub fn sim_settings(clock: Clock, pruning: Pruning, spare_reads: SpareReads) -> Settings {
    let (clock_max_entries, clock_min_age_ms) = pruning.unwrap_or((50, 86_400_000));
    Settings {
        n: 3,
        r: 2,
        w: 2,
        pr: 0,
        pw: 0,
        spare_reads,
        max_value_bytes: 1024,
        max_siblings: 100,
        max_object_bytes: 64 << 20,
        request_timeout: Duration::from_millis(1500),
        gossip: Duration::from_secs(1),
        cleanup_linger: Duration::from_secs(3),
        clock_max_entries,
        clock_min_age_ms,
        detector: DetectorConfig {
            heartbeat: Duration::from_millis(100),
            threshold: 8.0,
            acceptable_pause: Duration::from_millis(200),
            min_std_dev: Duration::from_millis(50),
            window: 100,
        },
        handoff: HandoffSettings {
            interval: Duration::from_millis(300),
            batch_size: 100,
            max_keys_per_sec: 100_000,
            call_timeout: Duration::from_millis(1500),
        },
        aae: AaeSettings {
            interval: Duration::from_millis(1000),
            rebuild_every: Duration::from_secs(10),
            rebuild_keys_per_sec: 1_000_000,
            reap_keys_per_sec: 1_000_000,
            max_repairs_per_sec: 1_000_000,
            tombstone_grace: TOMBSTONE_GRACE,
            // The request timeout and the read-repair window, with room.
            reap_fence: Duration::from_secs(2),
            reap_every: REAP_EVERY,
            call_timeout: Duration::from_millis(1500),
        },
        read_repair_window: Duration::from_millis(200),
        object_cache_bytes: 1 << 20,
        clock,
        context_key: crate::sim::context_key(),
    }
}

/// One simulated machine.
pub struct Machine {
    pub me: MemberInfo,
    /// The store handle of the running process (a restart reopens it, which
    /// fences the handle of the crashed one).
    pub store: Arc<MemoryStore>,
    /// The running node, `None` while down.
    pub node: Option<SimNode>,
    /// Stops and aborts the node's background loops.
    stop: Option<watch::Sender<bool>>,
    background: Vec<JoinHandle<()>>,
    /// Wall-clock offset of this machine (skew), in ms.
    pub skew_ms: u64,
    /// Started with seeds (the founding members) to join through, not as
    /// a founding member.
    joining: bool,
    /// Killed for good (and removed from the cluster): never restarted.
    pub gone: bool,
}

pub struct World {
    pub net: Arc<SimNetwork>,
    pub machines: Vec<Machine>,
    expected: Vec<MemberConfig>,
    /// Simulated epoch: tokio's instant at which node clocks read `START_MS`.
    origin: tokio::time::Instant,
    pruning: Pruning,
    spare_reads: SpareReads,
    /// Machines whose leave the operator committed: each removes itself
    /// once it has handed everything off (see `shoal_node::transfer`).
    pub left: Vec<usize>,
}

/// What node clocks read at the start (a fixed date: reproducible).
const START_MS: u64 = 1_800_000_000_000;

impl World {
    /// `size` machines, started; clock skews drawn from `rng`.
    pub fn new(
        net: Arc<SimNetwork>,
        size: usize,
        rng: &mut SimRng,
        pruning: Pruning,
        spare_reads: SpareReads,
    ) -> Self {
        let members: Vec<MemberInfo> = (1..=size)
            .map(|i| MemberInfo {
                id: NodeId::from_u128(i as u128 * 0x9e37_79b9_7f4a_7c15),
                name: format!("node{i}"),
                client_addr: ([127, 0, 0, 1], 7000 + i as u16).into(),
                peer_addr: ([127, 0, 0, 1], 8000 + i as u16).into(),
                zone: None,
            })
            .collect();
        let expected = members
            .iter()
            .map(|m| MemberConfig {
                name: m.name.clone(),
                peer_addr: m.peer_addr,
            })
            .collect();
        let machines = members
            .into_iter()
            .map(|me| {
                let store = MemoryStore::new();
                store.track_unsynced();
                Machine {
                    me,
                    store: Arc::new(store),
                    node: None,
                    stop: None,
                    background: Vec::new(),
                    skew_ms: rng.below(400),
                    joining: false,
                    gone: false,
                }
            })
            .collect();
        let mut w = World {
            net,
            machines,
            expected,
            origin: tokio::time::Instant::now(),
            pruning,
            spare_reads,
            left: Vec::new(),
        };
        for i in 0..size {
            w.start(i);
        }
        w
    }

    /// A world of no machines (a placeholder once the real one is taken).
    pub fn empty(net: Arc<SimNetwork>) -> Self {
        World {
            net,
            machines: Vec::new(),
            expected: Vec::new(),
            origin: tokio::time::Instant::now(),
            pruning: None,
            spare_reads: SpareReads::Always,
            left: Vec::new(),
        }
    }

    /// A new machine, started with the founding members as its seeds: it
    /// announces itself and stages its own join. Returns its index.
    pub fn join(&mut self, rng: &mut SimRng) -> usize {
        let i = self.machines.len() + 1;
        let store = MemoryStore::new();
        store.track_unsynced();
        self.machines.push(Machine {
            me: MemberInfo {
                id: NodeId::from_u128(i as u128 * 0x9e37_79b9_7f4a_7c15),
                name: format!("node{i}"),
                client_addr: ([127, 0, 0, 1], 7000 + i as u16).into(),
                peer_addr: ([127, 0, 0, 1], 8000 + i as u16).into(),
                zone: None,
            },
            store: Arc::new(store),
            node: None,
            stop: None,
            background: Vec::new(),
            skew_ms: rng.below(400),
            joining: true,
            gone: false,
        });
        self.start(i - 1);
        i - 1
    }

    /// Kills machine `i` for good: it is never restarted (its data is lost
    /// with it, as with a machine that burned).
    pub fn destroy(&mut self, i: usize) {
        if self.is_up(i) {
            self.crash(i, None);
        }
        self.machines[i].gone = true;
    }

    /// Running machine `i`'s node.
    pub fn node(&self, i: usize) -> Option<&SimNode> {
        self.machines[i].node.as_ref()
    }

    pub fn name(&self, i: usize) -> &str {
        &self.machines[i].me.name
    }

    /// Machines that left and that a running node does not see removed
    /// yet: they have not removed themselves, or it has not heard.
    pub fn not_departed(&self) -> Vec<&str> {
        self.left
            .iter()
            .filter(|&&i| {
                let id = self.machines[i].me.id;
                let mut nodes = self.machines.iter().filter_map(|m| m.node.as_ref());
                nodes.any(|n| !n.membership().removed(&id))
            })
            .map(|&i| self.name(i))
            .collect()
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.machines[i].node.is_some()
    }

    pub fn up_count(&self) -> usize {
        self.machines.iter().filter(|m| m.node.is_some()).count()
    }

    /// Starts machine `i` the way `server::start` does: membership from what
    /// the store persisted, `learn(me)`, hint counts loaded, then the
    /// background loops.
    pub fn start(&mut self, i: usize) {
        let m = &mut self.machines[i];
        assert!(m.node.is_none(), "{} is already running", m.me.name);
        if m.gone {
            return;
        }
        // Timer firings go into the trace hash, named by node and timer.
        let (net, name) = (self.net.clone(), m.me.name.clone());
        let clock = Clock::tokio(START_MS + m.skew_ms, self.origin)
            .with_timer_trace(move |what| net.note(|| format!("{name} timer {what}")));
        let settings = sim_settings(clock, self.pruning, self.spare_reads);
        let node = shoal_node::server::open_node(
            m.me.clone(),
            settings,
            m.store.clone(),
            self.net.transport(&m.me.name),
            self.expected.clone(),
            m.joining,
            PARTITIONS,
        )
        .expect("a memory store opens");
        self.net.register(&m.me.name, Arc::new(node.clone()));
        self.net.restart(&m.me.name);
        let (stop, rx) = watch::channel(false);
        m.background = shoal_node::server::start_background(&node, rx);
        m.stop = Some(stop);
        m.node = Some(node);
    }

    /// Kills machine `i` (kill -9): its tasks are aborted, its transport and
    /// store handle die with it. With `power_loss`, the store also loses
    /// all but the first `keep` batches written since its last sync; returns
    /// how many it lost.
    pub fn crash(&mut self, i: usize, power_loss: Option<&mut SimRng>) -> usize {
        self.down(i, false, power_loss)
    }

    /// Stops machine `i` as `Running::stop` ends: like [`Self::crash`]
    /// (requests in flight are cut off), but the replica is sealed once
    /// its tasks are aborted, so the next start goes on under its actors
    /// (see `shoal_node::replica::Replica::seal`). A power loss after it
    /// loses only what was written after the seal.
    pub fn stop_cleanly(&mut self, i: usize, power_loss: Option<&mut SimRng>) -> usize {
        self.down(i, true, power_loss)
    }

    /// Seals running machine `i`'s replica (the last step of a stop), and
    /// leaves it running: it mints nothing more, and any object it writes
    /// from now on makes its next start take a new incarnation.
    pub fn seal(&self, i: usize) {
        if let Some(node) = &self.machines[i].node {
            node.replica().seal().expect("a memory store seals");
        }
    }

    fn down(&mut self, i: usize, seal: bool, power_loss: Option<&mut SimRng>) -> usize {
        let m = &mut self.machines[i];
        self.net.kill(&m.me.name);
        for t in m.background.drain(..) {
            t.abort();
        }
        m.stop = None;
        if let Some(node) = &m.node {
            node.tasks().abort_all();
        }
        if seal {
            self.seal(i);
        }
        let m = &mut self.machines[i];
        m.node = None;
        // Fence the dead process's handle now: tasks it spawned outside the
        // network's control may still run, but can no longer write.
        m.store = Arc::new(m.store.reopen());
        match power_loss {
            Some(rng) => {
                let unsynced = m.store.unsynced_batches();
                let keep = rng.below(unsynced as u64 + 1) as usize;
                m.store.lose_unsynced_tail(keep)
            }
            None => 0,
        }
    }

    /// Makes one record of running machine `i` fail its checksum: a hint
    /// it holds for `key` (if `hint` and it holds one), else its object of
    /// `key` (if any). Returns what it corrupted.
    pub fn corrupt(&mut self, i: usize, key: &[u8], hint: bool) -> Option<String> {
        let m = &self.machines[i];
        let node = m.node.as_ref()?;
        let hinted = hint
            .then(|| {
                m.store
                    .scan(Tree::Hints, b"", None, usize::MAX)
                    .ok()?
                    .into_iter()
                    .map(|(hk, _)| hk)
                    .find(|hk| shoal_node::replica::hints::hinted_key(hk) == key)
            })
            .flatten();
        let (tree, record, what) = match hinted {
            Some(hk) => (Tree::Hints, hk, "hint"),
            None => (Tree::Objects, key.to_vec(), "object"),
        };
        m.store.get(tree, &record).ok()??;
        m.store.corrupt(tree, &record);
        node.drop_cache();
        Some(format!("{what} of {}", String::from_utf8_lossy(key)))
    }

    /// The operating system flushes every machine's WAL.
    pub fn sync_all(&self) {
        for m in &self.machines {
            m.store.sync();
        }
    }

    /// Stops every background loop (before the final checks).
    pub async fn stop_background(&mut self) {
        for m in &mut self.machines {
            if let Some(stop) = m.stop.take() {
                let _ = stop.send(true);
            }
            for t in m.background.drain(..) {
                t.abort();
                let _ = t.await;
            }
        }
    }

    /// The most advanced view among the running nodes.
    pub fn view(&self) -> Option<shoal_node::membership::View> {
        self.machines
            .iter()
            .filter_map(|m| m.node.as_ref().and_then(|n| n.membership().view()))
            .max_by_key(|v| (v.version, !v.in_transition()))
    }

    /// Names of the key's primaries (from the most advanced running view).
    pub fn primaries(&self, key: &[u8]) -> Vec<usize> {
        let view = self.view().expect("a ring view");
        view.preference_list(key, 3)
            .into_iter()
            .map(|p| {
                self.machines
                    .iter()
                    .position(|m| m.me.id == p.id)
                    .expect("a member")
            })
            .collect()
    }
}
