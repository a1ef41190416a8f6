//! Issue 3 with real `shoal` processes over QUIC: sloppy quorum through
//! fallbacks, hinted handoff surviving kill -9, and read repair.
//! Every wait is bounded; every figure a test measures is printed
//! (`cargo test -p shoal-tests --test failures -- --nocapture`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use shoal_client::proto::RequestOptions;
use shoal_client::{Client, Error};
use shoal_tests::process::{all_hold, assert_on_every_replica, put_all, DevCluster, W2};

/// Names of the key's primaries, in preference order.
async fn primaries(client: &Client, key: &str) -> Vec<String> {
    let report = client.inspect(key.as_bytes()).await.expect("inspect");
    report.replicas.into_iter().map(|r| r.node).collect()
}

/// Acceptance 1: 5 nodes, N=3; kill -9 two of a key range's three primaries.
/// W=2 puts succeed through fallbacks, R=2 gets return them, `shoal inspect`
/// shows the hints on the fallbacks, and PW=2 puts fail with a clear error.
/// When the primaries return the hints are delivered and deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_primaries_killed_writes_go_through_fallbacks() {
    let c = DevCluster::start(5).await;
    let client = c.client().await;
    let ring = client.refresh_ring().await.expect("ring");
    let partition = ring.ring.partition_of(b"range");
    let keys: Vec<String> = (0..)
        .map(|i| format!("range-{i}"))
        .filter(|k| ring.ring.partition_of(k.as_bytes()) == partition)
        .take(20)
        .collect();
    let p = primaries(&client, &keys[0]).await;
    c.kill9(&p[1]).await;
    c.kill9(&p[2]).await;
    let detected = c.wait_seen(&p[1], false, Duration::from_secs(20)).await;
    c.wait_seen(&p[2], false, Duration::from_secs(20)).await;
    // Learnt from the ring: a write to a silent node is not retried elsewhere.
    client.refresh_ring().await.expect("ring");
    println!(
        "{} and {} killed; marked down after {detected:?}",
        p[1], p[2]
    );

    let started = Instant::now();
    put_all(&client, &keys, W2, 16).await;
    println!("20 W=2 puts through fallbacks in {:?}", started.elapsed());
    for k in &keys {
        let read = client.get_with(k.as_bytes(), W2).await.expect("R=2 get");
        assert_eq!(read.values.len(), 1);
        assert_eq!(read.values[0].0, k.as_bytes());
    }

    // The hints, as an operator sees them.
    let out = c.shoal(&["inspect", &keys[0], "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let hints = report["hints"].as_array().unwrap();
    let hinted_for: BTreeSet<&str> = hints.iter().map(|h| h["for"].as_str().unwrap()).collect();
    assert_eq!(
        hinted_for,
        BTreeSet::from([p[1].as_str(), p[2].as_str()]),
        "{report}"
    );
    for h in hints {
        assert!(
            !p.contains(&h["holder"].as_str().unwrap().to_string()),
            "{report}"
        );
    }
    let human = String::from_utf8_lossy(&c.shoal(&["inspect", &keys[0]]).stdout).into_owned();
    assert!(
        human.contains(&format!("holds a hint for {}", p[1])),
        "{human}"
    );
    let status = String::from_utf8_lossy(&c.shoal(&["status"]).stdout).into_owned();
    assert!(status.contains("HINTS"), "{status}");

    // PW=2: refused, saying why.
    let out = c.shoal(&["put", &keys[0], "strict", "--pw", "2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PW=2") && err.contains(&p[1]), "{err}");
    let strict = RequestOptions { pw: Some(2), ..W2 };
    match client
        .put_with(keys[1].as_bytes(), b"x", None, strict)
        .await
    {
        Err(Error::Quorum { needed: 2, .. }) => {}
        other => panic!("PW=2 put: {other:?}"),
    }

    c.restart(&p[1]);
    c.restart(&p[2]);
    let restarted = Instant::now();
    c.wait_for("hints delivered", Duration::from_secs(30), |all| {
        all.len() == 5 && DevCluster::hints_held(all) == 0
    })
    .await;
    println!("hints delivered {:?} after restart", restarted.elapsed());
    assert_on_every_replica(&client, &keys).await;
}

/// Acceptance 2: 10,000 keys written with W=2 while one node of three is
/// down are on all three primaries, replica by replica, within 60 s of its
/// restart, and no hints remain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_keys_reach_a_returning_node() {
    let c = DevCluster::start(3).await;
    let client = c.client().await;
    c.kill9("node3").await;
    c.wait_seen("node3", false, Duration::from_secs(20)).await;
    // The client learns it from the ring: a write sent to a silent node is
    // not retried elsewhere (it may still run there).
    client.refresh_ring().await.expect("ring");
    let keys: Vec<String> = (0..10_000).map(|i| format!("key-{i:05}")).collect();
    let started = Instant::now();
    put_all(&client, &keys, W2, 16).await;
    let wrote = started.elapsed();
    let held = DevCluster::hints_held(&c.statuses().await);
    assert!(held >= 10_000, "a hint per key for node3, got {held}");

    c.restart("node3");
    let restarted = Instant::now();
    let drained = c
        .wait_for("all hints delivered", Duration::from_secs(60), |all| {
            all.len() == 3 && DevCluster::hints_held(all) == 0
        })
        .await;
    assert_on_every_replica(&client, &keys).await;
    println!(
        "10,000 W=2 puts with node3 down: {wrote:?}; hints drained {drained:?} after restart; \
         every key verified on all three replicas {:?} after restart",
        restarted.elapsed()
    );
}

