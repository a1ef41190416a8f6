//! The work a node spawns per request that outlives the request (a write's
//! sends to slow replicas, a read's repair), behind a handle the node owns,
//! so that a crash (the simulation's kill, or [`crate::server::Running::stop`])
//! ends exactly that node's work: [`Tasks::abort_all`] stops every task
//! spawned through the handle at its next await, and later spawns do not
//! start.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

/// A node's per-request tasks. Cheap to clone; clones share one switch.
#[derive(Clone, Debug)]
pub struct Tasks {
    stop: Arc<watch::Sender<bool>>,
}

impl Default for Tasks {
    fn default() -> Self {
        Tasks {
            stop: Arc::new(watch::channel(false).0),
        }
    }
}

impl Tasks {
    /// Runs `work` in its own task until it ends or the node's tasks are
    /// aborted.
    pub fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        let mut stop = self.stop.subscribe();
        if *stop.borrow() {
            return;
        }
        tokio::spawn(async move {
            tokio::select! {
                biased;
                _ = stop.wait_for(|stopped| *stopped) => {}
                _ = work => {}
            }
        });
    }

    /// Ends every task spawned through this handle (and its clones).
    pub fn abort_all(&self) {
        self.stop.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn aborted_tasks_stop_and_later_ones_never_start() {
        let tasks = Tasks::default();
        let finished = Arc::new(AtomicBool::new(false));
        let f = finished.clone();
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            f.store(true, Ordering::SeqCst);
        });
        tokio::task::yield_now().await;
        tasks.clone().abort_all();
        let f = finished.clone();
        tasks.spawn(async move { f.store(true, Ordering::SeqCst) });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!finished.load(Ordering::SeqCst));
    }
}
