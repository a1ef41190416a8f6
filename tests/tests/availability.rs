//! Issue 3 over the simulated network: sloppy quorum through fallbacks,
//! PR/PW, hinted handoff (delivery, rate limit, compare-and-delete), and read
//! repair, each fault named in its test.

use std::time::Duration;

use shoal_client::error::ErrorKind;
use shoal_client::proto::{Request, RequestOptions, Response};
use shoal_node::storage::Tree;
use shoal_tests::sim::{error, settings, value, values, written, SimCluster, D};

/// The cluster's view of which nodes hold `key` as primaries, as a fixed triple.
fn roles(c: &SimCluster, key: &[u8]) -> (String, String, String) {
    let p = c.primaries(key);
    (p[0].clone(), p[1].clone(), p[2].clone())
}

/// Acceptance 1 in process: with two of three primaries down, W=2 writes and
/// R=2 reads go through fallbacks, which keep hints; PW=2 and PR=2 fail.
/// When the primaries return the hints are handed off and deleted.
#[tokio::test(start_paused = true)]
async fn two_primaries_down_writes_go_to_fallbacks_and_are_handed_off() {
    let c = SimCluster::new(5);
    let key = b"sloppy";
    let (p1, p2, p3) = roles(&c, key);
    c.detect(10).await;
    c.net.crash(&p2);
    c.net.crash(&p3);
    c.detect(10).await;
    assert!(!c.node(&p1).is_up(c.id(&p2)) && !c.node(&p1).is_up(c.id(&p3)));

    written(c.put(&p1, key, b"v1", None, D).await);
    // The first two fallbacks in ring order each hold a hint, one per primary.
    let fallbacks = c.fallbacks(key);
    let hinted: Vec<(String, String)> = fallbacks[..2]
        .iter()
        .flat_map(|f| {
            c.node(f)
                .hints_of(key)
                .unwrap()
                .into_iter()
                .map(|(id, _)| {
                    (
                        f.clone(),
                        c.node(&p1).membership().view().unwrap().name_of(&id),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        hinted,
        vec![
            (fallbacks[0].clone(), p2.clone()),
            (fallbacks[1].clone(), p3.clone())
        ]
    );
    assert!(
        c.stored(&fallbacks[0], key).is_none(),
        "a hint is not the fallback's own data"
    );

    // R=2 counts the fallbacks' answers.
    assert_eq!(
        values(&value(c.get(&p1, key, D).await)),
        vec![b"v1".to_vec()]
    );

    // PW=2 / PR=2: refused at once, nothing written.
    let strict = RequestOptions { pw: Some(2), ..D };
    let before = c.stored(&p1, key);
    let e = error(c.put(&p1, key, b"v2", None, strict).await);
    assert_eq!(e.kind, ErrorKind::Quorum);
    assert!(
        e.message.contains("PW=2") && e.message.contains(&p2),
        "{}",
        e.message
    );
    assert_eq!(c.stored(&p1, key), before, "nothing was written");
    let e = error(c.get(&p1, key, RequestOptions { pr: Some(2), ..D }).await);
    assert!(e.message.contains("PR=2"), "{}", e.message);

    // The primaries return; the fallbacks hand off and forget their hints.
    c.net.restart(&p2);
    c.net.restart(&p3);
    c.detect(2).await;
    assert_eq!(c.hand_off(3).await, 0, "no hints remain");
    for p in [&p2, &p3] {
        assert_eq!(
            c.stored(p, key).unwrap(),
            c.stored(&p1, key).unwrap(),
            "{p} got the write"
        );
    }
    let text = c.node(&fallbacks[0]).metrics().render();
    assert!(text.contains("shoal_hints_delivered_total 1"), "{text}");
    assert!(text.contains("shoal_hints_pending 0"), "{text}");
    assert!(
        text.contains("shoal_handoff_batch_duration_seconds_count 1"),
        "{text}"
    );
}

/// A primary that fails during the request (not yet detected) is replaced
/// by a fallback on the spot.
#[tokio::test]
async fn a_primary_failing_mid_request_fails_over_to_a_fallback() {
    let c = SimCluster::new(5);
    let key = b"failover";
    let (p1, p2, p3) = roles(&c, key);
    c.net.crash(&p2);
    c.net.crash(&p3);
    let w = RequestOptions { w: Some(3), ..D };
    written(c.put(&p1, key, b"v", None, w).await);
    assert_eq!(c.hints_held(), 2);
    // But PW=2 cannot be met by fallbacks: a quorum error naming them.
    let e = error(
        c.put(&p1, key, b"v2", None, RequestOptions { pw: Some(2), ..D })
            .await,
    );
    assert_eq!(e.kind, ErrorKind::Quorum);
    assert!(e.message.contains("primaries"), "{}", e.message);
}

/// Writes "v" to `key` at its second primary while its first is down (the
/// first misses it: its hint waits on a fallback), then restarts the first;
/// the third primary has the write. Returns the three primaries.
async fn missed_by_the_first_primary(c: &SimCluster, key: &[u8]) -> (String, String, String) {
    let (p1, p2, p3) = roles(c, key);
    c.net.crash(&p1);
    c.detect(10).await;
    written(c.put(&p2, key, b"v", None, D).await);
    // The send to the third primary (not needed for W) has landed.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(c.stored(&p3, key).is_some(), "{p3} has the write");
    c.net.restart(&p1);
    assert_eq!(c.stored(&p1, key), None, "{p1} missed the write");
    (p1, p2, p3)
}

/// A fallback's answer does not stand in for a primary that is up: at a
/// primary that missed a write (down when it was made, its hint not handed
/// off yet), with the next primary in ring order down, a read is not
/// answered by that one's fallback's "absent" (the fallback holds only
/// hints) while the third primary, up and holding the write, has yet to
/// answer. Before, the fallback took the quorum's slot at once and the
/// primary waited as a spare: the read missed an acknowledged write (found
/// by review, helper-50: a rolling restart does this routinely).
#[tokio::test(start_paused = true)]
async fn a_fallbacks_answer_does_not_stand_in_for_a_primary_that_is_up() {
    let c = SimCluster::new(5);
    let key = b"rolling";
    let (p1, p2, p3) = missed_by_the_first_primary(&c, key).await;
    c.net.crash(&p2);
    c.detect(10).await;
    assert!(c.node(&p1).is_up(c.id(&p3)) && !c.node(&p1).is_up(c.id(&p2)));
    assert_eq!(
        values(&value(c.get(&p1, key, D).await)),
        vec![b"v".to_vec()],
        "the read missed an acknowledged write"
    );
}

/// A primary that is up but fails its reads (its store refuses them) is
/// not replaced by a fallback's "absent" either while another primary that
/// is up has yet to answer.
#[tokio::test(start_paused = true)]
async fn a_fallback_does_not_stand_in_for_a_primary_whose_reads_fail() {
    let c = SimCluster::new(5);
    let key = b"failing";
    let (p1, p2, p3) = missed_by_the_first_primary(&c, key).await;
    c.detect(10).await;
    c.node(&p2).store().set_reads_fail(true);
    c.node(&p2).drop_cache();
    assert_eq!(
        values(&value(c.get(&p1, key, D).await)),
        vec![b"v".to_vec()],
        "the read missed an acknowledged write"
    );
    assert!(c.node(&p1).is_up(c.id(&p2)) && c.node(&p1).is_up(c.id(&p3)));
}

/// A primary the detector sees up whose answer never comes (a hung store
/// while pings are still answered) holds a read's fallback answers back
/// only for a while, not to the request's deadline (review, helper-51).
#[tokio::test(start_paused = true)]
async fn a_silent_primary_holds_fallback_answers_back_only_for_a_while() {
    let c = SimCluster::new(5);
    let key = b"patience";
    let (p1, p2, p3) = roles(&c, key);
    written(c.put(&p1, key, b"v", None, D).await);
    c.net.crash(&p2);
    c.detect(10).await;
    c.net.blackhole(&p1, &p3);
    assert!(c.node(&p1).is_up(c.id(&p3)) && !c.node(&p1).is_up(c.id(&p2)));
    let start = tokio::time::Instant::now();
    assert_eq!(
        values(&value(c.get(&p1, key, D).await)),
        vec![b"v".to_vec()]
    );
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "the read waited {took:?}");
}

/// With N nodes there is no fallback: the coordinator keeps the hints for
/// the down primary itself and hands them off when it returns.
#[tokio::test(start_paused = true)]
async fn without_fallbacks_the_coordinator_keeps_the_hints() {
    let c = SimCluster::new(3);
    c.net.crash("node3");
    for i in 0..100u32 {
        written(
            c.put("node1", format!("k{i}").as_bytes(), b"v", None, D)
                .await,
        );
    }
    // The sends no quorum waited for (a spare goes a batching window
    // after the reply) have failed, and their hints are kept.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(c.hints_held(), 100);
    // Delivery to a primary still down fails and keeps every hint.
    assert_eq!(c.hand_off(1).await, 100);
    c.net.restart("node3");
    assert_eq!(c.hand_off(3).await, 0);
    for i in 0..100u32 {
        let k = format!("k{i}");
        assert_eq!(
            c.stored("node3", k.as_bytes()),
            c.stored("node1", k.as_bytes()),
            "{k}"
        );
    }
}

/// `handoff.max-keys-per-sec` bounds the delivery rate.
#[tokio::test(start_paused = true)]
async fn handoff_is_rate_limited() {
    let mut s = settings();
    s.handoff.max_keys_per_sec = 100;
    s.handoff.batch_size = 10;
    let c = SimCluster::with_settings(3, s);
    c.net.crash("node3");
    for i in 0..50u32 {
        written(
            c.put("node1", format!("k{i}").as_bytes(), b"v", None, D)
                .await,
        );
    }
    // The sends no quorum waited for (a spare goes a batching window
    // after the reply) have failed, and their hints are kept.
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.net.restart("node3");
    let started = tokio::time::Instant::now();
    assert_eq!(c.node("node1").handoff_round().await, 50);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450),
        "50 hints at 100/s took {took:?}"
    );
}

/// A hint that changes while its delivery is in flight is not deleted: the
/// newer version is delivered in the next round.
#[tokio::test(start_paused = true)]
async fn a_hint_updated_during_delivery_is_kept_and_delivered_next() {
    let c = SimCluster::new(3);
    c.net.crash("node3");
    written(c.put("node1", b"k", b"old", None, D).await);
    c.net.restart("node3");
    c.net.delay("node1", "node3", Duration::from_secs(1));
    let node1 = c.node("node1").clone();
    let round = tokio::spawn(async move { node1.handoff_round().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A newer write for node3 lands in the same hint meanwhile.
    c.net.crash("node3");
    let ctx = value(c.get("node1", b"k", D).await).context;
    written(c.put("node1", b"k", b"new", Some(ctx), D).await);
    // The sends no quorum waited for (a spare goes a batching window
    // after the reply) have failed, and their hint is updated.
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.net.restart("node3");
    assert_eq!(round.await.unwrap(), 0, "the changed hint is not deleted");
    assert_eq!(c.hints_held(), 1);
    assert_eq!(c.hand_off(3).await, 0);
    assert_eq!(c.stored("node3", b"k"), c.stored("node1", b"k"));
    let read = value(
        c.get("node3", b"k", RequestOptions { r: Some(3), ..D })
            .await,
    );
    assert_eq!(values(&read), vec![b"new".to_vec()]);
}

/// Acceptance 4 in process: a replica whose value was deleted out from under
/// it, or that missed a write while partitioned, holds the merged version
/// right after one get.
#[tokio::test(start_paused = true)]
async fn one_get_repairs_a_missing_and_a_stale_replica() {
    let c = SimCluster::new(3);
    written(c.put("node1", b"k", b"v1", None, D).await);
    // Missing: node3 loses the key.
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.node("node3").store().forget(Tree::Objects, b"k");
    c.node("node3").drop_cache();
    value(
        c.get("node1", b"k", RequestOptions { r: Some(3), ..D })
            .await,
    );
    assert!(
        repaired(&c, "node3", "node1", b"k").await,
        "missing copy repaired"
    );

    // Stale: node3 misses a write, then one read brings it up to date.
    c.net.partition("node1", "node3");
    let ctx = value(c.get("node1", b"k", D).await).context;
    written(c.put("node1", b"k", b"v2", Some(ctx), D).await);
    // The send to node3 (perhaps a spare, a batching window after the
    // reply) failed before the partition heals.
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.net.heal();
    assert_ne!(c.stored("node3", b"k"), c.stored("node1", b"k"));
    value(
        c.get("node1", b"k", RequestOptions { r: Some(3), ..D })
            .await,
    );
    assert!(
        repaired(&c, "node3", "node1", b"k").await,
        "stale copy repaired"
    );
    assert!(c
        .node("node1")
        .metrics()
        .render()
        .contains("shoal_read_repairs_total 2"));
}

/// An answer that arrives after the reply is still repaired, and the reply
/// does not wait for it.
#[tokio::test(start_paused = true)]
async fn a_late_answer_is_repaired_without_delaying_the_reply() {
    let c = SimCluster::new(3);
    written(c.put("node1", b"k", b"v", None, D).await);
    tokio::time::sleep(Duration::from_millis(10)).await;
    c.node("node3").store().forget(Tree::Objects, b"k");
    c.node("node3").drop_cache();
    c.net.delay("node1", "node3", Duration::from_millis(200));
    let started = tokio::time::Instant::now();
    assert_eq!(
        values(&value(c.get("node1", b"k", D).await)),
        vec![b"v".to_vec()]
    );
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "reply waited for the slow replica"
    );
    assert!(c.stored("node3", b"k").is_none());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(c.stored("node3", b"k"), c.stored("node1", b"k"));
}

/// Waits (bounded, 1 s) until `node` holds what `reference` holds for `key`.
async fn repaired(c: &SimCluster, node: &str, reference: &str, key: &[u8]) -> bool {
    for _ in 0..100 {
        if c.stored(node, key).is_some() && c.stored(node, key) == c.stored(reference, key) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// 32 requests at `via`, all at once, each on its own key; their answers.
async fn at_once(c: &SimCluster, via: &str, keys: &[Vec<u8>], put: bool) -> Vec<Response> {
    let mut set = tokio::task::JoinSet::new();
    for (i, key) in keys.iter().enumerate() {
        let node = c.node(via).clone();
        let request = if put {
            Request::Put {
                key: key.clone(),
                value: b"v".to_vec(),
                context: None,
                options: D,
            }
        } else {
            Request::Get {
                key: key.clone(),
                options: D,
            }
        };
        set.spawn(async move { (i, node.coordinate(request, false).await) });
    }
    let mut answers: Vec<(usize, Response)> = set.join_all().await;
    answers.sort_by_key(|(i, _)| *i);
    answers.into_iter().map(|(_, r)| r).collect()
}

/// `at_once`, then 100 ms for the sends that outlive the replies: the
/// answers, and the network's trace log of it all.
async fn traced_at_once(
    c: &SimCluster,
    via: &str,
    keys: &[Vec<u8>],
    put: bool,
) -> (Vec<Response>, Vec<String>) {
    c.net.keep_trace_log();
    let answers = at_once(c, via, keys, put).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    (answers, c.net.take_trace_log())
}

/// Three simulated nodes that take values of up to `bytes` (the batch
/// tests need objects past a batch's answer budget).
fn taking_values_of(bytes: usize) -> SimCluster {
    let mut s = settings();
    s.max_value_bytes = bytes;
    SimCluster::with_settings(3, s)
}

/// How many events of a trace log end with `what` ("deliver batch").
fn delivered(log: &[String], what: &str) -> usize {
    log.iter().filter(|l| l.ends_with(what)).count()
}

/// How many events of a trace log end with `what` and happened at the
/// simulated time of its first event (before any batching window could
/// pass), and how many later.
fn delivered_at_once_and_later(log: &[String], what: &str) -> (usize, usize) {
    let time = |l: &String| l.split_whitespace().next().unwrap_or_default().to_string();
    let start = log.first().map(time).unwrap_or_default();
    let all = delivered(log, what);
    let at_once = log
        .iter()
        .filter(|l| l.ends_with(what) && time(l) == start)
        .count();
    (at_once, all - at_once)
}

/// A coordinator's sends to remote replicas travel to each peer in
/// batches: the quorum's own (at N=3, R=W=2: the replica after the
/// coordinator) in a batch that leaves at once, in the same turn; the
/// ones no quorum waits for (the third replica's) in a batch that leaves
/// after the window. 32 concurrent writes at node1 take no single send
/// and a batch or two of each kind; every replica holds every write.
/// Reads likewise.
#[tokio::test(start_paused = true)]
async fn the_sends_to_remote_replicas_travel_in_batches() {
    let c = SimCluster::new(3);
    let keys: Vec<Vec<u8>> = (0..32).map(|i| format!("key{i}").into_bytes()).collect();

    let (answers, log) = traced_at_once(&c, "node1", &keys, true).await;
    for r in answers {
        written(r);
    }
    assert_eq!(delivered(&log, "deliver replica-put"), 0, "{log:#?}");
    let (at_once, later) = delivered_at_once_and_later(&log, "deliver batch");
    assert!(
        (1..=2).contains(&at_once),
        "{at_once} batches at once: {log:#?}"
    );
    assert!((1..=2).contains(&later), "{later} batches later: {log:#?}");
    for node in ["node1", "node2", "node3"] {
        for key in &keys {
            assert!(c.stored(node, key).is_some(), "{node} lacks a write");
        }
    }

    let (answers, log) = traced_at_once(&c, "node1", &keys, false).await;
    for r in answers {
        assert_eq!(values(&value(r)), [b"v".to_vec()]);
    }
    assert_eq!(delivered(&log, "deliver replica-get"), 0, "{log:#?}");
    let (at_once, later) = delivered_at_once_and_later(&log, "deliver batch");
    assert!(
        (1..=2).contains(&at_once),
        "{at_once} batches at once: {log:#?}"
    );
    assert!((1..=2).contains(&later), "{later} batches later: {log:#?}");
}

/// A quorum send that gets no answer is made up by the spare: with
/// node1's sends to either other replica lost, its W=2 writes and R=2
/// reads succeed a batching window later, not at the request timeout;
/// and the read repairs the replica the lost sends missed, once it
/// answers again.
#[tokio::test(start_paused = true)]
async fn a_spare_completes_the_quorum_when_a_send_gets_no_answer() {
    for silent in ["node2", "node3"] {
        let c = SimCluster::new(3);
        c.net.blackhole("node1", silent);
        let started = tokio::time::Instant::now();
        let key = format!("to-{silent}");
        let key = key.as_bytes();
        written(c.put("node1", key, b"v", None, D).await);
        let read = value(c.get("node1", key, D).await);
        assert_eq!(values(&read), [b"v".to_vec()]);
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(50),
            "{silent} silent: {took:?}"
        );
        assert!(c.stored(silent, key).is_none(), "{silent} got nothing");
        c.net.heal();
        value(c.get("node1", key, D).await);
        assert!(
            repaired(&c, silent, "node1", key).await,
            "{silent} repaired"
        );
    }
}

/// With `cluster.spare-reads = "when-slow"` a read asks the third replica
/// only when its quorum is slow or fails:
/// - 32 concurrent reads at node1 whose quorum answers at once send no
///   later batch, and each counts a spare not sent;
/// - with node1's sends to the quorum's peer lost, the spare goes after
///   the delay (1 ms here), and the read succeeds well before the timeout;
/// - with those sends failing at once, the spare goes at once;
/// - with every request from node1 20 ms late, the spare waits twice
///   that: reads answered in 20 ms send none; but never more than a
///   quarter of the read's budget, so that a read of 50 ms whose quorum
///   send is lost still gets the spare's answer in time.
#[tokio::test(start_paused = true)]
async fn with_spare_reads_when_slow_the_third_replica_is_read_only_for_a_slow_quorum() {
    use shoal_node::config::SpareReads;
    use std::sync::atomic::Ordering;
    let when_slow = || {
        let mut s = settings();
        s.spare_reads = SpareReads::WhenSlow;
        SimCluster::with_settings(3, s)
    };
    let skipped = |c: &SimCluster| {
        let m = c.node("node1").metrics();
        m.spare_reads_skipped.load(Ordering::Relaxed)
    };
    let c = when_slow();
    let keys: Vec<Vec<u8>> = (0..32).map(|i| format!("key{i}").into_bytes()).collect();
    for r in at_once(&c, "node1", &keys, true).await {
        written(r);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (answers, log) = traced_at_once(&c, "node1", &keys, false).await;
    for r in answers {
        assert_eq!(values(&value(r)), [b"v".to_vec()]);
    }
    let (at_once, later) = delivered_at_once_and_later(&log, "deliver batch");
    assert!(
        (1..=2).contains(&at_once),
        "{at_once} batches at once: {log:#?}"
    );
    assert_eq!(later, 0, "no spare sent: {log:#?}");
    assert_eq!(delivered(&log, "deliver replica-get"), 0, "{log:#?}");
    assert_eq!(skipped(&c), 32);

    // A key whose quorum send from node1 goes to node2: the replica after
    // node1 in its preference list.
    let key = (0..)
        .map(|i| format!("to-node2-{i}").into_bytes())
        .find(|k| {
            let p = c.primaries(k);
            let mine = p.iter().position(|n| n == "node1").unwrap();
            p[(mine + 1) % p.len()] == "node2"
        })
        .unwrap();
    for fault in ["lost", "refused"] {
        let c = when_slow();
        written(c.put("node1", &key, b"v", None, D).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
        match fault {
            "lost" => c.net.blackhole("node1", "node2"),
            _ => c.net.cut("node1", "node2"),
        }
        let started = tokio::time::Instant::now();
        let read = value(c.get("node1", &key, D).await);
        assert_eq!(values(&read), [b"v".to_vec()]);
        let took = started.elapsed();
        let wanted = match fault {
            "lost" => Duration::from_millis(1)..Duration::from_millis(50),
            _ => Duration::ZERO..Duration::from_micros(1),
        };
        assert!(wanted.contains(&took), "{fault}: {took:?}");
        assert_eq!(skipped(&c), 0, "{fault}: the spare was sent");
    }

    // A read given up before the spare delay (its client gone) sends none
    // of the spares it held.
    let c = when_slow();
    written(c.put("node1", &key, b"v", None, D).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.net.blackhole("node1", "node2");
    let gave_up = tokio::time::timeout(Duration::from_micros(500), c.get("node1", &key, D)).await;
    assert!(gave_up.is_err(), "the read ended before it was given up");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(skipped(&c), 1, "a read given up sent its spare");

    let c = when_slow();
    written(c.put("node1", &key, b"v", None, D).await);
    for peer in ["node2", "node3"] {
        c.net.delay("node1", peer, Duration::from_millis(20));
    }
    for _ in 0..50 {
        value(c.get("node1", &key, D).await);
    }
    let before = skipped(&c);
    let started = tokio::time::Instant::now();
    for _ in 0..10 {
        value(c.get("node1", &key, D).await);
    }
    let took = started.elapsed() / 10;
    assert!(took >= Duration::from_millis(20), "{took:?}");
    assert_eq!(
        skipped(&c) - before,
        10,
        "no spare sent for a read as slow as the others"
    );
    c.net.blackhole("node1", "node2");
    let short = RequestOptions {
        timeout_ms: Some(50),
        ..D
    };
    let read = value(c.get("node1", &key, short).await);
    assert_eq!(values(&read), [b"v".to_vec()]);
}

/// With `spare-reads = "when-slow"`, a fallback's answer lets a read's
/// held spares go at once: it stands in for a primary that is down, so it
/// is held back while the primaries asked have yet to answer, and a spare
/// held for the whole delay would leave the read waiting that long (and
/// leave the spare less of the patience, after which the fallback's
/// "absent" counts). With N=3 a read with a primary down holds no spare
/// (the fallback takes no slot of the quorum); with N=4, R=2 it does. Here
/// the coordinator's own copy answers, its next primary is down (a
/// fallback answers for it at once), its quorum send to the one after is
/// slow (200 ms), and the last is asked as a spare: the spare delay is
/// 40 ms (every peer answers in 20 ms), so before, the read took 60 ms;
/// now it takes the spare's 20 ms, as with `always`. The price: while a
/// primary is down such reads send their spares, as with `always`, even
/// when the quorum is not slow (the warm-up reads here skip none).
#[tokio::test(start_paused = true)]
async fn with_spare_reads_when_slow_a_fallbacks_answer_lets_the_spares_go() {
    let mut s = settings();
    (s.n, s.spare_reads) = (4, shoal_node::config::SpareReads::WhenSlow);
    let c = SimCluster::with_settings(5, s);
    let key = b"stand-in";
    let view = c.node("node1").membership().view().expect("ring ready");
    let p: Vec<String> = (view.preference_list(key, 4).into_iter())
        .map(|m| m.name)
        .collect();
    let (via, down, slow, spare) = (&p[0], &p[1], &p[2], &p[3]);
    written(c.put(via, key, b"v", None, D).await);
    c.net.crash(down);
    c.detect(10).await;
    assert!(!c.node(via).is_up(c.id(down)));
    for peer in [slow, spare] {
        c.net.delay(via, peer, Duration::from_millis(20));
    }
    // Reads ask the next primary up at once: it answers in 20 ms, so the
    // spare delay is 40 ms.
    for _ in 0..10 {
        assert_eq!(values(&value(c.get(via, key, D).await)), [b"v".to_vec()]);
    }
    let skipped = || {
        let m = c.node(via).metrics();
        m.spare_reads_skipped
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(skipped(), 0, "a fallback answered each: the spare went");
    c.net.delay(via, slow, Duration::from_millis(200));
    c.net.keep_trace_log();
    let started = tokio::time::Instant::now();
    let read = value(c.get(via, key, D).await);
    let took = started.elapsed();
    let log = c.net.take_trace_log();
    assert_eq!(values(&read), [b"v".to_vec()], "{log:#?}");
    assert!(
        took < Duration::from_millis(30),
        "the spare waited its delay after the fallback answered: {took:?} {log:#?}"
    );
}

/// A batch is answered request by request: a write too large for one is
/// refused on its own and the others are answered; a read whose object
/// would take the answers past `BATCH_ANSWER_BYTES` comes back `Alone`
/// (the first one never does), and a smaller one after it still fits. A
/// batch of more than `BATCH_REQUESTS` is refused whole.
#[tokio::test(start_paused = true)]
async fn a_batch_is_answered_request_by_request_within_its_bounds() {
    use shoal_node::net::{
        Batched, BatchedAnswer, Handler, PeerError, PeerRequest, PeerResponse, BATCH_REQUESTS,
    };
    use shoal_node::version::{Actors, Object, VersionVector};
    let c = taking_values_of(200 << 10);
    written(c.put("node1", b"big", &vec![7; 100 << 10], None, D).await);
    written(c.put("node1", b"k", b"v", None, D).await);
    let (big, k) = (c.stored("node2", b"big"), c.stored("node2", b"k"));
    assert!(big.is_some() && k.is_some());
    let mut huge = Object::default();
    let actor = Actors::new(c.id("node1"), 1).fresh().unwrap();
    huge.update(
        &VersionVector::new(),
        Some(vec![1; (1 << 20) + 1]),
        actor,
        1,
    );
    let get = |key: &[u8]| Batched::ReplicaGet { key: key.to_vec() };
    let batch = vec![
        get(b"big"),
        Batched::ReplicaPut {
            key: b"huge".to_vec(),
            object: huge,
        },
        get(b"big"),
        get(b"big"),
        get(b"k"),
        get(b"absent"),
    ];
    let answer = c
        .node("node2")
        .peer("node1".into(), PeerRequest::Spares(batch))
        .await;
    let PeerResponse::Spares(answers) = answer else {
        panic!("{answer:?}")
    };
    assert_eq!(answers.len(), 6);
    assert_eq!(answers[0], BatchedAnswer::Object(big.clone()));
    assert!(
        matches!(
            &answers[1],
            BatchedAnswer::Error(PeerError::NotAReplicaRequest(_))
        ),
        "{:?}",
        answers[1]
    );
    assert!(c.stored("node2", b"huge").is_none());
    assert_eq!(answers[2], BatchedAnswer::Object(big));
    assert_eq!(answers[3], BatchedAnswer::Alone);
    assert_eq!(answers[4], BatchedAnswer::Object(k));
    assert_eq!(answers[5], BatchedAnswer::Object(None));

    let many = vec![get(b"k"); BATCH_REQUESTS + 1];
    let answer = c
        .node("node2")
        .peer("node1".into(), PeerRequest::Spares(many))
        .await;
    assert!(
        matches!(answer, PeerResponse::Error(PeerError::Refused(_))),
        "{answer:?}"
    );
}

/// A batch in the form of nodes 297ac1c..6d1d943 (`PeerRequest::Batch`) is
/// answered whole, every read in it, however large: those nodes cannot
/// decode `Alone`, and one they cannot decode ends their stream to the
/// peer.
#[tokio::test(start_paused = true)]
async fn an_old_style_batch_is_answered_whole() {
    use shoal_node::net::{Batched, BatchedAnswer, Handler, PeerRequest, PeerResponse};
    let c = taking_values_of(200 << 10);
    written(c.put("node1", b"big", &vec![7; 100 << 10], None, D).await);
    let big = c.stored("node2", b"big");
    assert!(big.is_some());
    let get = Batched::ReplicaGet {
        key: b"big".to_vec(),
    };
    let answer = c
        .node("node2")
        .peer("node1".into(), PeerRequest::Batch(vec![get; 4]))
        .await;
    assert_eq!(
        answer,
        PeerResponse::Batch(vec![BatchedAnswer::Object(big); 4])
    );
}

/// Past the answer's budget only reads that carry an object are handed
/// back: a write (already merged, its sync under way) and a read of a key
/// that is absent are answered in the batch.
#[tokio::test(start_paused = true)]
async fn past_the_budget_only_reads_of_objects_are_handed_back() {
    use shoal_node::net::{Batched, BatchedAnswer, Handler, PeerRequest, PeerResponse};
    let c = taking_values_of(300 << 10);
    written(c.put("node1", b"huge", &vec![7; 300 << 10], None, D).await);
    written(c.put("node1", b"k", b"v", None, D).await);
    let huge = c.stored("node2", b"huge");
    let k = c.stored("node1", b"k").unwrap();
    let get = |key: &[u8]| Batched::ReplicaGet { key: key.to_vec() };
    let batch = vec![
        get(b"huge"),
        Batched::ReplicaPut {
            key: b"k".to_vec(),
            object: k,
        },
        get(b"absent"),
        get(b"huge"),
    ];
    let answer = c
        .node("node2")
        .peer("node1".into(), PeerRequest::Spares(batch))
        .await;
    assert_eq!(
        answer,
        PeerResponse::Spares(vec![
            BatchedAnswer::Object(huge),
            BatchedAnswer::Stored,
            BatchedAnswer::Object(None),
            BatchedAnswer::Alone,
        ])
    );
}

/// Reads of objects too large for all their answers to fit in one batch's:
/// the spares answered `Alone` are asked again on their own, of the same
/// primary, and every replica is still asked and every read answered.
#[tokio::test(start_paused = true)]
async fn spares_a_batch_hands_back_are_sent_on_their_own() {
    let c = taking_values_of(200 << 10);
    let keys: Vec<Vec<u8>> = (0..8).map(|i| format!("big{i}").into_bytes()).collect();
    for key in &keys {
        written(c.put("node1", key, &vec![7; 100 << 10], None, D).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (answers, log) = traced_at_once(&c, "node1", &keys, false).await;
    for r in answers {
        assert_eq!(values(&value(r)), [vec![7; 100 << 10]]);
    }
    // The 8 quorum reads (of objects over 16 KiB) go on their own at
    // once; the 8 spares in a batch to each other node after the window,
    // where two of 100 KiB fit in each batch's answer: the others go again
    // on their own.
    let (gets_at_once, gets_later) = delivered_at_once_and_later(&log, "deliver replica-get");
    assert_eq!(gets_at_once, 8, "{log:#?}");
    assert!(gets_later > 0, "{log:#?}");
    let (batches_at_once, batches_later) = delivered_at_once_and_later(&log, "deliver batch");
    assert_eq!(batches_at_once, 0, "{log:#?}");
    assert!(batches_later >= 1, "{log:#?}");
}

/// A quorum's own request of more than 16 KiB (a write's object, or for a
/// read this node's copy) goes on its own at once, not in a batch whose
/// answer it would hold up; its spare still travels in a batch.
#[tokio::test(start_paused = true)]
async fn a_large_quorum_request_goes_on_its_own() {
    let c = taking_values_of(200 << 10);
    // The quorum's request alone at once, the spare in a batch later.
    let alone_then_batched = |alone: &str| {
        let log = c.net.take_trace_log();
        assert_eq!(delivered_at_once_and_later(&log, alone), (1, 0), "{log:#?}");
        assert_eq!(
            delivered_at_once_and_later(&log, "deliver batch"),
            (0, 1),
            "{log:#?}"
        );
    };
    c.net.keep_trace_log();
    written(c.put("node1", b"big", &vec![7; 100 << 10], None, D).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    alone_then_batched("deliver replica-put");

    c.net.keep_trace_log();
    let read = value(c.get("node1", b"big", D).await);
    assert_eq!(values(&read), [vec![7; 100 << 10]]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    alone_then_batched("deliver replica-get");
}

/// A node that does not know batches (an older version, during a rolling
/// upgrade) refuses them whole. Each spare goes again on its own to the
/// same primary, not to a fallback (whose "absent" would stand in for a
/// primary that is up and holds the key), and the next spares to such a
/// node go on their own from the start: every primary holds every write,
/// no hint is made, and no fallback is asked.
#[tokio::test(start_paused = true)]
async fn spares_to_a_node_that_refuses_batches_go_on_their_own() {
    spares_go_on_their_own_to(older).await;
}

/// A faulty node that hands back every request of a batch, the first
/// included (which is always answered), is taken for one that refuses
/// batches: its spares go on their own from then on.
#[tokio::test(start_paused = true)]
async fn spares_to_a_node_that_hands_back_a_whole_batch_go_on_their_own() {
    use shoal_node::net::{BatchedAnswer, PeerResponse};
    spares_go_on_their_own_to(|n| PeerResponse::Spares(vec![BatchedAnswer::Alone; n])).await;
}

/// Writes then reads at node1 of a 4-node cluster whose other nodes answer
/// every batch with `answer`: no hint, no fallback asked, every primary
/// holds every write, and once refused the spares go on their own.
async fn spares_go_on_their_own_to(answer: fn(usize) -> shoal_node::net::PeerResponse) {
    let c = SimCluster::new(4);
    for old in ["node2", "node3", "node4"] {
        c.net.register(
            old,
            std::sync::Arc::new(Doctored(c.node(old).clone(), answer)),
        );
    }
    let keys: Vec<Vec<u8>> = (0..)
        .map(|i| format!("key{i}").into_bytes())
        .filter(|k| c.primaries(k).iter().any(|p| p == "node1"))
        .take(16)
        .collect();

    let (answers, log) = traced_at_once(&c, "node1", &keys, true).await;
    for r in answers {
        written(r);
    }
    assert_eq!(delivered(&log, "deliver hint-put"), 0, "{log:#?}");
    // Each node is sent at most two batches, the quorum's and the
    // spares', both begun before its refusal came back.
    assert!(delivered(&log, "deliver batch") <= 6, "{log:#?}");
    for key in &keys {
        for node in c.primaries(key) {
            assert!(c.stored(&node, key).is_some(), "{node} lacks a write");
        }
    }
    assert_eq!(c.hints_held(), 0);

    let (answers, log) = traced_at_once(&c, "node1", &keys, false).await;
    for r in answers {
        assert_eq!(values(&value(r)), [b"v".to_vec()]);
    }
    assert_eq!(delivered(&log, "deliver batch"), 0, "{log:#?}");
    assert_eq!(delivered(&log, "deliver hint-get"), 0, "{log:#?}");
    assert_eq!(
        delivered(&log, "deliver replica-get"),
        2 * keys.len(),
        "{log:#?}"
    );
}

/// A node whose answer to any batch is `.1` of the batch's length: one of
/// a version before batches, which cannot decode one, or a faulty one.
struct Doctored(
    shoal_tests::sim::SimNode,
    fn(usize) -> shoal_node::net::PeerResponse,
);

impl shoal_node::net::Handler for Doctored {
    async fn client(&self, request: Request) -> Response {
        self.0.client(request).await
    }

    async fn peer(
        &self,
        from: String,
        request: shoal_node::net::PeerRequest,
    ) -> shoal_node::net::PeerResponse {
        use shoal_node::net::PeerRequest;
        match request {
            PeerRequest::Batch(r) | PeerRequest::Spares(r) => (self.1)(r.len()),
            request => self.0.peer(from, request).await,
        }
    }
}

/// A node of a version before batches.
fn older(_: usize) -> shoal_node::net::PeerResponse {
    use shoal_node::net::{PeerError, PeerResponse};
    PeerResponse::Error(PeerError::Refused("unknown variant `Spares`".into()))
}

/// A forwarded write coordinated by a node whose ring does not list it as
/// a replica (its view lags the forwarder's): its own copy makes no part
/// of the quorum, so W replicas are sent to at once (each in a batch that
/// leaves in the same turn) and only the rest travel as spares, after the
/// window.
#[tokio::test(start_paused = true)]
async fn a_coordinator_that_is_not_a_replica_sends_a_whole_quorum_at_once() {
    let c = SimCluster::new(4);
    let key = b"elsewhere";
    let outsider = c.non_replica(key);
    c.net.keep_trace_log();
    let request = Request::Put {
        key: key.to_vec(),
        value: b"v".to_vec(),
        context: None,
        options: D,
    };
    written(c.node(&outsider).coordinate(request, true).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = c.net.take_trace_log();
    assert_eq!(delivered(&log, "deliver replica-put"), 0, "{log:#?}");
    let batches = delivered_at_once_and_later(&log, "deliver batch");
    assert_eq!(batches, (2, 1), "{log:#?}");
}

/// A node stopping gracefully refuses new requests unrun, those forwarded
/// to it included; the node that forwarded one asks the key's next primary
/// instead of handing the refusal to its client (which would then take
/// that node, healthy, for one not serving).
#[tokio::test(start_paused = true)]
async fn a_forward_refused_by_a_stopping_primary_goes_to_the_next() {
    let c = SimCluster::new(4);
    let key = b"draining";
    let forwarder = c.non_replica(key);
    let stopping = c.primaries(key)[0].clone();
    let nothing_in_flight = tokio::time::Instant::now();
    assert!(c.node(&stopping).tasks().drain(nothing_in_flight).await);
    let refused = error(c.put(&stopping, key, b"v", None, D).await);
    assert_eq!(refused.kind, ErrorKind::NotReady, "{refused:?}");
    written(c.put(&forwarder, key, b"v", None, D).await);
    let read = value(c.get(&forwarder, key, D).await);
    assert_eq!(read.values.len(), 1, "{read:?}");
    // Every primary stopping: the forwarder refuses it unrun too.
    // (Their repairs and third-replica sends end first.)
    let within = tokio::time::Instant::now() + Duration::from_secs(10);
    for primary in c.primaries(key) {
        assert!(c.node(&primary).tasks().drain(within).await);
    }
    let refused = error(c.put(&forwarder, key, b"w", None, D).await);
    assert_eq!(refused.kind, ErrorKind::NotReady, "{refused:?}");
}
