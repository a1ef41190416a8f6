//! `shoal inspect`: a key's copies on each primary and its hints anywhere,
//! with actors shown as node names.

use std::sync::Arc;

use shoal_client::proto::{
    HintReport, InspectReport, MemberInfo, ObjectView, ReplicaReport, RequestOptions, Response,
    SiblingView, Value,
};
use shoal_ring::NodeId;

use super::quorum::Coordinator;
use crate::membership::View;
use crate::net::{PeerRequest, PeerResponse, Transport};
use crate::storage::Store;
use crate::version::{Actors, Object};

impl<T: Transport, S: Store> Coordinator<T, S> {
    /// Every primary's copy of `key` and every hint held for it, as the
    /// replicas answer now (`shoal inspect`).
    pub(super) async fn inspect(self: &Arc<Self>, key: &[u8], view: &View) -> Response {
        let primaries = view.preference_list(key, self.settings.n as usize);
        let deadline = self.deadline(&RequestOptions::default());
        let get = PeerRequest::ReplicaGet { key: key.to_vec() };
        let mut answers = self.fan_out(&primaries, get, deadline);
        let mut replicas: Vec<ReplicaReport> = primaries
            .iter()
            .map(|m| ReplicaReport {
                node: m.name.clone(),
                id: m.id,
                object: None,
                error: Some("no answer".into()),
            })
            .collect();
        for _ in 0..primaries.len() {
            let Ok(Some((member, answer))) =
                tokio::time::timeout_at(deadline, answers.recv()).await
            else {
                break;
            };
            let slot = replicas
                .iter_mut()
                .find(|r| r.id == member.id)
                .expect("answer from a target");
            match answer {
                Ok(PeerResponse::Object(o)) => {
                    slot.object = o.map(|o| object_view(&o, view));
                    slot.error = None;
                }
                Ok(other) => slot.error = Some(format!("{other:?}")),
                Err(e) => slot.error = Some(e.to_string()),
            }
        }
        // Hints for the key, wherever they wait: ask every member that is up.
        let holders: Vec<MemberInfo> = view
            .members
            .values()
            .filter(|m| self.liveness.is_up(m.id))
            .cloned()
            .collect();
        let hints_of = PeerRequest::HintsOf { key: key.to_vec() };
        let mut hint_answers = self.fan_out(&holders, hints_of, deadline);
        let mut hints = Vec::new();
        for _ in 0..holders.len() {
            let Ok(Some((holder, answer))) =
                tokio::time::timeout_at(deadline, hint_answers.recv()).await
            else {
                break;
            };
            if let Ok(PeerResponse::Hints(held)) = answer {
                hints.extend(held.iter().map(|(for_node, o)| HintReport {
                    holder: holder.name.clone(),
                    for_node: view.name_of(for_node),
                    object: object_view(o, view),
                }));
            }
        }
        hints.sort_by(|a, b| (&a.holder, &a.for_node).cmp(&(&b.holder, &b.for_node)));
        Response::Inspect(InspectReport {
            partition: view.ring.partition_of(key),
            replicas,
            hints,
        })
    }
}

/// Readable name of an actor: `node1#3.17` is epoch 17 of node1's third
/// incarnation (see [`crate::version`]); the hex id if no member matches.
fn actor_name(actor: &NodeId, view: &View) -> String {
    let (prefix, incarnation, epoch) = Actors::parts(actor);
    view.members
        .values()
        .find(|m| Actors::node_prefix(&m.id) == prefix)
        .map_or_else(
            || actor.to_hex(),
            |m| format!("{}#{incarnation}.{epoch}", m.name),
        )
}

/// Readable form of an object, with node names instead of actor ids.
fn object_view(o: &Object, view: &View) -> ObjectView {
    ObjectView {
        clock: o
            .clock()
            .iter()
            .map(|(n, e)| (actor_name(n, view), e.counter))
            .collect(),
        siblings: o
            .siblings()
            .iter()
            .map(|s| SiblingView {
                dot: (actor_name(&s.dot.node, view), s.dot.counter),
                value: s.value.clone().map(Value),
                timestamp_ms: s.timestamp_ms,
            })
            .collect(),
    }
}
