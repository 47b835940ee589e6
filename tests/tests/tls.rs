//! HTTPS on the data plane: TLS termination with ALPN, mutual TLS and identification by client
//! certificate, certificate rotation by reload, failed handshakes, and config problems with
//! the certificate files.

use std::path::Path;
use std::time::Duration;

use bff_proxy_tests::tls::{Ca, TlsClient};
use bff_proxy_tests::{RawConn, TestProxy, Upstream, assert_mentions, config_file_problems, fill};

/// Client certificates are optional unless `{client_cert}` says `client_cert = "required"`.
const CONFIG: &str = r#"
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[server]
header_read_timeout = "1s"

[tls]
cert = "server.crt"
key = "server.key"
client_ca = "ca.pem"
{client_cert}

[access_log]
output = "access.log"

# Reloads are explicit (`POST /admin/reload`) unless a test turns watching on.
[reload]
watch = false

[identity]
default_client = "web"

[services.echo]
urls = ["{echo}"]

[[clients]]
name = "kiosk"
identify = [{ client_cert = "san_uri", equals = "spiffe://shop/kiosk" }]

[[clients]]
name = "staff"
identify = [{ client_cert = "subject_cn", regex = "^staff-[0-9]+$" }]

[[clients]]
name = "web"
identify = [{ header = "x-client", equals = "web" }]

[[routes]]
id = "all"
path = "/{*rest}"
service = "echo"
"#;

/// Writes the server certificate and the config into `dir` and starts the proxy from the file
/// (so reloads read it again).
async fn start(dir: &Path, ca: &Ca, echo: &Upstream, client_cert: &str) -> TestProxy {
    ca.server("proxy v1").write(dir, "server");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write CA");
    let config = fill(
        CONFIG,
        &[("echo", &echo.url()), ("client_cert", client_cert)],
    );
    std::fs::write(dir.join("bff.toml"), config).expect("write config");
    TestProxy::start_file(&dir.join("bff.toml")).await
}

/// `bff_tls_handshakes_total{result}` as `/metrics` shows it now.
async fn handshakes(proxy: &TestProxy, result: &str) -> f64 {
    proxy
        .metric(&format!("bff_tls_handshakes_total{{result=\"{result}\"}}"))
        .await
}

/// The client name the upstream was told about for the last request.
fn told_client(echo: &Upstream) -> String {
    let last = echo.received().pop().expect("the upstream got a request");
    last.headers
        .get("x-bff-client")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

fn common_name(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("a certificate");
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .expect("a CN")
        .to_owned()
}

#[tokio::test]
async fn https_serves_http1_and_http2_and_tells_the_upstream_it_was_https() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("test CA");
    let echo = Upstream::echo("echo").await;
    let proxy = start(dir.path(), &ca, &echo, "").await;

    for (alpn, version) in [
        (&[&b"h2"[..]][..], http::Version::HTTP_2),
        (&[&b"http/1.1"[..]][..], http::Version::HTTP_11),
    ] {
        let client = TlsClient::with_alpn(&ca, None, alpn);
        let (resp, cert) = client
            .get(proxy.addr(), "/hello", &[("x-client", "web")])
            .await
            .expect("an HTTPS answer");
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.version, version);
        assert_eq!(common_name(&cert), "proxy v1");
        let seen = echo.received().pop().expect("forwarded");
        assert_eq!(seen.headers["x-forwarded-proto"], "https");
        let forwarded = seen.headers["forwarded"].to_str().expect("ascii");
        assert!(forwarded.contains("proto=https"), "{forwarded}");
    }
    // Post-quantum hybrid key exchange when the client offers it (rustls clients do).
    let stream = TlsClient::new(&ca, None)
        .connect(proxy.addr())
        .await
        .expect("handshake");
    let group = stream
        .get_ref()
        .1
        .negotiated_key_exchange_group()
        .expect("a key exchange group")
        .name();
    assert_eq!(group, rustls::NamedGroup::X25519MLKEM768);
    drop(stream);
    assert_eq!(handshakes(&proxy, "ok").await, 3.0);
    // The access log says which TLS version each request came over.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let log = loop {
        let text = std::fs::read_to_string(dir.path().join("access.log")).unwrap_or_default();
        if text.lines().count() >= 2 || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(log.matches(" tls=TLSv1.3 ").count(), 2, "{log}");
    let expiry = proxy
        .metric("bff_tls_certificate_expiry_timestamp_seconds")
        .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64();
    assert!(expiry > now, "expiry {expiry} is not in the future");
}

