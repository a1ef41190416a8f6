//! The clients and the nemesis of one seed, and the history they record.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_client::proto::{Request, Response};
use shoal_client::CausalContext;
use shoal_node::net::sim::{SimNetwork, SimRng};
use tokio::sync::oneshot;

use super::world::{World, SYNC_EVERY};
use crate::sim::D;

/// A client gives up on a request after this (the node may still apply it).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

/// Where a write's causal context came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ctx {
    /// No context: a blind write.
    None,
    /// The context of a read just before (read-modify-write).
    Read,
    /// The context of a read made long before (a stale context).
    Stale,
    /// The context of this client's previous write's reply.
    Reply,
}

/// One client operation.
#[derive(Debug, Clone)]
pub struct Op {
    pub client: usize,
    pub key: usize,
    /// `Get`, `Put` or `Delete`.
    pub what: &'static str,
    /// The value a put wrote.
    pub value: Option<String>,
    pub ctx: Ctx,
    /// The values the read behind the context saw (what the write may
    /// supersede); for a get, the values it returned.
    pub seen: BTreeSet<String>,
    pub via: String,
    pub start_ms: u64,
    pub end_ms: u64,
    /// Acknowledged (a write) or answered (a get).
    pub ok: bool,
    pub detail: String,
}

impl Op {
    pub fn line(&self) -> String {
        format!(
            "[{:>6}..{:>6} ms] c{} {:<6} k{} {}{} ctx={:?} saw={:?} via {} -> {}",
            self.start_ms,
            self.end_ms,
            self.client,
            self.what,
            self.key,
            self.value.as_deref().unwrap_or(""),
            if self.value.is_some() { "" } else { "-" },
            self.ctx,
            self.seen,
            self.via,
            if self.ok {
                "ok".to_string()
            } else {
                format!("FAILED ({})", self.detail)
            }
        )
    }
}

/// What the clients and the nemesis share.
pub struct Shared {
    pub seed: u64,
    pub net: Arc<SimNetwork>,
    pub world: Mutex<World>,
    pub history: Mutex<Vec<Op>>,
    pub faults: Mutex<Vec<String>>,
    /// (time in ms, machine) of every power loss, for the diagnosis.
    pub power_losses: Mutex<Vec<(u64, usize)>>,
    pub origin: tokio::time::Instant,
    pub keys: usize,
    /// Clients reuse a write's reply context even when the reply says other
    /// siblings are left (see [`super::Options::any_reply_context`]).
    pub any_reply_context: bool,
}

impl Shared {
    pub fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    pub fn key(i: usize) -> Vec<u8> {
        format!("k{i}").into_bytes()
    }

    /// Sends a client request to a random running node, as a task of that
    /// node (its crash aborts it).
    async fn request(
        &self,
        rng: &mut SimRng,
        request: Request,
    ) -> (String, Result<Response, String>) {
        let (node, name) = {
            let w = self.world.lock().expect("world lock");
            let up: Vec<usize> = (0..w.machines.len()).filter(|i| w.is_up(*i)).collect();
            let i = up[rng.below(up.len() as u64) as usize];
            (
                w.machines[i].node.clone().expect("running"),
                w.name(i).to_string(),
            )
        };
        let (tx, rx) = oneshot::channel();
        self.net.spawn_on(&name, async move {
            let _ = tx.send(node.coordinate(request, false).await);
        });
        let r = match tokio::time::timeout(CLIENT_TIMEOUT, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err("the coordinator crashed".to_string()),
            Err(_) => Err("client timeout".to_string()),
        };
        (name, r)
    }

    fn record(&self, op: Op) {
        let line = op.line();
        self.net.note(|| line.clone());
        self.history.lock().expect("history lock").push(op);
    }

    async fn get(
        &self,
        c: usize,
        rng: &mut SimRng,
        key: usize,
    ) -> Option<(CausalContext, BTreeSet<String>)> {
        let start_ms = self.now_ms();
        let (via, r) = self
            .request(
                rng,
                Request::Get {
                    key: Shared::key(key),
                    options: D,
                },
            )
            .await;
        let mut op = Op {
            client: c,
            key,
            what: "get",
            value: None,
            ctx: Ctx::None,
            seen: BTreeSet::new(),
            via,
            start_ms,
            end_ms: self.now_ms(),
            ok: false,
            detail: String::new(),
        };
        let out = match r {
            Ok(Response::Value(v)) => {
                op.ok = true;
                op.seen = v
                    .values
                    .iter()
                    .map(|v| String::from_utf8_lossy(&v.0).into_owned())
                    .collect();
                Some((v.context, op.seen.clone()))
            }
            Ok(other) => {
                op.detail = format!("{other:?}");
                None
            }
            Err(e) => {
                op.detail = e;
                None
            }
        };
        self.record(op);
        out
    }

