//! Campaign routes (create, get, update, stats) and a channel's promoted-slot
//! settings. Placement rules are in `crate::promo`.
//!
//! A campaign belongs to a brand (its `advertiser`): the admin key or an
//! owner-on-`*` key of that brand creates and changes it; any key of the brand
//! reads it. A channel's slot settings need the owner role in the channel to
//! change and the analyst role to read.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::caller::Caller;
use super::error::ApiError;
use super::error::ErrorBody;
use super::extract::{JsonBody, PathParams};
use super::ApiState;
use crate::model::{now_ms, ChannelId};
use crate::promo::{
    Campaign, CampaignStats, ChannelSlot, Creative, FrequencyCap, PromoError,
    State as CampaignState, Targeting,
};
use crate::tenancy::Role;
use herald_proto::ErrorCode;

impl From<PromoError> for ApiError {
    fn from(e: PromoError) -> Self {
        match e {
            PromoError::UnknownCampaign(_) => {
                ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, e.to_string())
            }
            PromoError::Invalid(f) => ApiError::bad_request(f.0),
            PromoError::Storage(crate::promo::LedgerError::Unavailable(why)) => {
                ApiError::storage_unavailable(why)
            }
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

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCampaign {
    /// The brand paying (it must exist); required with the admin key, a brand
    /// key may omit it (its own brand).
    #[serde(default, deserialize_with = "crate::json::not_null")]
    #[schema(
        required = true,
        nullable = false,
        pattern = r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|\.\.[A-Za-z0-9._-]{1,62})$"
    )]
    pub advertiser: Option<String>,
    /// What followers see.
    pub creative: Creative,
    /// Which channels the campaign may appear in (default: every opted-in one).
    #[serde(default)]
    pub targeting: Targeting,
    /// Impressions bought: 1 to 2^50.
    #[schema(minimum = 1, maximum = 1125899906842624_i64)]
    #[serde(deserialize_with = "crate::json::int")]
    pub budget_impressions: u64,
    /// Price per thousand impressions, in millionths: 1 to 2^40.
    #[schema(minimum = 1, maximum = 1099511627776_i64)]
    #[serde(deserialize_with = "crate::json::int")]
    pub cpm_bid_micros: u64,
    /// At most this many impressions per follower per period; none: no cap.
    #[serde(default)]
    pub frequency_cap: Option<FrequencyCap>,
    /// Start of the flight, Unix milliseconds (default: now). The flight
    /// must end after it starts and last at most 366 days.
    #[serde(default, deserialize_with = "crate::json::opt_int")]
    #[schema(minimum = 0, maximum = 253402300800000_i64)]
    pub start_ms: Option<i64>,
    /// End of the flight, Unix milliseconds, exclusive: after `start_ms`, at
    /// most 366 days after it, before the year 10000.
    #[schema(minimum = 1, maximum = 253402300800000_i64)]
    #[serde(deserialize_with = "crate::json::int")]
    pub end_ms: i64,
    /// `draft` (default), `active` or `paused`.
    #[serde(default)]
    pub state: Option<SettableState>,
}

/// The states an owner may set (`finished` and `exhausted` are derived).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SettableState {
    /// Being prepared: never shown.
    Draft,
    /// Shown while in its flight, within its budget and pacing.
    Active,
    /// Stopped: not shown until set active again.
    Paused,
}

impl From<SettableState> for CampaignState {
    fn from(s: SettableState) -> Self {
        match s {
            SettableState::Draft => CampaignState::Draft,
            SettableState::Active => CampaignState::Active,
            SettableState::Paused => CampaignState::Paused,
        }
    }
}

/// A campaign with its derived state and numbers.
#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct CampaignView {
    /// The campaign as stored (its fields appear at the top level of this object).
    #[serde(flatten)]
    pub campaign: Campaign,
    /// The state brands see: `exhausted` once the whole budget is delivered,
    /// else `finished` once `end_ms` has passed, else the `status` the owner set.
    pub state: CampaignState,
    /// Impressions, clicks, spend and reach so far.
    pub stats: CampaignStats,
}

/// The campaign, if the caller's brand may see it.
fn view_for(state: &ApiState, caller: &Caller, id: &str) -> Result<CampaignView, ApiError> {
    let v = view(state, id)?;
    caller.require_brand(&v.campaign.advertiser)?;
    Ok(v)
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

#[utoipa::path(post, path = "/v1/campaigns", tag = "campaigns", operation_id = "create_campaign",
    request_body = CreateCampaign,
    responses((status = 201, body = CampaignView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody, description = "the advertiser brand does not exist"),
        (status = 408, body = ErrorBody, description = "the body did not arrive in time"),
        (status = 413, body = ErrorBody, description = "the body is over 256 KiB"),
        (status = 415, body = ErrorBody, description = "not `Content-Type: application/json`"),
        (status = 503, body = ErrorBody, description = "`storage_unavailable`: nothing was stored; retry"),),
    security(("api_key" = [])))]
