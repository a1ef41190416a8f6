//! Checks a chaos run's history against the keys' final values.
//!
//! The rules follow from what a causal context means: a write or delete
//! whose context came from a read supersedes exactly the values that read
//! returned (its `observed` ids), nothing else. So, per write `X`:
//! - **lost**: `X` was acknowledged, is not among its key's final values, and
//!   no write or delete that may have taken effect observed it. A write
//!   "may have taken effect" when it was acknowledged, when its outcome is
//!   unknown and (for a put) some read saw its value, or when it is a delete
//!   whose outcome is unknown (a tombstone shows in no read).
//! - **vanished**: the same, for a write whose outcome was unknown but whose
//!   value some read returned: it was stored, so it must not disappear
//!   either.
//! - **resurrected**: `X` is among the final values although an
//!   acknowledged write or delete observed it. Judged only on keys whose
//!   replicas converged: on the others the final values are the union of
//!   what each replica holds, stale ones included, and the key is reported
//!   as not converged instead.
//! - **unexpected**: a read or a replica returned bytes that no write of the
//!   workload wrote for that key (an unknown id, another key's write, or
//!   elements other than the write's own).
//!
//! Stale reads during faults are not errors: with a sloppy quorum a read may
//! miss a write its quorum did not overlap. The final values are read after
//! every fault is healed and the replicas agree.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::history::{Event, FinalKey, Op, Outcome, Seen};

#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    /// Operations tried (reads, puts, deletes).
    pub attempted: u64,
    /// Operations acknowledged.
    pub acknowledged: u64,
    pub acknowledged_writes: u64,
    /// Operations refused before anything was stored.
    pub failed: u64,
    /// Writes whose outcome the client cannot know; reads that failed.
    pub indeterminate: u64,
    pub reads: u64,
    pub puts: u64,
    pub blind_puts: u64,
    pub deletes: u64,
}

/// One violation, with what shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    pub key: u32,
    pub id: Option<u64>,
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Verdict {
    pub counts: Counts,
    pub lost: Vec<Violation>,
    pub vanished: Vec<Violation>,
    pub unexpected: Vec<Violation>,
    pub resurrected: Vec<Violation>,
    /// Keys whose replicas had not converged when the final values were
    /// read.
    pub not_converged: Vec<u32>,
}

impl Verdict {
    /// Safety holds: nothing lost, vanished, unexpected or resurrected.
    pub fn safe(&self) -> bool {
        self.lost.is_empty()
            && self.vanished.is_empty()
            && self.unexpected.is_empty()
            && self.resurrected.is_empty()
    }

    /// Safe, and every key converged: resurrection is only judged on keys
    /// that did, so a run with keys that did not has not shown safety.
    pub fn passed(&self) -> bool {
        self.safe() && self.not_converged.is_empty()
    }

    pub fn summary(&self) -> String {
        let c = &self.counts;
        format!(
            "attempted {} acknowledged {} (writes {}) indeterminate {} failed {} | lost {} vanished {} unexpected {} resurrected {} | keys not converged {}",
            c.attempted,
            c.acknowledged,
            c.acknowledged_writes,
            c.indeterminate,
            c.failed,
            self.lost.len(),
            self.vanished.len(),
            self.unexpected.len(),
            self.resurrected.len(),
            self.not_converged.len()
        )
    }
}

/// What a put wrote, for checking values against it.
struct Write<'a> {
    key: u32,
    elements: &'a [u64],
    outcome: Outcome,
}

