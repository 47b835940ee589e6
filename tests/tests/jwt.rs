//! Identification by bearer token end to end: `jwt_claim` rules on verified claims, every way
//! a token is refused (`401 invalid_token`), forwarding or stripping the token, key rotation by
//! reload, and config problems.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use bff_proxy_tests::{
    Reply, TestProxy, Upstream, assert_mentions, config_file_problems, fill, get,
};

const CONFIG: &str = r#"
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[access_log]
enabled = false

[reload]
watch = false

[identity]
default_client = "web"

[identity.jwt]
jwks = "jwks.json"
issuers = ["https://auth.shop.test"]
audiences = ["bff"]
{jwt_extra}

[services.echo]
urls = ["{echo}"]

[[clients]]
name = "staff"
identify = [{ jwt_claim = "realm.roles", equals = "staff" }]

[[clients]]
name = "mobile"
identify = [{ jwt_claim = "client_type", regex = "^(ios|android)$" }]

[[clients]]
name = "web"
identify = [{ header = "x-client", equals = "web" }]

[[routes]]
id = "all"
path = "/{*rest}"
service = "echo"
"#;

/// An ES256 signing key with its public half as a JWK.
struct SigningKey {
    kid: &'static str,
    encoding: EncodingKey,
    jwk: Value,
}

