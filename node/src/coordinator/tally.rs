//! Tallying who answered a fan-out against a quorum.

use shoal_client::error::{ErrorKind, WireError};
use shoal_client::proto::{MemberInfo, Response};
use shoal_ring::NodeId;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::membership::View;
use crate::net::{PeerResponse, TransportError};

/// The outcome of reaching one primary: who answered (the primary, or a
/// fallback `for_primary`), or why nobody did.
pub(super) struct Reply {
    pub(super) from: MemberInfo,
    pub(super) for_primary: Option<MemberInfo>,
    pub(super) result: Result<PeerResponse, TransportError>,
    /// `from`, a primary, holds a copy lost to corruption: the answer
    /// failed, but the replica is read-repaired.
    pub(super) corrupt: bool,
}

impl Reply {
    /// Nothing was heard for `primary`, for the reason given.
    pub(super) fn failed(primary: MemberInfo, why: String) -> Reply {
        let result = Err(TransportError::Failed(primary.name.clone(), why));
        let (from, for_primary, corrupt) = (primary, None, false);
        Reply {
            from,
            for_primary,
            result,
            corrupt,
        }
    }
}

/// Who answered a fan-out, and who did not and why.
#[derive(Default)]
pub(super) struct Tally {
    /// Good answers: who answered, and the primary it stood in for if it
    /// is a fallback (named only in an error).
    ok: Vec<(NodeId, Option<NodeId>)>,
    /// How many of `ok` are primaries.
    pub(super) primaries: u32,
    failed: Vec<String>,
    /// Replies read from the channel.
    pub(super) heard: usize,
    /// For writes: the preference list of each layout in the history (one
    /// unless a change is in transition), each with its own count: the
    /// quorum must be met in every one.
    groups: Vec<Group>,
    /// For reads: primaries asked directly that have not replied yet (see
    /// [`Self::prefer_primaries`]).
    waiting_for: Vec<NodeId>,
    /// Fallbacks' good answers not counted yet: (from, for the primary).
    held: Vec<(MemberInfo, MemberInfo)>,
    /// When `held` answers count even though some of `waiting_for` has not
    /// replied.
    patience: Option<Instant>,
}

/// One layout's preference list and how many of it (primaries, or
/// fallbacks for them) answered.
struct Group {
    members: Vec<NodeId>,
    ok: u32,
    primaries: u32,
}

impl Tally {
    /// A tally against one preference list per layout (`lists`): each
    /// must meet the quorum on its own, and only its members (or fallbacks
    /// standing in for them) count; a coordinator in none of them (a node
    /// whose view is behind, handed a forward) counts for nothing.
    pub(super) fn over(lists: &[Vec<MemberInfo>]) -> Self {
        let mut tally = Tally::default();
        {
            tally.groups = lists
                .iter()
                .map(|l| Group {
                    members: l.iter().map(|m| m.id).collect(),
                    ok: 0,
                    primaries: 0,
                })
                .collect();
        }
        tally
    }

    /// A fallback's answer counts only once every one of `direct` (the
    /// primaries asked directly: up, or this node) has replied. A fallback
    /// knows only the hints it holds: its "absent" must not make a read's
    /// quorum while a primary that is up, and may hold the key, has yet to
    /// answer (one that answers with an error, its store failing, is
    /// replaced by a fallback too). Its answer is still merged into the
    /// reply. Without this a read at a primary that missed a write (down
    /// when it was made), with the next primary down, was answered by that
    /// one's fallback and missed the write the third primary held.
    ///
    /// Until `patience`: a primary the detector sees up whose answer does
    /// not come (its store hangs while it still answers pings) then no
    /// longer holds the read back to its deadline; the read is as sloppy as
    /// before, from then on.
    pub(super) fn prefer_primaries(&mut self, direct: Vec<NodeId>, patience: Instant) {
        self.waiting_for = direct;
        self.patience = Some(patience);
    }

    /// Counts a good answer from `from`, standing in for `for_primary` if set.
    pub(super) fn count(&mut self, from: &MemberInfo, for_primary: Option<&MemberInfo>) {
        self.ok.push((from.id, for_primary.map(|p| p.id)));
        self.primaries += u32::from(for_primary.is_none());
        let replica = for_primary.unwrap_or(from).id;
        for g in self
            .groups
            .iter_mut()
            .filter(|g| g.members.contains(&replica))
        {
            g.ok += 1;
            if for_primary.is_none() {
                g.primaries += 1;
            }
        }
    }

