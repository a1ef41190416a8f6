//! Metrics: counters and latency histograms kept with atomics on the request
//! path, rendered as Prometheus text on `GET /metrics` over plain HTTP on the
//! configured `metrics-addr`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A latency histogram with fixed buckets.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let plain = labels.trim_end_matches(',');
        let plain = if plain.is_empty() {
            String::new()
        } else {
            format!("{{{plain}}}")
        };
        let _ = writeln!(out, "{name}_sum{plain} {sum}");
        let _ = writeln!(out, "{name}_count{plain} {cumulative}");
    }
}

/// Per-operation request metrics.
#[derive(Default)]
pub struct OpMetrics {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub quorum_failures: AtomicU64,
    pub latency: Histogram,
}

/// Every metric of a node.
#[derive(Default)]
pub struct Metrics {
    pub get: OpMetrics,
    pub put: OpMetrics,
    pub delete: OpMetrics,
    pub hints_stored: AtomicU64,
    pub hints_delivered: AtomicU64,
    pub hints_pending: AtomicU64,
    pub read_repairs: AtomicU64,
    /// Spares of reads not sent: the read had its quorum first
    /// (`cluster.spare-reads = "when-slow"`).
    pub spare_reads_skipped: AtomicU64,
    pub aae_rebuilds: AtomicU64,
    pub aae_rebuild_mismatches: AtomicU64,
    pub aae_exchanges: AtomicU64,
    pub tombstones_reaped: AtomicU64,
    pub aae_keys_repaired: AtomicU64,
    pub aae_bytes: AtomicU64,
    pub aae_exchange_latency: Histogram,
    /// Time to deliver one handoff batch (send until the primary stored it).
    pub handoff_batches: Histogram,
    /// Per-request tasks running (see [`crate::tasks`]).
    pub request_tasks: Arc<std::sync::atomic::AtomicUsize>,
    /// Records found failing their checksum, by tree (objects, hints, aae).
    pub corrupt_records: [AtomicU64; 3],
    /// Copies lost to corruption restored from every other primary.
    pub lost_restored: AtomicU64,
    /// Per peer name: currently up (1) or down (0), and transitions seen.
    pub peers: Mutex<BTreeMap<String, PeerMetric>>,
    /// Ownership transfer (see [`crate::transfer`]): the layout version in
    /// use, partitions still to pull, and what was pulled and dropped.
    pub ring_version: AtomicU64,
    pub transfer_pending: AtomicU64,
    pub transfer_partitions: AtomicU64,
    pub transfer_keys: AtomicU64,
    pub transfer_bytes: AtomicU64,
    pub keys_dropped: AtomicU64,
}

/// Liveness of one peer as this node sees it.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerMetric {
    pub up: bool,
    pub phi: f64,
    pub downs: u64,
    pub ups: u64,
}

