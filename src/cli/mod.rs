//! The `herald` command line: `serve`, and the client commands (`channel`,
//! `post`, `follow`, `token`, `brand`, `key`) that talk to a server, by
//! default the local one whose data directory holds the admin key, token
//! secret and certificate.

mod api_client;
mod follow;
mod serve;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

pub use api_client::{base_url, ApiCallError, ApiClient};

/// Broadcast-channels server.
#[derive(Parser, Debug)]
#[command(name = "herald", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server.
    Serve(serve::ServeArgs),
    /// Manage channels.
    #[command(subcommand)]
    Channel(ChannelCommand),
    /// Publish a post; prints its seq.
    Post {
        /// The channel to post to.
        channel: String,
        /// The post's text; `-` reads it from standard input.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        text: Option<String>,
        /// Read the post's text from this file.
        #[arg(long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        common: ClientArgs,
    },
    /// Follow channels and print each post as it arrives.
    Follow(follow::FollowArgs),
    /// Manage brands (admin key).
    #[command(subcommand)]
    Brand(BrandCommand),
    /// Manage a brand's API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Read every record of a stopped server's databases and report damage
    /// (exit 1 if any, or if a database cannot be read at all).
    Check {
        /// The server's data directory.
        #[arg(long, env = "HERALD_DATA_DIR", default_value = "./herald-data")]
        data_dir: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the local server's admin key (from its data directory).
    AdminKey {
        /// The server's data directory.
        #[arg(long, env = "HERALD_DATA_DIR", default_value = "./herald-data")]
        data_dir: PathBuf,
    },
    /// Mint a follower token with the local secret.
    Token {
        /// Follower id (the token's `sub`).
        #[arg(long)]
        user: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: u64,
        /// Data directory of the local server (its token secret signs the token).
        #[arg(long, env = "HERALD_DATA_DIR", default_value = "./herald-data")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum ChannelCommand {
    /// Create a channel.
    Create {
        /// Channel id: 1-64 letters, digits, '-', '_', '.'.
        id: String,
        /// Title shown to followers.
        #[arg(long, default_value = "")]
        title: String,
        /// The owning brand (a brand key may leave it out: its own brand).
        #[arg(long)]
        brand: Option<String>,
        #[command(flatten)]
        common: ClientArgs,
    },
    /// Show a channel.
    Get {
        /// Channel id.
        id: String,
        #[command(flatten)]
        common: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum BrandCommand {
    /// Create a brand.
    Create {
        /// Brand id: 1-64 letters, digits, '-', '_', '.'.
        id: String,
        /// Display name.
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        common: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Create an API key with a role in a channel (`*`: every channel of the
    /// brand); prints the key, which cannot be shown again.
    Create {
        /// The brand the key belongs to.
        #[arg(long)]
        brand: String,
        /// The channel the role applies to (`*`: every channel of the brand).
        #[arg(long)]
        channel: String,
        /// owner, publisher or analyst.
        #[arg(long)]
        role: herald_server::tenancy::Role,
        /// A label to recognise the key by in listings.
        #[arg(long, default_value = "")]
        label: String,
        #[command(flatten)]
        common: ClientArgs,
    },
    /// Revoke an API key by its id.
    Revoke {
        /// The brand the key belongs to.
        #[arg(long)]
        brand: String,
        /// The key's id (shown when it was created, and in `GET /v1/brands/{id}/keys`).
        key_id: String,
        #[command(flatten)]
        common: ClientArgs,
    },
}

/// Where the server is and how to authenticate to it.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Data directory of the local server (admin key, token secret, certificate).
    #[arg(long, env = "HERALD_DATA_DIR", default_value = "./herald-data")]
    pub data_dir: PathBuf,
    /// QUIC address of the server; for a cluster, several (repeat the flag
    /// or separate with commas): `follow` connects to the first that
    /// answers and moves to the next when its node goes away.
    #[arg(
        long,
        env = "HERALD_SERVER",
        default_value = "127.0.0.1:4433",
        value_delimiter = ','
    )]
    pub server: Vec<SocketAddr>,
    /// The HTTP API: a base URL (`http://127.0.0.1:8080`) or an address
    /// (`127.0.0.1:8080`).
    #[arg(long, env = "HERALD_API", default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// API key (default: the local server's admin key).
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// CA certificate (PEM) to verify the server with, instead of pinning the
    /// local server's self-signed certificate.
    #[arg(long)]
    pub ca: Option<PathBuf>,
}

impl ClientArgs {
    fn api_key(&self) -> anyhow::Result<String> {
        match &self.key {
            Some(k) => Ok(k.clone()),
            None => Ok(herald_server::auth::Secrets::read_existing(&self.data_dir)
                .map_err(|e| anyhow::anyhow!("no --key given and {e}"))?
                .admin_key),
        }
    }

    fn api_client(&self) -> anyhow::Result<ApiClient> {
        Ok(ApiClient::new(&self.api, self.api_key()?))
    }
}

/// Runs the command line; the binary's whole `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each said once: many errors put
/// their cause in their own message too, and printing the whole chain would
/// repeat it ("...: Address already in use: Address already in use").
pub fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM. The handlers are installed when
/// this is called, not when the future is first polled, so a signal that
/// arrives in between is not lost (nor does it kill the process).
pub(crate) fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Channel(ChannelCommand::Create {
            id,
            title,
            brand,
            common,
        }) => {
            let api = common.api_client()?;
            let c = match brand {
                Some(b) => api.create_brand_channel(&id, &title, &b).await?,
                None => api.create_channel(&id, &title).await?,
            };
            println!("created channel {} (epoch {})", c.id, c.epoch);
            Ok(())
        }
        Command::Channel(ChannelCommand::Get { id, common }) => {
            let c = common.api_client()?.channel(&id).await?;
            println!("{}", serde_json::to_string_pretty(&c)?);
            Ok(())
        }
        Command::Post {
            channel,
            text,
            file,
            common,
        } => {
            let text = match (text.as_deref(), file) {
                (_, Some(path)) => std::fs::read_to_string(&path)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?,
                (Some("-"), None) => std::io::read_to_string(std::io::stdin())
                    .map_err(|e| anyhow::anyhow!("cannot read standard input: {e}"))?,
                (Some(t), None) => t.to_string(),
                (None, None) => anyhow::bail!("give the text, `-` for standard input, or --file"),
            };
            let p = common.api_client()?.publish(&channel, &text).await?;
            println!("{}", p.seq);
            Ok(())
        }
        Command::Follow(args) => follow::run(args).await,
        Command::Brand(BrandCommand::Create { id, name, common }) => {
            let b = common.api_client()?.create_brand(&id, &name).await?;
            println!("created brand {}", b.id);
            Ok(())
        }
        Command::Key(KeyCommand::Create {
            brand,
            channel,
            role,
            label,
            common,
        }) => {
            let grants = [herald_server::tenancy::Grant { channel, role }];
            let k = common
                .api_client()?
                .create_key(&brand, &label, &grants)
                .await?;
            eprintln!("key id {} (the key below is shown only once)", k.info.id);
            println!("{}", k.key);
            Ok(())
        }
        Command::Key(KeyCommand::Revoke {
            brand,
            key_id,
            common,
        }) => {
            let k = common.api_client()?.revoke_key(&brand, &key_id).await?;
            println!("revoked key {}", k.id);
            Ok(())
        }
        Command::Check { data_dir, json } => {
            let dir = data_dir.clone();
            let report =
                tokio::task::spawn_blocking(move || herald_server::check::check_data_dir(&dir))
                    .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            if !report.is_clean() {
                let damaged: u64 = report.files.iter().map(|f| f.damaged).sum();
                anyhow::bail!(
                    "{} damaged records, {} databases unreadable in {}: restore the damaged databases from a backup (a damaged post can also be deleted through the API once the server runs)",
                    damaged,
                    report.unreadable.len(),
                    data_dir.display()
                );
            }
            Ok(())
        }
        Command::AdminKey { data_dir } => {
            let secrets = herald_server::auth::Secrets::read_existing(&data_dir)?;
            println!("{}", secrets.admin_key);
            Ok(())
        }
        Command::Token {
            user,
            ttl_secs,
            data_dir,
        } => {
            let secrets = herald_server::auth::Secrets::read_existing(&data_dir)?;
            let t = herald_server::auth::TokenIssuer::hs256(secrets.jwt_secret.as_bytes())
                .mint(&user, std::time::Duration::from_secs(ttl_secs))?;
            println!("{t}");
            Ok(())
        }
    }
}
