//! The cluster state every node holds, persists and gossips: the members,
//! the committed layouts (rings, versioned) and the changes staged for the
//! next layout. Pure: no I/O, no clock (stamps come from the caller).
//!
//! # A join-semilattice
//! Nodes change their copy independently (a member announces itself, an
//! operator stages or commits a change) and copies meet by [`ClusterState::merge`],
//! which is commutative, associative and idempotent (property-tested), so
//! gossip converges whatever the order and repetition of exchanges:
//! - members: per id, the announcement with the higher `stamp` wins (ties by
//!   content); `removed` is sticky, so stale gossip cannot bring a removed
//!   member back;
//! - staged changes: per id, the higher `stamp` wins, which ranks the entry
//!   made against the later layout first, then by the wall clock; a
//!   cleared entry is a `None` (a tombstone, so the clear spreads too);
//! - layouts: the union by version (two commits of one version, made at once
//!   on two nodes, resolve to the one with the larger content digest); then
//!   every layout older than the newest one that is fully synced is dropped
//!   ([`ClusterState::prune`]), a function of the merged state only;
//! - progress: per node and step, the highest version reached.
//!
//! # Layout history (Garage's, and Cassandra's pending ranges)
//! The last layout is the current one. While a change is in transition the
//! history holds the layouts before it too: writes go to the replicas of
//! every layout in the history; reads go to the oldest until every member
//! of the new layout has synced its new partitions, then to the new one;
//! once every member reads from the new one the older layouts are dropped.
//! One change at a time: the next is planned once every member has pruned
//! and cleaned up the last (see [`crate::transfer`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_client::proto::MemberInfo;
use shoal_ring::{NodeId, Ring};

/// One member as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Id, name, addresses and zone, as the member announced them.
    pub info: MemberInfo,
    /// The announcement with the highest stamp wins: a member re-announces
    /// itself (a new address, a new zone) with a higher one.
    pub stamp: u64,
    /// A removed member stays as a tombstone so that stale gossip cannot
    /// bring it back; an id once removed never rejoins (a wiped machine
    /// starts with a new id).
    pub removed: bool,
}

/// A change staged for the next layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Change {
    /// The member asked to join (`shoal join`, or seeds in its config).
    Join,
    /// The member hands its partitions to the others, then stops.
    Leave,
    /// The member is gone for good: its partitions are rebuilt on their new
    /// owners from the surviving replicas.
    Remove,
}

/// A staged change (or its clearing). Of two entries for one member the
/// one with the higher stamp wins, and a stamp holds first the layout
/// version the entry was made against, then the wall clock (see
/// `staged::stamp`). A leave stays staged once committed, as the mark
/// of a member that left.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Staged {
    pub stamp: u64,
    /// `None`: cleared (a tombstone, so the clearing spreads by gossip).
    pub change: Option<Change>,
}

/// A committed ring and its version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub version: u64,
    pub ring: Ring,
}

/// The replicated cluster state. See the module doc.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Partitions Q and replicas N, fixed for the cluster's life; a state
    /// with others belongs to another cluster and is refused.
    pub partitions: u32,
    pub n: u32,
    pub members: BTreeMap<NodeId, Member>,
    /// Committed layouts, oldest first; the last is current. Empty while the
    /// cluster still runs on the ring of its static config (see
    /// [`super::Membership`]).
    pub layouts: Vec<Layout>,
    pub staged: BTreeMap<NodeId, Staged>,
    pub progress: BTreeMap<NodeId, Progress>,
}

/// Why a state was refused or a change could not be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error(
        "state of another cluster: Q={partitions} N={n}, this cluster has Q={our_partitions} N={our_n}"
    )]
    OtherCluster {
        partitions: u32,
        n: u32,
        our_partitions: u32,
        our_n: u32,
    },
    #[error("malformed cluster state: {0}")]
    Malformed(String),
    #[error("no layout yet: the cluster has not formed")]
    NoLayout,
    #[error("nothing staged: stage a join, leave or remove first")]
    NothingStaged,
    #[error(
        "layout {version} is still being applied (waiting for {}); wait until it completes, or remove a member that is gone for good",
        waiting.join(", ")
    )]
    InTransition { version: u64, waiting: Vec<String> },
    #[error("the change would leave {left} members, fewer than N={n} replicas")]
    TooFewMembers { left: usize, n: u32 },
    #[error("unknown member {0}")]
    UnknownMember(String),
    #[error("{name} is {why}")]
    BadChange { name: String, why: String },
    #[error("the plan changed: it is now for version {now}, not {asked}; look at it again")]
    StalePlan { asked: u64, now: u64 },
    #[error("the plan for version {version} changed since it was shown: it now makes {changes} and moves {moves} partitions; look at it again")]
    ChangedPlan {
        version: u64,
        changes: String,
        moves: usize,
    },
    #[error("could not build the ring: {0}")]
    Ring(String),
    #[error("{name} is in no layout this node knows of, and the claimant {claimant}, which committed the last layout, could not be asked (down, or no answer): this node cannot tell that {name} holds no partitions (it may not have heard of the commit that added it); try again once {claimant} answers, or remove {claimant} first if it is gone for good")]
    Unconfirmed { name: String, claimant: String },
}

