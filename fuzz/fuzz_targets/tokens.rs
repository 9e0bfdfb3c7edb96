//! Token parsing: a follower's JWT as the session verifies it (HS256 with
//! the server's secret), and a brand API key as the HTTP API parses it
//! (`hk_<id>_<secret>`). Arbitrary text must be refused, never panic, and
//! never be accepted.

#![no_main]

use std::sync::OnceLock;

use herald_server::auth::TokenVerifier;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static VERIFIER: OnceLock<TokenVerifier> = OnceLock::new();
    let v = VERIFIER.get_or_init(|| {
        TokenVerifier::hs256(b"fuzzing secret, never used to sign anything")
            .with_issuer(Some("https://id.example".into()))
            .with_audience(Some("herald".into()))
    });
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    assert!(
        v.verify(text).is_err(),
        "a token forged from nothing verified"
    );
    if let Some(id) = herald_server::tenancy::key_id(text) {
        assert_eq!(id.len(), 16);
    }
});
