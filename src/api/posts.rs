//! Post routes: publish, edit, delete, history.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{Admin, JsonBody, PathParams, QueryParams};
use super::ApiState;
use crate::model::{validate_text, ChannelId, Media, NewPost, Post};

/// Most posts one history page returns.
pub const MAX_HISTORY_PAGE: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishBody {
    pub text: String,
    #[serde(default)]
    pub media: Vec<Media>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Published {
    pub seq: u64,
    pub epoch: u64,
    pub id: String,
}

/// A post as the API shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PostView {
    pub channel: String,
    pub seq: u64,
    pub epoch: u64,
    pub id: String,
    pub text: String,
    pub media: Vec<Media>,
    pub created_at_ms: i64,
    pub edited_at_ms: i64,
    pub deleted: bool,
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
        }
    }
}

pub async fn publish(
    State(state): State<ApiState>,
    _admin: Admin,
    PathParams(id): PathParams<String>,
    JsonBody(body): JsonBody<PublishBody>,
) -> Result<(StatusCode, Json<Published>), ApiError> {
    let channel = ChannelId::parse(&id)?;
    let post = NewPost::new(body.text, body.media)?;
    let p = state.log.append(channel, post, None).await?;
    Ok((
        StatusCode::CREATED,
        Json(Published {
            seq: p.seq,
            epoch: p.epoch,
            id: p.id,
        }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditBody {
    pub text: String,
}

pub async fn edit(
    State(state): State<ApiState>,
    _admin: Admin,
    PathParams((id, seq)): PathParams<(String, u64)>,
    JsonBody(body): JsonBody<EditBody>,
) -> Result<Json<PostView>, ApiError> {
    let channel = ChannelId::parse(&id)?;
    validate_text(&body.text)?;
    Ok(Json(state.log.edit(channel, seq, body.text).await?.into()))
}

pub async fn delete(
    State(state): State<ApiState>,
    _admin: Admin,
    PathParams((id, seq)): PathParams<(String, u64)>,
) -> Result<Json<PostView>, ApiError> {
    let channel = ChannelId::parse(&id)?;
    Ok(Json(state.log.delete(channel, seq).await?.into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    #[serde(default)]
    pub after_seq: u64,
    #[serde(default)]
    pub limit: Option<usize>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct History {
    pub posts: Vec<PostView>,
    pub head_seq: u64,
    pub oldest_seq: u64,
    pub epoch: u64,
}

pub async fn history(
    State(state): State<ApiState>,
    _admin: Admin,
    PathParams(id): PathParams<String>,
    QueryParams(q): QueryParams<HistoryQuery>,
) -> Result<Json<History>, ApiError> {
    let channel = ChannelId::parse(&id)?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_HISTORY_PAGE {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {MAX_HISTORY_PAGE}"
        )));
    }
    let info = state
        .log
        .channel(&channel)
        .ok_or_else(|| crate::store::StoreError::UnknownChannel(channel.clone()))?;
    let posts = state.log.read(channel, q.after_seq, limit).await?;
    Ok(Json(History {
        posts: posts.into_iter().map(PostView::from).collect(),
        head_seq: info.head_seq,
        oldest_seq: info.oldest_seq,
        epoch: info.epoch,
    }))
}
