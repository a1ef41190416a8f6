//! Issue 11, acceptance 7: the client port admits only clients with a
//! certificate from the cluster CA, current, naming a role, and each
//! request within that role. Each refusal says what is wrong and what to do.
//! `cargo test -p shoal-tests --test auth -- --nocapture`

use shoal_client::proto::ClusterCommand;
use shoal_client::{Client, ClientConfig, Error};
use shoal_node::certs::{issue, Kind, Role};
use shoal_tests::process::DevCluster;

/// The dev cluster's client config with another identity (`None`: none).
fn with_identity(c: &DevCluster, from: Option<(&std::path::Path, &str)>) -> ClientConfig {
    let mut config = ClientConfig::from_dir(c.path()).expect("cluster dir");
    config.identity = from.map(|(dir, name)| {
        let read = |ext: &str| std::fs::read(dir.join(format!("{name}.{ext}"))).expect("cert file");
        (read("pem"), read("key"))
    });
    config
}

/// Connecting (which reads the ring) must fail as unauthorised.
async fn refused(config: ClientConfig, what: &str, says: &str) {
    match Client::connect(config).await {
        Err(Error::Unauthorised(message)) => {
            println!("{what}: {message}");
            assert!(message.contains(says), "{what}: {message}");
        }
        Err(other) => panic!("{what}: refused, but not as unauthorised: {other}"),
        Ok(_) => panic!("{what}: admitted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_clients_with_a_current_certificate_and_role_get_in() {
    let c = DevCluster::start(1).await;
    let certs = tempfile::tempdir().expect("temp dir");
    let ca = c.path();

    refused(with_identity(&c, None), "no certificate", "presented none").await;

    let foreign = tempfile::tempdir().expect("temp dir");
    shoal_node::certs::create_ca(foreign.path()).expect("foreign CA");
    let role = Kind::Client(Role::ReadWrite);
    issue(foreign.path(), certs.path(), "foreign", role, &[], None).expect("issue");
    refused(
        with_identity(&c, Some((certs.path(), "foreign"))),
        "another CA",
        "not issued by the cluster CA",
    )
    .await;

    issue(ca, certs.path(), "expired", role, &[], Some(-1)).expect("issue");
    refused(
        with_identity(&c, Some((certs.path(), "expired"))),
        "expired",
        "expired",
    )
    .await;

    // A node's certificate is from the cluster CA but grants no client role.
    refused(
        with_identity(&c, Some((ca, "node1"))),
        "a node's certificate",
        "grants no client role",
    )
    .await;

    // Read-only: reads work, a write is refused and nothing is written.
    let admin = c.client().await;
    admin.put(b"k", b"v", None).await.expect("admin writes");
    issue(
        ca,
        certs.path(),
        "reader",
        Kind::Client(Role::ReadOnly),
        &[],
        None,
    )
    .expect("issue");
    let reader = Client::connect(with_identity(&c, Some((certs.path(), "reader"))))
        .await
        .expect("a read-only client connects");
    assert_eq!(reader.get(b"k").await.expect("read").values[0].0, b"v");
    match reader.put(b"k", b"w", None).await {
        Err(Error::Unauthorised(message)) => {
            println!("read-only client writing: {message}");
            assert!(message.contains("read-only"), "{message}");
            assert!(message.contains("put needs read-write"), "{message}");
        }
        other => panic!("a read-only put was not refused: {other:?}"),
    }
    assert!(matches!(
        reader.delete(b"k", None).await,
        Err(Error::Unauthorised(_))
    ));
    let read = admin.get(b"k").await.expect("read");
    assert_eq!(read.values.len(), 1);
    assert_eq!(read.values[0].0, b"v");

    // A certificate valid for a while, with the write role, works.
    issue(ca, certs.path(), "writer", role, &[], Some(30)).expect("issue");
    let writer = Client::connect(with_identity(&c, Some((certs.path(), "writer"))))
        .await
        .expect("connect");
    writer
        .put(b"k2", b"x", None)
        .await
        .expect("a read-write client writes");
    // Membership commands need the admin role.
    match writer.cluster(ClusterCommand::Plan).await {
        Err(Error::Unauthorised(message)) => {
            assert!(message.contains("cluster needs admin"), "{message}")
        }
        other => panic!("a read-write client's membership command was not refused: {other:?}"),
    }
    let plan = admin
        .cluster(ClusterCommand::Plan)
        .await
        .expect("an admin plans");
    assert!(plan.message.contains("nothing staged"), "{plan:?}");

    // The CLI finds the dev cluster's own certificate.
    let out = c.shoal(&["put", "tour", "hi"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.shoal(&["get", "tour"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("hi"));
}
