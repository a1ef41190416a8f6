//! Membership: who is in the cluster, and the ring built from them.
//!
//! In this version membership is static: the config names every member and
//! its peer address. A member's *identity* is the random id in its data
//! directory, which other nodes learn with a `Hello` exchange; once every
//! configured member is identified, each node builds the same ring from the
//! same id set (see [`shoal_ring::Ring::claim`]). What a node has learned is
//! persisted, so a node restarted while others are down still knows the ring.
//! A member whose id changes (its data directory was wiped) is re-learned and
//! the ring recomputed.
//!
//! Liveness is the failure detector's ([`crate::detector`], fed by
//! [`crate::liveness`]); gossip and join/leave are not implemented yet.

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

/// The ring and the members it was built from, always consistent together.
#[derive(Debug, Clone)]
pub struct View {
    pub ring: Arc<Ring>,
    pub members: Arc<BTreeMap<NodeId, MemberInfo>>,
}

impl View {
    /// Members of the key's preference list, in order.
    pub fn preference_list(&self, key: &[u8], n: usize) -> Vec<MemberInfo> {
        self.ring
            .preference_list(key, n)
            .iter()
            .filter_map(|id| self.members.get(id).cloned())
            .collect()
    }

    pub fn name_of(&self, id: &NodeId) -> String {
        self.members
            .get(id)
            .map_or_else(|| id.to_hex(), |m| m.name.clone())
    }
}

struct State {
    known: BTreeMap<String, MemberInfo>,
    view: Option<View>,
}

pub struct Membership {
    expected: Vec<MemberConfig>,
    partitions: u32,
    n: usize,
    state: RwLock<State>,
}

impl Membership {
    /// `known` is what was persisted (or, in simulations, everything).
    pub fn new(
        expected: Vec<MemberConfig>,
        known: Vec<MemberInfo>,
        partitions: u32,
        n: usize,
    ) -> Self {
        let m = Membership {
            expected,
            partitions,
            n,
            state: RwLock::new(State {
                known: BTreeMap::new(),
                view: None,
            }),
        };
        for info in known {
            m.learn(info);
        }
        m
    }

    /// Records what a member said about itself. Returns true if anything
    /// changed (the caller then persists [`Membership::known`]).
    pub fn learn(&self, info: MemberInfo) -> bool {
        if !self.expected.iter().any(|e| e.name == info.name) {
            return false;
        }
        let mut state = self.state.write().expect("membership lock");
        if state.known.get(&info.name) == Some(&info) {
            return false;
        }
        state.known.insert(info.name.clone(), info);
        state.view = self.build_view(&state.known);
        true
    }

    fn build_view(&self, known: &BTreeMap<String, MemberInfo>) -> Option<View> {
        if self.expected.iter().any(|e| !known.contains_key(&e.name)) {
            return None;
        }
        let ids: BTreeSet<NodeId> = known.values().map(|m| m.id).collect();
        if ids.len() != known.len() {
            return None; // two names claim one id: wait until corrected
        }
        let ring = Ring::claim(None, &ids, self.partitions, self.n).ok()?;
        let members = known.values().map(|m| (m.id, m.clone())).collect();
        Some(View {
            ring: Arc::new(ring),
            members: Arc::new(members),
        })
    }

    /// Partitions Q of the ring.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The ring, once every member is identified.
    pub fn view(&self) -> Option<View> {
        self.state.read().expect("membership lock").view.clone()
    }

    /// Everything learned so far.
    pub fn known(&self) -> Vec<MemberInfo> {
        self.state
            .read()
            .expect("membership lock")
            .known
            .values()
            .cloned()
            .collect()
    }

    /// Configured members not identified yet.
    pub fn missing(&self) -> Vec<MemberConfig> {
        let state = self.state.read().expect("membership lock");
        self.expected
            .iter()
            .filter(|e| !state.known.contains_key(&e.name))
            .cloned()
            .collect()
    }

    /// A configured member by name, identified or not.
    pub fn by_name(&self, name: &str) -> Option<MemberInfo> {
        // Identified members first: one map lookup on the request path.
        if let Some(m) = self.state.read().expect("membership lock").known.get(name) {
            return Some(m.clone());
        }
        self.expected().into_iter().find(|m| m.name == name)
    }

    /// Names of the configured members not identified yet.
    pub fn missing_names(&self) -> Vec<String> {
        self.missing().into_iter().map(|m| m.name).collect()
    }

    /// Every configured member, identified or not, as the transport addresses
    /// them (unidentified ones with a zero id).
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
                })
            })
            .collect()
    }
}
