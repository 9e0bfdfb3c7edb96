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
    let c = &args.common;
    let trust = match &c.ca {
        Some(ca) => ClientTrust::ca_file(ca)?,
        None => ClientTrust::pinned_file(&c.data_dir.join(herald_server::tls::CERT_FILE))?,
    };
    let token = match &args.token {
        Some(t) => t.clone(),
        None => {
            let s = herald_server::auth::Secrets::read_existing(&c.data_dir)
                .map_err(|e| anyhow::anyhow!("no --token given and {e}"))?;
            herald_server::auth::TokenIssuer::hs256(s.jwt_secret.as_bytes())
                .mint("cli", std::time::Duration::from_secs(30 * 86_400))?
        }
    };
    let mut client = Client::connect(ClientOptions::new(c.server, trust, token)).await?;
    for ch in &args.channels {
        let from = FollowFrom {
            after_seq: args.after_seq,
            epoch: None,
            tail: args.tail,
        };
        let f = client.follow_from(ch, from).await?;
        if !args.json {
            eprintln!(
                "following {ch} (head seq {}, epoch {})",
                f.head_seq, f.epoch
            );
        }
    }
    let stdout = std::io::stdout();
    loop {
        let event = tokio::select! {
            e = client.next_event() => e,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(event) = event else { break };
        let line = if args.json {
            json_line(&event)
        } else {
            text_line(&event)
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

fn text_line(e: &Event) -> Option<String> {
    Some(match e {
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
        } => {
            format!("[{channel}] history reset (epoch {epoch}); resuming from #{oldest_seq}")
        }
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
            "edited_at_ms": p.edited_at_ms, "deleted": p.deleted,
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
