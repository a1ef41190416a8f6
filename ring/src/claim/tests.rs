//! The claim's bounds as the crate doc states them. Random cases come from a
//! seeded generator; every test prints how many cases it ran, and a failure
//! names the seed and step that replay it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::Claim;
use crate::tests::breaches;
use crate::{partitions_moved, preference_lists, target_n_val_holds, NodeId, Ring};

mod v1;

/// splitmix64: the seeded source of every random case here.
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

type Members = BTreeMap<NodeId, Option<String>>;

fn counts(ring: &Ring) -> BTreeMap<NodeId, usize> {
    let mut c = BTreeMap::new();
    for o in ring.owners() {
        *c.entry(*o).or_insert(0) += 1;
    }
    c
}

/// Most owned minus least owned, over `members` (a member owning nothing
/// counts as 0).
fn imbalance(ring: &Ring, members: &Members) -> usize {
    let c = counts(ring);
    let owned: Vec<usize> = members
        .keys()
        .map(|m| c.get(m).copied().unwrap_or(0))
        .collect();
    owned.iter().max().unwrap() - owned.iter().min().unwrap()
}

/// Windows of `n` consecutive partitions with two owners in one zone (or one
/// owner twice).
fn zone_repeats(ring: &Ring, n: usize) -> usize {
    let o = ring.owners();
    let q = o.len();
    let zone = |x: &NodeId| ring.zones().get(x);
    (0..q)
        .filter(|&p| {
            let w: Vec<NodeId> = (0..n.min(q)).map(|d| o[(p + d) % q]).collect();
            w.iter().enumerate().any(|(i, a)| {
                w[i + 1..]
                    .iter()
                    .any(|b| a == b || (zone(a).is_some() && zone(a) == zone(b)))
            })
        })
        .count()
}

/// What members gained in owned count: the partitions a change must move.
fn gains(before: &Ring, after: &Ring) -> usize {
    let (cb, ca) = (counts(before), counts(after));
    ca.iter()
        .map(|(x, c)| c.saturating_sub(cb.get(x).copied().unwrap_or(0)))
        .sum()
}

fn replicas(lists: &[Vec<NodeId>]) -> BTreeMap<NodeId, usize> {
    let mut c = BTreeMap::new();
    for node in lists.iter().flatten() {
        *c.entry(*node).or_insert(0) += 1;
    }
    c
}

/// Replicas arriving: (partition, node) pairs in the new lists, not the old.
fn replicas_moved(old: &[Vec<NodeId>], new: &[Vec<NodeId>]) -> usize {
    old.iter()
        .zip(new)
        .map(|(o, n)| n.iter().filter(|x| !o.contains(x)).count())
        .sum()
}

/// Distinct zones in a list, a zone-less node counting as a zone of its own.
fn zones_spanned(ring: &Ring, list: &[NodeId]) -> usize {
    let labels: BTreeSet<Result<&String, NodeId>> =
        list.iter().map(|x| ring.zones().get(x).ok_or(*x)).collect();
    labels.len()
}

fn zones_owning(ring: &Ring) -> usize {
    let labels: BTreeSet<Result<&String, NodeId>> = ring
        .owners()
        .iter()
        .map(|x| ring.zones().get(x).ok_or(*x))
        .collect();
    labels.len()
}

/// How members get zones in a sequence.
#[derive(Clone, Copy, Debug)]
enum Zones {
    Off,
    /// Each member in one of this many zones, at random: zone sizes differ.
    Random(usize),
}

/// One family of random join/leave sequences.
struct Sequences {
    label: &'static str,
    q: u32,
    n: usize,
    seeds: u64,
    /// Members before the first claim with a previous ring.
    start: usize,
    /// Sequences grow (by batches while under 90% of it) to about this size.
    goal: usize,
    steps: usize,
    zones: Zones,
}

