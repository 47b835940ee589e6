//! Bearer tokens (JWT) for identification: part of the identify phase.
//!
//! `[identity.jwt]` names a JWKS file (RFC 7517) of the keys tokens are signed with, and
//! optionally the accepted issuers and audiences. A request presenting a token (by default
//! `Authorization: Bearer ...`) has it verified once, before any rule is tried: signature by
//! the key its `kid` names (or the only key), an algorithm that key allows, `exp` required,
//! `nbf` checked, both with `leeway`. A token that fails any of this is `401 invalid_token`
//! whatever else the request matches, as an invalid API key is: a forged or expired token must
//! not fall back to a default client. The claims of a valid one feed the `jwt_claim` rules.
//!
//! Like the TLS files, the JWKS is read and checked when the config loads and is part of the
//! config, so a reload (or a change to the file) rotates keys.
//!
//! Verifying an ES256 signature cost about 88 µs of proxy CPU in the security benchmark, five
//! times a whole cleartext request, and a client sends the same token for many requests, so
//! verified tokens are cached by their SHA-256 until they expire ([`TokenCache`]; a cached
//! token costs about 1 µs). The cache belongs to one snapshot's verifier:
//! new keys, issuers or audiences start an empty one. Refused tokens are never cached.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::config::files::{Digested, Files};
use crate::config::{ConfigPath, Problems, check_duration};

/// `[identity.jwt]`: how bearer tokens are verified.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// JWKS file (`{"keys": [...]}`) with the keys tokens may be signed with; relative to the
    /// config file.
    pub jwks: PathBuf,
    /// Accepted `iss` values; a token must carry one of them. Empty: not checked.
    #[serde(default)]
    pub issuers: Vec<String>,
    /// Accepted audiences; a token's `aud` must contain one of them. Empty: not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Header carrying the token: `authorization` (the default) expects `Bearer <token>`,
    /// any other header holds the bare token.
    #[serde(default = "default_header")]
    pub header: String,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// Send the token on to the upstream (the services may authorize the user with it);
    /// `false` strips it once verified.
    #[serde(default = "default_forward")]
    pub forward: bool,
    /// Upstream headers set from verified claims, header → claim path (`{ "x-user-id" =
    /// "sub" }`; an array claim is joined with `,`). Copies sent by the client are always
    /// removed, so only a verified token can set them.
    #[serde(default)]
    pub claim_headers: std::collections::BTreeMap<String, String>,
    /// The keys the file held when the config was loaded.
    #[serde(skip)]
    pub(crate) loaded: Option<Keys>,
}

