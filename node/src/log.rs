//! Warnings that a misbehaving or hostile client could repeat thousands of
//! times a second (refused handshakes, bad frames) are rate-limited: at
//! most one line per kind every [`EVERY`], saying how many were held back.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Least time between two lines of one kind.
pub const EVERY: Duration = Duration::from_secs(10);

/// Per kind: when it was last logged, and how many were held back since.
static SEEN: Mutex<Option<HashMap<&'static str, (Instant, u64)>>> = Mutex::new(None);

/// Whether a warning of `kind` may be logged now; if so, how many were held
/// back before it.
fn admit(kind: &'static str, now: Instant) -> Option<u64> {
    let mut seen = SEEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let seen = seen.get_or_insert_with(HashMap::new);
    match seen.get_mut(kind) {
        Some((last, held)) if now.duration_since(*last) < EVERY => {
            *held += 1;
            None
        }
        Some((last, held)) => {
            let before = *held;
            *last = now;
            *held = 0;
            Some(before)
        }
        None => {
            seen.insert(kind, (now, 0));
            Some(0)
        }
    }
}

/// Logs `kind: detail()` as a warning unless one of `kind` was logged in
/// the last [`EVERY`]; `detail` is built only when logged.
pub fn warn_limited(kind: &'static str, detail: impl FnOnce() -> String) {
    if let Some(held_back) = admit(kind, Instant::now()) {
        if held_back > 0 {
            tracing::warn!(held_back, "{kind}: {}", detail());
        } else {
            tracing::warn!("{kind}: {}", detail());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kind_per_period_with_the_count_held_back() {
        let t0 = Instant::now();
        assert_eq!(admit("test kind", t0), Some(0));
        assert_eq!(admit("test kind", t0 + Duration::from_secs(1)), None);
        assert_eq!(admit("test kind", t0 + Duration::from_secs(2)), None);
        assert_eq!(admit("other test kind", t0), Some(0));
        assert_eq!(admit("test kind", t0 + EVERY), Some(2));
    }
}
