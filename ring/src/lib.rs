//! Placement for Shoal: which nodes hold which keys. Pure: no I/O, no clock, no
//! async; the same inputs give the same ring on every node.
//!
//! # Layout
//! - [`NodeId`]: a node's identity, a random 128-bit id kept in its data directory.
//! - [`key_hash`] / [`Ring::partition_of`]: the fixed hash that maps a key to one
//!   of `Q` equal partitions of the 64-bit hash space (Dynamo's strategy 3).
//! - [`Ring::claim`] and [`Ring::claim_zoned`] (module `claim`, whose last step,
//!   the repair, is `claim::repair`): the claim algorithm below.
//! - [`Ring::preference_list`] and [`Ring::sloppy_list`]: the N primaries of a key,
//!   and the list a coordinator uses when some of them are down (live primaries,
//!   then fallbacks found by walking the ring).
//! - [`Plan`], [`transfers`], [`replica_counts`] (module `plan`): what a ring
//!   change moves, replica by replica, for the operator's `cluster plan` view.
//!
//! # The claim algorithm and its bounds
//! `Q` partitions (a power of two), `M` members, `N` replicas. A *window* is `N`
//! consecutive partitions (wrapping); a *breach* is one node owning two
//! partitions of a window. A *replica* is a (partition, node) pair of a
//! preference list, so a ring holds `min(N, M) * Q` of them.
//!
//! Why windows matter: a preference list is the first `N` distinct nodes
//! walking the ring from the key's partition. With no breach, the list of
//! partition `p` is exactly `owners[p..p+N]`, every node holds exactly `N`
//! replicas per partition it owns, and owner balance is replica balance. The
//! claim before this one balanced owners only; a node joining 100 took 10
//! adjacent partitions and held 12 replicas where 30 were fair, its neighbours
//! up to 39. Keeping windows free of breaches is Riak's `target_n_val`.
//!
//! ## What wins when goals conflict
//! 1. Zone spread: every preference list spans `min(N, Z)` zones, `Z` counting
//!    the zones that own partitions (a member without a zone counts as a zone
//!    of its own). The walk guarantees this for any owners, by taking nodes of
//!    unused zones first; the claim's part is that every zone owns a partition:
//!    when `Q < M`, the members that get one are picked one per zone first.
//! 2. Balance: owned counts differ by at most one. Never traded away.
//! 3. Spread of consecutive owners: no breach, then as few windows as possible
//!    with two owners in one zone (the walk skips such an owner, which puts
//!    replica counts off `N` times owned counts).
//! 4. Movement: as few partitions as possible change owner, given the above.
//!
//! ## Steps
//! From scratch (no previous ring of this `Q`) without zones, the ring is the
//! round-robin deal in id order, exactly as every earlier release computed it,
//! so a rolling upgrade moves no data. That deal breaches exactly when
//! `Q mod M` is in `1..N` (its last `Q mod M` partitions are closer than `N` to
//! the first ones); the first claim given it as the previous ring repairs that.
//! From scratch with zones, members are ordered so zones alternate (each zone's
//! members evenly spaced through the order), dealt round robin in that order,
//! then repaired.
//!
//! With a previous ring of the same `Q`:
//! 1. Targets: `floor(Q/M)` each, plus one for the `Q mod M` members that own
//!    the most already (ties by id), so targets force no needless move.
//! 2. Holes (partitions of members that left) go to members under target,
//!    most constrained hole first, each to the member it costs least (a breach
//!    first, then a same-zone pair). When every such member would make a bad
//!    pair there, a *chain* may do better: a nearby member that fits the hole
//!    takes it and hands one of its partitions to a member under target.
//! 3. Surplus: each member still under target cuts the ring into as many equal
//!    arcs as it needs partitions and takes, from each arc, the partition of a
//!    member over target that costs least. The arcs keep a joiner's partitions
//!    apart, so it takes its full share of replicas.
//! 4. Repair, keeping every count: swaps that lower the cost (within 24
//!    partitions, or anywhere for a breach); then, for a breach no swap fixes,
//!    the owners of a stretch around it are dealt again by a bounded search;
//!    and if breaches remain, a round-robin template (`claim::repair`) whose
//!    slots go to members so that as many partitions as possible keep their
//!    owner. Same-zone pairs are repaired only near partitions this claim
//!    moved; breaches anywhere.
//!
//! ## Bounds
//! Each is checked by this crate's tests: seeded random join/leave sequences
//! up to 1,000 nodes at `Q = 16384`, around 100 at `Q = 1024`, small clusters
//! at `Q = 256` and `64` (N from 2 to 5), random and equal zones, and
//! proptest properties with fixed seeds.
//! - Balance: owned counts differ by at most one, always.
//! - `target_n_val`: a claim with a previous ring leaves no breach whenever
//!   [`target_n_val_holds`]: `N * ceil(Q/M) <= Q` (a member with `ceil(Q/M)`
//!   partitions can keep them `N` apart) and `Q mod M` is 0 or at least `N` or
//!   `M >= 2N - 1` (then the template exists). For `N <= 3` that is every
//!   `M > N`. `M = N = 3` can never hold (3 does not divide `Q`); the claim then
//!   keeps the largest window `w < N` that fits. For `N >= 4` with
//!   `N < M <= 2N - 2` it is best effort: in the small-cluster tests, 7 of 77
//!   such claims at `N = 4` and 70 of 317 at `N = 5` kept a breach.
//! - Replicas: with no breach and no zones, a node holds exactly `N` times its
//!   owned partitions, so within `N` replicas of the fair `N * Q / M` (a
//!   relative error below `M / Q`: 6.25% at 16 partitions per node, 1% at 100).
//!   One node joining 100 at `Q = 1024` now holds 30 replicas (fair 30.4;
//!   every node 30..=33), and one joining 1,000 at `Q = 16384` holds 48
//!   (fair 49.1; every node 48..=51).
//! - A join of one node to `S` moves at most `ceil(Q/(S+1)) + 2(N-1) + 2b`
//!   partitions, where `b` is the previous ring's breaching partitions (0 for a
//!   ring this claim made where `target_n_val` holds; at most `N - 1` for a
//!   round-robin deal). The joiner gets `floor(Q/(S+1))`; the rest is repair.
//!   A claim with unchanged members repairs a round-robin deal with at most
//!   `2b` moves.
//! - A leave of a node owning `c` partitions, when at least `2N + 2` members
//!   stay, moves at most `2c + 2(N-1) + 2b`. More than `c` because the `2(N-1)`
//!   owners around each of its partitions cannot take it without a breach, and
//!   when every member must grow they grow by a chain (one extra move): about
//!   `c * (1 + 2(N-1)/(M-1))` in the tests (10 to 9 nodes at `Q = 1024` moves
//!   148 partitions for 103). With fewer members left, `target_n_val` can force
//!   a reshuffle: a leave moved up to 81% of the ring at `N = 3` (going to 4
//!   nodes, where a window of 3 leaves one choice for the next partition) and
//!   85% at `N = 4`.
//! - Replicas moved (pairs in the new lists not in the old): at most `N` per
//!   partition moved when neither ring has a breach and there are no zones, so
//!   a join moves at most `N * (ceil(Q/(S+1)) + 2(N-1))` replicas.
//! - Zones: every list spans `min(N, Z)` zones (above), for random unequal
//!   zones, equal zones and members without a zone. A single join or leave
//!   that keeps at least `2N + 2` members moves at most `3g + 2(N-1) + 2b`,
//!   `g` being what members gain in owned count (the joiner's share, or the
//!   leaver's partitions): zone spread wins over movement. Changes made one
//!   node per zone (three join together, three leave together) move at most
//!   `2g + 2(N-1)` (in the tests, `g` plus at most 2) and keep replica counts
//!   within `2N` of fair. Changes one node at a time leave zones unequal in
//!   between, where some windows must repeat a zone; when zones are equal
//!   again, replica counts were within 7% of fair at `Q = 256` and 5% at
//!   `Q = 1024` (a ring dealt from scratch: 3.1% and 0.7%), so growing a zoned
//!   cluster a zone-balanced batch at a time keeps it closest to fair. With
//!   zones the replicas moved are not bounded by `N` per partition: a list
//!   walks past same-zone owners, so one change reaches every list that walks
//!   past it (up to 16 replicas per partition moved with random unequal zones).
//! - Determinism: the ring is a function of (previous ring, members, zones, Q,
//!   N): ids and zones are kept in ordered maps and every loop runs in
//!   partition or id order; no hash map order, no randomness.
//! - Time: at opt-level 1, a join or leave among 1,000 members at `Q = 16384`
//!   takes 5 to 15 ms; replacing all 1,000 members at once about 0.5 s.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

