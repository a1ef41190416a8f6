//! Causal contexts come from clients, who may alter them. Over the
//! simulated network: an altered context must not cost anyone's
//! acknowledged write.

use shoal_client::error::ErrorKind;
use shoal_client::proto::RequestOptions;
use shoal_client::CausalContext;
use shoal_ring::NodeId;
use shoal_tests::sim::{error, value, values, written, SimCluster, D};

const ALL: RequestOptions = RequestOptions {
    r: Some(3),
    w: Some(3),
    ..D
};

const TWO: RequestOptions = RequestOptions {
    r: Some(2),
    w: Some(2),
    ..D
};

/// Bytes of a context's seal, at its end.
const TAG: usize = 32;

/// `ctx` with `actor`'s counter raised to `to`, as a client can write it:
/// the entries between the format byte and the seal re-encoded, the seal
/// kept.
fn raise(ctx: &CausalContext, actor: NodeId, to: u64) -> CausalContext {
    let (format, rest) = ctx.0.split_first().expect("a context");
    let (entries, tag) = rest.split_at(rest.len() - TAG);
    let mut triples: Vec<(NodeId, u64, Option<u64>)> =
        rmp_serde::from_slice(entries).expect("entries");
    for (a, c, _) in &mut triples {
        if *a == actor {
            *c = to;
        }
    }
    let mut forged = vec![*format];
    rmp_serde::encode::write(&mut forged, &triples).unwrap();
    forged.extend_from_slice(tag);
    CausalContext(forged)
}

/// A client raised the counter of node Y's actor in a context and wrote
/// through X while Y was cut off: X and Z took the raised entry into the
/// key's clock. Y then wrote under its next counter, below the raised one,
/// and every replica acknowledged; but X's and Z's clocks covered the new
/// dot, so they dropped the value, and the next read dropped it from Y's
/// copy too: an acknowledged write lost to one altered context.
#[tokio::test]
async fn a_context_with_a_raised_counter_cannot_cost_another_write() {
    let c = SimCluster::new(3);
    let p = c.primaries(b"k");
    let (y, x, z) = (p[0].as_str(), p[1].as_str(), p[2].as_str());
    written(c.put(y, b"k", b"v1", None, ALL).await);
    let ctx = value(c.get(y, b"k", ALL).await).context;
    let actor = c.stored(y, b"k").unwrap().siblings()[0].dot.node;
    let forged = raise(&ctx, actor, 1_000_000);

    c.net.partition(y, x);
    c.net.partition(y, z);
    let forged_write = c.put(x, b"k", b"forged", Some(forged), TWO).await;
    c.net.heal();
    written(c.put(y, b"k", b"v3", None, ALL).await);

    let read = values(&value(c.get(x, b"k", ALL).await));
    assert!(
        read.contains(&b"v3".to_vec()),
        "an acknowledged write was lost: read {:?} after {forged_write:?}",
        read.iter()
            .map(|v| String::from_utf8_lossy(v))
            .collect::<Vec<_>>()
    );
    let e = error(forged_write);
    assert_eq!(e.kind, ErrorKind::BadRequest, "{e:?}");
    assert!(e.message.contains("not issued"), "{}", e.message);
}

/// A context read from one key is no context for another: refused, with
/// what to do instead, and nothing written.
#[tokio::test]
async fn a_context_from_another_key_is_refused() {
    let c = SimCluster::new(3);
    written(c.put("node1", b"a", b"v1", None, ALL).await);
    written(c.put("node1", b"b", b"v1", None, ALL).await);
    let ctx = value(c.get("node1", b"a", ALL).await).context;
    let e = error(c.put("node2", b"b", b"v2", Some(ctx.clone()), ALL).await);
    assert_eq!(e.kind, ErrorKind::BadRequest, "{e:?}");
    assert!(e.message.contains("read the key again"), "{}", e.message);
    assert_eq!(
        values(&value(c.get("node3", b"b", ALL).await)),
        [b"v1".to_vec()]
    );
    // Its own key takes it, through any node.
    written(c.put("node3", b"a", b"v2", Some(ctx), ALL).await);
    assert_eq!(
        values(&value(c.get("node2", b"a", ALL).await)),
        [b"v2".to_vec()]
    );
}

/// A context sealed by another cluster (another CA, so another key) is
/// refused like an altered one.
#[tokio::test]
async fn a_context_from_another_cluster_is_refused() {
    let c = SimCluster::new(3);
    written(c.put("node1", b"k", b"v1", None, ALL).await);
    let stored = c.stored("node1", b"k").unwrap();
    let other = shoal_node::version::ContextKey::new(&[9; 32]);
    let ctx = CausalContext(other.seal(b"k", &stored.read_entries()));
    let e = error(c.put("node2", b"k", b"v2", Some(ctx), ALL).await);
    assert_eq!(e.kind, ErrorKind::BadRequest, "{e:?}");
    assert_eq!(
        values(&value(c.get("node3", b"k", ALL).await)),
        [b"v1".to_vec()]
    );
}
