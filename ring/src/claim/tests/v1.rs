//! The claim every release before this one ran, copied verbatim apart from
//! working on owner lists instead of rings. Two tests need it: the new claim
//! must give exactly its ring from scratch (existing clusters compute their
//! ring that way, so a rolling upgrade must not move data), and the
//! background case (one node joining 100) is printed for both.

use std::collections::{BTreeMap, BTreeSet};

use crate::NodeId;

pub fn claim(
    previous: Option<&[NodeId]>,
    members: &BTreeSet<NodeId>,
    q: u32,
    n: usize,
) -> Vec<NodeId> {
    let q = q as usize;
    let nodes: Vec<NodeId> = members.iter().copied().collect();
    let mut owners: Vec<Option<NodeId>> = match previous {
        Some(prev) if prev.len() == q => prev
            .iter()
            .map(|o| members.contains(o).then_some(*o))
            .collect(),
        _ => (0..q).map(|p| Some(nodes[p % nodes.len()])).collect(),
    };

    let mut counts: BTreeMap<NodeId, usize> = nodes.iter().map(|n| (*n, 0)).collect();
    for o in owners.iter().flatten() {
        *counts.get_mut(o).expect("owner is a member") += 1;
    }
    let targets = targets(&nodes, &counts, q);

    for node in &nodes {
        let target = targets[node];
        while counts[node] > target {
            let mut mine: Vec<usize> = (0..q).filter(|&p| owners[p] == Some(*node)).collect();
            mine.sort_by_key(|&p| (std::cmp::Reverse(conflicts(&owners, p, *node, n)), p));
            owners[mine[0]] = None;
            *counts.get_mut(node).expect("member") -= 1;
        }
    }

    for p in 0..q {
        if owners[p].is_some() {
            continue;
        }
        let under: Vec<NodeId> = nodes
            .iter()
            .copied()
            .filter(|c| counts[c] < targets[c])
            .collect();
        let chosen = under
            .iter()
            .copied()
            .min_by_key(|c| (conflicts(&owners, p, *c, n), counts[c], *c))
            .expect("free partitions never outnumber missing claims");
        owners[p] = Some(chosen);
        *counts.get_mut(&chosen).expect("member") += 1;
    }

    owners
        .into_iter()
        .map(|o| o.expect("all assigned"))
        .collect()
}

fn targets(
    nodes: &[NodeId],
    counts: &BTreeMap<NodeId, usize>,
    q: usize,
) -> BTreeMap<NodeId, usize> {
    let base = q / nodes.len();
    let extra = q % nodes.len();
    let mut by_load: Vec<NodeId> = nodes.to_vec();
    by_load.sort_by_key(|n| (std::cmp::Reverse(counts[n]), *n));
    by_load
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, base + usize::from(i < extra)))
        .collect()
}

fn conflicts(owners: &[Option<NodeId>], p: usize, node: NodeId, n: usize) -> usize {
    let q = owners.len();
    let span = n.saturating_sub(1).min(q / 2);
    (1..=span)
        .filter(|d| owners[(p + d) % q] == Some(node) || owners[(p + q - d) % q] == Some(node))
        .count()
}
