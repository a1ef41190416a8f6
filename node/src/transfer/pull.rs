//! What a node pulls when a layout makes it a replica of partitions it
//! did not hold: from which old replicas, and how many must answer.

use shoal_ring::NodeId;

use crate::membership::state::ClusterState;

/// A partition to pull: from its old replicas, the `oldest` layout's
/// first, `needed` of which must be reached.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Pull {
    pub partition: u32,
    pub sources: Vec<NodeId>,
    pub oldest: usize,
    pub needed: usize,
}

/// Partitions this node replicates in the current layout but not in an
/// older one of the history, with the old replicas to pull from.
pub(super) fn to_pull(cluster: &ClusterState, me: NodeId, n: usize, w: usize) -> Vec<Pull> {
    let Some((current, older)) = cluster.layouts.split_last() else {
        return Vec::new();
    };
    let removed = |id: &NodeId| cluster.members.get(id).is_some_and(|m| m.removed);
    (0..current.ring.partition_count())
        .filter_map(|p| {
            if !current
                .ring
                .preference_list_for_partition(p, n)
                .contains(&me)
            {
                return None;
            }
            let mut pull = Pull {
                partition: p,
                sources: Vec::new(),
                oldest: 0,
                needed: n.saturating_sub(w) + 1,
            };
            let mut new_here = false;
            for (i, layout) in older.iter().enumerate() {
                let list = layout.ring.preference_list_for_partition(p, n);
                if !list.contains(&me) {
                    new_here = true;
                } else if i == 0 {
                    // A replica of the oldest layout itself.
                    pull.needed = pull.needed.saturating_sub(1);
                }
                for id in list {
                    if id != me && !removed(&id) && !pull.sources.contains(&id) {
                        pull.sources.push(id);
                    }
                }
                if i == 0 {
                    pull.oldest = pull.sources.len();
                }
            }
            if pull.oldest == 0 {
                // None of the oldest layout's replicas left (removed): as
                // many of the others as the quorum asks.
                pull.oldest = pull.sources.len();
                pull.needed = (n.saturating_sub(w) + 1).min(pull.oldest);
            }
            pull.needed = pull.needed.min(pull.oldest);
            new_here.then_some(pull)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use shoal_ring::Ring;

    use super::*;
    use crate::membership::state::{test_member as info, Change};

    /// With three layouts in the history (the middle one brought back late
    /// by a removed claimant: see `ClusterState::plan`), a new replica
    /// counts its N-W+1 answers among the oldest layout's replicas, where
    /// every acknowledged write is on W of them: the middle layout's
    /// replicas, which synced nothing, are pulled from but do not make up
    /// the count (helper-80).
    #[test]
    fn a_pull_counts_its_quorum_among_the_oldest_layouts_replicas() {
        let mut s = ClusterState::new(64, 3);
        for i in 0..4 {
            s.announce(info(i), 1);
        }
        let ids = (0..4).map(|i| info(i).id).collect();
        s.adopt(Ring::claim(None, &ids, 64, 3).unwrap());
        let mut dead = s.clone();
        dead.announce(info(4), 5);
        dead.stage(info(4).id, Some(Change::Join), 5);
        dead.commit(2, None, 6).unwrap();
        s.remove_now(info(0).id, 7);
        s.announce(info(5), 7);
        s.stage(info(5).id, Some(Change::Join), 7);
        let plan = s.plan().unwrap();
        s.commit(plan.version, None, 8).unwrap();
        s.merge(&dead);
        assert_eq!(s.layouts.len(), 3);
        let (oldest, middle) = (&s.layouts[0].ring, &s.layouts[1].ring);
        let me = info(5).id;
        let live = |id: &&NodeId| **id != me && **id != info(0).id;
        let pulls = to_pull(&s, me, 3, 2);
        assert!(!pulls.is_empty());
        for pull in pulls {
            let old = oldest.preference_list_for_partition(pull.partition, 3);
            let live_old = old.iter().filter(live).count();
            assert_eq!(pull.oldest, live_old, "{pull:?}");
            assert!(pull.sources[..pull.oldest]
                .iter()
                .all(|id| old.contains(id)));
            assert_eq!(pull.needed, 2.min(live_old), "{pull:?}");
            let mid = middle.preference_list_for_partition(pull.partition, 3);
            assert!(mid.iter().filter(live).all(|id| pull.sources.contains(id)));
        }
    }
}
