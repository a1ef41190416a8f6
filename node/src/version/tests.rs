//! The version module's unit and property tests.

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

/// Sequence A at one replica: the key's history is forgotten (its
/// tombstone reaped), and a context from its earlier life comes back.
#[test]
fn a_context_from_a_forgotten_life_does_not_cover_a_new_write() {
    let actors = Actors::new(node(0), 1);
    let mut o = Object::default();
    let a = actors.for_write(&o, &VersionVector::new()).unwrap();
    o.update(&VersionVector::new(), Some(b"v1".to_vec()), a, 1);
    let old = o.context();
    // Reaped: the replica holds nothing for the key any more.
    let mut o = Object::default();
    let a = actors.for_write(&o, &VersionVector::new()).unwrap();
    o.update(&VersionVector::new(), Some(b"v2".to_vec()), a, 2);
    let a = actors.for_write(&o, &old).unwrap();
    o.update(&old, Some(b"v3".to_vec()), a, 3);
    let mut values: Vec<&[u8]> = o.values().collect();
    values.sort();
    assert_eq!(values, vec![&b"v2"[..], &b"v3"[..]]);
}

/// Found by the simulation: node ids that differ only in their last
/// bytes (as tests make them) gave every node the same actors.
#[test]
fn nodes_whose_ids_share_leading_bytes_mint_under_different_actors() {
    let a = Actors::new(NodeId::from_u128(1), 1);
    let b = Actors::new(NodeId::from_u128(2), 1);
    assert_ne!(a.fresh().unwrap(), b.fresh().unwrap());
}

/// Found by the simulation: after a key was reaped here, a stale
/// context (or a merge) brought this incarnation's old actor back into
/// the key's clock at a lower counter than it had minted; writing under
/// it again reused a dot of the key's earlier life.
#[test]
fn an_actor_of_a_reaped_key_is_never_written_under_again() {
    let actors = Actors::new(node(0), 1);
    let mut o = Object::default();
    let a = actors.for_write(&o, &VersionVector::new()).unwrap();
    o.update(&VersionVector::new(), Some(b"v1".to_vec()), a, 1);
    let stale = o.context();
    let ctx = o.context();
    o.update(&ctx, None, a, 2); // (a, 2) is the delete
    assert!(!actors.retire(&o)); // reaped
                                 // The new life: another node's write with the stale context names a.
    let mut o = Object::default();
    o.update(&stale, Some(b"v2".to_vec()), node(5), 3);
    assert_eq!(o.clock()[&a].counter, 1);
    assert_ne!(actors.for_write(&o, &VersionVector::new()).unwrap(), a);
}

#[test]
fn a_new_incarnation_never_reuses_an_actor() {
    let before = Actors::new(node(0), 1);
    let after = Actors::new(node(0), 2);
    let mut o = Object::default();
    let a = before.for_write(&o, &VersionVector::new()).unwrap();
    o.update(&VersionVector::new(), Some(b"v1".to_vec()), a, 1);
    // A lost WAL tail: the write above is gone here but lives elsewhere.
    let b = after
        .for_write(&Object::default(), &VersionVector::new())
        .unwrap();
    assert_ne!(a, b);
    // Even with the object still there, an old incarnation's actor is
    // not reused (it may have minted more than this copy shows).
    assert_ne!(after.for_write(&o, &VersionVector::new()).unwrap(), a);
    assert!(before.is_current(&a) && !after.is_current(&a));
}

#[test]
fn resumed_actors_go_on_where_the_state_was_taken() {
    let before = Actors::new(node(0), 7);
    let mut kept = Object::default();
    let a = before.for_write(&kept, &VersionVector::new()).unwrap();
    kept.update(&VersionVector::new(), Some(b"v1".to_vec()), a, 1);
    let mut forgotten = Object::default();
    let r = before.for_write(&forgotten, &VersionVector::new()).unwrap();
    forgotten.update(&VersionVector::new(), Some(b"v1".to_vec()), r, 1);
    assert!(!before.retire(&forgotten));
    let state = before.seal();
    assert_eq!((state.incarnation, state.epoch), (7, 2));
    assert_eq!(
        before.for_write(&kept, &VersionVector::new()),
        Err(VersionError::Sealed),
        "nothing is minted after the seal"
    );
    let after = Actors::resume(node(0), state);
    // The key still held goes on under its actor: no new clock entry.
    assert_eq!(after.for_write(&kept, &VersionVector::new()).unwrap(), a);
    assert!(after.is_current(&a));
    // A retired actor stays retired, and a fresh one is new.
    let fresh = after.for_write(&forgotten, &VersionVector::new()).unwrap();
    assert!(fresh != r && fresh != a);
    assert_eq!(Actors::parts(&fresh).2, 3);
}

