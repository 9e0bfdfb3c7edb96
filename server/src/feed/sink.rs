//! Where a feed writer's frames go: a [`FeedSink`]. The session gives the
//! writer the follower's QUIC feed stream; tests give it a [`MemorySink`],
//! so the delivery logic can be driven directly, with no network.

use std::future::Future;
use std::io;

use bytes::Bytes;
use tokio::sync::mpsc;

/// A byte stream of feed frames to one follower.
pub trait FeedSink: Send {
    /// Writes every chunk, in order; resolves when all are accepted by the
    /// transport (a slow follower makes this wait: that is backpressure).
    fn write_all_chunks(
        &mut self,
        chunks: &mut [Bytes],
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// No more frames will follow.
    fn finish(&mut self);
}

/// An in-memory sink: every chunk becomes one message on a bounded channel,
/// so a test can read frames one by one, and a test that stops reading makes
/// the writer wait exactly as a follower that stops reading would.
#[derive(Debug)]
pub struct MemorySink {
    tx: Option<mpsc::Sender<Bytes>>,
}

impl MemorySink {
    /// A sink holding at most `capacity` unread chunks, and its reading end.
    pub fn new(capacity: usize) -> (MemorySink, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (MemorySink { tx: Some(tx) }, rx)
    }
}

impl MemorySink {
    /// Another sender into the same channel (for a test that writes frames
    /// from outside the writer too, as the transport's live path does);
    /// `None` once finished.
    pub fn sender(&self) -> Option<mpsc::Sender<Bytes>> {
        self.tx.clone()
    }
}

impl FeedSink for MemorySink {
    async fn write_all_chunks(&mut self, chunks: &mut [Bytes]) -> io::Result<()> {
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "sink finished"))?;
        for c in chunks.iter_mut() {
            tx.send(std::mem::take(c))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "reader gone"))?;
        }
        Ok(())
    }

    fn finish(&mut self) {
        self.tx = None;
    }
}
