//! The Shoal Rust SDK and the client wire protocol.
//!
//! This crate owns the public contract between applications and a Shoal
//! cluster: the request and response types, the frame codec, the opaque causal
//! context and the typed errors. It never touches RocksDB, so an application
//! that depends on it builds quickly.
//!
//! # Layout
//! - [`client`]: [`Client`], long-lived QUIC connections, routing of each request
//!   to a replica of its key, retries on another node, read-modify-write.
//! - [`proto`]: the messages on the client port.
//! - [`frame`]: `u32 length | u32 crc32 | MessagePack` framing with a length cap,
//!   shared with the node for its peer port too.
//! - [`rpc`]: one request/response on a stream, with fast detection of a
//!   dead peer and a verdict on whether the request may have run.
//! - [`error`]: [`Error`], what a call can fail with, and its wire form.
//! - [`tls`]: PEM loading and QUIC/TLS client set-up (TLS 1.3, the cluster CA).
//!
//! # Example
//! Against a running `shoal dev` cluster (the directory is printed at start-up):
//!
//! ```no_run
//! use shoal_client::{Client, ClientConfig};
//!
//! # async fn tour() -> Result<(), shoal_client::Error> {
//! let config = ClientConfig::from_dir(std::path::Path::new(".shoal-dev"))?;
//! let client = Client::connect(config).await?;
//!
//! client.put(b"greeting", b"hello", None).await?;
//! let read = client.get(b"greeting").await?;
//! assert_eq!(read.values[0].0, b"hello");
//!
//! // Two writers without a context: both values are kept as siblings.
//! client.put(b"cart", b"apple", None).await?;
//! client.put(b"cart", b"pear", None).await?;
//! // Resolve by merging, and write back with the context that covers both.
//! client
//!     .read_modify_write(b"cart", 5, |siblings| {
//!         let mut items: Vec<&[u8]> = siblings.iter().map(|v| &v.0[..]).collect();
//!         items.sort();
//!         items.join(&b","[..])
//!     })
//!     .await?;
//! # Ok(())
//! # }
//! ```
//! `client/examples/tour.rs` is the same tour as a program:
//! `cargo run -p shoal-client --example tour -- .shoal-dev`.

pub mod client;
pub mod error;
pub mod frame;
pub mod proto;
pub mod rpc;
pub mod tls;

pub use client::{Client, ClientConfig};
pub use error::{Error, ErrorKind, WireError};
pub use proto::{CausalContext, GetReply, PutReply, RequestOptions, Value};
