//! Handshake credential parser: the upgrade request's query string and `Authorization` header.
//!
//! Input: one flag byte, then the query, a `\n`, then the Authorization header value.
//! Flags: bit 0 dev mode, bit 1 a secret is configured, bit 2 the request has a query,
//! bit 3 it has an Authorization header. Non-UTF-8 bytes are replaced (the server sees `&str`).
//!
//! Invariants checked on `Ok` (an independent oracle, see src/lib.rs):
//! - user and device are valid ids;
//! - outside dev mode a token was presented (header, or a `token` parameter after decoding),
//!   and it really is an unexpired HS256 token under the secret for exactly that user/device;
//! - a presented token always decides: never dev-mode `user=`/`device=` next to a token;
//! - without a token (dev mode), user/device are the first decoded `user`/`device` parameters.
#![no_main]

use courier::auth::Authenticator;
use courier::ids::is_valid_id;
use courier_fuzz::{SECRET, assert_token_deserved_acceptance, query_param};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let dev = flags & 1 != 0;
    let secret = (flags & 2 != 0).then_some(SECRET);
    let text = String::from_utf8_lossy(rest);
    let (query, authorization) = text.split_once('\n').unwrap_or((&text, ""));
    let query = (flags & 4 != 0).then_some(query);
    let authorization = (flags & 8 != 0).then_some(authorization);

    let auth = Authenticator::new(secret, dev);
    let result = auth.authenticate(query, authorization);
    if courier_fuzz::verbose() {
        eprintln!(
            "dev={dev} secret={} query={query:?} authorization={authorization:?} -> {result:?}",
            secret.is_some()
        );
    }
    let Ok(creds) = result else {
        return;
    };
    let (user, device) = (creds.user.as_str(), creds.device.as_str());
    assert!(is_valid_id(user) && is_valid_id(device), "{creds:?}");

    let query_token = query_param(query, "token");
    let token = match authorization {
        Some(value) => Some(
            value
                .strip_prefix("Bearer ")
                .expect("accepted a non-Bearer Authorization header")
                .trim()
                .to_owned(),
        ),
        None => query_token,
    };
    match token {
        Some(token) => {
            assert!(
                secret.is_some(),
                "accepted a token with no secret configured"
            );
            assert_token_deserved_acceptance(&token, user, device);
        }
        None => {
            assert!(dev, "accepted credentials without a token outside dev mode");
            assert_eq!(query_param(query, "user").as_deref(), Some(user));
            assert_eq!(query_param(query, "device").as_deref(), Some(device));
        }
    }
});
