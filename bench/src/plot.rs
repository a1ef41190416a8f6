//! PNG plots of a run, drawn here with no font or graphics dependency: a
//! small raster canvas, a 5x7 bitmap font, and a PNG encoder over flate2.
//!
//! - `timeline.png`: throughput (ops/s) and p99 latency (ms) per second, one
//!   line per operation type, with fault times marked.
//! - `spectrum.png`: latency against percentile (50 .. 99.999), the
//!   percentile axis stretched towards the tail as HdrHistogram plots do.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::runner::Results;
use crate::workload::Op;

type Rgb = [u8; 3];
const WHITE: Rgb = [255, 255, 255];
const BLACK: Rgb = [0, 0, 0];
const GRID: Rgb = [225, 225, 225];
const RED: Rgb = [200, 40, 40];
const COLORS: [Rgb; 4] = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40]];

/// 5x7 glyphs, one byte per row, bit 4 the leftmost column.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        'A' => [14, 17, 17, 31, 17, 17, 17],
        'B' => [30, 17, 17, 30, 17, 17, 30],
        'C' => [14, 17, 16, 16, 16, 17, 14],
        'D' => [28, 18, 17, 17, 17, 18, 28],
        'E' => [31, 16, 16, 30, 16, 16, 31],
        'F' => [31, 16, 16, 30, 16, 16, 16],
        'G' => [14, 17, 16, 23, 17, 17, 15],
        'H' => [17, 17, 17, 31, 17, 17, 17],
        'I' => [14, 4, 4, 4, 4, 4, 14],
        'J' => [7, 2, 2, 2, 2, 18, 12],
        'K' => [17, 18, 20, 24, 20, 18, 17],
        'L' => [16, 16, 16, 16, 16, 16, 31],
        'M' => [17, 27, 21, 21, 17, 17, 17],
        'N' => [17, 17, 25, 21, 19, 17, 17],
        'O' => [14, 17, 17, 17, 17, 17, 14],
        'P' => [30, 17, 17, 30, 16, 16, 16],
        'Q' => [14, 17, 17, 17, 21, 18, 13],
        'R' => [30, 17, 17, 30, 20, 18, 17],
        'S' => [15, 16, 16, 14, 1, 1, 30],
        'T' => [31, 4, 4, 4, 4, 4, 4],
        'U' => [17, 17, 17, 17, 17, 17, 14],
        'V' => [17, 17, 17, 17, 17, 10, 4],
        'W' => [17, 17, 17, 21, 21, 21, 10],
        'X' => [17, 17, 10, 4, 10, 17, 17],
        'Y' => [17, 17, 17, 10, 4, 4, 4],
        'Z' => [31, 1, 2, 4, 8, 16, 31],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        ',' => [0, 0, 0, 0, 12, 4, 8],
        ':' => [0, 12, 12, 0, 12, 12, 0],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        '/' => [0, 1, 2, 4, 8, 16, 0],
        '%' => [24, 25, 2, 4, 8, 19, 3],
        '(' => [2, 4, 8, 8, 8, 4, 2],
        ')' => [8, 4, 2, 2, 2, 4, 8],
        '=' => [0, 0, 31, 0, 31, 0, 0],
        '+' => [0, 4, 4, 31, 4, 4, 0],
        _ => [0; 7],
    }
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<Rgb>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Canvas {
            w,
            h,
            px: vec![WHITE; w * h],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            self.px[y as usize * self.w + x as usize] = c;
        }
    }

    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb, thick: bool) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            if thick {
                self.set(x + 1, y, c);
                self.set(x, y + 1, c);
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text at (x, y) top-left, 2x scale: 12 px per character.
    fn text(&mut self, x: i64, y: i64, s: &str, c: Rgb) {
        for (i, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (16 >> col) != 0 {
                        for (ox, oy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            self.set(x + i as i64 * 12 + col * 2 + ox, y + row as i64 * 2 + oy, c);
                        }
                    }
                }
            }
        }
    }

    fn text_width(s: &str) -> i64 {
        s.chars().count() as i64 * 12
    }

    fn png(&self, path: &Path) -> anyhow::Result<()> {
        let mut raw = Vec::with_capacity(self.h * (1 + self.w * 3));
        for row in self.px.chunks(self.w) {
            raw.push(0); // filter: none
            for p in row {
                raw.extend_from_slice(p);
            }
        }
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&raw)?;
        let idat = z.finish()?;
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(self.w as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.h as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        for (kind, data) in [(&b"IHDR"[..], &ihdr[..]), (b"IDAT", &idat), (b"IEND", &[])] {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let mut crc = crc32fast::Hasher::new();
            crc.update(kind);
            crc.update(data);
            out.extend_from_slice(kind);
            out.extend_from_slice(data);
            out.extend_from_slice(&crc.finalize().to_be_bytes());
        }
        std::fs::write(path, out)?;
        Ok(())
    }
}

