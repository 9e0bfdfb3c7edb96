//! A non-async frame decoder for a stream read in chunks from quinn-proto:
//! bytes go in as they arrive, whole frames (a varint length, then the
//! protobuf body) come out. And [`decode_post`], for a live datagram: one
//! such frame, a `Post` (docs/protocol.md §8.5).
//!
//! Bound: a frame whose declared length is above `max` is refused from its
//! header, before its body is read, and the caller never pushes more than
//! [`FrameBuf::room`] bytes, so at most one frame plus its header
//! (`max + 10` bytes) is ever held. An idle buffer gives back capacity
//! beyond [`IDLE_CAPACITY`].

use bytes::{Buf, BytesMut};
use herald_proto::v1 as pb;
use herald_proto::FrameError;
use prost::Message;

/// The longest varint length prefix.
const MAX_HEADER: usize = 10;
/// Capacity an empty buffer may keep (an idle follower holds little).
const IDLE_CAPACITY: usize = 1024;

pub(super) struct FrameBuf {
    buf: BytesMut,
    max: usize,
}

impl FrameBuf {
    pub(super) fn new(max: usize) -> FrameBuf {
        FrameBuf {
            buf: BytesMut::new(),
            max,
        }
    }

    /// Bytes that may be pushed now.
    pub(super) fn room(&self) -> usize {
        (self.max + MAX_HEADER).saturating_sub(self.buf.len())
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Appends bytes read from the stream (at most [`room`](Self::room)).
    pub(super) fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed.
    pub(super) fn next<M: Message + Default>(&mut self) -> Result<Option<M>, FrameError> {
        let mut len: u64 = 0;
        let mut header = None;
        for (i, b) in self.buf.iter().take(MAX_HEADER).enumerate() {
            len |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                header = Some(i + 1);
                break;
            }
        }
        let Some(header) = header else {
            if self.buf.len() >= MAX_HEADER {
                return Err(FrameError::Malformed(
                    "length prefix is not a valid varint".into(),
                ));
            }
            self.shrink_if_idle();
            return Ok(None);
        };
        if len > self.max as u64 {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        let total = header + len as usize;
        if self.buf.len() < total {
            return Ok(None);
        }
        self.buf.advance(header);
        let body = self.buf.split_to(len as usize);
        let msg = M::decode(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
        self.shrink_if_idle();
        Ok(Some(msg))
    }

    fn shrink_if_idle(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > IDLE_CAPACITY {
            self.buf = BytesMut::new();
        }
    }
}

/// The `Post` a live datagram carries: exactly one frame, its length
/// prefix matching the datagram and at most `max`, of kind `Post`.
/// Anything else is an error (the datagram is then counted and dropped).
pub(super) fn decode_post(datagram: &[u8], max: usize) -> Result<pb::Post, FrameError> {
    let mut body = datagram;
    let len = prost::decode_length_delimiter(&mut body)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if len > max {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max,
        });
    }
    if len != body.len() {
        return Err(FrameError::Malformed(format!(
            "datagram declares a frame of {len} bytes and carries {}",
            body.len()
        )));
    }
    match pb::FeedFrame::decode(body).map_err(|e| FrameError::Malformed(e.to_string()))? {
        pb::FeedFrame {
            kind: Some(pb::feed_frame::Kind::Post(p)),
        } => Ok(p),
        _ => Err(FrameError::Malformed(
            "a datagram carries a feed frame other than a Post".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_proto::frame::encode_frame;

    fn frame(id: u64) -> Vec<u8> {
        encode_frame(&pb::ServerFrame {
            request_id: id,
            kind: None,
        })
        .to_vec()
    }

    #[test]
    fn frames_split_anywhere_come_out_whole() {
        let mut wire = Vec::new();
        for i in 1..50u64 {
            wire.extend(frame(i * 1000));
        }
        for step in [1, 2, 3, 7, 64] {
            let mut f = FrameBuf::new(1024);
            let mut got = Vec::new();
            for chunk in wire.chunks(step) {
                assert!(chunk.len() <= f.room());
                f.push(chunk);
                while let Some(m) = f.next::<pb::ServerFrame>().unwrap() {
                    got.push(m.request_id);
                }
            }
            assert_eq!(got, (1..50u64).map(|i| i * 1000).collect::<Vec<_>>());
            assert!(f.is_empty());
        }
    }

    #[test]
    fn oversized_and_garbage_are_refused() {
        let mut f = FrameBuf::new(100);
        let mut wire = Vec::new();
        prost::encode_length_delimiter(1 << 20, &mut wire).unwrap();
        f.push(&wire);
        assert!(matches!(
            f.next::<pb::ServerFrame>(),
            Err(FrameError::TooLarge { .. })
        ));
        let mut f = FrameBuf::new(100);
        f.push(&[0xff; 11]);
        assert!(matches!(
            f.next::<pb::ServerFrame>(),
            Err(FrameError::Malformed(_))
        ));
        let mut f = FrameBuf::new(100);
        f.push(&[3, 0xff, 0xff, 0xff]);
        assert!(matches!(
            f.next::<pb::ServerFrame>(),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn a_datagram_is_one_post_frame_or_refused() {
        let post = pb::Post {
            channel: "c".into(),
            seq: 7,
            epoch: 1,
            text: "hi".into(),
            ..Default::default()
        };
        let wire = encode_frame(&pb::FeedFrame {
            kind: Some(pb::feed_frame::Kind::Post(post.clone())),
        })
        .to_vec();
        assert_eq!(decode_post(&wire, 1024).unwrap(), post);
        // Too large for the limit, truncated, trailing bytes, empty, junk.
        assert!(matches!(
            decode_post(&wire, 4),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(decode_post(&wire[..wire.len() - 1], 1024).is_err());
        let mut longer = wire.clone();
        longer.push(0);
        assert!(decode_post(&longer, 1024).is_err());
        assert!(decode_post(&[], 1024).is_err());
        assert!(decode_post(&[0xff; 12], 1024).is_err());
        assert!(decode_post(&[2, 0xff, 0xff], 1024).is_err());
        // A valid frame that is not a post.
        let head = encode_frame(&pb::FeedFrame {
            kind: Some(pb::feed_frame::Kind::Head(pb::Head {
                channel: "c".into(),
                epoch: 1,
                seq: 3,
            })),
        });
        assert!(decode_post(&head, 1024).is_err());
    }
}
