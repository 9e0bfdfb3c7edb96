//! Channel routes: create, get, list, settings, stats.
//!
//! A channel belongs to one brand (kept in [`crate::tenancy`]); its title and
//! positions live in the log. The admin may create a channel for any brand
//! (or, as before brands existed, for none: then only the admin manages it);
//! a brand key needs the owner role on `*` to create channels for its brand.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::caller::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::{JsonBody, PathParams};
use super::ApiState;
use crate::model::{ChannelId, ChannelInfo, MAX_TITLE_BYTES};
use crate::tenancy::{validate_len, validate_url, ChannelMeta, Role, MAX_DESCRIPTION_BYTES};

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateChannel {
    /// The channel id: 1 to 64 letters, digits, '-', '_', '.' (not `.` or `..`).
    #[schema(
        pattern = r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|\.\.[A-Za-z0-9._-]{1,62})$"
    )]
    pub id: String,
    /// At most 256 bytes.
    #[serde(default)]
    #[schema(max_length = 256)]
    pub title: String,
    /// The owning brand (it must exist). A brand key may omit it (its own
    /// brand is used); the admin may omit it only for a channel without
    /// settings (`description`, `avatar_url`, `verified`, `promoted_opt_in`).
    #[serde(default, deserialize_with = "crate::json::not_null")]
    #[schema(
        nullable = false,
        pattern = r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|\.\.[A-Za-z0-9._-]{1,62})$"
    )]
    pub brand: Option<String>,
    /// At most 2048 bytes.
    #[serde(default)]
    #[schema(max_length = 2048)]
    pub description: String,
    /// An http(s) URL of at most 2048 bytes, or empty.
    #[serde(default)]
    #[schema(max_length = 2048, pattern = r"^(?:https?://.*)?$")]
    pub avatar_url: String,
    /// Admin only.
    #[serde(default)]
    pub verified: bool,
    /// Whether the channel shows promoted posts.
    #[serde(default)]
    pub promoted_opt_in: bool,
}

/// A channel as the API shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, utoipa::ToSchema)]
pub struct ChannelView {
    /// The channel id: 1 to 64 bytes of letters, digits, '-', '_', '.'.
    pub id: String,
    /// The channel's title, at most 256 bytes (may be empty).
    pub title: String,
    /// The history epoch: 1 for a new channel; it changes only if the history is
    /// reset, and seqs are only comparable within one epoch.
    pub epoch: u64,
    /// Seq of the newest post; 0 when the channel has none.
    pub head_seq: u64,
    /// Seq of the oldest retained post; `head_seq + 1` when none is retained.
    pub oldest_seq: u64,
    /// Followers connected to the channel now.
    pub followers: usize,
    /// When the channel was created, in Unix milliseconds.
    pub created_at_ms: i64,
    /// The owning brand; absent for channels made by the admin without one.
    #[serde(default)]
    pub brand: Option<String>,
    /// Free text about the channel, at most 2048 bytes (empty when unset).
    #[serde(default)]
    pub description: String,
    /// An http(s) URL of the channel's picture, at most 2048 bytes (empty when
    /// unset).
    #[serde(default)]
    pub avatar_url: String,
    /// Whether the admin has marked the channel verified (only the admin key
    /// can set it).
    #[serde(default)]
    pub verified: bool,
    /// Whether the channel shows promoted posts in its slot (see
    /// `/v1/channels/{id}/promo`).
    #[serde(default)]
    pub promoted_opt_in: bool,
}

fn view(state: &ApiState, c: ChannelInfo) -> ChannelView {
    let meta = state.tenancy.channel_meta(c.id.as_str());
    let m = meta.clone().unwrap_or_default();
    ChannelView {
        followers: state.hub.follower_count(&c.id),
        id: c.id.to_string(),
        title: c.title,
        epoch: c.epoch,
        head_seq: c.head_seq,
        oldest_seq: c.oldest_seq,
        created_at_ms: c.created_at_ms,
        brand: meta.map(|m| m.brand),
        description: m.description,
        avatar_url: m.avatar_url,
        verified: m.verified,
        // The promo engine owns the slot settings; see `set_promo_opt_in`.
        promoted_opt_in: state.promo.channel(c.id.as_str()).0.opt_in,
    }
}

/// Applies a `promoted_opt_in` change to the promo engine, which places slots.
async fn set_promo_opt_in(
    state: &ApiState,
    channel: &ChannelId,
    opt_in: bool,
) -> Result<(), ApiError> {
    let ch = channel.to_string();
    state
        .promo
        .run(move |p| {
            let (mut settings, _) = p.channel(&ch);
            settings.opt_in = opt_in;
            p.set_channel(&ch, settings)
        })
        .await?;
    Ok(())
}