/// A round step giving about `n` ticks over `span`.
fn nice_step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let step = if norm < 1.5 {
        1.0
    } else if norm < 3.0 {
        2.0
    } else if norm < 7.0 {
        5.0
    } else {
        10.0
    };
    step * mag
}

fn label(v: f64) -> String {
    if v == 0.0 || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// One line of a panel.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

/// Draws a panel with axes, grid, ticks, series and a legend inside
/// `(x, y, w, h)`. `x_labels` maps an x value to its tick text.
#[allow(clippy::too_many_arguments)]
fn panel(
    c: &mut Canvas,
    (x, y, w, h): (i64, i64, i64, i64),
    title: &str,
    series: &[Series],
    x_range: (f64, f64),
    x_ticks: &[(f64, String)],
    marks: &[(f64, String)],
    log_y: bool,
) {
    let (left, bottom) = (x + 90, y + h - 40);
    let (right, top) = (x + w - 20, y + 40);
    let values = || series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let y_max = values().fold(0.0f64, f64::max).max(1e-9);
    // Linear: 0 to the largest value and a tenth; log: whole decades
    // around every positive value.
    let (y_lo, y_hi, y_ticks): (f64, f64, Vec<f64>) = if log_y {
        let y_min = values().filter(|v| *v > 0.0).fold(f64::INFINITY, f64::min);
        let lo = y_min.min(y_max).log10().floor();
        let hi = y_max.log10().ceil().max(lo + 1.0);
        let ticks = (lo as i32..=hi as i32).map(|e| 10f64.powi(e)).collect();
        (lo, hi, ticks)
    } else {
        let y_hi = y_max * 1.1;
        let step = nice_step(y_hi, 5.0);
        let ticks = (0..)
            .map(|i| i as f64 * step)
            .take_while(|t| *t <= y_hi)
            .collect();
        (0.0, y_hi, ticks)
    };
    let scale = |v: f64| if log_y { v.max(1e-12).log10() } else { v };
    let px_x = |v: f64| {
        left + ((v - x_range.0) / (x_range.1 - x_range.0).max(1e-9) * (right - left) as f64) as i64
    };
    let px_y = |v: f64| {
        bottom - ((scale(v) - y_lo) / (y_hi - y_lo).max(1e-9) * (bottom - top) as f64) as i64
    };
    c.text(
        x + (w - Canvas::text_width(title)) / 2,
        y + 10,
        title,
        BLACK,
    );
    for t in y_ticks {
        let py = px_y(t);
        c.line((left, py), (right, py), GRID, false);
        let l = label(t);
        c.text(left - 10 - Canvas::text_width(&l), py - 7, &l, BLACK);
    }
    for (v, l) in x_ticks {
        let px = px_x(*v);
        c.line((px, top), (px, bottom), GRID, false);
        c.text(px - Canvas::text_width(l) / 2, bottom + 8, l, BLACK);
    }
    for (v, l) in marks {
        let px = px_x(*v);
        c.line((px, top), (px, bottom), RED, true);
        c.text(px + 4, top + 4, l, RED);
    }
    c.line((left, top), (left, bottom), BLACK, false);
    c.line((left, bottom), (right, bottom), BLACK, false);
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        for pair in s.points.windows(2) {
            c.line(
                (px_x(pair[0].0), px_y(pair[0].1)),
                (px_x(pair[1].0), px_y(pair[1].1)),
                color,
                true,
            );
        }
        // Curves of a few measured steps (the log panels): each step marked.
        if log_y {
            for p in &s.points {
                let (px, py) = (px_x(p.0), px_y(p.1));
                for d in -3..=3 {
                    c.line((px - 3, py + d), (px + 3, py + d), color, false);
                }
            }
        }
        if let [only] = s.points.as_slice() {
            c.line(
                (px_x(only.0) - 3, px_y(only.1)),
                (px_x(only.0) + 3, px_y(only.1)),
                color,
                true,
            );
        }
        // Legend in the title row, right-aligned, clear of the plot area.
        let name_w = series
            .iter()
            .map(|s| Canvas::text_width(&s.name))
            .max()
            .unwrap_or(0);
        let lx = right - name_w - 40;
        let ly = y + 2 + i as i64 * 18;
        c.line((lx, ly + 7), (lx + 25, ly + 7), color, true);
        c.text(lx + 35, ly, &s.name, BLACK);
    }
}

