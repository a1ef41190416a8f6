//! Node configuration: TOML, kebab-case keys, every field defaulted except the
//! ones that identify the node, unknown keys refused, and [`Config::validate`]
//! naming the field at fault.
//!
//! Relative paths are resolved against the directory of the config file, so a
//! cluster directory can be moved as a whole.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config field `{field}` is invalid: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// A node's configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    /// The node's name: its TLS identity on the peer port and how operators
    /// refer to it. Its placement identity is the random id in its data dir.
    pub name: String,
    /// Where RocksDB and the node id live.
    pub data_dir: PathBuf,
    /// QUIC address for clients.
    pub client_addr: SocketAddr,
    /// QUIC address for other nodes (mutual TLS).
    pub peer_addr: SocketAddr,
    /// The failure domain this node is in (rack, room, availability zone):
    /// a key's replicas are spread over distinct zones. Unset: no zone.
    /// Takes effect for placement at the next committed layout change.
    pub zone: Option<String>,
    /// Sync the WAL on every write batch: survive power loss, at a latency cost.
    pub fsync: bool,
    /// Memtables on the machine's reserved huge pages: `"try"` uses them
    /// while free ones last if pages of 2 MiB are reserved
    /// (`vm.nr_hugepages`) and no cgroup of the node limits them when
    /// touched; `"off"` (the default) never. See the README's "Operating a
    /// cluster".
    pub huge_pages: HugePages,
    /// Worker threads serving requests; 0 means one per CPU core. Nodes that
    /// share a machine (`shoal dev`) should split its cores between them:
    /// more busy threads than cores only adds switching.
    pub threads: usize,
    pub tls: TlsConfig,
    pub cluster: ClusterConfig,
    pub limits: LimitsConfig,
    pub timeouts: TimeoutsConfig,
    pub failure_detector: FailureDetectorConfig,
    pub handoff: HandoffConfig,
    pub anti_entropy: AntiEntropyConfig,
    /// Prometheus `/metrics` over HTTP; off when unset.
    pub metrics_addr: Option<SocketAddr>,
}

/// Whether a node's memtables use the machine's reserved huge pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HugePages {
    /// While free ones last, where safe (else the node logs why not).
    Try,
    /// Never.
    #[default]
    Off,
}

/// The phi-accrual failure detector (see [`crate::detector`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct FailureDetectorConfig {
    /// How often every peer is pinged.
    pub heartbeat_ms: u64,
    /// Suspicion at which a peer is marked down.
    pub phi_threshold: f64,
    /// Silence tolerated on top of the usual heartbeat interval.
    pub acceptable_pause_ms: u64,
}

impl Default for FailureDetectorConfig {
    fn default() -> Self {
        FailureDetectorConfig {
            heartbeat_ms: 500,
            phi_threshold: 8.0,
            acceptable_pause_ms: 1000,
        }
    }
}

/// Hinted handoff (see [`crate::handoff`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct HandoffConfig {
    /// How often held hints are offered to primaries that are up.
    pub interval_ms: u64,
    /// Hints sent to a primary in one request.
    pub batch_size: usize,
    /// Most hints delivered per second, over all primaries.
    pub max_keys_per_sec: u32,
}

impl Default for HandoffConfig {
    fn default() -> Self {
        HandoffConfig {
            interval_ms: 1_000,
            batch_size: 200,
            max_keys_per_sec: 10_000,
        }
    }
}

/// The longest a request may take, whatever timeout a client asks for.
pub const MAX_REQUEST_MS: u64 = 60_000;

/// Anti-entropy (see [`crate::antientropy`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct AntiEntropyConfig {
    /// A sweep over every partition this node holds starts this often
    /// (later if the last sweep, or the reaper's slice after it, ran past
    /// it); its exchanges with each peer are spread over the first half.
    pub interval_ms: u64,
    /// Trees are rebuilt from the store this often (and on start).
    pub rebuild_secs: u64,
    /// Most keys a rebuild reads per second.
    pub rebuild_keys_per_sec: u32,
    /// Most keys the tombstone reaper reads per second. Low: a pass reads
    /// every key of the store and is never in a hurry (the grace is days),
    /// so it should take little from the requests it runs beside.
    pub reap_keys_per_sec: u32,
    /// Most keys an exchange repairs per second.
    pub max_repairs_per_sec: u32,
    /// A tombstone is reaped once every primary holds it and it is this old.
    /// Keep it longer than a node may stay down with hints waiting for it.
    pub tombstone_grace_secs: u64,
    /// Pause between two passes of the tombstone reaper.
    pub reap_interval_ms: u64,
}