pub async fn create(
    State(state): State<ApiState>,
    caller: Caller,
    JsonBody(b): JsonBody<CreateCampaign>,
) -> Result<(StatusCode, Json<CampaignView>), ApiError> {
    let advertiser = match (&caller, b.advertiser) {
        (Caller::Admin, None) => {
            return Err(ApiError::bad_request(
                "advertiser is required with the admin key: the id of an existing brand",
            ))
        }
        (Caller::Admin, Some(a)) => a,
        (Caller::Key(k), a) => {
            let brand = a.unwrap_or_else(|| k.brand.clone());
            if brand != k.brand || !caller.owns_brand(&brand) {
                return Err(ApiError::forbidden(
                    "creating a campaign needs the owner role on '*' of the advertiser brand",
                ));
            }
            brand
        }
    };
    // The advertiser must exist now: a campaign for a brand made later
    // would be owned by whoever creates a brand with that id.
    if state.tenancy.brand(&advertiser).is_none() {
        return Err(ApiError::not_found(format!(
            "no brand {advertiser:?}: the advertiser must be an existing brand"
        )));
    }
    let mut id = [0u8; 8];
    rand::rng().fill_bytes(&mut id);
    let now = now_ms();
    let c = Campaign {
        id: format!("cmp_{}", hex::encode(id)),
        advertiser,
        creative: b.creative,
        targeting: b.targeting,
        budget_impressions: b.budget_impressions,
        cpm_bid_micros: b.cpm_bid_micros,
        frequency_cap: b.frequency_cap,
        start_ms: b.start_ms.unwrap_or(now),
        end_ms: b.end_ms,
        status: b.state.map_or(CampaignState::Draft, CampaignState::from),
        created_at_ms: now,
    };
    let created = state.promo.run(move |p| p.create(c)).await?;
    Ok((StatusCode::CREATED, Json(view(&state, &created.id)?)))
}

