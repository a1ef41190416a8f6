//! The operator of a simulated cluster: membership changes among the
//! nemesis's faults (issue 12, item 6). Each change goes the way an
//! operator makes it: a join is a new machine started with the founding
//! members as seeds (it stages its own join); a leave and a remove are
//! staged on a running member (a remove after the machine was destroyed
//! for good); then the plan is read and committed. The next change waits
//! until the previous one has left its transition, or gives up after
//! [`TRANSITION_MAX`] (the quiet period then waits for it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shoal_client::proto::{ClusterCommand, ClusterReply, Request, Response};
use shoal_node::net::sim::SimRng;
use tokio::sync::oneshot;

use super::workload::{FaultStats, Shared};

/// The longest the operator waits for a change to leave its transition
/// before it makes the next one.
pub const TRANSITION_MAX: Duration = Duration::from_secs(20);

/// Attempts, 250 ms apart, to commit a staged change.
const COMMIT_TRIES: usize = 240;

/// A membership change the operator makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Join,
    Leave,
    Remove,
}

/// The changes of one seed, drawn from `rng`: one or two, a remove only
/// where the cluster keeps at least four members after it, and at most
/// one (a remove destroys its machine: the seed's one permanent loss).
pub fn draw(rng: &mut SimRng, size: usize) -> Vec<Change> {
    let mut members = size;
    let mut plan = Vec::new();
    for _ in 0..rng.range(1, 2) {
        let change = match rng.below(3) {
            0 => Change::Join,
            1 if members > 3 => Change::Leave,
            2 if members > 3 && !plan.contains(&Change::Remove) => Change::Remove,
            _ => Change::Join,
        };
        members = if change == Change::Join {
            members + 1
        } else {
            members - 1
        };
        plan.push(change);
    }
    plan
}

/// Runs `changes` one after the other, at random moments while the clients
/// run; returns what was committed.
pub async fn operator(
    shared: Arc<Shared>,
    mut rng: SimRng,
    changes: Vec<Change>,
    clients_done: Arc<AtomicBool>,
) -> FaultStats {
    let mut stats = FaultStats::default();
    let log = |what: String| {
        let line = format!("[{:>6} ms] {what}", shared.now_ms());
        shared.net.note(|| line.clone());
        shared.faults.lock().expect("faults lock").push(line);
    };
    for change in changes {
        tokio::time::sleep(Duration::from_millis(rng.range(300, 2500))).await;
        if clients_done.load(Ordering::SeqCst) {
            break;
        }
        wait_for_transition(&shared).await;
        if clients_done.load(Ordering::SeqCst) {
            break;
        }
        let (target, index, commands) = {
            let mut w = shared.world.lock().expect("world lock");
            let Some(view) = w.view() else { continue };
            let members: Vec<usize> = (0..w.machines.len())
                .filter(|i| view.ring.members().contains(&w.machines[*i].me.id))
                .collect();
            match change {
                Change::Join => {
                    let i = w.join(&mut rng);
                    (w.name(i).to_string(), i, Vec::new())
                }
                Change::Leave | Change::Remove => {
                    let i = members[rng.below(members.len() as u64) as usize];
                    let name = w.name(i).to_string();
                    let command = if change == Change::Leave {
                        ClusterCommand::Leave { node: name.clone() }
                    } else {
                        w.destroy(i);
                        ClusterCommand::Remove { node: name.clone() }
                    };
                    (name, i, vec![command])
                }
            }
        };
        log(format!("{change:?} of {target} staged"));
        for command in &commands {
            if let Err(e) = run(&shared, &mut rng, command.clone()).await {
                log(format!("staging failed: {e}"));
            }
        }
        // The staged change reaches a member by gossip; then commit the
        // plan, once the previous change is over (which may wait for a
        // crashed node to come back: the quiet period restarts them all).
        let mut committed = false;
        for attempt in 0..COMMIT_TRIES {
            tokio::time::sleep(Duration::from_millis(250)).await;
            // As an operator would when told the claimant is down: the
            // remove again, now that the cluster sees the machine down.
            if attempt % 8 == 7 {
                for command in &commands {
                    let _ = run(&shared, &mut rng, command.clone()).await;
                }
            }
            let Ok(reply) = run(&shared, &mut rng, ClusterCommand::Plan).await else {
                continue;
            };
            let Some(plan) = reply
                .plan
                .filter(|_| reply.staged.iter().any(|(name, _)| *name == target))
            else {
                continue;
            };
            match run(
                &shared,
                &mut rng,
                ClusterCommand::Commit {
                    version: plan.version,
                    plan: Some(plan.id),
                },
            )
            .await
            {
                Ok(_) => {
                    log(format!(
                        "{change:?} of {target} committed as layout {}: {} partitions move",
                        plan.version, plan.partitions_moving
                    ));
                    committed = true;
                    break;
                }
                Err(e) => shared.net.note(|| format!("commit refused: {e}")),
            }
        }
        if committed {
            match change {
                Change::Join => stats.joins += 1,
                Change::Leave => {
                    stats.leaves += 1;
                    shared.world.lock().expect("world lock").left.push(index);
                }
                Change::Remove => stats.removes += 1,
            }
        }
    }
    stats
}

/// Waits (bounded) until no running node is in a transition.
async fn wait_for_transition(shared: &Shared) {
    let start = tokio::time::Instant::now();
    while start.elapsed() < TRANSITION_MAX {
        let busy = {
            let w = shared.world.lock().expect("world lock");
            w.machines
                .iter()
                .filter_map(|m| m.node.as_ref())
                .any(|n| n.membership().view().is_none_or(|v| v.in_transition()))
        };
        if !busy {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs a membership command on a random running member, as a task of
/// that node (its crash ends the command).
async fn run(
    shared: &Shared,
    rng: &mut SimRng,
    command: ClusterCommand,
) -> Result<ClusterReply, String> {
    let (node, name) = {
        let w = shared.world.lock().expect("world lock");
        let Some(view) = w.view() else {
            return Err("no ring".into());
        };
        let up: Vec<usize> = (0..w.machines.len())
            .filter(|i| w.is_up(*i) && view.ring.members().contains(&w.machines[*i].me.id))
            .collect();
        if up.is_empty() {
            return Err("no member running".into());
        }
        let i = up[rng.below(up.len() as u64) as usize];
        (
            w.machines[i].node.clone().expect("running"),
            w.name(i).to_string(),
        )
    };
    let (tx, rx) = oneshot::channel();
    shared.net.spawn_on(&name, async move {
        let _ = tx.send(node.coordinate(Request::Cluster(command), false).await);
    });
    match tokio::time::timeout(Duration::from_secs(5), rx).await {
        Ok(Ok(Response::Cluster(reply))) => Ok(reply),
        Ok(Ok(Response::Error(e))) => Err(e.message),
        Ok(Ok(other)) => Err(format!("{other:?}")),
        Ok(Err(_)) => Err(format!("{name} crashed")),
        Err(_) => Err("no answer".into()),
    }
}
