//! `shoal dev`: a local cluster of real `shoal node` processes on loopback.
//!
//! The directory holds everything: `ca.pem`/`ca.key`, each node's certificate,
//! config (`nodeK.toml`), data (`nodeK/`) and log (`nodeK.log`), and for
//! clients `seeds.txt` and an admin client certificate (`client.pem`,
//! `client.key`), which the CLI and the SDK's `ClientConfig::from_dir` use.
//! Running `shoal dev` again reuses all of it, so data survives. Any node can
//! be killed and brought back by hand with `shoal node --config
//! DIR/nodeK.toml`; the launcher reports exits but does not restart nodes
//! itself. Ctrl-C stops every node it started.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use shoal_client::{Client, ClientConfig};
use shoal_node::config::{ClusterConfig, Config, HugePages, MemberConfig, TlsConfig};

/// `$SHOAL_DEV_DIR` is read by clap; otherwise `~/.shoal/dev`.
pub fn default_dir() -> PathBuf {
    std::env::var_os("HOME").map_or_else(
        || PathBuf::from(".shoal-dev"),
        |h| PathBuf::from(h).join(".shoal/dev"),
    )
}

fn config_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("node{i}.toml"))
}

/// Free loopback ports (UDP and TCP alike), all held until all are chosen
/// so none repeats, and none of `taken`: the ports of nodes configured
/// already, which a node not running does not hold (`--add --no-start`
/// twice, then both started). They are fixed in the configs, so that the
/// cluster keeps its addresses across restarts; they are taken below the
/// kernel's ephemeral range, or any process binding port 0 meanwhile (every
/// QUIC client does) could be handed one before its node binds it.
fn free_ports(count: usize, taken: &[u16]) -> anyhow::Result<Vec<u16>> {
    use rand::Rng;
    let (low, high) = port_range(count)?;
    let mut held = Vec::new();
    let mut ports = Vec::new();
    let mut rng = rand::thread_rng();
    for _ in 0..count * 200 {
        if ports.len() == count {
            return Ok(ports);
        }
        let port = rng.gen_range(low..high);
        if ports.contains(&port) || taken.contains(&port) {
            continue;
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if let (Ok(u), Ok(t)) = (UdpSocket::bind(addr), std::net::TcpListener::bind(addr)) {
            held.push((u, t));
            ports.push(port);
        }
    }
    bail!(
        "found only {} free loopback ports in {low}..{high} ({} held by the nodes configured here), {count} needed",
        ports.len(),
        taken.len()
    )
}

/// Where [`free_ports`] picks `count` ports: `SHOAL_DEV_PORTS=LOW-HIGH`
/// (HIGH excluded) if set, else from 10,000 up to the kernel's ephemeral
/// range. A test harness running clusters side by side gives each a range
/// of its own: a node it kills and starts again binds its port anew, and
/// another cluster starting meanwhile must not have picked it.
fn port_range(count: usize) -> anyhow::Result<(u16, u16)> {
    if let Ok(range) = std::env::var("SHOAL_DEV_PORTS") {
        let parsed = range.split_once('-').and_then(|(l, h)| {
            Some((l.trim().parse::<u16>().ok()?, h.trim().parse::<u16>().ok()?))
        });
        return match parsed {
            Some((low, high)) if low > 0 && high > low => Ok((low, high)),
            _ => bail!("SHOAL_DEV_PORTS={range:?}: expected LOW-HIGH, two ports, LOW below HIGH"),
        };
    }
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    Ok((10_000, ephemeral_low.max(10_000 + 4 * count as u16)))
}

/// Issues node `name`'s certificate (for loopback) in `dir`.
fn node_certificate(dir: &Path, name: &str) -> anyhow::Result<()> {
    shoal_node::certs::issue(
        dir,
        dir,
        name,
        shoal_node::certs::Kind::Node,
        &["127.0.0.1".parse()?],
        None,
    )?;
    Ok(())
}

/// Issues the dev user's admin client certificate, unless there is one.
fn client_certificate(dir: &Path) -> anyhow::Result<()> {
    use shoal_client::client::{CLIENT_CERT, CLIENT_KEY};
    if dir.join(CLIENT_CERT).exists() && dir.join(CLIENT_KEY).exists() {
        return Ok(());
    }
    shoal_node::certs::issue(
        dir,
        dir,
        "client",
        shoal_node::certs::Kind::Client(shoal_node::certs::Role::Admin),
        &[],
        None,
    )?;
    Ok(())
}

/// Nodes configured in `dir` (founding and added alike).
fn configured(dir: &Path) -> usize {
    (1..).take_while(|i| config_path(dir, *i).exists()).count()
}

/// `shoal dev --add`: configures one more node for the dev cluster in `dir`
/// (certificate, ports, a config whose seeds are the nodes already there),
/// adds its client address to `seeds.txt` and, with `start`, starts it in
/// the background. It announces itself and stages its own join; `shoal
/// cluster plan` shows what committing it moves. Returns its name.
pub fn add(dir: &Path, start: bool, zone: Option<String>) -> anyhow::Result<String> {
    let existing = configured(dir);
    if existing == 0 {
        bail!(
            "no dev cluster in {}; start one with `shoal dev`",
            dir.display()
        );
    }
    let i = existing + 1;
    let name = format!("node{i}");
    let mut seeds = Vec::new();
    let mut taken = Vec::new();
    for k in 1..=existing {
        let c = Config::load(&config_path(dir, k))?;
        taken.extend([c.client_addr.port(), c.peer_addr.port()]);
        taken.extend(c.metrics_addr.map(|a| a.port()));
        seeds.push(MemberConfig {
            name: c.name,
            peer_addr: c.peer_addr,
        });
    }
    let first = Config::load(&config_path(dir, 1))?;
    let ports = free_ports(3, &taken)?;
    node_certificate(dir, &name)?;
    let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let config = Config {
        name: name.clone(),
        data_dir: PathBuf::from(&name),
        client_addr: addr(ports[0]),
        peer_addr: addr(ports[1]),
        metrics_addr: Some(addr(ports[2])),
        tls: TlsConfig {
            ca_cert: "ca.pem".into(),
            cert: format!("{name}.pem").into(),
            key: format!("{name}.key").into(),
        },
        cluster: ClusterConfig {
            members: Vec::new(),
            seeds,
            ..first.cluster.clone()
        },
        threads: first.threads,
        zone,
        ..Default::default()
    };
    config.validate()?;
    let text = format!(
        "# Shoal dev node {i}, added to the cluster: it joins through its seeds\n{}",
        toml::to_string_pretty(&config)?
    );
    std::fs::write(config_path(dir, i), text)?;
    let mut listed = std::fs::read_to_string(dir.join("seeds.txt")).unwrap_or_default();
    listed.push_str(&format!("{}\n", config.client_addr));
    std::fs::write(dir.join("seeds.txt"), listed)?;
    if start {
        // Detached (no parent-death signal): it outlives this command, and
        // is stopped by hand (or by the launcher, which starts every
        // configured node on its next run).
        let dir = dir.canonicalize()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{name}.log")))?;
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(std::env::current_exe()?)
                .arg("node")
                .arg("--config")
                .arg(config_path(&dir, i))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .process_group(0)
                .spawn()
                .with_context(|| format!("starting {name}"))?
        };
        println!(
            "{name} started (pid {}, log {}); it asked to join: see `shoal cluster plan`, then the `shoal cluster commit` it prints",
            child.id(),
            dir.join(format!("{name}.log")).display()
        );
    } else {
        println!(
            "{name} configured: start it with `shoal node --config {}`",
            config_path(dir, i).display()
        );
    }
    Ok(name)
}

