//! The per-key lock and object cache: keys are spread over `LOCK_STRIPES`
//! stripes, each a mutex over a byte-bounded cache of stored objects.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// Stripes of the per-key lock that makes read-modify-write of a local object
/// atomic.
pub(crate) const LOCK_STRIPES: usize = 256;

/// What an entry costs the cache beyond its key and value.
const CACHE_ENTRY_OVERHEAD: usize = 64;

/// One of the stripes that keys are spread over. Its lock serialises every
/// change to its keys' stored objects (read-modify-write is atomic under it),
/// and it caches the stored bytes of recently used objects. The cache is
/// exact: it is filled from the store and changed after every write in the
/// same critical section as the write itself.
///
/// It also knows which of its keys' stored objects are over
/// [`crate::tasks::HEAVY_BYTES`], as last read or written (cached or not),
/// so that the next read of one runs off the worker: copying 60 MiB out of
/// RocksDB took 150 ms. A key first read since the start is read on it.
pub(crate) struct Stripe {
    cache: HashMap<Vec<u8>, Arc<[u8]>>,
    bytes: usize,
    budget: usize,
    large: HashSet<Vec<u8>>,
}

/// Locks a stripe even if a panic poisoned it: a bug hit by one request
/// must not make every key of the stripe fail from then on. Its cache may
/// be stale after such a panic (the store write may have happened without
/// the cache update), so it is emptied; the store stays the truth.
pub(crate) fn relock(stripe: &Mutex<Stripe>) -> MutexGuard<'_, Stripe> {
    stripe.lock().unwrap_or_else(|poisoned| {
        stripe.clear_poison();
        let mut guard = poisoned.into_inner();
        guard.clear();
        guard
    })
}

impl Stripe {
    pub(crate) fn new(budget: usize) -> Self {
        Stripe {
            cache: HashMap::new(),
            bytes: 0,
            budget,
            large: HashSet::new(),
        }
    }

    fn cost(key: &[u8], value: &[u8]) -> usize {
        key.len() + value.len() + CACHE_ENTRY_OVERHEAD
    }

    /// The cached stored bytes of `key`, if cached.
    pub(crate) fn cached(&self, key: &[u8]) -> Option<Arc<[u8]>> {
        self.cache.get(key).cloned()
    }

    pub(crate) fn forget(&mut self, key: &[u8]) {
        if let Some(old) = self.cache.remove(key) {
            self.bytes -= Stripe::cost(key, &old);
        }
    }

    /// Caches `value` as the stored bytes of `key`, evicting others (any)
    /// to stay within the budget; a value larger than the budget is not kept.
    pub(crate) fn remember(&mut self, key: &[u8], value: Arc<[u8]>) {
        self.forget(key);
        self.sized(key, Some(value.len()));
        let cost = Stripe::cost(key, &value);
        if cost > self.budget {
            return;
        }
        while self.bytes + cost > self.budget {
            let Some(victim) = self.cache.keys().next().cloned() else {
                break;
            };
            self.forget(&victim);
        }
        self.bytes += cost;
        self.cache.insert(key.to_vec(), value);
    }

    pub(crate) fn clear(&mut self) {
        self.cache.clear();
        self.bytes = 0;
        self.large.clear();
    }

    /// Notes the size of `key`'s stored object (`None`: absent).
    pub(crate) fn sized(&mut self, key: &[u8], len: Option<usize>) {
        if len.is_some_and(|len| len > crate::tasks::HEAVY_BYTES) {
            if !self.large.contains(key) {
                self.large.insert(key.to_vec());
            }
        } else if !self.large.is_empty() {
            self.large.remove(key);
        }
    }

    /// Whether `key`'s stored object was over [`crate::tasks::HEAVY_BYTES`]
    /// when last read or written here.
    pub(crate) fn is_large(&self, key: &[u8]) -> bool {
        !self.large.is_empty() && self.large.contains(key)
    }
}
