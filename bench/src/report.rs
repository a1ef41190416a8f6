//! The end-of-run table and the JSON report.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::runner::{OpStats, Results};
use crate::workload::Op;

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

fn op_json(s: &OpStats, elapsed: Duration) -> Value {
    let h = &s.latency;
    json!({
        "count": h.len(),
        "errors": s.errors,
        "ops_per_sec": h.len() as f64 / elapsed.as_secs_f64(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
    })
}

/// The table printed at the end of a run.
pub fn table(r: &Results) -> String {
    let mut out = format!(
        "{:<8} {:>10} {:>8} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "op", "count", "errors", "ops/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
    );
    let mut all = OpStats::default();
    for (op, s) in &r.ops {
        out.push_str(&row(op.name(), s, r.elapsed));
        all.latency.add(&s.latency).expect("same bounds");
        all.errors += s.errors;
    }
    if r.ops.len() > 1 {
        out.push_str(&row("total", &all, r.elapsed));
    }
    for (kind, n) in &r.error_kinds {
        out.push_str(&format!("errors: {n} x {kind}\n"));
    }
    out
}

fn row(name: &str, s: &OpStats, elapsed: Duration) -> String {
    let h = &s.latency;
    format!(
        "{:<8} {:>10} {:>8} {:>10.0} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}\n",
        name,
        h.len(),
        s.errors,
        h.len() as f64 / elapsed.as_secs_f64(),
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.90)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
    )
}

/// One entry per second of `rows`: `{"second": i, "ops": {op: f(value)}}`.
fn per_second<T>(rows: &[BTreeMap<Op, T>], f: impl Fn(&T) -> Value) -> Vec<Value> {
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let per_op: serde_json::Map<String, Value> = row
                .iter()
                .map(|(op, v)| (op.name().to_string(), f(v)))
                .collect();
            json!({"second": i, "ops": per_op})
        })
        .collect()
}

/// The whole run as JSON: settings, per-operation summaries, the per-second
/// series (`seconds`: latencies by the second operations were due;
/// `completed`: operations finished in each second) and the latency
/// percentile spectrum.
pub fn json_report(settings: Value, r: &Results) -> Value {
    let ops: serde_json::Map<String, Value> = r
        .ops
        .iter()
        .map(|(op, s)| (op.name().to_string(), op_json(s, r.elapsed)))
        .collect();
    let seconds = per_second(&r.seconds, |s| op_json(s, Duration::from_secs(1)));
    let completed = per_second(&r.completed, |n| json!(n));
    let spectrum: serde_json::Map<String, Value> = r
        .ops
        .iter()
        .map(|(op, s)| {
            let points: Vec<Value> = [0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999, 1.0]
                .iter()
                .map(|q| json!({"quantile": q, "ms": ms(s.latency.value_at_quantile(*q))}))
                .collect();
            (op.name().to_string(), Value::Array(points))
        })
        .collect();
    json!({
        "settings": settings,
        "elapsed_secs": r.elapsed.as_secs_f64(),
        "fell_behind": r.fell_behind,
        "max_lag_ms": r.max_lag.as_secs_f64() * 1000.0,
        "ops": ops,
        "error_kinds": r.error_kinds,
        "seconds": seconds,
        "completed": completed,
        "spectrum": spectrum,
    })
}

pub fn write_json(dir: &Path, report: &Value) -> anyhow::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(report)?)?;
    Ok(path)
}
