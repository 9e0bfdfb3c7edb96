//! Reads length-delimited protobuf frames from a byte stream with a bounded
//! buffer: at most `max_frame` bytes plus a 10-byte header are ever held.

use bytes::{Buf, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The declared length is above the reader's maximum (nothing of the
    /// frame was read or allocated).
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// The declared length.
        len: u64,
        /// The reader's maximum.
        max: usize,
    },
    /// The length prefix or the message could not be decoded.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended inside a frame.
    #[error("stream ended in the middle of a frame")]
    Truncated,
    /// The stream failed.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads frames from `R`, one at a time.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    max_frame: usize,
    /// Capacity kept while waiting for the next frame with nothing buffered.
    idle_capacity: usize,
}

/// Outcome of parsing the varint header from the buffered bytes.
enum Header {
    Incomplete,
    Done { len: u64, header_len: usize },
}

fn parse_header(buf: &[u8]) -> Result<Header, FrameError> {
    let mut value: u64 = 0;
    for (i, b) in buf.iter().take(10).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Header::Done {
                len: value,
                header_len: i + 1,
            });
        }
    }
    if buf.len() >= 10 {
        return Err(FrameError::Malformed(
            "length prefix is not a valid varint".into(),
        ));
    }
    Ok(Header::Incomplete)
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Reads from `inner`, rejecting frames larger than `max_frame` bytes.
    pub fn new(inner: R, max_frame: usize) -> Self {
        let idle_capacity = 4096.min(max_frame + 10);
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(idle_capacity),
            max_frame,
            idle_capacity,
        }
    }

    /// Holds at most `bytes` of buffer while idle between frames (a bigger
    /// frame still gets the room it needs while it is read). For streams that
    /// mostly wait, like a server's many control streams, where the default
    /// 4 KiB per stream adds up.
    pub fn with_idle_capacity(mut self, bytes: usize) -> Self {
        self.idle_capacity = bytes.max(16);
        if self.buf.is_empty() {
            self.buf = BytesMut::with_capacity(self.idle_capacity);
        }
        self
    }

    /// The wrapped stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Reads the next frame. `Ok(None)` at a clean end of stream (between frames).
    pub async fn read_frame<M: Message + Default>(&mut self) -> Result<Option<M>, FrameError> {
        loop {
            if let Header::Done { len, header_len } = parse_header(&self.buf)? {
                if len > self.max_frame as u64 {
                    return Err(FrameError::TooLarge {
                        len,
                        max: self.max_frame,
                    });
                }
                let total = header_len + len as usize;
                if self.buf.len() >= total {
                    self.buf.advance(header_len);
                    let body = self.buf.split_to(len as usize);
                    return M::decode(body)
                        .map(Some)
                        .map_err(|e| FrameError::Malformed(e.to_string()));
                }
                self.buf.reserve(total - self.buf.len());
            } else {
                if self.buf.is_empty() && self.buf.capacity() > self.idle_capacity {
                    // A big frame grew the buffer: give it back before waiting.
                    self.buf = BytesMut::with_capacity(self.idle_capacity);
                }
                self.buf.reserve(16);
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode_frame;
    use crate::v1 as pb;

    #[tokio::test]
    async fn idle_capacity_is_given_back_after_a_big_frame() {
        let big = pb::ClientFrame {
            request_id: 1,
            kind: Some(pb::client_frame::Kind::Unfollow(pb::Unfollow {
                channel: "c".repeat(3000),
            })),
        };
        let small = pb::ClientFrame {
            request_id: 2,
            kind: None,
        };
        let mut wire = encode_frame(&big).to_vec();
        wire.extend_from_slice(&encode_frame(&small));
        let mut r = FrameReader::new(&wire[..], 16 * 1024).with_idle_capacity(64);
        assert!(r.buf.capacity() <= 64);
        let f: pb::ClientFrame = r.read_frame().await.unwrap().unwrap();
        assert_eq!(f.request_id, 1);
        let f: pb::ClientFrame = r.read_frame().await.unwrap().unwrap();
        assert_eq!(f.request_id, 2);
        assert!(r.read_frame::<pb::ClientFrame>().await.unwrap().is_none());
        assert!(r.buf.capacity() <= 64, "kept {} bytes", r.buf.capacity());
    }
}
