//! Dotted version vectors: a key's stored [`Object`] is a DVV set.
//!
//! An object holds a causal history (`clock`: per replica node, the highest
//! event counter seen) and the concurrent versions still alive (`siblings`),
//! each tagged with the *dot* `(node, counter)` of the write that made it. Dots
//! are minted by the coordinating replica node, not by clients, so the clock has
//! at most one entry per node that ever coordinated a write and the number of
//! siblings is bounded by real concurrency, not by client retries (the fix Riak
//! 2.0 made for sibling explosion).
//!
//! Rules:
//! - A write carries a causal context (the clock of an earlier read). It drops
//!   exactly the siblings whose dot the context covers, joins the context into
//!   the clock, and adds itself under a fresh dot. Without a context it drops
//!   nothing.
//! - [`Object::merge`] keeps a sibling of either side unless the other side's
//!   clock covers its dot and the other side no longer holds it. Merge is
//!   commutative, associative and idempotent (a join-semilattice), so replicas
//!   converge whatever the order, duplication or delay of messages; this module's
//!   property tests check all three laws and that a value disappears only when a
//!   context covered it.
//! - A delete is a write of a tombstone (a sibling with no value).
//! - Clock entries carry the wall-clock time of their last event; [`Object::prune`]
//!   drops the oldest entries no sibling refers to once there are too many. A
//!   pruned entry can only make a later-arriving old version look concurrent
//!   (an extra sibling), never hide a live one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_ring::NodeId;

/// One event: the `counter`-th write coordinated by `node`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    pub node: NodeId,
    pub counter: u64,
}

/// A clock entry: the highest counter seen for a node, and when it was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockEntry {
    pub counter: u64,
    pub timestamp_ms: u64,
}

/// A version vector: what a causal context carries.
pub type VersionVector = BTreeMap<NodeId, u64>;

/// A live version of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sibling {
    pub dot: Dot,
    /// `None` is a tombstone.
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    pub timestamp_ms: u64,
}

/// A key's DVV set: the causal history and the live siblings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    clock: BTreeMap<NodeId, ClockEntry>,
    /// Sorted by dot, so equal objects compare and encode equal.
    siblings: Vec<Sibling>,
}

/// Whether `vv` covers `dot`: the event is in the history it summarises.
pub fn covers(vv: &VersionVector, dot: &Dot) -> bool {
    vv.get(&dot.node).is_some_and(|c| *c >= dot.counter)
}

impl Object {
    pub fn clock(&self) -> &BTreeMap<NodeId, ClockEntry> {
        &self.clock
    }

    pub fn siblings(&self) -> &[Sibling] {
        &self.siblings
    }

    /// The causal context a read hands out: the clock without timestamps.
    pub fn context(&self) -> VersionVector {
        self.clock.iter().map(|(n, e)| (*n, e.counter)).collect()
    }

    /// Values of the live, non-tombstone siblings.
    pub fn values(&self) -> impl Iterator<Item = &[u8]> {
        self.siblings.iter().filter_map(|s| s.value.as_deref())
    }

    /// True when nothing but tombstones (or nothing at all) is left.
    pub fn is_deleted(&self) -> bool {
        self.siblings.iter().all(|s| s.value.is_none())
    }

    /// Applies a write coordinated by `node`: drops the siblings `context`
    /// covers, joins `context` into the clock, and adds `value` (`None`: a
    /// tombstone) under a fresh dot, which it returns.
    pub fn update(
        &mut self,
        context: &VersionVector,
        value: Option<Vec<u8>>,
        node: NodeId,
        now_ms: u64,
    ) -> Dot {
        self.siblings.retain(|s| !covers(context, &s.dot));
        for (n, c) in context {
            let entry = self.clock.entry(*n).or_insert(ClockEntry {
                counter: 0,
                timestamp_ms: now_ms,
            });
            entry.counter = entry.counter.max(*c);
        }
        let entry = self.clock.entry(node).or_insert(ClockEntry {
            counter: 0,
            timestamp_ms: now_ms,
        });
        entry.counter += 1;
        entry.timestamp_ms = entry.timestamp_ms.max(now_ms);
        let dot = Dot {
            node,
            counter: entry.counter,
        };
        self.siblings.push(Sibling {
            dot,
            value,
            timestamp_ms: now_ms,
        });
        self.siblings.sort_by_key(|s| s.dot);
        dot
    }

