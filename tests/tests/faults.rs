//! Real faults on the simulated cluster, each named in its test: a peer
//! that accepts requests and never answers, records that fail their
//! checksum, and writes past the object limits.

use std::time::Duration;

use shoal_client::error::ErrorKind;
use shoal_client::proto::RequestOptions;
use shoal_node::coordinator::Settings;
use shoal_node::storage::{Store, Tree};
use shoal_tests::sim::{error, settings, value, values, written, SimCluster, D};

/// Bounds a step that must finish on its own: a hang fails the test.
async fn within<T>(limit: Duration, what: &str, step: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(limit, step).await {
        Ok(t) => t,
        Err(_) => panic!("{what} did not finish within {limit:?}"),
    }
}

/// Hints held by `holder` for `primary`.
fn hints_for(c: &SimCluster, holder: &str, primary: &str) -> u64 {
    c.node(holder)
        .hint_queues()
        .into_iter()
        .filter(|q| q.for_node == primary)
        .map(|q| q.pending)
        .sum()
}

#[tokio::test(start_paused = true)]
async fn a_silent_primary_holds_up_only_its_own_handoff() {
    let c = SimCluster::new(3);
    // node1 keeps hints for node2 and node3 (no fallback in a 3-node ring).
    c.net.crash("node2");
    c.net.crash("node3");
    for i in 0..5 {
        let k = format!("k{i}");
        written(
            c.put(
                "node1",
                k.as_bytes(),
                b"v",
                None,
                RequestOptions { w: Some(1), ..D },
            )
            .await,
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await; // the sends fail
    assert_eq!(hints_for(&c, "node1", "node2"), 5);
    assert_eq!(hints_for(&c, "node1", "node3"), 5);
    c.net.restart("node2");
    c.net.restart("node3");
    // node2 accepts node1's requests and never answers (a SIGSTOPped
    // process); the detector has not noticed yet.
    c.net.blackhole("node1", "node2");
    let budget = c.node("node1").settings().handoff.call_timeout;
    let started = tokio::time::Instant::now();
    within(
        budget * 3,
        "a handoff round",
        c.node("node1").handoff_round(),
    )
    .await;
    assert!(started.elapsed() <= budget + Duration::from_millis(100));
    assert_eq!(
        hints_for(&c, "node1", "node3"),
        0,
        "node3's hints delivered"
    );
    assert_eq!(hints_for(&c, "node1", "node2"), 5, "node2's kept");
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_holds_up_only_its_own_exchanges() {
    let c = SimCluster::new(3);
    for n in ["node1", "node2", "node3"] {
        c.node(n).rebuild_trees(u32::MAX).await.unwrap();
    }
    // A write node3 missed, then node2 goes silent for node1.
    c.net.crash("node3");
    written(
        c.put(
            "node1",
            b"k",
            b"v",
            None,
            RequestOptions { w: Some(1), ..D },
        )
        .await,
    );
    tokio::time::sleep(Duration::from_millis(100)).await; // the sends land or fail
    c.net.restart("node3");
    c.node("node1")
        .store()
        .write({
            // Forget the hint: only anti-entropy can repair node3 now.
            let mut b = shoal_node::storage::WriteBatch::default();
            let mut hk = c.id("node3").0.to_vec();
            hk.extend_from_slice(b"k");
            b.delete(Tree::Hints, &hk);
            b
        })
        .unwrap();
    assert!(c.stored("node3", b"k").is_none());
    c.net.blackhole("node1", "node2");
    let budget = c.node("node1").settings().aae.call_timeout;
    within(budget * 3, "a sweep", c.node("node1").aae_sweep()).await;
    assert_eq!(
        c.stored("node3", b"k"),
        c.stored("node1", b"k"),
        "node3 repaired while node2 was silent"
    );
}

#[tokio::test(start_paused = true)]
async fn no_peer_call_outlives_its_deadline() {
    let c = SimCluster::new(3);
    c.net.blackhole("node1", "node2");
    c.net.blackhole("node1", "node3");
    let options = RequestOptions {
        timeout_ms: Some(300),
        ..D
    };
    error(c.put("node1", b"k", b"v", None, options).await);
    // The sends to the silent replicas stop at the request's deadline:
    // nothing of the request is left running on node1.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(c.node("node1").tasks_running(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_corrupt_copy_is_not_counted_and_heals_after_one_read() {
    let c = SimCluster::new(3);
    let good = written(c.put("node1", b"k", b"good", None, D).await);
    drop(good);
    // The send the quorum did not wait for outlives the reply.
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.node("node1").handoff_round().await;
    let victim = c.primaries(b"k")[0].clone();
    c.node(&victim).rebuild_trees(u32::MAX).await.unwrap();
    let healthy = c.stored(&c.primaries(b"k")[1], b"k");
    c.node(&victim).store().corrupt(Tree::Objects, b"k");
    c.node(&victim).drop_cache();
    let via = c.primaries(b"k")[1].clone();
    let read = value(c.get(&via, b"k", D).await);
    assert_eq!(values(&read), vec![b"good".to_vec()]);
    // Read repair gave the victim the others' copy, but only its own
    // restore, from every other primary, ends the loss.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(c.stored(&victim, b"k"), healthy);
    assert!(c.node(&victim).local_read(b"k").is_err(), "still lost");
    c.node(&victim).aae_sweep().await;
    assert_eq!(c.node(&victim).local_read(b"k").unwrap(), healthy);
    let m = c.node(&victim).metrics().render();
    assert!(
        m.contains("shoal_corrupt_records_total{tree=\"objects\"} 1"),
        "{m}"
    );
    // The digest its tree held for the lost bytes is unknown, so marking
    // the copy lost asked the anti-entropy loop for a rebuild; once
    // rebuilt, its tree agrees with the healthy primary's.
    assert!(c.node(&victim).replica().take_rebuild_request());
    let partition = c.node(&victim).partition_of(b"k");
    let other = c.node(&c.primaries(b"k")[1]);
    for n in [c.node(&victim), other] {
        n.rebuild_trees(u32::MAX).await.unwrap();
    }
    let live = c.node(&victim).tree(partition);
    assert!(live.is_some());
    assert_eq!(live, other.tree(partition));
}

/// A copy lost to corruption keeps failing reads until repair restores it:
/// counted as "absent" it would let R+W<=N readers miss an acknowledged
/// write (W=2 on node1 and node2, node1's copy lost, a read that hears
/// node1 and node3).
#[tokio::test(start_paused = true)]
async fn a_lost_copy_never_counts_as_absent() {
    let c = SimCluster::new(3);
    c.net.crash("node3");
    written(c.put("node1", b"k", b"v", None, D).await);
    tokio::time::sleep(Duration::from_millis(100)).await; // the sends land or fail
                                                          // node3 never gets it: forget node1's hint for it.
    let mut hk = c.id("node3").0.to_vec();
    hk.extend_from_slice(b"k");
    let mut b = shoal_node::storage::WriteBatch::default();
    b.delete(Tree::Hints, &hk);
    c.node("node1").store().write(b).unwrap();
    c.net.restart("node3");
    c.node("node1").store().corrupt(Tree::Objects, b"k");
    c.node("node1").drop_cache();
    c.net.blackhole("node1", "node2");
    let quick = RequestOptions {
        timeout_ms: Some(300),
        ..D
    };
    for attempt in 0..2 {
        let e = error(c.get("node1", b"k", quick).await);
        assert_eq!(e.kind, ErrorKind::Quorum, "read {attempt}: {}", e.message);
    }
    c.net.heal();
    let read = value(c.get("node1", b"k", D).await);
    assert_eq!(values(&read), vec![b"v".to_vec()]);
}

/// Forgetting a key's history to corruption must not let the node mint a
/// dot again: v2 was minted as (actor, 2) and lives on node2; node1 lost
/// its copy, then met node3's copy from before v2; a blind put at node1
/// must not be (actor, 2) too, or one of v2 and v3 would vanish in merges.
#[tokio::test(start_paused = true)]
async fn a_write_after_a_lost_copy_mints_a_dot_never_minted() {
    let c = SimCluster::new(3);
    let all = RequestOptions {
        w: Some(3),
        r: Some(3),
        ..D
    };
    written(c.put("node1", b"k", b"v1", None, all).await);
    let stale = c.stored("node3", b"k").expect("node3 has v1");
    let read = value(c.get("node1", b"k", all).await);
    c.net.crash("node3");
    written(c.put("node1", b"k", b"v2", Some(read.context), D).await);
    c.net.restart("node3");
    c.node("node1").store().corrupt(Tree::Objects, b"k");
    c.node("node1").drop_cache();
    // A repair brings node3's stale copy to node1, whose own is lost.
    c.node("node1").local_merge(b"k", &stale).unwrap();
    written(
        c.put(
            "node1",
            b"k",
            b"v3",
            None,
            RequestOptions { w: Some(3), ..D },
        )
        .await,
    );
    c.node("node1").aae_sweep().await; // restored from node2 and node3
    let mut seen = values(&value(c.get("node2", b"k", all).await));
    seen.sort();
    assert_eq!(seen, vec![b"v2".to_vec(), b"v3".to_vec()]);
}

#[tokio::test(start_paused = true)]
async fn a_corrupt_copy_heals_in_one_sweep_and_rebuilds_go_on() {
    let c = SimCluster::new(3);
    for k in [&b"a"[..], b"k", b"z"] {
        written(
            c.put("node1", k, b"v", None, RequestOptions { w: Some(3), ..D })
                .await,
        );
    }
    let victim = "node3";
    c.node(victim).store().corrupt(Tree::Objects, b"k");
    c.node(victim).drop_cache();
    // The rebuild drops the corrupt record instead of failing.
    for n in ["node1", "node2", "node3"] {
        c.node(n).rebuild_trees(u32::MAX).await.unwrap();
    }
    assert!(c.stored(victim, b"k").is_none());
    c.node("node1").aae_sweep().await;
    assert_eq!(c.stored(victim, b"k"), c.stored("node1", b"k"));
    // The victim's own sweep restores it from both others.
    assert!(c.node(victim).local_read(b"k").is_err(), "still lost");
    c.node(victim).aae_sweep().await;
    assert_eq!(
        c.node(victim).local_read(b"k").unwrap(),
        c.stored("node1", b"k")
    );
}

/// A corrupt hint is handed off as lost: its primary marks its copy lost
/// and restores it from the other primaries.
#[tokio::test(start_paused = true)]
async fn a_corrupt_hint_is_handed_off_as_lost_and_the_rest_are_delivered() {
    let c = SimCluster::new(3);
    c.net.crash("node3");
    for k in [&b"a"[..], b"b", b"c"] {
        written(
            c.put("node1", k, b"v", None, RequestOptions { w: Some(1), ..D })
                .await,
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await; // the sends fail
    let mut hk = c.id("node3").0.to_vec();
    hk.extend_from_slice(b"b");
    c.node("node1").store().corrupt(Tree::Hints, &hk);
    // Counting hints on start does not trip over it.
    assert_eq!(c.node("node1").load_hint_counts().unwrap(), 3);
    c.net.restart("node3");
    c.node("node1").handoff_round().await;
    assert_eq!(hints_for(&c, "node1", "node3"), 0);
    assert!(c.stored("node3", b"a").is_some() && c.stored("node3", b"c").is_some());
    let m = c.node("node1").metrics().render();
    assert!(
        m.contains("shoal_corrupt_records_total{tree=\"hints\"} 1"),
        "{m}"
    );
    assert!(
        c.node("node3").local_read(b"b").is_err(),
        "b is lost on node3"
    );
    c.node("node3").aae_sweep().await;
    assert_eq!(
        c.node("node3").local_read(b"b").unwrap(),
        c.stored("node1", b"b")
    );
}

fn limited(max_siblings: usize, max_object_bytes: usize) -> Settings {
    Settings {
        max_siblings,
        max_object_bytes,
        ..settings()
    }
}

#[tokio::test]
async fn blind_puts_past_the_limits_are_refused_and_a_context_resolves_them() {
    let c = SimCluster::with_settings(3, limited(4, 64 << 20));
    for i in 0..4 {
        written(
            c.put("node1", b"k", format!("v{i}").as_bytes(), None, D)
                .await,
        );
    }
    let e = error(c.put("node1", b"k", b"v4", None, D).await);
    assert_eq!(e.kind, ErrorKind::TooLarge);
    assert!(e.message.contains("resolve the siblings"), "{}", e.message);
    assert!(e.message.contains("nothing was written"), "{}", e.message);
    // Other keys are unaffected; the key reads, and a write with its
    // context resolves it.
    written(c.put("node1", b"other", b"x", None, D).await);
    let read = value(
        c.get("node2", b"k", RequestOptions { r: Some(3), ..D })
            .await,
    );
    assert_eq!(read.values.len(), 4);
    written(c.put("node2", b"k", b"merged", Some(read.context), D).await);
    assert_eq!(
        values(&value(c.get("node3", b"k", D).await)),
        vec![b"merged".to_vec()]
    );
}

#[tokio::test]
async fn the_size_limit_refuses_growth_and_admits_a_resolving_write() {
    // Room for two 1 KiB values and their overhead, not three.
    let c = SimCluster::with_settings(3, limited(100, 2_500));
    let big = vec![7u8; 1000];
    written(c.put("node1", b"k", &big, None, D).await);
    written(c.put("node1", b"k", &big, None, D).await);
    let e = error(c.put("node1", b"k", &big, None, D).await);
    assert_eq!(e.kind, ErrorKind::TooLarge);
    let read = value(c.get("node1", b"k", D).await);
    written(c.put("node1", b"k", b"small", Some(read.context), D).await);
}

#[tokio::test(start_paused = true)]
async fn merges_may_exceed_the_limits_and_nothing_is_dropped() {
    let c = SimCluster::with_settings(3, limited(3, 64 << 20));
    // Each side of a partition takes its own three siblings.
    c.net.partition("node1", "node2");
    c.net.partition("node1", "node3");
    let one = RequestOptions { w: Some(1), ..D };
    for i in 0..3 {
        written(
            c.put("node1", b"k", format!("a{i}").as_bytes(), None, one)
                .await,
        );
        written(
            c.put("node2", b"k", format!("b{i}").as_bytes(), None, one)
                .await,
        );
    }
    c.net.heal();
    let read = value(
        c.get("node3", b"k", RequestOptions { r: Some(3), ..D })
            .await,
    );
    assert_eq!(read.values.len(), 6, "every acknowledged write survives");
    // Over the limit, a blind put is refused, a resolving one gets in.
    error(c.put("node1", b"k", b"c", None, D).await);
    written(
        c.put("node1", b"k", b"resolved", Some(read.context), D)
            .await,
    );
    assert_eq!(
        values(&value(
            c.get("node2", b"k", RequestOptions { r: Some(3), ..D })
                .await
        )),
        vec![b"resolved".to_vec()]
    );
}

/// A primary whose disk is full cannot mint a version: it hands the write
/// to another primary instead of failing it, and the write lands on the
/// replicas that can store it. (Found by the chaos suite: every write a
/// client sent to the full node failed with "storage write failed".)
#[tokio::test(start_paused = true)]
async fn a_coordinator_with_a_full_disk_hands_writes_to_another_primary() {
    let c = SimCluster::new(4);
    let key = b"k";
    let primaries = c.primaries(key);
    let full = primaries[0].clone();
    c.node(&full).store().set_full(true);
    let put = c.put(&full, key, b"v", None, D).await;
    let reply = written(put);
    assert_eq!(reply.siblings, 1);
    let del = c.delete(&full, key, Some(reply.context), D).await;
    written(del);
    c.node(&full).store().set_full(false);
    assert!(
        c.stored(&full, key).is_none(),
        "nothing stored on the full disk"
    );
    let others = primaries.iter().filter(|p| **p != full).count();
    let holding = primaries
        .iter()
        .filter(|p| c.stored(p, key).is_some())
        .count();
    assert_eq!(holding, others, "the tombstone is on the other primaries");
}
