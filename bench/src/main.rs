//! shoal-bench: YCSB-style workloads against a Shoal cluster (one it starts
//! itself with `--local N`, the running dev cluster, or any cluster
//! directory), a Redis server or an etcd cluster, all driven by the same
//! workers, in closed or open loop, with a table and a JSON report.
//!
//! ```text
//! shoal-bench --local 3 --workload a --duration 30s
//! shoal-bench --target redis://127.0.0.1:6379 --workload a --duration 30s
//! shoal-bench --target etcd://127.0.0.1:2379 --workload b --rate 5000 --duration 30s
//! shoal-bench --local 3 --workload a --duration 30s --kill-at 10s --restart-at 20s
//! shoal-bench --local 3 --workload a --duration 90s --grow-by 2 --grow-at 20s
//! shoal-bench --local 3 --workload a --sweep 2000:2000 --duration 10s --out s
//! shoal-bench --curves s,r,e --out curves
//! shoal-bench --curves before=s0,after=s --out curves
//! ```

mod cpu;
mod grow;
mod host;
mod local;
mod plot;
mod report;
mod runner;
mod sweep;
mod target;
mod workload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::json;
use shoal_client::proto::RequestOptions;

use crate::runner::RunConfig;
use crate::target::{Target, TargetSpec, Updates};
use crate::workload::{Chooser, Distribution, ValueSize, Workload};

/// A duration such as `30s`, `500ms`, `2m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("`{s}`: expected a duration such as 30s, 500ms or 2m");
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| err())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(err()),
    };
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Parser, Debug)]
#[command(
    name = "shoal-bench",
    version,
    about = "Benchmark Shoal, Redis and etcd with the same YCSB-style workloads"
)]
struct Args {
    /// Start a local Shoal cluster of N nodes for this run (temp dir, removed after).
    #[arg(long, conflicts_with = "target")]
    local: Option<usize>,
    /// shoal://DIR (a cluster directory; default: the running `shoal dev`),
    /// redis://HOST:PORT or etcd://HOST:PORT[,HOST:PORT...].
    #[arg(long)]
    target: Option<TargetSpec>,
    #[arg(long, value_enum, default_value = "a")]
    workload: Workload,
    #[arg(long, value_enum, default_value = "uniform")]
    distribution: Distribution,
    /// Records in the key space (and inserted by `load` and the preload).
    #[arg(long, default_value_t = 100_000)]
    records: u64,
    /// Value size in bytes: N, or MIN..MAX for a uniform range.
    #[arg(long, default_value = "100")]
    value_size: ValueSize,
    /// Stop after this many operations.
    #[arg(long)]
    operations: Option<u64>,
    /// Stop after this long (e.g. 30s); default 30s unless --operations is given.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Closed loop: this many workers, each as fast as it goes.
    #[arg(long, short = 'c', default_value_t = 64)]
    concurrency: usize,
    /// Open loop: this many operations per second, latency measured from
    /// each operation's due time.
    #[arg(long)]
    rate: Option<f64>,
    /// Shoal read quorum.
    #[arg(short = 'r', long)]
    r: Option<u32>,
    /// Shoal write quorum.
    #[arg(short = 'w', long)]
    w: Option<u32>,
    /// Do not insert the records before a read workload.
    #[arg(long)]
    no_preload: bool,
    /// How Shoal updates are written: `context`, with the causal context
    /// the run last saw of the key, so that an update replaces what was
    /// seen (as YCSB's update, a Redis SET and an etcd put replace the
    /// record); `blind`, with none, so that each update adds a sibling and
    /// objects grow through the run.
    #[arg(long, value_enum, default_value = "context")]
    updates: Updates,
    /// With --local: kill -9 this node at --kill-at and restart it at --restart-at.
    #[arg(long, default_value = "node2")]
    fault_node: String,
    #[arg(long, value_parser = parse_duration, requires = "local")]
    kill_at: Option<Duration>,
    #[arg(long, value_parser = parse_duration, requires = "kill_at")]
    restart_at: Option<Duration>,
    /// With --local: this many nodes join at --grow-at (configured with
    /// seeds, started, the plan committed); the report gives the transfer
    /// time, the bytes moved and the throughput dip.
    #[arg(long, requires = "local")]
    grow_by: Option<usize>,
    #[arg(long, value_parser = parse_duration, default_value = "20s")]
    grow_at: Duration,
    /// With --local: the nodes sync their WAL before acknowledging a write.
    #[arg(long, requires = "local")]
    fsync: bool,
    /// The server processes whose CPU is reported, by name (`redis-server`,
    /// `etcd`); a local cluster's are its own, a shoal:// target's are the
    /// processes named `shoal`.
    #[arg(long, value_delimiter = ',')]
    server_process: Vec<String>,
    /// Open-loop steps at rising rates until one falls behind, each
    /// --duration long: FROM:STEP[:TO] or R1,R2,... (ops/s). Writes
    /// sweep.json and latency-throughput.png to --out.
    #[arg(long, conflicts_with_all = ["rate", "kill_at", "grow_by", "operations"])]
    sweep: Option<sweep::Rates>,
    /// Draw the sweeps in these directories (each from a --sweep run) as one
    /// latency-throughput.png in --out, and exit. `NAME=DIR` names a curve
    /// (else it is named by its target's kind: SHOAL, REDIS, ETCD).
    #[arg(long, value_delimiter = ',')]
    curves: Vec<String>,
    /// Threads of the load generator (1: a single-threaded runtime). One
    /// took a fifth to a third less of the generator's CPU per operation
    /// than two, against Shoal and Redis alike, and gave Redis 9-23% more
    /// operations a second and Shoal's open loop a lower tail: two threads
    /// woke each other across the cores the servers share (bench/README.md,
    /// twenty-seventh look).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    generator_threads: u16,
    /// Where the JSON report goes.
    #[arg(long, default_value = "shoal-bench-out")]
    out: PathBuf,
}

