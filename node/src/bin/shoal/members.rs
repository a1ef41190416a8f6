//! The membership commands: `shoal cluster plan | commit | clear`, `shoal
//! leave`, `shoal remove`, `shoal replace`. Each stages or commits through
//! any member (admin role); the plan is printed before anything moves.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{bail, Context};
use shoal_client::proto::{ClusterCommand, ClusterReply};
use shoal_client::{Client, ClientConfig};
use shoal_node::config::{Config, MemberConfig};

use crate::cli::connect;

/// `shoal cluster ...`
#[derive(clap::Subcommand)]
pub enum ClusterCmd {
    /// The staged changes and what committing them would move.
    Plan {
        #[arg(long)]
        json: bool,
    },
    /// Commit the plan `shoal cluster plan` showed (its version, and with
    /// `--plan` its id: a plan that changed since is refused, so look
    /// again).
    Commit {
        /// The version the plan shown would create.
        version: u64,
        /// The id of the plan shown (16 hex digits): a plan for the same
        /// version that changes or moves other things (another operator's
        /// change, staged since) is refused too.
        #[arg(long, value_parser = plan_id)]
        plan: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Drop every staged change.
    Clear,
}

/// A plan id as `shoal cluster plan` prints it.
fn plan_id(s: &str) -> Result<u64, String> {
    u64::from_str_radix(s, 16).map_err(|e| format!("not a plan id (16 hex digits): {e}"))
}

/// `shoal join SEED --config PATH`: the members SEED knows become the
/// config's seeds (its founding `members`, if any, are dropped: a node
/// either founds a cluster or joins one).
pub async fn join(dir: &Path, seed: SocketAddr, path: &Path) -> anyhow::Result<()> {
    let mut config = Config::load(path)?;
    // A node that has run has an id and data of its own cluster: it joins
    // as a new machine only once wiped.
    if std::fs::read_dir(&config.data_dir).is_ok_and(|mut d| d.next().is_some()) {
        bail!(
            "{} already holds data ({}): a machine joins with an empty data directory (wipe it to join as a new node)",
            config.name,
            config.data_dir.display()
        );
    }
    let mut client_config =
        ClientConfig::from_dir(dir).or_else(|_| -> anyhow::Result<ClientConfig> {
            // No seeds.txt: the CA (and certificate) alone will do.
            let ca = std::fs::read(dir.join("ca.pem"))
                .with_context(|| format!("no ca.pem in {} (use --dir)", dir.display()))?;
            let mut c = ClientConfig::new(vec![seed], ca);
            if let (Ok(cert), Ok(key)) = (
                std::fs::read(dir.join("client.pem")),
                std::fs::read(dir.join("client.key")),
            ) {
                c.identity = Some((cert, key));
            }
            Ok(c)
        })?;
    client_config.seeds = vec![seed];
    let client = Client::connect(client_config).await?;
    let ring = client.refresh_ring().await?;
    let seeds: Vec<MemberConfig> = ring
        .members
        .iter()
        .filter(|m| m.name != config.name)
        .map(|m| MemberConfig {
            name: m.name.clone(),
            peer_addr: m.peer_addr,
        })
        .collect();
    if seeds.is_empty() {
        bail!("{seed} names no member other than {}", config.name);
    }
    let names: Vec<String> = seeds.iter().map(|s| s.name.clone()).collect();
    config.cluster.members.clear();
    config.cluster.seeds = seeds;
    config.validate()?;
    std::fs::write(path, toml::to_string_pretty(&config)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "{} now joins through {} seeds ({}); start it with `shoal node --config {}`: it stages its own join, then `shoal cluster plan` and the `shoal cluster commit` it prints",
        path.display(),
        names.len(),
        names.join(", "),
        path.display()
    );
    Ok(())
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
    if plan.id == 0 {
        println!("commit with: shoal cluster commit {}", plan.version);
    } else {
        println!(
            "commit with: shoal cluster commit {} --plan {:016x}",
            plan.version, plan.id
        );
    }
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
