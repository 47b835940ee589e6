//! Identification order, each rule kind, fallback and API-key handling.

use http::HeaderValue;
use sha2::{Digest, Sha256};

use super::*;
use crate::config::Config;

fn identifier(extra: &str) -> Identifier {
    let key_hash = hex::encode(Sha256::digest(b"s3cret"));
    let text = format!(
        r#"
{extra}
[services.a]
urls = ["http://127.0.0.1:1"]
[[clients]]
name = "partner"
identify = [{{ api_key_header = "x-api-key", sha256 = ["{key_hash}"] }}]
[[clients]]
name = "mobile"
identify = [{{ header = "x-client", equals = "mobile" }}, {{ user_agent = "ShopApp/\\d+" }}]
[[clients]]
name = "voice"
identify = [{{ header = "x-client", regex = "^(voice|alexa)$" }}]
[[clients]]
name = "web"
identify = [{{ header = "x-client", equals = "web" }}]
[[routes]]
id = "r"
path = "/"
service = "a"
"#
    );
    let cfg = Config::from_toml(&text, "t.toml").unwrap_or_else(|e| panic!("{e}"));
    Identifier::build(&cfg.identity, &cfg.clients, cfg.tls.as_ref(), None)
}

fn who(id: &Identifier, headers: &[(&'static str, &'static str)]) -> Result<String, IdentityError> {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(*k, HeaderValue::from_static(v));
    }
    id.identify(Presenting {
        headers: &h,
        uri: &http::Uri::default(),
        cert: None,
    })
    .map(|i| i.profile.name.to_string())
}

/// Clients `kiosk` (by SPIFFE ID), `pinned` (by fingerprint) and `staff` (by CN pattern),
/// then `web` by header; built without config validation (which wants real CA files).
fn cert_identifier() -> Identifier {
    let rule = |field, equals: Option<&str>, regex: Option<&str>| IdentifyRule {
        client_cert: Some(field),
        equals: equals.map(str::to_owned),
        regex: regex.map(str::to_owned),
        ..IdentifyRule::default()
    };
    let client = |name: &str, identify| ClientConfig {
        name: name.into(),
        attributes: BTreeMap::new(),
        identify,
        rate_limit: None,
    };
    Identifier::build(
        &IdentityConfig::default(),
        &[
            client(
                "kiosk",
                vec![rule(CertField::SanUri, Some("spiffe://shop/kiosk"), None)],
            ),
            client(
                "pinned",
                vec![rule(CertField::Fingerprint, Some("ab12"), None)],
            ),
            client(
                "staff",
                vec![rule(CertField::SubjectCn, None, Some(r"^staff-\d+$"))],
            ),
            client(
                "web",
                vec![IdentifyRule {
                    header: Some("x-client".into()),
                    equals: Some("web".into()),
                    ..IdentifyRule::default()
                }],
            ),
        ],
        None,
        None,
    )
}

#[test]
fn client_certificate_rules() {
    let id = cert_identifier();
    let who = |cert: Option<&ClientCert>, header: Option<&'static str>| {
        let mut h = HeaderMap::new();
        if let Some(v) = header {
            h.insert("x-client", HeaderValue::from_static(v));
        }
        id.identify(Presenting {
            headers: &h,
            uri: &http::Uri::default(),
            cert,
        })
        .map(|i| i.profile.name.to_string())
    };
    let kiosk = ClientCert {
        subject_cn: vec!["device-7".into()],
        san_uri: vec!["spiffe://shop/other".into(), "spiffe://shop/kiosk".into()],
        fingerprint: "ff00".into(),
        ..ClientCert::default()
    };
    // Any of several names of a kind matches; the certificate wins over a later header rule.
    assert_eq!(who(Some(&kiosk), Some("web")), Ok("kiosk".into()));
    let pinned = ClientCert {
        fingerprint: "ab12".into(),
        ..ClientCert::default()
    };
    assert_eq!(who(Some(&pinned), None), Ok("pinned".into()));
    let staff = ClientCert {
        subject_cn: vec!["staff-42".into()],
        ..ClientCert::default()
    };
    assert_eq!(who(Some(&staff), None), Ok("staff".into()));
    // Equality is exact, a regex must match; no certificate matches no certificate rule.
    let near = ClientCert {
        subject_cn: vec!["staff-42x".into()],
        san_uri: vec!["spiffe://shop/kiosk/2".into()],
        ..ClientCert::default()
    };
    assert_eq!(who(Some(&near), Some("web")), Ok("web".into()));
    assert_eq!(who(None, Some("web")), Ok("web".into()));
    assert_eq!(who(None, None), Err(IdentityError::Unidentified));
}

#[test]
fn each_rule_kind() {
    let id = identifier("");
    assert_eq!(who(&id, &[("x-client", "mobile")]), Ok("mobile".into()));
    assert_eq!(
        who(&id, &[("user-agent", "ShopApp/12 (iOS)")]),
        Ok("mobile".into())
    );
    assert_eq!(who(&id, &[("x-client", "alexa")]), Ok("voice".into()));
    assert_eq!(who(&id, &[("x-client", "web")]), Ok("web".into()));
    assert_eq!(who(&id, &[("x-api-key", "s3cret")]), Ok("partner".into()));
    assert_eq!(
        who(&id, &[("x-client", "alexa2")]),
        Err(IdentityError::Unidentified)
    );
    assert_eq!(who(&id, &[]), Err(IdentityError::Unidentified));
}

#[test]
fn first_client_in_config_order_wins() {
    let id = identifier("");
    // Matches both partner (key) and web (header): partner is listed first.
    assert_eq!(
        who(&id, &[("x-client", "web"), ("x-api-key", "s3cret")]),
        Ok("partner".into())
    );
    // Matches mobile by user agent and web by header: mobile is listed first.
    assert_eq!(
        who(&id, &[("x-client", "web"), ("user-agent", "ShopApp/3")]),
        Ok("mobile".into())
    );
}