    /// Merges `other` into `self` (the join of the two DVV sets).
    pub fn merge(&mut self, other: &Object) {
        let theirs = other.context();
        let mine = self.context();
        let mut siblings: Vec<Sibling> = self
            .siblings
            .iter()
            .filter(|s| !covers(&theirs, &s.dot) || other.siblings.iter().any(|o| o.dot == s.dot))
            .cloned()
            .collect();
        for s in &other.siblings {
            if !covers(&mine, &s.dot) && !siblings.iter().any(|k| k.dot == s.dot) {
                siblings.push(s.clone());
            }
        }
        siblings.sort_by_key(|s| s.dot);
        self.siblings = siblings;
        for (n, e) in &other.clock {
            let mine = self.clock.entry(*n).or_insert(*e);
            mine.counter = mine.counter.max(e.counter);
            mine.timestamp_ms = mine.timestamp_ms.max(e.timestamp_ms);
        }
    }

    /// The merge of two objects, leaving both untouched.
    pub fn merged(a: &Object, b: &Object) -> Object {
        let mut m = a.clone();
        m.merge(b);
        m
    }

    /// Whether `self` already holds everything `other` does (merging `other`
    /// in would change nothing).
    pub fn descends(&self, other: &Object) -> bool {
        &Object::merged(self, other) == self
    }

    /// Drops clock entries that no sibling refers to, oldest first, while the
    /// clock has more than `max_entries` and the entry is older than
    /// `min_age_ms`.
    pub fn prune(&mut self, max_entries: usize, min_age_ms: u64, now_ms: u64) {
        if self.clock.len() <= max_entries {
            return;
        }
        let mut candidates: Vec<(u64, NodeId)> = self
            .clock
            .iter()
            .filter(|(n, e)| {
                now_ms.saturating_sub(e.timestamp_ms) >= min_age_ms
                    && !self.siblings.iter().any(|s| s.dot.node == **n)
            })
            .map(|(n, e)| (e.timestamp_ms, *n))
            .collect();
        candidates.sort();
        for (_, node) in candidates {
            if self.clock.len() <= max_entries {
                break;
            }
            self.clock.remove(&node);
        }
    }
}

/// Encodes a version vector as an opaque causal context.
pub fn encode_context(vv: &VersionVector) -> Vec<u8> {
    if vv.is_empty() {
        return Vec::new();
    }
    let pairs: Vec<(NodeId, u64)> = vv.iter().map(|(n, c)| (*n, *c)).collect();
    rmp_serde::to_vec(&pairs).expect("a version vector always encodes")
}

/// Decodes a causal context a client sent back.
pub fn decode_context(bytes: &[u8]) -> Result<VersionVector, String> {
    if bytes.is_empty() {
        return Ok(VersionVector::new());
    }
    let pairs: Vec<(NodeId, u64)> = rmp_serde::from_slice(bytes)
        .map_err(|e| format!("causal context is not one Shoal issued: {e}"))?;
    Ok(pairs.into_iter().collect())
}

/// Leading byte of a stored object, so the format can change later.
const OBJECT_FORMAT: u8 = 1;

/// Encodes an object for storage.
pub fn encode_object(object: &Object) -> Vec<u8> {
    let mut out = vec![OBJECT_FORMAT];
    rmp_serde::encode::write(&mut out, object).expect("an object always encodes");
    out
}

