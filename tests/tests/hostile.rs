//! Issue 11 over real `shoal` processes: writes past the object limits, a
//! byte flipped on disk, and a peer that stops answering (SIGSTOP).
//! `cargo test -p shoal-tests --test hostile -- --nocapture`

use std::time::{Duration, Instant};

use shoal_client::proto::RequestOptions;
use shoal_client::Error;
use shoal_node::storage::{RocksStore, Store, Tree};
use shoal_tests::process::{all_hold, metric, time_cli_commands, DevCluster, W2};

/// Waits (bounded) until `done` holds, polling every 200 ms.
async fn eventually(what: &str, within: Duration, mut done: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done().await {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    started.elapsed()
}

/// Acceptance 2: 17 blind 4 MiB puts to one key. The puts past the object
/// limit (64 MiB) get an error telling the user to resolve the siblings;
/// the key stays readable and resolvable; requests to other keys between
/// the same nodes go on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blind_puts_past_the_object_limit_get_a_clear_error_and_nothing_else_fails() {
    let c = DevCluster::start(3).await;
    let client = c.client().await;
    // Each big put rewrites an object of up to 60 MiB on three nodes: give
    // it time on a small, busy machine.
    let mut patient = shoal_client::ClientConfig::from_dir(c.path()).expect("cluster dir");
    patient.timeout = Duration::from_secs(60);
    patient.options.timeout_ms = Some(50_000);
    let big_client = shoal_client::Client::connect(patient)
        .await
        .expect("connect");
    // Small requests to other keys, all the while.
    let small = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut failures = Vec::new();
            for i in 0..300u32 {
                let key = format!("small{}", i % 20);
                if let Err(e) = client.put(key.as_bytes(), b"x", None).await {
                    failures.push(e.to_string());
                }
                if let Err(e) = client.get(key.as_bytes()).await {
                    failures.push(e.to_string());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            failures
        })
    };
    let (mut accepted, mut refused) = (0, Vec::new());
    for i in 0..17u8 {
        let value = vec![i; 4 << 20];
        match big_client.put(b"big", &value, None).await {
            Ok(_) => accepted += 1,
            Err(e) => refused.push(e),
        }
    }
    println!(
        "17 blind 4 MiB puts: {accepted} accepted, {} refused",
        refused.len()
    );
    assert!(accepted >= 3, "at least N siblings of a maximal value fit");
    assert!(!refused.is_empty(), "the puts past the limit are refused");
    for e in &refused {
        let text = e.to_string();
        assert!(
            matches!(e, Error::TooLarge(_)),
            "{e:?}\nlogs:\n{}",
            c.logs()
        );
        assert!(text.contains("resolve the siblings"), "{text}");
        assert!(text.contains("nothing was written"), "{text}");
    }
    println!("the refusal: {}", refused[0]);
    let failures = small.await.expect("small requests");
    assert!(failures.is_empty(), "other keys failed: {failures:?}");
    // Readable at every replica, and resolvable with the context.
    let all = RequestOptions {
        r: Some(3),
        timeout_ms: Some(50_000),
        ..W2
    };
    let read = big_client
        .get_with(b"big", all)
        .await
        .expect("the key stays readable");
    assert_eq!(read.values.len(), accepted);
    // A write with the read's context resolves the siblings. The nodes may
    // still be busy moving 60 MiB objects (read repair, handoff), and a
    // peer that sends nothing for 300 ms is taken for dead (see the closing
    // note of issue 11): a failed attempt is read again and written again,
    // which supersedes whatever the failed one left.
    let mut context = read.context;
    let mut attempts = 0;
    loop {
        attempts += 1;
        match big_client.put(b"big", b"resolved", Some(&context)).await {
            Ok(_) => break,
            Err(e) if attempts < 5 => {
                println!("resolving write, attempt {attempts}: {e}");
                tokio::time::sleep(Duration::from_secs(2)).await;
                context = big_client
                    .get_with(b"big", all)
                    .await
                    .expect("read")
                    .context;
            }
            Err(e) => panic!("a write with the context did not resolve it: {e}"),
        }
    }
    let after = big_client.get(b"big").await.expect("read");
    assert_eq!(after.values.len(), 1);
    assert_eq!(after.values[0].0, b"resolved");
}

