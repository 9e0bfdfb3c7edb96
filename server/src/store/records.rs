//! Conversion between domain types and the store's on-disk records
//! (`proto/herald/store/v1`), each sealed with a checksum.
//!
//! A record is `SEALED`, 8 bytes of the SHA-256 of the protobuf bytes, then
//! the protobuf bytes. redb checks its pages' checksums only when it
//! recovers a file, not on every read, so a bit flipped in a stored post
//! would otherwise be served as it is, or fail to decode somewhere in a
//! catch-up. With the seal, every read of a damaged record fails here, as
//! [`StoreError::Damaged`], and the caller decides (a catch-up skips the post
//! visibly; `herald check` reports it). Records written before seals existed
//! start with a protobuf tag byte, never with `SEALED` (a tag byte of 0xC5
//! would need a field number of 24 or more), and are read as before.

use prost::Message;

use super::StoreError;
use crate::model::{ChannelId, ChannelInfo, Media, Post};

/// The record schema, generated from `proto/herald/store/v1/store.proto`.
#[allow(missing_docs)]
mod rec {
    include!(concat!(env!("OUT_DIR"), "/herald.store.v1.rs"));
}

/// First byte of a sealed record.
const SEALED: u8 = 0xC5;
/// Bytes of the digest kept.
const DIGEST: usize = 8;

fn digest(bytes: &[u8]) -> [u8; DIGEST] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; DIGEST];
    out.copy_from_slice(&d.as_ref()[..DIGEST]);
    out
}

/// `body` sealed with its checksum.
pub(super) fn seal(body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + DIGEST + body.len());
    v.push(SEALED);
    v.extend_from_slice(&digest(body));
    v.extend_from_slice(body);
    v
}

/// The body of a sealed (or legacy, unsealed) record; `Err(what is wrong)`
/// when the checksum does not match.
pub(super) fn unseal(record: &[u8]) -> Result<&[u8], &'static str> {
    match record.first() {
        Some(&SEALED) => {
            let (sum, body) = record
                .get(1..)
                .filter(|r| r.len() >= DIGEST)
                .map(|r| r.split_at(DIGEST))
                .ok_or("record too short for its checksum")?;
            if digest(body) != sum {
                return Err("checksum mismatch");
            }
            Ok(body)
        }
        _ => Ok(record),
    }
}

pub(super) fn encode_channel(c: &ChannelInfo) -> Vec<u8> {
    seal(
        &rec::StoredChannel {
            title: c.title.clone(),
            epoch: c.epoch,
            head_seq: c.head_seq,
            oldest_seq: c.oldest_seq,
            created_at_ms: c.created_at_ms,
        }
        .encode_to_vec(),
    )
}

pub(super) fn decode_channel(id: &str, bytes: &[u8]) -> Result<ChannelInfo, StoreError> {
    let damaged = |e: &dyn std::fmt::Display| {
        StoreError::Damaged(format!("channel record {id:?} is damaged: {e}"))
    };
    let body = unseal(bytes).map_err(|e| damaged(&e))?;
    let r = rec::StoredChannel::decode(body).map_err(|e| damaged(&e))?;
    let id = ChannelId::parse(id).map_err(|e| damaged(&e))?;
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
    seal(
        &rec::StoredPost {
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
        .encode_to_vec(),
    )
}

pub(super) fn decode_post(
    channel: &ChannelId,
    epoch: u64,
    seq: u64,
    bytes: &[u8],
) -> Result<Post, StoreError> {
    let damaged = |e: &dyn std::fmt::Display| {
        StoreError::Damaged(format!("post {channel}/{seq} is damaged: {e}"))
    };
    let body = unseal(bytes).map_err(|e| damaged(&e))?;
    let r = rec::StoredPost::decode(body).map_err(|e| damaged(&e))?;
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
        damaged: false,
    })
}

/// The tombstone that stands in for a damaged post: delivery goes on past
/// it, and the follower is told (`damaged`).
pub(super) fn damaged_post(channel: &ChannelId, epoch: u64, seq: u64) -> Post {
    Post {
        channel: channel.clone(),
        seq,
        epoch,
        id: String::new(),
        text: String::new(),
        media: Vec::new(),
        created_at_ms: 0,
        edited_at_ms: 0,
        deleted: true,
        damaged: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_catch_flipped_bits_and_legacy_records_still_read() {
        let ch = ChannelId::parse("c").unwrap();
        let p = damaged_post(&ch, 1, 7);
        let p = Post {
            text: "hello".into(),
            deleted: false,
            damaged: false,
            created_at_ms: 5,
            ..p
        };
        let mut rec = encode_post(&p);
        assert_eq!(decode_post(&ch, 1, 7, &rec).unwrap(), p);
        for i in 0..rec.len() {
            for bit in 0..8 {
                rec[i] ^= 1 << bit;
                assert!(
                    decode_post(&ch, 1, 7, &rec).is_err() || i == 0,
                    "flip at byte {i} bit {bit} went unnoticed"
                );
                rec[i] ^= 1 << bit;
            }
        }
        // A record written before seals existed.
        let legacy = unseal(&rec).unwrap().to_vec();
        assert_eq!(decode_post(&ch, 1, 7, &legacy).unwrap(), p);
        assert!(matches!(
            decode_post(&ch, 1, 7, &[SEALED, 1, 2]),
            Err(StoreError::Damaged(_))
        ));
    }
}
