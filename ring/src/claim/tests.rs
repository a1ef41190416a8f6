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
        (64, 3, 20, 100, 13), (256, 3, 40, 100, 13), (1024, 3, 110, 20, 13), (256, 3, 40, 100, 14), (256, 2, 40, 100, 12),
    ];
    for &(q, n, goal, seqs, nz) in cases {
        let t = Instant::now();
        let mut table: BTreeMap<(&str, usize), usize> = BTreeMap::new();
        let mut worst_breach = 0;
        let mut worst_rep = 0.0f64;
        let mut worst_rmove = 0.0f64;
        let mut worst_zone_miss = 0;
        let mut claims = 0;
        let (mut zone_bad_inc, mut zone_bad_fresh) = (0, 0);
        let (mut eq_dev_inc, mut eq_dev_fresh, mut eq_points) = (0.0f64, 0.0f64, 0);
        for seed in 0..seqs {
            let mut rng = Rng(seed * 7919 + q as u64 + n as u64);
            let mut zone_of: BTreeMap<NodeId, Option<String>> = BTreeMap::new();
            let mut add = |rng: &mut Rng, zone_of: &mut BTreeMap<NodeId, Option<String>>| {
                let id = rng.id();
                let z = if nz == 0 { None } else if nz > 10 {
                    // Balanced: the zone with fewest members.
                    let k = nz - 10;
                    let mut per = vec![0usize; k];
                    for v in zone_of.values().flatten() { per[v[1..].parse::<usize>().unwrap()] += 1; }
                    let zmin = (0..k).min_by_key(|&z| (per[z], z)).unwrap();
                    Some(format!("z{zmin}"))
                } else { Some(format!("z{}", rng.below(nz))) };
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
                let per_zone = |zo: &BTreeMap<NodeId, Option<String>>| { let mut c: BTreeMap<String, usize> = BTreeMap::new(); for z in zo.values().flatten() { *c.entry(z.clone()).or_insert(0) += 1; } c };
                let pz = per_zone(&next);
                if nz > 10 && pz.values().min() == pz.values().max() && pz.len() == nz - 10 {
                    let fresh = Ring::claim_zoned(None, &next, q, n).unwrap();
                    let fair = (n * q as usize) as f64 / mm as f64;
                    let dev = |r: &Ring| replica_counts(r, n).values().map(|v| (*v as f64 - fair).abs()).fold(0.0, f64::max);
                    eq_dev_inc = eq_dev_inc.max(dev(&new) / fair);
                    eq_dev_fresh = eq_dev_fresh.max(dev(&fresh) / fair);
                    eq_points += 1;
                }
                if nz > 0 {
                    let fresh = Ring::claim_zoned(None, &next, q, n).unwrap();
                    zone_bad_inc += zone_repeats(&new, n);
                    zone_bad_fresh += zone_repeats(&fresh, n);
                }
                ring = new;
                zone_of = next;
            }
        }
        eprintln!("q {q} n {n} zones {nz}: {claims} claims in {:?}; breaches {worst_breach}; replica dev {worst_rep:.2}; replicas/moved {worst_rmove:.2}; zone miss {worst_zone_miss}", t.elapsed());
        eprintln!("    {table:?}");
        eprintln!("    same-zone windows: incremental {zone_bad_inc}, fresh {zone_bad_fresh}");
        eprintln!("    equal zones at {eq_points} steps: worst replica deviation incremental {eq_dev_inc:.3} fresh {eq_dev_fresh:.3} of fair");
    }
}

#[test]
fn explore_cycles() {
    for &q in &[256u32, 1024, 4096] {
        let n = 3;
        let mut rng = Rng(q as u64);
        let mut members: BTreeMap<NodeId, Option<String>> = BTreeMap::new();
        for i in 0..6 { members.insert(rng.id(), Some(format!("z{}", i % 3))); }
        let mut ring = Ring::claim_zoned(None, &members, q, n).unwrap();
        let report = |tag: &str, ring: &Ring, members: &BTreeMap<NodeId, Option<String>>, moved: usize| {
            let fresh = Ring::claim_zoned(None, members, q, n).unwrap();
            let m = members.len();
            let fair = (n * q as usize) as f64 / m as f64;
            let dev = |r: &Ring| replica_counts(r, n).values().map(|v| (*v as f64 - fair).abs()).fold(0.0, f64::max) / fair;
            eprintln!("q {q} {tag} m {m}: moved {moved}; same-zone windows {} (fresh {}); replica dev {:.3} (fresh {:.3})", zone_repeats(ring, n), zone_repeats(&fresh, n), dev(ring), dev(&fresh));
        };
        report("start", &ring, &members, 0);
        for cycle in 0..4 {
            for z in 0..3 {
                let mut next = members.clone();
                next.insert(rng.id(), Some(format!("z{z}")));
                let new = Ring::claim_zoned(Some(&ring), &next, q, n).unwrap();
                report(&format!("c{cycle} join z{z}"), &new, &next, partitions_moved(&ring, &new));
                ring = new; members = next;
            }
            for z in 0..3 {
                let mut next = members.clone();
                let victim = *next.iter().filter(|(_, v)| v.as_deref() == Some(&format!("z{z}"))).nth(rng.below(2)).unwrap().0;
                next.remove(&victim);
                let new = Ring::claim_zoned(Some(&ring), &next, q, n).unwrap();
                report(&format!("c{cycle} leave z{z}"), &new, &next, partitions_moved(&ring, &new));
                ring = new; members = next;
            }
        }
    }
}

