//! What a benchmark drives: a Shoal cluster (through the SDK), a Redis
//! server (RESP over TCP) or an etcd cluster (the v3 JSON gateway over
//! HTTP/1.1). Each worker holds its own [`Conn`], so every target sees the
//! same concurrency.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use shoal_client::proto::{CausalContext, RequestOptions};
use shoal_client::{Client, ClientConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Where the load goes.
#[derive(Debug, Clone)]
pub enum TargetSpec {
    /// A Shoal cluster: its directory (`ca.pem`, `seeds.txt`).
    Shoal(PathBuf),
    Redis(SocketAddr),
    /// One or more etcd gateway addresses; workers spread over them.
    Etcd(Vec<SocketAddr>),
}

impl std::str::FromStr for TargetSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let addrs = |list: &str| -> Result<Vec<SocketAddr>, String> {
            list.split(',')
                .map(|a| a.parse().map_err(|e| format!("`{a}`: {e}")))
                .collect()
        };
        if let Some(rest) = s.strip_prefix("redis://") {
            let a = addrs(rest)?;
            return match a.as_slice() {
                [one] => Ok(TargetSpec::Redis(*one)),
                _ => Err("redis:// takes one HOST:PORT".into()),
            };
        }
        if let Some(rest) = s.strip_prefix("etcd://") {
            return Ok(TargetSpec::Etcd(addrs(rest)?));
        }
        let dir = s.strip_prefix("shoal://").unwrap_or(s);
        Ok(TargetSpec::Shoal(PathBuf::from(dir)))
    }
}

impl TargetSpec {
    pub fn name(&self) -> String {
        match self {
            TargetSpec::Shoal(d) => format!("shoal ({})", d.display()),
            TargetSpec::Redis(a) => format!("redis ({a})"),
            TargetSpec::Etcd(a) => format!("etcd ({} endpoints)", a.len()),
        }
    }
}

/// How a Shoal update is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Updates {
    /// With the causal context the run last saw of the key (from a read's
    /// or a write's reply), as an application's read-modify-write would:
    /// the update replaces the versions seen, as YCSB's update replaces
    /// the record and a Redis SET or an etcd put does.
    Context,
    /// Without a context: each update adds a sibling beside the versions
    /// already stored, so the objects grow through the run (the figures
    /// of bench/README.md before 2026-12-04's fourth look).
    Blind,
}

/// At most this many keys' contexts are kept (about 180 bytes each, so
/// 2.9 GB at the cap): the scaling table's 10 million records fit. An
/// update of a key beyond them is written blind.
const MAX_CONTEXTS: usize = 16_000_000;
const CONTEXT_SHARDS: usize = 64;

/// The causal context last seen of each key, shared by a run's workers
/// (see [`Updates::Context`]). Two workers updating a key at once still
/// make two siblings, as two clients would; the next update of the key
/// supersedes what its coordinator has seen.
#[derive(Default)]
pub struct Contexts {
    shards: Vec<Mutex<ContextMap>>,
}

/// foldhash rather than SipHash: the generator's own key lookups were 4%
/// of its CPU, and the keys are its own.
type ContextMap = HashMap<Vec<u8>, CausalContext, foldhash::fast::RandomState>;

