//! Issue 4 over the simulated network: Merkle-tree exchanges repair exactly
//! the keys that differ, cheaply, with nobody reading.

use shoal_client::proto::{ClusterCommand, Request, RequestOptions, Response};
use shoal_node::antientropy::index_key;
use shoal_node::membership::state::{Change, Progress};
use shoal_node::reaper::Slice;
use shoal_node::storage::Tree;
use shoal_node::version::{encode_object, Object, VersionVector};
use shoal_tests::sim::{value, values, SimCluster, D};

/// Writes `count` keys straight into every node's store (as if replicated
/// long ago) and builds every node's trees.
async fn loaded(nodes: usize, count: usize) -> (SimCluster, Vec<Vec<u8>>) {
    let c = SimCluster::new(nodes);
    let keys: Vec<Vec<u8>> = (0..count)
        .map(|i| format!("key-{i:06}").into_bytes())
        .collect();
    for k in &keys {
        let mut o = Object::default();
        o.update(
            &VersionVector::new(),
            Some(vec![b'x'; 100]),
            c.id("node1"),
            1,
        );
        for n in &c.nodes {
            n.local_merge(k, &o).unwrap();
        }
    }
    for n in &c.nodes {
        n.rebuild_trees(u32::MAX).await.unwrap();
    }
    (c, keys)
}

/// Loses a key's object and index entry, as a lost disk would.
fn lose(c: &SimCluster, node: &str, key: &[u8]) {
    let n = c.node(node);
    n.store().forget(Tree::Objects, key);
    n.store()
        .forget(Tree::Aae, &index_key(n.partition_of(key), key));
    n.drop_cache();
}

/// Acceptance 2 in process: 1% of 100,000 keys differ between two replicas
/// (half missing, half stale); one sweep repairs exactly those keys, and the
/// bytes exchanged are a small fraction of the data.
#[tokio::test]
async fn an_exchange_repairs_exactly_the_differing_keys() {
    let (c, keys) = loaded(2, 100_000).await;
    let data: u64 = keys
        .iter()
        .map(|k| (k.len() + encode_object(&c.stored("node1", k).unwrap()).len()) as u64)
        .sum();
    let differing: Vec<&Vec<u8>> = keys.iter().step_by(100).collect();
    for (i, k) in differing.iter().enumerate() {
        if i % 2 == 0 {
            lose(&c, "node2", k);
        } else {
            let mut newer = c.stored("node1", k).unwrap();
            newer.update(&newer.context(), Some(b"newer".to_vec()), c.id("node1"), 2);
            c.node("node1").local_merge(k, &newer).unwrap();
        }
    }
    c.node("node2").rebuild_trees(u32::MAX).await.unwrap();
    let mut report = shoal_node::antientropy::ExchangeReport::default();
    for n in &c.nodes {
        report += n.aae_sweep().await;
    }
    assert_eq!(report.keys_repaired, differing.len() as u64);
    for k in &keys {
        assert_eq!(c.stored("node1", k), c.stored("node2", k));
    }
    println!(
        "repaired {} keys of {} in {} segments; exchanged {} bytes for {} bytes of data ({:.2}%)",
        report.keys_repaired,
        keys.len(),
        report.segments,
        report.bytes,
        data,
        100.0 * report.bytes as f64 / data as f64
    );
    assert!(
        report.bytes * 10 < data,
        "exchange sent {} of {data} bytes",
        report.bytes
    );
    // A second sweep finds nothing to do and costs one round trip per partition.
    let mut again = 0;
    for n in &c.nodes {
        let r = n.aae_sweep().await;
        assert_eq!(r.keys_repaired, 0);
        again += r.bytes;
    }
    println!("an in-sync sweep exchanged {again} bytes");
}