mod claim;
mod plan;

pub use plan::{
    partitions_moved, preference_lists, replica_counts, transfers, Plan, Share, Transfer,
};

/// Default number of partitions.
pub const DEFAULT_PARTITIONS: u32 = 256;

/// A node's identity: 128 random bits created on the node's first start.
/// Names and addresses are attributes; placement only ever looks at ids.
/// Serialised as 16 raw bytes (it appears in every stored clock).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub [u8; 16]);

impl Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Bytes;
        impl<'de> serde::de::Visitor<'de> for Bytes {
            type Value = NodeId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("16 bytes of node id")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<NodeId, E> {
                <[u8; 16]>::try_from(v)
                    .map(NodeId)
                    .map_err(|_| E::invalid_length(v.len(), &self))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<NodeId, A::Error> {
                let mut id = [0u8; 16];
                for (i, b) in id.iter_mut().enumerate() {
                    *b = seq
                        .next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                Ok(NodeId(id))
            }
        }
        d.deserialize_bytes(Bytes)
    }
}

impl NodeId {
    pub fn from_u128(v: u128) -> Self {
        NodeId(v.to_be_bytes())
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = hex::decode(s).ok()?;
        Some(NodeId(bytes.try_into().ok()?))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Eight hex digits identify a node in logs as well as 32 do.
        write!(f, "{}", &self.to_hex()[..8])
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The key hash: 64-bit FNV-1a over the key bytes, then the MurmurHash3 `fmix64`
/// finaliser so that the high bits (which pick the partition) depend on every
/// input bit. Fixed forever: changing it moves every key.
pub fn key_hash(key: &[u8]) -> u64 {
    key_hash_of(&[key])
}

/// [`key_hash`] of `parts` one after the other, without joining them.
pub fn key_hash_of(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// The partition of a key among `q` (a power of two): the top `log2 q` bits
/// of [`key_hash`].
pub fn partition_of(key: &[u8], q: u32) -> u32 {
    let bits = q.trailing_zeros();
    if bits == 0 {
        return 0;
    }
    (key_hash(key) >> (64 - bits)) as u32
}

/// Whether [`Ring::claim`] keeps `target_n_val` for `members` members: with a
/// previous ring, the claimed ring then never has a node twice within `n`
/// consecutive partitions. See the crate doc for when it holds.
pub fn target_n_val_holds(q: u32, members: usize, n: usize) -> bool {
    claim::keeps_target_n_val(q as usize, members, n)
}

/// Why a ring could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingError {
    /// `Q` must be a power of two between 1 and 2^16.
    BadPartitionCount(u32),
    /// A ring needs at least one member.
    NoMembers,
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingError::BadPartitionCount(q) => {
                write!(f, "partition count {q} is not a power of two in 1..=65536")
            }
            RingError::NoMembers => write!(f, "a ring needs at least one member"),
        }
    }
}