impl Contexts {
    fn new() -> Self {
        Contexts {
            shards: (0..CONTEXT_SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn shard(&self, key: &[u8]) -> &Mutex<ContextMap> {
        let h = crc32fast::hash(key) as usize;
        &self.shards[h % self.shards.len()]
    }

    fn get(&self, key: &[u8]) -> Option<CausalContext> {
        let shard = self.shard(key).lock().expect("contexts lock");
        shard.get(key).cloned()
    }

    fn remember(&self, key: &[u8], context: CausalContext) {
        if context.is_empty() {
            return;
        }
        let mut shard = self.shard(key).lock().expect("contexts lock");
        if let Some(slot) = shard.get_mut(key) {
            *slot = context;
        } else if shard.len() < MAX_CONTEXTS / CONTEXT_SHARDS {
            shard.insert(key.to_vec(), context);
        }
    }
}

/// A connected target, shared by the workers.
#[derive(Clone)]
pub enum Target {
    /// The client, and the contexts updates are written with (`None`:
    /// blind updates).
    Shoal(Client, Option<Arc<Contexts>>),
    Redis(SocketAddr),
    Etcd(Vec<SocketAddr>),
}

impl Target {
    pub async fn connect(
        spec: &TargetSpec,
        options: RequestOptions,
        updates: Updates,
    ) -> anyhow::Result<Target> {
        Ok(match spec {
            TargetSpec::Shoal(dir) => {
                let mut config = ClientConfig::from_dir(dir)
                    .with_context(|| format!("Shoal cluster directory {}", dir.display()))?;
                config.options = options;
                config.timeout = Duration::from_secs(5);
                Target::Shoal(
                    Client::connect(config)
                        .await
                        .context("connecting to Shoal")?,
                    (updates == Updates::Context).then(|| Arc::new(Contexts::new())),
                )
            }
            TargetSpec::Redis(a) => Target::Redis(*a),
            TargetSpec::Etcd(a) => Target::Etcd(a.clone()),
        })
    }

    /// The connection of worker `i`.
    pub async fn conn(&self, i: usize) -> anyhow::Result<Conn> {
        Ok(match self {
            Target::Shoal(c, contexts) => Conn::Shoal(c.clone(), contexts.clone()),
            Target::Redis(a) => Conn::Redis(BufReader::new(
                TcpStream::connect(a)
                    .await
                    .with_context(|| format!("redis at {a}"))?,
            )),
            Target::Etcd(list) => {
                let a = list[i % list.len()];
                Conn::Etcd(
                    a,
                    BufReader::new(
                        TcpStream::connect(a)
                            .await
                            .with_context(|| format!("etcd at {a}"))?,
                    ),
                )
            }
        })
    }
}

/// One worker's connection.
pub enum Conn {
    Shoal(Client, Option<Arc<Contexts>>),
    Redis(BufReader<TcpStream>),
    Etcd(SocketAddr, BufReader<TcpStream>),
}

impl Conn {
    pub async fn read(&mut self, key: &[u8]) -> anyhow::Result<()> {
        match self {
            Conn::Shoal(c, contexts) => {
                let reply = c.get(key).await?;
                if let Some(contexts) = contexts {
                    contexts.remember(key, reply.context);
                }
                Ok(())
            }
            Conn::Redis(s) => {
                resp_command(s, &[b"GET", key]).await?;
                match resp_reply(s).await? {
                    Resp::Bulk | Resp::Nil => Ok(()),
                    other => bail!("redis GET: {other:?}"),
                }
            }
            Conn::Etcd(a, s) => {
                let body = format!("{{\"key\":\"{}\"}}", base64(key));
                http_post(s, *a, "/v3/kv/range", &body).await
            }
        }
    }

    pub async fn update(&mut self, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        match self {
            // No read first, as YCSB's update: the context is the last
            // one the run saw of the key, if any (see `Updates`).
            Conn::Shoal(c, contexts) => {
                let seen = contexts.as_ref().and_then(|m| m.get(key));
                let reply = c.put(key, value, seen.as_ref()).await?;
                if let Some(contexts) = contexts {
                    contexts.remember(key, reply.context);
                }
                Ok(())
            }
            Conn::Redis(s) => {
                resp_command(s, &[b"SET", key, value]).await?;
                match resp_reply(s).await? {
                    Resp::Status => Ok(()),
                    other => bail!("redis SET: {other:?}"),
                }
            }
            Conn::Etcd(a, s) => {
                let body = format!(
                    "{{\"key\":\"{}\",\"value\":\"{}\"}}",
                    base64(key),
                    base64(value)
                );
                http_post(s, *a, "/v3/kv/put", &body).await
            }
        }
    }
}

/// A RESP reply's kind (the payload is read and dropped).
#[derive(Debug)]
enum Resp {
    Status,
    Bulk,
    Nil,
    Int,
}

async fn resp_command(s: &mut BufReader<TcpStream>, args: &[&[u8]]) -> anyhow::Result<()> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    s.get_mut().write_all(&out).await?;
    Ok(())
}

async fn resp_reply(s: &mut BufReader<TcpStream>) -> anyhow::Result<Resp> {
    let mut line = String::new();
    if s.read_line(&mut line).await? == 0 {
        bail!("redis closed the connection");
    }
    let line = line.trim_end();
    let (kind, rest) = line.split_at(1.min(line.len()));
    match kind {
        "+" => Ok(Resp::Status),
        "-" => Err(anyhow!("redis error: {rest}")),
        ":" => rest.parse::<i64>().map(|_| Resp::Int).map_err(Into::into),
        "$" => {
            let len: i64 = rest.parse()?;
            if len < 0 {
                return Ok(Resp::Nil);
            }
            let mut buf = vec![0u8; len as usize + 2];
            s.read_exact(&mut buf).await?;
            Ok(Resp::Bulk)
        }
        _ => bail!("unexpected redis reply `{line}`"),
    }
}

/// One keep-alive HTTP/1.1 POST; succeeds on a 200 answer.
async fn http_post(
    s: &mut BufReader<TcpStream>,
    host: SocketAddr,
    path: &str,
    body: &str,
) -> anyhow::Result<()> {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.get_mut().write_all(request.as_bytes()).await?;
    let mut status = String::new();
    if s.read_line(&mut status).await? == 0 {
        bail!("etcd closed the connection");
    }
    let mut length = 0usize;
    let mut chunked = false;
    loop {
        let mut h = String::new();
        s.read_line(&mut h).await?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse()?;
        }
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    if chunked {
        loop {
            let mut size = String::new();
            s.read_line(&mut size).await?;
            let n = usize::from_str_radix(size.trim(), 16)?;
            let mut buf = vec![0u8; n + 2];
            s.read_exact(&mut buf).await?;
            if n == 0 {
                break;
            }
        }
    } else {
        let mut buf = vec![0u8; length];
        s.read_exact(&mut buf).await?;
    }
    if !status.contains(" 200 ") {
        bail!("etcd {path}: {}", status.trim_end());
    }
    Ok(())
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_examples() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn targets_parse() {
        assert!(matches!(
            "redis://127.0.0.1:6379".parse(),
            Ok(TargetSpec::Redis(_))
        ));
        assert!(
            matches!("etcd://127.0.0.1:2379,127.0.0.1:22379".parse(), Ok(TargetSpec::Etcd(v)) if v.len() == 2)
        );
        assert!(matches!("/tmp/x".parse(), Ok(TargetSpec::Shoal(_))));
        assert!("redis://nonsense".parse::<TargetSpec>().is_err());
    }

    #[test]
    fn contexts_keep_the_last_one_seen_of_a_key_up_to_the_cap() {
        let m = Contexts::new();
        assert_eq!(m.get(b"k"), None);
        m.remember(b"k", CausalContext(vec![1]));
        m.remember(b"k", CausalContext(vec![2]));
        // An absent key's reply carries no context: the last one stays.
        m.remember(b"k", CausalContext::default());
        assert_eq!(m.get(b"k"), Some(CausalContext(vec![2])));
        let per_shard = MAX_CONTEXTS / CONTEXT_SHARDS;
        let mut shard = m.shard(b"k").lock().unwrap();
        for i in 0..per_shard {
            shard.insert(i.to_le_bytes().to_vec(), CausalContext(vec![0]));
        }
        drop(shard);
        // A full shard still takes a newer context of a key it holds...
        m.remember(b"k", CausalContext(vec![3]));
        assert_eq!(m.get(b"k"), Some(CausalContext(vec![3])));
        // ...and no new key (of that shard: "k" itself is in it).
        let other = (0u32..)
            .map(|i| format!("other{i}").into_bytes())
            .find(|key| std::ptr::eq(m.shard(key), m.shard(b"k")))
            .unwrap();
        m.remember(&other, CausalContext(vec![4]));
        assert_eq!(m.get(&other), None);
    }
}
