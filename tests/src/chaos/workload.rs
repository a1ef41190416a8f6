//! The chaos workload: clients that read, read-modify-write (set-adds with
//! contexts), put blindly, delete and re-create, recording every operation
//! for the checker (see [`super::history`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use shoal_client::proto::RequestOptions;
use shoal_client::{Client, ClientConfig, Error};

use super::history::{decode, encode, key_name, Event, Op, Outcome, Seen};

#[derive(Debug, Clone)]
pub struct Workload {
    pub clients: u32,
    pub keys: u32,
    pub seed: u64,
}

/// What a request may be told: R=2, W=2 of N=3, and a bound on each call.
const OPTIONS: RequestOptions = RequestOptions {
    r: Some(2),
    w: Some(2),
    pr: None,
    pw: None,
    timeout_ms: Some(2_000),
};

/// Runs the workload until `until`; returns every operation it tried.
pub async fn run(
    workload: Workload,
    config: ClientConfig,
    started: Instant,
    until: Instant,
) -> Vec<Event> {
    let history = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for c in 0..workload.clients {
        let (config, history, w) = (config.clone(), history.clone(), workload.clone());
        tasks.push(tokio::spawn(async move {
            let client = loop {
                match Client::connect(config.clone()).await {
                    Ok(client) => break Some(client),
                    Err(_) if Instant::now() < until => {
                        tokio::time::sleep(Duration::from_millis(200)).await
                    }
                    Err(_) => break None,
                }
            };
            if let Some(client) = client {
                let mut worker = Worker {
                    client,
                    id: c,
                    next: 0,
                    rng: rand::rngs::StdRng::seed_from_u64(w.seed ^ (u64::from(c) << 20)),
                    started,
                    history,
                };
                while Instant::now() < until {
                    worker.step(w.keys).await;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut all = std::mem::take(&mut *history.lock().expect("history"));
    all.sort_by_key(|e| (e.start_ms, e.client));
    all
}

struct Worker {
    client: Client,
    id: u32,
    next: u32,
    rng: rand::rngs::StdRng,
    started: Instant,
    history: Arc<Mutex<Vec<Event>>>,
}

impl Worker {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn new_id(&mut self) -> u64 {
        self.next += 1;
        (u64::from(self.id) + 1) << 32 | u64::from(self.next)
    }

    fn record(&self, key: u32, start_ms: u64, op: Op, result: Result<(), Error>) {
        let (outcome, error) = match result {
            Ok(()) => (Outcome::Ok, None),
            Err(e) => (classify(&e), Some(e.to_string())),
        };
        let event = Event {
            client: self.id,
            key,
            start_ms,
            end_ms: self.now_ms(),
            op,
            outcome,
            error,
        };
        self.history.lock().expect("history").push(event);
    }

    async fn step(&mut self, keys: u32) {
        // Half the traffic on an eighth of the keys: contention makes
        // siblings and concurrent deletes.
        let key = if self.rng.gen_bool(0.5) {
            self.rng.gen_range(0..keys.div_ceil(8))
        } else {
            self.rng.gen_range(0..keys)
        };
        let name = key_name(key);
        match self.rng.gen_range(0..100) {
            0..=29 => {
                self.read(key).await;
            }
            30..=69 => {
                // Read-modify-write: add an element to the set.
                let Some((values, context)) = self.read(key).await else {
                    return;
                };
                let id = self.new_id();
                let mut elements: Vec<u64> =
                    values.iter().flat_map(|v| v.elements.clone()).collect();
                elements.push(id);
                elements.sort_unstable();
                elements.dedup();
                let observed: Vec<u64> = values.iter().filter_map(|v| v.id).collect();
                let start = self.now_ms();
                let result = self
                    .client
                    .put_with(
                        name.as_bytes(),
                        &encode(id, &elements),
                        Some(&context),
                        OPTIONS,
                    )
                    .await
                    .map(drop);
                let op = Op::Put {
                    id,
                    elements,
                    observed,
                    blind: false,
                };
                self.record(key, start, op, result);
            }
            70..=84 => {
                let id = self.new_id();
                let start = self.now_ms();
                let result = self
                    .client
                    .put_with(name.as_bytes(), &encode(id, &[id]), None, OPTIONS)
                    .await
                    .map(drop);
                let op = Op::Put {
                    id,
                    elements: vec![id],
                    observed: Vec::new(),
                    blind: true,
                };
                self.record(key, start, op, result);
            }
            _ => {
                let Some((values, context)) = self.read(key).await else {
                    return;
                };
                if values.is_empty() {
                    return;
                }
                let observed = values.iter().filter_map(|v| v.id).collect();
                let start = self.now_ms();
                let result = self
                    .client
                    .delete_with(name.as_bytes(), Some(&context), OPTIONS)
                    .await
                    .map(drop);
                self.record(key, start, Op::Delete { observed }, result);
            }
        }
    }

    async fn read(&mut self, key: u32) -> Option<(Vec<Seen>, shoal_client::proto::CausalContext)> {
        let start = self.now_ms();
        match self
            .client
            .get_with(key_name(key).as_bytes(), OPTIONS)
            .await
        {
            Ok(reply) => {
                let values: Vec<Seen> = reply.values.iter().map(|v| decode(&v.0)).collect();
                self.record(
                    key,
                    start,
                    Op::Read {
                        values: values.clone(),
                    },
                    Ok(()),
                );
                Some((values, reply.context))
            }
            Err(e) => {
                self.record(key, start, Op::Read { values: Vec::new() }, Err(e));
                // A failing cluster is not hammered in a tight loop.
                tokio::time::sleep(Duration::from_millis(20)).await;
                None
            }
        }
    }
}

/// Whether a failed write may have been applied.
fn classify(e: &Error) -> Outcome {
    match e {
        Error::TooLarge(_) | Error::BadRequest(_) | Error::Unauthorised(_) | Error::Config(_) => {
            Outcome::Failed
        }
        _ => Outcome::Unknown,
    }
}
