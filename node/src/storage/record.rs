//! The sealed record format every engine stores: `u32 crc32 | value`, where the
//! checksum covers the tree name, the key and the value. Binding the key and
//! tree in means a record written under the wrong key is caught too.

use super::{StoreError, Tree};

const CRC_LEN: usize = 4;

fn checksum(tree: Tree, key: &[u8], value: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(tree.name().as_bytes());
    h.update(&(key.len() as u32).to_be_bytes());
    h.update(key);
    h.update(value);
    h.finalize()
}

/// Seals a value for storage.
pub fn seal(tree: Tree, key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CRC_LEN + value.len());
    out.extend_from_slice(&checksum(tree, key, value).to_be_bytes());
    out.extend_from_slice(value);
    out
}

/// Checks a stored record and returns its value.
pub fn open(tree: Tree, key: &[u8], raw: &[u8]) -> Result<Vec<u8>, StoreError> {
    let corrupt = |detail: String| StoreError::Corruption {
        tree: tree.name(),
        key: hex::encode(key),
        detail,
    };
    if raw.len() < CRC_LEN {
        return Err(corrupt(format!(
            "record of {} bytes is shorter than its checksum",
            raw.len()
        )));
    }
    let (crc, value) = raw.split_at(CRC_LEN);
    let expected = u32::from_be_bytes(crc.try_into().expect("4 bytes"));
    let actual = checksum(tree, key, value);
    if expected != actual {
        return Err(corrupt(format!(
            "checksum {actual:#010x} does not match stored {expected:#010x}"
        )));
    }
    Ok(value.to_vec())
}
