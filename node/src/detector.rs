//! The phi-accrual failure detector (Hayashibara et al., as used by Akka and
//! Cassandra). Pure: the caller passes the time, so tests are deterministic.
//!
//! Each peer's heartbeat inter-arrival times are kept in a sliding window.
//! `phi(t)` is `-log10` of the probability that a heartbeat arrives later than
//! `t` after the last one, under a normal distribution fitted to the window
//! (mean plus an acceptable pause, standard deviation at least a floor). A peer
//! is down while phi is at or above the threshold, and up again with the next
//! heartbeat. With the defaults (heartbeat every 500 ms, 1 s acceptable pause,
//! 200 ms deviation floor, threshold 8) a silent peer is marked down about
//! 2.4 s after its last heartbeat: [`DetectorConfig::detection_time`].

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use shoal_ring::NodeId;

/// Tuning of the detector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectorConfig {
    pub heartbeat: Duration,
    pub threshold: f64,
    pub acceptable_pause: Duration,
    pub min_std_dev: Duration,
    /// Inter-arrival samples kept per peer.
    pub window: usize,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            heartbeat: Duration::from_millis(500),
            threshold: 8.0,
            acceptable_pause: Duration::from_millis(1000),
            min_std_dev: Duration::from_millis(200),
            window: 100,
        }
    }
}

impl DetectorConfig {
    /// Silence after which a peer with perfectly regular heartbeats is marked
    /// down.
    pub fn detection_time(&self) -> Duration {
        let mut lo = 0.0f64;
        let mut hi = 3_600_000.0f64;
        let history = History::regular(self);
        for _ in 0..60 {
            let mid = (lo + hi) / 2.0;
            if history.phi(mid, self) >= self.threshold {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Duration::from_millis(hi.ceil() as u64)
    }
}

/// Heartbeat history of one peer.
#[derive(Debug, Clone)]
struct History {
    intervals_ms: VecDeque<f64>,
    last: Option<Instant>,
}

impl History {
    /// A history seeded with one expected interval, so a peer never heard from
    /// is judged against the configured heartbeat rather than not at all.
    fn regular(config: &DetectorConfig) -> Self {
        History {
            intervals_ms: VecDeque::from([config.heartbeat.as_secs_f64() * 1000.0]),
            last: None,
        }
    }

    fn phi(&self, since_last_ms: f64, config: &DetectorConfig) -> f64 {
        let n = self.intervals_ms.len() as f64;
        let mean = self.intervals_ms.iter().sum::<f64>() / n;
        let var = self
            .intervals_ms
            .iter()
            .map(|x| (x - mean).powi(2))
            .sum::<f64>()
            / n;
        let std = var.sqrt().max(config.min_std_dev.as_secs_f64() * 1000.0);
        let mean = mean + config.acceptable_pause.as_secs_f64() * 1000.0;
        // Logistic approximation of the normal CDF's tail (as in Akka).
        let y = (since_last_ms - mean) / std;
        let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
        let p_later = if since_last_ms > mean {
            e / (1.0 + e)
        } else {
            1.0 - 1.0 / (1.0 + e)
        };
        -p_later.max(f64::MIN_POSITIVE).log10()
    }
}

/// A change of a peer's state, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub peer: NodeId,
    pub up: bool,
}

#[derive(Debug, Clone)]
struct Peer {
    history: History,
    up: bool,
    /// When watching started: a peer never heard from is measured from here.
    since: Instant,
}

/// Liveness of every peer.
#[derive(Debug, Clone)]
pub struct FailureDetector {
    config: DetectorConfig,
    peers: HashMap<NodeId, Peer>,
}

impl FailureDetector {
    pub fn new(config: DetectorConfig) -> Self {
        FailureDetector {
            config,
            peers: HashMap::new(),
        }
    }

    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    /// Starts watching `peer` (up until proven otherwise).
    pub fn watch(&mut self, peer: NodeId, now: Instant) {
        let config = self.config;
        self.peers.entry(peer).or_insert_with(|| Peer {
            history: History::regular(&config),
            up: true,
            since: now,
        });
    }

