//! The checks after the faults stopped and the cluster was quiet.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use shoal_node::version::Object;

use super::workload::{Ctx, Op, Shared};
use super::world::World;

/// A broken rule, with what explains it.
#[derive(Debug, Clone)]
pub struct Violation {
    pub rule: &'static str,
    /// A guess at the known hole behind it, from the history (see
    /// [`family`]); the report has the evidence.
    pub family: &'static str,
    pub key: Option<usize>,
    pub detail: String,
}

/// The values a replica's object holds (tombstones aside).
fn values(o: &Option<Object>) -> BTreeSet<String> {
    o.iter()
        .flat_map(|o| o.values())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

/// Whether the cluster is quiet: no hints anywhere and every key's primaries
/// identical.
pub fn converged(world: &World, keys: usize, pruning: bool) -> bool {
    let hints: u64 = world
        .machines
        .iter()
        .filter_map(|m| m.node.as_ref())
        .flat_map(|n| n.hint_queues())
        .map(|q| q.pending)
        .sum();
    if hints > 0 {
        return false;
    }
    // Membership: every running node on the same layout, no change in
    // transition, and old copies dropped (a key only on its primaries).
    let Some(view) = world.view() else {
        return false;
    };
    let views_agree = world
        .machines
        .iter()
        .filter_map(|m| m.node.as_ref())
        .all(|n| {
            let c = n.membership().cluster();
            n.membership()
                .view()
                .is_some_and(|v| v.version == view.version && !v.in_transition())
                && (c.version() == 0 || c.waiting_for(|p| p.cleaned).is_empty())
        });
    if !views_agree
        || !world.not_departed().is_empty()
        || !(0..keys).all(|k| only_on_primaries(world, &Shared::key(k)))
    {
        return false;
    }
    (0..keys).all(|k| {
        let key = Shared::key(k);
        let primaries = world.primaries(&key);
        let lost = primaries.iter().any(|p| {
            world.machines[*p]
                .node
                .as_ref()
                .is_some_and(|n| n.local_read(&key).is_err())
        });
        let objects: Vec<Option<Object>> = primaries
            .into_iter()
            .map(|p| {
                world.machines[p]
                    .node
                    .as_ref()
                    .and_then(|n| n.local_get(&key).ok().flatten())
            })
            .collect();
        !lost && objects.iter().all(|o| same_copy(o, &objects[0], pruning))
    })
}

/// Whether two primaries' copies agree: the same object, or where clocks
/// are pruned, the same siblings and the same counter for every actor both
/// clocks hold. Each replica keeps its own actors' entries through
/// pruning, so an entry on one side only is expected there, but never one
/// a sibling refers to (the siblings' dots are in both clocks).
fn same_copy(a: &Option<Object>, b: &Option<Object>, pruning: bool) -> bool {
    match (a, b) {
        (Some(a), Some(b)) if pruning => {
            a.siblings() == b.siblings()
                && (a.clock().iter())
                    .all(|(n, e)| b.clock().get(n).is_none_or(|f| f.counter == e.counter))
        }
        _ => a == b,
    }
}

/// Whether no running node but the key's primaries stores it.
fn only_on_primaries(world: &World, key: &[u8]) -> bool {
    let primaries = world.primaries(key);
    world.machines.iter().enumerate().all(|(i, m)| {
        primaries.contains(&i)
            || m.node
                .as_ref()
                .is_none_or(|n| n.local_get(key).ok().flatten().is_none())
    })
}

/// Checks every rule against the history; the trees are checked by the
/// caller (they need a rebuild, which is async).
pub fn check(
    world: &World,
    keys: usize,
    history: &[Op],
    power_losses: &[(u64, usize)],
    pruning: bool,
) -> Vec<Violation> {
    let mut out = Vec::new();
    // Rule: no hints remain.
    for m in world.machines.iter().filter(|m| !m.gone) {
        let Some(n) = &m.node else {
            out.push(Violation {
                family: "",
                rule: "every node runs at the end",
                key: None,
                detail: format!("{} is down", m.me.name),
            });
            continue;
        };
        for q in n.hint_queues().into_iter().filter(|q| q.pending > 0) {
            out.push(Violation {
                family: "",
                rule: "no hints remain",
                key: None,
                detail: format!("{} holds {} hints: {q:?}", m.me.name, q.pending),
            });
        }
    }
    // Rule: the last membership change is over (every running node on
    // one layout, none in transition, every step reached).
    if let Some(view) = world.view().filter(|v| v.version > 0) {
        let states: Vec<String> = world
            .machines
            .iter()
            .filter_map(|m| m.node.as_ref().map(|n| (m, n)))
            .map(|(m, n)| {
                let c = n.membership().cluster();
                let v = n.membership().view();
                format!(
                    "{} sees layout {:?} (history {}, reads new {:?}) progress {:?}",
                    m.me.name,
                    v.as_ref().map(|v| v.version),
                    c.layouts.len(),
                    v.as_ref().map(|v| v.reads_new),
                    c.progress
                        .iter()
                        .map(|(id, p)| format!(
                            "{}:{}/{}/{}/{}/{}",
                            c.name_of(id),
                            p.acked,
                            p.synced,
                            p.switched,
                            p.pruned,
                            p.cleaned
                        ))
                        .collect::<Vec<_>>()
                )
            })
            .collect();
        let over = world
            .machines
            .iter()
            .filter_map(|m| m.node.as_ref())
            .all(|n| {
                let c = n.membership().cluster();
                c.version() == view.version
                    && c.layouts.len() == 1
                    && c.waiting_for(|p| p.cleaned).is_empty()
            });
        if !over {
            out.push(Violation {
                family: "",
                rule: "the last membership change is over",
                key: None,
                detail: states.join("\n      "),
            });
        }
    }
    // Rule: a member that left removed itself, and every node heard.
    let not_departed = world.not_departed();
    if !not_departed.is_empty() {
        out.push(Violation {
            family: "",
            rule: "a member that left has removed itself",
            key: None,
            detail: format!("{} not removed everywhere", not_departed.join(", ")),
        });
    }
    let written: BTreeSet<&str> = history
        .iter()
        .filter(|o| o.what == "put")
        .filter_map(|o| o.value.as_deref())
        .collect();
    for k in 0..keys {
        let key = Shared::key(k);
        let primaries = world.primaries(&key);
        if !only_on_primaries(world, &key) {
            out.push(Violation {
                family: "",
                rule: "a key is held by its primaries only (old copies dropped)",
                key: Some(k),
                detail: format!(
                    "primaries {:?}, held by {:?}",
                    primaries.iter().map(|p| world.name(*p)).collect::<Vec<_>>(),
                    world
                        .machines
                        .iter()
                        .filter(|m| m.node.as_ref().is_some_and(|n| n
                            .local_get(&key)
                            .ok()
                            .flatten()
                            .is_some()))
                        .map(|m| m.me.name.as_str())
                        .collect::<Vec<_>>()
                ),
            });
        }
        let objects: Vec<(String, Option<Object>)> = primaries
            .iter()
            .map(|p| {
                let m = &world.machines[*p];
                let o = m
                    .node
                    .as_ref()
                    .and_then(|n| n.local_get(&key).ok().flatten());
                (m.me.name.clone(), o)
            })
            .collect();
        for p in &primaries {
            let m = &world.machines[*p];
            if let Some(Err(e)) = m.node.as_ref().map(|n| n.local_read(&key)) {
                out.push(Violation {
                    family: "",
                    rule: "no copy is left lost to corruption",
                    key: Some(k),
                    detail: format!("{}: {e}", m.me.name),
                });
            }
        }
        if objects
            .iter()
            .any(|(_, o)| !same_copy(o, &objects[0].1, pruning))
        {
            out.push(Violation {
                family: "",
                rule: if pruning {
                    "all primaries hold identical siblings and counters"
                } else {
                    "all primaries hold identical objects"
                },
                key: Some(k),
                detail: objects
                    .iter()
                    .map(|(n, o)| format!("{n}: {o:?}"))
                    .collect::<Vec<_>>()
                    .join("\n      "),
            });
        }
        // The value rules, on the union of what the primaries hold.
        let present: BTreeSet<String> = objects.iter().flat_map(|(_, o)| values(o)).collect();
        let ops: Vec<&Op> = history.iter().filter(|o| o.key == k).collect();
        // Values some write's context saw (acked or not): they may be gone.
        let superseded: BTreeSet<&str> = ops
            .iter()
            .filter(|o| o.what != "get")
            .flat_map(|o| o.seen.iter().map(String::as_str))
            .collect();
        // Values an acknowledged write's context saw: they must be gone.
        let must_be_gone: HashMap<&str, &Op> = ops
            .iter()
            .filter(|o| o.what != "get" && o.ok)
            .flat_map(|o| o.seen.iter().map(move |v| (v.as_str(), *o)))
            .collect();
        for o in ops.iter().filter(|o| o.what == "put" && o.ok) {
            let v = o.value.as_deref().expect("a put has a value");
            if !present.contains(v) && !superseded.contains(v) {
                // A: a context from before the key was reaped (kept from a
                // read or a reply) covers the dot the coordinator minted
                // again for a later write that context never saw.
                let later_old_context = ops.iter().any(|x| {
                    x.what != "get"
                        && matches!(x.ctx, Ctx::Stale | Ctx::Reply)
                        && x.start_ms >= o.end_ms
                        && !x.seen.contains(v)
                });
                // D: a primary lost its unsynced tail before the write and
                // may have minted one of the lost dots again.
                let after_power_loss = power_losses
                    .iter()
                    .any(|(t, m)| *t < o.end_ms && primaries.contains(m));
                out.push(Violation {
                    family: if pruning {
                        "P (a dot minted again after its clock entry was pruned)"
                    } else if after_power_loss {
                        "D (a dot minted again after a power loss lost the unsynced tail)"
                    } else if later_old_context {
                        "A (an old context superseded a later write it never saw)"
                    } else {
                        "lost (other)"
                    },
                    rule: "an acknowledged write is present unless a context that saw it superseded it",
                    key: Some(k),
                    detail: format!("{v} (written by c{} at {} ms) is lost", o.client, o.start_ms),
                });
            }
        }
        for v in &present {
            if !written.contains(v.as_str()) {
                out.push(Violation {
                    family: "",
                    rule: "nothing that was never written appears",
                    key: Some(k),
                    detail: format!("{v} was never written"),
                });
            }
            if let Some(by) = must_be_gone.get(v.as_str()) {
                let put = ops.iter().find(|o| o.value.as_deref() == Some(v.as_str()));
                let family = match put {
                    // Still unanswered when the superseding write began: a
                    // retry may have applied it again after.
                    Some(p) if p.end_ms > by.start_ms => {
                        "F (the write applied again after what superseded it: a retried forward)"
                    }
                    _ => "B (superseded, reaped, then brought back by an older copy)",
                };
                out.push(Violation {
                    family,
                    rule: "a value an acknowledged write or delete superseded is absent",
                    key: Some(k),
                    detail: format!("{v} is back; superseded by: {}", by.line()),
                });
            }
        }
    }
    out
}

/// The history of `key` and the objects its primaries hold, for a report.
pub fn explain(world: &World, key: usize, history: &[Op]) -> String {
    let mut s = String::new();
    let k = Shared::key(key);
    // Actors by node name, incarnation and epoch (`node3#2.5`).
    let prefixes: BTreeMap<_, _> = world
        .machines
        .iter()
        .map(|m| {
            (
                shoal_node::version::Actors::node_prefix(&m.me.id),
                m.me.name.clone(),
            )
        })
        .collect();
    let actor = |a: &shoal_ring::NodeId| {
        let (prefix, inc, epoch) = shoal_node::version::Actors::parts(a);
        let name = prefixes.get(&prefix).cloned().unwrap_or_else(|| a.to_hex());
        format!("{name}#{}.{epoch}", inc % 1000)
    };
    let primaries: Vec<String> = world
        .primaries(&k)
        .into_iter()
        .map(|p| world.name(p).to_string())
        .collect();
    s.push_str(&format!("    primaries of k{key}: {primaries:?}\n"));
    for p in world.primaries(&k) {
        if let Some(o) = world.machines[p]
            .node
            .as_ref()
            .and_then(|n| n.local_get(&k).ok().flatten())
        {
            let clock: Vec<String> = o
                .clock()
                .iter()
                .map(|(id, e)| format!("{}:{}", actor(id), e.counter))
                .collect();
            let sibs: Vec<String> = o
                .siblings()
                .iter()
                .map(|sb| {
                    format!(
                        "{}:{}={}",
                        actor(&sb.dot.node),
                        sb.dot.counter,
                        sb.value
                            .as_ref()
                            .map_or("<tombstone>".into(), |v| String::from_utf8_lossy(v)
                                .into_owned())
                    )
                })
                .collect();
            s.push_str(&format!(
                "    {} holds clock [{}] siblings [{}]\n",
                world.name(p),
                clock.join(" "),
                sibs.join(" ")
            ));
        }
    }
    s.push_str(&format!("    history of k{key}:\n"));
    for o in history.iter().filter(|o| o.key == key) {
        s.push_str(&format!("      {}\n", o.line()));
    }
    s
}
