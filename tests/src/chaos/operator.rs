//! The nemesis's operator: joins, leaves and removes, made as an operator
//! would, with the `shoal` CLI from the clients' namespace (stage, plan,
//! commit), among the other faults. One change at a time; a commit that is
//! refused (a change still being applied, the claimant cut off) is tried
//! again until a deadline, after which the change is given up and undone.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use shoal_client::proto::ClusterReply;

use super::cluster::ChaosCluster;
use super::nemesis::Kind;

/// Members never go below this: with N=3 two faults at a time would
/// otherwise leave keys with no quorum for the whole change.
pub const MIN_MEMBERS: usize = 4;
/// How long a change may wait for its commit.
const COMMIT_WITHIN: Duration = Duration::from_secs(90);
const RETRY: Duration = Duration::from_secs(2);

/// A membership change under way: staged, then committed.
pub struct Change {
    pub kind: Kind,
    /// The slot it is about (from 0).
    pub node: usize,
    pub name: String,
    /// Whether the stage command went through (a join stages itself).
    staged: bool,
    deadline: Instant,
    next_try: Instant,
    /// Index of its span in the nemesis's.
    pub span: usize,
    pub last_error: String,
}

/// What a step of a change came to.
pub enum Step {
    Waiting,
    Committed(u64),
    GaveUp,
}

/// The CLI directory, made once.
pub struct Operator {
    dir: PathBuf,
}

impl Operator {
    pub fn new(cluster: &ChaosCluster) -> anyhow::Result<Operator> {
        Ok(Operator {
            dir: cluster.cli_dir()?,
        })
    }

    /// Starts a change of `kind` on slot `node` (a retired slot for a join,
    /// a running member otherwise).
    pub fn start(
        &self,
        cluster: &mut ChaosCluster,
        kind: Kind,
        node: usize,
        span: usize,
    ) -> anyhow::Result<Change> {
        let name = cluster.nodes[node].name.clone();
        let staged = match kind {
            Kind::Join => {
                cluster.join(node)?;
                true
            }
            Kind::Leave => false,
            Kind::Remove => {
                // Gone for good: killed, its disk never used again as is.
                cluster.kill(node);
                cluster.nodes[node].retired = true;
                false
            }
            other => unreachable!("{other:?} is not a membership change"),
        };
        let now = Instant::now();
        Ok(Change {
            kind,
            node,
            name,
            staged,
            deadline: now + COMMIT_WITHIN,
            next_try: now,
            span,
            last_error: String::new(),
        })
    }

    /// Drives `change` one step: stage it, then commit the plan that
    /// stages it, or give it up past its deadline.
    pub fn step(&self, cluster: &mut ChaosCluster, change: &mut Change) -> anyhow::Result<Step> {
        let now = Instant::now();
        if now < change.next_try {
            return Ok(Step::Waiting);
        }
        change.next_try = now + RETRY;
        if now >= change.deadline {
            self.give_up(cluster, change)?;
            return Ok(Step::GaveUp);
        }
        if !change.staged {
            let verb = if change.kind == Kind::Leave { "leave" } else { "remove" };
            match self.run(cluster, &[verb, &change.name]) {
                Ok(_) => change.staged = true,
                Err(e) => {
                    change.last_error = e;
                    return Ok(Step::Waiting);
                }
            }
        }
        let reply = match self.reply(cluster, &["cluster", "plan", "--json"]) {
            Ok(r) => r,
            Err(e) => {
                change.last_error = e;
                return Ok(Step::Waiting);
            }
        };
        if !reply.staged.iter().any(|(name, _)| *name == change.name) {
            // A join shows up once gossip brought it to the node asked.
            change.last_error = format!("not staged yet: {}", reply.message);
            return Ok(Step::Waiting);
        }
        let Some(plan) = reply.plan else {
            change.last_error = reply.message;
            return Ok(Step::Waiting);
        };
        match self.reply(cluster, &["cluster", "commit", &plan.version.to_string(), "--json"]) {
            Ok(_) => Ok(Step::Committed(plan.version)),
            Err(e) => {
                change.last_error = e;
                Ok(Step::Waiting)
            }
        }
    }

    /// Undoes a change that was never committed.
    fn give_up(&self, cluster: &mut ChaosCluster, change: &Change) -> anyhow::Result<()> {
        match change.kind {
            Kind::Join => {
                // In no layout: removed at once, and the slot is free again.
                let _ = self.run(cluster, &["remove", &change.name]);
                cluster.kill(change.node);
                cluster.nodes[change.node].retired = true;
            }
            _ => {
                let _ = self.run(cluster, &["cluster", "clear"]);
                if change.kind == Kind::Remove {
                    // Still a member: back it comes. (If the remove took
                    // effect after all, it stops by itself.)
                    cluster.nodes[change.node].retired = false;
                    cluster.spawn(change.node)?;
                }
            }
        }
        Ok(())
    }

    fn run(&self, cluster: &ChaosCluster, args: &[&str]) -> Result<String, String> {
        let out = cluster.cli(&self.dir, args).map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    fn reply(&self, cluster: &ChaosCluster, args: &[&str]) -> Result<ClusterReply, String> {
        let out = self.run(cluster, args)?;
        serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))
    }
}
