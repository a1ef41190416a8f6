//! Writeback started as a database's files grow.
//!
//! Without `fsync`, a WAL reaches the disk only when RocksDB syncs it: with
//! several column families it syncs the WALs it closes at a memtable
//! switch, and it syncs each table file a flush or compaction writes. The
//! kernel starts writing dirty pages back only once they are 30 s old or
//! a tenth of memory is dirty, so until then a switch wrote everything
//! since the last one in a burst (the closed WAL and the new tables:
//! 200-280 MB in two seconds by `vmstat`), and requests waited behind it:
//! the open-loop tail's worst seconds (bench/README.md, "The open-loop
//! tail").
//!
//! A thread per open database asks the kernel, every [`PERIOD`], to start
//! writing back the dirty pages of the files changed lately
//! (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which starts the writes and
//! waits for none), so the disk takes the bytes as they come and a switch
//! finds them written. It is not a sync and promises nothing: durability
//! stays the WAL sync's job (`fsync`). It runs on its own thread, never a
//! request's (RocksDB's `bytes_per_sync` calls the same from the writing
//! thread, and measured worse there).

use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::{Duration, SystemTime};

/// How often the files changed lately are handed to writeback.
pub const PERIOD: Duration = Duration::from_millis(200);

/// A file changed within this long is handed over at each pass; one
/// unchanged for longer was handed over by the passes before.
const RECENT: Duration = Duration::from_secs(2);

/// Starts the writeback thread for the database in `dir`; it ends once
/// `owner` (the open database) is dropped.
pub fn start<T: Send + Sync + 'static>(dir: PathBuf, owner: Weak<T>) {
    let spawned = std::thread::Builder::new()
        .name("shoal-writeback".into())
        .spawn(move || loop {
            std::thread::sleep(PERIOD);
            if owner.strong_count() == 0 {
                return;
            }
            pass(&dir, SystemTime::now());
        });
    // Only the pace at which bytes reach the disk depends on it.
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start the writeback thread; files reach the disk when RocksDB syncs them");
    }
}

/// Hands to writeback every WAL and table file in `dir` changed within
/// [`RECENT`] of `now`; returns how many. A file that vanishes or cannot
/// be read meanwhile is skipped: the next pass, or RocksDB's own sync,
/// covers it.
fn pass(dir: &Path, now: SystemTime) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut handed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if !path
            .extension()
            .is_some_and(|ext| ext == "log" || ext == "sst")
        {
            continue;
        }
        let recent = entry
            .metadata()
            .and_then(|m| m.modified())
            // A time ahead of `now` (the clock stepped back) counts as recent.
            .is_ok_and(|changed| {
                now.duration_since(changed)
                    .map_or(true, |age| age <= RECENT)
            });
        if recent && start_writeback(&path) {
            handed += 1;
        }
    }
    handed
}

/// Starts writing back the dirty pages of the file at `path`, waiting for
/// none of them.
#[cfg(target_os = "linux")]
fn start_writeback(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    // SAFETY: a valid descriptor for the call's duration; offset 0 and
    // length 0 mean the whole file.
    unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_path: &Path) -> bool {
    false
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_pass_hands_over_the_wal_and_tables_changed_lately_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        // The files' times are set, not taken from when they were written,
        // so a slow machine cannot age them past `RECENT`.
        let now = SystemTime::now();
        for (name, modified) in [
            ("000012.log", now),
            ("000013.sst", now),
            // A table untouched for a minute was handed over long ago.
            ("000014.sst", now - Duration::from_secs(60)),
            ("MANIFEST-000005", now),
            ("LOG", now),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, b"bytes").unwrap();
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(modified).unwrap();
        }
        assert_eq!(pass(dir.path(), now), 2);
        // Ten seconds on, nothing is recent.
        assert_eq!(pass(dir.path(), now + Duration::from_secs(10)), 0);
        // A directory that is gone is no error.
        assert_eq!(pass(&dir.path().join("gone"), SystemTime::now()), 0);
    }
}
