//! A real `shoal dev` cluster for tests: its own temp dir, its own process
//! group, every process killed when the handle drops.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use shoal_client::{Client, ClientConfig};

/// The `shoal` binary of this build: next to the test executable's `deps/`.
pub fn shoal_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SHOAL_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("shoal");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --bin shoal` (cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

pub struct DevCluster {
    pub dir: tempfile::TempDir,
    pub nodes: usize,
    launcher: Child,
    /// Process group of the launcher, its nodes and any node restarted by hand.
    pgid: i32,
}

impl DevCluster {
    /// Starts `shoal dev --nodes N` and waits (at most 60 s) until every node
    /// knows the ring.
    pub async fn start(nodes: usize) -> DevCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let launcher = launch(dir.path(), nodes);
        let pgid = launcher.id() as i32;
        let cluster = DevCluster {
            dir,
            nodes,
            launcher,
            pgid,
        };
        cluster.wait_ready(Duration::from_secs(60)).await;
        cluster
    }

    /// Stops the launcher as Ctrl-C would (SIGINT), waits for it to exit, and
    /// runs `shoal dev` again on the same directory.
    pub async fn rerun(&mut self) {
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
        self.launcher = launch(self.dir.path(), self.nodes);
        self.pgid = self.launcher.id() as i32;
        self.wait_ready(Duration::from_secs(60)).await;
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
                                s.as_ref()
                                    .is_ok_and(|s| s.ring_ready && s.unreachable.is_empty())
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
        let pid = self.pid_of(node).await as i32;
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
            // The launcher reaps its children; a zombie still answers kill(0).
            if std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts a node again by hand, as a user would: `shoal node --config`.
    pub fn restart(&self, node: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join(format!("{node}.log")))
            .expect("log");
        Command::new(shoal_bin())
            .arg("node")
            .arg("--config")
            .arg(self.path().join(format!("{node}.toml")))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(self.pgid)
            .spawn()
            .expect("restart node");
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for name in
            std::iter::once("dev".to_string()).chain((1..=self.nodes).map(|i| format!("node{i}")))
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

fn launch(dir: &Path, nodes: usize) -> Child {
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
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("start shoal dev")
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
        let _ = self.launcher.wait();
    }
}
