//! The ring's own tests: hashing, errors, preference lists and the claim's
//! properties over random member sets (proptest with fixed seeds, so a run is
//! repeatable; each test prints its case count once). The claim's longer
//! sequences and zone cases are in `claim/tests.rs`.

use std::sync::Mutex;

use super::*;
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

const CASES: u32 = 256;

fn config(seed: u64) -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        rng_seed: RngSeed::Fixed(seed),
        ..ProptestConfig::default()
    }
}

/// Prints a property test's case count the first time one of its cases runs.
fn announce(test: &'static str) {
    static SEEN: Mutex<BTreeSet<&str>> = Mutex::new(BTreeSet::new());
    if SEEN.lock().expect("announce lock").insert(test) {
        eprintln!("{test}: {CASES} cases");
    }
}

/// Partitions whose owner owns another of the next `n - 1`: one per pair of
/// one node's partitions closer than `n` (the claim's tests count them too).
pub(crate) fn breaches(ring: &Ring, n: usize) -> usize {
    let o = ring.owners();
    let q = o.len();
    (0..q)
        .filter(|&p| (1..n.min(q)).any(|d| o[(p + d) % q] == o[p]))
        .count()
}

/// The preference list as every release before this one computed it: walk
/// every distinct node, zones first. [`Ring::preference_list_for_partition`]
/// must give the same lists while walking only as far as it needs.
fn walked_list(ring: &Ring, partition: u32, n: usize) -> Vec<NodeId> {
    let q = ring.owners.len();
    let mut seen = BTreeSet::new();
    let walk: Vec<NodeId> = (0..q)
        .map(|i| ring.owners[(partition as usize + i) % q])
        .filter(|x| seen.insert(*x))
        .collect();
    let mut list: Vec<NodeId> = Vec::new();
    if !ring.zones.is_empty() {
        let mut used_zones = BTreeSet::new();
        for node in &walk {
            if list.len() == n {
                break;
            }
            let zone = ring.zones.get(node);
            if zone.is_none_or(|z| used_zones.insert(z.clone())) {
                list.push(*node);
            }
        }
    }
    for node in &walk {
        if list.len() == n {
            break;
        }
        if !list.contains(node) {
            list.push(*node);
        }
    }
    list
}

/// Members from seeds; seed `% (zones + 1)` picks a zone, the last value
/// meaning none.
fn zoned(seeds: &[u128], zones: u128) -> BTreeMap<NodeId, Option<String>> {
    seeds
        .iter()
        .map(|s| {
            let z = s % (zones + 1);
            (NodeId::from_u128(*s), (z < zones).then(|| format!("z{z}")))
        })
        .collect()
}

fn ids(seed: &[u128]) -> BTreeSet<NodeId> {
    seed.iter().map(|v| NodeId::from_u128(*v)).collect()
}

fn counts(ring: &Ring) -> BTreeMap<NodeId, usize> {
    let mut c = BTreeMap::new();
    for o in ring.owners() {
        *c.entry(*o).or_insert(0) += 1;
    }
    c
}

#[test]
fn key_hash_of_parts_is_the_hash_of_their_concatenation() {
    for (a, b) in [
        (&b""[..], &b""[..]),
        (b"sh", b"oal"),
        (b"key", &7u64.to_le_bytes()[..]),
    ] {
        assert_eq!(key_hash_of(&[a, b]), key_hash(&[a, b].concat()));
    }
}

#[test]
fn key_hash_is_fixed() {
    // Pinned values: a change here moves every key in every cluster.
    assert_eq!(key_hash(b""), 0xefd01f60ba992926);
    assert_eq!(key_hash(b"shoal"), 0xa965faf81fb6da66);
    let ring = Ring::claim(None, &ids(&[1, 2, 3]), 256, 3).unwrap();
    assert_eq!(
        ring.partition_of(b"shoal"),
        (0xa965faf81fb6da66u64 >> 56) as u32
    );
}

#[test]
fn bad_partition_count_is_refused() {
    assert_eq!(
        Ring::claim(None, &ids(&[1]), 100, 3),
        Err(RingError::BadPartitionCount(100))
    );
    assert_eq!(
        Ring::claim(None, &BTreeSet::new(), 64, 3),
        Err(RingError::NoMembers)
    );
}

#[test]
fn sloppy_list_uses_fallbacks_for_down_primaries() {
    let ring = Ring::claim(None, &ids(&[1, 2, 3, 4, 5]), 64, 3).unwrap();
    let primaries = ring.preference_list(b"k", 3);
    let down = primaries[0];
    let list = ring.sloppy_list(b"k", 3, |n| n != down);
    assert_eq!(list.len(), 3);
    assert!(list.iter().all(|(n, _)| *n != down));
    assert_eq!(
        list.iter()
            .filter(|(_, r)| *r == Role::Fallback { for_primary: down })
            .count(),
        1
    );
}

