//! Brand and API key routes: the admin creates brands; the admin or a
//! brand's owners create, list and revoke its keys. A key is shown once, on
//! creation; only its hash is kept.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::caller::{role_name, Caller};
use super::error::{ApiError, ErrorBody};
use super::extract::{JsonBody, PathParams};
use super::ApiState;
use crate::model::ChannelId;
use crate::tenancy::{
    validate_brand_id, validate_len, Brand, Grant, KeyRecord, Role, ALL_CHANNELS, MAX_GRANTS,
    MAX_NAME_BYTES,
};

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBrand {
    /// Letters, digits, '-', '_', '.'; 1 to 64 bytes (not `.` or `..`).
    #[schema(
        pattern = r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|\.\.[A-Za-z0-9._-]{1,62})$"
    )]
    pub id: String,
    /// A name for people: at most 256 bytes.
    #[serde(default)]
    #[schema(max_length = 256)]
    pub name: String,
}

/// The answer to listing brands.
#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct BrandList {
    /// Every brand, sorted by id.
    pub brands: Vec<Brand>,
}

#[utoipa::path(post, path = "/v1/brands", tag = "brands",
    request_body = CreateBrand,
    responses(
        (status = 201, body = Brand),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody, description = "not the admin key"),
        (status = 409, body = ErrorBody),
        (status = 408, body = ErrorBody, description = "the body did not arrive in time"),
        (status = 413, body = ErrorBody, description = "the body is over 256 KiB"),
        (status = 415, body = ErrorBody, description = "not `Content-Type: application/json`"),
        (status = 503, body = ErrorBody, description = "`storage_unavailable`: nothing was stored; retry"),
    ),
    security(("api_key" = [])))]
pub async fn create_brand(
    State(state): State<ApiState>,
    caller: Caller,
    JsonBody(body): JsonBody<CreateBrand>,
) -> Result<(StatusCode, Json<Brand>), ApiError> {
    caller.require_admin("creating a brand")?;
    validate_brand_id(&body.id)?;
    validate_len("name", &body.name, MAX_NAME_BYTES)?;
    let brand = state.tenancy.create_brand(body.id, body.name).await?;
    Ok((StatusCode::CREATED, Json(brand)))
}

#[utoipa::path(get, path = "/v1/brands", tag = "brands",
    responses((status = 200, body = BrandList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_brands(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<BrandList>, ApiError> {
    caller.require_admin("listing brands")?;
    Ok(Json(BrandList {
        brands: state.tenancy.brands(),
    }))
}

#[utoipa::path(get, path = "/v1/brands/{brand}", tag = "brands",
    params(("brand" = String, Path)),
    responses((status = 200, body = Brand), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_brand(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(brand): PathParams<String>,
) -> Result<Json<Brand>, ApiError> {
    caller.require_brand(&brand)?;
    state
        .tenancy
        .brand(&brand)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no brand {brand:?}")))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// A note for people ("ci publisher"): at most 256 bytes.
    #[serde(default)]
    #[schema(max_length = 256)]
    pub label: String,
    /// Roles per channel, 1 to 256; channel `*` means every channel of the
    /// brand.
    #[schema(min_items = 1, max_items = 256)]
    pub grants: Vec<Grant>,
}

/// A key as listed: never the key itself.
#[derive(Serialize, Deserialize, Debug, Clone, utoipa::ToSchema)]
pub struct KeyView {
    /// The key's id: 16 hex digits, the `<id>` in `hk_<id>_<secret>`; names the
    /// key in the revoke route.
    pub id: String,
    /// Id of the brand the key belongs to.
    pub brand: String,
    /// A note for people, given at creation (at most 256 bytes; may be empty).
    pub label: String,
    /// What the key may do: a role per channel, channel `*` meaning every
    /// channel of the brand.
    pub grants: Vec<Grant>,
    /// When the key was created, in Unix milliseconds.
    pub created_at_ms: i64,
    /// When the key was revoked, in Unix milliseconds; `null` while the key is
    /// valid.
    pub revoked_at_ms: Option<i64>,
}

impl From<KeyRecord> for KeyView {
    fn from(k: KeyRecord) -> Self {
        KeyView {
            id: k.id,
            brand: k.brand,
            label: k.label,
            grants: k.grants,
            created_at_ms: k.created_at_ms,
            revoked_at_ms: k.revoked_at_ms,
        }
    }
}

/// A new key: `key` is shown this once.
#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct CreatedKey {
    /// The API key, `hk_<id>_<secret>`, to send as `Authorization: Bearer <key>`.
    /// Shown only in this answer: the server keeps nothing but its SHA-256.
    pub key: String,
    /// The key as listed (its fields appear at the top level of this object).
    #[serde(flatten)]
    pub info: KeyView,
}

/// The answer to listing a brand's keys.
#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct KeyList {
    /// The brand's keys, revoked ones included, oldest first.
    pub keys: Vec<KeyView>,
}

/// Checks that `caller` may hand out `grants` in `brand`: every channel must
/// belong to the brand, and a brand key must be owner of each.
fn check_grants(
    state: &ApiState,
    caller: &Caller,
    brand: &str,
    grants: &[Grant],
) -> Result<(), ApiError> {
    if grants.is_empty() || grants.len() > MAX_GRANTS {
        return Err(ApiError::bad_request(format!(
            "a key needs 1 to {MAX_GRANTS} grants"
        )));
    }
    for g in grants {
        g.validate()?;
        // A channel that exists must be the brand's; one that does not
        // exist yet may be granted (the brand may create it later; a key
        // only ever reaches channels its brand owns).
        let exists = ChannelId::parse(&g.channel)
            .ok()
            .is_some_and(|c| state.log.channel(&c).is_some());
        if g.channel != ALL_CHANNELS
            && exists
            && state
                .tenancy
                .channel_meta(&g.channel)
                .is_none_or(|m| m.brand != brand)
        {
            return Err(ApiError::forbidden(format!(
                "channel {:?} does not belong to brand {brand:?}",
                g.channel
            )));
        }
        if let Caller::Key(k) = caller {
            if !k.allows(&g.channel, Role::Owner) {
                return Err(ApiError::forbidden(format!(
                    "granting {} in {:?} needs the owner role there",
                    role_name(g.role),
                    g.channel
                )));
            }
        }
    }
    Ok(())
}

#[utoipa::path(post, path = "/v1/brands/{brand}/keys", tag = "keys",
    params(("brand" = String, Path)),
    request_body = CreateKey,
    responses(
        (status = 201, body = CreatedKey, description = "the key is in `key`, shown only now"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "not the admin or an owner of every granted channel, or a granted channel belongs to another brand"),
        (status = 404, body = ErrorBody),
        (status = 408, body = ErrorBody, description = "the body did not arrive in time"),
        (status = 413, body = ErrorBody, description = "the body is over 256 KiB"),
        (status = 415, body = ErrorBody, description = "not `Content-Type: application/json`"),
        (status = 503, body = ErrorBody, description = "`storage_unavailable`: nothing was stored; retry"),
    ),
    security(("api_key" = [])))]
