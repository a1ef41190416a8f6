//! The per-key lock and object cache: keys are spread over `LOCK_STRIPES`
//! stripes, each a mutex over a byte-bounded cache of stored objects.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};

/// The cache's hasher: foldhash, seeded at random per process (as
/// hashbrown's default), so keys a client chooses cannot be aimed at one
/// bucket across nodes or restarts. SipHash took a visible share of every
/// lookup (`Stripe::cached` is on each read and write).
type Hasher = foldhash::fast::RandomState;

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
    cache: HashMap<Vec<u8>, Arc<[u8]>, Hasher>,
    bytes: usize,
    budget: usize,
    large: HashSet<Vec<u8>, Hasher>,
}

/// Locks a stripe even if a panic poisoned it: a bug hit by one request
/// must not make every key of the stripe fail from then on. Its cache may
/// be stale after such a panic (the store write may have happened without
/// the cache update), so it is emptied; the store stays the truth.
///
/// A stripe another thread holds is waited for off the worker
/// ([`crate::tasks::heavy`]): work on an object of megabytes holds its
/// stripe off the worker for as long as it takes (seconds while RocksDB
/// holds writes back), and a node's only worker blocked behind it drove no
/// connection meanwhile, so its peers took it for dead and closed their
/// connections to it, failing every request in flight on them.
pub(crate) fn relock(stripe: &Mutex<Stripe>) -> MutexGuard<'_, Stripe> {
    let locked = match stripe.try_lock() {
        Ok(guard) => Ok(guard),
        Err(TryLockError::Poisoned(poisoned)) => Err(poisoned),
        Err(TryLockError::WouldBlock) => crate::tasks::heavy(|| stripe.lock()),
    };
    locked.unwrap_or_else(|poisoned| unpoisoned(stripe, poisoned))
}

/// The guard of a stripe a panic poisoned, its cache emptied (see
/// [`relock`]).
fn unpoisoned<'a>(
    stripe: &Mutex<Stripe>,
    poisoned: PoisonError<MutexGuard<'a, Stripe>>,
) -> MutexGuard<'a, Stripe> {
    stripe.clear_poison();
    let mut guard = poisoned.into_inner();
    guard.clear();
    guard
}

/// The stripe `key` is on.
pub(crate) fn index_of(key: &[u8]) -> usize {
    shoal_ring::key_hash(key) as usize % LOCK_STRIPES
}

/// [`relock`], unless another thread holds the stripe: then `None` at once.
pub(crate) fn try_relock(stripe: &Mutex<Stripe>) -> Option<MutexGuard<'_, Stripe>> {
    match stripe.try_lock() {
        Ok(guard) => Some(guard),
        Err(TryLockError::WouldBlock) => None,
        Err(TryLockError::Poisoned(poisoned)) => Some(unpoisoned(stripe, poisoned)),
    }
}

impl Stripe {
    pub(crate) fn new(budget: usize) -> Self {
        Stripe {
            cache: HashMap::default(),
            bytes: 0,
            budget,
            large: HashSet::default(),
        }
    }

    fn cost(key: &[u8], value: &[u8]) -> usize {
        key.len() + value.len() + CACHE_ENTRY_OVERHEAD
    }

    /// The cached stored bytes of `key`, if cached.
    pub(crate) fn cached(&self, key: &[u8]) -> Option<Arc<[u8]>> {
        self.cache.get(key).cloned()
    }

    /// The length of `key`'s cached stored bytes, if cached.
    pub(crate) fn cached_len(&self, key: &[u8]) -> Option<usize> {
        self.cache.get(key).map(|b| b.len())
    }

    pub(crate) fn forget(&mut self, key: &[u8]) {
        if let Some(old) = self.cache.remove(key) {
            self.bytes -= Stripe::cost(key, &old);
        }
    }