/// Waits until the others see a restarted `node` up, for good: right after
/// a restart a peer may still be noticing that the old process died.
async fn settled(c: &DevCluster, node: &str) {
    c.wait_seen(node, true, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.wait_seen(node, true, Duration::from_secs(30)).await;
}

/// Opens a killed node's store, waiting (bounded) for the kernel to release
/// the dead process's lock on it.
async fn open_store(dir: &std::path::Path) -> RocksStore {
    let started = Instant::now();
    loop {
        match RocksStore::open(dir, true) {
            Ok(store) => return store,
            Err(e) if started.elapsed() < Duration::from_secs(10) => {
                println!("store not free yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot open {}: {e}", dir.display()),
        }
    }
}

/// Flips one byte of a record's value as stored (inside RocksDB, so that
/// Shoal's own checksum, not RocksDB's, is what catches it).
fn flip(store: &RocksStore, tree: Tree, key: &[u8]) {
    let mut raw = store.raw_get(tree, key).expect("record present");
    let last = raw.len() - 1;
    raw[last] ^= 0x20;
    store
        .raw_put(tree, key, &raw)
        .expect("write the flipped record");
}

/// Acceptance 3: a byte flipped on disk in an object and in a hint. The
/// node starts and serves every other key; the corrupt key reads from the
/// healthy replica, and is restored once every other primary answers
/// (node3 is down until then); the corrupt hint is handed off as lost (its
/// primary restores the key from the others) and the others as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_flipped_in_an_object_and_in_a_hint_heals_from_the_replicas() {
    let c = DevCluster::start(3).await;
    let client = c.client().await;
    c.kill9("node3").await;
    c.wait_seen("node3", false, Duration::from_secs(10)).await;
    // Learnt from the ring: a write to a silent node is not retried elsewhere.
    client.refresh_ring().await.expect("ring");
    let keys: Vec<String> = (0..30).map(|i| format!("key{i}")).collect();
    for k in &keys {
        client
            .put_with(k.as_bytes(), k.as_bytes(), None, W2)
            .await
            .expect("put");
    }
    // The node holding the most hints for node3 is the victim.
    let statuses = c.statuses().await;
    let victim = statuses
        .iter()
        .max_by_key(|s| s.hints_pending.iter().map(|h| h.pending).sum::<u64>())
        .expect("statuses")
        .name
        .clone();
    c.kill9(&victim).await;
    let dir = c.config_of(&victim).data_dir.join("db");
    let (bad_key, bad_hint) = {
        let store = open_store(&dir).await;
        let hints = store.scan(Tree::Hints, b"", None, 1).expect("hints");
        let (hint_key, _) = hints.first().expect("the victim holds hints").clone();
        flip(&store, Tree::Hints, &hint_key);
        flip(&store, Tree::Objects, b"key7");
        (b"key7".to_vec(), hint_key)
    };
    println!(
        "{victim}: flipped a byte of key7's object and of hint {}",
        hex::encode(&bad_hint)
    );
    c.restart(&victim);
    settled(&c, &victim).await;
    // It serves every other key (R=3 needs its answer: node3 is down, so
    // read the two live ones with R=2 from each coordinator's side).
    for k in keys.iter().filter(|k| k.as_bytes() != bad_key) {
        let read = client
            .get_with(k.as_bytes(), W2)
            .await
            .expect("other keys serve");
        assert_eq!(read.values.len(), 1, "{k}");
        assert_eq!(read.values[0].0, k.as_bytes());
    }
    // A read of the corrupt key at R=2 needs both live replicas: the
    // victim's lost copy does not count (its primary node3 is down, so it
    // cannot be restored yet). R=1 reads from the healthy one.
    let one = RequestOptions { r: Some(1), ..W2 };
    let read = client
        .get_with(&bad_key, one)
        .await
        .expect("read the corrupt key");
    assert_eq!(read.values[0].0, bad_key);
    let m = c.metrics(&victim);
    assert_eq!(
        metric(&m, "shoal_corrupt_records_total{tree=\"objects\"}"),
        Some(1.0)
    );
    // node3 comes back: every hint is handed off, the corrupt one as lost
    // (counted); the victim's copy is restored from both others.
    let back = Instant::now();
    c.restart("node3");
    c.wait_for("hints handed off", Duration::from_secs(30), |all| {
        all.len() == 3 && DevCluster::hints_held(all) == 0
    })
    .await;
    let m = c.metrics(&victim);
    assert_eq!(
        metric(&m, "shoal_corrupt_records_total{tree=\"hints\"}"),
        Some(1.0)
    );
    eventually(
        "the corrupt copy restored",
        Duration::from_secs(40),
        async || {
            let report = client.inspect(&bad_key).await.expect("inspect");
            all_hold(&report, &bad_key)
        },
    )
    .await;
    println!(
        "the victim's copy of key7 restored {:?} after node3 returned",
        back.elapsed()
    );
    // And every key is whole everywhere once anti-entropy or a read has
    // passed (the key of the lost hint once node3 restored it).
    for k in &keys {
        eventually(k, Duration::from_secs(40), async || {
            let report = client.inspect(k.as_bytes()).await.expect("inspect");
            all_hold(&report, k.as_bytes())
                || client
                    .get_with(k.as_bytes(), RequestOptions { r: Some(3), ..W2 })
                    .await
                    .is_ok()
        })
        .await;
    }
}

/// RocksDB's own block checksum: a byte flipped in an SST file. The read
/// of a key in that block fails on this replica (RocksDB reports
/// corruption), the node drops the key as it drops a record failing
/// Shoal's checksum, and one read restores it from the other replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_flipped_in_an_sst_file_heals_from_the_replicas() {
    let c = DevCluster::start(3).await;
    let client = c.client().await;
    // Random bytes do not compress, so they appear verbatim in the file.
    let value: Vec<u8> = (0..4096).map(|_| rand::random::<u8>()).collect();
    client
        .put_with(b"victim", &value, None, RequestOptions { w: Some(3), ..W2 })
        .await
        .expect("put");
    c.kill9("node1").await;
    let dir = c.config_of("node1").data_dir.join("db");
    {
        let store = open_store(&dir).await;
        store.flush().expect("flush to SST files");
    }
    let mut flipped = 0;
    for entry in std::fs::read_dir(&dir).expect("data dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "sst") {
            let mut bytes = std::fs::read(&path).expect("sst");
            if let Some(pos) = bytes.windows(64).position(|w| w == &value[1000..1064]) {
                bytes[pos + 10] ^= 0x01;
                std::fs::write(&path, &bytes).expect("write sst");
                flipped += 1;
            }
        }
    }
    assert_eq!(flipped, 1, "the value is in one SST file");
    c.restart("node1");
    settled(&c, "node1").await;
    let read = client.get(b"victim").await.expect("read");
    assert_eq!(read.values[0].0, value);
    eventually(
        "node1's copy restored",
        Duration::from_secs(10),
        async || {
            let report = client.inspect(b"victim").await.expect("inspect");
            report.replicas.iter().any(|r| {
                r.node == "node1" && r.object.as_ref().is_some_and(|o| o.siblings.len() == 1)
            })
        },
    )
    .await;
    let m = c.metrics("node1");
    assert_eq!(
        metric(&m, "shoal_corrupt_records_total{tree=\"objects\"}"),
        Some(1.0)
    );
}