/// Acceptance 3: a fallback holding hints is killed -9 before it can deliver
/// them and restarted: the hints are still delivered; nothing acknowledged is
/// lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_survive_a_killed_fallback() {
    let c = DevCluster::start(5).await;
    let client = c.client().await;
    c.kill9("node5").await;
    c.wait_seen("node5", false, Duration::from_secs(20)).await;
    // Learnt from the ring: a write to a silent node is not retried elsewhere.
    client.refresh_ring().await.expect("ring");
    let keys: Vec<String> = (0..500).map(|i| format!("fb-{i:03}")).collect();
    put_all(&client, &keys, W2, 16).await;

    // The node holding the most hints for node5 dies before node5 returns.
    let statuses = c.statuses().await;
    let holder = statuses
        .iter()
        .max_by_key(|s| s.hints_pending.iter().map(|h| h.pending).sum::<u64>())
        .expect("statuses");
    let held: u64 = holder.hints_pending.iter().map(|h| h.pending).sum();
    assert!(held > 0, "somebody holds hints: {statuses:?}");
    let holder = holder.name.clone();
    c.kill9(&holder).await;
    c.wait_seen(&holder, false, Duration::from_secs(20)).await;
    // Learnt from the ring: a write to a silent node is not retried elsewhere.
    client.refresh_ring().await.expect("ring");
    c.restart("node5");
    c.wait_for(
        "the other hints delivered",
        Duration::from_secs(30),
        |all| all.len() == 4 && DevCluster::hints_held(all) == 0,
    )
    .await;

    // The killed holder still has its hints on disk and delivers them.
    c.restart(&holder);
    let restarted = Instant::now();
    c.wait_for(
        "the killed holder's hints delivered",
        Duration::from_secs(30),
        |all| {
            all.len() == 5
                && DevCluster::hints_held(all) == 0
                && all
                    .iter()
                    .any(|s| s.name == holder && s.hints_delivered == held)
        },
    )
    .await;
    println!(
        "{holder} held {held} hints for node5 across kill -9; delivered {:?} after its restart",
        restarted.elapsed()
    );
    assert_on_every_replica(&client, &keys).await;
}