#[tokio::test]
async fn client_certificates_identify_clients_and_untrusted_ones_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("test CA");
    let echo = Upstream::echo("echo").await;
    let proxy = start(dir.path(), &ca, &echo, "").await;

    let kiosk = ca.client("device-17", &["spiffe://shop/kiosk"]);
    let (resp, _) = TlsClient::new(&ca, Some(&kiosk))
        .get(proxy.addr(), "/home", &[("x-client", "web")])
        .await
        .expect("served");
    assert_eq!(resp.status, 200);
    // The certificate rule comes first: a header cannot talk the kiosk into another client.
    assert_eq!(told_client(&echo), "kiosk");

    let staff = ca.client("staff-42", &[]);
    let (resp, _) = TlsClient::new(&ca, Some(&staff))
        .get(proxy.addr(), "/home", &[])
        .await
        .expect("served");
    assert_eq!(resp.status, 200);
    assert_eq!(told_client(&echo), "staff");

    // A certificate is optional by default: without one, the other rules decide.
    let (resp, _) = TlsClient::new(&ca, None)
        .get(proxy.addr(), "/home", &[])
        .await
        .expect("served");
    assert_eq!(resp.status, 200);
    assert_eq!(told_client(&echo), "web");

    // A certificate from another CA ends the connection before any request is read.
    let other_ca = Ca::new("someone else");
    let forged = other_ca.client("staff-1", &["spiffe://shop/kiosk"]);
    let before = echo.received().len();
    let refused = TlsClient::new(&ca, Some(&forged))
        .get(proxy.addr(), "/home", &[])
        .await;
    assert!(
        refused.is_err(),
        "an untrusted client certificate was served"
    );
    assert_eq!(echo.received().len(), before);
    assert_eq!(handshakes(&proxy, "bad_client_cert").await, 1.0);
}

#[tokio::test]
async fn the_verified_client_certificate_can_be_forwarded_and_a_forged_one_never_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("test CA");
    let echo = Upstream::echo("echo").await;
    let proxy = start(dir.path(), &ca, &echo, "forward_client_cert = true").await;
    let forged = [("x-forwarded-client-cert", "Hash=00;Subject=\"CN=admin\"")];

    let kiosk = ca.client("device-17", &["spiffe://shop/kiosk"]);
    let (resp, _) = TlsClient::new(&ca, Some(&kiosk))
        .get(proxy.addr(), "/", &forged)
        .await
        .expect("served");
    assert_eq!(resp.status, 200);
    let seen = echo.received().pop().expect("forwarded");
    let xfcc: Vec<_> = seen
        .headers
        .get_all("x-forwarded-client-cert")
        .iter()
        .map(|v| v.to_str().expect("ascii").to_owned())
        .collect();
    let fingerprint = bff_proxy_tests::sha256_hex_bytes(&kiosk.der);
    assert_eq!(
        xfcc,
        [format!(
            "Hash={fingerprint};Subject=\"CN=device-17\";URI=spiffe://shop/kiosk"
        )]
    );

    // No certificate: the client's own header is dropped, nothing is stated.
    let (resp, _) = TlsClient::new(&ca, None)
        .get(proxy.addr(), "/", &forged)
        .await
        .expect("served");
    assert_eq!(resp.status, 200);
    let seen = echo.received().pop().expect("forwarded");
    assert!(seen.headers.get("x-forwarded-client-cert").is_none());
}

#[tokio::test]
async fn required_client_certificates_refuse_connections_without_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("test CA");
    let echo = Upstream::echo("echo").await;
    let proxy = start(dir.path(), &ca, &echo, "client_cert = \"required\"").await;

    let refused = TlsClient::new(&ca, None).get(proxy.addr(), "/", &[]).await;
    assert!(refused.is_err(), "served without a client certificate");
    assert_eq!(handshakes(&proxy, "no_client_cert").await, 1.0);
    let staff = ca.client("staff-7", &[]);
    let (resp, _) = TlsClient::new(&ca, Some(&staff))
        .get(proxy.addr(), "/", &[])
        .await
        .expect("served with a certificate");
    assert_eq!(resp.status, 200);
    assert_eq!(echo.received().len(), 1);
}