#[test]
fn wrong_api_key_is_rejected_even_with_a_default() {
    let id = identifier("[identity]\ndefault_client = \"web\"");
    assert_eq!(who(&id, &[]), Ok("web".into()));
    assert_eq!(
        who(&id, &[("x-api-key", "guess")]),
        Err(IdentityError::InvalidApiKey)
    );
    assert_eq!(
        who(&id, &[("x-api-key", "guess"), ("x-client", "web")]),
        Err(IdentityError::InvalidApiKey),
        "a bad key is refused even when another rule matches"
    );
    // The key never goes upstream.
    let mut upstream = HeaderMap::new();
    upstream.insert("x-api-key", HeaderValue::from_static("s3cret"));
    upstream.insert("x-client", HeaderValue::from_static("web"));
    id.state_upstream(&mut upstream, &Verified::default());
    assert_eq!(upstream.keys().collect::<Vec<_>>(), ["x-client"]);
}

#[test]
fn a_rule_has_one_source_and_one_form() {
    let rule = |toml: &str| -> IdentifyRule {
        toml::from_str(toml).unwrap_or_else(|e| panic!("{toml}: {e}"))
    };
    for (text, want) in [
        (
            r#"header = "x-a"
               client_cert = "san_uri"
               equals = "b""#,
            "a rule looks at one of",
        ),
        (
            r#"jwt_claim = "sub"
               header = "x-a"
               regex = "b""#,
            "a rule looks at one of",
        ),
        (
            r#"jwt_claim = "sub"
               user_agent = "b""#,
            "go with `equals` or `regex`",
        ),
        (
            r#"client_cert = "subject_cn"
               api_key_header = "x-key"
               sha256 = ["00"]"#,
            "go with `equals` or `regex`",
        ),
        (r#"jwt_claim = ".sub""#, "exactly one of"),
        (r#"host = "bad name""#, "is not a host name"),
        (r#"host = "*.*.example""#, "is not a host name"),
        (
            r#"host = "a.example"
               user_agent = "x""#,
            "exactly one of",
        ),
        (
            r#"jwt_claim = "realm..roles"
               equals = "b""#,
            "is not a claim path",
        ),
    ] {
        let err = compile_rule(&rule(text))
            .err()
            .unwrap_or_else(|| panic!("{text}: accepted"));
        assert!(err.contains(want), "{text}: {err}");
    }
    for text in [
        r#"jwt_claim = "realm.roles"
           equals = "staff""#,
        r#"client_cert = "fingerprint"
           regex = "^ab""#,
    ] {
        assert!(compile_rule(&rule(text)).is_ok(), "{text}");
    }
}

#[test]
fn host_rules_match_the_name_the_request_is_for() {
    let rule = |host: &str| IdentifyRule {
        host: Some(host.into()),
        ..IdentifyRule::default()
    };
    let client = |name: &str, identify| ClientConfig {
        name: name.into(),
        attributes: BTreeMap::new(),
        identify,
        rate_limit: None,
    };
    let id = Identifier::build(
        &IdentityConfig::default(),
        &[
            client("mobile", vec![rule("M.Shop.Example")]),
            client("kiosk", vec![rule("*.kiosk.shop.example")]),
        ],
        None,
        None,
    );
    let who = |uri: &str, host_header: Option<&'static str>| {
        let uri: http::Uri = uri.parse().expect("a URI");
        let mut h = HeaderMap::new();
        if let Some(v) = host_header {
            h.insert(http::header::HOST, HeaderValue::from_static(v));
        }
        id.identify(Presenting {
            headers: &h,
            uri: &uri,
            cert: None,
        })
        .map(|i| i.profile.name.to_string())
    };
    // HTTP/1.1: the `host` header, port and case ignored.
    assert_eq!(who("/", Some("m.shop.example:8443")), Ok("mobile".into()));
    assert_eq!(who("/", Some("M.SHOP.EXAMPLE")), Ok("mobile".into()));
    // HTTP/2 (and absolute-form): the authority.
    assert_eq!(who("https://m.shop.example/x", None), Ok("mobile".into()));
    assert_eq!(
        who("https://store-3.kiosk.shop.example/", None),
        Ok("kiosk".into())
    );
    // One label under the wildcard only; the parent itself is not covered.
    for other in [
        "a.b.kiosk.shop.example",
        "kiosk.shop.example",
        "shop.example",
    ] {
        let uri = format!("https://{other}/");
        assert_eq!(who(&uri, None), Err(IdentityError::Unidentified), "{other}");
    }
    assert_eq!(who("/", None), Err(IdentityError::Unidentified));
}

#[test]
fn request_host_drops_the_port_and_keeps_ipv6_brackets() {
    use crate::host::request_host;
    let host = |uri: &str, header: Option<&'static str>| {
        let uri: http::Uri = uri.parse().expect("a URI");
        let mut h = HeaderMap::new();
        if let Some(v) = header {
            h.insert(http::header::HOST, HeaderValue::from_static(v));
        }
        request_host(&uri, &h).map(str::to_owned)
    };
    assert_eq!(host("/", Some("a.example:80")), Some("a.example".into()));
    assert_eq!(host("/", Some("a.example")), Some("a.example".into()));
    assert_eq!(host("/", Some("[::1]:8080")), Some("[::1]".into()));
    assert_eq!(host("/", Some("[::1]")), Some("[::1]".into()));
    assert_eq!(
        host("http://b.example:81/x", Some("a.example")),
        Some("b.example".into())
    );
    assert_eq!(host("/", None), None);
}
