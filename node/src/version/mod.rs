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
//! - Clock entries carry a wall-clock time; [`Object::prune`] drops the oldest
//!   entries no sibling refers to once there are too many, if older than a
//!   minimum age (a day by default). A pruned entry can only make a version
//!   that arrives later look concurrent (an extra sibling), never hide a
//!   live one. So an entry is stamped with the last write that needed it:
//!   its own event, a write that superseded one of its values, or one that
//!   learned it from its context (as the copy that issued the context had
//!   it, or from the write when it names a value that copy held: contexts
//!   are sealed, see [`ContextKey`], so each entry a context brings was a
//!   real event's then; [`Object::update_from`]). A replica that missed
//!   such a write and still holds the value needs the entry to drop it, and
//!   has the minimum age to get it. The write that learns an entry also
//!   keeps it through its own pruning ([`Object::learned_from`]), as it
//!   must go out covering what its context covered.
//!
//! # Actors and epochs: a dot is never minted twice
//! A dot must name one write: if two different values carried the same dot,
//! a context that saw one would "cover" the other (an acknowledged write
//! silently dropped) and merge would depend on the order of arrival. A
//! coordinator knows the counters it minted for a key only from its stored
//! object, and that knowledge can be lost: the key's tombstone was reaped,
//! clock pruning dropped the entry, a power loss took the unsynced WAL tail,
//! the data directory was wiped. So dots are not minted under the node id but
//! under an *actor* ([`Actors`]): 6 bytes of a hash of the node id, the node's
//! *incarnation* (a number synced at start, new on every start but one after
//! a clean stop) and an *epoch* (a counter in memory, bumped whenever this
//! incarnation needs a new actor).
//! A start after a clean stop goes on with the incarnation of the run before,
//! its epoch and its retired epochs ([`ActorsState`], which the stop recorded
//! once every write was on disk), as long as nothing changed the store since
//! (see `replica::seal`): so rolling restarts do not grow clocks by an entry
//! per key and start, and pruning (which then drops entries a returning stale
//! copy may still need) stays a far-off bound.
//! A write reuses the newest actor of the current incarnation that the stored
//! object names, and takes a fresh one whenever the object names none (the
//! key is new here, or was forgotten) or the write's context knows more of
//! that actor than the object does (amnesia, or a forged context). Within an
//! incarnation nothing is forgotten without it being seen (a reaped key is
//! not found, and pruning keeps the entries of the actors it handed out), and a
//! new incarnation never reuses an old one's actors. This is Riak's answer to
//! "key amnesia" (per-key actor epochs), made crash-proof by the incarnation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_ring::NodeId;

mod actors;
mod context;
pub use actors::{Actors, ActorsState, MAX_RETIRED};
pub use context::{ContextKey, Opened, CONTEXT_SECRET_BYTES};

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

/// Why a write could not be versioned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("this incarnation used up its {0} actor epochs; restart the node")]
    EpochsExhausted(u64),
    #[error("this node is stopping: it writes nothing more")]
    Sealed,
    #[error("the causal context has {entries} entries, more than the {max} a context may carry")]
    ContextTooLarge { entries: usize, max: usize },
    #[error("the causal context is not one this cluster issued ({0}): read the key again and write with the context that read returns")]
    ContextMalformed(String),
    #[error("the causal context was not issued for this key by this cluster (altered, read from another key, or issued by another cluster's nodes; or the nodes hold different context keys: each logs its key's id at start): read the key again and write with the context that read returns")]
    ContextNotIssued,
}

