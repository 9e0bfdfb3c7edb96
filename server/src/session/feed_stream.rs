//! The follower's feed stream, both ways the writer reaches it: as a
//! [`FeedSink`] for the writer task (catch-up, gap fill: the transport's
//! bounded feed queue takes the frames, and the writer waits for room when
//! the follower is slow), and as the transport's [`FeedSource`] for the live
//! path (the event loop pulls live frames through the writer's
//! [`LiveFeed`] on its own thread).

use std::sync::{Arc, Weak};

use bytes::Bytes;

use crate::feed::{FeedSink, LiveFeed};
use crate::transport::{FeedSource, FeedStream};

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

/// The writer's live path as the transport's feed source. Holds it weakly:
/// the writer task owns it, so nothing here keeps a finished session alive
/// (the outbox's waker holds the connection, the connection holds this).
pub struct LivePull(pub Weak<LiveFeed>);

impl LivePull {
    /// A source pulling through `live`.
    pub fn new(live: &Arc<LiveFeed>) -> LivePull {
        LivePull(Arc::downgrade(live))
    }
}

impl FeedSource for LivePull {
    fn pull(&self, room: usize, out: &mut Vec<Bytes>, datagrams: &mut Vec<Bytes>) -> bool {
        self.0
            .upgrade()
            .is_some_and(|live| live.pull(room, out, datagrams))
    }
}
