//! The SDK against an in-process stand-in for a node, over real QUIC and
//! TLS: the client port's server with a handler that answers as the test
//! says.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use shoal_client::proto::{CausalContext, GetReply, MemberInfo, Request, Response, RingInfo};
use shoal_client::{Client, ClientConfig};
use shoal_node::certs::{create_ca, issue, Kind};
use shoal_node::net::quic::{serve_clients, FrameLimits};
use shoal_node::net::tls::{client_port_config, Identity};
use shoal_node::net::{Handler, PeerError, PeerRequest, PeerResponse};
use shoal_ring::{NodeId, Ring};

/// A node that says, in its ring, that it is down (as a node whose failure
/// detector lost sight of it would say of another), and answers reads.
struct SaysItIsDown {
    me: MemberInfo,
}

impl Handler for SaysItIsDown {
    async fn client(&self, request: Request) -> Response {
        match request {
            Request::Ring => {
                let members = BTreeSet::from([self.me.id]);
                Response::Ring(RingInfo {
                    ring: Ring::claim(None, &members, 8, 1).expect("a ring"),
                    members: vec![self.me.clone()],
                    n: 1,
                    down: vec![self.me.id],
                    version: 0,
                })
            }
            _ => Response::Value(GetReply {
                values: Vec::new(),
                context: CausalContext(Vec::new()),
            }),
        }
    }

    async fn peer(&self, _: String, request: PeerRequest) -> PeerResponse {
        PeerResponse::Error(PeerError::NotAReplicaRequest(format!("{request:?}")))
    }
}

fn read(dir: &std::path::Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).expect("certificate file")
}

/// A node marked down by a peer may well be reachable by the client: the
/// ring's `down` list puts it last in line, and keeps its connection.
#[tokio::test]
async fn a_node_the_ring_says_is_down_keeps_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create_ca(d).unwrap();
    let localhost = [Ipv4Addr::LOCALHOST.into()];
    issue(d, d, "node1", Kind::Node, &localhost, None).unwrap();
    issue(
        d,
        d,
        "client",
        Kind::Client(shoal_client::proto::Role::ReadWrite),
        &[],
        None,
    )
    .unwrap();
    let identity = Identity {
        ca_pem: read(d, "ca.pem"),
        chain: shoal_client::tls::parse_certs(&read(d, "node1.pem")).unwrap(),
        key: Arc::new(shoal_client::tls::parse_key(&read(d, "node1.key")).unwrap()),
    };
    let server = client_port_config(&identity, Duration::from_secs(10), 1 << 20).unwrap();
    let endpoint = quinn::Endpoint::server(server, (Ipv4Addr::LOCALHOST, 0).into()).unwrap();
    let addr: SocketAddr = endpoint.local_addr().unwrap();
    let me = MemberInfo {
        id: NodeId::from_u128(1),
        name: "node1".into(),
        client_addr: addr,
        peer_addr: addr,
        zone: None,
    };
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let limits = FrameLimits::new(&Default::default());
    tokio::spawn(serve_clients(
        endpoint,
        Arc::new(SaysItIsDown { me }),
        limits,
        shutdown,
    ));

    let mut config = ClientConfig::new(vec![addr], read(d, "ca.pem"));
    config.identity = Some((read(d, "client.pem"), read(d, "client.key")));
    let client = Client::connect(config).await.expect("connect");
    assert_eq!(client.ring_info().unwrap().down, vec![NodeId::from_u128(1)]);
    assert_eq!(client.connected(), vec![addr], "the connection was dropped");
    client.get(b"k").await.expect("a read");
    client.refresh_ring().await.expect("the ring again");
    assert_eq!(client.connected(), vec![addr], "the connection was dropped");
}
