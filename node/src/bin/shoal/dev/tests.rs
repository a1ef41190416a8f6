use super::*;

/// `count` consecutive loopback ports, free for UDP and TCP when looked at,
/// as a `SHOAL_DEV_PORTS` range.
fn free_run(count: u16) -> String {
    use rand::Rng;
    for _ in 0..200 {
        let low = rand::thread_rng().gen_range(20_000..30_000);
        let held: Vec<_> = (low..low + count)
            .map(|port| {
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                (UdpSocket::bind(addr), std::net::TcpListener::bind(addr))
            })
            .collect();
        if held.iter().all(|(u, t)| u.is_ok() && t.is_ok()) {
            return format!("{low}-{}", low + count);
        }
    }
    panic!("no run of {count} free loopback ports in 20000..30000");
}

fn ports_of(dir: &Path, i: usize) -> Vec<u16> {
    let c = Config::load(&config_path(dir, i)).expect("config");
    let metrics = c.metrics_addr.expect("a metrics address").port();
    vec![c.client_addr.port(), c.peer_addr.port(), metrics]
}

/// `shoal dev --add --no-start` twice: the first added node holds no port
/// until it is started, and the second must not be given one of its ports
/// (the grow tests start both at once, and one then failed to bind).
#[test]
fn an_added_node_never_takes_a_port_of_a_node_configured_but_stopped() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Room for exactly two nodes' ports.
    let range = free_run(6);
    std::env::set_var("SHOAL_DEV_PORTS", &range);
    prepare(dir.path(), 1, false).expect("node1 configured");
    let node1 = ports_of(dir.path(), 1);
    add(dir.path(), false, None).expect("node2 configured");
    let node2 = ports_of(dir.path(), 2);
    let mut all: Vec<u16> = node1.iter().chain(&node2).copied().collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        all.len(),
        6,
        "in {range}, node2 was given {node2:?}, sharing a port with node1's {node1:?}"
    );
    // The range is used up: a third node is refused, not handed a port
    // another node has.
    let third = add(dir.path(), false, None);
    assert!(
        third.is_err(),
        "in {range}, node3 was configured with {:?} beside node1's {node1:?} and node2's {node2:?}",
        ports_of(dir.path(), 3)
    );
    assert!(!config_path(dir.path(), 3).exists());
}
