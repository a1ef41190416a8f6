//! How fast the host's cores ran during a run: a thread of the generator
//! does a fixed unit of work a few times a second and measures the CPU
//! time it took (its own thread's clock, so time spent waiting for a core
//! does not count, only how fast the core went while it had one).
//!
//! Why: on the shared 2-core bench machines the same work takes from 1x to
//! 4x as long from one minute to the next (other tenants of the host), and
//! the servers' throughput and tail follow it: in one compare run, the 14
//! seconds of workload a in which this unit took 143-213 us instead of its
//! usual 112 ran at 11.8-25.9k ops/s, the other 46 at 33.5k on average,
//! with the same build and no fault (bench/README.md, "Fourteenth look").
//! CPU per operation does not travel across such minutes either: a slower
//! core spends more time on the same operation. With the unit's time
//! beside every figure, two runs at the same load can be told to have met
//! the same host or not.
//!
//! The unit also pays for refilling its table after the run's own threads
//! evicted it from the core's caches between samples, so it rises with
//! the load on the machine (108 to 165 us between the 30k and 44k ops/s
//! steps of one sweep): compare it between runs at the same load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How often the unit is done: 5 times a second, about 120 us each, so
/// the probe takes under a thousandth of one core.
const EVERY: Duration = Duration::from_millis(200);

/// Words of the table the unit walks: 64 KiB, within a core's second-level
/// cache, so the unit measures mostly the core (its clock, and a sibling
/// hardware thread of another tenant's), not the memory. A 4 MiB walk was tried:
/// it also went 1.5x slower for 20 s of one run in which the servers' own
/// throughput held, while the seconds in which they slowed were slow by
/// both.
const TABLE_WORDS: usize = 1 << 14;

/// Steps of the walk per unit: about 120 us on the bench machine.
const STEPS: usize = 25_000;

/// The host's speed over a run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HostReport {
    /// CPU microseconds the unit took: the median over the run, its 10th
    /// and 90th percentiles.
    pub unit_us_median: f64,
    pub unit_us_p10: f64,
    pub unit_us_p90: f64,
    /// Units measured.
    pub samples: usize,
    /// Seconds of the run (from its start) whose median unit took over a
    /// quarter longer than the run's usual second (the 10th percentile of
    /// its seconds' medians).
    pub slow_seconds: usize,
    /// The median unit of each second of the run (`null` for a second with
    /// no sample).
    pub per_second_us: Vec<Option<f64>>,
}

/// The running probe; [`Probe::finish`] stops it.
pub struct Probe {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<(Instant, f64)>>>,
}

/// The CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A random cycle through every slot of the table (Sattolo's shuffle), so
/// that the walk's next address depends on the last load.
fn table() -> Vec<u32> {
    let mut next: Vec<u32> = (0..TABLE_WORDS as u32).collect();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for i in (1..TABLE_WORDS).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let j = (state % i as u64) as usize;
        next.swap(i, j);
    }
    next
}

/// The unit: [`STEPS`] dependent loads through the table, with some
/// arithmetic on each.
fn unit(table: &[u32], from: u32) -> u32 {
    let mut at = from;
    let mut mix = 0u32;
    for _ in 0..STEPS {
        at = table[at as usize];
        mix = mix.rotate_left(5) ^ at.wrapping_mul(0x9E37_79B9);
    }
    std::hint::black_box(mix);
    at
}

impl Probe {
    /// Starts probing.
    pub fn start() -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("host-probe".into())
            .spawn(move || {
                let table = table();
                let mut at = unit(&table, 0); // warm the table in
                let mut samples = Vec::new();
                while !stopped.load(Ordering::Relaxed) {
                    let when = Instant::now();
                    let begun = thread_cpu();
                    at = unit(&table, at);
                    let took = thread_cpu().saturating_sub(begun);
                    samples.push((when, took.as_secs_f64() * 1e6));
                    // Woken early by `finish`.
                    std::thread::park_timeout(EVERY);
                }
                samples
            })
            .ok();
        Probe { stop, thread }
    }

    /// Stops probing and sums up the samples taken within the run, which
    /// began at `run_start` and lasted `run`, by its seconds (so that
    /// second `i` is the run's own second `i`, as in its per-second
    /// series). `None` if the thread could not start or measured nothing
    /// within the run.
    pub fn finish(mut self, run_start: Instant, run: Duration) -> Option<HostReport> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take()?;
        thread.thread().unpark();
        let samples: Vec<(f64, f64)> = thread
            .join()
            .ok()?
            .into_iter()
            .filter(|(when, _)| *when >= run_start)
            .map(|(when, us)| (when.duration_since(run_start).as_secs_f64(), us))
            .filter(|(at, _)| *at < run.as_secs_f64())
            .collect();
        summarize(&samples)
    }
}