#[utoipa::path(get, path = "/v1/campaigns/{id}", tag = "campaigns", operation_id = "get_campaign",
    params(("id" = String, Path, description = "campaign id (`cmp_` and 16 hex digits)")),
    responses((status = 200, body = CampaignView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(id): PathParams<String>,
) -> Result<Json<CampaignView>, ApiError> {
    Ok(Json(view_for(&state, &caller, &id)?))
}

#[utoipa::path(get, path = "/v1/campaigns/{id}/stats", tag = "campaigns", operation_id = "campaign_stats",
    params(("id" = String, Path, description = "campaign id (`cmp_` and 16 hex digits)")),
    responses((status = 200, body = CampaignStats), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn stats(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(id): PathParams<String>,
) -> Result<Json<CampaignStats>, ApiError> {
    Ok(Json(view_for(&state, &caller, &id)?.stats))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateCampaign {
    /// `draft`, `active` or `paused`.
    pub state: Option<SettableState>,
    /// A new creative.
    pub creative: Option<Creative>,
    /// A new targeting.
    pub targeting: Option<Targeting>,
    /// 1 to 2^50.
    #[schema(minimum = 1, maximum = 1125899906842624_i64)]
    #[serde(default, deserialize_with = "crate::json::opt_int")]
    pub budget_impressions: Option<u64>,
    /// 1 to 2^40.
    #[schema(minimum = 1, maximum = 1099511627776_i64)]
    #[serde(default, deserialize_with = "crate::json::opt_int")]
    pub cpm_bid_micros: Option<u64>,
    /// `null` removes the cap.
    #[serde(default, with = "::serde_with::rust::double_option")]
    pub frequency_cap: Option<Option<FrequencyCap>>,
    /// Unix milliseconds (see `CreateCampaign`).
    #[schema(minimum = 0, maximum = 253402300800000_i64)]
    #[serde(default, deserialize_with = "crate::json::opt_int")]
    pub start_ms: Option<i64>,
    /// Unix milliseconds (see `CreateCampaign`).
    #[schema(minimum = 1, maximum = 253402300800000_i64)]
    #[serde(default, deserialize_with = "crate::json::opt_int")]
    pub end_ms: Option<i64>,
}

#[utoipa::path(patch, path = "/v1/campaigns/{id}", tag = "campaigns", operation_id = "update_campaign",
    params(("id" = String, Path, description = "campaign id (`cmp_` and 16 hex digits)")),
    request_body = UpdateCampaign,
    responses((status = 200, body = CampaignView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 408, body = ErrorBody, description = "the body did not arrive in time"),
        (status = 413, body = ErrorBody, description = "the body is over 256 KiB"),
        (status = 415, body = ErrorBody, description = "not `Content-Type: application/json`"),
        (status = 503, body = ErrorBody, description = "`storage_unavailable`: nothing was stored; retry"),),
    security(("api_key" = [])))]
pub async fn update(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(id): PathParams<String>,
    JsonBody(b): JsonBody<UpdateCampaign>,
) -> Result<Json<CampaignView>, ApiError> {
    let current = view_for(&state, &caller, &id)?;
    if !caller.owns_brand(&current.campaign.advertiser) {
        return Err(ApiError::forbidden(
            "changing a campaign needs the owner role on '*' of its brand",
        ));
    }
    let cid = id.clone();
    state
        .promo
        .run(move |p| {
            p.update(&cid, |c| {
                if let Some(v) = b.state {
                    c.status = v.into();
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
        .await?;
    Ok(Json(view(&state, &id)?))
}

/// A channel's promoted-slot settings and what it has shown.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, utoipa::ToSchema)]
pub struct ChannelPromoView {
    /// Whether the channel shows promoted posts in its slot (default: no).
    pub opt_in: bool,
    /// The slot opens after every this many organic posts (after a post whose
    /// seq is a multiple of it); 1 to 10000, default 5.
    pub every_posts: u32,
    /// Promoted impressions shown in this channel (for revenue share).
    pub promoted_impressions: u64,
}

fn channel_view(state: &ApiState, id: &str) -> Result<ChannelPromoView, ApiError> {
    let (s, promoted_impressions) = state.promo.channel(id);
    Ok(ChannelPromoView {
        opt_in: s.opt_in,
        every_posts: s.every_posts,
        promoted_impressions,
    })
}

#[utoipa::path(get, path = "/v1/channels/{id}/promo", tag = "campaigns", operation_id = "get_channel_promo",
    params(("id" = String, Path, description = "channel id: 1 to 64 letters, digits, '-', '_', '.' (not `.` or `..`)", pattern = r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|\.\.[A-Za-z0-9._-]{1,62})$")),
    responses((status = 200, body = ChannelPromoView), (status = 400, body = ErrorBody, description = "an invalid channel id"), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_channel(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(id): PathParams<String>,
) -> Result<Json<ChannelPromoView>, ApiError> {
    caller.require_channel(&state, &ChannelId::parse(&id)?, Role::Analyst)?;
    Ok(Json(channel_view(&state, &id)?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetChannelPromo {
    /// Whether the channel shows promoted posts.
    pub opt_in: bool,
    /// The slot opens after every this many organic posts: 1 to 10000
    /// (default 5).
    #[serde(default, deserialize_with = "crate::json::opt_int")]
    #[schema(minimum = 1, maximum = 10000)]
    pub every_posts: Option<u32>,
}

#[utoipa::path(put, path = "/v1/channels/{id}/promo", tag = "campaigns", operation_id = "set_channel_promo",
    params(("id" = String, Path, description = "channel id: 1 to 64 letters, digits, '-', '_', '.' (not `.` or `..`)", pattern = r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|\.\.[A-Za-z0-9._-]{1,62})$")),
    request_body = SetChannelPromo,
    responses((status = 200, body = ChannelPromoView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 408, body = ErrorBody, description = "the body did not arrive in time"),
        (status = 413, body = ErrorBody, description = "the body is over 256 KiB"),
        (status = 415, body = ErrorBody, description = "not `Content-Type: application/json`"),
        (status = 503, body = ErrorBody, description = "`storage_unavailable`: nothing was stored; retry"),),
    security(("api_key" = [])))]
pub async fn set_channel(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(id): PathParams<String>,
    JsonBody(b): JsonBody<SetChannelPromo>,
) -> Result<Json<ChannelPromoView>, ApiError> {
    caller.require_channel(&state, &ChannelId::parse(&id)?, Role::Owner)?;
    let settings = ChannelSlot {
        opt_in: b.opt_in,
        every_posts: b.every_posts.unwrap_or(crate::promo::DEFAULT_EVERY_POSTS),
    };
    let cid = id.clone();
    state
        .promo
        .run(move |p| p.set_channel(&cid, settings))
        .await?;
    Ok(Json(channel_view(&state, &id)?))
}