#[test]
fn zones_spread_preference_lists() {
    let members = ids(&[1, 2, 3, 4, 5, 6]);
    let zones: BTreeMap<NodeId, String> = members
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, format!("z{}", i % 3)))
        .collect();
    let ring = Ring::claim(None, &members, 64, 3)
        .unwrap()
        .with_zones(zones.clone());
    for p in 0..64 {
        let list = ring.preference_list_for_partition(p, 3);
        let zs: BTreeSet<&String> = list.iter().map(|n| &zones[n]).collect();
        assert_eq!(zs.len(), 3, "partition {p}: {list:?}");
    }
}

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn preference_lists_have_n_distinct_nodes(
        seeds in proptest::collection::btree_set(any::<u128>(), 1..12),
        qbits in 0u32..9,
        n in 1usize..5,
        key in proptest::collection::vec(any::<u8>(), 0..32),
    ) {
        announce("preference_lists_have_n_distinct_nodes");
        let members: BTreeSet<NodeId> = seeds.iter().map(|s| NodeId::from_u128(*s)).collect();
        let ring = Ring::claim(None, &members, 1 << qbits, n).unwrap();
        let list = ring.preference_list(&key, n);
        let distinct: BTreeSet<_> = list.iter().collect();
        prop_assert_eq!(distinct.len(), list.len());
        prop_assert_eq!(list.len(), n.min(ring.members().len()));
        if members.len() >= n && ring.members().len() == members.len() {
            prop_assert_eq!(list.len(), n);
        }
    }
}

proptest! {
    #![proptest_config(config(2))]

    /// The lazy walk gives the lists the full walk gave, zones or not, for
    /// rings from scratch and after a claim with a previous ring.
    #[test]
    fn preference_lists_match_a_walk_over_every_node(
        seeds in proptest::collection::btree_set(any::<u128>(), 1..16),
        zones in 0u128..5,
        qbits in 0u32..8,
        n in 1usize..7,
    ) {
        announce("preference_lists_match_a_walk_over_every_node");
        let q = 1 << qbits;
        let members = zoned(&seeds.iter().copied().collect::<Vec<_>>(), zones);
        let fresh = Ring::claim_zoned(None, &members, q, n).unwrap();
        let mut fewer = members.clone();
        fewer.pop_first();
        let rings = match Ring::claim_zoned(Some(&fresh), &fewer, q, n) {
            Ok(again) => vec![fresh, again],
            Err(_) => vec![fresh],
        };
        for ring in &rings {
            let all = preference_lists(ring, n);
            for p in 0..q {
                let walked = walked_list(ring, p, n);
                prop_assert_eq!(&ring.preference_list_for_partition(p, n), &walked);
                prop_assert_eq!(&all[p as usize], &walked);
            }
        }
    }
}

proptest! {
    #![proptest_config(config(3))]

    #[test]
    fn rings_are_balanced(
        seeds in proptest::collection::btree_set(any::<u128>(), 1..20),
        zones in 0u128..4,
        qbits in 4u32..10,
    ) {
        announce("rings_are_balanced");
        let members = zoned(&seeds.iter().copied().collect::<Vec<_>>(), zones);
        let ring = Ring::claim_zoned(None, &members, 1 << qbits, 3).unwrap();
        let c = counts(&ring);
        let owned: Vec<usize> = members.keys().map(|m| c.get(m).copied().unwrap_or(0)).collect();
        let (min, max) = (owned.iter().min().unwrap(), owned.iter().max().unwrap());
        prop_assert!(max - min <= 1, "counts {:?}", c);
    }
}

