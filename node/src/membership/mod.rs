//! Membership: who is in the cluster, and the ring built from them.
//!
//! Two ways a cluster's ring comes about:
//! - **Founding, from the static config.** The config names the founding
//!   members and their peer addresses. A member's *identity* is the random
//!   id in its data directory, which other nodes learn with a `Hello`
//!   exchange; once every configured member is identified, each node builds
//!   the same ring from the same id set (see [`shoal_ring::Ring::claim`]).
//!   What a node has learned is persisted, so a node restarted while others
//!   are down still knows the ring. A member whose id changes (its data
//!   directory was wiped) is re-learned and the ring recomputed.
//! - **Committed changes, gossiped.** The [`state::ClusterState`] (members,
//!   versioned layouts, staged changes) is replicated by push-pull gossip
//!   ([`crate::gossip`]). A new node needs only a seed: it announces itself and
//!   stages its own join; an operator plans and commits (`shoal cluster
//!   plan` / `commit`). The first commit turns the static ring into layout
//!   version 1; from then on the latest committed layout is the ring, and
//!   the static list is only where gossip starts.
//!
//! Liveness is the failure detector's ([`crate::detector`], fed by
//! [`crate::liveness`]).

pub mod state;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use shoal_client::proto::MemberInfo;
use shoal_ring::{NodeId, Ring};

/// Meta-tree key of the learned member list (see the module doc: what a
/// node learned survives its restart).
pub const MEMBERS_KEY: &[u8] = b"members";

/// Encodes the learned member list for [`MEMBERS_KEY`].
pub fn encode_known(known: &[MemberInfo]) -> Vec<u8> {
    rmp_serde::to_vec_named(known).expect("member list encodes")
}

/// Decodes the learned member list stored under [`MEMBERS_KEY`].
pub fn decode_known(bytes: &[u8]) -> Result<Vec<MemberInfo>, String> {
    rmp_serde::from_slice(bytes).map_err(|e| e.to_string())
}

use crate::config::MemberConfig;
use state::{ClusterState, StateError};

/// The ring and the members it was built from, always consistent together.
#[derive(Debug, Clone)]
pub struct View {
    /// The current ring: the latest committed layout (or the static one).
    pub ring: Arc<Ring>,
    /// Every member of any layout in the history, by id.
    pub members: Arc<BTreeMap<NodeId, MemberInfo>>,
    /// The layout version of `ring`; 0 for the static ring.
    pub version: u64,
    /// Older layouts still in transition to `ring`, oldest first; empty
    /// when no change is in progress. Writes reach the replicas of every
    /// layout, reads the oldest's until `reads_new` (see [`state`]).
    pub older: Arc<Vec<Ring>>,
    /// In a transition, every member of the new layout has synced: reads
    /// go to its replicas.
    pub reads_new: bool,
    /// Members of a layout in the history that were removed (`remove`,
    /// `replace`): whatever they hold counts for nothing from the commit
    /// on (see [`View::read_list`]).
    pub removed: Arc<BTreeSet<NodeId>>,
}

impl View {
    /// Members of the key's preference list in the current ring, in order.
    pub fn preference_list(&self, key: &[u8], n: usize) -> Vec<MemberInfo> {
        self.members_of(self.ring.preference_list(key, n))
    }

    fn members_of(&self, ids: Vec<NodeId>) -> Vec<MemberInfo> {
        ids.iter()
            .filter_map(|id| self.members.get(id).cloned())
            .collect()
    }

    /// Whether a layout change is in progress.
    pub fn in_transition(&self) -> bool {
        !self.older.is_empty()
    }

    /// The key's preference list in every layout of the history, oldest
    /// first: a write must reach W replicas of each.
    pub fn write_lists(&self, key: &[u8], n: usize) -> Vec<Vec<MemberInfo>> {
        self.older
            .iter()
            .chain(std::iter::once(&*self.ring))
            .map(|ring| self.members_of(ring.preference_list(key, n)))
            .collect()
    }

    /// The preference list reads use: the oldest layout's, whose replicas
    /// hold every acknowledged write until the new ones have synced, less
    /// its removed members. A write a removed member took counts for W
    /// with its copy there, which the removal gives up for lost (the loss
    /// of one machine: the write's other copies survive it); no fallback
    /// holds that copy, so none may stand in for the member in a read: it
    /// would answer "absent" in place of a replica that held the write.
    /// The read meets R among the replicas left (a key that lost two of
    /// its three old replicas to removals in one change is read once its
    /// new replicas synced).
    pub fn read_list(&self, key: &[u8], n: usize) -> Vec<MemberInfo> {
        match self.older.first() {
            Some(oldest) if !self.reads_new => {
                let mut list = oldest.preference_list(key, n);
                list.retain(|id| !self.removed.contains(id));
                self.members_of(list)
            }
            _ => self.preference_list(key, n),
        }
    }

