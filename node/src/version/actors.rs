//! The actors a node mints dots under (see the module doc of
//! [`crate::version`]: a dot is never minted twice).

use serde::{Deserialize, Serialize};
use shoal_ring::NodeId;

use super::{Object, VersionError, VersionVector};

/// Epochs one incarnation can mint: 48 bits.
const MAX_EPOCH: u64 = (1 << 48) - 1;

/// The actors a node mints dots under (see the module doc): 16 bytes of
/// node-id hash (6), incarnation (4) and epoch (6), all big-endian.
#[derive(Debug)]
pub struct Actors {
    prefix: [u8; 6],
    state: std::sync::Mutex<ActorState>,
}

/// Retired epochs an incarnation keeps before it asks for a new incarnation
/// (which retires every actor at once and empties the set).
pub const MAX_RETIRED: usize = 100_000;

#[derive(Debug)]
struct ActorState {
    incarnation: u32,
    /// The last epoch handed out; epochs start at 1.
    epoch: u64,
    /// Epochs of this incarnation whose key this node forgot (reaped): the
    /// counters minted under them are known nowhere here any more, so they
    /// are never written under again, even if a merge or a context brings
    /// their entry back into the key's clock.
    retired: std::collections::HashSet<u64>,
    /// Set by [`Actors::seal`]: nothing is minted any more.
    sealed: bool,
}

/// All an [`Actors`] holds besides the node: what a clean stop records so
/// that the next start mints under the same actors ([`Actors::resume`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActorsState {
    pub incarnation: u32,
    pub epoch: u64,
    /// Sorted.
    pub retired: Vec<u64>,
}

impl Actors {
    pub fn new(node: NodeId, incarnation: u32) -> Self {
        Actors::resume(
            node,
            ActorsState {
                incarnation,
                epoch: 0,
                retired: Vec::new(),
            },
        )
    }

    /// Goes on from `state`, taken by [`Self::seal`] with every key's
    /// lock held, the store unchanged since.
    pub fn resume(node: NodeId, state: ActorsState) -> Self {
        Actors {
            prefix: Actors::node_prefix(&node),
            state: std::sync::Mutex::new(ActorState {
                incarnation: state.incarnation,
                epoch: state.epoch,
                retired: state.retired.into_iter().collect(),
                sealed: false,
            }),
        }
    }

    /// Mints nothing from now on, and returns the state to go on from
    /// (the incarnation, the last epoch handed out and the retired
    /// epochs), for a stop: a dot minted after it would be one the next
    /// start may mint again.
    pub fn seal(&self) -> ActorsState {
        let mut st = self.state();
        st.sealed = true;
        let mut retired: Vec<u64> = st.retired.iter().copied().collect();
        retired.sort_unstable();
        ActorsState {
            incarnation: st.incarnation,
            epoch: st.epoch,
            retired,
        }
    }

    /// The 6 bytes that stand for `node` in its actors: a hash of the whole
    /// id (FNV-1a), so ids that share leading bytes (made by hand, or by a
    /// test) still get distinct actors.
    pub fn node_prefix(node: &NodeId) -> [u8; 6] {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in node.0 {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        let mut prefix = [0u8; 6];
        prefix.copy_from_slice(&h.to_be_bytes()[..6]);
        prefix
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ActorState> {
        // Nothing under this lock can panic; recover the data if it did.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The actor of `epoch` in `incarnation`.
    fn actor(&self, incarnation: u32, epoch: u64) -> NodeId {
        let mut id = [0u8; 16];
        id[..6].copy_from_slice(&self.prefix);
        id[6..10].copy_from_slice(&incarnation.to_be_bytes());
        id[10..].copy_from_slice(&epoch.to_be_bytes()[2..]);
        NodeId(id)
    }

    /// The epoch of `actor` if the current incarnation handed it out: an
    /// epoch past the last one handed out is a client's forgery (actors
    /// can be read off any context), which this node never minted under.
    fn epoch_in(&self, actor: &NodeId, st: &ActorState) -> Option<u64> {
        let a = &actor.0;
        if a[..6] != self.prefix || a[6..10] != st.incarnation.to_be_bytes() {
            return None;
        }
        let mut e = [0u8; 8];
        e[2..].copy_from_slice(&a[10..]);
        Some(u64::from_be_bytes(e)).filter(|epoch| *epoch <= st.epoch)
    }

    /// Whether `actor` is one the current incarnation handed out (its
    /// entries are never pruned, so the node never forgets what it minted
    /// under it).
    pub fn is_current(&self, actor: &NodeId) -> bool {
        let st = self.state();
        self.epoch_in(actor, &st).is_some()
    }

    fn fresh_in(&self, st: &mut ActorState) -> Result<NodeId, VersionError> {
        if st.sealed {
            return Err(VersionError::Sealed);
        }
        if st.epoch >= MAX_EPOCH {
            return Err(VersionError::EpochsExhausted(MAX_EPOCH));
        }
        st.epoch += 1;
        Ok(self.actor(st.incarnation, st.epoch))
    }

    /// A new actor, named in no clock anywhere.
    pub fn fresh(&self) -> Result<NodeId, VersionError> {
        let mut st = self.state();
        self.fresh_in(&mut st)
    }

    /// The actor a write to `object` with `context` is minted under: the
    /// newest live (handed out, not retired) actor of this incarnation
    /// that the object names, unless the context knows more of it than the
    /// object (then, or when there is none, a fresh one).
    pub fn for_write(
        &self,
        object: &Object,
        context: &VersionVector,
    ) -> Result<NodeId, VersionError> {
        let mut st = self.state();
        if st.sealed {
            return Err(VersionError::Sealed);
        }
        let newest = object
            .clock
            .iter()
            .filter_map(|(a, e)| {
                self.epoch_in(a, &st)
                    .filter(|epoch| !st.retired.contains(epoch))
                    .map(|epoch| (epoch, *a, e.counter))
            })
            .max();
        match newest {
            Some((_, actor, counter))
                if counter < u64::MAX && context.get(&actor).is_none_or(|c| *c <= counter) =>
            {
                Ok(actor)
            }
            _ => self.fresh_in(&mut st),
        }
    }

    /// Records that this node forgot `object`'s key (its tombstone was
    /// reaped): the actors of this incarnation it names are never written
    /// under again. Returns true once [`MAX_RETIRED`] epochs are retired:
    /// the caller should then start a new incarnation
    /// ([`Actors::new_incarnation`]), which retires them all at once.
    pub fn retire(&self, object: &Object) -> bool {
        let mut st = self.state();
        let epochs: Vec<u64> = (object.clock.keys())
            .filter_map(|a| self.epoch_in(a, &st))
            .collect();
        st.retired.extend(epochs);
        st.retired.len() >= MAX_RETIRED
    }

    /// Moves to `incarnation` (durably recorded by the caller, and newer
    /// than any before): every earlier actor is retired.
    pub fn new_incarnation(&self, incarnation: u32) {
        let mut st = self.state();
        st.incarnation = incarnation;
        st.epoch = 0;
        st.retired.clear();
    }

    /// The node-id hash, incarnation and epoch of any actor, for display.
    pub fn parts(actor: &NodeId) -> ([u8; 6], u32, u64) {
        let a = &actor.0;
        let mut prefix = [0u8; 6];
        prefix.copy_from_slice(&a[..6]);
        let mut inc = [0u8; 4];
        inc.copy_from_slice(&a[6..10]);
        let mut e = [0u8; 8];
        e[2..].copy_from_slice(&a[10..]);
        (prefix, u32::from_be_bytes(inc), u64::from_be_bytes(e))
    }
}
