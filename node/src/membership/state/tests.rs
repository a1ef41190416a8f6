use super::*;

/// Every step reached for version `v`.
fn all(v: u64) -> Progress {
    Progress {
        acked: v,
        synced: v,
        switched: v,
        pruned: v,
        cleaned: v,
    }
}
use proptest::prelude::*;

const Q: u32 = 64;

use super::test_member as info;

fn founded(members: u8) -> ClusterState {
    let mut s = ClusterState::new(Q, 3);
    for i in 0..members {
        s.announce(info(i), 1);
    }
    let ids = (0..members).map(|i| info(i).id).collect();
    s.adopt(Ring::claim(None, &ids, Q, 3).unwrap());
    s
}

/// One edit a node may make to its copy.
#[derive(Debug, Clone)]
enum Edit {
    Announce(u8, u16),
    Stage(u8, Option<Change>),
    Clear,
    Commit,
    Advance(u8, bool),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (0u8..6, any::<u16>()).prop_map(|(i, port)| Edit::Announce(i, port)),
        (
            0u8..6,
            prop_oneof![
                Just(None),
                Just(Some(Change::Join)),
                Just(Some(Change::Leave)),
                Just(Some(Change::Remove))
            ]
        )
            .prop_map(|(i, c)| Edit::Stage(i, c)),
        Just(Edit::Clear),
        Just(Edit::Commit),
        (0u8..6, any::<bool>()).prop_map(|(i, s)| Edit::Advance(i, s)),
    ]
}

fn apply(s: &mut ClusterState, e: &Edit, now: u64) {
    match e {
        Edit::Announce(i, port) => {
            let mut m = info(*i);
            m.client_addr.set_port(*port);
            s.announce(m, now);
        }
        Edit::Stage(i, c) => {
            s.stage(info(*i).id, *c, now);
        }
        Edit::Clear => {
            s.clear(now);
        }
        Edit::Commit => {
            if let Ok(plan) = s.plan() {
                s.commit(plan.version, None, now).unwrap();
            }
        }
        Edit::Advance(i, synced) => {
            let v = s.version();
            s.advance(
                info(*i).id,
                Progress {
                    acked: v,
                    synced: if *synced { v } else { 0 },
                    switched: if *synced { v } else { 0 },
                    ..Progress::default()
                },
            );
        }
    }
}

/// Three replicas edited independently from one founding state.
fn replicas(edits: &[(usize, Edit)]) -> Vec<ClusterState> {
    let mut copies = vec![founded(3); 3];
    for (t, (who, e)) in edits.iter().enumerate() {
        apply(&mut copies[*who % 3], e, 10 + t as u64);
    }
    copies
}

fn merged(a: &ClusterState, b: &ClusterState) -> ClusterState {
    let mut m = a.clone();
    m.merge(b);
    m
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Merge is commutative, associative and idempotent, so gossip
    /// converges whatever order and repetition exchanges come in.
    #[test]
    fn merge_is_a_semilattice(edits in proptest::collection::vec((0usize..3, edit()), 0..24)) {
        let c = replicas(&edits);
        let (a, b, d) = (&c[0], &c[1], &c[2]);
        prop_assert_eq!(merged(a, b), merged(b, a));
        prop_assert_eq!(merged(&merged(a, b), d), merged(a, &merged(b, d)));
        prop_assert_eq!(merged(a, a), a.clone());
        let ab = merged(a, b);
        prop_assert_eq!(merged(&ab, a), ab.clone());
        // Layouts stay ordered and well formed after any merge.
        prop_assert!(ab.check(Q, 3).is_ok());
    }
}

