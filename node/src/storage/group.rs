//! Group commit: with `fsync = true`, concurrent writes share one WAL sync
//! instead of one each (as Cassandra's batch commit log and most databases
//! do), so durable writes are not capped at one fsync per write.
//!
//! A write applies its batch with the WAL appended but not synced, then
//! [`GroupCommit::register`]s and gets a [`Durable`] to await before it is
//! acknowledged. One syncer thread per database syncs the WAL whenever
//! writes are waiting: a sync that starts after a write registered covers
//! it (the write's WAL record was appended before it registered), so every
//! write that registers while a sync runs shares the next one.
//!
//! A write is visible to reads between its apply and its sync, as RocksDB
//! documents for a write followed by `SyncWAL`: a power loss in that window
//! can take back a write that was read but never acknowledged, which a
//! write in flight may do anyway. No write is acknowledged before the disk
//! holds it.
//!
//! A sync that fails fails every write it was to cover (and unless the
//! disk is full, the RocksDB store then refuses everything until a
//! restart: see `rocks`). Once the
//! database a write went to is closed, or its syncer ends for any reason,
//! its wait fails too; it never waits for ever.
//!
//! An answer that vouches for what is stored without writing (a merge
//! that changed nothing) waits for [`GroupCommit::so_far`]: the stored
//! copy may be a write whose sync is still to come.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::StoreError;

/// How often an idle syncer checks whether its database is still open.
const IDLE_CHECK: Duration = Duration::from_millis(100);

/// What the syncer has done so far. Both counts only grow.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Every write registered up to this one is on disk, except those
    /// covered by a failed sync.
    synced: u64,
    /// Writes registered up to this one may be covered by a failed sync;
    /// they fail (a write synced after all may fail too: never the other way).
    failed_upto: u64,
    /// The last sync failure.
    error: String,
}

/// The registration and sync side of group commit for one database.
pub struct GroupCommit {
    /// Writes registered so far.
    registered: Mutex<u64>,
    wake: Condvar,
    progress: watch::Sender<Progress>,
    syncs: AtomicU64,
}

impl GroupCommit {
    /// Starts the syncer thread for `owner` (the database), which calls
    /// `sync(owner)` for each group; it ends once `owner` is dropped.
    pub fn start<T: Send + Sync + 'static>(
        owner: Weak<T>,
        sync: impl Fn(&T) -> Result<(), StoreError> + Send + 'static,
    ) -> Arc<GroupCommit> {
        let group = Arc::new(GroupCommit {
            registered: Mutex::new(0),
            wake: Condvar::new(),
            progress: watch::Sender::new(Progress::default()),
            syncs: AtomicU64::new(0),
        });
        let g = group.clone();
        std::thread::Builder::new()
            .name("shoal-wal-sync".into())
            .spawn(move || {
                let _ended = Ended(&g);
                g.syncer(owner, sync)
            })
            .expect("spawning the WAL sync thread");
        group
    }

    fn syncer<T>(&self, owner: Weak<T>, sync: impl Fn(&T) -> Result<(), StoreError>) {
        let mut done = 0;
        let registered = *self.registered.lock().expect("group commit lock");
        let mut pace = Pace::new(registered, Instant::now());
        loop {
            let waiting = {
                let mut registered = self.registered.lock().expect("group commit lock");
                while *registered <= done {
                    let (guard, waited) = self
                        .wake
                        .wait_timeout(registered, IDLE_CHECK)
                        .expect("group commit lock");
                    registered = guard;
                    if waited.timed_out() && owner.strong_count() == 0 {
                        return;
                    }
                }
                *registered
            };
            std::thread::sleep(pace.wait(waiting, Instant::now()));
            // Read after the wait: the writes registered meanwhile join.
            let target = *self.registered.lock().expect("group commit lock");
            pace.started(Instant::now());
            let Some(db) = owner.upgrade() else { return };
            let result = sync(&db);
            drop(db);
            self.syncs.fetch_add(1, Ordering::Relaxed);
            self.progress.send_modify(|p| match result {
                Ok(()) => p.synced = target,
                Err(e) => {
                    p.failed_upto = target;
                    p.error = e.to_string();
                }
            });
            done = target;
        }
    }

    /// Registers a write whose WAL record was just appended: the returned
    /// [`Durable`] resolves once a sync covers it.
    pub fn register(&self) -> Durable {
        let rx = self.progress.subscribe();
        let seq = {
            let mut registered = self.registered.lock().expect("group commit lock");
            *registered += 1;
            *registered
        };
        self.wake.notify_one();
        Durable(Some((seq, rx)))
    }

    /// A [`Durable`] for every write registered so far (at once if all are
    /// synced): for an answer that vouches for what is stored without
    /// writing, as a merge that changes nothing does.
    pub fn so_far(&self) -> Durable {
        let rx = self.progress.subscribe();
        match *self.registered.lock().expect("group commit lock") {
            0 => Durable::now(),
            seq => Durable(Some((seq, rx))),
        }
    }

    /// WAL syncs made so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }
}

