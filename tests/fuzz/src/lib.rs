//! Fuzz targets: every decoder that reads bytes from the network or the
//! disk, and what the node does next with what it decoded where that is
//! cheap (merging a decoded object, answering a decoded peer request from a
//! replica, checking a decoded config). Bad input must give an error: a
//! panic, an overflow or a huge allocation is a bug.
//!
//! Each target is a plain function of `&[u8]`, listed in [`TARGETS`]. The
//! fuzzer (`tests/fuzz/harness`, cargo-fuzz on the stable toolchain) calls
//! them, and `tests/fuzz/tests/corpus.rs` replays every file of
//! `tests/fuzz/corpus/<target>/` through them as a plain test, so CI runs
//! the corpus without an instrumented build.
//!
//! Frames and stored records carry a crc32 that random bytes almost never
//! match, so each checksummed format has a target that computes a valid
//! checksum over the fuzzer's bytes ("sealed"), which reaches the parser
//! behind it, besides one that takes the checksum from the input too.
//!
//! # Layout
//! - [`TARGETS`]: name and function of each target.
//! - [`seeds`]: valid encodings of real values to start the corpus from.
//! - [`CappedAlloc`]: the allocator of the harness and the replay test:
//!   an allocation over [`MAX_ALLOC`] aborts, so a length prefix that makes
//!   a decoder reserve gigabytes is caught even if the memory is never
//!   touched.
//! - The targets, network first (frames, client and peer messages), then
//!   versions (objects, contexts), stored records, the config and the
//!   certificates.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;

use serde::de::{DeserializeOwned, IgnoredAny};
use shoal_client::frame::{self, FrameError};
use shoal_client::proto::{MemberInfo, Request, Response};
use shoal_node::config::{Config, MemberConfig};
use shoal_node::coordinator::Settings;
use shoal_node::membership::{decode_known, Membership};
use shoal_node::net::quic::FrameLimits;
use shoal_node::net::tls::{check_peer_name, client_role};
use shoal_node::net::{
    AaeResponse, Batched, BatchedAnswer, PeerEnvelope, PeerRequest, PeerResponse,
};
use shoal_node::replica::hints::{hint_primary, hinted_key};
use shoal_node::replica::trees::{digest, indexed_key};
use shoal_node::replica::{
    decode_incarnation, reapable, Replica, ReplicaSettings, INCARNATION_KEY,
};
use shoal_node::server::{decode_node_id, MEMBERS_KEY, NODE_ID_KEY};
use shoal_node::storage::{record, MemoryStore, Tree};
use shoal_node::version::{
    decode_object, encode_object, Actors, ContextKey, Object, Opened, VersionVector,
};
use shoal_ring::NodeId;

pub mod seeds;

/// A target's name and its harness.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by the name its harness binary and corpus directory have.
pub const TARGETS: &[Target] = &[
    ("frame", frame),
    ("client_request", client_request),
    ("client_response", client_response),
    ("peer_request", peer_request),
    ("peer_response", peer_response),
    ("object", object),
    ("context", context),
    ("record", record),
    ("object_record", object_record),
    ("hint_record", hint_record),
    ("meta_record", meta_record),
    ("aae_record", aae_record),
    ("config", config),
    ("pem", pem),
];

/// Largest single allocation [`CappedAlloc`] grants. Inputs are kilobytes;
/// nothing a decoder does with them needs more.
pub const MAX_ALLOC: usize = 256 << 20;

/// The system allocator, refusing any allocation over [`MAX_ALLOC`] (the
/// program then aborts with "memory allocation of N bytes failed").
pub struct CappedAlloc;

// SAFETY: defers to `System`, or returns null, which `GlobalAlloc` allows.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOC {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOC {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOC {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Frame cap of the targets: far over any input, so the cap never hides
/// a body from the parser.
const MAX_FRAME: usize = 1 << 30;

/// Context entries a node accepts with the default config.
const MAX_CONTEXT_ENTRIES: usize = 256;

/// A fixed wall-clock time for everything the targets stamp.
const NOW_MS: u64 = 1_700_000_000_000;

