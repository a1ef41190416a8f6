//! How the claim works; the crate doc says what it guarantees.
//!
//! A claim runs on member numbers (position in id order) and zone numbers
//! rather than ids and names, so its inner loops compare integers, and every
//! loop runs in partition or member-number order: nothing depends on a hash
//! map's order, so every node computes the same ring.
//!
//! The quality of a ring is one number pair, its [`Cost`]: for every two
//! partitions closer than `N` (so sharing `N - d` windows of `N` consecutive
//! partitions at distance `d`), `N - d` if they have one owner and are closer
//! than `w` (a `target_n_val` breach), and separately `N - d` if their owners
//! share a zone. A zone-less member is a zone of its own, so without zones the
//! zone part counts the same pairs as the node part. Breaches come first; among
//! rings with as few breaches, fewer same-zone pairs means fewer preference
//! lists that skip an owner, which is what keeps replica counts at `N` times
//! owned counts.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::ops::{Add, Sub};

use crate::{key_hash, NodeId, Ring, RingError};

mod repair;

/// An owner slot whose node left; the claim fills every one.
const HOLE: u32 = u32::MAX;

/// Swap partners the repair tries on either side of a bad partition before
/// it looks at the whole ring (only for breaches). Local swaps keep a repair
/// from scattering; the whole-ring look finds a partner when the neighbourhood
/// is crowded.
const REACH: usize = 24;

/// Swap passes over the ring per repair round. Each pass only makes swaps
/// that lower the cost, so the repair ends anyway; this bounds its time.
const MAX_PASSES: usize = 8;

/// Above this many (hole, needy member) pairs, holes are filled in partition
/// order rather than most-constrained first (a mass change: many members
/// joined or left at once), to keep the claim's time near-linear.
const ORDER_LIMIT: usize = 1 << 20;

/// Chains are looked for only while at most this many members need
/// partitions: each candidate partner is tried with every needy member.
const CHAIN_LIMIT: usize = 128;

/// See the module doc: breaches of `target_n_val`, then same-zone pairs, both
/// weighted by how many windows of `N` the pair shares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Cost {
    node: i64,
    zone: i64,
}

impl Add for Cost {
    type Output = Cost;
    fn add(self, o: Cost) -> Cost {
        Cost {
            node: self.node + o.node,
            zone: self.zone + o.zone,
        }
    }
}

impl Sub for Cost {
    type Output = Cost;
    fn sub(self, o: Cost) -> Cost {
        Cost {
            node: self.node - o.node,
            zone: self.zone - o.zone,
        }
    }
}

/// Checks `Q` and the member count as every entry point must.
pub(crate) fn check(q: u32, members: usize) -> Result<(), RingError> {
    if !q.is_power_of_two() || q > 65536 {
        return Err(RingError::BadPartitionCount(q));
    }
    if members == 0 {
        return Err(RingError::NoMembers);
    }
    Ok(())
}

/// The owners of a new ring: see the crate doc's claim section.
pub(crate) fn claim(
    previous: Option<&Ring>,
    members: &BTreeMap<NodeId, Option<String>>,
    q: u32,
    n: usize,
) -> Result<Vec<NodeId>, RingError> {
    check(q, members.len())?;
    let q = q as usize;
    // A list never holds more than the ring's Q partitions' owners; `n` may
    // come from configuration, and windows longer than the ring mean nothing.
    let n = n.clamp(1, q);
    let nodes: Vec<NodeId> = members.keys().copied().collect();
    let zoned = members.values().any(Option::is_some);
    let mut c = Claim::new(members, q, n);
    match previous {
        Some(prev) if prev.owners.len() == q => {
            let number: BTreeMap<NodeId, u32> = nodes
                .iter()
                .enumerate()
                .map(|(i, id)| (*id, i as u32))
                .collect();
            for (p, owner) in prev.owners.iter().enumerate() {
                if let Some(&i) = number.get(owner) {
                    c.owners[p] = i;
                    c.count[i as usize] += 1;
                    // A member that changed zone changes its partitions' pairs.
                    c.touched[p] = prev.zones.get(owner) != members[owner].as_ref();
                }
            }
            c.target = targets(&c.count, &c.zone, c.named_zones, q);
            c.fill_holes();
            c.take_surplus(&nodes);
            c.repair();
        }
        // From scratch without zones: the round-robin deal in id order that
        // every Shoal release has computed, so a rolling upgrade moves nothing.
        _ if !zoned => {
            return Ok((0..q).map(|p| nodes[p % nodes.len()]).collect());
        }
        _ => {
            c.deal_interleaved();
            c.repair();
        }
    }
    Ok(c.owners.iter().map(|&i| nodes[i as usize]).collect())
}

