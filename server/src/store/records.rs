//! Conversion between domain types and the store's on-disk records
//! (`proto/herald/store/v1`).

use prost::Message;

use super::StoreError;
use crate::model::{ChannelId, ChannelInfo, Media, Post};

/// The record schema, generated from `proto/herald/store/v1/store.proto`.
#[allow(missing_docs)]
mod rec {
    include!(concat!(env!("OUT_DIR"), "/herald.store.v1.rs"));
}

pub(super) fn encode_channel(c: &ChannelInfo) -> Vec<u8> {
    rec::StoredChannel {
        title: c.title.clone(),
        epoch: c.epoch,
        head_seq: c.head_seq,
        oldest_seq: c.oldest_seq,
        created_at_ms: c.created_at_ms,
    }
    .encode_to_vec()
}

pub(super) fn decode_channel(id: &str, bytes: &[u8]) -> Result<ChannelInfo, StoreError> {
    let r = rec::StoredChannel::decode(bytes)
        .map_err(|e| StoreError::Storage(format!("corrupt channel record {id:?}: {e}")))?;
    let id = ChannelId::parse(id)
        .map_err(|e| StoreError::Storage(format!("corrupt channel id {id:?}: {e}")))?;
    Ok(ChannelInfo {
        id,
        title: r.title,
        epoch: r.epoch,
        head_seq: r.head_seq,
        oldest_seq: r.oldest_seq,
        created_at_ms: r.created_at_ms,
    })
}

pub(super) fn encode_post(p: &Post) -> Vec<u8> {
    rec::StoredPost {
        id: p.id.clone(),
        text: p.text.clone(),
        media: p
            .media
            .iter()
            .map(|m| rec::StoredMedia {
                url: m.url.clone(),
                mime: m.mime.clone(),
            })
            .collect(),
        created_at_ms: p.created_at_ms,
        edited_at_ms: p.edited_at_ms,
        deleted: p.deleted,
    }
    .encode_to_vec()
}

pub(super) fn decode_post(
    channel: &ChannelId,
    epoch: u64,
    seq: u64,
    bytes: &[u8],
) -> Result<Post, StoreError> {
    let r = rec::StoredPost::decode(bytes)
        .map_err(|e| StoreError::Storage(format!("corrupt post {channel}/{seq}: {e}")))?;
    Ok(Post {
        channel: channel.clone(),
        seq,
        epoch,
        id: r.id,
        text: r.text,
        media: r
            .media
            .into_iter()
            .map(|m| Media {
                url: m.url,
                mime: m.mime,
            })
            .collect(),
        created_at_ms: r.created_at_ms,
        edited_at_ms: r.edited_at_ms,
        deleted: r.deleted,
    })
}