/// One series per operation type over the seconds of `rows`, a point at
/// each second's middle where `f` of that second's value gives one.
fn series<T>(
    ops: &[Op],
    rows: &[BTreeMap<Op, T>],
    f: impl Fn(Option<&T>) -> Option<f64>,
) -> Vec<Series> {
    ops.iter()
        .map(|op| Series {
            name: op.name().to_string(),
            points: rows
                .iter()
                .enumerate()
                .filter_map(|(i, row)| f(row.get(op)).map(|y| (i as f64 + 0.5, y)))
                .collect(),
        })
        .collect()
}

/// Writes `timeline.png` and `spectrum.png` into `dir`; `marks` are labelled
/// instants of the run (faults), in seconds.
pub fn write(dir: &Path, r: &Results, marks: &[(f64, String)]) -> anyhow::Result<Vec<PathBuf>> {
    let ops: Vec<Op> = r.ops.keys().copied().collect();
    let secs = r.seconds.len().max(r.completed.len()).max(1) as f64;
    let step = nice_step(secs, 8.0).max(1.0);
    let x_ticks: Vec<(f64, String)> = (0..=(secs / step) as usize)
        .map(|i| (i as f64 * step, format!("{}s", i as f64 * step)))
        .collect();
    let mut timeline = Canvas::new(1200, 800);
    panel(
        &mut timeline,
        (0, 0, 1200, 400),
        "THROUGHPUT: OPERATIONS COMPLETED PER SECOND",
        &series(&ops, &r.completed, |n| Some(n.copied().unwrap_or(0) as f64)),
        (0.0, secs),
        &x_ticks,
        marks,
        false,
    );
    panel(
        &mut timeline,
        (0, 400, 1200, 400),
        "P99 LATENCY (MS), BY THE SECOND OPERATIONS WERE DUE",
        &series(&ops, &r.seconds, |s| {
            s.map(|s| s.latency.value_at_quantile(0.99) as f64 / 1000.0)
        }),
        (0.0, secs),
        &x_ticks,
        marks,
        false,
    );
    std::fs::create_dir_all(dir)?;
    let timeline_path = dir.join("timeline.png");
    timeline.png(&timeline_path)?;

    // Percentile spectrum: x = log10(1 / (1 - q)), so 90% is 1, 99% is 2 ...
    let qs: Vec<f64> = (0..=100)
        .map(|i| 1.0 - 0.5 * 10f64.powf(-(i as f64) * 0.04))
        .collect();
    let spectrum_series: Vec<Series> = r
        .ops
        .iter()
        .map(|(op, s)| Series {
            name: op.name().to_string(),
            points: qs
                .iter()
                .map(|q| {
                    (
                        -(1.0 - q).log10(),
                        s.latency.value_at_quantile(*q) as f64 / 1000.0,
                    )
                })
                .collect(),
        })
        .collect();
    let ticks: Vec<(f64, String)> = [
        (std::f64::consts::LOG10_2, "50%"),
        (1.0, "90%"),
        (2.0, "99%"),
        (3.0, "99.9%"),
        (4.0, "99.99%"),
    ]
    .iter()
    .map(|(x, l)| (*x, l.to_string()))
    .collect();
    let mut spectrum = Canvas::new(1200, 500);
    panel(
        &mut spectrum,
        (0, 0, 1200, 500),
        "LATENCY (MS) BY PERCENTILE",
        &spectrum_series,
        (std::f64::consts::LOG10_2, 4.3),
        &ticks,
        &[],
        false,
    );
    let spectrum_path = dir.join("spectrum.png");
    spectrum.png(&spectrum_path)?;
    Ok(vec![timeline_path, spectrum_path])
}