/// When the next sync may start. A WAL sync costs the machine CPU whatever
/// it covers (on the 2-core bench VM, about 85 us of kernel time each, and
/// syncing back to back under load took 2,400 a second per node, a quarter
/// of a core). So while writes register at least [`GATHER`] per [`GAP`], a
/// sync starts no sooner than `GAP` after the one before started, and each
/// covers the writes of a whole gap: durable writes (workload w, 64
/// workers) went from 8,900 to 11,000-11,500 a second in 60 s runs. Below
/// that rate (a few writers, a serial one) a sync starts as soon as writes
/// wait, adding nothing to their latency.
struct Pace {
    /// When the last sync started.
    last: Option<Instant>,
    /// Where the rate is measured from: a time and the writes registered
    /// by then.
    window: (Instant, u64),
    /// Whether the last measured rate is at least `GATHER` per `GAP`.
    busy: bool,
}

/// The least time from one sync's start to the next one's, under load.
const GAP: Duration = Duration::from_millis(2);

/// The writes per [`GAP`] from which syncs are spaced.
const GATHER: u64 = 8;

/// How long the registration rate is measured over.
const RATE_WINDOW: Duration = Duration::from_millis(20);

impl Pace {
    fn new(registered: u64, now: Instant) -> Pace {
        Pace {
            last: None,
            window: (now, registered),
            busy: false,
        }
    }

    /// How long to wait before syncing, `registered` writes registered so
    /// far.
    fn wait(&mut self, registered: u64, now: Instant) -> Duration {
        let (since, before) = self.window;
        let elapsed = now.saturating_duration_since(since);
        if elapsed >= RATE_WINDOW {
            let per_gap = (registered - before) as f64 * GAP.as_secs_f64() / elapsed.as_secs_f64();
            self.busy = per_gap >= GATHER as f64;
            self.window = (now, registered);
        }
        match self.last {
            Some(last) if self.busy => (last + GAP).saturating_duration_since(now),
            _ => Duration::ZERO,
        }
    }

    fn started(&mut self, now: Instant) {
        self.last = Some(now);
    }
}

/// Fails every write registered, now and later, once the syncer thread
/// ends (its database closed, or it panicked): none of them would be synced.
struct Ended<'a>(&'a GroupCommit);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.0.progress.send_modify(|p| {
            p.failed_upto = u64::MAX;
            p.error =
                "the database closed (its WAL sync thread ended) before this write was synced"
                    .into();
        });
    }
}

/// A written batch's durability: await [`Durable::wait`] before
/// acknowledging the write.
#[must_use = "a write is durable only once its Durable resolves"]
#[derive(Clone)]
pub struct Durable(Option<(u64, watch::Receiver<Progress>)>);

impl Durable {
    /// Durable already (synced with the write, or `fsync` is off).
    pub fn now() -> Durable {
        Durable(None)
    }

    /// Whether the write is durable already (a sync covered it).
    pub fn is_done(&self) -> bool {
        match &self.0 {
            None => true,
            Some((seq, rx)) => {
                let p = rx.borrow();
                p.synced >= *seq && p.failed_upto < *seq
            }
        }
    }

