//! The SDK's [`Client`]: long-lived QUIC connections to the cluster, ring-aware
//! routing, retries on another node, and the read-modify-write helper.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use shoal_ring::NodeId;

use crate::error::{Error, ErrorKind};
use crate::proto::*;
use crate::rpc::{CallError, Link, Links};
use crate::tls;

/// TLS name every node's certificate carries for its client port: a client
/// trusts any node of the cluster (anything the cluster CA signed) to serve it.
pub const CLIENT_SERVER_NAME: &str = "shoal";

/// The client certificate and key [`ClientConfig::from_dir`] reads.
pub const CLIENT_CERT: &str = "client.pem";
pub const CLIENT_KEY: &str = "client.key";
/// Default limit on a value's size; the node enforces its own configured limit.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 4 << 20;
/// A key's hard limit.
pub const MAX_KEY_BYTES: usize = 64 << 10;
/// Addresses asked for the ring at once (see [`Client::refresh_ring`]).
const RING_RACE: usize = 3;
/// How often a node that failed is probed until it answers again.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Cap on a response frame: siblings can make a reply several values long.
pub const MAX_RESPONSE_BYTES: usize = 1 << 30;

/// How to reach and talk to a cluster.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Client-port addresses to learn the ring from; any live one will do.
    pub seeds: Vec<SocketAddr>,
    /// PEM of the cluster CA that signed the nodes' certificates.
    pub ca_pem: Vec<u8>,
    /// Optional client certificate chain and key (PEM), presented to nodes.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Budget of one call, retries included.
    pub timeout: Duration,
    /// How long to wait for a QUIC handshake before trying another node.
    pub connect_timeout: Duration,
    /// Defaults sent with every request (`None` leaves the node's default).
    pub options: RequestOptions,
    /// Values over this are refused before they are sent.
    pub max_value_bytes: usize,
    /// The ring is fetched again in the background once it is this old, at
    /// the next request: members joining and leaving reach the client's
    /// routing without a restart (a stale ring only costs a forward).
    pub ring_refresh: Duration,
}

impl ClientConfig {
    pub fn new(seeds: Vec<SocketAddr>, ca_pem: Vec<u8>) -> Self {
        ClientConfig {
            seeds,
            ca_pem,
            identity: None,
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            options: RequestOptions::default(),
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            ring_refresh: Duration::from_secs(5),
        }
    }

    /// Reads a cluster directory as `shoal dev` writes it: `ca.pem`,
    /// `seeds.txt` (one client address per line), and the client
    /// certificate `client.pem` with its key `client.key` (nodes refuse a
    /// client without one).
    pub fn from_dir(dir: &Path) -> Result<Self, Error> {
        let read = |name: &str| {
            std::fs::read(dir.join(name)).map_err(|e| {
                Error::Config(format!("cannot read {}: {e}", dir.join(name).display()))
            })
        };
        let ca_pem = read("ca.pem")?;
        let seeds = String::from_utf8_lossy(&read("seeds.txt")?)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                l.trim()
                    .parse()
                    .map_err(|e| Error::Config(format!("bad seed address {l:?}: {e}")))
            })
            .collect::<Result<Vec<SocketAddr>, Error>>()?;
        let mut config = ClientConfig::new(seeds, ca_pem);
        if dir.join(CLIENT_CERT).exists() || dir.join(CLIENT_KEY).exists() {
            config.identity = Some((read(CLIENT_CERT)?, read(CLIENT_KEY)?));
        }
        Ok(config)
    }
}

/// A handle to a Shoal cluster. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: quinn::Endpoint,
    config: ClientConfig,
    /// One long-lived connection per node, its requests pipelined on one
    /// stream (see [`rpc::Mux`]).
    connections: Links<Response>,
    /// Nodes that failed: tried last, and only when every other one failed,
    /// until a background probe reconnects to them. So a dead node costs
    /// requests nothing while another node can serve them.
    down: Mutex<HashSet<SocketAddr>>,
    /// Nodes the last ring said its node's failure detector sees down:
    /// tried after the others (but before those in `down`), and their
    /// connections kept: one node's view is not this client's, which may
    /// well reach them.
    reported_down: Mutex<HashSet<SocketAddr>>,
    ring: RwLock<Option<Arc<RingInfo>>>,
    /// Per partition, the client addresses to try in order (primaries, then
    /// every other member, then seeds); worked out once per ring, not per
    /// request.
    routes: RwLock<Arc<Vec<Vec<SocketAddr>>>>,
    /// When the ring was last fetched, and whether a background fetch is
    /// running (see [`ClientConfig::ring_refresh`]).
    ring_fetched: Mutex<std::time::Instant>,
    refreshing: std::sync::atomic::AtomicBool,
}

