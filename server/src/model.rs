//! The server's own domain types: what a brand submits ([`NewPost`]), a
//! channel's metadata and log position ([`ChannelInfo`]), and the clock.
//! The protocol's types (channel ids, posts, follow requests) live in
//! `herald_proto::model` and are re-exported here.

pub use herald_proto::model::{
    ChannelId, ClientRequest, FollowRequest, InvalidField, Media, Post, MAX_CHANNEL_ID_LEN,
    MAX_TAIL, MAX_TOKEN_BYTES,
};

/// Longest post text, in bytes.
pub const MAX_POST_TEXT_BYTES: usize = 16 * 1024;
/// Most media references on one post.
pub const MAX_MEDIA_PER_POST: usize = 10;
/// Longest media URL or MIME type, in bytes.
pub const MAX_MEDIA_FIELD_BYTES: usize = 2048;
/// Longest channel title, in bytes.
pub const MAX_TITLE_BYTES: usize = 256;

fn invalid(msg: impl Into<String>) -> InvalidField {
    InvalidField(msg.into())
}

/// What a brand submits to publish a post, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPost {
    /// The text: 1 to [`MAX_POST_TEXT_BYTES`] bytes once checked by
    /// [`NewPost::new`].
    pub text: String,
    /// Media references: at most [`MAX_MEDIA_PER_POST`], each URL 1 to
    /// [`MAX_MEDIA_FIELD_BYTES`] bytes and each MIME type at most that, once checked
    /// by [`NewPost::new`].
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

/// A channel's metadata and log position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelInfo {
    /// The channel id.
    pub id: ChannelId,
    /// The title, at most [`MAX_TITLE_BYTES`] bytes (may be empty).
    pub title: String,
    /// The history epoch: 1 for a new channel; it changes only if the history is
    /// reset.
    pub epoch: u64,
    /// Seq of the newest post; 0 when the channel has none.
    pub head_seq: u64,
    /// Seq of the oldest retained post; `head_seq + 1` when none is retained.
    pub oldest_seq: u64,
    /// When the channel was created, in Unix milliseconds.
    pub created_at_ms: i64,
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
}