    /// Resolves once a WAL sync covers the write; fails if the sync failed
    /// or the database closed first.
    pub async fn wait(self) -> Result<(), StoreError> {
        let Some((seq, mut rx)) = self.0 else {
            return Ok(());
        };
        loop {
            {
                let p = rx.borrow_and_update();
                if p.failed_upto >= seq {
                    return Err(StoreError::Io {
                        op: "sync",
                        detail: p.error.clone(),
                    });
                }
                if p.synced >= seq {
                    return Ok(());
                }
            }
            if rx.changed().await.is_err() {
                return Err(StoreError::Io {
                    op: "sync",
                    detail: "the database closed before this write was synced".into(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A stand-in database: counts syncs, fails them on demand, and takes
    /// a while for each, as a disk does.
    #[derive(Default)]
    struct Disk {
        syncs: AtomicU64,
        failing: AtomicBool,
    }

    fn disk_sync(d: &Disk) -> Result<(), StoreError> {
        std::thread::sleep(Duration::from_millis(2));
        d.syncs.fetch_add(1, Ordering::Relaxed);
        if d.failing.load(Ordering::Relaxed) {
            return Err(StoreError::Io {
                op: "sync",
                detail: "EIO".into(),
            });
        }
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_syncs_and_each_waits_for_one() {
        let disk = Arc::new(Disk::default());
        let group = GroupCommit::start(Arc::downgrade(&disk), disk_sync);
        let mut waits = Vec::new();
        for _ in 0..200 {
            let ticket = group.register();
            waits.push(tokio::spawn(ticket.wait()));
        }
        for w in waits {
            w.await.unwrap().unwrap();
        }
        let syncs = disk.syncs.load(Ordering::Relaxed);
        assert!((1..=20).contains(&syncs), "200 writes took {syncs} syncs");
        // A write registered after the last sync waits for a new one.
        let before = disk.syncs.load(Ordering::Relaxed);
        group.register().wait().await.unwrap();
        assert!(disk.syncs.load(Ordering::Relaxed) > before);
        assert_eq!(group.syncs(), disk.syncs.load(Ordering::Relaxed));
    }

    /// A disk with quick syncs (a fast SSD), where syncing back to back
    /// would sync every few writes.
    fn quick_sync(d: &Disk) -> Result<(), StoreError> {
        std::thread::sleep(Duration::from_micros(100));
        d.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A serial writer's write is synced at once, not a gap after the last
    /// sync (a fixed gap made 200 serial writes on 100 us syncs take 417
    /// ms). Driven with made-up instants: one write a millisecond, each
    /// synced before the next registers.
    #[test]
    fn a_serial_writer_waits_for_no_gap() {
        let t0 = Instant::now();
        let mut pace = Pace::new(0, t0);
        for write in 1..=200u64 {
            let now = t0 + Duration::from_millis(write);
            assert_eq!(pace.wait(write, now), Duration::ZERO, "write {write}");
            pace.started(now);
        }
    }

    /// The syncer's pacing under a stream (made-up instants: 32 writes
    /// registered every 100 us, syncs of 100 us): back to back until the
    /// rate is measured, then each sync starts a gap after the one before.
    #[test]
    fn a_stream_is_paced_once_its_rate_is_measured() {
        let t0 = Instant::now();
        let mut pace = Pace::new(0, t0);
        let (mut now, mut starts) = (t0, Vec::new());
        while now < t0 + RATE_WINDOW * 5 {
            let registered = (now - t0).as_micros() as u64 * 32 / 100 + 1;
            now += pace.wait(registered, now);
            pace.started(now);
            starts.push(now);
            now += Duration::from_micros(100);
        }
        let measured = t0 + RATE_WINDOW;
        let apart = |keep: &dyn Fn(Instant, Instant) -> bool| -> Vec<Duration> {
            starts
                .windows(2)
                .filter(|pair| keep(pair[0], pair[1]))
                .map(|pair| pair[1] - pair[0])
                .collect()
        };
        let before = apart(&|_, second| second < measured);
        let after = apart(&|first, _| first >= measured);
        assert!(
            before.len() >= 150,
            "{} syncs before the window",
            before.len()
        );
        assert!(before.iter().all(|d| *d < GAP), "{before:?}");
        assert!(after.len() >= 30, "{} syncs after the window", after.len());
        assert!(after.iter().all(|d| *d >= GAP), "{after:?}");
    }

    /// Under a stream of concurrent writes, syncs are spaced a gap apart
    /// (back to back, 32 writers on 100 us syncs made thousands a second).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_of_writes_is_synced_once_a_gap() {
        let disk = Arc::new(Disk::default());
        let group = GroupCommit::start(Arc::downgrade(&disk), quick_sync);
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..32)
            .map(|_| {
                let (group, stop) = (group.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut written = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        group.register().wait().await.unwrap();
                        written += 1;
                    }
                    written
                })
            })
            .collect();
        // The rate is measured first; then a measured 200 ms.
        tokio::time::sleep(RATE_WINDOW * 3).await;
        let (before, start) = (
            disk.syncs.load(Ordering::Relaxed),
            std::time::Instant::now(),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let syncs = disk.syncs.load(Ordering::Relaxed) - before;
        let most = (start.elapsed().as_micros() / GAP.as_micros()) as u64 + 2;
        stop.store(true, Ordering::Relaxed);
        let mut written = 0;
        for w in writers {
            written += w.await.unwrap();
        }
        assert!(
            syncs <= most,
            "{syncs} syncs in {:?} (at most {most})",
            start.elapsed()
        );
        assert!(written > syncs * 8, "{written} writes in {syncs} syncs");
    }

    #[tokio::test]
    async fn a_failed_sync_fails_the_writes_it_covered_and_later_ones_succeed() {
        let disk = Arc::new(Disk::default());
        let group = GroupCommit::start(Arc::downgrade(&disk), disk_sync);
        disk.failing.store(true, Ordering::Relaxed);
        let err = group.register().wait().await.unwrap_err();
        assert!(err.to_string().contains("EIO"), "{err}");
        disk.failing.store(false, Ordering::Relaxed);
        group.register().wait().await.unwrap();
    }

    #[tokio::test]
    async fn a_write_to_a_closed_database_is_not_durable() {
        let disk = Arc::new(Disk::default());
        let group = GroupCommit::start(Arc::downgrade(&disk), disk_sync);
        drop(disk);
        let ticket = group.register();
        drop(group);
        let err = ticket.wait().await.unwrap_err();
        assert!(err.to_string().contains("closed"), "{err}");
    }

    /// A syncer that dies (here a sync that panics) fails the writes
    /// waiting for it and those registered later, instead of leaving them
    /// waiting for ever.
    #[tokio::test]
    async fn writes_fail_once_the_syncer_is_gone() {
        let disk = Arc::new(Disk::default());
        let group = GroupCommit::start(
            Arc::downgrade(&disk),
            |_: &Disk| -> Result<(), StoreError> { panic!("a sync that panics (test)") },
        );
        for ticket in [group.register(), group.register()] {
            let waited = tokio::time::timeout(Duration::from_secs(10), ticket.wait()).await;
            let err = waited.expect("the write waits for ever").unwrap_err();
            assert!(err.to_string().contains("closed"), "{err}");
        }
        assert!(!group.register().is_done());
    }

    /// `so_far` covers what was registered before it, and nothing is
    /// waited for when everything is synced.
    #[tokio::test]
    async fn so_far_waits_for_the_writes_before_it() {
        let disk = Arc::new(Disk::default());
        let group = GroupCommit::start(Arc::downgrade(&disk), disk_sync);
        assert!(group.so_far().is_done());
        disk.failing.store(true, Ordering::Relaxed);
        let ticket = group.register();
        let repeat = group.so_far();
        assert!(ticket.wait().await.is_err());
        assert!(
            repeat.wait().await.is_err(),
            "vouched for a write whose sync failed"
        );
        disk.failing.store(false, Ordering::Relaxed);
        group.register().wait().await.unwrap();
        let after = group.so_far();
        assert!(after.is_done());
        after.wait().await.unwrap();
    }

    #[test]
    fn durable_now_needs_no_sync() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(Durable::now().wait()).unwrap();
    }
}
