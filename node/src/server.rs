//! Wiring: [`start`] opens the store, loads or creates the node id, binds the
//! two QUIC endpoints and spawns the servers; [`run`] is `start` plus waiting
//! for `shutdown`. The `shoal` binary is only argument parsing around these.
//! Both need the RocksDB engine (the `rocksdb` feature, on by default);
//! [`open_node`] and [`start_background`] serve any [`Store`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shoal_client::proto::MemberInfo;
use tokio::sync::watch;
use tracing::info;

use crate::coordinator::{Node, Settings};
use crate::membership::Membership;
use crate::net::Transport;
use crate::storage::{Store, StoreError, Tree};
#[cfg(feature = "rocksdb")]
use {
    crate::config::Config,
    crate::net::quic::{serve_clients, serve_peers, FrameLimits, QuicTransport},
    crate::net::tls::{client_port_config, peer_client_config, peer_port_config, Identity},
    crate::storage::RocksStore,
    shoal_ring::NodeId,
    std::path::Path,
};

/// A graceful stop closes its connections once no client request came for
/// this long, after its requests drained ([`Running::stop`]): many round
/// trips, so that clients refused have turned elsewhere.
pub const QUIET: Duration = Duration::from_millis(100);
/// The longest a graceful stop waits for [`QUIET`].
pub const QUIET_WITHIN: Duration = Duration::from_secs(2);

/// Meta-tree key of this node's id.
pub const NODE_ID_KEY: &[u8] = b"node-id";
pub use crate::membership::MEMBERS_KEY;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("TLS material unusable: {0}")]
    Tls(String),
    #[error("cannot open the store in {dir}: {source}")]
    Store { dir: String, source: StoreError },
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[cfg(feature = "rocksdb")]
pub type ShoalNode = Node<QuicTransport, RocksStore>;

/// A started node: its logic, its bound addresses, and the way to stop it.
#[cfg(feature = "rocksdb")]
pub struct Running {
    pub node: ShoalNode,
    pub client_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    endpoints: Vec<quinn::Endpoint>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[cfg(feature = "rocksdb")]
impl Running {
    /// Resolves when `shutdown` does, or when this node is no longer a
    /// member of the cluster (it left, or was removed) and a peer has heard
    /// so: a node that left stops by itself.
    pub async fn until_stopped(&self, shutdown: impl std::future::Future<Output = ()>) {
        let mut departed = self.node.departed();
        tokio::select! {
            _ = shutdown => info!("shutting down"),
            _ = departed.wait_for(|d| *d) => info!(
                "this node is no longer a member of the cluster (it left, or was removed): shutting down; \
                 to join again, wipe its data directory and start it with seeds"
            ),
        }
    }