/// What a family of sequences saw; printed, and its worst cases asserted.
#[derive(Default)]
struct Tally {
    sequences: u64,
    claims: usize,
    joins: usize,
    leaves: usize,
    batches: usize,
    /// Partitions moved beyond what members gained, most seen.
    worst_extra: usize,
    /// Replicas moved per partition moved, most seen (rings with no breach).
    worst_replicas_per_move: f64,
    /// Replica count off the fair `N * Q / M`, most seen, in replicas.
    worst_replica_gap: f64,
    /// Partitions moved, less the slack, over what members gained: most seen
    /// for single joins and leaves that keep at least 2N + 2 members.
    worst_ratio: f64,
    /// Claims where `target_n_val_holds` is false, and how many of those
    /// left a breach.
    unguaranteed: usize,
    unguaranteed_breached: usize,
    /// Most of the ring a single leave moved when fewer than 2N + 2 stay.
    worst_small_leave: f64,
    slowest: Duration,
}

impl Sequences {
    fn run(&self) -> Tally {
        let (q, n) = (self.q, self.n);
        let qs = q as usize;
        let mut t = Tally::default();
        let started = Instant::now();
        for seed in 0..self.seeds {
            t.sequences += 1;
            let mut rng = Rng(seed.wrapping_mul(0x51_7cc1) ^ u64::from(q) ^ (n as u64) << 40);
            let zones = self.zones;
            let zone = |rng: &mut Rng| match zones {
                Zones::Off => None,
                Zones::Random(k) => Some(format!("z{}", rng.below(k))),
            };
            let mut members: Members = (0..self.start)
                .map(|_| (rng.id(), zone(&mut rng)))
                .collect();
            let mut ring = Ring::claim_zoned(None, &members, q, n).unwrap();
            let mut lists = preference_lists(&ring, n);
            for step in 0..self.steps {
                let at = format!("{} seed {seed} step {step}", self.label);
                let m = members.len();
                let mut next = members.clone();
                let grow = m < self.goal && (m <= self.start || rng.below(4) != 0);
                let k = if m < self.goal * 9 / 10 && rng.below(2) == 0 {
                    1 + rng.below((m / 8).max(1))
                } else {
                    1
                };
                for _ in 0..k {
                    if grow {
                        next.insert(rng.id(), zone(&mut rng));
                    } else if next.len() > 1 {
                        let x = *next.keys().nth(rng.below(next.len())).unwrap();
                        next.remove(&x);
                    }
                }
                let clock = Instant::now();
                let new = Ring::claim_zoned(Some(&ring), &next, q, n).unwrap();
                t.slowest = t.slowest.max(clock.elapsed());
                t.claims += 1;
                assert_eq!(
                    new,
                    Ring::claim_zoned(Some(&ring), &next, q, n).unwrap(),
                    "{at}: not deterministic"
                );
                let mm = next.len();
                assert!(imbalance(&new, &next) <= 1, "{at}: unbalanced");
                let b_prev = breaches(&ring, n);
                let b = breaches(&new, n);
                if target_n_val_holds(q, mm, n) {
                    assert_eq!(b, 0, "{at}: {mm} members, breaches");
                } else if mm > n {
                    t.unguaranteed += 1;
                    t.unguaranteed_breached += usize::from(b > 0);
                }
                let moved = partitions_moved(&ring, &new);
                let must = gains(&ring, &new);
                t.worst_extra = t.worst_extra.max(moved - must);
                let slack = 2 * (n - 1) + 2 * b_prev;
                let zoned = !matches!(self.zones, Zones::Off);
                let new_lists = preference_lists(&new, n);
                if k == 1 && mm >= 2 * n + 2 && must > 0 {
                    let r = moved.saturating_sub(slack) as f64 / must as f64;
                    t.worst_ratio = t.worst_ratio.max(r);
                }
                if k == 1 && grow {
                    t.joins += 1;
                    if !zoned {
                        let bound = qs.div_ceil(m + 1) + slack;
                        assert!(moved <= bound, "{at}: join moved {moved} > {bound}");
                    }
                } else if k == 1 {
                    t.leaves += 1;
                    if !zoned && mm >= 2 * n + 2 {
                        let bound = 2 * must + slack;
                        assert!(moved <= bound, "{at}: leave moved {moved} > {bound}");
                    } else if !zoned {
                        t.worst_small_leave = t.worst_small_leave.max(moved as f64 / qs as f64);
                    }
                } else {
                    t.batches += 1;
                }
                if zoned {
                    if k == 1 && mm >= 2 * n + 2 {
                        let bound = 3 * must + slack;
                        assert!(moved <= bound, "{at}: zoned change moved {moved} > {bound}");
                    }
                    if moved > 0 {
                        let r = replicas_moved(&lists, &new_lists);
                        t.worst_replicas_per_move =
                            t.worst_replicas_per_move.max(r as f64 / moved as f64);
                    }
                    let want = n.min(zones_owning(&new));
                    for (p, list) in new_lists.iter().enumerate() {
                        assert!(
                            zones_spanned(&new, list) >= want,
                            "{at}: partition {p}: {list:?}"
                        );
                    }
                } else if b == 0 {
                    // No breach: the list of p is owners[p..p+N], so every node
                    // holds exactly N replicas per partition it owns.
                    let fair = (n * qs) as f64 / mm as f64;
                    let c = counts(&new);
                    for (x, r) in replicas(&new_lists) {
                        assert_eq!(r, n.min(mm) * c[&x], "{at}: replicas of {x}");
                        t.worst_replica_gap = t.worst_replica_gap.max((r as f64 - fair).abs());
                    }
                    if b_prev == 0 && moved > 0 {
                        let r = replicas_moved(&lists, &new_lists);
                        assert!(r <= n * moved, "{at}: {r} replicas for {moved} partitions");
                        t.worst_replicas_per_move =
                            t.worst_replicas_per_move.max(r as f64 / moved as f64);
                    }
                }
                ring = new;
                lists = new_lists;
                members = next;
            }
        }
        eprintln!(
            "{} (Q={q}, N={n}, {:?}): {} sequences, {} claims ({} joins, {} leaves, {} batches) in {:.2?}; \
             slowest claim {:.2?}; most moved beyond gains {}; replicas per moved partition \
             <= {:.2}; replica counts within {} of fair; single changes moved <= {:.2} x gains + slack",
            self.label,
            self.zones,
            t.sequences,
            t.claims,
            t.joins,
            t.leaves,
            t.batches,
            started.elapsed(),
            t.slowest,
            t.worst_extra,
            t.worst_replicas_per_move,
            match self.zones {
                Zones::Off => format!("{:.2}", t.worst_replica_gap),
                Zones::Random(_) => "(unequal zones: not compared)".into(),
            },
            t.worst_ratio,
        );
        if t.unguaranteed > 0 || t.worst_small_leave > 0.0 {
            eprintln!(
                "  where target_n_val is not guaranteed (M > N): {} claims, {} left a breach; \
                 a leave keeping under 2N + 2 members moved at most {:.0}% of the ring",
                t.unguaranteed,
                t.unguaranteed_breached,
                100.0 * t.worst_small_leave
            );
        }
        t
    }
}

