//! What ownership transfer needs of the replica (see [`crate::transfer`]):
//! the keys of a partition, the hints held for keys of some partitions,
//! and dropping this node's copy of a key it no longer replicates.

use std::collections::BTreeSet;

use super::lost::Stored;
use super::{hints, trees, Replica};
use crate::net::HandoffEntry;
use crate::storage::{Store, StoreError, Tree};
use crate::version::decode_object;

/// Bytes of hints one `HintsIn` answer carries at most (about).
const HINTS_BYTES: usize = 8 << 20;

impl<S: Store> Replica<S> {
    /// Up to `limit` keys of `partition` after `after` (`None`: from the
    /// first), in index order, from the anti-entropy index. An entry whose
    /// bytes name no key of its segment is dropped, not listed (see
    /// `named_key`); fewer than `limit` keys means the partition's end.
    pub fn partition_keys(
        &self,
        partition: u32,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let prefix = partition.to_be_bytes().to_vec();
        let start = match after {
            Some(key) => {
                let mut s = trees::index_key(partition, key);
                s.push(0);
                s
            }
            None => prefix.clone(),
        };
        let end = partition.checked_add(1).map(|p| p.to_be_bytes().to_vec());
        loop {
            let page = self.store.scan(Tree::Aae, &start, end.as_deref(), limit)?;
            let mut keys = Vec::with_capacity(page.len());
            for (ik, _) in &page {
                if let Some(key) = self.named_key(ik)? {
                    keys.push(key.to_vec());
                }
            }
            // An entry dropped: scan the page again, so that a short page
            // still means the end of the partition.
            if keys.len() == page.len() {
                return Ok(keys);
            }
        }
    }

    /// Up to `limit` hints this node holds, for any primary, whose keys fall
    /// in `partitions`, scanning the hints tree after `after`; and where to
    /// go on from (`None`: the scan reached the end).
    pub fn hints_in(
        &self,
        partitions: &BTreeSet<u32>,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<(Vec<HandoffEntry>, Option<Vec<u8>>), StoreError> {
        let start = match after {
            Some(last) => {
                let mut s = last.to_vec();
                s.push(0);
                s
            }
            None => Vec::new(),
        };
        let page = self.store.scan(Tree::Hints, &start, None, limit)?;
        let mut next = (page.len() == limit)
            .then(|| page.last().map(|(k, _)| k.clone()))
            .flatten();
        let mut entries = Vec::new();
        let mut bytes = 0;
        let mut scanned: Option<Vec<u8>> = None;
        for (hk, record) in page {
            // An answer stays well under the frame cap: the rest next time,
            // from the last hint scanned.
            if bytes > HINTS_BYTES {
                next = scanned;
                break;
            }
            bytes += record.as_ref().map_or(0, Vec::len) + hk.len();
            scanned = Some(hk.clone());
            let key = hints::hinted_key(&hk);
            if !partitions.contains(&self.partition_of(key)) {
                continue;
            }
            let entry = match record
                .map_err(|_| ())
                .and_then(|bytes| hints::decode_hint(&bytes).map_err(|_| ()))
            {
                Ok((object, lost)) => HandoffEntry {
                    key: key.to_vec(),
                    object,
                    lost,
                },
                // A hint lost to corruption: the receiver's copy may miss
                // what it carried, so it is restored from the others.
                Err(()) => HandoffEntry {
                    key: key.to_vec(),
                    object: Default::default(),
                    lost: true,
                },
            };
            entries.push(entry);
        }
        Ok((entries, next))
    }

    /// Merges objects (hints pulled from another node, handed-off entries)
    /// into this node's copies, as a handoff does.
    pub fn accept_entries(&self, entries: &[HandoffEntry]) -> Result<(), StoreError> {
        self.accept_handoff(entries).map_err(|(_, e)| e)
    }

    /// Drops this node's copy of `key`, which it no longer replicates; its
    /// history is forgotten, so the actors that wrote it are retired (a
    /// later write here never mints their dots again). Returns the bytes
    /// dropped.
    pub fn drop_key(&self, key: &[u8]) -> Result<u64, StoreError> {
        let mut stripe = self.lock_stripe(key);
        let (raw, object) = match self.stored_record(&mut stripe, key)? {
            // An index entry without its object: drop the entry.
            Stored::Absent => {
                self.write_object(&mut stripe, key, None, None)?;
                return Ok(0);
            }
            Stored::Present(raw) => {
                let object = decode_object(&raw).ok();
                (raw, object)
            }
            Stored::Lost { raw, partial, .. } => (raw, partial),
        };
        self.write_object(&mut stripe, key, Some(trees::digest(&raw)), None)?;
        let full = object.is_some_and(|o| self.actors.retire(&o));
        drop(stripe);
        if full {
            self.new_incarnation("retired actors reached their bound")?;
        }
        Ok(raw.len() as u64)
    }
}
