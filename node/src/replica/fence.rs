//! The reap fence: a reaped tombstone still supersedes, for as long as a
//! message can stay in flight, the copies of its key read before the reap.
//!
//! The reaper deletes a tombstone once every primary holds exactly it (see
//! [`crate::reaper`]). A copy of the key read from a replica just before
//! that replica took the tombstone can still land after the reap, in a key
//! that is absent by then: an anti-entropy exchange fetched it and merges
//! it when the answer comes back, a write's send carries an older copy the
//! coordinator held, a read repair writes what it heard. Merged as it is,
//! such a copy brings the deleted values back (explore seed 3135: node3,
//! back after a long absence with the values the delete superseded, was
//! asked for them by an exchange, got the tombstone by handoff, the key
//! was reaped everywhere, and the exchange's answer was merged after).
//!
//! Such a copy is in flight no longer than a message lives (the bound the
//! config already holds the grace period to: the longest request, the
//! read-repair window and a connection's idle time). For that long the
//! replica keeps the history (clock) of each tombstone it reaped, and a
//! change to the absent key starts from that history instead of from
//! nothing: a merge keeps only the siblings the tombstone does not cover
//! (writes made after the reap, never the values it deleted), and a write
//! made here carries the history on, so that a stale copy merged after
//! it is still covered. A replica restoring a copy lost to corruption is
//! answered with the history too, and a restore that leaves nothing but
//! a history fences the key like a reap (see [`super::lost`]).
//!
//! The entries are kept in the meta tree too (under [`PREFIX`] and the
//! key), written in the reap's (or restore's) own batch: a copy sent
//! before a restart can arrive after it, and a replica that restarts
//! within the window keeps fencing. An entry it cannot read then (its
//! record corrupt) leaves no history to start from: until its deadline,
//! a change to the key while it is absent here is refused rather than
//! started from nothing (a client's write is handed to another primary,
//! a hint or an anti-entropy repair is tried again later, a read repair
//! is left to anti-entropy); the entry stays until its deadline, so a
//! restart within it refuses too. One whose checksum failed may hold a
//! damaged deadline (the checksum covers the name), so it refuses for a
//! window from the start instead, whatever its name says; a damaged key in
//! the name fences the wrong key, which nothing here can tell. A restore
//! (here, or one asking this replica) does not wait for it: the other
//! primaries' histories protect it only while their own fences last.

use std::collections::{HashMap, VecDeque};
use std::sync::MutexGuard;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use super::{reapable, trees, Commit, Replica, Stored};
use crate::storage::{Store, StoreError, Tree, WriteBatch};
use crate::version::{decode_object, encode_object, Object};

/// The fence's entries in [`Tree::Meta`]: this prefix ++ key ++ deadline
/// (ms, 8 bytes big endian) -> history; a deadline in the name, so that a
/// deadline's passing deletes that entry and never a later one's.
const PREFIX: &[u8] = b"fence/";
/// The first key past [`PREFIX`]'s.
const PAST_PREFIX: &[u8] = b"fence0";

fn entry_key(key: &[u8], until: u64) -> Vec<u8> {
    [PREFIX, key, &until.to_be_bytes()].concat()
}

/// The key and deadline an entry's name holds.
fn parse_entry_key(name: &[u8]) -> Option<(&[u8], u64)> {
    let rest = name.strip_prefix(PREFIX)?;
    let (key, until) = rest.split_at_checked(rest.len().checked_sub(8)?)?;
    Some((key, u64::from_be_bytes(until.try_into().ok()?)))
}

