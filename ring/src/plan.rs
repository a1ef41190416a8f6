//! What a ring change moves, for the operator's `cluster plan` view: which
//! replicas leave and arrive at each partition, and each node's share of the
//! `N * Q` replicas before and after.
//!
//! A replica is a (partition, node) pair of a preference list. Only the set of
//! nodes in a list matters here: a list that only changes order moves no data,
//! so it makes no [`Transfer`].

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{NodeId, Ring};

/// The replicas of one partition that a ring change moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// The partition, numbered in the ring with more partitions when the two
    /// rings' `Q` differ (a partition of the smaller ring is then several of
    /// the larger, and keys never straddle them: both take the hash's top bits).
    pub partition: u32,
    /// Nodes in the old preference list and not in the new, in old list
    /// order: replicas leaving.
    pub from: Vec<NodeId>,
    /// Nodes in the new preference list and not in the old, in new list
    /// order: replicas arriving.
    pub to: Vec<NodeId>,
}

/// One node's share of the replicas before and after a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    pub node: NodeId,
    pub before: usize,
    pub after: usize,
}

/// A ring change as the operator sees it before applying it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The replication factor the lists were computed for.
    pub n: usize,
    /// Partitions whose owner changes (on the finer grid when `Q` differs).
    pub partitions_moved: usize,
    /// Replicas arriving somewhere new: the sum of every `to`. As many leave.
    pub replicas_moved: usize,
    /// Every node in either ring, in id order.
    pub shares: Vec<Share>,
    /// Every partition whose replica set changes, in partition order.
    pub transfers: Vec<Transfer>,
}

impl Plan {
    /// The plan for going from `old` to `new` with `n` replicas.
    pub fn new(old: &Ring, new: &Ring, n: usize) -> Plan {
        let transfers = transfers(old, new, n);
        let before = replica_counts(old, n);
        let after = replica_counts(new, n);
        let nodes: BTreeSet<NodeId> = before.keys().chain(after.keys()).copied().collect();
        Plan {
            n,
            partitions_moved: partitions_moved(old, new),
            replicas_moved: transfers.iter().map(|t| t.to.len()).sum(),
            shares: nodes
                .into_iter()
                .map(|node| Share {
                    node,
                    before: before.get(&node).copied().unwrap_or(0),
                    after: after.get(&node).copied().unwrap_or(0),
                })
                .collect(),
            transfers,
        }
    }
}

/// Every partition whose preference list (of `n`) changes its set of nodes,
/// with the replicas leaving and arriving, in partition order.
pub fn transfers(old: &Ring, new: &Ring, n: usize) -> Vec<Transfer> {
    let (old_lists, new_lists) = (preference_lists(old, n), preference_lists(new, n));
    let fine = old_lists.len().max(new_lists.len());
    let (old_step, new_step) = (fine / old_lists.len(), fine / new_lists.len());
    (0..fine)
        .filter_map(|p| {
            let (was, is) = (&old_lists[p / old_step], &new_lists[p / new_step]);
            let from: Vec<NodeId> = was.iter().filter(|x| !is.contains(x)).copied().collect();
            let to: Vec<NodeId> = is.iter().filter(|x| !was.contains(x)).copied().collect();
            (!from.is_empty() || !to.is_empty()).then_some(Transfer {
                partition: p as u32,
                from,
                to,
            })
        })
        .collect()
}

/// Partitions whose owner differs between the rings, counted on the finer
/// grid when their `Q` differ.
pub fn partitions_moved(old: &Ring, new: &Ring) -> usize {
    let fine = old.owners.len().max(new.owners.len());
    let (old_step, new_step) = (fine / old.owners.len(), fine / new.owners.len());
    (0..fine)
        .filter(|p| old.owners[p / old_step] != new.owners[p / new_step])
        .count()
}

/// Each node's share of the replicas: in how many partitions' preference
/// lists (of `n`) it appears. The shares sum to `min(n, M) * Q`.
pub fn replica_counts(ring: &Ring, n: usize) -> BTreeMap<NodeId, usize> {
    let mut counts = BTreeMap::new();
    for list in preference_lists(ring, n) {
        for node in list {
            *counts.entry(node).or_insert(0) += 1;
        }
    }
    counts
}

