//! A full disk under RocksDB, for real: the store's directory is a small
//! tmpfs (needs root, as the chaos suite does), filled to the last byte.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use shoal_node::storage::{RocksStore, Store, Tree, WriteBatch};

/// A tmpfs mounted on a temp dir, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(mb: u64) -> Tmpfs {
        let dir = tempfile::tempdir().expect("temp dir");
        let size = format!("size={mb}m");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &size, "shoal-test"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(ok.success(), "mounting a tmpfs needs root");
        Tmpfs(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

fn fill(dir: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler")).expect("filler");
    let block = vec![0u8; 1 << 16];
    while f.write(&block).is_ok_and(|n| n > 0) {}
}

/// A write of key `i`; with `fsync`, as a replica makes it: deferred, and
/// done once group commit's WAL sync covers it.
fn put(store: &RocksStore, i: u32, fsync: bool) -> Result<(), shoal_node::storage::StoreError> {
    let mut batch = WriteBatch::default();
    batch.put(Tree::Objects, format!("key{i}").as_bytes(), &[7u8; 4096]);
    if !fsync {
        return store.write(batch);
    }
    let durable = store.write_deferred(batch)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(durable.wait())
}

/// Writes fail while the disk is full, with a clear error; once space is
/// back the store writes again, without a restart, and nothing written
/// before is lost. (RocksDB keeps a failed WAL append as a sticky error,
/// "Writer has previous error", until the database is reopened: the chaos
/// suite found a node that never wrote again after its disk filled.)
#[test]
fn writes_resume_after_a_full_disk_frees_up() {
    full_disk(false);
}

/// The same with `fsync = true` (group commit): a full disk is no disk
/// fault, so neither the failed appends nor the syncs that fail after them
/// (RocksDB's sticky error) take the store down; a sync on the full disk
/// (the reaper's) fails alone.
#[test]
fn durable_writes_resume_after_a_full_disk_frees_up() {
    full_disk(true);
}

fn full_disk(fsync: bool) {
    let disk = Tmpfs::mount(48);
    let store = RocksStore::open(&disk.path().join("db"), fsync).expect("open");
    let put = |i| put(&store, i, fsync);
    for i in 0..100 {
        put(i).expect("write before the disk fills");
    }
    fill(disk.path());
    let mut failed = None;
    for i in 100..10_000 {
        if let Err(e) = put(i) {
            failed = Some(e);
            break;
        }
    }
    let failed = failed.expect("a write fails on the full disk");
    println!("on the full disk: {failed}");
    assert!(failed.to_string().contains("No space left"), "{failed}");
    if let Err(e) = store.sync_wal() {
        println!("a sync on the full disk: {e}");
    }
    assert!(
        store
            .get(Tree::Objects, b"key1")
            .expect("reads go on")
            .is_some(),
        "reads are served while the disk is full"
    );
    std::fs::remove_file(disk.path().join("filler")).expect("free the disk");
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < Duration::from_secs(10) {
        match put(20_000) {
            Ok(()) => {
                last = None;
                break;
            }
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        last.is_none(),
        "still failing 10 s after space came back: {last:?}"
    );
    println!("writes again {:?} after space came back", started.elapsed());
    for i in 0..100 {
        assert!(
            store
                .get(Tree::Objects, format!("key{i}").as_bytes())
                .unwrap()
                .is_some(),
            "key{i} written before the disk filled is still there"
        );
    }
}