    /// Stops gracefully, as `systemctl stop` and a rolling restart ask, so
    /// that clients see no request fail or left with an unknown outcome (the
    /// README's rolling upgrade says what the close still cuts off):
    /// - new connections are refused, and new client requests refused
    ///   unrun (`NotReady`: the SDK asks another node and puts this one
    ///   last);
    /// - the requests taken run to their answers, and their tasks (a write's
    ///   third-replica sends, a read's repair, hints) to their end; the
    ///   drain waits up to the request deadline plus the read-repair window
    ///   ([`crate::tasks::Tasks::drain`]), and a repair still sending then
    ///   is left to anti-entropy;
    /// - the clients, once refused, ask other nodes: no request coming for
    ///   [`QUIET`] says they have, so that closing cuts off no request on
    ///   its way (which the client could only report as possibly applied).
    ///   Requests still coming at [`QUIET_WITHIN`] are cut off;
    /// - then what is left is aborted and the endpoints close;
    /// - last, the replica is sealed ([`crate::replica::Replica::seal`]), so
    ///   that the next start mints under the same actors and a rolling
    ///   restart does not grow every key's clock.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let settings = self.node.settings();
        let deadline =
            tokio::time::Instant::now() + settings.request_timeout + settings.read_repair_window;
        if !self.node.tasks().drain(deadline).await {
            tracing::warn!(
                "stopping with client requests or their tasks still running: they are cut off"
            );
        }
        let tasks = self.node.tasks();
        tasks
            .quiet(QUIET, tokio::time::Instant::now() + QUIET_WITHIN)
            .await;
        tasks.abort_all();
        for e in &self.endpoints {
            e.close(0u32.into(), b"node shutting down");
        }
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        // Closing sends CONNECTION_CLOSE at once; give peers a moment to see
        // it, but never let a silent peer hold up shutdown.
        let drain = async {
            for e in &self.endpoints {
                e.wait_idle().await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
        // Last: the next start goes on under this run's actors (see
        // `replica::seal`), unless something writes after this.
        let replica = self.node.replica().clone();
        match tokio::task::spawn_blocking(move || replica.seal()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not seal: the next start takes a new incarnation")
            }
            Err(e) => tracing::warn!(error = %e, "sealing did not finish"),
        }
    }
}

#[cfg(feature = "rocksdb")]
fn read_file(path: &Path) -> Result<Vec<u8>, StartError> {
    std::fs::read(path).map_err(|source| StartError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Loads this node's id, creating it on first start.
/// A malformed stored id is an error, never silently replaced: a new id
/// would make this node a different member and move partitions.
#[cfg(feature = "rocksdb")]
fn node_id(store: &RocksStore) -> Result<NodeId, StoreError> {
    if let Some(bytes) = store.get(Tree::Meta, NODE_ID_KEY)? {
        return decode_node_id(&bytes);
    }
    let id = NodeId(rand::random());
    store.put(Tree::Meta, NODE_ID_KEY, &id.0)?;
    Ok(id)
}

/// Reads the stored node id (16 bytes).
pub fn decode_node_id(bytes: &[u8]) -> Result<shoal_ring::NodeId, StoreError> {
    <[u8; 16]>::try_from(bytes)
        .map(shoal_ring::NodeId)
        .map_err(|_| StoreError::Corruption {
            tree: Tree::Meta.name(),
            key: hex::encode(NODE_ID_KEY),
            detail: format!("node id is {} bytes, not 16", bytes.len()),
        })
}

/// Binds a QUIC server endpoint; returns it with the address actually bound
/// (a configured port 0 becomes a real one).
#[cfg(feature = "rocksdb")]
fn bind(
    what: &'static str,
    config: quinn::ServerConfig,
    addr: SocketAddr,
) -> Result<(quinn::Endpoint, SocketAddr), StartError> {
    let bind_err = |source| StartError::Bind { what, addr, source };
    let (endpoint, granted) = shoal_client::tls::endpoint(
        addr,
        shoal_client::tls::jumbo_endpoint_config(),
        Some(config),
    )
    .map_err(bind_err)?;
    if granted.is_some_and(|g| g < shoal_client::tls::RECEIVE_BUFFER_BYTES) {
        tracing::warn!(
            what,
            granted,
            asked = shoal_client::tls::RECEIVE_BUFFER_BYTES,
            "the UDP receive buffer is smaller than asked: a burst of handshakes may be dropped \
             and retried slowly; raise the sysctl net.core.rmem_max"
        );
    }
    let bound = endpoint.local_addr().map_err(bind_err)?;
    Ok((endpoint, bound))
}

/// Starts a node and returns once it is serving.
#[cfg(feature = "rocksdb")]
pub async fn start(config: Config) -> Result<Running, StartError> {
    config.validate()?;
    let tls_err = |e: shoal_client::Error| StartError::Tls(e.to_string());
    let ca_pem = read_file(&config.tls.ca_cert)?;
    let chain = shoal_client::tls::parse_certs(&read_file(&config.tls.cert)?).map_err(tls_err)?;
    let key_pem = read_file(&config.tls.key)?;
    let identity = Identity {
        ca_pem,
        chain,
        key: Arc::new(shoal_client::tls::parse_key(&key_pem).map_err(tls_err)?),
    };
    let context_key = crate::certs::context_key(&key_pem, &config.tls.key)
        .map_err(|e| StartError::Tls(e.to_string()))?;
    let context_key_id = context_key.id();
    // The node's own certificate must name it, or peers will refuse it.
    crate::net::tls::check_peer_name(&identity.chain[0], &config.name)
        .map_err(|e| StartError::Tls(format!("{}: {e}", config.tls.cert.display())))?;

    std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::Read {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let store_err = |source| StartError::Store {
        dir: config.data_dir.display().to_string(),
        source,
    };
    let db = config.data_dir.join("db");
    let store =
        Arc::new(RocksStore::open_with(&db, config.fsync, config.huge_pages).map_err(store_err)?);
    let id = node_id(&store).map_err(store_err)?;

    let idle = Duration::from_millis(config.timeouts.idle_ms);
    let tls = |e: crate::net::tls::TlsError| StartError::Tls(e.0);
    let (client_endpoint, client_addr) = bind(
        "client port",
        client_port_config(
            &identity,
            idle,
            u32::try_from(config.limits.client_window_kb << 10).unwrap_or(u32::MAX),
        )
        .map_err(tls)?,
        config.client_addr,
    )?;
    let (mut peer_endpoint, peer_addr) = bind(
        "peer port",
        peer_port_config(&identity, idle).map_err(tls)?,
        config.peer_addr,
    )?;
    peer_endpoint.set_default_client_config(peer_client_config(&identity, idle).map_err(tls)?);

    let me = MemberInfo {
        id,
        name: config.name.clone(),
        client_addr,
        peer_addr,
        zone: config.zone.clone(),
    };
    let limits = FrameLimits::new(&config.limits);
    let transport = QuicTransport::new(
        peer_endpoint.clone(),
        config.name.clone(),
        Duration::from_millis(config.timeouts.connect_ms),
        Duration::from_millis(config.timeouts.peer_backoff_ms),
        limits.peer,
    );
    // Founding members, or the seeds of the cluster to join.
    let joining = !config.cluster.seeds.is_empty();
    let expected = if joining {
        config.cluster.seeds.clone()
    } else {
        let mut founding = config.all_members();
        for m in &mut founding {
            if m.name == config.name {
                m.peer_addr = peer_addr;
            }
        }
        founding
    };
    let node = open_node(
        me,
        Settings::from_config(&config, context_key),
        store,
        transport,
        expected,
        joining,
        config.cluster.partitions,
    )
    .map_err(store_err)?;

    let (shutdown, rx) = watch::channel(false);
    let handler = Arc::new(node.clone());
    let mut tasks = vec![
        tokio::spawn(serve_clients(
            client_endpoint.clone(),
            handler.clone(),
            limits,
            rx.clone(),
        )),
        tokio::spawn(serve_peers(
            peer_endpoint.clone(),
            handler,
            limits,
            rx.clone(),
        )),
    ];
    if let Some(addr) = config.metrics_addr {
        let listener = crate::metrics::bind(addr)
            .await
            .map_err(|source| StartError::Bind {
                what: "metrics port",
                addr,
                source,
            })?;
        let bound = listener.local_addr().map_err(|source| StartError::Bind {
            what: "metrics port",
            addr,
            source,
        })?;
        node.set_metrics_addr(bound);
        tasks.push(tokio::spawn(crate::metrics::serve(
            listener,
            node.metrics().clone(),
            rx.clone(),
        )));
    }
    tasks.extend(start_background(&node, rx));
    info!(name = %config.name, id = %id, %client_addr, %peer_addr, context_key = %context_key_id, "shoal node serving");
    Ok(Running {
        node,
        client_addr,
        peer_addr,
        shutdown,
        endpoints: vec![client_endpoint, peer_endpoint],
        tasks,
    })
}

/// Builds a node over its store as every start does, the real one and the
/// simulation's restart alike: the members it learned before, a new
/// incarnation, itself as a member, its hint counts, the cluster state it
/// persisted. `expected` is the configured member list, or the seeds to
/// join through when `joining`; `partitions` the ring's size.
pub fn open_node<T: Transport, S: Store>(
    me: MemberInfo,
    settings: Settings,
    store: Arc<S>,
    transport: T,
    expected: Vec<crate::config::MemberConfig>,
    joining: bool,
    partitions: u32,
) -> Result<Node<T, S>, StoreError> {
    let known: Vec<MemberInfo> = match store.get(Tree::Meta, MEMBERS_KEY)? {
        // Unreadable: harmless to forget, members are re-learned by hello.
        Some(bytes) => crate::membership::decode_known(&bytes).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "stored member list unreadable; re-identifying members");
            Vec::new()
        }),
        None => Vec::new(),
    };
    let cluster = match store.get(Tree::Meta, crate::gossip::CLUSTER_KEY)? {
        Some(bytes) => match crate::gossip::decode(&bytes) {
            Ok(state) => Some(state),
            // The other members hold it too: gossip brings it back.
            Err(e) => {
                tracing::warn!(error = %e, "stored cluster state unreadable; relearning it by gossip");
                None
            }
        },
        None => None,
    };
    let n = settings.n as usize;
    let membership = Membership::with_state(expected, known, cluster, joining, partitions, n);
    let node = Node::new(me.clone(), settings, store, transport, membership)?;
    node.learn(me);
    node.announce();
    let held = node.load_hint_counts()?;
    if held > 0 {
        info!(hints = held, "holding hints for other nodes");
    }
    Ok(node)
}

/// Starts a node's background loops: heartbeats, hinted handoff,
/// anti-entropy (tree rebuilds, exchanges, tombstone reaping) and member
/// identification, each stopping when `stop` turns true. The QUIC server and
/// the deterministic simulation both start a node's background work here,
/// so the simulation runs exactly the production loops.
pub fn start_background<T: Transport, S: Store>(
    node: &Node<T, S>,
    stop: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let settings = node.settings();
    let mut tasks = Vec::new();
    let heart = node.clone();
    tasks.push(tokio::spawn(every(
        "heartbeat",
        settings.clock.clone(),
        settings.detector.heartbeat,
        stop.clone(),
        move || {
            let heart = heart.clone();
            async move { heart.heartbeat_round().await }
        },
    )));
    let handoff = node.clone();
    tasks.push(tokio::spawn(every(
        "handoff",
        settings.clock.clone(),
        settings.handoff.interval,
        stop.clone(),
        move || {
            let handoff = handoff.clone();
            async move {
                handoff.handoff_round().await;
            }
        },
    )));
    let gossip = node.clone();
    tasks.push(tokio::spawn(every(
        "gossip",
        settings.clock.clone(),
        settings.gossip,
        stop.clone(),
        move || {
            let gossip = gossip.clone();
            async move {
                gossip.gossip_round().await;
            }
        },
    )));
    let transfer = node.clone();
    tasks.push(tokio::spawn(every(
        "transfer",
        settings.clock.clone(),
        settings.gossip,
        stop.clone(),
        move || {
            let transfer = transfer.clone();
            async move { transfer.transfer_round().await }
        },
    )));
    let aae = node.clone();
    let stop_aae = stop.clone();
    tasks.push(tokio::spawn(
        async move { aae.run_anti_entropy(stop_aae).await },
    ));
    let identifier = node.clone();
    let clock = settings.clock.clone();
    let mut stop = stop;
    tasks.push(tokio::spawn(async move {
        // Identify members until the ring is complete. A member that comes
        // back with a new id (wiped data directory) says hello itself.
        let mut everyone = true;
        loop {
            identifier.say_hello(everyone).await;
            everyone = false;
            let pause = if identifier.membership().view().is_some() {
                5_000
            } else {
                200
            };
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = tokio::time::sleep(Duration::from_millis(pause)) => clock.fired("hello"),
            }
        }
    }));
    tasks
}

/// Runs `round` every `interval` (a slow round delays the next one rather
/// than piling up) until `stop` turns true.
async fn every<F, Fut>(
    name: &'static str,
    clock: crate::clock::Clock,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
    mut round: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            _ = tick.tick() => {
                clock.fired(name);
                round().await
            }
        }
    }
}

/// Runs a node until `shutdown` resolves.
#[cfg(feature = "rocksdb")]
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let running = start(config).await?;
    running.until_stopped(shutdown).await;
    running.stop().await;
    Ok(())
}

#[cfg(all(test, feature = "rocksdb"))]
mod tests;
