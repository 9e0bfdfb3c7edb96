//! `herald-loadtest`: measure a herald server end to end and verify every
//! delivery. `--spawn` starts the release `herald` next to this binary on a
//! temporary data directory; otherwise `--server`, `--api` and `--data-dir`
//! name a running one. Exits non-zero if any delivery was wrong.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use herald_loadtest::probe::Probe;
use herald_loadtest::{spawn, Options, Target};

#[derive(Parser, Debug)]
#[command(name = "herald-loadtest", version, about)]
struct Cli {
    #[command(flatten)]
    opts: Options,
    #[command(flatten)]
    soak: herald_loadtest::soak::SoakOptions,
    /// Start the release `herald` binary found next to this one.
    #[arg(long, conflicts_with_all = ["server", "api"])]
    spawn: bool,
    /// `herald` binary to start with --spawn (default: next to this binary).
    #[arg(long, requires = "spawn")]
    herald_bin: Option<PathBuf>,
    /// TOML configuration for the server started with --spawn (its
    /// `--config`); addresses and the data directory are still the run's.
    #[arg(long, requires = "spawn")]
    server_config: Option<PathBuf>,
    /// QUIC address of a running server; for the nodes of a cluster, one per
    /// node (repeat the flag, or separate with commas): followers are spread
    /// over them, and figures are reported per node and in total.
    #[arg(long, default_value = "127.0.0.1:4433", value_delimiter = ',')]
    server: Vec<SocketAddr>,
    /// HTTP address of a running server; with several `--server`s, one per
    /// node in the same order (posts are published through the first).
    #[arg(long, default_value = "http://127.0.0.1:8080", value_delimiter = ',')]
    api: Vec<String>,
    /// Data directory of the running server (admin key, token secret,
    /// certificate; the nodes of a cluster share them).
    #[arg(long, env = "HERALD_DATA_DIR", default_value = "./herald-data")]
    data_dir: PathBuf,
    /// Process ids of the running servers, one per `--server` (when they run
    /// on this machine): CPU and memory are then read from `/proc`, to the
    /// clock tick, instead of from `/metrics`.
    #[arg(long, value_delimiter = ',')]
    pid: Vec<u32>,
    /// Write the full report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("herald-loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    let mut others = Vec::new();
    let (target, spawned) = if cli.spawn {
        let bin = match cli.herald_bin {
            Some(b) => b,
            None => spawn::sibling_binary()?,
        };
        let s = spawn::spawn(&bin, cli.server_config.as_deref()).await?;
        let api = format!("http://{}", s.http);
        let t = Target::from_data_dir(s.quic, &api, s.data_dir(), Probe::Pid(s.pid))?;
        (t, Some(s))
    } else {
        if cli.server.len() != cli.api.len() {
            anyhow::bail!(
                "give one --api per --server ({} servers, {} APIs)",
                cli.server.len(),
                cli.api.len()
            );
        }
        if !cli.pid.is_empty() && cli.pid.len() != cli.server.len() {
            anyhow::bail!("give one --pid per --server, or none");
        }
        let pids = cli.pid.clone();
        let mut nodes = cli
            .server
            .iter()
            .zip(&cli.api)
            .enumerate()
            .map(|(i, (quic, api))| {
                let api = herald::cli::base_url(api);
                let probe = match pids.get(i) {
                    Some(pid) => Probe::Pid(*pid),
                    None => Probe::Metrics(format!("{api}/metrics")),
                };
                herald_loadtest::Node {
                    quic: *quic,
                    api,
                    probe,
                }
            });
        let Some(first) = nodes.next() else {
            anyhow::bail!("give at least one --server");
        };
        let t = Target::from_data_dir(first.quic, &first.api, &cli.data_dir, first.probe)?;
        others = nodes.collect();
        (t, None)
    };
    if cli.soak.soak.is_some() {
        let report = herald_loadtest::soak::run(&cli.opts, &cli.soak, &target).await;
        if let Some(s) = spawned {
            s.stop().await;
        }
        let report = report?;
        println!("{report}");
        if let Some(path) = &cli.json {
            let text = serde_json::to_string_pretty(&report)?;
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        return Ok(report.exit_code());
    }
    let report = herald_loadtest::run_on(&cli.opts, &target, &others).await;
    if let Some(s) = spawned {
        s.stop().await;
    }
    let report = report?;
    println!("{report}");
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report.exit_code())
}
