//! `shoal status`: what this node knows of itself and the cluster.

use std::sync::atomic::Ordering;

use shoal_client::proto::NodeStatus;

use super::Node;
use crate::net::Transport;
use crate::storage::Store;

impl<T: Transport, S: Store> Node<T, S> {
    /// This node's status as `shoal status` shows it.
    pub(super) fn status(&self) -> NodeStatus {
        let me = &self.inner.me;
        let view = self.inner.membership.view();
        NodeStatus {
            id: me.id,
            name: me.name.clone(),
            client_addr: me.client_addr,
            peer_addr: me.peer_addr,
            pid: std::process::id(),
            ring_ready: view.is_some(),
            partitions_owned: view.map_or(0, |v| v.ring.partitions_of(me.id).len() as u32),
            waiting_for: self.inner.membership.missing_names(),
            peers: self.peer_views(),
            metrics_addr: self.inner.metrics_addr.get().copied(),
            hints_pending: self.hint_queues(),
            hints_delivered: self.inner.metrics.hints_delivered.load(Ordering::Relaxed),
            anti_entropy: self.aae_status(),
            ring_version: self.inner.membership.view().map_or(0, |v| v.version),
            zone: me.zone.clone(),
            transition: self.transition(),
            transfer: self.inner.transfer.status(),
            keys_unowned: self.inner.transfer.unowned_keys(1_000_000),
            unreachable: {
                let addrs = self.inner.transport.unreachable();
                let members = self.inner.membership.expected();
                members
                    .into_iter()
                    .filter(|m| addrs.contains(&m.peer_addr))
                    .map(|m| m.name)
                    .collect()
            },
        }
    }
}
