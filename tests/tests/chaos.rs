//! The chaos suite's CI run: a fixed seed, every fault kind, safety only
//! (nothing lost, vanished, unexpected or resurrected), and the checker
//! shown able to fail. The long run is `shoal-chaos --secs 600`.

use std::sync::Mutex;
use std::time::Duration;

use shoal_tests::chaos::cluster::ChaosCluster;
use shoal_tests::chaos::nemesis::Kind;
use shoal_tests::chaos::net::Host;
use shoal_tests::chaos::{self, Settings};
use shoal_tests::process::time_cli_commands;

/// The tests here each run five nodes; side by side on two cores they
/// would time each other out.
static SERIAL: Mutex<()> = Mutex::new(());

/// Seed of the CI run; `shoal-chaos --seed 1 --secs 150` repeats it.
const SEED: u64 = 1;

#[test]
fn safety_holds_under_every_fault_kind() {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
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
    let changes: Vec<_> = outcomes
        .faults
        .iter()
        .filter(|f| f.kind.is_membership())
        .collect();
    for f in &changes {
        println!(
            "{:?} {} from {} ms to {} ms",
            f.kind, f.target, f.start_ms, f.end_ms
        );
    }
    assert!(v.safe(), "unsafe: {v:#?}");
    // Not safety, but resurrection is judged on converged keys only, and
    // two minutes is ample.
    assert!(
        v.not_converged.is_empty(),
        "keys not converged two minutes after the final heal: {:?}",
        v.not_converged
    );
    assert!(
        outcomes.unused_kinds.is_empty(),
        "fault kinds never injected: {:?}",
        outcomes.unused_kinds
    );
    // Each kind of membership change went through (committed), not only
    // started.
    for kind in [Kind::Join, Kind::Leave, Kind::Remove] {
        assert!(
            changes
                .iter()
                .any(|f| f.kind == kind && f.target.contains("(layout")),
            "no {kind:?} committed: {changes:?}"
        );
    }
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

/// Acceptance 8 of issue 11 (the cut-off half; the paused half is in
/// `hostile.rs`): with one of five nodes cut off, every packet to and from
/// it dropped (clients included), CLI commands, each a fresh process, keep
/// answering quickly.
#[test]
fn cli_commands_stay_fast_with_a_node_cut_off() {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = ChaosCluster::start(5, 0, 2).expect("cluster");
    c.wait_serving(Duration::from_secs(60)).expect("serving");
    let dir = c.cli_dir().expect("cli dir");
    let run = |c: &ChaosCluster, args: &[&str]| {
        let out = c.cli(&dir, args).expect("run shoal");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for i in 0..20 {
        run(&c, &["put", &format!("key{i}"), "v"]);
    }
    let rest: Vec<Host> = (2..=5).map(Host::Node).chain([Host::Clients]).collect();
    c.lab
        .partition(&[Host::Node(1)], &rest)
        .expect("cut node1 off");
    c.wait_statuses("node1 seen down", Duration::from_secs(20), |all| {
        all.len() == 4
            && all
                .iter()
                .all(|s| s.peers.iter().any(|p| p.name == "node1" && !p.up))
    })
    .expect("node1 seen down");
    let took = time_cli_commands(|args| run(&c, args));
    let (p50, p99) = (took[100], took[198]);
    println!(
        "200 CLI commands with node1 cut off: p50 {p50:?}, p99 {p99:?}, max {:?}",
        took[199]
    );
    assert!(p99 < Duration::from_millis(300), "p99 {p99:?}");
}
