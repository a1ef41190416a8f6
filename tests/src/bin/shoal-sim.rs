//! Runs the deterministic simulation over a range of seeds, or replays one.
//!
//! ```text
//! shoal-sim --seeds 0..1000 [--jobs 2] [--power-loss-percent 20] [--any-reply-context]
//!           [--pruning-percent 20] [--corruption-percent 50] [--membership-percent 30]
//!           [--spare-reads-percent 30]
//! shoal-sim --seed 123 --verbose        # replay: summary, report, trace
//! ```
//! Prints a progress line, every failing seed with its report, and a final
//! totals line (`TOTALS ...`), so a long run can be done in pieces and summed.

use std::time::Duration;

use shoal_tests::explore::{run_range, run_seed, Options, ENVELOPE};

const USAGE: &str = "\
shoal-sim --seeds 0..1000 [--jobs 2] [--power-loss-percent 20] [--any-reply-context]
          [--pruning-percent 20] [--corruption-percent 50] [--membership-percent 30]
          [--spare-reads-percent 30]
shoal-sim --seed 123 [--verbose]        # replay one seed: summary, report (and trace)";

fn parse_range(s: &str) -> anyhow::Result<std::ops::Range<u64>> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| anyhow::anyhow!("--seeds wants a range like 0..1000, got {s}"))?;
    Ok(a.parse()?..b.parse()?)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut seeds = 0..1000u64;
    let mut one: Option<u64> = None;
    let mut verbose = false;
    let mut jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut options = Options::default();
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--seeds" => seeds = parse_range(&value()?)?,
            "--seed" => one = Some(value()?.parse()?),
            "--jobs" => jobs = value()?.parse()?,
            "--power-loss-percent" => options.power_loss_percent = value()?.parse()?,
            "--verbose" => verbose = true,
            "--any-reply-context" => options.any_reply_context = true,
            "--pruning-percent" => options.pruning_percent = value()?.parse()?,
            "--corruption-percent" => options.corruption_percent = value()?.parse()?,
            "--membership-percent" => options.membership_percent = value()?.parse()?,
            "--spare-reads-percent" => options.spare_reads_percent = value()?.parse()?,
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other}; usage:\n{USAGE}"),
        }
    }
    if let Some(seed) = one {
        options.trace_log = verbose;
        let o = run_seed(seed, options);
        if verbose {
            for line in &o.trace_log {
                println!("{line}");
            }
        }
        println!("{}", o.summary());
        print!("{}", o.report);
        if o.failed() && o.outside.is_none() {
            std::process::exit(1);
        }
        return Ok(());
    }
    println!("{ENVELOPE}");
    let every = Duration::from_secs(5);
    let started = std::time::Instant::now();
    let last = std::sync::Mutex::new(Duration::ZERO);
    let totals = run_range(seeds.clone(), jobs, options, |o, t, elapsed| {
        if o.failed() {
            println!("FAILED {}\n{}", o.summary(), o.report);
        }
        let mut last = last.lock().unwrap();
        if elapsed - *last >= every {
            *last = elapsed;
            println!("progress: {}", t.line(elapsed));
        }
    });
    println!(
        "TOTALS seeds {}..{}: {}",
        seeds.start,
        seeds.end,
        totals.line(started.elapsed())
    );
    println!("failed seeds (inside the envelope): {:?}", totals.failed);
    println!(
        "failed seeds (outside the envelope): {:?}",
        totals.outside_failed
    );
    if !totals.failed.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
