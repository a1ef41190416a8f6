//! `--sweep`: open-loop steps at rising rates up to saturation, one
//! latency-throughput point per step; `--curves` draws the sweeps of several
//! targets in one PNG.
//!
//! Each step runs the workload open loop at its rate for `--duration`,
//! latencies measured from each operation's due time. The sweep stops after
//! the first step that falls behind (achieved under 95% of the rate, or an
//! operation sent over 100 ms late): that step is the saturation point,
//! where latency turns up. The points are the achieved throughput and the
//! p50, p99 and p99.9 of every operation of the step (reads and updates
//! together), and the CPU per operation of the step.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::cpu::{self, CpuReport, Servers};
use crate::host::{HostReport, Probe};
use crate::plot::{self, Curve};
use crate::runner::{self, RunConfig};
use crate::target::Target;
use crate::workload::Chooser;

/// At most this many steps, whatever the spec says.
const MAX_STEPS: usize = 40;

/// The rates of a sweep: `FROM:STEP[:TO]` or a list `R1,R2,...`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rates(Vec<f64>);

impl std::str::FromStr for Rates {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let err =
            || format!("`{s}`: expected FROM:STEP[:TO] (ops/s) or a list R1,R2,..., all positive");
        let num = |t: &str| {
            t.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| *v > 0.0)
                .ok_or_else(err)
        };
        let rates: Vec<f64> = if s.contains(':') {
            let parts: Vec<&str> = s.split(':').collect();
            let (from, step) = match parts.as_slice() {
                [f, st] | [f, st, _] => (num(f)?, num(st)?),
                _ => return Err(err()),
            };
            let to = match parts.get(2) {
                Some(t) => num(t)?,
                None => f64::INFINITY,
            };
            (0..MAX_STEPS)
                .map(|i| from + step * i as f64)
                .take_while(|r| *r <= to)
                .collect()
        } else {
            s.split(',').map(num).collect::<Result<_, _>>()?
        };
        if rates.is_empty() || rates.windows(2).any(|w| w[1] <= w[0]) {
            return Err(err());
        }
        Ok(Rates(rates.into_iter().take(MAX_STEPS).collect()))
    }
}

/// One step of a sweep.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub rate: f64,
    pub achieved: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub errors: u64,
    pub fell_behind: bool,
    pub cpu: Option<CpuReport>,
    /// The host's speed during the step (older sweeps have none).
    #[serde(default)]
    pub host: Option<HostReport>,
}

/// What `sweep.json` holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct Sweep {
    pub target: String,
    pub settings: serde_json::Value,
    pub steps: Vec<Step>,
}

/// Runs the steps of `rates` against `target` until one falls behind.
pub async fn run(
    target: &Target,
    chooser: Arc<Chooser>,
    rates: &Rates,
    concurrency: usize,
    duration: Duration,
    servers: &Servers,
) -> anyhow::Result<Vec<Step>> {
    let mut steps = Vec::new();
    for &rate in &rates.0 {
        let config = RunConfig {
            concurrency,
            rate: Some(rate),
            operations: None,
            duration: Some(duration),
        };
        let before = cpu::Sample::now(servers);
        let probe = Probe::start();
        let r = runner::run(
            target,
            chooser.clone(),
            &config,
            Arc::new(AtomicU64::new(0)),
        )
        .await?;
        let ran = std::time::Instant::now();
        let cpu = before.until(&cpu::Sample::now(servers), r.total(), servers);
        // The step's clock started once its connections were open.
        let host = probe.finish(ran - r.elapsed, r.elapsed);
        let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
        let mut errors = 0;
        for s in r.ops.values() {
            all.add(&s.latency).expect("same bounds");
            errors += s.errors;
        }
        let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
        let step = Step {
            rate,
            achieved: r.total() as f64 / r.elapsed.as_secs_f64(),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            errors,
            fell_behind: r.fell_behind,
            cpu: Some(cpu),
            host,
        };
        eprintln!(
            "step {rate:>8.0} ops/s: achieved {:>8.0}, p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms{}",
            step.achieved,
            step.p50_ms,
            step.p99_ms,
            step.p999_ms,
            if step.fell_behind { ", FELL BEHIND" } else { "" }
        );
        let saturated = step.fell_behind;
        steps.push(step);
        if saturated {
            break;
        }
    }
    Ok(steps)
}

