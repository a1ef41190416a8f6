//! A key's clock on this replica: the entries a write vouches for, and
//! pruning past the configured bounds (see [`crate::version`]).

use shoal_ring::NodeId;

use super::Replica;
use crate::storage::Store;
use crate::version::{Actors, Object};

impl<S: Store> Replica<S> {
    /// Stamps with `now` the entries `learned` from a write's context
    /// ([`Object::learned_from`]) under actors of the nodes this one has
    /// heard of ([`Object::vouch`]); entries under other actors were made
    /// up (or are of a node not heard of yet) and stay at 0.
    pub(super) fn vouch(&self, object: &mut Object, learned: &[NodeId], now: u64) {
        if learned.is_empty() {
            return;
        }
        let nodes = self.membership.actor_prefixes();
        let real = |a: &&NodeId| nodes.contains(&Actors::parts(a).0);
        let s = &self.settings;
        let (min_age, max) = (s.clock_min_age_ms, s.clock_max_entries);
        object.vouch(learned.iter().filter(real), now, min_age, max);
    }

    /// Prunes `object`'s clock past the configured bounds (see
    /// [`Object::prune`]); entries of the actors this incarnation handed
    /// out are kept, and so are `learned` ([`Object::learned_from`]).
    pub(super) fn pruned(&self, object: &mut Object, learned: &[NodeId]) {
        let s = &self.settings;
        let keep = |actor: &NodeId| self.actors.is_current(actor) || learned.contains(actor);
        let now = s.clock.now_ms();
        object.prune(s.clock_max_entries, s.clock_min_age_ms, now, keep);
    }
}
