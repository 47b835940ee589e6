//! TLS for the HTTPS tests: a throwaway CA per test (rcgen), the server and client
//! certificates it signs, and a client that speaks HTTP/1.1 or HTTP/2 over rustls, whichever
//! ALPN settled on.
//!
//! Nothing is committed: every key is generated when the test runs.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::{ClientBody, TestResponse, bounded, build_request, empty, read_response};

/// A certificate authority that lives for one test.
#[derive(Debug)]
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate with its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PKCS#8 PEM).
    pub key_pem: String,
    /// The certificate (DER).
    pub der: CertificateDer<'static>,
    /// Its serial number (what a CRL lists).
    pub serial: rcgen::SerialNumber,
}

impl Issued {
    /// A server config presenting this certificate, offering `h2` and `http/1.1`, and asking
    /// for a client certificate signed by `client_ca` when given (required then).
    pub fn server_config(&self, client_ca: Option<&Ca>) -> Arc<rustls::ServerConfig> {
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("a private key");
        let builder = rustls::ServerConfig::builder();
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.issuer.der().clone()).expect("a valid root");
                let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .expect("a client verifier");
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(vec![self.der.clone()], key)
            .expect("a server config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// Writes `NAME.crt` and `NAME.key` into `dir`.
    pub fn write(&self, dir: &Path, name: &str) {
        std::fs::write(dir.join(format!("{name}.crt")), &self.cert_pem).expect("write cert");
        std::fs::write(dir.join(format!("{name}.key")), &self.key_pem).expect("write key");
    }
}

impl Ca {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("self-signed CA"),
        }
    }

    /// The CA certificate (PEM), what `tls.client_ca` or a client's trust store holds.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `localhost` and `127.0.0.1`, subject CN `cn`.
    pub fn server(&self, cn: &str) -> Issued {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        params.distinguished_name.push(DnType::CommonName, cn);
        self.sign(params)
    }

    /// A server certificate for exactly the DNS name `dns` (no IP address).
    pub fn server_named(&self, dns: &str) -> Issued {
        let mut params = CertificateParams::new(vec![dns.to_owned()]).expect("params");
        params.distinguished_name.push(DnType::CommonName, dns);
        self.sign(params)
    }

    /// A client certificate with subject CN `cn` and the URI SANs `uris`.
    pub fn client(&self, cn: &str, uris: &[&str]) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().expect("an ASCII URI")));
        }
        params
            .extended_key_usages
            .push(rcgen::ExtendedKeyUsagePurpose::ClientAuth);
        self.sign(params)
    }

    fn sign(&self, mut params: CertificateParams) -> Issued {
        // Distinct serials (what a CRL names a certificate by).
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let serial = rcgen::SerialNumber::from_slice(&n.to_be_bytes());
        params.serial_number = Some(serial.clone());
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed leaf");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            serial,
        }
    }

    /// A CRL (PEM) of this CA revoking `revoked`.
    pub fn crl(&self, revoked: &[&Issued]) -> String {
        let params = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2026, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|c| rcgen::RevokedCertParams {
                    serial_number: c.serial.clone(),
                    revocation_time: rcgen::date_time_ymd(2026, 6, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer)
            .expect("a signed CRL")
            .pem()
            .expect("a PEM CRL")
    }
}

/// A TLS client trusting one CA, optionally presenting a certificate.
#[derive(Debug, Clone)]
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
}

impl TlsClient {
    /// Trusts `ca`, presents `identity` if given, offers `h2` and `http/1.1` by ALPN.
    pub fn new(ca: &Ca, identity: Option<&Issued>) -> Self {
        Self::with_alpn(ca, identity, &[b"h2", b"http/1.1"])
    }

    /// Like [`TlsClient::new`], offering exactly `alpn`.
    pub fn with_alpn(ca: &Ca, identity: Option<&Issued>, alpn: &[&[u8]]) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.issuer.der().clone())
            .expect("the test CA is a valid root");
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let mut config = match identity {
            Some(id) => {
                let key =
                    PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).expect("a private key");
                builder
                    .with_client_auth_cert(vec![id.der.clone()], key)
                    .expect("a usable client certificate")
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Self {
            config: Arc::new(config),
        }
    }

    /// Connects and completes the handshake for `localhost`. With TLS 1.3 a server that
    /// refuses the client's certificate says so after the client's side of the handshake is
    /// done: the first request fails, not this.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
        self.connect_to(addr, "localhost").await
    }

    /// Like [`TlsClient::connect`], asking for (and verifying) `server_name`.
    pub async fn connect_to(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let name = ServerName::try_from(server_name.to_owned()).expect("a valid server name");
        bounded("TLS connect", async {
            let tcp = TcpStream::connect(addr).await?;
            tokio_rustls::TlsConnector::from(self.config.clone())
                .connect(name, tcp)
                .await
        })
        .await
    }

    /// `GET path` on a fresh connection, over HTTP/2 if ALPN chose `h2`, else HTTP/1.1.
    /// Also returns the server certificate the connection saw (DER).
    pub async fn get(
        &self,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<(TestResponse, CertificateDer<'static>)> {
        let stream = self.connect(addr).await?;
        let (_, session) = stream.get_ref();
        let server_cert = session
            .peer_certificates()
            .and_then(|c| c.first())
            .cloned()
            .expect("the server presented a certificate");
        let h2 = session.alpn_protocol() == Some(b"h2");
        let req = build_request(addr, "GET", path, headers, empty());
        let io = hyper_util::rt::TokioIo::new(stream);
        let resp = if h2 {
            let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, ClientBody>(
                hyper_util::rt::TokioExecutor::new(),
                io,
            )
            .await
            .map_err(std::io::Error::other)?;
            tokio::spawn(conn);
            bounded("response head", sender.send_request(req)).await
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(conn);
            bounded("response head", sender.send_request(req)).await
        }
        .map_err(std::io::Error::other)?;
        Ok((read_response(resp).await, server_cert))
    }
}