/// What committing the staged changes would do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The version the plan would commit.
    pub version: u64,
    pub changes: Vec<(NodeId, Change)>,
    pub ring: Ring,
    /// Partitions whose replicas change, and which.
    pub moves: Vec<shoal_ring::Transfer>,
}

impl Plan {
    /// What names this plan to a commit: its version, its changes and its
    /// ring (which also follows from the members' zones). Two plans for
    /// one version that differ in what they change or move have other ids.
    pub fn id(&self) -> u64 {
        digest(&(self.version, &self.changes, &self.ring))
    }
}

impl ClusterState {
    pub fn new(partitions: u32, n: u32) -> Self {
        ClusterState {
            partitions,
            n,
            members: BTreeMap::new(),
            layouts: Vec::new(),
            staged: BTreeMap::new(),
            progress: BTreeMap::new(),
        }
    }

    /// The current layout.
    pub fn current(&self) -> Option<&Layout> {
        self.layouts.last()
    }

    /// The current version, 0 before the first layout.
    pub fn version(&self) -> u64 {
        self.current().map_or(0, |l| l.version)
    }

    /// A short digest of the whole state: equal digests, nothing to exchange.
    pub fn digest(&self) -> u64 {
        digest(self)
    }

    /// Records what a member says about itself. A removed member cannot
    /// announce itself back. Returns whether anything changed.
    pub fn announce(&mut self, info: MemberInfo, now: u64) -> bool {
        match self.members.get(&info.id) {
            Some(m) if m.removed => false,
            Some(m) if m.info == info => false,
            Some(m) => {
                let stamp = now.max(m.stamp + 1);
                self.members.insert(
                    info.id,
                    Member {
                        info,
                        stamp,
                        removed: false,
                    },
                );
                true
            }
            None => {
                self.members.insert(
                    info.id,
                    Member {
                        info,
                        stamp: now,
                        removed: false,
                    },
                );
                true
            }
        }
    }

    /// The live (not removed) member named `name`; the latest announced when
    /// a name was reused by a new id.
    pub fn by_name(&self, name: &str) -> Option<&Member> {
        self.members
            .values()
            .filter(|m| !m.removed && m.info.name == name)
            .max_by_key(|m| m.stamp)
    }

    /// Marks `node` removed now, without a new layout: nothing waits for
    /// it any more (acks, pulls, pruning, clean-up). For a member gone for
    /// good during a change, or one in no layout (a node that left, or a
    /// joiner abandoned); a member of the current layout also needs a
    /// staged `Remove` so the next plan gives its partitions away.
    pub fn remove_now(&mut self, node: NodeId, now: u64) -> bool {
        match self.members.get_mut(&node) {
            Some(m) if !m.removed => {
                m.removed = true;
                m.stamp = now.max(m.stamp + 1);
                self.prune();
                true
            }
            _ => false,
        }
    }

    /// Records a node's progress (only ever forward).
    pub fn advance(&mut self, node: NodeId, reached: Progress) -> bool {
        let p = self.progress.entry(node).or_default();
        let before = *p;
        p.join(&reached);
        let changed = before != *p;
        if changed {
            self.prune();
        }
        changed
    }

    /// Makes `ring` the first layout, when there is none: the ring a
    /// cluster formed from its static config becomes version 1 when the
    /// first change is committed.
    pub fn adopt(&mut self, ring: Ring) {
        if self.layouts.is_empty() {
            self.layouts.push(Layout { version: 1, ring });
        }
    }

    /// Members of `layout`'s ring that are not removed: the ones whose
    /// progress a transition waits for.
    fn live_members_of(&self, layout: &Layout) -> Vec<NodeId> {
        layout
            .ring
            .members()
            .into_iter()
            .filter(|id| !self.members.get(id).is_some_and(|m| m.removed))
            .collect()
    }

    /// Whether every live member of the layouts in the history has acked
    /// the current version: writes of every coordinator reach both the old
    /// and new replicas, so the new replicas may start syncing.
    pub fn all_acked(&self) -> bool {
        let v = self.version();
        self.history_members()
            .iter()
            .all(|id| self.reached(id, |p| p.acked >= v))
    }

