//! Client identification end to end: every rule form, their order, the default client, the
//! 401s, and what identity headers the upstream gets.

use bff_proxy_tests::{TestProxy, Upstream, fill, get, sha256_hex};

const PARTNER_KEY: &str = "partner-key-7f3a9c";
const PARTNER_KEY_2: &str = "partner-key-rotated";

/// Four clients covering every rule form; `{default}` is either a `[identity]` section or empty.
const CONFIG: &str = r#"
{default}

[services.echo]
urls = ["{echo}"]

[[clients]]
name = "partner"
identify = [{ api_key_header = "x-api-key", sha256 = ["{key1}", "{key2}"] }]

[[clients]]
name = "mobile"
identify = [
  { header = "x-client", equals = "mobile" },
  { user_agent = "(?i)shopapp/\\d+ \\((ios|android)" },
]

[[clients]]
name = "voice"
identify = [{ header = "x-client", regex = "^(voice|alexa|assistant)$" }]

[[clients]]
name = "web"
identify = [{ header = "x-client", equals = "web" }]

[[routes]]
id = "all"
path = "/{*rest}"
service = "echo"
"#;

async fn start(echo: &Upstream, default_client: Option<&str>) -> TestProxy {
    let default = default_client.map_or(String::new(), |d| {
        format!("[identity]\ndefault_client = \"{d}\"")
    });
    let key1 = sha256_hex(PARTNER_KEY);
    // Upper-case hex is accepted too (what some tools print).
    let key2 = sha256_hex(PARTNER_KEY_2).to_ascii_uppercase();
    TestProxy::start(&fill(
        CONFIG,
        &[
            ("default", &default),
            ("echo", &echo.url()),
            ("key1", &key1),
            ("key2", &key2),
        ],
    ))
    .await
}