#[test]
fn a_join_is_planned_then_committed_then_pruned_once_synced() {
    let mut s = founded(3);
    s.announce(info(3), 5);
    s.stage(info(3).id, Some(Change::Join), 5);
    let plan = s.plan().unwrap();
    assert_eq!(plan.version, 2);
    assert_eq!(plan.ring.members().len(), 4);
    assert!(!plan.moves.is_empty());
    assert!(plan.moves.iter().all(|m| m.to.contains(&info(3).id)));
    // A plan for another version is refused: the operator saw another.
    assert!(matches!(
        s.commit(3, None, 6),
        Err(StateError::StalePlan { .. })
    ));
    s.commit(2, None, 6).unwrap();
    assert_eq!(s.layouts.len(), 2);
    assert!(s.staged_changes().is_empty());
    match s.plan() {
        // Each member is named with the step it has not reached.
        Err(StateError::InTransition { waiting, .. }) => {
            assert_eq!(waiting.len(), 4, "{waiting:?}");
            assert!(waiting.iter().all(|w| w.ends_with("(ack)")), "{waiting:?}");
        }
        other => panic!("{other:?}"),
    }
    for i in 0..4 {
        s.advance(info(i).id, all(2));
    }
    assert_eq!(s.layouts.len(), 1, "the old layout goes once all synced");
    assert_eq!(s.version(), 2);
}

#[test]
fn a_removed_member_cannot_come_back() {
    let mut s = founded(4);
    s.stage(info(3).id, Some(Change::Remove), 5);
    s.commit(2, None, 6).unwrap();
    assert!(s.members[&info(3).id].removed);
    // Its stale copy, announcing itself again, changes nothing.
    let mut stale = founded(4);
    stale.announce(
        MemberInfo {
            name: "n3".into(),
            ..info(3)
        },
        100,
    );
    s.merge(&stale);
    assert!(s.members[&info(3).id].removed);
    assert!(!s.announce(info(3), 200));
    for i in 0..3 {
        s.advance(info(i).id, all(2));
    }
    // A join of it staged anyway (a race: a node does not stage its own
    // join once removed) is no change, and blocks no other.
    s.stage(info(3).id, Some(Change::Join), 300);
    assert!(matches!(s.plan(), Err(StateError::NothingStaged)));
    s.announce(info(4), 300);
    s.advance(info(4).id, all(2));
    s.stage(info(4).id, Some(Change::Join), 300);
    assert_eq!(s.plan().unwrap().changes, vec![(info(4).id, Change::Join)]);
}

#[test]
fn too_few_members_are_refused() {
    let mut s = founded(3);
    s.stage(info(2).id, Some(Change::Leave), 5);
    assert!(matches!(
        s.plan(),
        Err(StateError::TooFewMembers { left: 2, n: 3 })
    ));
}

#[test]
fn another_clusters_state_is_refused() {
    let s = ClusterState::new(128, 3);
    assert!(matches!(
        s.check(Q, 3),
        Err(StateError::OtherCluster { .. })
    ));
}

#[test]
fn a_removed_member_leaves_the_next_layout_even_when_its_removal_was_cleared() {
    // `shoal remove` during a change removes at once; a `shoal cluster
    // clear` then un-stages it. The next plan still gives its partitions
    // away (it was kept, for good, with nothing able to stage it again).
    let mut s = founded(4);
    let x = info(2).id;
    s.stage(x, Some(Change::Remove), 5);
    s.remove_now(x, 5);
    s.clear(6);
    let plan = s.plan().expect("a plan that drops the removed member");
    assert!(!plan.ring.members().contains(&x));
    assert_eq!(plan.changes, vec![(x, Change::Remove)]);
    s.commit(plan.version, None, 7).unwrap();
    assert!(!s.current().unwrap().ring.members().contains(&x));
}

#[test]
fn a_change_staged_again_after_its_commit_blocks_no_later_plan() {
    // The operator runs `shoal remove x` again while the claimant commits
    // it, on a member that had not heard of the first staging and whose
    // clock runs ahead: its entry outranks the commit's clear when the
    // copies merge, and the remove of a node no longer in the layout is
    // staged again. It is done already: it must not block the next change
    // (found by the simulation, seed 21767 with --power-loss-percent 100
    // --membership-percent 60: no plan for the rest of the run).
    let mut claimant = founded(5);
    let (x, y) = (info(4).id, info(3).id);
    claimant.stage(x, Some(Change::Remove), 5);
    let mut ahead = founded(5);
    ahead.stage(x, Some(Change::Remove), 400);
    claimant.commit(2, None, 100).unwrap();
    claimant.merge(&ahead);
    for i in 0..4 {
        claimant.advance(info(i).id, all(2));
    }
    assert!(matches!(claimant.plan(), Err(StateError::NothingStaged)));
    // A join staged again for a member already in the layout, the same.
    claimant.stage(info(0).id, Some(Change::Join), 500);
    claimant.stage(y, Some(Change::Remove), 500);
    let plan = claimant.plan().expect("the next change is planned");
    assert_eq!(plan.changes, vec![(y, Change::Remove)]);
    // Its commit leaves the no-op entries alone (see the next test) and
    // they block nothing after it either.
    claimant.commit(plan.version, None, 600).unwrap();
    assert!(claimant.staged_changes().is_empty());
}

