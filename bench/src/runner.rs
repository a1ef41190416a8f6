//! Drives the workers and records every latency.
//!
//! Closed loop: `concurrency` workers each issue their next operation as soon
//! as the last one returned; this finds the maximum throughput. Open loop:
//! operation `i` is due at `start + i / rate`; a worker takes the next due
//! operation and waits for its due time if it is early. An operation that
//! starts late because every worker was busy with a slow target is measured
//! from its due time, not from when it was sent, so a stall shows in the tail
//! (no coordinated omission); a target that cannot keep up is reported as
//! having fallen behind.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use rand::SeedableRng;
use tokio::time::Instant;

use crate::target::Target;
use crate::workload::{Chooser, Op};

/// Highest latency recorded, in microseconds (larger values are clamped).
const MAX_MICROS: u64 = 60_000_000;

/// How a run is driven and when it stops.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub concurrency: usize,
    /// Open loop at this many operations per second; closed loop if `None`.
    pub rate: Option<f64>,
    pub operations: Option<u64>,
    pub duration: Option<Duration>,
}

/// Latencies of one operation type.
#[derive(Clone)]
pub struct OpStats {
    pub latency: Histogram<u64>,
    pub errors: u64,
}

impl Default for OpStats {
    fn default() -> Self {
        OpStats::with_precision(3)
    }
}

impl OpStats {
    /// `digits` significant decimal digits: 3 for the run's totals; the
    /// per-second series (plotted) makes do with 2, a histogram a hundredth
    /// the size, so that a worker's new second costs no visible time.
    fn with_precision(digits: u8) -> Self {
        OpStats {
            latency: Histogram::new_with_bounds(1, MAX_MICROS, digits).expect("histogram bounds"),
            errors: 0,
        }
    }

    fn record(&mut self, micros: u64, ok: bool) {
        if ok {
            self.latency.saturating_record(micros.clamp(1, MAX_MICROS));
        } else {
            self.errors += 1;
        }
    }
}

/// Everything measured by a run.
#[derive(Clone, Default)]
pub struct Results {
    pub ops: BTreeMap<Op, OpStats>,
    /// Per second of the run in which operations were due (open loop) or
    /// started (closed loop), per operation type: their latencies.
    pub seconds: Vec<BTreeMap<Op, OpStats>>,
    /// Per second of the run, per operation type: operations that finished
    /// in it (the achieved throughput, which an overloaded open loop run
    /// shows falling short of the due rate).
    pub completed: Vec<BTreeMap<Op, u64>>,
    pub elapsed: Duration,
    /// Open loop: the largest delay between an operation's due time and its
    /// sending, and whether the run fell behind its target rate.
    pub max_lag: Duration,
    pub fell_behind: bool,
    /// Failed operations by kind: the error's message with its numbers
    /// blanked (`#`), at most [`MAX_ERROR_KINDS`] kinds.
    pub error_kinds: BTreeMap<String, u64>,
}

/// Kinds of error a run tells apart; the rest count as "(other)".
const MAX_ERROR_KINDS: usize = 16;

/// The latencies of a run (the whole run's and each second's), shared by
/// its workers: one set of histograms for the run, not one per worker.
/// 256 workers each allocating and zeroing their own (140 KB apiece) when
/// the run starts and at every second boundary stalled the generator for
/// milliseconds, which showed in the tail of every target.
#[derive(Default)]
struct Latencies(std::sync::Mutex<(PerOp, Vec<PerOp>)>);

/// One set of histograms, by operation.
type PerOp = BTreeMap<Op, OpStats>;

impl Latencies {
    fn record(&self, second: usize, op: Op, micros: u64, ok: bool) {
        let mut guard = self.0.lock().expect("latencies lock");
        let (ops, seconds) = &mut *guard;
        ops.entry(op).or_default().record(micros, ok);
        if seconds.len() <= second {
            seconds.resize_with(second + 1, BTreeMap::new);
        }
        seconds[second]
            .entry(op)
            .or_insert_with(|| OpStats::with_precision(2))
            .record(micros, ok);
    }
}

impl Results {
    fn complete(&mut self, second: usize, op: Op) {
        if self.completed.len() <= second {
            self.completed.resize_with(second + 1, BTreeMap::new);
        }
        *self.completed[second].entry(op).or_default() += 1;
    }

