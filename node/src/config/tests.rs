use super::*;

fn write(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("node.toml");
    std::fs::write(&p, text).unwrap();
    p
}

const MINIMAL: &str = r#"
name = "node1"
[tls]
ca-cert = "ca.pem"
cert = "node1.pem"
key = "node1.key"
"#;

#[test]
fn minimal_config_gets_defaults_and_resolved_paths() {
    let dir = tempfile::tempdir().unwrap();
    let c = Config::load(&write(dir.path(), MINIMAL)).unwrap();
    assert_eq!(c.cluster.n, 3);
    assert_eq!(c.cluster.partitions, 256);
    assert_eq!(c.tls.ca_cert, dir.path().join("ca.pem"));
    assert_eq!(c.all_members().len(), 1);
}

#[test]
fn the_shipped_example_config_is_valid() {
    // The package's directory as `cargo test` gives it when the test runs,
    // not as it was when the binary was built: a build cache shared with
    // another clone (CI's) hands this clone a binary that names that one.
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or(env!("CARGO_MANIFEST_DIR").into());
    let example = Path::new(&dir).join("../deploy/shoal.example.toml");
    let c = Config::load(&example).unwrap();
    assert_eq!(c.cluster.members.len(), 3);
    assert!(c.metrics_addr.is_some());
}

#[test]
fn unknown_field_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let err = Config::load(&write(
        dir.path(),
        &format!("{MINIMAL}\n[cluster]\nreplicas = 3\n"),
    ))
    .unwrap_err();
    assert!(err.to_string().contains("replicas"), "{err}");
}

#[test]
fn spare_reads_is_always_unless_set_and_a_wrong_value_names_the_choices() {
    let dir = tempfile::tempdir().unwrap();
    let load = |extra: &str| Config::load(&write(dir.path(), &format!("{MINIMAL}{extra}")));
    assert_eq!(load("").unwrap().cluster.spare_reads, SpareReads::Always);
    let c = load("[cluster]\nspare-reads = \"when-slow\"\n").unwrap();
    assert_eq!(c.cluster.spare_reads, SpareReads::WhenSlow);
    let err = load("[cluster]\nspare-reads = \"never\"\n").unwrap_err();
    let err = err.to_string();
    assert!(err.contains("always") && err.contains("when-slow"), "{err}");
}

#[test]
fn huge_pages_are_off_unless_tried_and_a_wrong_value_names_the_choices() {
    let dir = tempfile::tempdir().unwrap();
    let load = |extra: &str| Config::load(&write(dir.path(), &format!("{extra}{MINIMAL}")));
    assert_eq!(load("").unwrap().huge_pages, HugePages::Off);
    assert_eq!(
        load("huge-pages = \"try\"\n").unwrap().huge_pages,
        HugePages::Try
    );
    let err = load("huge-pages = \"on\"\n").unwrap_err().to_string();
    assert!(err.contains("try") && err.contains("off"), "{err}");
}

#[test]
fn impossible_quorum_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let err = Config::load(&write(
        dir.path(),
        &format!("{MINIMAL}\n[cluster]\nn = 3\nw = 4\n"),
    ))
    .unwrap_err();
    assert!(err.to_string().contains("cluster.w"), "{err}");
}

#[test]
fn out_of_range_threads_and_cache_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let load = |extra: &str| {
        Config::load(&write(
            dir.path(),
            &format!("threads = 0\n{MINIMAL}{extra}"),
        ))
    };
    let err = load("[limits]\nobject-cache-mb = 99999999\n").unwrap_err();
    assert!(err.to_string().contains("limits.object-cache-mb"), "{err}");
    let c = load("[limits]\nobject-cache-mb = 0\n").unwrap();
    assert_eq!(c.limits.object_cache_mb, 0);
    let err = Config::load(&write(dir.path(), &format!("threads = 5000\n{MINIMAL}"))).unwrap_err();
    assert!(err.to_string().contains("threads"), "{err}");
}

#[test]
fn a_grace_shorter_than_a_request_can_live_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let load = |grace: u64| {
        Config::load(&write(
            dir.path(),
            &format!("{MINIMAL}[anti-entropy]\ntombstone-grace-secs = {grace}\n"),
        ))
    };
    let err = load(0).unwrap_err().to_string();
    assert!(
        err.contains("anti-entropy.tombstone-grace-secs") && err.contains("at least 71 s"),
        "{err}"
    );
    assert!(load(70).is_err());
    assert_eq!(
        load(71).unwrap().anti_entropy.tombstone_grace_secs,
        71,
        "the smallest grace accepted with the default timeouts"
    );
}