/// Creates the cluster directory, or checks an existing one matches `nodes`.
/// `fsync` goes into the configs of a new cluster (an existing one keeps
/// what its configs say).
fn prepare(dir: &Path, nodes: usize, fsync: bool) -> anyhow::Result<()> {
    // Nodes added with `--add` are not counted: they join by themselves.
    let existing = (1..)
        .take_while(|i| config_path(dir, *i).exists())
        .filter(|i| Config::load(&config_path(dir, *i)).is_ok_and(|c| c.cluster.seeds.is_empty()))
        .count();
    if existing > 0 {
        if existing != nodes {
            bail!(
                "{} holds a {existing}-node cluster; run `shoal dev --nodes {existing}`, or remove the directory to start afresh",
                dir.display()
            );
        }
        // A directory from before client certificates gets one, and node
        // keys from before sealed contexts the cluster's context key.
        for i in (1..).take_while(|i| config_path(dir, *i).exists()) {
            let key = Config::load(&config_path(dir, i))?.tls.key;
            shoal_node::certs::add_context_key(dir, &key)?;
        }
        return client_certificate(dir);
    }
    if nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if !dir.join("ca.key").exists() {
        shoal_node::certs::create_ca(dir)?;
    }
    client_certificate(dir)?;
    let ports = free_ports(nodes * 3, &[])?;
    let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let members: Vec<MemberConfig> = (1..=nodes)
        .map(|i| MemberConfig {
            name: format!("node{i}"),
            peer_addr: addr(ports[3 * i - 2]),
        })
        .collect();
    let mut seeds = String::new();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for i in 1..=nodes {
        let name = format!("node{i}");
        node_certificate(dir, &name)?;
        let config = Config {
            name: name.clone(),
            data_dir: PathBuf::from(&name),
            client_addr: addr(ports[3 * i - 3]),
            peer_addr: addr(ports[3 * i - 2]),
            metrics_addr: Some(addr(ports[3 * i - 1])),
            tls: TlsConfig {
                ca_cert: "ca.pem".into(),
                cert: format!("{name}.pem").into(),
                key: format!("{name}.key").into(),
            },
            cluster: ClusterConfig {
                n: nodes.min(3) as u32,
                r: nodes.min(2) as u32,
                w: nodes.min(2) as u32,
                members: members.clone(),
                ..Default::default()
            },
            // The nodes share this machine's cores.
            threads: cores.div_ceil(nodes).max(1),
            fsync,
            // Where the operator reserved huge pages on this machine.
            huge_pages: HugePages::Try,
            ..Default::default()
        };
        let text = format!(
            "# Shoal dev node {i}: start it by hand with `shoal node --config {}`\n{}",
            config_path(dir, i).display(),
            toml::to_string_pretty(&config)?
        );
        std::fs::write(config_path(dir, i), text)?;
        seeds.push_str(&format!("{}\n", config.client_addr));
    }
    std::fs::write(dir.join("seeds.txt"), seeds)?;
    Ok(())
}