#[test]
fn sequences_grow_to_1000_nodes_at_q16384() {
    let t = Sequences {
        label: "1000-node ring",
        q: 16384,
        n: 3,
        seeds: 3,
        start: 8,
        goal: 1000,
        steps: 70,
        zones: Zones::Off,
    }
    .run();
    assert!(t.worst_replica_gap < 3.0);
}

#[test]
fn sequences_around_100_nodes_at_q1024() {
    for n in [2, 3, 4] {
        Sequences {
            label: "100-node ring",
            q: 1024,
            n,
            seeds: 8,
            start: 4,
            goal: 110,
            steps: 60,
            zones: Zones::Off,
        }
        .run();
    }
}

#[test]
fn sequences_of_small_clusters_at_q256_and_q64() {
    for (q, goal) in [(256, 40), (64, 20)] {
        for n in [2, 3, 4, 5] {
            Sequences {
                label: "small cluster",
                q,
                n,
                seeds: 40,
                start: 3,
                goal,
                steps: 40,
                zones: Zones::Off,
            }
            .run();
        }
    }
}

#[test]
fn sequences_with_random_zones() {
    for (q, goal, k, seeds) in [
        (64, 20, 3, 40),
        (256, 40, 3, 30),
        (256, 40, 4, 30),
        (256, 30, 2, 30),
        (1024, 60, 3, 10),
    ] {
        Sequences {
            label: "random zones",
            q,
            n: 3,
            seeds,
            start: 4,
            goal,
            steps: 30,
            zones: Zones::Random(k),
        }
        .run();
    }
}