#[tokio::test]
async fn the_certificate_is_chosen_by_the_name_the_client_asks_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("test CA");
    let echo = Upstream::echo("echo").await;
    ca.server_named("m.shop.test").write(dir.path(), "mobile");
    ca.server_named("*.kiosk.test").write(dir.path(), "kiosk");
    let sni = "[[tls.sni]]\nnames = [\"m.shop.test\"]\ncert = \"mobile.crt\"\nkey = \"mobile.key\"\n\
               [[tls.sni]]\nnames = [\"*.kiosk.test\"]\ncert = \"kiosk.crt\"\nkey = \"kiosk.key\"";
    let proxy = start(dir.path(), &ca, &echo, sni).await;
    let client = TlsClient::new(&ca, None);
    for (name, cn) in [
        ("m.shop.test", "m.shop.test"),
        ("M.Shop.Test", "m.shop.test"),
        ("store-12.kiosk.test", "*.kiosk.test"),
        // A wildcard covers one label; anything else gets the default certificate.
        ("localhost", "proxy v1"),
    ] {
        let stream = client.connect_to(proxy.addr(), name).await.expect(name);
        let cert = stream
            .get_ref()
            .1
            .peer_certificates()
            .expect("a certificate")[0]
            .clone();
        assert_eq!(common_name(&cert), cn, "{name}");
    }
    // A name only the default would serve, and the default does not cover it: the client
    // refuses the certificate.
    assert!(
        client
            .connect_to(proxy.addr(), "a.b.kiosk.test")
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_revoked_client_certificate_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("test CA");
    let echo = Upstream::echo("echo").await;
    let lost = ca.client("kiosk-lost", &["spiffe://shop/kiosk"]);
    let kept = ca.client("kiosk-kept", &["spiffe://shop/kiosk"]);
    std::fs::write(dir.path().join("clients.crl"), ca.crl(&[&lost])).expect("write CRL");
    let proxy = start(dir.path(), &ca, &echo, "client_crl = \"clients.crl\"").await;

    let (resp, _) = TlsClient::new(&ca, Some(&kept))
        .get(proxy.addr(), "/", &[])
        .await
        .expect("a certificate not on the CRL is served");
    assert_eq!(resp.status, 200);
    assert_eq!(told_client(&echo), "kiosk");
    let refused = TlsClient::new(&ca, Some(&lost))
        .get(proxy.addr(), "/", &[])
        .await;
    assert!(refused.is_err(), "a revoked certificate was served");
    assert_eq!(echo.received().len(), 1);
    assert_eq!(handshakes(&proxy, "bad_client_cert").await, 1.0);
}

#[tokio::test]
async fn a_reload_rotates_the_certificate_for_new_connections_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("test CA");
    let echo = Upstream::echo("echo").await;
    let proxy = start(dir.path(), &ca, &echo, "").await;
    let client = TlsClient::with_alpn(&ca, None, &[b"h2"]);

    // An HTTP/2 connection opened before the rotation.
    let before = client.connect(proxy.addr()).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake::<_, _, bff_proxy_tests::ClientBody>(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(before),
        )
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);

    ca.server("proxy v2").write(dir.path(), "server");
    let (status, record) = proxy.reload().await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["outcome"], "applied", "{record}");
    assert_eq!(record["config_changed"], true, "{record}");

    let (resp, cert) = client.get(proxy.addr(), "/", &[]).await.expect("served");
    assert_eq!(resp.status, 200);
    assert_eq!(common_name(&cert), "proxy v2");

    // The connection from before keeps its session and keeps being served.
    let req = http::Request::get(format!("https://localhost:{}/old", proxy.addr().port()))
        .body(bff_proxy_tests::empty())
        .expect("request");
    let resp = sender.send_request(req).await.expect("still served");
    assert_eq!(resp.status(), 200);

    // A broken certificate file is refused as a whole; the serving certificate stays.
    std::fs::write(dir.path().join("server.crt"), "not a certificate").expect("write");
    let (status, record) = proxy.reload().await;
    assert_eq!(status, 422, "{record}");
    assert_eq!(record["outcome"], "rejected", "{record}");
    let errors = record["errors"].to_string();
    assert!(errors.contains("tls.cert"), "{errors}");
    let (_, cert) = client.get(proxy.addr(), "/", &[]).await.expect("served");
    assert_eq!(common_name(&cert), "proxy v2");

    // HTTPS or cleartext is fixed at startup: a config without `[tls]` does not turn the
    // port into a cleartext one; the reload says it needs a restart.
    ca.server("proxy v3").write(dir.path(), "server");
    let text = std::fs::read_to_string(dir.path().join("bff.toml")).expect("read config");
    let start = text.find("[tls]").expect("a [tls] section");
    let end = text.find("[access_log]").expect("the next section");
    let plain = format!("{}{}", &text[..start], &text[end..])
        .replace(
            "{ client_cert = \"san_uri\", equals = \"spiffe://shop/kiosk\" }",
            "",
        )
        .replace(
            "{ client_cert = \"subject_cn\", regex = \"^staff-[0-9]+$\" }",
            "",
        );
    std::fs::write(dir.path().join("bff.toml"), plain).expect("write config");
    let (status, record) = proxy.reload().await;
    assert_eq!(status, 200, "{record}");
    let warnings = record["warnings"].to_string();
    assert!(warnings.contains("`tls` added or removed"), "{warnings}");
    let (resp, cert) = client
        .get(proxy.addr(), "/", &[])
        .await
        .expect("still HTTPS");
    assert_eq!(resp.status, 200);
    assert_eq!(common_name(&cert), "proxy v2");
    let config = proxy.admin_json("/admin/config").await;
    let cert_path = config["tls"]["cert"].as_str().unwrap_or_default();
    assert!(cert_path.ends_with("server.crt"), "{config}");
}

