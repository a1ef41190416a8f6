//! Growing, shrinking and repairing a real cluster while it serves (issue
//! 12, acceptance 1 to 3): `shoal` processes on loopback, a bounded
//! workload with a checker running throughout.
//!
//! One test, in steps, so the cluster starts once: 3 -> 5 nodes (two joins
//! through seeds, planned and committed), 5 -> 4 (`shoal leave`), and a
//! node killed for good and `shoal remove`d (4 -> 3). After each change:
//! no acknowledged write lost and no read that missed one, errors below
//! 0.1%, the ring balanced, every key on exactly its new primaries and no
//! copy left elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_client::proto::{ClusterCommand, NodeStatus};
use shoal_client::Client;
use shoal_tests::process::{put_all, DevCluster, W2};

/// Keys written before the changes; the workload rewrites them.
const KEYS: usize = 10_000;
/// Workers of the workload and the rate they keep together.
const WORKERS: usize = 8;
const OPS_PER_SEC: u64 = 1_000;

fn key(i: usize) -> String {
    format!("k{i:05}")
}

/// What the workload saw.
#[derive(Default)]
struct Tally {
    ops: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
    /// Reads that did not return the key's last acknowledged value.
    misses: Mutex<Vec<String>>,
    /// Per key: the last acknowledged value, and values written since
    /// whose outcome is unknown (an error after which the write may have
    /// landed).
    last: Mutex<BTreeMap<usize, (String, BTreeSet<String>)>>,
}