impl Drop for Probe {
    /// A probe dropped unfinished (a run that failed) stops at once.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = &self.thread {
            thread.thread().unpark();
        }
    }
}

/// The `q`-quantile of `sorted` (ascending, not empty).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Sums up `(seconds from the start, unit us)` samples.
fn summarize(samples: &[(f64, f64)]) -> Option<HostReport> {
    if samples.is_empty() {
        return None;
    }
    let mut all: Vec<f64> = samples.iter().map(|s| s.1).collect();
    all.sort_by(f64::total_cmp);
    let seconds = samples.iter().map(|s| s.0 as usize).max().unwrap_or(0) + 1;
    let mut by_second: Vec<Vec<f64>> = vec![Vec::new(); seconds];
    for &(at, us) in samples {
        by_second[at as usize].push(us);
    }
    let per_second_us: Vec<Option<f64>> = by_second
        .into_iter()
        .map(|mut v| {
            v.sort_by(f64::total_cmp);
            (!v.is_empty()).then(|| quantile(&v, 0.5))
        })
        .collect();
    // The run's usual speed: the 10th percentile of its seconds (not the
    // fastest, which one lucky second would set).
    let mut seconds_us: Vec<f64> = per_second_us.iter().flatten().copied().collect();
    seconds_us.sort_by(f64::total_cmp);
    let usual = quantile(&seconds_us, 0.1);
    let slow_seconds = seconds_us.iter().filter(|&&us| us > usual * 1.25).count();
    Some(HostReport {
        unit_us_median: quantile(&all, 0.5),
        unit_us_p10: quantile(&all, 0.1),
        unit_us_p90: quantile(&all, 0.9),
        samples: samples.len(),
        slow_seconds,
        per_second_us,
    })
}

impl HostReport {
    /// One line for the end of a run.
    pub fn line(&self) -> String {
        format!(
            "host: a fixed unit of work took {:.0} us of CPU (median; p10 {:.0}, p90 {:.0}); {} of {} seconds over a quarter slower than the usual",
            self.unit_us_median,
            self.unit_us_p10,
            self.unit_us_p90,
            self.slow_seconds,
            self.per_second_us.iter().flatten().count(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_summed_up_by_second() {
        let samples = [
            (0.1, 100.0),
            (0.5, 110.0),
            (0.9, 90.0),
            (1.2, 200.0),
            (1.4, 210.0),
            (3.0, 120.0),
            (3.5, 115.0),
        ];
        let r = summarize(&samples).unwrap();
        assert_eq!(
            r.per_second_us,
            vec![Some(100.0), Some(210.0), None, Some(120.0)]
        );
        // Second 1 took twice as long as second 0; second 3 a fifth longer
        // (of its two samples, the upper one counts: quantiles round up).
        assert_eq!(r.slow_seconds, 1);
        assert_eq!(r.samples, 7);
        assert_eq!(r.unit_us_median, 115.0);
        assert_eq!((r.unit_us_p10, r.unit_us_p90), (100.0, 200.0));
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn one_lucky_second_does_not_make_the_rest_slow() {
        let mut samples: Vec<(f64, f64)> = (0..20).map(|s| (s as f64, 100.0)).collect();
        samples.push((20.0, 50.0));
        samples.push((21.0, 130.0));
        let r = summarize(&samples).unwrap();
        assert_eq!(r.slow_seconds, 1, "{r:?}");
    }

    #[test]
    fn the_walk_visits_every_slot() {
        let t = table();
        let (mut at, mut steps) = (0u32, 0usize);
        loop {
            at = t[at as usize];
            steps += 1;
            if at == 0 {
                break;
            }
        }
        assert_eq!(steps, TABLE_WORDS, "one cycle through the whole table");
    }

    #[test]
    fn the_probe_measures_its_unit() {
        let probe = Probe::start();
        std::thread::sleep(Duration::from_millis(300));
        let run_start = Instant::now();
        std::thread::sleep(Duration::from_millis(450));
        // A run of 450 ms however late this thread woke (a loaded machine):
        // the probe samples at most every 200 ms, so at most 3 fall in it,
        // and at least one unless the probe's thread starved for 450 ms.
        let r = probe
            .finish(run_start, Duration::from_millis(450))
            .expect("samples");
        assert!(r.samples >= 1, "{r:?}");
        assert!(r.samples <= 3, "only the samples within the run: {r:?}");
        assert_eq!(r.per_second_us.len(), 1, "{r:?}");
        assert!(
            r.unit_us_median > 0.0 && r.unit_us_p10 <= r.unit_us_p90,
            "{r:?}"
        );
    }
}