pub fn check(history: &[Event], finals: &[FinalKey]) -> Verdict {
    let mut verdict = Verdict::default();
    let mut writes: HashMap<u64, Write> = HashMap::new();
    for e in history {
        let c = &mut verdict.counts;
        c.attempted += 1;
        match e.outcome {
            Outcome::Ok => c.acknowledged += 1,
            Outcome::Failed => c.failed += 1,
            Outcome::Unknown => c.indeterminate += 1,
        }
        match &e.op {
            Op::Read { .. } => c.reads += 1,
            Op::Put {
                id,
                elements,
                blind,
                ..
            } => {
                c.puts += 1;
                c.blind_puts += u64::from(*blind);
                writes.insert(
                    *id,
                    Write {
                        key: e.key,
                        elements,
                        outcome: e.outcome,
                    },
                );
            }
            Op::Delete { .. } => c.deletes += 1,
        }
        if e.outcome == Outcome::Ok && !matches!(e.op, Op::Read { .. }) {
            c.acknowledged_writes += 1;
        }
    }

    // Every value returned, checked against the write that made it.
    let mut seen: HashSet<u64> = HashSet::new();
    let mut check_value = |key: u32, v: &Seen, at: &str, unexpected: &mut Vec<Violation>| {
        let problem = match (v.id, v.id.and_then(|id| writes.get(&id))) {
            (None, _) => Some(format!("{at}: bytes no write wrote: {:?}", v.raw)),
            (Some(id), None) => Some(format!(
                "{at}: value of write {id}, which was never attempted"
            )),
            (Some(id), Some(w)) if w.outcome == Outcome::Failed => Some(format!(
                "{at}: value of write {id}, which was refused (certainly not applied)"
            )),
            (Some(id), Some(w)) if w.key != key => Some(format!(
                "{at}: value of write {id}, which wrote key {}",
                w.key
            )),
            (Some(id), Some(w)) if sorted(&v.elements) != sorted(w.elements) => Some(format!(
                "{at}: write {id} wrote {:?} but {:?} came back",
                w.elements, v.elements
            )),
            (Some(id), Some(_)) => {
                seen.insert(id);
                None
            }
        };
        if let Some(detail) = problem {
            unexpected.push(Violation {
                key,
                id: v.id,
                detail,
            });
        }
    };
    for e in history {
        if let (Op::Read { values }, Outcome::Ok) = (&e.op, e.outcome) {
            for v in values {
                let at = format!("read by client {} at {} ms", e.client, e.end_ms);
                check_value(e.key, v, &at, &mut verdict.unexpected);
            }
        }
    }
    let mut final_ids: BTreeMap<u32, HashSet<u64>> = BTreeMap::new();
    let mut converged: HashSet<u32> = HashSet::new();
    for f in finals {
        if f.converged {
            converged.insert(f.key);
        } else {
            verdict.not_converged.push(f.key);
        }
        let ids = final_ids.entry(f.key).or_default();
        for v in &f.values {
            check_value(f.key, v, "final value", &mut verdict.unexpected);
            ids.extend(v.id);
        }
    }

    // What the writes and deletes that may have taken effect superseded.
    let mut superseded: HashSet<u64> = HashSet::new();
    let mut acked_superseded: HashMap<u64, String> = HashMap::new();
    for e in history {
        let (observed, effective) = match &e.op {
            Op::Read { .. } => continue,
            Op::Put { id, observed, .. } => (
                observed,
                e.outcome == Outcome::Ok || (e.outcome == Outcome::Unknown && seen.contains(id)),
            ),
            Op::Delete { observed } => (observed, e.outcome != Outcome::Failed),
        };
        if effective {
            superseded.extend(observed);
        }
        // Certainly took effect: acknowledged, or a put whose value a read
        // returned. What it observed must not come back.
        let certain = match &e.op {
            Op::Put { .. } => effective,
            _ => e.outcome == Outcome::Ok,
        };
        if certain {
            let what = match &e.op {
                Op::Put { id, .. } => format!("write {id}"),
                _ => "a delete".to_string(),
            };
            for o in observed {
                acked_superseded.entry(*o).or_insert_with(|| {
                    format!(
                        "{what} by client {} ({:?}, ended at {} ms)",
                        e.client, e.outcome, e.end_ms
                    )
                });
            }
        }
    }

    let mut ids: Vec<&u64> = writes.keys().collect();
    ids.sort();
    for id in ids {
        let w = &writes[id];
        let in_final = final_ids.get(&w.key).is_some_and(|f| f.contains(id));
        if in_final || superseded.contains(id) {
            continue;
        }
        let violation = |what: &str| {
            Violation {
            key: w.key,
            id: Some(*id),
            detail: format!("write {id} {what}, is not among the final values, and nothing that observed it took effect"),
        }
        };
        match w.outcome {
            Outcome::Ok => verdict.lost.push(violation("was acknowledged")),
            Outcome::Unknown if seen.contains(id) => {
                verdict.vanished.push(violation("was read by a client"))
            }
            _ => {}
        }
    }
    for (key, ids) in final_ids.iter().filter(|(k, _)| converged.contains(k)) {
        let mut ids: Vec<&u64> = ids.iter().collect();
        ids.sort();
        for id in ids {
            if let Some(by) = acked_superseded.get(id) {
                verdict.resurrected.push(Violation {
                    key: *key,
                    id: Some(*id),
                    detail: format!("write {id} is a final value, but {by} had superseded it"),
                });
            }
        }
    }
    verdict
}

