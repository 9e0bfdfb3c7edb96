//! How posts, edits and tombstones are laid out in the posts stream.
//!
//! Subjects (with the default prefix `herald`):
//! - `herald.posts.<token>`: the channel's posts, one message per post, in
//!   seq order. Header `Herald-Seq` carries the channel seq.
//! - `herald.edits.<token>.<seq>`: changes to post `<seq>`; each message is
//!   the post's full new state (`Herald-Op: edit` or `delete`).
//!
//! `<token>` is the channel id with `.` replaced by `=` (ids may contain `.`,
//! which separates subject tokens; `=` is neither allowed in channel ids nor
//! special in subjects or KV keys), so the mapping is one-to-one.
//!
//! Payloads are JSON of [`StoredPost`]: small, self-describing, and readable
//! with the `nats` CLI when debugging a cluster.

use serde::{Deserialize, Serialize};

use crate::cluster::nats::StoredMsg;
use crate::model::{ChannelId, Media, Post};
use crate::store::StoreError;

/// Header carrying the channel seq of a post (on edits: of the post changed).
pub const H_SEQ: &str = "Herald-Seq";
/// Header naming the operation: `post`, `edit` or `delete`.
pub const H_OP: &str = "Herald-Op";
/// JetStream headers used.
pub const H_MSG_ID: &str = "Nats-Msg-Id";
pub const H_EXPECT_LAST_SUBJ_SEQ: &str = "Nats-Expected-Last-Subject-Sequence";

/// The subject-safe form of a channel id.
pub fn token(ch: &ChannelId) -> String {
    ch.as_str().replace('.', "=")
}

/// The channel id of a subject token.
pub fn channel_of(token: &str) -> Option<ChannelId> {
    ChannelId::parse(&token.replace('=', ".")).ok()
}

/// Subject names under one prefix.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

/// What a subject of the posts stream is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubjectKind {
    Post(ChannelId),
    Edit(ChannelId, u64),
}

impl Subjects {
    pub fn new(prefix: &str) -> Subjects {
        Subjects {
            prefix: prefix.to_string(),
        }
    }
    pub fn posts(&self, ch: &ChannelId) -> String {
        format!("{}.posts.{}", self.prefix, token(ch))
    }
    pub fn edits(&self, ch: &ChannelId, seq: u64) -> String {
        format!("{}.edits.{}.{seq}", self.prefix, token(ch))
    }
    /// The stream's subjects.
    pub fn all(&self) -> Vec<String> {
        vec![
            format!("{}.posts.*", self.prefix),
            format!("{}.edits.*.*", self.prefix),
        ]
    }
    pub fn parse(&self, subject: &str) -> Option<SubjectKind> {
        let rest = subject.strip_prefix(&self.prefix)?.strip_prefix('.')?;
        let mut parts = rest.split('.');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("posts"), Some(t), None, None) => Some(SubjectKind::Post(channel_of(t)?)),
            (Some("edits"), Some(t), Some(seq), None) => {
                Some(SubjectKind::Edit(channel_of(t)?, seq.parse().ok()?))
            }
            _ => None,
        }
    }
}

/// A post as stored in a message payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredPost {
    pub id: String,
    pub epoch: u64,
    pub text: String,
    #[serde(default)]
    pub media: Vec<Media>,
    pub created_at_ms: i64,
    #[serde(default)]
    pub edited_at_ms: i64,
    #[serde(default)]
    pub deleted: bool,
}

impl StoredPost {
    pub fn of(p: &Post) -> StoredPost {
        StoredPost {
            id: p.id.clone(),
            epoch: p.epoch,
            text: p.text.clone(),
            media: p.media.clone(),
            created_at_ms: p.created_at_ms,
            edited_at_ms: p.edited_at_ms,
            deleted: p.deleted,
        }
    }

    pub fn encode(&self) -> Result<bytes::Bytes, StoreError> {
        serde_json::to_vec(self)
            .map(bytes::Bytes::from)
            .map_err(|e| StoreError::Storage(format!("encode post: {e}")))
    }

    pub fn into_post(self, channel: ChannelId, seq: u64) -> Post {
        Post {
            channel,
            seq,
            epoch: self.epoch,
            id: self.id,
            text: self.text,
            media: self.media,
            created_at_ms: self.created_at_ms,
            edited_at_ms: self.edited_at_ms,
            deleted: self.deleted,
            // JetStream checks every message itself; a post read back is
            // whole or not read at all.
            damaged: false,
        }
    }
}

/// The operation a message records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Post,
    Edit,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Post => "post",
            Op::Edit => "edit",
            Op::Delete => "delete",
        }
    }
}

/// The channel seq a message carries.
pub fn seq_of(m: &StoredMsg) -> Result<u64, StoreError> {
    m.header(H_SEQ)
        .and_then(|s| s.parse().ok())
        .filter(|s| *s > 0)
        .ok_or_else(|| StoreError::Storage(format!("message {} has no {H_SEQ}", m.seq)))
}

/// Decodes a message of the posts stream into its operation and post.
pub fn decode(subjects: &Subjects, m: &StoredMsg) -> Result<(Op, Post), StoreError> {
    let corrupt = |why: String| StoreError::Storage(format!("corrupt message {}: {why}", m.seq));
    let kind = subjects
        .parse(&m.subject)
        .ok_or_else(|| corrupt(format!("unknown subject {:?}", m.subject)))?;
    let seq = seq_of(m)?;
    let stored: StoredPost =
        serde_json::from_slice(&m.payload).map_err(|e| corrupt(e.to_string()))?;
    let op = match m.header(H_OP) {
        Some("edit") => Op::Edit,
        Some("delete") => Op::Delete,
        _ => Op::Post,
    };
    match kind {
        SubjectKind::Post(ch) => Ok((Op::Post, stored.into_post(ch, seq))),
        SubjectKind::Edit(ch, s) if s == seq && op != Op::Post => {
            Ok((op, stored.into_post(ch, seq)))
        }
        SubjectKind::Edit(..) => Err(corrupt("edit subject and header disagree".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_subjects_parse() {
        let ch = ChannelId::parse("news.tech_1-a").unwrap();
        assert_eq!(token(&ch), "news=tech_1-a");
        assert_eq!(channel_of(&token(&ch)), Some(ch.clone()));
        let s = Subjects::new("herald");
        assert_eq!(s.parse(&s.posts(&ch)), Some(SubjectKind::Post(ch.clone())));
        assert_eq!(s.parse(&s.edits(&ch, 7)), Some(SubjectKind::Edit(ch, 7)));
        assert_eq!(s.parse("herald.posts.a.b"), None);
        assert_eq!(s.parse("other.posts.a"), None);
        assert_eq!(s.parse("herald.edits.a.x"), None);
    }
}
