//! TLS termination: the accept phase's handshake, between the TCP accept and HTTP.
//!
//! `[tls]` turns the data-plane port into an HTTPS port (rustls with the aws-lc-rs provider,
//! so the X25519MLKEM768 post-quantum hybrid key exchange is preferred; ALPN offers `h2` and
//! `http/1.1`, so HTTP/2 and HTTP/1.1 share the port as they do in cleartext). `[[tls.sni]]`
//! adds certificates chosen by the name the client asks for ([`SniResolver`]). With
//! `client_ca` set, clients are asked for a certificate signed by one of those CAs (mutual
//! TLS): required, or optional so certificate-less clients are identified by other rules;
//! `client_crl` refuses revoked ones. The names on a verified client certificate
//! ([`ClientCert`]) feed the `client_cert` identification rules.
//!
//! The files are read, parsed and checked when the config loads (a missing file, a key that
//! does not match its certificate or an unusable CA bundle is a config problem like any
//! other), and their content is part of the config: a reload after a certificate rotation
//! builds a new acceptor, and connections accepted from then on use it. Connections already
//! open keep the session they negotiated.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::files::{Digested, Files};
use crate::config::{ConfigPath, Problems};
use crate::host::HostPattern;

/// `[tls]`: serve HTTPS on the data-plane port.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the server certificate first, then its intermediates.
    pub cert: PathBuf,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM bundle of the CAs that sign client certificates; set, clients are asked for one.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// PEM file of certificate revocation lists (one or more) from the client CAs: a client
    /// certificate listed there is refused. Only the client's own certificate is checked, and
    /// a certificate from a CA without a CRL here is not refused for that.
    #[serde(default)]
    pub client_crl: Option<PathBuf>,
    /// With `client_ca`: `optional` (default; a client without a certificate is identified
    /// by other rules) or `required` (the handshake fails without a valid certificate).
    #[serde(default)]
    pub client_cert: ClientCertMode,
    /// Oldest protocol version accepted: `"1.2"` (default) or `"1.3"`.
    #[serde(default)]
    pub min_version: TlsVersion,
    /// More certificates, chosen by the name the client asks for (SNI); `cert` serves every
    /// other name and clients that send none.
    #[serde(default)]
    pub sni: Vec<SniCert>,
    /// Tell upstreams about a verified client certificate in `x-forwarded-client-cert`
    /// (Envoy's format: `Hash=...;Subject="...";URI=...;DNS=...`). A copy sent by the client
    /// is removed whenever `[tls]` is set: this proxy is the one that saw the certificate.
    #[serde(default)]
    pub forward_client_cert: bool,
    /// What the files held when the config was loaded.
    #[serde(skip)]
    pub(crate) loaded: Option<Loaded>,
}

/// `[[tls.sni]]`: a certificate for clients asking for one of `names`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SniCert {
    /// Host names (`m.shop.example`), or `*.shop.example` for any one label in front.
    pub names: Vec<String>,
    /// PEM file: the certificate, then its intermediates.
    pub cert: PathBuf,
    /// PEM file: its private key.
    pub key: PathBuf,
}

/// `tls.client_cert`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientCertMode {
    /// Verified when presented; a connection without one is still served.
    #[default]
    Optional,
    /// No valid client certificate, no connection.
    Required,
}

/// `tls.min_version`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// The acceptor built from the files (compared by their digest, so a rotated certificate
/// makes a reload apply).
pub(crate) type Loaded = Digested<Acceptor>;

/// A rustls server config and what the config needs to know about its certificate.
#[derive(Clone)]
pub(crate) struct Acceptor {
    pub(crate) server: Arc<rustls::ServerConfig>,
    /// The server certificate's `notAfter`, in seconds since the Unix epoch.
    pub(crate) not_after: i64,
}

