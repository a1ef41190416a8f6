//! The deterministic simulation (see `shoal_tests::explore`): one seed gives
//! one trace, and a thousand seeds hold the oracle.
//!
//! Replay one seed: `SHOAL_SEED=123 cargo test -p shoal-tests --test explore
//! replay -- --nocapture`. More seeds: `SHOAL_SEEDS=0..5000` for
//! `explore_seeds`, or `cargo run -p shoal-tests --bin shoal-sim -- --seeds
//! 0..5000`.

use shoal_tests::explore::{run_range, run_seed, Options, ENVELOPE};

#[test]
fn same_seed_same_trace_hash() {
    for seed in [1, 2, 3] {
        let a = run_seed(seed, Options::default());
        let b = run_seed(seed, Options::default());
        println!("{}", a.summary());
        assert_eq!(
            (a.trace_hash, a.events),
            (b.trace_hash, b.events),
            "seed {seed} gave two traces"
        );
        assert!(a.ops >= 200, "{}", a.summary());
        assert!(a.faults.total() >= 5, "{}", a.summary());
    }
}

#[test]
fn replay() {
    let Some(seed) = std::env::var("SHOAL_SEED").ok() else {
        return;
    };
    let seed: u64 = seed.parse().expect("SHOAL_SEED is a number");
    let o = run_seed(
        seed,
        Options {
            trace_log: std::env::var("SHOAL_TRACE").is_ok(),
            ..Options::default()
        },
    );
    for line in &o.trace_log {
        println!("{line}");
    }
    println!("{}", o.summary());
    print!("{}", o.report);
}

/// At least the seeds of `SHOAL_SEEDS` (default 0..1000), then more in
/// blocks of 200 while the time spent is under `SHOAL_SIM_SECS` (default
/// 0: none; CI sets 300 to run as many as fit in five minutes).
#[test]
fn explore_seeds() {
    let range = std::env::var("SHOAL_SEEDS").unwrap_or_else(|_| "0..1000".into());
    let (a, b) = range.split_once("..").expect("SHOAL_SEEDS like 0..1000");
    let (first, mut end): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
    let budget = std::time::Duration::from_secs(
        std::env::var("SHOAL_SIM_SECS")
            .map_or(0, |s| s.parse().expect("SHOAL_SIM_SECS in seconds")),
    );
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("{ENVELOPE}");
    let started = std::time::Instant::now();
    let progress = |o: &shoal_tests::explore::Outcome, t: &shoal_tests::explore::Totals, _| {
        if o.failed() {
            println!("FAILED {}\n{}", o.summary(), o.report);
        }
        if t.seeds.is_multiple_of(100) {
            println!("progress: {}", t.line(started.elapsed()));
        }
    };
    let mut totals = run_range(first..end, jobs, Options::default(), progress);
    // Time per seed so far decides whether another block fits.
    while started.elapsed() + started.elapsed() / totals.seeds.max(1) as u32 * 200 < budget {
        let more = run_range(end..end + 200, jobs, Options::default(), progress);
        totals.merge(&more);
        end += 200;
    }
    println!("totals: {}", totals.line(started.elapsed()));
    println!(
        "failed seeds: {:?}; outside the envelope and failed: {:?}",
        totals.failed, totals.outside_failed
    );
    assert!(
        totals.min_ops >= 200 && totals.min_faults >= 5,
        "{totals:?}"
    );
    assert!(
        totals.failed.is_empty(),
        "failing seeds: {:?}",
        totals.failed
    );
}