/// Whether the claim guarantees `target_n_val` (no member twice within `N`
/// consecutive partitions) for `M` members: when `N * ceil(Q/M) <= Q` (no
/// member has too many partitions to keep them `N` apart) and a clean
/// round-robin template exists for those counts ([`Claim::template`]:
/// `Q mod M` is 0 or at least `N`, or `M >= 2N - 1`). For `N <= 3` that is
/// every `M > N`; for `N = 4` it leaves out `M = 5` with `Q mod 5` in 1..=3 and
/// `M = 6` with `Q mod 6 = 2`.
pub(crate) fn keeps_target_n_val(q: usize, m: usize, n: usize) -> bool {
    if m == 0 || q == 0 {
        return false;
    }
    let n = n.clamp(1, q);
    window(q, m, n) == n && Claim::template(q, m, n).is_some()
}

/// The window `w` within which no node may own two partitions: `N`, unless
/// `N * ceil(Q/M) > Q`, when a member with `ceil(Q/M)` partitions cannot keep
/// `N` apart; then the largest `w` that fits (at least 1, which asks nothing).
pub(crate) fn window(q: usize, m: usize, n: usize) -> usize {
    let most = q.div_ceil(m);
    (1..=n.max(1)).rev().find(|w| w * most <= q).unwrap_or(1)
}

/// Target partition counts: `floor(Q/M)` each, plus one for the `Q mod M`
/// members that already own the most (ties by id), so targets never force a
/// needless move. When `Q < M` some members own nothing; then the extra
/// partitions go first to the best-placed member of each zone, so that every
/// zone keeps an owner and preference lists can still span every zone.
fn targets(count: &[usize], zone: &[u32], named_zones: usize, q: usize) -> Vec<usize> {
    let m = count.len();
    let (base, extra) = (q / m, q % m);
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by_key(|&i| (Reverse(count[i]), i));
    if base == 0 && named_zones > 0 {
        let mut covered = vec![false; named_zones];
        let (mut first, mut rest) = (Vec::new(), Vec::new());
        for i in order {
            let z = zone[i] as usize;
            if z < named_zones && !covered[z] {
                covered[z] = true;
                first.push(i);
            } else {
                rest.push(i);
            }
        }
        order = first;
        order.extend(rest);
    }
    let mut target = vec![base; m];
    for &i in order.iter().take(extra) {
        target[i] += 1;
    }
    target
}

/// A claim in progress.
struct Claim {
    q: usize,
    /// Preference-list length: partitions closer than this share a list.
    n: usize,
    /// No member twice within `w` consecutive partitions; see [`window`].
    w: usize,
    /// Zone number of each member; zone-less members are numbered after the
    /// named zones, one zone each.
    zone: Vec<u32>,
    /// How many zones have names; only those need an owner when `Q < M`.
    named_zones: usize,
    /// Member number owning each partition, or [`HOLE`].
    owners: Vec<u32>,
    /// Partitions each member owns now; kept in step with `owners`.
    count: Vec<usize>,
    /// Partitions each member should own; see [`targets`].
    target: Vec<usize>,
    /// Partitions that filling holes, taking surplus, local deals or the
    /// template gave a new owner, and those whose owner changed zone.
    /// Same-zone pairs are repaired only near these: pairs the previous ring
    /// already had were the best it could do then, and chasing them again
    /// at every claim would move partitions for little. (Repair swaps do not
    /// mark theirs, so repairs do not spread from repairs.)
    touched: Vec<bool>,
}

impl Claim {
    fn new(members: &BTreeMap<NodeId, Option<String>>, q: usize, n: usize) -> Claim {
        let names: BTreeMap<&String, u32> = {
            let mut names: Vec<&String> = members.values().flatten().collect();
            names.sort();
            names.dedup();
            names.into_iter().zip(0..).collect()
        };
        let named_zones = names.len();
        let zone = members
            .values()
            .enumerate()
            .map(|(i, z)| match z {
                Some(name) => names[name],
                None => (named_zones + i) as u32,
            })
            .collect();
        let m = members.len();
        Claim {
            q,
            n,
            w: window(q, m, n),
            zone,
            named_zones,
            owners: vec![HOLE; q],
            count: vec![0; m],
            target: vec![0; m],
            touched: vec![false; q],
        }
    }

