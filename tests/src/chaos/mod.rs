//! The chaos suite, in the style of Jepsen: real `shoal` processes, each in
//! its own network namespace on a bridge, clients in another; a seeded
//! nemesis kills, pauses, partitions, degrades links, fills disks and jumps
//! clocks while a workload reads, read-modify-writes, puts blindly and
//! deletes; after the final heal the checker compares every operation with
//! the keys' converged values.
//!
//! # Layout
//! - [`net`]: namespaces, bridge, iptables cuts, the NFQUEUE delayer.
//! - [`cluster`]: the `shoal` processes, their tmpfs disks and faked clocks.
//! - [`nemesis`]: the fault schedule.
//! - [`workload`] and [`history`]: what the clients do and record.
//! - [`checker`]: lost, vanished, unexpected and resurrected writes.
//! - [`report`]: the JSON report and the timeline plot.
//!
//! Needs root, `ip`, `iptables` and libfaketime (`deploy/setup.sh` installs
//! them). `tests/tests/chaos.rs` is the short CI run; `shoal-chaos` the long
//! one.

pub mod checker;
pub mod cluster;
pub mod history;
pub mod nemesis;
pub mod net;
pub mod operator;
pub mod report;
pub mod workload;

use std::time::{Duration, Instant};

use self::checker::Verdict;
use self::cluster::ChaosCluster;
use self::history::{key_name, Event, FinalKey, Op, Outcome};
use self::net::Host;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Settings {
    /// Drives the nemesis, the workload's choices and the delays.
    pub seed: u64,
    /// Founding members.
    pub nodes: usize,
    /// Slots beyond them, for joins (a node that left or was removed
    /// frees its slot for a later join, wiped).
    pub spares: usize,
    pub clients: u32,
    pub keys: u32,
    /// How long faults are injected while the workload runs.
    pub fault_secs: u64,
    /// How long to wait for the replicas to agree after the final heal.
    pub converge_secs: u64,
    /// Where to copy the node logs at the end; they go with the temp dir
    /// otherwise.
    pub logs_dir: Option<std::path::PathBuf>,
}

impl Settings {
    pub fn new(seed: u64, fault_secs: u64) -> Settings {
        Settings {
            seed,
            nodes: 5,
            spares: 1,
            clients: 16,
            keys: 48,
            fault_secs,
            converge_secs: 120,
            logs_dir: None,
        }
    }
}

/// A whole run: what happened and what the checker found.
#[derive(Debug, serde::Serialize)]
pub struct Outcomes {
    pub settings: Settings,
    pub verdict: Verdict,
    /// From the final heal until every key's replicas agreed with no hint
    /// waiting; `None` if they did not within `converge_secs`.
    pub convergence_ms: Option<u64>,
    pub faults: Vec<nemesis::Span>,
    /// Fault kinds the schedule never got to (a run too short).
    pub unused_kinds: Vec<nemesis::Kind>,
    pub crashes: Vec<String>,
    pub delayed_packets: u64,
    /// The same checker over the same history with one acknowledged write
    /// added that was never sent: it must be reported lost.
    pub injected_lost_write_caught: bool,
    pub wall_secs: u64,
    #[serde(skip)]
    pub history: Vec<Event>,
}

pub fn run(settings: Settings) -> anyhow::Result<Outcomes> {
    let began = Instant::now();
    let mut cluster = ChaosCluster::start(settings.nodes, settings.spares, settings.seed)?;
    let result = run_on(&mut cluster, &settings, began);
    if result.is_err() {
        eprintln!("node logs:\n{}", cluster.logs(30));
    }
    if let Some(dir) = &settings.logs_dir {
        cluster.save_logs(dir)?;
    }
    result
}

