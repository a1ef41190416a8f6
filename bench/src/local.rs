//! `--local N`: a Shoal cluster that shoal-bench starts itself with
//! `shoal dev` in a temporary directory, in its own process group, killed and
//! removed when the run ends (also on Ctrl-C or a panic).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use shoal_client::{Client, ClientConfig};

/// The `shoal` binary: `$SHOAL_BIN`, else next to this executable, else `PATH`.
pub fn shoal_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SHOAL_BIN") {
        return PathBuf::from(p);
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        let candidate = dir.join("shoal");
        if candidate.exists() {
            return candidate;
        }
    }
    PathBuf::from("shoal")
}

pub struct LocalCluster {
    dir: tempfile::TempDir,
    launcher: Child,
    pub handle: Handle,
}

/// What faults need of a local cluster: its directory and process group.
#[derive(Debug, Clone)]
pub struct Handle {
    dir: PathBuf,
    pgid: i32,
}

impl LocalCluster {
    /// Starts `shoal dev --nodes N` (`--fsync`: every write synced to disk
    /// before it is acknowledged) and waits (at most 60 s) until every node
    /// knows the ring.
    pub async fn start(nodes: usize, fsync: bool) -> anyhow::Result<LocalCluster> {
        let dir = tempfile::Builder::new().prefix("shoal-bench-").tempdir()?;
        let log = std::fs::File::create(dir.path().join("dev.log"))?;
        let launcher = Command::new(shoal_bin())
            .arg("--dir")
            .arg(dir.path())
            .arg("dev")
            .arg("--nodes")
            .arg(nodes.to_string())
            .args(fsync.then_some("--fsync"))
            .env_remove("SHOAL_DEV_DIR")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {} dev", shoal_bin().display()))?;
        let pgid = launcher.id() as i32;
        let handle = Handle {
            dir: dir.path().to_path_buf(),
            pgid,
        };
        let cluster = LocalCluster {
            dir,
            launcher,
            handle,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(statuses) = cluster.handle.statuses().await {
                if statuses.len() == nodes && statuses.iter().all(|(_, ready, _)| *ready) {
                    return Ok(cluster);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "local cluster not ready within 60 s; see {}",
                    cluster.dir.path().join("dev.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Handle {
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The process group of the launcher and every node it started.
    pub fn pgid(&self) -> i32 {
        self.pgid
    }

    /// How many nodes the directory configures (`nodeN.toml`).
    pub fn configured(&self) -> usize {
        (1..)
            .take_while(|i| self.dir.join(format!("node{i}.toml")).exists())
            .count()
    }

    /// (name, ready, pid) of every node that answers.
    async fn statuses(&self) -> anyhow::Result<Vec<(String, bool, u32)>> {
        let client = Client::connect(ClientConfig::from_dir(self.path())?).await?;
        Ok(client
            .statuses()
            .await?
            .into_iter()
            .filter_map(|(m, s)| {
                s.ok()
                    .map(|s| (m.name, s.ring_ready && s.unreachable.is_empty(), s.pid))
            })
            .collect())
    }

    /// kill -9 of one node.
    pub async fn kill9(&self, node: &str) -> anyhow::Result<()> {
        let statuses = self.statuses().await?;
        let Some((_, _, pid)) = statuses.iter().find(|(n, _, _)| n == node) else {
            bail!("no running node named {node}");
        };
        // SAFETY: kill(2) on a pid of a child process group this run owns.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        Ok(())
    }

    /// Starts a killed node again, as an operator would.
    pub fn restart(&self, node: &str) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join(format!("{node}.log")))?;
        Command::new(shoal_bin())
            .arg("node")
            .arg("--config")
            .arg(self.path().join(format!("{node}.toml")))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(self.pgid)
            .spawn()?;
        Ok(())
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // SAFETY: signals the process group this run created.
        unsafe { libc::kill(-self.handle.pgid, libc::SIGKILL) };
        let _ = self.launcher.wait();
    }
}