#[test]
fn from_scratch_is_todays_round_robin() {
    let mut rng = Rng(1);
    let mut cases = 0;
    for m in 1..=40usize {
        for qbits in 0..=12 {
            for n in [1, 2, 3, 5] {
                let members: BTreeSet<NodeId> = if m % 2 == 0 {
                    (0..m).map(|_| rng.id()).collect()
                } else {
                    (1..=m as u128).map(NodeId::from_u128).collect()
                };
                let q = 1 << qbits;
                let before = v1::claim(None, &members, q, n);
                let ring = Ring::claim(None, &members, q, n).unwrap();
                assert_eq!(ring.owners(), &before[..], "{m} members, Q={q}, N={n}");
                let zoneless: Members = members.iter().map(|x| (*x, None)).collect();
                let zoned = Ring::claim_zoned(None, &zoneless, q, n).unwrap();
                assert_eq!(zoned.owners(), &before[..], "{m} members, Q={q}, N={n}");
                cases += 1;
            }
        }
    }
    eprintln!(
        "from scratch = the previous release's ring: {cases} member sets x (claim, claim_zoned)"
    );
}

#[test]
fn the_template_has_no_breach() {
    let (mut checked, mut with) = (0, 0);
    for n in 1..=6usize {
        for qbits in 0..=12 {
            let q = 1usize << qbits;
            for m in (1..=4 * n + 4).chain([50, 100, 1000]) {
                checked += 1;
                let Some(slots) = Claim::template(q, m, n) else {
                    let r = q % m;
                    assert!(
                        r > 0 && r < n && (m < 2 * n - 1 || q < m),
                        "Q={q} M={m} N={n}"
                    );
                    continue;
                };
                with += 1;
                assert_eq!(slots.len(), q);
                let mut c = vec![0usize; m];
                for s in &slots {
                    c[*s as usize] += 1;
                }
                for (s, k) in c.iter().enumerate() {
                    assert_eq!(
                        *k,
                        q / m + usize::from(s < q % m),
                        "Q={q} M={m} N={n} slot {s}"
                    );
                }
                // Clean wherever no slot owns too many partitions to be clean.
                if super::window(q, m, n) == n {
                    for p in 0..q {
                        for d in 1..n {
                            assert_ne!(slots[p], slots[(p + d) % q], "Q={q} M={m} N={n} at {p}");
                        }
                    }
                }
            }
        }
    }
    // The crate doc's claim: for N <= 3, target_n_val holds for every M > N.
    for n in 1..=3 {
        for qbits in 2..=16 {
            for m in (n + 1..=200).chain([1000, 5000, 65536]) {
                assert!(
                    target_n_val_holds(1 << qbits, m, n),
                    "Q=2^{qbits} M={m} N={n}"
                );
            }
        }
    }
    eprintln!("template: {checked} (Q, M, N) checked, {with} with a template, none with a breach where N * ceil(Q/M) <= Q");
}

