//! The node's side of membership: gossip rounds, persisting the cluster
//! state, announcing itself, and the operator's commands (`shoal cluster
//! plan | commit | clear`, `leave`, `remove`, `replace`). The state and its
//! rules are [`crate::membership::state`]'s; this file only wires them to
//! the node's store, transport and clock.

use std::collections::BTreeMap;
use std::time::Duration;

use shoal_client::error::{ErrorKind, WireError};
use shoal_client::proto::{
    ClusterCommand, ClusterReply, MemberInfo, PlanMember, PlanView, Request, Response, Transition,
};
use shoal_ring::{NodeId, Ring};
use tracing::{error, info};

use super::Node;
use crate::gossip::{self, Outcome, CLUSTER_KEY};
use crate::membership::state::{Change, ClusterState, Member, Plan, StateError};
use crate::net::{PeerRequest, PeerResponse, Transport};
use crate::storage::{Store, Tree};

impl<T: Transport, S: Store> Node<T, S> {
    /// Persists the cluster state, so a restart knows the layouts even when
    /// no other node is up.
    pub fn persist_cluster(&self) {
        let bytes = gossip::encode(&self.inner.membership.cluster());
        // Synced: a node must not come back from a power loss behind the
        // progress it already gossiped.
        if let Err(e) = self
            .inner
            .store
            .put(Tree::Meta, CLUSTER_KEY, &bytes)
            .and_then(|()| self.inner.store.sync_wal())
        {
            error!(error = %e, "could not persist the cluster state");
        }
    }

    /// Puts this node's own entry in the cluster state (its addresses and
    /// zone may have changed since it last ran) and, when it was started
    /// with seeds and is in no layout, stages its own join (see
    /// [`ClusterState::stage_own_join`]).
    pub fn announce(&self) {
        let me = self.inner.me.clone();
        let now = self.inner.settings.clock.now_ms();
        let joining = self.inner.membership.joining();
        let changed = self.inner.membership.edit(|c| {
            let changed = c.announce(me.clone(), now);
            changed | (joining && c.stage_own_join(me.id, now))
        });
        if changed {
            self.persist_cluster();
        }
    }

    /// One gossip exchange with a random peer (see [`gossip`]).
    pub async fn gossip_round(&self) -> Option<Outcome> {
        let membership = &self.inner.membership;
        let peer = self.inner.partners.pick(membership, &self.inner.me)?;
        let deadline = tokio::time::Instant::now() + self.inner.settings.request_timeout;
        // Read before the exchange: a removal made while it ran (the
        // transfer step removes a node that left) may not have reached
        // the peer.
        let removed = membership.removed(&self.inner.me.id);
        match self.exchange_with(&peer, deadline).await {
            Ok(outcome) => {
                // The peer now has our state: this node's removal is known
                // beyond it, so it may stop.
                if removed {
                    self.inner.departed.send_replace(true);
                }
                Some(outcome)
            }
            Err(e) => {
                tracing::debug!(peer = %peer.name, error = %e, "gossip exchange failed");
                None
            }
        }
    }

    /// One push-pull exchange with `peer`; our state is persisted if it
    /// changed.
    async fn exchange_with(
        &self,
        peer: &MemberInfo,
        deadline: tokio::time::Instant,
    ) -> Result<Outcome, String> {
        let outcome = gossip::exchange(
            &self.inner.membership,
            &*self.inner.transport,
            peer,
            deadline,
        )
        .await?;
        if let Outcome::Merged { changed: true, .. } = outcome {
            self.persist_cluster();
        }
        Ok(outcome)
    }

    /// Answers a peer's gossip.
    pub(super) fn answer_gossip(&self, request: PeerRequest) -> PeerResponse {
        let (answer, changed) = gossip::answer(&self.inner.membership, request);
        if changed {
            self.persist_cluster();
        }
        answer
    }

    /// One step of this node's part of a layout change (see
    /// [`crate::transfer`]).
    pub async fn transfer_round(&self) {
        if self.inner.transfer.step(&self.inner.aae).await {
            self.persist_cluster();
        }
    }