/// Acceptance 4 over QUIC: a replica that missed a write (it was killed)
/// holds the merged version right after one `shoal get` of the key. Hinted
/// handoff and anti-entropy are slowed to once an hour so only read repair
/// can fix it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_get_repairs_a_replica_that_missed_a_write() {
    let mut c = DevCluster::start(3).await;
    c.reconfigure(|config| {
        // Handoff and anti-entropy hourly: only read repair can fix node3.
        for section in ["handoff", "anti-entropy"] {
            let mut t = toml::Table::new();
            t.insert("interval-ms".into(), toml::Value::Integer(3_600_000));
            config.insert(section.into(), toml::Value::Table(t));
        }
    })
    .await;
    let client = c.client().await;
    client.put(b"k", b"v1", None).await.expect("put v1");
    c.kill9("node3").await;
    c.wait_seen("node3", false, Duration::from_secs(20)).await;
    // Learnt from the ring: a write to a silent node is not retried elsewhere.
    client.refresh_ring().await.expect("ring");
    let ctx = client.get(b"k").await.expect("get").context;
    client
        .put_with(b"k", b"v2", Some(&ctx), W2)
        .await
        .expect("put v2");
    c.restart("node3");
    c.wait_seen("node3", true, Duration::from_secs(20)).await;
    let before = client.inspect(b"k").await.expect("inspect");
    assert!(!all_hold(&before, b"v2"), "node3 missed v2: {before:?}");

    let out = c.shoal(&["get", "k"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "v2\n");
    let got = Instant::now();
    loop {
        let report = client.inspect(b"k").await.expect("inspect");
        if all_hold(&report, b"v2") {
            break;
        }
        assert!(
            got.elapsed() < Duration::from_secs(2),
            "not repaired 2 s after the get: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("node3 repaired {:?} after the get returned", got.elapsed());
}

/// A node stopped gracefully (SIGTERM, as `systemctl stop` and a rolling
/// restart do) while clients write and read through every node fails none
/// of their requests: it finishes what it took, refuses what comes after
/// with an answer the SDK retries elsewhere, and only then goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_gracefully_under_load_fails_no_request() {
    let c = DevCluster::start(3).await;
    let client = c.client().await;
    let started = Instant::now();
    let (stop_at, end) = (Duration::from_millis(1500), Duration::from_millis(3500));
    let mut workers = Vec::new();
    for w in 0..16 {
        let client = client.clone();
        workers.push(tokio::spawn(async move {
            let (mut acked, mut errors) = (Vec::new(), Vec::new());
            // Bounded twice: by time, and by count.
            for i in 0..2_000 {
                if started.elapsed() > end {
                    break;
                }
                let key = format!("stop-{w}-{i}");
                match client
                    .put_with(key.as_bytes(), key.as_bytes(), None, W2)
                    .await
                {
                    Ok(_) => acked.push(key.clone()),
                    Err(e) => errors.push(format!("{:?} put {key}: {e}", started.elapsed())),
                }
                if let Err(e) = client.get_with(key.as_bytes(), W2).await {
                    errors.push(format!("{:?} get {key}: {e}", started.elapsed()));
                }
            }
            (acked, errors)
        }));
    }
    tokio::time::sleep(stop_at.saturating_sub(started.elapsed())).await;
    let stopped_in = c
        .signal("node2", libc::SIGTERM, Duration::from_secs(20))
        .await;
    let (mut acked, mut errors) = (Vec::new(), Vec::new());
    for w in workers {
        let (a, e) = w.await.expect("worker");
        acked.extend(a);
        errors.extend(e);
    }
    println!(
        "node2 stopped in {stopped_in:?}; {} writes acknowledged, {} errors",
        acked.len(),
        errors.len()
    );
    assert!(stopped_in < Duration::from_secs(20), "node2 did not stop");
    assert!(
        errors.is_empty(),
        "{} failed requests:\n{}",
        errors.len(),
        errors.join("\n")
    );
    for k in &acked {
        let read = client.get_with(k.as_bytes(), W2).await.expect("R=2 get");
        assert_eq!(read.values.len(), 1, "{k}");
    }
}

/// The actors (`name#incarnation.epoch`) of `key`'s clock that belong to
/// `node` (all of them for ""), with the highest counter any replica
/// holding the key has seen of each.
async fn actors_of(client: &Client, key: &[u8], node: &str) -> BTreeMap<String, u64> {
    let report = client.inspect(key).await.expect("inspect");
    let mut actors = BTreeMap::new();
    let clocks = report.replicas.iter().filter_map(|r| r.object.as_ref());
    for (actor, counter) in clocks.flat_map(|o| o.clock.iter()) {
        if node.is_empty() || actor.starts_with(&format!("{node}#")) {
            let highest = actors.entry(actor.clone()).or_insert(0);
            *highest = (*highest).max(*counter);
        }
    }
    actors
}

/// A rolling restart does not grow clocks: a node stopped cleanly (SIGTERM)
/// goes on minting under the same actors when it starts again, so a key
/// written through it after every restart still names one actor of it. A
/// node killed (kill -9) may have lost what it wrote last, so it starts a
/// new incarnation: its next write to the key is under a new actor.
/// Without the first half, every clean restart adds an entry to the clock
/// of every key the node writes, and after enough rolling upgrades clock
/// pruning starts dropping entries a returning stale copy still needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_keeps_a_nodes_actors_and_a_crash_does_not() {
    let c = DevCluster::start(3).await;
    let key = b"rolling";
    // A fresh client for every write: one that saw a node stop puts it
    // last, and the key's first primary would not coordinate again.
    let cluster = &c;
    let write = |value: String| async move {
        let client = cluster.client().await;
        let read = client.get_with(key, W2).await.expect("R=2 get");
        client
            .put_with(key, value.as_bytes(), Some(&read.context), W2)
            .await
            .expect("W=2 put");
        let read = client.get_with(key, W2).await.expect("R=2 get");
        assert_eq!(read.values.len(), 1, "one value after {value}: {read:?}");
        assert_eq!(
            read.values[0].0,
            value.as_bytes(),
            "the write after {value}"
        );
    };
    write("first".into()).await;
    // The node that coordinated the first write: the one actor named.
    let named = actors_of(&c.client().await, key, "").await;
    assert_eq!(named.len(), 1, "one write, one actor: {named:?}");
    let (actor, _) = named.first_key_value().expect("one actor");
    let coordinator = actor[..actor.find('#').expect("name#incarnation.epoch")].to_string();
    let before = actors_of(&c.client().await, key, &coordinator).await;
    // Writes until one is coordinated by `coordinator` (a node just up may
    // still answer NotReady, and the client then asks the next primary);
    // returns its actors then. Bounded: 20 writes, 250 ms apart.
    let write_through = |what: String| {
        let (coordinator, write) = (&coordinator, &write);
        async move {
            for attempt in 0..20 {
                let was = actors_of(&cluster.client().await, key, coordinator).await;
                write(format!("{what}, attempt {attempt}")).await;
                let now = actors_of(&cluster.client().await, key, coordinator).await;
                if now.len() > was.len() || now.values().sum::<u64>() > was.values().sum::<u64>() {
                    return now;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            panic!("{coordinator} coordinated none of 20 writes {what}");
        }
    };
    for round in 0..2 {
        for node in ["node1", "node2", "node3"] {
            let took = c.signal(node, libc::SIGTERM, Duration::from_secs(20)).await;
            assert!(took < Duration::from_secs(20), "{node} did not stop");
            c.restart(node);
            c.wait_seen(node, true, Duration::from_secs(30)).await;
            let what = format!("after {node} restarted, round {round}");
            // Not vacuous: right after its own restart, it writes under it.
            let now = match node == coordinator {
                true => write_through(what).await,
                false => {
                    write(what).await;
                    actors_of(&c.client().await, key, &coordinator).await
                }
            };
            println!("{coordinator}'s actors after {node} restarted: {now:?}");
            assert_eq!(
                now.keys().collect::<Vec<_>>(),
                before.keys().collect::<Vec<_>>(),
                "a clean restart of {node} gave {coordinator} a new actor"
            );
        }
    }
    c.kill9(&coordinator).await;
    c.restart(&coordinator);
    c.wait_seen(&coordinator, true, Duration::from_secs(30))
        .await;
    let crashed = write_through("after a crash".into()).await;
    println!("after kill -9: {crashed:?}");
    assert_eq!(
        crashed.len(),
        2,
        "a crash must start a new incarnation: {crashed:?}"
    );
}
