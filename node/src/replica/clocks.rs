//! A key's clock on this replica: pruning past the configured bounds (see
//! [`crate::version`]).

use shoal_ring::NodeId;

use super::Replica;
use crate::storage::Store;
use crate::version::Object;

impl<S: Store> Replica<S> {
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