    /// The layout change in progress, if any.
    pub fn transition(&self) -> Option<Transition> {
        let cluster = self.inner.membership.cluster();
        if cluster.layouts.len() < 2 {
            return None;
        }
        Some(Transition {
            from_version: cluster.layouts[0].version,
            to_version: cluster.version(),
            unsynced: cluster
                .unsynced()
                .iter()
                .map(|id| cluster.name_of(id))
                .collect(),
        })
    }

    /// The average size of a replica (one partition's copy) here: what the
    /// objects tree holds over the replicas this node holds. `None` when it
    /// holds none.
    fn bytes_per_replica(&self) -> Option<u64> {
        let view = self.inner.membership.view()?;
        let held = shoal_ring::replica_counts(&view.ring, self.inner.settings.n as usize)
            .get(&self.inner.me.id)
            .copied()
            .filter(|h| *h > 0)?;
        Some(self.inner.store.approximate_bytes(Tree::Objects) / held as u64)
    }

    /// Whether the member named `name` is in a layout here.
    fn in_layout(&self, name: &str) -> bool {
        member_to_remove(&self.inner.membership.cluster(), name).is_ok_and(|(_, held)| held)
    }

    /// Whether `peer` answers a ping within a second.
    async fn answers(&self, peer: &MemberInfo) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        matches!(
            self.inner
                .transport
                .call(peer, PeerRequest::Ping, deadline)
                .await,
            Ok(PeerResponse::Pong)
        )
    }

    /// Runs an operator's membership command; a commit runs on the
    /// claimant (handed there unless `forwarded`).
    pub(super) async fn cluster_command(
        &self,
        command: ClusterCommand,
        forwarded: bool,
    ) -> Response {
        if let (ClusterCommand::Commit { .. }, false) = (&command, forwarded) {
            if let Some(claimant) = self
                .inner
                .membership
                .claimant()
                .filter(|c| c.id != self.inner.me.id)
            {
                let deadline = tokio::time::Instant::now() + self.inner.settings.request_timeout;
                // The claimant first learns what this node knows: the
                // operator staged and planned here, and gossip may not
                // have carried it there yet.
                if let Err(e) = self.exchange_with(&claimant, deadline).await {
                    tracing::debug!(claimant = %claimant.name, error = %e, "state not exchanged before a commit");
                }
                let forward = PeerRequest::Forward {
                    id: self.inner.coordinator.forward_ids.next(),
                    request: Request::Cluster(command),
                };
                return match self.inner.transport.call(&claimant, forward, deadline).await {
                    Ok(PeerResponse::Forwarded(response)) => response,
                    other => Response::Error(WireError::new(
                        ErrorKind::Timeout,
                        format!(
                            "the claimant {} (which commits changes) did not take the commit: {other:?}; it may have been applied. If {} is gone for good, run `shoal remove {}` again once `shoal status` shows it down",
                            claimant.name, claimant.name, claimant.name
                        ),
                    )),
                };
            }
        }
        if let (ClusterCommand::Commit { .. }, true) = (&command, forwarded) {
            if self
                .inner
                .membership
                .claimant()
                .is_some_and(|c| c.id != self.inner.me.id)
            {
                return Response::Error(WireError::new(
                    ErrorKind::BadRequest,
                    format!("{} is not the claimant: commit refused", self.inner.me.name),
                ));
            }
        }
        let claimant = self
            .inner
            .membership
            .claimant()
            .filter(|c| c.id != self.inner.me.id);
        let claimant_down = match &claimant {
            Some(c) if !self.is_up(c.id) => Some(c.id),
            // A claimant the operator removes may have died a moment ago,
            // before the detector noticed: asked at once.
            Some(c) if matches!(&command, ClusterCommand::Remove { node } if *node == c.name) => {
                (!self.answers(c).await).then_some(c.id)
            }
            _ => None,
        };
        // A member in no layout is removed at once, so such a remove is
        // decided on what the claimant knows: it committed every layout,
        // and this node may not have heard yet of the one that added it.
        let unasked = match (&command, claimant) {
            (ClusterCommand::Remove { node }, Some(c)) if !self.in_layout(node) => {
                let asked = claimant_down != Some(c.id) && {
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                    self.exchange_with(&c, deadline).await.is_ok()
                };
                (!asked).then_some(c.name)
            }
            _ => None,
        };
        let now = self.inner.settings.clock.now_ms();
        let bytes_per_replica = self.bytes_per_replica();
        // One edit: on a cluster still on its static ring the edit sees that
        // ring as layout 1, for staging and planning alike.
        let reply = self
            .inner
            .membership
            .edit(|c| -> Result<ClusterReply, StateError> {
                let before = c.current().map(|l| l.ring.clone());
                let (message, committed) =
                    run_command(c, command, now, claimant_down, unasked.as_deref())?;
                let (plan, message) = match committed {
                    Some(plan) => (Some(plan), message),
                    None => match c.plan() {
                        Ok(plan) => (Some(plan), message),
                        Err(e) if message.is_empty() => (None, e.to_string()),
                        Err(e) => (None, format!("{message}; {e}")),
                    },
                };
                Ok(ClusterReply {
                    version: c.version(),
                    staged: c
                        .staged_changes()
                        .iter()
                        .map(|(id, ch)| (c.name_of(id), format!("{ch:?}").to_lowercase()))
                        .collect(),
                    plan: plan.map(|p| plan_view(c, before.as_ref(), &p, bytes_per_replica)),
                    message,
                })
            });
        match reply {
            Ok(reply) => {
                self.persist_cluster();
                info!(message = %reply.message, version = reply.version, "membership command");
                Response::Cluster(reply)
            }
            Err(e) => {
                let kind = match e {
                    StateError::UnknownMember(_) => ErrorKind::BadRequest,
                    StateError::NoLayout => ErrorKind::NotReady,
                    StateError::Unconfirmed { .. } => ErrorKind::Timeout,
                    _ => ErrorKind::BadRequest,
                };
                Response::Error(WireError::new(kind, e.to_string()))
            }
        }
    }
}

