//! The follower's feed stream as a [`FeedSink`]: the feed writer hands it
//! every frame drained at once; the transport's bounded feed queue takes
//! them (the writer waits for room when the follower is slow), and the
//! event loop packs them into as few packets as fit.

use bytes::Bytes;

use crate::feed::FeedSink;
use crate::transport::FeedStream;

/// The server-opened unidirectional feed stream of one session.
pub struct QuicFeed(pub FeedStream);

impl FeedSink for QuicFeed {
    async fn write_all_chunks(&mut self, chunks: &mut [Bytes]) -> std::io::Result<()> {
        self.0
            .write_all(chunks)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "feed stream closed"))
    }

    fn finish(&mut self) {
        self.0.finish();
    }
}
