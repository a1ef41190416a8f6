//! Seed inputs: valid encodings of real values, one or more per target, so
//! the fuzzer starts from inputs that get past the first checks. Written
//! to the corpus with `cargo run -p shoal-fuzz --example seed`; the replay
//! test runs them too.

use std::collections::BTreeSet;

use serde::Serialize;
use shoal_client::error::{ErrorKind, WireError};
use shoal_client::frame;
use shoal_client::proto::{
    CausalContext, GetReply, InspectReport, MemberInfo, NodeStatus, PutReply, ReplicaReport,
    Request, RequestOptions, Response, RingInfo, Value,
};
use shoal_node::membership::encode_known;
use shoal_node::net::{
    AaeRequest, AaeResponse, Batched, BatchedAnswer, HandoffEntry, PeerEnvelope, PeerError,
    PeerRequest, PeerResponse,
};
use shoal_node::replica::trees::index_key;
use shoal_node::storage::{record, Tree};
use shoal_node::version::{encode_object, Actors, Object, VersionVector};
use shoal_ring::{NodeId, Ring};

/// `(target, seed name, bytes)` for every seed.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| {
        out.push((target, format!("seed-{name}"), bytes));
    };
    let object = object();
    let members = members();

    for (name, r) in requests(&object) {
        add("client_request", name, body(&(7u64, &r)));
        add("frame", &format!("request-{name}"), framed(&(7u64, &r)));
    }
    for (name, r) in responses(&object, &members) {
        add("client_response", name, body(&(7u64, &r)));
        add("frame", &format!("response-{name}"), framed(&(7u64, &r)));
    }
    for (name, r) in peer_requests(&object, &members[0]) {
        let envelope = PeerEnvelope {
            from: "a".into(),
            request: r,
        };
        add("peer_request", name, body(&(7u64, &envelope)));
        add(
            "frame",
            &format!("peer-request-{name}"),
            framed(&(7u64, &envelope)),
        );
    }
    add("peer_request", "batch-nested", nested_batch(1_000));
    for (name, r) in peer_responses(&object, &members[0]) {
        add("peer_response", name, body(&(7u64, &r)));
        add(
            "frame",
            &format!("peer-response-{name}"),
            framed(&(7u64, &r)),
        );
    }

    add("object", "three-siblings", encode_object(&object));
    add("object", "empty", encode_object(&Object::default()));
    // The target seals its input itself: its seed is the encoded entries
    // (between the format byte and the 32-byte seal); a whole sealed
    // context opens as it is.
    let sealed = crate::context_key().seal(b"k", &object.read_entries());
    add(
        "context",
        "three-entries",
        sealed[1..sealed.len() - 32].to_vec(),
    );
    add("context", "three-entries-sealed", sealed);

    let key = b"greeting".as_slice();
    let hk = [&NodeId::from_u128(3).0[..], key].concat();
    let ik = index_key(5, key);
    for (i, tree) in Tree::ALL.into_iter().enumerate() {
        let value = encode_object(&object);
        let mut raw = vec![i as u8, key.len() as u8];
        raw.extend_from_slice(key);
        raw.extend_from_slice(&record::seal(tree, key, &value));
        add("record", tree.name(), raw);
    }
    add(
        "object_record",
        "object",
        keyed(key, &encode_object(&object)),
    );
    add("object_record", "lost", keyed(key, &[0xEE]));
    add("hint_record", "hint", keyed(&hk, &encode_object(&object)));
    add(
        "meta_record",
        "node-id",
        [&[0u8][..], &NodeId::from_u128(9).0].concat(),
    );
    add(
        "meta_record",
        "incarnation",
        [&[1u8][..], &7u32.to_be_bytes()].concat(),
    );
    add(
        "meta_record",
        "members",
        [&[2u8][..], &encode_known(&members)].concat(),
    );
    add(
        "aae_record",
        "digest",
        keyed(&ik, &0x1234_5678_9abc_def0u64.to_le_bytes()),
    );

    add(
        "config",
        "example",
        include_bytes!("../../../deploy/shoal.example.toml").to_vec(),
    );
    add(
        "config",
        "minimal",
        b"name = \"node1\"\n[tls]\nca-cert = \"ca.pem\"\ncert = \"node1.pem\"\nkey = \"node1.key\"\n"
            .to_vec(),
    );
    out
}

