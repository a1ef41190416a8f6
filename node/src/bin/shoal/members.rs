//! The membership commands: `shoal cluster plan | commit | clear`, `shoal
//! leave`, `shoal remove`, `shoal replace`. Each stages or commits through
//! any member (admin role); the plan is printed before anything moves.

use std::path::Path;

use shoal_client::proto::{ClusterCommand, ClusterReply};

use crate::cli::connect;

/// `shoal cluster ...`
#[derive(clap::Subcommand)]
pub enum ClusterCmd {
    /// The staged changes and what committing them would move.
    Plan {
        #[arg(long)]
        json: bool,
    },
    /// Commit the plan `shoal cluster plan` showed (its version: a plan
    /// that changed since is refused, so look again).
    Commit {
        /// The version the plan shown would create.
        version: u64,
        #[arg(long)]
        json: bool,
    },
    /// Drop every staged change.
    Clear,
}

/// Runs one membership command and prints the reply.
pub async fn run(dir: &Path, command: ClusterCommand, json: bool) -> anyhow::Result<()> {
    let client = connect(dir).await?;
    let reply = client.cluster(command).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    } else {
        print_reply(&reply);
    }
    Ok(())
}

fn print_reply(reply: &ClusterReply) {
    if !reply.message.is_empty() {
        println!("{}", reply.message);
    }
    println!("ring version: {}", reply.version);
    if reply.staged.is_empty() {
        println!("staged: nothing");
    } else {
        println!("staged:");
        for (name, change) in &reply.staged {
            println!("  {change:<7} {name}");
        }
    }
    let Some(plan) = &reply.plan else {
        return;
    };
    let bytes = plan.expected_bytes.map_or(String::new(), |b| {
        format!(", about {} to copy", human_bytes(b))
    });
    println!(
        "plan for version {}: {} partitions change replicas, {} replicas move{bytes}",
        plan.version, plan.partitions_moving, plan.replicas_moving
    );
    println!(
        "  {:<12} {:<8} {:>10} {:>10} {:>9} {:>9}",
        "NODE", "ZONE", "PARTS NOW", "PARTS NEW", "REPS NOW", "REPS NEW"
    );
    for m in &plan.members {
        println!(
            "  {:<12} {:<8} {:>10} {:>10} {:>9} {:>9}",
            m.name,
            m.zone.as_deref().unwrap_or("-"),
            m.partitions_before,
            m.partitions_after,
            m.replicas_before,
            m.replicas_after
        );
    }
    for (p, from, to) in &plan.transfers {
        println!("  partition {p:>5}: {} -> {}", list(from), list(to));
    }
    if plan.transfers.len() < plan.partitions_moving as usize {
        println!(
            "  ... and {} more partitions",
            plan.partitions_moving as usize - plan.transfers.len()
        );
    }
    if reply.staged.is_empty() {
        return;
    }
    println!("commit with: shoal cluster commit {}", plan.version);
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "-".into()
    } else {
        names.join(",")
    }
}

/// 1536 -> "1.5 KiB".
fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
