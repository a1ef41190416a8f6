//! Issue 10's family of holes, each a named sequence over the simulated
//! network: a dot minted twice whenever a node forgets a key's history (a
//! reaped tombstone, a pruned clock entry, a lost WAL tail, a reap racing a
//! new write), crafted contexts, a forwarded write run twice, a put's reply
//! context covering writes the client never saw. Each test failed before
//! its fix (the closing note of the issue quotes what each printed).

use std::sync::Arc;
use std::time::Duration;

use shoal_client::error::ErrorKind;
use shoal_client::proto::{MemberInfo, Request, RequestOptions, Response};
use shoal_client::CausalContext;
use shoal_node::antientropy::index_key;
use shoal_node::coordinator::Node;
use shoal_node::membership::Membership;
use shoal_node::net::{PeerRequest, PeerResponse, Transport, TransportError};
use shoal_node::storage::{MemoryStore, Tree};
use shoal_node::version::VersionVector;
use shoal_tests::sim::{error, settings, value, values, written, SimCluster, D};

/// A context for `k` carrying `vv`, sealed with the cluster's key as
/// naming values (its entries age from the write that learns them): what
/// a client could send were the key to leak, or (for real entries) what a
/// read of a copy holding those values hands out. The defenses these tests
/// show stand behind the seal.
fn sealed(vv: &VersionVector) -> CausalContext {
    CausalContext(shoal_tests::sim::context_key().seal(b"k", &naming_values(vv)))
}

/// `vv`'s entries, each naming a value.
fn naming_values(
    vv: &VersionVector,
) -> std::collections::BTreeMap<shoal_ring::NodeId, shoal_node::version::ContextEntry> {
    let at = None;
    (vv.iter())
        .map(|(n, c)| (*n, shoal_node::version::ContextEntry { counter: *c, at }))
        .collect()
}

const TWO: RequestOptions = RequestOptions {
    r: Some(2),
    w: Some(2),
    ..D
};

const ALL: RequestOptions = RequestOptions {
    r: Some(3),
    w: Some(3),
    ..D
};

