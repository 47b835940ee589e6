//! Client identification: the first phase after accept. Resolves each request, once, to the
//! [`ClientProfile`] that picks its routes (and, later, its plugin chain).
//!
//! Clients are tried in config order and each client's rules in order; the first rule that matches
//! wins. API keys are stored as SHA-256 hashes and compared in constant time, so neither the config
//! file nor response timing gives a key away.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use regex::Regex;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::ConfigPath;
use crate::config::Problems;
use crate::host::{HostPattern, request_host};
use crate::listener::tls::{ClientCert, TlsConfig};
use crate::ratelimit::RateLimit;

mod jwt;

pub(crate) use self::jwt::Verifier;
use self::jwt::{Claims, check_claim_path, claim_values};
pub use self::jwt::{JwtConfig, TOKEN_CACHE_ENTRIES};

/// `[identity]`: what happens to requests no client rule matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Client that unidentified requests are served as. When unset they get
    /// `401 unauthenticated`.
    pub default_client: Option<String>,
    /// Bearer token verification, for `jwt_claim` rules.
    pub jwt: Option<JwtConfig>,
}

/// `[[clients]]`: one kind of frontend (web, mobile app, voice assistant, partner...).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Unique name; sent upstream in the client header and used by routes.
    pub name: String,
    /// Free-form attributes handed to plugins with the client name.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Rules tried in order; any match identifies the request as this client.
    #[serde(default)]
    pub identify: Vec<IdentifyRule>,
    /// How many requests the client may send (`429 rate_limited` beyond); unlimited when
    /// unset.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
}

/// One identification rule. Exactly one form per rule: `{ SOURCE, equals }` or
/// `{ SOURCE, regex }` where SOURCE is `header`, `client_cert` or `jwt_claim`, `{ user_agent }`,
/// `{ host }` or `{ api_key_header, sha256 }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentifyRule {
    /// Header to look at (with `equals` or `regex`).
    pub header: Option<String>,
    /// Name on the verified TLS client certificate to look at (with `equals` or `regex`);
    /// needs `[tls] client_ca`.
    pub client_cert: Option<CertField>,
    /// Claim of the verified bearer token to look at, as a dotted path (with `equals` or
    /// `regex`; an array claim matches if any element does); needs `[identity.jwt]`.
    pub jwt_claim: Option<String>,
    /// The header's (certificate name's, claim's) value must be exactly this.
    pub equals: Option<String>,
    /// The header's (certificate name's, claim's) value must match this regex.
    pub regex: Option<String>,
    /// The `user-agent` header must match this regex.
    pub user_agent: Option<String>,
    /// The host the request is for (`:authority` or `host`, without the port) must be this
    /// name (any case), or, written `*.shop.example`, one label under it.
    pub host: Option<String>,
    /// Header carrying an API key (with `sha256`).
    pub api_key_header: Option<String>,
    /// Hex SHA-256 digests of the accepted keys (`printf %s KEY | sha256sum`).
    #[serde(default)]
    pub sha256: Vec<String>,
}

/// Which name on a client certificate a `client_cert` rule matches. A certificate can carry
/// several names of a kind; the rule matches if any of them does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CertField {
    /// The subject's common name (CN).
    SubjectCn,
    /// A DNS name among the subject alternative names.
    SanDns,
    /// A URI among them (a SPIFFE ID, for instance).
    SanUri,
    /// An e-mail address among them.
    SanEmail,
    /// The SHA-256 fingerprint of the certificate (lowercase hex), to pin one device.
    Fingerprint,
}

impl CertField {
    fn values(self, cert: &ClientCert) -> &[String] {
        match self {
            Self::SubjectCn => &cert.subject_cn,
            Self::SanDns => &cert.san_dns,
            Self::SanUri => &cert.san_uri,
            Self::SanEmail => &cert.san_email,
            Self::Fingerprint => std::slice::from_ref(&cert.fingerprint),
        }
    }
}

/// Who a request comes from, resolved once per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientProfile {
    /// The client's configured name.
    pub name: Arc<str>,
    /// The client's configured attributes.
    pub attributes: Arc<[(String, String)]>,
}