#[tokio::test]
async fn a_certificate_rotated_on_disk_is_picked_up_without_a_signal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).expect("mkdir");
    let ca = Ca::new("test CA");
    let echo = Upstream::echo("echo").await;
    ca.server("proxy v1").write(&certs, "server");
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write CA");
    // The certificate lives in another directory than the config, as with a mounted secret.
    let config = fill(CONFIG, &[("echo", &echo.url()), ("client_cert", "")])
        .replace("watch = false", "watch = true")
        .replace("\"server.", "\"certs/server.");
    std::fs::write(dir.path().join("bff.toml"), config).expect("write config");
    // Files younger than the first load make the watcher reload once to catch up; dated
    // back, only the rotation below can make it reload.
    let past = std::time::SystemTime::now() - Duration::from_secs(60);
    for file in ["bff.toml", "ca.pem", "certs/server.crt", "certs/server.key"] {
        std::fs::File::options()
            .write(true)
            .open(dir.path().join(file))
            .and_then(|f| f.set_modified(past))
            .expect("date the file back");
    }
    let proxy = TestProxy::start_file(&dir.path().join("bff.toml")).await;
    let client = TlsClient::new(&ca, None);
    let (_, cert) = client.get(proxy.addr(), "/", &[]).await.expect("served");
    assert_eq!(common_name(&cert), "proxy v1");

    ca.server("proxy v2").write(&certs, "server");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (resp, cert) = client.get(proxy.addr(), "/", &[]).await.expect("served");
        assert_eq!(resp.status, 200);
        if common_name(&cert) == "proxy v2" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rotated certificate was not served within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn failed_handshakes_are_counted_and_hurt_nobody_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("test CA");
    let echo = Upstream::echo("echo").await;
    let proxy = start(dir.path(), &ca, &echo, "").await;

    // Cleartext HTTP on the HTTPS port: a readable answer, then the connection is closed.
    let mut plain = RawConn::connect(proxy.addr()).await;
    plain.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let resp = plain.read_response(false).await.expect("an answer");
    resp.assert_error(400, "https_required");
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(
        plain.closed_within(Duration::from_secs(5)).await.is_some(),
        "the cleartext connection stayed open"
    );
    assert!(
        echo.received().is_empty(),
        "a cleartext request was forwarded"
    );
    // A client that never says hello is closed at the handshake timeout (1 s here).
    let mut silent = RawConn::connect(proxy.addr()).await;
    assert!(
        silent.closed_within(Duration::from_secs(5)).await.is_some(),
        "a silent connection stayed open"
    );
    // A client that does not trust the proxy's certificate gives up itself.
    let stranger = TlsClient::new(&Ca::new("another CA"), None);
    assert!(stranger.get(proxy.addr(), "/", &[]).await.is_err());

    let (resp, _) = TlsClient::new(&ca, None)
        .get(proxy.addr(), "/", &[])
        .await
        .expect("served");
    assert_eq!(resp.status, 200);
    assert_eq!(handshakes(&proxy, "cleartext").await, 1.0);
    assert_eq!(handshakes(&proxy, "protocol").await, 1.0);
    assert_eq!(handshakes(&proxy, "timeout").await, 1.0);
    assert_eq!(handshakes(&proxy, "ok").await, 1.0);
}