// ---------------------------------------------------------------- network

/// A whole frame, header and checksum from the input, read as each message
/// type that travels in frames (client and peer port, both ways).
pub fn frame(data: &[u8]) {
    if let Some(header) = data.get(..frame::HEADER_LEN) {
        let header: &[u8; frame::HEADER_LEN] = header.try_into().expect("8 bytes");
        let _ = frame::parse_header(header, MAX_FRAME);
    }
    let _ = frame::decode::<(u64, Request)>(data, MAX_FRAME);
    let _ = frame::decode::<(u64, Response)>(data, MAX_FRAME);
    let _ = frame::decode::<(u64, PeerEnvelope)>(data, MAX_FRAME);
    let _ = frame::decode::<(u64, PeerResponse)>(data, MAX_FRAME);
    // The simulated network decodes with no cap.
    let _ = frame::decode::<(u64, PeerEnvelope)>(data, usize::MAX);
}

/// Decodes `body` as a frame body behind a valid checksum, as the node's
/// stream reader does: a body that is not a message is read for its
/// request id, to refuse that request alone.
fn sealed<T: DeserializeOwned>(body: &[u8]) -> Option<T> {
    match frame::decode_body::<(u64, T)>(body, crc32fast::hash(body)) {
        Ok((_, message)) => Some(message),
        Err(FrameError::Decode(_)) => {
            let _ = rmp_serde::from_slice::<(u64, IgnoredAny)>(body);
            None
        }
        Err(e) => panic!("a body with its own checksum failed as {e}"),
    }
}

/// A client request body (client port), then what the coordinator does
/// with one before it talks to peers: its role and key, its causal
/// context decoded, and a write applied to an object.
pub fn client_request(data: &[u8]) {
    if let Some(request) = sealed::<Request>(data) {
        after_request(&request);
    }
}

fn after_request(request: &Request) {
    let _ = (request.needs(), request.verb(), request.key());
    let _ = request.is_idempotent();
    let (key, context, value) = match request {
        Request::Put {
            key,
            context,
            value,
            ..
        } => (key, context, Some(value.clone())),
        Request::Delete { key, context, .. } => (key, context, None),
        _ => return,
    };
    let ctx = match context {
        Some(c) => match context_key().open(key, &c.0, MAX_CONTEXT_ENTRIES) {
            Ok(ctx) => ctx,
            Err(_) => return,
        },
        None => Opened::default(),
    };
    write(&fixed_object(), &ctx, value);
}

/// A client port answer (read by the SDK), then what the SDK does with
/// one: errors become typed errors, a ring is routed on.
pub fn client_response(data: &[u8]) {
    if let Some(response) = sealed::<Response>(data) {
        after_response(&response);
    }
}

fn after_response(response: &Response) {
    let _ = format!("{response:?}");
    match response {
        Response::Error(e) => {
            let _ = shoal_client::Error::from(e.clone()).to_string();
        }
        Response::Value(v) => {
            let _ = v.context.to_text();
        }
        Response::Written(w) => {
            let _ = w.context.to_text();
        }
        Response::Ring(info) => {
            // The SDK's routing table: each partition's preference list.
            let ring = &info.ring;
            let n = info.n as usize;
            for p in 0..ring.partition_count() {
                let _ = ring.preference_list_for_partition(p, n);
            }
            let _ = ring.owner(ring.partition_of(b"key"));
            let _ = ring.sloppy_list(b"key", n, |id| id.0[0] % 2 == 0);
        }
        Response::Status(_) | Response::Inspect(_) | Response::Cluster(_) => {}
    }
}

