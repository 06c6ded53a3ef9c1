//! Handshake credential parser, token half: JWTs whose header and claims bytes are fuzzed and
//! which are then *correctly signed* (or signed with a wrong key), so the fuzzer reaches the
//! claim checks behind the signature instead of dying on it.
//!
//! Input: one flag byte, then the raw header bytes, a `\n`, the raw claims bytes.
//! Flags: bit 0 sign with the right key, bit 1 send as `Authorization: Bearer` (else
//! `?token=`), bit 2 dev mode, bit 3 also pass `user=`/`device=` query parameters naming
//! someone else.
//!
//! Invariants checked on `Ok`: the right key signed it, the header's alg is HS256, the claims
//! name exactly the accepted user and device (valid ids), `exp` is not past and `nbf` not
//! future; the impostor query parameters never win.
#![no_main]

use courier::auth::Authenticator;
use courier::ids::is_valid_id;
use courier_fuzz::{SECRET, assert_token_deserved_acceptance, sign_raw};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (header, claims) = match rest.iter().position(|b| *b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &b""[..]),
    };
    let right_key = flags & 1 != 0;
    let key: &[u8] = if right_key { SECRET } else { b"not-the-secret" };
    let token = sign_raw(header, claims, key);
    let dev = flags & 4 != 0;
    let impostor = flags & 8 != 0;

    let authorization = format!("Bearer {token}");
    let mut query = String::new();
    if impostor {
        query.push_str("user=mallory&device=evil&");
    }
    let via_header = flags & 2 != 0;
    if !via_header {
        query.push_str("token=");
        query.push_str(&token);
    }
    let auth = Authenticator::new(Some(SECRET), dev);
    let result = auth.authenticate(
        (!query.is_empty()).then_some(query.as_str()),
        via_header.then_some(authorization.as_str()),
    );
    if courier_fuzz::verbose() {
        eprintln!(
            "right_key={right_key} dev={dev} impostor={impostor} via_header={via_header} header={:?} claims={:?} -> {result:?}",
            String::from_utf8_lossy(header),
            String::from_utf8_lossy(claims)
        );
    }
    let Ok(creds) = result else {
        return;
    };
    let (user, device) = (creds.user.as_str(), creds.device.as_str());
    assert!(right_key, "accepted a token signed with the wrong key");
    assert!(is_valid_id(user) && is_valid_id(device), "{creds:?}");
    assert_token_deserved_acceptance(&token, user, device);
});
