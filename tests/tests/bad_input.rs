//! Acceptance 4: bad input gets a clear error and the node keeps serving:
//! an oversized value, malformed and oversized frames, a peer with a foreign
//! certificate or none, a peer claiming another node's name.

use std::sync::Arc;
use std::time::Duration;

use shoal_client::error::ErrorKind;
use shoal_client::frame;
use shoal_client::proto::{Request, RequestOptions, Response, CLIENT_ALPN};
use shoal_client::{Client, ClientConfig, Error};
use shoal_node::net::tls::{peer_client_config, Identity};
use shoal_node::net::{PeerEnvelope, PeerError, PeerRequest, PeerResponse};
use shoal_tests::process::DevCluster;

async fn raw_endpoint(config: quinn::ClientConfig) -> quinn::Endpoint {
    let mut e = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    e.set_default_client_config(config);
    e
}

fn identity(ca_pem: Vec<u8>, dir: &std::path::Path, name: &str) -> Identity {
    let chain =
        shoal_client::tls::parse_certs(&std::fs::read(dir.join(format!("{name}.pem"))).unwrap())
            .unwrap();
    let key =
        shoal_client::tls::parse_key(&std::fs::read(dir.join(format!("{name}.key"))).unwrap())
            .unwrap();
    Identity {
        ca_pem,
        chain,
        key: Arc::new(key),
    }
}

/// Sends raw bytes on a new stream and reads every framed answer, with its
/// request id, until the node finishes the stream.
async fn raw_exchange(
    conn: &quinn::Connection,
    bytes: &[u8],
) -> Result<Vec<(u64, Response)>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    // A refused oversized frame may reset our sending side: ignore write errors.
    let _ = frame::write_raw(&mut send, bytes).await;
    let mut answers = Vec::new();
    while let Some(answer) = frame::read_next(&mut recv, 1 << 20)
        .await
        .map_err(|e| e.to_string())?
    {
        answers.push(answer);
    }
    Ok(answers)
}

/// The one answer to a frame whose id cannot be read: it carries `NO_ID`.
async fn raw_call(conn: &quinn::Connection, bytes: &[u8]) -> Result<Response, String> {
    let mut answers = raw_exchange(conn, bytes).await?;
    assert_eq!(answers.len(), 1, "{answers:?}");
    let (id, response) = answers.remove(0);
    assert_eq!(id, shoal_node::net::quic::NO_ID);
    Ok(response)
}

