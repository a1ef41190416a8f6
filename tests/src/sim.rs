//! An in-process cluster over [`SimNetwork`].

use std::sync::Arc;
use std::time::Duration;

use shoal_client::proto::{GetReply, MemberInfo, PutReply, Request, RequestOptions, Response};
use shoal_node::config::MemberConfig;
use shoal_node::coordinator::{Node, Settings};
use shoal_node::membership::Membership;
use shoal_node::net::sim::{SimNetwork, SimTransport};
use shoal_node::storage::MemoryStore;
use shoal_node::version::{ContextKey, Object};
use shoal_ring::NodeId;

/// The reply as a write, or a panic naming what came instead.
pub fn written(r: Response) -> PutReply {
    match r {
        Response::Written(w) => w,
        other => panic!("expected a write, got {other:?}"),
    }
}

pub fn value(r: Response) -> GetReply {
    match r {
        Response::Value(v) => v,
        other => panic!("expected a value, got {other:?}"),
    }
}

pub fn error(r: Response) -> shoal_client::WireError {
    match r {
        Response::Error(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

pub fn values(r: &GetReply) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = r.values.iter().map(|v| v.0.clone()).collect();
    v.sort();
    v
}

/// Default request options.
pub const D: RequestOptions = RequestOptions {
    r: None,
    w: None,
    pr: None,
    pw: None,
    timeout_ms: None,
};

pub type SimNode = Node<SimTransport, MemoryStore>;

pub struct SimCluster {
    pub net: Arc<SimNetwork>,
    pub nodes: Vec<SimNode>,
}

pub fn settings() -> Settings {
    Settings {
        n: 3,
        r: 2,
        w: 2,
        pr: 0,
        pw: 0,
        spare_reads: shoal_node::config::SpareReads::Always,
        max_value_bytes: 1024,
        max_siblings: 100,
        max_object_bytes: 64 << 20,
        request_timeout: Duration::from_secs(2),
        gossip: Duration::from_secs(1),
        cleanup_linger: Duration::from_secs(3),
        clock_max_entries: 50,
        clock_min_age_ms: 86_400_000,
        detector: shoal_node::detector::DetectorConfig::default(),
        handoff: shoal_node::handoff::HandoffSettings::default(),
        aae: shoal_node::antientropy::AaeSettings::from_config(&Default::default()),
        read_repair_window: Duration::from_millis(500),
        object_cache_bytes: 16 << 20,
        clock: shoal_node::clock::Clock::system(),
        context_key: context_key(),
    }
}

/// The simulated clusters' context key.
pub fn context_key() -> ContextKey {
    ContextKey::new(&[0x51; 32])
}

impl SimCluster {
    /// `size` nodes named node1.. with fixed ids, all knowing each other.
    pub fn new(size: usize) -> Self {
        Self::with_settings(size, settings())
    }

    pub fn with_settings(size: usize, settings: Settings) -> Self {
        let net = SimNetwork::new();
        let members: Vec<MemberInfo> = (1..=size)
            .map(|i| MemberInfo {
                id: NodeId::from_u128(i as u128 * 0x9e37_79b9_7f4a_7c15),
                name: format!("node{i}"),
                client_addr: ([127, 0, 0, 1], 7000 + i as u16).into(),
                peer_addr: ([127, 0, 0, 1], 8000 + i as u16).into(),
                zone: None,
            })
            .collect();
        let expected: Vec<MemberConfig> = members
            .iter()
            .map(|m| MemberConfig {
                name: m.name.clone(),
                peer_addr: m.peer_addr,
            })
            .collect();
        let nodes: Vec<SimNode> = members
            .iter()
            .map(|me| {
                let membership =
                    Membership::new(expected.clone(), members.clone(), 64, settings.n as usize);
                let node = Node::new(
                    me.clone(),
                    settings.clone(),
                    Arc::new(MemoryStore::new()),
                    net.transport(&me.name),
                    membership,
                )
                .expect("a memory store records the incarnation");
                net.register(&me.name, Arc::new(node.clone()));
                node
            })
            .collect();
        SimCluster { net, nodes }
    }

    pub fn node(&self, name: &str) -> &SimNode {
        self.nodes
            .iter()
            .find(|n| n.me().name == name)
            .expect("no such node")
    }

    /// Names of the key's primaries, in preference order.
    pub fn primaries(&self, key: &[u8]) -> Vec<String> {
        let view = self.nodes[0].membership().view().expect("ring ready");
        view.preference_list(key, 3)
            .into_iter()
            .map(|m| m.name)
            .collect()
    }

    /// Names of the key's fallbacks, in the order a sloppy quorum takes them.
    pub fn fallbacks(&self, key: &[u8]) -> Vec<String> {
        let view = self.nodes[0].membership().view().expect("ring ready");
        view.ring
            .fallbacks(key, 3)
            .iter()
            .map(|id| view.name_of(id))
            .collect()
    }

    pub fn id(&self, name: &str) -> NodeId {
        self.node(name).me().id
    }

    /// Brings every node's failure detector up to date: heartbeat rounds on
    /// the (paused) clock until each has marked every crashed peer down.
    pub async fn detect(&self, rounds: usize) {
        let heartbeat = settings().detector.heartbeat;
        for _ in 0..rounds {
            for n in &self.nodes {
                n.heartbeat_round().await;
            }
            tokio::time::sleep(heartbeat).await;
        }
    }

    /// Runs handoff rounds on every node until no hints are left or `rounds`
    /// rounds passed; returns the hints still held.
    pub async fn hand_off(&self, rounds: usize) -> u64 {
        for _ in 0..rounds {
            for n in &self.nodes {
                n.handoff_round().await;
            }
            if self.hints_held() == 0 {
                break;
            }
        }
        self.hints_held()
    }

    /// Hints held over the whole cluster.
    pub fn hints_held(&self) -> u64 {
        self.nodes
            .iter()
            .flat_map(|n| n.hint_queues())
            .map(|q| q.pending)
            .sum()
    }

    /// The first node that is not a primary of `key` (needs more than N nodes).
    pub fn non_replica(&self, key: &[u8]) -> String {
        let p = self.primaries(key);
        self.nodes
            .iter()
            .map(|n| n.me().name.clone())
            .find(|n| !p.contains(n))
            .expect("a non-replica")
    }

    /// What one replica holds for `key`.
    pub fn stored(&self, node: &str, key: &[u8]) -> Option<Object> {
        self.node(node).local_get(key).expect("store read")
    }

    pub async fn put(
        &self,
        via: &str,
        key: &[u8],
        value: &[u8],
        ctx: Option<shoal_client::CausalContext>,
        options: RequestOptions,
    ) -> Response {
        let req = Request::Put {
            key: key.to_vec(),
            value: value.to_vec(),
            context: ctx,
            options,
        };
        self.node(via).coordinate(req, false).await
    }

    pub async fn get(&self, via: &str, key: &[u8], options: RequestOptions) -> Response {
        self.node(via)
            .coordinate(
                Request::Get {
                    key: key.to_vec(),
                    options,
                },
                false,
            )
            .await
    }

    pub async fn delete(
        &self,
        via: &str,
        key: &[u8],
        ctx: Option<shoal_client::CausalContext>,
        options: RequestOptions,
    ) -> Response {
        self.node(via)
            .coordinate(
                Request::Delete {
                    key: key.to_vec(),
                    context: ctx,
                    options,
                },
                false,
            )
            .await
    }
}