/// Acceptance 1 in process: a replica that lost every key gets them all back
/// from anti-entropy alone.
#[tokio::test]
async fn a_wiped_replica_is_restored_with_no_reads() {
    let (c, keys) = loaded(3, 5_000).await;
    for k in &keys {
        lose(&c, "node3", k);
    }
    c.node("node3").rebuild_trees(u32::MAX).await.unwrap();
    for n in &c.nodes {
        n.aae_sweep().await;
    }
    for k in &keys {
        assert!(c.stored("node3", k).is_some(), "{k:?} not restored");
        assert_eq!(c.stored("node3", k), c.stored("node1", k));
    }
    let status = c.node("node1").aae_status();
    assert!(status.trees_ready && status.keys_repaired > 0, "{status:?}");
    assert!(c
        .node("node1")
        .metrics()
        .render()
        .contains("shoal_aae_exchanges_total"));
}

/// Sibling-producing divergence is merged, not overwritten: concurrent
/// versions on two replicas become siblings on both.
#[tokio::test]
async fn an_exchange_merges_concurrent_versions() {
    let (c, keys) = loaded(3, 10).await;
    let k = &keys[0];
    for (node, v) in [("node1", b"a"), ("node2", b"b")] {
        let mut o = c.stored(node, k).unwrap();
        o.update(&o.context(), Some(v.to_vec()), c.id(node), 3);
        c.node(node).local_merge(k, &o).unwrap();
    }
    for n in &c.nodes {
        n.aae_sweep().await;
    }
    let read = value(c.get("node3", k, RequestOptions { r: Some(1), ..D }).await);
    assert_eq!(values(&read), vec![b"a".to_vec(), b"b".to_vec()]);
}

/// Acceptance 3: a key deleted while one replica was down stays deleted
/// after that replica returns and after the tombstone is reaped; neither
/// anti-entropy nor a read brings it back.
#[tokio::test(start_paused = true)]
async fn a_key_deleted_while_a_replica_was_down_stays_deleted_after_reaping() {
    let mut s = shoal_tests::sim::settings();
    s.aae.tombstone_grace = std::time::Duration::ZERO;
    let c = SimCluster::with_settings(3, s);
    for n in &c.nodes {
        n.rebuild_trees(u32::MAX).await.unwrap();
    }
    shoal_tests::sim::written(c.put("node1", b"k", b"v", None, D).await);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    c.net.crash("node3");
    let ctx = value(c.get("node1", b"k", D).await).context;
    shoal_tests::sim::written(c.delete("node1", b"k", Some(ctx), D).await);
    // The send to node3 (the replica the quorum did not wait for) fails
    // after the reply and leaves a hint; only then does node3 return.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    c.net.restart("node3");
    // node3 still holds the value; the reaper refuses while it does.
    assert!(c.stored("node3", b"k").unwrap().values().next().is_some());
    let reaped: u64 = reap_all(&c).await;
    assert_eq!(reaped, 0, "reaped while a primary lacked the tombstone");
    // Anti-entropy gives node3 the tombstone; then the key is reaped everywhere.
    for n in &c.nodes {
        n.aae_sweep().await;
    }
    assert!(c.stored("node3", b"k").unwrap().is_deleted());
    // The coordinator kept a hint for node3 (a cluster of N has no
    // fallback): nothing is reaped while a hint for the key waits anywhere.
    assert_eq!(reap_all(&c).await, 0, "reaped while a hint waited");
    assert_eq!(c.hand_off(5).await, 0);
    assert_eq!(reap_all(&c).await, 1);
    for n in ["node1", "node2", "node3"] {
        assert_eq!(c.stored(n, b"k"), None, "{n} still holds the key");
    }
    // Nothing brings it back: exchanges, a read, a rebuild.
    for n in &c.nodes {
        n.rebuild_trees(u32::MAX).await.unwrap();
        n.aae_sweep().await;
    }
    let read = value(
        c.get("node2", b"k", RequestOptions { r: Some(3), ..D })
            .await,
    );
    assert!(read.values.is_empty());
    for n in ["node1", "node2", "node3"] {
        assert_eq!(c.stored(n, b"k"), None, "{n} resurrected the key");
    }
}

