//! A real `shoal dev` cluster for tests: its own temp dir, its own process
//! group, every process killed when the handle drops.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use shoal_client::proto::{InspectReport, NodeStatus, RequestOptions};
use shoal_client::{Client, ClientConfig};

/// The `shoal` binary of this build: next to the test executable's `deps/`.
pub fn shoal_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SHOAL_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // Tests run from `target/<profile>/deps/`, binaries such as
    // `shoal-chaos` from `target/<profile>/`.
    let beside = exe.parent().expect("executable dir").join("shoal");
    let bin = if beside.exists() {
        beside
    } else {
        exe.parent()
            .and_then(Path::parent)
            .expect("target dir")
            .join("shoal")
    };
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --bin shoal` (cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

/// R=2, W=2, a 5 s timeout: what the process tests ask for.
pub const W2: RequestOptions = RequestOptions {
    r: Some(2),
    w: Some(2),
    pr: None,
    pw: None,
    timeout_ms: Some(5000),
};

pub struct DevCluster {
    pub dir: tempfile::TempDir,
    pub nodes: usize,
    /// The loopback ports this cluster's nodes take theirs from
    /// (`SHOAL_DEV_PORTS`, see [`port_range`]).
    ports: String,
    launcher: Child,
    /// Process group of the launcher, its nodes and any node restarted by hand.
    pgid: i32,
    /// Nodes restarted by hand, waited for when the cluster is dropped.
    restarted: std::sync::Mutex<Vec<Child>>,
}

impl DevCluster {
    /// Starts `shoal dev --nodes N` and waits (at most 60 s) until every node
    /// knows the ring.
    pub async fn start(nodes: usize) -> DevCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports = port_range();
        let launcher = launch(dir.path(), nodes, &ports);
        let pgid = launcher.id() as i32;
        let cluster = DevCluster {
            dir,
            nodes,
            ports,
            launcher,
            pgid,
            restarted: Default::default(),
        };
        cluster.wait_ready(Duration::from_secs(60)).await;
        cluster
    }

    /// [`Self::rerun`] after `edit` changed every node's config.
    pub async fn reconfigure(&mut self, edit: impl Fn(&mut toml::Table)) {
        self.stop_launcher().await;
        for i in 1..=self.nodes {
            let path = self.path().join(format!("node{i}.toml"));
            let mut config: toml::Table = std::fs::read_to_string(&path)
                .expect("node config")
                .parse()
                .expect("node config parses");
            edit(&mut config);
            std::fs::write(&path, config.to_string()).expect("write node config");
        }
        self.launch_again().await;
    }

    /// Stops the launcher as Ctrl-C would (SIGINT), waits for it to exit, and
    /// runs `shoal dev` again on the same directory.
    pub async fn rerun(&mut self) {
        self.stop_launcher().await;
        self.launch_again().await;
    }

    async fn stop_launcher(&mut self) {
        unsafe { libc::kill(self.launcher.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.launcher.try_wait().expect("launcher status").is_none() {
            assert!(
                Instant::now() < deadline,
                "shoal dev did not stop on SIGINT"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
    }

    async fn launch_again(&mut self) {
        self.wait_ports_free(Duration::from_secs(15)).await;
        self.launcher = launch(self.dir.path(), self.nodes, &self.ports);
        self.pgid = self.launcher.id() as i32;
        self.wait_ready(Duration::from_secs(60)).await;
    }

    /// Waits (bounded) until every port in the node configs can be bound
    /// again: a node killed a moment ago may still hold its sockets while
    /// the kernel tears the process down, and a relaunch would then fail
    /// with "address already in use".
    async fn wait_ports_free(&self, within: Duration) {
        let deadline = Instant::now() + within;
        for i in 1..=self.nodes {
            let path = self.path().join(format!("node{i}.toml"));
            let Ok(config) = shoal_node::config::Config::load(&path) else {
                continue; // the launch reports a bad config
            };
            loop {
                let udp = [config.client_addr, config.peer_addr]
                    .iter()
                    .all(|a| std::net::UdpSocket::bind(a).is_ok());
                let tcp = config
                    .metrics_addr
                    .is_none_or(|a| std::net::TcpListener::bind(a).is_ok());
                if (udp && tcp) || Instant::now() >= deadline {
                    break; // past the deadline the launch says what holds it
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// An SDK client for this cluster.
    pub async fn client(&self) -> Client {
        Client::connect(ClientConfig::from_dir(self.path()).expect("cluster dir"))
            .await
            .expect("connect")
    }

    /// Waits until every node answers and knows the ring.
    pub async fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(config) = ClientConfig::from_dir(self.path()) {
                if let Ok(client) = Client::connect(config).await {
                    if let Ok(statuses) = client.statuses().await {
                        // Ready: every node knows the ring and can reach every other.
                        let ready = statuses
                            .iter()
                            .filter(|(_, s)| {
                                s.as_ref().is_ok_and(|s| {
                                    s.ring_ready
                                        && s.unreachable.is_empty()
                                        && s.peers.iter().all(|p| p.up)
                                })
                            })
                            .count();
                        if ready == self.nodes {
                            return;
                        }
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "cluster not ready within {within:?}; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs the `shoal` CLI against this cluster.
    pub fn shoal(&self, args: &[&str]) -> Output {
        Command::new(shoal_bin())
            .arg("--dir")
            .arg(self.path())
            .args(args)
            .env_remove("SHOAL_DEV_DIR")
            .env("SHOAL_DEV_PORTS", &self.ports)
            .output()
            .expect("run shoal")
    }

    /// Pid of `node` (e.g. "node2") as the node itself reports it.
    pub async fn pid_of(&self, node: &str) -> u32 {
        let statuses = self.client().await.statuses().await.expect("statuses");
        let (_, status) = statuses
            .into_iter()
            .find(|(m, _)| m.name == node)
            .expect("member");
        status.expect("node is up").pid
    }

    /// kill -9 a node and wait until it is gone.
    pub async fn kill9(&self, node: &str) {
        self.signal(node, libc::SIGKILL, Duration::from_secs(10))
            .await;
    }

    /// Sends `signal` to `node` and waits until it is gone, at most
    /// `within`; returns how long it took.
    pub async fn signal(&self, node: &str, signal: libc::c_int, within: Duration) -> Duration {
        let pid = self.pid_of(node).await as i32;
        unsafe { libc::kill(pid, signal) };
        let sent = Instant::now();
        let deadline = sent + within;
        while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
            // The launcher reaps its children; a zombie still answers kill(0).
            if std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sent.elapsed()
    }

    /// The config of `node` (e.g. "node2") as the cluster dir holds it.
    pub fn config_of(&self, node: &str) -> shoal_node::config::Config {
        shoal_node::config::Config::load(&self.path().join(format!("{node}.toml")))
            .expect("node config")
    }

    /// `node`'s `/metrics` text, from its configured metrics address.
    pub fn metrics(&self, node: &str) -> String {
        let addr = self.config_of(node).metrics_addr.expect("metrics address");
        scrape(&addr.to_string())
    }

    /// Starts a node again by hand, as a user would: `shoal node --config`.
    pub fn restart(&self, node: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join(format!("{node}.log")))
            .expect("log");
        let child = Command::new(shoal_bin())
            .arg("node")
            .arg("--config")
            .arg(self.path().join(format!("{node}.toml")))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(self.pgid)
            .dies_with_test()
            .spawn()
            .expect("restart node");
        self.restarted.lock().unwrap().push(child);
    }

    /// Every node's status; a node that does not answer is left out.
    pub async fn statuses(&self) -> Vec<NodeStatus> {
        match self.client().await.statuses().await {
            Ok(all) => all.into_iter().filter_map(|(_, s)| s.ok()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Polls (every 200 ms, at most `within`) until `done` holds for the
    /// statuses of the nodes that answer; panics naming `what` and the logs.
    pub async fn wait_for(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&[NodeStatus]) -> bool,
    ) -> Duration {
        let started = Instant::now();
        loop {
            if done(&self.statuses().await) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "{what}: not within {within:?}; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until every node that answers sees `peer` as up (`up`) or down.
    pub async fn wait_seen(&self, peer: &str, up: bool, within: Duration) -> Duration {
        self.wait_for(
            &format!("{peer} seen {}", if up { "up" } else { "down" }),
            within,
            |all| {
                let others: Vec<&NodeStatus> = all.iter().filter(|s| s.name != peer).collect();
                !others.is_empty()
                    && others
                        .iter()
                        .all(|s| s.peers.iter().any(|p| p.name == peer && p.up == up))
            },
        )
        .await
    }

    /// Hints held over the nodes that answer.
    pub fn hints_held(all: &[NodeStatus]) -> u64 {
        all.iter()
            .flat_map(|s| &s.hints_pending)
            .map(|h| h.pending)
            .sum()
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        // Every node configured, added ones (`shoal dev --add`) too.
        let configured = (1..)
            .take_while(|i| self.path().join(format!("node{i}.toml")).exists())
            .count()
            .max(self.nodes);
        for name in
            std::iter::once("dev".to_string()).chain((1..=configured).map(|i| format!("node{i}")))
        {
            let text = std::fs::read_to_string(self.path().join(format!("{name}.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!(
                "--- {name}.log\n{}\n",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        out
    }
}

/// Fetches `/metrics` from a metrics address.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("metrics request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("metrics answer");
    out
}

/// The value of the sample `name` (with its labels, if any, as rendered:
/// `shoal_corrupt_records_total{tree="hints"}`) in a `/metrics` text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A range of loopback ports of its own for each cluster this test
/// process starts (512 each, from 10,000, below the kernel's ephemeral
/// ports): tests run side by side, and a cluster picking its ports at
/// random over the whole range took the port of another's node that a test
/// had killed and was about to start again ("Address already in use").
/// Clusters of other test processes do not run at the same time.
pub fn port_range() -> String {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    const SLICE: u16 = 512;
    let low = 10_000 + (NEXT.fetch_add(1, Ordering::Relaxed) % 44) * SLICE;
    format!("{low}-{}", low + SLICE)
}

fn launch(dir: &Path, nodes: usize, ports: &str) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("dev.log"))
        .expect("dev log");
    Command::new(shoal_bin())
        .arg("--dir")
        .arg(dir)
        .arg("dev")
        .arg("--nodes")
        .arg(nodes.to_string())
        .env_remove("SHOAL_DEV_DIR")
        .env("SHOAL_DEV_PORTS", ports)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .process_group(0)
        .dies_with_test()
        .spawn()
        .expect("start shoal dev")
}

/// A process started by a test that dies with the test's thread, even when
/// the test binary is killed (SIGKILL, a timeout): its `Drop` does not run
/// then, and nothing else would stop the process. A `shoal dev` launcher
/// takes its nodes with it (they die with it in turn).
trait DiesWithTest {
    fn dies_with_test(&mut self) -> &mut Self;
}

impl DiesWithTest for Command {
    fn dies_with_test(&mut self) -> &mut Self {
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            self.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            })
        }
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
        let _ = self.launcher.wait();
        for mut node in self
            .restarted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = node.wait();
        }
    }
}

/// Whether every replica in `report` stores exactly `value` (one sibling).
pub fn all_hold(report: &InspectReport, value: &[u8]) -> bool {
    report.replicas.iter().all(|r| {
        r.error.is_none()
            && r.object.as_ref().is_some_and(|o| {
                o.siblings.len() == 1 && o.siblings[0].value.as_ref().is_some_and(|v| v.0 == value)
            })
    })
}

/// Runs `each` on every key, `workers` keys at a time.
async fn for_each_key<F, Fut>(client: &Client, keys: &[String], workers: usize, each: F)
where
    F: Fn(Client, String) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let keys = std::sync::Arc::new(keys.to_vec());
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let (client, keys, each) = (client.clone(), keys.clone(), each.clone());
        tasks.push(tokio::spawn(async move {
            for k in keys.iter().skip(worker).step_by(workers) {
                each(client.clone(), k.clone()).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker");
    }
}

/// Writes every key with its own bytes as the value, `workers` at a time;
/// panics on any failure.
pub async fn put_all(client: &Client, keys: &[String], options: RequestOptions, workers: usize) {
    for_each_key(client, keys, workers, move |client, k| async move {
        client
            .put_with(k.as_bytes(), k.as_bytes(), None, options)
            .await
            .unwrap_or_else(|e| panic!("put {k}: {e}"));
    })
    .await;
}

/// Checks replica by replica, with `inspect`, that every key written by
/// [`put_all`] is on all its replicas; 16 inspections at a time.
pub async fn assert_on_every_replica(client: &Client, keys: &[String]) {
    for_each_key(client, keys, 16, |client, k| async move {
        let report = client.inspect(k.as_bytes()).await.expect("inspect");
        assert!(all_hold(&report, k.as_bytes()), "{k}: {report:?}");
    })
    .await;
}

/// Runs 200 CLI commands, alternately `get` and `put` over `key0`..`key19`,
/// through `run` (which must check each succeeded); returns how long each
/// took, sorted.
pub fn time_cli_commands(mut run: impl FnMut(&[&str])) -> Vec<Duration> {
    let mut took = Vec::new();
    for i in 0..200 {
        let k = format!("key{}", i % 20);
        let args: Vec<&str> = if i % 2 == 0 {
            vec!["get", &k]
        } else {
            vec!["put", &k, "w"]
        };
        let started = Instant::now();
        run(&args);
        took.push(started.elapsed());
    }
    took.sort();
    took
}