    /// A replica that failed outside of the fan-out (the local copy).
    pub(super) fn fail(&mut self, why: String) {
        self.failed.push(why);
    }

    /// Whether the quorum is met (in every layout's list, in transition).
    fn met(&self, need: u32, need_primaries: u32) -> bool {
        if self.groups.is_empty() {
            return self.ok.len() as u32 >= need && self.primaries >= need_primaries;
        }
        self.groups
            .iter()
            .all(|g| g.ok >= need && g.primaries >= need_primaries)
    }

    /// Reads replies until `need` replicas (`need_primaries` of them
    /// primaries) answered well, all `targets` replied, or the deadline
    /// passed. `seen` sees every good reply, and every corrupt one.
    pub(super) async fn collect(
        &mut self,
        answers: &mut mpsc::UnboundedReceiver<Reply>,
        targets: usize,
        need: u32,
        need_primaries: u32,
        deadline: Instant,
        mut seen: impl FnMut(Reply),
    ) {
        while !self.met(need, need_primaries) && self.heard < targets {
            let until = match self.patience {
                Some(p) if !self.held.is_empty() && !self.waiting_for.is_empty() => p.min(deadline),
                _ => deadline,
            };
            match tokio::time::timeout_at(until, answers.recv()).await {
                Ok(Some(reply)) => {
                    self.heard += 1;
                    let primary = reply.for_primary.as_ref().unwrap_or(&reply.from).id;
                    self.waiting_for.retain(|p| *p != primary);
                    match &reply.result {
                        Ok(_) => {
                            match &reply.for_primary {
                                Some(p) if !self.waiting_for.is_empty() => {
                                    self.held.push((reply.from.clone(), p.clone()))
                                }
                                for_primary => self.count(&reply.from, for_primary.as_ref()),
                            }
                            seen(reply);
                        }
                        Err(e) => {
                            self.failed.push(e.to_string());
                            if reply.corrupt {
                                seen(reply);
                            }
                        }
                    }
                }
                Ok(None) => break,
                // Patience ran out: the primaries still silent no longer
                // hold the fallbacks' answers back.
                Err(_) if until < deadline => self.waiting_for.clear(),
                Err(_) => {
                    self.failed
                        .push("deadline passed before the others answered".into());
                    break;
                }
            }
            if self.waiting_for.is_empty() {
                for (from, for_primary) in std::mem::take(&mut self.held) {
                    self.count(&from, Some(&for_primary));
                }
            }
        }
        if !self.held.is_empty() {
            let held: Vec<String> = (self.held.iter())
                .map(|(from, p)| format!("{} for {}", from.name, p.name))
                .collect();
            self.failed.push(format!(
                "not counted: {} (fallbacks wait for the primaries that are up, {} of which had not answered)",
                held.join(", "),
                self.waiting_for.len()
            ));
        }
    }

    /// The reply if the quorum was met, else the quorum error, which
    /// names (by `view`) who answered and why the others did not.
    pub(super) fn result(
        self,
        need: u32,
        need_primaries: u32,
        what: &str,
        reply: Response,
        view: &View,
    ) -> Result<Response, WireError> {
        if self.met(need, need_primaries) {
            return Ok(reply);
        }
        let ok: Vec<String> = (self.ok.iter())
            .map(|(from, for_primary)| match for_primary {
                None => view.name_of(from),
                Some(p) => format!("{} for {}", view.name_of(from), view.name_of(p)),
            })
            .collect();
        let layouts = if self.groups.len() < 2 {
            String::new()
        } else {
            let counts: Vec<String> = self.groups.iter().map(|g| g.ok.to_string()).collect();
            format!(
                " in each layout of a membership change in transition ({} answered per layout)",
                counts.join(" and ")
            )
        };
        let primaries = if need_primaries > 0 {
            format!(
                " ({need_primaries} of them primaries; {} primaries answered)",
                self.primaries
            )
        } else {
            String::new()
        };
        // A write is not rolled back: say where it is.
        let applied = if what == "write" {
            format!(
                "; the write was stored on {} and may still reach the others (it was not \
                 rolled back: a read may return it)",
                ok.join(", ")
            )
        } else {
            String::new()
        };
        Err(WireError {
            kind: ErrorKind::Quorum,
            message: format!(
                "{what} needed {need} replicas{primaries}{layouts}, {} answered ({}); failures: {}{applied}",
                ok.len(),
                ok.join(", "),
                self.failed.join("; ")
            ),
            answered: ok,
            needed: need,
        })
    }
}