/// Acceptance 4: a peer that accepts connections and never answers
/// (SIGSTOP) delays no handoff and no anti-entropy to the other peers, and
/// leaves no task behind: the request tasks drain, the runtime's task count
/// returns to where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_peer_delays_no_handoff_and_leaks_no_task() {
    let mut c = DevCluster::start(4).await;
    c.reconfigure(|config| {
        let mut t = toml::Table::new();
        t.insert("interval-ms".into(), toml::Value::Integer(1000));
        config.insert("anti-entropy".into(), toml::Value::Table(t));
    })
    .await;
    let client = c.client().await;
    let keys: Vec<String> = (0..200).map(|i| format!("key{i}")).collect();
    c.kill9("node4").await;
    c.wait_seen("node4", false, Duration::from_secs(10)).await;
    // Learnt from the ring: a write to a silent node is not retried elsewhere.
    client.refresh_ring().await.expect("ring");
    for k in &keys {
        client
            .put_with(k.as_bytes(), b"v", None, W2)
            .await
            .expect("put");
    }
    let tasks_before = metric(&c.metrics("node1"), "shoal_tasks_alive").expect("tasks gauge");
    // Exchanges are started by the lower id of each pair: count them over
    // the nodes that keep running.
    let exchanges = || -> f64 {
        ["node1", "node2", "node4"]
            .iter()
            .map(|n| metric(&c.metrics(n), "shoal_aae_exchanges_total").unwrap_or(0.0))
            .sum()
    };
    // node3 stops answering; node4 comes back.
    let node3 = c.pid_of("node3").await as i32;
    unsafe { libc::kill(node3, libc::SIGSTOP) };
    c.restart("node4");
    let started = Instant::now();
    // Meanwhile clients keep writing, some to keys node3 replicates.
    for k in keys.iter().take(100) {
        let _ = client.put_with(k.as_bytes(), b"w", None, W2).await;
    }
    let waited = eventually(
        "node4's hints handed off",
        Duration::from_secs(30),
        async || {
            // node3's own hints wait inside the stopped process.
            let statuses = c.statuses().await;
            statuses
                .iter()
                .filter(|s| s.name != "node3")
                .flat_map(|s| &s.hints_pending)
                .filter(|h| h.for_node == "node4")
                .all(|h| h.pending == 0)
                && statuses.len() == 3
        },
    )
    .await;
    println!(
        "node4's hints handed off {:?} after its restart, node3 stopped",
        started.elapsed()
    );
    assert!(waited < Duration::from_secs(20));
    // Anti-entropy goes on with the peers that answer.
    let exchanges_before = exchanges();
    eventually(
        "exchanges while node3 is stopped",
        Duration::from_secs(15),
        async || exchanges() > exchanges_before,
    )
    .await;
    // Every request task ends by its deadline (5 s): none is left once it
    // has passed. Looked for from then until two seconds later, not once
    // at a fixed moment, which a busy machine can reach with a background
    // task still finishing.
    let mut last;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let settled = Instant::now();
    let drained = loop {
        let m = c.metrics("node1");
        let tasks_after = metric(&m, "shoal_tasks_alive").expect("tasks gauge");
        let requests = metric(&m, "shoal_request_tasks");
        last = format!(
            "node1: {tasks_before} tasks before, {tasks_after} after; request tasks {requests:?}"
        );
        if requests == Some(0.0) && tasks_after <= tasks_before + 20.0 {
            break true;
        }
        if settled.elapsed() > Duration::from_secs(2) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!(
        "{last} (looked for {:?} after the deadline)",
        settled.elapsed()
    );
    assert!(drained, "request tasks left or tasks grew: {last}");
    unsafe { libc::kill(node3, libc::SIGCONT) };
}