impl Default for AntiEntropyConfig {
    fn default() -> Self {
        AntiEntropyConfig {
            interval_ms: 10_000,
            rebuild_secs: 86_400,
            rebuild_keys_per_sec: 50_000,
            reap_keys_per_sec: 5_000,
            max_repairs_per_sec: 5_000,
            tombstone_grace_secs: 7 * 86_400,
            reap_interval_ms: 3_600_000,
        }
    }
}

/// Certificates, all PEM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA: peers and clients must chain to it.
    pub ca_cert: PathBuf,
    /// This node's certificate, issued for its `name`.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Replication and the static member list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct ClusterConfig {
    /// Partitions Q: a power of two; fixed for the cluster's life.
    pub partitions: u32,
    /// Replicas per key.
    pub n: u32,
    /// Default read quorum.
    pub r: u32,
    /// Default write quorum.
    pub w: u32,
    /// Default number of primaries among R answers / W acknowledgements.
    pub pr: u32,
    pub pw: u32,
    /// Which replicas beyond the read quorum a read asks (see [`SpareReads`]).
    pub spare_reads: SpareReads,
    /// The founding members of a new cluster (this node may be listed too):
    /// the first ring is built once every one is identified. Later changes
    /// are committed by an operator (`shoal cluster plan` / `commit`) and
    /// spread by gossip; this list is then only where gossip starts.
    pub members: Vec<MemberConfig>,
    /// Members of an existing cluster to join through: a node with seeds
    /// and no committed layout announces itself to them and stages its own
    /// join, which an operator then commits. Exclusive with `members`.
    pub seeds: Vec<MemberConfig>,
    /// Pause between two gossip exchanges of the cluster state.
    pub gossip_ms: u64,
    /// Clock entries kept per key before the oldest unused ones are pruned.
    pub clock_max_entries: usize,
    /// Clock entries younger than this are never pruned. An entry's age
    /// counts from the last write that needed it (its own event, or a
    /// write that superseded its value or learned it from a context): a
    /// replica that misses a write must get it (by hint, read repair or
    /// anti-entropy) within this time, or a value the write superseded may
    /// come back there as a sibling.
    pub clock_min_age_secs: u64,
}

/// Which replicas a read asks beyond the R that make its quorum (the
/// spares: with N=3 and R=2, the third replica).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SpareReads {
    /// Every replica is asked, a spare a millisecond after the quorum's
    /// own sends (in a batch with others to the same node), and read
    /// repair reaches every primary that answered stale (Riak's way).
    #[default]
    Always,
    /// A spare is asked only when the quorum is slow: when one of its
    /// sends fails or a fallback answers for a primary that is down (as
    /// with `Always` then), or it has not answered within the spare delay
    /// (twice the fastest peer's mean answer time, at least 1 ms, at most
    /// a quarter of the read's budget and 250 ms). It still covers a replica
    /// that is slow or down, as a speculative retry does (Cassandra's
    /// way), and a read answered in time costs N-R replica reads less.
    /// Read repair then reaches the replicas that answered; the others are
    /// brought up to date by hinted handoff and anti-entropy.
    WhenSlow,
}

/// Another node, as this node first reaches it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MemberConfig {
    pub name: String,
    pub peer_addr: SocketAddr,
}

/// Size limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest value accepted; larger puts are refused before anything is written.
    pub max_value_bytes: usize,
    /// A client write that would leave a key with more siblings than this,
    /// or an object larger than `max_object_bytes`, is refused (nothing is
    /// written) unless it makes the object smaller: resolve the siblings
    /// by writing with the context of a read. Merges are never refused, so
    /// an object may exceed these after a partition heals.
    pub max_siblings: usize,
    pub max_object_bytes: usize,
    /// Client connections served at once; more are refused until some
    /// close. With `client-window-kb` and `client-request-budget-mb` this
    /// bounds the memory clients can make a node hold (see the README).
    pub max_client_connections: usize,
    /// Bytes a client may send on one connection before the node has read
    /// them (QUIC flow control), in KiB.
    pub client_window_kb: usize,
    /// Bytes of client requests the node holds at once, all connections
    /// together, in MiB: past it, streams wait before reading a request
    /// body, and QUIC flow control holds the clients back.
    pub client_request_budget_mb: usize,
    /// Memory for the cache of stored objects (MiB; 0 turns it off). Reads
    /// and the read half of every write are served from it when it holds
    /// the key; it is updated with every write, so it is never stale.
    pub object_cache_mb: usize,
}

