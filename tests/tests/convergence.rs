//! Issue 4 with real `shoal` processes: a node whose data directory was
//! deleted gets every key back from anti-entropy alone, and clients keep
//! being served while it happens. Figures are printed
//! (`cargo test -p shoal-tests --test convergence -- --nocapture`).

use std::time::{Duration, Instant};

use shoal_client::proto::RequestOptions;
use shoal_client::Client;
use shoal_tests::process::{assert_on_every_replica, put_all, DevCluster};

const KEYS: usize = 100_000;

/// Latency percentiles of `count` sequential gets. They read keys that were
/// never written, so they read-repair nothing: node3 gets its data from
/// anti-entropy alone.
async fn get_latencies(client: &Client, count: usize) -> (Duration, Duration) {
    let mut took = Vec::with_capacity(count);
    for i in 0..count {
        let key = format!("absent-{i:06}");
        let started = Instant::now();
        client.get(key.as_bytes()).await.expect("get");
        took.push(started.elapsed());
    }
    took.sort();
    (took[count / 2], took[count * 99 / 100])
}

/// Acceptance 1 and 4: 3 nodes, 100,000 keys; node3 is stopped, its data
/// directory deleted, and it starts empty. With no client reads of those
/// keys, anti-entropy restores every key to it within 180 s (checked
/// replica by replica); client get latency is reported with and without the
/// exchanges running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_gets_every_key_back_from_anti_entropy() {
    let mut c = DevCluster::start(3).await;
    c.reconfigure(|config| {
        let mut aae = toml::Table::new();
        aae.insert("interval-ms".into(), toml::Value::Integer(1_000));
        config.insert("anti-entropy".into(), toml::Value::Table(aae));
    })
    .await;
    let client = c.client().await;
    let keys: Vec<String> = (0..KEYS).map(|i| format!("aae-{i:06}")).collect();
    let started = Instant::now();
    put_all(&client, &keys, RequestOptions::default(), 32).await;
    println!("wrote {KEYS} keys in {:?}", started.elapsed());
    let idle = get_latencies(&client, 2_000).await;

    c.kill9("node3").await;
    std::fs::remove_dir_all(c.path().join("node3")).expect("delete node3's data");
    c.restart("node3");
    let restarted = Instant::now();
    c.wait_ready(Duration::from_secs(60)).await;
    let busy = get_latencies(&client, 2_000).await;

    // Wait until the repair counters reach the key count and then stay still
    // for 3 s (no exchange is repairing), then check every key on every
    // replica.
    let mut last = u64::MAX;
    loop {
        let repaired: u64 = c
            .statuses()
            .await
            .iter()
            .map(|s| s.anti_entropy.keys_repaired)
            .sum();
        if repaired >= KEYS as u64 && repaired == last {
            break;
        }
        last = repaired;
        assert!(
            restarted.elapsed() < Duration::from_secs(180),
            "not restored within 180 s ({repaired} keys repaired); logs:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let restored = restarted.elapsed() - Duration::from_secs(3);
    assert_on_every_replica(&client, &keys).await;
    let statuses = c.statuses().await;
    let bytes: u64 = statuses.iter().map(|s| s.anti_entropy.bytes).sum();
    println!(
        "node3 restored {restored:?} after restart; every key verified on every replica {:?} after restart; \
         anti-entropy exchanged {bytes} bytes",
        restarted.elapsed()
    );
    println!(
        "client get latency: idle p50 {:?} p99 {:?}; during anti-entropy p50 {:?} p99 {:?}",
        idle.0, idle.1, busy.0, busy.1
    );
}
