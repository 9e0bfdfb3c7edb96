//! The loop's connections by quinn-proto handle, stored in fixed chunks of
//! [`CHUNK`] slots.
//!
//! An entry is kilobytes (quinn-proto's connection state), so neither of the
//! obvious layouts holds up at 100,000 connections: one growing `Vec` of
//! entries moves every connection when it doubles (about 400 MB past 65,536,
//! which stalled the loop long enough for the handshakes in flight to time
//! out), and a `Box` per entry rounds each one up to the allocator's next size
//! class (about 1 KiB more per idle follower). Chunks are allocated once, as
//! needed, and never move; handles are dense (quinn-proto reuses freed ones),
//! so memory follows the most connections held at once.

/// Slots per chunk (a chunk of entries is a few MiB).
pub(super) const CHUNK: usize = 512;

/// See the module docs.
pub(super) struct Table<T> {
    chunks: Vec<Box<[Option<T>]>>,
}

impl<T> Table<T> {
    pub(super) fn new() -> Table<T> {
        Table { chunks: Vec::new() }
    }

    /// Slots there is room for (a multiple of [`CHUNK`]).
    pub(super) fn capacity(&self) -> usize {
        self.chunks.len() * CHUNK
    }

    pub(super) fn get_mut(&mut self, h: usize) -> Option<&mut T> {
        self.chunks.get_mut(h / CHUNK)?[h % CHUNK].as_mut()
    }

    /// Puts `value` in slot `h` (adding chunks up to it), returning what was there.
    pub(super) fn insert(&mut self, h: usize, value: T) -> Option<T> {
        while self.chunks.len() <= h / CHUNK {
            self.chunks.push(
                (0..CHUNK)
                    .map(|_| None)
                    .collect::<Vec<_>>()
                    .into_boxed_slice(),
            );
        }
        self.chunks[h / CHUNK][h % CHUNK].replace(value)
    }

    pub(super) fn take(&mut self, h: usize) -> Option<T> {
        self.chunks.get_mut(h / CHUNK)?[h % CHUNK].take()
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.chunks.iter_mut().flat_map(|c| c.iter_mut().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_across_chunks_keep_their_values_and_addresses() {
        let mut t: Table<u64> = Table::new();
        assert_eq!(t.get_mut(0), None);
        assert_eq!(t.insert(3, 30), None);
        let first: *const u64 = t.get_mut(3).unwrap();
        // Growing by many chunks moves nothing already stored.
        assert_eq!(t.insert(5 * CHUNK + 1, 51), None);
        assert_eq!(t.capacity(), 6 * CHUNK);
        assert_eq!(t.get_mut(3).map(|v| v as *const u64), Some(first));
        assert_eq!(t.insert(3, 31), Some(30));
        assert_eq!(t.get_mut(CHUNK), None);
        let mut all: Vec<u64> = t.iter_mut().map(|v| *v).collect();
        all.sort();
        assert_eq!(all, vec![31, 51]);
        assert_eq!(t.take(3), Some(31));
        assert_eq!(t.take(3), None);
        assert_eq!(t.take(100 * CHUNK), None);
        assert_eq!(t.iter_mut().count(), 1);
    }
}
