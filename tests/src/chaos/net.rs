//! The chaos suite's network: one Linux network namespace per node and one
//! for the clients, joined by a bridge that lives in a namespace of its own,
//! so nothing on the machine's own network changes and no packet leaves
//! these namespaces.
//!
//! Faults are iptables rules inside the namespaces: a partition drops, at the
//! receiver, what one side sends to the other (`INPUT`, so one-way cuts are
//! one rule); a degraded link drops a share of a node's outgoing packets and
//! hands the rest to a [`Delayer`] on an NFQUEUE, which holds each for a
//! random delay (so packets also overtake each other). This kernel has no
//! `netem`, and NFQUEUE does the same job from user space.
//!
//! Everything is torn down on drop; namespaces left by a run that was killed
//! (its pid is in their names) are removed by the next run.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::{Rng, SeedableRng};

const NS_PREFIX: &str = "shoalchaos";

/// A host on the lab network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Host {
    /// Node `i`, from 1.
    Node(usize),
    Clients,
}

impl Host {
    pub fn ip(self) -> Ipv4Addr {
        match self {
            Host::Node(i) => Ipv4Addr::new(10, 77, 0, i as u8),
            Host::Clients => Ipv4Addr::new(10, 77, 0, 200),
        }
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Node(i) => write!(f, "node{i}"),
            Host::Clients => write!(f, "clients"),
        }
    }
}

/// The namespaces, the bridge and the delayers of one run.
pub struct Lab {
    prefix: String,
    nodes: usize,
    delayers: Vec<Delayer>,
    /// Links cut, as (from, to): packets from `from` are dropped at `to`.
    cuts: BTreeSet<(Host, Host)>,
}

impl Lab {
    /// Creates the namespaces of `nodes` nodes and the clients; needs root.
    pub fn create(nodes: usize, seed: u64) -> anyhow::Result<Lab> {
        if unsafe { libc::geteuid() } != 0 {
            bail!("the chaos suite needs root: it creates network namespaces and iptables rules");
        }
        for tool in ["ip", "iptables"] {
            if Command::new(tool).arg("-V").output().is_err() {
                bail!(
                    "`{tool}` not found: run deploy/setup.sh (it installs iproute2 and iptables)"
                );
            }
        }
        remove_stale();
        // The pid first (stale runs are found by it), then a count: one
        // process may hold several labs.
        static LABS: AtomicU32 = AtomicU32::new(0);
        let mut lab = Lab {
            prefix: format!(
                "{NS_PREFIX}{}x{}",
                std::process::id(),
                LABS.fetch_add(1, Ordering::Relaxed)
            ),
            nodes,
            delayers: Vec::new(),
            cuts: BTreeSet::new(),
        };
        let switch = lab.switch_ns();
        run("ip", &["netns", "add", &switch])?;
        run(
            "ip",
            &["-n", &switch, "link", "add", "br0", "type", "bridge"],
        )?;
        run("ip", &["-n", &switch, "link", "set", "br0", "up"])?;
        for (n, host) in lab.hosts().into_iter().enumerate() {
            let ns = lab.ns(host);
            let port = format!("p{n}");
            run("ip", &["netns", "add", &ns])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            run(
                "ip",
                &[
                    "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                    "netns", &switch,
                ],
            )?;
            run(
                "ip",
                &["-n", &switch, "link", "set", &port, "master", "br0"],
            )?;
            run("ip", &["-n", &switch, "link", "set", &port, "up"])?;
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{}/24", host.ip()),
                    "dev",
                    "eth0",
                ],
            )?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            lab.delayers.push(Delayer::start(
                host,
                &lab.ns_path(host),
                seed.wrapping_add(n as u64),
            )?);
        }
        Ok(lab)
    }

    pub fn hosts(&self) -> Vec<Host> {
        (1..=self.nodes)
            .map(Host::Node)
            .chain(std::iter::once(Host::Clients))
            .collect()
    }

    fn switch_ns(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    pub fn ns(&self, host: Host) -> String {
        match host {
            Host::Node(i) => format!("{}-n{i}", self.prefix),
            Host::Clients => format!("{}-cl", self.prefix),
        }
    }

    pub fn ns_path(&self, host: Host) -> String {
        format!("/var/run/netns/{}", self.ns(host))
    }

    /// Drops every packet `from` sends to `to` (one direction).
    pub fn cut(&mut self, from: Host, to: Host) -> anyhow::Result<()> {
        if from == to || !self.cuts.insert((from, to)) {
            return Ok(());
        }
        let src = from.ip().to_string();
        iptables(&self.ns(to), &["-A", "INPUT", "-s", &src, "-j", "DROP"])
    }

    /// Cuts both directions between every host of `a` and every host of `b`.
    pub fn partition(&mut self, a: &[Host], b: &[Host]) -> anyhow::Result<()> {
        for &x in a {
            for &y in b {
                self.cut(x, y)?;
                self.cut(y, x)?;
            }
        }
        Ok(())
    }

    /// Removes every cut.
    pub fn heal_partitions(&mut self) -> anyhow::Result<()> {
        for host in self.hosts() {
            iptables(&self.ns(host), &["-F", "INPUT"])?;
        }
        self.cuts.clear();
        Ok(())
    }

    pub fn cuts(&self) -> &BTreeSet<(Host, Host)> {
        &self.cuts
    }

    /// Degrades what `host` sends: `loss_percent` of its packets dropped, the
    /// rest delayed by `delay_ms` ± `jitter_ms` (jitter reorders them).
    pub fn degrade(
        &mut self,
        host: Host,
        loss_percent: u32,
        delay_ms: u32,
        jitter_ms: u32,
    ) -> anyhow::Result<()> {
        self.restore(host)?;
        let ns = self.ns(host);
        let delayer = self.delayer(host);
        delayer.delay_ms.store(delay_ms, Ordering::Relaxed);
        delayer.jitter_ms.store(jitter_ms, Ordering::Relaxed);
        if loss_percent > 0 {
            let p = format!("{:.3}", f64::from(loss_percent) / 100.0);
            iptables(
                &ns,
                &[
                    "-A",
                    "OUTPUT",
                    "-o",
                    "eth0",
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &p,
                    "-j",
                    "DROP",
                ],
            )?;
        }
        // --queue-bypass: should the delayer be gone, packets pass rather
        // than vanish.
        iptables(
            &ns,
            &[
                "-A",
                "OUTPUT",
                "-o",
                "eth0",
                "-p",
                "udp",
                "-j",
                "NFQUEUE",
                "--queue-num",
                "0",
                "--queue-bypass",
            ],
        )
    }

    /// Undoes [`Self::degrade`].
    pub fn restore(&mut self, host: Host) -> anyhow::Result<()> {
        iptables(&self.ns(host), &["-F", "OUTPUT"])
    }

    fn delayer(&self, host: Host) -> &Delayer {
        self.delayers
            .iter()
            .find(|d| d.host == host)
            .expect("a delayer per host")
    }

    /// Packets the delayers held, over all hosts.
    pub fn delayed_packets(&self) -> u64 {
        self.delayers
            .iter()
            .map(|d| u64::from(d.packets.load(Ordering::Relaxed)))
            .sum()
    }

    /// Runs `f` on a new thread that has entered `host`'s namespace: sockets
    /// it (and threads it starts) opens live there.
    pub fn enter<T: Send + 'static>(
        &self,
        host: Host,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<JoinHandle<T>> {
        let path = self.ns_path(host);
        let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        Ok(std::thread::spawn(move || {
            enter_ns(&ns).expect("setns into a lab namespace");
            f()
        }))
    }
}