/// Acceptance 8 (the SIGSTOP half): with one of five nodes paused, CLI
/// commands (each a fresh process: connect, ring, request) keep answering
/// quickly: the ring is asked of several seeds at once, and names the
/// members the cluster sees down, which the client then tries last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_commands_stay_fast_with_a_node_paused() {
    let c = DevCluster::start(5).await;
    let client = c.client().await;
    for i in 0..20 {
        let k = format!("key{i}");
        client
            .put_with(k.as_bytes(), b"v", None, W2)
            .await
            .expect("put");
    }
    let paused = c.pid_of("node1").await as i32;
    unsafe { libc::kill(paused, libc::SIGSTOP) };
    // The others mark it down (about 2.5 s).
    eventually("node1 seen down", Duration::from_secs(20), async || {
        (2..=5).all(|i| {
            let m = c.metrics(&format!("node{i}"));
            metric(&m, "shoal_peer_up{peer=\"node1\"}") == Some(0.0)
        })
    })
    .await;
    let took = time_cli_commands(|args| {
        let out = c.shoal(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    unsafe { libc::kill(paused, libc::SIGCONT) };
    let p50 = took[took.len() / 2];
    let p99 = took[took.len() * 99 / 100];
    println!(
        "200 CLI commands with node1 paused: p50 {p50:?}, p99 {p99:?}, max {:?}",
        took[199]
    );
    assert!(p99 < Duration::from_millis(300), "p99 {p99:?}");
}

/// A write forwarded to a primary that is paused (SIGSTOP) is not handed
/// to the next primary as well: the paused process's kernel queues the
/// request and it runs when the process resumes. Run twice, the write had
/// two versions; the client overwrote the one it read, and the other came
/// back as a sibling of the overwrite. (Found by the chaos suite: values
/// superseded by an acknowledged write back in the final state, each
/// written ~310 ms after a node was paused, just past the 300 ms probe.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_forwarded_to_a_paused_primary_is_not_run_twice() {
    let c = DevCluster::start(4).await;
    let client = c.client().await;
    let info = client.ring_info().expect("ring");
    let id = |name: &str| {
        info.members
            .iter()
            .find(|m| m.name == name)
            .expect("member")
            .clone()
    };
    let node1 = id("node1");
    // A key whose first primary is node1, sent to the member that does not
    // hold it: that node forwards it, to node1 first.
    let (key, outsider) = (0..100_000)
        .map(|i| format!("key{i}"))
        .find_map(|k| {
            let p = shoal_ring::partition_of(k.as_bytes(), info.ring.partition_count());
            let primaries = info.ring.preference_list_for_partition(p, info.n as usize);
            let outsider = info.members.iter().find(|m| !primaries.contains(&m.id))?;
            (primaries[0] == node1.id).then(|| (k, outsider.clone()))
        })
        .expect("a key node1 leads");
    println!("key {key}, sent to {}", outsider.name);
    let paused = c.pid_of("node1").await as i32;
    unsafe { libc::kill(paused, libc::SIGSTOP) };
    let put = shoal_client::proto::Request::Put {
        key: key.as_bytes().to_vec(),
        value: b"x".to_vec(),
        context: None,
        options: W2,
    };
    let started = Instant::now();
    let first = client.request(outsider.client_addr, &put).await;
    println!("took {:?}", started.elapsed());
    println!("put via {} while node1 is paused: {first:?}", outsider.name);
    let acknowledged = matches!(first, Ok(shoal_client::proto::Response::Written(_)));
    // Overwrite what can be read now.
    let read = client.get_with(key.as_bytes(), W2).await.expect("get");
    client
        .put_with(key.as_bytes(), b"y", Some(&read.context), W2)
        .await
        .expect("overwrite");
    unsafe { libc::kill(paused, libc::SIGCONT) };
    c.wait_seen("node1", true, Duration::from_secs(30)).await;
    // Time for node1 to run what its kernel queued and for the replicas to
    // exchange it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let options = RequestOptions { r: Some(3), ..W2 };
    let now = client.get_with(key.as_bytes(), options).await.expect("get");
    let values: Vec<Vec<u8>> = now.values.iter().map(|v| v.0.clone()).collect();
    if acknowledged {
        assert_eq!(
            values,
            vec![b"y".to_vec()],
            "the acknowledged x was overwritten with its context; it must not come back"
        );
    } else {
        println!("the write was reported as possibly applied; now {values:?}");
    }
}
