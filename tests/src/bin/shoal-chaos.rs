//! Runs the chaos suite (see `shoal_tests::chaos`) and writes its report.
//!
//! ```text
//! shoal-chaos [--seed N] [--secs 600] [--clients 16] [--keys 48] [--out chaos-report]
//! ```
//! Needs root (network namespaces, iptables, tmpfs mounts). Prints the seed
//! first, so any run can be repeated; writes `report.json`, `history.jsonl`,
//! `timeline.svg` and the node logs to `--out`; exits 1 if the checker found
//! a lost, vanished, unexpected or resurrected write, or keys whose replicas
//! did not converge.

use std::path::PathBuf;

use shoal_tests::chaos::{self, Settings};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut seed: u64 = rand::random::<u32>().into();
    let mut secs = 600;
    let mut out = PathBuf::from("chaos-report");
    let mut clients = None;
    let mut keys = None;
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--seed" => seed = value()?.parse()?,
            "--secs" => secs = value()?.parse()?,
            "--out" => out = value()?.into(),
            "--clients" => clients = Some(value()?.parse()?),
            "--keys" => keys = Some(value()?.parse()?),
            other => anyhow::bail!("unknown argument {other}; see the doc of shoal-chaos"),
        }
    }
    let mut settings = Settings::new(seed, secs);
    settings.clients = clients.unwrap_or(settings.clients);
    settings.keys = keys.unwrap_or(settings.keys);
    settings.logs_dir = Some(out.join("logs"));
    println!("shoal-chaos: seed {seed}, {secs} s of faults (repeat with --seed {seed})");
    let outcomes = chaos::run(settings)?;
    chaos::report::write(&outcomes, &out)?;
    println!("{}", outcomes.verdict.summary());
    println!(
        "convergence after the final heal: {}; faults: {}; unused kinds: {:?}; crashes: {}; delayed packets: {}; injected lost write caught: {}; wall {} s",
        outcomes
            .convergence_ms
            .map_or("not within the limit".to_string(), |ms| format!("{:.1} s", ms as f64 / 1000.0)),
        outcomes.faults.len(),
        outcomes.unused_kinds,
        outcomes.crashes.len(),
        outcomes.delayed_packets,
        outcomes.injected_lost_write_caught,
        outcomes.wall_secs
    );
    for c in &outcomes.crashes {
        println!("CRASH {c}");
    }
    for v in outcomes
        .verdict
        .lost
        .iter()
        .chain(&outcomes.verdict.vanished)
        .chain(&outcomes.verdict.unexpected)
        .chain(&outcomes.verdict.resurrected)
        .take(20)
    {
        println!("VIOLATION key {}: {}", v.key, v.detail);
    }
    println!("report: {}", out.join("report.json").display());
    if !outcomes.verdict.passed() {
        std::process::exit(1);
    }
    Ok(())
}