/// Each worker owns the keys `i % WORKERS == w` and is their only writer:
/// it reads a key (which must return the value it last had acknowledged,
/// or one whose write it does not know the outcome of), then writes a new
/// value with the read's context.
async fn workload(client: Client, w: usize, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    // Each round is two operations (a read and a write).
    let pace = Duration::from_micros(2 * 1_000_000 * WORKERS as u64 / OPS_PER_SEC);
    let mut seq = 0u64;
    let mut next = Instant::now();
    let mut i = w;
    while !stop.load(Ordering::Relaxed) {
        next += pace;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        i = (i + WORKERS * 37) % KEYS;
        if i % WORKERS != w {
            i = i - i % WORKERS + w;
            if i >= KEYS {
                i = w;
            }
        }
        let k = key(i);
        tally.ops.fetch_add(1, Ordering::Relaxed);
        let read = match client.get_with(k.as_bytes(), W2).await {
            Ok(read) => read,
            Err(_) => {
                tally.errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let values: BTreeSet<String> = read
            .values
            .iter()
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
            .collect();
        {
            let last = tally.last.lock().unwrap();
            let (acked, unsure) = last
                .get(&i)
                .cloned()
                .unwrap_or_else(|| (k.clone(), BTreeSet::new()));
            if !values.contains(&acked) && values.is_disjoint(&unsure) {
                tally
                    .misses
                    .lock()
                    .unwrap()
                    .push(format!("{k}: read {values:?}, last acknowledged {acked:?}"));
            }
        }
        seq += 1;
        let value = format!("w{w}-{seq}");
        tally.ops.fetch_add(1, Ordering::Relaxed);
        match client
            .put_with(k.as_bytes(), value.as_bytes(), Some(&read.context), W2)
            .await
        {
            Ok(_) => {
                tally.acked.fetch_add(1, Ordering::Relaxed);
                tally
                    .last
                    .lock()
                    .unwrap()
                    .insert(i, (value, BTreeSet::new()));
            }
            Err(_) => {
                tally.errors.fetch_add(1, Ordering::Relaxed);
                let mut last = tally.last.lock().unwrap();
                let entry = last
                    .entry(i)
                    .or_insert_with(|| (k.clone(), BTreeSet::new()));
                entry.1.insert(value);
            }
        }
    }
}

/// Stages nothing itself: waits (bounded) until the plan lists `expect`
/// staged changes, prints it, and commits it with the CLI.
async fn commit(c: &DevCluster, client: &Client, expect: usize) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let plan = loop {
        let reply = client.cluster(ClusterCommand::Plan).await;
        if let Ok(reply) = &reply {
            if reply.staged.len() >= expect {
                if let Some(plan) = &reply.plan {
                    break plan.clone();
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no plan for {expect} changes: {reply:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    // The plan says about how much will be copied (10,000 keys are there).
    assert!(
        plan.expected_bytes.is_some_and(|b| b > 0),
        "no expected bytes in the plan: {plan:?}"
    );
    let shown = c.shoal(&["cluster", "plan"]);
    println!("{}", String::from_utf8_lossy(&shown.stdout));
    // The command the plan prints, with its id.
    let command = String::from_utf8_lossy(&shown.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("commit with: shoal "))
        .expect("the plan prints how to commit it")
        .to_string();
    assert!(
        command.ends_with(&format!("--plan {:016x}", plan.id)),
        "{command}"
    );
    let args: Vec<&str> = command.split_whitespace().collect();
    let out = c.shoal(&args);
    assert!(
        out.status.success(),
        "commit: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    plan.version
}

/// Waits (bounded) until every running member is on `version`, nothing
/// is in transition and no node holds a copy it does not replicate.
async fn settled(c: &DevCluster, version: u64, members: usize) -> Duration {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(180);
    loop {
        let all: Vec<NodeStatus> = c.statuses().await;
        let done = all.len() >= members
            && all.iter().all(|s| {
                s.ring_version == version
                    && s.transition.is_none()
                    && s.transfer.is_none()
                    && s.keys_unowned == 0
            });
        if done {
            return started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "layout {version} not settled: {:?}\nlogs:\n{}",
            all.iter()
                .map(|s| (
                    &s.name,
                    s.ring_version,
                    &s.transition,
                    &s.transfer,
                    s.keys_unowned
                ))
                .collect::<Vec<_>>(),
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every key holds its last acknowledged value (or one whose write's
/// outcome is unknown) on each of its N primaries, replica by replica.
async fn check_keys(client: &Client, tally: &Tally) {
    let last = tally.last.lock().unwrap().clone();
    let client = client.clone();
    let bad = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for t in 0..16 {
        let (client, last, bad) = (client.clone(), last.clone(), bad.clone());
        tasks.push(tokio::spawn(async move {
            for i in (t..KEYS).step_by(16) {
                let k = key(i);
                let (acked, unsure) = last
                    .get(&i)
                    .cloned()
                    .unwrap_or((k.clone(), BTreeSet::new()));
                // A replica that did not answer (busy, just restarted) is
                // asked again, a few times.
                let mut report = client.inspect(k.as_bytes()).await.expect("inspect");
                for _ in 0..5 {
                    if report.replicas.iter().all(|r| r.error.is_none()) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    report = client.inspect(k.as_bytes()).await.expect("inspect");
                }
                if report.replicas.len() != 3 {
                    bad.lock()
                        .unwrap()
                        .push(format!("{k}: {} replicas", report.replicas.len()));
                }
                for r in &report.replicas {
                    let values: BTreeSet<String> = r
                        .object
                        .iter()
                        .flat_map(|o| o.siblings.iter())
                        .filter_map(|s| s.value.as_ref())
                        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
                        .collect();
                    if !values.contains(&acked) && values.is_disjoint(&unsure) {
                        bad.lock().unwrap().push(format!(
                            "{k} on {}: {values:?} (error {:?}), last acknowledged {acked:?}",
                            r.node, r.error
                        ));
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("checker");
    }
    let bad = bad.lock().unwrap();
    assert!(
        bad.is_empty(),
        "{} keys not on their primaries: {:?}",
        bad.len(),
        &bad[..bad.len().min(10)]
    );
}

/// Partitions and replicas per node, from a node's ring.
async fn shares(client: &Client) -> BTreeMap<String, (usize, usize)> {
    let info = client.refresh_ring().await.expect("ring");
    let names: BTreeMap<_, _> = info
        .members
        .iter()
        .map(|m| (m.id, m.name.clone()))
        .collect();
    let mut out: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for p in 0..info.ring.partition_count() {
        out.entry(names[&info.ring.owner(p)].clone()).or_default().0 += 1;
        for id in info.ring.preference_list_for_partition(p, 3) {
            out.entry(names[&id].clone()).or_default().1 += 1;
        }
    }
    out
}

/// Owners within one partition of Q/M, replicas within 5% of fair.
fn assert_balanced(shares: &BTreeMap<String, (usize, usize)>, q: usize) {
    let m = shares.len();
    for (name, (owned, replicas)) in shares {
        assert!(
            owned.abs_diff(q / m) <= 1,
            "{name} owns {owned} partitions, Q/M = {}: {shares:?}",
            q / m
        );
        let fair = 3.0 * q as f64 / m as f64;
        assert!(
            (*replicas as f64 - fair).abs() <= 0.05 * fair,
            "{name} holds {replicas} replicas, fair {fair:.1}: {shares:?}"
        );
    }
}

fn report(what: &str, tally: &Tally, took: Duration) {
    let ops = tally.ops.load(Ordering::Relaxed);
    let errors = tally.errors.load(Ordering::Relaxed);
    println!(
        "{what}: settled in {took:.1?}; workload so far {ops} operations, {} writes acknowledged, {errors} errors ({:.3}%), {} missed reads",
        tally.acked.load(Ordering::Relaxed),
        100.0 * errors as f64 / ops.max(1) as f64,
        tally.misses.lock().unwrap().len()
    );
    assert!(
        tally.misses.lock().unwrap().is_empty(),
        "{:?}",
        tally.misses.lock().unwrap()
    );
    assert!(
        errors * 1000 < ops.max(1),
        "errors {errors} of {ops} operations"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grow_to_five_shrink_to_four_and_replace_a_dead_node_while_serving() {
    let c = DevCluster::start(3).await;
    let client = c.client().await;
    let q = c.config_of("node1").cluster.partitions as usize;
    let keys: Vec<String> = (0..KEYS).map(key).collect();
    let loaded = Instant::now();
    put_all(&client, &keys, W2, 32).await;
    println!("{KEYS} keys written in {:.1?}", loaded.elapsed());

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| tokio::spawn(workload(client.clone(), w, tally.clone(), stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 3 -> 5: two nodes configured with the founding nodes as seeds.
    let before = shares(&client).await;
    let ring_before = client.refresh_ring().await.expect("ring").ring.clone();
    for _ in 0..2 {
        let out = c.shoal(&["dev", "--add", "--no-start"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // node5 is pointed at the cluster with `shoal join SEED`, from one
    // member's address alone.
    let path = c.path().join("node5.toml");
    let mut config: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    config["cluster"].as_table_mut().unwrap().remove("seeds");
    std::fs::write(&path, config.to_string()).unwrap();
    let seed = c.config_of("node1").client_addr.to_string();
    let out = c.shoal(&["join", &seed, "--config", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "join: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout).trim());
    assert!(c.config_of("node5").cluster.seeds.len() >= 3);
    c.restart("node4");
    c.restart("node5");
    let v = commit(&c, &client, 2).await;
    let took = settled(&c, v, 5).await;
    report("3 -> 5", &tally, took);
    let after = shares(&client).await;
    println!("partitions and replicas per node: before {before:?}, after {after:?}");
    assert_eq!(after.len(), 5);
    assert_balanced(&after, q);
    // Movement within the ring's stated bounds: a join of S+1 to S moves at
    // most ceil(Q/(S+1)) + 2(N-1) partitions (plus repairs of breaches of
    // the previous ring, 2 per breach); a replica moves per partition moved
    // at most N times.
    let ring_after = client.refresh_ring().await.expect("ring").ring.clone();
    let moved = shoal_ring::partitions_moved(&ring_before, &ring_after);
    let replicas_moved: usize = shoal_ring::transfers(&ring_before, &ring_after, 3)
        .iter()
        .map(|t| t.to.len())
        .sum();
    let fair = 3 * q * 2 / 5;
    println!("3 -> 5 moved {moved} partitions and {replicas_moved} replicas (the two new nodes' fair share: {fair})");
    assert!(
        replicas_moved <= 3 * moved,
        "{replicas_moved} replicas for {moved} partitions"
    );
    assert!(
        replicas_moved <= fair + fair / 20,
        "{replicas_moved} replicas moved, fair share {fair}"
    );
    // The SDK follows the ring without a restart.
    assert_eq!(client.ring_info().unwrap().members.len(), 5);

    // 5 -> 4: node2 leaves.
    let leaver = c.pid_of("node2").await;
    let out = c.shoal(&["leave", "node2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = commit(&c, &client, 1).await;
    let took = settled(&c, v, 4).await;
    report("5 -> 4 (leave)", &tally, took);
    let after = shares(&client).await;
    assert_eq!(after.len(), 4);
    assert!(!after.contains_key("node2"));
    assert_balanced(&after, q);
    // Having handed everything off, the leaver stops by itself.
    let stopped = wait_exit(leaver, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| {
            let log = std::fs::read_to_string(c.path().join("node2.log")).unwrap_or_default();
            let said: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("left") || l.contains("member") || l.contains("WARN"))
                .collect();
            panic!(
                "node2 left and did not stop: {e}\nwhat its log says of it:\n{}\nlogs:\n{}",
                said.join("\n"),
                c.logs()
            )
        });
    println!("node2 stopped by itself {stopped:.1?} after the leave settled");

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    check_keys(&client, &tally).await;

    // A node killed for good and removed: its keys are back to 3 copies
    // with no client reads (the new replicas pull them).
    c.kill9("node3").await;
    let out = c.shoal(&["remove", "node3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let started = Instant::now();
    let v = commit(&c, &client, 1).await;
    let took = settled(&c, v, 3).await;
    println!("node3 removed: every key back on 3 replicas {:.1?} after the commit ({took:.1?} to settle)", started.elapsed());
    check_keys(&client, &tally).await;
    assert_balanced(&shares(&client).await, q);
}

/// Waits (bounded) until process `pid` has exited (a zombie counts: the
/// launcher reaps it); returns how long that took.
async fn wait_exit(pid: u32, within: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
        if stat.is_err() || stat.is_ok_and(|s| s.contains(") Z ")) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            return Err(format!("process {pid} still running after {within:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (bounded) until `node` reports a transfer partly done.
async fn mid_transfer(c: &DevCluster, node: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all = c.statuses().await;
        if let Some(t) = all
            .iter()
            .find(|s| s.name == node)
            .and_then(|s| s.transfer.clone())
        {
            if t.partitions_done > 0 && t.partitions_done < t.partitions_total {
                println!(
                    "{node} mid-transfer: {}/{} partitions, {} keys",
                    t.partitions_done, t.partitions_total, t.keys
                );
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{node} never mid-transfer: {:?}",
            all.iter()
                .map(|s| (&s.name, &s.transfer))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// kill -9 of the receiving node, then of a sending node, in the middle
/// of a transfer: each resumes after the restart and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transfer_resumes_after_the_receiver_or_a_sender_is_killed() {
    let mut c = DevCluster::start(3).await;
    // Slow transfers, so a kill lands in the middle of one.
    c.reconfigure(|t| {
        let aae = t
            .entry("anti-entropy")
            .or_insert(toml::Value::Table(Default::default()))
            .as_table_mut()
            .expect("table");
        aae.insert("max-repairs-per-sec".into(), toml::Value::Integer(2_000));
    })
    .await;
    let client = c.client().await;
    let keys: Vec<String> = (0..KEYS).map(key).collect();
    put_all(&client, &keys, W2, 32).await;
    let tally = Tally::default();

    for (joiner, killed) in [("node4", "node4"), ("node5", "node1")] {
        let out = c.shoal(&["dev", "--add", "--no-start"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The new node's config gets the same slow transfers.
        let path = c.path().join(format!("{joiner}.toml"));
        let mut config: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
        let aae = config
            .entry("anti-entropy")
            .or_insert(toml::Value::Table(Default::default()))
            .as_table_mut()
            .unwrap();
        aae.insert("max-repairs-per-sec".into(), toml::Value::Integer(2_000));
        std::fs::write(&path, config.to_string()).unwrap();
        c.restart(joiner);
        let v = commit(&c, &client, 1).await;
        mid_transfer(&c, joiner).await;
        c.kill9(killed).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        c.restart(killed);
        let took = settled(&c, v, 4 + usize::from(joiner == "node5")).await;
        println!(
            "{joiner} joined; {killed} killed mid-transfer and restarted; settled {took:.1?} after"
        );
        check_keys(&client, &tally).await;
    }
}

/// Six nodes in three zones, two per zone: every preference list spans
/// the three zones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn six_nodes_in_three_zones_spread_every_preference_list() {
    let mut c = DevCluster::start(3).await;
    c.reconfigure(|t| {
        let name = t["name"].as_str().unwrap().to_string();
        let zone = format!("z{}", name.trim_start_matches("node"));
        t.insert("zone".into(), toml::Value::String(zone));
    })
    .await;
    let client = c.client().await;
    for zone in ["z1", "z2", "z3"] {
        let out = c.shoal(&["dev", "--add", "--no-start", "--zone", zone]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for node in ["node4", "node5", "node6"] {
        c.restart(node);
    }
    let v = commit(&c, &client, 3).await;
    settled(&c, v, 6).await;
    let info = client.refresh_ring().await.expect("ring");
    let zones: BTreeMap<_, _> = info
        .members
        .iter()
        .map(|m| (m.id, m.zone.clone().expect("a zone")))
        .collect();
    assert_eq!(info.members.len(), 6);
    for p in 0..info.ring.partition_count() {
        let list = info.ring.preference_list_for_partition(p, 3);
        let spanned: BTreeSet<&String> = list.iter().map(|id| &zones[id]).collect();
        assert_eq!(spanned.len(), 3, "partition {p}: {list:?}");
    }
    println!(
        "6 nodes, 3 zones: all {} preference lists span 3 zones",
        info.ring.partition_count()
    );
}
