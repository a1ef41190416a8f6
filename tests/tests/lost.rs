//! Copies lost to corruption, on the simulated cluster: a lost object or
//! hint never passes for "absent" or for a complete copy, and is restored
//! only from every other primary of its key.

use std::time::Duration;

use shoal_client::error::ErrorKind;
use shoal_client::proto::{RequestOptions, Response};
use shoal_node::storage::{Store, Tree, WriteBatch};
use shoal_tests::sim::{value, values, written, SimCluster, D};

/// Removes a hint as if it had never been written.
fn forget_hint(c: &SimCluster, holder: &str, primary: &str, key: &[u8]) {
    let mut hk = c.id(primary).0.to_vec();
    hk.extend_from_slice(key);
    let mut b = WriteBatch::default();
    b.delete(Tree::Hints, &hk);
    c.node(holder).store().write(b).unwrap();
}

/// A read that must not return `stale`: it either fails its quorum or
/// returns `want`.
fn not_stale(what: &str, r: Response, want: &[u8]) {
    match r {
        Response::Value(v) => assert_eq!(
            values(&v),
            vec![want.to_vec()],
            "{what} missed the acknowledged write"
        ),
        Response::Error(e) => assert_eq!(e.kind, ErrorKind::Quorum, "{what}: {}", e.message),
        other => panic!("{what}: {other:?}"),
    }
}

const QUICK: RequestOptions = RequestOptions {
    timeout_ms: Some(300),
    ..D
};

/// v2 is acknowledged by `a` and `b` (W=2); `stale` missed it. `b`'s copy
/// turns corrupt. A read at `stale` that reaches only `b` and `stale`
/// misses its quorum, and its read repair carries `stale`'s v1 to `b`:
/// that must not pass for `b`'s restored copy, or the next read at `b` and
/// `stale` would have a quorum for v1. `b` is restored once it has merged
/// with every other primary.
#[tokio::test(start_paused = true)]
async fn a_lost_copy_is_not_restored_from_a_stale_replica() {
    let c = SimCluster::new(3);
    let p = c.primaries(b"k");
    let (a, b, stale) = (p[0].as_str(), p[1].as_str(), p[2].as_str());
    written(
        c.put(a, b"k", b"v1", None, RequestOptions { w: Some(3), ..D })
            .await,
    );
    let ctx = value(c.get(a, b"k", RequestOptions { r: Some(3), ..D }).await).context;
    c.net.crash(stale);
    written(c.put(a, b"k", b"v2", Some(ctx), D).await);
    tokio::time::sleep(Duration::from_millis(100)).await; // the sends land or fail
    forget_hint(&c, a, stale, b"k");
    c.net.restart(stale);
    c.node(b).store().corrupt(Tree::Objects, b"k");
    c.node(b).drop_cache();
    // `a` is silent to the others.
    c.net.blackhole(stale, a);
    c.net.blackhole(b, a);
    not_stale("the first read", c.get(stale, b"k", QUICK).await, b"v2");
    tokio::time::sleep(Duration::from_secs(2)).await; // read repair
    c.node(b).aae_sweep().await; // cannot restore: `a` is silent
    for attempt in 0..2 {
        let what = format!("read {attempt} at {b} and {stale}");
        not_stale(&what, c.get(stale, b"k", QUICK).await, b"v2");
    }
    // Once `a` answers, `b` restores from every other primary.
    c.net.heal();
    c.node(b).aae_sweep().await;
    c.net.blackhole(stale, a);
    let read = value(c.get(stale, b"k", QUICK).await);
    assert_eq!(values(&read), vec![b"v2".to_vec()]);
}

/// v2 is acknowledged by `a` and by `b`'s fallback, whose hint then turns
/// corrupt. A read standing in for `b` at that fallback must hear "lost",
/// not "absent" (nor ask the next fallback, which never held anything).
/// Once `b` is back, the lost hint makes `b` restore from the others.
#[tokio::test(start_paused = true)]
async fn a_lost_hint_is_not_absent_and_its_primary_restores() {
    let c = SimCluster::new(5);
    let p = c.primaries(b"k");
    let (a, b, stale) = (p[0].as_str(), p[1].as_str(), p[2].as_str());
    let holder = c.fallbacks(b"k")[0].clone();
    written(
        c.put(a, b"k", b"v1", None, RequestOptions { w: Some(3), ..D })
            .await,
    );
    let ctx = value(c.get(a, b"k", RequestOptions { r: Some(3), ..D }).await).context;
    c.net.crash(b);
    c.detect(10).await;
    c.net.blackhole(a, stale);
    written(c.put(a, b"k", b"v2", Some(ctx), QUICK).await);
    tokio::time::sleep(Duration::from_secs(1)).await; // the send to `stale` gives up
    forget_hint(&c, a, stale, b"k");
    c.net.heal();
    c.net.crash(b);
    let mut hk = c.id(b).0.to_vec();
    hk.extend_from_slice(b"k");
    assert!(c.node(&holder).hint(c.id(b), b"k").unwrap().is_some());
    c.node(&holder).store().corrupt(Tree::Hints, &hk);
    // A read at `stale`: `a` silent, `b` down (its fallback answers).
    c.net.blackhole(stale, a);
    for attempt in 0..2 {
        let what = format!("read {attempt} at {stale} and {b}'s fallback");
        not_stale(&what, c.get(stale, b"k", QUICK).await, b"v2");
    }
    // `b` returns; the lost hint tells it its copy misses a write.
    c.net.heal();
    c.detect(10).await;
    c.node(&holder).handoff_round().await;
    assert_eq!(
        c.node(&holder).hint_queues().len(),
        0,
        "the lost hint was handed off"
    );
    c.node(b).aae_sweep().await;
    c.net.blackhole(b, a);
    let read = value(c.get(b, b"k", QUICK).await);
    assert_eq!(values(&read), vec![b"v2".to_vec()]);
}

/// The others reaped the key's tombstone; the reaper's own copy was found
/// corrupt as it reaped (so it is lost). Nothing is left anywhere to
/// restore it from: the marker is cleared (every other primary answered
/// that it holds nothing, and nothing reached the lost copy since), not
/// exchanged forever.
#[tokio::test(start_paused = true)]
async fn a_lost_copy_of_a_reaped_key_is_cleared() {
    let c = SimCluster::new(3);
    let all = RequestOptions {
        w: Some(3),
        r: Some(3),
        ..D
    };
    written(c.put("node1", b"k", b"v", None, all).await);
    let ctx = value(c.get("node1", b"k", all).await).context;
    written(c.delete("node1", b"k", Some(ctx), all).await);
    let p = c.primaries(b"k");
    let victim = p[0].as_str();
    let partition = c.node(victim).partition_of(b"k");
    for other in &p[1..] {
        let mut b = WriteBatch::default();
        b.delete(Tree::Objects, b"k").delete(
            Tree::Aae,
            &shoal_node::antientropy::index_key(partition, b"k"),
        );
        c.node(other).store().write(b).unwrap();
        c.node(other).drop_cache();
    }
    c.node(victim).store().corrupt(Tree::Objects, b"k");
    c.node(victim).drop_cache();
    for n in &c.nodes {
        n.rebuild_trees(u32::MAX).await.unwrap();
    }
    for _ in 0..2 {
        for n in &c.nodes {
            n.aae_sweep().await;
        }
    }
    assert_eq!(
        c.node(victim).store().get(Tree::Objects, b"k").unwrap(),
        None,
        "the lost marker stays"
    );
    for other in &p[1..] {
        assert_eq!(
            c.node(other).tree(partition),
            c.node(victim).tree(partition)
        );
    }
}