impl std::error::Error for RingError {}

/// The role a node plays for one key in a sloppy list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// One of the key's N primaries.
    Primary,
    /// A live node standing in for the named primary, which is down.
    Fallback { for_primary: NodeId },
}

/// A ring: the owner of each of `Q` partitions, plus optional zones.
/// Decoding checks `Q` as [`Ring::claim`] does (clients decode rings a node
/// sent): an empty ring has no owner for any key, and a huge one would make
/// every routing table huge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RingParts")]
pub struct Ring {
    /// `owners[p]` owns partition `p`.
    owners: Vec<NodeId>,
    /// Zone of each node, when zones are configured; preference lists spread
    /// over distinct zones first.
    zones: BTreeMap<NodeId, String>,
}

/// A ring as decoded, before [`Ring`] checks it.
#[derive(Deserialize)]
struct RingParts {
    owners: Vec<NodeId>,
    zones: BTreeMap<NodeId, String>,
}

impl TryFrom<RingParts> for Ring {
    type Error = RingError;

    fn try_from(parts: RingParts) -> Result<Ring, RingError> {
        let q = parts.owners.len();
        if !q.is_power_of_two() || q > 65536 {
            return Err(RingError::BadPartitionCount(
                u32::try_from(q).unwrap_or(u32::MAX),
            ));
        }
        Ok(Ring {
            owners: parts.owners,
            zones: parts.zones,
        })
    }
}