impl<S: Store> Replica<S> {
    pub(super) fn lock_fence(&self) -> MutexGuard<'_, Fence> {
        self.fence.lock().expect("fence lock")
    }

    /// What a change to `key`, absent here, starts from: the history of
    /// its tombstone if it was reaped here lately, else nothing; an error
    /// while an unreadable fence entry of the key lasts (see the module doc).
    pub(super) fn absent_start(&self, key: &[u8]) -> Result<Object, StoreError> {
        let fence = self.lock_fence();
        let now = fence.now_ms();
        fence.refused(key, now)?;
        Ok(fence.history(key, now).unwrap_or_default())
    }

    /// The history of `key`'s tombstone if it was reaped here lately, else
    /// nothing. A restore starts from it even while an unreadable entry of
    /// the key lasts: waiting would only let the other primaries' fences,
    /// whose histories protect it, expire.
    pub(super) fn fence_history(&self, key: &[u8]) -> Object {
        let fence = self.lock_fence();
        fence.history(key, fence.now_ms()).unwrap_or_default()
    }

    /// This replica's copy of `key` for a restore elsewhere (see
    /// [`super::lost`]): as [`Self::get`], merged with the history of the
    /// key's tombstone if it was reaped here lately (a clock, no
    /// siblings; alone when nothing is stored), so that the restored copy
    /// drops what the delete superseded. The restoring replica may have
    /// no fence of its own (its copy was found corrupt when the others
    /// reaped), and a stale copy merged into its partial copy since would
    /// otherwise be restored from primaries that all answer "absent". A
    /// history covers only what the delete superseded, so merging it into
    /// any copy drops nothing written since (a copy written after the reap
    /// started from it, and a partial copy may hold a stale value too).
    /// An unreadable fence entry here does not hold the answer back: the
    /// restore needs every primary's answer, and waiting would only let
    /// the other primaries' fences, whose histories protect it, expire.
    pub fn restore_copy(&self, key: &[u8]) -> Result<Option<Object>, StoreError> {
        let mut stripe = self.lock_stripe(key);
        let copy = self.copy(&mut stripe, key)?;
        let history = {
            let fence = self.lock_fence();
            fence.history(key, fence.now_ms())
        };
        Ok(match (copy, history) {
            (Some(copy), Some(history)) => Some(Object::merged(&copy, &history)),
            (copy, history) => copy.or(history),
        })
    }

    /// Fences `key`, gone here now (`gone`: its reaped tombstone, or
    /// the history a restore came back with): the entry goes in `batch`,
    /// with the deletes of the entries past their window, and into the
    /// fence in memory at once, before the caller's write (a write that
    /// fails may still have deleted the key; the entry then covers only
    /// what that delete superseded, wherever it is read).
    pub(super) fn fence_in(&self, key: &[u8], gone: &Object, batch: &mut WriteBatch) {
        let wall_ms = self.now_ms();
        let mut fence = self.lock_fence();
        let now = fence.now_ms();
        for (name, expired) in fence.expire(now) {
            batch.delete(Tree::Meta, &entry_key(&expired, name));
        }
        // Named by whichever clock is later: a name judged early by a
        // restart ends the window early, one judged late is capped there.
        if let Some(((until, name), history)) = fence.entry(gone, now, wall_ms.max(now)) {
            batch.put(Tree::Meta, &entry_key(key, name), &encode_object(&history));
            fence.insert(key, (until, name), history);
        }
    }

    /// Removes the local object of `key` if it is exactly `expected`, a
    /// tombstone whose grace period has passed by this node's own clock (so
    /// one node with a fast clock cannot reap early for all); returns
    /// whether it did. The key's fence entry is written in the same batch
    /// as the delete, with the deletes of the entries past their window.
    /// A copy found lost is not removed; `expected` is merged into its
    /// partial copy (see [`super::lost`]).
    pub fn reap(&self, key: &[u8], expected: &Object) -> Result<bool, StoreError> {
        let now = self.now_ms();
        if !reapable(expected, self.settings.tombstone_grace, now) {
            return Ok(false);
        }
        let mut stripe = self.lock_stripe(key);
        let raw = match self.stored_record(&mut stripe, key)? {
            Stored::Present(raw) => raw,
            Stored::Absent => return Ok(false),
            // Found lost (now, or since the reaper's check): not reaped,
            // but the partial copy takes the tombstone every other
            // primary reaps, so that a stale copy merged into it later is
            // dropped however long the restore waits (their fences may
            // have expired by then).
            Stored::Lost { .. } => {
                drop(stripe);
                self.merge(key, expected)?;
                return Ok(false);
            }
        };
        if decode_object(&raw).ok().as_ref() != Some(expected) {
            return Ok(false);
        }
        let mut batch = WriteBatch::default();
        self.fence_in(key, expected, &mut batch);
        let digest = Some(trees::digest(&raw));
        self.store_object(&mut stripe, key, digest, None, Commit::Now, batch)
            .map(drop)?;
        // Forgotten here: never write under its actors again (before the
        // stripe is released, so no write to the key sees them live).
        let full = self.actors.retire(expected);
        drop(stripe);
        if full {
            self.new_incarnation("retired actors reached their bound")?;
        }
        Ok(true)
    }
}

