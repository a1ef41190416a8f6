//! Changes staged for the next layout: staging, clearing, and which of
//! the entries are changes still to make.

use std::collections::BTreeMap;

use shoal_ring::NodeId;

use super::{Change, ClusterState, Staged};

/// Bits of a staged entry's stamp that hold the wall clock, in ms (until
/// the year 2109); the bits above hold the layout version the entry was
/// made against.
const CLOCK_BITS: u32 = 42;

/// The stamp of an entry made against layout `against` at `now_ms`: the
/// current layout where it was staged or cleared, the new one for what a
/// commit consumed. An entry made on a node that had not heard of a commit
/// cannot undo what the commit did (its clearing, the mark of a leave),
/// whatever the wall clocks say: the operator acted on a layout that is
/// gone. The version is part of the stamp, so a node of an older version,
/// which compares stamps only, orders entries the same way.
pub(super) fn stamp(against: u64, now_ms: u64) -> u64 {
    (against << CLOCK_BITS) | (now_ms & ((1 << CLOCK_BITS) - 1))
}

impl ClusterState {
    /// Stages `change` for `node` (or clears its entry, `None`). Returns
    /// whether anything changed.
    pub fn stage(&mut self, node: NodeId, change: Option<Change>, now: u64) -> bool {
        if self.staged.get(&node).map(|s| s.change) == Some(change) {
            return false;
        }
        self.put_staged(node, change, now);
        true
    }

    /// Writes `node`'s entry, made against the current layout and stamped
    /// after the one it replaces (which may be made against a later one: a
    /// joiner has no layout while the founders edit on their static ring
    /// as layout 1, and what it does after what it heard must win).
    pub(super) fn put_staged(&mut self, node: NodeId, change: Option<Change>, now: u64) {
        let at = stamp(self.version(), now);
        let stamp = self.staged.get(&node).map_or(at, |s| at.max(s.stamp + 1));
        self.staged.insert(node, Staged { stamp, change });
    }

    /// Stages the join of `node` itself, as a node started with seeds does
    /// at every start (`Node::announce`): unless it is in a layout of the
    /// history, has an entry staged, or was removed. A member that left
    /// keeps its committed leave staged (see [`ClusterState::commit`]), so
    /// one that restarts before it has removed itself goes on leaving
    /// instead of joining again.
    pub fn stage_own_join(&mut self, node: NodeId, now: u64) -> bool {
        let in_a_layout = self
            .layouts
            .iter()
            .any(|l| l.ring.members().contains(&node));
        let staged = self.staged.get(&node).is_some_and(|s| s.change.is_some());
        let removed = self.members.get(&node).is_some_and(|m| m.removed);
        !in_a_layout && !staged && !removed && self.stage(node, Some(Change::Join), now)
    }

    /// Clears every staged change still to make. An entry that is none
    /// (see [`ClusterState::staged_changes`]), such as the leave a member
    /// that left keeps, stays as it is: restamping it could outrank a
    /// change staged beside the clearing. With no layout (a node that
    /// joins through seeds, while the cluster runs on its static ring)
    /// nothing can be told made already: every entry is cleared.
    pub fn clear(&mut self, now: u64) -> bool {
        let changes = self.staged_changes();
        let live: Vec<NodeId> = (self.staged.iter())
            .filter(|(id, s)| {
                s.change.is_some()
                    && (self.current().is_none() || changes.iter().any(|(c, _)| c == *id))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in &live {
            self.stage(*id, None, now);
        }
        !live.is_empty()
    }

    /// The changes staged, in id order. A removed member still in the
    /// current layout counts as a staged `Remove` whatever was staged (a
    /// `clear` may have un-staged it, and a removed member can never be
    /// staged again): its partitions must go with the next plan. A change
    /// made already or impossible (a join of a member or of a removed node,
    /// a leave or remove of a non-member) is none: staged again as it was
    /// committed, on a node whose clock runs ahead, it can outrank the
    /// clearing, and would fail every later plan.
    pub fn staged_changes(&self) -> Vec<(NodeId, Change)> {
        let in_layout = self.current().map(|l| l.ring.members()).unwrap_or_default();
        let mut changes: BTreeMap<NodeId, Change> = self
            .staged
            .iter()
            .filter_map(|(id, s)| s.change.map(|c| (*id, c)))
            .filter(|(id, c)| match c {
                Change::Join => {
                    !in_layout.contains(id) && !self.members.get(id).is_some_and(|m| m.removed)
                }
                Change::Leave | Change::Remove => in_layout.contains(id),
            })
            .collect();
        for (id, m) in &self.members {
            if m.removed && in_layout.contains(id) {
                changes.insert(*id, Change::Remove);
            }
        }
        changes.into_iter().collect()
    }
}