#[utoipa::path(post, path = "/v1/channels", tag = "channels", operation_id = "create_channel",
    request_body = CreateChannel,
    responses(
        (status = 201, body = ChannelView),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "not an owner of the brand, another brand, or `verified` without the admin key"),
        (status = 404, body = ErrorBody, description = "no such brand"),
        (status = 409, body = ErrorBody),
        (status = 408, body = ErrorBody, description = "the body did not arrive in time"),
        (status = 413, body = ErrorBody, description = "the body is over 256 KiB"),
        (status = 415, body = ErrorBody, description = "not `Content-Type: application/json`"),
        (status = 503, body = ErrorBody, description = "`storage_unavailable`: nothing was stored; retry"),
    ),
    security(("api_key" = [])))]
pub async fn create(
    State(state): State<ApiState>,
    caller: Caller,
    JsonBody(body): JsonBody<CreateChannel>,
) -> Result<(StatusCode, Json<ChannelView>), ApiError> {
    let id = ChannelId::parse(&body.id)?;
    validate_len("title", &body.title, MAX_TITLE_BYTES)?;
    validate_len("description", &body.description, MAX_DESCRIPTION_BYTES)?;
    validate_url(&body.avatar_url)?;
    let brand = match (&caller, body.brand) {
        (Caller::Admin, b) => b,
        (Caller::Key(k), b) => {
            if b.as_ref().is_some_and(|b| *b != k.brand) {
                return Err(ApiError::forbidden(
                    "a brand key creates channels only for its own brand",
                ));
            }
            if !caller.owns_brand(&k.brand) {
                return Err(ApiError::forbidden(
                    "creating a channel needs the owner role on '*'",
                ));
            }
            if body.verified {
                caller.require_admin("setting verified")?;
            }
            Some(k.brand.clone())
        }
    };
    if state.log.channel(&id).is_some() {
        return Err(crate::store::StoreError::ChannelExists(id).into());
    }
    let brand_claimed = brand.is_some();
    if let Some(brand) = brand {
        let meta = ChannelMeta {
            brand,
            description: body.description,
            avatar_url: body.avatar_url,
            verified: body.verified,
            promoted_opt_in: body.promoted_opt_in,
        };
        let ch = id.to_string();
        state.tenancy.claim_channel(ch, meta).await?;
    } else if !body.description.is_empty()
        || !body.avatar_url.is_empty()
        || body.verified
        || body.promoted_opt_in
    {
        return Err(ApiError::bad_request(
            "channel settings need a brand; give \"brand\"",
        ));
    }
    let info = match state.log.create_channel(id.clone(), body.title).await {
        Ok(info) => info,
        Err(e) => {
            // The claim above succeeded, so the brand did not own this id
            // before: whatever the log said (even that the id exists, made
            // without a brand at the same moment), the claim is undone.
            if brand_claimed {
                let ch = id.to_string();
                let _ = state.tenancy.release_channel(ch).await;
            }
            return Err(e.into());
        }
    };
    if body.promoted_opt_in {
        set_promo_opt_in(&state, &id, true).await?;
    }
    Ok((StatusCode::CREATED, Json(view(&state, info))))
}

#[utoipa::path(get, path = "/v1/channels/{id}", tag = "channels", operation_id = "get_channel",
    params(("id" = String, Path, description = "channel id: 1 to 64 letters, digits, '-', '_', '.' (not `.` or `..`)", pattern = r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|\.\.[A-Za-z0-9._-]{1,62})$")),
    responses((status = 200, body = ChannelView), (status = 400, body = ErrorBody, description = "an invalid channel id"), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(id): PathParams<String>,
) -> Result<Json<ChannelView>, ApiError> {
    let id = ChannelId::parse(&id)?;
    let info = caller.require_channel(&state, &id, Role::Analyst)?;
    Ok(Json(view(&state, info)))
}

/// The answer to listing channels.
#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct ChannelList {
    /// The channels the caller may see, sorted by id: every channel for the
    /// admin key; for a brand key, the channels of its brand in which it has a role.
    pub channels: Vec<ChannelView>,
}