#[test]
fn a_commit_drops_no_change_staged_beside_it() {
    // y left; a leave of it staged again on a node whose clock runs ahead
    // lingers (a no-op). An operator then stages y's join again on a node
    // behind the claimant, while the claimant commits another change:
    // the commit must not clear y's entry, or its clearing (stamped by
    // the claimant's clock) would outrank the join and drop it unseen.
    let mut claimant = founded(5);
    let y = info(4).id;
    claimant.stage(y, Some(Change::Leave), 5);
    claimant.commit(2, None, 10).unwrap();
    for i in 0..5 {
        claimant.advance(info(i).id, all(2));
    }
    let mut ahead = claimant.clone();
    ahead.staged.insert(
        y,
        Staged {
            stamp: super::staged::stamp(2, 400),
            change: Some(Change::Leave),
        },
    );
    claimant.merge(&ahead);
    let mut behind = claimant.clone();
    behind.stage(y, Some(Change::Join), 300);
    claimant.stage(info(3).id, Some(Change::Leave), 500);
    claimant.commit(3, None, 500).unwrap();
    claimant.merge(&behind);
    assert!(
        claimant.staged_changes().contains(&(y, Change::Join)),
        "the join staged beside the commit was dropped: {:?}",
        claimant.staged
    );
}

/// `n3` leaves a cluster of four; the change runs to its end, and the
/// layout before it is pruned: `n3` is in no layout and not removed yet
/// (it removes itself once it holds nothing, see `crate::transfer`).
fn after_n3_left() -> ClusterState {
    let mut s = founded(4);
    s.stage(info(3).id, Some(Change::Leave), 5);
    s.commit(2, None, 6).unwrap();
    for i in 0..4 {
        s.advance(info(i).id, all(2));
    }
    assert_eq!(s.layouts.len(), 1);
    s
}

#[test]
fn a_member_that_left_does_not_join_again_when_it_restarts() {
    // Helper-72: a node started with seeds stages its own join when it is
    // in no layout. One that left and restarts before removing itself is
    // in none either: it must go on leaving, not join again.
    let mut s = after_n3_left();
    assert!(!s.stage_own_join(info(3).id, 10));
    assert!(matches!(s.plan(), Err(StateError::NothingStaged)));
    // An operator's `clear` (of nothing staged) changes nothing to that.
    s.clear(11);
    assert!(!s.stage_own_join(info(3).id, 12));
    // A new node does join.
    s.announce(info(4), 13);
    s.advance(info(4).id, all(2));
    assert!(s.stage_own_join(info(4).id, 13));
    assert_eq!(s.plan().unwrap().changes, vec![(info(4).id, Change::Join)]);
}

#[test]
fn a_leave_known_only_from_a_stale_copy_still_marks_the_member_as_gone() {
    // A `clear` made on another node before it heard of the commit
    // reaches the claimant after it: the leave it consumed is not undone
    // by it either.
    let mut s = founded(4);
    s.stage(info(3).id, Some(Change::Leave), 5);
    let mut other = s.clone();
    other.clear(50);
    s.commit(2, None, 60).unwrap();
    s.merge(&other);
    for i in 0..4 {
        s.advance(info(i).id, all(2));
    }
    assert!(!s.stage_own_join(info(3).id, 70));
}

