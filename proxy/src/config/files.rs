//! Key material a config names (TLS certificates, keys and CA bundles, a JWKS): read while the
//! config loads, with a digest of everything read, so two configs are equal only if their
//! files held the same bytes and a rotated file makes a reload apply.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use super::{ConfigPath, Problems};

/// Reads files for one config section, digesting what it reads. Each read names the key the
/// path came from (`at`), where its problems are reported.
pub(crate) struct Files {
    digest: Sha256,
}

impl Files {
    pub(crate) fn new() -> Self {
        Self {
            digest: Sha256::new(),
        }
    }

    /// The file's bytes, or a problem at `at` naming the file.
    pub(crate) fn read(
        &mut self,
        path: &Path,
        at: ConfigPath,
        problems: &mut Problems,
    ) -> Option<Vec<u8>> {
        match std::fs::read(path) {
            Ok(bytes) => {
                self.digest.update((bytes.len() as u64).to_le_bytes());
                self.digest.update(&bytes);
                Some(bytes)
            }
            Err(e) => {
                problems.push(at, format!("cannot read `{}`: {e}", path.display()));
                None
            }
        }
    }

    /// Every certificate of a PEM file, in order (at least one), or a problem at `at`.
    pub(crate) fn certificates(
        &mut self,
        path: &Path,
        at: ConfigPath,
        problems: &mut Problems,
    ) -> Option<Vec<CertificateDer<'static>>> {
        let pem = self.read(path, at.clone(), problems)?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not a PEM certificate file: {e}"))
            .and_then(|certs| {
                if certs.is_empty() {
                    Err("no `CERTIFICATE` block in the file".to_owned())
                } else {
                    Ok(certs)
                }
            });
        certs.map_err(|e| problems.push(at, e)).ok()
    }

    /// A CA bundle as a root store, or a problem at `at`.
    pub(crate) fn roots(
        &mut self,
        path: &Path,
        at: ConfigPath,
        problems: &mut Problems,
    ) -> Option<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        for (i, cert) in self
            .certificates(path, at.clone(), problems)?
            .into_iter()
            .enumerate()
        {
            if let Err(e) = roots.add(cert) {
                problems.push(at, format!("certificate {} is not a usable CA: {e}", i + 1));
                return None;
            }
        }
        Some(roots)
    }

    /// Every CRL of a PEM file (at least one), or a problem at `at`.
    pub(crate) fn crls(
        &mut self,
        path: &Path,
        at: ConfigPath,
        problems: &mut Problems,
    ) -> Option<Vec<CertificateRevocationListDer<'static>>> {
        let pem = self.read(path, at.clone(), problems)?;
        let crls = CertificateRevocationListDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not a PEM CRL file: {e}"))
            .and_then(|crls| {
                if crls.is_empty() {
                    Err("no `X509 CRL` block in the file".to_owned())
                } else {
                    Ok(crls)
                }
            });
        crls.map_err(|e| problems.push(at, e)).ok()
    }

    /// The private key of a PEM file, or a problem at `at`.
    pub(crate) fn private_key(
        &mut self,
        path: &Path,
        at: ConfigPath,
        problems: &mut Problems,
    ) -> Option<PrivateKeyDer<'static>> {
        let pem = self.read(path, at.clone(), problems)?;
        PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|e| {
                problems.push(
                    at,
                    format!(
                        "no usable private key in `{}` ({e}); expected a PEM `PRIVATE KEY`, \
                         `RSA PRIVATE KEY` or `EC PRIVATE KEY` block",
                        path.display()
                    ),
                );
            })
            .ok()
    }

    /// The digest of everything read.
    pub(crate) fn digest(self) -> [u8; 32] {
        self.digest.finalize().into()
    }
}

/// What a config section built from its files, compared by the files' digest: equal when
/// the files held the same bytes. Debug output shows the digest, never the content (keys).
#[derive(Clone)]
pub(crate) struct Digested<T> {
    value: T,
    digest: [u8; 32],
}

impl<T> Digested<T> {
    pub(crate) fn new(value: T, files: Files) -> Self {
        Self {
            value,
            digest: files.digest(),
        }
    }
}

impl<T> std::ops::Deref for Digested<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> PartialEq for Digested<T> {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl<T> Eq for Digested<T> {}

impl<T> std::fmt::Debug for Digested<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Digested({})", hex::encode(&self.digest[..8]))
    }
}