fn spawn_node(dir: &Path, i: usize) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("node{i}.log")))?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("node")
        .arg("--config")
        .arg(config_path(dir, i))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Nodes die with the launcher, even if it is killed with SIGKILL.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("starting node{i}"))
}

/// Holds an exclusive lock on `dir/dev.lock` for as long as the file stays
/// open, so two launchers never share one cluster directory.
fn lock(dir: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("dev.lock"))?;
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "a `shoal dev` cluster is already running from {}; stop it first (Ctrl-C in its shell)",
            dir.display()
        );
    }
    Ok(file)
}

pub fn run(dir: &Path, nodes: usize, fsync: bool) -> anyhow::Result<()> {
    let _lock = lock(dir)?;
    prepare(dir, nodes, fsync)?;
    let dir = dir.canonicalize()?;
    let mut children: Vec<Option<Child>> = Vec::new();
    // Founding nodes, and those added since with `--add`.
    for i in 1..=configured(&dir).max(nodes) {
        children.push(Some(spawn_node(&dir, i)?));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(supervise(&dir, &mut children));
    for child in children.iter_mut().flatten() {
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for child in children.iter_mut().flatten() {
        while child.try_wait()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    result
}

async fn wait_ready(dir: &Path, children: &mut [Option<Child>]) -> anyhow::Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for (i, slot) in children.iter_mut().enumerate() {
            if let Some(status) = slot.as_mut().map(Child::try_wait).transpose()?.flatten() {
                // A node that fails to start (bad config, port taken) exits with
                // an error code: stop. One killed by a signal was killed by
                // someone on purpose: report it and carry on without it.
                if status.code().is_some_and(|c| c != 0) {
                    let log = std::fs::read_to_string(dir.join(format!("node{}.log", i + 1)))
                        .unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(5).collect();
                    bail!(
                        "node{} failed to start ({status}):\n{}",
                        i + 1,
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                println!("node{} exited ({status})", i + 1);
                *slot = None;
            }
        }
        let running = children.iter().filter(|c| c.is_some()).count();
        let attempt = async {
            let client = Client::connect(ClientConfig::from_dir(dir)?).await?;
            let statuses = client.statuses().await?;
            let ready = statuses
                .iter()
                .filter(|(_, s)| s.as_ref().is_ok_and(|s| s.ring_ready))
                .count();
            anyhow::ensure!(ready >= running, "{ready} of {running} nodes ready");
            Ok(client)
        };
        match attempt.await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => bail!(
                "cluster not ready after 30 s: {e:#}; see the node logs in {}",
                dir.display()
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn supervise(dir: &Path, children: &mut [Option<Child>]) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // One listener each, made before anything is awaited: a signal is kept
    // for the listener that exists when it comes, so one per wait would lose
    // a Ctrl-C that came between two waits (the launcher then ran on).
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let nodes = children.len();
    let client = tokio::select! {
        c = wait_ready(dir, children) => c?,
        _ = interrupt.recv() => return Ok(()),
        _ = term.recv() => return Ok(()),
    };
    println!(
        "Shoal dev cluster: {nodes} nodes on loopback, data and certificates in {}",
        dir.display()
    );
    for (member, status) in client.statuses().await? {
        let pid = status
            .map(|s| s.pid.to_string())
            .unwrap_or_else(|_| "?".into());
        println!(
            "  {:<8} client {}  peer {}  pid {pid}",
            member.name, member.client_addr, member.peer_addr
        );
    }
    println!();
    println!("In another shell:   shoal put hello world && shoal get hello");
    println!("                    shoal status; shoal inspect hello");
    println!(
        "From Rust:          ClientConfig::from_dir(Path::new({:?}))",
        dir.display().to_string()
    );
    println!(
        "Restart a node:     shoal node --config {}",
        config_path(dir, 1).display()
    );
    println!("Ctrl-C stops the cluster; running `shoal dev` again keeps the data.");
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = interrupt.recv() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = tick.tick() => {
                for (i, slot) in children.iter_mut().enumerate() {
                    if let Some(child) = slot {
                        if let Some(status) = child.try_wait()? {
                            if status.success() {
                                // A node stops by itself once it has left.
                                println!("node{} stopped: it is no longer a member (it left, or was removed)", i + 1);
                            } else {
                                println!("node{} exited ({status}); bring it back with: shoal node --config {}", i + 1, config_path(dir, i + 1).display());
                            }
                            *slot = None;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
