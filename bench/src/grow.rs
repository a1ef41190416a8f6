//! `--grow-by K --grow-at T` (with `--local N`): K nodes join the local
//! cluster T into the run, under the run's load, as an operator adds them:
//! each configured with seeds (`shoal dev --add --no-start`) and started,
//! then the plan that stages their joins committed. Reported: the time from
//! the commit until every node is on the new layout with nothing left to
//! pull or drop (the transfer time), the bytes and keys the new replicas
//! pulled (from every node's `/metrics`), and the throughput and p99 before
//! and during the transfer (the dip).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use shoal_client::proto::ClusterCommand;
use shoal_client::{Client, ClientConfig};
use tokio::time::Instant;

use crate::local::{shoal_bin, Handle};
use crate::runner::Results;

/// What the growth did, in seconds from the start of the run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Growth {
    pub nodes_added: usize,
    pub layout: u64,
    pub committed_at_secs: f64,
    /// `None`: not settled within the wait after the run.
    pub settled_at_secs: Option<f64>,
    pub bytes_moved: u64,
    pub keys_moved: u64,
}

impl Growth {
    pub fn transfer_secs(&self) -> Option<f64> {
        self.settled_at_secs.map(|s| s - self.committed_at_secs)
    }
}

/// Adds `by` nodes at `at` after `start`, commits, and waits (at most
/// `settle_within` after the commit) until the change is over everywhere.
pub async fn grow(
    handle: Handle,
    start: Instant,
    at: Duration,
    by: usize,
    settle_within: Duration,
) -> anyhow::Result<Growth> {
    tokio::time::sleep_until(start + at).await;
    let dir = handle.path().to_path_buf();
    let client = Client::connect(ClientConfig::from_dir(&dir)?).await?;
    let before = transfer_totals(&dir);
    for _ in 0..by {
        let out = Command::new(shoal_bin())
            .arg("--dir")
            .arg(&dir)
            .args(["dev", "--add", "--no-start"])
            .env_remove("SHOAL_DEV_DIR")
            .output()
            .context("shoal dev --add")?;
        if !out.status.success() {
            bail!("shoal dev --add: {}", String::from_utf8_lossy(&out.stderr));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let name = stdout
            .split_whitespace()
            .next()
            .context("shoal dev --add printed no name")?
            .to_string();
        // Started in the run's process group, so it goes with the cluster.
        handle.restart(&name)?;
        eprintln!(
            "\n[{:.1?}] {name} started; it stages its join",
            start.elapsed()
        );
    }
    // The joins reach the node asked by gossip.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (version, plan) = loop {
        if let Ok(reply) = client.cluster(ClusterCommand::Plan).await {
            let joins = reply.staged.iter().filter(|(_, c)| c == "join").count();
            if let (true, Some(plan)) = (joins >= by, &reply.plan) {
                break (plan.version, Some(plan.id));
            }
        }
        if Instant::now() > deadline {
            bail!("the new nodes' joins were not staged within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    client
        .cluster(ClusterCommand::Commit { version, plan })
        .await?;
    let committed_at = start.elapsed().as_secs_f64();
    eprintln!("\n[{committed_at:.1}s] committed layout {version}");
    let members = handle.configured();
    let deadline = Instant::now() + settle_within;
    let settled_at = loop {
        if let Ok(all) = client.statuses().await {
            let answered: Vec<_> = all.into_iter().filter_map(|(_, s)| s.ok()).collect();
            let done = answered.len() >= members
                && answered.iter().all(|s| {
                    s.ring_version == version
                        && s.transition.is_none()
                        && s.transfer.is_none()
                        && s.keys_unowned == 0
                });
            if done {
                break Some(start.elapsed().as_secs_f64());
            }
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if let Some(s) = settled_at {
        eprintln!("\n[{s:.1}s] layout {version} settled on every node");
    }
    let after = transfer_totals(&dir);
    Ok(Growth {
        nodes_added: by,
        layout: version,
        committed_at_secs: committed_at,
        settled_at_secs: settled_at,
        bytes_moved: after.0.saturating_sub(before.0),
        keys_moved: after.1.saturating_sub(before.1),
    })
}

/// The summary lines: transfer time, bytes moved, throughput and p99
/// before and during the transfer.
pub fn summary(g: &Growth, results: &Results) -> String {
    let per_second: Vec<(u64, u64)> = (0..results.completed.len())
        .map(|s| {
            let ops: u64 = results.completed[s].values().sum();
            let p99 = results
                .seconds
                .get(s)
                .and_then(|ops| {
                    let mut all: Option<hdrhistogram::Histogram<u64>> = None;
                    for stats in ops.values() {
                        match &mut all {
                            Some(h) => h.add(&stats.latency).ok()?,
                            None => all = Some(stats.latency.clone()),
                        }
                    }
                    all.map(|h| h.value_at_quantile(0.99))
                })
                .unwrap_or(0);
            (ops, p99)
        })
        .collect();
    let commit = g.committed_at_secs.floor() as usize;
    let end = g.settled_at_secs.map_or(per_second.len(), |s| {
        (s.ceil() as usize).min(per_second.len())
    });
    // Whole seconds only: the last second of the run is partial.
    let full = per_second.len().saturating_sub(1);
    let window = |from: usize, to: usize| -> Vec<(u64, u64)> {
        per_second[from.min(full)..to.min(full)].to_vec()
    };
    let before = window(commit.saturating_sub(10), commit);
    let during = window(commit, end.max(commit + 1));
    let after = match g.settled_at_secs {
        Some(_) => window(end, full),
        None => Vec::new(),
    };
    let mean = |w: &[(u64, u64)]| w.iter().map(|x| x.0).sum::<u64>() as f64 / w.len().max(1) as f64;
    let worst = during.iter().map(|x| x.0).min().unwrap_or(0);
    let p99 = |w: &[(u64, u64)]| w.iter().map(|x| x.1).max().unwrap_or(0) as f64 / 1000.0;
    let (b, d) = (mean(&before), mean(&during));
    let dip = if b > 0.0 { 100.0 * (b - d) / b } else { 0.0 };
    let transfer = g
        .transfer_secs()
        .map_or("not settled within the wait".to_string(), |t| {
            format!("{t:.1} s")
        });
    format!(
        "growth: +{} nodes, layout {} committed at {:.1} s; transfer time (commit to settled everywhere): {transfer}\n\
         moved: {:.1} MiB in {} keys (pulled by the new replicas)\n\
         throughput: {b:.0} ops/s in the {} s before the commit, {d:.0} ops/s during the transfer (dip {dip:.1}%), worst second {worst} ops/s, {:.0} ops/s after it (on more processes)\n\
         p99 (worst second): {:.1} ms before, {:.1} ms during, {:.1} ms after\n",
        g.nodes_added,
        g.layout,
        g.committed_at_secs,
        g.bytes_moved as f64 / (1 << 20) as f64,
        g.keys_moved,
        before.len(),
        mean(&after),
        p99(&before),
        p99(&during),
        p99(&after),
    )
}

/// (bytes, keys) every configured node's `/metrics` reports as pulled by
/// transfers so far; a node that does not answer counts 0.
fn transfer_totals(dir: &Path) -> (u64, u64) {
    let mut total = (0, 0);
    for addr in metrics_addrs(dir) {
        let Ok(text) = scrape(addr) else { continue };
        total.0 += metric(&text, "shoal_transfer_bytes_total");
        total.1 += metric(&text, "shoal_transfer_keys_total");
    }
    total
}

/// The `metrics-addr` of every `nodeN.toml` in the cluster directory.
fn metrics_addrs(dir: &Path) -> Vec<SocketAddr> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("node") && name.ends_with(".toml")
        })
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|text| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix("metrics-addr"))
                .and_then(|rest| rest.trim().strip_prefix('='))
                .and_then(|v| v.trim().trim_matches('"').parse().ok())
        })
        .collect()
}

fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix(name))
        .filter_map(|rest| rest.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}