    /// Which stage of the layouts this view routes by: requests are counted
    /// under it until they end (see [`Membership::request_started`]), and a
    /// node reports a step only once none routed by an earlier stage runs.
    /// Stages of one version: 0 while reads go to the old replicas, 1 once
    /// they go to the new, 2 once the old layouts are dropped.
    pub fn stage(&self) -> u64 {
        let phase = match (self.in_transition(), self.reads_new) {
            (true, false) => 0,
            (true, true) => 1,
            (false, _) => 2,
        };
        self.version * 4 + phase
    }

    /// Every replica of the key in any layout, current ones first.
    pub fn replicas(&self, key: &[u8], n: usize) -> Vec<MemberInfo> {
        self.members_of(self.replica_ids(key, n))
    }

    /// The ids of [`View::replicas`], without copying member records: a
    /// coordinator asks on every request whether it is one.
    pub fn replica_ids(&self, key: &[u8], n: usize) -> Vec<NodeId> {
        let mut all = self.ring.preference_list(key, n);
        for ring in self.older.iter().rev() {
            for id in ring.preference_list(key, n) {
                if !all.contains(&id) {
                    all.push(id);
                }
            }
        }
        all
    }

    pub fn name_of(&self, id: &NodeId) -> String {
        self.members
            .get(id)
            .map_or_else(|| id.to_hex(), |m| m.name.clone())
    }
}

struct State {
    /// Founding members identified by hello, by name.
    known: BTreeMap<String, MemberInfo>,
    /// The gossiped state; its layouts, once there are any, are the ring.
    cluster: ClusterState,
    view: Option<View>,
}

pub struct Membership {
    /// The founding members from the config, or the seeds to join through.
    expected: Vec<MemberConfig>,
    /// The config names seeds: until a layout arrives by gossip this node
    /// has no ring (it must not serve as a cluster of one).
    joining: bool,
    partitions: u32,
    n: usize,
    state: RwLock<State>,
    /// Requests being coordinated here, by the stage of the layouts they
    /// were routed by ([`View::stage`]): a node reports a step of a change
    /// only once no request routed by an earlier stage is still running
    /// (see [`crate::transfer`]).
    requests: std::sync::Mutex<BTreeMap<u64, usize>>,
}

/// A request in progress, counted under its stage until dropped.
pub struct RequestGuard<'a> {
    membership: &'a Membership,
    stage: u64,
}

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        let mut requests = self.membership.requests.lock().expect("requests lock");
        if let Some(n) = requests.get_mut(&self.stage) {
            *n -= 1;
            if *n == 0 {
                requests.remove(&self.stage);
            }
        }
    }
}

impl Membership {
    /// `known` is what was persisted (or, in simulations, everything);
    /// `cluster` the persisted cluster state, if any.
    pub fn new(
        expected: Vec<MemberConfig>,
        known: Vec<MemberInfo>,
        partitions: u32,
        n: usize,
    ) -> Self {
        Membership::with_state(expected, known, None, false, partitions, n)
    }

    /// [`Membership::new`] with a persisted cluster state, and whether
    /// `expected` are seeds to join through rather than founding members.
    pub fn with_state(
        expected: Vec<MemberConfig>,
        known: Vec<MemberInfo>,
        cluster: Option<ClusterState>,
        joining: bool,
        partitions: u32,
        n: usize,
    ) -> Self {
        let m = Membership {
            expected,
            joining,
            partitions,
            n,
            state: RwLock::new(State {
                known: BTreeMap::new(),
                cluster: cluster.unwrap_or_else(|| ClusterState::new(partitions, n as u32)),
                view: None,
            }),
            requests: Default::default(),
        };
        {
            let mut state = m.state.write().expect("membership lock");
            for info in known {
                if m.expected.iter().any(|e| e.name == info.name) {
                    state.known.insert(info.name.clone(), info);
                }
            }
            state.view = m.build_view(&state);
        }
        m
    }

    /// Records what a founding member said about itself. Returns true if
    /// anything changed (the caller then persists [`Membership::known`]).
    pub fn learn(&self, info: MemberInfo) -> bool {
        if self.joining || !self.expected.iter().any(|e| e.name == info.name) {
            return false;
        }
        let mut state = self.state.write().expect("membership lock");
        if state.known.get(&info.name) == Some(&info) {
            return false;
        }
        state.known.insert(info.name.clone(), info);
        state.view = self.build_view(&state);
        true
    }

