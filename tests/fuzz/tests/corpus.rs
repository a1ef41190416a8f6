//! Replays the fuzz corpus as a plain test: every file of
//! `tests/fuzz/corpus/<target>/` through its target (see `shoal_fuzz`),
//! with no instrumented build. A crash the fuzzer found is added to the
//! corpus, so this test fails until the decoder is fixed and guards the fix
//! after.

use std::path::{Path, PathBuf};

#[global_allocator]
static ALLOC: shoal_fuzz::CappedAlloc = shoal_fuzz::CappedAlloc;

fn corpus_dir() -> PathBuf {
    // As `cargo test` gives it when the test runs, not as it was when the
    // binary was built (see the config test in node/src/config/tests.rs).
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or(env!("CARGO_MANIFEST_DIR").into());
    Path::new(&dir).join("corpus")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_file_runs_through_its_target_without_a_panic() {
    let mut failed = Vec::new();
    for (name, target) in shoal_fuzz::TARGETS {
        let inputs = files(&corpus_dir().join(name));
        assert!(!inputs.is_empty(), "target {name} has no corpus");
        for path in inputs {
            let data = std::fs::read(&path).expect("a corpus file is readable");
            if std::panic::catch_unwind(|| target(&data)).is_err() {
                failed.push(path.display().to_string());
            }
        }
    }
    assert!(
        failed.is_empty(),
        "panicked on {} input(s): {failed:#?}",
        failed.len()
    );
}

#[test]
fn every_corpus_directory_is_a_target() {
    for dir in files_and_dirs(&corpus_dir()) {
        let name = dir
            .file_name()
            .expect("a name")
            .to_string_lossy()
            .into_owned();
        assert!(
            shoal_fuzz::TARGETS.iter().any(|(t, _)| *t == name),
            "corpus/{name} belongs to no target"
        );
    }
}

fn files_and_dirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .expect("the corpus directory is readable")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_dir())
        .collect()
}

#[test]
fn every_seed_runs_through_its_target_without_a_panic() {
    for (name, _, bytes) in shoal_fuzz::seeds::seeds() {
        let target = shoal_fuzz::TARGETS
            .iter()
            .find(|(t, _)| *t == name)
            .unwrap_or_else(|| panic!("seed for unknown target {name}"))
            .1;
        target(&bytes);
    }
}
