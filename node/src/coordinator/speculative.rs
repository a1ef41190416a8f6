//! Spare reads sent only when the quorum is slow or stands in for a
//! primary (`cluster.spare-reads = "when-slow"`): a speculative retry, as
//! Cassandra's, whose delay follows how fast the peers answer.
//!
//! A read's spares (the replicas beyond the R that make its quorum) are
//! held by its [`SpareGate`] until the first of:
//! - the read has its answer, or is given up (its client gone): they are
//!   not sent ([`Settled`]);
//! - a send for one of the quorum's primaries fails, to it or to a
//!   fallback in its place (an error, a corrupt copy, an unreachable
//!   peer): they go at once, as a fallback would;
//! - a fallback answers for a primary that is down: they go at once. Its
//!   answer is held back while the primaries asked have yet to answer
//!   (`Tally::prefer_primaries`), and the spares are such primaries; held
//!   for their delay, they would leave the read waiting that long, and
//!   themselves less of the patience after which the fallback's answer
//!   counts. So while a primary is down, a read that has spares asks them
//!   as `always` does. (With N=3 and a primary down, a read at R=2 has
//!   none: the fallback takes no slot of the quorum.)
//! - the spare delay passes: they go.
//!
//! The delay is twice the fastest peer's mean answer time to the reads'
//! quorum sends ([`AnswerTimes::spare_delay`]), at least [`FLOOR`] and at
//! most a quarter of the read's budget (250 ms at most: see [`SpareGate`]):
//! - under light load, answers take a fraction of a millisecond, and a
//!   spare of a read whose quorum send is slow or lost leaves a
//!   millisecond on, as it does with `always` (a spare's batch waits that
//!   long);
//! - under load, answers wait for the worker, and so does the spare: it
//!   is not sent for the reads that are only as slow as the others;
//! - one peer that stalls (a flush) or dies does not raise the delay: it
//!   follows the fastest peer, so the stalled peer's reads are still
//!   covered after twice the others' answer time.
//!
//! Only remote quorum sends are timed: reads at R=1 that a replica answers
//! from its own copy time nothing, and unless other reads do, their
//! spares wait the floor.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
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

/// A read's spares (`spare-reads = "when-slow"`), held until its quorum
/// answers (then they are not sent), a quorum send fails or a fallback
/// answers for a primary that is down (then they go at once), or the
/// spare delay passes (then they go).
pub(super) struct SpareGate {
    state: AtomicU8,
    notify: Notify,
    /// The most a spare waits: half the read's patience with fallbacks'
    /// answers (`Tally::prefer_primaries`), a quarter of its budget and
    /// 250 ms at most, so that a spare sent then has the other half to
    /// answer.
    cap: Duration,
}

/// Settles its gate as answered when dropped, so that a read that ends in
/// any way, or is given up (its client gone, its future dropped), sends
/// none of the spares it still holds.
pub(super) struct Settled(pub(super) Arc<SpareGate>);

impl Drop for Settled {
    fn drop(&mut self) {
        self.0.answered();
    }
}

const HOLDING: u8 = 0;
const ANSWERED: u8 = 1;
const HURRIED: u8 = 2;

impl SpareGate {
    pub(super) fn new(cap: Duration) -> Self {
        SpareGate {
            state: AtomicU8::new(HOLDING),
            notify: Notify::new(),
            cap,
        }
    }

    /// The read has its answer: spares still held are not sent.
    pub(super) fn answered(&self) {
        self.settle(ANSWERED);
    }

    /// A quorum primary's send failed, or a fallback answered for a
    /// primary that is down: spares still held go at once.
    pub(super) fn hurry(&self) {
        self.settle(HURRIED);
    }

    fn settle(&self, to: u8) {
        let settled = self
            .state
            .compare_exchange(HOLDING, to, Ordering::AcqRel, Ordering::Acquire);
        if settled.is_ok() {
            self.notify.notify_waiters();
        }
    }

    /// Holds a spare for at most `delay` (within the cap): whether it is
    /// not to be sent (the read had its answer first).
    pub(super) async fn holds_back(&self, delay: Duration) -> bool {
        // Registered before the check: a `settle` after it wakes this.
        let settled = self.notify.notified();
        if self.state.load(Ordering::Acquire) == HOLDING {
            tokio::select! {
                _ = settled => {}
                _ = tokio::time::sleep(delay.min(self.cap)) => {}
            }
        }
        self.state.load(Ordering::Acquire) == ANSWERED
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
        if now.saturating_duration_since(mean.at) >= FRESH {
            // Long unheard: what it took then says nothing of now.
            mean.nanos = nanos;
        }
        mean.nanos += (nanos - mean.nanos) * WEIGHT;
        mean.at = now;
    }

    /// How long a spare waits for the quorum: twice the fastest peer's
    /// mean answer time, at least [`FLOOR`] (a [`SpareGate`] caps it).
    pub(super) fn spare_delay(&self) -> Duration {
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
        delay.max(FLOOR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn the_delay_follows_the_fastest_peer_and_never_falls_under_the_floor() {
        let times = AnswerTimes::default();
        assert_eq!(times.spare_delay(), FLOOR, "no answer yet");
        let (a, b) = (NodeId::from_u128(1), NodeId::from_u128(2));
        for _ in 0..200 {
            times.record(a, ms(3));
            times.record(b, ms(40)); // stalled: does not raise the delay
        }
        let delay = times.spare_delay();
        assert!(delay > ms(5) && delay < ms(7), "{delay:?}");
        for _ in 0..200 {
            times.record(a, Duration::from_micros(100));
        }
        assert_eq!(times.spare_delay(), FLOOR, "never under the floor");
        // A peer not heard from for a while no longer counts, and its
        // next answer starts its mean afresh.
        tokio::time::advance(FRESH).await;
        times.record(b, ms(4));
        let delay = times.spare_delay();
        assert!(delay > ms(7) && delay < ms(9), "{delay:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_gate_holds_a_spare_until_the_answer_a_failure_or_the_delay() {
        let gate = SpareGate::new(ms(100));
        let started = Instant::now();
        assert!(!gate.holds_back(ms(5)).await, "the delay passed first");
        assert_eq!(started.elapsed(), ms(5));
        let held = |gate: &Arc<SpareGate>| {
            let gate = gate.clone();
            tokio::spawn(async move { gate.holds_back(ms(50)).await })
        };

        let gate = Arc::new(SpareGate::new(ms(100)));
        let waiting = held(&gate);
        tokio::time::sleep(ms(1)).await;
        gate.answered();
        gate.hurry(); // too late: the answer came first
        assert!(waiting.await.unwrap(), "not sent: the read had its answer");
        assert!(gate.holds_back(ms(5)).await, "answered already");

        let gate = Arc::new(SpareGate::new(ms(100)));
        let waiting = held(&gate);
        tokio::time::sleep(ms(1)).await;
        let started = Instant::now();
        gate.hurry();
        gate.answered();
        assert!(!waiting.await.unwrap(), "sent: a quorum send failed");
        assert_eq!(started.elapsed(), Duration::ZERO, "at once");

        let gate = SpareGate::new(ms(2));
        let started = Instant::now();
        assert!(!gate.holds_back(ms(50)).await);
        assert_eq!(started.elapsed(), ms(2), "the read's cap");
    }
}
