//! Credential checks for the WebSocket upgrade.
//!
//! Owns: turning the upgrade request's `Authorization` header or query string into a verified
//! (user, device): HS256 JWTs with `sub`, `dev` and a required `exp`, or, in dev mode only,
//! `?user=&device=`. Must not know about sockets or WebSockets; it sees strings.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::ids::{DeviceId, UserId};

/// Who is connecting, as proven by the credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub user: UserId,
    pub device: DeviceId,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    dev: String,
}

/// Verifies credentials. Built once per shard.
pub struct Authenticator {
    key: Option<DecodingKey>,
    validation: Validation,
    dev: bool,
}

impl Authenticator {
    /// `secret`: the HS256 key (`None`: tokens are refused). `dev`: accept `?user=&device=`.
    pub fn new(secret: Option<&[u8]>, dev: bool) -> Self {
        // Only HS256: a token naming any other algorithm (including `none`) is refused.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = 0;
        Authenticator {
            key: secret.and_then(|s| DecodingKey::from_secret(s).ok()),
            validation,
            dev,
        }
    }

    /// Checks the credentials of one upgrade request. The error is a reason for the log; the
    /// client only ever sees HTTP 401.
    pub fn authenticate(
        &self,
        query: Option<&str>,
        authorization: Option<&str>,
    ) -> Result<Credentials, String> {
        let params = query.map(parse_query).unwrap_or_default();
        let param = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let header_token = match authorization {
            Some(value) => Some(
                value
                    .strip_prefix("Bearer ")
                    .ok_or("Authorization is not a Bearer token")?
                    .trim(),
            ),
            None => None,
        };
        if let Some(token) = header_token.or_else(|| param("token")) {
            return self.verify_token(token);
        }
        if !self.dev {
            return Err("no token".into());
        }
        let user = param("user").ok_or("no token and no user")?;
        let device = param("device").ok_or("no device")?;
        Ok(Credentials {
            user: UserId::parse(user).ok_or("user is not a valid id")?,
            device: DeviceId::parse(device).ok_or("device is not a valid id")?,
        })
    }

    fn verify_token(&self, token: &str) -> Result<Credentials, String> {
        let key = self
            .key
            .as_ref()
            .ok_or("a token was given but no auth secret is configured")?;
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map_err(|e| format!("token refused: {e}"))?;
        Ok(Credentials {
            user: UserId::parse(&data.claims.sub).ok_or("sub is not a valid id")?,
            device: DeviceId::parse(&data.claims.dev).ok_or("dev is not a valid id")?,
        })
    }
}

/// Mints an HS256 client token for (user, device), valid for `ttl` from now.
pub fn mint_token(
    secret: &[u8],
    user: &str,
    device: &str,
    ttl: std::time::Duration,
) -> Result<String, String> {
    if UserId::parse(user).is_none() || DeviceId::parse(device).is_none() {
        return Err("user and device must be 1-64 bytes of [A-Za-z0-9_.-]".into());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let claims = serde_json::json!({
        "sub": user,
        "dev": device,
        "iat": now,
        "exp": now + ttl.as_secs(),
    });
    let key = jsonwebtoken::EncodingKey::from_secret(secret).map_err(|e| e.to_string())?;
    jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::HS256), &claims, &key)
        .map_err(|e| e.to_string())
}

/// Splits a query string into decoded pairs. Malformed escapes are kept literally (the id
/// check then refuses them).
fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |i: usize| {
        bytes
            .get(i)
            .and_then(|b| (*b as char).to_digit(16))
            .map(|d| d as u8)
    };
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi << 4) | lo);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &[u8] = b"test-secret";

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn token(claims: serde_json::Value, alg: Algorithm, secret: &[u8]) -> String {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn a_valid_token_names_user_and_device() {
        let auth = Authenticator::new(Some(SECRET), false);
        let t = token(
            json!({"sub":"alice","dev":"phone","exp": now() + 60}),
            Algorithm::HS256,
            SECRET,
        );
        let creds = auth
            .authenticate(None, Some(&format!("Bearer {t}")))
            .unwrap();
        assert_eq!(creds.user.as_str(), "alice");
        assert_eq!(creds.device.as_str(), "phone");
        let creds = auth
            .authenticate(Some(&format!("token={t}")), None)
            .unwrap();
        assert_eq!(creds.user.as_str(), "alice");
    }

    #[test]
    fn minted_tokens_verify() {
        let token =
            mint_token(SECRET, "alice", "phone", std::time::Duration::from_secs(60)).unwrap();
        let creds = Authenticator::new(Some(SECRET), false)
            .authenticate(Some(&format!("token={token}")), None)
            .unwrap();
        assert_eq!(creds.user.as_str(), "alice");
        assert!(mint_token(SECRET, "a b", "phone", std::time::Duration::from_secs(1)).is_err());
    }

    #[test]
    fn hostile_tokens_are_refused() {
        let auth = Authenticator::new(Some(SECRET), true);
        let exp = now() + 60;
        let cases = [
            token(json!({"sub":"alice","dev":"phone","exp": exp}), Algorithm::HS256, b"wrong"),
            token(json!({"sub":"alice","dev":"phone","exp": now() - 10}), Algorithm::HS256, SECRET),
            token(json!({"sub":"alice","dev":"phone"}), Algorithm::HS256, SECRET),
            token(json!({"sub":"alice","dev":"phone","exp": exp, "nbf": exp}), Algorithm::HS256, SECRET),
            token(json!({"sub":"al ice","dev":"phone","exp": exp}), Algorithm::HS256, SECRET),
            token(json!({"sub":"alice","exp": exp}), Algorithm::HS256, SECRET),
            token(json!({"sub":"alice","dev":"phone","exp": exp}), Algorithm::HS384, SECRET),
            // alg none: header {"alg":"none","typ":"JWT"}, no signature.
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImRldiI6InBob25lIiwiZXhwIjo0MTAyNDQ0ODAwfQ.".into(),
            "not.a.token".into(),
        ];
        for case in cases {
            assert!(
                auth.authenticate(Some(&format!("token={case}&user=alice&device=phone")), None)
                    .is_err(),
                "accepted {case}"
            );
        }
    }

    #[test]
    fn dev_credentials_only_in_dev_mode() {
        let query = Some("user=alice&device=phone");
        assert!(
            Authenticator::new(None, false)
                .authenticate(query, None)
                .is_err()
        );
        let creds = Authenticator::new(None, true)
            .authenticate(query, None)
            .unwrap();
        assert_eq!(creds.device.as_str(), "phone");
        assert!(
            Authenticator::new(None, true)
                .authenticate(Some("user=a%20b&device=phone"), None)
                .is_err()
        );
    }

    #[test]
    fn percent_decoding_handles_edges() {
        assert_eq!(percent_decode("a%2Eb"), "a.b");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
