//! Domain types, and their conversion from the wire types.
//!
//! Prost types are converted here once, on receipt, with `TryFrom`; every
//! field a peer sent is validated at this point, so the rest of the server
//! never sees an unchecked channel id or an oversized text.

use std::fmt;
use std::sync::Arc;

use crate::proto::v1 as pb;

/// Longest channel id, in bytes.
pub const MAX_CHANNEL_ID_LEN: usize = 64;
/// Longest post text, in bytes.
pub const MAX_POST_TEXT_BYTES: usize = 16 * 1024;
/// Most media references on one post.
pub const MAX_MEDIA_PER_POST: usize = 10;
/// Longest media URL or MIME type, in bytes.
pub const MAX_MEDIA_FIELD_BYTES: usize = 2048;
/// Longest token accepted in Hello or Refresh, in bytes.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Longest channel title, in bytes.
pub const MAX_TITLE_BYTES: usize = 256;

/// A field a peer sent was invalid. The message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidField(pub String);

fn invalid(msg: impl Into<String>) -> InvalidField {
    InvalidField(msg.into())
}

/// A validated channel id: 1 to 64 bytes of `a-z`, `A-Z`, `0-9`, `-`, `_`, `.`.
/// Cheap to clone (shared string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(Arc<str>);

impl ChannelId {
    /// Validates `s` as a channel id.
    pub fn parse(s: &str) -> Result<ChannelId, InvalidField> {
        if s.is_empty() {
            return Err(invalid("channel id is empty"));
        }
        if s.len() > MAX_CHANNEL_ID_LEN {
            return Err(invalid(format!(
                "channel id is longer than {MAX_CHANNEL_ID_LEN} bytes"
            )));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(invalid(format!(
                "channel id {s:?} has the character {c:?}; allowed: letters, digits, '-', '_', '.'"
            )));
        }
        Ok(ChannelId(Arc::from(s)))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// A media reference attached to a post (the media itself lives elsewhere).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Media {
    pub url: String,
    #[serde(default)]
    pub mime: String,
}

/// What a brand submits to publish a post, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPost {
    pub text: String,
    pub media: Vec<Media>,
}

impl NewPost {
    /// Validates text and media against the documented limits.
    pub fn new(text: String, media: Vec<Media>) -> Result<NewPost, InvalidField> {
        validate_text(&text)?;
        if media.len() > MAX_MEDIA_PER_POST {
            return Err(invalid(format!(
                "a post has at most {MAX_MEDIA_PER_POST} media references"
            )));
        }
        for m in &media {
            if m.url.is_empty() || m.url.len() > MAX_MEDIA_FIELD_BYTES {
                return Err(invalid(format!(
                    "media url must be 1 to {MAX_MEDIA_FIELD_BYTES} bytes"
                )));
            }
            if m.mime.len() > MAX_MEDIA_FIELD_BYTES {
                return Err(invalid(format!(
                    "media mime must be at most {MAX_MEDIA_FIELD_BYTES} bytes"
                )));
            }
        }
        Ok(NewPost { text, media })
    }
}

/// Checks a post text: not empty, at most [`MAX_POST_TEXT_BYTES`].
pub fn validate_text(text: &str) -> Result<(), InvalidField> {
    if text.is_empty() {
        return Err(invalid("text is empty"));
    }
    if text.len() > MAX_POST_TEXT_BYTES {
        return Err(invalid(format!(
            "text is {} bytes; the limit is {MAX_POST_TEXT_BYTES}",
            text.len()
        )));
    }
    Ok(())
}

/// A post as stored in a channel's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Post {
    pub channel: ChannelId,
    pub seq: u64,
    pub epoch: u64,
    pub id: String,
    pub text: String,
    pub media: Vec<Media>,
    pub created_at_ms: i64,
    /// 0 when never edited.
    pub edited_at_ms: i64,
    /// A tombstone: the post was deleted; text and media are empty.
    pub deleted: bool,
}

impl Post {
    /// The feed frame for this post.
    pub fn to_frame(&self) -> pb::FeedFrame {
        pb::FeedFrame {
            kind: Some(pb::feed_frame::Kind::Post(pb::Post {
                channel: self.channel.to_string(),
                seq: self.seq,
                epoch: self.epoch,
                id: self.id.clone(),
                text: self.text.clone(),
                media: self
                    .media
                    .iter()
                    .map(|m| pb::MediaRef {
                        url: m.url.clone(),
                        mime: m.mime.clone(),
                    })
                    .collect(),
                created_at_ms: self.created_at_ms,
                edited_at_ms: self.edited_at_ms,
                deleted: self.deleted,
            })),
        }
    }
}

/// A channel's metadata and log position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelInfo {
    pub id: ChannelId,
    pub title: String,
    pub epoch: u64,
    /// Seq of the newest post; 0 when the channel has none.
    pub head_seq: u64,
    /// Seq of the oldest retained post; `head_seq + 1` when none is retained.
    pub oldest_seq: u64,
    pub created_at_ms: i64,
}

