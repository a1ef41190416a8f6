//! The node's endpoints on loopback: datagram sizes and ACKs.

use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::certs::{self, Kind};
use crate::net::tls::{peer_client_config, peer_port_config, Identity};

const IDLE: Duration = Duration::from_secs(10);

fn identity(dir: &std::path::Path, name: &str) -> Identity {
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    certs::issue(dir, dir, name, Kind::Node, &[localhost], None).expect("issue");
    let read = |file: String| std::fs::read(dir.join(file)).expect("read");
    Identity {
        ca_pem: read("ca.pem".into()),
        chain: shoal_client::tls::parse_certs(&read(format!("{name}.pem"))).expect("chain"),
        key: Arc::new(shoal_client::tls::parse_key(&read(format!("{name}.key"))).expect("key")),
    }
}

/// Two nodes' peer endpoints on loopback: one to accept, at its address,
/// and one to call from; the directory holds their certificates.
fn peers() -> (
    tempfile::TempDir,
    quinn::Endpoint,
    SocketAddr,
    quinn::Endpoint,
) {
    let dir = tempfile::tempdir().expect("temp dir");
    certs::create_ca(dir.path()).expect("CA");
    let (a, b) = (identity(dir.path(), "a"), identity(dir.path(), "b"));
    let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let (server, addr) = bind("peer", peer_port_config(&b, IDLE).expect("b"), any).unwrap();
    let (mut caller, _) = bind("peer", peer_port_config(&a, IDLE).expect("a"), any).unwrap();
    caller.set_default_client_config(peer_client_config(&a, IDLE).expect("a's client"));
    (dir, server, addr, caller)
}

/// Waits (5 s at most) until `conn`'s MTU discovery reaches the largest
/// datagrams allowed; it stops within 20 bytes of the bound (quinn's
/// minimum change).
async fn jumbo_found(conn: &quinn::Connection) {
    let jumbo = shoal_client::tls::MAX_UDP_PAYLOAD;
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while conn.stats().path.current_mtu < jumbo - 20 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Two peers' connection: each side asks the other to acknowledge
/// every ninth packet (`shoal_client::tls::ACK_EVERY`, or 2 ms after
/// the first unacknowledged one) instead of every second, so that
/// fewer datagrams carry nothing but an ACK. Measured on 100 small
/// messages one way, 0.2 ms apart (each in a datagram of its own, as
/// requests arrive under load; a bulk transfer's datagrams arrive in
/// batches, acknowledged once per batch anyway), where no answer
/// carries the ACKs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_acknowledges_every_ninth_packet() {
    // A busy machine can coalesce the writes into few datagrams, which
    // shows nothing: such a run is tried again, a few times at most.
    for attempt in 1..=5 {
        let (acks, datagrams) = ninth_packet_run().await;
        println!("{acks} ACK frames for {datagrams} datagrams received");
        if datagrams < 50 {
            assert!(attempt < 5, "{datagrams} datagrams: the test shows nothing");
            continue;
        }
        assert!(
            acks * 3 < datagrams,
            "{acks} ACK frames for {datagrams} datagrams received"
        );
        return;
    }
}

/// One run of [`a_peer_acknowledges_every_ninth_packet`]: the ACK frames
/// the receiver sent and the datagrams it received.
async fn ninth_packet_run() -> (u64, u64) {
    let (_dir, server, addr, caller) = peers();
    let receiver = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let mut stream = conn.accept_uni().await.unwrap();
        let before = conn.stats();
        let got = stream.read_to_end(8 << 20).await.unwrap().len();
        let after = conn.stats();
        let acks = after.frame_tx.acks - before.frame_tx.acks;
        let datagrams = after.udp_rx.datagrams - before.udp_rx.datagrams;
        (got, acks, datagrams, conn)
    });
    let conn = caller.connect(addr, "b").unwrap().await.expect("handshake");
    let mut stream = conn.open_uni().await.unwrap();
    for _ in 0..100 {
        stream.write_all(&[7u8; 100]).await.unwrap();
        // Spun, not slept (a timer's granularity is a millisecond),
        // while the connection's driver sends on the other worker.
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_micros(200) {
            std::hint::spin_loop();
        }
    }
    stream.finish().unwrap();
    let (got, acks, datagrams, _held) = receiver.await.unwrap();
    assert_eq!(got, 100 * 100);
    (acks, datagrams)
}

/// An answer larger than the sender's congestion window is not held
/// back by the ACK delay at each round: between peers that found
/// jumbo datagrams, a fresh connection's window holds two of them
/// (quinn's cubic: 2 x MTU), and a peer that acknowledged only every
/// ninth packet or after its 25 ms delay made a 64 KiB answer wait
/// 25 ms per round of slow start. Asked for a short ACK delay
/// (`shoal_client::tls::ACK_DELAY`), it takes a few milliseconds.
#[tokio::test]
async fn an_answer_larger_than_the_window_is_not_held_by_the_ack_delay() {
    let (_dir, server, addr, caller) = peers();
    let answering = tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            let conn = incoming.await.unwrap();
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    recv.read_to_end(16).await.unwrap();
                    send.write_all(&vec![7u8; 64 << 10]).await.unwrap();
                    send.finish().unwrap();
                }
            });
        }
    });
    let mut fastest = Duration::MAX;
    for _ in 0..5 {
        let conn = caller.connect(addr, "b").unwrap().await.expect("handshake");
        jumbo_found(&conn).await;
        let started = std::time::Instant::now();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"?").await.unwrap();
        send.finish().unwrap();
        let answer = recv.read_to_end(1 << 20).await.unwrap();
        assert_eq!(answer.len(), 64 << 10);
        fastest = fastest.min(started.elapsed());
    }
    answering.abort();
    println!("a 64 KiB answer on a fresh connection: {fastest:?} at best of 5");
    assert!(
        fastest < Duration::from_millis(20),
        "a 64 KiB answer took {fastest:?} at best of 5"
    );
}

/// Two nodes' peer endpoints on loopback, whose MTU is 64 KiB: their
/// connection finds and uses datagrams of the largest size allowed
/// (`shoal_client::tls::MAX_UDP_PAYLOAD`, 6,548 bytes), not Ethernet's
/// 1452 bytes.
#[tokio::test]
async fn peers_on_a_path_that_carries_jumbo_frames_send_jumbo_datagrams() {
    let (_dir, server, addr, caller) = peers();
    let accepted = tokio::spawn(async move { server.accept().await.unwrap().await.unwrap() });
    let conn = caller.connect(addr, "b").unwrap().await.expect("handshake");
    let _held = accepted.await.unwrap();
    let jumbo = shoal_client::tls::MAX_UDP_PAYLOAD;
    jumbo_found(&conn).await;
    let mtu = conn.stats().path.current_mtu;
    assert!(
        mtu >= jumbo - 20 && mtu <= jumbo,
        "datagrams of {mtu} bytes"
    );
}
