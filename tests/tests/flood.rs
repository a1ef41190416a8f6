//! Issue 11, acceptance 5: 1,000 client connections at once, a client that
//! sends frame headers declaring 4 GiB, and one that declares a 4 MiB body
//! and sends a quarter of it: the node's memory stays under the bound the
//! README states, and it keeps serving.
//! `cargo test -p shoal-tests --test flood -- --nocapture`

use std::time::{Duration, Instant};

use shoal_client::proto::{Request, Response, CLIENT_ALPN};
use shoal_client::{frame, tls};
use shoal_tests::process::DevCluster;

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    kb << 10
}

/// The bound the README states for a node's memory under a flood of client
/// connections: what it uses serving normally, plus per connection (QUIC
/// state and the unread bytes flow control lets it hold,
/// `limits.client-window-kb`), plus the request budget
/// (`limits.client-request-budget-mb`).
fn bound(baseline: u64, connections: u64) -> u64 {
    baseline + connections * (256 << 10) + connections * (64 << 10) + (256 << 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connections_and_huge_frames_stays_within_the_memory_bound() {
    let c = DevCluster::start(3).await;
    let client = c.client().await;
    client.put(b"alive", b"yes", None).await.expect("put");
    let addr = c.config_of("node1").client_addr;
    let pid = c.pid_of("node1").await;
    let baseline = rss(pid);

    let read = |name: &str| std::fs::read(c.path().join(name)).expect("cluster file");
    let identity = (
        tls::parse_certs(&read("client.pem")).expect("cert"),
        tls::parse_key(&read("client.key")).expect("key"),
    );
    let config = tls::quic_client_config(
        &read("ca.pem"),
        Some(identity),
        CLIENT_ALPN,
        Duration::from_secs(60),
    )
    .expect("client config");
    // One socket holds all the connections, so it asks for the SDK's receive
    // buffer: the answering handshakes arrive at once.
    let mut endpoint = tls::client_endpoint("127.0.0.1:0".parse().unwrap()).expect("endpoint");
    endpoint.set_default_client_config(config);

    // 1,000 connections, each with a request answered, all kept open.
    let started = Instant::now();
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let endpoint = endpoint.clone();
        opening.spawn(async move {
            let conn = endpoint.connect(addr, "shoal").ok()?.await.ok()?;
            let (mut send, mut recv) = conn.open_bi().await.ok()?;
            frame::write(&mut send, &(1u64, Request::Ring)).await.ok()?;
            let (_, answer): (u64, Response) = frame::read(&mut recv, 64 << 20).await.ok()?;
            matches!(answer, Response::Ring(_)).then_some(conn)
        });
    }
    let mut open = Vec::new();
    while let Some(done) = opening.join_next().await {
        if let Some(conn) = done.expect("task") {
            open.push(conn);
        }
    }
    println!(
        "{} connections open and answered in {:?}",
        open.len(),
        started.elapsed()
    );
    assert_eq!(open.len(), 1000);

    // Headers declaring 4 GiB: refused before any body is read.
    let (mut send, mut recv) = open[0].open_bi().await.expect("stream");
    let mut header = [0u8; frame::HEADER_LEN];
    header[..4].copy_from_slice(&u32::MAX.to_be_bytes());
    send.write_all(&header).await.expect("write header");
    let (_, answer): (u64, Response) = frame::read(&mut recv, 1 << 20).await.expect("answer");
    match answer {
        Response::Error(e) => println!("4 GiB header: {}", e.message),
        other => panic!("a 4 GiB header was not refused: {other:?}"),
    }
    // A 4 MiB body declared, a quarter of it sent, then nothing.
    let (mut slow, _slow_recv) = open[1].open_bi().await.expect("stream");
    header[..4].copy_from_slice(&(4u32 << 20).to_be_bytes());
    slow.write_all(&header).await.expect("write header");
    slow.write_all(&vec![0u8; 1 << 20])
        .await
        .expect("write a quarter");

    // The node keeps serving meanwhile, and its memory stays bounded.
    let mut peak = rss(pid);
    for i in 0..20 {
        let key = format!("during{i}");
        client
            .put(key.as_bytes(), b"v", None)
            .await
            .expect("put during the flood");
        assert_eq!(
            client.get(key.as_bytes()).await.expect("get").values[0].0,
            b"v"
        );
        peak = peak.max(rss(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let limit = bound(baseline, 1000);
    println!(
        "node1 RSS: {} MiB before, {} MiB at the peak with 1,000 connections; bound {} MiB",
        baseline >> 20,
        peak >> 20,
        limit >> 20
    );
    assert!(peak <= limit, "RSS {peak} over the bound {limit}");
    drop(open);
    endpoint.close(0u32.into(), b"done");
}