/// The client a request was identified as, and the verified token's claims if it had one.
#[derive(Debug)]
pub(crate) struct Identified<'a> {
    /// The client's index (for the router).
    pub(crate) index: usize,
    pub(crate) profile: &'a Arc<ClientProfile>,
    pub(crate) claims: Option<Arc<Claims>>,
}

/// Why a request could not be given a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum IdentityError {
    /// No rule matched and there is no default client.
    #[error("no client rule matched the request")]
    Unidentified,
    /// The request carried an API key that no client accepts.
    #[error("the API key presented is not valid")]
    InvalidApiKey,
    /// The request carried a bearer token that does not verify.
    #[error("the bearer token presented is not valid")]
    InvalidToken,
}

/// The compiled identification rules of one snapshot.
#[derive(Debug)]
pub(crate) struct Identifier {
    clients: Vec<(Arc<ClientProfile>, Vec<Rule>)>,
    /// Each client's name as a header value (sent upstream on every request), by index.
    name_values: Vec<HeaderValue>,
    default: Option<usize>,
    /// Every header that carries an API key, with every hash any client accepts on it.
    /// These headers are stripped before the request goes upstream.
    api_keys: Vec<(HeaderName, Vec<[u8; 32]>)>,
    /// Credentials not forwarded upstream: the API-key headers, and the token header when
    /// `[identity.jwt] forward = false`.
    strip_headers: Vec<HeaderName>,
    /// Bearer token verification (`[identity.jwt]`), shared with the next snapshot when its
    /// settings are the same (its cache of verified tokens survives unrelated reloads).
    jwt: Option<Arc<Verifier>>,
    /// `x-forwarded-client-cert` handling, with `[tls]`: `Some(forward)` removes client copies
    /// and, when `forward`, states the verified certificate.
    xfcc: Option<bool>,
}

#[derive(Debug)]
enum Rule {
    HeaderEquals(HeaderName, Vec<u8>),
    HeaderRegex(HeaderName, Regex),
    CertEquals(CertField, String),
    CertRegex(CertField, Regex),
    ClaimEquals(String, String),
    ClaimRegex(String, Regex),
    UserAgent(Regex),
    Host(HostPattern),
    /// Index into `Identifier::api_keys` (the header) and this client's accepted hashes.
    ApiKey(usize, Vec<[u8; 32]>),
}

const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// What identification verified about a request: the token's claims, the connection's
/// certificate.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Verified<'a> {
    pub(crate) claims: Option<&'a Claims>,
    pub(crate) cert: Option<&'a ClientCert>,
}

/// What a request presents to identify itself.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Presenting<'a> {
    pub(crate) headers: &'a HeaderMap,
    /// The request target (its authority, for `host` rules over HTTP/2).
    pub(crate) uri: &'a http::Uri,
    /// The connection's verified TLS client certificate.
    pub(crate) cert: Option<&'a ClientCert>,
}

/// SHA-256 of each API-key header the request presented, by `Identifier::api_keys` index.
type Presented = Vec<(usize, [u8; 32])>;

fn any_hash_matches(hashes: &[[u8; 32]], digest: &[u8; 32]) -> bool {
    // No short-circuit: timing stays independent of which (if any) key matched.
    let mut matched = subtle::Choice::from(0u8);
    for h in hashes {
        matched |= h.ct_eq(digest);
    }
    bool::from(matched)
}