/// Histories of the tombstones reaped here (or restored away) in the last
/// `window`, by key.
#[derive(Debug)]
pub(super) struct Fence {
    window_ms: u64,
    /// The wall clock when the fence was loaded, and the monotonic instant
    /// of that reading: the fence's time runs from them ([`Fence::now_ms`]).
    started: (u64, Instant),
    reaped: HashMap<Vec<u8>, (u64, Object)>,
    /// Keys whose entry could not be read at the start, with its deadline:
    /// changes to them while absent are refused until then.
    unreadable: HashMap<Vec<u8>, u64>,
    /// Keys in the order their entries expire, with each entry's deadline
    /// and the one in its name (a key reaped twice appears twice; only its
    /// entry's own deadline removes it).
    expiry: VecDeque<(Deadline, Vec<u8>)>,
}

/// An entry's deadline in the fence's time ([`Fence::now_ms`]), by which
/// it expires while the node runs, and the one in its name, by which a
/// restart judges it with its own wall clock: a window from the later of
/// the wall clock and the fence's time when it was written (so a step of
/// the wall clock either way before the write does not name it early). A
/// restart whose own wall clock runs ahead still ends it early; nothing
/// here can tell. They differ when the wall clock stepped since the fence
/// was loaded, or when a name said more than a window.
type Deadline = (u64, u64);