fn run_on(
    cluster: &mut ChaosCluster,
    settings: &Settings,
    began: Instant,
) -> anyhow::Result<Outcomes> {
    cluster.wait_serving(Duration::from_secs(60))?;
    let config = cluster.client_config()?;
    let started = Instant::now();
    let until = started + Duration::from_secs(settings.fault_secs);
    let workload = workload::Workload {
        clients: settings.clients,
        keys: settings.keys,
        seed: settings.seed,
    };
    let clients = {
        let config = config.clone();
        cluster.lab.enter(Host::Clients, move || {
            client_runtime().block_on(workload::run(workload, config, started, until))
        })?
    };
    let mut nemesis = nemesis::Nemesis::new(settings.seed, started, cluster)?;
    let faults = nemesis.run(cluster, until);
    // The workload stops at `until` on its own; heal before waiting for it.
    let healed = nemesis.heal_all(cluster);
    let history = clients
        .join()
        .map_err(|_| anyhow::anyhow!("the workload panicked"))?;
    faults?;
    healed?;
    let healed_at = Instant::now();
    let keys = settings.keys;
    let within = Duration::from_secs(settings.converge_secs);
    let (converged, finals) = cluster
        .lab
        .enter(Host::Clients, move || {
            client_runtime().block_on(final_values(config, keys, within))
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("the final read panicked"))??;
    let convergence_ms = converged.then(|| healed_at.elapsed().as_millis() as u64);
    let verdict = checker::check(&history, &finals);
    let injected_lost_write_caught = {
        let mut forged = history.clone();
        forged.push(Event {
            client: u32::MAX,
            key: 0,
            start_ms: 0,
            end_ms: 0,
            op: Op::Put {
                id: u64::MAX,
                elements: vec![u64::MAX],
                observed: Vec::new(),
                blind: true,
            },
            outcome: Outcome::Ok,
            error: None,
        });
        let v = checker::check(&forged, &finals);
        v.lost.len() == verdict.lost.len() + 1 && v.lost.iter().any(|l| l.id == Some(u64::MAX))
    };
    nemesis.restart_crashed(cluster)?;
    Ok(Outcomes {
        settings: settings.clone(),
        verdict,
        convergence_ms,
        faults: nemesis.spans.clone(),
        unused_kinds: nemesis.unused(),
        crashes: nemesis.crashes.clone(),
        delayed_packets: cluster.lab.delayed_packets(),
        injected_lost_write_caught,
        wall_secs: began.elapsed().as_secs(),
        history,
    })
}

fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime")
}

/// Polls every key's replicas (every 500 ms, at most `within`) until all
/// agree with no hint waiting; returns whether they did and the values.
async fn final_values(
    config: shoal_client::ClientConfig,
    keys: u32,
    within: Duration,
) -> anyhow::Result<(bool, Vec<FinalKey>)> {
    let client = shoal_client::Client::connect(config).await?;
    let deadline = Instant::now() + within;
    loop {
        // A hint some node still holds may yet change a key: converged
        // means every node answers and none holds one (an inspect asks only
        // the nodes its coordinator sees up).
        let hints_settled = match client.statuses().await {
            Ok(all) => all.iter().all(|(_, s)| {
                s.as_ref()
                    .is_ok_and(|s| s.hints_pending.iter().all(|h| h.pending == 0))
            }),
            Err(_) => false,
        };
        let mut finals = Vec::new();
        for key in 0..keys {
            let mut f = final_key(&client, key).await;
            f.converged &= hints_settled;
            finals.push(f);
        }
        let all = finals.iter().all(|f| f.converged);
        if all || Instant::now() >= deadline {
            return Ok((all, finals));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn final_key(client: &shoal_client::Client, key: u32) -> FinalKey {
    let report = match client.inspect(key_name(key).as_bytes()).await {
        Ok(r) => r,
        Err(_) => {
            return FinalKey {
                key,
                converged: false,
                values: Vec::new(),
            }
        }
    };
    let agree = report.replicas.iter().all(|r| r.error.is_none())
        && report.hints.is_empty()
        && report.replicas.windows(2).all(|w| {
            let set = |o: &Option<shoal_client::proto::ObjectView>| {
                let mut s: Vec<_> = o
                    .iter()
                    .flat_map(|o| o.siblings.iter())
                    // Live values: a tombstone some replica has already
                    // reaped reads the same as one it still holds.
                    .filter(|s| s.value.is_some())
                    .map(|s| (s.dot.clone(), s.value.clone()))
                    .collect();
                s.sort_by(|a, b| a.0.cmp(&b.0));
                s
            };
            set(&w[0].object) == set(&w[1].object)
        });
    let mut values: Vec<_> = report
        .replicas
        .iter()
        .filter_map(|r| r.object.as_ref())
        .flat_map(|o| o.siblings.iter().filter_map(|s| s.value.as_ref()))
        .map(|v| history::decode(&v.0))
        .collect();
    values.sort_by_key(|v| (v.id, v.raw.clone()));
    values.dedup();
    FinalKey {
        key,
        converged: agree,
        values,
    }
}
