//! Decoding one live datagram (`docs/protocol.md` §8.5): exactly one feed
//! frame as on the feed stream (a varint length, then a `FeedFrame`), and
//! only a `Post`. Anything else is an error for the caller to count and
//! drop; nothing here panics on what the network sent.

use herald_proto::v1 as pb;
use prost::Message;

/// Why a datagram was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DatagramError {
    /// The length prefix is not a varint, or does not match the datagram.
    #[error("bad length prefix: {0}")]
    Length(String),
    /// Larger than the client's maximum feed frame.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// The declared length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The body is not a `FeedFrame`.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A feed frame other than `Post` (only posts come as datagrams).
    #[error("not a post")]
    NotAPost,
}

/// The `Post` that `datagram` carries; `max_frame` bounds its body.
pub(crate) fn decode_post(datagram: &[u8], max_frame: usize) -> Result<pb::Post, DatagramError> {
    let mut buf = datagram;
    let len = prost::decode_length_delimiter(&mut buf)
        .map_err(|e| DatagramError::Length(e.to_string()))?;
    if len > max_frame {
        return Err(DatagramError::TooLarge {
            len,
            max: max_frame,
        });
    }
    if len != buf.len() {
        return Err(DatagramError::Length(format!(
            "declares {len} bytes, carries {}",
            buf.len()
        )));
    }
    let frame = pb::FeedFrame::decode(buf).map_err(|e| DatagramError::Malformed(e.to_string()))?;
    match frame.kind {
        Some(pb::feed_frame::Kind::Post(p)) => Ok(p),
        _ => Err(DatagramError::NotAPost),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_proto::encode_frame;

    fn post(seq: u64) -> pb::Post {
        pb::Post {
            channel: "news".into(),
            seq,
            epoch: 1,
            id: "abc".into(),
            text: "hello".into(),
            ..Default::default()
        }
    }

    fn frame(kind: pb::feed_frame::Kind) -> Vec<u8> {
        encode_frame(&pb::FeedFrame { kind: Some(kind) }).to_vec()
    }

    #[test]
    fn a_post_frame_decodes() {
        let d = frame(pb::feed_frame::Kind::Post(post(7)));
        assert_eq!(decode_post(&d, 1024), Ok(post(7)));
    }

    #[test]
    fn everything_else_is_refused() {
        let good = frame(pb::feed_frame::Kind::Post(post(7)));
        // Empty, truncated, trailing bytes, a length beyond the datagram.
        assert!(matches!(
            decode_post(&[], 1024),
            Err(DatagramError::Length(_))
        ));
        assert!(matches!(
            decode_post(&good[..good.len() - 1], 1024),
            Err(DatagramError::Length(_))
        ));
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(
            decode_post(&long, 1024),
            Err(DatagramError::Length(_))
        ));
        // A varint that never ends.
        assert!(matches!(
            decode_post(&[0xff; 11], 1024),
            Err(DatagramError::Length(_))
        ));
        // Over the maximum.
        assert!(matches!(
            decode_post(&good, 4),
            Err(DatagramError::TooLarge { max: 4, .. })
        ));
        // Garbage body.
        assert!(matches!(
            decode_post(&[3, 0xff, 0xff, 0xff], 1024),
            Err(DatagramError::Malformed(_))
        ));
        // Other kinds, and no kind.
        let head = frame(pb::feed_frame::Kind::Head(pb::Head {
            channel: "news".into(),
            epoch: 1,
            seq: 3,
        }));
        assert_eq!(decode_post(&head, 1024), Err(DatagramError::NotAPost));
        let none = encode_frame(&pb::FeedFrame { kind: None }).to_vec();
        assert_eq!(decode_post(&none, 1024), Err(DatagramError::NotAPost));
    }
}