    /// A put (`value` Some) or delete with `context`; returns the reply's
    /// context if acknowledged.
    #[allow(clippy::too_many_arguments)]
    async fn write(
        &self,
        c: usize,
        rng: &mut SimRng,
        key: usize,
        value: Option<String>,
        ctx: Ctx,
        context: Option<CausalContext>,
        seen: BTreeSet<String>,
    ) -> Option<CausalContext> {
        let any_reply = self.any_reply_context;
        let start_ms = self.now_ms();
        let request = match &value {
            Some(v) => Request::Put {
                key: Shared::key(key),
                value: v.clone().into_bytes(),
                context,
                options: D,
            },
            None => Request::Delete {
                key: Shared::key(key),
                context,
                options: D,
            },
        };
        let (via, r) = self.request(rng, request).await;
        let mut op = Op {
            client: c,
            key,
            what: if value.is_some() { "put" } else { "delete" },
            value,
            ctx,
            seen,
            via,
            start_ms,
            end_ms: self.now_ms(),
            ok: false,
            detail: String::new(),
        };
        let out = match r {
            Ok(Response::Written(w)) => {
                op.ok = true;
                // The reply's context is the coordinator's whole clock: a
                // careful client reuses it only when no sibling it did not
                // see is left (`siblings` == 1 after a put, 0 after a delete).
                let alone = w.siblings <= u32::from(op.value.is_some());
                (alone || any_reply).then_some(w.context)
            }
            Ok(Response::Error(e)) => {
                op.detail = format!("{:?}: {}", e.kind, e.message);
                None
            }
            Ok(other) => {
                op.detail = format!("{other:?}");
                None
            }
            Err(e) => {
                op.detail = e;
                None
            }
        };
        self.record(op);
        out
    }
}

/// One client: `ops` operations on random keys, each at a random node.
pub async fn client(shared: Arc<Shared>, c: usize, ops: usize, mut rng: SimRng) {
    // Contexts of earlier reads (key, context, values seen), for stale writes.
    let mut reads: Vec<(usize, CausalContext, BTreeSet<String>)> = Vec::new();
    // The reply context of this client's last write per key, with what it
    // stands for (the values its read saw plus the value written).
    let mut replies: Vec<Option<(CausalContext, BTreeSet<String>)>> = vec![None; shared.keys];
    let mut n = 0;
    let mut done = 0;
    let fresh = |n: &mut usize| {
        *n += 1;
        format!("s{}-c{c}-{}", shared.seed, *n)
    };
    while done < ops {
        tokio::time::sleep(Duration::from_millis(rng.below(150))).await;
        let key = rng.below(shared.keys as u64) as usize;
        let dice = rng.below(100);
        match dice {
            0..=14 => {
                if let Some((ctx, seen)) = shared.get(c, &mut rng, key).await {
                    reads.push((key, ctx, seen));
                }
                done += 1;
            }
            15..=39 => {
                let v = fresh(&mut n);
                let r = shared
                    .write(
                        c,
                        &mut rng,
                        key,
                        Some(v.clone()),
                        Ctx::None,
                        None,
                        BTreeSet::new(),
                    )
                    .await;
                replies[key] = r.map(|ctx| (ctx, BTreeSet::from([v])));
                done += 1;
            }
            40..=81 => {
                // Read-modify-write (a set-add: the value resolves the
                // siblings it saw), or a delete of what was read.
                let got = shared.get(c, &mut rng, key).await;
                done += 1;
                if let Some((ctx, seen)) = got {
                    reads.push((key, ctx.clone(), seen.clone()));
                    let value = (dice < 70).then(|| fresh(&mut n));
                    let r = shared
                        .write(
                            c,
                            &mut rng,
                            key,
                            value.clone(),
                            Ctx::Read,
                            Some(ctx),
                            seen.clone(),
                        )
                        .await;
                    let mut stands_for = seen;
                    stands_for.extend(value);
                    replies[key] = r.map(|ctx| (ctx, stands_for));
                    done += 1;
                }
            }
            82..=91 => {
                // A write with a context kept from long ago.
                let old: Vec<&(usize, CausalContext, BTreeSet<String>)> =
                    reads.iter().filter(|r| r.0 == key).collect();
                let (ctx, seen, how) = match old.len() {
                    0 => (None, BTreeSet::new(), Ctx::None),
                    len => {
                        let (_, ctx, seen) = old[rng.below(len as u64) as usize];
                        (Some(ctx.clone()), seen.clone(), Ctx::Stale)
                    }
                };
                let value = (rng.below(4) != 0).then(|| fresh(&mut n));
                let r = shared
                    .write(c, &mut rng, key, value.clone(), how, ctx, seen.clone())
                    .await;
                let mut stands_for = seen;
                stands_for.extend(value);
                replies[key] = r.map(|ctx| (ctx, stands_for));
                done += 1;
            }
            _ => {
                // Chained: a write with the previous write's reply context
                // (a re-create when that was a delete).
                let (ctx, seen, how) = match replies[key].take() {
                    Some((ctx, seen)) => (Some(ctx), seen, Ctx::Reply),
                    None => (None, BTreeSet::new(), Ctx::None),
                };
                let v = fresh(&mut n);
                let r = shared
                    .write(c, &mut rng, key, Some(v.clone()), how, ctx, seen.clone())
                    .await;
                let mut stands_for = seen;
                stands_for.insert(v);
                replies[key] = r.map(|ctx| (ctx, stands_for));
                done += 1;
            }
        }
    }
}