#[test]
fn a_claim_with_the_same_members_repairs_a_round_robin() {
    let (mut cases, mut repaired, mut worst) = (0, 0, 0);
    let mut rng = Rng(2);
    for n in [2, 3, 4] {
        for q in [16u32, 64, 256, 1024] {
            for m in n + 1..=60 {
                let members: BTreeSet<NodeId> = (0..m).map(|_| rng.id()).collect();
                let rr = Ring::claim(None, &members, q, n).unwrap();
                let b = breaches(&rr, n);
                // The deal breaches exactly at the wrap, when Q mod M < N.
                let r = q as usize % m;
                assert_eq!(b, if r > 0 && r < n { r } else { 0 }, "Q={q} M={m} N={n}");
                let again = Ring::claim(Some(&rr), &members, q, n).unwrap();
                let moved = partitions_moved(&rr, &again);
                if target_n_val_holds(q, m, n) {
                    assert_eq!(breaches(&again, n), 0, "Q={q} M={m} N={n}");
                    assert!(
                        moved <= 2 * b,
                        "Q={q} M={m} N={n}: moved {moved} for {b} breaches"
                    );
                }
                cases += 1;
                repaired += usize::from(b > 0);
                worst = worst.max(moved);
            }
        }
    }
    eprintln!("round robin repaired: {cases} rings, {repaired} with breaches; most moved {worst}");
}

#[test]
fn one_join_to_100_nodes_takes_a_fair_share_of_replicas() {
    for (q, m) in [(1024u32, 100usize), (16384, 1000)] {
        let n = 3;
        let mut rng = Rng(q.into());
        let members: BTreeSet<NodeId> = (0..m).map(|_| rng.id()).collect();
        let joiner = rng.id();
        let mut after = members.clone();
        after.insert(joiner);
        let fair = (n * q as usize) as f64 / (m + 1) as f64;
        let old_before = Ring::claim(None, &members, q, n).unwrap();
        let old_after = Ring {
            owners: v1::claim(Some(old_before.owners()), &after, q, n),
            zones: BTreeMap::new(),
        };
        let new_after = Ring::claim(Some(&old_before), &after, q, n).unwrap();
        let show = |label: &str, ring: &Ring| {
            let r = replicas(&preference_lists(ring, n));
            let (lo, hi) = (r.values().min().unwrap(), r.values().max().unwrap());
            eprintln!(
                "{m} + 1 nodes (Q={q}, N={n}), {label}: the joiner owns {} partitions and holds \
                 {} replicas (fair {fair:.1}); replicas per node {lo}..={hi}",
                counts(ring)[&joiner],
                r[&joiner],
            );
            r
        };
        show("previous claim", &old_after);
        let r = show("this claim", &new_after);
        for (x, k) in &r {
            assert!(
                (*k as f64 - fair).abs() < n as f64,
                "{x}: {k} replicas, fair {fair:.1}"
            );
        }
    }
}

/// Members `per_zone[z]` in zone `z`.
fn zoned_members(rng: &mut Rng, per_zone: &[usize]) -> Members {
    let mut m = Members::new();
    for (z, k) in per_zone.iter().enumerate() {
        for _ in 0..*k {
            m.insert(rng.id(), Some(format!("z{z}")));
        }
    }
    m
}

fn assert_lists_span(ring: &Ring, n: usize, at: &str) {
    let want = n.min(zones_owning(ring));
    for (p, list) in preference_lists(ring, n).iter().enumerate() {
        assert!(
            zones_spanned(ring, list) >= want,
            "{at}: partition {p}: {list:?}"
        );
    }
}

/// Largest gap between a node's replica count and the fair `N * Q / M`.
fn replica_gap(ring: &Ring, n: usize, m: usize) -> f64 {
    let fair = (n * ring.owners().len()) as f64 / m as f64;
    replicas(&preference_lists(ring, n))
        .values()
        .map(|r| (*r as f64 - fair).abs())
        .fold(0.0, f64::max)
}