    /// Records a heartbeat (any answer) from `peer`. Returns a transition when
    /// this brings a down peer back up.
    pub fn heartbeat(&mut self, peer: NodeId, now: Instant) -> Option<Transition> {
        self.watch(peer, now);
        let window = self.config.window;
        let p = self.peers.get_mut(&peer).expect("watched above");
        if let Some(last) = p.history.last {
            let interval = now.saturating_duration_since(last).as_secs_f64() * 1000.0;
            if p.history.intervals_ms.len() >= window {
                p.history.intervals_ms.pop_front();
            }
            p.history.intervals_ms.push_back(interval);
        }
        p.history.last = Some(now);
        if !p.up {
            p.up = true;
            return Some(Transition { peer, up: true });
        }
        None
    }

    /// Current suspicion of `peer`; 0 for a peer not watched.
    pub fn phi(&self, peer: NodeId, now: Instant) -> f64 {
        match self.peers.get(&peer) {
            Some(p) => {
                let last = p.history.last.unwrap_or(p.since);
                p.history.phi(
                    now.saturating_duration_since(last).as_secs_f64() * 1000.0,
                    &self.config,
                )
            }
            None => 0.0,
        }
    }

    /// Whether `peer` is considered up (peers not watched are).
    pub fn is_up(&self, peer: NodeId) -> bool {
        self.peers.get(&peer).is_none_or(|p| p.up)
    }

    /// Re-evaluates every peer at `now`; returns the peers that went down.
    pub fn evaluate(&mut self, now: Instant) -> Vec<Transition> {
        let ids: Vec<NodeId> = self.peers.keys().copied().collect();
        let mut down = Vec::new();
        for id in ids {
            let phi = self.phi(id, now);
            let p = self.peers.get_mut(&id).expect("listed");
            if p.up && phi >= self.config.threshold {
                p.up = false;
                down.push(Transition {
                    peer: id,
                    up: false,
                });
            }
        }
        down
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = NodeId([1; 16]);

    #[test]
    fn default_detection_time_is_about_two_and_a_half_seconds() {
        let t = DetectorConfig::default().detection_time();
        assert!(
            t > Duration::from_millis(2000) && t < Duration::from_millis(3000),
            "{t:?}"
        );
    }

    #[test]
    fn regular_heartbeats_keep_a_peer_up_and_silence_takes_it_down_then_up() {
        let config = DetectorConfig::default();
        let mut d = FailureDetector::new(config);
        let t0 = Instant::now();
        for i in 0..20 {
            d.heartbeat(A, t0 + config.heartbeat * i);
            assert!(d
                .evaluate(t0 + config.heartbeat * i + Duration::from_millis(400))
                .is_empty());
        }
        let last = t0 + config.heartbeat * 19;
        let detect = config.detection_time();
        assert!(
            d.evaluate(last + detect - Duration::from_millis(300))
                .is_empty(),
            "not down too early"
        );
        assert_eq!(
            d.evaluate(last + detect + Duration::from_millis(300)),
            vec![Transition { peer: A, up: false }]
        );
        assert!(!d.is_up(A));
        assert!(
            d.evaluate(last + detect * 2).is_empty(),
            "one transition, not one per evaluation"
        );
        assert_eq!(
            d.heartbeat(A, last + detect * 3),
            Some(Transition { peer: A, up: true })
        );
        assert!(d.is_up(A));
    }

    #[test]
    fn a_peer_never_heard_from_goes_down_after_the_detection_time() {
        let config = DetectorConfig::default();
        let mut d = FailureDetector::new(config);
        let t0 = Instant::now();
        d.watch(A, t0);
        assert!(d.evaluate(t0 + Duration::from_millis(500)).is_empty());
        assert_eq!(
            d.evaluate(t0 + config.detection_time() + Duration::from_millis(100))
                .len(),
            1
        );
    }

    #[test]
    fn phi_grows_with_silence() {
        let config = DetectorConfig::default();
        let mut d = FailureDetector::new(config);
        let t0 = Instant::now();
        for i in 0..10 {
            d.heartbeat(A, t0 + config.heartbeat * i);
        }
        let last = t0 + config.heartbeat * 9;
        let phis: Vec<f64> = (1..8)
            .map(|s| d.phi(A, last + Duration::from_millis(400 * s)))
            .collect();
        assert!(phis.windows(2).all(|w| w[0] <= w[1]), "{phis:?}");
    }
}
