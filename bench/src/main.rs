//! shoal-bench: the load generator and benchmark harness. The workloads,
//! modes and reports are the benchmark issue's work; until then this binary
//! only says so, so that nobody mistakes it for a measurement.

fn main() {
    eprintln!("shoal-bench: no workloads yet (they arrive with the benchmark issue)");
    std::process::exit(2);
}