#[test]
fn a_commit_refuses_a_plan_whose_changes_differ_from_the_one_shown() {
    // An operator is shown the plan that lets n4 leave; before the commit,
    // gossip brings a leave of n3 staged elsewhere. The plan is still for
    // version 2, but it is not the one shown: committed, it would take
    // away a member nobody was shown leaving.
    let mut s = founded(5);
    s.stage(info(4).id, Some(Change::Leave), 5);
    let shown = s.plan().unwrap();
    let mut other = s.clone();
    other.stage(info(3).id, Some(Change::Leave), 6);
    s.merge(&other);
    assert!(matches!(
        s.commit(shown.version, Some(shown.id()), 7),
        Err(StateError::ChangedPlan { version: 2, .. })
    ));
    assert_eq!(s.version(), 1);
    let again = s.plan().unwrap();
    assert_eq!(again.version, shown.version);
    assert_ne!(again.id(), shown.id());
    s.commit(again.version, Some(again.id()), 8).unwrap();
    assert_eq!(s.version(), 2);
}

#[test]
fn a_clear_made_before_hearing_of_a_commit_does_not_undo_its_leave_mark() {
    // Helper-74: the operator clears on a node that has not heard of the
    // commit yet (there n3's leave is still a change to make), later than
    // the commit by the wall clock. The clearing was made against the
    // layout before the commit: it must not erase the mark of the leave
    // the commit made, or n3 joins again on its next start.
    let mut s = founded(4);
    s.stage(info(3).id, Some(Change::Leave), 5);
    let mut behind = s.clone();
    s.commit(2, None, 60).unwrap();
    behind.clear(70);
    s.merge(&behind);
    for i in 0..4 {
        s.advance(info(i).id, all(2));
    }
    assert!(!s.stage_own_join(info(3).id, 80));
    // Merged the other way round, the same.
    behind.merge(&s);
    assert_eq!(behind.staged, s.staged);
}

#[test]
fn a_clear_on_a_node_with_no_layout_clears_every_change() {
    // A node that joins through seeds has no layout while the cluster
    // still runs on its static ring: every change it has heard of is
    // cleared, none is taken for a change made already.
    let mut s = ClusterState::new(Q, 3);
    s.stage(info(1).id, Some(Change::Remove), 5);
    s.stage(info(5).id, Some(Change::Join), 5);
    assert!(s.clear(6));
    assert!(
        s.staged.values().all(|e| e.change.is_none()),
        "{:?}",
        s.staged
    );
}

#[test]
fn a_plan_whose_ring_changed_since_it_was_shown_has_another_id() {
    // The changes are the same, but a member announced another zone since
    // the plan was shown: the ring, and what moves, differ.
    let mut s = founded(5);
    s.stage(info(4).id, Some(Change::Leave), 5);
    let shown = s.plan().unwrap();
    let mut moved = info(0);
    moved.zone = Some("b".into());
    s.announce(moved, 6);
    let now = s.plan().unwrap();
    assert_eq!(now.changes, shown.changes);
    assert_ne!(now.ring, shown.ring);
    assert!(matches!(
        s.commit(shown.version, Some(shown.id()), 7),
        Err(StateError::ChangedPlan { .. })
    ));
}

/// A founder's copy while the cluster runs on its static ring: an edit
/// sees the ring adopted as layout 1, which is dropped again when nothing
/// was committed (as `Membership::edit` does).
fn on_static_ring(s: &mut ClusterState, edit: impl FnOnce(&mut ClusterState)) {
    let ids = (0..4).map(|i| info(i).id).collect();
    s.adopt(Ring::claim(None, &ids, Q, 3).unwrap());
    edit(s);
    s.layouts.clear();
}

#[test]
fn a_joiner_whose_join_was_cleared_before_the_first_commit_joins_again_on_restart() {
    // Helper-75: the joiner stages its join with no layout; an operator
    // clears it on a founder (which edits on the static ring). Restarted,
    // the joiner stages its join again, and that must win once gossiped.
    let mut joiner = ClusterState::new(Q, 3);
    joiner.announce(info(5), 1);
    assert!(joiner.stage_own_join(info(5).id, 2));
    let mut founder = ClusterState::new(Q, 3);
    founder.merge(&joiner);
    on_static_ring(&mut founder, |s| {
        s.clear(10);
    });
    joiner.merge(&founder);
    assert!(joiner.stage_own_join(info(5).id, 20));
    founder.merge(&joiner);
    assert_eq!(founder.staged_changes(), vec![(info(5).id, Change::Join)]);
}

