//! Causal contexts as clients hold them: a version vector sealed for one
//! key with the cluster's context key.
//!
//! A context is the clock a write supersedes, and it comes back from the
//! client. A client that altered it could make a coordinator join entries
//! into the key's clock that no node minted: a counter of a real actor
//! raised past what that actor has minted so far covers the actor's next
//! writes, which every replica holding the raised entry then drops as
//! already seen (an acknowledged write lost; see the `contexts` tests). So
//! every context a node issues carries an HMAC-SHA256 over the key and the
//! vector, under a key every node of the cluster holds ([`ContextKey`], in
//! the node's key file: see `crate::certs`), and a write whose context does
//! not verify is refused before anything is written. A context read from
//! one key cannot be used on another, nor one issued by another cluster.
//!
//! An empty vector is sent as no bytes and needs no seal: it covers
//! nothing, like no context.
//!
//! A context carries each entry's time as the issuing copy had it, or none
//! for an entry naming a value that copy held ([`ContextEntry`]): the
//! entries a write learns from it age from then, or from the write
//! ([`super::Object::update_from`]).
//!
//! Layout: format byte, the entries as MessagePack `(actor, counter,
//! time or nil)` triples, the 32-byte tag (over the key and all before
//! it).

use std::collections::BTreeMap;
use std::fmt;

use ring::hmac;
use shoal_ring::NodeId;
use subtle::ConstantTimeEq;

use super::{ContextEntry, VersionError, VersionVector};

/// Leading byte of a sealed context, so the format can change later.
const FORMAT: u8 = 1;

/// Bytes of the seal (an HMAC-SHA256 tag).
const TAG_BYTES: usize = 32;

/// Bytes of the secret behind a [`ContextKey`].
pub const CONTEXT_SECRET_BYTES: usize = 32;

/// The cluster's key for sealing causal contexts: the same on every node.
#[derive(Clone)]
pub struct ContextKey(hmac::Key);

impl fmt::Debug for ContextKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ContextKey(..)")
    }
}

