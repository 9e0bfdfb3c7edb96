//! Channel routes: create, get, list.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{Admin, JsonBody, PathParams};
use super::ApiState;
use crate::model::{ChannelId, ChannelInfo, MAX_TITLE_BYTES};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateChannel {
    pub id: String,
    #[serde(default)]
    pub title: String,
}

/// A channel as the API shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ChannelView {
    pub id: String,
    pub title: String,
    pub epoch: u64,
    pub head_seq: u64,
    pub oldest_seq: u64,
    pub followers: usize,
    pub created_at_ms: i64,
}

fn view(state: &ApiState, c: ChannelInfo) -> ChannelView {
    ChannelView {
        followers: state.hub.follower_count(&c.id),
        id: c.id.to_string(),
        title: c.title,
        epoch: c.epoch,
        head_seq: c.head_seq,
        oldest_seq: c.oldest_seq,
        created_at_ms: c.created_at_ms,
    }
}

pub async fn create(
    State(state): State<ApiState>,
    _admin: Admin,
    JsonBody(body): JsonBody<CreateChannel>,
) -> Result<(StatusCode, Json<ChannelView>), ApiError> {
    let id = ChannelId::parse(&body.id)?;
    if body.title.len() > MAX_TITLE_BYTES {
        return Err(ApiError::bad_request(format!(
            "title is longer than {MAX_TITLE_BYTES} bytes"
        )));
    }
    let info = state.log.create_channel(id, body.title).await?;
    Ok((StatusCode::CREATED, Json(view(&state, info))))
}

pub async fn get(
    State(state): State<ApiState>,
    _admin: Admin,
    PathParams(id): PathParams<String>,
) -> Result<Json<ChannelView>, ApiError> {
    let id = ChannelId::parse(&id)?;
    let info = state
        .log
        .channel(&id)
        .ok_or(crate::store::StoreError::UnknownChannel(id))?;
    Ok(Json(view(&state, info)))
}

#[derive(Serialize)]
pub struct ChannelList {
    pub channels: Vec<ChannelView>,
}

pub async fn list(State(state): State<ApiState>, _admin: Admin) -> Json<ChannelList> {
    let mut all = state.log.channels();
    all.sort_by(|a, b| a.id.cmp(&b.id));
    Json(ChannelList {
        channels: all.into_iter().map(|c| view(&state, c)).collect(),
    })
}
