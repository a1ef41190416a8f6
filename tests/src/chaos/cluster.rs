//! The chaos suite's `shoal` processes: one per lab namespace, each with its
//! data on a small tmpfs of its own (so a disk can be filled) and its wall
//! clock behind libfaketime (so it can jump without touching the machine's).

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use shoal_node::config::{ClusterConfig, Config, MemberConfig, TlsConfig};

use super::net::{enter_ns, run, Host, Lab};
use crate::process::shoal_bin;

pub const CLIENT_PORT: u16 = 7400;
const PEER_PORT: u16 = 7500;
/// Each node's tmpfs: RocksDB's files for a few hundred small keys fit many
/// times over; a full disk is this much filler.
const DISK_MB: u64 = 192;
const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
/// Marks the suite's temp dirs, processes (via their config path) and mounts,
/// so a run can clean up after one that was killed.
pub const DIR_PREFIX: &str = "shoalchaos-run";

pub struct ChaosCluster {
    pub dir: tempfile::TempDir,
    pub lab: Lab,
    pub nodes: Vec<NodeProc>,
}

pub struct NodeProc {
    pub host: Host,
    pub name: String,
    config: PathBuf,
    pub data: PathBuf,
    clock: PathBuf,
    child: Option<Child>,
    pub paused: bool,
    /// Not a member: a spare slot not yet joined, or a node that left or
    /// was removed. It is not started again until it joins (afresh).
    pub retired: bool,
}

impl ChaosCluster {
    /// Sets up the lab, the certificates, configs and tmpfs disks of `nodes`
    /// founding nodes and `spares` more slots (a namespace, a certificate
    /// and a disk each, for joins), and starts the founding nodes.
    pub fn start(nodes: usize, spares: usize, seed: u64) -> anyhow::Result<ChaosCluster> {
        if !Path::new(FAKETIME_LIB).exists() {
            bail!("{FAKETIME_LIB} not found: run deploy/setup.sh (it installs libfaketime)");
        }
        remove_stale_processes_and_mounts();
        let lab = Lab::create(nodes + spares, seed)?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()?;
        let root = dir.path();
        shoal_node::certs::create_ca(root)?;
        shoal_node::certs::issue(
            root,
            root,
            "chaos",
            shoal_node::certs::Kind::Client(shoal_client::proto::Role::Admin),
            &[],
            None,
        )?;
        let peer = |i: usize| SocketAddr::from((Host::Node(i).ip(), PEER_PORT));
        let members: Vec<MemberConfig> = (1..=nodes)
            .map(|i| MemberConfig {
                name: format!("node{i}"),
                peer_addr: peer(i),
            })
            .collect();
        let mut cluster = ChaosCluster {
            dir,
            lab,
            nodes: Vec::new(),
        };
        for i in 1..=nodes + spares {
            let host = Host::Node(i);
            let name = host.to_string();
            let root = cluster.dir.path();
            shoal_node::certs::issue(
                root,
                root,
                &name,
                shoal_node::certs::Kind::Node,
                &[host.ip().into()],
                None,
            )?;
            let data = root.join(format!("{name}-data"));
            std::fs::create_dir_all(&data)?;
            let size = format!("size={DISK_MB}m");
            run(
                "mount",
                &["-t", "tmpfs", "-o", &size, "shoalchaos", path_str(&data)?],
            )?;
            let mut config = Config {
                name: name.clone(),
                data_dir: data.clone(),
                client_addr: SocketAddr::from((host.ip(), CLIENT_PORT)),
                peer_addr: peer(i),
                tls: TlsConfig {
                    ca_cert: root.join("ca.pem"),
                    cert: root.join(format!("{name}.pem")),
                    key: root.join(format!("{name}.key")),
                },
                cluster: if i <= nodes {
                    ClusterConfig {
                        members: members.clone(),
                        ..Default::default()
                    }
                } else {
                    ClusterConfig {
                        seeds: members.clone(),
                        ..Default::default()
                    }
                },
                threads: 1,
                ..Default::default()
            };
            // Reaping and anti-entropy within a run's minutes, not days.
            config.anti_entropy.interval_ms = 2_000;
            config.anti_entropy.reap_interval_ms = 5_000;
            config.anti_entropy.tombstone_grace_secs = 75;
            config.validate()?;
            let path = root.join(format!("{name}.toml"));
            std::fs::write(&path, toml::to_string_pretty(&config)?)?;
            let clock = root.join(format!("{name}.clock"));
            std::fs::write(&clock, "+0\n")?;
            cluster.nodes.push(NodeProc {
                host,
                name,
                config: path,
                data,
                clock,
                child: None,
                paused: false,
                retired: i > nodes,
            });
        }
        for i in 0..nodes {
            cluster.spawn(i)?;
        }
        Ok(cluster)
    }

