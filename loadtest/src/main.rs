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
    /// QUIC address of a running server.
    #[arg(long, default_value = "127.0.0.1:4433")]
    server: SocketAddr,
    /// HTTP address of a running server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    api: String,
    /// Data directory of the running server (admin key, token secret, certificate).
    #[arg(long, env = "HERALD_DATA_DIR", default_value = "./herald-data")]
    data_dir: PathBuf,
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
    let (target, spawned) = if cli.spawn {
        let bin = match cli.herald_bin {
            Some(b) => b,
            None => spawn::sibling_binary()?,
        };
        let s = spawn::spawn(&bin).await?;
        let api = format!("http://{}", s.http);
        let t = Target::from_data_dir(s.quic, &api, s.data_dir(), Probe::Pid(s.pid))?;
        (t, Some(s))
    } else {
        let api = herald::cli::base_url(&cli.api);
        let probe = Probe::Metrics(format!("{api}/metrics"));
        let t = Target::from_data_dir(cli.server, &api, &cli.data_dir, probe)?;
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
    let report = herald_loadtest::run(&cli.opts, &target).await;
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