/// The table printed at the end of a sweep.
pub fn table(steps: &[Step]) -> String {
    let mut out = format!(
        "{:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>11} {:>11} {:>8}  {}\n",
        "rate",
        "achieved",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "errors",
        "servers us",
        "machine us",
        "host us",
        ""
    );
    for s in steps {
        let servers = s
            .cpu
            .as_ref()
            .and_then(|c| c.servers_us_per_op)
            .map_or("-".to_string(), |u| format!("{u:.1}"));
        let machine = s
            .cpu
            .as_ref()
            .map_or("-".to_string(), |c| format!("{:.1}", c.machine_us_per_op));
        let host = s
            .host
            .as_ref()
            .map_or("-".to_string(), |h| format!("{:.0}", h.unit_us_median));
        out.push_str(&format!(
            "{:>9.0} {:>9.0} {:>9.3} {:>9.3} {:>9.3} {:>7} {:>11} {:>11} {:>8}  {}\n",
            s.rate,
            s.achieved,
            s.p50_ms,
            s.p99_ms,
            s.p999_ms,
            s.errors,
            servers,
            machine,
            host,
            if s.fell_behind { "fell behind" } else { "" }
        ));
    }
    out
}

pub fn write(dir: &Path, sweep: &Sweep) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("sweep.json");
    std::fs::write(&path, serde_json::to_string_pretty(sweep)?)?;
    Ok(path)
}

/// The curve of one sweep, named `name` or else by its target's kind
/// (`shoal`, `redis`, `etcd`).
fn curve(sweep: &Sweep, name: Option<&str>) -> Curve {
    let name = name.map(str::to_string).unwrap_or_else(|| {
        sweep
            .target
            .split_whitespace()
            .next()
            .unwrap_or("?")
            .to_uppercase()
    });
    Curve {
        name,
        points: sweep
            .steps
            .iter()
            .map(|s| (s.achieved, [s.p50_ms, s.p99_ms, s.p999_ms]))
            .collect(),
    }
}

/// `--curves`: reads `sweep.json` from each of `dirs` (`DIR` or
/// `NAME=DIR`) and draws them in `out`/latency-throughput.png.
pub fn draw(dirs: &[String], out: &Path) -> anyhow::Result<PathBuf> {
    if dirs.is_empty() {
        bail!("--curves needs at least one directory holding a sweep.json");
    }
    let mut curves = Vec::new();
    for d in dirs {
        let (name, d) = match d.split_once('=') {
            Some((name, dir)) if !Path::new(d).is_dir() => (Some(name), Path::new(dir)),
            _ => (None, Path::new(d.as_str())),
        };
        let path = d.join("sweep.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {} (made by a --sweep run)", path.display()))?;
        let sweep: Sweep =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        curves.push(curve(&sweep, name));
    }
    let path = out.join("latency-throughput.png");
    plot::curves(&path, &curves)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_as_ranges_or_lists() {
        let r: Rates = "1000:1000:3000".parse().unwrap();
        assert_eq!(r.0, vec![1000.0, 2000.0, 3000.0]);
        let open: Rates = "5000:5000".parse().unwrap();
        assert_eq!(open.0.len(), MAX_STEPS);
        let list: Rates = "100,2000,30000".parse().unwrap();
        assert_eq!(list.0, vec![100.0, 2000.0, 30000.0]);
        for bad in ["", "0:100", "100:-5", "3000,2000", "a:b", "1:2:3:4"] {
            assert!(bad.parse::<Rates>().is_err(), "{bad}");
        }
    }
}