fn default_header() -> String {
    "authorization".into()
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

fn default_forward() -> bool {
    true
}

/// The verification keys of one JWKS file (compared by the file's digest).
pub(crate) type Keys = Digested<Arc<[Key]>>;

pub(crate) struct Key {
    kid: Option<String>,
    decoding: DecodingKey,
    /// What this key may verify: its family's algorithms, or the one its `alg` names.
    algorithms: Vec<Algorithm>,
}

impl JwtConfig {
    /// Makes a relative `jwks` path relative to `base`.
    pub(crate) fn resolve(&mut self, base: &Path) {
        if self.jwks.is_relative() {
            self.jwks = base.join(&self.jwks);
        }
    }

    /// Reads the JWKS file and checks the settings, recording every problem under `at`.
    pub(crate) fn load(&mut self, at: &ConfigPath, problems: &mut Problems) {
        self.loaded = None;
        if HeaderName::from_bytes(self.header.as_bytes()).is_err() {
            problems.push(
                at.key("header"),
                format!("invalid header name `{}`", self.header),
            );
        }
        for (name, path) in &self.claim_headers {
            let at = at.key("claim_headers").key(name.clone());
            if HeaderName::from_bytes(name.as_bytes()).is_err() {
                problems.push(at, format!("invalid header name `{name}`"));
            } else if let Err(e) = check_claim_path(path) {
                problems.push(at, e);
            }
        }
        check_duration(
            self.leeway,
            Duration::ZERO..=Duration::from_secs(600),
            &at.key("leeway"),
            problems,
        );
        let mut files = Files::new();
        let Some(bytes) = files.read(&self.jwks, at.key("jwks"), problems) else {
            return;
        };
        let at = at.key("jwks");
        // Keys one at a time: an identity provider's JWKS often carries encryption keys
        // (`"use": "enc"`, `RSA-OAEP`) next to its signing keys; those are skipped, not fatal.
        #[derive(Deserialize)]
        struct RawSet {
            keys: Vec<Value>,
        }
        let set: RawSet = match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => {
                problems.push(
                    at,
                    format!("`{}` is not a JWKS document: {e}", self.jwks.display()),
                );
                return;
            }
        };
        let before = problems.len();
        let mut keys = Vec::with_capacity(set.keys.len());
        for (i, raw) in set.keys.into_iter().enumerate() {
            if raw.get("use").and_then(Value::as_str) == Some("enc") {
                continue;
            }
            let kid = raw.get("kid").and_then(Value::as_str).map(str::to_owned);
            let jwk: Jwk = match serde_json::from_value(raw) {
                Ok(jwk) => jwk,
                Err(e) => {
                    problems.push(at.clone(), format!("key {} (kid {kid:?}): {e}", i + 1));
                    continue;
                }
            };
            match Key::from_jwk(&jwk) {
                Ok(Some(k)) => keys.push(k),
                Ok(None) => {}
                Err(e) => problems.push(at.clone(), format!("key {} (kid {kid:?}): {e}", i + 1)),
            }
        }
        if problems.len() > before {
            return;
        }
        if keys.is_empty() {
            problems.push(
                at,
                "the JWKS has no signing keys: no token could ever be valid",
            );
            return;
        }
        self.loaded = Some(Digested::new(keys.into(), files));
    }

    /// The header name (validated by `load`).
    pub(crate) fn header_name(&self) -> Option<HeaderName> {
        HeaderName::from_bytes(self.header.as_bytes()).ok()
    }
}

impl Key {
    /// The key, `None` for an encryption key (its `alg` is not a signature algorithm).
    fn from_jwk(jwk: &Jwk) -> Result<Option<Self>, String> {
        let alg = match &jwk.common.key_algorithm {
            Some(alg) => match alg.to_string().parse::<Algorithm>() {
                Ok(alg) => Some(alg),
                Err(_) => return Ok(None),
            },
            None => None,
        };
        let decoding = DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable key: {e}"))?;
        let family = decoding.family();
        let family = family.algorithms();
        let algorithms = match alg {
            Some(alg) => {
                if !family.contains(&alg) {
                    return Err(format!("`alg` {alg:?} does not fit the key's type"));
                }
                vec![alg]
            }
            None => family.to_vec(),
        };
        Ok(Some(Self {
            kid: jwk.common.key_id.clone(),
            decoding,
            algorithms,
        }))
    }
}

/// The claims of a verified token.
pub(crate) type Claims = Map<String, Value>;

/// Why a presented token was refused (logged at debug; the client only learns
/// `invalid_token`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenError {
    Malformed,
    UnknownKey,
    Rejected,
}

/// Verifies tokens against one config's keys.
#[derive(Debug)]
pub(crate) struct Verifier {
    header: HeaderName,
    bearer: bool,
    keys: Keys,
    validation: Validation,
    /// Stripped before the request goes upstream (`forward = false`).
    pub(crate) strip: bool,
    /// `claim_headers`: header, claim path.
    claim_headers: Vec<(HeaderName, String)>,
    cache: TokenCache,
}

/// Verified tokens by SHA-256, with the time window they are valid in (leeway included).
#[derive(Debug)]
struct TokenCache {
    entries: dashmap::DashMap<[u8; 32], Cached>,
    capacity: usize,
}

#[derive(Debug, Clone)]
struct Cached {
    claims: Arc<Claims>,
    /// Unix seconds: valid from `not_before` to `expires` inclusive.
    not_before: u64,
    expires: u64,
}