/// How many faults a seed injects at least.
pub const MIN_FAULTS: usize = 5;
/// A crashed node is restarted within this.
pub const MAX_DOWN: Duration = Duration::from_secs(6);

/// Fault counts of one seed.
#[derive(Debug, Default, Clone, Copy)]
pub struct FaultStats {
    pub crashes: usize,
    /// Stops that sealed the replica (see `World::stop_cleanly`).
    pub clean_stops: usize,
    pub power_losses: usize,
    pub batches_lost: usize,
    pub partitions: usize,
    pub one_way: usize,
    /// Records made to fail their checksum (an object or a hint).
    pub corruptions: usize,
    /// Membership changes committed by the operator (see [`super::operator`]).
    pub joins: usize,
    pub leaves: usize,
    pub removes: usize,
}

impl FaultStats {
    pub fn total(&self) -> usize {
        self.crashes
            + self.clean_stops
            + self.power_losses
            + self.partitions
            + self.one_way
            + self.corruptions
            + self.joins
            + self.leaves
            + self.removes
    }

    /// Adds the operator's counts.
    pub fn add_changes(&mut self, other: FaultStats) {
        self.joins += other.joins;
        self.leaves += other.leaves;
        self.removes += other.removes;
    }
}

/// Injects named faults until the clients are done and at least
/// [`MIN_FAULTS`] happened: crashes and clean stops (at most `max_down`
/// nodes down at once, each for at most [`MAX_DOWN`]), power losses,
/// partitions both ways
/// and one way, heals, and with `corrupt` one record (an object or a hint
/// of a running node) made to fail its checksum.
pub async fn nemesis(
    shared: Arc<Shared>,
    mut rng: SimRng,
    clients_done: Arc<std::sync::atomic::AtomicBool>,
    power_loss_odds: u64,
    mut corrupt: bool,
) -> FaultStats {
    let mut stats = FaultStats::default();
    let size = shared.world.lock().expect("world lock").machines.len();
    let mut down_since: Vec<Option<u64>> = vec![None; size];
    let max_down = if rng.below(10) == 0 { 2 } else { 1 };
    let log = |what: String| {
        let line = format!("[{:>6} ms] {what}", shared.now_ms());
        shared.net.note(|| line.clone());
        shared.faults.lock().expect("faults lock").push(line);
    };
    // A node sealed at the last draw and serving on, and whether a power
    // loss takes it down.
    let mut sealed: Option<(usize, bool)> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(rng.range(200, 1500))).await;
        if let Some((i, power)) = sealed.take() {
            let mut w = shared.world.lock().expect("world lock");
            if w.is_up(i) {
                let power = power.then_some(&mut rng);
                take_down(&shared, &mut w, i, Down::AfterSeal, power, &mut stats, &log);
                down_since[i] = Some(shared.now_ms());
            }
        }
        if clients_done.load(std::sync::atomic::Ordering::SeqCst) && stats.total() >= MIN_FAULTS {
            break;
        }
        let now = shared.now_ms();
        let mut w = shared.world.lock().expect("world lock");
        // Nobody stays down past MAX_DOWN.
        for (i, since) in down_since.iter_mut().enumerate() {
            if w.machines[i].gone {
                *since = None;
                continue;
            }
            if since.is_some_and(|t| now - t >= MAX_DOWN.as_millis() as u64) {
                *since = None;
                w.start(i);
                log(format!("restart {} (down too long)", w.name(i)));
            }
        }
        let pick = |rng: &mut SimRng| rng.below(size as u64) as usize;
        let down: Vec<usize> = (0..size)
            .filter(|i| !w.is_up(*i) && !w.machines[*i].gone)
            .collect();
        let dice = rng.below(100);
        shared.net.note(|| format!("nemesis draws {dice}"));
        if !down.is_empty() && dice < 40 {
            let i = down[rng.below(down.len() as u64) as usize];
            down_since[i] = None;
            w.start(i);
            log(format!("restart {}", w.name(i)));
            continue;
        }
        match dice % 20 {
            0..=5 => {
                let i = pick(&mut rng);
                if w.is_up(i) && down.len() < max_down {
                    let power = rng.below(100) < power_loss_odds;
                    // Decided by the dice already drawn, so that seeds
                    // draw what they drew before clean stops came in.
                    if dice >= 80 {
                        // The node serves on, sealed, until the next draw:
                        // a stop's stragglers, at length (their writes
                        // make the next start take a new incarnation).
                        w.seal(i);
                        stats.clean_stops += 1;
                        log(format!("clean stop of {}, serving on sealed", w.name(i)));
                        sealed = Some((i, power));
                    } else {
                        let how = if dice >= 60 {
                            Down::CleanStop
                        } else {
                            Down::Crash
                        };
                        let power = power.then_some(&mut rng);
                        take_down(&shared, &mut w, i, how, power, &mut stats, &log);
                        down_since[i] = Some(now);
                    }
                }
            }
            6..=10 => {
                let (a, b) = (pick(&mut rng), pick(&mut rng));
                if a != b {
                    w.net.partition(w.name(a), w.name(b));
                    stats.partitions += 1;
                    log(format!("partition {} <-> {}", w.name(a), w.name(b)));
                }
            }
            11..=13 => {
                let (a, b) = (pick(&mut rng), pick(&mut rng));
                if a != b {
                    w.net.cut(w.name(a), w.name(b));
                    stats.one_way += 1;
                    log(format!("one-way cut {} -> {}", w.name(a), w.name(b)));
                }
            }
            14..=17 => {
                w.net.heal();
                log("heal partitions".into());
            }
            // Drawn only in seeds that corrupt (the others' schedules stay).
            18..=19 if corrupt => {
                let i = pick(&mut rng);
                let hint = rng.below(2) == 0;
                let key = Shared::key(rng.below(shared.keys as u64) as usize);
                if let Some(what) = w.corrupt(i, &key, hint) {
                    corrupt = false;
                    stats.corruptions += 1;
                    log(format!("corrupt {what} on {}", w.name(i)));
                }
            }
            _ => {}
        }
    }
    stats
}

