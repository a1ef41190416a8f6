//! One request/response exchange on a fresh stream of a long-lived
//! connection, shared by the SDK and the node's peer transport.
//!
//! A QUIC connection to a process that was killed looks healthy until its idle
//! timeout: nothing tells the sender (ICMP is not surfaced). So after sending,
//! the caller watches for any ACK from the peer: a live peer acknowledges
//! within its ACK delay (25 ms) plus a round trip. If none has arrived after
//! `max(300 ms, 3 x RTT)`, the peer is presumed down, the connection is closed
//! and the call fails as [`CallError::NotDelivered`]: the request never
//! reached the peer's application, so retrying it elsewhere is safe even for a
//! write. A failure after the peer acknowledged is [`CallError::Delivered`]:
//! the request may have run.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::frame;

/// Shortest wait for a sign of life after sending.
const MIN_PROBE: Duration = Duration::from_millis(300);

/// Why a call failed, and whether the request may have been applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// The peer never acknowledged anything of the request.
    NotDelivered(String),
    /// The peer received at least part of the request; it may have run.
    Delivered(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::NotDelivered(e) => write!(f, "{e} (not delivered)"),
            CallError::Delivered(e) => write!(f, "{e}"),
        }
    }
}

/// Sends `request` on a new stream of `conn` and reads one framed response.
pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
    conn: &quinn::Connection,
    request: &Req,
    max_response: usize,
) -> Result<Resp, CallError> {
    let acks_before = conn.stats().frame_rx.acks;
    let heard_back = || conn.stats().frame_rx.acks != acks_before;
    let classify = |e: String| {
        if heard_back() {
            CallError::Delivered(e)
        } else {
            CallError::NotDelivered(e)
        }
    };
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        frame::write(&mut send, request)
            .await
            .map_err(|e| e.to_string())?;
        frame::read::<Resp>(&mut recv, max_response)
            .await
            .map_err(|e| e.to_string())
    };
    tokio::pin!(exchange);
    let probe = (conn.rtt() * 3).max(MIN_PROBE);
    tokio::select! {
        result = &mut exchange => return result.map_err(classify),
        _ = tokio::time::sleep(probe) => {}
    }
    if !heard_back() {
        conn.close(0u32.into(), b"peer presumed down");
        return Err(CallError::NotDelivered(format!(
            "no acknowledgement within {probe:?}: peer presumed down"
        )));
    }
    exchange.await.map_err(classify)
}