/// Time budgets, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// Default budget of a client request on its coordinator.
    pub request_ms: u64,
    /// QUIC handshake budget towards a peer; after a failure the peer is not
    /// dialled again for `peer_backoff_ms`, so a dead node costs little.
    pub connect_ms: u64,
    pub peer_backoff_ms: u64,
    /// A connection with no traffic (keep-alives included) for this long is dead.
    pub idle_ms: u64,
    /// After answering a read, how long the coordinator still collects late
    /// replica answers to read-repair them.
    pub read_repair_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: String::new(),
            data_dir: PathBuf::from("data"),
            client_addr: "127.0.0.1:7400".parse().expect("literal"),
            peer_addr: "127.0.0.1:7500".parse().expect("literal"),
            zone: None,
            fsync: false,
            huge_pages: HugePages::Off,
            threads: 0,
            tls: TlsConfig::default(),
            cluster: ClusterConfig::default(),
            limits: LimitsConfig::default(),
            timeouts: TimeoutsConfig::default(),
            failure_detector: FailureDetectorConfig::default(),
            handoff: HandoffConfig::default(),
            anti_entropy: AntiEntropyConfig::default(),
            metrics_addr: None,
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            partitions: shoal_ring::DEFAULT_PARTITIONS,
            n: 3,
            r: 2,
            w: 2,
            pr: 0,
            pw: 0,
            spare_reads: SpareReads::Always,
            members: Vec::new(),
            seeds: Vec::new(),
            gossip_ms: 1_000,
            clock_max_entries: 50,
            clock_min_age_secs: 86_400,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_value_bytes: shoal_client::client::DEFAULT_MAX_VALUE_BYTES,
            max_siblings: 100,
            max_object_bytes: 64 << 20,
            max_client_connections: 1024,
            client_window_kb: 256,
            client_request_budget_mb: 256,
            object_cache_mb: 128,
        }
    }
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig {
            request_ms: 5_000,
            connect_ms: 1_000,
            peer_backoff_ms: 1_000,
            idle_ms: 10_000,
            read_repair_ms: 1_000,
        }
    }
}

