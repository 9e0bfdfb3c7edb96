//! Post routes: publish, edit, delete (publisher role), history (any role).
//!
//! Publishing takes an optional `Idempotency-Key` header: a retry with the
//! same key on the same channel within 24 h answers the first post (same
//! seq, same status) and posts nothing; the log commits the key with the
//! post, so this holds across a crash or restart. Brand keys are limited to
//! `limits.publish_per_sec` (429 with `Retry-After` beyond it).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::caller::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::{JsonBody, PathParams, QueryParams};
use super::ApiState;
use crate::model::{validate_text, ChannelId, Media, NewPost, Post};
use crate::tenancy::Role;

/// The request header that makes a publish idempotent.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Most posts one history page returns.
pub const MAX_HISTORY_PAGE: usize = 1000;
/// Largest seq the API takes (an int64, as the OpenAPI document says).
pub const MAX_SEQ: u64 = i64::MAX as u64;

fn check_seq(seq: u64) -> Result<(), ApiError> {
    if seq > MAX_SEQ {
        return Err(ApiError::bad_request(format!("seq must be 0 to {MAX_SEQ}")));
    }
    Ok(())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishBody {
    /// The post's text: 1 to 16384 bytes.
    #[schema(min_length = 1, max_length = 16384)]
    pub text: String,
    /// Media references, at most 10.
    #[serde(default)]
    #[schema(value_type = Vec<crate::json::MediaRef>, max_items = 10)]
    pub media: Vec<Media>,
}

/// The answer to a publish: where the post landed.
#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct Published {
    /// The post's seq in the channel (on a retry with the same Idempotency-Key,
    /// the first post's).
    pub seq: u64,
    /// The channel's history epoch the seq belongs to.
    pub epoch: u64,
    /// The post's server-assigned id, unique across channels.
    pub id: String,
}

/// A post as the API shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, utoipa::ToSchema)]
pub struct PostView {
    /// The channel id.
    pub channel: String,
    /// The post's position in the channel: 1, 2, 3, ... with no gaps.
    pub seq: u64,
    /// The channel's history epoch the seq belongs to.
    pub epoch: u64,
    /// Server-assigned id, unique across channels.
    pub id: String,
    /// The text, 1 to 16384 bytes; empty for a deleted post.
    pub text: String,
    /// Media references, at most 10; empty for a deleted post.
    #[schema(value_type = Vec<crate::json::MediaRef>)]
    pub media: Vec<Media>,
    /// When the server accepted the post, in Unix milliseconds.
    pub created_at_ms: i64,
    /// When the post was last edited or deleted, in Unix milliseconds; 0 when
    /// never.
    pub edited_at_ms: i64,
    /// The post was deleted: this is its tombstone, with no text or media.
    pub deleted: bool,
    /// The server's stored copy of the post is damaged (see `herald check`):
    /// this tombstone stands in for it (`deleted` is true too). Deleting the
    /// post replaces the damaged record with a sound tombstone.
    #[serde(default)]
    pub damaged: bool,
}

impl From<Post> for PostView {
    fn from(p: Post) -> Self {
        PostView {
            channel: p.channel.to_string(),
            seq: p.seq,
            epoch: p.epoch,
            id: p.id,
            text: p.text,
            media: p.media,
            created_at_ms: p.created_at_ms,
            edited_at_ms: p.edited_at_ms,
            deleted: p.deleted,
            damaged: p.damaged,
        }
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::bad_request(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
        ))
    };
    let s = v.to_str().map_err(|_| bad())?;
    if s.is_empty() || s.len() > MAX_IDEMPOTENCY_KEY || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    Ok(Some(s.to_string()))
}

#[utoipa::path(post, path = "/v1/channels/{id}/posts", tag = "posts", operation_id = "publish",
    params(
        ("id" = String, Path, description = "channel id: 1 to 64 letters, digits, '-', '_', '.' (not `.` or `..`)", pattern = r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|\.\.[A-Za-z0-9._-]{1,62})$"),
        ("Idempotency-Key" = Option<String>, Header, description = "a retry with the same key within 24 h answers the first post and posts nothing: 1 to 255 visible ASCII characters", pattern = r"^[!-~]{1,255}$"),
    ),
    request_body = PublishBody,
    responses(
        (status = 201, body = Published, description = "durable; a retry with the same Idempotency-Key gets the same answer"),
        (status = 400, body = ErrorBody, description = "an invalid field, header, channel id or body"), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "no publisher role in this channel"),
        (status = 404, body = ErrorBody),
        (status = 408, body = ErrorBody, description = "the body did not arrive in time"),
        (status = 413, body = ErrorBody, description = "the body is over 256 KiB"),
        (status = 415, body = ErrorBody, description = "not `Content-Type: application/json`"),
        (status = 429, body = ErrorBody, description = "publish rate limit; see Retry-After"),
        (status = 503, body = ErrorBody, description = "`storage_unavailable`: nothing was stored; retry (with the same Idempotency-Key)"),
    ),
    security(("api_key" = [])))]