    fn need(&self, i: u32) -> usize {
        self.target[i as usize].saturating_sub(self.count[i as usize])
    }

    fn surplus(&self, i: u32) -> usize {
        self.count[i as usize].saturating_sub(self.target[i as usize])
    }

    fn set(&mut self, p: usize, i: u32) {
        let old = self.owners[p];
        if old != HOLE {
            self.count[old as usize] -= 1;
        }
        self.owners[p] = i;
        self.count[i as usize] += 1;
        self.touched[p] = true;
    }

    /// The cost of the pairs partition `p` would make if member `x` owned it
    /// (the owner of `p` itself is not looked at).
    fn cost_at(&self, p: usize, x: u32) -> Cost {
        let mut c = Cost::default();
        if x == HOLE {
            return c;
        }
        let q = self.q;
        let zx = self.zone[x as usize];
        for d in 1..self.n.min(q) {
            let weight = (self.n - d) as i64;
            for o in [self.owners[(p + d) % q], self.owners[(p + q - d) % q]] {
                if o == HOLE {
                    continue;
                }
                if o == x && d < self.w {
                    c.node += weight;
                }
                if self.zone[o as usize] == zx {
                    c.zone += weight;
                }
            }
        }
        c
    }

    /// The change in the ring's cost if `p` passed to `x`.
    fn move_delta(&self, p: usize, x: u32) -> Cost {
        self.cost_at(p, x) - self.cost_at(p, self.owners[p])
    }

    /// The change in the ring's cost if `p` and `p2` swapped owners. A pair
    /// made by `p` and `p2` themselves counts on both sides and cancels.
    fn swap_delta(&mut self, p: usize, p2: usize) -> Cost {
        let (a, b) = (self.owners[p], self.owners[p2]);
        let before = self.cost_at(p, a) + self.cost_at(p2, b);
        self.owners[p] = b;
        self.owners[p2] = a;
        let after = self.cost_at(p, b) + self.cost_at(p2, a);
        self.owners[p] = a;
        self.owners[p2] = b;
        after - before
    }

    /// Gives each partition of a departed member to a member under target.
    /// Holes with the fewest members that fit them cleanly go first (a
    /// static order: it only needs to keep the crowded holes from being left
    /// the last receivers). Each takes the member it costs least, then the
    /// one missing most, then the lowest id. When every needy member would
    /// make a bad pair there, a chain may do better: a nearby member that
    /// fits the hole takes it and hands one of its own partitions to a needy
    /// member that fits that one; one extra move instead of a repair's two.
    fn fill_holes(&mut self) {
        let mut needy: Vec<u32> = (0..self.count.len() as u32)
            .filter(|&i| self.need(i) > 0)
            .collect();
        let mut holes: Vec<(usize, usize)> = (0..self.q)
            .filter(|&p| self.owners[p] == HOLE)
            .map(|p| (0, p))
            .collect();
        // Ordering costs holes x needy; a mass change skips it.
        if holes.len() * needy.len() <= ORDER_LIMIT {
            for (clean, p) in &mut holes {
                *clean = needy
                    .iter()
                    .filter(|&&x| self.cost_at(*p, x) == Cost::default())
                    .count();
            }
            holes.sort_unstable();
        }
        for (_, p) in holes {
            let (cost, x) = needy
                .iter()
                .map(|&x| (self.cost_at(p, x), Reverse(self.need(x)), x))
                .min()
                .map(|(c, _, x)| (c, x))
                .expect("targets sum to Q, so members miss at least as many as there are holes");
            let chain = if cost == Cost::default() || needy.len() > CHAIN_LIMIT {
                None
            } else {
                self.best_chain(p, cost, &needy)
            };
            let receiver = match chain {
                Some((p2, y, x2)) => {
                    self.set(p, y);
                    self.set(p2, x2);
                    x2
                }
                None => {
                    self.set(p, x);
                    x
                }
            };
            if self.need(receiver) == 0 {
                needy.retain(|&i| i != receiver);
            }
        }
    }