fn v(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

async fn read_all(c: &SimCluster, via: &str, key: &[u8]) -> Vec<Vec<u8>> {
    values(&value(c.get(via, key, ALL).await))
}

/// Sequence A in process: a context from before the key's tombstone was
/// reaped must not cover a write made after it.
#[tokio::test]
async fn a_context_from_before_a_reap_does_not_cover_a_later_write() {
    let mut s = settings();
    s.aae.tombstone_grace = Duration::ZERO;
    let c = SimCluster::with_settings(3, s);
    written(c.put("node1", b"k", b"v1", None, ALL).await);
    let old = value(c.get("node1", b"k", ALL).await).context;
    written(c.delete("node1", b"k", Some(old.clone()), ALL).await);
    let reaped: u64 = reap_everywhere(&c).await;
    assert_eq!(reaped, 1, "the tombstone is reaped");
    written(c.put("node1", b"k", b"v2", None, ALL).await);
    written(c.put("node1", b"k", b"v3", Some(old), ALL).await);
    assert_eq!(read_all(&c, "node2", b"k").await, [v("v2"), v("v3")]);
}

async fn reap_everywhere(c: &SimCluster) -> u64 {
    let mut n = 0;
    for node in &c.nodes {
        n += node.reap_tombstones().await;
    }
    n
}

/// Clock pruning drops a coordinator's own entry (here at once: at most two
/// entries, no minimum age); a write it coordinates next must not reuse a
/// dot an old context covers.
#[tokio::test]
async fn a_pruned_own_entry_does_not_mint_a_dot_again() {
    let mut s = settings();
    s.clock_max_entries = 2;
    s.clock_min_age_ms = 0;
    let c = SimCluster::with_settings(3, s);
    let pause = || tokio::time::sleep(Duration::from_millis(5));
    written(c.put("node1", b"k", b"v1", None, ALL).await);
    let v1_dot = c.stored("node1", b"k").unwrap().siblings()[0].dot;
    let old = value(c.get("node1", b"k", ALL).await).context;
    pause().await;
    written(c.put("node2", b"k", b"v2", Some(old.clone()), ALL).await);
    pause().await;
    let ctx = value(c.get("node3", b"k", ALL).await).context;
    written(c.put("node3", b"k", b"v3", Some(ctx), ALL).await);
    pause().await;
    written(c.put("node1", b"k", b"v4", None, ALL).await);
    let stored = c.stored("node1", b"k").unwrap();
    let v4 = stored.siblings().iter().find(|s| s.value == Some(v("v4")));
    assert_ne!(
        v4.map(|s| s.dot),
        Some(v1_dot),
        "v4 was minted under v1's dot: {stored:?}"
    );
    written(c.put("node2", b"k", b"v5", Some(old), ALL).await);
    let now = read_all(&c, "node1", b"k").await;
    assert!(
        now.contains(&v("v4")) && now.contains(&v("v5")),
        "v4 was acknowledged and the context of v5 never saw it: {now:?}"
    );
}

/// A node loses the tail of its WAL (fsync off, power loss): its last write
/// is gone from its store but lives on the other replicas. After the
/// restart its next write must not carry that write's dot.
#[tokio::test]
async fn a_lost_wal_tail_does_not_mint_a_dot_again() {
    let mut c = SimCluster::new(3);
    written(c.put("node1", b"k", b"v1", None, ALL).await);
    restart_losing(&mut c, "node1", b"k");
    written(c.put("node1", b"k", b"v2", None, D).await);
    assert_eq!(read_all(&c, "node3", b"k").await, [v("v1"), v("v2")]);
}

/// Restarts `name` over its own store after the store lost `key` (the
/// unsynced tail a power loss takes): a new `Node`, as a restart builds.
fn restart_losing(c: &mut SimCluster, name: &str, key: &[u8]) {
    let settings = c.node(name).settings().clone();
    replace(c, name, settings, Some(key));
}

/// Starts `name` again over its own store with `settings`, the store first
/// losing `lose` if given.
fn replace(
    c: &mut SimCluster,
    name: &str,
    settings: shoal_node::coordinator::Settings,
    lose: Option<&[u8]>,
) {
    let store = c.node(name).store().clone();
    replace_over(c, name, settings, lose, store);
}

/// [`replace`] over `store`.
fn replace_over(
    c: &mut SimCluster,
    name: &str,
    settings: shoal_node::coordinator::Settings,
    lose: Option<&[u8]>,
    store: Arc<MemoryStore>,
) {
    let i = c.nodes.iter().position(|n| n.me().name == name).unwrap();
    let old = c.nodes[i].clone();
    if let Some(key) = lose {
        store.forget(Tree::Objects, key);
        store.forget(Tree::Aae, &index_key(old.partition_of(key), key));
    }
    let membership = membership_of(c);
    let node = Node::new(
        old.me().clone(),
        settings,
        store,
        c.net.transport(name),
        membership,
    )
    .expect("restart");
    c.net.register(name, Arc::new(node.clone()));
    c.nodes[i] = node;
}

/// A data directory is wiped and the node comes back under the same name.
/// It gets a new random id (`server::start`); were the old id kept, its
/// new incarnation still must not be one its earlier life used.
#[tokio::test]
async fn a_wiped_node_that_kept_its_id_does_not_mint_a_dot_again() {
    let mut c = SimCluster::new(3);
    written(c.put("node1", b"k", b"v1", None, ALL).await);
    // Its earlier life and its new one are apart in time, as a wipe and a
    // restart are.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let settings = c.node("node1").settings().clone();
    replace_over(
        &mut c,
        "node1",
        settings,
        None,
        Arc::new(MemoryStore::new()),
    );
    written(c.put("node1", b"k", b"v2", None, D).await);
    assert_eq!(read_all(&c, "node3", b"k").await, [v("v1"), v("v2")]);
}

/// The member list every node of `c` was built with, for a node built anew.
fn membership_of(c: &SimCluster) -> Membership {
    let members: Vec<MemberInfo> = c.nodes.iter().map(|n| n.me().clone()).collect();
    let expected = members
        .iter()
        .map(|m| shoal_node::config::MemberConfig {
            name: m.name.clone(),
            peer_addr: m.peer_addr,
        })
        .collect();
    Membership::new(expected, members, 64, 3)
}

/// Contexts come from clients: one with counters at u64::MAX must not
/// panic a node (a panic under a stripe lock would poison every key of that
/// stripe).
#[tokio::test]
async fn a_context_with_counters_at_their_maximum_gets_an_answer_not_a_panic() {
    let c = SimCluster::new(3);
    written(c.put("node1", b"k", b"v1", None, ALL).await);
    let stored = c.stored("node1", b"k").unwrap();
    let maxed: VersionVector = stored.clock().keys().map(|a| (*a, u64::MAX)).collect();
    let forged = sealed(&maxed);
    let r = c.put("node1", b"k", b"v2", Some(forged), ALL).await;
    assert!(
        matches!(r, Response::Written(_) | Response::Error(_)),
        "{r:?}"
    );
    // The node and the key's stripe still serve.
    written(c.put("node1", b"k", b"v3", None, ALL).await);
    assert!(read_all(&c, "node1", b"k").await.contains(&v("v3")));
}

/// A context with made-up entries: refused by its seal (see the
/// `contexts` tests); and behind the seal (a leaked key), one of
/// thousands of entries is refused by its size, before anything is
/// written: no clock Shoal keeps is that large.
#[tokio::test]
async fn a_context_with_thousands_of_made_up_entries_is_refused() {
    let c = SimCluster::new(3);
    written(c.put("node1", b"k", b"v1", None, ALL).await);
    let vv: VersionVector = (0..10_000u128)
        .map(|i| (shoal_ring::NodeId::from_u128(i + 7), 1))
        .collect();
    for ctx in [
        CausalContext(
            shoal_node::version::ContextKey::new(&[1; 32]).seal(b"k", &naming_values(&vv)),
        ),
        sealed(&vv),
    ] {
        let e = error(c.put("node1", b"k", b"v2", Some(ctx), ALL).await);
        assert_eq!(e.kind, ErrorKind::BadRequest, "{e:?}");
    }
    let e = error(c.put("node1", b"k", b"v2", Some(sealed(&vv)), ALL).await);
    assert!(e.message.contains("10000 entries"), "{}", e.message);
    assert_eq!(read_all(&c, "node2", b"k").await, [v("v1")]);
}

/// A client writes k through node1 with a context of 60 made-up entries
/// (actors beginning with `lead`, `round` in their bytes 12..14), then
/// reads k and writes it again with the context it got.
async fn forge_then_rewrite(c: &SimCluster, lead: &[u8], round: u16) {
    let vv: VersionVector = (0..60u16)
        .map(|i| {
            let mut id = [0u8; 16];
            id[..lead.len()].copy_from_slice(lead);
            id[12..14].copy_from_slice(&round.to_be_bytes());
            id[14..].copy_from_slice(&(i + 1).to_be_bytes());
            (shoal_ring::NodeId(id), 1)
        })
        .collect();
    let forged = Some(sealed(&vv));
    written(c.put("node1", b"k", b"forged", forged, ALL).await);
    let ctx = value(c.get("node1", b"k", ALL).await).context;
    written(c.put("node1", b"k", b"mine", Some(ctx), ALL).await);
}

/// Made-up entries under the coordinator's own incarnation, with epochs
/// it never handed out (a real actor's first ten bytes can be read off
/// any context), in a context past the seal (a leaked key): the
/// coordinator took them for its own and wrote under them (review,
/// helper-95). An actor of this incarnation is the node's own only up to
/// the last epoch it handed out.
#[tokio::test]
async fn made_up_epochs_of_the_coordinators_own_incarnation_are_not_its_own() {
    use shoal_ring::NodeId;
    let c = SimCluster::new(3);
    written(c.put("node1", b"k", b"v1", None, ALL).await);
    let own = c.stored("node1", b"k").unwrap().siblings()[0].dot.node;
    for round in 1..4 {
        forge_then_rewrite(&c, &own.0[..10], round).await;
        let stored = c.stored("node1", b"k").unwrap();
        let minted = stored.siblings().iter().map(|s| s.dot.node);
        let made_up_epoch = |a: NodeId| a.0[..10] == own.0[..10] && a.0[12..14] != [0, 0];
        assert!(
            !minted.clone().any(made_up_epoch),
            "wrote under a made-up actor: {stored:?}"
        );
    }
}

/// The grace period is judged by every primary's own clock: a first
/// primary whose clock runs an hour ahead cannot reap a fresh tombstone.
#[tokio::test]
async fn a_fast_clock_on_one_primary_cannot_reap_early() {
    let mut s = settings();
    s.aae.tombstone_grace = Duration::from_secs(60);
    let mut c = SimCluster::with_settings(3, s);
    let key = b"k";
    let first = c.primaries(key)[0].clone();
    let other = c.primaries(key)[1].clone();
    let mut fast = c.node(&first).settings().clone();
    fast.clock = shoal_node::clock::Clock::from_fn(|| {
        shoal_node::clock::Clock::system().now_ms() + 3_600_000
    });
    replace(&mut c, &first, fast, None);
    written(c.put(&other, key, b"v", None, ALL).await);
    let ctx = value(c.get(&other, key, ALL).await).context;
    written(c.delete(&other, key, Some(ctx), ALL).await);
    assert_eq!(c.node(&first).reap_tombstones().await, 0);
    for n in c.primaries(key) {
        assert!(c.stored(&n, key).is_some(), "{n} reaped a fresh tombstone");
    }
}

/// The put's reply context must cover the client's own write and what its
/// context covered, not a concurrent write it never saw.
#[tokio::test]
async fn a_put_reply_context_does_not_cover_a_write_the_client_never_saw() {
    let c = SimCluster::new(3);
    written(c.put("node1", b"k", b"theirs", None, ALL).await);
    let mine = written(c.put("node1", b"k", b"mine", None, ALL).await);
    written(
        c.put("node1", b"k", b"mine again", Some(mine.context), ALL)
            .await,
    );
    let now = read_all(&c, "node2", b"k").await;
    assert!(
        now.contains(&v("theirs")),
        "a blind write the client never saw was dropped: {now:?}"
    );
}

/// A forwarding node whose reply from the first primary is lost (the
/// request did run there) must not run it again on the next primary.
#[tokio::test]
async fn a_forwarded_put_that_may_have_run_is_not_run_again() {
    forward_once_through(Lossy::AnswerLost).await;
}

/// The same when the first answer is lost and a duplicate of the request
/// is answered instead: "already received" means it ran there.
#[tokio::test]
async fn a_forward_answered_as_a_duplicate_is_not_run_again() {
    forward_once_through(Lossy::Duplicated).await;
}

/// Puts one key through a non-replica whose forwards go through `lossy`;
/// the outcome is reported unknown and the write is on the replicas once.
async fn forward_once_through(lossy: Lossy) {
    let c = SimCluster::new(4);
    let key = b"fwd";
    let forwarder = c.non_replica(key);
    let transport = LossyForwards {
        inner: c.net.transport(&forwarder),
        lossy,
    };
    let me = c.node(&forwarder).me().clone();
    let node = Node::new(
        me,
        settings(),
        Arc::new(MemoryStore::new()),
        transport,
        membership_of(&c),
    )
    .expect("node");
    let r = node
        .coordinate(
            Request::Put {
                key: key.to_vec(),
                value: b"once".to_vec(),
                context: None,
                options: ALL,
            },
            false,
        )
        .await;
    assert!(
        matches!(&r, Response::Error(e) if e.kind == ErrorKind::Timeout),
        "the outcome is unknown, and said so: {r:?}"
    );
    let primary = &c.primaries(key)[0];
    let read = value(c.get(primary, key, ALL).await);
    assert_eq!(read.values.len(), 1, "run once: {read:?}");
}

/// How [`LossyForwards`] loses a forward's answer.
#[derive(Clone, Copy)]
enum Lossy {
    /// The request runs; the caller sees the connection drop.
    AnswerLost,
    /// The request is delivered twice; the caller sees the second answer.
    Duplicated,
}

/// A transport whose forwarded requests run but whose replies are lost.
struct LossyForwards {
    inner: shoal_node::net::sim::SimTransport,
    lossy: Lossy,
}

impl Transport for LossyForwards {
    async fn send(
        &self,
        to: &MemberInfo,
        request: PeerRequest,
    ) -> Result<PeerResponse, TransportError> {
        if !matches!(request, PeerRequest::Forward { .. }) {
            return self.inner.send(to, request).await;
        }
        let answer = self.inner.send(to, request.clone()).await;
        match self.lossy {
            Lossy::AnswerLost => Err(TransportError::Failed(
                to.name.clone(),
                "the connection dropped before the answer".into(),
            )),
            Lossy::Duplicated => {
                drop(answer);
                self.inner.send(to, request).await
            }
        }
    }
}

/// The reaper got through on two primaries but not the third, and a write
/// is coordinated by one that reaped: the third's tombstone must not cover
/// it (the dot minted in the key's new life is not the old one).
#[tokio::test]
async fn a_write_after_a_partial_reap_survives_the_remaining_tombstone() {
    use shoal_node::net::Handler;
    let mut s = settings();
    s.aae.tombstone_grace = Duration::ZERO;
    let c = SimCluster::with_settings(3, s);
    written(c.put("node1", b"k", b"v1", None, ALL).await);
    let ctx = value(c.get("node1", b"k", ALL).await).context;
    written(c.delete("node1", b"k", Some(ctx), ALL).await);
    let tombstone = c.stored("node1", b"k").unwrap();
    for n in ["node1", "node2"] {
        let r = c
            .node(n)
            .peer(
                "node1".into(),
                PeerRequest::Reap {
                    key: b"k".to_vec(),
                    object: tombstone.clone(),
                },
            )
            .await;
        assert_eq!(r, PeerResponse::Stored, "{n} reaps");
    }
    assert!(
        c.stored("node3", b"k").is_some(),
        "node3 keeps its tombstone"
    );
    written(c.put("node1", b"k", b"v2", None, ALL).await);
    // An R=3 read merges every replica's copy, node3's tombstone included.
    assert_eq!(read_all(&c, "node3", b"k").await, [v("v2")]);
}

/// Found by the simulation: a forwarded put delivered twice (the network
/// duplicated it, or its sender thought it lost) ran twice, the second
/// time after a delete had superseded the first, so the value came back.
#[tokio::test]
async fn a_forward_delivered_twice_runs_once() {
    use shoal_node::net::{Handler, PeerError};
    let c = SimCluster::new(4);
    let key = b"dup";
    let primary = c.primaries(key)[0].clone();
    let forward = || PeerRequest::Forward {
        id: 7,
        request: Request::Put {
            key: key.to_vec(),
            value: b"once".to_vec(),
            context: None,
            options: ALL,
        },
    };
    let first = c.node(&primary).peer("node9".into(), forward()).await;
    assert!(
        matches!(first, PeerResponse::Forwarded(Response::Written(_))),
        "{first:?}"
    );
    let ctx = value(c.get(&primary, key, ALL).await).context;
    written(c.delete(&primary, key, Some(ctx), ALL).await);
    let again = c.node(&primary).peer("node9".into(), forward()).await;
    assert!(
        matches!(
            again,
            PeerResponse::Error(PeerError::DuplicateForward { id: 7, .. })
        ),
        "{again:?}"
    );
    assert!(
        read_all(&c, &primary, key).await.is_empty(),
        "the put ran again"
    );
}

/// A delete's context names a write its coordinator has not seen yet (it
/// missed that write). The coordinator joins the context's entry for it
/// into its clock, stamped 0 as entries a context brought then; with the
/// clock over its bound and its other entries older than the minimum age
/// (the defaults' day), pruning dropped that entry in the very write that
/// joined it, and the tombstone went out not covering the write its
/// context covered: the other replicas kept the value beside it, and the
/// deleted key came back (review, helper-90). What a write learns is not
/// pruned by that write.
#[tokio::test(start_paused = true)]
async fn a_deletes_context_entry_is_not_pruned_by_the_delete_itself() {
    let c = with_clock_bound(2);
    let missed_by_node1 = v3_long_ago_missed_by_node1(&c).await;
    // A client read v3 (from node2 and node3) and deletes it through node1.
    let ctx = sealed(&missed_by_node1.context());
    written(c.delete("node1", b"k", Some(ctx), ALL).await);
    assert_eq!(
        read_all(&c, "node2", b"k").await,
        Vec::<Vec<u8>>::new(),
        "the deleted key came back"
    );
}

/// Writes long ago (1 ms after the epoch) under actors of old runs: v1,
/// v2 superseding it, on every node, then v3 superseding v2, on node2 and
/// node3 only. Returns node2's and node3's copy.
async fn v3_long_ago_missed_by_node1(c: &SimCluster) -> shoal_node::version::Object {
    use shoal_ring::NodeId;
    let (x1, x2, x3) = (
        NodeId::from_u128(71),
        NodeId::from_u128(72),
        NodeId::from_u128(73),
    );
    let seen_by_all = an_old_key(&[x1, x2]);
    let mut missed_by_node1 = seen_by_all.clone();
    missed_by_node1.update(&seen_by_all.context(), Some(v("v3")), x3, 1);
    replica_put(c, "node1", &seen_by_all).await;
    for node in ["node2", "node3"] {
        replica_put(c, node, &missed_by_node1).await;
    }
    missed_by_node1
}

/// Three nodes whose key clocks keep `max` entries past the minimum age.
fn with_clock_bound(max: usize) -> SimCluster {
    let mut s = settings();
    s.clock_max_entries = max;
    SimCluster::with_settings(3, s)
}

/// Writes long ago (1 ms after the epoch) under actors of old runs, each
/// superseding the last: the key's clock names them all, and its one live
/// value is the last one's. Stored on every node.
fn an_old_key(actors: &[shoal_ring::NodeId]) -> shoal_node::version::Object {
    let mut o = shoal_node::version::Object::default();
    for (i, a) in actors.iter().enumerate() {
        o.update(&o.context(), Some(v(&format!("v{i}"))), *a, 1);
    }
    o
}

async fn replica_put(c: &SimCluster, node: &str, object: &shoal_node::version::Object) {
    use shoal_node::net::Handler;
    let request = PeerRequest::ReplicaPut {
        key: b"k".to_vec(),
        object: object.clone(),
    };
    let r = c.node(node).peer("node1".into(), request).await;
    assert_eq!(r, PeerResponse::Stored, "{node}");
}

/// A key whose clock is over its bound, its value written long ago: a
/// delete drops the value and its dot's entry goes unreferenced, the
/// oldest, and pruning dropped it in the delete itself. The tombstone
/// went out not covering the value, every other replica kept the value
/// beside it, and the deleted key came back on the next read. A write
/// stamps the entries of the values it supersedes with its own time: it
/// must carry them for the minimum age, as any replica that still holds
/// one of those values needs them to drop it.
#[tokio::test(start_paused = true)]
async fn a_delete_of_a_value_written_long_ago_is_not_undone_by_clock_pruning() {
    let c = with_clock_bound(2);
    use shoal_ring::NodeId;
    // The live value's actor sorts first among the old ones.
    let old = an_old_key(&[
        NodeId::from_u128(72),
        NodeId::from_u128(71),
        NodeId::from_u128(70),
    ]);
    for node in ["node1", "node2", "node3"] {
        replica_put(&c, node, &old).await;
    }
    let ctx = value(c.get("node1", b"k", ALL).await).context;
    written(c.delete("node1", b"k", Some(ctx), ALL).await);
    assert_eq!(
        read_all(&c, "node2", b"k").await,
        Vec::<Vec<u8>>::new(),
        "the deleted key came back"
    );
}

/// A value node1 and node3 missed (written just now through node2, its
/// hint for node3 still waiting) is deleted through node1, with the
/// context of a read from node2. Node1 learns the value's entry from the
/// context, stamped 0 as entries a context brings were; node3, over its
/// bound, dropped that entry in its merge of the tombstone, and the
/// value's late copy then came back beside the tombstone there. An entry
/// a write learns under an actor of one of the cluster's nodes is a real
/// event's, and is stamped with the write's time.
#[tokio::test(start_paused = true)]
async fn an_entry_a_delete_learned_outlives_pruning_on_the_replicas_that_lacked_it() {
    let c = with_clock_bound(3);
    use shoal_ring::NodeId;
    let old = an_old_key(&[NodeId::from_u128(71), NodeId::from_u128(72)]);
    let node2s = shoal_node::version::Actors::new(c.id("node2"), 0)
        .fresh()
        .unwrap();
    let now = c.node("node2").settings().clock.now_ms();
    let mut newer = old.clone();
    newer.update(&old.context(), Some(v("v3")), node2s, now);
    delete_v3_missed_by_node1_and_node3(&c, &old, &newer).await;
}

/// `before` on node1 and node3, `newer` (v3 on top of it) on node2: a
/// client deletes v3 through node1 with the context of a read of node2,
/// then v3's late copies reach node3 and node1 (node2's hint for node3,
/// anti-entropy). No node may hold a value after.
async fn delete_v3_missed_by_node1_and_node3(
    c: &SimCluster,
    before: &shoal_node::version::Object,
    newer: &shoal_node::version::Object,
) {
    replica_put(c, "node1", before).await;
    replica_put(c, "node3", before).await;
    replica_put(c, "node2", newer).await;
    let ctx = sealed(&newer.context());
    written(c.delete("node1", b"k", Some(ctx), ALL).await);
    replica_put(c, "node3", newer).await;
    replica_put(c, "node1", newer).await;
    for node in ["node1", "node2", "node3"] {
        let stored = c.stored(node, b"k").unwrap();
        assert_eq!(
            stored.values().count(),
            0,
            "the deleted value came back on {node}: {stored:?}"
        );
    }
}

/// The young-entry budget route (the simulation's seed 30675 at
/// `--pruning-percent 100 --corruption-percent 50 --spare-reads-percent
/// 100`): as in the test above, a value node1 and node3 missed is deleted
/// through node1 with a context from node2; but the key's clock already
/// held its bound of young entries, real ones (writes of this day under
/// the nodes' earlier incarnations). Node1 then left the learned entry
/// stamped 0, node3 pruned it in its merge of the tombstone, and the
/// value's late copy came back there. Contexts are sealed, so every entry
/// a write learns is a real event's, and is stamped with the write's time.
#[tokio::test(start_paused = true)]
async fn an_entry_a_delete_learned_outlives_pruning_when_the_clock_is_full_of_young_entries() {
    use shoal_node::version::{Actors, Object};
    let c = with_clock_bound(3);
    let now = c.node("node2").settings().clock.now_ms();
    let mut young = Object::default();
    for (i, node) in ["node1", "node2", "node3"].into_iter().enumerate() {
        let actor = Actors::new(c.id(node), 40 + i as u32).fresh().unwrap();
        young.update(&young.context(), Some(v(&format!("v{i}"))), actor, now);
    }
    let node2s = Actors::new(c.id("node2"), 0).fresh().unwrap();
    let mut newer = young.clone();
    newer.update(&young.context(), Some(v("v3")), node2s, now);
    delete_v3_missed_by_node1_and_node3(&c, &young, &newer).await;
}

/// A context kept longer than the minimum age (review, helper-102): it
/// carries entries the clock has pruned since, and a write with it learns
/// them again. Stamped with the write's time, they stayed young for a
/// day, and such writes could fill the clock past what a context may
/// carry (read-modify-writes refused). A context carries each entry's time
/// as the clock that issued it had it: entries that were old then are old
/// when learned, and the next write prunes them again.
#[tokio::test]
async fn entries_from_a_context_older_than_the_minimum_age_do_not_stay() {
    use shoal_node::version::ContextEntry;
    use shoal_ring::NodeId;
    let c = with_clock_bound(3);
    written(c.put("node1", b"k", b"v1", None, ALL).await);
    let long_ago: std::collections::BTreeMap<NodeId, ContextEntry> = (0..20)
        .map(|i| {
            let e = ContextEntry {
                counter: 1,
                at: Some(1),
            };
            (NodeId::from_u128(100 + i), e)
        })
        .collect();
    let ctx = CausalContext(shoal_tests::sim::context_key().seal(b"k", &long_ago));
    written(c.put("node1", b"k", b"v2", Some(ctx), ALL).await);
    written(c.put("node1", b"k", b"v3", None, ALL).await);
    for node in ["node1", "node2", "node3"] {
        let stored = c.stored(node, b"k").unwrap();
        assert!(
            stored.clock().len() <= 3,
            "{node} kept {} entries: {stored:?}",
            stored.clock().len()
        );
    }
}

/// The read behind a delete came from replicas that hold a value its
/// coordinator missed, written long ago (review, helper-103): the
/// context's entry for that value carried its old time, so the delete's
/// coordinator learned it old, the replicas that took the delete pruned
/// it at once, and the value, still on the replica the delete had not
/// reached yet, came back. An entry naming a value the issuing copy
/// holds ages from the write that learns it: that write supersedes the
/// value, as if its coordinator held it.
#[tokio::test(start_paused = true)]
async fn a_delete_learning_an_old_values_entry_from_a_read_is_not_undone() {
    let c = with_clock_bound(2);
    v3_long_ago_missed_by_node1(&c).await;
    // A client reads v3 from node2 and node3 ...
    c.net.partition("node1", "node2");
    c.net.partition("node1", "node3");
    let ctx = value(c.get("node2", b"k", TWO).await).context;
    c.net.heal();
    // ... and deletes it through node1 while node3 is out of reach.
    c.net.partition("node3", "node1");
    c.net.partition("node3", "node2");
    written(c.delete("node1", b"k", Some(ctx), TWO).await);
    // The next write, blind, prunes node1's clock again.
    written(c.put("node1", b"k", b"v4", None, TWO).await);
    c.net.heal();
    assert_eq!(
        read_all(&c, "node2", b"k").await,
        [v("v4")],
        "the deleted value came back"
    );
}