/// A layout change one member has committed and the others have not heard
/// of yet (explore seed 6866): that member is a new primary of the key and
/// may hold a copy from before the delete, which the others' view does not
/// count. Nothing is reaped until every member is on the reaper's layout
/// with no change in progress; before, the old primaries reaped, and the
/// copy came back once the change went on.
#[tokio::test(start_paused = true)]
async fn nothing_is_reaped_while_a_member_knows_a_layout_change_the_reaper_does_not() {
    let mut s = shoal_tests::sim::settings();
    s.aae.tombstone_grace = std::time::Duration::ZERO;
    let c = SimCluster::with_settings(4, s);
    // A key node1 (the claimant, which commits) does not replicate yet.
    let k = (0..)
        .map(|i| format!("key-{i}").into_bytes())
        .find(|k| c.non_replica(k) == "node1")
        .unwrap();
    let primaries = c.primaries(&k);
    let first = primaries[0].clone();
    shoal_tests::sim::written(c.put(&first, &k, b"old", None, D).await);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    // node1 commits a leave that makes it a primary of the key; no gossip
    // runs here, so the others stay on the static ring. A write node1
    // coordinated under its new layout left it a copy.
    let leaving = primaries[1].clone();
    at_node1(&c, ClusterCommand::Leave { node: leaving }).await;
    let plan = at_node1(&c, ClusterCommand::Plan)
        .await
        .plan
        .expect("a plan");
    at_node1(
        &c,
        ClusterCommand::Commit {
            version: plan.version,
            plan: Some(plan.id),
        },
    )
    .await;
    let view = c.node("node1").membership().view().unwrap();
    assert!(
        view.in_transition()
            && view
                .preference_list(&k, 3)
                .iter()
                .any(|m| m.name == "node1")
    );
    c.node("node1")
        .local_merge(&k, &c.stored(&first, &k).unwrap())
        .unwrap();
    // The key is deleted on the static ring's primaries.
    let ctx = value(c.get(&first, &k, D).await).context;
    shoal_tests::sim::written(c.delete(&first, &k, Some(ctx), D).await);
    // The send the quorum did not wait for lands too.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    for p in &primaries {
        assert!(c.stored(p, &k).unwrap().is_deleted(), "{p}");
    }
    assert_eq!(
        reap_all(&c).await,
        0,
        "reaped while node1 held a copy under a layout the reaper did not know"
    );
    assert!(c.stored(&first, &k).unwrap().is_deleted());
}

/// A node that left takes part until its hints are delivered (it removes
/// itself only then), though no layout names it any more: nothing is
/// reaped while it is away, for a hint it holds may be older than the
/// tombstone and be handed off after the reap (review of the above).
#[tokio::test]
async fn nothing_is_reaped_while_a_node_that_left_holding_hints_is_away() {
    let mut s = shoal_tests::sim::settings();
    s.aae.tombstone_grace = std::time::Duration::ZERO;
    let c = SimCluster::with_settings(4, s);
    // node4 leaves, and the change completes everywhere (every step
    // reached, as the transfer loops report them); node4 has not removed
    // itself yet.
    at_node1(
        &c,
        ClusterCommand::Leave {
            node: "node4".into(),
        },
    )
    .await;
    let plan = at_node1(&c, ClusterCommand::Plan)
        .await
        .plan
        .expect("a plan");
    let (v, plan) = (plan.version, Some(plan.id));
    at_node1(&c, ClusterCommand::Commit { version: v, plan }).await;
    let done = Progress {
        acked: v,
        synced: v,
        switched: v,
        pruned: v,
        cleaned: v,
    };
    // node4, restarted with seeds in its config, stages its join again
    // (review): still a node that may hold hints.
    let node4 = c.id("node4");
    let state = c.node("node1").membership().edit(|st| {
        for id in st.participants() {
            st.advance(id, done);
        }
        st.stage(node4, Some(Change::Join), 1);
        st.clone()
    });
    for n in &c.nodes {
        n.membership().merge_cluster(&state).unwrap();
        assert_eq!(n.membership().settled(), Some(v), "{}", n.me().name);
    }
    let k = b"k";
    shoal_tests::sim::written(c.put("node1", k, b"old", None, D).await);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    // node4 keeps a hint of the old value for node2 (its delivery failed),
    // and goes away.
    let old = c.stored("node1", k).unwrap();
    c.node("node4").store_hint(c.id("node2"), k, &old).unwrap();
    c.net.crash("node4");
    let ctx = value(c.get("node1", k, D).await).context;
    shoal_tests::sim::written(c.delete("node1", k, Some(ctx), D).await);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(
        reap_all(&c).await,
        0,
        "reaped while node4, which left holding a hint for the key, was away"
    );
    // Back, node4 hands the hint off (merged into the tombstone); then the
    // key is reaped and stays deleted.
    c.net.restart("node4");
    c.detect(3).await;
    assert_eq!(c.hand_off(5).await, 0);
    assert_eq!(reap_all(&c).await, 1);
    for n in ["node1", "node2", "node3"] {
        assert_eq!(c.stored(n, k), None, "{n} still holds the key");
    }
}

