//! `herald follow`: print posts from one or more channels as they arrive,
//! one readable line each, or one JSON object per line with `--json`.

use std::io::Write;

use clap::Args;

use super::ClientArgs;
use herald_client::{Client, ClientOptions, ClientTrust, Event, FollowFrom};

#[derive(Args, Debug)]
pub struct FollowArgs {
    /// Channels to follow.
    #[arg(required = true)]
    pub channels: Vec<String>,
    /// Follower token (default: one minted from the local secret).
    #[arg(long, env = "HERALD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Follower id for the minted token (default: a new `cli-...` id per run,
    /// so that each `herald follow` is a follower of its own).
    #[arg(long, conflicts_with = "token")]
    pub user: Option<String>,
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Replay every post after this seq first (applies to every channel given).
    #[arg(long)]
    pub after_seq: Option<u64>,
    /// Without --after-seq: print the latest N posts first.
    #[arg(long, default_value_t = 0)]
    pub tail: u32,
    #[command(flatten)]
    pub common: ClientArgs,
}

pub async fn run(args: FollowArgs) -> anyhow::Result<()> {
    // Listen for Ctrl-C (and SIGTERM) from the start: a follower stopped
    // while connecting still closes its connection properly.
    let mut stop = Box::pin(super::stop_signal()?);
    let c = &args.common;
    let trust = match &c.ca {
        Some(ca) => ClientTrust::ca_file(ca)?,
        None => {
            let cert = c.data_dir.join(herald_server::tls::CERT_FILE);
            ClientTrust::pinned_file(&cert).map_err(|e| {
                anyhow::anyhow!(
                    "{e}\n(the local server's certificate is read from --data-dir, here {}; \
                     run this from the directory `herald serve` runs in, pass --data-dir, \
                     or pass --ca FILE for a server with a CA-issued certificate)",
                    c.data_dir.display()
                )
            })?
        }
    };
    let token = match &args.token {
        Some(t) => t.clone(),
        None => {
            let s = herald_server::auth::Secrets::read_existing(&c.data_dir)
                .map_err(|e| anyhow::anyhow!("no --token given and {e}"))?;
            let user = args.user.clone().unwrap_or_else(cli_follower_id);
            herald_server::auth::TokenIssuer::hs256(s.jwt_secret.as_bytes())
                .mint(&user, std::time::Duration::from_secs(30 * 86_400))?
        }
    };
    let opts = ClientOptions::with_servers(c.server.clone(), trust, token);
    let servers = c
        .server
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut client = tokio::select! {
        r = Client::connect(opts) => r.map_err(|e| {
            anyhow::anyhow!("{e}\n(is a server running at {servers}? start one with `herald serve`, or pass --server ADDR)")
        })?,
        _ = &mut stop => return Ok(()),
    };
    let mut asked: Vec<(String, u64)> = Vec::new();
    for ch in &args.channels {
        let from = FollowFrom {
            after_seq: args.after_seq,
            epoch: None,
            tail: args.tail,
        };
        let f = tokio::select! {
            r = client.follow_from(ch, from) => match r {
                Ok(f) => f,
                Err(e) => {
                    client.close().await;
                    return Err(e.into());
                }
            },
            _ = &mut stop => {
                client.close().await;
                return Ok(());
            }
        };
        asked.push((ch.clone(), f.head_seq));
        let line = if args.json {
            serde_json::json!({
                "type": "followed", "channel": ch, "head_seq": f.head_seq, "epoch": f.epoch,
            })
            .to_string()
        } else {
            format!(
                "following {ch} (head seq {}, epoch {})",
                f.head_seq, f.epoch
            )
        };
        if args.json {
            println!("{line}");
        } else {
            eprintln!("{line}");
        }
    }
    let stdout = std::io::stdout();
    loop {
        let event = tokio::select! {
            e = client.next_event() => e,
            _ = &mut stop => None,
        };
        let Some(event) = event else { break };
        let line = if args.json {
            json_line(&event)
        } else {
            text_line(&event, args.after_seq, &asked)
        };
        if let Some(line) = line {
            let mut out = stdout.lock();
            writeln!(out, "{line}")?;
            out.flush()?;
        }
        if let Event::Closed { reason, .. } = &event {
            anyhow::bail!("connection closed: {reason}");
        }
    }
    client.close().await;
    Ok(())
}