#[test]
fn sni_problems_are_config_problems() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("test CA");
    ca.server("default").write(dir.path(), "server");
    let a = ca.server_named("a.test");
    let b = ca.server_named("b.test");
    std::fs::write(dir.path().join("a.crt"), &a.cert_pem).expect("write");
    std::fs::write(dir.path().join("a.key"), &b.key_pem).expect("write");
    b.write(dir.path(), "b");
    let config = r#"
[tls]
cert = "server.crt"
key = "server.key"

[[tls.sni]]
names = ["a.test", "bad name", "*.*.test"]
cert = "a.crt"
key = "a.key"

[[tls.sni]]
names = ["A.test"]
cert = "server.crt"
key = "server.key"

[[tls.sni]]
names = ["c.test", "x.b.test"]
cert = "missing.crt"
key = "server.key"

[[tls.sni]]
names = ["b.test", "other.test"]
cert = "b.crt"
key = "b.key"

[services.echo]
urls = ["http://127.0.0.1:1"]

[[clients]]
name = "web"

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
            "tls.sni[0].key: the key in",
            "tls.sni[0].names[1]: `bad name` is not a host name",
            "tls.sni[0].names[2]: `*.*.test` is not a host name",
            "tls.sni[1].names[0]: `a.test` already has a certificate",
            "tls.sni[2].cert: cannot read",
            "tls.sni[3].names[1]: the certificate in",
            "is not valid for `other.test` (its names: b.test)",
        ],
    );
}

#[test]
fn certificate_problems_are_config_problems_reported_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("test CA");
    let a = ca.server("a");
    let b = ca.server("b");
    // The key of another certificate.
    std::fs::write(dir.path().join("server.crt"), &a.cert_pem).expect("write");
    std::fs::write(dir.path().join("server.key"), &b.key_pem).expect("write");
    let config = r#"
[tls]
cert = "server.crt"
key = "server.key"
client_ca = "missing-ca.pem"
client_crl = "missing.crl"
min_version = "1.1"

[services.echo]
urls = ["http://127.0.0.1:1"]

