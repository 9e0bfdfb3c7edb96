//! When a follower token expires, read from its `exp` claim without checking
//! the signature: the client only uses it to decide when to ask the
//! application for a fresh token (the server does the real check).

use serde::Deserialize;

/// The `exp` of a token, read without checking anything (for a client
/// deciding when to refresh its own token).
pub(crate) fn unverified_expiry(token: &str) -> Option<i64> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    #[derive(Deserialize)]
    struct Exp {
        exp: i64,
    }
    serde_json::from_slice::<Exp>(&bytes).ok().map(|e| e.exp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn token_with(payload: &str) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!("{}.{}.sig", b64.encode(b"{}"), b64.encode(payload))
    }

    #[test]
    fn reads_exp_and_refuses_junk() {
        assert_eq!(
            unverified_expiry(&token_with(r#"{"sub":"a","exp":42}"#)),
            Some(42)
        );
        assert_eq!(unverified_expiry(&token_with(r#"{"sub":"a"}"#)), None);
        assert_eq!(unverified_expiry("not a token"), None);
        assert_eq!(unverified_expiry("a.!!!.c"), None);
    }
}