/// Applies one command to the state: what was done, and the plan it
/// committed, if it was a commit. `unasked` names the claimant when this
/// node could not learn its state first.
fn run_command(
    c: &mut ClusterState,
    command: ClusterCommand,
    now: u64,
    claimant_down: Option<NodeId>,
    unasked: Option<&str>,
) -> Result<(String, Option<Plan>), StateError> {
    match command {
        ClusterCommand::Plan => Ok((String::new(), None)),
        ClusterCommand::Clear => {
            c.clear(now);
            Ok(("staged changes cleared".into(), None))
        }
        ClusterCommand::Leave { node } => {
            let id = member_in_layout(c, &node)?;
            c.stage(id, Some(Change::Leave), now);
            Ok((format!("staged: {node} leaves"), None))
        }
        ClusterCommand::Remove { node } => {
            let (id, in_layout) = member_to_remove(c, &node)?;
            if let (false, Some(claimant)) = (in_layout, unasked) {
                return Err(StateError::Unconfirmed {
                    name: node,
                    claimant: claimant.to_string(),
                });
            }
            if !in_layout {
                // In no layout (it left, or never joined): nothing moves.
                c.remove_now(id, now);
                c.stage(id, None, now);
                return Ok((format!("{node} removed (it held no partitions)"), None));
            }
            c.stage(id, Some(Change::Remove), now);
            if claimant_down == Some(id) {
                // The claimant commits plans and is down: removed now, so
                // that the next member can commit the plan that moves its
                // partitions. (A claimant that is up commits its own removal.)
                c.remove_now(id, now);
                return Ok((
                    format!("{node} removed; it was the claimant, the next member commits the plan that moves its partitions"),
                    None,
                ));
            }
            if c.plan()
                .is_err_and(|e| matches!(e, StateError::InTransition { .. }))
            {
                // A change is being applied and may wait for this member:
                // nothing waits for it from now on; its partitions move
                // with the next plan.
                c.remove_now(id, now);
                return Ok((
                    format!("{node} removed from the change in progress; its partitions move with the next plan"),
                    None,
                ));
            }
            Ok((format!("staged: {node} is removed"), None))
        }
        ClusterCommand::Replace { old, new } => {
            let old_id = member_in_layout(c, &old)?;
            let new_id = c
                .by_name(&new)
                .map(|m| m.info.id)
                .ok_or_else(|| StateError::UnknownMember(new.clone()))?;
            c.stage(old_id, Some(Change::Remove), now);
            c.stage(new_id, Some(Change::Join), now);
            Ok((format!("staged: {new} replaces {old}"), None))
        }
        ClusterCommand::Commit { version, plan } => {
            let plan = c.commit(version, plan, now)?;
            Ok((format!("committed layout {}", plan.version), Some(plan)))
        }
    }
}