[[clients]]
name = "kiosk"
identify = [{ client_cert = "san_uri", equals = "spiffe://shop/kiosk" }]

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
            "tls.min_version: unknown variant `1.1`, expected `1.2` or `1.3`",
            "tls.client_crl: cannot read",
            "tls.client_ca: cannot read",
            "missing-ca.pem",
        ],
    );

    // Fixed CA path and version: now the key mismatch shows (it needs all files readable).
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write");
    let text = config_file_problems(
        &path,
        &config
            .replace("missing-ca.pem", "ca.pem")
            .replace("client_crl = \"missing.crl\"\n", "")
            .replace("\"1.1\"", "\"1.3\""),
    );
    assert_mentions(
        &text,
        &["tls.key: the key in", "does not belong to the certificate"],
    );

    // Without `client_ca`, a certificate rule can never match, and `required` means nothing.
    std::fs::write(dir.path().join("server.key"), &a.key_pem).expect("write");
    let text = config_file_problems(
        &path,
        &config
            .replace(
                "client_ca = \"missing-ca.pem\"",
                "client_cert = \"required\"",
            )
            .replace("\"1.1\"", "\"1.2\""),
    );
    assert_mentions(
        &text,
        &[
            "tls.client_crl: goes with `tls.client_ca`",
            "tls.client_cert: `required` needs `tls.client_ca`",
            "clients[0].identify[0].client_cert: needs `[tls]` with `client_ca`",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// TLS to upstream services (`https://` URLs)
// ---------------------------------------------------------------------------------------------

/// One `https://` service `secure` at `url`, its `[services.secure.tls]` lines in `tls`.
const UPSTREAM_CONFIG: &str = r#"
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[access_log]
enabled = false

[reload]
watch = false

[identity]
default_client = "web"

[services.secure]
urls = ["{url}"]
protocol = "{protocol}"

[services.secure.tls]
{tls}

[[clients]]
name = "web"

[[routes]]
id = "all"
path = "/{*rest}"
service = "secure"
"#;

async fn start_upstream_proxy(dir: &Path, url: &str, protocol: &str, tls: &str) -> TestProxy {
    let config = fill(
        UPSTREAM_CONFIG,
        &[("url", url), ("protocol", protocol), ("tls", tls)],
    );
    std::fs::write(dir.join("bff.toml"), config).expect("write config");
    TestProxy::start_file(&dir.join("bff.toml")).await
}

#[tokio::test]
async fn https_upstreams_are_verified_over_http1_and_http2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("internal CA");
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write CA");
    let config = ca.server("payments").server_config(None);
    let upstream = Upstream::builder("payments").tls(config).start().await;

    for (protocol, version) in [
        ("http1", http::Version::HTTP_11),
        ("http2", http::Version::HTTP_2),
    ] {
        let proxy =
            start_upstream_proxy(dir.path(), &upstream.url(), protocol, r#"ca = "ca.pem""#).await;
        let resp = bff_proxy_tests::get(proxy.addr(), "/pay", &[]).await;
        assert_eq!(resp.status, 200, "{protocol}: {}", resp.text());
        let seen = upstream.received().pop().expect("a request");
        assert_eq!(seen.version, version, "{protocol}");
        assert_eq!(seen.uri, "/pay");
        // The default port is left out of `host`; this one is not the default.
        assert_eq!(
            seen.headers.get("host").map(|h| h.to_str().expect("ascii")),
            (protocol == "http1")
                .then(|| format!("localhost:{}", upstream.addr().port()))
                .as_deref(),
        );
    }

    // A service certificate from a CA the service does not trust: no connection, a 502, and
    // the upstream saw nothing.
    let other = Ca::new("someone else");
    std::fs::write(dir.path().join("other.pem"), other.pem()).expect("write CA");
    let before = upstream.received().len();
    for protocol in ["http1", "http2"] {
        let proxy =
            start_upstream_proxy(dir.path(), &upstream.url(), protocol, r#"ca = "other.pem""#)
                .await;
        bff_proxy_tests::get(proxy.addr(), "/pay", &[])
            .await
            .assert_error(502, "upstream_unavailable");
    }
    assert_eq!(upstream.received().len(), before);
}

#[tokio::test]
async fn the_proxy_presents_its_certificate_to_upstreams_that_ask() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("internal CA");
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write CA");
    ca.client("bff-proxy", &["spiffe://shop/bff"])
        .write(dir.path(), "bff");
    // The upstream requires a client certificate from the same CA, for a DNS name only.
    let config = ca
        .server_named("payments.internal")
        .server_config(Some(&ca));
    let upstream = Upstream::builder("payments").tls(config).start().await;
    let url = format!("https://127.0.0.1:{}", upstream.addr().port());

    let proxy = start_upstream_proxy(
        dir.path(),
        &url,
        "http1",
        "ca = \"ca.pem\"\ncert = \"bff.crt\"\nkey = \"bff.key\"\nserver_name = \"payments.internal\"",
    )
    .await;
    let resp = bff_proxy_tests::get(proxy.addr(), "/pay", &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = upstream.received().pop().expect("a request");
    let cert = seen.client_cert.expect("the proxy presented a certificate");
    assert_eq!(common_name(&cert), "bff-proxy");

    // Without the name override the certificate does not match 127.0.0.1; without a client
    // certificate the upstream refuses the handshake.
    for tls in [
        "ca = \"ca.pem\"\ncert = \"bff.crt\"\nkey = \"bff.key\"",
        "ca = \"ca.pem\"\nserver_name = \"payments.internal\"",
    ] {
        let proxy = start_upstream_proxy(dir.path(), &url, "http1", tls).await;
        let resp = bff_proxy_tests::get(proxy.addr(), "/pay", &[]).await;
        assert_eq!(resp.status, 502, "{tls}: {}", resp.text());
    }
}

#[test]
fn upstream_tls_problems_are_config_problems() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = r#"
[services.mixed]
urls = ["https://a.internal", "http://b.internal"]

[services.plain]
urls = ["http://c.internal"]
tls = { ca = "ca.pem" }

[services.secure]
urls = ["https://d.internal"]
tls = { ca = "missing.pem", cert = "bff.crt", server_name = "not a name" }

[[clients]]
name = "web"

[[routes]]
id = "all"
path = "/"
service = "plain"
"#;
    let path = dir.path().join("bff.toml");
    let text = config_file_problems(&path, config);
    assert_mentions(
        &text,
        &[
            "services.mixed.urls: mix of http:// and https:// URLs",
            "services.plain.tls: applies to https:// URLs; this service has none",
            "services.secure.tls.ca: cannot read",
            "services.secure.tls.key: `cert` needs its `key`",
            "services.secure.tls.server_name: `not a name` is not a DNS name or IP address",
        ],
    );
}