#[test]
fn six_nodes_in_three_zones_span_three_zones() {
    let n = 3;
    for q in [64u32, 256, 1024] {
        let mut rng = Rng(q.into());
        let mut members = zoned_members(&mut rng, &[2, 2, 2]);
        let mut ring = Ring::claim_zoned(None, &members, q, n).unwrap();
        assert_lists_span(&ring, n, "fresh");
        eprintln!(
            "6 nodes in 3 zones (Q={q}): {} same-zone windows of {q}, replicas within {:.1} of fair",
            zone_repeats(&ring, n),
            replica_gap(&ring, n, 6)
        );
        // Zone-balanced changes: one node per zone joins, then one per zone
        // leaves, four times over.
        let (mut claims, mut worst_gap, mut worst_extra) = (0, 0.0f64, 0);
        for cycle in 0..4 {
            for join in [true, false] {
                let mut next = members.clone();
                for z in 0..3 {
                    join_or_leave_zone(&mut next, z, join, &mut rng);
                }
                let new = Ring::claim_zoned(Some(&ring), &next, q, n).unwrap();
                let at = format!("Q={q} cycle {cycle} join {join}");
                assert_lists_span(&new, n, &at);
                assert!(imbalance(&new, &next) <= 1, "{at}");
                assert_eq!(breaches(&new, n), 0, "{at}");
                let (moved, must) = (partitions_moved(&ring, &new), gains(&ring, &new));
                assert!(
                    moved <= 2 * must + 2 * (n - 1),
                    "{at}: moved {moved}, gained {must}"
                );
                let gap = replica_gap(&new, n, next.len());
                assert!(gap <= (2 * n) as f64, "{at}: replicas {gap:.1} off fair");
                worst_gap = worst_gap.max(gap);
                worst_extra = worst_extra.max(moved - must);
                claims += 1;
                ring = new;
                members = next;
            }
        }
        eprintln!(
            "  then {claims} zone-balanced claims (3 join, 3 leave): lists span 3 zones; \
             most moved beyond gains {worst_extra}; replicas within {worst_gap:.1} of fair"
        );
    }
}

/// A new member in zone `z{z}`, or one of that zone's members gone.
fn join_or_leave_zone(
    members: &mut BTreeMap<NodeId, Option<String>>,
    z: usize,
    join: bool,
    rng: &mut Rng,
) {
    let zone = Some(format!("z{z}"));
    if join {
        members.insert(rng.id(), zone);
    } else {
        let here: Vec<NodeId> = members
            .iter()
            .filter(|(_, v)| **v == zone)
            .map(|(k, _)| *k)
            .collect();
        members.remove(&here[rng.below(here.len())]);
    }
}

#[test]
fn single_zone_changes_keep_lists_spread() {
    // One node at a time into 3 equal zones (the zones are unequal in
    // between), then out again.
    let n = 3;
    for q in [256u32, 1024] {
        let mut rng = Rng(q.into());
        let mut members = zoned_members(&mut rng, &[2, 2, 2]);
        let mut ring = Ring::claim_zoned(None, &members, q, n).unwrap();
        let (mut claims, mut worst_ratio, mut worst_equal_gap) = (0, 0.0f64, 0.0f64);
        let mut worst_fresh_gap = 0.0f64;
        for _cycle in 0..3 {
            for join in [true, false] {
                for z in 0..3 {
                    let mut next = members.clone();
                    join_or_leave_zone(&mut next, z, join, &mut rng);
                    let new = Ring::claim_zoned(Some(&ring), &next, q, n).unwrap();
                    let at = format!("Q={q} {} z{z}", if join { "join" } else { "leave" });
                    assert_lists_span(&new, n, &at);
                    assert!(imbalance(&new, &next) <= 1, "{at}");
                    let (moved, must) = (partitions_moved(&ring, &new), gains(&ring, &new));
                    assert!(
                        moved <= 3 * must + 2 * (n - 1),
                        "{at}: moved {moved}, gained {must}"
                    );
                    worst_ratio = worst_ratio.max(moved as f64 / must as f64);
                    if z == 2 {
                        // Zones are equal again.
                        let fair = (n * q as usize) as f64 / next.len() as f64;
                        let gap = replica_gap(&new, n, next.len()) / fair;
                        assert!(gap <= 0.1, "{at}: replicas {:.1}% off fair", 100.0 * gap);
                        worst_equal_gap = worst_equal_gap.max(gap);
                        let fresh = Ring::claim_zoned(None, &next, q, n).unwrap();
                        worst_fresh_gap =
                            worst_fresh_gap.max(replica_gap(&fresh, n, next.len()) / fair);
                    }
                    claims += 1;
                    ring = new;
                    members = next;
                }
            }
        }
        eprintln!(
            "single-zone changes (Q={q}): {claims} claims; moved <= {worst_ratio:.2} x gains; \
             when zones are equal again, replicas within {:.1}% of fair (dealt from scratch: \
             {:.1}%)",
            100.0 * worst_equal_gap,
            100.0 * worst_fresh_gap
        );
    }
}

