//! The nemesis: a seeded schedule of faults over the chaos cluster. Every
//! kind is used at least once (in a seeded order), then kinds are drawn at
//! random; at most two faults are active at a time, at most one of them a
//! partition, and never two on one node. Membership changes (join, leave,
//! remove; see [`super::operator`]) run one at a time beside them.

use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::cluster::ChaosCluster;
use super::net::Host;
use super::operator::{Change, Operator, Step, MIN_MEMBERS};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kind {
    Kill,
    Pause,
    PartitionHalves,
    PartitionIsolated,
    PartitionBridge,
    PartitionOneWay,
    PartitionClients,
    Degrade,
    DiskFull,
    ClockJump,
    /// A new machine joins (a spare slot, or one that left, wiped).
    Join,
    /// A member leaves: `shoal leave`, commit; it hands off, then stops.
    Leave,
    /// A member is killed for good and `shoal remove`d.
    Remove,
}

pub const KINDS: [Kind; 13] = [
    Kind::Kill,
    Kind::Pause,
    Kind::PartitionHalves,
    Kind::PartitionIsolated,
    Kind::PartitionBridge,
    Kind::PartitionOneWay,
    Kind::PartitionClients,
    Kind::Degrade,
    Kind::DiskFull,
    Kind::ClockJump,
    Kind::Join,
    Kind::Leave,
    Kind::Remove,
];

impl Kind {
    pub fn is_membership(self) -> bool {
        matches!(self, Kind::Join | Kind::Leave | Kind::Remove)
    }

    fn is_partition(self) -> bool {
        matches!(
            self,
            Kind::PartitionHalves
                | Kind::PartitionIsolated
                | Kind::PartitionBridge
                | Kind::PartitionOneWay
                | Kind::PartitionClients
        )
    }
}

/// One fault as it happened, for the report and the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Span {
    pub kind: Kind,
    /// What it hit, in words ("node3", "node1,node2 | node3,node4,node5").
    pub target: String,
    pub start_ms: u64,
    pub end_ms: u64,
}

struct Active {
    kind: Kind,
    /// Node indexes (from 0) it holds.
    nodes: Vec<usize>,
    host: Option<Host>,
    until: Instant,
    span: usize,
}

pub struct Nemesis {
    rng: rand::rngs::StdRng,
    started: Instant,
    active: Vec<Active>,
    pending: Vec<Kind>,
    pub spans: Vec<Span>,
    /// Nodes that exited without being killed: (ms, node, exit status, log
    /// tail).
    pub crashes: Vec<String>,
    next_start: Instant,
    operator: Operator,
    /// The membership change under way, if any (one at a time).
    change: Option<Change>,
    /// Members whose leave is committed and who have not stopped yet.
    leaving: Vec<usize>,
}