impl Rule {
    fn matches(
        &self,
        req: &Presenting<'_>,
        presented: &Presented,
        claims: Option<&Claims>,
    ) -> bool {
        let headers = req.headers;
        match self {
            Rule::HeaderEquals(name, value) => headers
                .get_all(name)
                .iter()
                .any(|v| v.as_bytes() == value.as_slice()),
            Rule::HeaderRegex(name, re) => headers
                .get_all(name)
                .iter()
                .any(|v| v.to_str().is_ok_and(|s| re.is_match(s))),
            Rule::CertEquals(field, value) => req
                .cert
                .is_some_and(|c| field.values(c).iter().any(|v| v == value)),
            Rule::CertRegex(field, re) => req
                .cert
                .is_some_and(|c| field.values(c).iter().any(|v| re.is_match(v))),
            Rule::ClaimEquals(path, value) => {
                claims.is_some_and(|c| claim_values(c, path).iter().any(|v| v == value))
            }
            Rule::ClaimRegex(path, re) => {
                claims.is_some_and(|c| claim_values(c, path).iter().any(|v| re.is_match(v)))
            }
            Rule::UserAgent(re) => headers
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|s| re.is_match(s)),
            Rule::Host(pattern) => {
                request_host(req.uri, headers).is_some_and(|h| pattern.matches(h))
            }
            Rule::ApiKey(header, hashes) => presented
                .iter()
                .any(|(h, digest)| h == header && any_hash_matches(hashes, digest)),
        }
    }
}

impl Identifier {
    /// Builds from a validated config (validation guarantees the unwraps below hold).
    /// `verifier` is the current snapshot's, when `[identity.jwt]` did not change.
    pub(crate) fn build(
        identity: &IdentityConfig,
        clients: &[ClientConfig],
        tls: Option<&TlsConfig>,
        verifier: Option<Arc<Verifier>>,
    ) -> Self {
        let mut api_keys: Vec<(HeaderName, Vec<[u8; 32]>)> = Vec::new();
        let compiled = clients
            .iter()
            .map(|c| {
                let profile = Arc::new(ClientProfile {
                    name: c.name.as_str().into(),
                    attributes: c
                        .attributes
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                });
                let rules = c
                    .identify
                    .iter()
                    .map(
                        |r| match compile_rule(r).expect("identify rules were validated") {
                            Compiled::Rule(rule) => rule,
                            Compiled::ApiKey(header, hashes) => {
                                let idx = match api_keys.iter().position(|(h, _)| *h == header) {
                                    Some(i) => i,
                                    None => {
                                        api_keys.push((header, Vec::new()));
                                        api_keys.len() - 1
                                    }
                                };
                                api_keys[idx].1.extend_from_slice(&hashes);
                                Rule::ApiKey(idx, hashes)
                            }
                        },
                    )
                    .collect();
                (profile, rules)
            })
            .collect();
        let name_values = clients
            .iter()
            .map(|c| HeaderValue::from_str(&c.name).expect("client names were validated"))
            .collect();
        let default = identity
            .default_client
            .as_ref()
            .and_then(|d| clients.iter().position(|c| &c.name == d));
        let jwt = verifier.or_else(|| {
            identity
                .jwt
                .as_ref()
                .and_then(Verifier::build)
                .map(Arc::new)
        });
        let strip_headers = api_keys
            .iter()
            .map(|(h, _)| h.clone())
            .chain(jwt.iter().filter(|v| v.strip).map(|v| v.header().clone()))
            .collect();
        Self {
            clients: compiled,
            name_values,
            default,
            strip_headers,
            api_keys,
            jwt,
            xfcc: tls.map(|t| t.forward_client_cert),
        }
    }