impl Client {
    /// Connects to the cluster and fetches its ring from the first seed that
    /// answers.
    pub async fn connect(config: ClientConfig) -> Result<Client, Error> {
        if config.seeds.is_empty() {
            return Err(Error::Config("no seed addresses given".into()));
        }
        let identity = match &config.identity {
            Some((cert, key)) => Some((tls::parse_certs(cert)?, tls::parse_key(key)?)),
            None => None,
        };
        let quic = tls::quic_client_config(
            &config.ca_pem,
            identity,
            CLIENT_ALPN,
            Duration::from_secs(10),
        )?;
        let bind: SocketAddr = if config.seeds[0].is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()
        .expect("literal address");
        let mut endpoint = tls::client_endpoint(bind)
            .map_err(|e| Error::Config(format!("cannot open UDP socket: {e}")))?;
        endpoint.set_default_client_config(quic);
        let client = Client {
            inner: Arc::new(Inner {
                endpoint,
                config,
                connections: Links::new(MAX_RESPONSE_BYTES),
                down: Mutex::new(HashSet::new()),
                reported_down: Mutex::new(HashSet::new()),
                ring: RwLock::new(None),
                routes: RwLock::default(),
                ring_fetched: Mutex::new(std::time::Instant::now()),
                refreshing: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        client.refresh_ring().await?;
        Ok(client)
    }

    /// Fetches the ring again from any node that answers: the first
    /// [`RING_RACE`] addresses are asked at once and the first answer wins,
    /// so a seed that is down or stopped costs nothing. Members the
    /// answering node sees down are tried after the others from then on
    /// (until the next ring says otherwise); their connections are kept.
    pub async fn refresh_ring(&self) -> Result<Arc<RingInfo>, Error> {
        let mut addrs = self.inner.config.seeds.clone();
        if let Some(ring) = self.ring_info() {
            addrs.extend(ring.members.iter().map(|m| m.client_addr));
        }
        addrs.dedup();
        let (first, rest) = addrs.split_at(addrs.len().min(RING_RACE));
        let race = first.iter().map(|addr| {
            Box::pin(async move { self.send(std::slice::from_ref(addr), &Request::Ring).await })
        });
        let answer = match futures_util::future::select_ok(race).await {
            Ok((answer, _)) => answer,
            Err(e) if rest.is_empty() => return Err(e),
            Err(_) => self.send(rest, &Request::Ring).await?,
        };
        match answer {
            Response::Ring(info) => {
                let info = Arc::new(info);
                let routes = Arc::new(routes(&info, &self.inner.config.seeds));
                *self.inner.reported_down.lock().expect("down lock") = info
                    .members
                    .iter()
                    .filter(|m| info.down.contains(&m.id))
                    .map(|m| m.client_addr)
                    .collect();
                *self.inner.ring.write().expect("ring lock") = Some(info.clone());
                *self.inner.routes.write().expect("ring lock") = routes;
                *self.inner.ring_fetched.lock().expect("ring lock") = std::time::Instant::now();
                Ok(info)
            }
            other => Err(unexpected(other)),
        }
    }

    /// The nodes (client addresses) this client holds a connection to.
    pub fn connected(&self) -> Vec<SocketAddr> {
        self.inner.connections.connected()
    }

    /// The ring as last fetched.
    pub fn ring_info(&self) -> Option<Arc<RingInfo>> {
        self.inner.ring.read().expect("ring lock").clone()
    }

    /// Reads `key`: every live sibling and the causal context covering them.
    pub async fn get(&self, key: &[u8]) -> Result<GetReply, Error> {
        self.get_with(key, self.inner.config.options).await
    }

    pub async fn get_with(&self, key: &[u8], options: RequestOptions) -> Result<GetReply, Error> {
        check_key(key)?;
        match self
            .route(
                key,
                &Request::Get {
                    key: key.to_vec(),
                    options: self.options(options),
                },
            )
            .await?
        {
            Response::Value(v) => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    /// Writes `value`. With the context of an earlier read, it supersedes what
    /// that read returned; without one it supersedes nothing and may add a
    /// sibling.
    pub async fn put(
        &self,
        key: &[u8],
        value: &[u8],
        context: Option<&CausalContext>,
    ) -> Result<PutReply, Error> {
        self.put_with(key, value, context, self.inner.config.options)
            .await
    }

    pub async fn put_with(
        &self,
        key: &[u8],
        value: &[u8],
        context: Option<&CausalContext>,
        options: RequestOptions,
    ) -> Result<PutReply, Error> {
        check_key(key)?;
        if value.len() > self.inner.config.max_value_bytes {
            return Err(Error::TooLarge(format!(
                "value of {} bytes exceeds the {}-byte limit",
                value.len(),
                self.inner.config.max_value_bytes
            )));
        }
        let request = Request::Put {
            key: key.to_vec(),
            value: value.to_vec(),
            context: context.cloned(),
            options: self.options(options),
        };
        match self.route(key, &request).await? {
            Response::Written(w) => Ok(w),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes what `context` covers by writing a tombstone. Without a context
    /// it first reads the key and deletes everything that read saw (a
    /// tombstone that covers nothing would delete nothing).
    pub async fn delete(
        &self,
        key: &[u8],
        context: Option<&CausalContext>,
    ) -> Result<PutReply, Error> {
        self.delete_with(key, context, self.inner.config.options)
            .await
    }

    pub async fn delete_with(
        &self,
        key: &[u8],
        context: Option<&CausalContext>,
        options: RequestOptions,
    ) -> Result<PutReply, Error> {
        check_key(key)?;
        let context = match context {
            Some(c) => c.clone(),
            None => self.get_with(key, options).await?.context,
        };
        let request = Request::Delete {
            key: key.to_vec(),
            context: Some(context),
            options: self.options(options),
        };
        match self.route(key, &request).await? {
            Response::Written(w) => Ok(w),
            other => Err(unexpected(other)),
        }
    }

    /// Reads `key`, lets `resolve` turn its siblings (empty when absent) into one
    /// value, and writes that with the read's context. If a concurrent writer
    /// added a sibling meanwhile, starts again, up to `attempts` times.
    pub async fn read_modify_write<F>(
        &self,
        key: &[u8],
        attempts: u32,
        mut resolve: F,
    ) -> Result<PutReply, Error>
    where
        F: FnMut(&[Value]) -> Vec<u8>,
    {
        for _ in 0..attempts.max(1) {
            let current = self.get(key).await?;
            let next = resolve(&current.values);
            let written = self.put(key, &next, Some(&current.context)).await?;
            if written.siblings <= 1 {
                return Ok(written);
            }
        }
        Err(Error::Conflict(attempts))
    }

    /// What every replica of `key` stores, clocks included.
    pub async fn inspect(&self, key: &[u8]) -> Result<InspectReport, Error> {
        check_key(key)?;
        match self
            .route(key, &Request::Inspect { key: key.to_vec() })
            .await?
        {
            Response::Inspect(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Asks every member for its status; a member that does not answer is
    /// reported with the error.
    pub async fn statuses(&self) -> Result<Vec<(MemberInfo, Result<NodeStatus, Error>)>, Error> {
        let ring = self.refresh_ring().await?;
        let mut tasks = Vec::new();
        for member in ring.members.iter().cloned() {
            let client = self.clone();
            tasks.push(tokio::spawn(async move {
                let status = match client.send(&[member.client_addr], &Request::Status).await {
                    Ok(Response::Status(s)) => Ok(*s),
                    Ok(other) => Err(unexpected(other)),
                    Err(e) => Err(e),
                };
                (member, status)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.map_err(|e| Error::Protocol(e.to_string()))?);
        }
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        Ok(out)
    }

    /// Sends one request to one node and returns its raw answer (tools, tests).
    pub async fn request(&self, addr: SocketAddr, request: &Request) -> Result<Response, Error> {
        let budget = self.inner.config.timeout;
        match tokio::time::timeout(budget, self.call(addr, request)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(CallError::TooLarge(e))) => Err(Error::TooLarge(e)),
            Ok(Err(CallError::Refused(e))) => Err(Error::Unauthorised(e)),
            Ok(Err(
                CallError::NotDelivered(e) | CallError::Silent(e) | CallError::Delivered(e),
            )) => Err(Error::Unavailable(format!("{addr}: {e}"))),
            Err(_) => Err(Error::Timeout(format!(
                "{addr} did not answer within {budget:?}"
            ))),
        }
    }

    fn options(&self, mut o: RequestOptions) -> RequestOptions {
        if o.timeout_ms.is_none() {
            // Leave the node time to answer with a precise quorum error before
            // this client gives up on it.
            o.timeout_ms = Some((self.inner.config.timeout.as_millis() as u32 * 4 / 5).max(1));
        }
        o
    }

    /// Sends a keyed request to the key's primaries first (the node then
    /// coordinates locally, saving a hop), then to any other member.
    async fn route(&self, key: &[u8], request: &Request) -> Result<Response, Error> {
        self.refresh_ring_if_old();
        let routes = self.inner.routes.read().expect("ring lock").clone();
        if routes.is_empty() {
            return self.send(&self.inner.config.seeds, request).await;
        }
        let partition = shoal_ring::partition_of(key, routes.len() as u32);
        self.send(&routes[partition as usize], request).await
    }

    /// Starts a background fetch of the ring when it is older than
    /// [`ClientConfig::ring_refresh`] and none is running.
    fn refresh_ring_if_old(&self) {
        use std::sync::atomic::Ordering;
        let age = self.inner.ring_fetched.lock().expect("ring lock").elapsed();
        if age < self.inner.config.ring_refresh
            || self.inner.refreshing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let client = self.clone();
        tokio::spawn(async move {
            if let Err(e) = client.refresh_ring().await {
                tracing::debug!(error = %e, "ring refresh failed; routing on the last one");
                // Try again after another interval, not at every request.
                *client.inner.ring_fetched.lock().expect("ring lock") = std::time::Instant::now();
            }
            client.inner.refreshing.store(false, Ordering::Release);
        });
    }

    /// Runs a membership command (admin role) on any member that answers.
    pub async fn cluster(&self, command: ClusterCommand) -> Result<ClusterReply, Error> {
        let mut addrs: Vec<SocketAddr> = self
            .ring_info()
            .map(|r| r.members.iter().map(|m| m.client_addr).collect())
            .unwrap_or_default();
        addrs.extend(self.inner.config.seeds.iter().copied());
        addrs.dedup();
        match self.send(&addrs, &Request::Cluster(command)).await? {
            Response::Cluster(reply) => Ok(reply),
            other => Err(unexpected(other)),
        }
    }

    /// Tries `addrs` in order within the time budget: those the ring says
    /// are down after the others, those that failed here last. A request
    /// that may have run is retried elsewhere only if idempotent.
    async fn send(&self, addrs: &[SocketAddr], request: &Request) -> Result<Response, Error> {
        let ordered: std::borrow::Cow<[SocketAddr]> = {
            let down = self.inner.down.lock().expect("down lock");
            let reported = self.inner.reported_down.lock().expect("down lock");
            if down.is_empty() && reported.is_empty() {
                addrs.into()
            } else {
                let mut sorted = addrs.to_vec();
                sorted.sort_by_key(|a| (down.contains(a), reported.contains(a)));
                sorted.into()
            }
        };
        let budget = self.inner.config.timeout;
        let attempt = async {
            let mut failures = Vec::new();
            let mut last_quorum = None;
            for &addr in ordered.iter() {
                match self.call(addr, request).await {
                    // Not serving (starting, stopping, removed): nothing
                    // ran. Asked last from now on, so that a stopping node
                    // sees requests stop coming and closes.
                    Ok(Response::Error(e)) if e.kind == ErrorKind::NotReady => {
                        self.mark_down(addr);
                        failures.push(format!("{addr}: {}", e.message));
                    }
                    // A coordinator cut off from its peers: a read (which
                    // changes nothing) is asked of the next one, which may
                    // be on the healthy side.
                    Ok(Response::Error(e))
                        if e.kind == ErrorKind::Quorum && request.is_idempotent() =>
                    {
                        failures.push(format!("{addr}: {}", e.message));
                        last_quorum = Some(e);
                    }
                    Ok(Response::Error(e)) => return Err(Error::from(e)),
                    Ok(response) => return Ok(response),
                    Err(CallError::TooLarge(e)) => return Err(Error::TooLarge(e)),
                    Err(CallError::Refused(e)) => return Err(Error::Unauthorised(e)),
                    Err(CallError::NotDelivered(e)) => {
                        self.mark_down(addr);
                        failures.push(format!("{addr}: {e}"));
                    }
                    Err(CallError::Silent(e) | CallError::Delivered(e))
                        if request.is_idempotent() =>
                    {
                        self.mark_down(addr);
                        failures.push(format!("{addr}: {e}"));
                    }
                    // A silent node may still run the write (a paused
                    // process runs what its kernel queued when it resumes):
                    // sent elsewhere too, it would run twice.
                    Err(CallError::Silent(e)) => {
                        self.mark_down(addr);
                        return Err(Error::Unavailable(format!(
                            "{addr} did not answer the write (it may have been applied, or be applied when that node resumes): {e}"
                        )));
                    }
                    Err(CallError::Delivered(e)) => {
                        return Err(Error::Unavailable(format!(
                            "{addr} failed after the write was sent (it may have been applied): {e}"
                        )))
                    }
                }
            }
            match last_quorum {
                Some(mut e) => {
                    e.message = failures.join("; ");
                    Err(Error::from(e))
                }
                None => Err(Error::Unavailable(failures.join("; "))),
            }
        };
        tokio::time::timeout(budget, attempt)
            .await
            .unwrap_or_else(|_| Err(Error::Timeout(format!("no answer within {budget:?}"))))
    }

    /// Puts `addr` last in line and, unless one already runs, starts a probe
    /// that reconnects to it every [`PROBE_EVERY`] until it answers.
    fn mark_down(&self, addr: SocketAddr) {
        self.inner.connections.remove(addr);
        if !self.inner.down.lock().expect("down lock").insert(addr) {
            return;
        }
        let client = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                let Some(inner) = client.upgrade() else {
                    return; // the client is gone
                };
                let client = Client { inner };
                if !client.inner.down.lock().expect("down lock").contains(&addr) {
                    return; // a request reached it meanwhile
                }
                if client.connection(addr).await.is_ok() {
                    return;
                }
            }
        });
    }

    async fn connection(&self, addr: SocketAddr) -> Result<Link<Response>, CallError> {
        if let Some(link) = self.inner.connections.get(addr).await {
            return Ok(link);
        }
        let timeout = self.inner.config.connect_timeout;
        let link = (self.inner.connections)
            .dial(&self.inner.endpoint, addr, CLIENT_SERVER_NAME, timeout)
            .await?;
        self.inner.down.lock().expect("down lock").remove(&addr);
        Ok(link)
    }

    async fn call(&self, addr: SocketAddr, request: &Request) -> Result<Response, CallError> {
        let link = self.connection(addr).await?;
        match link.mux.call(request).await {
            // TLS 1.3: the node checks the client's certificate after the
            // client considers the handshake done, so a refusal shows as
            // the connection closing under the first call.
            Err(e) => Err(
                match link.conn.close_reason().as_ref().and_then(tls::refusal) {
                    Some(why) => CallError::Refused(why),
                    None => e,
                },
            ),
            ok => ok,
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"client closed");
    }
}

/// Per partition of `info`'s ring: its primaries' client addresses, then
/// every other member's, then any seed not among them.
fn routes(info: &RingInfo, seeds: &[SocketAddr]) -> Vec<Vec<SocketAddr>> {
    let by_id: HashMap<NodeId, SocketAddr> =
        info.members.iter().map(|m| (m.id, m.client_addr)).collect();
    let others = info
        .members
        .iter()
        .map(|m| m.client_addr)
        .chain(seeds.iter().copied());
    (0..info.ring.partition_count())
        .map(|p| {
            let mut addrs: Vec<SocketAddr> = info
                .ring
                .preference_list_for_partition(p, info.n as usize)
                .iter()
                .filter_map(|id| by_id.get(id).copied())
                .collect();
            for a in others.clone() {
                if !addrs.contains(&a) {
                    addrs.push(a);
                }
            }
            addrs
        })
        .collect()
}

fn check_key(key: &[u8]) -> Result<(), Error> {
    if key.len() > MAX_KEY_BYTES {
        return Err(Error::TooLarge(format!(
            "key of {} bytes exceeds the {MAX_KEY_BYTES}-byte limit",
            key.len()
        )));
    }
    Ok(())
}

fn unexpected(r: Response) -> Error {
    match r {
        Response::Error(e) => Error::from(e),
        other => Error::Protocol(format!("unexpected response {other:?}")),
    }
}