impl TlsConfig {
    /// Makes relative paths relative to `base` (the config file's directory).
    pub(crate) fn resolve(&mut self, base: &Path) {
        for p in [
            Some(&mut self.cert),
            Some(&mut self.key),
            self.client_ca.as_mut(),
            self.client_crl.as_mut(),
        ]
        .into_iter()
        .flatten()
        .chain(self.sni.iter_mut().flat_map(|s| [&mut s.cert, &mut s.key]))
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Every file this section names (for the watcher).
    pub(crate) fn files(&self) -> impl Iterator<Item = &PathBuf> {
        [
            Some(&self.cert),
            Some(&self.key),
            self.client_ca.as_ref(),
            self.client_crl.as_ref(),
        ]
        .into_iter()
        .flatten()
        .chain(self.sni.iter().flat_map(|s| [&s.cert, &s.key]))
    }

    /// Reads the files and builds the acceptor, recording every problem under `at`.
    pub(crate) fn load(&mut self, at: &ConfigPath, problems: &mut Problems) {
        self.loaded = None;
        let mut files = Files::new();
        let cert = files.certificates(&self.cert, at.key("cert"), problems);
        let key = files.private_key(&self.key, at.key("key"), problems);
        let roots = match &self.client_ca {
            Some(path) => files.roots(path, at.key("client_ca"), problems).map(Some),
            None => {
                if self.client_cert == ClientCertMode::Required {
                    problems.push(
                        at.key("client_cert"),
                        "`required` needs `tls.client_ca`: the CAs client certificates must chain to",
                    );
                }
                Some(None)
            }
        };
        let crls = match (&self.client_crl, &self.client_ca) {
            (Some(path), Some(_)) => files.crls(path, at.key("client_crl"), problems),
            (Some(_), None) => {
                problems.push(
                    at.key("client_crl"),
                    "goes with `tls.client_ca`: without it no client certificate is checked",
                );
                None
            }
            (None, _) => Some(Vec::new()),
        };
        let default = cert.zip(key).and_then(|(cert, key)| {
            certified(cert, key, &self.cert, &self.key, &at.key("key"), problems)
        });
        let sni = self.load_sni(&mut files, at, problems);
        let (Some(default), Some(roots), Some(crls), Some(sni)) = (default, roots, crls, sni)
        else {
            return;
        };
        // The first certificate to expire is the one to watch.
        let not_after = std::iter::once(&default)
            .chain(sni.iter().map(|(_, k)| k))
            .map(|(_, not_after)| *not_after)
            .min()
            .unwrap_or(default.1);
        let resolver = SniResolver::new(default.0, sni);
        match self.server_config(resolver, roots, crls) {
            Ok(server) => {
                let acceptor = Acceptor {
                    server: Arc::new(server),
                    not_after,
                };
                self.loaded = Some(Digested::new(acceptor, files));
            }
            Err((field, message)) => problems.push(at.key(field), message),
        }
    }

    /// The `[[tls.sni]]` certificates by name; `None` if any is unusable (problems recorded).
    fn load_sni(
        &self,
        files: &mut Files,
        at: &ConfigPath,
        problems: &mut Problems,
    ) -> Option<Vec<(String, Certified)>> {
        let before = problems.len();
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, entry) in self.sni.iter().enumerate() {
            let at = at.key("sni").index(i);
            let cert = files.certificates(&entry.cert, at.key("cert"), problems);
            let key = files.private_key(&entry.key, at.key("key"), problems);
            let covers = cert.as_ref().map(|c| dns_names(&c[0]));
            let loaded = cert.zip(key).and_then(|(cert, key)| {
                certified(cert, key, &entry.cert, &entry.key, &at.key("key"), problems)
            });
            if entry.names.is_empty() {
                problems.push(at.key("names"), "names no host: nobody would get it");
            }
            for (j, name) in entry.names.iter().enumerate() {
                let name = name.to_ascii_lowercase();
                if let Err(e) = HostPattern::parse(&name) {
                    problems.push(at.key("names").index(j), e);
                } else if !seen.insert(name.clone()) {
                    problems.push(
                        at.key("names").index(j),
                        format!("`{name}` already has a certificate"),
                    );
                } else if let Some(covered) = covers.as_ref().filter(|c| !covered_by(&name, c)) {
                    problems.push(
                        at.key("names").index(j),
                        format!(
                            "the certificate in `{}` is not valid for `{name}` (its names: {})",
                            entry.cert.display(),
                            if covered.is_empty() {
                                "none".to_owned()
                            } else {
                                covered.join(", ")
                            }
                        ),
                    );
                } else if let Some(k) = &loaded {
                    out.push((name, k.clone()));
                }
            }
        }
        (problems.len() == before).then_some(out)
    }