impl Fence {
    /// The fence `store` kept, at `now_ms`. Entries past their window are
    /// deleted from the store, and so is one whose name holds no key (none
    /// of ours: logged); one within its window that cannot be read is kept
    /// (logged), and its key refused changes until its deadline.
    pub(super) fn load<S: Store>(
        store: &S,
        window: Duration,
        now_ms: u64,
    ) -> Result<Self, StoreError> {
        let mut fence = Fence {
            window_ms: window.as_millis() as u64,
            started: (now_ms, Instant::now()),
            reaped: HashMap::new(),
            unreadable: HashMap::new(),
            expiry: VecDeque::new(),
        };
        let mut entries = Vec::new();
        let mut gone = WriteBatch::default();
        let mut start = PREFIX.to_vec();
        loop {
            let page = store.scan(Tree::Meta, &start, Some(PAST_PREFIX), 1024)?;
            let Some((last, _)) = page.last() else { break };
            start = [last.as_slice(), &[0]].concat();
            for (name, record) in page {
                let Some((key, until)) = parse_entry_key(&name) else {
                    warn!(entry = %hex::encode(&name), "a reap fence entry with no key in its name: dropped");
                    gone.delete(Tree::Meta, &name);
                    continue;
                };
                // The checksum covers the name too: an entry that fails it
                // may hold a damaged deadline, as likely earlier than its
                // own as later, so it is not taken for expired.
                let trusted = record.is_ok();
                if until <= now_ms && trusted {
                    gone.delete(Tree::Meta, &name);
                    continue;
                }
                let history = record
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| decode_object(&bytes).map_err(|e| e.to_string()));
                // No window has more than a window left: a name saying
                // more was written by a clock that ran ahead. Such an
                // entry keeps its name, which its expiry deletes.
                let bound = now_ms.saturating_add(fence.window_ms);
                let (mut until, mut name_until) = (until.min(bound), until);
                if let Err(error) = &history {
                    warn!(entry = %hex::encode(&name), %error,
                        "a reap fence entry could not be read: changes to its key while absent are refused until its deadline");
                    // None is past a window from now; one whose checksum
                    // failed ends a window from now whatever its name says.
                    // Either is replaced by an entry of that deadline whose
                    // history is unknown (no bytes, a sound record:
                    // unreadable again at a restart, its deadline trusted).
                    if name_until > bound || !trusted {
                        (until, name_until) = (bound, bound);
                        gone.delete(Tree::Meta, &name);
                        gone.put(Tree::Meta, &entry_key(key, until), &[]);
                    }
                }
                entries.push(((until, name_until), key.to_vec(), history.ok()));
            }
        }
        if !gone.ops.is_empty() {
            store.write(gone)?;
        }
        // In deadline order, the expiry queue's (and a key's later entry
        // last).
        entries.sort_by_key(|(deadline, _, _)| *deadline);
        for (deadline, key, history) in entries {
            match history {
                Some(history) => fence.insert(&key, deadline, history),
                None => {
                    fence.unreadable.insert(key.clone(), deadline.0);
                    fence.expiry.push_back((deadline, key));
                }
            }
        }
        Ok(fence)
    }

    /// The fence's time, in ms since the Unix epoch: the wall clock read at
    /// the load, advanced by the monotonic clock since. A window is how
    /// long a message can stay in flight, which only real time ends; the
    /// wall clock stepped forward while the node runs (an NTP step, a VM
    /// resumed) would end every window early, and a stale copy still in
    /// flight would then bring back what its delete superseded. Entries
    /// are named by the later of this and the wall clock when they are
    /// written, which a restart compares with its own (see [`Deadline`]).
    pub(super) fn now_ms(&self) -> u64 {
        let (wall_ms, at) = self.started;
        wall_ms.saturating_add(at.elapsed().as_millis() as u64)
    }

    /// An error while `key` has an unreadable entry that lasts past
    /// `now_ms` and no readable one as late (whose history, started from
    /// the earlier one's, covers it).
    fn refused(&self, key: &[u8], now_ms: u64) -> Result<(), StoreError> {
        let Some(&until) = self.unreadable.get(key) else {
            return Ok(());
        };
        let covered = self.reaped.get(key).is_some_and(|(u, _)| *u >= until);
        if until <= now_ms || covered {
            return Ok(());
        }
        Err(StoreError::Corruption {
            tree: Tree::Meta.name(),
            key: hex::encode(entry_key(key, until)),
            detail: format!(
                "the key's reap fence entry could not be read: the absent key takes no change for {} ms more (a stale copy could bring back what its delete superseded)",
                until - now_ms
            ),
        })
    }

    /// The entry fencing a key whose `tombstone` is reaped at `now_ms`
    /// (the wall clock saying `wall_ms`): its deadlines and the
    /// tombstone's history; none when the fence is off.
    fn entry(&self, tombstone: &Object, now_ms: u64, wall_ms: u64) -> Option<(Deadline, Object)> {
        if self.window_ms == 0 {
            return None;
        }
        let mut history = tombstone.clone();
        history.drop_siblings_of(tombstone);
        let deadline = (
            now_ms.saturating_add(self.window_ms),
            wall_ms.saturating_add(self.window_ms),
        );
        Some((deadline, history))
    }

    /// A key fenced again keeps its earlier history too, until the later
    /// deadline: the later fence's history need not hold the earlier one
    /// (a clock pruned in between), and at a restart the entries come in
    /// the order of their names, which follow a wall clock that can step
    /// back, so the last need not hold the most.
    fn insert(&mut self, key: &[u8], deadline: Deadline, history: Object) {
        let history = match self.reaped.get(key) {
            Some((_, earlier)) => Object::merged(earlier, &history),
            None => history,
        };
        self.reaped.insert(key.to_vec(), (deadline.0, history));
        self.expiry.push_back((deadline, key.to_vec()));
    }

    /// What a change to `key`, absent here, starts from at `now_ms`: the
    /// history of the tombstone reaped here lately, without its siblings;
    /// `None` when no reap fences the key (nothing).
    pub(super) fn history(&self, key: &[u8], now_ms: u64) -> Option<Object> {
        let (until, history) = self.reaped.get(key)?;
        (*until > now_ms).then(|| history.clone())
    }

    /// Forgets the entries past their window at `now_ms`; returns each
    /// one's named deadline and key (a key reaped twice has two).
    fn expire(&mut self, now_ms: u64) -> Vec<(u64, Vec<u8>)> {
        let mut expired = Vec::new();
        while let Some(((until, _), _)) = self.expiry.front() {
            if *until > now_ms {
                break;
            }
            let ((until, name), key) = self.expiry.pop_front().expect("a front");
            if self.reaped.get(&key).is_some_and(|(u, _)| *u == until) {
                self.reaped.remove(&key);
            }
            if self.unreadable.get(&key) == Some(&until) {
                self.unreadable.remove(&key);
            }
            expired.push((name, key));
        }
        expired
    }
}

#[cfg(test)]
mod tests;
