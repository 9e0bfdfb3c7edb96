//! `herald serve`: load the configuration, bind, print where it listens, run
//! until Ctrl-C or SIGTERM.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use herald_server::config::{Config, Overrides};
use herald_server::Server;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "HERALD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (default ./herald-data).
    #[arg(long, env = "HERALD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// QUIC (UDP) listen address (default 127.0.0.1:4433).
    #[arg(long, env = "HERALD_QUIC_ADDR")]
    pub quic_addr: Option<SocketAddr>,
    /// QUIC event loops (threads) on that address (default 1).
    #[arg(long, env = "HERALD_QUIC_LOOPS")]
    pub quic_loops: Option<usize>,
    /// HTTP listen address (default 127.0.0.1:8080).
    #[arg(long, env = "HERALD_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Cluster mode: NATS JetStream URLs, comma-separated
    /// (`nats://10.0.0.1:4222,nats://10.0.0.2:4222`); the log, brands, keys
    /// and campaigns then live there, shared by every Herald node.
    #[arg(long, env = "HERALD_CLUSTER", value_delimiter = ',')]
    pub cluster: Option<Vec<String>>,
    /// Cluster mode: this node's id, unique among the Herald nodes
    /// (default: the host name).
    #[arg(long, env = "HERALD_NODE_ID")]
    pub node_id: Option<String>,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let stop = super::stop_signal()?;
    let config = Config::load(
        args.config.as_deref(),
        &Overrides {
            data_dir: args.data_dir,
            quic_addr: args.quic_addr,
            quic_loops: args.quic_loops,
            http_addr: args.http_addr,
            cluster_urls: args.cluster,
            node_id: args.node_id,
        },
    )?;
    let server = Server::bind(config).await?;
    let secrets = server.secrets();
    if !secrets.created.is_empty() {
        println!(
            "first start: generated secrets in {}",
            server.config().data_dir.display()
        );
        // Shown once, when generated; a key from HERALD_ADMIN_KEY is the
        // operator's already and is never printed.
        if secrets.admin_key_generated {
            println!("admin key: {}", secrets.admin_key);
        }
    }
    println!(
        "herald listening: quic {} http {}",
        server.quic_addr(),
        server.http_addr()
    );
    println!("data dir: {}", server.config().data_dir.display());
    let cluster = &server.config().cluster;
    if cluster.enabled() {
        println!(
            "cluster: node {} on {}",
            cluster.node_id(),
            cluster.urls.join(",")
        );
    }
    server.run(stop).await;
    // The process that read our stdout may be gone by now (it was what
    // stopped us): a failed write must not turn a clean stop into a panic.
    let _ = writeln!(std::io::stdout(), "herald stopped");
    Ok(())
}
