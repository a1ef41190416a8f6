//! The history of layouts: the committed layouts a change is still being
//! applied between, how two copies of it merge, and when the older ones
//! are dropped.

use std::collections::{BTreeMap, BTreeSet};

use shoal_ring::NodeId;

use super::{later, ClusterState, Layout};

impl ClusterState {
    /// Live members of any layout in the history.
    pub fn history_members(&self) -> BTreeSet<NodeId> {
        self.layouts
            .iter()
            .flat_map(|l| self.live_members_of(l))
            .collect()
    }

    /// Drops the layouts before the newest one that every live member of
    /// the history reads from: writes to the old replicas are no longer
    /// needed by any reader.
    pub fn prune(&mut self) {
        let members = self.history_members();
        let keep_from = (1..self.layouts.len()).rev().find(|&i| {
            let version = self.layouts[i].version;
            members
                .iter()
                .all(|id| self.reached(id, |p| p.switched >= version))
        });
        if let Some(i) = keep_from {
            self.layouts.drain(..i);
        }
    }

    /// The union of both histories, one layout per version, from the newer
    /// of the two oldest layouts on. What is older than the other side's
    /// oldest layout was dropped there as every member had moved past it,
    /// or never reached it: a layout that only a removed claimant heard of
    /// (see [`ClusterState::plan`]), brought back after changes made
    /// since. Kept, reads would go to its replicas, which never synced it,
    /// and a member only it holds would hold up every later change.
    pub(super) fn merge_layouts(&mut self, other: &ClusterState) {
        let oldest = |s: &ClusterState| s.layouts.first().map_or(0, |l| l.version);
        let floor = oldest(self).max(oldest(other));
        let mut by_version: BTreeMap<u64, Layout> = BTreeMap::new();
        for l in self.layouts.iter().chain(&other.layouts) {
            match by_version.get(&l.version) {
                _ if l.version < floor => {}
                Some(kept) if !later(l, kept, |_| 0) => {}
                _ => {
                    by_version.insert(l.version, l.clone());
                }
            }
        }
        self.layouts = by_version.into_values().collect();
        // A layout the other side had already dropped as synced comes back
        // in the union; pruning on the merged progress drops it again.
        self.prune();
    }
}
