//! Per-node progress through a layout change, and who holds one up.

use serde::{Deserialize, Serialize};
use shoal_ring::NodeId;

use super::ClusterState;

/// How far a node has come with the current layout (Garage's trackers,
/// one more for reads, two for the end). Each is the highest version the
/// node has reached that step for; see [`crate::transfer`] for who moves
/// them and when.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The node writes to the replicas of every layout in its history, and
    /// no write it routed by an older history is still running.
    pub acked: u64,
    /// The node holds everything the older layouts held for the partitions
    /// it replicates in this version.
    pub synced: u64,
    /// The node reads from this version's replicas (every member synced),
    /// and no read it routed to older replicas is still running.
    pub switched: u64,
    /// The node's history holds this version alone: it writes to its
    /// replicas only, and no request routed by the longer history runs.
    pub pruned: u64,
    /// The node has dropped its copies of partitions it does not replicate
    /// in this version, late messages included.
    pub cleaned: u64,
}

impl Progress {
    /// The pointwise maximum: progress only moves forward.
    pub(super) fn join(&mut self, other: &Progress) {
        self.acked = self.acked.max(other.acked);
        self.synced = self.synced.max(other.synced);
        self.switched = self.switched.max(other.switched);
        self.pruned = self.pruned.max(other.pruned);
        self.cleaned = self.cleaned.max(other.cleaned);
    }
}

impl ClusterState {
    /// Who holds up the change in progress, and at which step: "name (step)".
    pub fn blockers(&self) -> Vec<String> {
        let v = self.version();
        let mut out = Vec::new();
        let current = self.current().map(|l| l.ring.members()).unwrap_or_default();
        let ids: Vec<NodeId> = if self.layouts.len() > 1 {
            self.history_members().into_iter().collect()
        } else {
            self.participants()
        };
        for id in ids {
            let p = self.progress.get(&id).copied().unwrap_or_default();
            let step = if p.acked < v {
                "ack"
            } else if self.layouts.len() > 1 && current.contains(&id) && p.synced < v {
                "pull its new partitions"
            } else if p.switched < v {
                "read from the new replicas"
            } else if p.pruned < v {
                "drop the old layout"
            } else if p.cleaned < v {
                "drop old copies"
            } else {
                continue;
            };
            out.push(format!("{} ({step})", self.name_of(&id)));
        }
        out
    }
}