/// Decodes a stored object.
pub fn decode_object(bytes: &[u8]) -> Result<Object, String> {
    match bytes.split_first() {
        Some((&OBJECT_FORMAT, body)) => {
            rmp_serde::from_slice(body).map_err(|e| format!("object does not decode: {e}"))
        }
        Some((v, _)) => Err(format!("unknown object format {v}")),
        None => Err("empty object record".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(i: u8) -> NodeId {
        NodeId::from_u128(u128::from(i) + 1)
    }

    #[test]
    fn concurrent_puts_become_siblings_and_a_context_resolves_them() {
        let mut a = Object::default();
        a.update(&VersionVector::new(), Some(b"v1".to_vec()), node(0), 1);
        let mut b = Object::default();
        b.update(&VersionVector::new(), Some(b"v2".to_vec()), node(1), 1);
        a.merge(&b);
        assert_eq!(a.values().count(), 2);
        let ctx = a.context();
        a.update(&ctx, Some(b"v3".to_vec()), node(0), 2);
        assert_eq!(a.values().collect::<Vec<_>>(), vec![&b"v3"[..]]);
    }

    #[test]
    fn a_put_without_context_at_one_node_keeps_the_old_value() {
        let mut a = Object::default();
        a.update(&VersionVector::new(), Some(b"v1".to_vec()), node(0), 1);
        a.update(&VersionVector::new(), Some(b"v2".to_vec()), node(0), 2);
        assert_eq!(a.values().count(), 2);
    }

    #[test]
    fn delete_is_a_tombstone() {
        let mut a = Object::default();
        a.update(&VersionVector::new(), Some(b"v1".to_vec()), node(0), 1);
        let ctx = a.context();
        a.update(&ctx, None, node(0), 2);
        assert!(a.is_deleted());
        assert_eq!(a.siblings().len(), 1);
    }

    #[test]
    fn context_round_trips_and_garbage_is_refused() {
        let mut vv = VersionVector::new();
        vv.insert(node(3), 7);
        assert_eq!(decode_context(&encode_context(&vv)).unwrap(), vv);
        assert!(decode_context(b"\xff\x00garbage").is_err());
    }

    #[test]
    fn prune_keeps_entries_siblings_refer_to() {
        let mut a = Object::default();
        for i in 0..10 {
            let ctx = a.context();
            a.update(&ctx, Some(vec![i]), node(i), u64::from(i));
        }
        a.prune(3, 0, 100);
        assert_eq!(a.clock().len(), 3);
        assert!(
            a.clock().contains_key(&node(9)),
            "the live sibling's entry stays"
        );
        assert_eq!(a.values().collect::<Vec<_>>(), vec![&[9u8][..]]);
    }

    /// A random history: writes at random replicas with contexts taken from
    /// random replicas (or none), and random one-way syncs.
    #[derive(Debug, Clone)]
    enum Op {
        Put {
            at: u8,
            ctx_from: Option<u8>,
            delete: bool,
        },
        Sync {
            from: u8,
            to: u8,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (
                0u8..3,
                proptest::option::of(0u8..3),
                proptest::bool::weighted(0.2)
            )
                .prop_map(|(at, ctx_from, delete)| Op::Put {
                    at,
                    ctx_from,
                    delete
                }),
            (0u8..3, 0u8..3).prop_map(|(from, to)| Op::Sync { from, to }),
        ]
    }

    struct History {
        replicas: Vec<Object>,
        /// Every object state that existed, for picking law operands.
        states: Vec<Object>,
        written: Vec<Dot>,
        contexts: Vec<VersionVector>,
    }

    fn run(ops: &[Op]) -> History {
        let mut h = History {
            replicas: vec![Object::default(); 3],
            states: vec![],
            written: vec![],
            contexts: vec![],
        };
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::Put {
                    at,
                    ctx_from,
                    delete,
                } => {
                    let ctx = ctx_from
                        .map(|f| h.replicas[f as usize].context())
                        .unwrap_or_default();
                    let value = (!delete).then(|| vec![i as u8]);
                    let dot = h.replicas[*at as usize].update(&ctx, value, node(*at), i as u64);
                    h.written.push(dot);
                    h.contexts.push(ctx);
                }
                Op::Sync { from, to } => {
                    let src = h.replicas[*from as usize].clone();
                    h.replicas[*to as usize].merge(&src);
                }
            }
            h.states.extend(h.replicas.iter().cloned());
        }
        h
    }

    proptest! {
        #[test]
        fn merge_is_commutative_associative_idempotent(
            ops in proptest::collection::vec(op(), 1..40),
            picks in proptest::collection::vec(any::<proptest::sample::Index>(), 3),
        ) {
            let h = run(&ops);
            let a = picks[0].get(&h.states);
            let b = picks[1].get(&h.states);
            let c = picks[2].get(&h.states);
            prop_assert_eq!(Object::merged(a, b), Object::merged(b, a));
            prop_assert_eq!(
                Object::merged(&Object::merged(a, b), c),
                Object::merged(a, &Object::merged(b, c))
            );
            prop_assert_eq!(Object::merged(a, a), a.clone());
            let ab = Object::merged(a, b);
            prop_assert!(ab.descends(a) && ab.descends(b));
        }

        /// After any history, once every replica has synced with every other,
        /// each written version is either still a sibling or was covered by a
        /// context some later write carried: nothing is dropped silently.
        #[test]
        fn a_value_is_dropped_only_if_a_context_covers_it(
            ops in proptest::collection::vec(op(), 1..40),
        ) {
            let h = run(&ops);
            let mut all = Object::default();
            for r in &h.replicas {
                all.merge(r);
            }
            for dot in &h.written {
                let alive = all.siblings().iter().any(|s| s.dot == *dot);
                let covered = h.contexts.iter().any(|ctx| covers(ctx, dot));
                prop_assert!(alive || covered, "{:?} vanished without a covering context", dot);
            }
            // Every replica converges to the same object after a full exchange.
            for r in &h.replicas {
                prop_assert_eq!(Object::merged(r, &all), all.clone());
            }
        }
    }
}