/// Runs an operator's membership command at node1 (the claimant).
async fn at_node1(c: &SimCluster, command: ClusterCommand) -> shoal_client::proto::ClusterReply {
    match c
        .node("node1")
        .coordinate(Request::Cluster(command), false)
        .await
    {
        Response::Cluster(reply) => reply,
        other => panic!("{other:?}"),
    }
}

/// `count` keys written straight into node1's store alone.
fn stored_on_node1(c: &SimCluster, count: usize) {
    for i in 0..count {
        let mut o = Object::default();
        o.update(&VersionVector::new(), Some(b"v".to_vec()), c.id("node1"), 1);
        c.node("node1")
            .local_merge(format!("key-{i}").as_bytes(), &o)
            .unwrap();
    }
}

async fn reap_all(c: &SimCluster) -> u64 {
    let mut reaped = 0;
    for n in &c.nodes {
        reaped += n.reap_tombstones().await;
    }
    reaped
}

/// `max-repairs-per-sec` is shared by the peers a sweep exchanges with,
/// not by every peer: with node3 down, node1's exchanges with node2 repair
/// at the whole rate (200 keys at 100 a second: 2 s, not the 4 s of a rate
/// halved for a peer nobody exchanges with).
#[tokio::test(start_paused = true)]
async fn the_repair_rate_is_shared_only_by_peers_being_swept() {
    let mut s = shoal_tests::sim::settings();
    s.aae.max_repairs_per_sec = 100;
    let c = SimCluster::with_settings(3, s);
    stored_on_node1(&c, 200);
    for n in &c.nodes {
        n.rebuild_trees(u32::MAX).await.unwrap();
    }
    c.net.crash("node3");
    c.detect(10).await;
    assert!(!c.node("node1").is_up(c.id("node3")));
    let started = tokio::time::Instant::now();
    let report = c.node("node1").aae_sweep().await;
    let took = started.elapsed();
    assert_eq!(report.keys_repaired, 200);
    assert!(
        took < std::time::Duration::from_secs(3),
        "200 repairs at 100 a second took {took:?}"
    );
}

/// A reaper pass reads every key of the store at `reap-keys-per-sec`, not
/// at the rebuild's rate: 2,000 keys at 1,000 a second take 2 s (pages of
/// 256, each paced), with the rebuild's rate at a million.
#[tokio::test(start_paused = true)]
async fn a_reaper_pass_reads_at_the_reapers_own_rate() {
    let mut s = shoal_tests::sim::settings();
    s.aae.rebuild_keys_per_sec = 1_000_000;
    s.aae.reap_keys_per_sec = 1_000;
    let c = SimCluster::with_settings(3, s);
    stored_on_node1(&c, 2_000);
    let started = tokio::time::Instant::now();
    assert_eq!(c.node("node1").reap_tombstones().await, 0);
    let took = started.elapsed();
    assert!(
        (std::time::Duration::from_millis(1_750)..std::time::Duration::from_secs(3))
            .contains(&took),
        "a pass over 2,000 keys at 1,000 a second took {took:?}"
    );
    // The anti-entropy loop reaps in slices between sweeps: a slice ends
    // at its deadline, and the next goes on where it stopped.
    let reaper = c.node("node1").reaper();
    let started = tokio::time::Instant::now();
    let slice_end = started + std::time::Duration::from_millis(500);
    assert_eq!(reaper.reap_until(Some(slice_end)).await, (0, Slice::Paused));
    assert!(started.elapsed() < std::time::Duration::from_millis(800));
    assert!(reaper.unfinished.lock().unwrap().is_some());
    assert_eq!(reaper.reap_until(None).await, (0, Slice::Over));
    let took = started.elapsed();
    assert!(
        (std::time::Duration::from_millis(1_750)..std::time::Duration::from_secs(3))
            .contains(&took),
        "a pass in two slices took {took:?}"
    );
    assert!(reaper.unfinished.lock().unwrap().is_none());
}

