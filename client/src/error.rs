//! Typed errors of the SDK, and their wire form.

use serde::{Deserialize, Serialize};

/// What kind of failure a node reported; travels on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Fewer replicas answered than R/W/PR/PW required.
    Quorum,
    /// The request did not finish within its timeout.
    Timeout,
    /// A key or value over its limit; nothing was written.
    TooLarge,
    /// The request was malformed or its options impossible.
    BadRequest,
    /// The caller is not allowed to do this.
    Unauthorised,
    /// The node does not serve: it is starting and does not know the full
    /// ring yet, or stopping, or no longer a member. The request did not
    /// run; another node may take it.
    NotReady,
    /// Stored data failed its checksum; it was not served.
    Corruption,
    /// Anything else that went wrong inside the node.
    Internal,
}

/// An error as a node sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub kind: ErrorKind,
    pub message: String,
    /// For quorum failures: the replicas that did answer, by name.
    pub answered: Vec<String>,
    /// For quorum failures: how many answers were required.
    pub needed: u32,
}

impl WireError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        WireError {
            kind,
            message: message.into(),
            answered: Vec::new(),
            needed: 0,
        }
    }
}

/// Everything an SDK call can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("quorum not reached: needed {needed}, {} answered [{}]: {message}", answered.len(), answered.join(", "))]
    Quorum {
        needed: u32,
        answered: Vec<String>,
        message: String,
    },
    #[error("request timed out: {0}")]
    Timeout(String),
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("unauthorised: {0}")]
    Unauthorised(String),
    #[error("no node could serve the request: {0}")]
    Unavailable(String),
    #[error("stored data is corrupt: {0}")]
    Corruption(String),
    #[error("node error: {0}")]
    Server(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("client configuration: {0}")]
    Config(String),
    #[error("conflict not resolved after {0} attempts: concurrent writers keep adding siblings")]
    Conflict(u32),
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Self {
        match e.kind {
            ErrorKind::Quorum => Error::Quorum {
                needed: e.needed,
                answered: e.answered,
                message: e.message,
            },
            ErrorKind::Timeout => Error::Timeout(e.message),
            ErrorKind::TooLarge => Error::TooLarge(e.message),
            ErrorKind::BadRequest => Error::BadRequest(e.message),
            ErrorKind::Unauthorised => Error::Unauthorised(e.message),
            ErrorKind::NotReady => Error::Unavailable(e.message),
            ErrorKind::Corruption => Error::Corruption(e.message),
            ErrorKind::Internal => Error::Server(e.message),
        }
    }
}