    fn server_config(
        &self,
        certificates: SniResolver,
        roots: Option<rustls::RootCertStore>,
        crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
    ) -> Result<rustls::ServerConfig, (&'static str, String)> {
        let provider = provider();
        let versions: &[&rustls::SupportedProtocolVersion] = match self.min_version {
            TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| ("min_version", e.to_string()))?;
        let builder = match roots {
            Some(roots) => {
                let mut verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                if !crls.is_empty() {
                    verifier = verifier
                        .with_crls(crls)
                        .only_check_end_entity_revocation()
                        .allow_unknown_revocation_status();
                }
                let verifier = match self.client_cert {
                    ClientCertMode::Optional => verifier.allow_unauthenticated(),
                    ClientCertMode::Required => verifier,
                }
                .build()
                .map_err(|e| ("client_ca", format!("unusable CA bundle or CRL: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut server = builder.with_cert_resolver(Arc::new(certificates));
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // Stateless resumption: a returning client skips the full handshake.
        if let Ok(ticketer) = rustls::crypto::aws_lc_rs::Ticketer::new() {
            server.ticketer = ticketer;
        }
        Ok(server)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A certificate chain with its key, and the leaf's `notAfter` (seconds since the Unix epoch).
type Certified = (Arc<CertifiedKey>, i64);

/// A certificate chain with its key, checked to belong together, and the leaf's `notAfter`
/// (seconds since the Unix epoch); `None` with a problem at `at` otherwise.
fn certified(
    cert: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: &Path,
    key_path: &Path,
    at: &ConfigPath,
    problems: &mut Problems,
) -> Option<Certified> {
    let not_after = match x509_parser::parse_x509_certificate(&cert[0]) {
        Ok((_, parsed)) => parsed.validity().not_after.timestamp(),
        Err(e) => {
            problems.push(
                at.clone(),
                format!(
                    "the first certificate of `{}` cannot be parsed: {e}",
                    cert_path.display()
                ),
            );
            return None;
        }
    };
    match CertifiedKey::from_der(cert, key, &provider()) {
        Ok(k) => Some((Arc::new(k), not_after)),
        Err(rustls::Error::InconsistentKeys(_)) => {
            problems.push(
                at.clone(),
                format!(
                    "the key in `{}` does not belong to the certificate in `{}`",
                    key_path.display(),
                    cert_path.display()
                ),
            );
            None
        }
        Err(e) => {
            problems.push(at.clone(), format!("cannot use this key: {e}"));
            None
        }
    }
}

/// The DNS names a certificate is valid for (its subject alternative names), lowercase.
fn dns_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// True if a certificate valid for `names` is valid for `name` (lowercase; `*.parent` in either
/// covers one label under `parent`).
fn covered_by(name: &str, names: &[String]) -> bool {
    names
        .iter()
        .any(|n| n == name || HostPattern::parse(n).is_ok_and(|p| p.matches(name)))
}

/// Picks the certificate for a handshake by the name the client asked for: an exact name,
/// else a `*.` name for its parent domain, else the default.
#[derive(Debug)]
struct SniResolver {
    default: Arc<CertifiedKey>,
    /// Lowercase names (`*.`-prefixed for wildcards).
    by_name: std::collections::HashMap<String, Arc<CertifiedKey>>,
}

impl SniResolver {
    fn new(default: Arc<CertifiedKey>, sni: Vec<(String, Certified)>) -> Self {
        Self {
            default,
            by_name: sni.into_iter().map(|(name, (k, _))| (name, k)).collect(),
        }
    }

    fn pick(&self, name: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = name.filter(|_| !self.by_name.is_empty()) else {
            return &self.default;
        };
        let name = name.to_ascii_lowercase();
        self.by_name
            .get(&name)
            .or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.by_name.get(&format!("*.{parent}"))
            })
            .unwrap_or(&self.default)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()).clone())
    }
}

/// What a verified client certificate says about its holder: the names identification rules
/// match on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ClientCert {
    /// The subject distinguished name (RFC 4514 text, `CN=kiosk-7,O=Shop`).
    pub(crate) subject: String,
    /// Subject common names (usually one).
    pub(crate) subject_cn: Vec<String>,
    /// DNS names in the subject alternative name extension.
    pub(crate) san_dns: Vec<String>,
    /// URIs in it (SPIFFE IDs such as `spiffe://shop/ns/prod/sa/kiosk`).
    pub(crate) san_uri: Vec<String>,
    /// E-mail addresses in it.
    pub(crate) san_email: Vec<String>,
    /// SHA-256 of the certificate's DER encoding, lowercase hex.
    pub(crate) fingerprint: String,
}

impl ClientCert {
    /// Reads the leaf of a chain rustls verified. `None` if it does not parse (it cannot
    /// happen for a certificate webpki accepted, but a connection is no place to panic).
    pub(crate) fn from_der(der: &[u8]) -> Option<Self> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let mut out = Self {
            subject: cert.subject().to_string(),
            subject_cn: cert
                .subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
                .collect(),
            fingerprint: hex::encode(Sha256::digest(der)),
            ..Self::default()
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(n) => out.san_dns.push((*n).to_owned()),
                    GeneralName::URI(u) => out.san_uri.push((*u).to_owned()),
                    GeneralName::RFC822Name(m) => out.san_email.push((*m).to_owned()),
                    _ => {}
                }
            }
        }
        Some(out)
    }

    /// The `x-forwarded-client-cert` element for this certificate (Envoy's format).
    pub(crate) fn xfcc(&self) -> String {
        // Quoted when it holds a separator; `"` and `\` escaped inside quotes.
        fn value(out: &mut String, v: &str, always_quote: bool) {
            if always_quote || v.contains([',', ';', '=', '"']) {
                out.push('"');
                for c in v.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            } else {
                out.push_str(v);
            }
        }
        let mut out = format!("Hash={}", self.fingerprint);
        out.push_str(";Subject=");
        value(&mut out, &self.subject, true);
        for (key, values) in [("URI", &self.san_uri), ("DNS", &self.san_dns)] {
            for v in values {
                out.push(';');
                out.push_str(key);
                out.push('=');
                value(&mut out, v, false);
            }
        }
        out
    }
}

