//! Tenancy types: brands, roles, grants, API key records and channel
//! settings, with the validation of what a caller sends.

use serde::{Deserialize, Serialize};

use crate::model::{ChannelId, InvalidField};

/// The grant channel that means "every channel of the brand, now and later".
pub const ALL_CHANNELS: &str = "*";
/// Longest brand id, in bytes (same alphabet as channel ids).
pub const MAX_BRAND_ID_LEN: usize = 64;
/// Longest brand name or key label, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest channel description, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 2048;
/// Longest avatar URL, in bytes.
pub const MAX_URL_BYTES: usize = 2048;
/// Most grants on one key.
pub const MAX_GRANTS: usize = 256;

/// What a key may do in a channel. Each role includes the ones below it:
/// owner ⊇ publisher ⊇ analyst.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads stats and history.
    Analyst,
    /// Posts, edits and deletes.
    Publisher,
    /// Manages keys and channel settings, creates channels (with `*`).
    Owner,
}

impl std::str::FromStr for Role {
    type Err = InvalidField;
    fn from_str(s: &str) -> Result<Role, InvalidField> {
        match s {
            "analyst" => Ok(Role::Analyst),
            "publisher" => Ok(Role::Publisher),
            "owner" => Ok(Role::Owner),
            _ => Err(InvalidField(format!(
                "role {s:?} is not one of owner, publisher, analyst"
            ))),
        }
    }
}

/// A role in one channel (or in every channel of the brand: `*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// A channel id, or `*` for every channel of the brand.
    #[schema(
        pattern = r"^(?:\*|[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|\.\.[A-Za-z0-9._-]{1,62})$"
    )]
    pub channel: String,
    /// The role granted there (which includes the roles below it).
    pub role: Role,
}

impl Grant {
    /// Whether this grant gives at least `role` in `channel`.
    pub fn allows(&self, channel: &str, role: Role) -> bool {
        (self.channel == ALL_CHANNELS || self.channel == channel) && self.role >= role
    }

    /// Checks the channel field.
    pub fn validate(&self) -> Result<(), InvalidField> {
        if self.channel != ALL_CHANNELS {
            ChannelId::parse(&self.channel)?;
        }
        Ok(())
    }
}

/// A brand: a tenant that owns channels and API keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Brand {
    /// Letters, digits, '-', '_', '.'; 1 to 64 bytes; unique.
    pub id: String,
    /// Display name, at most 256 bytes (may be empty).
    pub name: String,
    /// When the brand was created, in Unix milliseconds.
    pub created_at_ms: i64,
}

/// A stored API key: never the key itself, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The key id: 16 hex digits, the `<id>` in `hk_<id>_<secret>`.
    pub id: String,
    /// Id of the brand the key belongs to.
    pub brand: String,
    /// A note for people (at most 256 bytes; may be empty).
    pub label: String,
    /// What the key may do: a role per channel, or in every channel (`*`).
    pub grants: Vec<Grant>,
    /// Hex SHA-256 of the whole key string.
    pub hash: String,
    /// When the key was created, in Unix milliseconds.
    pub created_at_ms: i64,
    /// When the key was revoked, in Unix milliseconds; `None` while it is valid.
    pub revoked_at_ms: Option<i64>,
}

impl KeyRecord {
    /// Whether this key gives at least `role` in `channel`.
    pub fn allows(&self, channel: &str, role: Role) -> bool {
        self.grants.iter().any(|g| g.allows(channel, role))
    }
}

/// A channel's brand and settings (the title and positions live in the log).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelMeta {
    /// Id of the brand that owns the channel.
    pub brand: String,
    /// Free text, at most [`MAX_DESCRIPTION_BYTES`] (may be empty).
    #[serde(default)]
    pub description: String,
    /// An http(s) URL of at most [`MAX_URL_BYTES`], or empty.
    #[serde(default)]
    pub avatar_url: String,
    /// Set by the admin only.
    #[serde(default)]
    pub verified: bool,
    /// The channel accepts promoted posts in its slot.
    #[serde(default)]
    pub promoted_opt_in: bool,
}

/// Validates a brand id: like a channel id.
pub fn validate_brand_id(id: &str) -> Result<(), InvalidField> {
    ChannelId::parse(id)
        .map(|_| ())
        .map_err(|e| InvalidField(e.0.replace("channel id", "brand id")))
}

/// Checks a free-text field's length.
pub fn validate_len(field: &str, value: &str, max: usize) -> Result<(), InvalidField> {
    if value.len() > max {
        return Err(InvalidField(format!("{field} is longer than {max} bytes")));
    }
    Ok(())
}

/// Checks an avatar URL: empty, or http(s).
pub fn validate_url(value: &str) -> Result<(), InvalidField> {
    validate_len("avatar_url", value, MAX_URL_BYTES)?;
    if !(value.is_empty() || value.starts_with("https://") || value.starts_with("http://")) {
        return Err(InvalidField("avatar_url must be an http(s) URL".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_include_lower_ones_and_star_covers_all() {
        let g = Grant {
            channel: "news".into(),
            role: Role::Publisher,
        };
        assert!(g.allows("news", Role::Analyst));
        assert!(g.allows("news", Role::Publisher));
        assert!(!g.allows("news", Role::Owner));
        assert!(!g.allows("other", Role::Analyst));
        let star = Grant {
            channel: ALL_CHANNELS.into(),
            role: Role::Analyst,
        };
        assert!(star.allows("anything", Role::Analyst));
        assert!(!star.allows("anything", Role::Publisher));
        assert_eq!("owner".parse::<Role>().unwrap(), Role::Owner);
        assert!("boss".parse::<Role>().is_err());
    }

    #[test]
    fn validation() {
        assert!(validate_brand_id("acme").is_ok());
        assert!(validate_brand_id("a b").is_err());
        assert!(validate_url("https://x/y.png").is_ok());
        assert!(validate_url("javascript:alert(1)").is_err());
        assert!(Grant {
            channel: "bad id".into(),
            role: Role::Owner
        }
        .validate()
        .is_err());
    }
}