pub async fn create_key(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(brand): PathParams<String>,
    JsonBody(body): JsonBody<CreateKey>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    caller.require_brand(&brand)?;
    if state.tenancy.brand(&brand).is_none() {
        return Err(ApiError::not_found(format!("no brand {brand:?}")));
    }
    validate_len("label", &body.label, MAX_NAME_BYTES)?;
    check_grants(&state, &caller, &brand, &body.grants)?;
    let (rec, key) = state
        .tenancy
        .create_key(brand, body.label, body.grants)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            key,
            info: rec.into(),
        }),
    ))
}

#[utoipa::path(get, path = "/v1/brands/{brand}/keys", tag = "keys",
    params(("brand" = String, Path)),
    responses((status = 200, body = KeyList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_keys(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(brand): PathParams<String>,
) -> Result<Json<KeyList>, ApiError> {
    caller.require_brand(&brand)?;
    if !caller.owns_brand(&brand) {
        return Err(ApiError::forbidden(
            "listing keys needs the owner role on '*'",
        ));
    }
    Ok(Json(KeyList {
        keys: state
            .tenancy
            .keys_of(&brand)
            .into_iter()
            .map(KeyView::from)
            .collect(),
    }))
}

#[utoipa::path(delete, path = "/v1/brands/{brand}/keys/{key_id}", tag = "keys",
    params(("brand" = String, Path), ("key_id" = String, Path)),
    responses(
        (status = 200, body = KeyView, description = "the key, now revoked"),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "not the admin or an owner of every channel of the key"),
        (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody, description = "`storage_unavailable`: nothing was stored; retry"),
    ),
    security(("api_key" = [])))]
pub async fn revoke_key(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams((brand, key_id)): PathParams<(String, String)>,
) -> Result<Json<KeyView>, ApiError> {
    caller.require_brand(&brand)?;
    let Some(target) = state.tenancy.key(&key_id).filter(|k| k.brand == brand) else {
        return Err(ApiError::not_found(format!(
            "no key {key_id:?} in brand {brand:?}"
        )));
    };
    if let Caller::Key(k) = &caller {
        if let Some(g) = target
            .grants
            .iter()
            .find(|g| !k.allows(&g.channel, Role::Owner))
        {
            return Err(ApiError::forbidden(format!(
                "revoking this key needs the owner role in {:?}",
                g.channel
            )));
        }
    }
    let rec = state.tenancy.revoke_key(brand, key_id).await?;
    Ok(Json(rec.into()))
}