/// What the handshake established, kept for the connection's requests.
#[derive(Debug, Clone, Default)]
pub(crate) struct TlsInfo {
    /// The negotiated version, as the access log writes it (`TLSv1.3`).
    pub(crate) version: &'static str,
    /// The client's verified certificate, if it sent one.
    pub(crate) client_cert: Option<Arc<ClientCert>>,
}

impl TlsInfo {
    pub(crate) fn of(conn: &rustls::ServerConnection) -> Self {
        Self {
            version: match conn.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
                _ => "TLS",
            },
            client_cert: conn
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| ClientCert::from_der(leaf))
                .map(Arc::new),
        }
    }
}

/// Why a handshake failed, as the bounded `reason` label of `bff_tls_handshake_errors_total`.
pub(crate) fn failure_reason(e: &std::io::Error) -> &'static str {
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return "io";
    };
    match tls {
        rustls::Error::NoCertificatesPresented => "no_client_cert",
        rustls::Error::InvalidCertificate(_) => "bad_client_cert",
        rustls::Error::NoApplicationProtocol | rustls::Error::PeerIncompatible(_) => "incompatible",
        _ => "protocol",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ConnectionFamilies;

    #[test]
    fn forwarded_client_cert_quotes_what_needs_quoting() {
        let cert = ClientCert {
            subject: r#"CN=kiosk "7",O=Shop"#.into(),
            subject_cn: vec![r#"kiosk "7""#.into()],
            san_uri: vec!["spiffe://shop/kiosk".into(), "urn:a;b".into()],
            san_dns: vec!["kiosk.shop".into()],
            san_email: vec![],
            fingerprint: "ab01".into(),
        };
        assert_eq!(
            cert.xfcc(),
            r#"Hash=ab01;Subject="CN=kiosk \"7\",O=Shop";URI=spiffe://shop/kiosk;URI="urn:a;b";DNS=kiosk.shop"#
        );
    }

    #[test]
    fn a_name_is_covered_exactly_or_by_a_one_label_wildcard() {
        let names = ["shop.example".to_owned(), "*.kiosk.example".to_owned()];
        assert!(covered_by("shop.example", &names));
        assert!(covered_by("a.kiosk.example", &names));
        assert!(covered_by("*.kiosk.example", &names));
        for not in [
            "www.shop.example",
            "kiosk.example",
            "a.b.kiosk.example",
            ".kiosk.example",
        ] {
            assert!(!covered_by(not, &names), "{not}");
        }
    }

    #[test]
    fn failure_reasons_are_the_exported_label_values() {
        let tls = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let cases = [
            (
                tls(rustls::Error::NoCertificatesPresented),
                "no_client_cert",
            ),
            (
                tls(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer,
                )),
                "bad_client_cert",
            ),
            (tls(rustls::Error::NoApplicationProtocol), "incompatible"),
            (tls(rustls::Error::DecryptError), "protocol"),
            (std::io::ErrorKind::ConnectionReset.into(), "io"),
        ];
        for (error, want) in cases {
            let got = failure_reason(&error);
            assert_eq!(got, want, "{error}");
            assert!(ConnectionFamilies::TLS_RESULTS.contains(&got), "{got}");
        }
    }
}