/// A Follow request, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowRequest {
    pub channel: ChannelId,
    pub after_seq: Option<u64>,
    pub epoch: Option<u64>,
    /// Without `after_seq`: how many of the latest posts to send first.
    pub tail: u32,
    /// The follower asked to resume from a position (it sent `after_seq`),
    /// as opposed to following live; kept when the server fills in the
    /// starting position of a live follow.
    pub resume: bool,
}

/// Most posts a follower may ask for as a tail.
pub const MAX_TAIL: u32 = 1000;

impl TryFrom<pb::Follow> for FollowRequest {
    type Error = InvalidField;

    fn try_from(f: pb::Follow) -> Result<Self, Self::Error> {
        if f.tail > MAX_TAIL {
            return Err(invalid(format!("tail is at most {MAX_TAIL}")));
        }
        Ok(FollowRequest {
            channel: ChannelId::parse(&f.channel)?,
            resume: f.after_seq.is_some(),
            after_seq: f.after_seq,
            epoch: f.epoch,
            tail: f.tail,
        })
    }
}

/// A control frame from a follower, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRequest {
    Hello {
        token: String,
        client_name: String,
    },
    Follow(FollowRequest),
    Unfollow(ChannelId),
    Refresh {
        token: String,
    },
    Click {
        campaign_id: String,
        channel: ChannelId,
    },
}

fn check_token(token: String) -> Result<String, InvalidField> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(invalid(format!(
            "token is longer than {MAX_TOKEN_BYTES} bytes"
        )));
    }
    Ok(token)
}

impl TryFrom<pb::ClientFrame> for (u64, ClientRequest) {
    type Error = InvalidField;

    fn try_from(frame: pb::ClientFrame) -> Result<Self, Self::Error> {
        use pb::client_frame::Kind;
        let req = match frame.kind {
            None => return Err(invalid("control frame has no kind")),
            Some(Kind::Hello(h)) => {
                let mut client_name = h.client_name;
                client_name.truncate(
                    client_name
                        .char_indices()
                        .nth(64)
                        .map(|(i, _)| i)
                        .unwrap_or(client_name.len()),
                );
                ClientRequest::Hello {
                    token: check_token(h.token)?,
                    client_name,
                }
            }
            Some(Kind::Follow(f)) => ClientRequest::Follow(f.try_into()?),
            Some(Kind::Unfollow(u)) => ClientRequest::Unfollow(ChannelId::parse(&u.channel)?),
            Some(Kind::Refresh(r)) => ClientRequest::Refresh {
                token: check_token(r.token)?,
            },
            Some(Kind::Click(c)) => {
                if c.campaign_id.is_empty() || c.campaign_id.len() > 128 {
                    return Err(invalid("campaign id must be 1 to 128 bytes"));
                }
                ClientRequest::Click {
                    campaign_id: c.campaign_id,
                    channel: ChannelId::parse(&c.channel)?,
                }
            }
        };
        Ok((frame.request_id, req))
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_ids_are_validated() {
        assert!(ChannelId::parse("news.tech_1-a").is_ok());
        assert!(ChannelId::parse("").is_err());
        assert!(ChannelId::parse("has space").is_err());
        assert!(ChannelId::parse("slash/no").is_err());
        assert!(ChannelId::parse(&"x".repeat(65)).is_err());
        assert!(ChannelId::parse(&"x".repeat(64)).is_ok());
    }

    #[test]
    fn new_post_limits() {
        assert!(NewPost::new("hi".into(), vec![]).is_ok());
        assert!(NewPost::new(String::new(), vec![]).is_err());
        assert!(NewPost::new("x".repeat(MAX_POST_TEXT_BYTES + 1), vec![]).is_err());
        let m = Media {
            url: "https://x/y.png".into(),
            mime: "image/png".into(),
        };
        assert!(NewPost::new("a".into(), vec![m.clone(); 11]).is_err());
        assert!(NewPost::new("a".into(), vec![m; 10]).is_ok());
    }

    #[test]
    fn client_frames_convert_and_reject_junk() {
        let empty = pb::ClientFrame {
            request_id: 1,
            kind: None,
        };
        assert!(<(u64, ClientRequest)>::try_from(empty).is_err());
        let bad_follow = pb::ClientFrame {
            request_id: 2,
            kind: Some(pb::client_frame::Kind::Follow(pb::Follow {
                channel: "no spaces".into(),
                ..Default::default()
            })),
        };
        assert!(<(u64, ClientRequest)>::try_from(bad_follow).is_err());
        let follow = pb::ClientFrame {
            request_id: 3,
            kind: Some(pb::client_frame::Kind::Follow(pb::Follow {
                channel: "a".into(),
                after_seq: Some(5),
                epoch: Some(1),
                tail: 0,
            })),
        };
        let (id, req) = <(u64, ClientRequest)>::try_from(follow).unwrap();
        assert_eq!(id, 3);
        assert_eq!(
            req,
            ClientRequest::Follow(FollowRequest {
                channel: ChannelId::parse("a").unwrap(),
                after_seq: Some(5),
                epoch: Some(1),
                tail: 0,
                resume: true,
            })
        );
    }
}
