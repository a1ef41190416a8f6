//! A chaos run written out: `report.json` (settings, counts, violations,
//! faults, convergence), `history.jsonl` (every operation) and
//! `timeline.svg` (operations per second, acknowledged and not, under the
//! faults that were active).

use std::fmt::Write as _;
use std::path::Path;

use super::history::Outcome;
use super::Outcomes;

pub fn write(outcomes: &Outcomes, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(outcomes)?,
    )?;
    let mut lines = String::new();
    for e in &outcomes.history {
        lines.push_str(&serde_json::to_string(e)?);
        lines.push('\n');
    }
    std::fs::write(dir.join("history.jsonl"), lines)?;
    std::fs::write(dir.join("timeline.svg"), timeline(outcomes))?;
    Ok(())
}

/// An SVG plot: per second, acknowledged operations (green) and operations
/// that failed or whose outcome is unknown (red), above one row per fault.
pub fn timeline(o: &Outcomes) -> String {
    let secs = (o.settings.fault_secs + 5).max(1) as usize;
    let mut ok = vec![0u32; secs];
    let mut bad = vec![0u32; secs];
    for e in &o.history {
        let s = (e.end_ms / 1000) as usize;
        if s < secs {
            match e.outcome {
                Outcome::Ok => ok[s] += 1,
                _ => bad[s] += 1,
            }
        }
    }
    let peak = ok
        .iter()
        .zip(&bad)
        .map(|(a, b)| a + b)
        .max()
        .unwrap_or(1)
        .max(1);
    let (left, width, plot_h, row_h) = (150.0, 1000.0, 240.0, 16.0);
    let x = |ms: f64| left + ms / 1000.0 / secs as f64 * width;
    let rows = o.faults.len() as f64;
    let height = plot_h + 40.0 + rows * row_h + 20.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="monospace" font-size="11">"#,
        left + width + 20.0
    );
    let _ = write!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = write!(
        svg,
        r#"<text x="10" y="14">seed {} · {} acknowledged · {} lost · {} unexpected · {} resurrected · converged {}</text>"#,
        o.settings.seed,
        o.verdict.counts.acknowledged,
        o.verdict.lost.len(),
        o.verdict.unexpected.len(),
        o.verdict.resurrected.len(),
        o.convergence_ms.map_or("no".to_string(), |ms| format!(
            "{:.1} s after the heal",
            ms as f64 / 1000.0
        ))
    );
    let _ = write!(svg, r#"<text x="10" y="40">ops/s (peak {peak})</text>"#);
    for s in 0..secs {
        let bx = x(s as f64 * 1000.0);
        let w = width / secs as f64;
        let hk = f64::from(ok[s]) / f64::from(peak) * (plot_h - 30.0);
        let hb = f64::from(bad[s]) / f64::from(peak) * (plot_h - 30.0);
        let base = plot_h;
        let _ = write!(
            svg,
            r##"<rect x="{bx:.1}" y="{:.1}" width="{w:.2}" height="{hk:.1}" fill="#3a3"/><rect x="{bx:.1}" y="{:.1}" width="{w:.2}" height="{hb:.1}" fill="#d33"/>"##,
            base - hk,
            base - hk - hb
        );
    }
    for t in (0..secs).step_by(30) {
        let tx = x(t as f64 * 1000.0);
        let _ = write!(
            svg,
            r##"<line x1="{tx:.1}" y1="30" x2="{tx:.1}" y2="{:.1}" stroke="#ccc"/><text x="{tx:.1}" y="{:.1}">{t}s</text>"##,
            height - 20.0,
            plot_h + 14.0
        );
    }
    for (i, f) in o.faults.iter().enumerate() {
        let y = plot_h + 30.0 + i as f64 * row_h;
        let end = if f.end_ms == 0 {
            secs as u64 * 1000
        } else {
            f.end_ms
        };
        let _ = write!(
            svg,
            r##"<text x="4" y="{:.1}">{:?}</text><rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="#58c" opacity="0.7"><title>{}</title></rect><text x="{:.1}" y="{:.1}" font-size="9">{}</text>"##,
            y + 11.0,
            f.kind,
            x(f.start_ms as f64),
            (x(end as f64) - x(f.start_ms as f64)).max(1.0),
            row_h - 3.0,
            escape(&f.target),
            x(end as f64) + 3.0,
            y + 11.0,
            escape(&f.target)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