/// Hostile: a peer request body whose batch holds a batch, `depth` deep,
/// in a few kilobytes (a batch may not hold one; its decoding stops at
/// the first).
fn nested_batch(depth: usize) -> Vec<u8> {
    let get = Batched::ReplicaGet { key: b"k".to_vec() };
    let batch = PeerRequest::Spares(vec![get.clone()]);
    let envelope = PeerEnvelope {
        from: "a".into(),
        request: batch.clone(),
    };
    let whole = body(&(7u64, &envelope));
    // Encoded as frames are (`frame::encode`: structs as maps).
    let get = rmp_serde::to_vec_named(&get).expect("encodes");
    let level = rmp_serde::to_vec_named(&batch).expect("encodes");
    let head = &level[..level.len() - get.len()];
    let mut out = whole[..whole.len() - get.len()].to_vec();
    for _ in 1..depth {
        out.extend_from_slice(head);
    }
    out.extend_from_slice(&get);
    out
}

/// A frame body: what follows the header.
fn body<T: Serialize>(message: &T) -> Vec<u8> {
    framed(message)[frame::HEADER_LEN..].to_vec()
}

fn framed<T: Serialize>(message: &T) -> Vec<u8> {
    frame::encode(message).expect("a seed encodes")
}

/// A record target's input: key length, key, value.
fn keyed(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = vec![key.len() as u8];
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    out
}

/// Two concurrent values and a tombstone, written by two actors.
fn object() -> Object {
    let mut o = Object::default();
    for (node, value) in [
        (1, Some(b"apple".to_vec())),
        (2, Some(b"pear".to_vec())),
        (2, None),
    ] {
        let actor = Actors::new(NodeId::from_u128(node), 3)
            .fresh()
            .expect("a fresh actor");
        o.update(&VersionVector::new(), value, actor, 1_700_000_000_000);
    }
    o
}

fn members() -> Vec<MemberInfo> {
    ["a", "b", "c"]
        .into_iter()
        .enumerate()
        .map(|(i, name)| MemberInfo {
            id: NodeId::from_u128(i as u128 + 1),
            name: name.into(),
            client_addr: ([127, 0, 0, 1], 7400 + i as u16).into(),
            peer_addr: ([127, 0, 0, 1], 7500 + i as u16).into(),
            zone: None,
        })
        .collect()
}

fn requests(object: &Object) -> Vec<(&'static str, Request)> {
    let options = RequestOptions {
        r: Some(2),
        w: Some(2),
        pr: None,
        pw: Some(1),
        timeout_ms: Some(500),
    };
    let context = Some(CausalContext(
        crate::context_key().seal(b"k", &object.read_entries()),
    ));
    vec![
        (
            "get",
            Request::Get {
                key: b"k".to_vec(),
                options,
            },
        ),
        (
            "put",
            Request::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                context: context.clone(),
                options,
            },
        ),
        (
            "delete",
            Request::Delete {
                key: b"k".to_vec(),
                context,
                options: RequestOptions::default(),
            },
        ),
        ("ring", Request::Ring),
        ("status", Request::Status),
        ("inspect", Request::Inspect { key: b"k".to_vec() }),
    ]
}

fn responses(object: &Object, members: &[MemberInfo]) -> Vec<(&'static str, Response)> {
    let ids: BTreeSet<NodeId> = members.iter().map(|m| m.id).collect();
    let ring = Ring::claim(None, &ids, 16, 3).expect("a ring of three");
    let context = CausalContext(crate::context_key().seal(b"k", &object.read_entries()));
    vec![
        (
            "value",
            Response::Value(GetReply {
                values: vec![Value(b"apple".to_vec()), Value(b"pear".to_vec())],
                context: context.clone(),
            }),
        ),
        (
            "written",
            Response::Written(PutReply {
                context,
                siblings: 2,
            }),
        ),
        (
            "ring",
            Response::Ring(RingInfo {
                ring,
                members: members.to_vec(),
                n: 3,
                down: vec![members[2].id],
                version: 3,
            }),
        ),
        (
            "status",
            Response::Status(Box::new(NodeStatus {
                id: members[0].id,
                name: "a".into(),
                client_addr: members[0].client_addr,
                peer_addr: members[0].peer_addr,
                pid: 42,
                ring_ready: true,
                partitions_owned: 5,
                waiting_for: vec![],
                unreachable: vec!["c".into()],
                peers: vec![],
                metrics_addr: None,
                hints_pending: vec![],
                hints_delivered: 1,
                anti_entropy: Default::default(),
                ring_version: 2,
                zone: Some("z1".into()),
                transition: None,
                transfer: None,
                keys_unowned: 0,
            })),
        ),
        (
            "inspect",
            Response::Inspect(InspectReport {
                partition: 3,
                replicas: vec![ReplicaReport {
                    node: "a".into(),
                    id: members[0].id,
                    object: None,
                    error: Some("unreachable".into()),
                }],
                hints: vec![],
            }),
        ),
        (
            "error",
            Response::Error(WireError::new(ErrorKind::Quorum, "2 of 3 answered")),
        ),
    ]
}