async fn still_serving(c: &DevCluster) {
    let client = c.client().await;
    client
        .put(b"alive", b"yes", None)
        .await
        .expect("node still serves writes");
    assert_eq!(client.get(b"alive").await.unwrap().values[0].0, b"yes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_nodes_keep_serving() {
    let c = DevCluster::start(3).await;
    let ca = std::fs::read(c.path().join("ca.pem")).unwrap();
    let seeds: Vec<std::net::SocketAddr> = std::fs::read_to_string(c.path().join("seeds.txt"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();

    // 1. A value over the limit: the SDK refuses it before sending...
    let client = c.client().await;
    let big = vec![7u8; (4 << 20) + 1];
    assert!(matches!(
        client.put(b"big", &big, None).await,
        Err(Error::TooLarge(_))
    ));
    // ...and a client that skips the check gets the node's refusal.
    let mut lax = ClientConfig::from_dir(c.path()).unwrap();
    lax.max_value_bytes = usize::MAX;
    let lax = Client::connect(lax).await.unwrap();
    match lax.put(b"big", &big, None).await {
        Err(Error::TooLarge(m)) => assert!(m.contains("4194304"), "{m}"),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(
        client.get(b"big").await.unwrap().values.is_empty(),
        "nothing was written"
    );

    // 2. Malformed frames on the client port.
    let dev_client = identity(ca.clone(), c.path(), "client");
    let config = shoal_client::tls::quic_client_config(
        &ca,
        Some((dev_client.chain, dev_client.key.clone_key())),
        CLIENT_ALPN,
        Duration::from_secs(10),
    )
    .unwrap();
    let endpoint = raw_endpoint(config).await;
    let conn = endpoint.connect(seeds[0], "shoal").unwrap().await.unwrap();
    let garbage = b"\x00\x00\x00\x05\xde\xad\xbe\xefhello";
    match raw_call(&conn, garbage).await.unwrap() {
        Response::Error(e) => assert!(
            e.kind == ErrorKind::BadRequest && e.message.contains("checksum"),
            "{e:?}"
        ),
        other => panic!("{other:?}"),
    }
    let mut not_msgpack = frame::encode(&"just a string").unwrap();
    not_msgpack.truncate(8 + 3);
    let len = 3u32.to_be_bytes();
    not_msgpack[0..4].copy_from_slice(&len);
    let crc = crc32fast::hash(&not_msgpack[8..]);
    not_msgpack[4..8].copy_from_slice(&crc.to_be_bytes());
    match raw_call(&conn, &not_msgpack).await.unwrap() {
        Response::Error(e) => assert_eq!(e.kind, ErrorKind::BadRequest, "{e:?}"),
        other => panic!("{other:?}"),
    }
    let oversized = [0xffu8, 0xff, 0xff, 0xff, 0, 0, 0, 0];
    match raw_call(&conn, &oversized).await.unwrap() {
        Response::Error(e) => assert!(
            e.kind == ErrorKind::TooLarge && e.message.contains("cap"),
            "{e:?}"
        ),
        other => panic!("{other:?}"),
    }
    match raw_call(&conn, b"\x00\x00").await.unwrap() {
        Response::Error(e) => assert_eq!(e.kind, ErrorKind::BadRequest, "{e:?}"),
        other => panic!("{other:?}"),
    }
    // The same connection still serves good requests. A well-framed message
    // that is not a request is refused under its own id, and the requests
    // after it on the same stream are answered, each under its id.
    let get = Request::Get {
        key: b"alive".to_vec(),
        options: RequestOptions::default(),
    };
    let mut stream = frame::encode(&(5u64, &get)).unwrap();
    stream.extend(frame::encode(&(6u64, "not a request")).unwrap());
    stream.extend(frame::encode(&(7u64, &get)).unwrap());
    let mut answers = raw_exchange(&conn, &stream).await.unwrap();
    answers.sort_by_key(|(id, _)| *id);
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert!(matches!(answers[0], (5, Response::Value(_))), "{answers:?}");
    assert!(
        matches!(&answers[1], (6, Response::Error(e)) if e.kind == ErrorKind::BadRequest),
        "{answers:?}"
    );
    assert!(matches!(answers[2], (7, Response::Value(_))), "{answers:?}");
    still_serving(&c).await;

    // 3. Peers: find node1's peer address from the ring.
    let ring = client.ring_info().unwrap();
    let node1 = ring
        .members
        .iter()
        .find(|m| m.name == "node1")
        .unwrap()
        .clone();
    let hello = |from: &str| PeerEnvelope {
        from: from.to_string(),
        request: PeerRequest::Hello(node1.clone()),
    };

    // A certificate from another CA (trusting the real CA, so only the
    // node's check can refuse it).
    let foreign = tempfile::tempdir().unwrap();
    shoal_node::certs::create_ca(foreign.path()).unwrap();
    shoal_node::certs::issue(
        foreign.path(),
        foreign.path(),
        "node2",
        shoal_node::certs::Kind::Node,
        &[],
        None,
    )
    .unwrap();
    let id = identity(ca.clone(), foreign.path(), "node2");
    let endpoint = raw_endpoint(peer_client_config(&id, Duration::from_secs(5)).unwrap()).await;
    assert!(
        peer_call(&endpoint, node1.peer_addr, &hello("node2"))
            .await
            .is_err(),
        "foreign certificate accepted"
    );

    // No certificate at all.
    let config = shoal_client::tls::quic_client_config(
        &ca,
        None,
        shoal_node::net::PEER_ALPN,
        Duration::from_secs(5),
    )
    .unwrap();
    let endpoint = raw_endpoint(config).await;
    assert!(
        peer_call(&endpoint, node1.peer_addr, &hello("node2"))
            .await
            .is_err(),
        "anonymous peer accepted"
    );

    // A real cluster certificate for node3, claiming to be node2.
    let id = identity(ca.clone(), c.path(), "node3");
    let endpoint = raw_endpoint(peer_client_config(&id, Duration::from_secs(5)).unwrap()).await;
    match peer_call(&endpoint, node1.peer_addr, &hello("node2")).await {
        Ok(PeerResponse::Error(PeerError::NameNotInCertificate { claimed, detail })) => {
            assert_eq!(claimed, "node2");
            assert!(detail.contains("not issued for node \"node2\""), "{detail}");
        }
        other => panic!("impersonation not refused: {other:?}"),
    }
    still_serving(&c).await;
}

async fn peer_call(
    endpoint: &quinn::Endpoint,
    addr: std::net::SocketAddr,
    envelope: &PeerEnvelope,
) -> Result<PeerResponse, String> {
    let conn = endpoint
        .connect(addr, "node1")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    frame::write(&mut send, &(1u64, envelope))
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(
        Duration::from_secs(5),
        frame::read::<(u64, PeerResponse)>(&mut recv, 1 << 20),
    )
    .await
    .map_err(|_| "no answer".to_string())?
    .map(|(_, response)| response)
    .map_err(|e| e.to_string())
}
