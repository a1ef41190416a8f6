//! The coordinator over the simulated network: quorums, siblings, forwarding,
//! limits and faults, each fault named in its test.

use std::time::Duration;

use shoal_client::error::ErrorKind;
use shoal_client::proto::RequestOptions;
use shoal_client::CausalContext;
use shoal_tests::sim::{error, value, values, written, SimCluster, D};

/// Waits (bounded) until every primary of `key` stores the same object.
async fn converged(c: &SimCluster, key: &[u8]) -> bool {
    for _ in 0..100 {
        let objects: Vec<_> = c.primaries(key).iter().map(|n| c.stored(n, key)).collect();
        if objects.iter().all(|o| o.is_some() && *o == objects[0]) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn put_then_get_on_every_node() {
    let c = SimCluster::new(3);
    written(c.put("node1", b"k", b"v", None, D).await);
    for n in ["node1", "node2", "node3"] {
        assert_eq!(values(&value(c.get(n, b"k", D).await)), vec![b"v".to_vec()]);
    }
    assert!(converged(&c, b"k").await);
}

#[tokio::test]
async fn concurrent_puts_become_siblings_and_a_context_resolves_them() {
    let c = SimCluster::new(3);
    written(c.put("node1", b"k", b"a", None, D).await);
    written(c.put("node2", b"k", b"b", None, D).await);
    let read = value(
        c.get("node3", b"k", RequestOptions { r: Some(3), ..D })
            .await,
    );
    assert_eq!(values(&read), vec![b"a".to_vec(), b"b".to_vec()]);
    let w = written(c.put("node3", b"k", b"c", Some(read.context), D).await);
    assert_eq!(w.siblings, 1);
    assert_eq!(
        values(&value(
            c.get("node1", b"k", RequestOptions { r: Some(3), ..D })
                .await
        )),
        vec![b"c".to_vec()]
    );
    assert!(
        converged(&c, b"k").await,
        "all three replicas end with the same clock"
    );
}

#[tokio::test]
async fn retried_puts_with_the_same_context_do_not_grow_siblings_without_bound() {
    let c = SimCluster::new(3);
    written(c.put("node1", b"k", b"v0", None, D).await);
    for i in 0..20 {
        let read = value(
            c.get("node1", b"k", RequestOptions { r: Some(3), ..D })
                .await,
        );
        written(
            c.put(
                "node1",
                b"k",
                format!("v{i}").as_bytes(),
                Some(read.context),
                D,
            )
            .await,
        );
    }
    assert!(converged(&c, b"k").await);
    let stored = c.stored("node1", b"k").unwrap();
    assert_eq!(stored.siblings().len(), 1);
    assert!(
        stored.clock().len() <= 3,
        "one clock entry per coordinating node, not per write"
    );
}

#[tokio::test]
async fn delete_is_a_tombstone_that_reads_as_absent() {
    let c = SimCluster::new(3);
    written(c.put("node1", b"k", b"v", None, D).await);
    let read = value(c.get("node1", b"k", D).await);
    written(c.delete("node2", b"k", Some(read.context), D).await);
    let after = value(
        c.get("node3", b"k", RequestOptions { r: Some(3), ..D })
            .await,
    );
    assert!(after.values.is_empty());
    assert!(
        !after.context.is_empty(),
        "the tombstone's context is still handed out"
    );
}

#[tokio::test]
async fn a_partitioned_replica_does_not_block_quorum() {
    let c = SimCluster::new(3);
    c.net.partition("node1", "node2");
    written(c.put("node1", b"k", b"v", None, D).await);
    assert_eq!(
        values(&value(c.get("node1", b"k", D).await)),
        vec![b"v".to_vec()]
    );
    assert!(
        c.stored("node2", b"k").is_none(),
        "node2 was cut off from the coordinator"
    );
}

#[tokio::test]
async fn two_crashed_replicas_fail_the_quorum_naming_who_answered() {
    let c = SimCluster::new(3);
    written(c.put("node1", b"before", b"v", None, D).await);
    c.net.crash("node2");
    c.net.crash("node3");
    let e = error(c.put("node1", b"k", b"v", None, D).await);
    assert_eq!(e.kind, ErrorKind::Quorum);
    assert_eq!(e.answered, vec!["node1".to_string()]);
    assert_eq!(e.needed, 2);
    assert!(
        e.message.contains("node2") && e.message.contains("node3"),
        "{}",
        e.message
    );
    let e = error(c.get("node1", b"before", D).await);
    assert_eq!(
        (e.kind, e.answered),
        (ErrorKind::Quorum, vec!["node1".to_string()])
    );
    // R=1 still reads what the live replica has.
    assert_eq!(
        values(&value(
            c.get("node1", b"before", RequestOptions { r: Some(1), ..D })
                .await
        )),
        vec![b"v".to_vec()]
    );
    c.net.restart("node2");
    c.net.restart("node3");
    assert_eq!(
        values(&value(
            c.get("node1", b"before", RequestOptions { r: Some(3), ..D })
                .await
        )),
        vec![b"v".to_vec()]
    );
}

#[tokio::test(start_paused = true)]
async fn a_blackholed_replica_costs_the_request_timeout_then_a_quorum_error() {
    let c = SimCluster::new(3);
    c.net.blackhole("node1", "node2");
    c.net.blackhole("node1", "node3");
    let started = tokio::time::Instant::now();
    let e = error(
        c.put(
            "node1",
            b"k",
            b"v",
            None,
            RequestOptions {
                timeout_ms: Some(300),
                ..D
            },
        )
        .await,
    );
    assert_eq!(e.kind, ErrorKind::Quorum);
    assert!(e.message.contains("deadline"), "{}", e.message);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(400),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_replica_does_not_delay_the_reply_and_still_gets_the_write() {
    let c = SimCluster::new(3);
    c.net.delay("node1", "node3", Duration::from_secs(1));
    let started = tokio::time::Instant::now();
    written(c.put("node1", b"k", b"v", None, D).await);
    assert!(started.elapsed() < Duration::from_millis(100));
    assert!(c.stored("node3", b"k").is_none());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        c.stored("node3", b"k").is_some(),
        "the background send landed"
    );
}

#[tokio::test]
async fn a_non_replica_forwards_to_a_replica() {
    let c = SimCluster::new(5);
    let outsider = c.non_replica(b"k");
    let w = written(c.put(&outsider, b"k", b"v", None, D).await);
    assert_eq!(w.siblings, 1);
    assert!(
        c.stored(&outsider, b"k").is_none(),
        "the outsider stores nothing"
    );
    assert_eq!(
        values(&value(c.get(&outsider, b"k", D).await)),
        vec![b"v".to_vec()]
    );
    // With every replica down, the outsider says so instead of hanging.
    for p in c.primaries(b"k") {
        c.net.crash(&p);
    }
    let e = error(c.get(&outsider, b"k", D).await);
    assert_eq!(e.kind, ErrorKind::Quorum);
}

#[tokio::test]
async fn bad_requests_are_refused_before_anything_is_written() {
    let c = SimCluster::new(3);
    let e = error(c.put("node1", b"big", &vec![0u8; 1025], None, D).await);
    assert_eq!(e.kind, ErrorKind::TooLarge);
    for n in ["node1", "node2", "node3"] {
        assert!(c.stored(n, b"big").is_none());
    }
    let e = error(
        c.put(
            "node1",
            b"k",
            b"v",
            Some(CausalContext(b"\xffnot a context".to_vec())),
            D,
        )
        .await,
    );
    assert_eq!(e.kind, ErrorKind::BadRequest);
    let e = error(
        c.put(
            "node1",
            b"k",
            b"v",
            None,
            RequestOptions { w: Some(4), ..D },
        )
        .await,
    );
    assert_eq!(e.kind, ErrorKind::BadRequest);
    let e = error(
        c.put(
            "node1",
            b"k",
            b"v",
            None,
            RequestOptions {
                w: Some(1),
                pw: Some(2),
                ..D
            },
        )
        .await,
    );
    assert_eq!(e.kind, ErrorKind::BadRequest);
    assert!(c.stored("node1", b"k").is_none());
}

#[tokio::test]
async fn a_corrupt_replica_is_never_served() {
    let c = SimCluster::new(3);
    written(c.put("node1", b"k", b"good", None, D).await);
    assert!(converged(&c, b"k").await);
    let victim = c.primaries(b"k")[0].clone();
    c.node(&victim)
        .store()
        .corrupt(shoal_node::storage::Tree::Objects, b"k");
    c.node(&victim).drop_cache();
    // All three required: the corrupt one cannot count.
    let e = error(
        c.get("node2", b"k", RequestOptions { r: Some(3), ..D })
            .await,
    );
    assert_eq!(e.kind, ErrorKind::Quorum);
    assert!(e.message.contains("corrupt"), "{}", e.message);
    // Two suffice: the good copies answer.
    assert_eq!(
        values(&value(c.get("node2", b"k", D).await)),
        vec![b"good".to_vec()]
    );
}

#[tokio::test]
async fn pr_and_pw_count_primaries() {
    let c = SimCluster::new(3);
    c.net.crash("node3");
    written(
        c.put(
            "node1",
            b"k",
            b"v",
            None,
            RequestOptions { pw: Some(2), ..D },
        )
        .await,
    );
    let e = error(
        c.put(
            "node1",
            b"k",
            b"v",
            None,
            RequestOptions {
                w: Some(3),
                pw: Some(3),
                ..D
            },
        )
        .await,
    );
    assert_eq!(e.kind, ErrorKind::Quorum);
    let e = error(
        c.get(
            "node1",
            b"k",
            RequestOptions {
                r: Some(3),
                pr: Some(3),
                ..D
            },
        )
        .await,
    );
    assert_eq!(e.kind, ErrorKind::Quorum);
}

/// Issue 3, failure detection: a crashed peer is marked down within the
/// detector's detection time and up again after it restarts; both show in
/// the metrics.
#[tokio::test(start_paused = true)]
async fn a_crashed_peer_is_marked_down_in_time_and_up_after_restart() {
    let c = SimCluster::new(3);
    let node1 = c.node("node1");
    let config = shoal_node::detector::DetectorConfig::default();
    for _ in 0..10 {
        node1.heartbeat_round().await;
        tokio::time::sleep(config.heartbeat).await;
    }
    assert!(node1.peer_views().iter().all(|p| p.up));
    c.net.crash("node2");
    let crashed_at = tokio::time::Instant::now();
    let node2 = c.node("node2").me().id;
    while node1.is_up(node2) {
        assert!(
            crashed_at.elapsed() < config.detection_time() + config.heartbeat * 2,
            "not detected in time"
        );
        node1.heartbeat_round().await;
        tokio::time::sleep(config.heartbeat).await;
    }
    assert!(
        crashed_at.elapsed() >= config.detection_time() - config.heartbeat,
        "detected too early"
    );
    assert!(
        node1.is_up(c.node("node3").me().id),
        "the live peer stays up"
    );
    let text = node1.metrics().render();
    assert!(text.contains("shoal_peer_up{peer=\"node2\"} 0"), "{text}");
    assert!(
        text.contains("shoal_peer_transitions_total{peer=\"node2\",to=\"down\"} 1"),
        "{text}"
    );

    c.net.restart("node2");
    node1.heartbeat_round().await;
    assert!(node1.is_up(node2));
    let text = node1.metrics().render();
    assert!(
        text.contains("shoal_peer_transitions_total{peer=\"node2\",to=\"up\"} 1"),
        "{text}"
    );
}
