//! Domain types of the protocol, and their conversion from the wire types.
//!
//! Prost types are converted here once, on receipt, with `TryFrom`; every
//! field a peer sent is validated at this point, so the rest of a server or
//! client never sees an unchecked channel id or an oversized token.

use std::fmt;
use std::sync::Arc;

use crate::v1 as pb;

/// Longest channel id, in bytes.
pub const MAX_CHANNEL_ID_LEN: usize = 64;
/// Longest token accepted in Hello or Refresh, in bytes.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Most receipts one Seen frame may carry.
pub const MAX_RECEIPTS_PER_SEEN: usize = 1024;
/// Most posts one Resend may ask for.
pub const MAX_RESEND: u64 = 1024;

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
        if s == "." || s == ".." {
            // URL normalisation would turn these into other paths.
            return Err(invalid(format!("channel id {s:?} is reserved")));
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
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Media {
    /// Where the media lives.
    pub url: String,
    /// Its MIME type, if known (may be empty).
    #[cfg_attr(feature = "serde", serde(default))]
    pub mime: String,
}

/// A post of a channel: what the log stores and the feed carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Post {
    /// The channel it belongs to.
    pub channel: ChannelId,
    /// Its position in the channel: 1, 2, 3, ... with no gaps.
    pub seq: u64,
    /// The channel's history epoch (changes only if the history is reset).
    pub epoch: u64,
    /// Server-assigned id, unique across channels.
    pub id: String,
    /// The text (empty for a tombstone).
    pub text: String,
    /// Media references (empty for a tombstone).
    pub media: Vec<Media>,
    /// When the server accepted it (Unix milliseconds).
    pub created_at_ms: i64,
    /// 0 when never edited.
    pub edited_at_ms: i64,
    /// A tombstone: the post was deleted; text and media are empty.
    pub deleted: bool,
    /// The server's stored copy is damaged: this is a tombstone standing in
    /// for it (`deleted` is set too), so delivery goes on past it.
    pub damaged: bool,
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
                damaged: self.damaged,
            })),
        }
    }
}

/// A Follow request, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowRequest {
    /// The channel to follow.
    pub channel: ChannelId,
    /// Replay every retained post after this seq first.
    pub after_seq: Option<u64>,
    /// The epoch `after_seq` belongs to; a different epoch means a Reset.
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
    /// The first frame: who the follower is.
    Hello {
        /// The follower token (a JWT), at most [`MAX_TOKEN_BYTES`].
        token: String,
        /// Free-form client name, cut to 64 characters.
        client_name: String,
        /// The client confirms promoted posts with Seen.
        receipts: bool,
        /// The client takes live posts as QUIC datagrams.
        live_datagrams: bool,
    },
    /// Follow a channel.
    Follow(FollowRequest),
    /// Stop following a channel.
    Unfollow(ChannelId),
    /// Replace the session's token.
    Refresh {
        /// The new token, for the same follower.
        token: String,
    },
    /// The follower clicked a promoted post.
    Click {
        /// The campaign whose post was clicked (1 to 128 bytes).
        campaign_id: String,
        /// The channel it was shown in.
        channel: ChannelId,
    },
    /// The follower received the promoted posts with these receipts (1 to
    /// [`MAX_RECEIPTS_PER_SEEN`]).
    Seen {
        /// Their receipts.
        receipts: Vec<u64>,
    },
    /// Send posts `from..=to` of a followed channel again on the feed
    /// stream (1 ≤ from ≤ to, at most [`MAX_RESEND`] posts).
    Resend {
        /// The channel.
        channel: ChannelId,
        /// The first seq.
        from: u64,
        /// The last seq.
        to: u64,
    },
}

impl ClientRequest {
    /// The channel the request is about, if any.
    pub fn channel(&self) -> Option<&ChannelId> {
        match self {
            ClientRequest::Follow(f) => Some(&f.channel),
            ClientRequest::Unfollow(c) => Some(c),
            ClientRequest::Click { channel, .. } | ClientRequest::Resend { channel, .. } => {
                Some(channel)
            }
            ClientRequest::Hello { .. }
            | ClientRequest::Refresh { .. }
            | ClientRequest::Seen { .. } => None,
        }
    }
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
                    receipts: h.receipts,
                    live_datagrams: h.live_datagrams,
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
            Some(Kind::Seen(s)) => {
                if s.receipts.is_empty() || s.receipts.len() > MAX_RECEIPTS_PER_SEEN {
                    return Err(invalid(format!(
                        "Seen must carry 1 to {MAX_RECEIPTS_PER_SEEN} receipts"
                    )));
                }
                ClientRequest::Seen {
                    receipts: s.receipts,
                }
            }
            Some(Kind::Resend(r)) => {
                if r.from_seq == 0 || r.to_seq < r.from_seq || r.to_seq - r.from_seq >= MAX_RESEND {
                    return Err(invalid(format!(
                        "Resend must ask for 1 to {MAX_RESEND} posts from seq 1 on (from_seq {} to_seq {})",
                        r.from_seq, r.to_seq
                    )));
                }
                ClientRequest::Resend {
                    channel: ChannelId::parse(&r.channel)?,
                    from: r.from_seq,
                    to: r.to_seq,
                }
            }
        };
        Ok((frame.request_id, req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_ids_are_validated() {
        assert!(ChannelId::parse("news.tech_1-a").is_ok());
        assert!(ChannelId::parse("").is_err());
        assert!(ChannelId::parse(".").is_err());
        assert!(ChannelId::parse("..").is_err());
        assert!(ChannelId::parse("...").is_ok());
        assert!(ChannelId::parse("has space").is_err());
        assert!(ChannelId::parse("slash/no").is_err());
        assert!(ChannelId::parse(&"x".repeat(65)).is_err());
        assert!(ChannelId::parse(&"x".repeat(64)).is_ok());
    }

    #[test]
    fn seen_carries_one_to_max_receipts() {
        let seen = |n: usize| pb::ClientFrame {
            request_id: 9,
            kind: Some(pb::client_frame::Kind::Seen(pb::Seen {
                receipts: (1..=n as u64).collect(),
            })),
        };
        assert!(<(u64, ClientRequest)>::try_from(seen(0)).is_err());
        assert!(<(u64, ClientRequest)>::try_from(seen(MAX_RECEIPTS_PER_SEEN + 1)).is_err());
        match <(u64, ClientRequest)>::try_from(seen(MAX_RECEIPTS_PER_SEEN)) {
            Ok((9, ClientRequest::Seen { receipts })) => {
                assert_eq!(receipts.len(), MAX_RECEIPTS_PER_SEEN)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn resend_asks_for_one_to_max_posts() {
        let resend = |from: u64, to: u64| pb::ClientFrame {
            request_id: 3,
            kind: Some(pb::client_frame::Kind::Resend(pb::Resend {
                channel: "c".into(),
                from_seq: from,
                to_seq: to,
            })),
        };
        for (from, to) in [(0, 0), (0, 5), (5, 4), (1, MAX_RESEND + 1)] {
            assert!(
                <(u64, ClientRequest)>::try_from(resend(from, to)).is_err(),
                "{from}..={to}"
            );
        }
        match <(u64, ClientRequest)>::try_from(resend(1, MAX_RESEND)) {
            Ok((3, ClientRequest::Resend { channel, from, to })) => {
                assert_eq!((channel.as_str(), from, to), ("c", 1, MAX_RESEND))
            }
            other => panic!("{other:?}"),
        }
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
