//! Push-pull gossip of the [`ClusterState`] (as Riak's ring gossip and
//! Cassandra's do): every `cluster.gossip-ms` a node sends one peer, chosen
//! at random (seeded), the digest of its state. Equal digests end the
//! exchange. Otherwise the peer answers with its state, the node merges it
//! and, if the peer still lacks something (the merged digest differs from
//! the peer's), pushes the merged state back. Both sides end with the merge
//! of the two, so a change reaches every node in O(log M) rounds (the
//! 100-node test below states the bound it checks), and a node that was
//! down catches up at its first exchange after it returns.
//!
//! Peers are every member heard of (removed ones excepted) and the
//! configured founding members or seeds, so a joining node starts from its
//! seeds and a founding node from its config.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use shoal_client::proto::MemberInfo;
use tokio::time::Instant;

use crate::membership::state::ClusterState;
use crate::membership::Membership;
use crate::net::{PeerError, PeerRequest, PeerResponse, Transport};

/// What one exchange did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The digests matched.
    Same,
    /// The states differed; `changed`: ours changed, `pushed`: theirs needed ours.
    Merged { changed: bool, pushed: bool },
}

/// A node's source of gossip partners: seeded, so a simulation replays.
pub struct Partners(std::sync::Mutex<StdRng>);

impl Partners {
    pub fn seeded(seed: u64) -> Self {
        Partners(std::sync::Mutex::new(StdRng::seed_from_u64(seed)))
    }

    /// One peer to gossip with, other than `me`; none when alone.
    pub fn pick(&self, membership: &Membership, me: &MemberInfo) -> Option<MemberInfo> {
        let mut peers: Vec<MemberInfo> = membership
            .known()
            .into_iter()
            .filter(|m| m.id != me.id && m.name != me.name)
            .collect();
        for e in membership.expected() {
            if e.name != me.name && !peers.iter().any(|p| p.name == e.name) {
                peers.push(e);
            }
        }
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        peers
            .choose(&mut *self.0.lock().expect("partners lock"))
            .cloned()
    }
}

