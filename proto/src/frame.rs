//! Framing on QUIC streams: each protobuf message is prefixed by its length as
//! a varint. [`encode_frame`] builds one frame; [`FrameReader`] reads frames
//! from any `AsyncRead`, rejecting a declared length above its maximum before
//! allocating for it.

pub use crate::reader::{FrameError, FrameReader};

use bytes::{Bytes, BytesMut};
use prost::Message;

/// Default maximum size of one control frame the server accepts, in bytes.
pub const DEFAULT_MAX_CONTROL_FRAME: usize = 16 * 1024;
/// Default maximum size of one feed frame the client accepts, in bytes.
pub const DEFAULT_MAX_FEED_FRAME: usize = 256 * 1024;

/// Encodes `msg` as one length-delimited frame.
pub fn encode_frame<M: Message>(msg: &M) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(len + prost::length_delimiter_len(len));
    if msg.encode_length_delimited(&mut buf).is_err() {
        unreachable!("buffer was sized by encoded_len");
    }
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1 as pb;

    #[tokio::test]
    async fn round_trip_many_frames() {
        let mut wire = Vec::new();
        for i in 0..100u64 {
            let f = pb::ClientFrame {
                request_id: i,
                kind: Some(pb::client_frame::Kind::Unfollow(pb::Unfollow {
                    channel: "c".repeat(i as usize % 50 + 1),
                })),
            };
            wire.extend_from_slice(&encode_frame(&f));
        }
        let mut r = FrameReader::new(&wire[..], 1024);
        for i in 0..100u64 {
            let f: pb::ClientFrame = r.read_frame().await.unwrap().unwrap();
            assert_eq!(f.request_id, i);
        }
        assert!(r.read_frame::<pb::ClientFrame>().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversized_frame_is_rejected_before_reading_it() {
        // Declares 1 MiB but sends nothing more.
        let mut wire = Vec::new();
        prost::encode_length_delimiter(1 << 20, &mut wire).unwrap();
        let mut r = FrameReader::new(&wire[..], 1024);
        match r.read_frame::<pb::ClientFrame>().await {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, 1 << 20);
                assert_eq!(max, 1024);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn garbage_is_malformed_and_truncation_is_reported() {
        let wire = [3u8, 0xff, 0xff, 0xff];
        let mut r = FrameReader::new(&wire[..], 1024);
        assert!(matches!(
            r.read_frame::<pb::ClientFrame>().await,
            Err(FrameError::Malformed(_))
        ));
        let wire = [10u8, 1, 2];
        let mut r = FrameReader::new(&wire[..], 1024);
        assert!(matches!(
            r.read_frame::<pb::ClientFrame>().await,
            Err(FrameError::Truncated)
        ));
        // A varint that never ends.
        let wire = [0xffu8; 11];
        let mut r = FrameReader::new(&wire[..], 1024);
        assert!(matches!(
            r.read_frame::<pb::ClientFrame>().await,
            Err(FrameError::Malformed(_))
        ));
    }
}
