//! The feed frames built from the log: post, edit, delete, reset, head. (A promoted
//! post's frame is built by the promo engine from its campaign, once per slot.)

use herald_proto::v1 as pb;

use crate::model::{ChannelId, Post};

/// The Post frame carrying `p` as it is now.
pub fn post_frame(p: &Post) -> pb::FeedFrame {
    p.to_frame()
}

/// The PostEdited frame carrying `p`'s current text.
pub fn edited_frame(p: &Post) -> pb::FeedFrame {
    pb::FeedFrame {
        kind: Some(pb::feed_frame::Kind::Edited(pb::PostEdited {
            channel: p.channel.to_string(),
            seq: p.seq,
            epoch: p.epoch,
            text: p.text.clone(),
            edited_at_ms: p.edited_at_ms,
        })),
    }
}

/// The PostDeleted frame for `p`.
pub fn deleted_frame(p: &Post) -> pb::FeedFrame {
    pb::FeedFrame {
        kind: Some(pb::feed_frame::Kind::Deleted(pb::PostDeleted {
            channel: p.channel.to_string(),
            seq: p.seq,
            epoch: p.epoch,
        })),
    }
}

/// The Head frame: every post of `channel` up to `seq` was sent.
pub fn head_frame(channel: &ChannelId, epoch: u64, seq: u64) -> pb::FeedFrame {
    pb::FeedFrame {
        kind: Some(pb::feed_frame::Kind::Head(pb::Head {
            channel: channel.to_string(),
            epoch,
            seq,
        })),
    }
}

/// The Reset frame: the follower's position cannot be honoured; delivery
/// goes on from `oldest_seq` of `epoch`.
pub fn reset_frame(channel: &ChannelId, epoch: u64, oldest_seq: u64) -> pb::FeedFrame {
    pb::FeedFrame {
        kind: Some(pb::feed_frame::Kind::Reset(pb::Reset {
            channel: channel.to_string(),
            epoch,
            oldest_seq,
        })),
    }
}