fn peer_requests(object: &Object, me: &MemberInfo) -> Vec<(&'static str, PeerRequest)> {
    let key = b"k".to_vec();
    let primary = NodeId::from_u128(2);
    vec![
        ("hello", PeerRequest::Hello(me.clone())),
        ("ping", PeerRequest::Ping),
        ("replica-get", PeerRequest::ReplicaGet { key: key.clone() }),
        (
            "batch",
            PeerRequest::Spares(vec![
                Batched::ReplicaGet { key: key.clone() },
                Batched::ReplicaPut {
                    key: key.clone(),
                    object: object.clone(),
                },
            ]),
        ),
        (
            "batch-v1",
            PeerRequest::Batch(vec![Batched::ReplicaGet { key: key.clone() }]),
        ),
        ("reap-check", PeerRequest::ReapCheck { key: key.clone() }),
        (
            "replica-put",
            PeerRequest::ReplicaPut {
                key: key.clone(),
                object: object.clone(),
            },
        ),
        (
            "forward",
            PeerRequest::Forward {
                id: 3,
                request: requests(object).swap_remove(1).1,
            },
        ),
        (
            "hint-put",
            PeerRequest::HintPut {
                key: key.clone(),
                for_primary: primary,
                object: object.clone(),
            },
        ),
        (
            "hint-get",
            PeerRequest::HintGet {
                key: key.clone(),
                for_primary: primary,
            },
        ),
        ("hints-of", PeerRequest::HintsOf { key: key.clone() }),
        (
            "handoff",
            PeerRequest::Handoff(vec![HandoffEntry {
                key: key.clone(),
                object: object.clone(),
                lost: false,
            }]),
        ),
        (
            "aae-branches",
            PeerRequest::Aae(AaeRequest::Branches { partition: 1 }),
        ),
        (
            "aae-leaves",
            PeerRequest::Aae(AaeRequest::Leaves {
                partition: 1,
                branches: vec![0, 3],
            }),
        ),
        (
            "aae-keys",
            PeerRequest::Aae(AaeRequest::Keys {
                partition: 1,
                segments: vec![0, 9],
            }),
        ),
        (
            "aae-objects",
            PeerRequest::Aae(AaeRequest::Objects {
                keys: vec![serde_bytes::ByteBuf::from(key.clone())],
                history: true,
            }),
        ),
        (
            "reap",
            PeerRequest::Reap {
                key,
                object: object.clone(),
            },
        ),
    ]
}

fn peer_responses(object: &Object, me: &MemberInfo) -> Vec<(&'static str, PeerResponse)> {
    vec![
        ("hello", PeerResponse::Hello(me.clone())),
        ("pong", PeerResponse::Pong),
        ("object", PeerResponse::Object(Some(object.clone()))),
        ("stored", PeerResponse::Stored),
        (
            "batch",
            PeerResponse::Spares(vec![
                BatchedAnswer::Object(Some(object.clone())),
                BatchedAnswer::Stored,
                BatchedAnswer::Alone,
            ]),
        ),
        (
            "batch-v1",
            PeerResponse::Batch(vec![BatchedAnswer::Object(Some(object.clone()))]),
        ),
        (
            "forwarded",
            PeerResponse::Forwarded(Response::Error(WireError::new(ErrorKind::Timeout, "late"))),
        ),
        (
            "hints",
            PeerResponse::Hints(vec![(NodeId::from_u128(2), object.clone())]),
        ),
        (
            "aae-branches",
            PeerResponse::Aae(AaeResponse::Branches(vec![1, 2, 3])),
        ),
        (
            "aae-leaves",
            PeerResponse::Aae(AaeResponse::Leaves(vec![vec![4, 5]])),
        ),
        (
            "aae-keys",
            PeerResponse::Aae(AaeResponse::Keys(vec![(
                serde_bytes::ByteBuf::from(b"k".to_vec()),
                6,
            )])),
        ),
        (
            "aae-objects",
            PeerResponse::Aae(AaeResponse::Objects(vec![(
                serde_bytes::ByteBuf::from(b"k".to_vec()),
                Some(object.clone()),
            )])),
        ),
        (
            "error",
            PeerResponse::Error(PeerError::NoBranch {
                branch: 9,
                branches: 4,
            }),
        ),
    ]
}
