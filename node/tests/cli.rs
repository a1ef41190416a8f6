//! The `shoal` binary's handling of bad configuration: a clear error naming
//! the problem, and a non-zero exit, never a panic.

use std::process::Command;

fn shoal(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .output()
        .expect("run shoal")
}

#[test]
fn a_config_with_an_unknown_field_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        "name = \"node1\"\nreplication = 3\n[tls]\nca-cert = \"a\"\ncert = \"b\"\nkey = \"c\"\n",
    )
    .unwrap();
    let out = shoal(&["node", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown field") && err.contains("replication"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_missing_certificate_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        "name = \"node1\"\n[tls]\nca-cert = \"ca.pem\"\ncert = \"n.pem\"\nkey = \"n.key\"\n",
    )
    .unwrap();
    let out = shoal(&["node", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ca.pem"), "{err}");
}

#[test]
fn certs_issues_a_ca_and_node_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert!(shoal(&["--dir", d, "certs", "ca"]).status.success());
    assert!(
        shoal(&["--dir", d, "certs", "node", "--name", "db1", "--ip", "10.1.2.3"])
            .status
            .success()
    );
    assert!(shoal(&["--dir", d, "certs", "client", "--name", "app"])
        .status
        .success());
    for f in [
        "ca.pem", "ca.key", "db1.pem", "db1.key", "app.pem", "app.key",
    ] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
    // A second CA in the same place would orphan every certificate: refused.
    let again = shoal(&["--dir", d, "certs", "ca"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a CA key"));
}

/// A node key file from before sealed contexts (no `SHOAL CONTEXT KEY`
/// block): the node refuses to start, saying what to do.
#[test]
fn a_node_key_without_the_context_key_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert!(shoal(&["--dir", d, "certs", "ca"]).status.success());
    assert!(shoal(&["--dir", d, "certs", "node", "--name", "db1"])
        .status
        .success());
    let key = dir.path().join("db1.key");
    let pem = std::fs::read_to_string(&key).unwrap();
    let cut = pem.find("-----BEGIN SHOAL CONTEXT KEY").expect("the block");
    std::fs::write(&key, &pem[..cut]).unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        "name = \"db1\"\n[tls]\nca-cert = \"ca.pem\"\ncert = \"db1.pem\"\nkey = \"db1.key\"\n",
    )
    .unwrap();
    let out = shoal(&["node", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SHOAL CONTEXT KEY") && err.contains("shoal certs context-key"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // The mend it names adds the CA directory's block, once, and keeps the
    // TLS key.
    for _ in 0..2 {
        let k = key.to_str().unwrap();
        let out = shoal(&["--dir", d, "certs", "context-key", "--key", k]);
        assert!(out.status.success(), "{out:?}");
    }
    let mended = std::fs::read_to_string(&key).unwrap();
    assert!(mended.starts_with(&pem[..cut]), "{mended}");
    let block = std::fs::read_to_string(dir.path().join("context.key")).unwrap();
    assert_eq!(&mended[cut..], block, "the CA directory's key, once");
    assert_eq!(pem, mended, "the block the node was issued with");
}