/// The client name the upstream was told, after checking it was told exactly once.
async fn client_of(proxy: &TestProxy, headers: &[(&str, &str)]) -> String {
    let echo = get(proxy.addr(), "/who", headers).await.echo();
    let values = echo.header_all("x-bff-client");
    assert_eq!(
        values.len(),
        1,
        "exactly one x-bff-client upstream: {values:?}"
    );
    values[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_form_identifies_its_client() {
    let echo = Upstream::echo("echo").await;
    let proxy = start(&echo, Some("web")).await;

    // header equals
    assert_eq!(client_of(&proxy, &[("x-client", "mobile")]).await, "mobile");
    assert_eq!(client_of(&proxy, &[("x-client", "web")]).await, "web");
    // `equals` is exact: no prefix, no case folding.
    assert_eq!(client_of(&proxy, &[("x-client", "Mobile")]).await, "web");
    assert_eq!(client_of(&proxy, &[("x-client", "mobile2")]).await, "web");
    // header regex
    assert_eq!(client_of(&proxy, &[("x-client", "alexa")]).await, "voice");
    assert_eq!(
        client_of(&proxy, &[("x-client", "assistant")]).await,
        "voice"
    );
    assert_eq!(client_of(&proxy, &[("x-client", "alexa-x")]).await, "web");
    // user agent regex (case-insensitive per the pattern's flag)
    assert_eq!(
        client_of(&proxy, &[("user-agent", "ShopApp/4 (iOS 17.2)")]).await,
        "mobile"
    );
    assert_eq!(
        client_of(&proxy, &[("user-agent", "shopapp/12 (Android 14)")]).await,
        "mobile"
    );
    assert_eq!(
        client_of(&proxy, &[("user-agent", "ShopApp/4 (Windows)")]).await,
        "web"
    );
    // API key, either of the accepted keys
    assert_eq!(
        client_of(&proxy, &[("x-api-key", PARTNER_KEY)]).await,
        "partner"
    );
    assert_eq!(
        client_of(&proxy, &[("x-api-key", PARTNER_KEY_2)]).await,
        "partner"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_matching_client_in_config_order_wins() {
    let echo = Upstream::echo("echo").await;
    let proxy = start(&echo, Some("web")).await;

    // Matches partner (key) and voice (header): partner is listed first.
    assert_eq!(
        client_of(&proxy, &[("x-client", "voice"), ("x-api-key", PARTNER_KEY)]).await,
        "partner"
    );
    // Matches mobile (user agent) and web (header): mobile is listed first.
    assert_eq!(
        client_of(
            &proxy,
            &[("x-client", "web"), ("user-agent", "ShopApp/3 (Android)")]
        )
        .await,
        "mobile"
    );

    // Same request, clients listed the other way round: the other client wins. This is what
    // shows the order is the config's and not something fixed.
    let swapped = r#"
[services.echo]
urls = ["{echo}"]

[[clients]]
name = "web"
identify = [{ header = "x-client", equals = "web" }]

[[clients]]
name = "mobile"
identify = [{ user_agent = "(?i)shopapp/" }]

[[routes]]
id = "all"
path = "/{*rest}"
service = "echo"
"#;
    let proxy2 = TestProxy::start(&fill(swapped, &[("echo", &echo.url())])).await;
    assert_eq!(
        client_of(
            &proxy2,
            &[("x-client", "web"), ("user-agent", "ShopApp/3 (Android)")]
        )
        .await,
        "web"
    );
    assert_eq!(
        client_of(&proxy2, &[("user-agent", "ShopApp/3 (Android)")]).await,
        "mobile"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unidentified_requests_use_the_default_client() {
    let echo = Upstream::echo("echo").await;
    let proxy = start(&echo, Some("voice")).await;
    assert_eq!(client_of(&proxy, &[]).await, "voice");
    assert_eq!(client_of(&proxy, &[("x-client", "unknown")]).await, "voice");
    // A rule still beats the default.
    assert_eq!(client_of(&proxy, &[("x-client", "web")]).await, "web");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unidentified_without_default_is_401_unauthenticated() {
    let echo = Upstream::echo("echo").await;
    let proxy = start(&echo, None).await;

    let resp = get(proxy.addr(), "/who", &[]).await;
    resp.assert_error(401, "unauthenticated");
    assert!(
        resp.header("www-authenticate").is_some(),
        "401 carries www-authenticate"
    );
    let resp = get(proxy.addr(), "/who", &[("x-client", "nobody")]).await;
    resp.assert_error(401, "unauthenticated");
    assert!(
        echo.received().is_empty(),
        "refused requests never reach the upstream"
    );

    // Identified requests still work without a default.
    assert_eq!(client_of(&proxy, &[("x-client", "mobile")]).await, "mobile");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_api_key_is_401_even_with_a_default_client() {
    let echo = Upstream::echo("echo").await;
    let proxy = start(&echo, Some("web")).await;

    for key in ["wrong", "", PARTNER_KEY.trim_end_matches('c')] {
        let resp = get(proxy.addr(), "/who", &[("x-api-key", key)]).await;
        resp.assert_error(401, "invalid_api_key");
    }
    // The key's hash itself is not a key.
    let resp = get(
        proxy.addr(),
        "/who",
        &[("x-api-key", &sha256_hex(PARTNER_KEY))],
    )
    .await;
    resp.assert_error(401, "invalid_api_key");
    assert!(
        echo.received().is_empty(),
        "refused requests never reach the upstream"
    );

    // Without a default client the wrong key is still `invalid_api_key`, not `unauthenticated`.
    let proxy = start(&echo, None).await;
    get(proxy.addr(), "/who", &[("x-api-key", "wrong")])
        .await
        .assert_error(401, "invalid_api_key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_not_forwarded_upstream() {
    let echo = Upstream::echo("echo").await;
    let proxy = start(&echo, Some("web")).await;

    let resp = get(
        proxy.addr(),
        "/who",
        &[("x-api-key", PARTNER_KEY), ("x-other", "kept")],
    )
    .await;
    let seen = resp.echo();
    assert_eq!(seen.header("x-bff-client"), Some("partner"));
    assert_eq!(
        seen.header("x-api-key"),
        None,
        "the API key must not reach the upstream"
    );
    assert_eq!(seen.header("x-other"), Some("kept"));
    let received = echo.received();
    assert!(
        received
            .iter()
            .all(|r| !r.headers.contains_key("x-api-key")),
        "no request reached the upstream with the key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cannot_claim_an_identity_with_the_client_header() {
    let echo = Upstream::echo("echo").await;
    let proxy = start(&echo, Some("web")).await;

    // Two copies claiming to be the partner: both dropped, the resolved client is stated once.
    let seen = get(
        proxy.addr(),
        "/who",
        &[("x-bff-client", "partner"), ("x-bff-client", "partner")],
    )
    .await
    .echo();
    assert_eq!(seen.header_all("x-bff-client"), ["web"]);

    let seen = get(
        proxy.addr(),
        "/who",
        &[("x-client", "alexa"), ("x-bff-client", "mobile")],
    )
    .await
    .echo();
    assert_eq!(seen.header_all("x-bff-client"), ["voice"]);
}

#[tokio::test]
async fn the_host_a_request_is_for_identifies_its_client() {
    let echo = Upstream::echo("echo").await;
    let config = format!(
        r#"
[identity]
default_client = "web"

[services.echo]
urls = ["{}"]

[[clients]]
name = "mobile"
identify = [{{ host = "m.shop.test" }}]

[[clients]]
name = "kiosk"
identify = [{{ host = "*.kiosk.shop.test" }}]

[[clients]]
name = "web"

[[routes]]
id = "all"
path = "/{{*rest}}"
service = "echo"
"#,
        echo.url()
    );
    let proxy = TestProxy::start(&config).await;
    assert_eq!(
        client_of(&proxy, &[("host", "M.Shop.Test:8080")]).await,
        "mobile"
    );
    assert_eq!(
        client_of(&proxy, &[("host", "store-9.kiosk.shop.test")]).await,
        "kiosk"
    );
    assert_eq!(client_of(&proxy, &[("host", "shop.test")]).await, "web");
}
