//! The `shoal` command: run a node, run a local dev cluster, manage
//! certificates, and read, write and inspect data.

mod cli;
mod dev;
mod members;

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "Shoal: a leaderless, Dynamo-style key-value store"
)]
struct Args {
    /// Cluster directory holding `ca.pem` and `seeds.txt` (what `shoal dev` writes).
    #[arg(long, global = true, env = "SHOAL_DEV_DIR", default_value_os_t = dev::default_dir())]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local cluster on loopback, one process per node, in the foreground.
    Dev {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Add a node to the dev cluster in --dir (running or not): it gets
        /// a certificate and a config whose seeds are the nodes there, and
        /// is started in the background; it stages its own join, which
        /// `shoal cluster plan` / `commit` apply. To shrink, `shoal leave
        /// NODE`, plan and commit: the node stops once it handed everything off.
        #[arg(long)]
        add: bool,
        /// With --add: write the config, do not start the node.
        #[arg(long, requires = "add")]
        no_start: bool,
        /// With --add: the new node's zone (failure domain).
        #[arg(long, requires = "add")]
        zone: Option<String>,
        /// A new cluster's nodes sync their WAL before acknowledging a
        /// write (`fsync = true`: durable across power loss).
        #[arg(long, conflicts_with = "add")]
        fsync: bool,
    },
    /// Run one node.
    Node {
        #[arg(long)]
        config: PathBuf,
    },
    /// Create a CA and issue node and client certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Write a value (`-` reads it from standard input).
    Put {
        key: String,
        value: String,
        #[command(flatten)]
        opts: cli::DataOpts,
    },
    /// Read a key: the value alone when there is one; all siblings otherwise.
    Get {
        key: String,
        #[command(flatten)]
        opts: cli::DataOpts,
    },
    /// Delete a key (what the given context covers; without one, what a read sees now).
    Delete {
        key: String,
        #[command(flatten)]
        opts: cli::DataOpts,
    },
    /// Members, their addresses, pids, liveness and partitions owned.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// A key's preference list and what each replica stores, clocks included.
    Inspect {
        key: String,
        #[arg(long)]
        json: bool,
    },
    /// Membership changes: see the staged plan, commit it, or clear it.
    Cluster {
        #[command(subcommand)]
        command: members::ClusterCmd,
    },
    /// Point a new node's config at a running cluster: the members are read
    /// from SEED (any member's client address, with the CA and a client
    /// certificate from --dir) and written as the config's `cluster.seeds`.
    /// Started, the node announces itself and stages its join; then
    /// `shoal cluster plan` and `shoal cluster commit`.
    Join {
        seed: std::net::SocketAddr,
        /// The new node's config file (rewritten in place).
        #[arg(long)]
        config: PathBuf,
    },
    /// Stage NODE's leave: once committed, it hands every partition to the others, then stops.
    Leave { node: String },
    /// Stage the removal of NODE, a machine gone for good: its partitions
    /// are rebuilt on their new owners from the surviving replicas.
    Remove { node: String },
    /// Stage NEW (started with seeds; it has announced itself) taking OLD's place.
    Replace { old: String, new: String },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create `ca.pem`, `ca.key` and the cluster's `context.key` in --dir.
    Ca,
    /// Add the cluster's context key (from --dir, made there if the CA is
    /// from before context keys) to a node's key file that has none,
    /// keeping its TLS key.
    ContextKey {
        /// The node's key file.
        #[arg(long)]
        key: PathBuf,
    },
    /// Issue NAME.pem/NAME.key for a node, signed by the CA in --dir.
    Node {
        #[arg(long)]
        name: String,
        /// IP addresses to add to the certificate.
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// Where to write (default: --dir).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Issue NAME.pem/NAME.key for a client. Put them in the directory the
    /// CLI or SDK reads as client.pem and client.key.
    Client {
        #[arg(long)]
        name: String,
        /// What the client may do: read-only, read-write or admin.
        #[arg(long, default_value = "read-write")]
        role: shoal_node::certs::Role,
        /// Valid for this many days (default: no practical end).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        days: Option<u32>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() {
    let args = Args::parse();
    if !matches!(args.command, Command::Node { .. } | Command::Dev { .. }) {
        // A command's output piped into `head` ends quietly, as other
        // command-line tools do, rather than panicking on a closed pipe.
        // SAFETY: restores the default disposition before any thread runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match args.command {
        Command::Node { config } => run_node(config),
        Command::Dev {
            add: true,
            no_start,
            zone,
            ..
        } => dev::add(&args.dir, !no_start, zone).map(drop),
        Command::Dev { nodes, fsync, .. } => dev::run(&args.dir, nodes, fsync),
        Command::Certs { command } => certs(&args.dir, command),
        Command::Cluster { command } => runtime().and_then(|rt| {
            use members::ClusterCmd;
            use shoal_client::proto::ClusterCommand;
            let (command, json) = match command {
                ClusterCmd::Plan { json } => (ClusterCommand::Plan, json),
                ClusterCmd::Commit {
                    version,
                    plan,
                    json,
                } => (ClusterCommand::Commit { version, plan }, json),
                ClusterCmd::Clear => (ClusterCommand::Clear, false),
            };
            rt.block_on(members::run(&args.dir, command, json))
        }),
        Command::Join { seed, config } => {
            runtime().and_then(|rt| rt.block_on(members::join(&args.dir, seed, &config)))
        }
        Command::Leave { node } => runtime().and_then(|rt| {
            rt.block_on(members::run(
                &args.dir,
                shoal_client::proto::ClusterCommand::Leave { node },
                false,
            ))
        }),
        Command::Remove { node } => runtime().and_then(|rt| {
            rt.block_on(members::run(
                &args.dir,
                shoal_client::proto::ClusterCommand::Remove { node },
                false,
            ))
        }),
        Command::Replace { old, new } => runtime().and_then(|rt| {
            rt.block_on(members::run(
                &args.dir,
                shoal_client::proto::ClusterCommand::Replace { old, new },
                false,
            ))
        }),
        data => runtime().and_then(|rt| rt.block_on(cli::run(&args.dir, data))),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn certs(dir: &std::path::Path, command: CertsCommand) -> anyhow::Result<()> {
    use shoal_node::certs::{create_ca, issue, Kind};
    match command {
        CertsCommand::Ca => create_ca(dir)?,
        CertsCommand::ContextKey { key } => shoal_node::certs::add_context_key(dir, &key)?,
        CertsCommand::Node { name, ip, out } => issue(
            dir,
            out.as_deref().unwrap_or(dir),
            &name,
            Kind::Node,
            &ip,
            None,
        )?,
        CertsCommand::Client {
            name,
            role,
            days,
            out,
        } => issue(
            dir,
            out.as_deref().unwrap_or(dir),
            &name,
            Kind::Client(role),
            &[],
            days.map(i64::from),
        )?,
    }
    Ok(())
}

/// Tasks a node's worker runs between two looks at its sockets and timers
/// while it has tasks ready (tokio's default is 61; when none is ready it
/// looks at once, so an idle or lightly loaded node answers as soon as
/// before). Under load each look then finds more datagrams waiting, taken
/// in fewer `recvmmsg` calls and driver wake-ups. On the 2-core bench
/// machine, workload a closed loop (20 s cells, six pairs alternating with
/// 61 in one sitting): 1-8% more operations a second at 256 in every pair,
/// and at 10,000 ops/s open loop the same p99 (1.14-1.21 ms either way);
/// 1,024 gained nothing over 256 (bench/README.md, fifteenth look).
const EVENT_INTERVAL: u32 = 256;

fn run_node(config: PathBuf) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,quinn=warn".into()),
        )
        .init();
    let config = shoal_node::config::Config::load(&config)?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.threads > 0 {
        runtime.worker_threads(config.threads);
    }
    runtime.event_interval(EVENT_INTERVAL);
    runtime.enable_all().build()?.block_on(async move {
        let running = shoal_node::server::start(config).await?;
        notify_systemd("READY=1");
        println!(
            "ready: client {} peer {}",
            running.client_addr, running.peer_addr
        );
        running.until_stopped(shutdown_signal()).await;
        notify_systemd("STOPPING=1");
        running.stop().await;
        Ok(())
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Tells systemd (Type=notify) about state changes, when run under it.
fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    if let (Ok(sock), Ok(addr)) = (UnixDatagram::unbound(), addr) {
        let _ = sock.send_to_addr(state.as_bytes(), &addr);
    }
}
