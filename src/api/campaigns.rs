//! Campaign routes (create, get, update, stats) and a channel's promoted-slot
//! settings. Placement rules are in `crate::promo`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{Admin, JsonBody, PathParams};
use super::ApiState;
use crate::error::ErrorCode;
use crate::model::{now_ms, ChannelId};
use crate::promo::{
    Campaign, CampaignStats, ChannelSlot, Creative, FrequencyCap, PromoError,
    State as CampaignState, Targeting,
};

impl From<PromoError> for ApiError {
    fn from(e: PromoError) -> Self {
        match e {
            PromoError::UnknownCampaign(_) => {
                ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, e.to_string())
            }
            PromoError::Invalid(f) => ApiError::bad_request(f.0),
            PromoError::Storage(_) => {
                tracing::error!(error = %e, "promo storage error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::Internal,
                    e.to_string(),
                )
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCampaign {
    #[serde(default)]
    pub advertiser: String,
    pub creative: Creative,
    #[serde(default)]
    pub targeting: Targeting,
    pub budget_impressions: u64,
    pub cpm_bid_micros: u64,
    #[serde(default)]
    pub frequency_cap: Option<FrequencyCap>,
    /// Default: now.
    #[serde(default)]
    pub start_ms: Option<i64>,
    pub end_ms: i64,
    /// `draft` (default) or `active`.
    #[serde(default)]
    pub state: Option<CampaignState>,
}

/// A campaign with its derived state and numbers.
#[derive(Serialize, Deserialize, Debug)]
pub struct CampaignView {
    #[serde(flatten)]
    pub campaign: Campaign,
    pub state: CampaignState,
    pub stats: CampaignStats,
}

fn view(state: &ApiState, id: &str) -> Result<CampaignView, ApiError> {
    let (campaign, st, stats) = state
        .promo
        .get(id)
        .ok_or_else(|| PromoError::UnknownCampaign(id.to_string()))?;
    Ok(CampaignView {
        campaign,
        state: st,
        stats,
    })
}

pub async fn create(
    State(state): State<ApiState>,
    _admin: Admin,
    JsonBody(b): JsonBody<CreateCampaign>,
) -> Result<(StatusCode, Json<CampaignView>), ApiError> {
    let mut id = [0u8; 8];
    rand::rng().fill_bytes(&mut id);
    let now = now_ms();
    let c = Campaign {
        id: format!("cmp_{}", hex::encode(id)),
        advertiser: b.advertiser,
        creative: b.creative,
        targeting: b.targeting,
        budget_impressions: b.budget_impressions,
        cpm_bid_micros: b.cpm_bid_micros,
        frequency_cap: b.frequency_cap,
        start_ms: b.start_ms.unwrap_or(now),
        end_ms: b.end_ms,
        status: b.state.unwrap_or(CampaignState::Draft),
        created_at_ms: now,
    };
    let promo = state.promo.clone();
    let created = tokio::task::spawn_blocking(move || promo.create(c))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                e.to_string(),
            )
        })??;
    Ok((StatusCode::CREATED, Json(view(&state, &created.id)?)))
}

pub async fn get(
    State(state): State<ApiState>,
    _admin: Admin,
    PathParams(id): PathParams<String>,
) -> Result<Json<CampaignView>, ApiError> {
    Ok(Json(view(&state, &id)?))
}

pub async fn stats(
    State(state): State<ApiState>,
    _admin: Admin,
    PathParams(id): PathParams<String>,
) -> Result<Json<CampaignStats>, ApiError> {
    Ok(Json(view(&state, &id)?.stats))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdateCampaign {
    pub state: Option<CampaignState>,
    pub creative: Option<Creative>,
    pub targeting: Option<Targeting>,
    pub budget_impressions: Option<u64>,
    pub cpm_bid_micros: Option<u64>,
    /// `null` removes the cap.
    #[serde(default, with = "double_option")]
    pub frequency_cap: Option<Option<FrequencyCap>>,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
}

mod double_option {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

pub async fn update(
    State(state): State<ApiState>,
    _admin: Admin,
    PathParams(id): PathParams<String>,
    JsonBody(b): JsonBody<UpdateCampaign>,
) -> Result<Json<CampaignView>, ApiError> {
    let promo = state.promo.clone();
    let cid = id.clone();
    tokio::task::spawn_blocking(move || {
        promo.update(&cid, |c| {
            if let Some(v) = b.state {
                c.status = v;
            }
            if let Some(v) = b.creative {
                c.creative = v;
            }
            if let Some(v) = b.targeting {
                c.targeting = v;
            }
            if let Some(v) = b.budget_impressions {
                c.budget_impressions = v;
            }
            if let Some(v) = b.cpm_bid_micros {
                c.cpm_bid_micros = v;
            }
            if let Some(v) = b.frequency_cap {
                c.frequency_cap = v;
            }
            if let Some(v) = b.start_ms {
                c.start_ms = v;
            }
            if let Some(v) = b.end_ms {
                c.end_ms = v;
            }
        })
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            e.to_string(),
        )
    })??;
    Ok(Json(view(&state, &id)?))
}

/// A channel's promoted-slot settings and what it has shown.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct ChannelPromoView {
    pub opt_in: bool,
    pub every_posts: u32,
    /// Promoted impressions shown in this channel (for revenue share).
    pub promoted_impressions: u64,
}

fn channel_view(state: &ApiState, id: &str) -> Result<ChannelPromoView, ApiError> {
    let channel = ChannelId::parse(id)?;
    if state.log.channel(&channel).is_none() {
        return Err(crate::store::StoreError::UnknownChannel(channel).into());
    }
    let (s, promoted_impressions) = state.promo.channel(id);
    Ok(ChannelPromoView {
        opt_in: s.opt_in,
        every_posts: s.every_posts,
        promoted_impressions,
    })
}

pub async fn get_channel(
    State(state): State<ApiState>,
    _admin: Admin,
    PathParams(id): PathParams<String>,
) -> Result<Json<ChannelPromoView>, ApiError> {
    Ok(Json(channel_view(&state, &id)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetChannelPromo {
    pub opt_in: bool,
    #[serde(default)]
    pub every_posts: Option<u32>,
}

pub async fn set_channel(
    State(state): State<ApiState>,
    _admin: Admin,
    PathParams(id): PathParams<String>,
    JsonBody(b): JsonBody<SetChannelPromo>,
) -> Result<Json<ChannelPromoView>, ApiError> {
    channel_view(&state, &id)?;
    let settings = ChannelSlot {
        opt_in: b.opt_in,
        every_posts: b.every_posts.unwrap_or(crate::promo::DEFAULT_EVERY_POSTS),
    };
    let promo = state.promo.clone();
    let cid = id.clone();
    tokio::task::spawn_blocking(move || promo.set_channel(&cid, settings))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                e.to_string(),
            )
        })??;
    Ok(Json(channel_view(&state, &id)?))
}
