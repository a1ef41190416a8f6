//! Cluster-level test harnesses.
//!
//! # Layout
//! - [`sim`]: an in-process cluster of [`shoal_node::coordinator::Node`]s over
//!   the simulated network and in-memory stores; tests name their faults
//!   (`net.partition("node1", "node2")`, `net.crash("node3")`, ...).
//! - [`process`]: a real `shoal dev` cluster of `shoal node` processes on
//!   loopback, in a temp dir, reaped on drop (kill -9 of the process group).

pub mod process;
pub mod sim;