    fn build_view(&self, state: &State) -> Option<View> {
        if let Some(current) = state.cluster.current() {
            let by_id: BTreeMap<NodeId, &MemberInfo> =
                state.known.values().map(|m| (m.id, m)).collect();
            let members = state
                .cluster
                .layouts
                .iter()
                .flat_map(|l| l.ring.members())
                .filter_map(|id| {
                    let info = state.cluster.members.get(&id).map(|m| &m.info);
                    info.or_else(|| by_id.get(&id).copied())
                        .map(|info| (id, info.clone()))
                })
                .collect::<BTreeMap<NodeId, MemberInfo>>();
            let removed = (state.cluster.members.iter())
                .filter(|(id, m)| m.removed && members.contains_key(*id))
                .map(|(id, _)| *id)
                .collect();
            let layouts = &state.cluster.layouts;
            return Some(View {
                ring: Arc::new(current.ring.clone()),
                members: Arc::new(members),
                version: current.version,
                older: Arc::new(
                    layouts[..layouts.len() - 1]
                        .iter()
                        .map(|l| l.ring.clone())
                        .collect(),
                ),
                reads_new: layouts.len() > 1 && state.cluster.all_synced(),
                removed: Arc::new(removed),
            });
        }
        if self.joining {
            return None;
        }
        let ring = self.static_ring(&state.known)?;
        let members = state.known.values().map(|m| (m.id, m.clone())).collect();
        Some(View {
            ring: Arc::new(ring),
            members: Arc::new(members),
            version: 0,
            older: Arc::default(),
            reads_new: false,
            removed: Arc::default(),
        })
    }

    /// The ring of the founding members, once every one is identified.
    fn static_ring(&self, known: &BTreeMap<String, MemberInfo>) -> Option<Ring> {
        if self.expected.iter().any(|e| !known.contains_key(&e.name)) {
            return None;
        }
        let ids: BTreeSet<NodeId> = known.values().map(|m| m.id).collect();
        if ids.len() != known.len() {
            return None; // two names claim one id: wait until corrected
        }
        Ring::claim(None, &ids, self.partitions, self.n).ok()
    }

    /// The latest view, its stage counted as in use until the guard drops.
    /// The count is taken before the view is read again, so a node that
    /// moves to a later stage meanwhile either sees this request counted
    /// or this request sees the later stage.
    pub fn pin(&self) -> Option<(View, RequestGuard<'_>)> {
        let mut view = self.view()?;
        loop {
            let guard = RequestGuard {
                membership: self,
                stage: view.stage(),
            };
            *self
                .requests
                .lock()
                .expect("requests lock")
                .entry(guard.stage)
                .or_default() += 1;
            match self.view() {
                Some(latest) if latest.stage() != view.stage() => view = latest,
                _ => return Some((view, guard)),
            }
        }
    }

    /// Requests still running that were routed by a stage before `stage`.
    pub fn requests_before(&self, stage: u64) -> usize {
        self.requests
            .lock()
            .expect("requests lock")
            .range(..stage)
            .map(|(_, n)| n)
            .sum()
    }

    /// Partitions Q of the ring.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The ring, once every member is identified.
    pub fn view(&self) -> Option<View> {
        self.state.read().expect("membership lock").view.clone()
    }

    /// The layout version tombstones may be reaped under: the current one,
    /// once no change is in progress and every member has dropped the
    /// copies it no longer replicates; `None` before the ring is known and
    /// while a change is under way (see [`crate::reaper`]).
    pub fn settled(&self) -> Option<u64> {
        let state = self.state.read().expect("membership lock");
        let view = state.view.as_ref()?;
        let cleaning = view.version > 0 && !state.cluster.waiting_for(|p| p.cleaned).is_empty();
        (!view.in_transition() && !cleaning).then_some(view.version)
    }

    /// A copy of the gossiped cluster state.
    pub fn cluster(&self) -> ClusterState {
        self.state.read().expect("membership lock").cluster.clone()
    }

    /// Merges a state another node sent. Returns whether ours changed (the
    /// caller then persists it).
    pub fn merge_cluster(&self, other: &ClusterState) -> Result<bool, StateError> {
        other.check(self.partitions, self.n as u32)?;
        Ok(self.edit(|c| c.merge(other)))
    }

    /// Changes the cluster state in place (announce, stage, commit,
    /// progress) and rebuilds the view. When the state has no layout yet
    /// and the static ring is complete, `f` sees it adopted as version 1,
    /// so a commit builds on the ring the cluster runs on.
    pub fn edit<R>(&self, f: impl FnOnce(&mut ClusterState) -> R) -> R {
        let mut state = self.state.write().expect("membership lock");
        let before_layouts = state.cluster.layouts.is_empty();
        let mut draft = state.cluster.clone();
        if before_layouts && !self.joining {
            if let Some(ring) = self.static_ring(&state.known) {
                draft.adopt(ring);
                // Founding members known by hello, whose own announcement
                // has not arrived by gossip yet (it wins: stamp 0 loses).
                for info in state.known.values() {
                    draft
                        .members
                        .entry(info.id)
                        .or_insert_with(|| state::Member {
                            info: info.clone(),
                            stamp: 0,
                            removed: false,
                        });
                }
            }
        }
        let out = f(&mut draft);
        // Adopting the static ring is only kept if the edit committed on top
        // of it; otherwise the cluster keeps following the static config.
        if before_layouts && draft.layouts.len() == 1 && draft.layouts[0].version == 1 {
            draft.layouts.clear();
        }
        state.cluster = draft;
        state.view = self.build_view(&state);
        out
    }