impl SigningKey {
    fn new(kid: &'static str) -> Self {
        let pair = rcgen::KeyPair::generate().expect("P-256 key");
        // Uncompressed point: 0x04 || x || y.
        let raw = pair.public_key_raw();
        assert_eq!((raw.len(), raw[0]), (65, 4), "an uncompressed P-256 point");
        Self {
            kid,
            encoding: EncodingKey::from_ec_der(&pair.serialize_der()),
            jwk: json!({
                "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
                "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&raw[33..]),
            }),
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.into());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("signed token")
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// Valid claims with `extra` merged in.
fn claims(extra: Value) -> Value {
    let mut c = json!({
        "iss": "https://auth.shop.test",
        "aud": ["bff", "other"],
        "sub": "user-1",
        "exp": now() + 600,
    });
    for (k, v) in extra.as_object().expect("an object") {
        c[k] = v.clone();
    }
    c
}

/// An identity provider's encryption key, as JWKS documents often carry one: skipped.
fn encryption_key() -> Value {
    json!({ "kty": "RSA", "use": "enc", "alg": "RSA-OAEP", "kid": "enc-1", "n": "AQAB", "e": "AQAB" })
}

fn write_jwks(dir: &Path, keys: &[&SigningKey]) {
    let mut keys: Vec<Value> = keys.iter().map(|k| k.jwk.clone()).collect();
    keys.push(encryption_key());
    let set = json!({ "keys": keys });
    std::fs::write(dir.join("jwks.json"), set.to_string()).expect("write JWKS");
}

async fn start(dir: &Path, keys: &[&SigningKey], echo: &Upstream, jwt_extra: &str) -> TestProxy {
    write_jwks(dir, keys);
    let config = fill(CONFIG, &[("echo", &echo.url()), ("jwt_extra", jwt_extra)]);
    std::fs::write(dir.join("bff.toml"), config).expect("write config");
    TestProxy::start_file(&dir.join("bff.toml")).await
}

/// The client the upstream was told about for the last request.
fn told_client(echo: &Upstream) -> String {
    let last = echo.received().pop().expect("the upstream got a request");
    last.headers["x-bff-client"]
        .to_str()
        .expect("ascii")
        .to_owned()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test]
async fn verified_claims_identify_clients() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = SigningKey::new("k1");
    let echo = Upstream::echo("echo").await;
    let proxy = start(dir.path(), &[&key], &echo, "").await;

    // A nested array claim, by dotted path: any element matches.
    let staff = key.sign(&claims(
        json!({ "realm": { "roles": ["viewer", "staff"] } }),
    ));
    let resp = get(proxy.addr(), "/", &[("authorization", &bearer(&staff))]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(told_client(&echo), "staff");
    // The token goes on to the upstream by default.
    let last = echo.received().pop().expect("forwarded");
    assert_eq!(last.headers["authorization"], bearer(&staff).as_str());

    let mobile = key.sign(&claims(json!({ "client_type": "android" })));
    let resp = get(proxy.addr(), "/", &[("authorization", &bearer(&mobile))]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(told_client(&echo), "mobile");

    // A valid token whose claims match no rule: the other rules and the default decide.
    let plain = key.sign(&claims(json!({ "client_type": "tv" })));
    let resp = get(
        proxy.addr(),
        "/",
        &[("authorization", &bearer(&plain)), ("x-client", "web")],
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(told_client(&echo), "web");

    // No token, or another authorization scheme: not a bearer token to judge.
    let resp = get(
        proxy.addr(),
        "/",
        &[("authorization", "Basic dXNlcjpwdw==")],
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(told_client(&echo), "web");
}

#[tokio::test]
async fn every_invalid_token_is_refused_before_any_rule() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = SigningKey::new("k1");
    let stranger = SigningKey::new("k1");
    let echo = Upstream::echo("echo").await;
    let proxy = start(dir.path(), &[&key], &echo, "").await;

    let staff = json!({ "realm": { "roles": ["staff"] } });
    let mut cases: Vec<(&str, String)> = vec![
        (
            "expired",
            key.sign(&claims(
                json!({ "exp": now() - 3600, "realm": { "roles": ["staff"] } }),
            )),
        ),
        (
            "not yet valid",
            key.sign(&claims(
                json!({ "nbf": now() + 3600, "realm": { "roles": ["staff"] } }),
            )),
        ),
        (
            "another issuer",
            key.sign(&claims(
                json!({ "iss": "https://evil.test", "realm": { "roles": ["staff"] } }),
            )),
        ),
        (
            "another audience",
            key.sign(&claims(
                json!({ "aud": "someone-else", "realm": { "roles": ["staff"] } }),
            )),
        ),
        (
            "signed by another key under the same kid",
            stranger.sign(&claims(staff.clone())),
        ),
        ("garbage", "not.a.token".into()),
    ];
    // No expiry at all.
    let mut no_exp = claims(staff.clone());
    no_exp.as_object_mut().expect("object").remove("exp");
    cases.push(("without exp", key.sign(&no_exp)));
    // A kid the JWKS does not have.
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("k9".into());
    cases.push((
        "unknown kid",
        jsonwebtoken::encode(&header, &claims(staff.clone()), &key.encoding).expect("token"),
    ));
    // Algorithm confusion: HS256 "signed" with the public key's coordinates as the secret.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("k1".into());
    let secret = key.jwk["x"].as_str().expect("x").as_bytes().to_vec();
    cases.push((
        "HS256 under an EC key",
        jsonwebtoken::encode(
            &header,
            &claims(staff.clone()),
            &EncodingKey::from_secret(&secret).expect("an HMAC key"),
        )
        .expect("token"),
    ));
    // `alg: none`, hand-made (no library signs it).
    let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":"k1"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims(staff.clone()).to_string());
    cases.push(("alg none", format!("{none_header}.{body}.")));

    for (what, token) in &cases {
        let resp = get(
            proxy.addr(),
            "/",
            &[("authorization", &bearer(token)), ("x-client", "web")],
        )
        .await;
        resp.assert_error(401, "invalid_token");
        assert_eq!(
            resp.header("www-authenticate"),
            Some("Bearer error=\"invalid_token\""),
            "{what}"
        );
    }
    assert!(
        echo.received().is_empty(),
        "a refused token reached the upstream"
    );
}

#[tokio::test]
async fn a_token_not_forwarded_is_stripped_and_keys_rotate_on_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = SigningKey::new("2026-11");
    let new = SigningKey::new("2026-12");
    let echo = Upstream::echo("echo").await;
    let proxy = start(
        dir.path(),
        &[&old],
        &echo,
        "header = \"x-id-token\"\nforward = false",
    )
    .await;
    let token = |key: &SigningKey| key.sign(&claims(json!({ "client_type": "ios" })));

    // A custom header holds the bare token; it is verified, used, and not sent on.
    let resp = get(proxy.addr(), "/", &[("x-id-token", &token(&old))]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let last = echo.received().pop().expect("forwarded");
    assert_eq!(last.headers["x-bff-client"], "mobile");
    assert!(
        last.headers.get("x-id-token").is_none(),
        "the token was forwarded"
    );

    // The new key is unknown until the JWKS changes; then both verify (overlap while tokens
    // signed by the old one are still out there).
    get(proxy.addr(), "/", &[("x-id-token", &token(&new))])
        .await
        .assert_error(401, "invalid_token");
    write_jwks(dir.path(), &[&old, &new]);
    let (status, record) = proxy.reload().await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["outcome"], "applied", "{record}");
    for key in [&old, &new] {
        let resp = get(proxy.addr(), "/", &[("x-id-token", &token(key))]).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
    }

    // A JWKS that stops parsing is refused as a whole; the keys in use stay.
    std::fs::write(
        dir.path().join("jwks.json"),
        "{\"keys\": [{\"kty\": \"EC\"}]}",
    )
    .expect("write");
    let (status, record) = proxy.reload().await;
    assert_eq!(status, 422, "{record}");
    assert!(
        record["errors"].to_string().contains("identity.jwt.jwks"),
        "{record}"
    );
    let resp = get(proxy.addr(), "/", &[("x-id-token", &token(&new))]).await;
    assert_eq!(resp.status, 200);
}

#[tokio::test]
async fn verified_claims_become_upstream_headers_and_client_copies_never_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = SigningKey::new("k1");
    let echo = Upstream::echo("echo").await;
    let proxy = start(
        dir.path(),
        &[&key],
        &echo,
        r#"claim_headers = { "x-user-id" = "sub", "x-user-roles" = "realm.roles", "x-tenant" = "tenant" }"#,
    )
    .await;
    let token = key.sign(&claims(
        json!({ "realm": { "roles": ["viewer", "staff"] } }),
    ));
    let resp = get(
        proxy.addr(),
        "/",
        &[
            ("authorization", &bearer(&token)),
            ("x-user-id", "admin"),
            ("x-tenant", "other-tenant"),
        ],
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = echo.received().pop().expect("forwarded");
    assert_eq!(seen.headers["x-user-id"], "user-1");
    assert_eq!(seen.headers["x-user-roles"], "viewer,staff");
    // The token has no `tenant` claim: the client's copy is removed, nothing is set.
    assert!(seen.headers.get("x-tenant").is_none(), "{:?}", seen.headers);

    // Without a token, a client cannot state a user either.
    let resp = get(
        proxy.addr(),
        "/",
        &[("x-user-id", "admin"), ("x-client", "web")],
    )
    .await;
    assert_eq!(resp.status, 200);
    let seen = echo.received().pop().expect("forwarded");
    assert!(
        seen.headers.get("x-user-id").is_none(),
        "{:?}",
        seen.headers
    );
}

/// The headers made from verified claims carry a user's identity: a service's response cache
/// treats them like `authorization` (only answers marked shared are stored for such requests),
/// even when the token itself is not forwarded.
#[tokio::test]
async fn claim_headers_are_credentials_to_the_response_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = SigningKey::new("k1");
    let up = Upstream::builder("echo")
        .route(
            "/me",
            Reply::fixed(200, "{}").header("cache-control", "max-age=60"),
        )
        .route(
            "/catalog",
            Reply::fixed(200, "{}").header("cache-control", "public, max-age=60"),
        )
        .start()
        .await;
    let proxy = start(
        dir.path(),
        &[&key],
        &up,
        "forward = false\nclaim_headers = { \"x-user-id\" = \"sub\" }\n\n[services.echo.cache]",
    )
    .await;
    let auth = bearer(&key.sign(&claims(json!({}))));
    for _ in 0..2 {
        for path in ["/me", "/catalog"] {
            let resp = get(proxy.addr(), path, &[("authorization", &auth)]).await;
            assert_eq!(resp.status, 200, "{}", resp.text());
        }
    }
    let to = |path: &str| up.received().iter().filter(|r| r.uri == path).count();
    assert!(
        up.received()
            .iter()
            .all(|r| r.headers.get("authorization").is_none()),
        "the token is not forwarded"
    );
    assert_eq!(to("/me"), 2, "a user's answer is never stored for everyone");
    assert_eq!(to("/catalog"), 1, "a shared answer is");
}

#[tokio::test]
async fn a_cached_token_still_expires() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = SigningKey::new("k1");
    let echo = Upstream::echo("echo").await;
    let proxy = start(dir.path(), &[&key], &echo, "leeway = \"0s\"").await;
    let token = key.sign(&claims(json!({ "exp": now() + 2, "client_type": "ios" })));
    // Verified once, then served from the cache.
    for _ in 0..3 {
        let resp = get(proxy.addr(), "/", &[("authorization", &bearer(&token))]).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(told_client(&echo), "mobile");
    }
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    get(proxy.addr(), "/", &[("authorization", &bearer(&token))])
        .await
        .assert_error(401, "invalid_token");
}

#[test]
fn jwt_problems_are_config_problems_reported_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let only_enc = json!({ "keys": [encryption_key()] });
    std::fs::write(dir.path().join("empty.json"), only_enc.to_string()).expect("write");
    let config = r#"
[identity.jwt]
jwks = "empty.json"
header = "bad header"
leeway = "2h"

[services.echo]
urls = ["http://127.0.0.1:1"]

[[clients]]
name = "mobile"
identify = [{ jwt_claim = "a..b", equals = "x" }, { jwt_claim = "sub", header = "x-sub", equals = "x" }]

[[routes]]
id = "all"
path = "/"
service = "echo"
"#;
    let path = dir.path().join("bff.toml");
    let text = config_file_problems(&path, config);
    assert_mentions(
        &text,
        &[
            "identity.jwt.jwks: the JWKS has no signing keys",
            "identity.jwt.header: invalid header name `bad header`",
            "identity.jwt.leeway: must be between",
            "clients[0].identify[0]: `a..b` is not a claim path",
            "clients[0].identify[1]: a rule looks at one of `header`, `client_cert` or `jwt_claim`",
        ],
    );

    // Without [identity.jwt], a claim rule could never see a verified token.
    let text = config_file_problems(
        &path,
        r#"
[services.echo]
urls = ["http://127.0.0.1:1"]
[[clients]]
name = "mobile"
identify = [{ jwt_claim = "client_type", equals = "ios" }]
[[routes]]
id = "all"
path = "/"
service = "echo"
"#,
    );
    assert_mentions(
        &text,
        &["clients[0].identify[0].jwt_claim: needs `[identity.jwt]`"],
    );
}