/// How the nemesis takes a node down.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Down {
    /// kill -9.
    Crash,
    /// The end of a stop: tasks aborted, the replica sealed.
    CleanStop,
    /// The end of a node sealed a while ago (see [`nemesis`]).
    AfterSeal,
}

/// Takes machine `i` down `how`, with a power loss if `power` is given;
/// counts and logs it.
fn take_down(
    shared: &Shared,
    w: &mut World,
    i: usize,
    how: Down,
    power: Option<&mut SimRng>,
    stats: &mut FaultStats,
    log: &impl Fn(String),
) {
    let power_loss = power.is_some();
    let lost = match how {
        Down::CleanStop => w.stop_cleanly(i, power),
        Down::Crash | Down::AfterSeal => w.crash(i, power),
    };
    let name = w.name(i).to_string();
    match how {
        Down::CleanStop => {
            stats.clean_stops += 1;
            log(format!("clean stop of {name}"));
        }
        Down::AfterSeal => log(format!("{name} goes down, sealed since the last draw")),
        Down::Crash => {}
    }
    // A power loss right after a clean stop finds nothing unsynced (the
    // seal synced it all) unless something wrote after.
    if power_loss && (how != Down::CleanStop || lost > 0) {
        let now = shared.now_ms();
        shared
            .power_losses
            .lock()
            .expect("power lock")
            .push((now, i));
        stats.power_losses += 1;
        stats.batches_lost += lost;
        log(format!(
            "power loss of {name} ({lost} unsynced batches lost)"
        ));
    } else if how == Down::Crash {
        stats.crashes += 1;
        log(format!("crash of {name}"));
    }
}

/// The operating system flushing every WAL now and then.
pub async fn syncer(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(SYNC_EVERY).await;
        shared.world.lock().expect("world lock").sync_all();
    }
}