#[test]
fn a_forged_counter_at_its_maximum_gets_a_fresh_actor_not_a_panic() {
    let actors = Actors::new(node(0), 1);
    let mut o = Object::default();
    let a = actors.for_write(&o, &VersionVector::new()).unwrap();
    o.update(&VersionVector::new(), Some(b"v1".to_vec()), a, 1);
    let mut forged = o.context();
    forged.insert(a, u64::MAX);
    forged.insert(node(9), u64::MAX);
    let b = actors.for_write(&o, &forged).unwrap();
    assert_ne!(a, b, "the context knows more of a than the object");
    let dot = o.update(&forged, Some(b"v2".to_vec()), b, 2).unwrap();
    assert_eq!(dot.counter, 1);
    // A forged entry for the fresh actor itself cannot overflow either.
    let mut worse = VersionVector::new();
    let c = actors.for_write(&o, &worse).unwrap();
    worse.insert(c, u64::MAX);
    assert_eq!(o.update(&worse, None, c, 3), None);
    assert_eq!(o.values().collect::<Vec<_>>(), vec![&b"v2"[..]]);
    // The entries it learned age from the write (contexts are sealed, so
    // they are real events').
    assert_eq!(o.clock()[&node(9)].timestamp_ms, 2);
}

#[test]
fn a_write_stamps_the_entries_of_what_it_supersedes_and_what_it_learns() {
    let mut o = Object::default();
    o.update(&VersionVector::new(), Some(b"old".to_vec()), node(0), 1);
    o.update(&VersionVector::new(), Some(b"kept".to_vec()), node(1), 1);
    o.update(&VersionVector::new(), Some(b"other".to_vec()), node(5), 1);
    let mut ctx = VersionVector::from([(node(0), 1)]);
    ctx.insert(node(2), 4);
    ctx.insert(node(3), 5);
    ctx.insert(node(5), 1);
    o.update(&ctx, None, node(4), 100);
    let at = |o: &Object, n| o.clock()[&node(n)].timestamp_ms;
    assert_eq!(at(&o, 0), 100, "the superseded value's entry");
    assert_eq!(at(&o, 1), 1, "a value the write does not supersede");
    assert_eq!((at(&o, 2), at(&o, 3)), (100, 100), "learned");
    // Superseded, so stamped; an entry the context only matches is not.
    assert_eq!(at(&o, 5), 100);
    let mut p = Object::default();
    p.update(&VersionVector::new(), Some(b"x".to_vec()), node(6), 1);
    p.update(
        &VersionVector::from([(node(7), 2)]),
        Some(b"y".to_vec()),
        node(8),
        50,
    );
    p.update(
        &VersionVector::from([(node(7), 2)]),
        Some(b"z".to_vec()),
        node(8),
        70,
    );
    assert_eq!(
        p.clock()[&node(7)].timestamp_ms,
        50,
        "learned once, not again"
    );
    assert_eq!(p.clock()[&node(6)].timestamp_ms, 1);
}

#[test]
fn entries_learned_from_a_context_age_from_its_clocks_times() {
    let mut o = Object::default();
    o.update(&VersionVector::new(), Some(b"v".to_vec()), node(0), 100);
    let ctx = VersionVector::from([(node(1), 3), (node(2), 4), (node(3), 5)]);
    let stamps = std::collections::BTreeMap::from([(node(1), 40), (node(2), 500)]);
    o.update_from(&ctx, &stamps, None, node(4), 200);
    let at = |o: &Object, n| o.clock()[&node(n)].timestamp_ms;
    assert_eq!(at(&o, 1), 40, "as old as the issuing clock had it");
    assert_eq!(at(&o, 2), 200, "never from after the write");
    assert_eq!(at(&o, 3), 200, "no time: from the write");
}