    /// Caches `value` as the stored bytes of `key`, evicting others (any)
    /// to stay within the budget; a value larger than the budget is not kept.
    /// A cached key's entry is updated in place (one lookup, its key kept).
    pub(crate) fn remember(&mut self, key: &[u8], value: Arc<[u8]>) {
        self.sized(key, Some(value.len()));
        let cost = Stripe::cost(key, &value);
        if cost > self.budget {
            self.forget(key);
            return;
        }
        match self.cache.get_mut(key) {
            Some(slot) => {
                self.bytes = self.bytes - Stripe::cost(key, slot) + cost;
                *slot = value;
            }
            None => {
                self.bytes += cost;
                self.cache.insert(key.to_vec(), value);
            }
        }
        while self.bytes > self.budget {
            let Some(victim) = self.cache.keys().find(|k| k.as_slice() != key).cloned() else {
                break;
            };
            self.forget(&victim);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize) -> Arc<[u8]> {
        vec![7u8; n].into()
    }

    /// What the entries cost, counted afresh: the stripe's running total
    /// must always equal it.
    fn counted(s: &Stripe) -> usize {
        s.cache.iter().map(|(k, v)| Stripe::cost(k, v)).sum()
    }

    #[test]
    fn an_update_in_place_keeps_the_byte_count_exact() {
        let mut s = Stripe::new(10_000);
        s.remember(b"k", bytes(100));
        s.remember(b"j", bytes(50));
        s.remember(b"k", bytes(300));
        assert_eq!(&*s.cached(b"k").unwrap(), &*bytes(300));
        assert_eq!(s.bytes, counted(&s));
        s.remember(b"k", bytes(10));
        assert_eq!(s.bytes, counted(&s));
        s.forget(b"k");
        s.forget(b"j");
        assert_eq!(s.bytes, 0);
    }

    #[test]
    fn the_budget_holds_and_the_newest_entry_is_not_the_one_evicted() {
        let budget = 10 * Stripe::cost(b"k00", &bytes(100));
        let mut s = Stripe::new(budget);
        for i in 0..50 {
            let key = format!("k{i:02}");
            s.remember(key.as_bytes(), bytes(100));
            assert!(s.cached(key.as_bytes()).is_some(), "{key} evicted itself");
            assert!(s.bytes <= budget);
            assert_eq!(s.bytes, counted(&s));
        }
        assert_eq!(s.cache.len(), 10);
        // A cached key that grows evicts others, not itself.
        s.remember(b"k49", bytes(500));
        assert_eq!(&*s.cached(b"k49").unwrap(), &*bytes(500));
        assert!(s.bytes <= budget);
        assert_eq!(s.bytes, counted(&s));
    }

    /// A stripe held by another thread (one storing an object of megabytes
    /// off the worker holds it for as long as that takes) is waited for off
    /// the worker: the worker's other tasks, the node's connections among
    /// them, go on meanwhile. A node whose only worker blocked on it sent
    /// nothing, and its peers took it for dead.
    #[test]
    fn a_stripe_held_elsewhere_is_waited_for_off_the_worker() {
        use std::time::{Duration, Instant};
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let stripe = Arc::new(Mutex::new(Stripe::new(1_000)));
        // Another thread holds the stripe for a second.
        let (locked, is_locked) = std::sync::mpsc::channel();
        let holder = {
            let stripe = stripe.clone();
            std::thread::spawn(move || {
                let _held = relock(&stripe);
                locked.send(()).unwrap();
                std::thread::sleep(Duration::from_secs(1));
            })
        };
        is_locked.recv().unwrap();
        let waited_for = rt.block_on(async {
            let s = stripe.clone();
            let waiting = tokio::spawn(async move { relock(&s).bytes });
            std::thread::sleep(Duration::from_millis(50));
            let spawned = Instant::now();
            let other = tokio::spawn(async move { spawned.elapsed() });
            let other = other.await.unwrap();
            assert_eq!(waiting.await.unwrap(), 0);
            other
        });
        holder.join().unwrap();
        assert!(
            waited_for < Duration::from_millis(500),
            "the worker blocked on a stripe held elsewhere: a task waited {waited_for:?} to run"
        );
    }

    #[test]
    fn a_value_over_the_budget_is_not_kept_nor_its_older_bytes() {
        let mut s = Stripe::new(1_000);
        s.remember(b"k", bytes(100));
        s.remember(b"k", bytes(2_000));
        assert!(s.cached(b"k").is_none(), "stale bytes would be served");
        assert_eq!(s.bytes, 0);
    }
}
