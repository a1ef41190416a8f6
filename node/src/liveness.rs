//! Peer liveness: every heartbeat interval a node pings each other member over
//! the peer port and feeds the answers to its [`crate::detector::FailureDetector`]. Up and down
//! transitions are logged and counted in the metrics; the current view is in
//! `shoal status` (`peers`) and in `/metrics` (`shoal_peer_up`, `shoal_peer_phi`,
//! `shoal_peer_transitions_total`).
//!
//! The rest of the node sees liveness only through the [`Liveness`] trait:
//! the coordinator, handoff, anti-entropy and the reaper ask "is this peer
//! up?" and nothing else, so a test or the simulation can hand them any
//! view of the cluster it likes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_client::proto::{MemberInfo, PeerView};
use shoal_ring::NodeId;
use tracing::{info, warn};

use crate::detector::{DetectorConfig, FailureDetector};
use crate::metrics::Metrics;
use crate::net::{PeerRequest, PeerResponse, Transport};

/// Whether a peer is up, as far as this node can tell.
pub trait Liveness: Send + Sync + 'static {
    /// This node itself is always up.
    fn is_up(&self, peer: NodeId) -> bool;
}

/// The phi-accrual detector behind [`Liveness`], fed by heartbeats.
pub struct Detector {
    me: NodeId,
    /// Locked briefly, never across an await, and never while taking
    /// another lock (the metrics' peer map is taken after it is released).
    detector: Mutex<FailureDetector>,
    heartbeat: Duration,
    metrics: Arc<Metrics>,
}

impl Liveness for Detector {
    fn is_up(&self, peer: NodeId) -> bool {
        peer == self.me || self.lock().is_up(peer)
    }
}

impl Detector {
    pub fn new(me: NodeId, config: DetectorConfig, metrics: Arc<Metrics>) -> Self {
        Detector {
            me,
            detector: Mutex::new(FailureDetector::new(config)),
            heartbeat: config.heartbeat,
            metrics,
        }
    }

    /// The detector, even if a panic poisoned its lock: its state is a set
    /// of arrival histories, each always consistent on its own.
    fn lock(&self) -> std::sync::MutexGuard<'_, FailureDetector> {
        self.detector
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Pings every one of `peers` once (concurrently, each bounded by the
    /// heartbeat interval), then re-evaluates the detector.
    pub async fn heartbeat_round<T: Transport>(&self, transport: &Arc<T>, peers: Vec<MemberInfo>) {
        let peers: Vec<MemberInfo> = peers.into_iter().filter(|m| m.id != self.me).collect();
        let started = tokio::time::Instant::now().into_std();
        {
            let mut d = self.lock();
            for p in &peers {
                d.watch(p.id, started);
            }
        }
        let budget = self.heartbeat;
        let mut pings = tokio::task::JoinSet::new();
        for p in peers.iter().cloned() {
            let transport = transport.clone();
            pings.spawn(async move {
                let deadline = tokio::time::Instant::now() + budget;
                let answer = transport.call(&p, PeerRequest::Ping, deadline).await;
                (p.id, matches!(answer, Ok(PeerResponse::Pong)))
            });
        }
        let mut transitions = Vec::new();
        while let Some(Ok((id, answered))) = pings.join_next().await {
            if answered {
                let now = tokio::time::Instant::now().into_std();
                transitions.extend(self.lock().heartbeat(id, now));
            }
        }
        let now = tokio::time::Instant::now().into_std();
        let views: Vec<(MemberInfo, bool, f64)> = {
            let mut d = self.lock();
            transitions.extend(d.evaluate(now));
            peers
                .iter()
                .map(|p| (p.clone(), d.is_up(p.id), d.phi(p.id, now)))
                .collect()
        };
        let mut metrics = self
            .metrics
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (member, up, phi) in views {
            let entry = metrics.entry(member.name.clone()).or_default();
            entry.up = up;
            entry.phi = phi;
            for t in transitions.iter().filter(|t| t.peer == member.id) {
                if t.up {
                    entry.ups += 1;
                    info!(peer = %member.name, "peer is up");
                } else {
                    entry.downs += 1;
                    warn!(peer = %member.name, phi, "peer marked down by the failure detector");
                }
            }
        }
    }

    /// The detector's view of each of `peers` but this node, by name.
    pub fn peer_views(&self, peers: Vec<MemberInfo>) -> Vec<PeerView> {
        let now = tokio::time::Instant::now().into_std();
        let d = self.lock();
        let mut views: Vec<PeerView> = peers
            .into_iter()
            .filter(|m| m.id != self.me)
            .map(|m| PeerView {
                up: d.is_up(m.id),
                phi: d.phi(m.id, now),
                name: m.name,
            })
            .collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }
}
