//! The nemesis's operator: joins, leaves and removes, made as an operator
//! would, with the `shoal` CLI from the clients' namespace (stage, plan,
//! commit), among the other faults. One change at a time; a commit that is
//! refused (a change still being applied, the claimant cut off) is tried
//! again until it goes through: a change is never abandoned half made (a
//! killed machine left in the layout, a joiner left staged). After the
//! final heal the nemesis waits (bounded) for the change under way.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use shoal_client::proto::ClusterReply;

use super::cluster::ChaosCluster;
use super::nemesis::Kind;

/// Members never go below this: with N=3 two faults at a time would
/// otherwise leave keys with no quorum for the whole change.
pub const MIN_MEMBERS: usize = 4;
const RETRY: Duration = Duration::from_secs(2);

/// A membership change under way: staged, then committed.
pub struct Change {
    pub kind: Kind,
    /// The slot it is about (from 0).
    pub node: usize,
    pub name: String,
    /// Whether the stage command went through (a join stages itself).
    staged: bool,
    /// The layout version when the change was first seen staged: a later
    /// version with the change no longer staged means a commit took it
    /// (one whose reply was lost, say).
    staged_at: Option<u64>,
    next_try: Instant,
    /// Index of its span in the nemesis's.
    pub span: usize,
    pub last_error: String,
}

/// What a step of a change came to.
pub enum Step {
    Waiting,
    Committed(u64),
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
        Ok(Change {
            kind,
            node,
            name,
            staged,
            staged_at: None,
            next_try: Instant::now(),
            span,
            last_error: String::new(),
        })
    }

    /// Drives `change` one step: stage it, then commit the plan that
    /// stages it.
    pub fn step(&self, cluster: &mut ChaosCluster, change: &mut Change) -> anyhow::Result<Step> {
        let now = Instant::now();
        if now < change.next_try {
            return Ok(Step::Waiting);
        }
        change.next_try = now + RETRY;
        if !change.staged {
            let verb = if change.kind == Kind::Leave {
                "leave"
            } else {
                "remove"
            };
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
            if change.staged_at.is_some_and(|v| reply.version > v) {
                return Ok(Step::Committed(reply.version));
            }
            // A join shows up once gossip brought it to the node asked.
            change.last_error = format!("not staged yet: {}", reply.message);
            return Ok(Step::Waiting);
        }
        change.staged_at.get_or_insert(reply.version);
        let Some(plan) = reply.plan else {
            change.last_error = reply.message;
            return Ok(Step::Waiting);
        };
        let (version, id) = (plan.version.to_string(), format!("{:016x}", plan.id));
        match self.reply(
            cluster,
            &["cluster", "commit", &version, "--plan", &id, "--json"],
        ) {
            Ok(_) => Ok(Step::Committed(plan.version)),
            Err(e) => {
                change.last_error = e;
                Ok(Step::Waiting)
            }
        }
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
