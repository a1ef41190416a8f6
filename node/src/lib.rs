//! The Shoal server: a leaderless, Dynamo-style key-value node.
//!
//! # Layout
//! - [`clock`]: wall-clock time as a handle, so the simulation controls it.
//! - [`config`]: the TOML config, defaults, validation naming the bad field.
//! - [`storage`]: the [`storage::Store`] trait with RocksDB and in-memory
//!   engines; every record is checksummed.
//! - [`version`]: dotted version vector sets: siblings, contexts, merge.
//! - [`net`]: the peer protocol, the [`net::Transport`] trait, QUIC with
//!   (mutual) TLS, and a simulated network for tests.
//! - [`membership`]: the member list and the ring built from it.
//! - [`detector`]: the phi-accrual failure detector, pure.
//! - [`liveness`]: heartbeats feeding the detector; peer up/down transitions.
//! - [`metrics`]: counters and histograms, served as Prometheus text.
//! - [`coordinator`]: sloppy-quorum reads and writes, read repair.
//! - [`antientropy`]: Merkle trees per partition, rebuilt and exchanged.
//! - [`handoff`]: hints kept for down primaries and delivered when they return.
//! - [`server`]: wiring; [`server::start`] / [`server::run`] are the entry points.
//! - [`certs`]: the CA and certificate tooling of `shoal certs` and `shoal dev`.
//!
//! The `shoal` binary (`src/bin/shoal/`) is argument parsing around these:
//! `shoal node` calls [`server::run`], `shoal dev` starts one `shoal node`
//! process per node on loopback, and the data commands use the SDK.

pub mod antientropy;
pub mod certs;
pub mod clock;
pub mod config;
pub mod coordinator;
pub mod detector;
pub mod handoff;
pub mod liveness;
pub mod membership;
pub mod metrics;
pub mod net;
pub mod reaper;
pub mod replica;
pub mod server;
pub mod storage;
pub mod version;