#[test]
fn unequal_zones_and_members_without_a_zone() {
    let n = 3;
    let mut rng = Rng(3);
    let mut cases = 0;
    for q in [16u32, 64, 256] {
        for sizes in [
            &[3usize, 1, 1][..],
            &[5, 1],
            &[4, 2, 1, 1],
            &[1, 1],
            &[6],
            &[2, 2, 2, 2],
        ] {
            let mut members = zoned_members(&mut rng, sizes);
            for zoneless in 0..3 {
                if zoneless > 0 {
                    members.insert(rng.id(), None);
                }
                let fresh = Ring::claim_zoned(None, &members, q, n).unwrap();
                let at = format!("Q={q} zones {sizes:?} + {zoneless} without");
                assert_lists_span(&fresh, n, &at);
                assert!(imbalance(&fresh, &members) <= 1, "{at}");
                let mut more = members.clone();
                more.insert(rng.id(), Some("z0".into()));
                let joined = Ring::claim_zoned(Some(&fresh), &more, q, n).unwrap();
                assert_lists_span(&joined, n, &at);
                assert!(imbalance(&joined, &more) <= 1, "{at}");
                cases += 2;
            }
        }
    }
    eprintln!("unequal zones and zone-less members: {cases} rings, every list spans min(N, zones)");
}

#[test]
fn every_zone_owns_a_partition_when_q_is_below_m() {
    let mut rng = Rng(4);
    let mut members = zoned_members(&mut rng, &[20, 15, 4, 1]);
    for q in [8u32, 16] {
        let ring = Ring::claim_zoned(None, &members, q, 3).unwrap();
        let mut grown = members.clone();
        grown.insert(rng.id(), Some("z0".into()));
        let again = Ring::claim_zoned(Some(&ring), &grown, q, 3).unwrap();
        for r in [&ring, &again] {
            let zones: BTreeSet<&String> = r.owners().iter().map(|o| &r.zones()[o]).collect();
            assert_eq!(zones.len(), 4, "Q={q}");
            assert_lists_span(r, 3, "Q below M");
        }
        members = grown;
    }
    eprintln!("Q < M: 2 partition counts x 2 claims, every zone owns a partition");
}

#[test]
fn claims_for_1000_members_take_milliseconds() {
    let (q, n) = (16384, 3);
    let mut rng = Rng(5);
    let members: BTreeSet<NodeId> = (0..1000).map(|_| rng.id()).collect();
    let ring = Ring::claim(None, &members, q, n).unwrap();
    let settled = Ring::claim(Some(&ring), &members, q, n).unwrap();
    let mut more = members.clone();
    more.insert(rng.id());
    let mut less = members.clone();
    less.remove(&members.iter().nth(500).copied().unwrap());
    let zoned: Members = members
        .iter()
        .enumerate()
        .map(|(i, x)| (*x, Some(format!("z{}", i % 3))))
        .collect();
    let zoned_ring = Ring::claim_zoned(None, &zoned, q, n).unwrap();
    let mut zoned_more = zoned.clone();
    zoned_more.insert(rng.id(), Some("z1".into()));
    let timed = |label: &str, f: &dyn Fn() -> Ring| {
        let t = Instant::now();
        let r = f();
        let took = t.elapsed();
        eprintln!("1000 members, Q={q}: {label} in {took:.2?}");
        assert!(took < Duration::from_secs(1), "{label} took {took:?}");
        r
    };
    timed("a join", &|| {
        Ring::claim(Some(&settled), &more, q, n).unwrap()
    });
    timed("a leave", &|| {
        Ring::claim(Some(&settled), &less, q, n).unwrap()
    });
    timed("a zoned ring from scratch", &|| {
        Ring::claim_zoned(None, &zoned, q, n).unwrap()
    });
    timed("a zoned join", &|| {
        Ring::claim_zoned(Some(&zoned_ring), &zoned_more, q, n).unwrap()
    });
    let others: BTreeSet<NodeId> = (0..1000).map(|_| rng.id()).collect();
    let t = Instant::now();
    let replaced = Ring::claim(Some(&settled), &others, q, n).unwrap();
    let took = t.elapsed();
    eprintln!("1000 members, Q={q}: all 1000 replaced at once in {took:.2?}");
    assert!(took < Duration::from_secs(3) && breaches(&replaced, n) == 0);
}

