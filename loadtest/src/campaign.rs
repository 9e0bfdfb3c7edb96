//! `--campaign`: opts every run channel into the promoted slot (one after
//! every 5 posts), starts one active campaign that targets them, and after
//! the run checks that the impressions the server reports equal the promoted
//! frames the followers received. Impressions are counted by the server once
//! a frame is written, so the check waits (bounded by the run's timeout)
//! until the last written frames have arrived.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::{LoadError, Target};

/// Organic posts between two promoted slots in the run's channels.
pub const EVERY_POSTS: u32 = 5;

/// The brand that pays for the run's campaign.
pub const ADVERTISER: &str = "herald-loadtest";

/// The accounting check.
#[derive(Debug, Clone, Serialize)]
pub struct CampaignReport {
    pub id: String,
    /// Impressions the server counted.
    pub impressions: u64,
    /// Promoted frames the followers received.
    pub received: u64,
}

async fn call(req: reqwest::RequestBuilder, what: &str) -> Result<serde_json::Value, LoadError> {
    let resp = req
        .send()
        .await
        .map_err(|e| LoadError::Target(format!("{what}: {e}")))?;
    let status = resp.status();
    let body: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| LoadError::Target(format!("{what}: {e}")))?;
    if !status.is_success() {
        return Err(LoadError::Target(format!("{what}: {status}: {body}")));
    }
    Ok(body)
}

/// Opts `channels` in and creates an active campaign; returns its id.
pub async fn start(
    http: &reqwest::Client,
    target: &Target,
    channels: &[String],
) -> Result<String, LoadError> {
    for ch in channels {
        call(
            http.put(format!("{}/v1/channels/{ch}/promo", target.api))
                .bearer_auth(&target.admin_key)
                .json(&serde_json::json!({"opt_in": true, "every_posts": EVERY_POSTS})),
            "opt a channel in",
        )
        .await?;
    }
    // The advertiser must be an existing brand (409: it exists from an
    // earlier run against the same server, which is fine).
    let resp = http
        .post(format!("{}/v1/brands", target.api))
        .bearer_auth(&target.admin_key)
        .json(&serde_json::json!({"id": ADVERTISER, "name": "herald-loadtest"}))
        .send()
        .await
        .map_err(|e| LoadError::Target(format!("create the advertiser brand: {e}")))?;
    if !(resp.status().is_success() || resp.status() == reqwest::StatusCode::CONFLICT) {
        return Err(LoadError::Target(format!(
            "create the advertiser brand: {}",
            resp.status()
        )));
    }
    let now = herald_server::model::now_ms();
    let body = call(
        http.post(format!("{}/v1/campaigns", target.api))
            .bearer_auth(&target.admin_key)
            .json(&serde_json::json!({
                "advertiser": ADVERTISER,
                "creative": {"title": "Load test", "text": "A promoted post", "cta_url": "https://example.com/"},
                "targeting": {"channels": channels},
                // Large enough that neither budget nor pacing limits the run.
                "budget_impressions": 1_000_000_000_000u64,
                "cpm_bid_micros": 1000,
                "start_ms": now - 3_600_000,
                "end_ms": now + 24 * 3_600_000,
                "state": "active"
            })),
        "create the campaign",
    )
    .await?;
    body["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| LoadError::Target(format!("campaign answer has no id: {body}")))
}

/// Waits until the received count matches the server's impressions (or
/// `timeout` passes), then reports both.
pub async fn settle(
    http: &reqwest::Client,
    target: &Target,
    id: &str,
    received: &AtomicU64,
    timeout: Duration,
) -> Result<CampaignReport, LoadError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let stats = call(
            http.get(format!("{}/v1/campaigns/{id}/stats", target.api))
                .bearer_auth(&target.admin_key),
            "read campaign stats",
        )
        .await?;
        let impressions = stats["impressions"].as_u64().unwrap_or(0);
        let got = received.load(Ordering::Acquire);
        if impressions == got || tokio::time::Instant::now() >= deadline {
            return Ok(CampaignReport {
                id: id.to_string(),
                impressions,
                received: got,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