#[utoipa::path(get, path = "/v1/channels", tag = "channels", operation_id = "list_channels",
    responses((status = 200, body = ChannelList, description = "every channel the caller may see"), (status = 401, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list(State(state): State<ApiState>, caller: Caller) -> Json<ChannelList> {
    let mut all = state.log.channels();
    if let Caller::Key(k) = &caller {
        all.retain(|c| {
            state
                .tenancy
                .channel_meta(c.id.as_str())
                .is_some_and(|m| m.brand == k.brand)
                && k.allows(c.id.as_str(), Role::Analyst)
        });
    }
    all.sort_by(|a, b| a.id.cmp(&b.id));
    Json(ChannelList {
        channels: all.into_iter().map(|c| view(&state, c)).collect(),
    })
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateChannel {
    /// At most 2048 bytes.
    #[schema(max_length = 2048)]
    pub description: Option<String>,
    /// An http(s) URL of at most 2048 bytes, or empty.
    #[schema(max_length = 2048, pattern = r"^(?:https?://.*)?$")]
    pub avatar_url: Option<String>,
    /// Whether the channel shows promoted posts.
    pub promoted_opt_in: Option<bool>,
    /// Admin only.
    pub verified: Option<bool>,
}

#[utoipa::path(patch, path = "/v1/channels/{id}", tag = "channels", operation_id = "update_channel",
    params(("id" = String, Path, description = "channel id: 1 to 64 letters, digits, '-', '_', '.' (not `.` or `..`)", pattern = r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|\.\.[A-Za-z0-9._-]{1,62})$")),
    request_body = UpdateChannel,
    responses(
        (status = 200, body = ChannelView),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "not an owner of the channel, or `verified` without the admin key"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the channel was made without a brand, so it has no settings"),
        (status = 408, body = ErrorBody, description = "the body did not arrive in time"),
        (status = 413, body = ErrorBody, description = "the body is over 256 KiB"),
        (status = 415, body = ErrorBody, description = "not `Content-Type: application/json`"),
        (status = 503, body = ErrorBody, description = "`storage_unavailable`: nothing was stored; retry"),
    ),
    security(("api_key" = [])))]
pub async fn update(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(id): PathParams<String>,
    JsonBody(body): JsonBody<UpdateChannel>,
) -> Result<Json<ChannelView>, ApiError> {
    let id = ChannelId::parse(&id)?;
    caller.require_channel(&state, &id, Role::Owner)?;
    if body.verified.is_some() {
        caller.require_admin("setting verified")?;
    }
    if let Some(d) = &body.description {
        validate_len("description", d, MAX_DESCRIPTION_BYTES)?;
    }
    if let Some(u) = &body.avatar_url {
        validate_url(u)?;
    }
    let ch = id.to_string();
    let opt_in = body.promoted_opt_in;
    state
        .tenancy
        .update_channel(
            ch,
            Box::new(move |m| {
                if let Some(v) = &body.description {
                    m.description = v.clone();
                }
                if let Some(v) = &body.avatar_url {
                    m.avatar_url = v.clone();
                }
                if let Some(v) = opt_in {
                    m.promoted_opt_in = v;
                }
                if let Some(v) = body.verified {
                    m.verified = v;
                }
            }),
        )
        .await?;
    if let Some(v) = opt_in {
        set_promo_opt_in(&state, &id, v).await?;
    }
    let info = state
        .log
        .channel(&id)
        .ok_or(crate::store::StoreError::UnknownChannel(id))?;
    Ok(Json(view(&state, info)))
}

/// A channel's numbers. `deliveries` and `lag_events` count since the server started.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, utoipa::ToSchema)]
pub struct ChannelStatsView {
    /// The channel id.
    pub channel: String,
    /// Followers connected now.
    pub followers: usize,
    /// Posts made in the current epoch (the head seq).
    pub posts: u64,
    /// Posts still retained.
    pub retained_posts: u64,
    /// Events queued to followers live.
    pub deliveries: u64,
    /// Live events a follower's full queue refused (it catches up from the log).
    pub lag_events: u64,
}

#[utoipa::path(get, path = "/v1/channels/{id}/stats", tag = "channels", operation_id = "channel_stats",
    params(("id" = String, Path, description = "channel id: 1 to 64 letters, digits, '-', '_', '.' (not `.` or `..`)", pattern = r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|\.\.[A-Za-z0-9._-]{1,62})$")),
    responses((status = 200, body = ChannelStatsView), (status = 400, body = ErrorBody, description = "an invalid channel id"), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn stats(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(id): PathParams<String>,
) -> Result<Json<ChannelStatsView>, ApiError> {
    let id = ChannelId::parse(&id)?;
    let info = caller.require_channel(&state, &id, Role::Analyst)?;
    let s = state.hub.channel_stats(&id);
    Ok(Json(ChannelStatsView {
        channel: id.to_string(),
        followers: state.hub.follower_count(&id),
        posts: info.head_seq,
        retained_posts: (info.head_seq + 1).saturating_sub(info.oldest_seq),
        deliveries: s.deliveries,
        lag_events: s.lag_events,
    }))
}
