//! The data and status commands: `put`, `get`, `delete`, `status`, `inspect`.
//! Each talks to the cluster in `--dir` through the SDK; `--json` prints a
//! machine-readable form.

use std::path::Path;

use anyhow::{bail, Context};
use serde_json::json;
use shoal_client::proto::{InspectReport, ObjectView, RequestOptions};
use shoal_client::{CausalContext, Client, ClientConfig};

use crate::Command as DataCommand;

/// Options every data command takes.
#[derive(clap::Args)]
pub struct DataOpts {
    /// Causal context from an earlier `get --json` (hex).
    #[arg(long)]
    context: Option<String>,
    #[arg(short = 'r', long)]
    r: Option<u32>,
    #[arg(short = 'w', long)]
    w: Option<u32>,
    #[arg(long)]
    pr: Option<u32>,
    #[arg(long)]
    pw: Option<u32>,
    /// Per-request timeout in milliseconds.
    #[arg(long)]
    timeout_ms: Option<u32>,
    #[arg(long)]
    json: bool,
}

impl DataOpts {
    fn options(&self) -> RequestOptions {
        RequestOptions {
            r: self.r,
            w: self.w,
            pr: self.pr,
            pw: self.pw,
            timeout_ms: self.timeout_ms,
        }
    }
    fn context(&self) -> anyhow::Result<Option<CausalContext>> {
        Ok(self
            .context
            .as_deref()
            .map(CausalContext::from_text)
            .transpose()?)
    }
}