pub async fn publish(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(id): PathParams<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<PublishBody>,
) -> Result<(StatusCode, Json<Published>), ApiError> {
    let channel = ChannelId::parse(&id)?;
    caller.require_channel(&state, &channel, Role::Publisher)?;
    let key = idempotency_key(&headers)?;
    let post = NewPost::new(body.text, body.media)?;
    if let Some(k) = caller.key_id() {
        state
            .publish_limiter
            .check(k)
            .map_err(ApiError::rate_limited)?;
    }
    let p = state.log.append(channel, post, key).await?;
    Ok((
        StatusCode::CREATED,
        Json(Published {
            seq: p.seq,
            epoch: p.epoch,
            id: p.id,
        }),
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditBody {
    /// The new text: 1 to 16384 bytes.
    #[schema(min_length = 1, max_length = 16384)]
    pub text: String,
}

#[utoipa::path(patch, path = "/v1/channels/{id}/posts/{seq}", tag = "posts", operation_id = "edit_post",
    params(("id" = String, Path, description = "channel id: 1 to 64 letters, digits, '-', '_', '.' (not `.` or `..`)", pattern = r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|\.\.[A-Za-z0-9._-]{1,62})$"), ("seq" = u64, Path, minimum = 0, maximum = 9223372036854775807_i64)),
    request_body = EditBody,
    responses(
        (status = 200, body = PostView),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 408, body = ErrorBody), (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 500, body = ErrorBody, description = "`data_damaged`: the stored post is damaged (delete it)"),
        (status = 503, body = ErrorBody, description = "`storage_unavailable`: nothing was stored; retry"),
    ),
    security(("api_key" = [])))]
pub async fn edit(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams((id, seq)): PathParams<(String, u64)>,
    JsonBody(body): JsonBody<EditBody>,
) -> Result<Json<PostView>, ApiError> {
    let channel = ChannelId::parse(&id)?;
    check_seq(seq)?;
    caller.require_channel(&state, &channel, Role::Publisher)?;
    validate_text(&body.text)?;
    Ok(Json(state.log.edit(channel, seq, body.text).await?.into()))
}

#[utoipa::path(delete, path = "/v1/channels/{id}/posts/{seq}", tag = "posts", operation_id = "delete_post",
    params(("id" = String, Path, description = "channel id: 1 to 64 letters, digits, '-', '_', '.' (not `.` or `..`)", pattern = r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|\.\.[A-Za-z0-9._-]{1,62})$"), ("seq" = u64, Path, minimum = 0, maximum = 9223372036854775807_i64)),
    responses(
        (status = 200, body = PostView, description = "the tombstone"),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody, description = "`storage_unavailable`: nothing was stored; retry"),
    ),
    security(("api_key" = [])))]
pub async fn delete(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams((id, seq)): PathParams<(String, u64)>,
) -> Result<Json<PostView>, ApiError> {
    let channel = ChannelId::parse(&id)?;
    check_seq(seq)?;
    caller.require_channel(&state, &channel, Role::Publisher)?;
    Ok(Json(state.log.delete(channel, seq).await?.into()))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Posts with a seq greater than this (default 0: from the oldest).
    #[serde(default)]
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    pub after_seq: u64,
    /// At most this many posts: 1 to 1000 (default 100).
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

/// One page of a channel's history.
#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct History {
    /// Retained posts with seq greater than `after_seq`, oldest first, at most
    /// `limit` (default 100). Fewer than asked does not mean the end: compare with
    /// `head_seq`.
    pub posts: Vec<PostView>,
    /// Seq of the channel's newest post; 0 when it has none.
    pub head_seq: u64,
    /// Seq of the oldest retained post (older ones were trimmed); `head_seq + 1`
    /// when none is retained.
    pub oldest_seq: u64,
    /// The channel's history epoch the seqs belong to.
    pub epoch: u64,
}

#[utoipa::path(get, path = "/v1/channels/{id}/posts", tag = "posts", operation_id = "history",
    params(("id" = String, Path, description = "channel id: 1 to 64 letters, digits, '-', '_', '.' (not `.` or `..`)", pattern = r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|\.\.[A-Za-z0-9._-]{1,62})$"), HistoryQuery),
    responses(
        (status = 200, body = History),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody, description = "`storage_unavailable`: the log cannot be read right now"),
    ),
    security(("api_key" = [])))]
pub async fn history(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(id): PathParams<String>,
    QueryParams(q): QueryParams<HistoryQuery>,
) -> Result<Json<History>, ApiError> {
    let channel = ChannelId::parse(&id)?;
    let info = caller.require_channel(&state, &channel, Role::Analyst)?;
    if q.after_seq > MAX_SEQ {
        return Err(ApiError::bad_request(format!(
            "after_seq must be 0 to {MAX_SEQ}"
        )));
    }
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_HISTORY_PAGE {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {MAX_HISTORY_PAGE}"
        )));
    }
    let posts = state.log.read(channel, q.after_seq, limit).await?;
    Ok(Json(History {
        posts: posts.into_iter().map(PostView::from).collect(),
        head_seq: info.head_seq,
        oldest_seq: info.oldest_seq,
        epoch: info.epoch,
    }))
}