impl Ring {
    /// Builds a ring for `members`, starting from `previous` when there is one
    /// so that as few partitions as possible move; `n` is the replication
    /// factor. Members keep the zones `previous` gave them (the result carries
    /// `previous`'s zone map unchanged); use [`Ring::claim_zoned`] to set zones.
    /// From scratch this is the round-robin deal in id order, exactly as every
    /// earlier release computed it. See the crate doc for the algorithm.
    pub fn claim(
        previous: Option<&Ring>,
        members: &BTreeSet<NodeId>,
        q: u32,
        n: usize,
    ) -> Result<Ring, RingError> {
        let zones = previous.map(|p| p.zones.clone()).unwrap_or_default();
        let zoned: BTreeMap<NodeId, Option<String>> = members
            .iter()
            .map(|m| (*m, zones.get(m).cloned()))
            .collect();
        let owners = claim::claim(previous, &zoned, q, n)?;
        Ok(Ring { owners, zones })
    }

    /// [`Ring::claim`] for members with zones (`None`: in no zone). Preference
    /// lists then span `min(N, zones)` zones, and the claim places owners so
    /// that lists rarely need to skip one; see the crate doc for the order in
    /// which zone spread, balance and movement win. The ring's zone map is
    /// exactly the zones given here.
    pub fn claim_zoned(
        previous: Option<&Ring>,
        members: &BTreeMap<NodeId, Option<String>>,
        q: u32,
        n: usize,
    ) -> Result<Ring, RingError> {
        let owners = claim::claim(previous, members, q, n)?;
        let zones = members
            .iter()
            .filter_map(|(m, z)| Some((*m, z.clone()?)))
            .collect();
        Ok(Ring { owners, zones })
    }

    /// The zone of each node that has one.
    pub fn zones(&self) -> &BTreeMap<NodeId, String> {
        &self.zones
    }

    /// Sets the zone of each node; preference lists then prefer distinct zones.
    pub fn with_zones(mut self, zones: BTreeMap<NodeId, String>) -> Self {
        self.zones = zones;
        self
    }

    /// Number of partitions `Q`.
    pub fn partition_count(&self) -> u32 {
        self.owners.len() as u32
    }

    /// The partition a key falls in: see [`partition_of`].
    pub fn partition_of(&self, key: &[u8]) -> u32 {
        partition_of(key, self.owners.len() as u32)
    }

    /// Owner of partition `p`.
    pub fn owner(&self, p: u32) -> NodeId {
        self.owners[p as usize % self.owners.len()]
    }

    /// All owners, partition by partition.
    pub fn owners(&self) -> &[NodeId] {
        &self.owners
    }

    /// The distinct members of the ring, in id order.
    pub fn members(&self) -> BTreeSet<NodeId> {
        self.owners.iter().copied().collect()
    }

    /// Partitions owned by `node`.
    pub fn partitions_of(&self, node: NodeId) -> Vec<u32> {
        (0..self.owners.len() as u32)
            .filter(|&p| self.owner(p) == node)
            .collect()
    }

    /// The first `n` distinct nodes met walking the ring from the key's partition,
    /// taking nodes of unused zones first when zones are configured. Fewer than `n`
    /// only when the ring has fewer than `n` members.
    pub fn preference_list(&self, key: &[u8], n: usize) -> Vec<NodeId> {
        self.preference_list_for_partition(self.partition_of(key), n)
    }

    /// [`Ring::preference_list`] for a partition.
    pub fn preference_list_for_partition(&self, partition: u32, n: usize) -> Vec<NodeId> {
        self.list_from(partition, n, None)
    }