pub async fn connect(dir: &Path) -> anyhow::Result<Client> {
    let config = ClientConfig::from_dir(dir).with_context(|| {
        format!(
            "no cluster found in {} (is `shoal dev` running? use --dir)",
            dir.display()
        )
    })?;
    Ok(Client::connect(config).await?)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub async fn run(dir: &Path, command: DataCommand) -> anyhow::Result<()> {
    let client = connect(dir).await?;
    match command {
        DataCommand::Put { key, value, opts } => {
            let value = if value == "-" {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                    .context("reading the value from stdin")?;
                buf
            } else {
                value.into_bytes()
            };
            let reply = client
                .put_with(
                    key.as_bytes(),
                    &value,
                    opts.context()?.as_ref(),
                    opts.options(),
                )
                .await?;
            if opts.json {
                println!(
                    "{}",
                    json!({"context": reply.context.to_text(), "siblings": reply.siblings})
                );
            } else if reply.siblings > 1 {
                println!("ok ({} siblings now: a concurrent value is kept; `shoal get {key}` shows them)", reply.siblings);
            } else {
                println!("ok");
            }
        }
        DataCommand::Get { key, opts } => {
            let reply = client.get_with(key.as_bytes(), opts.options()).await?;
            if opts.json {
                let values: Vec<String> = reply.values.iter().map(|v| text(&v.0)).collect();
                println!(
                    "{}",
                    json!({"key": key, "values": values, "context": reply.context.to_text()})
                );
            } else {
                match reply.values.len() {
                    0 => bail!("not found: {key}"),
                    1 => println!("{}", text(&reply.values[0].0)),
                    n => {
                        println!("{n} siblings:");
                        for (i, v) in reply.values.iter().enumerate() {
                            println!("  [{}] {}", i + 1, text(&v.0));
                        }
                        println!("context: {}", reply.context.to_text());
                        println!(
                            "resolve: shoal put {key} VALUE --context {}",
                            reply.context.to_text()
                        );
                    }
                }
            }
        }
        DataCommand::Delete { key, opts } => {
            let reply = client
                .delete_with(key.as_bytes(), opts.context()?.as_ref(), opts.options())
                .await?;
            if opts.json {
                println!(
                    "{}",
                    json!({"context": reply.context.to_text(), "siblings": reply.siblings})
                );
            } else {
                println!("deleted");
            }
        }
        DataCommand::Status { json } => status(&client, json).await?,
        DataCommand::Inspect { key, json } => {
            let report = client.inspect(key.as_bytes()).await?;
            print_inspect(&key, &report, json);
        }
        DataCommand::Dev { .. }
        | DataCommand::Node { .. }
        | DataCommand::Certs { .. }
        | DataCommand::Cluster { .. }
        | DataCommand::Join { .. }
        | DataCommand::Leave { .. }
        | DataCommand::Remove { .. }
        | DataCommand::Replace { .. } => {
            unreachable!("not a data command")
        }
    }
    Ok(())
}

async fn status(client: &Client, as_json: bool) -> anyhow::Result<()> {
    let statuses = client.statuses().await?;
    if as_json {
        let rows: Vec<_> = statuses
            .iter()
            .map(|(m, s)| match s {
                Ok(s) => json!({"name": m.name, "id": m.id.to_hex(), "client_addr": m.client_addr.to_string(),
                    "peer_addr": m.peer_addr.to_string(), "up": true, "pid": s.pid,
                    "ring_ready": s.ring_ready, "partitions": s.partitions_owned, "unreachable": s.unreachable,
                    "ring_version": s.ring_version, "zone": s.zone, "keys_unowned": s.keys_unowned,
                    "transfer": s.transfer.as_ref().map(|t| json!({"version": t.version, "partitions_total": t.partitions_total,
                        "partitions_done": t.partitions_done, "keys": t.keys, "bytes": t.bytes, "eta_secs": t.eta_secs})),
                    "transition": s.transition.as_ref().map(|t| json!({"from": t.from_version, "to": t.to_version, "unsynced": t.unsynced})),
                    "metrics_addr": s.metrics_addr.map(|a| a.to_string()),
                    "hints_pending": s.hints_pending.iter().map(|h| json!({"for": h.for_node, "pending": h.pending})).collect::<Vec<_>>(),
                    "hints_delivered": s.hints_delivered,
                    "anti_entropy": {"trees_ready": s.anti_entropy.trees_ready, "exchanges": s.anti_entropy.exchanges,
                        "keys_repaired": s.anti_entropy.keys_repaired, "bytes": s.anti_entropy.bytes,
                        "partitions": s.anti_entropy.partitions.iter().map(|p| json!({"partition": p.partition,
                            "peer": p.peer, "at_ms": p.at_ms, "repaired": p.repaired})).collect::<Vec<_>>()},
                    "peers": s.peers.iter().map(|p| json!({"name": p.name, "up": p.up, "phi": p.phi.min(1e6)})).collect::<Vec<_>>()}),
                Err(e) => json!({"name": m.name, "id": m.id.to_hex(), "client_addr": m.client_addr.to_string(),
                    "peer_addr": m.peer_addr.to_string(), "up": false, "error": e.to_string()}),
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    println!(
        "{:<10} {:<10} {:<22} {:<22} {:>8} {:<6} {:>4} {:<8} {:>10} {:>8} {:>9}  SEES DOWN",
        "NAME",
        "ID",
        "CLIENT",
        "PEER",
        "PID",
        "STATE",
        "RING",
        "ZONE",
        "PARTITIONS",
        "HINTS",
        "AAE FIXED"
    );
    for (m, s) in &statuses {
        let (pid, state, version, zone, parts, hints, aae, cannot_reach) = match s {
            Ok(s) => (
                s.pid.to_string(),
                if s.ring_ready { "up" } else { "start" },
                s.ring_version.to_string(),
                s.zone.clone().unwrap_or_else(|| "-".into()),
                s.partitions_owned.to_string(),
                s.hints_pending
                    .iter()
                    .map(|h| h.pending)
                    .sum::<u64>()
                    .to_string(),
                if s.anti_entropy.trees_ready {
                    s.anti_entropy.keys_repaired.to_string()
                } else {
                    "building".to_string()
                },
                {
                    // Peers its detector marks down, and peers it cannot dial.
                    let mut down: Vec<&str> = s
                        .peers
                        .iter()
                        .filter(|p| !p.up)
                        .map(|p| p.name.as_str())
                        .chain(s.unreachable.iter().map(String::as_str))
                        .collect();
                    down.sort();
                    down.dedup();
                    down.join(",")
                },
            ),
            Err(_) => (
                "-".into(),
                "down",
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                String::new(),
            ),
        };
        println!(
            "{:<10} {:<10} {:<22} {:<22} {:>8} {:<6} {:>4} {:<8} {:>10} {:>8} {:>9}  {}",
            m.name,
            m.id.to_string(),
            m.client_addr,
            m.peer_addr,
            pid,
            state,
            version,
            zone,
            parts,
            hints,
            aae,
            cannot_reach
        );
    }
    for (m, s) in &statuses {
        if let Ok(Some(t)) = s.as_ref().map(|s| s.transfer.as_ref()) {
            println!(
                "{}: pulling layout {}: {}/{} partitions, {} keys, {} bytes{}",
                m.name,
                t.version,
                t.partitions_done,
                t.partitions_total,
                t.keys,
                t.bytes,
                t.eta_secs
                    .map_or(String::new(), |s| format!(", about {s} s left"))
            );
        }
    }
    // A layout change in progress, as the most advanced node sees it.
    if let Some(t) = statuses
        .iter()
        .filter_map(|(_, s)| s.as_ref().ok()?.transition.clone())
        .max_by_key(|t| t.to_version)
    {
        println!(
            "transition: layout {} -> {}; not synced yet: {}",
            t.from_version,
            t.to_version,
            if t.unsynced.is_empty() {
                "none".to_string()
            } else {
                t.unsynced.join(", ")
            }
        );
    }
    Ok(())
}

/// An object as JSON: its clock and siblings.
fn object_json(o: &ObjectView) -> serde_json::Value {
    json!({
        "clock": o.clock.iter().map(|(n, c)| json!([n, c])).collect::<Vec<_>>(),
        "siblings": o.siblings.iter().map(|s| json!({
            "dot": [s.dot.0, s.dot.1],
            "value": s.value.as_ref().map(|v| text(&v.0)),
            "tombstone": s.value.is_none(),
            "timestamp_ms": s.timestamp_ms,
        })).collect::<Vec<_>>(),
    })
}

/// An object as text lines after a label column.
fn print_object(label: &str, o: &ObjectView) {
    let clock: Vec<String> = o.clock.iter().map(|(n, c)| format!("{n}:{c}")).collect();
    println!("  {label:<8} clock [{}]", clock.join(", "));
    for s in &o.siblings {
        let v = s
            .value
            .as_ref()
            .map_or("(tombstone)".to_string(), |v| format!("{:?}", text(&v.0)));
        println!("           {}:{} {v}", s.dot.0, s.dot.1);
    }
}

fn print_inspect(key: &str, report: &InspectReport, as_json: bool) {
    if as_json {
        let replicas: Vec<_> = report
            .replicas
            .iter()
            .map(|r| {
                let mut v = json!({"node": r.node, "id": r.id.to_hex(), "error": r.error,
                    "clock": null, "siblings": null});
                if let Some(o) = &r.object {
                    v.as_object_mut()
                        .expect("object")
                        .extend(object_json(o).as_object().expect("object").clone());
                }
                v
            })
            .collect();
        let hints: Vec<_> = report
            .hints
            .iter()
            .map(|h| {
                let mut v = json!({"holder": h.holder, "for": h.for_node});
                v.as_object_mut()
                    .expect("object")
                    .extend(object_json(&h.object).as_object().expect("object").clone());
                v
            })
            .collect();
        println!(
            "{}",
            json!({"key": key, "partition": report.partition, "replicas": replicas, "hints": hints})
        );
        return;
    }
    println!(
        "key {key:?}  partition {}  preference list:",
        report.partition
    );
    for r in &report.replicas {
        match (&r.object, &r.error) {
            (_, Some(e)) => println!("  {:<8} unavailable: {e}", r.node),
            (None, None) => println!("  {:<8} (no record)", r.node),
            (Some(o), None) => print_object(&r.node, o),
        }
    }
    if !report.hints.is_empty() {
        println!("hints waiting for handoff:");
        for h in &report.hints {
            println!("  {} holds a hint for {}:", h.holder, h.for_node);
            print_object("", &h.object);
        }
    }
}