    /// The best chain for hole `p` (see [`Claim::fill_holes`]) that costs less
    /// than `direct`: `(p2, y, x)` where `y`, owner of `p2`, takes `p` and
    /// needy `x` takes `p2`. Partners are looked for within [`REACH`] but at
    /// least `N` away, so the two changes do not see each other.
    fn best_chain(&self, p: usize, direct: Cost, needy: &[u32]) -> Option<(usize, u32, u32)> {
        let q = self.q;
        let reach = REACH.max(4 * self.n).min(q / 2);
        let mut best: Option<(Cost, usize, u32, u32)> = None;
        for d in self.n..=reach {
            for p2 in [(p + d) % q, (p + q - d) % q] {
                let y = self.owners[p2];
                if y == HOLE || needy.contains(&y) {
                    continue;
                }
                let at_p = self.cost_at(p, y);
                if at_p >= direct {
                    continue;
                }
                let leaving = self.cost_at(p2, y);
                for &x in needy {
                    let total = at_p + self.cost_at(p2, x) - leaving;
                    if total < direct && best.is_none_or(|(b, ..)| total < b) {
                        best = Some((total, p2, y, x));
                    }
                }
            }
        }
        best.map(|(_, p2, y, x)| (p2, y, x))
    }

    /// Moves the surplus of members over target to members under it. Each
    /// receiver (most missing first) cuts the ring into as many equal arcs as
    /// it needs partitions, starting at an offset drawn from its id, and takes
    /// from each arc the surplus partition that costs least (then from the
    /// donor with most surplus, then nearest the arc's middle). Arcs keep a
    /// joiner's partitions apart, which is what lets it take its full share
    /// of replicas. An arc with no surplus partition free of breaches is left
    /// to a last pass over the whole ring.
    fn take_surplus(&mut self, nodes: &[NodeId]) {
        let q = self.q;
        let mut receivers: Vec<u32> = (0..self.count.len() as u32)
            .filter(|&i| self.need(i) > 0)
            .collect();
        receivers.sort_by_key(|&i| (Reverse(self.need(i)), i));
        for x in receivers {
            let k = self.need(x);
            let start = (key_hash(&nodes[x as usize].0) % q as u64) as usize;
            let mut left = 0;
            for arc in 0..k {
                let (lo, hi) = (start + arc * q / k, start + (arc + 1) * q / k);
                let middle = (lo + hi) / 2;
                let best = (lo..hi)
                    .filter(|&at| {
                        let o = self.owners[at % q];
                        o != x && o != HOLE && self.surplus(o) > 0
                    })
                    .map(|at| {
                        let p = at % q;
                        let o = self.owners[p];
                        let key = (
                            self.move_delta(p, x),
                            Reverse(self.surplus(o)),
                            at.abs_diff(middle),
                            at,
                        );
                        (key, p)
                    })
                    .min();
                match best {
                    Some((key, p)) if key.0.node <= 0 => self.set(p, x),
                    _ => left += 1,
                }
            }
            for _ in 0..left {
                let (_, p) = (0..q)
                    .filter(|&p| {
                        let o = self.owners[p];
                        o != x && o != HOLE && self.surplus(o) > 0
                    })
                    .map(|p| {
                        let o = self.owners[p];
                        ((self.move_delta(p, x), Reverse(self.surplus(o)), p), p)
                    })
                    .min()
                    .expect("targets sum to Q, so surplus matches what receivers miss");
                self.set(p, x);
            }
        }
    }

    /// From scratch with zones: order members so that zones alternate (each
    /// zone's members spaced evenly through the order, as a zone of two among
    /// six takes every third place), then deal round robin in that order.
    fn deal_interleaved(&mut self) {
        let m = self.count.len();
        // With fewer partitions than members, only the members the targets
        // pick are dealt (one per zone first).
        let dealt = targets(&vec![0; m], &self.zone, self.named_zones, self.q);
        let mut by_zone: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for i in (0..m as u32).filter(|&i| dealt[i as usize] > 0) {
            by_zone.entry(self.zone[i as usize]).or_default().push(i);
        }
        // Member k of a zone of size s sits at (2k + 1) / 2s of the way round;
        // compare those fractions exactly by cross-multiplying.
        let mut places: Vec<(u64, u64, u32, u32)> = Vec::new();
        for (z, list) in &by_zone {
            let s = list.len() as u64;
            for (k, &i) in list.iter().enumerate() {
                places.push((2 * k as u64 + 1, 2 * s, *z, i));
            }
        }
        places.sort_by(|a, b| {
            (u128::from(a.0) * u128::from(b.1))
                .cmp(&(u128::from(b.0) * u128::from(a.1)))
                .then((a.2, a.3).cmp(&(b.2, b.3)))
        });
        for p in 0..self.q {
            self.set(p, places[p % places.len()].3);
        }
        // The deal is balanced; the repair's template keeps these counts.
        self.target = self.count.clone();
    }
}

#[cfg(test)]
mod tests;