/// A slice that finds a member down keeps its place, and the next slice
/// goes on from there once all are up. Before, the pass ended there and
/// the next began from the first key a whole reap interval later, so with
/// passes of an hour, brief absences could keep the end of the key space
/// from ever being reaped.
#[tokio::test(start_paused = true)]
async fn a_reaper_slice_that_finds_a_member_down_keeps_its_place() {
    let mut s = shoal_tests::sim::settings();
    s.aae.reap_keys_per_sec = 1_000;
    let c = SimCluster::with_settings(3, s);
    stored_on_node1(&c, 2_000);
    c.detect(10).await;
    let reaper = c.node("node1").reaper();
    let slice_end = tokio::time::Instant::now() + std::time::Duration::from_millis(500);
    assert_eq!(reaper.reap_until(Some(slice_end)).await, (0, Slice::Paused));
    let place = reaper.unfinished.lock().unwrap().clone();
    assert!(place.is_some());
    c.net.crash("node2");
    c.detect(10).await;
    assert!(!c.node("node1").is_up(c.id("node2")));
    assert_eq!(reaper.reap_until(None).await, (0, Slice::Blocked));
    assert_eq!(*reaper.unfinished.lock().unwrap(), place);
    c.net.restart("node2");
    c.detect(10).await;
    assert!(c.node("node1").is_up(c.id("node2")));
    let started = tokio::time::Instant::now();
    assert_eq!(reaper.reap_until(None).await, (0, Slice::Over));
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_millis(1_750),
        "the rest of the pass took {took:?}: it began again"
    );
}

/// The anti-entropy loop spreads a sweep's exchanges with each peer over
/// the first half of the interval instead of making them in one burst (at
/// once, a sweep took the bench machine's idle cores for a moment every
/// 10 s): with a 10 s interval, node1's exchanges of the 64 partitions start
/// over about 5 s.
#[tokio::test(start_paused = true)]
async fn the_loop_spreads_a_sweep_over_half_the_interval() {
    let mut s = shoal_tests::sim::settings();
    s.clock = shoal_node::clock::Clock::tokio(0, tokio::time::Instant::now());
    let c = SimCluster::with_settings(3, s);
    for n in &c.nodes {
        n.rebuild_trees(u32::MAX).await.unwrap();
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let node = c.node("node1").clone();
    let aae = tokio::spawn(async move { node.run_anti_entropy(stopped).await });
    // The first sweep starts one interval after the loop; the second
    // would start at 20 s.
    tokio::time::sleep(std::time::Duration::from_secs(18)).await;
    stop.send(true).unwrap();
    aae.await.unwrap();
    let at: Vec<u64> = c
        .node("node1")
        .aae_status()
        .partitions
        .iter()
        .map(|p| p.at_ms)
        .collect();
    assert_eq!(at.len(), 64, "node1 replicates every partition");
    let (first, last) = (*at.iter().min().unwrap(), *at.iter().max().unwrap());
    assert!(
        (10_000..10_100).contains(&first) && (14_500..15_000).contains(&last),
        "exchanges from {first} ms to {last} ms"
    );
}
