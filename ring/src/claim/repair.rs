//! The claim's last step: lowering the ring's [`Cost`] without changing any
//! count, by swapping owners, by dealing a short stretch again, and, for the
//! small rings where neither clears every breach, by a clean round-robin
//! template.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use super::{Claim, Cost, HOLE, MAX_PASSES, REACH};

/// Rounds of swaps then local deals before the template is tried: each
/// round that deals a stretch again lets swaps finish the job; rings that are
/// not clean after three are the small ones with little room, where more
/// rounds rarely help.
const REDEAL_ROUNDS: usize = 3;

/// Steps one local deal may take before it gives up (a depth-first search
/// over a stretch of at most `8N` partitions).
const REDEAL_STEPS: usize = 2_000;

impl Claim {
    /// Lowers the ring's cost by swapping owners of two partitions, which
    /// keeps every count. Each pass visits the partitions in a bad pair in
    /// order and makes the best cost-lowering swap with a partition within
    /// [`REACH`]; for a `target_n_val` breach with no such partner nearby it
    /// looks at the whole ring. Breaches that no swap lowers (small rings get
    /// stuck so) are dealt again locally; see [`Claim::redeal`].
    pub(super) fn repair(&mut self) {
        if self.n < 2 || self.q < 2 {
            return;
        }
        for _ in 0..REDEAL_ROUNDS {
            self.swap_passes();
            let stuck: Vec<usize> = (0..self.q)
                .filter(|&p| self.cost_at(p, self.owners[p]).node > 0)
                .collect();
            let mut redealt = false;
            for p in stuck {
                if self.cost_at(p, self.owners[p]).node > 0 {
                    redealt |= self.redeal(p);
                }
            }
            if !redealt {
                break;
            }
        }
        if self.breaches() > 0 && self.adopt_template() {
            self.swap_passes();
        }
    }

    /// Partitions in a `target_n_val` breach.
    fn breaches(&self) -> usize {
        (0..self.q)
            .filter(|&p| self.cost_at(p, self.owners[p]).node > 0)
            .count()
    }

    /// The last resort for breaches that swaps and local deals leave (seen
    /// with `M = N + 1`, where a window's owners leave one choice for the next
    /// partition): replaces the ring by [`Claim::template`], its slots given
    /// to members so that as many partitions as possible keep their owner.
    /// Returns false when there is no template for these counts.
    pub(super) fn adopt_template(&mut self) -> bool {
        let Some(slots) = Claim::template(self.q, self.count.len(), self.w) else {
            return false;
        };
        let m = self.count.len();
        let extra = self.q % m;
        // Slots below `extra` own one more partition: they go to members whose
        // target is the larger one, so counts stay on target.
        let large = |x: usize, c: &Claim| c.target[x] > c.q / m;
        let mut overlap = vec![BTreeMap::<u32, usize>::new(); m];
        for (p, &s) in slots.iter().enumerate() {
            *overlap[s as usize].entry(self.owners[p]).or_insert(0) += 1;
        }
        let mut pairs: Vec<(Reverse<usize>, usize, u32)> = Vec::new();
        for (s, row) in overlap.iter().enumerate() {
            for (&x, &k) in row {
                if (s < extra) == large(x as usize, self) {
                    pairs.push((Reverse(k), s, x));
                }
            }
        }
        pairs.sort_unstable();
        let mut member_of = vec![HOLE; m];
        let mut taken = vec![false; m];
        for (_, s, x) in pairs {
            if member_of[s] == HOLE && !taken[x as usize] {
                member_of[s] = x;
                taken[x as usize] = true;
            }
        }
        // Slots nobody overlaps take the remaining members, in order.
        for (s, slot) in member_of.iter_mut().enumerate() {
            if *slot == HOLE {
                let x = (0..m)
                    .find(|&x| !taken[x] && large(x, self) == (s < extra))
                    .expect("as many larger targets as extra slots");
                taken[x] = true;
                *slot = x as u32;
            }
        }
        for (p, &s) in slots.iter().enumerate() {
            self.touched[p] |= self.owners[p] != member_of[s as usize];
            self.owners[p] = member_of[s as usize];
        }
        true
    }

    /// A ring over slots `0..M` with no slot twice within `w`, where slots
    /// below `Q mod M` own `ceil(Q/M)` partitions and the rest `floor(Q/M)`.
    /// With `r = Q mod M`: round robin when `r` is 0 or at least `w` (an extra
    /// slot's last partition is then `r` before its first). Otherwise round
    /// robin with extra slot `x` inserted once, `w` places after its own
    /// partition, in round `x * floor(Q/M) / r`: it is then `w` or more from
    /// its own partitions on both sides when `M >= 2w - 1`, and other slots
    /// only move apart. None when `r < w` and `M < 2w - 1` (or `Q < w`).
    pub(super) fn template(q: usize, m: usize, w: usize) -> Option<Vec<u32>> {
        let (k, r) = (q / m, q % m);
        if r == 0 || r >= w {
            return Some((0..q).map(|p| (p % m) as u32).collect());
        }
        if m < 2 * w - 1 || k == 0 {
            return None;
        }
        let mut slots = Vec::with_capacity(q);
        for round in 0..k {
            for s in 0..m {
                slots.push(s as u32);
                // Extra slot `x` goes after slot `x + w - 1` of its round.
                if s + 1 >= w {
                    let x = s + 1 - w;
                    if x < r && x * k / r == round {
                        slots.push(x as u32);
                    }
                }
            }
        }
        Some(slots)
    }

