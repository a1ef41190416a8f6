use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use crate::{partitions_moved, replica_counts, transfers, NodeId, Ring};

/// splitmix64: a seeded source for the random sequences, so a failure names
/// the seed that replays it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn id(&mut self) -> NodeId {
        NodeId::from_u128((u128::from(self.next()) << 64) | u128::from(self.next()))
    }
}

fn counts(ring: &Ring) -> BTreeMap<NodeId, usize> {
    let mut c = BTreeMap::new();
    for o in ring.owners() {
        *c.entry(*o).or_insert(0) += 1;
    }
    c
}

/// Partitions whose owner owns another of the next `n - 1`: each is a
/// window of `n` with a node twice.
fn breaches(ring: &Ring, n: usize) -> usize {
    let o = ring.owners();
    let q = o.len();
    (0..q)
        .filter(|&p| (1..n.min(q)).any(|d| o[(p + d) % q] == o[p]))
        .count()
}

fn zone_repeats(ring: &Ring, n: usize) -> usize {
    let o = ring.owners();
    let q = o.len();
    let z = ring.zones();
    let zone = |x: &NodeId| z.get(x).map(|s| s.as_str());
    (0..q)
        .filter(|&p| {
            let w: Vec<_> = (0..n.min(q)).map(|d| o[(p + d) % q]).collect();
            w.iter().enumerate().any(|(i, a)| {
                w[i + 1..]
                    .iter()
                    .any(|b| a == b || (zone(a).is_some() && zone(a) == zone(b)))
            })
        })
        .count()
}

/// Partitions that changed owner minus those the change had to move (what
/// members gained in count): the repair term.
fn repair_term(before: &Ring, after: &Ring) -> usize {
    let (cb, ca) = (counts(before), counts(after));
    let gains: usize = ca
        .iter()
        .map(|(x, c)| c.saturating_sub(cb.get(x).copied().unwrap_or(0)))
        .sum();
    partitions_moved(before, after) - gains
}

fn zones_of(ring: &Ring, list: &[NodeId]) -> usize {
    let z: BTreeSet<Option<&String>> = list.iter().map(|x| ring.zones().get(x)).collect();
    z.len()
}

#[test]
fn explore() {
    let cases: &[(u32, usize, usize, u64, usize)] = &[
        (64, 2, 20, 100, 0), (64, 3, 20, 100, 0), (64, 4, 20, 100, 0), (64, 5, 24, 100, 0),
        (256, 2, 40, 100, 0), (256, 3, 40, 100, 0), (256, 4, 40, 100, 0), (256, 5, 40, 100, 0),
        (1024, 3, 110, 20, 0), (1024, 4, 110, 20, 0),
        (64, 3, 20, 100, 3), (256, 3, 40, 100, 3), (1024, 3, 110, 20, 3), (256, 3, 40, 100, 4), (256, 2, 40, 100, 2),
    ];
    for &(q, n, goal, seqs, nz) in cases {
        let t = Instant::now();
        let mut table: BTreeMap<(&str, usize), usize> = BTreeMap::new();
        let mut worst_breach = 0;
        let mut worst_rep = 0.0f64;
        let mut worst_rmove = 0.0f64;
        let mut worst_zone_miss = 0;
        let mut claims = 0;
        for seed in 0..seqs {
            let mut rng = Rng(seed * 7919 + q as u64 + n as u64);
            let mut zone_of: BTreeMap<NodeId, Option<String>> = BTreeMap::new();
            let mut add = |rng: &mut Rng, zone_of: &mut BTreeMap<NodeId, Option<String>>| {
                let id = rng.id();
                let z = if nz == 0 { None } else { Some(format!("z{}", rng.below(nz))) };
                zone_of.insert(id, z);
            };
            for _ in 0..4 { add(&mut rng, &mut zone_of); }
            let mut ring = Ring::claim_zoned(None, &zone_of, q, n).unwrap();
            for _step in 0..60 {
                let m = zone_of.len();
                let mut next = zone_of.clone();
                let single = m >= goal * 9 / 10 || rng.below(3) == 0;
                let kind;
                if m < goal && (rng.below(4) != 0 || m <= 4) {
                    let k = if single { 1 } else { 1 + rng.below((m / 8).max(1)) };
                    for _ in 0..k { add(&mut rng, &mut next); }
                    kind = if k == 1 { "join" } else { "batch" };
                } else {
                    let k = if single { 1 } else { 1 + rng.below((m / 10).max(1)) };
                    for _ in 0..k { let v: Vec<_> = next.keys().copied().collect(); let x = v[rng.below(v.len())]; next.remove(&x); }
                    kind = if k == 1 { "leave" } else { "batch" };
                }
                let new = Ring::claim_zoned(Some(&ring), &next, q, n).unwrap();
                claims += 1;
                let r = repair_term(&ring, &new);
                let mm = next.len();
                let e = table.entry((kind, mm.min(13))).or_insert(0usize); *e = (*e).max(r);
                let c = counts(&new);
                assert!(c.values().max().unwrap() - c.values().min().unwrap() <= 1);
                let b = breaches(&new, n);
                if n * (q as usize).div_ceil(mm) <= q as usize {
                    worst_breach = worst_breach.max(b);
                }
                let moved = partitions_moved(&ring, &new);
                let rmoved: usize = transfers(&ring, &new, n).iter().map(|t| t.to.len()).sum();
                if moved > 0 && breaches(&ring, n) == 0 && b == 0 { worst_rmove = worst_rmove.max(rmoved as f64 / moved as f64); }
                if mm >= n + 1 {
                    let rc = replica_counts(&new, n);
                    let fair = (n * q as usize) as f64 / mm as f64;
                    for v in rc.values() { worst_rep = worst_rep.max((*v as f64 - fair).abs()); }
                }
                if nz > 0 {
                    let zs: BTreeSet<_> = next.values().collect();
                    let want = n.min(zs.len());
                    for p in 0..q { let l = new.preference_list_for_partition(p, n); worst_zone_miss = worst_zone_miss.max(want - zones_of(&new, &l).min(want)); }
                }
                ring = new;
                zone_of = next;
            }
        }
        eprintln!("q {q} n {n} zones {nz}: {claims} claims in {:?}; breaches {worst_breach}; replica dev {worst_rep:.2}; replicas/moved {worst_rmove:.2}; zone miss {worst_zone_miss}", t.elapsed());
        eprintln!("    {table:?}");
    }
}