/// The member named `name` that `shoal remove` means, and whether it is in
/// a layout of the history (it may hold partitions, a member that leaves
/// included): the one of that name in the layouts (a machine wiped and
/// started again under its name has another id, in none), else the newest
/// of that name. `NoLayout` on a node with no layout (a joiner while the
/// cluster runs on its static ring): nothing tells what it holds.
fn member_to_remove(c: &ClusterState, name: &str) -> Result<(NodeId, bool), StateError> {
    c.current().ok_or(StateError::NoLayout)?;
    let held = |m: &&Member| {
        c.layouts
            .iter()
            .any(|l| l.ring.members().contains(&m.info.id))
    };
    let mut in_layouts = c
        .members
        .values()
        .filter(|m| m.info.name == name)
        .filter(held);
    match in_layouts.clone().find(|m| !m.removed) {
        Some(m) => Ok((m.info.id, true)),
        // Removed already (a retry, a second operator): not another
        // machine that took the name since.
        None if in_layouts.next().is_some() => Err(StateError::BadChange {
            name: name.to_string(),
            why: "removed already; its partitions move with the next plan".into(),
        }),
        None => (c.by_name(name).map(|m| (m.info.id, false)))
            .ok_or_else(|| StateError::UnknownMember(name.to_string())),
    }
}

/// The id of the member named `name` in the current layout (or the static
/// ring, adopted as version 1 for the edit).
fn member_in_layout(c: &ClusterState, name: &str) -> Result<NodeId, StateError> {
    let current = c.current().ok_or(StateError::NoLayout)?;
    current
        .ring
        .members()
        .into_iter()
        .find(|id| c.name_of(id) == name)
        .ok_or_else(|| StateError::UnknownMember(name.to_string()))
}

/// What operators read of a plan.
fn plan_view(
    cluster: &ClusterState,
    before: Option<&Ring>,
    plan: &Plan,
    bytes_per_replica: Option<u64>,
) -> PlanView {
    let n = cluster.n as usize;
    let after_parts = owned(&plan.ring);
    let after_reps = shoal_ring::replica_counts(&plan.ring, n);
    let (before_parts, before_reps) = before.map_or_else(Default::default, |r| {
        (owned(r), shoal_ring::replica_counts(r, n))
    });
    let mut ids: Vec<NodeId> = after_parts
        .keys()
        .chain(before_parts.keys())
        .copied()
        .collect();
    ids.sort();
    ids.dedup();
    let replicas_moving: u32 = plan.moves.iter().map(|m| m.to.len() as u32).sum();
    PlanView {
        version: plan.version,
        id: plan.id(),
        partitions_moving: plan.moves.len() as u32,
        replicas_moving,
        expected_bytes: bytes_per_replica.map(|b| b * u64::from(replicas_moving)),
        members: ids
            .iter()
            .map(|id| PlanMember {
                name: cluster.name_of(id),
                zone: cluster.members.get(id).and_then(|m| m.info.zone.clone()),
                partitions_before: before_parts.get(id).copied().unwrap_or(0),
                partitions_after: after_parts.get(id).copied().unwrap_or(0),
                replicas_before: before_reps.get(id).copied().unwrap_or(0) as u32,
                replicas_after: after_reps.get(id).copied().unwrap_or(0) as u32,
            })
            .collect(),
        transfers: plan
            .moves
            .iter()
            .take(64)
            .map(|m| {
                let names = |ids: &[NodeId]| ids.iter().map(|i| cluster.name_of(i)).collect();
                (m.partition, names(&m.from), names(&m.to))
            })
            .collect(),
    }
}

fn owned(ring: &Ring) -> BTreeMap<NodeId, u32> {
    let mut c = BTreeMap::new();
    for o in ring.owners() {
        *c.entry(*o).or_insert(0) += 1;
    }
    c
}
