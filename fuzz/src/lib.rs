//! Oracles shared by the fuzz targets: independent re-implementations of what the handshake
//! must have checked, used to judge every `Ok` the server's code returns.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;

/// The HS256 secret every fuzz target configures (`fuzz/seeds.py` signs its tokens with it).
pub const SECRET: &[u8] = b"courier-fuzz-secret";

/// Whether `COURIER_FUZZ_VERBOSE` is set: the targets then print each input's outcome, which
/// is how to see what a corpus or a reproducer does (`.../client_frame corpus/client_frame -runs=0`).
pub fn verbose() -> bool {
    static VERBOSE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os("COURIER_FUZZ_VERBOSE").is_some())
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock before 1970")
        .as_secs()
}

/// HMAC-SHA256 of `message` under `key`.
pub fn hs256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

/// Base64url without padding, as JWTs use.
pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A compact JWT over raw header and claims bytes (not necessarily JSON), signed HS256.
pub fn sign_raw(header: &[u8], claims: &[u8], key: &[u8]) -> String {
    let message = format!("{}.{}", b64(header), b64(claims));
    let signature = hs256(key, message.as_bytes());
    format!("{message}.{}", b64(&signature))
}

/// The query-string decoding the protocol documents: `%XX` is a byte, `+` a space, anything
/// else (including a malformed escape) is kept; the result is read as lossy UTF-8.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: Option<&u8>| match b {
        Some(b @ b'0'..=b'9') => Some(b - b'0'),
        Some(b @ b'a'..=b'f') => Some(b - b'a' + 10),
        Some(b @ b'A'..=b'F') => Some(b - b'A' + 10),
        _ => None,
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2)))
        {
            out.push(hi * 16 + lo);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first value of query parameter `name`, decoded.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|(k, _)| percent_decode(k) == name)
        .map(|(_, v)| percent_decode(v))
}

/// What an accepted JWT must look like, checked without jsonwebtoken: three base64url parts, a
/// JSON header naming HS256, a valid HS256 signature under [`SECRET`], and JSON claims whose
/// `sub`/`dev` are the accepted user and device, with `exp` not past and `nbf` not future.
/// Panics (a fuzz finding) when the accepted token breaks any of it.
pub fn assert_token_deserved_acceptance(token: &str, user: &str, device: &str) {
    let (message, signature) = token.rsplit_once('.').expect("accepted token has 3 parts");
    let (header, payload) = message
        .rsplit_once('.')
        .expect("accepted token has 3 parts");
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .expect("accepted signature is base64url");
    assert_eq!(
        signature,
        hs256(SECRET, message.as_bytes()),
        "accepted a token whose signature is not HS256 under the secret: {token:?}"
    );
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(header)
            .expect("accepted header is base64url"),
    )
    .expect("accepted header is JSON");
    assert_eq!(
        header.get("alg").and_then(Value::as_str),
        Some("HS256"),
        "accepted a token whose alg is not HS256: {header}"
    );
    // Lossy: serde_json skips the strings of claims nobody reads without checking their UTF-8,
    // so jsonwebtoken accepts a signed token with invalid UTF-8 in an unknown claim
    // (regressions/auth_jwt_claims/invalid-utf8-in-unread-claim); the claims that matter are
    // typed `String`s and are checked.
    let payload = URL_SAFE_NO_PAD
        .decode(payload)
        .expect("accepted payload is base64url");
    let claims: Value =
        serde_json::from_str(&String::from_utf8_lossy(&payload)).expect("accepted claims are JSON");
    assert_eq!(
        claims.get("sub").and_then(Value::as_str),
        Some(user),
        "{claims}"
    );
    assert_eq!(
        claims.get("dev").and_then(Value::as_str),
        Some(device),
        "{claims}"
    );
    let now = now_secs() as f64;
    let exp = claims
        .get("exp")
        .and_then(Value::as_f64)
        .expect("accepted a token without a numeric exp");
    assert!(
        exp >= now - 2.0,
        "accepted an expired token: exp {exp}, now {now}"
    );
    if let Some(nbf) = claims.get("nbf").filter(|v| !v.is_null()) {
        let nbf = nbf
            .as_f64()
            .expect("accepted a token with a non-numeric nbf");
        assert!(
            nbf <= now + 2.0,
            "accepted a token not valid yet: nbf {nbf}, now {now}"
        );
    }
}