/// Most verified tokens one verifier keeps (a few hundred bytes of claims each).
pub const TOKEN_CACHE_ENTRIES: usize = 16_384;

impl TokenCache {
    fn new(capacity: usize) -> Self {
        Self {
            entries: dashmap::DashMap::new(),
            capacity,
        }
    }

    fn get(&self, digest: &[u8; 32], now: u64) -> Option<Arc<Claims>> {
        let hit = self.entries.get(digest)?;
        if (hit.not_before..=hit.expires).contains(&now) {
            return Some(hit.claims.clone());
        }
        drop(hit);
        self.entries.remove(digest);
        None
    }

    fn insert(&self, digest: [u8; 32], entry: Cached, now: u64) {
        if self.entries.len() >= self.capacity {
            // Full: drop what expired; if that is not enough, start over (a burst of distinct
            // tokens costs re-verification, never unbounded memory).
            self.entries.retain(|_, c| c.expires >= now);
            if self.entries.len() >= self.capacity {
                self.entries.clear();
            }
        }
        self.entries.insert(digest, entry);
    }
}

impl Verifier {
    /// From a validated config (`None` if it has no `[identity.jwt]`).
    pub(crate) fn build(config: &JwtConfig) -> Option<Self> {
        let keys = config.loaded.clone()?;
        let header = config.header_name()?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = config.leeway.as_secs();
        validation.validate_nbf = true;
        if !config.issuers.is_empty() {
            validation.set_issuer(&config.issuers);
            validation.required_spec_claims.insert("iss".into());
        }
        if config.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&config.audiences);
            validation.required_spec_claims.insert("aud".into());
        }
        Some(Self {
            bearer: header == http::header::AUTHORIZATION,
            header,
            keys,
            validation,
            strip: !config.forward,
            claim_headers: config
                .claim_headers
                .iter()
                .filter_map(|(h, path)| {
                    Some((HeaderName::from_bytes(h.as_bytes()).ok()?, path.clone()))
                })
                .collect(),
            cache: TokenCache::new(TOKEN_CACHE_ENTRIES),
        })
    }

    /// The header tokens come in.
    pub(crate) fn header(&self) -> &HeaderName {
        &self.header
    }

    /// Sets the `claim_headers` from a verified token's claims, after removing whatever the
    /// client sent under those names.
    pub(crate) fn state_claims(&self, headers: &mut HeaderMap, claims: Option<&Claims>) {
        for (name, path) in &self.claim_headers {
            headers.remove(name);
            let Some(claims) = claims else { continue };
            let values = claim_values(claims, path);
            if values.is_empty() {
                continue;
            }
            match http::HeaderValue::try_from(values.join(",")) {
                Ok(v) => {
                    headers.insert(name.clone(), v);
                }
                Err(_) => tracing::debug!(header = %name, "claim is not a valid header value"),
            }
        }
    }

    /// The claims of the request's token: `Ok(None)` without one, an error for an invalid one.
    pub(crate) fn verify(&self, headers: &HeaderMap) -> Result<Option<Arc<Claims>>, TokenError> {
        let Some(value) = headers.get(&self.header) else {
            return Ok(None);
        };
        let value = value.to_str().map_err(|_| TokenError::Malformed)?.trim();
        let token = if self.bearer {
            match value.split_once(' ') {
                Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
                // Basic or another scheme: not ours to judge.
                _ => return Ok(None),
            }
        } else {
            value
        };
        let now = jsonwebtoken::get_current_timestamp();
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(claims) = self.cache.get(&digest, now) {
            return Ok(Some(claims));
        }
        let claims = Arc::new(self.verify_signed(token)?);
        // `exp` is required, so it is there; `nbf` is optional. (NumericDate may be a float.)
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let time = |name| claims.get(name).and_then(Value::as_f64).map(|t| t as u64);
        let leeway = self.validation.leeway;
        let entry = Cached {
            claims: claims.clone(),
            not_before: time("nbf").map_or(0, |t| t.saturating_sub(leeway)),
            expires: time("exp").map_or(0, |t| t.saturating_add(leeway)),
        };
        self.cache.insert(digest, entry, now);
        Ok(Some(claims))
    }

    /// Full verification: header, key, algorithm, signature, then the claims.
    fn verify_signed(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let key = match &header.kid {
            Some(kid) => self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            None if self.keys.len() == 1 => self.keys.first(),
            None => None,
        }
        .ok_or(TokenError::UnknownKey)?;
        // The key decides the algorithm, never the token alone (no `none`, no HS256 with an
        // RSA public key as the secret).
        if !key.algorithms.contains(&header.alg) {
            return Err(TokenError::Rejected);
        }
        let mut validation = self.validation.clone();
        validation.algorithms = vec![header.alg];
        jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation)
            .map(|data| data.claims)
            .map_err(|_| TokenError::Rejected)
    }
}