fn sorted(v: &[u64]) -> Vec<u64> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: u32, id: u64, observed: &[u64], outcome: Outcome) -> Event {
        let mut elements = observed.to_vec();
        elements.push(id);
        Event {
            client: 0,
            key,
            start_ms: 0,
            end_ms: 0,
            op: Op::Put {
                id,
                elements,
                observed: observed.to_vec(),
                blind: observed.is_empty(),
            },
            outcome,
            error: None,
        }
    }

    fn delete(key: u32, observed: &[u64], outcome: Outcome) -> Event {
        Event {
            op: Op::Delete {
                observed: observed.to_vec(),
            },
            ..put(key, 0, &[], outcome)
        }
    }

    fn read(key: u32, values: &[(u64, &[u64])]) -> Event {
        Event {
            op: Op::Read {
                values: values
                    .iter()
                    .map(|(id, e)| Seen {
                        id: Some(*id),
                        elements: e.to_vec(),
                        raw: None,
                    })
                    .collect(),
            },
            ..put(key, 0, &[], Outcome::Ok)
        }
    }

    fn finals(key: u32, values: &[(u64, &[u64])]) -> Vec<FinalKey> {
        let Op::Read { values } = read(key, values).op else {
            unreachable!()
        };
        vec![FinalKey {
            key,
            converged: true,
            values,
        }]
    }

    #[test]
    fn a_clean_history_passes() {
        let h = vec![
            put(1, 10, &[], Outcome::Ok),
            read(1, &[(10, &[10])]),
            put(1, 11, &[10], Outcome::Ok),
            put(1, 12, &[], Outcome::Unknown),
        ];
        let v = check(&h, &finals(1, &[(11, &[10, 11])]));
        assert!(v.safe(), "{v:?}");
        assert_eq!(v.counts.acknowledged, 3);
        assert_eq!(v.counts.indeterminate, 1);
    }

    #[test]
    fn an_acknowledged_write_missing_at_the_end_is_lost() {
        let h = vec![put(1, 10, &[], Outcome::Ok), put(1, 11, &[], Outcome::Ok)];
        let v = check(&h, &finals(1, &[(11, &[11])]));
        assert_eq!(v.lost.len(), 1, "{v:?}");
        assert_eq!(v.lost[0].id, Some(10));
        assert!(!v.safe());
    }

    #[test]
    fn a_write_superseded_only_by_a_write_that_never_took_effect_is_lost() {
        // 11 observed 10 but failed outright, and no one saw 11.
        let h = vec![
            put(1, 10, &[], Outcome::Ok),
            put(1, 11, &[10], Outcome::Unknown),
        ];
        let v = check(&h, &finals(1, &[]));
        assert_eq!(v.lost.len(), 1, "{v:?}");
        // Had a read seen 11, 11 took effect and superseded 10; then 11
        // itself must not vanish.
        let mut h2 = h.clone();
        h2.push(read(1, &[(11, &[10, 11])]));
        let v = check(&h2, &finals(1, &[]));
        assert!(v.lost.is_empty(), "{v:?}");
        assert_eq!(v.vanished.len(), 1, "{v:?}");
        // An indeterminate delete may have taken effect.
        let h3 = vec![
            put(1, 10, &[], Outcome::Ok),
            delete(1, &[10], Outcome::Unknown),
        ];
        assert!(check(&h3, &finals(1, &[])).safe());
    }

    #[test]
    fn a_value_back_after_an_acknowledged_delete_is_resurrected() {
        let h = vec![put(1, 10, &[], Outcome::Ok), delete(1, &[10], Outcome::Ok)];
        assert!(check(&h, &finals(1, &[])).safe());
        let v = check(&h, &finals(1, &[(10, &[10])]));
        assert_eq!(v.resurrected.len(), 1, "{v:?}");
    }

    #[test]
    fn a_stale_replica_of_a_key_not_converged_is_not_a_resurrection() {
        let h = vec![put(1, 10, &[], Outcome::Ok), put(1, 11, &[10], Outcome::Ok)];
        let mut f = finals(1, &[(10, &[10]), (11, &[10, 11])]);
        f[0].converged = false;
        let v = check(&h, &f);
        assert!(v.resurrected.is_empty(), "{v:?}");
        assert_eq!(v.not_converged, vec![1]);
    }

    #[test]
    fn a_write_of_unknown_outcome_that_was_read_supersedes_for_good() {
        let h = vec![
            put(1, 10, &[], Outcome::Ok),
            put(1, 11, &[10], Outcome::Unknown),
            read(1, &[(11, &[10, 11])]),
        ];
        let v = check(&h, &finals(1, &[(10, &[10]), (11, &[10, 11])]));
        assert_eq!(v.resurrected.len(), 1, "{v:?}");
    }

    #[test]
    fn the_value_of_a_refused_write_is_unexpected() {
        let h = vec![put(1, 10, &[], Outcome::Failed)];
        let v = check(&h, &finals(1, &[(10, &[10])]));
        assert_eq!(v.unexpected.len(), 1, "{v:?}");
    }

    #[test]
    fn values_no_one_wrote_are_unexpected() {
        let h = vec![put(1, 10, &[], Outcome::Ok), put(2, 20, &[], Outcome::Ok)];
        let mut f = finals(1, &[(10, &[10, 99]), (20, &[20]), (30, &[30])]);
        f.extend(finals(2, &[(20, &[20])]));
        let v = check(&h, &f);
        assert_eq!(v.unexpected.len(), 3, "{v:?}");
    }
}
