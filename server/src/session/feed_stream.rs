//! The follower's QUIC feed stream as a [`FeedSink`]: the feed writer hands
//! it every frame drained at once, and quinn packs them into as few packets
//! as fit.

use bytes::Bytes;

use crate::feed::FeedSink;

/// The server-opened unidirectional feed stream of one session.
pub struct QuicFeed(pub quinn::SendStream);

impl FeedSink for QuicFeed {
    async fn write_all_chunks(&mut self, chunks: &mut [Bytes]) -> std::io::Result<()> {
        self.0
            .write_all_chunks(chunks)
            .await
            .map_err(std::io::Error::from)
    }

    fn finish(&mut self) {
        // The stream may already be reset by the peer: nothing more to do then.
        let _ = self.0.finish();
    }
}