/// One target's latency-throughput curve: per sweep step, the achieved
/// throughput (ops/s) and the p50, p99 and p99.9 latency (ms).
pub struct Curve {
    pub name: String,
    pub points: Vec<(f64, [f64; 3])>,
}

/// Writes the latency-throughput curves of `curves` to `path`: three panels
/// (p50, p99, p99.9), latency on a log scale against achieved throughput,
/// one line per target.
pub fn curves(path: &Path, curves: &[Curve]) -> anyhow::Result<()> {
    let x_max = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.0))
        .fold(1.0f64, f64::max)
        * 1.05;
    let step = nice_step(x_max, 8.0);
    let x_ticks: Vec<(f64, String)> = (0..)
        .map(|i| i as f64 * step)
        .take_while(|v| *v <= x_max)
        .map(|v| (v, format!("{v:.0}")))
        .collect();
    let mut canvas = Canvas::new(1200, 1200);
    for (i, name) in ["P50", "P99", "P99.9"].iter().enumerate() {
        let series: Vec<Series> = curves
            .iter()
            .map(|c| Series {
                name: c.name.clone(),
                points: c.points.iter().map(|(x, l)| (*x, l[i])).collect(),
            })
            .collect();
        let top = i as i64 * 400;
        panel(
            &mut canvas,
            (0, top, 1200, 400),
            &format!("{name} LATENCY (MS, LOG) AGAINST ACHIEVED OPS/S"),
            &series,
            (0.0, x_max),
            &x_ticks,
            &[],
            true,
        );
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    canvas.png(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_valid_pngs_for_a_run() {
        let mut r = Results::default();
        let mut s = crate::runner::OpStats::default();
        for v in [100, 200, 5_000, 90_000] {
            s.latency.record(v).unwrap();
        }
        r.ops.insert(Op::Read, s.clone());
        r.seconds = vec![[(Op::Read, s.clone())].into(), [(Op::Read, s)].into()];
        r.completed = vec![[(Op::Read, 4)].into(), [(Op::Read, 4)].into()];
        let dir = tempfile::tempdir().unwrap();
        let paths = write(dir.path(), &r, &[(1.0, "KILL NODE2".into())]).unwrap();
        for p in paths {
            let bytes = std::fs::read(&p).unwrap();
            assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{}", p.display());
            assert!(bytes.ends_with(&[0xae, 0x42, 0x60, 0x82]), "IEND crc");
        }
    }

    #[test]
    fn writes_a_latency_throughput_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curves.png");
        let curve = |name: &str, k: f64| Curve {
            name: name.into(),
            points: (1..=5)
                .map(|i| {
                    (
                        i as f64 * 1000.0 * k,
                        [0.3 * i as f64, 1.0 * i as f64, 5.0 * i as f64],
                    )
                })
                .collect(),
        };
        curves(&path, &[curve("SHOAL", 2.0), curve("REDIS", 10.0)]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
    }

    #[test]
    fn nice_steps_are_round() {
        assert_eq!(nice_step(100.0, 5.0), 20.0);
        assert_eq!(nice_step(7.0, 8.0), 1.0);
        assert_eq!(nice_step(2800.0, 5.0), 500.0);
    }
}