/// The preference list of every partition, in partition order: the same as
/// [`Ring::preference_list_for_partition`] for each, computed together.
pub fn preference_lists(ring: &Ring, n: usize) -> Vec<Vec<NodeId>> {
    // When every owner has a zone, a list's zone pass can stop once it has
    // used every zone that owns a partition (see `Ring::list_from`).
    let zones_owning = if ring.zones.is_empty() {
        None
    } else {
        let zones: Option<BTreeSet<&String>> =
            ring.owners.iter().map(|o| ring.zones.get(o)).collect();
        zones.map(|z| z.len())
    };
    (0..ring.owners.len() as u32)
        .map(|p| ring.list_from(p, n, zones_owning))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(ids: std::ops::Range<u128>) -> BTreeSet<NodeId> {
        ids.map(NodeId::from_u128).collect()
    }

    #[test]
    fn a_join_plan_sends_the_joiners_replicas_to_it() {
        let (q, n) = (256, 3);
        let before = Ring::claim(None, &members(1..11), q, n).unwrap();
        let before = Ring::claim(Some(&before), &members(1..11), q, n).unwrap();
        let after = Ring::claim(Some(&before), &members(1..12), q, n).unwrap();
        let joiner = NodeId::from_u128(11);
        let plan = Plan::new(&before, &after, n);
        let taken = after.partitions_of(joiner).len();
        assert_eq!(plan.partitions_moved, taken);
        // Each partition the joiner takes puts it in the N lists that reach it,
        // in place of the partition's old owner.
        assert_eq!(plan.replicas_moved, n * taken);
        for t in &plan.transfers {
            assert_eq!(t.to, vec![joiner], "partition {}", t.partition);
            assert_eq!(t.from.len(), 1);
        }
        let share = |node| plan.shares.iter().find(|s| s.node == node).unwrap().clone();
        assert_eq!((share(joiner).before, share(joiner).after), (0, n * taken));
        for side in [|s: &Share| s.before, |s: &Share| s.after] {
            assert_eq!(plan.shares.iter().map(side).sum::<usize>(), n * q as usize);
        }
        eprintln!(
            "plan of 10 + 1 nodes (Q={q}): {} partitions, {} replicas, {} transfers",
            plan.partitions_moved,
            plan.replicas_moved,
            plan.transfers.len()
        );
    }

    #[test]
    fn transfers_across_a_change_of_q_use_the_finer_partitions() {
        let n = 3;
        let coarse = Ring::claim(None, &members(1..6), 64, n).unwrap();
        let fine = Ring::claim(None, &members(1..6), 128, n).unwrap();
        let (coarse_lists, fine_lists) = (preference_lists(&coarse, n), preference_lists(&fine, n));
        for (old, new) in [(&coarse, &fine), (&fine, &coarse)] {
            let t = transfers(old, new, n);
            let changed: Vec<u32> = (0..128u32)
                .filter(|&p| {
                    let (a, b) = (&coarse_lists[p as usize / 2], &fine_lists[p as usize]);
                    a.iter().collect::<BTreeSet<_>>() != b.iter().collect::<BTreeSet<_>>()
                })
                .collect();
            assert_eq!(t.iter().map(|t| t.partition).collect::<Vec<_>>(), changed);
            assert!(!changed.is_empty());
        }
        assert_eq!(
            partitions_moved(&coarse, &fine),
            partitions_moved(&fine, &coarse)
        );
    }

    #[test]
    fn replica_counts_sum_to_n_q() {
        let mut cases = 0;
        for m in 1..12u128 {
            for q in [1u32, 4, 64, 256] {
                for n in 1..5usize {
                    let zoned: BTreeMap<NodeId, Option<String>> = (1..=m)
                        .map(|i| {
                            (
                                NodeId::from_u128(i),
                                (i % 3 > 0).then(|| format!("z{}", i % 3)),
                            )
                        })
                        .collect();
                    let plain = Ring::claim(None, &members(1..m + 1), q, n).unwrap();
                    let zoned = Ring::claim_zoned(None, &zoned, q, n).unwrap();
                    for ring in [plain, zoned] {
                        let owners = ring.members().len();
                        let total: usize = replica_counts(&ring, n).values().sum();
                        assert_eq!(total, n.min(owners) * q as usize, "M={m} Q={q} N={n}");
                        cases += 1;
                    }
                }
            }
        }
        eprintln!("replica counts sum to min(N, M) * Q: {cases} rings");
    }

    /// The plan crosses the operator's wire as any message does. (A JSON
    /// round trip would need serde_json here, a dependency this crate avoids.)
    #[test]
    fn plans_are_serde_messages() {
        fn message<T: Serialize + serde::de::DeserializeOwned>() {}
        message::<Plan>();
        message::<Transfer>();
        message::<Share>();
    }
}
