//! Forwarded requests: the ids a node gives the requests it forwards, and
//! the forwards it received lately, so a duplicate runs nothing twice.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

/// Ids of the requests a node forwards: unique per sender across its
/// restarts (they start from the wall clock's milliseconds, shifted, and
/// count up), so a receiver can tell a duplicate from a new request.
#[derive(Debug)]
pub struct ForwardIds(std::sync::atomic::AtomicU64);

impl ForwardIds {
    pub fn starting_at(now_ms: u64) -> Self {
        ForwardIds(std::sync::atomic::AtomicU64::new(now_ms << 16))
    }

    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

/// The forwards a node received lately, by sender and id, so a duplicate
/// does not run a write again; the oldest are forgotten past a bound
/// (a duplicate arrives within a request timeout, not 100,000 forwards
/// later).
#[derive(Default)]
pub(super) struct ForwardsSeen(Mutex<(HashSet<Forward>, VecDeque<Forward>)>);

/// A forward's sender and id.
type Forward = (String, u64);

/// Forwards remembered per node.
const FORWARDS_REMEMBERED: usize = 100_000;

impl ForwardsSeen {
    /// Whether this is the first delivery of `id` from `from` (and records it).
    pub(super) fn first(&self, from: &str, id: u64) -> bool {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (seen, order) = &mut *guard;
        let entry = (from.to_string(), id);
        if !seen.insert(entry.clone()) {
            return false;
        }
        order.push_back(entry);
        if order.len() > FORWARDS_REMEMBERED {
            if let Some(old) = order.pop_front() {
                seen.remove(&old);
            }
        }
        true
    }
}