#[test]
fn explore_batch_cycles() {
    for &q in &[256u32, 1024, 4096] {
        let n = 3;
        let mut rng = Rng(q as u64);
        let mut members: BTreeMap<NodeId, Option<String>> = BTreeMap::new();
        for i in 0..6 { members.insert(rng.id(), Some(format!("z{}", i % 3))); }
        let mut ring = Ring::claim_zoned(None, &members, q, n).unwrap();
        let report = |tag: &str, ring: &Ring, members: &BTreeMap<NodeId, Option<String>>, moved: usize| {
            let fresh = Ring::claim_zoned(None, members, q, n).unwrap();
            let m = members.len();
            let fair = (n * q as usize) as f64 / m as f64;
            let dev = |r: &Ring| replica_counts(r, n).values().map(|v| (*v as f64 - fair).abs()).fold(0.0, f64::max) / fair;
            eprintln!("q {q} {tag} m {m}: moved {moved}; same-zone windows {} (fresh {}); replica dev {:.3} (fresh {:.3})", zone_repeats(ring, n), zone_repeats(&fresh, n), dev(ring), dev(&fresh));
        };
        for cycle in 0..4 {
            let mut next = members.clone();
            for z in 0..3 { next.insert(rng.id(), Some(format!("z{z}"))); }
            let new = Ring::claim_zoned(Some(&ring), &next, q, n).unwrap();
            report(&format!("c{cycle} join 3"), &new, &next, partitions_moved(&ring, &new));
            ring = new; members = next;
            let mut next = members.clone();
            for z in 0..3 {
                let victim = *next.iter().filter(|(_, v)| v.as_deref() == Some(&format!("z{z}"))).nth(rng.below(2)).unwrap().0;
                next.remove(&victim);
            }
            let new = Ring::claim_zoned(Some(&ring), &next, q, n).unwrap();
            report(&format!("c{cycle} leave 3"), &new, &next, partitions_moved(&ring, &new));
            ring = new; members = next;
        }
    }
}

#[test]
fn explore_timing() {
    let q = 16384;
    let n = 3;
    let mut rng = Rng(5);
    let members: BTreeSet<NodeId> = (0..1000).map(|_| rng.id()).collect();
    let t = Instant::now();
    let ring = Ring::claim(None, &members, q, n).unwrap();
    eprintln!("from scratch: {:?}", t.elapsed());
    let mut more = members.clone();
    more.insert(rng.id());
    let t = Instant::now();
    let joined = Ring::claim(Some(&ring), &more, q, n).unwrap();
    eprintln!("join: {:?} moved {}", t.elapsed(), partitions_moved(&ring, &joined));
    let mut less = more.clone();
    let x = *less.iter().nth(500).unwrap();
    less.remove(&x);
    let t = Instant::now();
    let left = Ring::claim(Some(&joined), &less, q, n).unwrap();
    eprintln!("leave: {:?} moved {}", t.elapsed(), partitions_moved(&joined, &left));
    let t = Instant::now();
    let same = Ring::claim(Some(&left), &less, q, n).unwrap();
    eprintln!("same: {:?} moved {}", t.elapsed(), partitions_moved(&left, &same));
    let mut big = less.clone();
    for _ in 0..100 { big.insert(rng.id()); }
    let t = Instant::now();
    let b = Ring::claim(Some(&left), &big, q, n).unwrap();
    eprintln!("join 100: {:?} moved {}", t.elapsed(), partitions_moved(&left, &b));
    let zoned: BTreeMap<NodeId, Option<String>> = members.iter().enumerate().map(|(i, x)| (*x, Some(format!("z{}", i % 3)))).collect();
    let t = Instant::now();
    let zr = Ring::claim_zoned(None, &zoned, q, n).unwrap();
    eprintln!("zoned from scratch: {:?}", t.elapsed());
    let mut zm = zoned.clone();
    zm.insert(rng.id(), Some("z1".into()));
    let t = Instant::now();
    let zj = Ring::claim_zoned(Some(&zr), &zm, q, n).unwrap();
    eprintln!("zoned join: {:?} moved {}", t.elapsed(), partitions_moved(&zr, &zj));
    let t = Instant::now();
    let rc = replica_counts(&zj, n);
    eprintln!("replica counts: {:?} {}", t.elapsed(), rc.len());
    let t = Instant::now();
    let tr = transfers(&zr, &zj, n);
    eprintln!("transfers: {:?} {}", t.elapsed(), tr.len());
}