/// Moves the calling thread into the network namespace `ns` (a file under
/// /var/run/netns). Async-signal-safe: usable in `pre_exec`.
pub fn enter_ns(ns: &std::fs::File) -> std::io::Result<()> {
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Lab {
    fn drop(&mut self) {
        for d in &mut self.delayers {
            d.stop();
        }
        for host in self.hosts() {
            let _ = run("ip", &["netns", "del", &self.ns(host)]);
        }
        let _ = run("ip", &["netns", "del", &self.switch_ns()]);
    }
}

/// Deletes namespaces of runs whose process is gone.
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let alive = pid
            .parse::<i32>()
            .is_ok_and(|p| unsafe { libc::kill(p, 0) } == 0);
        if !alive {
            let _ = run("ip", &["netns", "del", &name]);
        }
    }
}

fn iptables(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["netns", "exec", ns, "iptables", "-w"];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Runs a setup command; its stderr becomes the error.
pub(super) fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Holds the packets a host's NFQUEUE receives for a random delay, then lets
/// them go; runs on its own thread inside the host's namespace.
struct Delayer {
    host: Host,
    delay_ms: Arc<AtomicU32>,
    jitter_ms: Arc<AtomicU32>,
    packets: Arc<AtomicU32>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Delayer {
    fn start(host: Host, ns_path: &str, seed: u64) -> anyhow::Result<Delayer> {
        let ns = std::fs::File::open(ns_path).with_context(|| format!("opening {ns_path}"))?;
        let delay_ms = Arc::new(AtomicU32::new(0));
        let jitter_ms = Arc::new(AtomicU32::new(0));
        let packets = Arc::new(AtomicU32::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (delay_ms, jitter_ms, packets, stopping) = (
                delay_ms.clone(),
                jitter_ms.clone(),
                packets.clone(),
                stopping.clone(),
            );
            std::thread::spawn(move || {
                let queue = enter_ns(&ns)
                    .map_err(anyhow::Error::from)
                    .and_then(|()| open_queue());
                let mut queue = match queue {
                    Ok(q) => {
                        let _ = ready_tx.send(Ok(()));
                        q
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let mut held: Vec<(Instant, nfq::Message)> = Vec::new();
                loop {
                    let stop = stopping.load(Ordering::Relaxed);
                    let now = Instant::now();
                    let mut i = 0;
                    while i < held.len() {
                        if stop || held[i].0 <= now {
                            let (_, mut msg) = held.swap_remove(i);
                            msg.set_verdict(nfq::Verdict::Accept);
                            let _ = queue.verdict(msg);
                        } else {
                            i += 1;
                        }
                    }
                    if stop {
                        return;
                    }
                    match queue.recv() {
                        Ok(msg) => {
                            packets.fetch_add(1, Ordering::Relaxed);
                            let base = delay_ms.load(Ordering::Relaxed);
                            let jitter = jitter_ms.load(Ordering::Relaxed);
                            let ms = rng.gen_range(base.saturating_sub(jitter)..=base + jitter);
                            held.push((now + Duration::from_millis(ms.into()), msg));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                }
            })
        };
        ready_rx
            .recv()
            .context("delayer thread")?
            .with_context(|| format!("NFQUEUE for {host}"))?;
        Ok(Delayer {
            host,
            delay_ms,
            jitter_ms,
            packets,
            stopping,
            thread: Some(thread),
        })
    }

    fn stop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn open_queue() -> anyhow::Result<nfq::Queue> {
    let mut q = nfq::Queue::open().context("opening an NFQUEUE socket")?;
    q.bind(0).context("binding NFQUEUE 0")?;
    // Over 4096 held packets, the kernel lets more through undelayed rather
    // than dropping them.
    let _ = q.set_queue_max_len(0, 4096);
    let _ = q.set_fail_open(0, true);
    q.set_nonblocking(true);
    Ok(q)
}