    /// Makes retired slot `i` a new machine that joins through the
    /// members' addresses: its disk wiped (so it gets a new id), its config
    /// naming seeds; then starts it. It stages its own join.
    pub fn join(&mut self, i: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.nodes[i].retired && !self.running(i),
            "{} is not a spare",
            self.nodes[i].name
        );
        let seeds: Vec<MemberConfig> = self
            .nodes
            .iter()
            .filter(|n| !n.retired)
            .map(|n| MemberConfig {
                name: n.name.clone(),
                peer_addr: SocketAddr::from((n.host.ip(), PEER_PORT)),
            })
            .collect();
        let node = &self.nodes[i];
        for entry in std::fs::read_dir(&node.data)? {
            let path = entry?.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        let mut config = Config::load(&node.config)?;
        config.cluster.members.clear();
        config.cluster.seeds = seeds;
        config.validate()?;
        std::fs::write(&node.config, toml::to_string_pretty(&config)?)?;
        std::fs::write(&node.clock, "+0\n")?;
        self.nodes[i].retired = false;
        self.spawn(i)
    }

    /// Slots that are members (or joining): not retired.
    pub fn members(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| !self.nodes[i].retired)
            .collect()
    }

    pub fn seeds(&self) -> Vec<SocketAddr> {
        self.nodes
            .iter()
            .map(|n| SocketAddr::from((n.host.ip(), CLIENT_PORT)))
            .collect()
    }

    /// An SDK config for the cluster (admin certificate).
    pub fn client_config(&self) -> anyhow::Result<shoal_client::ClientConfig> {
        let root = self.dir.path();
        let mut config =
            shoal_client::ClientConfig::new(self.seeds(), std::fs::read(root.join("ca.pem"))?);
        config.identity = Some((
            std::fs::read(root.join("chaos.pem"))?,
            std::fs::read(root.join("chaos.key"))?,
        ));
        Ok(config)
    }

    /// Starts node `i` (from 0) in its namespace.
    pub fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let ns_path = self.lab.ns_path(self.nodes[i].host);
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.config.with_extension("log"))?;
        let ns = std::fs::File::open(&ns_path).with_context(|| format!("opening {ns_path}"))?;
        let mut cmd = Command::new(shoal_bin());
        cmd.arg("node")
            .arg("--config")
            .arg(&node.config)
            .env("LD_PRELOAD", FAKETIME_LIB)
            .env("FAKETIME_TIMESTAMP_FILE", &node.clock)
            .env("FAKETIME_CACHE_DURATION", "1")
            // Only the wall clock jumps: timers and timeouts run on the
            // monotonic clock, which a real clock step leaves alone too.
            .env("DONT_FAKE_MONOTONIC", "1")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .env("RUST_LOG", "info,quinn=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        unsafe {
            cmd.pre_exec(move || enter_ns(&ns));
        }
        node.child = Some(
            cmd.spawn()
                .with_context(|| format!("starting {}", node.name))?,
        );
        node.paused = false;
        Ok(())
    }

    /// kill -9 node `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.nodes[i].paused = false;
    }

    pub fn running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Nodes that exited on their own (the nemesis only kills with
    /// [`Self::kill`], which forgets the child), with their exit status;
    /// they are forgotten too, so [`Self::spawn`] can start them again.
    pub fn exited(&mut self) -> Vec<(usize, std::process::ExitStatus)> {
        let mut out = Vec::new();
        for (i, node) in self.nodes.iter_mut().enumerate() {
            let status = node
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = status {
                node.child = None;
                out.push((i, status));
            }
        }
        out
    }

    /// SIGSTOP (`pause`) or SIGCONT node `i`.
    pub fn pause(&mut self, i: usize, pause: bool) {
        if let Some(child) = &self.nodes[i].child {
            let signal = if pause { libc::SIGSTOP } else { libc::SIGCONT };
            unsafe { libc::kill(child.id() as i32, signal) };
            self.nodes[i].paused = pause;
        }
    }

    /// Sets node `i`'s wall clock `offset_secs` away from the machine's.
    pub fn set_clock(&self, i: usize, offset_secs: i64) -> anyhow::Result<()> {
        std::fs::write(&self.nodes[i].clock, format!("{offset_secs:+}\n"))?;
        Ok(())
    }

    /// Fills node `i`'s disk to the last byte; [`Self::free_disk`] undoes it.
    pub fn fill_disk(&self, i: usize) -> anyhow::Result<()> {
        use std::io::Write;
        let path = self.nodes[i].data.join("chaos-filler");
        let mut file = std::fs::File::create(&path)?;
        let block = vec![0u8; 1 << 20];
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(e.into()),
            }
        }
        // A partial last block may still fit.
        let _ = file.write_all(&block[..4096]);
        let _ = file.sync_all();
        Ok(())
    }

    pub fn free_disk(&self, i: usize) -> anyhow::Result<()> {
        match std::fs::remove_file(self.nodes[i].data.join("chaos-filler")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// The last `lines` lines of node `i`'s log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text =
            std::fs::read_to_string(self.nodes[i].config.with_extension("log")).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// The last `lines` lines of every node's log.
    pub fn logs(&self, lines: usize) -> String {
        (0..self.nodes.len())
            .map(|i| {
                format!(
                    "--- {}.log\n{}\n",
                    self.nodes[i].name,
                    self.log_tail(i, lines)
                )
            })
            .collect()
    }

    /// Copies the node logs to `to` (kept after the temp dir goes).
    pub fn save_logs(&self, to: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(to)?;
        for n in &self.nodes {
            let log = n.config.with_extension("log");
            if log.exists() {
                std::fs::copy(&log, to.join(format!("{}.log", n.name)))?;
            }
        }
        Ok(())
    }

    /// Waits (bounded) until every node knows the ring and sees every peer
    /// up, asking from the clients' namespace.
    pub fn wait_serving(&self, within: Duration) -> anyhow::Result<()> {
        let nodes = self.members().len();
        self.wait_statuses("every node ready", within, move |all| {
            all.len() == nodes
                && all
                    .iter()
                    .all(|s| s.ring_ready && s.peers.iter().all(|p| p.up))
        })
    }

    /// Polls the statuses of the nodes that answer (every 200 ms, at most
    /// `within`) until `done` holds.
    pub fn wait_statuses(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&[shoal_client::proto::NodeStatus]) -> bool + Send + 'static,
    ) -> anyhow::Result<()> {
        let config = self.client_config()?;
        let what = what.to_string();
        let waited = self
            .lab
            .enter(Host::Clients, move || -> anyhow::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let deadline = Instant::now() + within;
                    loop {
                        let mut answered = Vec::new();
                        if let Ok(client) = shoal_client::Client::connect(config.clone()).await {
                            if let Ok(statuses) = client.statuses().await {
                                answered =
                                    statuses.into_iter().filter_map(|(_, s)| s.ok()).collect();
                            }
                        }
                        if done(&answered) {
                            return Ok(());
                        }
                        if Instant::now() > deadline {
                            bail!("{what}: not within {within:?}");
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                })
            })?;
        waited
            .join()
            .map_err(|_| anyhow::anyhow!("wait thread panicked"))?
    }

    /// A directory the `shoal` CLI reads as a cluster directory: the CA,
    /// the admin client certificate, and the nodes' client addresses.
    pub fn cli_dir(&self) -> anyhow::Result<PathBuf> {
        let root = self.dir.path();
        let cli = root.join("cli");
        std::fs::create_dir_all(&cli)?;
        std::fs::copy(root.join("ca.pem"), cli.join("ca.pem"))?;
        std::fs::copy(root.join("chaos.pem"), cli.join("client.pem"))?;
        std::fs::copy(root.join("chaos.key"), cli.join("client.key"))?;
        let seeds: String = self.seeds().iter().map(|a| format!("{a}\n")).collect();
        std::fs::write(cli.join("seeds.txt"), seeds)?;
        Ok(cli)
    }

    /// Runs the `shoal` CLI from the clients' namespace against `dir` (see
    /// [`Self::cli_dir`]).
    pub fn cli(&self, dir: &Path, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let ns_path = self.lab.ns_path(Host::Clients);
        let ns = std::fs::File::open(&ns_path).with_context(|| format!("opening {ns_path}"))?;
        let mut cmd = Command::new(shoal_bin());
        cmd.arg("--dir")
            .arg(dir)
            .args(args)
            .env_remove("SHOAL_DEV_DIR");
        unsafe {
            cmd.pre_exec(move || enter_ns(&ns));
        }
        Ok(cmd.output()?)
    }
}

impl Drop for ChaosCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        for n in &self.nodes {
            let _ = run("umount", &["-l", &n.data.to_string_lossy()]);
        }
    }
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 temp path")
}

/// Kills the nodes and unmounts the disks of runs whose process is gone.
fn remove_stale_processes_and_mounts() {
    let dead = |text: &str| -> bool {
        let Some(at) = text.find(DIR_PREFIX) else {
            return false;
        };
        let pid: String = text[at + DIR_PREFIX.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        pid.parse::<i32>()
            .is_ok_and(|p| p != std::process::id() as i32 && unsafe { libc::kill(p, 0) } != 0)
    };
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            if dead(&String::from_utf8_lossy(&cmdline)) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let mut fields = line.split(' ');
        let (Some(_), Some(at)) = (fields.next(), fields.next()) else {
            continue;
        };
        if dead(at) {
            let _ = run("umount", &["-l", at]);
        }
    }
}
