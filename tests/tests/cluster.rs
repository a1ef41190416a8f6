//! Real `shoal` processes on 127.0.0.1 over QUIC, started with `shoal dev` as a
//! user would, driven through the CLI and the SDK.

use std::time::{Duration, Instant};

use shoal_client::proto::RequestOptions;
use shoal_client::Error;
use shoal_tests::process::{scrape, DevCluster};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(o: &std::process::Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("json output")
}

const W2: RequestOptions = RequestOptions {
    r: Some(2),
    w: Some(2),
    pr: None,
    pw: None,
    timeout_ms: Some(3000),
};

/// Acceptance 1 and 2: CLI put/get; concurrent puts give siblings; a put with
/// the context resolves them; all three replicas then hold the same clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_put_get_siblings_and_inspect() {
    let c = DevCluster::start(3).await;
    let put = c.shoal(&["put", "k", "v"]);
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    assert_eq!(stdout(&c.shoal(&["get", "k"])), "v\n");

    assert!(c.shoal(&["put", "cart", "apple"]).status.success());
    assert!(c.shoal(&["put", "cart", "pear"]).status.success());
    let read = json(&c.shoal(&["get", "cart", "--json", "-r", "3"]));
    let mut values: Vec<String> = read["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    values.sort();
    assert_eq!(values, vec!["apple", "pear"]);
    let human = stdout(&c.shoal(&["get", "cart", "-r", "3"]));
    assert!(human.starts_with("2 siblings:"), "{human}");

    let ctx = read["context"].as_str().unwrap();
    assert!(c
        .shoal(&["put", "cart", "apple,pear", "--context", ctx])
        .status
        .success());
    assert_eq!(
        stdout(&c.shoal(&["get", "cart", "-r", "3"])),
        "apple,pear\n"
    );

    // The last replica may receive the write just after the reply: bounded poll.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let report = json(&c.shoal(&["inspect", "cart", "--json"]));
        let replicas = report["replicas"].as_array().unwrap();
        assert_eq!(replicas.len(), 3);
        let clocks: Vec<&serde_json::Value> = replicas.iter().map(|r| &r["clock"]).collect();
        if clocks.iter().all(|c| !c.is_null() && *c == clocks[0]) {
            for r in replicas {
                assert_eq!(r["siblings"].as_array().unwrap().len(), 1, "{report}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replicas did not converge: {report}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = json(&c.shoal(&["status", "--json"]));
    let rows = status.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rows
        .iter()
        .all(|r| r["up"] == true && r["pid"].as_u64().unwrap() > 0));
    let parts: u64 = rows.iter().map(|r| r["partitions"].as_u64().unwrap()).sum();
    assert_eq!(parts, 256);
}

/// Acceptance 3: one node down, R=W=2 still works; two down, requests fail
/// naming who answered; after restarts nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_one_then_two_nodes_and_lose_nothing() {
    let c = DevCluster::start(3).await;
    let client = c.client().await;
    let mut acked = Vec::new();
    for i in 0..30 {
        let key = format!("before-{i}");
        client
            .put_with(key.as_bytes(), key.as_bytes(), None, W2)
            .await
            .expect("put with all up");
        acked.push(key);
    }

    c.kill9("node2").await;
    // A write whose coordinator goes silent is not retried elsewhere (it
    // may still run there: a paused process runs it when it resumes), so
    // the client first learns that node2 is down, as it does from the ring.
    c.wait_seen("node2", false, Duration::from_secs(20)).await;
    client.refresh_ring().await.expect("ring");
    for i in 0..30 {
        let key = format!("one-down-{i}");
        client
            .put_with(key.as_bytes(), key.as_bytes(), None, W2)
            .await
            .expect("put with one node down");
        acked.push(key);
    }
    for key in &acked {
        let got = client
            .get_with(key.as_bytes(), W2)
            .await
            .expect("get with one node down");
        assert_eq!(got.values[0].0, key.as_bytes());
    }

    c.kill9("node3").await;
    c.wait_seen("node3", false, Duration::from_secs(20)).await;
    client.refresh_ring().await.expect("ring");
    match client.put_with(b"two-down", b"x", None, W2).await {
        Err(Error::Quorum {
            needed, answered, ..
        }) => {
            assert_eq!(needed, 2);
            assert_eq!(answered, vec!["node1".to_string()]);
        }
        other => panic!("expected a quorum error, got {other:?}"),
    }
    match client.get_with(acked[0].as_bytes(), W2).await {
        Err(Error::Quorum { answered, .. }) => assert_eq!(answered, vec!["node1".to_string()]),
        other => panic!("expected a quorum error, got {other:?}"),
    }
    let cli = c.shoal(&["get", "before-0"]);
    assert!(!cli.status.success());
    let stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(
        stderr.contains("quorum") && stderr.contains("node1"),
        "{stderr}"
    );

    c.restart("node2");
    c.restart("node3");
    c.wait_ready(Duration::from_secs(30)).await;
    let client = c.client().await;
    for key in &acked {
        let got = client
            .get_with(
                key.as_bytes(),
                RequestOptions {
                    r: Some(2),
                    timeout_ms: Some(3000),
                    ..Default::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{key} after restart: {e}"));
        assert_eq!(got.values.len(), 1, "{key}");
        assert_eq!(got.values[0].0, key.as_bytes());
    }
}

/// The SDK's read-modify-write resolves siblings in one call; `shoal dev` run
/// again on its directory keeps the data and the certificates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_read_modify_write_and_dev_rerun_keeps_data() {
    let mut c = DevCluster::start(3).await;
    let client = c.client().await;
    client.put(b"cart", b"apple", None).await.unwrap();
    let second = client.put(b"cart", b"pear", None).await.unwrap();
    assert_eq!(
        second.siblings, 2,
        "a put without context keeps the other value"
    );
    let mut seen = Vec::new();
    let resolved = client
        .read_modify_write(b"cart", 5, |siblings| {
            let mut items: Vec<&[u8]> = siblings.iter().map(|v| &v.0[..]).collect();
            items.sort();
            seen = items.iter().map(|i| i.to_vec()).collect();
            items.join(&b","[..])
        })
        .await
        .unwrap();
    assert_eq!(resolved.siblings, 1);
    assert_eq!(seen, vec![b"apple".to_vec(), b"pear".to_vec()]);
    client.delete(b"gone", None).await.unwrap();
    client.put(b"gone", b"x", None).await.unwrap();
    client.delete(b"gone", None).await.unwrap();
    assert!(
        client.get(b"gone").await.unwrap().values.is_empty(),
        "delete without a context removes what it read"
    );

    let ca_before = std::fs::read(c.path().join("ca.pem")).unwrap();
    c.rerun().await;
    assert_eq!(
        std::fs::read(c.path().join("ca.pem")).unwrap(),
        ca_before,
        "certificates reused"
    );
    let client = c.client().await;
    assert_eq!(
        client.get(b"cart").await.unwrap().values[0].0,
        b"apple,pear"
    );
}

fn peer_up(status: &serde_json::Value, observer: &str, peer: &str) -> Option<bool> {
    let row = status.as_array()?.iter().find(|r| r["name"] == observer)?;
    row["peers"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == peer)?["up"]
        .as_bool()
}

/// Issue 3, acceptance 5: a killed node is marked down by the others within
/// the detection time (defaults: about 2.4 s after its last heartbeat) and up
/// again after restart; both transitions are in the logs and the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_marked_down_and_up_again() {
    let c = DevCluster::start(3).await;
    let detection = shoal_node::detector::DetectorConfig::default().detection_time();
    let status = json(&c.shoal(&["status", "--json"]));
    assert_eq!(peer_up(&status, "node1", "node2"), Some(true));
    let metrics_addr = status.as_array().unwrap()[0]["metrics_addr"]
        .as_str()
        .unwrap()
        .to_string();
    // Counted from here: on a loaded machine node1 may have seen node2 go
    // down and up while the cluster started.
    let before = scrape(&metrics_addr);
    let (downs, ups) = (transitions(&before, "down"), transitions(&before, "up"));

    c.kill9("node2").await;
    let killed = Instant::now();
    // Watch node1's own metrics: the CLI would add its own timeouts on node2.
    while !scrape(&metrics_addr).contains("shoal_peer_up{peer=\"node2\"} 0") {
        assert!(
            killed.elapsed() < detection + Duration::from_secs(3),
            "node2 not marked down in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = killed.elapsed();
    assert_eq!(
        peer_up(&json(&c.shoal(&["status", "--json"])), "node1", "node2"),
        Some(false)
    );
    eprintln!("node2 marked down after {took:?} (detection time {detection:?})");
    let text = scrape(&metrics_addr);
    assert!(text.contains("shoal_peer_up{peer=\"node2\"} 0"), "{text}");
    assert_eq!(transitions(&text, "down"), downs + 1, "{text}");
    let log = std::fs::read_to_string(c.path().join("node1.log")).unwrap();
    assert!(
        log.contains("peer marked down") && log.contains("node2"),
        "{log}"
    );

    c.restart("node2");
    let restarted = Instant::now();
    loop {
        if peer_up(&json(&c.shoal(&["status", "--json"])), "node1", "node2") == Some(true) {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(15),
            "node2 not marked up after restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = scrape(&metrics_addr);
    assert_eq!(transitions(&text, "up"), ups + 1, "{text}");
    let log = std::fs::read_to_string(c.path().join("node1.log")).unwrap();
    assert!(log.contains("peer is up"), "{log}");
}

/// node1's count of node2's transitions `to` "down" or "up" in `metrics`.
fn transitions(metrics: &str, to: &str) -> u64 {
    let name = format!("shoal_peer_transitions_total{{peer=\"node2\",to=\"{to}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name.as_str()))
        .map_or(0, |n| n.trim().parse().expect("a count"))
}

/// Ctrl-C stops `shoal dev` at any moment, here the moment it says the
/// cluster is up, while it still asks the nodes for the status it prints. A
/// SIGINT there was lost before: each wait made its own listener, and a
/// signal that came between two listeners stopped nothing, so the launcher
/// ran on (CI saw it not stop within 15 s of a test's SIGINT).
#[test]
fn shoal_dev_stops_on_ctrl_c_the_moment_it_says_it_is_up() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().expect("temp dir");
    let mut launcher = Command::new(shoal_tests::process::shoal_bin())
        .arg("--dir")
        .arg(dir.path())
        .args(["dev", "--nodes", "1"])
        .env_remove("SHOAL_DEV_DIR")
        // Ports of its own, as every cluster of the suite has: not the
        // default range, from which the others' slices are cut.
        .env("SHOAL_DEV_PORTS", shoal_tests::process::port_range())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start shoal dev");
    // The launcher, its node and anything they started die with the test.
    struct Group(i32);
    impl Drop for Group {
        fn drop(&mut self) {
            unsafe { libc::kill(-self.0, libc::SIGKILL) };
        }
    }
    let _group = Group(launcher.id() as i32);
    // Read on a thread of its own, so that a launcher that neither prints
    // nor exits fails the wait below instead of blocking the test; the
    // thread reads on to the end, keeping the pipe open (a closed pipe
    // would end the launcher at its next line, not the Ctrl-C).
    let stdout = launcher.stdout.take().expect("stdout");
    let (lines, said) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = lines.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match said.recv_timeout(left) {
            Ok(line) if line.starts_with("Shoal dev cluster") => break,
            Ok(_) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("shoal dev not up within 60 s")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                panic!("shoal dev ended before it said it was up")
            }
        }
    }
    unsafe { libc::kill(launcher.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = launcher.try_wait().expect("launcher status") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "shoal dev did not stop within 15 s of Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // Stopped as Ctrl-C stops it (its nodes told to stop, exit code 0), not
    // killed by the signal itself or ended by an error.
    assert_eq!(status.code(), Some(0), "shoal dev ended with {status}");
}
