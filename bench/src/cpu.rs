//! CPU per operation, the figure that travels between machines: busy time
//! read from /proc at the start and end of a run, for the servers under
//! test, for this load generator, and for the whole machine.
//!
//! - **Servers:** a local cluster's processes (its process group), or every
//!   process whose name (`/proc/PID/comm`) is one of `--server-process`
//!   (`redis-server`, `etcd`, `shoal`). A process that exits during the run
//!   counts only until its last sample here (none after a kill -9), one
//!   that starts during it from its start.
//! - **Generator:** this process (`/proc/self/stat`).
//! - **Machine:** user, nice, system, irq and softirq time of every core
//!   (`/proc/stat`); idle, iowait and the hypervisor's steal are not busy.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Which processes are the servers under test.
#[derive(Debug, Clone)]
pub enum Servers {
    /// Every process of this process group.
    Group(i32),
    /// Every process with one of these names.
    Named(Vec<String>),
    /// Not measured.
    Unknown,
}

/// Busy clock ticks at one instant.
#[derive(Debug, Clone)]
pub struct Sample {
    at: Instant,
    machine: u64,
    generator: u64,
    servers: BTreeMap<i32, u64>,
}

/// CPU over a run, per operation and in cores busy on average.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CpuReport {
    pub secs: f64,
    pub operations: u64,
    /// Cores of the machine.
    pub cores: usize,
    /// Server processes seen (`None`: servers not measured).
    pub server_processes: Option<usize>,
    pub servers_us_per_op: Option<f64>,
    pub servers_cores: Option<f64>,
    pub generator_us_per_op: f64,
    pub generator_cores: f64,
    pub machine_us_per_op: f64,
    pub machine_cores: f64,
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// `(process group, utime + stime)` from the text of `/proc/PID/stat`.
fn parse_stat(text: &str) -> Option<(i32, u64)> {
    // The name is in parentheses and may hold spaces or parentheses itself.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state, ppid, pgrp, ... utime (14th of the line), stime.
    let pgrp = fields.get(2)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((pgrp, utime + stime))
}

/// Busy ticks of every core, and the number of cores, from `/proc/stat`.
fn machine_busy(text: &str) -> Option<(u64, usize)> {
    let mut lines = text.lines();
    let total: Vec<u64> = lines
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy = [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| total.get(i).copied().unwrap_or(0))
        .sum();
    let cores = lines.take_while(|l| l.starts_with("cpu")).count().max(1);
    Some((busy, cores))
}

fn cores() -> usize {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| machine_busy(&t))
        .map_or(1, |(_, c)| c)
}

impl Servers {
    fn sample(&self) -> BTreeMap<i32, u64> {
        let mut out = BTreeMap::new();
        if matches!(self, Servers::Unknown) {
            return out;
        }
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return out;
        };
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some((pgrp, busy)) = parse_stat(&stat) else {
                continue;
            };
            let ours = match self {
                Servers::Group(g) => pgrp == *g,
                Servers::Named(names) => std::fs::read_to_string(entry.path().join("comm"))
                    .is_ok_and(|c| names.iter().any(|n| n == c.trim_end())),
                Servers::Unknown => false,
            };
            if ours {
                out.insert(pid, busy);
            }
        }
        out
    }
}

impl Sample {
    pub fn now(servers: &Servers) -> Sample {
        let generator = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|t| parse_stat(&t))
            .map_or(0, |(_, b)| b);
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| machine_busy(&t))
            .map_or(0, |(b, _)| b);
        Sample {
            at: Instant::now(),
            machine,
            generator,
            servers: servers.sample(),
        }
    }

    /// CPU from this sample to `end`, over `operations`.
    pub fn until(&self, end: &Sample, operations: u64, servers: &Servers) -> CpuReport {
        let hz = ticks_per_sec();
        let secs = end.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let ops = operations.max(1) as f64;
        let per_op = |ticks: u64| ticks as f64 / hz / ops * 1e6;
        let cores_busy = |ticks: u64| ticks as f64 / hz / secs;
        let server_ticks: u64 = end
            .servers
            .iter()
            .map(|(pid, t)| t.saturating_sub(self.servers.get(pid).copied().unwrap_or(0)))
            .sum();
        let measured = !matches!(servers, Servers::Unknown);
        let generator = end.generator.saturating_sub(self.generator);
        let machine = end.machine.saturating_sub(self.machine);
        CpuReport {
            secs,
            operations,
            cores: cores(),
            server_processes: measured.then_some(end.servers.len()),
            servers_us_per_op: measured.then(|| per_op(server_ticks)),
            servers_cores: measured.then(|| cores_busy(server_ticks)),
            generator_us_per_op: per_op(generator),
            generator_cores: cores_busy(generator),
            machine_us_per_op: per_op(machine),
            machine_cores: cores_busy(machine),
        }
    }
}

impl CpuReport {
    /// One line for the end of a run.
    pub fn line(&self) -> String {
        let servers = match (self.servers_us_per_op, self.servers_cores) {
            (Some(us), Some(c)) => format!(
                "servers {us:.1} us ({} processes, {c:.2} cores), ",
                self.server_processes.unwrap_or(0)
            ),
            _ => "servers not measured, ".to_string(),
        };
        format!(
            "CPU per operation: {servers}generator {:.1} us ({:.2} cores), machine {:.1} us ({:.2} of {} cores busy)",
            self.generator_us_per_op,
            self.generator_cores,
            self.machine_us_per_op,
            self.machine_cores,
            self.cores
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_process_stat_line_with_a_strange_name() {
        let line =
            "4242 (shoal (x) y) S 1 4240 4240 0 -1 4194560 1990 0 0 0 153 47 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_stat(line), Some((4240, 200)));
    }

    #[test]
    fn machine_busy_leaves_out_idle_iowait_and_steal() {
        let text = "cpu  10 1 5 1000 50 2 3 400 0 0\ncpu0 5 0 2 500 25 1 1 200 0 0\ncpu1 5 1 3 500 25 1 2 200 0 0\nintr 1\n";
        assert_eq!(machine_busy(text), Some((21, 2)));
    }

    #[test]
    fn this_process_is_measured() {
        let servers = Servers::Group(unsafe { libc::getpgrp() });
        let start = Sample::now(&servers);
        let mut x = 0u64;
        let t = Instant::now();
        while t.elapsed().as_millis() < 50 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let end = Sample::now(&servers);
        let r = start.until(&end, 10, &servers);
        assert!(r.server_processes.unwrap() >= 1, "{r:?}");
        assert!(r.secs >= 0.05 && x > 0);
    }
}