/// Checks a dotted claim path (`sub`, `realm_access.roles`).
pub(crate) fn check_claim_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.split('.').any(str::is_empty) {
        return Err(format!(
            "`{path}` is not a claim path (claim names joined by `.`)"
        ));
    }
    Ok(())
}

/// The values a dotted claim path reaches: `roles` or `realm_access.roles`. Arrays give each
/// element; numbers and booleans give their JSON text; objects and nulls give nothing.
pub(crate) fn claim_values<'a>(claims: &'a Claims, path: &str) -> Vec<std::borrow::Cow<'a, str>> {
    let mut segments = path.split('.');
    let Some(first) = segments.next() else {
        return Vec::new();
    };
    let mut value = claims.get(first);
    for seg in segments {
        value = value.and_then(|v| v.get(seg));
    }
    let mut out = Vec::new();
    let mut push = |v: &'a Value| match v {
        Value::String(s) => out.push(std::borrow::Cow::Borrowed(s.as_str())),
        Value::Number(_) | Value::Bool(_) => out.push(std::borrow::Cow::Owned(v.to_string())),
        _ => {}
    };
    match value {
        Some(Value::Array(items)) => items.iter().for_each(&mut push),
        Some(v) => push(v),
        None => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_cache_keeps_tokens_within_their_window_and_stays_bounded() {
        let cache = TokenCache::new(4);
        let entry = |not_before, expires| Cached {
            claims: Arc::new(Claims::new()),
            not_before,
            expires,
        };
        cache.insert([1; 32], entry(100, 200), 150);
        assert!(cache.get(&[1; 32], 150).is_some());
        assert!(
            cache.get(&[1; 32], 200).is_some(),
            "valid through its last second"
        );
        assert!(cache.get(&[1; 32], 201).is_none(), "expired");
        assert!(
            cache.get(&[1; 32], 150).is_none(),
            "an expired entry is dropped"
        );
        cache.insert([2; 32], entry(100, 200), 150);
        assert!(cache.get(&[2; 32], 99).is_none(), "not valid yet");
        for i in 0..100u8 {
            cache.insert([i; 32], entry(0, 1000), 150);
            assert!(cache.entries.len() <= 4);
            assert!(
                cache.get(&[i; 32], 150).is_some(),
                "the newest entry is kept"
            );
        }
    }

    #[test]
    fn claim_paths_reach_nested_values_and_array_elements() {
        let claims: Claims = serde_json::from_value(serde_json::json!({
            "sub": "u1",
            "admin": true,
            "level": 3,
            "realm": { "roles": ["viewer", "staff", 7, { "x": 1 }] },
            "nothing": null,
        }))
        .expect("an object");
        let values = |path| {
            claim_values(&claims, path)
                .into_iter()
                .map(|v| v.into_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(values("sub"), ["u1"]);
        assert_eq!(values("admin"), ["true"]);
        assert_eq!(values("level"), ["3"]);
        assert_eq!(values("realm.roles"), ["viewer", "staff", "7"]);
        assert!(values("realm").is_empty(), "an object is no value");
        assert!(values("nothing").is_empty());
        assert!(values("realm.missing").is_empty());
        assert!(values("sub.deeper").is_empty());
    }
}