#[test]
fn explore_small() {
    for n in 2..=5usize {
        let mut join_tab: BTreeMap<usize, usize> = BTreeMap::new();
        let mut leave_tab: BTreeMap<usize, f64> = BTreeMap::new();
        let mut breach_tab: BTreeMap<usize, usize> = BTreeMap::new();
        for seed in 0..1500u64 {
            let mut rng = Rng(seed);
            let qbits = 4 + rng.below(7) as u32;
            let q = 1u32 << qbits;
            let s = 1 + rng.below(24);
            let members: BTreeSet<NodeId> = (0..s).map(|_| rng.id()).collect();
            let rr = Ring::claim(None, &members, q, n).unwrap();
            // settle: a claim with the same members repairs the round robin
            let base = if rng.below(2) == 0 { rr } else { Ring::claim(Some(&rr), &members, q, n).unwrap() };
            let b_prev = breaches(&base, n);
            let mut more = members.clone();
            let j = rng.id();
            more.insert(j);
            let joined = Ring::claim(Some(&base), &more, q, n).unwrap();
            let r = repair_term(&base, &joined) as isize - 2 * b_prev as isize;
            let e = join_tab.entry(s + 1).or_insert(0); *e = (*e).max(r.max(0) as usize);
            if n * (q as usize).div_ceil(s + 1) <= q as usize {
                let e = breach_tab.entry(s + 1).or_insert(0); *e = (*e).max(breaches(&joined, n));
            }
            if s >= 2 {
                let mut less = members.clone();
                let x = *less.iter().nth(rng.below(s)).unwrap();
                less.remove(&x);
                let left = Ring::claim(Some(&base), &less, q, n).unwrap();
                let c = base.owners().iter().filter(|o| **o == x).count();
                let r = (partitions_moved(&base, &left) as f64 - 2.0 * b_prev as f64 - 2.0 * (n as f64 - 1.0)) / c as f64;
                let e = leave_tab.entry(s - 1).or_insert(-9.0); *e = e.max(r);
                if n * (q as usize).div_ceil(s - 1) <= q as usize {
                    let e = breach_tab.entry(s - 1).or_insert(0); *e = (*e).max(breaches(&left, n));
                }
            }
        }
        eprintln!("n {n}: join (M after -> worst repair beyond 2*prev breaches) {join_tab:?}");
        eprintln!("n {n}: leave {leave_tab:?}");
        eprintln!("n {n}: breaches where N*ceil(Q/M) <= Q {breach_tab:?}");
    }
}

#[test]
fn explore_debug() {
    let n = 3;
    let q = 1024;
    let members: BTreeSet<NodeId> = (1..=10u128).map(NodeId::from_u128).collect();
    let rr = Ring::claim(None, &members, q, n).unwrap();
    let mut less = members.clone();
    less.remove(&NodeId::from_u128(4));
    let left = Ring::claim(Some(&rr), &less, q, n).unwrap();
    let ix: BTreeMap<NodeId, usize> = members.iter().enumerate().map(|(i, x)| (*x, i)).collect();
    eprintln!("moved {} repair {} breaches {}", partitions_moved(&rr, &left), repair_term(&rr, &left), breaches(&left, n));
    eprintln!("before {:?}", rr.owners()[..60].iter().map(|x| ix[x]).collect::<Vec<_>>());
    eprintln!("after  {:?}", left.owners()[..60].iter().map(|x| ix[x]).collect::<Vec<_>>());
    eprintln!("counts {:?}", counts(&left).values().collect::<Vec<_>>());
}

#[test]
fn explore_mass() {
    let q = 16384;
    let n = 3;
    let mut rng = Rng(9);
    let a: BTreeSet<NodeId> = (0..1000).map(|_| rng.id()).collect();
    let b: BTreeSet<NodeId> = (0..1000).map(|_| rng.id()).collect();
    let ra = Ring::claim(None, &a, q, n).unwrap();
    let t = Instant::now();
    let rb = Ring::claim(Some(&ra), &b, q, n).unwrap();
    eprintln!("replace all: {:?} breaches {}", t.elapsed(), breaches(&rb, n));
    let half: BTreeSet<NodeId> = a.iter().step_by(2).copied().chain(b.iter().take(500).copied()).collect();
    let t = Instant::now();
    let rh = Ring::claim(Some(&ra), &half, q, n).unwrap();
    eprintln!("replace half: {:?} breaches {} moved {}", t.elapsed(), breaches(&rh, n), partitions_moved(&ra, &rh));
    let few: BTreeSet<NodeId> = a.iter().take(10).copied().collect();
    let t = Instant::now();
    let rf = Ring::claim(Some(&ra), &few, q, n).unwrap();
    eprintln!("shrink to 10: {:?} breaches {} moved {}", t.elapsed(), breaches(&rf, n), partitions_moved(&ra, &rf));
    let t = Instant::now();
    let rg = Ring::claim(Some(&rf), &a, q, n).unwrap();
    eprintln!("grow back to 1000: {:?} breaches {} moved {}", t.elapsed(), breaches(&rg, n), partitions_moved(&rf, &rg));
}