impl Config {
    /// Reads, resolves relative paths and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.data_dir,
            &mut config.tls.ca_cert,
            &mut config.tls.cert,
            &mut config.tls.key,
        ] {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// The longest a message may stay in flight, in ms: sent before its
    /// request's deadline (the longest a request may ask for) or at the
    /// end of a read-repair window, and delivered before its connection
    /// idles out.
    pub fn in_flight_ms(&self) -> u64 {
        MAX_REQUEST_MS
            .saturating_add(self.timeouts.read_repair_ms)
            .saturating_add(self.timeouts.idle_ms)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, message: String| Err(ConfigError::Invalid { field, message });
        if self.name.is_empty() {
            return invalid("name", "must be set".into());
        }
        if rustls::pki_types::ServerName::try_from(self.name.as_str()).is_err() {
            return invalid(
                "name",
                format!(
                    "{:?} is not a valid DNS-style name (it is the TLS identity)",
                    self.name
                ),
            );
        }
        let c = &self.cluster;
        if !c.partitions.is_power_of_two() || c.partitions > 65536 {
            return invalid(
                "cluster.partitions",
                format!("{} is not a power of two up to 65536", c.partitions),
            );
        }
        if c.n == 0 {
            return invalid("cluster.n", "must be at least 1".into());
        }
        for (field, v) in [("cluster.r", c.r), ("cluster.w", c.w)] {
            if v == 0 || v > c.n {
                return invalid(field, format!("{v} must be between 1 and n ({})", c.n));
            }
        }
        if c.pr > c.r {
            return invalid("cluster.pr", format!("{} exceeds r ({})", c.pr, c.r));
        }
        if c.pw > c.w {
            return invalid("cluster.pw", format!("{} exceeds w ({})", c.pw, c.w));
        }
        let mut names: Vec<&str> = c.members.iter().map(|m| m.name.as_str()).collect();
        names.sort();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return invalid("cluster.members", format!("{} is listed twice", w[0]));
        }
        if !c.seeds.is_empty() && !c.members.is_empty() {
            return invalid(
                "cluster.seeds",
                "a node either founds a cluster (members) or joins one (seeds), not both".into(),
            );
        }
        if c.gossip_ms == 0 || c.gossip_ms > MAX_REQUEST_MS {
            return invalid(
                "cluster.gossip-ms",
                format!("must be between 1 and {MAX_REQUEST_MS}"),
            );
        }
        if let Some(zone) = &self.zone {
            if zone.is_empty() || zone.len() > 64 {
                return invalid("zone", "must be 1 to 64 bytes when set".into());
            }
        }
        if self.limits.object_cache_mb > 1 << 20 {
            return invalid(
                "limits.object-cache-mb",
                "must be at most 1048576 (1 TiB; 0 turns the cache off)".into(),
            );
        }
        if self.threads > 1024 {
            return invalid("threads", "must be at most 1024 (0: one per core)".into());
        }
        if self.limits.max_value_bytes == 0 || self.limits.max_value_bytes > 256 << 20 {
            return invalid(
                "limits.max-value-bytes",
                "must be between 1 and 268435456".into(),
            );
        }
        let l = &self.limits;
        // N concurrent writes of a largest value must always get in.
        let n = c.n as usize;
        if l.max_siblings < n || l.max_siblings > 100_000 {
            return invalid(
                "limits.max-siblings",
                format!("must be between cluster.n ({n}) and 100000"),
            );
        }
        let least = n * (l.max_value_bytes + (64 << 10));
        if l.max_object_bytes < least || l.max_object_bytes > 1 << 30 {
            return invalid(
                "limits.max-object-bytes",
                format!(
                    "must be between {least} (cluster.n values of limits.max-value-bytes) \
                     and 1073741824"
                ),
            );
        }
        if l.max_client_connections == 0 || l.max_client_connections > 1 << 20 {
            return invalid(
                "limits.max-client-connections",
                "must be between 1 and 1048576".into(),
            );
        }
        if l.client_window_kb < 64 || l.client_window_kb > 1 << 20 {
            return invalid(
                "limits.client-window-kb",
                "must be between 64 and 1048576".into(),
            );
        }
        // A largest request must fit in the budget, or it would wait forever.
        let request_mb = (l.max_value_bytes + (1 << 20)).div_ceil(1 << 20);
        if l.client_request_budget_mb < request_mb || l.client_request_budget_mb > 1 << 20 {
            return invalid(
                "limits.client-request-budget-mb",
                format!("must be between {request_mb} (a largest request) and 1048576"),
            );
        }
        for (field, v) in [
            ("timeouts.request-ms", self.timeouts.request_ms),
            ("timeouts.connect-ms", self.timeouts.connect_ms),
            ("timeouts.idle-ms", self.timeouts.idle_ms),
        ] {
            if v == 0 {
                return invalid(field, "must be positive".into());
            }
        }
        let fd = &self.failure_detector;
        if fd.heartbeat_ms == 0 {
            return invalid("failure-detector.heartbeat-ms", "must be positive".into());
        }
        if !(fd.phi_threshold.is_finite() && fd.phi_threshold > 0.0) {
            return invalid(
                "failure-detector.phi-threshold",
                format!("{} must be a positive number", fd.phi_threshold),
            );
        }
        let h = &self.handoff;
        for (field, v) in [
            ("handoff.interval-ms", h.interval_ms),
            ("handoff.batch-size", h.batch_size as u64),
            ("handoff.max-keys-per-sec", u64::from(h.max_keys_per_sec)),
            ("anti-entropy.interval-ms", self.anti_entropy.interval_ms),
            ("anti-entropy.rebuild-secs", self.anti_entropy.rebuild_secs),
            (
                "anti-entropy.reap-interval-ms",
                self.anti_entropy.reap_interval_ms,
            ),
            (
                "anti-entropy.rebuild-keys-per-sec",
                u64::from(self.anti_entropy.rebuild_keys_per_sec),
            ),
            (
                "anti-entropy.reap-keys-per-sec",
                u64::from(self.anti_entropy.reap_keys_per_sec),
            ),
            (
                "anti-entropy.max-repairs-per-sec",
                u64::from(self.anti_entropy.max_repairs_per_sec),
            ),
        ] {
            if v == 0 {
                return invalid(field, "must be positive".into());
            }
        }
        // A message older than the tombstone it races (a write's send to a
        // slow replica, a read repair) lives at most `in_flight_ms`.
        // Arriving after the reap it would bring the deleted value back.
        let in_flight_ms = self.in_flight_ms();
        let grace = self.anti_entropy.tombstone_grace_secs;
        if grace.saturating_mul(1000) < in_flight_ms {
            return invalid(
                "anti-entropy.tombstone-grace-secs",
                format!(
                    "{grace} s is shorter than a request may stay in flight ({} s: the \
                     longest request timeout, timeouts.read-repair-ms and timeouts.idle-ms), \
                     so a late write could bring a reaped value back; use at least {} s",
                    in_flight_ms.div_ceil(1000),
                    in_flight_ms.div_ceil(1000)
                ),
            );
        }
        for (field, p) in [
            ("tls.ca-cert", &self.tls.ca_cert),
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
        ] {
            if p.as_os_str().is_empty() {
                return invalid(field, "must be set".into());
            }
        }
        Ok(())
    }

    /// The member list including this node.
    pub fn all_members(&self) -> Vec<MemberConfig> {
        let mut members = self.cluster.members.clone();
        if !members.iter().any(|m| m.name == self.name) {
            members.push(MemberConfig {
                name: self.name.clone(),
                peer_addr: self.peer_addr,
            });
        }
        members
    }
}

#[cfg(test)]
mod tests;