/// A peer request body (peer port), then the replica's answer to it, twice
/// (the second merges into what the first stored), over an in-memory
/// store; a `Hello` is learned, a forward checked as a client request.
pub fn peer_request(data: &[u8]) {
    let Some(envelope) = sealed::<PeerEnvelope>(data) else {
        return;
    };
    let request = envelope.request;
    let _ = request.is_bulk();
    let replica = replica();
    match &request {
        PeerRequest::Hello(info) => {
            let _ = membership(vec![info.clone()]).view();
        }
        PeerRequest::Forward { request, .. } => after_request(request),
        PeerRequest::Aae(aae) => {
            let _ = shoal_node::antientropy::answer(&replica, aae.clone());
        }
        PeerRequest::ReplicaPut { object, .. }
        | PeerRequest::HintPut { object, .. }
        | PeerRequest::Reap { object, .. } => after_object(object),
        PeerRequest::Handoff(entries) => entries.iter().for_each(|e| after_object(&e.object)),
        PeerRequest::GossipPush(state) => after_cluster_state(state),
        PeerRequest::Spares(requests) | PeerRequest::Batch(requests) => {
            for request in requests {
                if let Batched::ReplicaPut { object, .. } = request {
                    after_object(object);
                }
            }
        }
        _ => {}
    }
    let me = NodeId::from_u128(1);
    match request {
        PeerRequest::Spares(requests) | PeerRequest::Batch(requests) => {
            let _ = replica.answer_batch(requests.clone(), true);
            let _ = replica.answer_batch(requests, false);
        }
        request => {
            let _ = replica.answer(me, request.clone());
            let _ = replica.answer(me, request);
        }
    }
}

/// A peer answer body, then what the coordinator, handoff and anti-entropy
/// do with one: merge the objects heard.
pub fn peer_response(data: &[u8]) {
    let Some(response) = sealed::<PeerResponse>(data) else {
        return;
    };
    let _ = format!("{response:?}");
    match &response {
        PeerResponse::Object(Some(o)) => after_object(o),
        PeerResponse::Hints(hints) => {
            let mut all = Object::default();
            for (_, o) in hints {
                all.merge(o);
            }
            after_object(&all);
        }
        PeerResponse::Forwarded(r) => after_response(r),
        PeerResponse::Spares(answers) | PeerResponse::Batch(answers) => {
            let mut all = Object::default();
            for answer in answers {
                if let BatchedAnswer::Object(Some(o)) = answer {
                    all.merge(o);
                }
            }
            after_object(&all);
        }
        PeerResponse::Hello(info) => {
            let _ = membership(vec![info.clone()]).view();
        }
        PeerResponse::Aae(AaeResponse::Objects(objects)) => {
            let mut all = Object::default();
            for o in objects.iter().filter_map(|(_, o)| o.as_ref()) {
                all.merge(o);
            }
            after_object(&all);
        }
        PeerResponse::Error(e) => {
            let _ = e.to_string();
        }
        PeerResponse::Gossip(Some(state)) => after_cluster_state(state),
        _ => {}
    }
}

/// What a node does with a gossiped cluster state: check it, merge it into
/// its own (both ways), plan on the result, build its view.
fn after_cluster_state(state: &shoal_node::membership::state::ClusterState) {
    let _ = state.digest();
    let m = membership(Vec::new());
    if m.merge_cluster(state).is_ok() {
        let _ = m.view();
        let merged = m.cluster();
        let _ = merged.plan();
        let mut back = state.clone();
        back.merge(&merged);
        let _ = back.unsynced();
    }
}

// --------------------------------------------------------------- versions

/// A stored or received object's bytes (format byte, then MessagePack).
pub fn object(data: &[u8]) {
    if let Ok(o) = decode_object(data) {
        after_object(&o);
    }
}

/// What replicas do with an object they decoded: re-encode it, merge it
/// both ways with another, prune its clock, test it for reaping, write
/// over it with its own context.
fn after_object(o: &Object) {
    let again = decode_object(&encode_object(o)).expect("an encoded object decodes");
    assert_eq!(&again, o, "an object survives its own encoding");
    let other = fixed_object();
    let _ = Object::merged(o, &other);
    let _ = Object::merged(&other, o);
    let _ = o.descends(&other);
    let _ = (o.approx_size(), o.values().count(), o.is_deleted());
    let _ = context_key().seal(b"k", &o.read_entries());
    let _ = reapable(o, std::time::Duration::from_secs(3600), NOW_MS);
    let mut pruned = o.clone();
    pruned.prune(2, 0, NOW_MS, |_| false);
    write(o, &o.context().into(), Some(b"v".to_vec()));
}