#[test]
fn a_read_context_names_the_values_held_and_times_the_rest() {
    let mut o = Object::default();
    o.update(&VersionVector::new(), Some(b"gone".to_vec()), node(0), 10);
    o.update(&o.context(), Some(b"held".to_vec()), node(1), 20);
    let entries = o.read_entries();
    assert_eq!(
        entries[&node(0)].at,
        Some(20),
        "superseded by the write at 20"
    );
    assert_eq!(entries[&node(1)].at, None, "names a value held here");
    let ctx = o.context();
    let dot = o.update(&ctx, Some(b"new".to_vec()), node(2), 30).unwrap();
    let reply = o.reply_entries(&ctx, dot);
    assert_eq!(reply[&node(2)].at, None, "the write's own value");
    assert_eq!(reply[&node(1)].at, Some(30), "superseded by the write");
}

#[test]
fn a_reply_context_covers_the_write_and_nothing_it_did_not_see() {
    let actors = Actors::new(node(0), 1);
    let mut o = Object::default();
    let a = actors.for_write(&o, &VersionVector::new()).unwrap();
    o.update(&VersionVector::new(), Some(b"v1".to_vec()), a, 1);
    let seen = o.context();
    // Another client's blind write lands in between, same actor.
    o.update(&VersionVector::new(), Some(b"other".to_vec()), a, 2);
    let dot = o.update(&seen, Some(b"mine".to_vec()), a, 3).unwrap();
    let reply = o.reply_context(&seen, dot);
    let again = o.clone();
    let mut o2 = again;
    o2.update(&reply, Some(b"next".to_vec()), a, 4);
    assert!(
        o2.values().any(|v| v == b"other"),
        "a concurrent write the client never saw survives"
    );
    // Without anything in between, the reply covers the write itself.
    let mut p = Object::default();
    let d1 = p
        .update(&VersionVector::new(), Some(b"x".to_vec()), a, 1)
        .unwrap();
    let reply = p.reply_context(&VersionVector::new(), d1);
    p.update(&reply, Some(b"y".to_vec()), a, 2);
    assert_eq!(p.values().collect::<Vec<_>>(), vec![&b"y"[..]]);
}

#[test]
fn prune_keeps_entries_siblings_refer_to() {
    let mut a = Object::default();
    for i in 0..10 {
        let ctx = a.context();
        a.update(&ctx, Some(vec![i]), node(i), u64::from(i));
    }
    a.prune(3, 0, 100, |_| false);
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
                let dot = h.replicas[*at as usize]
                    .update(&ctx, value, node(*at), i as u64)
                    .expect("counter");
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

/// The join of two DVV sets as [`Object::merge`] first computed it.
fn joined_by_contexts(a: &Object, b: &Object) -> Object {
    let (mine, theirs) = (a.context(), b.context());
    let mut siblings: Vec<Sibling> = (a.siblings().iter())
        .filter(|s| !covers(&theirs, &s.dot) || b.siblings().iter().any(|o| o.dot == s.dot))
        .cloned()
        .collect();
    for s in b.siblings() {
        if !covers(&mine, &s.dot) && !siblings.iter().any(|k| k.dot == s.dot) {
            siblings.push(s.clone());
        }
    }
    siblings.sort_by_key(|s| s.dot);
    let mut clock = a.clock.clone();
    for (n, e) in &b.clock {
        let mine = clock.entry(*n).or_insert(*e);
        mine.counter = mine.counter.max(e.counter);
        mine.timestamp_ms = mine.timestamp_ms.max(e.timestamp_ms);
    }
    Object { clock, siblings }
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

    /// The in-place merge is the join as first written (both contexts
    /// built, the kept siblings copied): the same object for any two
    /// states of any history.
    #[test]
    fn merge_in_place_is_the_join_by_contexts(
        ops in proptest::collection::vec(op(), 1..40),
        picks in proptest::collection::vec(any::<proptest::sample::Index>(), 2),
    ) {
        let h = run(&ops);
        let a = picks[0].get(&h.states);
        let b = picks[1].get(&h.states);
        prop_assert_eq!(Object::merged(a, b), joined_by_contexts(a, b));
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
