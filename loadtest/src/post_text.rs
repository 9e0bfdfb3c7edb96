//! What a load-test post's text carries: its send time in microseconds since
//! the Unix epoch, then its number, padded to the requested size. The
//! publisher writes it; followers read the time back to measure
//! publish-to-delivery latency.

/// Smallest post size: room for the timestamp and the post number.
pub const MIN_SIZE: usize = 32;
/// Largest post size the server accepts.
pub const MAX_SIZE: usize = herald_server::model::MAX_POST_TEXT_BYTES;

/// The text of post `index`, sent at `sent_us`, `size` bytes long.
pub fn post_text(sent_us: u64, index: usize, size: usize) -> String {
    let mut s = format!("{sent_us} {index} ");
    if s.len() < size {
        s.extend(std::iter::repeat_n('x', size - s.len()));
    }
    s
}

/// The send time carried by a post's text.
pub fn parse_send_time(text: &str) -> Option<u64> {
    text.split(' ').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_size_and_time() {
        let t = post_text(1_700_000_000_000_000, 42, 256);
        assert_eq!(t.len(), 256);
        assert_eq!(parse_send_time(&t), Some(1_700_000_000_000_000));
        assert!(post_text(1, 2, 3).len() >= 3);
    }
}
