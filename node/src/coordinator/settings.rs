//! The node's settings, from the config: one struct the facade splits into
//! what each component needs.

use std::time::Duration;

use crate::antientropy::AaeSettings;
use crate::clock::Clock;
use crate::config::SpareReads;
use crate::detector::DetectorConfig;
use crate::handoff::HandoffSettings;
use crate::replica::ReplicaSettings;
use crate::version::ContextKey;

/// The coordinator's settings, from the config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub n: u32,
    pub r: u32,
    pub w: u32,
    pub pr: u32,
    pub pw: u32,
    pub spare_reads: SpareReads,
    pub max_value_bytes: usize,
    /// Admission limits of client writes (see [`crate::replica::Replica::write`]).
    pub max_siblings: usize,
    pub max_object_bytes: usize,
    pub request_timeout: Duration,
    /// Pause between two gossip exchanges of the cluster state.
    pub gossip: Duration,
    /// How long after dropping copies it no longer replicates a node drops
    /// them again: longer than a request routed before may still deliver
    /// (`timeouts.request-ms` and the read-repair window; a client asking a
    /// longer timeout may leave a late copy, which the next pass drops:
    /// see [`crate::transfer`]).
    pub cleanup_linger: Duration,
    pub clock_max_entries: usize,
    pub clock_min_age_ms: u64,
    pub detector: DetectorConfig,
    pub handoff: HandoffSettings,
    pub aae: AaeSettings,
    /// How long after a read's reply late answers are still read-repaired.
    pub read_repair_window: Duration,
    /// Memory for the object cache (see [`crate::replica::stripe`]); 0
    /// turns it off.
    pub object_cache_bytes: usize,
    /// Wall-clock time for stored timestamps (see [`crate::clock`]).
    pub clock: Clock,
    /// Seals the causal contexts clients get (see [`crate::version::ContextKey`]).
    pub context_key: ContextKey,
}

impl Settings {
    /// `context_key` is the cluster's, from the node's key file.
    pub fn from_config(c: &crate::config::Config, context_key: ContextKey) -> Self {
        Settings {
            n: c.cluster.n,
            r: c.cluster.r,
            w: c.cluster.w,
            pr: c.cluster.pr,
            pw: c.cluster.pw,
            spare_reads: c.cluster.spare_reads,
            max_value_bytes: c.limits.max_value_bytes,
            max_siblings: c.limits.max_siblings,
            max_object_bytes: c.limits.max_object_bytes,
            request_timeout: Duration::from_millis(c.timeouts.request_ms),
            gossip: Duration::from_millis(c.cluster.gossip_ms),
            cleanup_linger: Duration::from_millis(
                c.timeouts.request_ms + c.timeouts.read_repair_ms + 1_000,
            ),
            clock_max_entries: c.cluster.clock_max_entries,
            clock_min_age_ms: c.cluster.clock_min_age_secs.saturating_mul(1000),
            detector: DetectorConfig {
                heartbeat: Duration::from_millis(c.failure_detector.heartbeat_ms),
                threshold: c.failure_detector.phi_threshold,
                acceptable_pause: Duration::from_millis(c.failure_detector.acceptable_pause_ms),
                ..DetectorConfig::default()
            },
            handoff: HandoffSettings {
                interval: Duration::from_millis(c.handoff.interval_ms),
                batch_size: c.handoff.batch_size,
                max_keys_per_sec: c.handoff.max_keys_per_sec,
                call_timeout: Duration::from_millis(c.timeouts.request_ms),
            },
            aae: AaeSettings::from_config(c),
            read_repair_window: Duration::from_millis(c.timeouts.read_repair_ms),
            object_cache_bytes: c.limits.object_cache_mb << 20,
            clock: Clock::system(),
            context_key,
        }
    }
}

impl Settings {
    /// What the replica needs of these.
    pub fn replica(&self) -> ReplicaSettings {
        ReplicaSettings {
            clock_max_entries: self.clock_max_entries,
            clock_min_age_ms: self.clock_min_age_ms,
            tombstone_grace: self.aae.tombstone_grace,
            reap_fence: self.aae.reap_fence,
            object_cache_bytes: self.object_cache_bytes,
            max_siblings: self.max_siblings,
            max_object_bytes: self.max_object_bytes,
            clock: self.clock.clone(),
        }
    }
}
