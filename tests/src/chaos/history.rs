//! What the chaos workload did and saw, as the checker reads it.
//!
//! Every write carries a unique id and writes a value that names it:
//! `w<id>|<e1>,<e2>,...`, the set of elements it holds. A read-modify-write
//! adds its own id as an element to the union of what its read returned and
//! writes that with the read's context; a blind put writes `{id}` with no
//! context; a delete writes a tombstone with its read's context. So every
//! value a read returns says which write made it, and every write and delete
//! says which writes its context covered (`observed`).

use serde::Serialize;

/// How an operation ended, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// Acknowledged.
    Ok,
    /// Refused before anything was stored (bad request, too large,
    /// unauthorised): certainly not applied.
    Failed,
    /// An error after which the write may or may not have been applied
    /// (timeout, quorum not reached, connection lost).
    Unknown,
}

/// One value a read returned (or a replica holds at the end).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Seen {
    /// The write that made it; `None` when the bytes are not a value the
    /// workload writes.
    pub id: Option<u64>,
    pub elements: Vec<u64>,
    /// The bytes, when they do not parse.
    pub raw: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Op {
    Read {
        values: Vec<Seen>,
    },
    Put {
        id: u64,
        elements: Vec<u64>,
        /// Ids of the values the context came with; empty for a blind put.
        observed: Vec<u64>,
        blind: bool,
    },
    Delete {
        observed: Vec<u64>,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub client: u32,
    pub key: u32,
    /// Milliseconds since the run started.
    pub start_ms: u64,
    pub end_ms: u64,
    pub op: Op,
    pub outcome: Outcome,
    pub error: Option<String>,
}

pub fn key_name(key: u32) -> String {
    format!("chaos-{key}")
}

pub fn encode(id: u64, elements: &[u64]) -> Vec<u8> {
    let list: Vec<String> = elements.iter().map(u64::to_string).collect();
    format!("w{id}|{}", list.join(",")).into_bytes()
}

pub fn decode(bytes: &[u8]) -> Seen {
    let bad = || Seen {
        id: None,
        elements: Vec::new(),
        raw: Some(String::from_utf8_lossy(bytes).chars().take(80).collect()),
    };
    let Ok(text) = std::str::from_utf8(bytes) else {
        return bad();
    };
    let Some((id, list)) = text.strip_prefix('w').and_then(|t| t.split_once('|')) else {
        return bad();
    };
    let Ok(id) = id.parse() else {
        return bad();
    };
    let mut elements = Vec::new();
    for e in list.split(',').filter(|e| !e.is_empty()) {
        match e.parse() {
            Ok(e) => elements.push(e),
            Err(_) => return bad(),
        }
    }
    Seen {
        id: Some(id),
        elements,
        raw: None,
    }
}

/// A key's values at the end of a run.
#[derive(Debug, Clone, Serialize)]
pub struct FinalKey {
    pub key: u32,
    /// Every primary answered with the same object and no hint for the key
    /// was waiting; the values are then the key's converged state. When not,
    /// they are the union of what the replicas that answered hold.
    pub converged: bool,
    pub values: Vec<Seen>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_garbage_is_kept_raw() {
        let s = decode(&encode(42, &[1, 42]));
        assert_eq!((s.id, s.elements, s.raw), (Some(42), vec![1, 42], None));
        assert_eq!(decode(&encode(7, &[])).elements, Vec::<u64>::new());
        let bad = decode(b"hello");
        assert_eq!((bad.id, bad.raw.as_deref()), (None, Some("hello")));
        assert!(decode(b"w1|x").id.is_none());
    }
}