    /// Resolves the client of a request: its index (for the router) and profile.
    pub(crate) fn identify(&self, req: Presenting<'_>) -> Result<Identified<'_>, IdentityError> {
        let headers = req.headers;
        // A presented key must be valid whatever else the request matches: falling back to
        // another client or the default would turn a typo or a revoked key into silently
        // different traffic.
        let mut presented = Presented::new();
        for (idx, (header, accepted)) in self.api_keys.iter().enumerate() {
            if let Some(value) = headers.get(header) {
                let digest: [u8; 32] = Sha256::digest(value.as_bytes()).into();
                if !any_hash_matches(accepted, &digest) {
                    return Err(IdentityError::InvalidApiKey);
                }
                presented.push((idx, digest));
            }
        }
        // Likewise a presented token must verify.
        let claims = match &self.jwt {
            Some(v) => v.verify(headers).map_err(|e| {
                tracing::debug!(reason = ?e, "bearer token refused");
                IdentityError::InvalidToken
            })?,
            None => None,
        };
        let index = self
            .clients
            .iter()
            .position(|(_, rules)| {
                rules
                    .iter()
                    .any(|r| r.matches(&req, &presented, claims.as_deref()))
            })
            .or(self.default)
            .ok_or(IdentityError::Unidentified)?;
        Ok(Identified {
            index,
            profile: &self.clients[index].0,
            claims,
        })
    }

    /// The name of the client at `idx` (from [`Identifier::identify`]) as a header value.
    pub(crate) fn name_value(&self, idx: usize) -> &HeaderValue {
        &self.name_values[idx]
    }

    /// The bearer token verifier, to hand to the next snapshot.
    pub(crate) fn verifier(&self) -> Option<Arc<Verifier>> {
        self.jwt.clone()
    }

    /// States the verified identity facts upstream: credentials not forwarded are removed,
    /// `claim_headers` set from the token's claims and `x-forwarded-client-cert` from the
    /// client certificate (client copies removed either way).
    pub(crate) fn state_upstream(&self, headers: &mut HeaderMap, req: &Verified<'_>) {
        for h in &self.strip_headers {
            headers.remove(h);
        }
        if let Some(jwt) = &self.jwt {
            jwt.state_claims(headers, req.claims);
        }
        if let Some(forward) = self.xfcc {
            headers.remove(X_FORWARDED_CLIENT_CERT);
            if let Some(cert) = req.cert.filter(|_| forward)
                && let Ok(v) = HeaderValue::try_from(cert.xfcc())
            {
                headers.insert(X_FORWARDED_CLIENT_CERT, v);
            }
        }
    }
}

/// A compiled rule; API-key rules get their header index once all clients are known.
enum Compiled {
    Rule(Rule),
    ApiKey(HeaderName, Vec<[u8; 32]>),
}

fn compile_rule(r: &IdentifyRule) -> Result<Compiled, String> {
    let header = |name: &str| {
        HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("invalid header name `{name}`"))
    };
    let regex = |re: &str| {
        Regex::new(re).map_err(|e| {
            // The regex crate's message is multi-line with a caret diagram; keep its last line.
            let msg = e.to_string();
            let reason = msg
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim();
            format!(
                "invalid regex `{re}`: {}",
                reason.trim_start_matches("error: ")
            )
        })
    };
    let forms = [
        r.equals.is_some(),
        r.regex.is_some(),
        r.user_agent.is_some(),
        r.host.is_some(),
        r.api_key_header.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if forms != 1 {
        return Err(
            "a rule needs exactly one of `equals` or `regex` (with `header`, `client_cert` or \
             `jwt_claim`), `user_agent`, `host` or `api_key_header` (with `sha256`)"
                .into(),
        );
    }
    let sources = [
        r.header.is_some(),
        r.client_cert.is_some(),
        r.jwt_claim.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if sources > 1 {
        return Err("a rule looks at one of `header`, `client_cert` or `jwt_claim`".into());
    }
    // With exactly one form set, this also keeps `user_agent` or `api_key_header` from
    // sharing a rule with a source.
    if sources == 1 && r.equals.is_none() && r.regex.is_none() {
        return Err("`header`, `client_cert` and `jwt_claim` go with `equals` or `regex`".into());
    }
    if !r.sha256.is_empty() && r.api_key_header.is_none() {
        return Err("`sha256` goes with `api_key_header`".into());
    }
    if let Some(host) = &r.host {
        return Ok(Compiled::Rule(Rule::Host(HostPattern::parse(host)?)));
    }
    if let Some(path) = &r.jwt_claim {
        check_claim_path(path)?;
        return Ok(Compiled::Rule(match (&r.equals, &r.regex) {
            (Some(v), _) => Rule::ClaimEquals(path.clone(), v.clone()),
            (_, Some(re)) => Rule::ClaimRegex(path.clone(), regex(re)?),
            (None, None) => unreachable!("checked above"),
        }));
    }
    if let Some(field) = r.client_cert {
        return Ok(Compiled::Rule(match (&r.equals, &r.regex) {
            (Some(v), _) => Rule::CertEquals(field, v.clone()),
            (_, Some(re)) => Rule::CertRegex(field, regex(re)?),
            (None, None) => unreachable!("checked above"),
        }));
    }
    match (r, &r.header) {
        (
            IdentifyRule {
                equals: Some(v), ..
            },
            Some(h),
        ) => Ok(Compiled::Rule(Rule::HeaderEquals(
            header(h)?,
            v.as_bytes().to_vec(),
        ))),
        (
            IdentifyRule {
                regex: Some(re), ..
            },
            Some(h),
        ) => Ok(Compiled::Rule(Rule::HeaderRegex(header(h)?, regex(re)?))),
        (
            IdentifyRule {
                equals: Some(_), ..
            }
            | IdentifyRule { regex: Some(_), .. },
            None,
        ) => Err("`equals` and `regex` need `header`, `client_cert` or `jwt_claim`".into()),
        (
            IdentifyRule {
                user_agent: Some(re),
                ..
            },
            _,
        ) => Ok(Compiled::Rule(Rule::UserAgent(regex(re)?))),
        (
            IdentifyRule {
                api_key_header: Some(h),
                sha256,
                ..
            },
            _,
        ) => {
            if sha256.is_empty() {
                return Err("`api_key_header` needs at least one `sha256` key hash".into());
            }
            let hashes = sha256
                .iter()
                .map(|hexed| {
                    let mut out = [0u8; 32];
                    hex::decode_to_slice(hexed, &mut out)
                        .map(|()| out)
                        .map_err(|_| {
                            format!("`{hexed}` is not a SHA-256 digest (64 hex characters)")
                        })
                })
                .collect::<Result<_, _>>()?;
            Ok(Compiled::ApiKey(header(h)?, hashes))
        }
        _ => unreachable!("exactly one form is set"),
    }
}

/// Checks `[identity]` and `[[clients]]`.
pub(crate) fn validate(
    identity: &IdentityConfig,
    clients: &[ClientConfig],
    tls: Option<&TlsConfig>,
    root: &ConfigPath,
    problems: &mut Problems,
) {
    let asks_for_certs = tls.is_some_and(|t| t.client_ca.is_some());
    let mut seen = HashSet::new();
    for (i, c) in clients.iter().enumerate() {
        let at = root.key("clients").index(i);
        if !crate::config::is_valid_name(&c.name) {
            problems.push(at.key("name"), crate::config::NAME_RULE);
        } else if c.name == crate::metrics::OTHER {
            problems.push(
                at.key("name"),
                "`other` is reserved: metrics label requests no client matched with it",
            );
        } else if !seen.insert(c.name.as_str()) {
            problems.push(
                at.key("name"),
                format!("duplicate client name `{}`", c.name),
            );
        }
        if let Some(limit) = &c.rate_limit {
            limit.validate(&at.key("rate_limit"), problems);
        }
        for (j, rule) in c.identify.iter().enumerate() {
            if let Err(e) = compile_rule(rule) {
                problems.push(at.key("identify").index(j), e);
            } else if rule.client_cert.is_some() && !asks_for_certs {
                problems.push(
                    at.key("identify").index(j).key("client_cert"),
                    "needs `[tls]` with `client_ca`: without it no client presents a certificate",
                );
            } else if rule.jwt_claim.is_some() && identity.jwt.is_none() {
                problems.push(
                    at.key("identify").index(j).key("jwt_claim"),
                    "needs `[identity.jwt]`: tokens are only read once their signature is checked",
                );
            }
        }
    }
    if let Some(d) = &identity.default_client
        && !clients.iter().any(|c| &c.name == d)
    {
        problems.push(
            root.key("identity").key("default_client"),
            format!("unknown client `{d}`"),
        );
    }
    if clients.is_empty() {
        problems.push(
            root.key("clients"),
            "at least one client is needed: every request is served as some client",
        );
    }
}

#[cfg(test)]
mod tests;
