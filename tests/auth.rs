//! Credentials: an HS256 JWT (`sub`, `dev`, `exp`) in the `Authorization` header or `?token=`,
//! or `?user=&device=` in dev mode only. Anything bad, expired or missing is HTTP 401 before the
//! upgrade, and a token for one user cannot act as another.

mod common;

use common::*;
use serde_json::json;

const SECRET: &str = "test-secret-0123456789abcdef0123456789abcdef";

fn server() -> Server {
    Server::start(ServerOpts::with_secret(SECRET))
}

#[test]
fn valid_token_in_query_connects_as_its_subject() {
    let server = server();
    let token = mint_token(SECRET, "alice", "phone", 3600);
    let mut c = Client::with_token(server.addr(), &token);
    let hello = c.hello();
    assert_eq!(hello["user"], "alice", "{hello}");
    assert_eq!(hello["device"], "phone", "{hello}");
}

#[test]
fn valid_token_in_authorization_header_connects_as_its_subject() {
    let server = server();
    let token = mint_token(SECRET, "bob", "tablet", 3600);
    let mut c = Client::with_header_token(server.addr(), &token);
    let hello = c.hello();
    assert_eq!(hello["user"], "bob", "{hello}");
    assert_eq!(hello["device"], "tablet", "{hello}");
}

#[test]
fn token_signed_with_another_secret_gets_401() {
    let server = server();
    let token = mint_token(
        "some-other-secret-entirely-0123456789",
        "alice",
        "phone",
        3600,
    );
    assert_eq!(
        expect_refused(Client::try_with_token(server.addr(), &token)),
        401
    );
    assert_eq!(
        expect_refused(Client::try_with_header_token(server.addr(), &token)),
        401
    );
}

#[test]
fn expired_token_gets_401() {
    let server = server();
    // An hour in the past: beyond any clock-skew leeway.
    let token = mint_token(SECRET, "alice", "phone", -3600);
    assert_eq!(
        expect_refused(Client::try_with_token(server.addr(), &token)),
        401
    );
    assert_eq!(
        expect_refused(Client::try_with_header_token(server.addr(), &token)),
        401
    );
}

#[test]
fn token_without_exp_sub_or_dev_gets_401() {
    let server = server();
    let exp = now_secs() + 3600;
    for claims in [
        json!({"sub": "alice", "dev": "phone"}),
        json!({"dev": "phone", "exp": exp}),
        json!({"sub": "alice", "exp": exp}),
    ] {
        let token = mint_claims(SECRET, &claims);
        assert_eq!(
            expect_refused(Client::try_with_token(server.addr(), &token)),
            401,
            "claims {claims}"
        );
    }
}

#[test]
fn token_with_invalid_ids_gets_401() {
    let server = server();
    let exp = now_secs() + 3600;
    for claims in [
        json!({"sub": "bad user", "dev": "phone", "exp": exp}),
        json!({"sub": "alice", "dev": "", "exp": exp}),
        json!({"sub": "a".repeat(65), "dev": "phone", "exp": exp}),
    ] {
        let token = mint_claims(SECRET, &claims);
        assert_eq!(
            expect_refused(Client::try_with_header_token(server.addr(), &token)),
            401,
            "claims {claims}"
        );
    }
}

#[test]
fn unsigned_alg_none_token_gets_401() {
    let server = server();
    let token = alg_none_token(&json!({"sub": "alice", "dev": "phone", "exp": now_secs() + 3600}));
    assert_eq!(
        expect_refused(Client::try_with_token(server.addr(), &token)),
        401
    );
    assert_eq!(
        expect_refused(Client::try_with_header_token(server.addr(), &token)),
        401
    );
}

#[test]
fn garbage_or_missing_credentials_get_401() {
    let server = server();
    let addr = server.addr();
    assert_eq!(
        expect_refused(Client::try_with_token(addr, "not.a.jwt")),
        401
    );
    assert_eq!(expect_refused(Client::try_with_token(addr, "")), 401);
    assert_eq!(
        expect_refused(Client::try_with_header_token(addr, "garbage")),
        401
    );
    let basic = [("Authorization", "Basic YWxpY2U6cGFzc3dvcmQ=")];
    assert_eq!(
        expect_refused(Client::try_connect(addr, "/v1/ws", &basic)),
        401
    );
    assert_eq!(
        expect_refused(Client::try_connect(addr, "/v1/ws", &[])),
        401,
        "no credentials"
    );
    assert_eq!(
        expect_refused(Client::try_connect(addr, "/v1/ws?user=alice", &[])),
        401,
        "dev mode without a device"
    );
    assert_eq!(
        expect_refused(Client::try_connect(
            addr,
            "/v1/ws?user=bad%20id&device=phone",
            &[]
        )),
        401,
        "dev mode with an invalid user id"
    );
    // A refusal leaves the server working.
    let mut c = Client::dev(addr, "alice", "phone");
    c.hello();
}

#[test]
fn dev_credentials_get_401_without_dev_mode() {
    let server = Server::start(ServerOpts {
        dev: false,
        ..ServerOpts::with_secret(SECRET)
    });
    let addr = server.addr();
    assert_eq!(expect_refused(Client::try_dev(addr, "alice", "phone")), 401);
    let token = mint_token(SECRET, "alice", "phone", 3600);
    let mut c = Client::with_token(addr, &token);
    assert_eq!(c.hello()["user"], "alice");
}

#[test]
fn a_token_acts_only_as_its_subject() {
    let server = server();
    let addr = server.addr();
    let mut carol = Client::with_token(addr, &mint_token(SECRET, "carol", "phone", 3600));
    carol.hello();
    let alice_token = mint_token(SECRET, "alice", "phone", 3600);

    // Dev-style parameters next to a token do not override it: refused, or the token's subject.
    let path = format!("/v1/ws?token={alice_token}&user=bob&device=evil");
    match Client::try_connect(addr, &path, &[]) {
        Err(ConnectError::Http(status)) => assert_eq!(status, 401),
        Err(ConnectError::Other(e)) => panic!("connect: {e}"),
        Ok(mut c) => {
            let hello = c.hello();
            assert_eq!(
                hello["user"], "alice",
                "the token decides who connects: {hello}"
            );
            assert_eq!(hello["device"], "phone", "{hello}");
            c.close();
        }
    }

    // A send naming another sender is still from the token's subject.
    let mut alice = Client::with_header_token(addr, &alice_token);
    alice.hello();
    alice.send_json(json!({
        "t": "send", "id": "s1", "to": "carol", "body": "hi", "from": "bob", "dev": "evil"
    }));
    let answer = alice.recv_until(|v| (v["t"] == "sent" || v["t"] == "error") && v["id"] == "s1");
    if answer["t"] == "sent" {
        let ev = carol.next_msg();
        assert_eq!(
            ev["from"], "alice",
            "the sender is the token's subject: {ev}"
        );
        assert_eq!(ev["chat"], "alice", "{ev}");
        assert_eq!(ev["dev"], "phone", "{ev}");
        assert_eq!(ev["msg"], answer["msg"], "{ev}");
    }
    // Nothing ever shows up as bob's: bob's log holds only what bob's own device appended.
    let mut bob = Client::with_token(addr, &mint_token(SECRET, "bob", "phone", 3600));
    let hello = bob.hello();
    let events = bob.collect_events_until_seq(u64_of(&hello, "head"));
    assert!(
        msgs(&events).is_empty(),
        "bob's log has messages nobody sent as bob: {events:?}"
    );
}
