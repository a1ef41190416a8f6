//! An in-memory network for cluster tests. Messages go through the real frame
//! codec (so what cannot be encoded fails here too) and through the faults a
//! test has set, named after what they model:
//!
//! - `partition(a, b)`: a and b cannot reach each other (calls fail at once,
//!   like a refused connection);
//! - `blackhole(a, b)`: calls from a to b are never answered (the caller's
//!   timeout decides);
//! - `delay(a, b, d)`: calls from a to b take `d` longer;
//! - `crash(a)` / `restart(a)`: a is unreachable from everyone while crashed.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_client::frame;
use shoal_client::proto::MemberInfo;

use super::{Handler, PeerRequest, PeerResponse, Transport, TransportError};

type BoxedHandler = Arc<
    dyn Fn(String, PeerRequest) -> Pin<Box<dyn Future<Output = PeerResponse> + Send>> + Send + Sync,
>;

#[derive(Default)]
struct Faults {
    cut: HashSet<(String, String)>,
    blackholed: HashSet<(String, String)>,
    delays: HashMap<(String, String), Duration>,
    crashed: HashSet<String>,
}

/// The simulated network: nodes by name, and the faults in force.
#[derive(Default)]
pub struct SimNetwork {
    nodes: Mutex<HashMap<String, BoxedHandler>>,
    faults: Mutex<Faults>,
}

impl SimNetwork {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Attaches a node under `name`.
    pub fn register<H: Handler>(&self, name: &str, handler: Arc<H>) {
        let f: BoxedHandler = Arc::new(move |from, req| {
            let h = handler.clone();
            Box::pin(async move { h.peer(from, req).await })
        });
        self.nodes
            .lock()
            .expect("sim lock")
            .insert(name.to_string(), f);
    }

    /// The transport a node named `me` sends with.
    pub fn transport(self: &Arc<Self>, me: &str) -> SimTransport {
        SimTransport {
            net: self.clone(),
            me: me.to_string(),
        }
    }

    pub fn partition(&self, a: &str, b: &str) {
        let mut f = self.faults.lock().expect("sim lock");
        f.cut.insert((a.into(), b.into()));
        f.cut.insert((b.into(), a.into()));
    }

    pub fn blackhole(&self, from: &str, to: &str) {
        self.faults
            .lock()
            .expect("sim lock")
            .blackholed
            .insert((from.into(), to.into()));
    }

    pub fn delay(&self, from: &str, to: &str, by: Duration) {
        self.faults
            .lock()
            .expect("sim lock")
            .delays
            .insert((from.into(), to.into()), by);
    }

    pub fn crash(&self, node: &str) {
        self.faults
            .lock()
            .expect("sim lock")
            .crashed
            .insert(node.into());
    }

    pub fn restart(&self, node: &str) {
        self.faults.lock().expect("sim lock").crashed.remove(node);
    }

    /// Removes every fault.
    pub fn heal(&self) {
        *self.faults.lock().expect("sim lock") = Faults::default();
    }
}

/// One node's view of a [`SimNetwork`].
pub struct SimTransport {
    net: Arc<SimNetwork>,
    me: String,
}

impl Transport for SimTransport {
    async fn call(
        &self,
        to: &MemberInfo,
        request: PeerRequest,
    ) -> Result<PeerResponse, TransportError> {
        let link = (self.me.clone(), to.name.clone());
        let (delay, blackholed) = {
            let f = self.net.faults.lock().expect("sim lock");
            if f.cut.contains(&link) || f.crashed.contains(&to.name) || f.crashed.contains(&self.me)
            {
                return Err(TransportError::Unreachable(
                    to.name.clone(),
                    "simulated partition or crash".into(),
                ));
            }
            (f.delays.get(&link).copied(), f.blackholed.contains(&link))
        };
        if blackholed {
            std::future::pending::<()>().await;
        }
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let handler = self
            .net
            .nodes
            .lock()
            .expect("sim lock")
            .get(&to.name)
            .cloned();
        let handler = handler
            .ok_or_else(|| TransportError::Unreachable(to.name.clone(), "no such node".into()))?;
        // Through the codec both ways, as on the wire.
        let wire = |e: frame::FrameError| TransportError::Failed(to.name.clone(), e.to_string());
        let request =
            frame::decode(&frame::encode(&request).map_err(wire)?, usize::MAX).map_err(wire)?;
        let response = handler(self.me.clone(), request).await;
        frame::decode(&frame::encode(&response).map_err(wire)?, usize::MAX).map_err(wire)
    }
}
