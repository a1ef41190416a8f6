//! Cluster-level test harnesses.
//!
//! # Layout
//! - [`sim`]: an in-process cluster of [`shoal_node::coordinator::Node`]s over
//!   the simulated network and in-memory stores; tests name their faults
//!   (`net.partition("node1", "node2")`, `net.crash("node3")`, ...).
//! - [`chaos`]: real `shoal` processes in network namespaces under a seeded
//!   nemesis (kills, pauses, partitions, degraded links, full disks, clock
//!   jumps), with a workload and a checker; `shoal-chaos` runs it long.
//! - [`explore`]: the seeded, deterministic simulation of whole clusters
//!   (real nodes and background loops, random faults, crashes and power
//!   losses, a workload and an oracle); `shoal-sim` runs seed ranges.
//! - [`process`]: a real `shoal dev` cluster of `shoal node` processes on
//!   loopback, in a temp dir, reaped on drop (kill -9 of the process group).

pub mod chaos;
pub mod explore;
pub mod process;
pub mod sim;
