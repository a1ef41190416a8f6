//! Wall-clock time as a handle the caller passes in, never read directly by
//! the logic: the real node uses [`Clock::system`], the deterministic
//! simulation a clock derived from tokio's paused time (plus a per-node
//! skew), so every timestamp a node mints is reproducible from the seed.
//!
//! Timers and deadlines use `tokio::time` (which the simulation pauses and
//! advances); this clock is only for the timestamps stored in objects and
//! hints and the ages judged from them (tombstone grace, clock pruning).

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, from wherever the caller decides; and
/// where a node's background timers report their firings (the simulation
/// folds them into its trace hash; the real node ignores them).
#[derive(Clone)]
pub struct Clock(Now, Option<Fired>);

/// Reads the time in milliseconds: since the Unix epoch on a real node.
type Now = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Told the name of each background timer that fires.
type Fired = Arc<dyn Fn(&str) + Send + Sync>;

impl Clock {
    /// The machine's clock.
    pub fn system() -> Self {
        Clock(
            Arc::new(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64)
            }),
            None,
        )
    }

    /// A clock that reads `f`.
    pub fn from_fn(f: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        Clock(Arc::new(f), None)
    }

    /// A clock at `start_ms` when tokio's time is at `origin`, advancing with
    /// tokio's (possibly paused) time: the simulation's clock; `start_ms`
    /// differing between nodes models skew.
    pub fn tokio(start_ms: u64, origin: tokio::time::Instant) -> Self {
        Clock(
            Arc::new(move || {
                start_ms
                    + tokio::time::Instant::now()
                        .duration_since(origin)
                        .as_millis() as u64
            }),
            None,
        )
    }

    pub fn now_ms(&self) -> u64 {
        (self.0)()
    }

    /// This clock, with `on_timer` told of every background timer firing.
    pub fn with_timer_trace(mut self, on_timer: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.1 = Some(Arc::new(on_timer));
        self
    }

    /// A background timer named `what` fired.
    pub fn fired(&self, what: &str) {
        if let Some(f) = &self.1 {
            f(what);
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Clock(now = {} ms)", self.now_ms())
    }
}

/// Background work's rate limit (handoff, rebuilds, repairs, reaping):
/// sleeps until `n` items begun at `began` have taken at least `n / per_sec`
/// seconds. On tokio's clock, so the simulation's paused time drives it.
pub async fn pace(began: tokio::time::Instant, n: usize, per_sec: u32) {
    let floor = std::time::Duration::from_secs_f64(n as f64 / f64::from(per_sec.max(1)));
    tokio::time::sleep_until(began + floor).await;
}