/// A context's entry as a node seals it (see [`ContextKey`]): its counter,
/// and its time on the issuing clock; `None` when it names a value the
/// issuing copy holds, which a write that learns the entry supersedes: it
/// then ages from that write ([`Object::update_from`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextEntry {
    pub counter: u64,
    pub at: Option<u64>,
}

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

    /// About how many bytes the object takes encoded (values, plus a fixed
    /// allowance per sibling and clock entry): for batching and limits,
    /// without encoding it.
    pub fn approx_size(&self) -> usize {
        self.siblings_size() + self.clock().len() * 32
    }

    /// About how many bytes the siblings take encoded.
    pub fn siblings_size(&self) -> usize {
        self.siblings
            .iter()
            .map(|s| s.value.as_ref().map_or(0, Vec::len) + 48)
            .sum()
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

    /// Applies a write minted under `actor`: drops the siblings `context`
    /// covers (their entries stamped `now_ms`), joins `context` into the
    /// clock (the entries it raises stamped `now_ms`), and adds `value`
    /// (`None`: a tombstone) under the actor's next dot, which it returns.
    /// The actor comes from [`Actors::for_write`]; `None` if its counter is
    /// exhausted.
    pub fn update(
        &mut self,
        context: &VersionVector,
        value: Option<Vec<u8>>,
        actor: NodeId,
        now_ms: u64,
    ) -> Option<Dot> {
        self.update_from(context, &BTreeMap::new(), value, actor, now_ms)
    }

    /// [`Object::update`] with a context's entry times (`stamps`, as the
    /// copy that issued it had them, see [`ContextEntry`]): the entries
    /// the context raises age from then (never from after `now_ms`), as a
    /// merge of that copy would have them; those without a time name a
    /// value the issuing copy held, which this write supersedes, and age
    /// from now, as do the entries of the values it supersedes here. A
    /// replica that still holds such a value has the minimum age from this
    /// write to drop it; entries of values gone already when the context
    /// was issued keep their old time, so a context kept longer than the
    /// minimum age brings back entries pruned since only for them to go
    /// again, rather than fill the clock.
    pub fn update_from(
        &mut self,
        context: &VersionVector,
        stamps: &BTreeMap<NodeId, u64>,
        value: Option<Vec<u8>>,
        actor: NodeId,
        now_ms: u64,
    ) -> Option<Dot> {
        let next = self
            .clock
            .get(&actor)
            .map_or(0, |e| e.counter)
            .max(context.get(&actor).copied().unwrap_or(0))
            .checked_add(1)?;
        // The entries of the values this write supersedes age from now: a
        // replica that still holds one of them needs its entry to drop it.
        for s in self.siblings.iter().filter(|s| covers(context, &s.dot)) {
            if let Some(e) = self.clock.get_mut(&s.dot.node) {
                e.timestamp_ms = e.timestamp_ms.max(now_ms);
            }
        }
        self.siblings.retain(|s| !covers(context, &s.dot));
        for (n, c) in context {
            let entry = self.clock.entry(*n).or_insert(ClockEntry {
                counter: 0,
                timestamp_ms: 0,
            });
            if *c > entry.counter {
                entry.counter = *c;
                let at = stamps.get(n).map_or(now_ms, |t| (*t).min(now_ms));
                entry.timestamp_ms = entry.timestamp_ms.max(at);
            }
        }
        let entry = self.clock.entry(actor).or_insert(ClockEntry {
            counter: 0,
            timestamp_ms: now_ms,
        });
        entry.counter = next;
        entry.timestamp_ms = entry.timestamp_ms.max(now_ms);
        let dot = Dot {
            node: actor,
            counter: next,
        };
        self.siblings.push(Sibling {
            dot,
            value,
            timestamp_ms: now_ms,
        });
        self.siblings.sort_by_key(|s| s.dot);
        Some(dot)
    }

    /// The context a put's reply hands out: what the put's `context` covered
    /// plus the write's own `dot`, so a client that writes again with it
    /// supersedes its own write and nothing it never saw. A version vector
    /// cannot leave a gap: if a concurrent value minted by the same actor
    /// lies between the context and the dot, covering the dot would cover
    /// it too, so the reply then covers only the put's context (a later put
    /// with it keeps this write as a sibling rather than drop that one; the
    /// reply's sibling count tells the client so). A concurrent tombstone
    /// in the gap may be covered: it holds no value, and the clock entries
    /// that keep what it deleted deleted stay in the object.
    pub fn reply_context(&self, context: &VersionVector, dot: Dot) -> VersionVector {
        let seen = context.get(&dot.node).copied().unwrap_or(0);
        let gap = self.siblings.iter().any(|s| {
            s.value.is_some()
                && s.dot.node == dot.node
                && s.dot.counter > seen
                && s.dot.counter < dot.counter
        });
        let mut reply = context.clone();
        if !gap {
            reply.insert(dot.node, dot.counter);
        }
        reply
    }

    /// The context a read hands out, to seal for the client: the whole
    /// clock (see [`ContextEntry`]).
    pub fn read_entries(&self) -> BTreeMap<NodeId, ContextEntry> {
        self.entries_of(self.context())
    }

    /// [`Object::reply_context`], to seal for the client.
    pub fn reply_entries(
        &self,
        context: &VersionVector,
        dot: Dot,
    ) -> BTreeMap<NodeId, ContextEntry> {
        self.entries_of(self.reply_context(context, dot))
    }

    /// `vv`'s entries with this copy's times (0 for an entry it no longer
    /// holds), or none for one that names a value it holds.
    fn entries_of(&self, vv: VersionVector) -> BTreeMap<NodeId, ContextEntry> {
        (vv.into_iter())
            .map(|(n, counter)| {
                let names_value =
                    (self.siblings.iter()).any(|s| s.dot.node == n && s.dot.counter <= counter);
                let at = (!names_value).then(|| self.clock.get(&n).map_or(0, |e| e.timestamp_ms));
                (n, ContextEntry { counter, at })
            })
            .collect()
    }

    /// Merges `other` into `self` (the join of the two DVV sets).
    /// In place, reading the clocks as they are: a replica merges on every
    /// write it takes, and building both contexts and copying the kept
    /// siblings' values was a fifth of a node's allocations.
    pub fn merge(&mut self, other: &Object) {
        let seen = |clock: &BTreeMap<NodeId, ClockEntry>, dot: &Dot| {
            clock
                .get(&dot.node)
                .is_some_and(|e| e.counter >= dot.counter)
        };
        // Kept in order: the siblings stay sorted unless some are added.
        self.siblings.retain(|s| {
            !seen(&other.clock, &s.dot) || other.siblings.iter().any(|o| o.dot == s.dot)
        });
        let before = self.siblings.len();
        for s in &other.siblings {
            // Against this object's clock before the merge (joined below).
            if !seen(&self.clock, &s.dot) && !self.siblings.iter().any(|k| k.dot == s.dot) {
                self.siblings.push(s.clone());
            }
        }
        if self.siblings.len() != before {
            self.siblings.sort_by_key(|s| s.dot);
        }
        for (n, e) in &other.clock {
            let mine = self.clock.entry(*n).or_insert(*e);
            mine.counter = mine.counter.max(e.counter);
            mine.timestamp_ms = mine.timestamp_ms.max(e.timestamp_ms);
        }
    }

    /// Drops the siblings `other` holds (its dots), keeping the history.
    pub fn drop_siblings_of(&mut self, other: &Object) {
        self.siblings
            .retain(|s| !other.siblings.iter().any(|o| o.dot == s.dot));
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

    /// The actors whose entries `context` holds above this clock's: what
    /// a write under `context` learns, which its pruning keeps: were such
    /// an entry dropped by that write (a minimum age of 0), the write would
    /// go out short of what its context covered. (A merge prunes by the
    /// merged clock alone, so that replicas converge.)
    pub fn learned_from(&self, context: &VersionVector) -> Vec<NodeId> {
        let above = |n: &NodeId, c: u64| self.clock.get(n).is_none_or(|e| e.counter < c);
        (context.iter())
            .filter(|(n, c)| above(n, **c))
            .map(|(n, _)| *n)
            .collect()
    }

    /// Drops clock entries that no sibling refers to and `keep` does not
    /// protect, oldest first, while the clock has more than `max_entries`
    /// and the entry is older than `min_age_ms`.
    pub fn prune(
        &mut self,
        max_entries: usize,
        min_age_ms: u64,
        now_ms: u64,
        keep: impl Fn(&NodeId) -> bool,
    ) {
        if self.clock.len() <= max_entries {
            return;
        }
        let mut candidates: Vec<(u64, NodeId)> = self
            .clock
            .iter()
            .filter(|(n, e)| {
                now_ms.saturating_sub(e.timestamp_ms) >= min_age_ms
                    && !keep(n)
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

/// Leading byte of a stored object, so the format can change later.
const OBJECT_FORMAT: u8 = 1;

/// Encodes an object for storage.
pub fn encode_object(object: &Object) -> Vec<u8> {
    let mut out = vec![OBJECT_FORMAT];
    rmp_serde::encode::write(&mut out, object).expect("an object always encodes");
    out
}

/// Why stored or received object bytes are not an object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty object record")]
    Empty,
    #[error("unknown object format {0}")]
    UnknownFormat(u8),
    #[error("object does not decode: {0}")]
    Malformed(String),
}

/// Decodes a stored object.
pub fn decode_object(bytes: &[u8]) -> Result<Object, DecodeError> {
    match bytes.split_first() {
        Some((&OBJECT_FORMAT, body)) => {
            rmp_serde::from_slice(body).map_err(|e| DecodeError::Malformed(e.to_string()))
        }
        Some((v, _)) => Err(DecodeError::UnknownFormat(*v)),
        None => Err(DecodeError::Empty),
    }
}

#[cfg(test)]
mod tests;
