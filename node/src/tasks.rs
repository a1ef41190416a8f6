//! The work a node spawns per request that outlives the request (a write's
//! sends to slow replicas, a read's repair), behind a handle the node owns,
//! so that a crash (the simulation's kill, or [`crate::server::Running::stop`])
//! ends exactly that node's work: [`Tasks::abort_all`] stops every task
//! spawned through the handle at its next await, and later spawns do not
//! start.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

/// A node's per-request tasks. Cheap to clone; clones share one switch.
#[derive(Clone, Debug)]
pub struct Tasks {
    stop: Arc<watch::Sender<bool>>,
    /// Tasks spawned and not ended yet.
    running: Arc<AtomicUsize>,
}

impl Default for Tasks {
    fn default() -> Self {
        Tasks {
            stop: Arc::new(watch::channel(false).0),
            running: Arc::default(),
        }
    }
}

/// Counts a task as running for as long as it lives.
struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Tasks {
    /// A handle that counts its running tasks in `running` (a metric).
    pub fn counted_in(running: Arc<AtomicUsize>) -> Self {
        Tasks {
            running,
            ..Tasks::default()
        }
    }

    /// Runs `work` in its own task until it ends or the node's tasks are
    /// aborted.
    pub fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        self.spawn_pinned(Box::pin(work));
    }

    /// [`Self::spawn`], but when `here` (a local replica's answer, done at
    /// once as a rule) polls `work` once in place first: work done then
    /// costs no task of its own.
    pub fn spawn_unless_done(&self, here: bool, work: impl Future<Output = ()> + Send + 'static) {
        if !here {
            return self.spawn(work);
        }
        if *self.stop.borrow() {
            return;
        }
        let mut work = Box::pin(work);
        if futures_util::FutureExt::now_or_never(&mut work).is_none() {
            self.spawn_pinned(work);
        }
    }

    /// The task itself, around `work` boxed (see [`spawn_boxed`]: a
    /// fan-out's send is a 3.6 KiB future); the wrapper is small.
    fn spawn_pinned(&self, work: Pin<Box<dyn Future<Output = ()> + Send>>) {
        let mut stop = self.stop.subscribe();
        if *stop.borrow() {
            return;
        }
        self.running.fetch_add(1, Ordering::Relaxed);
        let running = Running(self.running.clone());
        tokio::spawn(async move {
            let _running = running;
            tokio::select! {
                biased;
                _ = stop.wait_for(|stopped| *stopped) => {}
                _ = work => {}
            }
        });
    }

    /// Tasks spawned through this handle (and its clones) still running:
    /// every one has a deadline, so under steady load this stays flat.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Ends every task spawned through this handle (and its clones).
    pub fn abort_all(&self) {
        self.stop.send_replace(true);
    }
}

/// Spawns `work` boxed: tokio moves the future it spawns by value on its
/// way into the task's cell, some copies of it; a request's future is
/// kilobytes (its state at the largest await), a box is a pointer.
/// Workload a spent 6-7% of a node's CPU in `memmove`, half of it in
/// `tokio::spawn`; boxing the per-request tasks' futures took the servers'
/// CPU per operation from 59-61 to 52 us in 60 s runs (bench/README.md,
/// fifth look).
pub fn spawn_boxed<F>(work: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(Box::pin(work))
}

/// Runs `work`, CPU or disk work that may take many milliseconds (a batch of
/// objects, an object of megabytes), without stalling the other tasks of
/// the worker thread it runs on, the network's among them
/// ([`shoal_client::frame::off_worker`]). A node whose runtime stalls stops
/// acknowledging packets, and its peers would take it for dead. On a
/// current-thread runtime (the simulation) it just runs `work`.
pub fn heavy<R>(work: impl FnOnce() -> R) -> R {
    shoal_client::frame::off_worker(work)
}

/// An object, a value or a message of more than this many bytes is heavy:
/// whatever decodes, merges, stores or encodes it runs in [`heavy`].
pub const HEAVY_BYTES: usize = shoal_client::frame::BULK_BYTES;

/// Runs `work`, which handles about `bytes` bytes, in [`heavy`] when they
/// are over [`HEAVY_BYTES`], else right here.
pub fn heavy_for<R>(bytes: usize, work: impl FnOnce() -> R) -> R {
    shoal_client::frame::off_worker_for(bytes, work)
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