#[test]
fn a_leave_from_a_round_robin_grows_the_leavers_neighbours_by_chains() {
    // Round robin over ids 1..=10: the leaver's 2(N-1) neighbours on either
    // side are the same four nodes at every one of its partitions, none can
    // take one, and all nine must grow.
    let (q, n) = (1024, 3);
    let members: BTreeSet<NodeId> = (1..=10u128).map(NodeId::from_u128).collect();
    let before = Ring::claim(None, &members, q, n).unwrap();
    let mut rest = members.clone();
    rest.remove(&NodeId::from_u128(4));
    let after = Ring::claim(Some(&before), &rest, q, n).unwrap();
    let (c, moved) = (
        before.partitions_of(NodeId::from_u128(4)).len(),
        partitions_moved(&before, &after),
    );
    eprintln!("10 to 9 nodes (Q={q}, N={n}): the leaver owned {c}, {moved} partitions moved");
    assert_eq!(breaches(&after, n), 0);
    assert!(moved <= 2 * c + 2 * (n - 1));
}

#[test]
fn zoned_rings_from_scratch_keep_target_n_val() {
    // Every way to put 4 to 8 members in zones of sizes summing to M (up to
    // order), dealt from scratch: no breach where the counts allow, every
    // list spread.
    fn partitions(m: usize, most: usize) -> Vec<Vec<usize>> {
        if m == 0 {
            return vec![vec![]];
        }
        (1..=most.min(m))
            .rev()
            .flat_map(|k| {
                partitions(m - k, k).into_iter().map(move |mut rest| {
                    rest.insert(0, k);
                    rest
                })
            })
            .collect()
    }
    let mut rng = Rng(6);
    let mut cases = 0;
    for n in [2, 3, 4] {
        for m in 4..=8 {
            for sizes in partitions(m, m) {
                for q in [16u32, 64, 256] {
                    let members = zoned_members(&mut rng, &sizes);
                    let ring = Ring::claim_zoned(None, &members, q, n).unwrap();
                    let at = format!("Q={q} N={n} zones {sizes:?}");
                    assert!(imbalance(&ring, &members) <= 1, "{at}");
                    if target_n_val_holds(q, m, n) {
                        assert_eq!(breaches(&ring, n), 0, "{at}");
                    }
                    assert_lists_span(&ring, n, &at);
                    cases += 1;
                }
            }
        }
    }
    eprintln!("zoned rings from scratch: {cases} rings (4 to 8 members, every zone split)");
}

#[test]
fn the_template_keeps_every_count() {
    // The template is the repair's last resort; whichever path reaches it (a
    // claim from a previous ring or a zoned deal from scratch), the members'
    // counts must stay on target.
    let mut rng = Rng(7);
    let mut cases = 0;
    for sizes in [&[3usize, 2][..], &[1, 1, 1, 1, 1, 1, 1], &[4, 4]] {
        let members = zoned_members(&mut rng, sizes);
        for q in [4usize, 16, 64, 256] {
            let mut c = Claim::new(&members, q, 3);
            c.deal_interleaved();
            let dealt = c.count.clone();
            if c.adopt_template() {
                let mut after = vec![0; dealt.len()];
                for o in &c.owners {
                    after[*o as usize] += 1;
                }
                assert_eq!(after, dealt, "Q={q} zones {sizes:?}");
                cases += 1;
            }
        }
    }
    eprintln!("template adopted over a zoned deal: {cases} rings, counts kept");
}
