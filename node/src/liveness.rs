//! Peer liveness: every heartbeat interval a node pings each other member over
//! the peer port and feeds the answers to its [`crate::detector::FailureDetector`]. Up and down
//! transitions are logged and counted in the metrics; the current view is in
//! `shoal status` (`peers`) and in `/metrics` (`shoal_peer_up`, `shoal_peer_phi`,
//! `shoal_peer_transitions_total`).

use shoal_client::proto::{MemberInfo, PeerView};
use tracing::{info, warn};

use crate::coordinator::Node;
use crate::net::{PeerRequest, PeerResponse, Transport};
use crate::storage::Store;

impl<T: Transport, S: Store> Node<T, S> {
    /// Pings every identified member once (concurrently, each bounded by the
    /// heartbeat interval), then re-evaluates the detector.
    pub async fn heartbeat_round(&self) {
        let inner = &self.inner;
        let peers: Vec<MemberInfo> = inner
            .membership
            .known()
            .into_iter()
            .filter(|m| m.id != inner.me.id)
            .collect();
        let started = tokio::time::Instant::now().into_std();
        {
            let mut d = inner.detector.lock().expect("detector lock");
            for p in &peers {
                d.watch(p.id, started);
            }
        }
        let budget = inner.settings.detector.heartbeat;
        let mut pings = tokio::task::JoinSet::new();
        for p in peers.iter().cloned() {
            let node = self.clone();
            pings.spawn(async move {
                let answer =
                    tokio::time::timeout(budget, node.inner.transport.call(&p, PeerRequest::Ping))
                        .await;
                (p.id, matches!(answer, Ok(Ok(PeerResponse::Pong))))
            });
        }
        let mut transitions = Vec::new();
        while let Some(Ok((id, answered))) = pings.join_next().await {
            if answered {
                let now = tokio::time::Instant::now().into_std();
                transitions.extend(
                    inner
                        .detector
                        .lock()
                        .expect("detector lock")
                        .heartbeat(id, now),
                );
            }
        }
        let now = tokio::time::Instant::now().into_std();
        let views: Vec<(MemberInfo, bool, f64)> = {
            let mut d = inner.detector.lock().expect("detector lock");
            transitions.extend(d.evaluate(now));
            peers
                .iter()
                .map(|p| (p.clone(), d.is_up(p.id), d.phi(p.id, now)))
                .collect()
        };
        let mut metrics = inner.metrics.peers.lock().expect("metrics lock");
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

    /// Whether the failure detector considers `peer` up (this node always is).
    pub fn is_up(&self, peer: shoal_ring::NodeId) -> bool {
        peer == self.inner.me.id
            || self
                .inner
                .detector
                .lock()
                .expect("detector lock")
                .is_up(peer)
    }

    /// The detector's view of every other identified member, for status.
    pub fn peer_views(&self) -> Vec<PeerView> {
        let now = tokio::time::Instant::now().into_std();
        let d = self.inner.detector.lock().expect("detector lock");
        let mut views: Vec<PeerView> = self
            .inner
            .membership
            .known()
            .into_iter()
            .filter(|m| m.id != self.inner.me.id)
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