fn default_dev_dir() -> PathBuf {
    std::env::var_os("SHOAL_DEV_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".shoal/dev")))
        .unwrap_or_else(|| PathBuf::from(".shoal/dev"))
}

/// Prints progress to stderr once a second until `done` turns true.
fn progress_bar(
    count: Arc<AtomicU64>,
    total: Option<u64>,
    duration: Option<Duration>,
    label: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = count.load(Ordering::Relaxed);
            let elapsed = start.elapsed().as_secs_f64();
            let fraction = match (total, duration) {
                (Some(t), _) if t > 0 => now as f64 / t as f64,
                (_, Some(d)) => elapsed / d.as_secs_f64(),
                _ => 0.0,
            }
            .min(1.0);
            let filled = (fraction * 30.0) as usize;
            eprint!(
                "\r{label:<8} [{}{}] {:>3.0}%  {:>9} ops  {:>8} ops/s   ",
                "#".repeat(filled),
                "-".repeat(30 - filled),
                fraction * 100.0,
                now,
                now - last
            );
            last = now;
        }
    })
}

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args = Args::parse();
    let mut rt = match args.generator_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if args.generator_threads > 1 {
        rt.worker_threads(usize::from(args.generator_threads));
    }
    let result = rt
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(args)));
    if let Err(e) = result {
        eprintln!("\nshoal-bench: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if !args.curves.is_empty() {
        let path = sweep::draw(&args.curves, &args.out)?;
        println!("plot: {}", path.display());
        return Ok(());
    }
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if args.rate.is_some_and(|r| !r.is_finite() || r <= 0.0) {
        bail!("--rate must be a positive number");
    }
    if let (Some(k), Some(r)) = (args.kill_at, args.restart_at) {
        if r <= k {
            bail!("--restart-at must come after --kill-at");
        }
    }
    let local = match args.local {
        Some(0) => bail!("--local needs at least one node"),
        Some(n) => {
            eprintln!("starting a local {n}-node Shoal cluster ...");
            Some(local::LocalCluster::start(n, args.fsync).await?)
        }
        None => None,
    };
    let spec = match (&local, &args.target) {
        (Some(l), _) => TargetSpec::Shoal(l.path().to_path_buf()),
        (None, Some(t)) => t.clone(),
        (None, None) => TargetSpec::Shoal(default_dev_dir()),
    };
    let options = RequestOptions {
        r: args.r,
        w: args.w,
        ..RequestOptions::default()
    };
    let target = Target::connect(&spec, options, args.updates).await?;
    let servers = match (&local, &spec) {
        (Some(l), _) => cpu::Servers::Group(l.handle.pgid()),
        _ if !args.server_process.is_empty() => cpu::Servers::Named(args.server_process.clone()),
        (None, TargetSpec::Shoal(_)) => cpu::Servers::Named(vec!["shoal".into()]),
        _ => cpu::Servers::Unknown,
    };
    let duration = match (args.duration, args.operations) {
        (None, None) => Some(Duration::from_secs(30)),
        (d, _) => d,
    };

    if !args.no_preload && matches!(args.workload, Workload::A | Workload::B | Workload::C) {
        let chooser = Arc::new(Chooser::new(
            Workload::Load,
            args.records,
            args.distribution,
            args.value_size,
        ));
        let count = Arc::new(AtomicU64::new(0));
        let bar = progress_bar(count.clone(), Some(args.records), None, "preload");
        let config = RunConfig {
            concurrency: args.concurrency,
            rate: None,
            operations: Some(args.records),
            duration: None,
        };
        let loaded = runner::run(&target, chooser, &config, count).await?;
        bar.abort();
        let errors: u64 = loaded.ops.values().map(|s| s.errors).sum();
        eprintln!(
            "\rpreloaded {} records in {:.1?} ({errors} errors){:40}",
            args.records, loaded.elapsed, ""
        );
        for (kind, n) in &loaded.error_kinds {
            eprintln!("preload errors: {n} x {kind}");
        }
    }

    if let Some(rates) = &args.sweep {
        let chooser = Arc::new(Chooser::new(
            args.workload,
            args.records,
            args.distribution,
            args.value_size,
        ));
        let step = args.duration.unwrap_or(Duration::from_secs(10));
        let steps = sweep::run(&target, chooser, rates, args.concurrency, step, &servers).await?;
        let mode = format!(
            "open loop sweep, {} workers, {step:.0?} per step",
            args.concurrency
        );
        println!("{}", header(&spec.name(), &args, &mode));
        print!("{}", sweep::table(&steps));
        let settings = json!({
            "workload": args.workload,
            "distribution": args.distribution,
            "records": args.records,
            "value_size": args.value_size,
            "updates": args.updates,
            "concurrency": args.concurrency,
            "step_secs": step.as_secs_f64(),
            "r": args.r,
            "w": args.w,
            "fsync": args.fsync,
        });
        let sweep = sweep::Sweep {
            target: spec.name(),
            settings,
            steps,
        };
        println!("report: {}", sweep::write(&args.out, &sweep)?.display());
        let path = sweep::draw(&[args.out.display().to_string()], &args.out)?;
        println!("plot: {}", path.display());
        drop(local);
        return Ok(());
    }

    let fault = match (&local, args.kill_at) {
        (Some(l), Some(kill_at)) => {
            let (node, restart_at) = (args.fault_node.clone(), args.restart_at);
            Some(tokio::spawn(fault_schedule(
                l.handle.clone(),
                node,
                kill_at,
                restart_at,
            )))
        }
        _ => None,
    };
    let growth = match (&local, args.grow_by) {
        (Some(l), Some(by)) if by > 0 => Some(tokio::spawn(grow::grow(
            l.handle.clone(),
            tokio::time::Instant::now(),
            args.grow_at,
            by,
            duration.unwrap_or(Duration::from_secs(60)) + Duration::from_secs(120),
        ))),
        _ => None,
    };
    let chooser = Arc::new(Chooser::new(
        args.workload,
        args.records,
        args.distribution,
        args.value_size,
    ));
    let config = RunConfig {
        concurrency: args.concurrency,
        rate: args.rate,
        operations: args.operations,
        duration,
    };
    let count = Arc::new(AtomicU64::new(0));
    let bar = progress_bar(count.clone(), args.operations, duration, "run");
    let before = cpu::Sample::now(&servers);
    let probe = host::Probe::start();
    let results = runner::run(&target, chooser, &config, count).await?;
    let ran = std::time::Instant::now();
    let cpu = before.until(&cpu::Sample::now(&servers), results.total(), &servers);
    // The run's clock started once its connections were open.
    let host = probe.finish(ran - results.elapsed, results.elapsed);
    bar.abort();
    eprintln!();
    if let Some(f) = fault {
        f.await?.context("fault injection")?;
    }
    let growth = match growth {
        Some(g) => Some(g.await?.context("growing the cluster")?),
        None => None,
    };

    let mode = match args.rate {
        Some(r) => format!("open loop at {r} ops/s, {} workers", args.concurrency),
        None => format!("closed loop, {} workers", args.concurrency),
    };
    println!(
        "{} | {:.1?}",
        header(&spec.name(), &args, &mode),
        results.elapsed
    );
    print!("{}", report::table(&results));
    if let Some(g) = &growth {
        print!("{}", grow::summary(g, &results));
    }
    println!("{}", cpu.line());
    if let Some(h) = &host {
        println!("{}", h.line());
    }
    if let Some(rate) = args.rate {
        let achieved = results.total() as f64 / results.elapsed.as_secs_f64();
        if results.fell_behind {
            println!(
                "FELL BEHIND: target {rate:.0} ops/s, achieved {achieved:.0} ops/s, operations started up to {:.1?} late; latencies above include that wait",
                results.max_lag
            );
        } else {
            println!("kept up: target {rate:.0} ops/s, achieved {achieved:.0} ops/s");
        }
    }
    let settings = json!({
        "target": spec.name(),
        "workload": args.workload,
        "distribution": args.distribution,
        "records": args.records,
        "value_size": args.value_size,
        "updates": args.updates,
        "concurrency": args.concurrency,
        "rate": args.rate,
        "operations": args.operations,
        "duration_secs": duration.map(|d| d.as_secs_f64()),
        "r": args.r,
        "w": args.w,
        "kill_at_secs": args.kill_at.map(|d| d.as_secs_f64()),
        "restart_at_secs": args.restart_at.map(|d| d.as_secs_f64()),
        "fault_node": args.kill_at.map(|_| args.fault_node.clone()),
        "growth": growth,
        "fsync": args.fsync,
    });
    let mut report = report::json_report(settings, &results);
    report["cpu"] = json!(cpu);
    report["host"] = json!(host);
    let path = report::write_json(&args.out, &report)?;
    println!("report: {}", path.display());
    let mut marks = Vec::new();
    if let Some(k) = args.kill_at {
        marks.push((k.as_secs_f64(), format!("KILL {}", args.fault_node)));
    }
    if let Some(r) = args.restart_at {
        marks.push((r.as_secs_f64(), format!("RESTART {}", args.fault_node)));
    }
    if let Some(g) = &growth {
        marks.push((g.committed_at_secs, format!("COMMIT +{}", g.nodes_added)));
        if let Some(s) = g.settled_at_secs {
            marks.push((s, "SETTLED".to_string()));
        }
    }
    for p in plot::write(&args.out, &results, &marks)? {
        println!("plot: {}", p.display());
    }
    drop(local);
    Ok(())
}

/// Kills `node` at `kill_at` after the run starts and restarts it at `restart_at`.
async fn fault_schedule(
    cluster: local::Handle,
    node: String,
    kill_at: Duration,
    restart_at: Option<Duration>,
) -> anyhow::Result<()> {
    let start = tokio::time::Instant::now();
    tokio::time::sleep_until(start + kill_at).await;
    cluster.kill9(&node).await?;
    eprintln!("\n[{:.1?}] killed {node} (kill -9)", start.elapsed());
    if let Some(at) = restart_at {
        tokio::time::sleep_until(start + at).await;
        cluster.restart(&node)?;
        eprintln!("\n[{:.1?}] restarted {node}", start.elapsed());
    }
    Ok(())
}

/// The first line of a run's output: target, workload, keys, values, mode.
fn header(target: &str, args: &Args, mode: &str) -> String {
    format!(
        "{target} | workload {:?} | {:?} keys over {} records | values {}..{} B | {} updates | {mode}",
        args.workload,
        args.distribution,
        args.records,
        args.value_size.min,
        args.value_size.max,
        match args.updates {
            Updates::Context => "context",
            Updates::Blind => "blind",
        },
    )
}