    /// The preference list, walking only as far as it needs to: the same
    /// lists as a walk over every distinct node (the tests compare the two),
    /// in `O(N)` steps when the next `N` owners are distinct. `zones_owning`,
    /// when the caller knows every owner has a zone and how many zones own
    /// partitions, ends the zone pass once every zone is used instead of
    /// walking the whole ring (lists longer than the zone count need that).
    pub(crate) fn list_from(
        &self,
        partition: u32,
        n: usize,
        zones_owning: Option<usize>,
    ) -> Vec<NodeId> {
        let q = self.owners.len();
        let at = |i: usize| self.owners[(partition as usize + i) % q];
        // `n` may come from the network (a client's ring info).
        let mut list: Vec<NodeId> = Vec::with_capacity(n.min(q));
        let mut in_list = Seen::new(n);
        if !self.zones.is_empty() {
            let mut used_zones = BTreeSet::new();
            for i in 0..q {
                if list.len() == n || zones_owning == Some(used_zones.len()) {
                    break;
                }
                let node = at(i);
                if in_list.contains(&list, node) {
                    continue;
                }
                // A node whose zone was used stays skipped at its later
                // partitions too, so a pass over partitions takes the same
                // nodes as a pass over distinct nodes.
                if self.zones.get(&node).is_none_or(|z| used_zones.insert(z)) {
                    in_list.insert(node);
                    list.push(node);
                }
            }
        }
        for i in 0..q {
            if list.len() == n {
                break;
            }
            let node = at(i);
            if !in_list.contains(&list, node) {
                in_list.insert(node);
                list.push(node);
            }
        }
        list
    }

    /// The sloppy list: the key's primaries that `is_up`, then live fallbacks
    /// walking the ring past the primaries, one per down primary, up to `n`.
    pub fn sloppy_list(
        &self,
        key: &[u8],
        n: usize,
        is_up: impl Fn(NodeId) -> bool,
    ) -> Vec<(NodeId, Role)> {
        let primaries = self.preference_list(key, n);
        let mut list: Vec<(NodeId, Role)> = primaries
            .iter()
            .filter(|p| is_up(**p))
            .map(|p| (*p, Role::Primary))
            .collect();
        let mut down = primaries.iter().filter(|p| !is_up(**p)).copied();
        for node in self.fallbacks(key, n) {
            if list.len() == n {
                break;
            }
            if !is_up(node) {
                continue;
            }
            match down.next() {
                Some(primary) => list.push((
                    node,
                    Role::Fallback {
                        for_primary: primary,
                    },
                )),
                None => break,
            }
        }
        list
    }

    /// Every node that is not a primary of the key, in the order a sloppy
    /// quorum takes them as fallbacks (walking the ring past the primaries).
    pub fn fallbacks(&self, key: &[u8], n: usize) -> Vec<NodeId> {
        let primaries = self.preference_list(key, n);
        self.walk(self.partition_of(key))
            .into_iter()
            .filter(|node| !primaries.contains(node))
            .collect()
    }

    /// Distinct nodes in ring order starting at `partition`.
    fn walk(&self, partition: u32) -> Vec<NodeId> {
        let q = self.owners.len();
        let mut seen = BTreeSet::new();
        let mut walk = Vec::new();
        for i in 0..q {
            let node = self.owners[(partition as usize + i) % q];
            if seen.insert(node) {
                walk.push(node);
            }
        }
        walk
    }
}

/// Which nodes a preference list holds: a scan of the list itself while it
/// is short (every list, at Shoal's `N`), a set when a caller asks for a long
/// one, so a huge `n` costs `log` per step rather than the list's length.
enum Seen {
    Scan,
    Set(BTreeSet<NodeId>),
}

impl Seen {
    fn new(n: usize) -> Seen {
        if n <= 16 {
            Seen::Scan
        } else {
            Seen::Set(BTreeSet::new())
        }
    }

    fn contains(&self, list: &[NodeId], node: NodeId) -> bool {
        match self {
            Seen::Scan => list.contains(&node),
            Seen::Set(set) => set.contains(&node),
        }
    }

    fn insert(&mut self, node: NodeId) {
        if let Seen::Set(set) = self {
            set.insert(node);
        }
    }
}

#[cfg(test)]
mod tests;
