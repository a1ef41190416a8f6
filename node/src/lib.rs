//! The Shoal server: a leaderless, Dynamo-style key-value node.
//!
//! A node is a handful of components, each owning its state and holding
//! only the handles it needs; [`coordinator::Node`] owns one of each, wires
//! them, and is what the servers, the tests and the simulation talk to.
//! This page is the map: where each Dynamo concept lives, the life of a put
//! and of a get, who owns what, the lock order and the tasks.
//!
//! # Layout
//! Leaves first; no module imports another in a circle (checked by
//! `tests/tests/layout.rs`, which also keeps every file under 600 lines).
//! - [`clock`]: wall-clock time as a handle, so the simulation controls it;
//!   [`clock::pace`], the rate limit of all background work.
//! - [`config`]: the TOML config, defaults, validation naming the bad field.
//! - [`storage`]: the [`storage::Store`] trait with RocksDB and in-memory
//!   engines; every record is checksummed.
//! - [`version`]: dotted version vector sets: siblings, contexts, merge, and
//!   the actors dots are minted under (a dot is never minted twice).
//! - [`net`]: the peer protocol (every message type, [`net::PeerError`]), the
//!   [`net::Transport`] and [`net::Handler`] traits, QUIC with (mutual) TLS,
//!   and a simulated network for tests. It imports none of the services.
//! - [`membership`]: the member list and the ring built from it: the
//!   founding members of the config, then the replicated, versioned
//!   [`membership::state::ClusterState`] (members, layouts, staged changes,
//!   plan and commit), pure.
//! - [`detector`]: the phi-accrual failure detector, pure.
//! - [`liveness`]: heartbeats feeding the detector, behind the
//!   [`liveness::Liveness`] trait (`is_up`) that everything else uses.
//! - [`metrics`]: counters and histograms, served as Prometheus text.
//! - [`replica`]: this node's copy of the data and the only code that
//!   changes it: key locks, object cache, merge, the client write (dot
//!   minting), compare-and-delete of tombstones, the Merkle trees and their
//!   index ([`replica::trees`]), and hint storage ([`replica::hints`]).
//! - [`coordinator`]: sloppy-quorum reads and writes, forwarding and read
//!   repair ([`coordinator::quorum`], `fanout`, `read_repair`), and the
//!   [`coordinator::Node`] facade with its request routing.
//! - [`gossip`]: push-pull gossip of the cluster state between nodes.
//! - [`handoff`]: delivers hints to their primaries when they are back.
//! - [`antientropy`]: Merkle-tree exchanges between replicas, and the loop
//!   that rebuilds trees, sweeps and reaps.
//! - [`transfer`]: ownership transfer when a committed layout moves
//!   partitions: ack, pull (hints, then Merkle exchanges with the old
//!   replicas), prune, and dropping the copies no longer replicated.
//! - [`reaper`]: deletes tombstones nothing can bring back any more.
//! - [`tasks`]: the handle a node spawns its per-request tasks through, so
//!   a crash ends them.
//! - [`server`]: wiring; [`server::start`] / [`server::run`] are the entry
//!   points, [`server::start_background`] the one place background loops start.
//! - [`certs`]: the CA and certificate tooling of `shoal certs` and `shoal dev`.
//!
//! The `shoal` binary (`src/bin/shoal/`) is argument parsing around these:
//! `shoal node` calls [`server::run`], `shoal dev` starts one `shoal node`
//! process per node on loopback, and the data commands use the SDK.
//!
//! # Life of a put
//! 1. `net::quic::serve_clients` reads a frame and calls
//!    [`net::Handler::client`] on the node, which is
//!    [`coordinator::Node::coordinate`]; it hands every request but `Status`
//!    to [`coordinator::Coordinator::coordinate`].
//! 2. The coordinator takes the ring ([`membership::Membership::view`]) and
//!    the key's preference list. If this node is not one of the N primaries
//!    it forwards the request (`forward`): primaries seen up first, and only
//!    a [`net::TransportError::Unreachable`] one is skipped for the next (a
//!    request that may have run is never run twice).
//! 3. `put` checks sizes and W/PW, decodes the causal context (bounded), and
//!    fails at once if fewer than PW primaries are up.
//! 4. [`replica::Replica::write`] applies the write to the local copy under
//!    the key's stripe lock: [`version::Actors::for_write`] picks the actor,
//!    `Object::update` mints the dot, the clock is pruned, and
//!    `write_object` stores the object and its index entry in one batch,
//!    then updates the object cache and the Merkle trees.
//! 5. The reply context is [`version::Object::reply_context`]: the write and
//!    the context it was given, nothing else.
//! 6. `sloppy_fan_out` starts one task per other primary (`reach`): the
//!    primary if [`liveness::Liveness`] says it is up, else the next live
//!    fallback with a `HintPut`; a failed send moves to the next fallback; a
//!    write nobody took becomes a hint kept here ([`replica::Replica::store_hint`]).
//!    Requests to remote primaries travel in batches per peer, as one
//!    [`net::PeerRequest::Spares`] (`coordinator::spare`): the W-1
//!    primaries after this node in ring order (W if this node is not one)
//!    in a batch that leaves this turn of the scheduler, once the requests
//!    handled in it have joined (a request of more than 16 KiB goes on its
//!    own at once); the others' wait a millisecond for others to the same
//!    peer. What a batch hands back goes again on its own to the same
//!    primary.
//! 7. Each receiver's [`net::Handler::peer`] passes the request (each of a
//!    batch's) to [`replica::Replica::answer`], which merges
//!    ([`replica::Replica::merge`]) or keeps the hint.
//! 8. `Tally::collect` counts acks until W (PW of them primaries) or the
//!    deadline; the client gets the reply or a quorum error naming who
//!    answered. Sends still under way carry on.
//! 9. Later, [`handoff::Handoff::round`] delivers the hints once their primary
//!    is up, and anti-entropy repairs whatever was still missed.
//!
//! # Life of a get
//! 1. As a put, up to the preference list (forwarded if not a primary).
//! 2. `get` checks R/PR and the primaries up, then `sloppy_fan_out` asks all
//!    N primaries (this node's own copy answered in place by
//!    [`replica::Replica::answer`], the R-1 after it in a batch that
//!    leaves this turn, or alone when this node's copy is not cached and
//!    small, the others in batches after the window, as in a put); a
//!    fallback standing in answers from its hint (`HintGet`).
//! 3. `Tally::collect` waits for R answers (PR primaries); the reply is the
//!    merge of what was heard, with its clock as the causal context.
//! 4. A read-repair task (`coordinator::read_repair`) keeps reading the
//!    slower answers for `timeouts.read-repair-ms`, merges all, and sends the
//!    merge to each primary whose copy does not descend from it.
//!
//! # Who owns what
//! | State | Owner | Shared as |
//! |---|---|---|
//! | the store: objects, index, hints, meta | [`replica::Replica`] | `Arc<Replica>` to coordinator, handoff, anti-entropy, reaper |
//! | key locks + object cache (stripes) | `Replica` (`replica::stripe`) | private |
//! | actors / incarnation | `Replica` | private |
//! | Merkle trees, rebuild progress | `Replica` (`replica::trees`) | copies via `tree`/`trees` |
//! | hint counts per primary | `Replica` (`replica::hints`) | copies via `hint_counts` |
//! | failure detector | [`liveness::Detector`] | `Arc<dyn Liveness>` |
//! | members and ring | [`membership::Membership`] | `Arc<Membership>` |
//! | last exchange per partition | [`antientropy::AntiEntropy`] | `shoal status` |
//! | counters and histograms | [`metrics::Metrics`] | `Arc<Metrics>` to all |
//! | connections | the [`net::Transport`] | `Arc<T>` to all that call peers |
//!
//! The facade ([`coordinator::Node`]) owns the components and delegates;
//! the components never see the facade or each other, except the
//! anti-entropy loop, which drives the reaper so the two never overlap.
//!
//! # Lock order
//! Only `std::sync::Mutex`/`RwLock`, never held across an await.
//! - a key's stripe, then the trees lock (`write_object`; a rebuild's
//!   per-key step);
//! - a key's stripe, then the hint counts lock (`store_hint`,
//!   `delete_delivered`);
//! - a key's stripe, then the actors lock (`Actors::for_write`, `retire`,
//!   `is_current` while pruning);
//! - a key's stripe, then the lost keys lock (a leaf: `replica::lost`);
//! - every stripe, in order, then the actors lock (`Replica::seal`, the
//!   last step of a stop: no code holds two stripes otherwise);
//! - the rebuild lock (a `tokio::sync::Mutex`, held across a whole rebuild
//!   so two never run at once), then the locks above;
//! - a fan-out's fallback pool, then the detector (`Fallbacks::next_live`);
//! - the detector is released before the metrics' peer map is taken; the
//!   membership lock, the exchange log and the metrics are leaves.
//!
//! # Tasks
//! - [`server::start`] spawns the client and peer QUIC servers (which spawn
//!   a task per connection and per stream) and the metrics server.
//! - [`server::start_background`] spawns the node's loops and returns their
//!   handles; it is the only place they start, for the QUIC server and the
//!   simulation alike: heartbeats (`Node::heartbeat_round`, whose pings live
//!   in a `JoinSet` owned by the round), handoff (`Node::handoff_round`),
//!   anti-entropy (`AntiEntropy::run`: tree rebuilds, sweeps, reaping) and
//!   member identification (`Node::say_hello`). Each stops when the `stop`
//!   watch turns true; [`server::Running::stop`] also aborts the handles,
//!   and a simulation crashes a node the same way.
//! - Per request, `sloppy_fan_out` and `fan_out` spawn one task per target
//!   (but the local one, when it is done at once), a batch one task that
//!   waits for its turn or window and sends it, and `get` one read-repair
//!   task, through
//!   the node's [`tasks::Tasks`]
//!   handle. They outlive the request on purpose (slow replicas still get
//!   the write), but not its deadline, and [`tasks::Tasks::abort_all`]
//!   ends them all: a crash in the simulation calls it, and so does
//!   [`server::Running::stop`] once the node's client requests and their
//!   tasks had until their deadline to end ([`tasks::Tasks::drain`]).
//! - Every peer call has a deadline ([`net::Transport::call`] takes one):
//!   a request's sends stop at the request's deadline, background calls
//!   after `timeouts.request-ms`. Handoff and anti-entropy work on every
//!   peer at once, so a peer that never answers holds up only its share.
//!   `/metrics` shows `shoal_request_tasks` and `shoal_tasks_alive`.
//!
//! # Corruption
//! A stored record failing its checksum ([`storage::record`]) is never
//! served. The replica replaces a corrupt object with a lost marker
//! (counted, logged, a new incarnation) wherever it meets one: a read, a
//! write or merge, a tree rebuild. A lost copy answers reads with an error
//! (never counted as "absent"), keeps what writes and merges bring as a
//! partial copy, and is restored only once it has merged with every other
//! primary's copy (`replica::lost` has the rule and why it is enough;
//! [`antientropy::AntiEntropy::restore_lost`] asks the primaries). A
//! corrupt hint is dropped when read or paged; scans list bad records with
//! their error and go on.
//!
//! # Errors
//! `thiserror` enums that say what failed with which input:
//! [`storage::StoreError`], [`version::VersionError`],
//! [`version::DecodeError`], [`replica::ReplicaError`],
//! [`antientropy::ExchangeError`], [`net::TransportError`], and
//! [`net::PeerError`], which travels in `PeerResponse::Error` so that peers
//! and tests match variants, not text. Clients get `WireError`s with a kind.

pub mod antientropy;
pub mod certs;
pub mod clock;
pub mod config;
pub mod coordinator;
pub mod detector;
pub mod gossip;
pub mod handoff;
pub mod liveness;
pub mod log;
pub mod membership;
pub mod metrics;
pub mod net;
pub mod reaper;
pub mod replica;
pub mod server;
pub mod storage;
pub mod tasks;
pub mod transfer;
pub mod version;
