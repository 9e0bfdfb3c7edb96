//! Stable error codes shared by the wire protocol (Error frames, connection
//! close codes) and the HTTP API (the `code` field of error bodies).
//!
//! Numbers never change meaning once released; add new ones at the end.

use std::fmt;

/// A stable, machine-readable error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    /// A frame could not be decoded, or carried invalid fields.
    MalformedFrame = 1,
    /// A frame's declared length exceeds the maximum frame size.
    FrameTooLarge = 2,
    /// The first control frame was not Hello, or Hello came twice.
    HelloRequired = 3,
    /// The token is missing, malformed or its signature is wrong.
    Unauthenticated = 4,
    /// The token has expired.
    TokenExpired = 5,
    /// The channel does not exist.
    UnknownChannel = 6,
    /// The caller may not do this (wrong key, channel not allowed by token).
    Forbidden = 7,
    /// Too many channels followed on one connection.
    TooManyFollows = 8,
    /// The follower lagged too often in a short window and was disconnected.
    LaggingTooOften = 9,
    /// The server is shutting down.
    ShuttingDown = 10,
    /// An internal error; the request may be retried.
    Internal = 11,
    /// A request field is invalid (empty text, bad channel id, ...).
    InvalidArgument = 12,
    /// The resource already exists.
    AlreadyExists = 13,
    /// The resource (other than a channel) does not exist.
    NotFound = 14,
    /// Too many requests; retry later.
    RateLimited = 15,
    /// The server is at its connection limit.
    Overloaded = 16,
    /// The follower id has too many connections open at once.
    TooManyConnections = 17,
    /// The API key was revoked.
    KeyRevoked = 18,
    /// HTTP: the request (its body, or the answer) took longer than the
    /// server's request timeout.
    RequestTimeout = 19,
    /// The storage cannot take writes right now (say, the disk is full);
    /// the server recovers by itself once the cause is gone. Retry later.
    StorageUnavailable = 20,
    /// The stored record is damaged and cannot be served (reported by
    /// `herald check`).
    DataDamaged = 21,
}

impl ErrorCode {
    /// The numeric code carried on the wire.
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    /// The snake_case name used in HTTP error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::HelloRequired => "hello_required",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::UnknownChannel => "unknown_channel",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TooManyFollows => "too_many_follows",
            ErrorCode::LaggingTooOften => "lagging_too_often",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::NotFound => "not_found",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::KeyRevoked => "key_revoked",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::StorageUnavailable => "storage_unavailable",
            ErrorCode::DataDamaged => "data_damaged",
        }
    }

    /// Maps a wire number back to a code; `None` for numbers this build does not know.
    pub fn from_u32(n: u32) -> Option<ErrorCode> {
        use ErrorCode::*;
        const ALL: [ErrorCode; 21] = [
            MalformedFrame,
            FrameTooLarge,
            HelloRequired,
            Unauthenticated,
            TokenExpired,
            UnknownChannel,
            Forbidden,
            TooManyFollows,
            LaggingTooOften,
            ShuttingDown,
            Internal,
            InvalidArgument,
            AlreadyExists,
            NotFound,
            RateLimited,
            Overloaded,
            TooManyConnections,
            KeyRevoked,
            RequestTimeout,
            StorageUnavailable,
            DataDamaged,
        ];
        ALL.into_iter().find(|c| c.as_u32() == n)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.as_str(), self.as_u32())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for n in 0..64 {
            if let Some(c) = ErrorCode::from_u32(n) {
                assert_eq!(c.as_u32(), n);
                assert!(seen.insert(c.as_str()), "duplicate name {}", c.as_str());
            }
        }
        assert_eq!(seen.len(), 21);
        assert_eq!(ErrorCode::from_u32(0), None);
    }
}