impl ContextKey {
    pub fn new(secret: &[u8; CONTEXT_SECRET_BYTES]) -> Self {
        ContextKey(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    /// A short name of the key, which every node logs at start: nodes of
    /// one cluster must show the same (it tells nothing of the key).
    pub fn id(&self) -> String {
        hex::encode(&hmac::sign(&self.0, b"shoal context key id").as_ref()[..6])
    }

    /// The tag of `signed` (the format byte and the encoded entries) for
    /// `key`: over the key's length, the key, then `signed`, so no key and
    /// entries can pass for another.
    fn tag(&self, key: &[u8], signed: &[u8]) -> hmac::Tag {
        let mut mac = hmac::Context::with_key(&self.0);
        mac.update(&(key.len() as u32).to_be_bytes());
        mac.update(key);
        mac.update(signed);
        mac.sign()
    }

    /// `out` (the format byte and the encoded entries) with its tag.
    fn sealed(&self, key: &[u8], mut out: Vec<u8>) -> Vec<u8> {
        let tag = self.tag(key, &out);
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// The context a client gets back for `key`: these entries.
    pub fn seal(&self, key: &[u8], entries: &BTreeMap<NodeId, ContextEntry>) -> Vec<u8> {
        if entries.is_empty() {
            return Vec::new();
        }
        let triples: Vec<(NodeId, u64, Option<u64>)> = (entries.iter())
            .map(|(n, e)| (*n, e.counter, e.at))
            .collect();
        let mut out = vec![FORMAT];
        rmp_serde::encode::write(&mut out, &triples).expect("clock entries always encode");
        self.sealed(key, out)
    }

    /// The context of encoded entries, sealed for `key` whatever the bytes
    /// (the fuzz harness seals the fuzzer's bytes, so the decoder behind the
    /// seal is reached).
    pub fn seal_encoded(&self, key: &[u8], entries: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + entries.len() + TAG_BYTES);
        out.push(FORMAT);
        out.extend_from_slice(entries);
        self.sealed(key, out)
    }

    /// A context a client sent back for `key`: refused unless a node of
    /// this cluster sealed it for this key, or if it has more than
    /// `max_entries` entries (far more than a clock needs).
    pub fn open(
        &self,
        key: &[u8],
        bytes: &[u8],
        max_entries: usize,
    ) -> Result<Opened, VersionError> {
        let entries = match bytes.split_first() {
            None => return Ok(Opened::default()),
            Some((&FORMAT, body)) if body.len() > TAG_BYTES => &body[..body.len() - TAG_BYTES],
            Some((&FORMAT, _)) => {
                return Err(VersionError::ContextMalformed(
                    "too short to carry its seal".into(),
                ))
            }
            Some((format, _)) => {
                return Err(VersionError::ContextMalformed(format!(
                    "format {format} is not this version's: from a node of another version?"
                )))
            }
        };
        let (signed, tag) = bytes.split_at(bytes.len() - TAG_BYTES);
        // In constant time: a forger learns nothing from how long a refusal took.
        if !bool::from(self.tag(key, signed).as_ref().ct_eq(tag)) {
            return Err(VersionError::ContextNotIssued);
        }
        let triples: Vec<(NodeId, u64, Option<u64>)> = rmp_serde::from_slice(entries)
            .map_err(|e| VersionError::ContextMalformed(e.to_string()))?;
        if triples.len() > max_entries {
            return Err(VersionError::ContextTooLarge {
                entries: triples.len(),
                max: max_entries,
            });
        }
        let mut opened = Opened::default();
        for (n, counter, at) in triples {
            opened.vector.insert(n, counter);
            if let Some(at) = at {
                opened.stamps.insert(n, at);
            }
        }
        Ok(opened)
    }
}

/// A context a client sent back, opened: its vector, and the times its
/// entries had on the copy that issued it (none for an entry naming a
/// value that copy held).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Opened {
    pub vector: VersionVector,
    pub stamps: BTreeMap<NodeId, u64>,
}

impl Opened {
    /// The entries as sealed.
    pub fn entries(&self) -> BTreeMap<NodeId, ContextEntry> {
        (self.vector.iter())
            .map(|(n, counter)| {
                let at = self.stamps.get(n).copied();
                (
                    *n,
                    ContextEntry {
                        counter: *counter,
                        at,
                    },
                )
            })
            .collect()
    }
}

impl From<VersionVector> for Opened {
    /// A vector without times: the entries it brings age from the write.
    fn from(vector: VersionVector) -> Self {
        Opened {
            vector,
            stamps: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vv(entries: &[(u128, u64)]) -> VersionVector {
        entries
            .iter()
            .map(|(n, c)| (NodeId::from_u128(*n), *c))
            .collect()
    }

    /// `vector`'s entries at time `at`.
    fn at(vector: &VersionVector, at: u64) -> BTreeMap<NodeId, ContextEntry> {
        (vector.iter())
            .map(|(n, c)| {
                (
                    *n,
                    ContextEntry {
                        counter: *c,
                        at: Some(at),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_sealed_context_opens_for_its_key_only() {
        let k = ContextKey::new(&[7; 32]);
        let v = vv(&[(1, 3), (2, 9)]);
        let sealed = k.seal(b"k", &at(&v, 1234));
        let opened = k.open(b"k", &sealed, 10).unwrap();
        assert_eq!(opened.vector, v);
        assert!(opened.stamps.values().all(|t| *t == 1234));
        assert_eq!(
            k.open(b"k2", &sealed, 10),
            Err(VersionError::ContextNotIssued)
        );
        let other = ContextKey::new(&[8; 32]);
        assert_eq!(
            other.open(b"k", &sealed, 10),
            Err(VersionError::ContextNotIssued)
        );
        assert_eq!(
            k.open(b"k", &sealed, 1),
            Err(VersionError::ContextTooLarge { entries: 2, max: 1 })
        );
    }

    #[test]
    fn an_altered_context_is_refused() {
        let k = ContextKey::new(&[7; 32]);
        let sealed = k.seal(b"k", &at(&vv(&[(1, 3)]), 1234));
        for i in 0..sealed.len() {
            let mut altered = sealed.clone();
            altered[i] ^= 1;
            assert!(k.open(b"k", &altered, 10).is_err(), "byte {i}");
        }
        assert!(k.open(b"k", &sealed[..sealed.len() - 1], 10).is_err());
        assert!(k.open(b"k", &sealed[..1], 10).is_err());
        assert!(k.open(b"k", b"\xff\x00garbage", 10).is_err());
        // A vector re-encoded with a raised counter keeps the old tag.
        let tag = &sealed[sealed.len() - TAG_BYTES..];
        let mut forged = vec![FORMAT];
        let raised = vec![(NodeId::from_u128(1), 1_000_000u64, Some(1234u64))];
        rmp_serde::encode::write(&mut forged, &raised).unwrap();
        forged.extend_from_slice(tag);
        assert_eq!(
            k.open(b"k", &forged, 10),
            Err(VersionError::ContextNotIssued)
        );
    }

    #[test]
    fn an_empty_vector_is_no_context() {
        let k = ContextKey::new(&[7; 32]);
        assert!(k.seal(b"k", &BTreeMap::new()).is_empty());
        assert_eq!(k.open(b"k", &[], 10).unwrap(), Opened::default());
    }
}
