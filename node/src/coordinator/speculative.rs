//! Spare reads sent only when the quorum is slow
//! (`cluster.spare-reads = "when-slow"`): a speculative retry, as
//! Cassandra's, whose delay follows how fast the peers answer.
//!
//! A read's spare (the replica beyond the R that make its quorum) waits
//! for the quorum or for [`AnswerTimes::spare_delay`], whichever comes
//! first, and is sent only in the second case. The delay is twice the
//! mean answer time of the fastest peer, and never under [`FLOOR`]:
//! - under light load, answers take a fraction of a millisecond, and the
//!   spare of a read whose quorum send is slow or lost leaves a
//!   millisecond on, as it does with `always` (a spare's batch waits that
//!   long);
//! - under load, answers wait for the worker, and so does the spare: it
//!   is not sent for the reads that are only as slow as the others;
//! - one peer that stalls (a flush) or dies does not raise the delay: it
//!   follows the fastest peer, so the stalled peer's reads are still
//!   covered after twice the others' answer time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_ring::NodeId;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The least a spare waits: the window a spare's batch waits with
/// `spare-reads = "always"`.
pub(super) const FLOOR: Duration = super::spare::WINDOW;

/// A peer's mean answer time older than this no longer counts (the peer
/// may be gone, or its last answers long past).
const FRESH: Duration = Duration::from_secs(5);

/// The weight of a new answer in a peer's mean.
const WEIGHT: f64 = 1.0 / 16.0;

/// How a primary is asked by `Coordinator::sloppy_fan_out`.
#[derive(Clone)]
pub(super) enum Ask {
    /// It makes the quorum (this node, or one of the quorum's own sends),
    /// or it is a fallback's.
    Quorum,
    /// A spare, in a batch that waits a window.
    Spare,
    /// A spare, asked only if the quorum is slow.
    WhenSlow(Arc<Answered>),
}

/// Set once a read's quorum has answered.
#[derive(Default)]
pub(super) struct Answered {
    set: AtomicBool,
    notify: Notify,
}

impl Answered {
    pub(super) fn set(&self) {
        self.set.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Waits until the quorum has answered or `delay` has passed: whether
    /// the quorum answered first.
    pub(super) async fn first_within(&self, delay: Duration) -> bool {
        // Registered before the check: a `set` after it wakes this.
        let notified = self.notify.notified();
        if self.set.load(Ordering::Acquire) {
            return true;
        }
        tokio::select! {
            _ = notified => true,
            _ = tokio::time::sleep(delay) => self.set.load(Ordering::Acquire),
        }
    }
}

/// Each peer's mean time to answer a quorum's own request.
#[derive(Default)]
pub(super) struct AnswerTimes {
    peers: Mutex<HashMap<NodeId, Mean>>,
}

struct Mean {
    nanos: f64,
    at: Instant,
}

impl AnswerTimes {
    /// `peer` answered a request sent `took` ago.
    pub(super) fn record(&self, peer: NodeId, took: Duration) {
        let nanos = took.as_nanos() as f64;
        let now = Instant::now();
        let mut peers = self.peers.lock().expect("answer times lock");
        let mean = peers.entry(peer).or_insert(Mean { nanos, at: now });
        mean.nanos += (nanos - mean.nanos) * WEIGHT;
        mean.at = now;
    }

    /// How long a spare waits for the quorum: twice the fastest peer's
    /// mean answer time, within [`FLOOR`] and `cap`.
    pub(super) fn spare_delay(&self, cap: Duration) -> Duration {
        let now = Instant::now();
        let peers = self.peers.lock().expect("answer times lock");
        let fastest = (peers.values())
            .filter(|m| now.saturating_duration_since(m.at) < FRESH)
            .map(|m| m.nanos)
            .fold(f64::INFINITY, f64::min);
        let delay = if fastest.is_finite() {
            Duration::from_nanos((2.0 * fastest) as u64)
        } else {
            FLOOR
        };
        delay.clamp(FLOOR, cap.max(FLOOR))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn the_delay_follows_the_fastest_peer_within_its_bounds() {
        let times = AnswerTimes::default();
        assert_eq!(times.spare_delay(ms(100)), FLOOR, "no answer yet");
        let (a, b) = (NodeId::from_u128(1), NodeId::from_u128(2));
        for _ in 0..200 {
            times.record(a, ms(3));
            times.record(b, ms(40)); // stalled: does not raise the delay
        }
        let delay = times.spare_delay(ms(100));
        assert!(delay > ms(5) && delay < ms(7), "{delay:?}");
        assert_eq!(times.spare_delay(ms(2)), ms(2), "capped");
        for _ in 0..200 {
            times.record(a, Duration::from_micros(100));
        }
        assert_eq!(times.spare_delay(ms(100)), FLOOR, "never under the floor");
        // A peer not heard from for a while no longer counts.
        tokio::time::advance(FRESH).await;
        times.record(b, ms(40));
        let delay = times.spare_delay(ms(100));
        assert!(delay > ms(70), "{delay:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_spare_waits_for_the_quorum_or_its_delay() {
        let answered = std::sync::Arc::new(Answered::default());
        assert!(
            !answered.first_within(ms(5)).await,
            "the delay passed first"
        );
        let waiting = tokio::spawn({
            let answered = answered.clone();
            async move { answered.first_within(ms(5)).await }
        });
        tokio::time::sleep(ms(1)).await;
        answered.set();
        assert!(waiting.await.unwrap(), "the quorum answered first");
        assert!(answered.first_within(ms(5)).await, "already answered");
    }
}