/// A causal context a client sent back for key `k`, then a write with it.
/// The fuzzer's bytes are opened as they are (the seal and what guards it)
/// and, sealed by the harness, as the encoded vector behind a valid seal,
/// so the decoder and the write are reached.
pub fn context(data: &[u8]) {
    let key = context_key();
    let _ = key.open(b"k", data, MAX_CONTEXT_ENTRIES);
    let Ok(ctx) = key.open(b"k", &key.seal_encoded(b"k", data), MAX_CONTEXT_ENTRIES) else {
        return;
    };
    let again = key
        .open(b"k", &key.seal(b"k", &ctx.entries()), MAX_CONTEXT_ENTRIES)
        .expect("a sealed context opens");
    assert_eq!(again, ctx, "a context survives its own sealing");
    write(&fixed_object(), &ctx, Some(b"v".to_vec()));
    write(&Object::default(), &ctx, None);
}

/// The harness cluster's context key, which its seeds are sealed with.
pub fn context_key() -> ContextKey {
    ContextKey::new(&[0x5a; 32])
}

/// A client write onto `object` as the replica applies it: pick the actor,
/// mint the dot, hand out the reply context.
fn write(object: &Object, ctx: &Opened, value: Option<Vec<u8>>) {
    let actors = Actors::new(NodeId::from_u128(1), 7);
    let Ok(actor) = actors.for_write(object, &ctx.vector) else {
        return;
    };
    let mut written = object.clone();
    if let Some(dot) = written.update_from(&ctx.vector, &ctx.stamps, value, actor, NOW_MS) {
        let _ = context_key().seal(b"k", &written.reply_entries(&ctx.vector, dot));
    }
    let _ = actors.retire(&written);
}

/// An object with two siblings and a tombstone, to merge decoded ones with.
fn fixed_object() -> Object {
    let actors = Actors::new(NodeId::from_u128(2), 1);
    let mut o = Object::default();
    for value in [Some(b"a".to_vec()), Some(b"b".to_vec()), None] {
        let actor = actors.fresh().expect("a fresh actor");
        o.update(&VersionVector::new(), value, actor, NOW_MS);
    }
    o
}

// ----------------------------------------------------------------- records

/// Splits `data` into a key (its length in the first byte) and the rest.
fn key_and_rest(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (&len, rest) = data.split_first()?;
    let len = usize::from(len).min(rest.len());
    Some(rest.split_at(len))
}

/// Seals `value` under `tree` and `key` and opens it again, as every store
/// does on a write and a read: the parser behind the checksum is reached.
fn stored(tree: Tree, key: &[u8], value: &[u8]) -> Vec<u8> {
    let opened =
        record::open(tree, key, &record::seal(tree, key, value)).expect("a sealed record opens");
    assert_eq!(opened, value, "a record holds what was sealed");
    opened
}

/// A raw stored record, checksum included: tree (first byte), key, record.
pub fn record(data: &[u8]) {
    let Some((&tree, rest)) = data.split_first() else {
        return;
    };
    let tree = Tree::ALL[usize::from(tree) % Tree::ALL.len()];
    if let Some((key, raw)) = key_and_rest(rest) {
        let _ = record::open(tree, key, raw);
    }
}

/// An object record behind a valid checksum (key, then value): the lost
/// marker or an object, and its tree digest.
pub fn object_record(data: &[u8]) {
    let Some((key, value)) = key_and_rest(data) else {
        return;
    };
    let value = stored(Tree::Objects, key, value);
    let _ = digest(&value);
    object(&value);
}

/// A hint record behind a valid checksum (hints-tree key, then value):
/// the primary and key it is for, its object merged with another hint.
pub fn hint_record(data: &[u8]) {
    let Some((hk, value)) = key_and_rest(data) else {
        return;
    };
    let value = stored(Tree::Hints, hk, value);
    let _ = (hint_primary(hk), hinted_key(hk));
    if let Ok(o) = decode_object(&value) {
        let mut merged = fixed_object();
        merged.merge(&o);
        after_object(&merged);
    }
}