/// A follower id of its own for each `herald follow` run.
fn cli_follower_id() -> String {
    format!("cli-{:016x}", rand::random::<u64>())
}

/// One readable line per event. A Reset right after a follow whose
/// `--after-seq` was past the channel's head says so, rather than "reset".
fn text_line(e: &Event, after_seq: Option<u64>, asked: &[(String, u64)]) -> Option<String> {
    Some(match e {
        Event::Post(p) if p.damaged => format!(
            "[{}#{}] (damaged: the server's copy of this post is unreadable)",
            p.channel, p.seq
        ),
        Event::Post(p) if p.deleted => format!("[{}#{}] (deleted)", p.channel, p.seq),
        Event::Post(p) => format!("[{}#{}] {}", p.channel, p.seq, p.text),
        Event::Edited {
            channel, seq, text, ..
        } => format!("[{channel}#{seq}] (edited) {text}"),
        Event::Deleted { channel, seq, .. } => format!("[{channel}#{seq}] (deleted)"),
        Event::Promoted {
            channel,
            label,
            title,
            text,
            cta_url,
            ..
        } => format!("[{channel}] ({label}) {title}: {text} -> {cta_url}"),
        Event::Reset {
            channel,
            oldest_seq,
            epoch,
        } => match (after_seq, asked.iter().find(|(c, _)| c == channel)) {
            (Some(a), Some((_, head))) if a > *head => format!(
                "[{channel}] --after-seq {a} is ahead of the channel (newest post #{head}); \
                 starting from #{oldest_seq}"
            ),
            _ => format!(
                "[{channel}] history reset (epoch {epoch}): posts before #{oldest_seq} are gone; \
                 resuming from #{oldest_seq}"
            ),
        },
        Event::Error {
            message, channel, ..
        } => format!("[{channel}] error: {message}"),
        Event::Disconnected { reason } => format!("-- disconnected ({reason}); reconnecting"),
        Event::Reconnected => "-- reconnected".to_string(),
        Event::Closed { .. } => return None,
    })
}

fn json_line(e: &Event) -> Option<String> {
    let v = match e {
        Event::Post(p) => serde_json::json!({
            "type": "post", "channel": p.channel.as_str(), "seq": p.seq, "epoch": p.epoch,
            "id": p.id, "text": p.text, "media": p.media, "created_at_ms": p.created_at_ms,
            "edited_at_ms": p.edited_at_ms, "deleted": p.deleted, "damaged": p.damaged,
        }),
        Event::Edited {
            channel,
            seq,
            epoch,
            text,
            edited_at_ms,
        } => serde_json::json!({
            "type": "edited", "channel": channel, "seq": seq, "epoch": epoch, "text": text,
            "edited_at_ms": edited_at_ms,
        }),
        Event::Deleted {
            channel,
            seq,
            epoch,
        } => {
            serde_json::json!({"type": "deleted", "channel": channel, "seq": seq, "epoch": epoch})
        }
        Event::Promoted {
            channel,
            campaign_id,
            label,
            title,
            text,
            media,
            cta_url,
            after_seq,
        } => serde_json::json!({
            "type": "promoted", "channel": channel,
            "promoted": {"campaign": campaign_id, "label": label},
            "title": title, "text": text, "media": media, "cta_url": cta_url, "after_seq": after_seq,
        }),
        Event::Reset {
            channel,
            epoch,
            oldest_seq,
        } => serde_json::json!({
            "type": "reset", "channel": channel, "epoch": epoch, "oldest_seq": oldest_seq,
        }),
        Event::Error {
            code,
            message,
            channel,
        } => serde_json::json!({
            "type": "error", "code": code.map(|c| c.as_str()), "message": message, "channel": channel,
        }),
        Event::Disconnected { reason } => {
            serde_json::json!({"type": "disconnected", "reason": reason})
        }
        Event::Reconnected => serde_json::json!({"type": "reconnected"}),
        Event::Closed { .. } => return None,
    };
    Some(v.to_string())
}
