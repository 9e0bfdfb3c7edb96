//! Who is calling, and what they may do.
//!
//! [`Caller`] is an extractor: the admin key or a brand API key presented as
//! `Authorization: Bearer <key>`. No key, or an unknown one, answers 401
//! `unauthenticated`; a revoked key 401 `key_revoked`. The `require_*`
//! methods answer 403 `forbidden` when the caller lacks the right.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;

use super::error::ApiError;
use super::ApiState;
use crate::model::{ChannelId, ChannelInfo};
use crate::tenancy::{KeyRecord, KeyRefused, Role, ALL_CHANNELS};
use herald_proto::ErrorCode;
use subtle::ConstantTimeEq;

/// An authenticated caller.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The server's admin key: may do everything.
    Admin,
    /// A brand's API key.
    Key(Arc<KeyRecord>),
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized(
                "missing Authorization header; send 'Authorization: Bearer <key>'",
            ));
        };
        let key = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| ApiError::unauthorized("Authorization must be 'Bearer <key>'"))?;
        if bool::from(key.as_bytes().ct_eq(state.admin_key.as_bytes())) {
            return Ok(Caller::Admin);
        }
        match state.tenancy.authenticate_fresh(key).await {
            Ok(rec) => Ok(Caller::Key(rec)),
            Err(KeyRefused::Unknown) => Err(ApiError::unauthorized("unknown API key")),
            Err(KeyRefused::Revoked) => Err(ApiError::new(
                axum::http::StatusCode::UNAUTHORIZED,
                ErrorCode::KeyRevoked,
                "this API key was revoked",
            )),
        }
    }
}

impl Caller {
    /// The key id for rate limiting; `None` for the admin (not limited).
    pub fn key_id(&self) -> Option<&str> {
        match self {
            Caller::Admin => None,
            Caller::Key(k) => Some(&k.id),
        }
    }

    /// Only the admin key.
    pub fn require_admin(&self, what: &str) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Key(_) => Err(ApiError::forbidden(format!("{what} needs the admin key"))),
        }
    }

    /// The admin, or a key of `brand`; returns the key (None for the admin).
    pub fn require_brand(&self, brand: &str) -> Result<Option<&KeyRecord>, ApiError> {
        match self {
            Caller::Admin => Ok(None),
            Caller::Key(k) if k.brand == brand => Ok(Some(k)),
            Caller::Key(_) => Err(ApiError::forbidden(format!(
                "this key does not belong to brand {brand:?}"
            ))),
        }
    }

    /// The admin, or a key with at least `role` in `channel` of its brand;
    /// returns the channel. An unknown channel answers 404 `unknown_channel`.
    pub fn require_channel(
        &self,
        state: &ApiState,
        channel: &ChannelId,
        role: Role,
    ) -> Result<ChannelInfo, ApiError> {
        let Some(info) = state.log.channel(channel) else {
            return Err(crate::store::StoreError::UnknownChannel(channel.clone()).into());
        };
        let Caller::Key(k) = self else {
            return Ok(info);
        };
        let owned = state
            .tenancy
            .channel_meta(channel.as_str())
            .is_some_and(|m| m.brand == k.brand);
        if owned && k.allows(channel.as_str(), role) {
            Ok(info)
        } else {
            Err(ApiError::forbidden(format!(
                "this key has no {} role in channel {channel}",
                role_name(role)
            )))
        }
    }

    /// Whether the caller is owner of every channel of `brand` (`*`).
    pub fn owns_brand(&self, brand: &str) -> bool {
        match self {
            Caller::Admin => true,
            Caller::Key(k) => k.brand == brand && k.allows(ALL_CHANNELS, Role::Owner),
        }
    }
}

/// The lowercase name of a role.
pub fn role_name(r: Role) -> &'static str {
    match r {
        Role::Analyst => "analyst",
        Role::Publisher => "publisher",
        Role::Owner => "owner",
    }
}