/// A meta record behind a valid checksum: which one (first byte: node id,
/// incarnation, learned members), then its value.
pub fn meta_record(data: &[u8]) {
    let Some((&which, value)) = data.split_first() else {
        return;
    };
    let keys = [NODE_ID_KEY, INCARNATION_KEY, MEMBERS_KEY];
    let key = keys[usize::from(which) % keys.len()];
    let value = stored(Tree::Meta, key, value);
    if key == NODE_ID_KEY {
        let _ = decode_node_id(&value);
    } else if key == INCARNATION_KEY {
        let _ = decode_incarnation(&value);
    } else if let Ok(known) = decode_known(&value) {
        // As a node starts: learn them, build the ring once all are known.
        let _ = membership(known).view();
    }
}

/// An anti-entropy index record behind a valid checksum (index key, then
/// a value, which is not read).
pub fn aae_record(data: &[u8]) {
    let Some((ik, value)) = key_and_rest(data) else {
        return;
    };
    let _ = stored(Tree::Aae, ik, value);
    let _ = indexed_key(ik);
}

// ------------------------------------------------------------------ config

/// A node's config file (TOML), then what a start does with a valid one.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(config) = parse_config(text) else {
        return;
    };
    let _ = config.all_members();
    let _ = Settings::from_config(&config, context_key());
    let _ = FrameLimits::new(&config.limits);
    // `shoal dev` writes configs that nodes then load.
    let written = toml::to_string_pretty(&config).expect("a config writes as TOML");
    let again = parse_config(&written).expect("a written config loads");
    assert_eq!(again, config, "a config survives being written");
}

/// A config's text as [`Config::load`] reads it: TOML, then validation
/// (resolving its relative paths, the rest of `load`, cannot fail).
fn parse_config(text: &str) -> Option<Config> {
    let config: Config = toml::from_str(text).ok()?;
    config.validate().ok()?;
    Some(config)
}

/// A PEM file a node or client loads (CA, certificate, key), then what is
/// read from a certificate: the node name it is for, the client role.
pub fn pem(data: &[u8]) {
    if let Ok(certs) = shoal_client::tls::parse_certs(data) {
        for cert in &certs {
            let _ = client_role(cert);
            let _ = check_peer_name(cert, "a");
        }
    }
    let _ = shoal_client::tls::parse_key(data);
    let _ = shoal_client::tls::root_store(data);
    // The same bytes as one DER certificate, as a peer presents it.
    let der = rustls::pki_types::CertificateDer::from(data);
    let _ = client_role(&der);
    let _ = check_peer_name(&der, "a");
}

// ---------------------------------------------------------------- helpers

/// Membership of a three-member cluster (`a`, `b`, `c`) that learned
/// `known`, over 16 partitions.
fn membership(known: Vec<MemberInfo>) -> Membership {
    let expected = ["a", "b", "c"]
        .into_iter()
        .enumerate()
        .map(|(i, name)| MemberConfig {
            name: name.into(),
            peer_addr: ([127, 0, 0, 1], 7500 + i as u16).into(),
        })
        .collect();
    Membership::new(expected, known, 16, 3)
}

/// A fresh replica over an empty in-memory store, its trees built.
fn replica() -> Replica<MemoryStore> {
    let settings = ReplicaSettings {
        clock_max_entries: 50,
        clock_min_age_ms: 86_400_000,
        tombstone_grace: std::time::Duration::from_secs(3600),
        reap_fence: std::time::Duration::from_secs(60),
        object_cache_bytes: 0,
        max_siblings: 100,
        max_object_bytes: 64 << 20,
        clock: shoal_node::clock::Clock::from_fn(|| NOW_MS),
    };
    let replica = Replica::new(
        NodeId::from_u128(1),
        Arc::new(MemoryStore::new()),
        settings,
        Arc::new(membership(Vec::new())),
        Arc::default(),
    )
    .expect("a memory store records the incarnation");
    RUNTIME.with(|rt| {
        rt.block_on(replica.rebuild_trees(u32::MAX))
            .expect("an empty store's trees build")
    });
    replica
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
}