    fn swap_passes(&mut self) {
        for _ in 0..MAX_PASSES {
            let mut changed = false;
            for p in 0..self.q {
                let here = self.cost_at(p, self.owners[p]);
                if here == Cost::default() || (here.node == 0 && !self.near_touched(p)) {
                    continue;
                }
                if let Some(p2) = self.best_swap(p, here.node > 0) {
                    self.owners.swap(p, p2);
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
    }

    /// Whether a partition within `N - 1` of `p` (or `p`) was touched.
    fn near_touched(&self, p: usize) -> bool {
        let q = self.q;
        (0..self.n.min(q)).any(|d| self.touched[(p + d) % q] || self.touched[(p + q - d) % q])
    }

    /// The partner whose swap with `p` lowers the cost most (nearest first
    /// among equals), if any does.
    fn best_swap(&mut self, p: usize, whole_ring: bool) -> Option<usize> {
        let q = self.q;
        let reach = REACH.max(4 * self.n).min(q / 2);
        let mut best: Option<(Cost, usize)> = None;
        let consider = |c: &mut Claim, p2: usize, best: &mut Option<(Cost, usize)>| {
            if c.owners[p2] == c.owners[p] {
                return;
            }
            let delta = c.swap_delta(p, p2);
            if delta < Cost::default() && best.is_none_or(|(b, _)| delta < b) {
                *best = Some((delta, p2));
            }
        };
        for d in 1..=reach {
            consider(self, (p + d) % q, &mut best);
            consider(self, (p + q - d) % q, &mut best);
        }
        if best.is_none() && whole_ring {
            for p2 in 0..q {
                let d = p.abs_diff(p2);
                if d > reach && q - d > reach {
                    consider(self, p2, &mut best);
                }
            }
        }
        best.map(|(_, p2)| p2)
    }

    /// Deals the owners of a stretch of partitions around breach `p` again,
    /// in an order with no breach inside it or against its neighbours: a
    /// depth-first search that tries each partition's current owner first,
    /// so the first order found keeps most of them. Stretches grow from
    /// `2N + 1` partitions to `8N`; the search gives up after a fixed number
    /// of steps. Counts are unchanged: the stretch's owners are only reordered.
    fn redeal(&mut self, p: usize) -> bool {
        let q = self.q;
        let mut len = 2 * self.n + 1;
        while len <= (8 * self.n).min(q) {
            let start = (p + q - len / 2) % q;
            let stretch: Vec<usize> = (0..len).map(|i| (start + i) % q).collect();
            let was: Vec<u32> = stretch.iter().map(|&i| self.owners[i]).collect();
            let mut left: BTreeMap<u32, usize> = BTreeMap::new();
            for &o in &was {
                *left.entry(o).or_insert(0) += 1;
            }
            for &i in &stretch {
                self.owners[i] = HOLE;
            }
            let mut budget = REDEAL_STEPS;
            if self.deal_stretch(&stretch, &was, 0, &mut left, &mut budget) {
                for (&i, &o) in stretch.iter().zip(&was) {
                    self.touched[i] |= self.owners[i] != o;
                }
                return true;
            }
            for (&i, &o) in stretch.iter().zip(&was) {
                self.owners[i] = o;
            }
            len *= 2;
        }
        false
    }

    /// One step of [`Claim::redeal`]'s search: fills `stretch[at..]`.
    fn deal_stretch(
        &mut self,
        stretch: &[usize],
        was: &[u32],
        at: usize,
        left: &mut BTreeMap<u32, usize>,
        budget: &mut usize,
    ) -> bool {
        if at == stretch.len() {
            return true;
        }
        if *budget == 0 {
            return false;
        }
        *budget -= 1;
        let p = stretch[at];
        let mut order: Vec<(bool, Reverse<usize>, u32)> = left
            .iter()
            .filter(|(_, &k)| k > 0)
            .map(|(&x, &k)| (x != was[at], Reverse(k), x))
            .collect();
        order.sort_unstable();
        for (_, _, x) in order {
            if self.cost_at(p, x).node > 0 {
                continue;
            }
            self.owners[p] = x;
            *left.get_mut(&x).expect("listed") -= 1;
            if self.deal_stretch(stretch, was, at + 1, left, budget) {
                return true;
            }
            *left.get_mut(&x).expect("listed") += 1;
            self.owners[p] = HOLE;
        }
        false
    }
}
