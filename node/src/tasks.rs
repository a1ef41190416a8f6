//! The work a node spawns per request that outlives the request (a write's
//! sends to slow replicas, a read's repair), behind a handle the node owns,
//! so that a crash (the simulation's kill) ends exactly that node's work:
//! [`Tasks::abort_all`] stops every task spawned through the handle at its
//! next await, and later spawns do not start. A graceful stop
//! ([`crate::server::Running::stop`]) first lets the client requests taken
//! and their tasks end ([`Tasks::drain`]), then aborts what is left.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// A node's per-request tasks. Cheap to clone; clones share one switch.
#[derive(Clone, Debug)]
pub struct Tasks {
    stop: Arc<watch::Sender<bool>>,
    /// Tasks spawned and not ended yet.
    running: Arc<AtomicUsize>,
    /// The client requests being coordinated (see [`Tasks::take_request`]).
    requests: Arc<Requests>,
}

impl Default for Tasks {
    fn default() -> Self {
        Tasks {
            stop: Arc::new(watch::channel(false).0),
            running: Arc::default(),
            requests: Arc::default(),
        }
    }
}

#[derive(Debug, Default)]
struct Requests {
    /// Set by [`Tasks::drain`]: no client request is taken any more.
    closed: AtomicBool,
    in_flight: AtomicUsize,
    /// Client requests refused since the drain began.
    refused: AtomicUsize,
}

/// A client request taken: counted as in flight until dropped.
pub struct Taken<'a>(&'a Requests);

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How often [`Tasks::drain`] looks whether everything has ended.
const DRAIN_POLL: Duration = Duration::from_millis(5);

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
    /// fan-out's send is a 2.1 KiB future); the wrapper is small.
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

    /// Counts a client request as in flight for as long as the guard lives;
    /// `None` once [`Self::drain`] began: the request must be refused unrun
    /// (the SDK then asks another node). The count goes up before the check,
    /// and `drain` closes before it reads the count, so a request is either
    /// refused or waited for.
    pub fn take_request(&self) -> Option<Taken<'_>> {
        let requests = &*self.requests;
        requests.in_flight.fetch_add(1, Ordering::SeqCst);
        let taken = Taken(requests);
        if requests.closed.load(Ordering::SeqCst) {
            requests.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(taken)
    }

    /// A graceful stop's first step: takes no new client request
    /// ([`Self::take_request`]), then waits until each request taken before
    /// has its answer and every task spawned through this handle (a write's
    /// sends to the third replica, a read's repair, their hints) has ended,
    /// or until `deadline`. Returns whether everything ended; the caller
    /// then aborts the tasks left ([`Self::abort_all`]), and a request still
    /// running fails with them or when its connection closes.
    pub async fn drain(&self, deadline: Instant) -> bool {
        self.requests.closed.store(true, Ordering::SeqCst);
        loop {
            if self.requests.in_flight.load(Ordering::SeqCst) == 0 && self.running() == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }

    /// Waits until no client request has come for `quiet`, or until
    /// `deadline`: once [`Self::drain`] refused a client's request, the SDK
    /// asks other nodes, so its requests stop coming within a round trip,
    /// and closing the connections after that cuts none of them off.
    pub async fn quiet(&self, quiet: Duration, deadline: Instant) {
        loop {
            let before = self.requests.refused.load(Ordering::Relaxed);
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            tokio::time::sleep(quiet.min(deadline - now)).await;
            if self.requests.refused.load(Ordering::Relaxed) == before {
                return;
            }
        }
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

    #[tokio::test(start_paused = true)]
    async fn a_drain_refuses_new_requests_and_waits_for_those_taken_and_their_tasks() {
        let tasks = Tasks::default();
        let taken = tasks.take_request().expect("taken before the drain");
        // A task that ends before the request does, then one that outlives it.
        tasks.spawn(tokio::time::sleep(Duration::from_millis(50)));
        let draining = tasks.clone();
        let deadline = Instant::now() + Duration::from_secs(5);
        let drain = tokio::spawn(async move { draining.drain(deadline).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(tasks.running(), 0);
        assert!(
            tasks.take_request().is_none(),
            "a request after the drain began is refused"
        );
        assert!(
            !drain.is_finished(),
            "the drain waits for the request taken"
        );
        tasks.spawn(tokio::time::sleep(Duration::from_millis(300)));
        drop(taken);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!drain.is_finished(), "and for the task it spawned");
        assert!(drain.await.expect("drain"), "all ended before the deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_gives_up_at_its_deadline() {
        let tasks = Tasks::default();
        let _taken = tasks.take_request().expect("taken");
        let deadline = Instant::now() + Duration::from_secs(1);
        assert!(!tasks.drain(deadline).await);
        assert!(Instant::now() >= deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_waits_until_no_request_came_for_a_while() {
        let tasks = Tasks::default();
        // Only requests refused by a drain count.
        assert!(tasks.drain(Instant::now()).await);
        let asking = tasks.clone();
        let start = Instant::now();
        // A request every 50 ms for 500 ms, each refused or not.
        let client = tokio::spawn(async move {
            for _ in 0..10 {
                drop(asking.take_request());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        tasks
            .quiet(Duration::from_millis(100), start + Duration::from_secs(5))
            .await;
        assert!(client.is_finished());
        assert!(
            start.elapsed() >= Duration::from_millis(550),
            "{:?}",
            start.elapsed()
        );
        let capped = Instant::now();
        let asking = tasks.clone();
        tokio::spawn(async move {
            loop {
                drop(asking.take_request());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        tasks
            .quiet(Duration::from_millis(100), capped + Duration::from_secs(1))
            .await;
        assert_eq!(capped.elapsed(), Duration::from_secs(1), "bounded");
    }

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