proptest! {
    #![proptest_config(config(4))]

    /// Adding one node to S nodes moves at most ceil(Q/(S+1)) + 2(N-1) + 2b
    /// partitions, b being the previous ring's breaches: the joiner's
    /// floor(Q/(S+1)) and the repairs. Without a breach before and after, at
    /// most N replicas move per partition moved.
    #[test]
    fn a_join_moves_the_joiners_share_and_little_more(
        seeds in proptest::collection::btree_set(any::<u128>(), 2..24),
        qbits in 4u32..11,
        n in 2usize..5,
        settled in any::<bool>(),
    ) {
        announce("a_join_moves_the_joiners_share_and_little_more");
        let mut all: Vec<NodeId> = seeds.iter().map(|s| NodeId::from_u128(*s)).collect();
        let joiner = all.pop().unwrap();
        let before_members: BTreeSet<NodeId> = all.iter().copied().collect();
        let q = 1u32 << qbits;
        let mut before = Ring::claim(None, &before_members, q, n).unwrap();
        if settled {
            before = Ring::claim(Some(&before), &before_members, q, n).unwrap();
        }
        let mut after_members = before_members.clone();
        after_members.insert(joiner);
        let after = Ring::claim(Some(&before), &after_members, q, n).unwrap();
        let moved = partitions_moved(&before, &after);
        let s = before_members.len();
        let b = breaches(&before, n);
        let bound = (q as usize).div_ceil(s + 1) + 2 * (n - 1) + 2 * b;
        prop_assert!(moved <= bound, "moved {} > bound {}", moved, bound);
        let c = counts(&after);
        let joined = c.get(&joiner).copied().unwrap_or(0);
        prop_assert_eq!(joined, q as usize / (s + 1));
        prop_assert!(c.values().max().unwrap() - c.values().min().unwrap() <= 1);
        if target_n_val_holds(q, s + 1, n) {
            prop_assert_eq!(breaches(&after, n), 0);
        }
        if b == 0 && breaches(&after, n) == 0 {
            let replicas: usize = transfers(&before, &after, n).iter().map(|t| t.to.len()).sum();
            prop_assert!(replicas <= n * moved, "{} replicas for {} partitions", replicas, moved);
            let held = replica_counts(&after, n).get(&joiner).copied().unwrap_or(0);
            prop_assert_eq!(held, n * joined);
        }
    }
}

proptest! {
    #![proptest_config(config(5))]

    /// A node with c partitions leaving S+1 nodes moves at most
    /// 2c + 2(N-1) + 2b partitions when at least 2N + 2 nodes stay: its
    /// partitions, plus a chain move where its neighbours must grow.
    #[test]
    fn a_leave_moves_at_most_twice_the_leavers_partitions(
        seeds in proptest::collection::btree_set(any::<u128>(), 3..24),
        qbits in 4u32..11,
        n in 2usize..5,
        which in any::<prop::sample::Index>(),
    ) {
        announce("a_leave_moves_at_most_twice_the_leavers_partitions");
        let members: BTreeSet<NodeId> = seeds.iter().map(|s| NodeId::from_u128(*s)).collect();
        let q = 1u32 << qbits;
        let before = Ring::claim(None, &members, q, n).unwrap();
        let leaver = **which.get(&members.iter().collect::<Vec<_>>());
        let mut rest = members.clone();
        rest.remove(&leaver);
        let after = Ring::claim(Some(&before), &rest, q, n).unwrap();
        let c = counts(&after);
        prop_assert!(c.values().max().unwrap() - c.values().min().unwrap() <= 1);
        if target_n_val_holds(q, rest.len(), n) {
            prop_assert_eq!(breaches(&after, n), 0);
        }
        if rest.len() >= 2 * n + 2 {
            let owned = before.partitions_of(leaver).len();
            let bound = 2 * owned + 2 * (n - 1) + 2 * breaches(&before, n);
            let moved = partitions_moved(&before, &after);
            prop_assert!(moved <= bound, "moved {} > bound {}", moved, bound);
        }
    }
}

proptest! {
    #![proptest_config(config(6))]

    #[test]
    fn same_inputs_same_ring(
        seeds in proptest::collection::vec(any::<u128>(), 1..12),
        zones in 0u128..4,
        qbits in 0u32..9,
    ) {
        announce("same_inputs_same_ring");
        // Member order as given must not matter: every node builds the same ring.
        let a: BTreeSet<NodeId> = seeds.iter().map(|s| NodeId::from_u128(*s)).collect();
        let b: BTreeSet<NodeId> = seeds.iter().rev().map(|s| NodeId::from_u128(*s)).collect();
        let ra = Ring::claim(None, &a, 1 << qbits, 3).unwrap();
        let rb = Ring::claim(None, &b, 1 << qbits, 3).unwrap();
        prop_assert_eq!(&ra, &rb);
        let mut more = a.clone();
        more.insert(NodeId::from_u128(7));
        prop_assert_eq!(
            Ring::claim(Some(&ra), &more, 1 << qbits, 3).unwrap(),
            Ring::claim(Some(&rb), &more, 1 << qbits, 3).unwrap()
        );
        let za = zoned(&seeds, zones);
        let zb = zoned(&seeds.iter().rev().copied().collect::<Vec<_>>(), zones);
        let (fa, fb) = (
            Ring::claim_zoned(None, &za, 1 << qbits, 3).unwrap(),
            Ring::claim_zoned(None, &zb, 1 << qbits, 3).unwrap(),
        );
        prop_assert_eq!(&fa, &fb);
        let mut zmore = za.clone();
        zmore.insert(NodeId::from_u128(7), Some("z0".into()));
        prop_assert_eq!(
            Ring::claim_zoned(Some(&fa), &zmore, 1 << qbits, 3).unwrap(),
            Ring::claim_zoned(Some(&fb), &zmore, 1 << qbits, 3).unwrap()
        );
    }
}