impl Nemesis {
    pub fn new(seed: u64, started: Instant, cluster: &ChaosCluster) -> anyhow::Result<Nemesis> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x006e_656d_6573_6973);
        let mut pending = KINDS.to_vec();
        pending.shuffle(&mut rng);
        Ok(Nemesis {
            rng,
            started,
            active: Vec::new(),
            pending,
            spans: Vec::new(),
            crashes: Vec::new(),
            next_start: started + Duration::from_secs(3),
            operator: Operator::new(cluster)?,
            change: None,
            leaving: Vec::new(),
        })
    }

    fn ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Runs the schedule until `until`, then heals everything.
    pub fn run(&mut self, cluster: &mut ChaosCluster, until: Instant) -> anyhow::Result<()> {
        while Instant::now() < until {
            self.tick(cluster)?;
            std::thread::sleep(Duration::from_millis(100));
        }
        self.heal_all(cluster)
    }

    fn tick(&mut self, cluster: &mut ChaosCluster) -> anyhow::Result<()> {
        self.restart_crashed(cluster)?;
        self.drive_change(cluster)?;
        let now = Instant::now();
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].until <= now {
                let a = self.active.swap_remove(i);
                self.heal(cluster, a)?;
            } else {
                i += 1;
            }
        }
        // A membership change is an operator's action beside the faults,
        // not one of the two.
        if self.active.len() >= 2 || now < self.next_start {
            return Ok(());
        }
        let kind = match self.pending.last() {
            Some(&k) => k,
            None => *KINDS.choose(&mut self.rng).expect("kinds"),
        };
        let partitioned = self.active.iter().any(|a| a.kind.is_partition());
        if kind.is_partition() && partitioned {
            // Wait for the partition to heal; another kind may go first.
            self.pending.retain(|k| *k != kind);
            self.pending.insert(0, kind);
            return Ok(());
        }
        let mut busy: Vec<usize> = self.active.iter().flat_map(|a| a.nodes.clone()).collect();
        busy.extend(self.change.as_ref().map(|c| c.node));
        busy.extend(self.leaving.iter().copied());
        let free: Vec<usize> = (0..cluster.nodes.len())
            .filter(|n| !busy.contains(n) && !cluster.nodes[*n].retired)
            .collect();
        let members = cluster.members().len() - self.leaving.len();
        if kind.is_membership() {
            let spares: Vec<usize> = (0..cluster.nodes.len())
                .filter(|n| cluster.nodes[*n].retired && !cluster.running(*n))
                .collect();
            let possible = self.change.is_none()
                && match kind {
                    Kind::Join => !spares.is_empty(),
                    _ => members > MIN_MEMBERS && !free.is_empty(),
                };
            if !possible {
                // Another change first, or a join before the next leave.
                self.pending.retain(|k| *k != kind);
                self.pending.insert(0, kind);
                return Ok(());
            }
            if self.pending.last() == Some(&kind) {
                self.pending.pop();
            }
            let node = *if kind == Kind::Join { &spares } else { &free }
                .choose(&mut self.rng)
                .expect("a node");
            let span = self.spans.len();
            let change = self.operator.start(cluster, kind, node, span)?;
            self.spans.push(Span {
                kind,
                target: change.name.clone(),
                start_ms: self.ms(),
                end_ms: 0,
            });
            self.change = Some(change);
            self.next_start = now + Duration::from_millis(self.rng.gen_range(1_000..4_000));
            return Ok(());
        }
        if self.pending.last() == Some(&kind) {
            self.pending.pop();
        }
        let Some(&node) = free.choose(&mut self.rng) else {
            return Ok(());
        };
        let hold = Duration::from_millis(self.rng.gen_range(4_000..12_000));
        let mut nodes = vec![node];
        let mut host = None;
        let name = |n: usize| format!("node{}", n + 1);
        let target = match kind {
            Kind::Kill => {
                cluster.kill(node);
                name(node)
            }
            Kind::Pause => {
                cluster.pause(node, true);
                name(node)
            }
            Kind::DiskFull => {
                cluster.fill_disk(node)?;
                name(node)
            }
            Kind::ClockJump => {
                let offset = *[-600i64, -90, 120, 900, 3_600, 86_400]
                    .choose(&mut self.rng)
                    .expect("offsets");
                cluster.set_clock(node, offset)?;
                format!("{} {offset:+} s", name(node))
            }
            Kind::Degrade => {
                let target = if self.rng.gen_bool(0.25) {
                    nodes.clear();
                    Host::Clients
                } else {
                    Host::Node(node + 1)
                };
                let loss = self.rng.gen_range(0..=10);
                let delay = self.rng.gen_range(5..=100);
                cluster.lab.degrade(target, loss, delay, delay / 2)?;
                host = Some(target);
                format!("{target}: {loss}% loss, {delay} ms ± {} ms", delay / 2)
            }
            partition => {
                nodes.clear();
                self.partition(cluster, partition, node)?
            }
        };
        let span = self.spans.len();
        self.spans.push(Span {
            kind,
            target,
            start_ms: self.ms(),
            end_ms: 0,
        });
        self.active.push(Active {
            kind,
            nodes,
            host,
            until: now + hold,
            span,
        });
        self.next_start = now + Duration::from_millis(self.rng.gen_range(1_000..4_000));
        Ok(())
    }

    fn partition(
        &mut self,
        cluster: &mut ChaosCluster,
        kind: Kind,
        node: usize,
    ) -> anyhow::Result<String> {
        let mut all: Vec<Host> = (1..=cluster.nodes.len()).map(Host::Node).collect();
        all.shuffle(&mut self.rng);
        let list = |hosts: &[Host]| {
            hosts
                .iter()
                .map(Host::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let lab = &mut cluster.lab;
        Ok(match kind {
            Kind::PartitionHalves => {
                let (a, b) = all.split_at(all.len() / 2);
                lab.partition(a, b)?;
                format!("{} | {}", list(a), list(b))
            }
            Kind::PartitionIsolated => {
                let one = Host::Node(node + 1);
                let rest: Vec<Host> = all.into_iter().filter(|h| *h != one).collect();
                lab.partition(&[one], &rest)?;
                format!("{one} | rest")
            }
            Kind::PartitionBridge => {
                let bridge = all.pop().expect("nodes");
                let (a, b) = all.split_at(all.len() / 2);
                lab.partition(a, b)?;
                format!("{} | {} bridged by {bridge}", list(a), list(b))
            }
            Kind::PartitionOneWay => {
                let one = Host::Node(node + 1);
                for h in all.iter().filter(|h| **h != one) {
                    lab.cut(*h, one)?;
                }
                format!("{one} hears no one (it still sends)")
            }
            Kind::PartitionClients => {
                let cut = &all[..2];
                lab.partition(&[Host::Clients], cut)?;
                format!("clients | {}", list(cut))
            }
            other => unreachable!("{other:?} is not a partition"),
        })
    }

    /// Drives the membership change under way (see [`Operator::step`]).
    fn drive_change(&mut self, cluster: &mut ChaosCluster) -> anyhow::Result<()> {
        let ms = self.ms();
        let Some(change) = self.change.as_mut() else {
            return Ok(());
        };
        let step = self.operator.step(cluster, change)?;
        let span = &mut self.spans[change.span];
        match step {
            Step::Waiting => return Ok(()),
            Step::Committed(version) => span.target = format!("{} (layout {version})", change.name),
        }
        span.end_ms = ms;
        if change.kind == Kind::Leave {
            // A member until it has handed off and stopped.
            self.leaving.push(change.node);
        }
        self.change = None;
        Ok(())
    }

    /// After the final heal: waits (bounded) until the change under way
    /// is committed, so that no run ends with one half made.
    fn finish_change(&mut self, cluster: &mut ChaosCluster) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while let Some(change) = &self.change {
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{:?} of {} not committed within 120 s of the final heal: {}",
                    change.kind,
                    change.name,
                    change.last_error
                );
            }
            self.restart_crashed(cluster)?;
            self.drive_change(cluster)?;
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Notes nodes that exited on their own and starts them again, unless a
    /// fault still holds them (its heal starts them). A node that stopped
    /// cleanly (exit status 0) left the cluster: it is retired, not a crash.
    pub fn restart_crashed(&mut self, cluster: &mut ChaosCluster) -> anyhow::Result<()> {
        for (node, status) in cluster.exited() {
            if status.success() {
                cluster.nodes[node].retired = true;
                self.leaving.retain(|n| *n != node);
                continue;
            }
            let ms = self.ms();
            self.crashes.push(format!(
                "{ms} ms: node{} exited ({status}); its log ends:\n{}",
                node + 1,
                cluster.log_tail(node, 20)
            ));
            if !self.active.iter().any(|a| a.nodes.contains(&node)) {
                cluster.spawn(node)?;
            }
        }
        Ok(())
    }

    fn heal(&mut self, cluster: &mut ChaosCluster, a: Active) -> anyhow::Result<()> {
        match a.kind {
            Kind::Kill => {}
            Kind::Pause => cluster.pause(a.nodes[0], false),
            Kind::DiskFull => cluster.free_disk(a.nodes[0])?,
            Kind::ClockJump => cluster.set_clock(a.nodes[0], 0)?,
            Kind::Degrade => cluster.lab.restore(a.host.expect("degraded host"))?,
            _ => cluster.lab.heal_partitions()?,
        }
        for &n in &a.nodes {
            if !cluster.running(n) && !cluster.nodes[n].retired {
                cluster.spawn(n)?;
            }
        }
        self.spans[a.span].end_ms = self.ms();
        Ok(())
    }

    /// Ends every fault: the final heal.
    pub fn heal_all(&mut self, cluster: &mut ChaosCluster) -> anyhow::Result<()> {
        for a in std::mem::take(&mut self.active) {
            self.heal(cluster, a)?;
        }
        cluster.lab.heal_partitions()?;
        for host in cluster.lab.hosts() {
            cluster.lab.restore(host)?;
        }
        for i in 0..cluster.nodes.len() {
            cluster.free_disk(i)?;
            cluster.set_clock(i, 0)?;
            if cluster.nodes[i].paused {
                cluster.pause(i, false);
            }
        }
        self.restart_crashed(cluster)?;
        for i in 0..cluster.nodes.len() {
            if !cluster.running(i) && !cluster.nodes[i].retired {
                cluster.spawn(i)?;
            }
        }
        self.finish_change(cluster)
    }

    /// Kinds not yet used.
    pub fn unused(&self) -> Vec<Kind> {
        KINDS
            .iter()
            .copied()
            .filter(|k| !self.spans.iter().any(|s| s.kind == *k))
            .collect()
    }
}