impl Metrics {
    /// Counts a record of `tree` found failing its checksum.
    pub fn count_corrupt(&self, tree: crate::storage::Tree) {
        use crate::storage::Tree;
        let i = match tree {
            Tree::Objects => 0,
            Tree::Hints => 1,
            Tree::Aae | Tree::Meta => 2,
        };
        self.corrupt_records[i].fetch_add(1, Ordering::Relaxed);
    }
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let ops = [
            ("get", &self.get),
            ("put", &self.put),
            ("delete", &self.delete),
        ];
        for (name, help) in [
            (
                "shoal_requests_total",
                "Client requests coordinated, by operation.",
            ),
            (
                "shoal_request_errors_total",
                "Client requests that failed, by operation.",
            ),
            (
                "shoal_quorum_failures_total",
                "Client requests that did not reach their quorum.",
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (op, m) in ops {
                let v = match name {
                    "shoal_requests_total" => &m.requests,
                    "shoal_request_errors_total" => &m.errors,
                    _ => &m.quorum_failures,
                };
                let _ = writeln!(out, "{name}{{op=\"{op}\"}} {}", v.load(Ordering::Relaxed));
            }
        }
        let _ = writeln!(out, "# HELP shoal_request_duration_seconds Coordinator latency.\n# TYPE shoal_request_duration_seconds histogram");
        for (op, m) in ops {
            m.latency.render(
                &mut out,
                "shoal_request_duration_seconds",
                &format!("op=\"{op}\","),
            );
        }
        counter(
            &mut out,
            "shoal_hints_stored_total",
            "Hints written by this node as a fallback.",
            self.hints_stored.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "shoal_hints_delivered_total",
            "Hints handed off to their primary and deleted.",
            self.hints_delivered.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP shoal_ring_version Layout version of this node's ring (0: the static ring of its config).\n# TYPE shoal_ring_version gauge\nshoal_ring_version {}",
            self.ring_version.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP shoal_transfer_partitions_pending Partitions this node still has to pull for the layout in transition.\n# TYPE shoal_transfer_partitions_pending gauge\nshoal_transfer_partitions_pending {}",
            self.transfer_pending.load(Ordering::Relaxed)
        );
        for (name, help, v) in [
            (
                "shoal_transfer_partitions_total",
                "Partitions pulled from their old replicas.",
                &self.transfer_partitions,
            ),
            (
                "shoal_transfer_keys_total",
                "Keys repaired while pulling partitions.",
                &self.transfer_keys,
            ),
            (
                "shoal_transfer_bytes_total",
                "Bytes exchanged while pulling partitions.",
                &self.transfer_bytes,
            ),
            (
                "shoal_keys_dropped_total",
                "Copies dropped from partitions this node no longer replicates.",
                &self.keys_dropped,
            ),
        ] {
            counter(&mut out, name, help, v.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP shoal_hints_pending Hints waiting for their primary.\n# TYPE shoal_hints_pending gauge\nshoal_hints_pending {}",
            self.hints_pending.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP shoal_handoff_batch_duration_seconds Time to hand off one batch of hints.\n# TYPE shoal_handoff_batch_duration_seconds histogram");
        self.handoff_batches
            .render(&mut out, "shoal_handoff_batch_duration_seconds", "");
        for (name, help, v) in [
            (
                "shoal_aae_exchanges_total",
                "Anti-entropy exchanges this node initiated.",
                &self.aae_exchanges,
            ),
            (
                "shoal_aae_keys_repaired_total",
                "Keys repaired by anti-entropy exchanges.",
                &self.aae_keys_repaired,
            ),
            (
                "shoal_aae_bytes_total",
                "Bytes sent and received by anti-entropy exchanges.",
                &self.aae_bytes,
            ),
            (
                "shoal_aae_rebuilds_total",
                "Anti-entropy tree rebuilds.",
                &self.aae_rebuilds,
            ),
            (
                "shoal_aae_rebuild_mismatches_total",
                "Rebuilds whose trees differed from the live ones.",
                &self.aae_rebuild_mismatches,
            ),
        ] {
            counter(&mut out, name, help, v.load(Ordering::Relaxed));
        }
        let _ = writeln!(out, "# HELP shoal_aae_exchange_duration_seconds Time of one anti-entropy exchange.\n# TYPE shoal_aae_exchange_duration_seconds histogram");
        self.aae_exchange_latency
            .render(&mut out, "shoal_aae_exchange_duration_seconds", "");
        counter(
            &mut out,
            "shoal_read_repairs_total",
            "Replicas repaired after a read.",
            self.read_repairs.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "shoal_spare_reads_skipped_total",
            "Reads of a replica beyond the quorum not sent, the quorum having answered first (spare-reads = when-slow).",
            self.spare_reads_skipped.load(Ordering::Relaxed),
        );
        let _ = writeln!(out, "# HELP shoal_corrupt_records_total Stored records that failed their checksum (dropped, or skipped, and restored from replicas).\n# TYPE shoal_corrupt_records_total counter");
        for (tree, n) in ["objects", "hints", "aae"]
            .iter()
            .zip(&self.corrupt_records)
        {
            let _ = writeln!(
                out,
                "shoal_corrupt_records_total{{tree=\"{tree}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        counter(
            &mut out,
            "shoal_lost_copies_restored_total",
            "Copies lost to corruption restored from every other primary of their key.",
            self.lost_restored.load(Ordering::Relaxed),
        );
        let peers = self.peers.lock().expect("metrics lock");
        let _ = writeln!(out, "# HELP shoal_peer_up Whether this node considers the peer up.\n# TYPE shoal_peer_up gauge");
        for (name, p) in peers.iter() {
            let _ = writeln!(out, "shoal_peer_up{{peer=\"{name}\"}} {}", u8::from(p.up));
        }
        let _ = writeln!(out, "# HELP shoal_peer_phi Failure-detector suspicion of the peer.\n# TYPE shoal_peer_phi gauge");
        for (name, p) in peers.iter() {
            let _ = writeln!(
                out,
                "shoal_peer_phi{{peer=\"{name}\"}} {:.3}",
                p.phi.min(1e6)
            );
        }
        let _ = writeln!(out, "# HELP shoal_peer_transitions_total Up/down transitions of the peer.\n# TYPE shoal_peer_transitions_total counter");
        for (name, p) in peers.iter() {
            let _ = writeln!(
                out,
                "shoal_peer_transitions_total{{peer=\"{name}\",to=\"down\"}} {}",
                p.downs
            );
            let _ = writeln!(
                out,
                "shoal_peer_transitions_total{{peer=\"{name}\",to=\"up\"}} {}",
                p.ups
            );
        }
        let _ = writeln!(
            out,
            "# HELP shoal_request_tasks Per-request tasks running (sends to slow replicas, read repairs).\n# TYPE shoal_request_tasks gauge\nshoal_request_tasks {}",
            self.request_tasks.load(Ordering::Relaxed)
        );
        // Every task of the process: per-request tasks, background rounds,
        // connections. Flat under steady load; growth is a leak.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let _ = writeln!(
                out,
                "# HELP shoal_tasks_alive Tasks alive in the node's runtime.\n# TYPE shoal_tasks_alive gauge\nshoal_tasks_alive {}",
                runtime.metrics().num_alive_tasks()
            );
        }
        out
    }
}

/// Serves `GET /metrics` until `shutdown` turns true. Anything else gets 404.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (mut stream, _) = tokio::select! {
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            _ = shutdown.changed() => break,
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await
            else {
                return;
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if request.starts_with("GET /metrics ") {
                ("200 OK", metrics.render())
            } else {
                (
                    "404 Not Found",
                    "only GET /metrics is served here\n".to_string(),
                )
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