    /// Why there is no ring yet, for errors and status.
    pub fn not_ready_reason(&self) -> String {
        if self.joining {
            let seeds: Vec<String> = self.expected.iter().map(|e| e.name.clone()).collect();
            return format!(
                "ring not ready: this node has not joined yet (seeds {}; an operator commits the join with `shoal cluster plan` and `shoal cluster commit`)",
                seeds.join(", ")
            );
        }
        format!(
            "ring not ready: waiting to identify {}",
            self.missing_names().join(", ")
        )
    }

    /// Every member heard of, founding ones by hello and others by gossip,
    /// removed ones excepted.
    pub fn known(&self) -> Vec<MemberInfo> {
        let state = self.state.read().expect("membership lock");
        let mut by_id: BTreeMap<NodeId, MemberInfo> =
            state.known.values().map(|m| (m.id, m.clone())).collect();
        for (id, m) in &state.cluster.members {
            if m.removed {
                by_id.remove(id);
            } else {
                by_id.insert(*id, m.info.clone());
            }
        }
        by_id.into_values().collect()
    }

    /// What founding members said by hello (persisted under [`MEMBERS_KEY`]).
    pub fn learned(&self) -> Vec<MemberInfo> {
        let state = self.state.read().expect("membership lock");
        state.known.values().cloned().collect()
    }

    /// Configured members not identified yet.
    pub fn missing(&self) -> Vec<MemberConfig> {
        if self.joining {
            return Vec::new();
        }
        let state = self.state.read().expect("membership lock");
        self.expected
            .iter()
            .filter(|e| !state.known.contains_key(&e.name))
            .cloned()
            .collect()
    }

    /// A member by name: from gossip, from hello, or as configured.
    pub fn by_name(&self, name: &str) -> Option<MemberInfo> {
        {
            let state = self.state.read().expect("membership lock");
            if let Some(m) = state.cluster.by_name(name) {
                return Some(m.info.clone());
            }
            if let Some(m) = state.known.get(name) {
                return Some(m.clone());
            }
        }
        self.expected().into_iter().find(|m| m.name == name)
    }

    /// Names of the configured members not identified yet.
    pub fn missing_names(&self) -> Vec<String> {
        self.missing().into_iter().map(|m| m.name).collect()
    }

    /// The member that commits changes (Riak's claimant): the lowest id
    /// among the current layout's members that are not removed, the same
    /// on every node that has the same state. Commits made on one node
    /// cannot race each other to the same version. While it is down no
    /// change commits; removing it (`shoal remove`) hands the role to the
    /// next.
    pub fn claimant(&self) -> Option<MemberInfo> {
        let state = self.state.read().expect("membership lock");
        let view = state.view.as_ref()?;
        let removed = |id: &NodeId| state.cluster.members.get(id).is_some_and(|m| m.removed);
        let id = view.ring.members().into_iter().find(|id| !removed(id))?;
        view.members.get(&id).cloned()
    }

    /// Whether `id` was removed from the cluster (it left, or was removed
    /// by an operator): it serves nothing and nothing is taken from it.
    pub fn removed(&self, id: &NodeId) -> bool {
        let state = self.state.read().expect("membership lock");
        state.cluster.members.get(id).is_some_and(|m| m.removed)
    }

    /// Whether the member named `name` was removed (and no live member has
    /// taken the name since).
    pub fn removed_name(&self, name: &str) -> bool {
        let state = self.state.read().expect("membership lock");
        let members = state
            .cluster
            .members
            .values()
            .filter(|m| m.info.name == name);
        let (mut removed, mut live) = (false, false);
        for m in members {
            if m.removed {
                removed = true;
            } else {
                live = true;
            }
        }
        removed && !live
    }

    /// Whether the config names seeds to join through.
    pub fn joining(&self) -> bool {
        self.joining
    }

    /// Every configured member (or seed), identified or not, as the
    /// transport addresses them (unidentified ones with a zero id).
    pub fn expected(&self) -> Vec<MemberInfo> {
        let state = self.state.read().expect("membership lock");
        self.expected
            .iter()
            .map(|e| {
                state.known.get(&e.name).cloned().unwrap_or(MemberInfo {
                    id: NodeId([0; 16]),
                    name: e.name.clone(),
                    client_addr: e.peer_addr,
                    peer_addr: e.peer_addr,
                    zone: None,
                })
            })
            .collect()
    }
}