#[test]
fn a_clear_on_a_joiner_before_the_first_commit_clears_what_founders_staged() {
    // Helper-75: a leave staged on a founder (on the static ring), cleared
    // later through a joiner (no layout): the clear must win once gossiped.
    let mut founder = ClusterState::new(Q, 3);
    on_static_ring(&mut founder, |s| {
        s.stage(info(3).id, Some(Change::Leave), 10);
    });
    let mut joiner = ClusterState::new(Q, 3);
    joiner.merge(&founder);
    assert!(joiner.clear(20));
    founder.merge(&joiner);
    on_static_ring(&mut founder, |s| {
        assert!(s.staged_changes().is_empty(), "{:?}", s.staged);
    });
}

#[test]
fn a_claimant_removed_before_its_commit_was_heard_keeps_its_version() {
    // The claimant (n0, the lowest id) commits a join, its answer is lost
    // and it dies before anyone heard. The operator removes it and the
    // next member commits. Had that commit reused the version, the dead
    // claimant's layout, brought back when it restarts, would have been
    // merged as the same version: one of the two kept, and progress made
    // under the other counted for it (helper-79).
    let mut s = founded(4);
    s.announce(info(4), 5);
    s.stage(info(4).id, Some(Change::Join), 5);
    let mut dead = s.clone();
    let unheard = dead.commit(2, None, 6).unwrap();
    s.remove_now(info(0).id, 7);
    let plan = s.plan().unwrap();
    assert!(plan.version > unheard.version, "{} again", plan.version);
    s.commit(plan.version, None, 8).unwrap();
    let committed = s.current().unwrap().clone();
    let mut restarted = dead.clone();
    s.merge(&dead);
    restarted.merge(&s);
    for merged in [&s, &restarted] {
        let versions: Vec<u64> = merged.layouts.iter().map(|l| l.version).collect();
        assert_eq!(versions, vec![1, 2, 3]);
        assert_eq!(merged.current(), Some(&committed));
    }
    // Once the history is over, the next claimant commits the next version.
    for i in 1..5 {
        s.advance(info(i).id, all(3));
    }
    s.stage(info(4).id, Some(Change::Leave), 9);
    assert_eq!(s.plan().unwrap().version, 4);
}

#[test]
fn a_layout_only_a_removed_claimant_heard_of_does_not_come_back_after_the_changes_made_since() {
    // The claimant (n0) commits x's join, heard by nobody (x, seeded with
    // n0 alone, is down too), and dies. The operator removes it; the next
    // claimant commits that, the change completes, and another is under
    // way when n0 restarts with its layout (helper-80). Merged back, it
    // would be the oldest of the history: reads would go to its replicas,
    // which never synced it, and x, in no other layout, would hold up
    // every later change.
    let mut s = founded(4);
    let x = info(4);
    let mut dead = s.clone();
    dead.announce(x.clone(), 5);
    dead.stage(x.id, Some(Change::Join), 5);
    dead.commit(2, None, 6).unwrap();
    s.announce(info(5), 7);
    s.remove_now(info(0).id, 7);
    let removal = s.plan().unwrap();
    s.commit(removal.version, None, 8).unwrap();
    for i in [1, 2, 3, 5] {
        s.advance(info(i).id, all(removal.version));
    }
    assert_eq!(s.layouts.len(), 1);
    s.stage(info(5).id, Some(Change::Join), 9);
    let next = s.plan().unwrap();
    s.commit(next.version, None, 10).unwrap();
    let mut restarted = dead.clone();
    s.merge(&dead);
    restarted.merge(&s);
    for merged in [&s, &restarted] {
        let versions: Vec<u64> = merged.layouts.iter().map(|l| l.version).collect();
        assert_eq!(versions, vec![removal.version, next.version]);
    }
}