/// One push-pull exchange with `peer`.
pub async fn exchange<T: Transport>(
    membership: &Membership,
    transport: &T,
    peer: &MemberInfo,
    deadline: Instant,
) -> Result<Outcome, String> {
    let digest = membership.cluster().digest();
    let theirs = match transport
        .call(peer, PeerRequest::Gossip { digest }, deadline)
        .await
    {
        Ok(PeerResponse::Gossip(None)) => return Ok(Outcome::Same),
        Ok(PeerResponse::Gossip(Some(state))) => state,
        Ok(PeerResponse::Error(e)) => return Err(e.to_string()),
        Ok(other) => return Err(format!("unexpected answer to gossip: {other:?}")),
        Err(e) => return Err(e.to_string()),
    };
    let their_digest = theirs.digest();
    let changed = membership
        .merge_cluster(&theirs)
        .map_err(|e| format!("{} sent a state refused: {e}", peer.name))?;
    let ours = membership.cluster();
    let pushed = ours.digest() != their_digest;
    if pushed {
        match transport
            .call(peer, PeerRequest::GossipPush(Box::new(ours)), deadline)
            .await
        {
            Ok(PeerResponse::Stored) => {}
            Ok(other) => return Err(format!("unexpected answer to a gossip push: {other:?}")),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(Outcome::Merged { changed, pushed })
}

/// The receiving side: `Gossip` is answered with our state unless the
/// digests match; `GossipPush` is merged. The second value says whether our
/// state changed (the caller persists it).
pub fn answer(membership: &Membership, request: PeerRequest) -> (PeerResponse, bool) {
    match request {
        PeerRequest::Gossip { digest } => {
            let ours = membership.cluster();
            if ours.digest() == digest {
                (PeerResponse::Gossip(None), false)
            } else {
                (PeerResponse::Gossip(Some(Box::new(ours))), false)
            }
        }
        PeerRequest::GossipPush(theirs) => match membership.merge_cluster(&theirs) {
            Ok(changed) => (PeerResponse::Stored, changed),
            Err(e) => (
                PeerResponse::Error(PeerError::Refused(e.to_string())),
                false,
            ),
        },
        other => (
            PeerResponse::Error(PeerError::NotAReplicaRequest(format!("{other:?}"))),
            false,
        ),
    }
}

/// Decodes a persisted cluster state (meta key [`CLUSTER_KEY`]).
pub fn decode(bytes: &[u8]) -> Result<ClusterState, String> {
    rmp_serde::from_slice(bytes).map_err(|e| e.to_string())
}

/// Encodes the cluster state for [`CLUSTER_KEY`].
pub fn encode(state: &ClusterState) -> Vec<u8> {
    rmp_serde::to_vec(state).expect("cluster state encodes")
}

/// Meta-tree key of the persisted cluster state.
pub const CLUSTER_KEY: &[u8] = b"cluster-state";

#[cfg(test)]
mod tests {
    //! Convergence of the real gossip (the exchange, the answer, the state's
    //! merge) among 100 members over an in-memory mesh.
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::{Arc, Mutex};

    use rand::Rng;
    use shoal_ring::{NodeId, Ring};

    use super::*;
    use crate::membership::state::Change;
    use crate::net::TransportError;

    const Q: u32 = 1024;

    /// Delivers each call to the named member's gossip answer; `down`
    /// members are unreachable.
    #[derive(Clone, Default)]
    struct Mesh {
        members: Arc<Mutex<BTreeMap<String, Arc<Membership>>>>,
        down: Arc<Mutex<BTreeSet<String>>>,
    }

    impl Transport for Mesh {
        async fn send(
            &self,
            to: &MemberInfo,
            request: PeerRequest,
        ) -> Result<PeerResponse, TransportError> {
            if self.down.lock().unwrap().contains(&to.name) {
                return Err(TransportError::Unreachable(to.name.clone(), "down".into()));
            }
            let m = self.members.lock().unwrap().get(&to.name).cloned();
            let m =
                m.ok_or_else(|| TransportError::Unreachable(to.name.clone(), "no such".into()))?;
            Ok(answer(&m, request).0)
        }
    }

    fn info(i: u32) -> MemberInfo {
        MemberInfo {
            id: NodeId::from_u128(u128::from(i) * 7919 + 1),
            name: format!("n{i:03}"),
            client_addr: ([127, 0, 0, 1], 1).into(),
            peer_addr: ([127, 0, 0, 1], 2).into(),
            zone: None,
        }
    }

    /// 100 members that all hold layout 1; returns the mesh and the states.
    fn cluster(size: u32) -> (Mesh, Vec<(MemberInfo, Arc<Membership>, Partners)>) {
        let mut state = ClusterState::new(Q, 3);
        for i in 0..size {
            state.announce(info(i), 1);
        }
        let ids: BTreeSet<NodeId> = (0..size).map(|i| info(i).id).collect();
        state.adopt(Ring::claim(None, &ids, Q, 3).unwrap());
        let mesh = Mesh::default();
        let nodes: Vec<_> = (0..size)
            .map(|i| {
                let m = Arc::new(Membership::with_state(
                    Vec::new(),
                    Vec::new(),
                    Some(state.clone()),
                    false,
                    Q,
                    3,
                ));
                mesh.members.lock().unwrap().insert(info(i).name, m.clone());
                (info(i), m, Partners::seeded(u64::from(i) ^ 0x90551b))
            })
            .collect();
        (mesh, nodes)
    }

    /// Rounds (every live member gossips once, in a seeded order) until
    /// every member holds the same state.
    async fn rounds_to_converge(
        mesh: &Mesh,
        nodes: &[(MemberInfo, Arc<Membership>, Partners)],
        seed: u64,
        limit: u32,
    ) -> Option<u32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for round in 1..=limit {
            let mut order: Vec<usize> = (0..nodes.len()).collect();
            order.shuffle(&mut rng);
            for i in order {
                let (me, m, partners) = &nodes[i];
                if mesh.down.lock().unwrap().contains(&me.name) {
                    continue;
                }
                if let Some(peer) = partners.pick(m, me) {
                    let deadline = Instant::now() + std::time::Duration::from_secs(1);
                    let _ = exchange(m, mesh, &peer, deadline).await;
                }
            }
            let digests: BTreeSet<u64> = nodes.iter().map(|n| n.1.cluster().digest()).collect();
            if digests.len() == 1 {
                return Some(round);
            }
            let _ = rng.gen::<u8>();
        }
        None
    }

    /// A commit on one of 100 members reaches all of them within
    /// [`ROUNDS_100`] rounds; measured over 20 seeds.
    const ROUNDS_100: u32 = 12;

    #[tokio::test(flavor = "current_thread")]
    async fn a_commit_reaches_100_members_within_12_rounds() {
        let mut worst = 0;
        for seed in 0..20u64 {
            let (mesh, nodes) = cluster(100);
            // A new member announces itself to one seed and stages its join;
            // an operator commits on another member.
            let newcomer = info(100);
            let joiner = Arc::new(Membership::with_state(
                Vec::new(),
                Vec::new(),
                None,
                true,
                Q,
                3,
            ));
            joiner.edit(|c| {
                c.announce(newcomer.clone(), 2);
                c.stage(newcomer.id, Some(Change::Join), 2);
            });
            nodes[7].1.merge_cluster(&joiner.cluster()).unwrap();
            nodes[42].1.merge_cluster(&nodes[7].1.cluster()).unwrap();
            let version = nodes[42].1.edit(|c| c.commit(2, None, 3)).unwrap().version;
            assert_eq!(version, 2);
            let rounds = rounds_to_converge(&mesh, &nodes, seed, 50)
                .await
                .unwrap_or_else(|| panic!("seed {seed}: no convergence in 50 rounds"));
            for (_, m, _) in &nodes {
                assert_eq!(m.view().unwrap().version, 2);
            }
            worst = worst.max(rounds);
            assert!(
                rounds <= ROUNDS_100,
                "seed {seed}: {rounds} rounds > {ROUNDS_100}"
            );
        }
        println!("100 members, 20 seeds: a commit reached every member in at most {worst} rounds (bound {ROUNDS_100})");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_member_that_was_down_catches_up_when_it_returns() {
        let (mesh, nodes) = cluster(20);
        mesh.down.lock().unwrap().insert(nodes[3].0.name.clone());
        nodes[0].1.edit(|c| {
            c.stage(nodes[19].0.id, Some(Change::Leave), 5);
            c.commit(2, None, 6).unwrap();
        });
        // Everyone else converges; the down member still has layout 1.
        assert!(rounds_to_converge(&mesh, &nodes, 1, 30).await.is_none());
        assert_eq!(nodes[3].1.view().unwrap().version, 1);
        mesh.down.lock().unwrap().clear();
        let rounds = rounds_to_converge(&mesh, &nodes, 2, 30).await;
        assert!(rounds.is_some_and(|r| r <= 10), "{rounds:?}");
        assert_eq!(nodes[3].1.view().unwrap().version, 2);
    }
}
