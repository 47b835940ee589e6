//! TLS to upstream services: the client side, for `https://` service URLs.
//!
//! A service's `tls` table says which CAs its certificate must chain to (`ca`; the system's
//! trust store when unset) and, for services that want mutual TLS, the proxy's own certificate
//! and key. Like the listener's TLS files they are read and checked when the config loads and
//! belong to the config (by digest): a reload after a rotation builds new pools. There is
//! deliberately no switch to skip verification.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};

use crate::config::files::{Digested, Files};
use crate::config::{ConfigPath, Problems};

/// `[services.NAME.tls]`: how `https://` URLs of the service are reached.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM bundle of the CAs the service's certificate must chain to; the system's trust
    /// store when unset.
    pub ca: Option<PathBuf>,
    /// PEM certificate (then intermediates) the proxy presents to the service (mutual TLS).
    pub cert: Option<PathBuf>,
    /// Its private key.
    pub key: Option<PathBuf>,
    /// Name to send (SNI) and verify instead of the URL's host.
    pub server_name: Option<String>,
    /// The client config built from the files when the config was loaded.
    #[serde(skip)]
    pub(crate) loaded: Option<ClientTls>,
}

/// The client config built from the files (compared by their digest).
pub(crate) type ClientTls = Digested<Arc<rustls::ClientConfig>>;

impl UpstreamTlsConfig {
    /// Makes relative paths relative to `base`.
    pub(crate) fn resolve(&mut self, base: &Path) {
        for p in [self.ca.as_mut(), self.cert.as_mut(), self.key.as_mut()]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Reads the files and builds the client config, recording every problem under `at`.
    pub(crate) fn load(&mut self, at: &ConfigPath, problems: &mut Problems) {
        self.loaded = None;
        let before = problems.len();
        let mut files = Files::new();
        let roots = match &self.ca {
            Some(path) => files.roots(path, at.key("ca"), problems),
            None => {
                let mut roots = rustls::RootCertStore::empty();
                let (added, _) =
                    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                if added == 0 {
                    problems.push(
                        at.key("ca"),
                        "the system's trust store has no usable CA certificate; name the CAs \
                         the service's certificate chains to here",
                    );
                }
                Some(roots)
            }
        };
        let identity = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let cert = files.certificates(cert, at.key("cert"), problems);
                let key = files.private_key(key, at.key("key"), problems);
                cert.zip(key)
            }
            (None, None) => None,
            (Some(_), None) => {
                problems.push(at.key("key"), "`cert` needs its `key`");
                None
            }
            (None, Some(_)) => {
                problems.push(at.key("cert"), "`key` needs its `cert`");
                None
            }
        };
        if let Some(name) = &self.server_name
            && ServerName::try_from(name.as_str()).is_err()
        {
            problems.push(
                at.key("server_name"),
                format!("`{name}` is not a DNS name or IP address"),
            );
        }
        let Some(roots) = roots.filter(|_| problems.len() == before) else {
            return;
        };
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("the default provider supports the default versions")
        .with_root_certificates(roots);
        let config = match identity {
            Some((cert, key)) => match builder.with_client_auth_cert(cert, key) {
                Ok(c) => c,
                Err(e) => {
                    problems.push(
                        at.key("key"),
                        format!("cannot use this key with the certificate: {e}"),
                    );
                    return;
                }
            },
            None => builder.with_no_client_auth(),
        };
        self.loaded = Some(Digested::new(Arc::new(config), files));
    }
}

/// What one `https://` URL's connections need: the client config (ALPN set for the wire
/// protocol) and the name to verify.
#[derive(Debug, Clone)]
pub(crate) struct Connector {
    pub(crate) config: Arc<rustls::ClientConfig>,
    pub(crate) server_name: ServerName<'static>,
}

impl Connector {
    /// For an HTTP/1.1 pool: ALPN `http/1.1`.
    pub(crate) fn http1(tls: &ClientTls, server_name: ServerName<'static>) -> Self {
        let mut config = (***tls).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            config: Arc::new(config),
            server_name,
        }
    }

    /// Connects TLS over `stream`.
    pub(crate) async fn connect(
        &self,
        stream: tokio::net::TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(self.server_name.clone(), stream)
            .await
    }
}
