//! Read repair: after a read has replied, the coordinator keeps listening
//! for the slower replicas for `timeouts.read-repair-ms`, merges everything it
//! heard, and sends the merge to every primary whose copy lacks part of it.
//! Runs in a task of its own; repair never delays the reply.

use std::sync::atomic::Ordering;

use shoal_client::proto::MemberInfo;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::quorum::Coordinator;
use super::tally::Reply;
use crate::net::{PeerRequest, PeerResponse, Transport};
use crate::storage::Store;
use crate::version::Object;

impl<T: Transport, S: Store> Coordinator<T, S> {
    /// Collects the answers still outstanding (for at most the read-repair
    /// window), then sends the merge of everything heard to every primary
    /// whose copy lacks part of it.
    pub(super) async fn read_repair(
        &self,
        key: Vec<u8>,
        mut heard: Vec<Heard>,
        mut answers: mpsc::UnboundedReceiver<Reply>,
        mut outstanding: usize,
    ) {
        let window = Instant::now() + self.settings.read_repair_window;
        while outstanding > 0 {
            match tokio::time::timeout_at(window, answers.recv()).await {
                Ok(Some(reply)) => {
                    outstanding -= 1;
                    heard.extend(Heard::from_reply(reply));
                }
                _ => break,
            }
        }
        // Merging and comparing copies of megabytes: off the worker.
        let (merged, stale) = crate::tasks::heavy_for(Heard::bytes(&heard), || {
            let merged = Heard::merge_all(&heard);
            let stale: Vec<&Heard> = heard
                .iter()
                .filter(|h| h.primary && !h.object.as_ref().is_some_and(|o| o.descends(&merged)))
                .collect();
            (merged, stale)
        });
        if merged == Object::default() {
            return;
        }
        // All at once, each with the whole budget.
        let deadline = Instant::now() + self.settings.request_timeout;
        let key = &key;
        let repairs = stale.into_iter().map(|h| {
            let request = PeerRequest::ReplicaPut {
                key: key.clone(),
                object: super::fanout::copy(&merged),
            };
            async move {
                match self.replica_call(&h.from, request, deadline).await {
                    Ok(PeerResponse::Stored) => {
                        self.metrics.read_repairs.fetch_add(1, Ordering::Relaxed);
                        debug!(replica = %h.from.name, key = %hex::encode(key), "read repair");
                    }
                    other => {
                        warn!(replica = %h.from.name, answer = ?other, "read repair failed")
                    }
                }
            }
        });
        futures_util::future::join_all(repairs).await;
    }
}

/// One replica's answer to a read, kept for read repair.
pub(super) struct Heard {
    from: MemberInfo,
    /// A primary (fallbacks answer from hints and are not repaired).
    primary: bool,
    object: Option<Object>,
}

impl Heard {
    pub(super) fn from_reply(reply: Reply) -> Option<Heard> {
        match reply.result {
            Ok(PeerResponse::Object(object)) => Some(Heard {
                from: reply.from,
                primary: reply.for_primary.is_none(),
                object,
            }),
            // A primary whose copy was lost to corruption holds nothing.
            Err(_) if reply.corrupt => Some(Heard {
                from: reply.from,
                primary: true,
                object: None,
            }),
            _ => None,
        }
    }

    /// The merge of every copy heard (callers run it off the worker when
    /// the copies are megabytes: [`Heard::bytes`]).
    pub(super) fn merge_all(heard: &[Heard]) -> Object {
        let mut merged = Object::default();
        for o in heard.iter().filter_map(|h| h.object.as_ref()) {
            merged.merge(o);
        }
        merged
    }

    /// About how many bytes the copies heard take.
    pub(super) fn bytes(heard: &[Heard]) -> usize {
        heard
            .iter()
            .filter_map(|h| h.object.as_ref())
            .map(Object::approx_size)
            .sum()
    }
}