    fn add(&mut self, other: &Results) {
        if self.completed.len() < other.completed.len() {
            self.completed
                .resize_with(other.completed.len(), BTreeMap::new);
        }
        for (i, sec) in other.completed.iter().enumerate() {
            for (op, n) in sec {
                *self.completed[i].entry(*op).or_default() += n;
            }
        }
        self.max_lag = self.max_lag.max(other.max_lag);
        for (kind, n) in &other.error_kinds {
            self.count_error(kind.clone(), *n);
        }
    }

    /// Counts a failed operation under the kind of `error`.
    fn error(&mut self, error: &anyhow::Error) {
        let mut kind = String::new();
        for c in format!("{error:#}").chars().take(160) {
            match c {
                '0'..='9' if kind.ends_with('#') => {}
                '0'..='9' => kind.push('#'),
                c => kind.push(c),
            }
        }
        self.count_error(kind, 1);
    }

    fn count_error(&mut self, kind: String, n: u64) {
        let kind =
            if self.error_kinds.len() < MAX_ERROR_KINDS || self.error_kinds.contains_key(&kind) {
                kind
            } else {
                "(other)".to_string()
            };
        *self.error_kinds.entry(kind).or_default() += n;
    }

    pub fn total(&self) -> u64 {
        self.ops.values().map(|s| s.latency.len() + s.errors).sum()
    }
}

/// Runs the workload; `progress` counts finished operations as they finish.
pub async fn run(
    target: &Target,
    chooser: Arc<Chooser>,
    config: &RunConfig,
    progress: Arc<AtomicU64>,
) -> anyhow::Result<Results> {
    let next = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Latencies::default());
    // Every connection first: operations due while 256 connections open
    // would start late and count that wait.
    let mut conns = Vec::with_capacity(config.concurrency);
    for w in 0..config.concurrency {
        conns.push(target.conn(w).await?);
    }
    let start = Instant::now();
    let mut workers = Vec::with_capacity(config.concurrency);
    for mut conn in conns {
        let (chooser, config, next, progress, latencies) = (
            chooser.clone(),
            config.clone(),
            next.clone(),
            progress.clone(),
            latencies.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::from_entropy();
            let mut results = Results::default();
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if config.operations.is_some_and(|n| seq >= n) {
                    break;
                }
                let due = match config.rate {
                    Some(rate) => start + Duration::from_secs_f64(seq as f64 / rate),
                    None => Instant::now(),
                };
                // Stop at the end of the run: when it has come, or (open
                // loop) when the operation would be due after it.
                let end = due.max(Instant::now());
                if config
                    .duration
                    .is_some_and(|d| end.duration_since(start) >= d)
                {
                    break;
                }
                // Open loop: a worker that is early waits for the due time and
                // measures from when it woke (the timer's own slack, up to a
                // millisecond, is the harness's, not the target's); a worker
                // that is late because the target was slow measures from the
                // due time, so the stall counts.
                let begin = if config.rate.is_some() && Instant::now() < due {
                    tokio::time::sleep_until(due).await;
                    Instant::now()
                } else {
                    due
                };
                if config.rate.is_some() {
                    results.max_lag = results.max_lag.max(due.elapsed());
                }
                let (op, record) = chooser.op(seq, &mut rng);
                let key = crate::workload::key(record);
                let outcome = match op {
                    Op::Read => conn.read(&key).await,
                    Op::Update => {
                        let value = chooser.value(&mut rng);
                        conn.update(&key, &value).await
                    }
                };
                let micros = begin.elapsed().as_micros() as u64;
                let second = due.duration_since(start).as_secs() as usize;
                latencies.record(second, op, micros, outcome.is_ok());
                if let Err(e) = &outcome {
                    results.error(e);
                }
                results.complete(start.elapsed().as_secs() as usize, op);
                progress.fetch_add(1, Ordering::Relaxed);
            }
            results
        }));
    }
    let mut all = Results::default();
    for w in workers {
        all.add(&w.await?);
    }
    all.elapsed = start.elapsed();
    (all.ops, all.seconds) = std::mem::take(&mut *latencies.0.lock().expect("latencies lock"));
    if let Some(rate) = config.rate {
        let achieved = all.total() as f64 / all.elapsed.as_secs_f64();
        all.fell_behind = achieved < rate * 0.95 || all.max_lag > Duration::from_millis(100);
    }
    Ok(all)
}
