//! The failure detector's probe (`shoal_client::rpc`'s `probed`) judges the
//! peer, not the caller: after sending, a caller that hears no packet from
//! the peer within 300 ms takes it for dead. A caller whose own runtime
//! stalled past that (a busy worker, a paused process) while the peer's
//! answer waited in its socket must not accuse the peer.
//! `cargo test -p shoal-tests --test probe`

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use shoal_client::frame;
use shoal_client::rpc::Mux;
use shoal_node::certs::{self, Kind};
use shoal_node::net::tls::{peer_client_config, peer_port_config, Identity};

const IDLE: Duration = Duration::from_secs(10);
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn identity(dir: &Path, name: &str) -> Identity {
    certs::issue(dir, dir, name, Kind::Node, &[LOCALHOST], None).expect("issue");
    let read = |file: String| std::fs::read(dir.join(file)).expect("read");
    Identity {
        ca_pem: read("ca.pem".into()),
        chain: shoal_client::tls::parse_certs(&read(format!("{name}.pem"))).expect("chain"),
        key: Arc::new(shoal_client::tls::parse_key(&read(format!("{name}.key"))).expect("key")),
    }
}

/// A peer on its own runtime and thread that echoes every request at once.
fn echo_peer(id: &Identity) -> (tokio::runtime::Runtime, SocketAddr) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let config = peer_port_config(id, IDLE).expect("server config");
    let endpoint = runtime
        .block_on(async { quinn::Endpoint::server(config, SocketAddr::new(LOCALHOST, 0)) })
        .expect("endpoint");
    let addr = endpoint.local_addr().expect("address");
    runtime.spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        while let Ok(Some(request)) =
                            frame::read_next::<(u64, (u64, String))>(&mut recv, 1 << 20).await
                        {
                            let answer = frame::encode(&request).expect("encode");
                            if send.write_all(&answer).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
        }
    });
    (runtime, addr)
}

#[test]
fn a_caller_that_stalled_does_not_take_a_live_peer_for_dead() {
    let dir = tempfile::tempdir().expect("temp dir");
    certs::create_ca(dir.path()).expect("CA");
    let (caller, peer) = (identity(dir.path(), "a"), identity(dir.path(), "b"));
    let (_peer_runtime, addr) = echo_peer(&peer);

    // The caller: one thread, which the test stalls.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut endpoint =
            quinn::Endpoint::client(SocketAddr::new(LOCALHOST, 0)).expect("client endpoint");
        endpoint.set_default_client_config(peer_client_config(&caller, IDLE).expect("config"));
        let conn = endpoint
            .connect(addr, "b")
            .expect("connect")
            .await
            .expect("handshake");
        let mux: Mux<(u64, String)> = Mux::open(&conn, 1 << 20).await.expect("stream");
        let hello = (1, "hello".to_string());
        assert_eq!(mux.call(&hello).await.expect("a first call"), hello);

        let sent = conn.stats().udp_tx.datagrams;
        let call = tokio::spawn({
            let mux = mux.clone();
            async move { mux.call(&(2, "ping".to_string())).await }
        });
        while conn.stats().udp_tx.datagrams == sent {
            tokio::task::yield_now().await;
        }
        // The request is on its way; this process stalls past the probe
        // (300 ms) while the peer's answer arrives and waits, unread.
        std::thread::sleep(Duration::from_millis(600));
        let answer = call.await.expect("the call's task");
        assert_eq!(answer, Ok((2, "ping".to_string())));
    });
}