    /// Whether every live member of the current layout has synced it:
    /// reads may move to its replicas.
    pub fn all_synced(&self) -> bool {
        self.unsynced().is_empty()
    }

    /// Members not removed: every one of them must have pruned (and
    /// cleaned) a version before the next change, since any of them may
    /// coordinate requests. A member that is gone for good is removed
    /// (`shoal remove`) so that nothing waits for it.
    pub fn participants(&self) -> Vec<NodeId> {
        self.members
            .iter()
            .filter(|(_, m)| !m.removed)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Participants that have not yet reached `step` for the current
    /// version (all of them while it is still in transition).
    pub fn waiting_for(&self, step: impl Fn(&Progress) -> u64) -> Vec<NodeId> {
        let v = self.version();
        self.participants()
            .into_iter()
            .filter(|id| self.layouts.len() > 1 || !self.reached(id, |p| step(p) >= v))
            .collect()
    }

    pub(super) fn reached(&self, id: &NodeId, done: impl Fn(&Progress) -> bool) -> bool {
        self.progress.get(id).is_some_and(done)
    }

    /// Members of the current layout that have not synced it yet.
    pub fn unsynced(&self) -> Vec<NodeId> {
        let Some(current) = self.current() else {
            return Vec::new();
        };
        self.live_members_of(current)
            .into_iter()
            .filter(|id| !self.reached(id, |p| p.synced >= current.version))
            .collect()
    }

    /// Checks a state that came from the network before it is merged.
    pub fn check(&self, partitions: u32, n: u32) -> Result<(), StateError> {
        if self.partitions != partitions || self.n != n {
            return Err(StateError::OtherCluster {
                partitions: self.partitions,
                n: self.n,
                our_partitions: partitions,
                our_n: n,
            });
        }
        for w in self.layouts.windows(2) {
            if w[0].version >= w[1].version {
                return Err(StateError::Malformed(
                    "layout versions not increasing".into(),
                ));
            }
        }
        for l in &self.layouts {
            if l.ring.partition_count() != partitions {
                return Err(StateError::Malformed(format!(
                    "layout {} has {} partitions",
                    l.version,
                    l.ring.partition_count()
                )));
            }
        }
        for (id, m) in &self.members {
            if m.info.id != *id {
                return Err(StateError::Malformed(format!(
                    "member {id} listed as {}",
                    m.info.id
                )));
            }
        }
        Ok(())
    }

    /// Merges `other` into this state (see the module doc). `other` must
    /// have passed [`ClusterState::check`]. Returns whether this state changed.
    pub fn merge(&mut self, other: &ClusterState) -> bool {
        let before = self.clone();
        for (id, theirs) in &other.members {
            match self.members.get_mut(id) {
                None => {
                    self.members.insert(*id, theirs.clone());
                }
                Some(ours) => {
                    let removed = ours.removed || theirs.removed;
                    if later(theirs, ours, |m| m.stamp) {
                        *ours = theirs.clone();
                    }
                    ours.removed = removed;
                }
            }
        }
        for (id, theirs) in &other.staged {
            match self.staged.get_mut(id) {
                None => {
                    self.staged.insert(*id, theirs.clone());
                }
                Some(ours) => {
                    if theirs > ours {
                        *ours = theirs.clone();
                    }
                }
            }
        }
        for (id, theirs) in &other.progress {
            self.progress.entry(*id).or_default().join(theirs);
        }
        self.merge_layouts(other);
        *self != before
    }

    /// What committing the staged changes would do. Refused while a change
    /// is in transition.
    pub fn plan(&self) -> Result<Plan, StateError> {
        let current = self.current().ok_or(StateError::NoLayout)?;
        // The previous change must be over everywhere, old copies dropped
        // included: a node must not get back a partition it still holds
        // stale copies of.
        let waiting = self.waiting_for(|p| p.cleaned);
        if !waiting.is_empty() && current.version > 1 {
            return Err(StateError::InTransition {
                version: current.version,
                waiting: self.blockers(),
            });
        }
        let changes = self.staged_changes();
        if changes.is_empty() {
            return Err(StateError::NothingStaged);
        }
        let mut members = current.ring.members();
        for (id, change) in &changes {
            let name = self.name_of(id);
            let member = self
                .members
                .get(id)
                .ok_or_else(|| StateError::UnknownMember(name.clone()))?;
            match change {
                Change::Join if member.removed => return Err(StateError::BadChange {
                    name,
                    why:
                        "removed; a removed machine rejoins with a new id (wipe its data directory)"
                            .into(),
                }),
                Change::Join => {
                    members.insert(*id);
                }
                Change::Leave | Change::Remove => {
                    if !members.remove(id) {
                        return Err(StateError::BadChange {
                            name,
                            why: "not in the current layout".into(),
                        });
                    }
                }
            }
        }
        if members.len() < self.n as usize {
            return Err(StateError::TooFewMembers {
                left: members.len(),
                n: self.n,
            });
        }
        let zoned: BTreeMap<NodeId, Option<String>> = members
            .iter()
            .map(|id| (*id, self.members.get(id).and_then(|m| m.info.zone.clone())))
            .collect();
        let ring = Ring::claim_zoned(
            Some(&current.ring),
            &zoned,
            self.partitions,
            self.n as usize,
        )
        .map_err(|e| StateError::Ring(e.to_string()))?;
        let moves = shoal_ring::transfers(&current.ring, &ring, self.n as usize);
        // A version further for each member before the claimant (removed,
        // each may have committed one nobody heard of: README, "claimant").
        let removed = |id: &&NodeId| self.members.get(*id).is_some_and(|m| m.removed);
        let skipped = current.ring.members().iter().take_while(removed).count() as u64;
        Ok(Plan {
            version: current.version + 1 + skipped,
            changes,
            ring,
            moves,
        })
    }

    /// Commits the plan for `version` (what [`ClusterState::plan`] showed;
    /// with `id`, that very plan: [`Plan::id`]): appends its layout, marks
    /// removed members, clears what it consumed.
    pub fn commit(&mut self, version: u64, id: Option<u64>, now: u64) -> Result<Plan, StateError> {
        let plan = self.plan()?;
        if plan.version != version {
            return Err(StateError::StalePlan {
                asked: version,
                now: plan.version,
            });
        }
        if id.is_some_and(|id| id != plan.id()) {
            let changes: Vec<String> = (plan.changes.iter())
                .map(|(node, change)| {
                    format!("{change:?} of {}", self.name_of(node)).to_lowercase()
                })
                .collect();
            return Err(StateError::ChangedPlan {
                version,
                changes: changes.join(", "),
                moves: plan.moves.len(),
            });
        }
        // First, so that what it consumed is marked as made against it.
        self.layouts.push(Layout {
            version: plan.version,
            ring: plan.ring.clone(),
        });
        for (id, change) in &plan.changes {
            if *change == Change::Remove {
                if let Some(m) = self.members.get_mut(id) {
                    m.removed = true;
                    m.stamp = now.max(m.stamp + 1);
                }
            }
            // Only what it consumed: clearing another entry would stamp it
            // now, which could outrank a change staged beside the commit.
            // A leave stays, as the mark of a member that left (see
            // `ClusterState::stage_own_join`).
            let consumed = (*change == Change::Leave).then_some(Change::Leave);
            self.put_staged(*id, consumed, now);
        }
        Ok(plan)
    }

    /// A member's name, or its id when unknown.
    pub fn name_of(&self, id: &NodeId) -> String {
        self.members
            .get(id)
            .map_or_else(|| id.to_hex(), |m| m.info.name.clone())
    }
}

/// 64 bits of digest of `value`'s encoding (two CRC-32s, differently seeded).
fn digest<T: Serialize>(value: &T) -> u64 {
    let bytes = rmp_serde::to_vec(value).expect("encodes");
    let a = crc32fast::hash(&bytes);
    let mut h = crc32fast::Hasher::new_with_initial(0x5ea1_5ea1);
    h.update(&bytes);
    (u64::from(a) << 32) | u64::from(h.finalize())
}

/// Whether `a` wins over `b`: a higher stamp, or on a tie the larger
/// encoding (any total order works; this one needs no extra field).
fn later<T: Serialize>(a: &T, b: &T, stamp: impl Fn(&T) -> u64) -> bool {
    match stamp(a).cmp(&stamp(b)) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => {
            rmp_serde::to_vec(a).expect("encodes") > rmp_serde::to_vec(b).expect("encodes")
        }
    }
}

/// A member for tests: id `i + 1`, named `n{i}`, on loopback.
#[cfg(test)]
pub(crate) fn test_member(i: u8) -> MemberInfo {
    MemberInfo {
        id: NodeId::from_u128(u128::from(i) + 1),
        name: format!("n{i}"),
        client_addr: ([127, 0, 0, 1], 7000 + u16::from(i)).into(),
        peer_addr: ([127, 0, 0, 1], 8000 + u16::from(i)).into(),
        zone: None,
    }
}

mod history;
mod progress;
mod staged;
#[cfg(test)]
mod tests;

pub use progress::Progress;
