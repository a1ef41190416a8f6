//! Issue 10, sequences A and B, with real `shoal` processes over QUIC: an
//! acknowledged write is not lost after its key's tombstone was reaped (the
//! coordinator must not mint a dot it minted in the key's earlier life), and
//! a reaped delete does not come back through a hint that waited on a node
//! that was down.
//!
//! Both run with the smallest tombstone grace the config accepts (71 s with
//! the default timeouts) and the reaper looking every second, so each takes
//! a little over a minute; they run side by side.
//! `cargo test -p shoal-tests --test amnesia -- --nocapture`

use std::time::{Duration, Instant};

use shoal_client::proto::{InspectReport, RequestOptions};
use shoal_client::Client;
use shoal_tests::process::{DevCluster, W2};

/// The smallest `anti-entropy.tombstone-grace-secs` the config accepts.
const GRACE_SECS: i64 = 71;

/// A cluster whose reaper runs every second with the smallest grace.
async fn reaping_cluster(nodes: usize) -> DevCluster {
    let mut c = DevCluster::start(nodes).await;
    c.reconfigure(|config| {
        let mut t = toml::Table::new();
        t.insert(
            "tombstone-grace-secs".into(),
            toml::Value::Integer(GRACE_SECS),
        );
        t.insert("reap-interval-ms".into(), toml::Value::Integer(1000));
        t.insert("interval-ms".into(), toml::Value::Integer(1000));
        config.insert("anti-entropy".into(), toml::Value::Table(t));
    })
    .await;
    c
}

/// Whether no replica of the key holds any record of it.
fn reaped(report: &InspectReport) -> bool {
    report
        .replicas
        .iter()
        .all(|r| r.error.is_none() && r.object.is_none())
}

/// Waits (bounded) until every replica of `key` has reaped it.
async fn wait_reaped(client: &Client, key: &[u8], within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let report = client.inspect(key).await.expect("inspect");
        if reaped(&report) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "not reaped within {within:?}: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn values(read: &shoal_client::proto::GetReply) -> Vec<String> {
    let mut v: Vec<String> = read
        .values
        .iter()
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        .collect();
    v.sort();
    v
}

/// Sequence A: put v1, keep a read's context C, delete, wait for the reaper,
/// put v2 (acknowledged), put v3 with the stale C. v2 was never seen by the
/// writer of v3, so both must be there as siblings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_a_reaped_delete_survives_a_stale_context() {
    let c = reaping_cluster(3).await;
    let client = c.client().await;
    client.put(b"k", b"v1", None).await.expect("put v1");
    let old = client.get(b"k").await.expect("get").context;
    client.delete(b"k", Some(&old)).await.expect("delete");
    let took = wait_reaped(&client, b"k", Duration::from_secs(GRACE_SECS as u64 + 60)).await;
    println!("tombstone reaped on every replica {took:?} after the delete");

    client.put(b"k", b"v2", None).await.expect("put v2");
    client
        .put(b"k", b"v3", Some(&old))
        .await
        .expect("put v3 with the old context");
    let read = client
        .get_with(b"k", RequestOptions { r: Some(3), ..W2 })
        .await
        .expect("get");
    assert_eq!(
        values(&read),
        ["v2", "v3"],
        "v2 was acknowledged and the context of v3 never saw it"
    );
    let report = client.inspect(b"k").await.expect("inspect");
    println!("after v2 and v3: {report:?}");
}

/// Sequence B: with P3 down, put vOLD (P1, P2 and a hint on a fallback F);
/// F dies; P3 returns; delete. The grace passes while F is down: the reaper
/// must not forget the tombstone while a member that may hold an older copy
/// is away. F returns and hands vOLD to P3, where the tombstone covers it;
/// only then is the key reaped, and it stays deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaped_delete_does_not_come_back_through_a_late_hint() {
    let c = reaping_cluster(5).await;
    let client = c.client().await;
    let primaries: Vec<String> = client
        .inspect(b"k")
        .await
        .expect("inspect")
        .replicas
        .into_iter()
        .map(|r| r.node)
        .collect();
    let p3 = primaries[2].clone();
    c.kill9(&p3).await;
    c.wait_seen(&p3, false, Duration::from_secs(20)).await;
    // Learnt from the ring: a write to a silent node is not retried elsewhere.
    client.refresh_ring().await.expect("ring");
    client
        .put_with(b"k", b"vOLD", None, W2)
        .await
        .expect("put vOLD");
    let report = client.inspect(b"k").await.expect("inspect");
    let fallback = report
        .hints
        .iter()
        .find(|h| h.for_node == p3)
        .map(|h| h.holder.clone())
        .unwrap_or_else(|| panic!("a hint for {p3}: {report:?}"));
    println!("primaries {primaries:?}; {fallback} holds the hint for {p3}");
    c.kill9(&fallback).await;
    c.wait_seen(&fallback, false, Duration::from_secs(20)).await;
    // Learnt from the ring: a write to a silent node is not retried elsewhere.
    client.refresh_ring().await.expect("ring");
    c.restart(&p3);
    c.wait_seen(&p3, true, Duration::from_secs(20)).await;
    let ctx = client.get_with(b"k", W2).await.expect("get").context;
    client
        .delete_with(b"k", Some(&ctx), W2)
        .await
        .expect("delete");
    let deleted = Instant::now();

    // The grace passes (and then some) with the hint holder away: nothing
    // may be reaped, every primary keeps the tombstone.
    tokio::time::sleep(Duration::from_secs(GRACE_SECS as u64 + 5)).await;
    let report = client.inspect(b"k").await.expect("inspect");
    assert!(
        report.replicas.iter().all(|r| r
            .object
            .as_ref()
            .is_some_and(|o| o.siblings.iter().all(|s| s.value.is_none()))),
        "the tombstone stays while {fallback} is down: {report:?}"
    );

    c.restart(&fallback);
    c.wait_for("the late hint delivered", Duration::from_secs(30), |all| {
        all.len() == 5 && DevCluster::hints_held(all) == 0
    })
    .await;
    let took = wait_reaped(&client, b"k", Duration::from_secs(60)).await;
    println!(
        "{fallback} back, its hint delivered; reaped {took:?} later ({:?} after the delete)",
        deleted.elapsed()
    );
    // Anti-entropy sweeps every second: give it several.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let read = client
        .get_with(b"k", RequestOptions { r: Some(3), ..W2 })
        .await
        .expect("get");
    assert!(read.values.is_empty(), "k came back: {:?}", values(&read));
    let report = client.inspect(b"k").await.expect("inspect");
    assert!(reaped(&report), "k came back: {report:?}");
}
