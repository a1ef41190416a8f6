//! The chaos suite's CI run: a fixed seed, every fault kind, safety only
//! (nothing lost, vanished, unexpected or resurrected), and the checker
//! shown able to fail. The long run is `shoal-chaos --secs 600`.

use shoal_tests::chaos::{self, Settings};

/// Seed of the CI run; `shoal-chaos --seed 1 --secs 150` repeats it.
const SEED: u64 = 1;

#[test]
fn safety_holds_under_every_fault_kind() {
    let settings = Settings::new(SEED, 150);
    println!(
        "chaos run: seed {SEED}, {} s of faults",
        settings.fault_secs
    );
    let outcomes = chaos::run(settings).expect("chaos run");
    let dir = std::env::temp_dir().join(format!("shoal-chaos-ci-{}", std::process::id()));
    chaos::report::write(&outcomes, &dir).expect("report");
    let v = &outcomes.verdict;
    println!("{}", v.summary());
    println!(
        "convergence: {:?} ms after the final heal; {} faults; crashes: {}; delayed packets: {}; report in {}",
        outcomes.convergence_ms,
        outcomes.faults.len(),
        outcomes.crashes.len(),
        outcomes.delayed_packets,
        dir.display()
    );
    for c in &outcomes.crashes {
        println!("CRASH {c}");
    }
    assert!(v.safe(), "unsafe: {v:#?}");
    assert!(
        outcomes.unused_kinds.is_empty(),
        "fault kinds never injected: {:?}",
        outcomes.unused_kinds
    );
    assert!(
        outcomes.injected_lost_write_caught,
        "the checker missed an injected lost write"
    );
    assert!(
        v.counts.acknowledged_writes >= 500,
        "too few acknowledged writes for the run to mean anything: {}",
        v.counts.acknowledged_writes
    );
    assert!(
        outcomes.delayed_packets > 0,
        "the degraded links delayed no packet"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
